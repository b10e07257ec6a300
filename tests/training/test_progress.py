# training/progress.py on a recorded XTuner run: the stage log and mmengine's scalars of a tiny SFT that was
# killed at iteration 70 and resumed from its iteration-50 checkpoint (tests/training/data/README.md), the
# plain (non-terminal) and tqdm displays, and the watcher following a log that grows. Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_progress.py -q
import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import pytest

from training.progress import (
    BarDisplay,
    Command,
    Count,
    PlainDisplay,
    Status,
    TrainStep,
    count_line,
    describe,
    download_status,
    log_counts,
    make_display,
    parse_line,
    training_records,
    watch_stage,
    write_metrics,
)

DATA = Path(__file__).parent / "data"
RESUMED_LOG = DATA / "sft_resumed.log"
RESUMED_TRAIN_DIR = DATA / "sft_resumed_train"
PLAIN_LINE = re.compile(r"\[pipeline\] sft: iter \d+/100  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  \d+ tok/s  "
                        r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d")


def recorded_steps() -> list[TrainStep]:
    records = [parse_line(line) for line in RESUMED_LOG.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if isinstance(r, TrainStep)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def terminal(columns: int) -> Iterator[tuple[TextIO, Callable[[], bytes]]]:
    """A real pseudo-terminal of `columns` columns (0: one without a size): its stream, and a reader of what
    was written to it."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(slave, "w", encoding="utf-8") as stream:

        def written() -> bytes:
            stream.flush()
            data = b""
            while select.select([master], [], [], 0)[0]:
                data += os.read(master, 65536)
            return data

        try:
            yield stream, written
        finally:
            os.close(master)


def test_parses_every_training_record_of_a_killed_and_resumed_run():
    steps = recorded_steps()
    # The killed start logged 10..70; the resumed one starts again after its iteration-50 checkpoint.
    assert [s.iteration for s in steps] == [10, 20, 30, 40, 50, 60, 70, 60, 70, 80, 90, 100]
    assert {s.max_iters for s in steps} == {100}
    first, last = steps[0], steps[-1]
    assert first.eta == "0:00:36" and last.eta == "0:00:00"
    assert first.scalars == {"lr": 2.0e-3, "time": 0.4098, "data_time": 0.0202, "grad_norm": 3.5162,
                             "loss": 7.8907, "tflops": 0.0030, "tokens_per_sec": 365.8844}
    assert last.scalars["loss"] == 2.0680 and last.scalars["tokens_per_sec"] == 1048.0049


def test_parses_long_etas_gpu_fields_counts_and_commands():
    line = ("01/02 03:04:05 - mmengine - INFO - Iter(train) [  120/90000]  lr: 1.9999e-04  "
            "eta: 2 days, 3:04:05  time: 2.0512  data_time: 0.0100  memory: 10543  grad_norm: 0.5321  "
            "loss: 1.2345")
    scalars = {"lr": 1.9999e-4, "time": 2.0512, "data_time": 0.01, "memory": 10543.0, "grad_norm": 0.5321,
               "loss": 1.2345}
    assert parse_line(line) == TrainStep(120, 90000, scalars, "2 days, 3:04:05")
    assert parse_line(count_line("answers from merged", 16, 96, "prompts")) == Count(
        "answers from merged", 16, 96, "prompts")
    assert parse_line("$ /x/.venv-train/bin/python -m xtuner.tools.train cfg.py --work-dir w") == Command(
        "xtuner.tools.train")
    for other in ("11/30 17:23:15 - mmengine - INFO - Checkpoints will be saved to /tmp/zedr/sft/train.",
                  "Iter(val) [ 10/100]  loss: 1.0", "[progress] broken 1/2", "$ ls -la", ""):
        assert parse_line(other) is None


def test_count_lines_reject_labels_that_would_not_parse_back():
    for what, unit in (("a: b", "prompts"), ("new\nline", "prompts"), ("ok", "two words")):
        with pytest.raises(ValueError, match="bad progress label"):
            count_line(what, 1, 2, unit)
    out = io.StringIO()
    report = log_counts("replay answers from the base", "prompts", out)
    report(16, 40)
    report(40, 40)
    assert out.getvalue() == ("[progress] replay answers from the base: 16/40 prompts\n"
                              "[progress] replay answers from the base: 40/40 prompts\n")


def test_a_resumed_attempt_replaces_the_iterations_it_redid(tmp_path):
    records = training_records(RESUMED_TRAIN_DIR)
    assert [(r["iter"], r["attempt"]) for r in records] == [
        (10, 1), (20, 1), (30, 1), (40, 1), (50, 1), (60, 2), (70, 2), (80, 2), (90, 2), (100, 2)]
    assert records[5]["loss"] == pytest.approx(2.494353246688843)  # iteration 60 as the resumed start had it
    assert set(records[0]) == {"iter", "loss", "lr", "grad_norm", "time", "data_time", "tflops",
                               "tokens_per_sec", "attempt"}
    out = tmp_path / "metrics.jsonl"
    assert write_metrics(RESUMED_TRAIN_DIR, out) == 10
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    vis = tmp_path / "20261130_120000" / "vis_data"
    vis.mkdir(parents=True)
    source = (RESUMED_TRAIN_DIR / "20261130_172303" / "vis_data" / "scalars.json").read_text()
    (vis / "scalars.json").write_text(source[: source.rindex('"iter"')])  # killed while writing a record
    assert [r["iter"] for r in training_records(tmp_path)] == [10, 20, 30, 40, 50, 60]
    assert training_records(tmp_path / "missing") == []


def test_plain_output_has_no_control_characters_and_one_line_per_interval():
    clock, out = FakeClock(), io.StringIO()
    display = PlainDisplay(out, "[pipeline] sft", interval_s=30, clock=clock)
    display.show(Status("idle", "running  elapsed 0:00:01", heartbeat=True))  # the stage just said "running"
    clock.now += 31
    display.show(Status("idle", "running  elapsed 0:00:32", heartbeat=True))  # still alive, after an interval
    for step in recorded_steps():
        clock.now += 7  # mmengine logs every 10 iterations; here 7 s apart
        display.show(describe(step, clock.now - 1000))
    display.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[pipeline] sft: running  elapsed 0:00:32"
    # The first record at once, then one every 30 s at most, and the last state at the end.
    assert lines[1].startswith("[pipeline] sft: iter 10/100  loss 7.8907  lr 2.00e-03  366 tok/s  "
                               "elapsed 0:00:38")
    assert [line.split()[3] for line in lines[1:]] == ["10/100", "60/100", "90/100", "100/100"]
    assert lines[-1].endswith("eta 0:00:00")
    assert all(PLAIN_LINE.fullmatch(line) for line in lines[1:]), lines
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out.getvalue())


def test_each_kind_of_progress_leaves_its_last_state():
    clock, out = FakeClock(), io.StringIO()
    display = PlainDisplay(out, "[pipeline] evaluate", interval_s=30, clock=clock)
    for what in ("answers from merged", "answers from base"):
        for done in (16, 32, 48):
            clock.now += 1
            display.show(describe(Count(what, done, 48, "prompts"), 5))
    display.show(describe(Command("training.evaluate"), 7))  # a heartbeat never ends as a last line
    display.finish()
    assert out.getvalue().splitlines() == [
        "[pipeline] evaluate: answers from merged 16/48 prompts  elapsed 0:00:05",
        "[pipeline] evaluate: answers from merged 48/48 prompts  elapsed 0:00:05",
        "[pipeline] evaluate: answers from base 16/48 prompts  elapsed 0:00:05",
        "[pipeline] evaluate: answers from base 48/48 prompts  elapsed 0:00:05",
    ]


def test_a_record_already_shown_is_not_repeated_as_a_last_line():
    clock, out = FakeClock(), io.StringIO()
    display = PlainDisplay(out, "[pipeline] pretrain", interval_s=30, clock=clock)
    last = recorded_steps()[-1]
    display.show(describe(last, 1))  # shown at once
    clock.now += 5
    display.show(describe(last, 6))  # the same record, only later: nothing new to tell
    display.show(describe(Command("xtuner.tools.model_converters.pth_to_hf"), 7))
    display.finish()
    assert out.getvalue() == ("[pipeline] pretrain: iter 100/100  loss 2.0680  lr 6.09e-07  1048 tok/s  "
                              "elapsed 0:00:01  eta 0:00:00\n")


def test_a_terminal_gets_a_tqdm_line_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    steps = recorded_steps()
    with terminal(120) as (term, written):
        display = make_display(term, "[pipeline] sft")
        assert isinstance(display, BarDisplay)
        drawn = b""
        for step in steps:
            display.show(describe(step, 12))
            drawn += written()  # read as we go: a full pty buffer would block the writer
        display.finish()
        drawn += written()
    text = drawn.decode()
    assert text.count("\r[pipeline] sft: ") >= len(steps)  # redrawn in place, not one line per record
    assert re.search(r"\r\[pipeline\] sft: █{14} {7}iter 70/100  loss 2\.2519", text)  # 70 % of 20 blocks
    assert all(len(line) <= 120 for line in re.split(r"[\r\n]", text))  # fitted to the terminal
    last = text.rstrip("\r\n").rsplit("\r", 1)[-1]  # the bar is cleared; the last state stays as a plain line
    assert last == ("[pipeline] sft: iter 100/100  loss 2.0680  lr 6.09e-07  1048 tok/s  elapsed 0:00:12  "
                    "eta 0:00:00")
    with terminal(0) as (term, _):  # a pseudo-terminal without a size (script(1) without a terminal, some CI)
        assert isinstance(make_display(term, "x"), PlainDisplay)
    monkeypatch.setenv("TERM", "dumb")
    with terminal(120) as (term, _):
        assert isinstance(make_display(term, "x"), PlainDisplay)
    assert isinstance(make_display(io.StringIO(), "x"), PlainDisplay)


def test_download_progress_counts_bytes_and_files(tmp_path):
    assert download_status(tmp_path / "not-yet", 3) is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1500)
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 500)
    assert download_status(tmp_path, 2).text == "downloaded 2.00kB in 2 files  1.00kB/s  elapsed 0:00:02"


def test_the_watcher_follows_what_the_stage_appends_to_its_log(tmp_path):
    log = tmp_path / "sft.log"
    log.write_text(f"=== an earlier attempt is not this stage's ===\n{count_line('old', 1, 1, 'x')}\n")
    lines = RESUMED_LOG.read_text(encoding="utf-8").splitlines(keepends=True)
    upto = [next(i for i, ln in enumerate(lines) if f"[ {n}/100]" in ln) + 1 for n in (10, 30)]
    out = io.StringIO()
    with (watch_stage("sft", log, out=out, interval_s=3600, poll_s=0.01),
          log.open("a", encoding="utf-8") as fh):  # closed (flushed) before the watcher's last look
        fh.writelines(lines[: upto[0]])
        fh.flush()
        deadline = time.monotonic() + 60
        while "iter 10/100" not in out.getvalue():  # the first record shows at once ...
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.01)
        fh.writelines(lines[upto[0] : upto[1]])
        last = next(ln for ln in lines if "[100/100]" in ln)
        fh.write(last[: last.index("time:")])  # ... a half-written record waits for its end
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("[pipeline] sft: iter 10/100  loss 7.8907")
    assert printed[-1].startswith("[pipeline] sft: iter 30/100  loss 3.8441")  # the last state at the end
    assert "old" not in out.getvalue()


def test_a_kind_that_ends_between_two_looks_still_shows_its_end(tmp_path):
    log = tmp_path / "evaluate.log"
    out = io.StringIO()
    with watch_stage("evaluate", log, out=out, interval_s=3600, poll_s=3600):  # one look, at the end
        log.write_text("".join(count_line(what, done, 96, "prompts") + "\n" for what, done in (
            ("answers from merged", 16), ("answers from merged", 96), ("answers from base", 16))))
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == [
        "[pipeline] evaluate: answers from merged 16/96 prompts",
        "[pipeline] evaluate: answers from merged 96/96 prompts",
        "[pipeline] evaluate: answers from base 16/96 prompts",
    ]
