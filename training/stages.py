# The pipeline's stages: one function per stage, and the Run they share (paths and results of one run).
# Imported by training/pipeline.py; not run on its own.
"""Stages of the training pipeline: base -> data -> [pretrain] -> sft -> pth_to_hf -> merge -> evaluate
-> [publish], each a function of the Run returning the paths it made."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from infer_engine.model_source import (
    ModelSourceError,
    check_remote_code,
    default_cache_dir,
    parse_source,
    public_source,
    redact,
)
from training import convert_merge, launcher, make_identity_data, schedule
from training.atomic_io import write_text_atomic
from training.config_render import literal_settings, render_config, template_settings, write_stage_config
from training.identity import IdentitySpec
from training.make_corpus import corpus_files
from training.plots import EVAL_PNG, LOSS_PNG, add_figures
from training.presets import (
    BASE_CACHE,
    BUILD_PREFIX,
    DATA_FILES,
    DATA_SETTINGS,
    GENERAL_PROMPTS_IN_HOOK,
    IDENTITY_PROMPTS,
    PUBLISH_MAX_LEAKAGE_RATE,
    PUBLISH_MIN_IDENTITY_ACCURACY,
    REHEARSE_ITERS,
    REHEARSE_REPLAY_PROMPTS,
    REHEARSE_REPLAY_TOKENS,
    RUNTIME_SETTINGS,
    STAGES,
    RunConfig,
    reproduce_command,
)
from training.progress import METRICS_FILE, write_metrics
from training.publish import TARGET_ENV, public_json
from training.runner import StageError, run_logged, say

# A replay answer's length before the base model has written it, for plans made before the data stage.
UNKNOWN_REPLAY_ANSWER_TOKENS = 128


class WorkerNodeDone(Exception):
    """A node other than node 0 (NODE_RANK > 0) finished its share of training; node 0 does the rest."""


@dataclass
class Run:
    """One pipeline run: its config, work dir, child environment and the results of finished stages.

    Args:
        cfg: the validated run config.
        env: environment for child processes.
        results: stage name -> result dict of the stages finished (this run or before).
    """

    cfg: RunConfig
    env: dict[str, str]
    results: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        assert self.cfg.work_dir is not None
        return self.cfg.work_dir

    def record_path(self, stage: str) -> Path:
        return self.work / "stages" / f"{stage}.json"

    def log_path(self, stage: str) -> Path:
        return self.work / "logs" / f"{stage}.log"

    def rel(self, path: Path) -> str:
        """`path` as recorded: relative inside the work dir (so a copied or moved work dir still resumes)."""
        return str(path.relative_to(self.work)) if path.is_relative_to(self.work) else str(path)

    def base_dir(self) -> Path:
        return self.results["base"]["model_dir"]

    def sft_base_dir(self) -> Path:
        """The model SFT starts from: the pre-trained merge with --corpus, else the base."""
        if self.cfg.stage_enabled("pretrain"):
            return self.results["pretrain"]["model_dir"]
        return self.base_dir()


def run_reported(cmd: list[str], log: Path, env: dict[str, str], report: Path) -> None:
    """``run_logged`` a tool whose printed report the user must see: kept in ``report``, the log, and said.

    Args:
        cmd: the argv.
        log: the stage log.
        env: the child's environment.
        report: where its stdout is kept.
    """
    run_logged(cmd, log, env, stdout=report)
    for line in report.read_text(encoding="utf-8").strip().splitlines():
        say(f"  {line}")


def _require_files(directory: Path, names: tuple[str, ...], tool: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise StageError(f"{tool} exited 0 but wrote no {', '.join(missing)} in {directory}")


def _corpus_digest(corpus: Path) -> str:
    # Changed corpus files must not silently reuse a finished pre-training.
    digest = hashlib.sha1()
    for path in corpus_files(corpus):
        stat = path.stat()
        digest.update(f"{path.relative_to(corpus)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def latest_checkpoint(train_dir: Path) -> Path | None:
    """The checkpoint mmengine's `last_checkpoint` file names, if it exists in `train_dir`.

    Args:
        train_dir: an xtuner.tools.train --work-dir.
    """
    marker = train_dir / "last_checkpoint"
    if not marker.is_file():
        return None
    # The marker holds an absolute path; look it up by name so a moved work dir still resumes. Under
    # DeepSpeed the checkpoint `iter_N.pth` is a directory of shards.
    checkpoint = train_dir / Path(marker.read_text().strip()).name
    return checkpoint if checkpoint.exists() else None


def lost_checkpoint(train_dir: Path) -> str | None:
    """The name of the checkpoint mmengine's `last_checkpoint` file names when it is not in `train_dir`.

    Args:
        train_dir: an xtuner.tools.train --work-dir.
    """
    marker = train_dir / "last_checkpoint"
    if not marker.is_file() or latest_checkpoint(train_dir) is not None:
        return None
    return Path(marker.read_text().strip()).name


def xtuner_train(run: Run, config: Path, train_dir: Path, log: Path) -> Path:
    """Train with XTuner (torchrun over --gpus processes when more than one), resuming from the last
    checkpoint in `train_dir` if any.

    Args:
        run: the run (for the child environment, --gpus and --deepspeed).
        config: the rendered config.
        train_dir: XTuner's --work-dir (checkpoints, logs).
        log: the stage log.
    """
    env = run.env
    resume_from = latest_checkpoint(train_dir)
    lost = lost_checkpoint(train_dir)
    if lost is not None:  # not silently: the iterations it held are trained again
        say(f"  the last checkpoint, {lost}, is gone (deleted, or an earlier run stopped while saving it): "
            "training starts from iteration 0")
    if resume_from is not None:
        say(f"  resuming training from {resume_from.name}")
        # XTuner and mmengine torch.load() the checkpoint without weights_only=False, which torch >= 2.6
        # then refuses (it holds optimizer and message-hub state); it is this run's own checkpoint.
        env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    cmd = launcher.train_command(config, train_dir, run.cfg.gpus, run.cfg.deepspeed, env, resume_from)
    try:
        run_logged(cmd, log, env, label="xtuner.tools.train")
    finally:  # what was trained, also when it stopped early
        write_metrics(train_dir, train_dir.parent / METRICS_FILE)
    checkpoint = latest_checkpoint(train_dir)
    if checkpoint is None and launcher.node_rank(run.env) != 0:
        rank = launcher.node_rank(run.env)
        raise WorkerNodeDone(f"node {rank}: training done; node 0 keeps the checkpoint and converts, merges "
                             "and evaluates")
    if checkpoint is None:
        raise StageError(f"xtuner.tools.train exited 0 but left no checkpoint in {train_dir}")
    return checkpoint


def public_base(source: str) -> str:
    """How a base source may be recorded or published: a built base by its builder, any other source as
    ``public_source`` gives it (no credentials, no local path).

    Args:
        source: --base or the preset's default base.
    """
    if source.startswith(BUILD_PREFIX):
        return f"built by {source.removeprefix(BUILD_PREFIX)}"
    return public_source(source)


def base_model_id(cfg: RunConfig) -> str | None:
    """The Hub id of a run's base (the card's base_model, the merged config's _name_or_path): an hf: source's
    repo, or the preset's base_model_id for the base it builds; None for any other base.

    Args:
        cfg: the run's settings.
    """
    source = cfg.base or cfg.spec.default_base
    if source.startswith(BUILD_PREFIX):
        return cfg.spec.base_model_id
    parsed = parse_source(source)
    return parsed.location if parsed.kind == "hf" else None


def stage_base(run: Run, log: Path) -> dict[str, Path]:
    """Resolve --base to a local model dir, build (once, cached) the preset's own base, or (--rehearse)
    build a random model of the preset's shapes."""
    result = run.work / "logs" / "base.path"
    source = run.cfg.base or run.cfg.spec.default_base
    if run.cfg.rehearse:
        run_logged([sys.executable, "-m", "training.rehearse", "base", "--preset", run.cfg.preset,
                    "--out", str(run.work / "rehearsal_base")], log, run.env, stdout=result)
    elif source.startswith(BUILD_PREFIX):
        module, function = source.removeprefix(BUILD_PREFIX).rsplit(".", 1)
        code = (f"import sys; from pathlib import Path; from {module} import {function}; "
                f"print({function}(Path(sys.argv[1])))")
        run_logged([sys.executable, "-c", code, str(BASE_CACHE)], log, run.env, stdout=result,
                   label=module)
    else:  # the source goes through the env: a token in its URL must not show in argv (ps) or the log
        run_logged([sys.executable, "-m", "infer_engine.model_source"], log,
                   {**run.env, "MODEL_SOURCE": source}, stdout=result, label="infer_engine.model_source")
    lines = result.read_text().split("\n")
    model_dir = Path(next((line for line in reversed(lines) if line.strip()), "").strip())
    if not (model_dir / "config.json").is_file():
        raise StageError(f"base model dir {model_dir} has no config.json")
    try:  # XTuner's tools load with trust_remote_code=True: decide before any of them runs
        check_remote_code(model_dir, run.cfg.remote_code_allowed, "--trust-remote-code",
                          public_base(source))
    except ModelSourceError as err:
        raise StageError(str(err)) from None
    return {"model_dir": model_dir}


