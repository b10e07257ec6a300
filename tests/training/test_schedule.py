# The training schedule: iterations, optimizer steps and warm-up known before training, XTuner's packer
# emulated, and every shipped config's schedulers built by mmengine at the lengths that used to crash.
# Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_schedule.py
import sys

import pytest

from training.config_render import render_config, write_stage_config
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


@pytest.mark.parametrize(("max_iters", "warmup"), [(1, 1), (2, 1), (33, 1), (316, 1), (334, 10), (1248, 37)])
def test_warmup_is_ten_or_more_iterations_or_none_never_zero(max_iters, warmup):
    assert warmup_iters(max_iters, 0.03) == warmup


def test_impossible_schedules_are_clear_errors():
    with pytest.raises(ScheduleError, match="no samples"):
        plan_schedule(0, batch_size=1, accumulative_counts=1, world_size=1, warmup_ratio=0.03, epochs=1)
    with pytest.raises(ScheduleError, match="exactly one"):
        plan_schedule(4, batch_size=1, accumulative_counts=1, world_size=1, warmup_ratio=0.03)


def test_packer_emulation_matches_xtuner():
    pytest.importorskip("xtuner", reason="needs the training env (.venv-train)")
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
@pytest.mark.parametrize("max_iters", [1, 2, 3, 11, 300])
def test_every_config_warms_up_to_the_full_lr_then_decays(preset, max_iters):
    # What used to go wrong: a 3 % epoch-based warm-up of a short run is 0 iterations ("end should be larger
    # than begin"); a fixed 10-iteration warm-up outlasts --max-iters 1..10; and mmengine's chained cosine
    # decays from whatever lr the warm-up left, which a plain LinearLR never brings to the full lr.
    pytest.importorskip("mmengine", reason="needs the training env (.venv-train)")
    import torch
    from mmengine.config import Config
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR

    for stage in ("sft", "pretrain"):
        template_path, values = PRESETS[preset].stage_config(stage)
        source = render_config(template_path.read_text(encoding="utf-8"), values)  # as the preset trains
        template = Config.fromstring(source, ".py")
        warmup = warmup_iters(max_iters, template.warmup_ratio)
        rendered = render_config(source, {"max_iters": max_iters, "warmup_iters": warmup})
        cfg = Config.fromstring(rendered, ".py")
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        kinds = {LinearLR: LinearLR, CosineAnnealingLR: CosineAnnealingLR}
        schedulers = [kinds[s["type"]](optimizer, **{k: v for k, v in s.items() if k != "type"})
                      for s in cfg.param_scheduler]
        lrs = []
        for _ in range(max_iters):  # as mmengine's ParamSchedulerHook: the lr of an iteration, then step
            lrs.append(optimizer.param_groups[0]["lr"])
            for scheduler in schedulers:
                scheduler.step()
        assert max(lrs) >= 0.9 * cfg.lr
        if warmup > 1:
            assert lrs[0] < 1e-3 * cfg.lr and max(lrs) == lrs[warmup]
        assert lrs[warmup:] == sorted(lrs[warmup:], reverse=True)


def test_exact_sample_count_comes_from_xtuners_own_dataset_build(tiny_base_dir, tmp_path):
    # What the pre-training stage runs before it trains by epochs: XTuner builds the packed data set from the
    # rendered config (tokenizer and data, no model), and its length is the count.
    import json
    import os
    import subprocess

    corpus = tmp_path / "corpus.json"
    texts = [f"Paragraph {i}: " + "the lighthouse keeper counts the waves. " * (5 + i % 7) for i in range(60)]
    corpus.write_text(json.dumps([{"text": t} for t in texts]))
    settings = {"pretrained_model_name_or_path": str(tiny_base_dir), "data_path": str(corpus)}
    config = write_stage_config(PRESETS["tiny"], "pretrain", settings, tmp_path / "pretrain.py", "test")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONFIG_DIR.parents[1]), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "training.schedule", str(config)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    samples = json.loads(proc.stdout.strip().splitlines()[-1])["samples"]
    # The tiny tokenizer is byte-level BPE: the estimate is rough, but XTuner's count is in its range.
    estimate = packed_samples([estimate_tokens(t) for t in texts], 256)[0]
    assert samples >= 1 and estimate / 4 <= samples <= estimate * 4
