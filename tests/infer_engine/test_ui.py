"""The UI layer in process, on the real transformers engine: throttled streaming, early close, the
dropped-turns notice, and how build_ui wires events to the queue. The model is the served one with random
weights (see conftest), so greedy replies are long and deterministic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_engine.engine import ChatEngine, create_engine
from infer_engine.settings import EngineSettings, GenerationParams, ServerSettings
from infer_engine.ui import GENERATION_POOL, ModelInfo, build_ui, dropped_notice, stream_reply

QUESTION = [{"role": "user", "content": "请介绍一下你自己"}]
GREEDY = GenerationParams(max_new_tokens=48, do_sample=False)
SESSION_LEN = 256


@pytest.fixture(scope="module")
def engine(rambling_model_dir: Path) -> Iterator[ChatEngine]:
    engine = create_engine(
        rambling_model_dir, EngineSettings(backend="transformers", session_len=SESSION_LEN)
    )
    yield engine
    engine.close()


def test_unthrottled_stream_yields_every_delta_and_throttled_yields_first_and_final(
    engine: ChatEngine,
) -> None:
    stream, texts = stream_reply(engine, QUESTION, GREEDY, "ui-test-1", min_interval_s=0.0)
    every = list(texts)
    assert stream.finish_reason in ("stop", "length")
    assert every, "the model produced no text"
    assert all(later.startswith(earlier) for earlier, later in zip(every, every[1:], strict=False))

    _, texts = stream_reply(engine, QUESTION, GREEDY, "ui-test-2", min_interval_s=3600.0)
    assert list(texts) == ([every[0], every[-1]] if len(every) > 1 else every)


def test_closing_the_texts_early_aborts_the_reply(engine: ChatEngine) -> None:
    long_reply = GenerationParams(max_new_tokens=200, do_sample=False)
    stream, texts = stream_reply(engine, QUESTION, long_reply, "ui-test-3")
    next(texts)
    texts.close()
    assert stream.finish_reason == "abort"
    assert stream.completion_tokens < long_reply.max_new_tokens


def test_oldest_turns_are_dropped_to_fit_and_the_notice_says_how_many(engine: ChatEngine) -> None:
    turn = [
        {"role": "user", "content": "请介绍一下你自己，越详细越好。"},
        {"role": "assistant", "content": "我是一个小助手，可以回答问题。" * 3},
    ]
    stream, texts = stream_reply(engine, turn * 10 + QUESTION, GREEDY, "ui-test-4")
    list(texts)
    assert stream.dropped_messages > 0
    assert stream.prompt_tokens + GREEDY.max_new_tokens <= SESSION_LEN
    assert f"The {stream.dropped_messages} oldest message(s) were left out" in dropped_notice(
        stream.dropped_messages
    )
    assert dropped_notice(0) == ""


def test_generation_shares_one_pool_sized_to_the_engine_and_ui_events_skip_the_queue(
    engine: ChatEngine,
) -> None:
    demo = build_ui(engine, ServerSettings(queue_size=7), ModelInfo(name="tiny", source="test", is_demo=True))
    functions = list(demo.fns.values())
    generating = [fn for fn in functions if fn.concurrency_id == GENERATION_POOL]
    assert sorted(fn.name for fn in generating) == ["answer", "answer", "chat"]
    assert {fn.concurrency_limit for fn in generating} == {engine.max_concurrency}
    clicks = [fn for fn in functions if fn not in generating and any(t[1] != "unload" for t in fn.targets)]
    assert clicks and not any(fn.queue for fn in clicks)
    assert [fn.api_name for fn in functions if fn.api_visibility == "public"] == ["chat"]
    assert demo._queue.max_size == 7