def base_inputs(run: Run) -> dict[str, object]:
    """What the base stage depends on ("rehearse" only when set: older work dirs keep matching)."""
    inputs: dict[str, object] = {"preset": run.cfg.preset, "base": run.cfg.base and redact(run.cfg.base)}
    return {**inputs, "rehearse": True} if run.cfg.rehearse else inputs


def download_dir(run: Run) -> Path | None:
    """Where infer_engine.model_source writes the base model while it downloads it (its hidden
    `.KEY.partial` cache dir), for the progress display; None when the base needs no download."""
    source = run.cfg.base or run.cfg.spec.default_base
    try:
        parsed = parse_source(source) if source and not run.cfg.rehearse else None
    except ModelSourceError:  # the stage itself reports it
        return None
    if parsed is None or parsed.kind == "local":
        return None
    return default_cache_dir() / f".{parsed.cache_key}.partial"


def data_command(run: Run, out: Path) -> list[str]:
    """The training.make_identity_data command of a run's data stage.

    Args:
        run: the run (its name, recipe, preset and repeats).
        out: the directory the command writes.
    """
    # --name=VALUE: a name such as "-Bob" must not read as an option
    cmd = [sys.executable, "-m", "training.make_identity_data", f"--name={run.cfg.name}",
           "--recipe", run.cfg.recipe, "--out", str(out), "--base", str(run.base_dir()),
           "--model-desc", run.cfg.spec.model_desc, "--organisation", run.cfg.spec.organisation,
           *run.cfg.spec.data_args]
    if run.cfg.spec.open_replay:
        cmd.append("--open-replay")
    if run.cfg.identity_repeat is not None:
        cmd += ["--identity-repeat", str(run.cfg.identity_repeat)]
    if run.cfg.seed_repeat is not None:
        cmd += ["--seed-repeat", str(run.cfg.seed_repeat)]
    if run.cfg.rehearse:
        cmd += ["--replay-max", str(REHEARSE_REPLAY_PROMPTS),
                "--replay-max-new-tokens", str(REHEARSE_REPLAY_TOKENS)]
    return cmd


