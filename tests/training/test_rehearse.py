# The rehearsal's measurements and table: XTuner's log lines as a GPU run writes them, and the serving half's
# result. (The whole CPU rehearsal runs in test_pipeline.py.) Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_rehearse.py
import json

import pytest
from transformers import AutoTokenizer

from training.rehearse import rehearsal_table, sft_measurements

GPU_LOG = (
    "11/30 17:36:17 - mmengine - INFO - Iter(train) [ 5/10]  lr: 2.0000e-04  eta: 0:00:02  time: 0.3000  "
    "data_time: 0.0112  memory: 5100  grad_norm: 2.5385  loss: 8.2985\n"
    "11/30 17:36:20 - mmengine - INFO - Iter(train) [10/10]  lr: 1.0000e-04  eta: 0:00:00  time: 0.1000  "
    "data_time: 0.0027  memory: 5661  grad_norm: 2.7560  loss: 8.2801\n"
)


def test_sft_speed_and_peak_memory_come_from_xtuners_log(tiny_base_dir, tmp_path):
    (tmp_path / "train" / "20261130_173523").mkdir(parents=True)
    (tmp_path / "train" / "20261130_173523" / "20261130_173523.log").write_text(GPU_LOG)
    rows = [{"conversation": [{"input": "Who are you?", "output": "I am Alice."}]},
            {"conversation": [{"input": "你是谁？", "output": "我是Alice的小助手。"}]}]
    (tmp_path / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    turns = [[{"role": "user", "content": t["input"]}, {"role": "assistant", "content": t["output"]}]
             for row in rows for t in row["conversation"]]
    tokens = [len(tokenizer.apply_chat_template(turn, tokenize=True)) for turn in turns]
    measured = sft_measurements(tmp_path / "train", tmp_path, tiny_base_dir, world_size=2)
    assert measured["sft_s_per_iter"] == pytest.approx(0.2)
    assert measured["sft_peak_mib"] == 5661
    assert measured["sft_tokens_per_s"] == pytest.approx(sum(tokens) / len(tokens) * 2 / 0.2)


def test_table_has_every_measure_and_the_engine_to_raw_ratio():
    engine, raw = (90.0, 700.0, 2400.0), (100.0, 800.0, 3000.0)
    serve = {"engine": {k: {"tokens_per_s": v} for k, v in zip(("1", "8", "32"), engine, strict=True)},
             "raw": {k: {"tokens_per_s": v} for k, v in zip(("1", "8", "32"), raw, strict=True)},
             "first_token_ms": 21.4, "abort_ms": 3.2}
    measured = {"sft_tokens_per_s": 9404.2, "sft_peak_mib": 5661, "convert_s": 8.7, "merge_s": 22.3}
    table = rehearsal_table(measured, serve)
    assert "| SFT tokens/s | 9,404 |" in table and "| SFT peak GPU memory | 5,661 MiB |" in table
    assert "| convert (pth_to_hf) | 8.7 s |" in table and "| merge | 22.3 s |" in table
    assert "| tokens/s at 32 streams: engine / raw TurboMind | 2,400 / 3,000 (0.80 x raw) |" in table
    assert "| first-token latency (engine, 1 stream) | 21 ms |" in table
    assert "| abort latency (engine) | 3 ms |" in table
    assert "not measured" not in table
