# --rehearse: the real preset's path on a randomly initialised model of its shapes, before any download.
#   bash training/run.sh --name Alice --rehearse                # CUDA GPU: 4-bit QLoRA, TurboMind serving
#   bash training/run.sh --name Alice --rehearse --preset tiny  # CPU: shrunken shapes, no 4-bit, no serving
# The pipeline calls `python -m training.rehearse base --preset P --out DIR` (training env) to build the
# random base, runs every stage on it, has training/rehearse_serve.py measure serving in the app env (.venv),
# and prints rehearsal_table().
"""Rehearsal: a random model with a preset's shapes, and the one table of what the rehearsal measured."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from training.presets import PRESETS

SERVE_RESULT = "rehearsal_serve.json"  # written by training/rehearse_serve.py into the work dir
# mmengine's training log line: "Iter(train) [ 10/10]  ...  time: 0.2137  data_time: ...  memory: 5661  ..."
# (`time` is the mean over the logging interval; `memory` is torch.cuda.max_memory_allocated in MiB).
ITER_TIME = re.compile(r"\btime: ([0-9.]+)")
ITER_MEMORY = re.compile(r"\bmemory: ([0-9]+)")


def make_random_base(out: Path, shape: Mapping[str, int], seed: int = 0) -> Path:
    """Write a randomly initialised LlamaForCausalLM with `shape` and the tiny base's tokenizer (its
    vocabulary fits in any shape's), fp16 on a GPU, fp32 on CPU; atomically.

    Args:
        out: model dir to create (replaced if it exists).
        shape: LlamaConfig sizes (vocab_size, hidden_size, num_hidden_layers, ...).
        seed: weight-init seed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training import general_chat
    from training.make_tiny_base import BOS_ID, EOS_ID, IM_END_ID, save_model_dir, train_tokenizer

    tokenizer = train_tokenizer(general_chat.tokenizer_corpus(), 2000)
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"vocab_size {shape['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    config = LlamaConfig(**shape, bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=EOS_ID,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # initialising 1.9 B parameters on a CPU takes minutes
        model = LlamaForCausalLM(config).to(torch.float16 if cuda else torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    save_model_dir(model.cpu(), tokenizer, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def sft_measurements(train_dir: Path, data_dir: Path, base_dir: Path, world_size: int) -> dict[str, float]:
    """SFT speed from XTuner's own log: mean seconds per iteration, peak GPU memory (MiB, when on a GPU), and
    tokens/s = mean tokens of a training row (batch 1, unpacked) x processes / seconds per iteration.

    Args:
        train_dir: the SFT stage's XTuner --work-dir.
        data_dir: the data stage's output (train.json).
        base_dir: the model whose tokenizer counts the tokens.
        world_size: training processes.
    """
    from transformers import AutoTokenizer

    times, memory = [], []
    for log in sorted(train_dir.glob("*/*.log")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "Iter(train)" in line and (time := ITER_TIME.search(line)):
                times.append(float(time[1]))
                memory += [int(m[1]) for m in ITER_MEMORY.finditer(line)]
    if not times:
        return {}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = json.loads((data_dir / "train.json").read_text(encoding="utf-8"))
    turns = [[{"role": "user", "content": t["input"]}, {"role": "assistant", "content": t["output"]}]
             for row in rows for t in row["conversation"]]
    tokens = [len(tokenizer.apply_chat_template(turn, tokenize=True)) for turn in turns]
    per_iter = sum(times) / len(times)
    result = {"sft_s_per_iter": per_iter,
              "sft_tokens_per_s": sum(tokens) / len(tokens) * world_size / per_iter}
    if memory:
        result["sft_peak_mib"] = max(memory)
    return result


def rehearsal_table(measured: Mapping[str, object], serve: Mapping[str, object]) -> str:
    """The rehearsal's one table (markdown), "—" where nothing was measured, and why serving was skipped.

    Args:
        measured: sft_measurements() plus "convert_s" and "merge_s" (stage wall times).
        serve: training/rehearse_serve.py's result: {"engine": {streams: {...}}, "raw": {...},
            "first_token_ms", "abort_ms"} or {"skipped": reason}.
    """
    def fmt(value: object, unit: str = "") -> str:
        return f"{value:,.0f}{unit}" if isinstance(value, int | float) else "—"

    rows = [("SFT tokens/s", fmt(measured.get("sft_tokens_per_s"))),
            ("SFT peak GPU memory", fmt(measured.get("sft_peak_mib"), " MiB")),
            ("convert (pth_to_hf)", f"{measured.get('convert_s', '—')} s"),
            ("merge", f"{measured.get('merge_s', '—')} s")]
    engine, raw = serve.get("engine") or {}, serve.get("raw") or {}
    for streams in ("1", "8", "32"):
        e, r = engine.get(streams, {}).get("tokens_per_s"), raw.get(streams, {}).get("tokens_per_s")
        both = isinstance(e, int | float) and isinstance(r, int | float) and r
        ratio = f" ({e / r:.2f} x raw)" if both else ""
        rows.append((f"tokens/s at {streams} streams: engine / raw TurboMind", f"{fmt(e)} / {fmt(r)}{ratio}"))
    rows += [("first-token latency (engine, 1 stream)", fmt(serve.get("first_token_ms"), " ms")),
             ("abort latency (engine)", fmt(serve.get("abort_ms"), " ms"))]
    lines = ["| measure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    if serve.get("skipped"):
        lines.append(f"serving not measured: {serve['skipped']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the random model of a preset's shapes for --rehearse.")
    p.add_argument("command", choices=["base"])
    p.add_argument("--preset", required=True, choices=PRESETS)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    print(make_random_base(args.out, PRESETS[args.preset].rehearse_shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