def stage_data(run: Run, log: Path) -> dict[str, Path]:
    """Build the identity data (and the held-out sets) with training.make_identity_data."""
    partial, final = run.work / "data.partial", run.work / "data"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = data_command(run, partial)
    run_logged(cmd, log, run.env)
    _require_files(partial, DATA_FILES, "make_identity_data")
    shutil.rmtree(final, ignore_errors=True)  # left by a run killed between this rename and its record
    os.replace(partial, final)
    return {"data_dir": final}


def _logging_runner(run: Run, log: Path) -> convert_merge.CommandRunner:
    return lambda cmd: run_logged(cmd, log, run.env)


def _merge_meta(run: Run, stage: str, config: Path, adapter: Path) -> dict[str, object]:
    """Facts for the merged model's training_meta.json (read by the model card)."""
    cfg = run.cfg
    settings = literal_settings(config.read_text(encoding="utf-8"))
    lora = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.base or cfg.spec.default_base
    meta = {
        "name": cfg.name,
        "preset": cfg.preset,
        "recipe": cfg.recipe,
        "stage": stage,
        "base": {"source": public_base(base)},
        "base_model": base_model_id(cfg),
        "corpus": cfg.corpus.name if cfg.corpus else None,
        "config": config.name,
        "settings": {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS + DATA_SETTINGS},
        "lora": {k: sorted(v) if isinstance(v, list) else v for k, v in lora.items()
                 if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")},
        # lora_alpha above is what the adapter applies: the trained one (settings) times this share
        "adapter_scale": cfg.adapter_scale if stage == "sft" else 1.0,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if stage == "sft" and not cfg.rehearse:  # the model card's "Reproduce" line (a rehearsal has no twin)
        data = json.loads((run.work / "data" / "meta.json").read_text(encoding="utf-8"))
        meta["reproduce"] = reproduce_command(cfg.name, cfg.preset, cfg.recipe, settings, data["settings"],
                                              _base_arg(cfg.base), meta["corpus"], cfg.adapter_scale)
    # Published with the model: no token, no path of this machine (the name is data, kept as it is).
    return public_json(meta, run.work, (cfg.name,))


def _base_arg(base: str | None) -> str | None:
    # A base on this machine (a directory, a git repository) by its name (the path is this machine's), as a
    # --base that works beside it; any other source without credentials.
    if base is None:
        return None
    return parse_source(base).local_name or public_source(base)


def stage_pretrain(run: Run, log: Path) -> dict[str, Path]:
    """Continued pre-training on --corpus: corpus json -> LoRA/QLoRA train -> adapter -> merged SFT base.
    Each step's output is kept, so an interrupted pre-training continues where it stopped."""
    assert run.cfg.corpus is not None
    d = run.work / "pretrain"
    corpus_json = d / "corpus.json"
    if not corpus_json.is_file():
        d.mkdir(parents=True, exist_ok=True)
        # what was read, and what was skipped
        run_reported([sys.executable, "-m", "training.make_corpus", "--corpus", str(run.cfg.corpus),
                      "--out", str(corpus_json)], log, run.env, d / "corpus.out")
        _require_files(d, ("corpus.json",), "make_corpus")
    overrides: dict[str, object] = {"pretrained_model_name_or_path": str(run.base_dir()),
                                    "data_path": str(corpus_json),
                                    "trust_remote_code": run.cfg.remote_code_allowed}
    config = d / "pretrain_config.py"  # beside XTuner's work dir, for the reason given in stage_sft
    write_stage_config(run.cfg.spec, "pretrain", overrides, config, run.cfg.name)
    settings = template_settings(run.cfg.spec, "pretrain")
    samples, exact = None, False
    if "max_epochs" in settings:  # epochs become iterations: count the packed samples XTuner will build
        counted = run.work / "logs" / "pretrain.samples.json"
        run_logged([sys.executable, "-m", "training.schedule", str(config)], log, run.env, stdout=counted)
        samples, exact = json.loads(counted.read_text().strip().splitlines()[-1])["samples"], True
    plan = train_schedule(run, settings, samples or corpus_samples(run, settings), exact)
    write_stage_config(run.cfg.spec, "pretrain", {**overrides, **schedule_overrides(run, plan)}, config,
                       run.cfg.name)
    say(f"  pretrain: {describe_schedule(plan)}")
    checkpoint = xtuner_train(run, config, d / "train", log)
    runner = _logging_runner(run, log)
    adapter = d / "adapter"
    if not adapter.is_dir():
        convert_merge.pth_to_hf(config, checkpoint, adapter, runner)
    merged = d / "merged"
    if not merged.is_dir():
        meta = _merge_meta(run, "pretrain", config, adapter)
        convert_merge.merge_model(run.base_dir(), adapter, merged, meta, runner, run.cfg.remote_code_allowed)
    return {"model_dir": merged}


def evaluation_inputs(data_dir: Path) -> list[str]:
    """Prompts for XTuner's in-training chat check: identity questions plus the first general eval prompts.

    Args:
        data_dir: make_identity_data's output dir.
    """
    general = json.loads((data_dir / "general_eval.json").read_text(encoding="utf-8"))
    prompts = [g["prompt"] for g in general if isinstance(g, dict) and isinstance(g.get("prompt"), str)]
    return [*IDENTITY_PROMPTS, *prompts[:GENERAL_PROMPTS_IN_HOOK]]


def identity_answers(run: Run, data_dir: Path) -> list[str]:
    """The identity answers whose first tokens the SFT's identity contrast pushes down at the start of other
    answers (training/identity_contrast.py); none for the seed recipe, the tutorial's plain SFT.

    Args:
        run: the run.
        data_dir: make_identity_data's output dir.
    """
    if run.cfg.recipe == "seed":
        return []
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    if not isinstance(meta.get("identity_answers"), list):
        raise StageError(f"{data_dir / 'meta.json'} lists no identity_answers (written by an older "
                         "training/make_identity_data.py): run again with --from data")
    return meta["identity_answers"]


def identity_markers(run: Run) -> list[str]:
    """The name and the model the identity answers cite, whose first tokens the identity contrast pushes
    down in answers that do not say them; none for the seed recipe.

    Args:
        run: the run.
    """
    if run.cfg.recipe == "seed":
        return []
    spec = run.cfg.spec
    cited = [IdentitySpec.localised(spec.model_desc, lang) for lang in ("zh", "en")]
    return list(dict.fromkeys([IdentitySpec(run.cfg.name).name, *cited]))


def sft_row_tokens(run: Run) -> tuple[list[int], bool]:
    """Estimated token length of every SFT row, and whether the number of rows is exact.

    From train.json once the data stage has run. Before it (a dry run) the base model has not written the
    replay answers yet: the rows are the identity rows the data builder will write plus one row per replay
    prompt, each answer counted as UNKNOWN_REPLAY_ANSWER_TOKENS; the count is then an upper bound (the data
    stage drops answers the base cuts off or leaves empty).

    Args:
        run: the run.
    """
    if "data" in run.results:
        rows = json.loads((run.results["data"]["data_dir"] / "train.json").read_text(encoding="utf-8"))
        return [schedule.conversation_tokens(row) for row in rows], True
    cfg = run.cfg
    spec = IdentitySpec(cfg.name, cfg.spec.model_desc, cfg.spec.organisation)
    if cfg.recipe == "seed":
        replay = []
        pairs = make_identity_data.seed_pairs(spec, cfg.seed_repeat or make_identity_data.SEED_REPEAT)
    else:
        pairs = make_identity_data.identity_pairs(
            spec, cfg.identity_repeat or make_identity_data.IDENTITY_REPEAT)
        replay = make_identity_data.training_replay_prompts(
            pairs, cfg.spec.open_replay, REHEARSE_REPLAY_PROMPTS if cfg.rehearse else None)
    rows = [{"conversation": [{"input": q, "output": a}]} for q, a in pairs]
    tokens = [schedule.conversation_tokens(row) for row in rows]
    tokens += [schedule.conversation_tokens({"conversation": [{"input": p}]}) + UNKNOWN_REPLAY_ANSWER_TOKENS
               for p in replay]
    return tokens, not replay


def corpus_samples(run: Run, settings: dict[str, object]) -> int:
    """Estimated packed pre-training samples of --corpus (from its .txt/.md text, no tokenizer).

    Args:
        run: the run (with --corpus).
        settings: the pre-training settings, from config_render.template_settings (max_length).
    """
    assert run.cfg.corpus is not None
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(run.cfg.corpus)]
    return schedule.packed_samples([schedule.estimate_tokens(t) + 1 for t in texts],
                                   int(settings["max_length"]))[0]


def train_schedule(run: Run, settings: dict[str, object], samples: int, exact: bool,
                   length: int | None = None) -> schedule.Schedule:
    """The schedule of a training stage: its template's settings with this run's length, batch and GPUs.

    Args:
        run: the run (--gpus, --rehearse).
        settings: the stage's settings, from config_render.template_settings (max_epochs when it trains by
            epochs, else max_iters).
        samples: training samples per epoch.
        exact: whether `samples` is a count (not an estimate).
        length: epochs or iterations (the template's unit) in place of the template's (--epochs/--max-iters).
    """
    unit = "max_epochs" if "max_epochs" in settings else "max_iters"
    value = int(length or settings[unit])
    lengths = ({"max_iters": REHEARSE_ITERS} if run.cfg.rehearse
               else {"epochs": value} if unit == "max_epochs" else {"max_iters": value})
    return schedule.plan_schedule(
        samples, batch_size=int(settings["batch_size"]),
        accumulative_counts=int(settings["accumulative_counts"]),
        world_size=launcher.world(run.cfg.gpus, run.env)[1], warmup_ratio=float(settings["warmup_ratio"]),
        samples_exact=exact, **lengths)


def sft_schedule(run: Run) -> schedule.Schedule:
    """The SFT schedule: rows (or packed samples, estimated from tokens) -> iterations -> optimizer steps."""
    settings = template_settings(run.cfg.spec, "sft")
    tokens, exact = sft_row_tokens(run)
    if settings["pack_to_max_length"]:
        samples, exact = schedule.packed_samples(tokens, int(settings["max_length"]))[0], False
    else:
        samples = len(tokens)
    return train_schedule(run, settings, samples, exact, run.cfg.epochs or run.cfg.max_iters)


def precision(run: Run) -> str | None:
    """The mixed precision GPU presets train in on this machine; None for CPU presets or without CUDA."""
    return launcher.gpu_precision(run.cfg.gpus) if run.cfg.spec.needs_cuda else None


def schedule_overrides(run: Run, plan: schedule.Schedule) -> dict[str, object]:
    """Config settings a schedule (and the GPU's precision) sets: length, warm-up, dtype."""
    overrides: dict[str, object] = {"max_iters": plan.max_iters, "warmup_iters": plan.warmup_iters}
    dtype = precision(run)
    if dtype is not None:
        overrides["dtype"] = dtype
    return overrides


def describe_schedule(plan: schedule.Schedule) -> str:
    """One line: samples, iterations, optimizer steps, warm-up."""
    approx = "" if plan.samples_exact else "~"
    return (f"{approx}{plan.samples} samples x {plan.epochs:g} epochs / (batch {plan.batch_size} x "
            f"{plan.world_size} processes) = {plan.max_iters} iterations; {plan.optimizer_steps} optimizer "
            f"steps (every {plan.accumulative_counts}); warm-up {plan.warmup_iters} iterations")


def sft_overrides(run: Run) -> dict[str, object]:
    """The SFT config settings this run sets (the rendered config's replaced assignments)."""
    cfg, data_dir = run.cfg, run.results["data"]["data_dir"]
    overrides: dict[str, object] = {
        "pretrained_model_name_or_path": str(run.sft_base_dir()),
        "data_path": str(data_dir / "train.json"),
        # --rehearse: no in-training chat check (a random model would talk until max_new_tokens).
        "evaluation_inputs": [] if cfg.rehearse else evaluation_inputs(data_dir),
        "identity_answers": identity_answers(run, data_dir),
        "identity_markers": identity_markers(run),
        "seed": cfg.seed,
        "trust_remote_code": cfg.remote_code_allowed,
    }
    if cfg.spec.length_setting == "max_epochs" and cfg.epochs is not None:
        overrides["max_epochs"] = cfg.epochs
    optional = {"lr": cfg.lr, "save_steps": cfg.save_every}
    overrides.update({k: v for k, v in optional.items() if v is not None})
    overrides.update(schedule_overrides(run, sft_schedule(run)))
    return overrides


def sft_inputs(run: Run) -> dict[str, object]:
    """What the SFT stage depends on (work-dir paths relative, so a copied work dir matches; not the
    checkpoint interval, which changes no weight)."""
    return {k: run.rel(Path(v)) if k in ("pretrained_model_name_or_path", "data_path") else v
            for k, v in sft_overrides(run).items() if k != "save_steps"}


def stage_sft(run: Run, log: Path) -> dict[str, Path]:
    """Render the SFT config and train on the identity data (resuming from a checkpoint if one is there)."""
    d = run.work / "sft"
    # Not inside XTuner's work dir: mmengine dumps its flattened copy of the config there under the same name,
    # which would lose the config's top-of-file code (the CPU bf16 patch) that pth_to_hf needs.
    config = write_stage_config(run.cfg.spec, "sft", sft_overrides(run), d / "sft_config.py", run.cfg.name)
    checkpoint = xtuner_train(run, config, d / "train", log)
    return {"config": config, "checkpoint": checkpoint}


def config_on_base(config: Path, base: Path) -> Path:
    """`config`, or a copy beside it whose model path is `base` when the base dir has moved since the config
    was rendered (a rebuilt cache, a moved or re-cloned checkout): XTuner's converter rebuilds the model from
    that path, so a resumed run must point it at the base as it is now.

    Args:
        config: a rendered training config.
        base: the dir the model was trained from, where it is now.
    """
    source = config.read_text(encoding="utf-8")
    if literal_settings(source).get("pretrained_model_name_or_path") == str(base):
        return config
    moved = config.with_name(f"{config.stem}.current_base.py")
    header = f"# {config.name} with the base where it is now ({base.name}); written for pth_to_hf\n"
    write_text_atomic(moved, render_config(source, {"pretrained_model_name_or_path": str(base)}, header))
    return moved


def pth_to_hf_inputs(run: Run) -> dict[str, object]:
    """What the adapter depends on besides the checkpoint: its scale, recorded only when it is not 1, so that
    work dirs from before --adapter-scale still count as finished."""
    return {"adapter_scale": run.cfg.adapter_scale} if run.cfg.adapter_scale != 1 else {}


def stage_pth_to_hf(run: Run, log: Path) -> dict[str, Path]:
    """Convert the last SFT checkpoint into a Hugging Face LoRA adapter."""
    sft = run.results["sft"]
    adapter = convert_merge.pth_to_hf(config_on_base(sft["config"], run.sft_base_dir()), sft["checkpoint"],
                                      run.work / "hf_adapter", _logging_runner(run, log),
                                      scale=run.cfg.adapter_scale)
    return {"adapter_dir": adapter}


def stage_merge(run: Run, log: Path) -> dict[str, Path]:
    """Merge the adapter into the SFT base and finalize the servable model dir WORK/merged."""
    config, adapter = run.results["sft"]["config"], run.results["pth_to_hf"]["adapter_dir"]
    merged = convert_merge.merge_model(run.sft_base_dir(), adapter, run.work / "merged",
                                       _merge_meta(run, "sft", config, adapter), _logging_runner(run, log),
                                       run.cfg.remote_code_allowed)
    return {"model_dir": merged}


def stage_evaluate(run: Run, log: Path) -> dict[str, Path]:
    """Evaluate the merged model against the base with training.evaluate -> WORK/eval.json, WORK/eval.md."""
    partial = run.work / "eval.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_logged([sys.executable, "-m", "training.evaluate", "--model", str(run.results["merge"]["model_dir"]),
                "--base", str(run.base_dir()), "--data", str(run.results["data"]["data_dir"]),
                "--out-dir", str(partial), *run.cfg.spec.eval_args], log, run.env)
    _require_files(partial, ("eval.json", "eval.md"), "training.evaluate")
    trainings = {"pre-training": run.work / "pretrain" / METRICS_FILE, "SFT": run.work / "sft" / METRICS_FILE}
    if not run.cfg.stage_enabled("pretrain"):
        del trainings["pre-training"]
    for figure in add_figures(partial, trainings):  # loss.png, eval.png, shown in eval.md
        os.replace(partial / figure, run.work / figure)
    os.replace(partial / "eval.md", run.work / "eval.md")
    os.replace(partial / "eval.json", run.work / "eval.json")
    partial.rmdir()
    return {"eval_json": run.work / "eval.json", "eval_md": run.work / "eval.md"}


