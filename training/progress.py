# Live progress of a pipeline stage, and the training record it leaves. Not a command: the stage runner
# (training/pipeline.py) uses it, and so do the generation loops of training/evaluate.py and
# training/make_identity_data.py (log_counts).
"""What a running stage is doing, shown from records its own processes write (never guessed):

- XTuner/mmengine training: LoggerHook's line every logger interval, ``Iter(train) [ 10/300]  lr: 2.0000e-03
  eta: 0:00:28  time: 0.0988  data_time: 0.0029  grad_norm: 3.5162  loss: 7.8907  tokens_per_sec: 4751.4064``
  (``tokens_per_sec``/``tflops`` come from XTuner's ThroughputHook, which the configs add);
- the pipeline's own generation loops (replay answers, evaluation): ``[progress] WHAT: DONE/TOTAL UNIT``
  lines (count_line), written to the stage log by the child;
- a model download: the bytes and files in the directory being fetched into;
- otherwise the command the stage is running (the ``$ cmd`` lines run_logged writes).

On a terminal the status is one tqdm line, updated in place. Without one (CI, a redirected log, a Space build)
it is a plain line: the first record of each kind at once, then at most one every ``interval_s`` seconds, and
the last state when the kind changes or the stage ends; no control characters.

After training, metrics.jsonl holds mmengine's logged scalars, one JSON object per logged iteration:
``iter``, ``loss``, ``lr``, ``grad_norm``, ``time`` (seconds per iteration, mean over the log interval),
``data_time``, ``tokens_per_sec`` and ``tflops`` (when ThroughputHook is on), and ``attempt`` (1 for the first
start, higher after a resume; a resumed attempt's records replace the iterations it redid).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # a status line every half minute keeps a CI or Space log readable
POLL_S = 0.5
METRICS_FILE = "metrics.jsonl"

_ITER = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\]\s+(.*)$")
_FIELD = re.compile(r"(\w+): (\d+ days?, \d+:\d\d:\d\d|[^\s]+)")
_ETA = re.compile(r"(\d+ days?, )?\d+:\d\d:\d\d")
_COUNT = re.compile(r"^\[progress\] ([^\x00-\x1f]+?): (\d+)/(\d+) (\w+)$")
# run_logged's "$ cmd" line; its commands start with an absolute interpreter path (so "$ ls" in a sample
# answer the trainer logs is no command).
_COMMAND = re.compile(r"^\$ (/[^\s\x00-\x1f\x7f]+)(?: -m ([\w.]+))?")


@dataclass(frozen=True)
class TrainStep:
    """One training record of mmengine's LoggerHook.

    Args:
        iteration: iterations done.
        max_iters: iterations of the whole training.
        scalars: the numbers logged with it (lr, loss, grad_norm, time, data_time, tokens_per_sec, ...).
        eta: mmengine's estimate of the time left, as it prints it ("0:00:28"); None if missing.
    """

    iteration: int
    max_iters: int
    scalars: dict[str, float]
    eta: str | None


@dataclass(frozen=True)
class Count:
    """Items done of a known total, reported by a child with count_line.

    Args:
        what: what is being done ("answers from merged").
        done: items done.
        total: items in all.
        unit: what an item is ("prompts").
    """

    what: str
    done: int
    total: int
    unit: str


@dataclass(frozen=True)
class Command:
    """A command the stage started (run_logged's ``$ cmd`` line): the `-m` module or the program."""

    name: str


@dataclass(frozen=True)
class Status:
    """What a display shows.

    Args:
        key: the kind of progress; a new key ends the previous one's line.
        text: the status after the stage name.
        done: units done: the bar's position, and what tells new progress from the same with a later time.
        total: units in all (None: no bar).
        heartbeat: only says the stage is alive: plain output shows it at the interval, never as a last line.
    """

    key: str
    text: str
    done: int | None = None
    total: int | None = None
    heartbeat: bool = False


def parse_line(line: str) -> TrainStep | Count | Command | None:
    """The progress record in one log line, if it holds one.

    Args:
        line: a line of a stage log (without its newline).
    """
    if match := _ITER.search(line):
        fields = dict(_FIELD.findall(match.group(3)))
        eta = fields.pop("eta", None)
        scalars = {}
        for key, value in fields.items():
            with contextlib.suppress(ValueError):
                scalars[key] = float(value)
        return TrainStep(int(match.group(1)), int(match.group(2)), scalars,
                         eta if eta and _ETA.fullmatch(eta) else None)
    if match := _COUNT.match(line):
        return Count(match.group(1), int(match.group(2)), int(match.group(3)), match.group(4))
    if match := _COMMAND.match(line):
        return Command(match.group(2) or Path(match.group(1)).name)
    return None


def count_line(what: str, done: int, total: int, unit: str) -> str:
    """The line a child writes to report items done (parsed back by parse_line).

    Args:
        what: what is being done, without ':' or control characters.
        done: items done.
        total: items in all.
        unit: one word naming an item.
    """
    if ":" in what or not what.isprintable() or not unit.isidentifier():
        raise ValueError(f"bad progress label {what!r} / unit {unit!r}")
    return f"[progress] {what}: {done}/{total} {unit}"


def log_counts(what: str, unit: str, stream: TextIO | None = None) -> Callable[[int, int], None]:
    """A (done, total) callback that writes count_line records to `stream` (default: stderr, the stage log).

    Args:
        what: what is being done.
        unit: what an item is.
        stream: where the lines go.
    """
    count_line(what, 0, 0, unit)  # reject a bad label now, not in the middle of the work

    def report(done: int, total: int) -> None:
        print(count_line(what, done, total, unit), file=stream or sys.stderr, flush=True)

    return report


def clock_text(seconds: float) -> str:
    """`seconds` as h:mm:ss, the way mmengine prints its eta.

    Args:
        seconds: a duration.
    """
    return str(timedelta(seconds=int(seconds)))


def describe(record: TrainStep | Count | Command, elapsed_s: float) -> Status:
    """The status line for the latest record of a stage.

    Args:
        record: from parse_line.
        elapsed_s: seconds since the stage started.
    """
    elapsed = f"elapsed {clock_text(elapsed_s)}"
    if isinstance(record, TrainStep):
        s = record.scalars
        parts = [f"iter {record.iteration}/{record.max_iters}"]
        if "loss" in s:
            parts.append(f"loss {s['loss']:.4f}")
        if "lr" in s:
            parts.append(f"lr {s['lr']:.2e}")
        if "tokens_per_sec" in s:
            parts.append(f"{s['tokens_per_sec']:.0f} tok/s")
        parts += [elapsed, f"eta {record.eta or '?'}"]
        return Status("train", "  ".join(parts), record.iteration, record.max_iters)
    if isinstance(record, Count):
        text = f"{record.what} {record.done}/{record.total} {record.unit}  {elapsed}"
        return Status(f"count {record.what}", text, record.done, record.total)
    return Status(f"command {record.name}", f"running {record.name}  {elapsed}", heartbeat=True)


def download_status(directory: Path, elapsed_s: float) -> Status | None:
    """Bytes and files fetched so far into `directory` (None while it does not exist).

    Args:
        directory: where a download is being written.
        elapsed_s: seconds since the stage started (for the mean rate).
    """
    total, files = 0, 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):  # a file renamed or removed while we look
                total += os.stat(os.path.join(root, name)).st_size
                files += 1
    if files == 0 and not directory.is_dir():
        return None
    size = tqdm.format_sizeof  # 1.50GB
    rate = f"{size(total / elapsed_s, 'B')}/s  " if elapsed_s >= 1 else ""
    text = f"downloaded {size(total, 'B')} in {files} files  {rate}elapsed {clock_text(elapsed_s)}"
    return Status("download", text, done=total)


