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

from training import convert_merge
from training.config_render import literal_settings, write_rendered_config
from training.presets import (
    BASE_CACHE,
    BUILD_PREFIX,
    CONFIG_DIR,
    DATA_FILES,
    GENERAL_PROMPTS_IN_HOOK,
    IDENTITY_PROMPTS,
    RUNTIME_SETTINGS,
    STAGES,
    RunConfig,
)
from training.runner import StageError, run_logged, say


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


def _require_files(directory: Path, names: tuple[str, ...], tool: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise StageError(f"{tool} exited 0 but wrote no {', '.join(missing)} in {directory}")


def _corpus_digest(corpus: Path) -> str:
    # Changed corpus files must not silently reuse a finished pre-training.
    digest = hashlib.sha1()
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
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
    # The marker holds an absolute path; look it up by name so a moved work dir still resumes.
    checkpoint = train_dir / Path(marker.read_text().strip()).name
    return checkpoint if checkpoint.is_file() else None


def xtuner_train(run: Run, config: Path, train_dir: Path, log: Path) -> Path:
    """Train with `python -m xtuner.tools.train`, resuming from the last checkpoint in `train_dir` if any.

    Args:
        run: the run (for the child environment).
        config: the rendered config.
        train_dir: XTuner's --work-dir (checkpoints, logs).
        log: the stage log.
    """
    cmd = [sys.executable, "-m", "xtuner.tools.train", str(config), "--work-dir", str(train_dir)]
    env = run.env
    resume_from = latest_checkpoint(train_dir)
    if resume_from is not None:
        say(f"  resuming training from {resume_from.name}")
        cmd += ["--resume", str(resume_from)]
        # XTuner and mmengine torch.load() the checkpoint without weights_only=False, which torch >= 2.6
        # then refuses (it holds optimizer and message-hub state); it is this run's own checkpoint.
        env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    run_logged(cmd, log, env)
    checkpoint = latest_checkpoint(train_dir)
    if checkpoint is None:
        raise StageError(f"xtuner.tools.train exited 0 but left no checkpoint in {train_dir}")
    return checkpoint


def stage_base(run: Run, log: Path) -> dict[str, Path]:
    """Resolve --base to a local model dir, or build (once, cached) the preset's own base."""
    result = run.work / "logs" / "base.path"
    source = run.cfg.base or run.cfg.spec.default_base
    if source.startswith(BUILD_PREFIX):
        module, function = source.removeprefix(BUILD_PREFIX).rsplit(".", 1)
        code = (f"import sys; from pathlib import Path; from {module} import {function}; "
                f"print({function}(Path(sys.argv[1])))")
        run_logged([sys.executable, "-c", code, str(BASE_CACHE)], log, run.env, stdout=result,
                   label=module)
    else:
        run_logged([sys.executable, "-m", "infer_engine.model_source", source], log, run.env, stdout=result)
    lines = result.read_text().split("\n")
    model_dir = Path(next((line for line in reversed(lines) if line.strip()), "").strip())
    if not (model_dir / "config.json").is_file():
        raise StageError(f"base model dir {model_dir} has no config.json")
    return {"model_dir": model_dir}


def stage_data(run: Run, log: Path) -> dict[str, Path]:
    """Build the identity data (and the held-out sets) with training.make_identity_data."""
    partial, final = run.work / "data.partial", run.work / "data"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.make_identity_data", "--name", run.cfg.name,
           "--recipe", run.cfg.recipe, "--out", str(partial), "--base", str(run.base_dir()),
           "--model-desc", run.cfg.spec.model_desc, "--organisation", run.cfg.spec.organisation,
           *run.cfg.spec.data_args]
    if run.cfg.identity_repeat is not None:
        cmd += ["--identity-repeat", str(run.cfg.identity_repeat)]
    if run.cfg.seed_repeat is not None:
        cmd += ["--seed-repeat", str(run.cfg.seed_repeat)]
    run_logged(cmd, log, run.env)
    _require_files(partial, DATA_FILES, "make_identity_data")
    os.replace(partial, final)
    return {"data_dir": final}


def _logging_runner(run: Run, log: Path) -> convert_merge.CommandRunner:
    return lambda cmd: run_logged(cmd, log, run.env)