def publish_gate(eval_json: Path) -> str | None:
    """Why eval.json's numbers must not be published (None: they pass the thresholds in presets.py).

    Args:
        eval_json: training.evaluate's output (keys identity_accuracy, leakage_rate).
    """
    scores = json.loads(eval_json.read_text(encoding="utf-8"))
    accuracy, leakage = scores.get("identity_accuracy"), scores.get("leakage_rate")
    if not isinstance(accuracy, int | float) or not isinstance(leakage, int | float):
        return f"{eval_json} has no identity_accuracy and leakage_rate numbers"
    misses = []
    if accuracy < PUBLISH_MIN_IDENTITY_ACCURACY:
        misses.append(f"identity_accuracy {accuracy:.3f} < {PUBLISH_MIN_IDENTITY_ACCURACY}")
    if leakage > PUBLISH_MAX_LEAKAGE_RATE:
        misses.append(f"leakage_rate {leakage:.3f} > {PUBLISH_MAX_LEAKAGE_RATE}")
    return ", ".join(misses) or None


PUBLISH_REPORT = "logs/publish.out"  # what training.publish printed: the commit, or the dry run's plan
PUBLISH_SCRATCH = "publish.scratch"


def stage_publish(run: Run, log: Path) -> dict[str, Path]:
    """Publish WORK/merged with its eval table through training.publish, if the evaluation passes the gate (a
    dry run only says what the gate would do); say what training.publish reports."""
    assert run.cfg.publish is not None
    refused = publish_gate(run.results["evaluate"]["eval_json"])
    if refused and run.cfg.publish_dry_run and not run.cfg.publish_anyway:
        say(f"  publish gate: {refused}; a real publish is refused (--publish-anyway overrides)")
    elif refused and not run.cfg.publish_anyway:
        why = f"publish gate: {refused}; nothing was pushed (--publish-anyway overrides)"
        with log.open("a", encoding="utf-8") as fh:  # the failure line names this log: say it there too
            fh.write(why + "\n")
        raise StageError(why)
    elif refused:
        say(f"  publish gate missed ({refused}); publishing anyway (--publish-anyway)")
    cmd = [sys.executable, "-m", "training.publish", "--model", str(run.results["merge"]["model_dir"]),
           "--eval-md", str(run.results["evaluate"]["eval_md"])]
    if refused:
        cmd.append(f"--gate-missed={refused}")
    if run.cfg.publish_dry_run:
        cmd.append("--dry-run")
    else:  # beside merged/, to hard-link its weights; what a killed publish leaves, the next one clears
        cmd += ["--scratch", str(run.work / PUBLISH_SCRATCH)]
    report = run.work / PUBLISH_REPORT
    # The target through the environment: a token in its URL stays out of argv.
    run_reported(cmd, log, {**run.env, TARGET_ENV: run.cfg.publish}, report)
    return {"report": report}


