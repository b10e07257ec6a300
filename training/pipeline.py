# The training pipeline: one command from a name to a merged, evaluated (and optionally published) assistant.
#   bash training/run.sh --name NAME [--preset internlm2_5-1_8b|tiny] [--base SOURCE] [--work-dir DIR]
#       [--corpus DIR] [--recipe identity|seed] [--publish TARGET] [--from STAGE] [--max-iters N | --epochs N]
# run.sh makes sure .venv-train exists, sets PYTHONPATH and runs `python -m training.pipeline "$@"`;
# `--help` lists every option.
"""Stage runner for XTuner fine-tuning: base -> data -> [pretrain] -> sft -> pth_to_hf -> merge -> evaluate
-> [publish].

Every stage records its inputs and result in WORK/stages/<stage>.json, written atomically when the stage
finishes; that record is the stage's commit point, and its outputs are written beside their final names and
renamed into place. A rerun skips finished stages, continues an interrupted training from its last checkpoint,
and refuses to reuse a finished stage whose settings changed (`--from STAGE` reruns it and everything after).
Child processes log to WORK/logs/<stage>.log; a failure ends the run with one line:
`stage <x> failed: <reason> (log: <path>)`.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from training import convert_merge
from training.identity import IdentityError, IdentitySpec

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "training" / "configs"
TINY_BASE_CACHE = REPO_ROOT / ".cache"  # shared with tests/training/conftest.py (tiny_base_dir)
STAGES = ("base", "data", "pretrain", "sft", "pth_to_hf", "merge", "evaluate", "publish")
CUDA_STAGES = ("pretrain", "sft", "pth_to_hf")  # the ones that build the (4-bit) training model
RECIPES = ("identity", "seed")
DATA_FILES = ("train.json", "heldout_identity.json", "general_eval.json", "meta.json")
# Asked by XTuner's EvaluateChatHook during SFT (logged), with a couple of general prompts from the data.
IDENTITY_PROMPTS = ("请介绍一下你自己", "Who are you?")
GENERAL_PROMPTS_IN_HOOK = 2
# Literal config settings about the runner rather than the training, left out of training_meta.json.
RUNTIME_SETTINGS = ("visualizer", "log_level", "load_from", "resume")


class RunConfigError(ValueError):
    """Bad command-line input or a work dir that does not match the requested run."""


class StageError(RuntimeError):
    """A stage failed; the message is the one-line reason."""


@dataclass(frozen=True)
class Preset:
    """How one model family is trained.

    Args:
        name: the --preset value.
        sft_config: SFT config template in training/configs/.
        pretrain_config: continued-pre-training config template in training/configs/.
        default_base: model source used without --base; None builds the project's tiny base.
        needs_cuda: the configs use 4-bit bitsandbytes, which cannot run on CPU.
        length_setting: the config setting that sets training length: "max_iters" or "max_epochs".
        cpu_threads: OMP threads for stage processes unless OMP_NUM_THREADS is set (None: library default).
    """

    name: str
    sft_config: str
    pretrain_config: str
    default_base: str | None
    needs_cuda: bool
    length_setting: str
    cpu_threads: int | None


PRESETS = {
    "internlm2_5-1_8b": Preset("internlm2_5-1_8b", "internlm2_5_1_8b_qlora_sft.py",
                               "internlm2_5_1_8b_qlora_pretrain.py", "hf:internlm/internlm2_5-1_8b-chat",
                               needs_cuda=True, length_setting="max_epochs", cpu_threads=None),
    # One thread: as fast as two for the tiny model, and kind to a shared 2-core CI machine.
    "tiny": Preset("tiny", "tiny_lora_sft_cpu.py", "tiny_lora_pretrain_cpu.py", None,
                   needs_cuda=False, length_setting="max_iters", cpu_threads=1),
}


def slug(text: str) -> str:
    """File-name-safe form of a name for the default work dir; names with non-ASCII letters get a short hash
    so that they stay apart (names that still collide are told apart by the recorded settings).

    Args:
        text: any name.
    """
    readable = re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")
    if readable and text.isascii():
        return readable
    return f"{readable or 'name'}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated in __post_init__ (raises RunConfigError).

    Args:
        name: the assistant's new name (rules of training.identity.IdentitySpec: 1-40 visible characters).
        preset: key of PRESETS.
        recipe: identity data recipe: "identity" (templated + replay) or "seed" (the tutorial's two pairs).
        base: base model source (local dir, git URL, openxlab:o/r, hf:o/r); None: the preset's default.
        work_dir: where every output goes; None: .work/<name-slug>-<preset>-<recipe> in the repo.
        corpus: directory of .txt/.md files for continued pre-training before SFT; None: no pre-training.
        publish: publish target for training.publish (git URL or hf:owner/repo); None: no publishing.
        publish_dry_run: list what would be published without pushing.
        from_stage: rerun this stage and every later one even if finished.
        max_iters: SFT iterations (presets trained by iterations); None: the config's value.
        epochs: SFT epochs (presets trained by epochs); None: the config's value.
        lr: SFT learning rate; None: the config's value.
        seed: random seed of the SFT run.
        save_every: SFT checkpoint interval in iterations (resume points); None: the config's value.
        identity_repeat: rows per identity question (identity recipe); None: the data builder's default.
        seed_repeat: the tutorial's n (seed recipe); None: the data builder's default.
    """

    name: str
    preset: str = "internlm2_5-1_8b"
    recipe: str = "identity"
    base: str | None = None
    work_dir: Path | None = None
    corpus: Path | None = None
    publish: str | None = None
    publish_dry_run: bool = False
    from_stage: str | None = None
    max_iters: int | None = None
    epochs: int | None = None
    lr: float | None = None
    seed: int = 42
    save_every: int | None = None
    identity_repeat: int | None = None
    seed_repeat: int | None = None

    def __post_init__(self) -> None:
        try:  # the data builder's own rules, checked before any work is done
            name = IdentitySpec(self.name).name
        except IdentityError as err:
            raise RunConfigError(f"--name: {err}") from None
        object.__setattr__(self, "name", name)
        if self.preset not in PRESETS:
            raise RunConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.recipe not in RECIPES:
            raise RunConfigError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.from_stage is not None and self.from_stage not in STAGES:
            raise RunConfigError(f"unknown stage {self.from_stage!r}; stages: {', '.join(STAGES)}")
        if self.base is not None:
            if not self.base.strip():
                raise RunConfigError("--base must not be empty")
            local = Path(self.base).expanduser()
            if local.exists():  # stages run from the repo root: a relative dir must mean the caller's
                object.__setattr__(self, "base", str(local.resolve()))
        if self.corpus is not None:
            corpus = self.corpus.expanduser().resolve()
            if not corpus.is_dir():
                raise RunConfigError(f"--corpus {self.corpus}: no such directory")
            object.__setattr__(self, "corpus", corpus)
        if self.publish is not None and not self.publish.strip():
            raise RunConfigError("--publish must not be empty")
        if self.publish_dry_run and self.publish is None:
            raise RunConfigError("--publish-dry-run needs --publish TARGET")
        for option, value in (("--max-iters", self.max_iters), ("--epochs", self.epochs),
                              ("--save-every", self.save_every), ("--identity-repeat", self.identity_repeat),
                              ("--seed-repeat", self.seed_repeat)):
            if value is not None and value < 1:
                raise RunConfigError(f"{option} must be at least 1, got {value}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise RunConfigError(f"--lr must be between 0 and 1, got {self.lr}")
        length = PRESETS[self.preset].length_setting
        if self.max_iters is not None and length != "max_iters":
            raise RunConfigError(f"preset {self.preset} trains by epochs: use --epochs, not --max-iters")
        if self.epochs is not None and length != "max_epochs":
            raise RunConfigError(f"preset {self.preset} trains by iterations: use --max-iters, not --epochs")
        work = self.work_dir or REPO_ROOT / ".work" / f"{slug(name)}-{self.preset}-{self.recipe}"
        object.__setattr__(self, "work_dir", Path(work).expanduser().resolve())

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    def stage_enabled(self, stage: str) -> bool:
        """Whether `stage` is part of this run (pretrain needs --corpus, publish needs --publish).

        Args:
            stage: a name from STAGES.
        """
        return {"pretrain": self.corpus is not None, "publish": self.publish is not None}.get(stage, True)


# ---------------------------------------------------------------------------------------------------------
# Config rendering: a per-run copy of a shipped config with its top-level settings replaced.


class ConfigRenderError(ValueError):
    """An override names no top-level setting of the config, or one assigned more than once."""


def top_level_assignments(source: str) -> dict[str, list[ast.stmt]]:
    """Top-level statements that bind each simple name (`x = ...`, `x += ...`, `x: T = ...`).

    Args:
        source: the config's Python source.
    """
    found: dict[str, list[ast.stmt]] = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name):
                found.setdefault(target.id, []).append(node)
    return found