def _merge_meta(run: Run, stage: str, config: Path, adapter: Path) -> dict[str, object]:
    """Facts for the merged model's training_meta.json (read by the model card)."""
    cfg = run.cfg
    settings = literal_settings(config.read_text(encoding="utf-8"))
    lora = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return {
        "name": cfg.name,
        "preset": cfg.preset,
        "recipe": cfg.recipe,
        "stage": stage,
        "base": {"source": cfg.base or cfg.spec.default_base,
                 "path": str(run.base_dir())},
        "corpus": str(cfg.corpus) if cfg.corpus else None,
        "config": config.name,
        "settings": {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS},
        "lora": {k: sorted(v) if isinstance(v, list) else v for k, v in lora.items()
                 if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def stage_pretrain(run: Run, log: Path) -> dict[str, Path]:
    """Continued pre-training on --corpus: corpus json -> LoRA/QLoRA train -> adapter -> merged SFT base.
    Each step's output is kept, so an interrupted pre-training continues where it stopped."""
    assert run.cfg.corpus is not None
    d = run.work / "pretrain"
    corpus_json = d / "corpus.json"
    if not corpus_json.is_file():
        d.mkdir(parents=True, exist_ok=True)
        run_logged([sys.executable, "-m", "training.make_corpus", "--corpus", str(run.cfg.corpus),
                    "--out", str(corpus_json)], log, run.env)
        _require_files(d, ("corpus.json",), "make_corpus")
    config = write_rendered_config(  # beside XTuner's work dir, for the reason given in stage_sft
        CONFIG_DIR / run.cfg.spec.pretrain_config,
        {"pretrained_model_name_or_path": str(run.base_dir()), "data_path": str(corpus_json)},
        d / "pretrain_config.py", run.cfg.name)
    checkpoint = xtuner_train(run, config, d / "train", log)
    runner = _logging_runner(run, log)
    adapter = d / "adapter"
    if not adapter.is_dir():
        convert_merge.pth_to_hf(config, checkpoint, adapter, runner)
    merged = d / "merged"
    if not merged.is_dir():
        meta = _merge_meta(run, "pretrain", config, adapter)
        convert_merge.merge_model(run.base_dir(), adapter, merged, meta, runner)
    return {"model_dir": merged}


def evaluation_inputs(data_dir: Path) -> list[str]:
    """Prompts for XTuner's in-training chat check: identity questions plus the first general eval prompts.

    Args:
        data_dir: make_identity_data's output dir.
    """
    general = json.loads((data_dir / "general_eval.json").read_text(encoding="utf-8"))
    prompts = [g["prompt"] for g in general if isinstance(g, dict) and isinstance(g.get("prompt"), str)]
    return [*IDENTITY_PROMPTS, *prompts[:GENERAL_PROMPTS_IN_HOOK]]


def sft_overrides(run: Run) -> dict[str, object]:
    """The SFT config settings this run sets (the rendered config's replaced assignments)."""
    cfg, data_dir = run.cfg, run.results["data"]["data_dir"]
    overrides: dict[str, object] = {
        "pretrained_model_name_or_path": str(run.sft_base_dir()),
        "data_path": str(data_dir / "train.json"),
        "evaluation_inputs": evaluation_inputs(data_dir),
        "seed": cfg.seed,
    }
    length = cfg.max_iters if cfg.spec.length_setting == "max_iters" else cfg.epochs
    optional = {cfg.spec.length_setting: length, "lr": cfg.lr, "save_steps": cfg.save_every}
    overrides.update({k: v for k, v in optional.items() if v is not None})
    return overrides


def sft_inputs(run: Run) -> dict[str, object]:
    """What the SFT stage depends on (work-dir paths relative, so a copied work dir matches)."""
    return {k: run.rel(Path(v)) if k in ("pretrained_model_name_or_path", "data_path") else v
            for k, v in sft_overrides(run).items()}


def stage_sft(run: Run, log: Path) -> dict[str, Path]:
    """Render the SFT config and train on the identity data (resuming from a checkpoint if one is there)."""
    d = run.work / "sft"
    # Not inside XTuner's work dir: mmengine dumps its flattened copy of the config there under the same name,
    # which would lose the config's top-of-file code (the CPU bf16 patch) that pth_to_hf needs.
    config = write_rendered_config(CONFIG_DIR / run.cfg.spec.sft_config, sft_overrides(run),
                                   d / "sft_config.py", run.cfg.name)
    checkpoint = xtuner_train(run, config, d / "train", log)
    return {"config": config, "checkpoint": checkpoint}


def stage_pth_to_hf(run: Run, log: Path) -> dict[str, Path]:
    """Convert the last SFT checkpoint into a Hugging Face LoRA adapter."""
    sft = run.results["sft"]
    adapter = convert_merge.pth_to_hf(sft["config"], sft["checkpoint"], run.work / "hf_adapter",
                                      _logging_runner(run, log))
    return {"adapter_dir": adapter}


def stage_merge(run: Run, log: Path) -> dict[str, Path]:
    """Merge the adapter into the SFT base and finalize the servable model dir WORK/merged."""
    config, adapter = run.results["sft"]["config"], run.results["pth_to_hf"]["adapter_dir"]
    merged = convert_merge.merge_model(run.sft_base_dir(), adapter, run.work / "merged",
                                       _merge_meta(run, "sft", config, adapter), _logging_runner(run, log))
    return {"model_dir": merged}


def stage_evaluate(run: Run, log: Path) -> dict[str, Path]:
    """Evaluate the merged model against the base with training.evaluate -> WORK/eval.json, WORK/eval.md."""
    partial = run.work / "eval.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_logged([sys.executable, "-m", "training.evaluate", "--model", str(run.results["merge"]["model_dir"]),
                "--base", str(run.base_dir()), "--data", str(run.results["data"]["data_dir"]),
                "--out-dir", str(partial), *run.cfg.spec.eval_args], log, run.env)
    _require_files(partial, ("eval.json", "eval.md"), "training.evaluate")
    os.replace(partial / "eval.md", run.work / "eval.md")
    os.replace(partial / "eval.json", run.work / "eval.json")
    partial.rmdir()
    return {"eval_json": run.work / "eval.json", "eval_md": run.work / "eval.md"}