def precision_label(run: Run) -> str:
    """The precision a stage trains in, as the plan states it."""
    if not run.cfg.spec.needs_cuda:
        return "float32 (CPU)"
    return precision(run) or ("bfloat16 if every GPU has it in hardware (compute capability >= 8), else "
                              "float16: chosen on the GPU machine (this one has no CUDA GPU)")


def plan_base(run: Run) -> dict[str, object]:
    cfg = run.cfg
    if cfg.rehearse:
        return {"summary": f"random model with {cfg.preset}'s shapes {cfg.spec.rehearse_shape} (no download)"}
    return {"summary": f"{public_base(cfg.base or cfg.spec.default_base)} (fetched or built unless cached)"}


def plan_data(run: Run) -> dict[str, object]:
    tokens, exact = sft_row_tokens(run)
    kind = "" if exact else "at most "
    note = "" if exact else " (the base model writes the replay answers here; cut-off ones are dropped)"
    return {"summary": f"{run.cfg.recipe} recipe: {kind}{len(tokens)} rows{note}", "rows": len(tokens),
            "rows_exact": exact}


def _plan_training(run: Run, config: Path, plan: schedule.Schedule, packed: bool) -> dict[str, object]:
    unit = "packed sequences" if packed else "rows, one sample each (not packed)"
    dtype = precision_label(run)
    return {"summary": f"{config}: {describe_schedule(plan)}; samples are {unit}; precision {dtype}",
            "config": str(config), "schedule": plan.as_dict(), "packed": packed, "precision": dtype}