def literal_settings(source: str) -> dict[str, object]:
    """The top-level settings of a config whose values are plain literals (for training_meta.json).

    Args:
        source: the config's Python source.
    """
    settings = {}
    for name, nodes in top_level_assignments(source).items():
        if len(nodes) == 1 and isinstance(nodes[0], ast.Assign):
            try:
                settings[name] = ast.literal_eval(nodes[0].value)
            except (ValueError, TypeError, SyntaxError):  # not a literal: an expression or object
                continue
    return settings


def render_config(source: str, overrides: Mapping[str, object], header: str = "") -> str:
    """Return `source` with the value of each overridden top-level setting replaced by the override's literal.

    Every override must match exactly one top-level assignment; values must be Python literals.

    Args:
        source: the config template's Python source.
        overrides: setting name -> new value (str, int, float, bool, None, or lists/tuples/dicts of them).
        header: comment lines put at the top of the rendered file (each starting with '#').
    """
    assignments = top_level_assignments(source)
    edits = []
    for name, value in overrides.items():
        nodes = assignments.get(name, [])
        if not nodes:
            known = ", ".join(sorted(n for n, v in assignments.items() if len(v) == 1))
            raise ConfigRenderError(f"override {name!r} matches no top-level setting; settings: {known}")
        if len(nodes) > 1 or not isinstance(nodes[0], ast.Assign):
            lines = ", ".join(str(n.lineno) for n in nodes)
            raise ConfigRenderError(f"override {name!r} is ambiguous: the config binds it on lines {lines}")
        text = repr(value)
        try:
            if ast.literal_eval(text) != value:
                raise ValueError
        except (ValueError, SyntaxError):
            raise ConfigRenderError(f"override {name!r}: {value!r} is not a plain literal") from None
        edits.append((nodes[0].value, text))
    data = source.encode()
    offsets = [0]  # byte offset of each line start (ast counts lines by "\n")
    for line in data.split(b"\n"):
        offsets.append(offsets[-1] + len(line) + 1)
    # Replace from the end so earlier byte offsets stay valid (ast columns are UTF-8 byte offsets).
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        data = data[:start] + text.encode() + data[end:]
    rendered = header + data.decode()
    ast.parse(rendered)
    return rendered


