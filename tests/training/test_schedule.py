# The training schedule: iterations, optimizer steps and warm-up known before training, XTuner's packer
# emulated, and every shipped config's schedulers built by mmengine at the lengths that used to crash.
# Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_schedule.py
import importlib.util
import sys

import pytest

from training.config_render import render_config
from training.presets import CONFIG_DIR, PRESETS
from training.schedule import (
    ScheduleError,
    conversation_tokens,
    estimate_tokens,
    packed_samples,
    plan_schedule,
    warmup_iters,
)


def test_steps_follow_rows_epochs_batch_processes_and_accumulation():
    plan = plan_schedule(416, batch_size=1, accumulative_counts=4, world_size=1, warmup_ratio=0.03, epochs=3)
    assert (plan.iters_per_epoch, plan.max_iters) == (416, 1248)
    assert (plan.optimizer_steps, plan.warmup_iters) == (312, 37)
    # DefaultSampler gives each of 3 processes ceil(416 / 3) = 139 rows; mmengine also steps at the last iter.
    plan = plan_schedule(416, batch_size=2, accumulative_counts=4, world_size=3, warmup_ratio=0.03, epochs=2)
    assert (plan.iters_per_epoch, plan.max_iters, plan.optimizer_steps) == (70, 140, 35)
    plan = plan_schedule(5, batch_size=1, accumulative_counts=16, world_size=1, warmup_ratio=0.1, max_iters=7)
    assert (plan.max_iters, plan.optimizer_steps, plan.epochs) == (7, 1, 1.4)


@pytest.mark.parametrize("max_iters", [1, 2, 3, 10, 33, 300, 1248])
def test_warmup_is_at_least_one_iteration_and_ends_before_training_does(max_iters):
    warmup = warmup_iters(max_iters, 0.03)
    assert warmup >= 1
    assert warmup < max_iters or max_iters == 1


def test_impossible_schedules_are_clear_errors():
    with pytest.raises(ScheduleError, match="no samples"):
        plan_schedule(0, batch_size=1, accumulative_counts=1, world_size=1, warmup_ratio=0.03, epochs=1)
    with pytest.raises(ScheduleError, match="exactly one"):
        plan_schedule(4, batch_size=1, accumulative_counts=1, world_size=1, warmup_ratio=0.03)


def test_packer_emulation_matches_xtuner():
    pytest.importorskip("xtuner", reason="needs the training env (.venv-train)")
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(CONFIG_DIR.parent / "cpu_shims"))
    from datasets import Dataset
    from xtuner.dataset.utils import Packer

    lengths = [37, 5, 600, 81, 250, 1, 990, 64] * 160 + [11, 17]  # 1282 rows: two of datasets.map's batches
    rows = Dataset.from_dict({"input_ids": [[7] * n for n in lengths], "labels": [[7] * n for n in lengths]})
    for max_length in (256, 2048):
        packed = rows.map(Packer(max_length), batched=True, num_proc=1)
        kept = sum(len(ids) for ids in packed["input_ids"])
        assert packed_samples(lengths, max_length) == (len(packed), sum(lengths) - kept)


def test_token_estimate_counts_cjk_characters_and_latin_words():
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("Who are you?") == 3
    assert conversation_tokens({"conversation": [{"input": "你是谁", "output": "I am Alice."}]}) == 3 + 3 + 10


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("max_iters", [1, 2, 11, 300])
def test_every_config_schedules_build_in_mmengine_for_short_runs(preset, max_iters):
    # The schedules that crashed: a 3 % warm-up of a short run is 0 iterations ("end should be larger than
    # begin"), and a fixed 10-iteration warm-up outlasts --max-iters 1..10.
    pytest.importorskip("mmengine", reason="needs the training env (.venv-train)")
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(CONFIG_DIR.parent / "cpu_shims"))
    import torch
    from mmengine.config import Config
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR

    spec = PRESETS[preset]
    for name in (spec.sft_config, spec.pretrain_config):
        source = (CONFIG_DIR / name).read_text(encoding="utf-8")
        ratio = Config.fromstring(source, ".py").warmup_ratio
        length = {"max_iters": max_iters, "warmup_iters": warmup_iters(max_iters, ratio)}
        rendered = render_config(source, length)
        cfg = Config.fromstring(rendered, ".py")
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        built = []
        for scheduler in cfg.param_scheduler:
            kind = {LinearLR: LinearLR, CosineAnnealingLR: CosineAnnealingLR}[scheduler["type"]]
            built.append(kind(optimizer, **{k: v for k, v in scheduler.items() if k != "type"}))
        assert built[0].end == built[1].begin >= 1
