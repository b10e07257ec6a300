# The training schedule, known before training: samples -> iterations -> optimizer steps -> warm-up.
# Imported by training/stages.py; `python -m training.schedule CONFIG` prints the exact number of training
# samples XTuner builds from a rendered config (it loads the config's tokenizer and data, no model):
#   .venv-train/bin/python -m training.schedule .work/alice/pretrain/pretrain_config.py
"""Schedules computed from data size and settings, so that iterations, optimizer steps and warm-up are stated
(and recorded) before a GPU is touched, and never depend on how many processes packed the data."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

# datasets.map(batched=True)'s default batch: XTuner's Packer sees the rows in batches of this many.
PACKER_BATCH_ROWS = 1000
# Tokenizer-free estimate: a CJK character is about one InternLM2 token, other text about four characters a
# token, plus the chat template's special tokens and role names around each turn.
CHARS_PER_TOKEN_LATIN = 4
TEMPLATE_TOKENS_PER_TURN = 10
MIN_WARMUP_ITERS = 10  # shorter warm-ups peak below 90 % of lr in mmengine (see warmup_iters)
CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


class ScheduleError(ValueError):
    """Settings that give no training, or a config without the settings a schedule needs."""


@dataclass(frozen=True)
class Schedule:
    """One training run's length, as XTuner/mmengine will run it.

    Args:
        samples: training samples per epoch (rows, or packed sequences when the config packs).
        samples_exact: False when `samples` comes from a token estimate instead of the real tokenizer.
        world_size: training processes (GPUs over all nodes).
        batch_size: samples per process per iteration.
        accumulative_counts: iterations per optimizer step.
        iters_per_epoch: iterations that see every sample once.
        max_iters: iterations in all.
        epochs: passes over the data (max_iters / iters_per_epoch).
        optimizer_steps: optimizer updates in all.
        warmup_iters: iterations of linear warm-up before the cosine decay.
    """

    samples: int
    samples_exact: bool
    world_size: int
    batch_size: int
    accumulative_counts: int
    iters_per_epoch: int
    max_iters: int
    epochs: float
    optimizer_steps: int
    warmup_iters: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def warmup_iters(max_iters: int, ratio: float) -> int:
    """Warm-up length in iterations: `ratio` of training when that is at least MIN_WARMUP_ITERS, else 1 (none:
    the configs start a 1-iteration warm-up at the full lr); never 0, which mmengine refuses ("end should be
    larger than begin"), and short of the end.

    mmengine's LinearLR stops one step short of the full lr and its cosine continues from there, so a warm-up
    of w iterations peaks at (w - 1) / w of lr: 90 % at the least.

    Args:
        max_iters: iterations in all.
        ratio: share of training spent warming up.
    """
    warmup = round(ratio * max_iters)
    return min(warmup, max_iters - 1) if warmup >= MIN_WARMUP_ITERS else 1


def plan_schedule(samples: int, *, batch_size: int, accumulative_counts: int, world_size: int,
                  warmup_ratio: float, epochs: int | None = None, max_iters: int | None = None,
                  samples_exact: bool = True) -> Schedule:
    """The schedule mmengine runs for these settings: exactly one of `epochs` and `max_iters` sets the length.

    Args:
        samples: training samples per epoch.
        batch_size: samples per process per iteration.
        accumulative_counts: iterations per optimizer step (mmengine also steps at the last iteration).
        world_size: training processes; DefaultSampler gives each ceil(samples / world_size) samples.
        warmup_ratio: share of iterations spent warming up.
        epochs: passes over the data (length by epochs).
        max_iters: iterations (length by iterations).
        samples_exact: whether `samples` was counted with the real tokenizer (recorded).
    """
    if (epochs is None) == (max_iters is None):
        raise ScheduleError("give exactly one of epochs and max_iters")
    if samples < 1:
        raise ScheduleError("the training data holds no samples")
    per_epoch = math.ceil(math.ceil(samples / world_size) / batch_size)
    total = per_epoch * epochs if epochs is not None else max_iters
    assert total is not None
    if total < 1:
        raise ScheduleError(f"training length must be at least 1 iteration, got {total}")
    return Schedule(samples=samples, samples_exact=samples_exact, world_size=world_size,
                    batch_size=batch_size, accumulative_counts=accumulative_counts, iters_per_epoch=per_epoch,
                    max_iters=total, epochs=round(total / per_epoch, 2),
                    optimizer_steps=math.ceil(total / accumulative_counts),
                    warmup_iters=warmup_iters(total, warmup_ratio))


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without a tokenizer (see CHARS_PER_TOKEN_LATIN): an estimate, not a count.

    Args:
        text: any text.
    """
    cjk = len(CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / CHARS_PER_TOKEN_LATIN)


def conversation_tokens(row: Mapping) -> int:
    """Estimated tokens of one XTuner conversation row as the chat template lays it out.

    Args:
        row: {"conversation": [{"input", "output"}, ...]}.
    """
    turns = row.get("conversation") or []
    return sum(estimate_tokens(t.get("input", "")) + estimate_tokens(t.get("output", ""))
               + TEMPLATE_TOKENS_PER_TURN for t in turns)


def packed_samples(lengths: Iterable[int], max_length: int) -> tuple[int, int]:
    """How XTuner's Packer (one map process) cuts rows of these token lengths into `max_length` sequences.

    Rows are concatenated and cut into full sequences batch by batch; a batch shorter than one sequence is
    emitted short, and the tokens left over after the last batch are dropped.

    Args:
        lengths: token length of each row, in order.
        max_length: the packed sequence length.
    Returns:
        (packed samples, tokens dropped at the end).
    """
    lengths = list(lengths)
    samples = residual = 0
    for start in range(0, len(lengths), PACKER_BATCH_ROWS):
        total = residual + sum(lengths[start:start + PACKER_BATCH_ROWS])
        if total >= max_length:
            samples, residual = samples + total // max_length, total % max_length
        else:
            samples, residual = samples + 1, 0
    return samples, residual


def count_built_samples(config: Path) -> int:
    """Samples in the training dataset XTuner builds from `config` (tokenizer and data, no model).

    Args:
        config: a rendered XTuner config.
    """
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    cfg = Config.fromfile(str(config))
    return len(BUILDER.build(cfg.train_dataloader.dataset))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.schedule CONFIG", file=sys.stderr)
        return 2
    print(json.dumps({"samples": count_built_samples(Path(args[0]))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