class PlainDisplay:
    """Status lines for a log or a pipe: no control characters, at most one line per interval."""

    def __init__(self, out: TextIO, prefix: str, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """
        Args:
            out: where the lines go.
            prefix: put before every line ("[pipeline] sft").
            interval_s: least seconds between two lines of the same kind.
            clock: monotonic seconds (tests pass a fake one).
        """
        self.out, self.prefix, self.interval_s, self.clock = out, prefix, interval_s, clock
        self._last_print = clock()  # the stage's "running" line was just printed
        self._current: Status | None = None
        self._pending = False

    def show(self, status: Status) -> None:
        now = self.clock()
        new_kind = self._current is None or status.key != self._current.key
        if new_kind:
            self._flush()
        # Only new progress is owed a last line; the same record with a later elapsed time is not.
        self._pending = self._pending or new_kind or status.done != self._current.done
        self._current = status
        # A new kind of record shows at once (a heartbeat waits), then one line per interval.
        if (new_kind and not status.heartbeat) or now - self._last_print >= self.interval_s:
            self._print(now)

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._current is not None and self._pending and not self._current.heartbeat:
            self._print(self.clock())

    def _print(self, now: float) -> None:
        assert self._current is not None
        print(f"{self.prefix}: {self._current.text}", file=self.out, flush=True)
        self._last_print, self._pending = now, False


class _StatusBar(tqdm):
    """A tqdm bar whose line ends with our status text (`{status}` in bar_format)."""

    status = ""

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "status": self.status}


