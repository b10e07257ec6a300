"""The UI's per-session bookkeeping and error wording, in process on the real transformers engine: one reply
per page or API session (a new one replaces it), slots given back however a reply ends, requests without a
session hash, and failures shown as one sentence with a request id (the details only in the log).

Run: .venv/bin/python -m pytest tests/infer_engine/test_ui_sessions.py -q
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pytest
from log_capture import EngineLog

from infer_engine.engine import ChatEngine, create_engine
from infer_engine.settings import EngineSettings, ServerSettings
from infer_engine.ui import ModelInfo, ReplySlots, build_ui

INFO = ModelInfo(name="tiny", source="test", is_demo=True)
QUESTION = [{"role": "user", "content": "请介绍一下你自己"}]
SESSION_LEN = 256


@pytest.fixture(scope="module")
def engine(rambling_model_dir: Path) -> Iterator[ChatEngine]:
    engine = create_engine(
        rambling_model_dir, EngineSettings(backend="transformers", session_len=SESSION_LEN)
    )
    yield engine
    engine.close()


def event(demo: gr.Blocks, name: str) -> Callable:
    """The function of the UI event (or API) called ``name``."""
    return next(fn.fn for fn in demo.fns.values() if fn.name == name)


def long_answer(demo: gr.Blocks, session_hash: str) -> Iterator:
    return event(demo, "answer")(QUESTION, "", 200, 0.8, 0.8, 1, gr.Request(session_hash=session_hash))


def test_the_slot_is_given_back_when_a_reply_fails_or_is_cancelled_without_stop(engine: ChatEngine) -> None:
    slots = ReplySlots()
    demo = build_ui(engine, ServerSettings(), INFO, slots=slots)
    answer = event(demo, "answer")
    request = gr.Request(session_hash="page-failing")
    too_long = [{"role": "user", "content": "word " * 2000}]  # cannot fit the 256-token session
    with pytest.raises(gr.Error, match="the message is too long"):
        list(answer(too_long, "", 16, 0.8, 0.8, 1, request))
    assert len(slots) == 0
    updates = long_answer(demo, "page-cancelled")
    next(updates)
    assert len(slots) == 1  # running
    updates.close()  # what Gradio does when the client goes away or the event is cancelled
    assert len(slots) == 0
    finished = list(event(demo, "answer")(QUESTION, "", 8, 0.8, 0.8, 1, request))
    assert finished and len(slots) == 0


def test_a_new_api_call_of_a_session_replaces_its_running_reply(
    engine: ChatEngine, engine_log: EngineLog
) -> None:
    demo = build_ui(engine, ServerSettings(), INFO)
    chat = event(demo, "chat")
    same_client = gr.Request(session_hash="one-client")
    first = chat("Tell me a long story.", max_new_tokens=200, do_sample=False, request=same_client)
    assert next(first)
    second = chat("你是谁？", max_new_tokens=8, do_sample=False, request=same_client)
    assert list(second)
    with pytest.raises(gr.Error, match="replaced by a newer request from the same client session") as caught:
        list(first)
    assert caught.value.print_exception is False  # asked for by the client: no traceback in the server log
    assert engine_log.wait_for(r"^session api-\w+ request \d+: abort", timeout_s=5)
    other_client = chat(
        "你是谁？", max_new_tokens=8, do_sample=False, request=gr.Request(session_hash="other")
    )
    assert list(other_client)


def test_a_new_page_reply_replaces_the_running_one(engine: ChatEngine) -> None:
    demo = build_ui(engine, ServerSettings(), INFO)
    first = long_answer(demo, "one-page")
    next(first)
    second = long_answer(demo, "one-page")
    next(second)
    assert list(first) == [(gr.skip(), gr.skip())]  # the old one no longer updates the chat
    second.close()


def test_events_without_a_session_hash_do_not_crash(engine: ChatEngine) -> None:
    demo = build_ui(engine, ServerSettings(), INFO)
    anonymous = gr.Request(session_hash=None)
    event(demo, "stop_reply")(anonymous)  # nothing to stop, no error
    chat, _ = next(event(demo, "answer")(QUESTION, "", 4, 0.8, 0.8, 1, anonymous))
    assert chat[-1]["role"] == "assistant"
    assert list(event(demo, "chat")("hi", max_new_tokens=4, request=anonymous))


def test_an_internal_failure_is_one_sentence_with_a_request_id_and_the_log_has_the_rest(
    engine: ChatEngine, engine_log: EngineLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_abort(session_id: str) -> None:
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(engine, "abort", broken_abort)
    demo = build_ui(engine, ServerSettings(), INFO)
    with pytest.raises(gr.Error) as caught:
        event(demo, "stop_reply")(gr.Request(session_hash="page-x"))
    message = caught.value.message
    assert message.startswith("Sorry, the server failed to stop the reply (request ")
    assert "internal" not in message and "secret" not in message
    request_id = message.split("(request ")[1].split(")")[0]
    assert engine_log.wait_for(f"(?s)request {request_id}: failed to stop the reply\n.*/srv/secret/path", 1.0)