def write_rendered_config(template: Path, overrides: Mapping[str, object], out: Path, run_name: str) -> Path:
    """Render a config template into `out` (atomically), with a header saying what it is.

    Args:
        template: the shipped config.
        overrides: top-level settings to replace.
        out: the rendered file to write.
        run_name: the run, named in the header.
    """
    header = (f"# Rendered by training/pipeline.py for run {run_name!r} from "
              f"{template.relative_to(REPO_ROOT)}\n"
              f"# with these settings replaced: {', '.join(overrides)}. This file is what ran.\n")
    text = render_config(template.read_text(encoding="utf-8"), overrides, header)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Running child processes with logs.


def _die_with_parent() -> None:
    # Runs in the child before exec: a SIGKILLed pipeline must not leave a trainer writing into the work dir.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def failure_reason(log: Path, start: int = 0) -> str:
    """The most telling line of a failed child's log: the last exception line, else the last line.

    Args:
        log: the stage log.
        start: byte offset where the failed command's output begins (earlier attempts are ignored).
    """
    with log.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*", line)]
    reason = (errors or lines or ["(empty log)"])[-1]
    return reason if len(reason) <= 300 else reason[:297] + "..."


def run_logged(cmd: list[str], log: Path, env: Mapping[str, str], stdout: Path | None = None,
               label: str | None = None) -> None:
    """Run `cmd`, appending its output to `log`; raise StageError with the reason if it exits non-zero.

    Args:
        cmd: the argv.
        log: the stage log (stderr, and stdout unless `stdout` is given).
        env: the child's environment.
        stdout: file for the child's stdout when the caller needs it (e.g. a printed path).
        label: what to call the command in the failure reason (default: the `-m` module or the program).
    """
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        start = fh.tell()
        out = stdout.open("w") if stdout else fh
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=fh, env=dict(env), cwd=REPO_ROOT,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            try:
                rc = proc.wait()
            finally:  # interrupted (SIGTERM/SIGINT): stop the child before leaving
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            if stdout:
                out.close()
    if stdout:
        with log.open("a", encoding="utf-8") as fh:
            fh.write(stdout.read_text(errors="replace"))
    if rc != 0:
        label = label or (cmd[2] if cmd[1:2] == ["-m"] else Path(cmd[0]).name)
        raise StageError(f"{label} exited with status {rc}: {failure_reason(log, start)}")