def stage_publish(run: Run, log: Path) -> dict[str, Path]:
    """Publish WORK/merged with its eval table through training.publish."""
    assert run.cfg.publish is not None
    cmd = [sys.executable, "-m", "training.publish", "--model", str(run.results["merge"]["model_dir"]),
           "--target", run.cfg.publish, "--eval-md", str(run.results["evaluate"]["eval_md"])]
    if run.cfg.publish_dry_run:
        cmd.append("--dry-run")
    run_logged(cmd, log, run.env)
    return {}  # the target is in the stage's recorded inputs


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Args:
        name: a name from STAGES.
        run: does the work and returns the paths it made (checked to exist before they are reused).
        inputs: the settings it depends on; a finished stage recorded with other inputs is not reused.
        outputs: work-dir paths it owns, removed before it reruns.
        rerun_on_change: rerun on changed inputs instead of refusing (for stages nothing depends on).
    """

    name: str
    run: Callable[[Run, Path], dict[str, Path]]
    inputs: Callable[[Run], dict[str, object]]
    outputs: tuple[str, ...]
    rerun_on_change: bool = False


PIPELINE = (
    Stage("base", stage_base, lambda r: {"preset": r.cfg.preset, "base": r.cfg.base}, ()),
    Stage("data", stage_data,
          lambda r: {"name": r.cfg.name, "recipe": r.cfg.recipe, "base": str(r.base_dir()),
                     "identity_repeat": r.cfg.identity_repeat, "seed_repeat": r.cfg.seed_repeat},
          ("data", "data.partial")),
    Stage("pretrain", stage_pretrain,
          lambda r: {"corpus": str(r.cfg.corpus), "corpus_files": _corpus_digest(r.cfg.corpus),
                     "base": str(r.base_dir())},
          ("pretrain",)),
    Stage("sft", stage_sft, sft_inputs, ("sft",)),
    Stage("pth_to_hf", stage_pth_to_hf, lambda r: {}, ("hf_adapter", "hf_adapter.partial")),
    Stage("merge", stage_merge, lambda r: {}, ("merged", "merged.partial")),
    Stage("evaluate", stage_evaluate, lambda r: {}, ("eval.json", "eval.md", "eval.partial")),
    Stage("publish", stage_publish, lambda r: {"target": r.cfg.publish, "dry_run": r.cfg.publish_dry_run}, (),
          rerun_on_change=True),
)
assert tuple(s.name for s in PIPELINE) == STAGES
