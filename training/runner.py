# Running the pipeline's child processes with logs. Imported by training/stages.py and training/pipeline.py;
# not run on its own.
"""Child processes of the pipeline: their environment, their logs, and a one-line reason when they fail."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from infer_engine.model_source import on_parent_death, redact
from training.presets import REPO_ROOT, RunConfig


class StageError(RuntimeError):
    """A stage failed; the message is the one-line reason."""


def say(message: str) -> None:
    print(message, flush=True)


def child_env(cfg: RunConfig) -> dict[str, str]:
    """Environment for stage processes: unbuffered logs, quiet tokenizers, the preset's thread count, and
    TRUST_REMOTE_CODE set to this run's choice (training.generate reads it).

    Args:
        cfg: the run config.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TRUST_REMOTE_CODE="1" if cfg.remote_code_allowed else "0")
    if cfg.spec.cpu_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(cfg.spec.cpu_threads))
    return env


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
    errors = [line for line in lines
              if re.match(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Exit|Interrupt)\b.*", line)]
    # Under torchrun the launcher's own ChildFailedError comes last; a rank's exception says why.
    ranked = [line for line in errors if line.startswith("[rank")]
    reason = (ranked or errors or lines or ["(empty log)"])[-1]
    # Cut in the middle: the start says what failed, the end (git's last lines, an exception's detail) why.
    return reason if len(reason) <= 400 else f"{reason[:150]} … {reason[-247:]}"


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
        fh.write(f"$ {redact(shlex.join(cmd))}\n")
        fh.flush()
        start = fh.tell()
        out = stdout.open("w") if stdout else fh
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=fh, env=dict(env), cwd=REPO_ROOT,
                                    # a SIGKILLed pipeline leaves no trainer writing into the work dir
                                    preexec_fn=on_parent_death(signal.SIGKILL))
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