class BarDisplay:
    """One tqdm line on a terminal, redrawn in place; each kind's last state stays as a plain line."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        """
        Args:
            out: the terminal.
            prefix: put before the bar ("[pipeline] sft").
        """
        self.out, self.prefix = out, prefix
        self._bar: _StatusBar | None = None
        self._current: Status | None = None

    def show(self, status: Status) -> None:
        if self._bar is None or self._current is None or status.key != self._current.key:
            self._close()
            fmt = "{desc}: {bar:20} {status}" if status.total else "{desc}: {status}"
            self._bar = _StatusBar(total=status.total, desc=self.prefix, file=self.out, leave=False,
                                   bar_format=fmt, dynamic_ncols=True, mininterval=0)
        self._current = status
        self._bar.status = status.text
        self._bar.n = status.done or 0
        self._bar.refresh()

    def finish(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if self._current is not None and not self._current.heartbeat:
                print(f"{self.prefix}: {self._current.text}", file=self.out, flush=True)


def terminal_columns(out: TextIO) -> int:
    """The width of the terminal `out` writes to; 0 when it is no terminal or one without a size.

    Args:
        out: a stream.
    """
    try:
        return os.get_terminal_size(out.fileno()).columns if out.isatty() else 0
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation: an OSError)
        return 0


def make_display(out: TextIO, prefix: str, interval_s: float = PLAIN_INTERVAL_S) -> PlainDisplay | BarDisplay:
    """A bar on a terminal, plain lines anywhere else (also with TERM=dumb, or on a pseudo-terminal without a
    size, where tqdm would trim the bar to nothing).

    Args:
        out: the stream the pipeline prints to.
        prefix: put before every status ("[pipeline] sft").
        interval_s: plain output: least seconds between two lines.
    """
    tty = terminal_columns(out) > 0 and os.environ.get("TERM") != "dumb"
    return BarDisplay(out, prefix) if tty else PlainDisplay(out, prefix, interval_s)


class LogFollower:
    """Reads the complete lines appended to a file since the follower was made."""

    def __init__(self, path: Path) -> None:
        """
        Args:
            path: the log (it may not exist yet).
        """
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        # tqdm bars of a child (a hub download) redraw with \r: each redraw is a line of its own.
        return [part for line in lines for part in line.decode(errors="replace").split("\r")]


@contextlib.contextmanager
def watch_stage(stage: str, log: Path, out: TextIO | None = None, download_dir: Path | None = None,
                interval_s: float = PLAIN_INTERVAL_S, poll_s: float = POLL_S) -> Iterator[None]:
    """Show the progress of the stage running inside the `with` block, from what is appended to its log.

    Args:
        stage: the stage's name.
        log: the stage log its processes write.
        out: where the status goes (default: stdout, like the pipeline's other lines).
        download_dir: a directory being downloaded into, shown as bytes and files while it exists.
        interval_s: plain output: least seconds between two lines.
        poll_s: seconds between two looks at the log.
    """
    out = out or sys.stdout
    display = make_display(out, f"[pipeline] {stage}", interval_s)
    follower, start = LogFollower(log), time.monotonic()
    latest: list[TrainStep | Count | Command] = []
    stop = threading.Event()

    def tick() -> None:
        records = [r for r in map(parse_line, follower.new_lines()) if r is not None]
        latest[:] = records[-1:] or latest
        elapsed = time.monotonic() - start
        download = download_status(download_dir, elapsed) if download_dir else None
        if download is not None:
            display.show(download)
            return
        for record in records[:-1]:  # each one, so that a kind ending within this look still shows its end
            display.show(describe(record, elapsed))
        display.show(describe(latest[0], elapsed) if latest else Status(
            "idle", f"running  elapsed {clock_text(elapsed)}", heartbeat=True))

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                tick()
            except Exception as err:  # the display is a courtesy: it must never stop the stage
                print(f"[pipeline] {stage}: progress display stopped ({type(err).__name__}: {err})",
                      file=out, flush=True)
                return

    thread = threading.Thread(target=loop, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            tick()  # what the stage wrote last
        display.finish()


def training_records(train_dir: Path) -> list[dict[str, float | int]]:
    """mmengine's logged training scalars from every start of a training in `train_dir`, in iteration order.

    Each start (the first and each resume) writes WORK/<timestamp>/vis_data/scalars.json; a resumed start
    redoes the iterations after its checkpoint, so its records replace the earlier ones from there on.

    Args:
        train_dir: an xtuner.tools.train --work-dir.
    """
    records: list[dict[str, float | int]] = []
    for attempt, path in enumerate(sorted(train_dir.glob("*/vis_data/scalars.json")), start=1):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut
                continue
            if isinstance(row, dict) and isinstance(row.get("iter"), int) and "loss" in row:
                rows.append({k: v for k, v in row.items() if k != "step"} | {"attempt": attempt})
        if rows:
            records = [r for r in records if r["iter"] < rows[0]["iter"]] + rows
    return records


def write_metrics(train_dir: Path, out: Path) -> int:
    """Write training_records(train_dir) to `out` as JSON lines (atomically); return how many.

    Args:
        train_dir: an xtuner.tools.train --work-dir.
        out: the metrics.jsonl to write.
    """
    records = training_records(train_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out)
    return len(records)

