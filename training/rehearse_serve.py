# The serving half of --rehearse, run by the pipeline in the APP environment (.venv: LMDeploy, infer_engine):
#   .venv/bin/python -m training.rehearse_serve --model WORK/merged --out WORK/rehearsal_serve.json
# Builds the app's engine (infer_engine.engine.create_engine, LMDeploy backend, as the Space serves it) and
# measures it and, on the same TurboMind pipeline and GPU memory, raw `pipe.stream_infer` (one thread and
# session per stream), at 1, 8 and 32 concurrent streams; then first-token and abort latency through the
# engine. Without CUDA it writes {"skipped": reason}.
"""Serving measurements of a rehearsal: engine vs raw TurboMind tokens/s, first-token and abort latency."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

STREAMS = (1, 8, 32)
NEW_TOKENS = 128
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def _concurrent(k: int, one: Any) -> dict[str, float]:
    """Run `one(i)` -> (tokens, first-token seconds) in k threads at once; aggregate tokens/s."""
    out: list[tuple[int, float]] = [(0, 0.0)] * k

    def worker(i: int) -> None:
        out[i] = one(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    firsts = sorted(f for _, f in out)
    return {"tokens_per_s": sum(n for n, _ in out) / wall,
            "first_token_ms_p50": firsts[len(firsts) // 2] * 1e3}


def measure(model_dir: Path) -> dict[str, object]:
    """Raw TurboMind and the app's engine on one pipeline over `model_dir` (needs CUDA and LMDeploy)."""
    from lmdeploy import GenerationConfig

    from infer_engine.engine import create_engine
    from infer_engine.settings import EngineSettings, GenerationParams

    settings = EngineSettings(backend="lmdeploy", max_batch_size=max(STREAMS), session_len=2048,
                              cache_max_entry_count=0.5)
    engine = create_engine(model_dir, settings)
    pipe = engine.pipe  # the engine's own TurboMind pipeline: raw and engine share weights and KV cache
    raw_config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, do_sample=False)

    def raw_one(i: int) -> tuple[int, float]:
        start, first, n = time.perf_counter(), 0.0, 0
        for r in pipe.stream_infer(PROMPT, sessions=pipe.session(), gen_config=raw_config):
            first = first or time.perf_counter() - start
            n = r.generate_token_len or n
        return n, first

    params = GenerationParams(max_new_tokens=NEW_TOKENS, do_sample=False)

    def engine_one(i: int) -> tuple[int, float]:
        start, first = time.perf_counter(), 0.0
        stream = engine.stream_chat([{"role": "user", "content": PROMPT}], params, session_id=f"rehearse-{i}")
        for _ in stream:
            first = first or time.perf_counter() - start
        return stream.completion_tokens, first

    raw_one(0), engine_one(0)  # warm-up
    result: dict[str, object] = {"raw": {str(k): _concurrent(k, raw_one) for k in STREAMS},
                                 "engine": {str(k): _concurrent(k, engine_one) for k in STREAMS}}
    result["first_token_ms"] = result["engine"]["1"]["first_token_ms_p50"]  # type: ignore[index]
    stream = engine.stream_chat([{"role": "user", "content": PROMPT}], params, session_id="rehearse-abort")
    ended = threading.Event()
    threading.Thread(target=lambda: (list(stream), ended.set()), daemon=True).start()
    while stream.completion_tokens < 2 and not ended.is_set():
        time.sleep(0.001)
    start = time.perf_counter()
    engine.abort("rehearse-abort")
    ended.wait(30)
    result["abort_ms"] = (time.perf_counter() - start) * 1e3
    result["abort_finish_reason"] = stream.finish_reason
    engine.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure serving of a rehearsal's merged model (app env).")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    from infer_engine.engine import lmdeploy_available

    result = measure(args.model) if lmdeploy_available() else {
        "skipped": "LMDeploy TurboMind needs a CUDA GPU and its native module, and this machine has no "
                   "working one"}
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