# ---------------------------------------------------------------------------------------------------------
# The run: work-dir state and the stages.


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


def child_env(cfg: RunConfig) -> dict[str, str]:
    """Environment for stage processes: unbuffered logs, quiet tokenizers, the preset's thread count.

    Args:
        cfg: the run config.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if cfg.spec.cpu_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(cfg.spec.cpu_threads))
    return env


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
    """Resolve --base to a local model dir, or build (once, cached) the tiny base."""
    result = run.work / "logs" / "base.path"
    source = run.cfg.base or run.cfg.spec.default_base
    if source is None:
        code = ("import sys; from pathlib import Path; from training.make_tiny_base import cached_tiny_base; "
                "print(cached_tiny_base(Path(sys.argv[1])))")
        run_logged([sys.executable, "-c", code, str(TINY_BASE_CACHE)], log, run.env, stdout=result,
                   label="training.make_tiny_base")
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
           "--recipe", run.cfg.recipe, "--out", str(partial), "--base", str(run.base_dir())]
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
        "base": {"source": cfg.base or cfg.spec.default_base or "tiny base (training/make_tiny_base.py)",
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
                "--out-dir", str(partial)], log, run.env)
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


# ---------------------------------------------------------------------------------------------------------
# The runner.


def say(message: str) -> None:
    print(message, flush=True)


def _load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    os.replace(tmp, path)


def _normalised(value: object) -> object:
    return json.loads(json.dumps(value, ensure_ascii=False))


def _clear(run: Run, stage: Stage) -> None:
    run.record_path(stage.name).unlink(missing_ok=True)  # the record goes first: it is the commit point
    for rel in stage.outputs:
        path = run.work / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass
class Plan:
    """What a run will do: the stages reused as finished, then the stages to run.

    Args:
        reuse: finished stages whose results are reused.
        todo: stages to run, in order.
        resume: the first stage to run may continue from its own partial outputs (same inputs, no --from).
    """

    reuse: list[Stage]
    todo: list[Stage]
    resume: bool


def plan_run(run: Run) -> Plan:
    """Decide which stages are reused and which run; loads the reused stages' results into `run`.

    Args:
        run: the run (its results are filled for the reused stages).
    """
    stages = [s for s in PIPELINE if run.cfg.stage_enabled(s.name)]
    from_stage = run.cfg.from_stage
    if from_stage is not None and from_stage not in [s.name for s in stages]:
        needs = {"pretrain": "--corpus DIR", "publish": "--publish TARGET"}[from_stage]
        raise RunConfigError(f"--from {from_stage}: that stage is not part of this run (it needs {needs})")
    reuse: list[Stage] = []
    for i, stage in enumerate(stages):
        record = _load_record(run.record_path(stage.name)) or {}
        inputs = _normalised(stage.inputs(run))
        same_inputs = record.get("inputs") == inputs
        if stage.name == from_stage or record.get("status") != "done":
            # An interrupted stage continues from its partial outputs if nothing it depends on changed.
            resume = stage.name != from_stage and record.get("status") == "running" and same_inputs
            return Plan(reuse, stages[i:], resume)
        if not same_inputs:
            if stage.rerun_on_change:
                return Plan(reuse, stages[i:], False)
            old = record.get("inputs", {})
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in inputs.items() if old.get(k) != v)
            raise RunConfigError(
                f"stage {stage.name} in {run.work} was run with other settings ({changes}); rerun it with "
                f"--from {stage.name}, or use another --work-dir")
        result = {k: run.work / v for k, v in record["result"].items()}  # absolute paths stay absolute
        if not all(p.exists() for p in result.values()):
            return Plan(reuse, stages[i:], False)
        run.results[stage.name] = result
        reuse.append(stage)
    return Plan(reuse, [], False)


def check_device(cfg: RunConfig, todo: list[Stage]) -> None:
    """Fail before any work when a GPU-only preset would train or convert on a machine without CUDA.

    Args:
        cfg: the run config.
        todo: the stages about to run.
    """
    if not cfg.spec.needs_cuda or not any(s.name in CUDA_STAGES for s in todo):
        return
    import torch

    if not torch.cuda.is_available():
        raise RunConfigError(
            f"preset {cfg.preset} trains 4-bit QLoRA through bitsandbytes, which needs a CUDA GPU, and this "
            "machine has none; use --preset tiny on CPU")


def _update_merged_meta(run: Run, seconds: dict[str, float]) -> None:
    # The model card reads per-stage wall times from training_meta.json; keep them current after merging.
    meta_path = run.work / "merged" / convert_merge.META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["stage_seconds"] = seconds
        convert_merge.write_meta(meta_path.parent, meta)


def execute(run: Run, plan: Plan) -> None:
    """Run the planned stages in order, recording each; raise StageError on the first failure.

    Args:
        run: the run.
        plan: from plan_run.
    """
    for stage in plan.reuse:
        say(f"[pipeline] {stage.name}: done earlier, skipped")
    # Everything from the first stage to run onwards is stale: drop it now so no old output is mistaken for
    # this run's (the first stage keeps its partial outputs when it can resume from them).
    for i, stage in enumerate(plan.todo):
        if not (i == 0 and plan.resume):
            _clear(run, stage)
    times_path = run.work / "stages" / "seconds.json"
    seconds = _load_record(times_path) or {}
    for stage in plan.todo:
        log = run.log_path(stage.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        inputs = _normalised(stage.inputs(run))
        _write_record(run.record_path(stage.name), {"status": "running", "inputs": inputs})
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"=== {stage.name} started {datetime.now(UTC).isoformat(timespec='seconds')} ===\n")
        say(f"[pipeline] {stage.name}: running (log: {log})")
        start = time.monotonic()
        try:
            result = stage.run(run, log)
        except (StageError, convert_merge.ConvertError, ConfigRenderError) as err:
            raise StageError(f"stage {stage.name} failed: {err} (log: {log})") from None
        except Exception as err:  # unexpected: keep the traceback in the log, one line on the console
            with log.open("a", encoding="utf-8") as fh:
                traceback.print_exc(file=fh)
            raise StageError(f"stage {stage.name} failed: {type(err).__name__}: {err} (log: {log})") from None
        except (KeyboardInterrupt, SystemExit):
            say(f"[pipeline] {stage.name}: interrupted; rerun the same command to resume (log: {log})")
            raise
        wall = round(time.monotonic() - start, 1)
        run.results[stage.name] = result
        _write_record(run.record_path(stage.name), {
            "status": "done", "inputs": inputs, "result": {k: run.rel(p) for k, p in result.items()},
            "wall_s": wall,
            "finished": datetime.now(UTC).isoformat(timespec="seconds")})
        seconds[stage.name] = wall
        _write_record(times_path, seconds)
        _update_merged_meta(run, seconds)
        say(f"[pipeline] {stage.name}: done in {wall:.1f} s")


def summary(run: Run) -> str:
    """A short report of the outputs and the evaluation numbers."""
    lines = [f"[pipeline] model: {run.work / 'merged'}"]
    eval_json = run.work / "eval.json"
    if eval_json.is_file():
        scores = json.loads(eval_json.read_text(encoding="utf-8"))
        keys = ("identity_accuracy", "base_identity_accuracy", "leakage_rate", "general_agreement")
        lines.append("[pipeline] eval: " + ", ".join(f"{k} {scores[k]}" for k in keys if k in scores)
                     + f" (table: {run.work / 'eval.md'})")
    if run.cfg.publish:
        lines.append(f"[pipeline] published to {run.cfg.publish}" + (" (dry run)" if run.cfg.publish_dry_run
                                                                      else ""))
    return "\n".join(lines)


def run_pipeline(cfg: RunConfig) -> Run:
    """Run (or resume) the pipeline for `cfg`; raise RunConfigError or StageError on failure.

    Args:
        cfg: the validated run config.
    """
    run = Run(cfg, child_env(cfg))
    run.work.mkdir(parents=True, exist_ok=True)
    with (run.work / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunConfigError(f"another run is using {run.work}") from None
        plan = plan_run(run)
        check_device(cfg, plan.todo)
        say(f"[pipeline] {cfg.name} / {cfg.preset} / {cfg.recipe} in {run.work}")
        execute(run, plan)
    return run


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse the command line into a validated RunConfig (raises RunConfigError).

    Args:
        argv: arguments (default: sys.argv[1:]).
    """
    p = argparse.ArgumentParser(
        prog="training/run.sh", description="Fine-tune a chat model into your own assistant with XTuner.",
        epilog=f"Stages: {' -> '.join(STAGES)} (pretrain only with --corpus, publish only with --publish).")
    p.add_argument("--name", required=True, help="the assistant's new name")
    p.add_argument("--preset", default="internlm2_5-1_8b", choices=PRESETS,
                   help="internlm2_5-1_8b: QLoRA on a CUDA GPU (default); tiny: the CPU demo model")
    p.add_argument("--base", help="base model: local dir, git URL, openxlab:OWNER/REPO or hf:OWNER/REPO "
                   "(default: hf:internlm/internlm2_5-1_8b-chat; tiny: the project's tiny base)")
    p.add_argument("--work-dir", type=Path, help="output dir (default .work/<name>-<preset>-<recipe>)")
    p.add_argument("--corpus", type=Path, help="dir of .txt/.md files for continued pre-training before SFT")
    p.add_argument("--recipe", default="identity", choices=RECIPES,
                   help="identity: varied questions + replay (default); seed: the tutorial's data")
    p.add_argument("--publish", metavar="TARGET", help="publish merged/ to a git URL or hf:OWNER/REPO")
    p.add_argument("--publish-dry-run", action="store_true", help="only list what --publish would push")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and all later ones")
    p.add_argument("--max-iters", type=int, help="SFT iterations (tiny preset)")
    p.add_argument("--epochs", type=int, help="SFT epochs (internlm2_5-1_8b preset)")
    p.add_argument("--lr", type=float, help="SFT learning rate (default: the config's)")
    p.add_argument("--seed", type=int, default=42, help="SFT random seed (default 42)")
    p.add_argument("--save-every", type=int, help="SFT checkpoint interval in iterations (resume points)")
    p.add_argument("--identity-repeat", type=int, help="identity recipe: rows per identity question")
    p.add_argument("--seed-repeat", type=int, help="seed recipe: the tutorial's n")
    args = vars(p.parse_args(argv))
    return RunConfig(**args)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the running child is stopped and the stage stays resumable.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = parse_args(argv)
        run = run_pipeline(cfg)
    except RunConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(err, file=sys.stderr)
        return 1
    say(summary(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
