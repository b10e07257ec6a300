# A long prompt vs everyone else, on the transformers engine, both ways in one run (what `make bench` runs):
#   .venv/bin/python -m bench.bench_prefill [--model SOURCE] [--prompt-tokens 4000] [--rounds 3] [--chunk 512]
# While one stream is decoding, a ~4000-token prompt arrives; as soon as its prefill has started (seen from
# inside the model's forward), a short question arrives. Measured: the short question's time to first text,
# the running stream's longest pause between two decode steps, and the long prompt's own time to first text.
# "one pass" prefills each prompt in a single forward (PREFILL_CHUNK_TOKENS above the prompt: the engine as it
# was before chunking), "chunked" in pieces of --chunk tokens that take turns with decoding. Model: the served
# model's shapes and tokenizer with random weights (bench_serving.random_weights_copy). In process, no
# network, ends by itself.
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_serving import ms, random_weights_copy
from infer_engine.chat_format import encode_chat
from infer_engine.hf_engine import TransformersEngine
from infer_engine.model_source import resolve_model
from infer_engine.settings import EngineSettings, GenerationParams

SHORT_QUESTION = "你是谁？"
UNIT = "请介绍一下你自己，越详细越好。Tell me about the sea, the wind and the stars. "
WAIT_S = 600


@dataclass(frozen=True)
class Round:
    """One measurement: seconds to the short question's first text, the running stream's longest pause while
    the long prompt was handled, and seconds to the long prompt's first text."""

    short_first_s: float
    longest_pause_s: float
    long_first_s: float


def long_prompt(tokenizer: Any, tokens: int) -> str:
    """A user message whose chat prompt has about ``tokens`` tokens (at least that many)."""
    text = UNIT
    while len(encode_chat(tokenizer, [{"role": "user", "content": text}])) < tokens:
        text += UNIT
    return text


def first_text_s(stream: Any, started: float) -> float:
    """Consume ``stream`` to its end; return the seconds from ``started`` to its first text."""
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter() - started
    return float("nan") if first is None else first


def one_round(engine: TransformersEngine, prompt: str) -> Round:
    """See the header: a running stream, then the long prompt, then the short question during its prefill.

    The running stream's pauses are read from the model's forward passes (a decode step feeds one token per
    row), not from its text: a random model's bytes often complete a character only some tokens later.
    """
    greedy = GenerationParams(max_new_tokens=8, do_sample=False)
    running = engine.stream_chat(
        [{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2048, do_sample=False), "running"
    )
    texts = iter(running)
    next(texts)  # decoding
    consumer = threading.Thread(target=lambda: [None for _ in texts])
    consumer.start()
    decode_steps: list[float] = []
    prefill_started = threading.Event()

    def on_forward(module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] == 1:
            decode_steps.append(time.perf_counter())
        else:  # a prompt pass
            prefill_started.set()

    hook = engine.model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        long_started = time.perf_counter()
        long = engine.stream_chat([{"role": "user", "content": prompt}], greedy, "long")
        long_result: list[float] = []
        long_consumer = threading.Thread(target=lambda: long_result.append(first_text_s(long, long_started)))
        long_consumer.start()
        prefill_started.wait(WAIT_S)
        short_started = time.perf_counter()
        short = engine.stream_chat([{"role": "user", "content": SHORT_QUESTION}], greedy, "short")
        short_first = first_text_s(short, short_started)
        long_consumer.join(WAIT_S)
        long_done = time.perf_counter()
    finally:
        hook.remove()
    engine.abort("running")  # what Stop does; its consumer then ends
    consumer.join(WAIT_S)
    marks = [long_started, *(t for t in decode_steps if long_started <= t <= long_done), long_done]
    pause = max(b - a for a, b in zip(marks, marks[1:], strict=False))
    return Round(short_first, pause, long_result[0])


def measure(
    model_dir: Path, prompt_tokens: int, chunk: int, rounds: int
) -> tuple[dict[str, list[Round]], int]:
    """Rounds per way of prefilling (one engine each, interleaved); return them and the long prompt's tokens.

    Args:
        model_dir: the model to serve.
        prompt_tokens: about how many tokens the long prompt has.
        chunk: ``prefill_chunk_tokens`` of the chunked engine.
        rounds: timed rounds per way (after one warm-up round each).
    """
    session_len = prompt_tokens + 2 * 2048
    ways = {"one pass": session_len, f"chunked ({chunk})": chunk}
    engines = {
        name: TransformersEngine(
            model_dir,
            EngineSettings(backend="transformers", session_len=session_len, prefill_chunk_tokens=size),
        )
        for name, size in ways.items()
    }
    try:
        tokenizer = next(iter(engines.values())).tokenizer
        prompt = long_prompt(tokenizer, prompt_tokens)
        tokens = len(encode_chat(tokenizer, [{"role": "user", "content": prompt}]))
        results: dict[str, list[Round]] = {name: [] for name in engines}
        for round_ in range(rounds + 1):  # round 0 warms up; interleaved, so load hits both ways alike
            for name, engine in engines.items():
                result = one_round(engine, prompt)
                if round_:
                    results[name].append(result)
    finally:
        for engine in engines.values():
            engine.close()
    return results, tokens


def report(results: dict[str, list[Round]], tokens: int) -> None:
    """Print the medians, one row per way of prefilling."""
    print(f"\nlong prompt: {tokens} tokens; medians of {len(next(iter(results.values())))} rounds")
    header = f"{'prefill':<18}{'short question first text ms':>30}{'running stream longest pause ms':>33}"
    print(header + f"{'long prompt first text ms':>27}")
    for name, rounds in results.items():
        short = statistics.median(r.short_first_s for r in rounds)
        pause = statistics.median(r.longest_pause_s for r in rounds)
        long = statistics.median(r.long_first_s for r in rounds)
        print(f"{name:<18}{ms(short):>30}{ms(pause):>33}{ms(long):>27}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_prefill", description="A long prompt's prefill vs the other requests."
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL_SOURCE", ""),
        help="model source (default MODEL_SOURCE, else the embedded demo model)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="about how long the long prompt is")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per way (median reported)")
    parser.add_argument(
        "--chunk", type=int, default=EngineSettings().prefill_chunk_tokens, help="prefill chunk tokens"
    )
    args = parser.parse_args(argv)
    if not 100 <= args.prompt_tokens <= 100_000 or not 1 <= args.rounds <= 20 or args.chunk < 16:
        parser.error("--prompt-tokens must be 100-100000, --rounds 1-20 and --chunk at least 16")

    served = resolve_model(args.model or None)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_weights_copy(served, Path(tmp) / "model")
        print(f"model: shapes and tokenizer of {served}, random weights (see random_weights_copy)")
        print(f"cpu count: {os.cpu_count()}, usable cores: {len(os.sched_getaffinity(0))}")
        results, tokens = measure(model_dir, args.prompt_tokens, args.chunk, args.rounds)
    report(results, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
