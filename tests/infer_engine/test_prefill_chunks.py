"""Chunked prefill in the transformers backend: the same replies as one-shot prefill, and a long prompt that
no longer holds back a short one or a running stream (order of events, not speed: speed is in ``make bench``).

Run: .venv/bin/python -m pytest tests/infer_engine/test_prefill_chunks.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infer_engine.hf_engine import TransformersEngine
from infer_engine.settings import EngineSettings, GenerationParams

GREEDY = GenerationParams(max_new_tokens=24, do_sample=False)
LONG_PROMPT = "请介绍一下你自己，越详细越好。 Who are you? " * 60  # ~1000 tokens


def settings(chunk: int) -> EngineSettings:
    return EngineSettings(
        backend="transformers", device="cpu", session_len=2048, max_batch_size=4, prefill_chunk_tokens=chunk
    )


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are UbUb."}, {"role": "user", "content": text}]


@pytest.mark.parametrize("text", ["请介绍一下你自己", LONG_PROMPT])
def test_chunked_prefill_gives_the_same_greedy_reply(tiny_model_dir: Path, text: str) -> None:
    replies = []
    for chunk in (1_048_576, 16):  # one forward pass, then chunks of 16 tokens
        engine = TransformersEngine(tiny_model_dir, settings(chunk))
        try:
            stream = engine.stream_chat(ask(text), GREEDY, "same")
            replies.append(("".join(stream), stream.completion_tokens, stream.prompt_tokens))
        finally:
            engine.close()
    assert replies[0] == replies[1]
    assert replies[0][0]


def test_a_short_prompt_gets_its_first_token_while_a_long_one_is_prefilled(tiny_model_dir: Path) -> None:
    """The short prompt arrives during the long one's first prefill pass (started from inside the model's
    forward); the decoder thread's own order of forward passes shows what ran first."""
    engine = TransformersEngine(tiny_model_dir, settings(64))
    prefills: list[tuple[int, int]] = []  # (first position, tokens) of every prompt forward pass, in order
    short: dict[str, Any] = {}

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        size = kwargs["input_ids"].shape[1]
        if size > 1:
            positions = kwargs.get("position_ids")  # None: a whole prompt, from position 0
            prefills.append((0 if positions is None else int(positions[0, 0]), size))
            if not short:  # the long prompt is being prefilled: the short one arrives now
                short["stream"] = engine.stream_chat(ask("hi"), GREEDY, "short")

    hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        long = engine.stream_chat(ask(LONG_PROMPT), GREEDY, "long")
        "".join(long)
        "".join(short["stream"])
    finally:
        hook.remove()
        engine.close()
    short_prefill = prefills.index((0, short["stream"].prompt_tokens))  # prefilled whole, in one pass
    long_done = next(i for i, (start, size) in enumerate(prefills) if start + size == long.prompt_tokens)
    assert short_prefill < long_done  # its first token came while the long prompt was still being prefilled
    assert short["stream"].finish_reason in ("stop", "length") and long.finish_reason in ("stop", "length")


def test_a_running_stream_keeps_decoding_while_a_long_prompt_is_prefilled(rambling_model_dir: Path) -> None:
    engine = TransformersEngine(rambling_model_dir, settings(64))
    forwards: list[str] = []  # "chunk" (a prompt piece) or "decode" (one token for every running row)

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        forwards.append("decode" if kwargs["input_ids"].shape[1] == 1 else "chunk")

    try:
        running = engine.stream_chat(ask("hi"), GenerationParams(max_new_tokens=400, do_sample=False), "run")
        next(iter(running))  # streaming
        hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
        long = engine.stream_chat(ask(LONG_PROMPT), GREEDY, "long")
        "".join(long)
        hook.remove()
        running.close()
    finally:
        engine.close()
    chunks = [i for i, kind in enumerate(forwards) if kind == "chunk"]
    assert len(chunks) >= long.prompt_tokens // 64
    # between two chunks of the long prompt, the running stream decoded a token
    assert all(b - a > 1 for a, b in zip(chunks, chunks[1:], strict=False)), forwards[:40]