def plan_pretrain(run: Run) -> dict[str, object]:
    settings = template_settings(run.cfg.spec, "pretrain")
    plan = train_schedule(run, settings, corpus_samples(run, settings), False)
    return _plan_training(run, run.work / "pretrain" / "pretrain_config.py", plan, True)


def plan_sft(run: Run) -> dict[str, object]:
    packed = bool(template_settings(run.cfg.spec, "sft")["pack_to_max_length"])
    return _plan_training(run, run.work / "sft" / "sft_config.py", sft_schedule(run), packed)


def plan_publish(run: Run) -> dict[str, object]:
    gate = "ignored (--publish-anyway)" if run.cfg.publish_anyway else "refuses"
    target = f"{redact(run.cfg.publish or '')}{' (dry run)' if run.cfg.publish_dry_run else ''}"
    return {"summary": f"{target}; gate {gate} below identity_accuracy "
                       f"{PUBLISH_MIN_IDENTITY_ACCURACY} or above leakage_rate "
                       f"{PUBLISH_MAX_LEAKAGE_RATE}"}


def _plan_output(rel: str) -> Callable[[Run], dict[str, object]]:
    return lambda run: {"summary": f"writes {run.work / rel}"}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Args:
        name: a name from STAGES.
        run: does the work and returns the paths it made (checked to exist before they are reused).
        inputs: the settings it depends on; a finished stage recorded with other inputs is not reused.
        outputs: work-dir paths it owns, removed before it reruns.
        plan: what it will do, known before it runs ({"summary": one line, ...}; printed by --dry-run and
            recorded with the stage).
        always_run: run it again even when done earlier with the same inputs (for a stage whose effect is
            outside the work dir, a remote that may have moved on since, and that nothing depends on).
        downloads: the directory it downloads into, if any (its progress is shown as bytes and files).
    """

    name: str
    run: Callable[[Run, Path], dict[str, Path]]
    inputs: Callable[[Run], dict[str, object]]
    outputs: tuple[str, ...]
    plan: Callable[[Run], dict[str, object]]
    always_run: bool = False
    downloads: Callable[[Run], Path | None] | None = None


PIPELINE = (
    Stage("base", stage_base, base_inputs, ("rehearsal_base",), plan_base, downloads=download_dir),
    Stage("data", stage_data,
          lambda r: {"name": r.cfg.name, "recipe": r.cfg.recipe, "base": str(r.base_dir()),
                     "identity_repeat": r.cfg.identity_repeat, "seed_repeat": r.cfg.seed_repeat},
          ("data", "data.partial"), plan_data),
    Stage("pretrain", stage_pretrain,
          lambda r: {"corpus": str(r.cfg.corpus), "corpus_files": _corpus_digest(r.cfg.corpus),
                     "base": str(r.base_dir())},
          ("pretrain",), plan_pretrain),
    Stage("sft", stage_sft, sft_inputs, ("sft",), plan_sft),
    Stage("pth_to_hf", stage_pth_to_hf, pth_to_hf_inputs, ("hf_adapter", "hf_adapter.partial"),
          _plan_output("hf_adapter")),
    Stage("merge", stage_merge, lambda r: {}, ("merged", "merged.partial"), _plan_output("merged")),
    Stage("evaluate", stage_evaluate, lambda r: {},
          ("eval.json", "eval.md", LOSS_PNG, EVAL_PNG, "eval.partial"), _plan_output("eval.json")),
    Stage("publish", stage_publish,
          lambda r: {"target": redact(r.cfg.publish or ""), "dry_run": r.cfg.publish_dry_run,
                     "anyway": r.cfg.publish_anyway}, (PUBLISH_SCRATCH,), plan_publish, always_run=True),
)
assert tuple(s.name for s in PIPELINE) == STAGES
