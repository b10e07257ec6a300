"""The UI layer in process, on the real transformers engine: throttled streaming, Stop, the dropped-turns
notice, what the page and ``/chat`` send to the engine (options, system prompt, ``SYSTEM_PROMPT``), how
build_ui wires events to the queue, the ``/chat`` function's input checks, and
``launch_options`` serving more streams than Gradio's default 40 threads. The model is the served one with
random weights (``rambling_model_dir``), so greedy replies are long and deterministic."""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from log_capture import EngineLog
from recording_engine import RecordingEngine

from bench.bench_serving import free_port
from infer_engine.engine import ChatEngine, create_engine
from infer_engine.hf_engine import TransformersEngine
from infer_engine.settings import EngineSettings, GenerationParams, ServerSettings, server_settings_from_env
from infer_engine.ui import (
    GENERATION_POOL,
    UI_THREADS,
    ModelInfo,
    build_ui,
    launch_options,
    page_session,
    stream_reply,
)

QUESTION = [{"role": "user", "content": "请介绍一下你自己"}]
GREEDY = GenerationParams(max_new_tokens=48, do_sample=False)
SESSION_LEN = 256
INFO = ModelInfo(name="tiny", source="test", is_demo=True)


@pytest.fixture(scope="module")
def engine(rambling_model_dir: Path) -> Iterator[ChatEngine]:
    engine = create_engine(
        rambling_model_dir, EngineSettings(backend="transformers", session_len=SESSION_LEN)
    )
    yield engine
    engine.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def api_function(demo: gr.Blocks) -> Callable[..., Iterator[str]]:
    """The function behind the public ``/chat`` endpoint."""
    (chat,) = [fn.fn for fn in demo.fns.values() if fn.api_name == "chat"]
    return chat


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


def page_handlers(demo: gr.Blocks) -> tuple[Callable[..., Iterator], Callable[[gr.Request], None]]:
    """The page's ``answer`` event function and its ``stop_reply`` (Stop / Undo / Clear / tab close)."""
    (answer,) = {fn.fn for fn in demo.fns.values() if fn.name == "answer"}
    stop = next(fn.fn for fn in demo.fns.values() if fn.name == "stop_reply")
    return answer, stop


def test_the_page_shows_the_dropped_turns_notice(engine: ChatEngine) -> None:
    answer, _ = page_handlers(build_ui(engine, ServerSettings(), INFO))
    turn = [
        {"role": "user", "content": "请介绍一下你自己，越详细越好。"},
        {"role": "assistant", "content": "我是一个小助手，可以回答问题。" * 3},
    ]
    request = gr.Request(session_hash="page-dropping")
    *_, (chat, notice) = answer(turn * 10 + QUESTION, "", 48, 0.8, 0.8, 1, request)
    dropped = int(re.search(r"The (\d+) oldest message\(s\) were left out", notice)[1])
    assert dropped > 0 and dropped % 2 == 0
    assert chat[-1]["role"] == "assistant" and len(chat) == len(turn) * 10 + 2  # the page keeps them all
    *_, (_, notice) = answer(QUESTION, "", 48, 0.8, 0.8, 1, request)
    assert notice == ""  # nothing dropped, no notice


def page_event(demo: gr.Blocks, name: str) -> Callable[..., tuple]:
    """The page's event function called ``name`` (e.g. ``add_question``, ``undo_turn``)."""
    return next(fn.fn for fn in demo.fns.values() if fn.name == name)


def test_a_question_too_long_for_the_session_is_refused_before_it_enters_the_chat(engine: ChatEngine) -> None:
    # As a paste over the character limit: the chat and the box stay as they were (the text to be trimmed),
    # said in a warning, which Gradio shows without covering the chat and the box with an "Error" panel.
    add_question = page_event(build_ui(engine, ServerSettings(), INFO), "add_question")
    chat = [*QUESTION, {"role": "assistant", "content": "我是小助手。"}]
    long_text = "请介绍一下你自己，越详细越好。" * 40  # 600 characters, far more than 256 tokens
    with pytest.warns(UserWarning, match=r"the message is too long: it needs \d+ prompt tokens"):
        refused = add_question(chat, long_text, "", 48)
    assert refused == (gr.skip(), gr.skip())
    with pytest.warns(UserWarning, match="max_new_tokens must be"):
        assert add_question(chat, "hi", "", 0) == (gr.skip(), gr.skip())
    asked = add_question(chat, "你好", "", 48)
    assert asked == ([*chat, {"role": "user", "content": "你好"}], "")


def test_undo_clears_the_dropped_turns_notice(engine: ChatEngine) -> None:
    undo_turn = page_event(build_ui(engine, ServerSettings(), INFO), "undo_turn")
    chat = [*QUESTION, {"role": "assistant", "content": "我是小助手。"}]
    assert undo_turn(chat) == ([], "", QUESTION[0]["content"])


def test_the_page_sends_its_options_and_system_prompt_to_the_engine(engine: ChatEngine) -> None:
    recording = RecordingEngine(engine)
    answer, _ = page_handlers(build_ui(recording, ServerSettings(), INFO))
    list(answer(QUESTION, "You are Zed.", 7, 0.3, 0.6, 5, gr.Request(session_hash="page-options")))
    ((messages, params),) = recording.asked
    assert messages == [{"role": "system", "content": "You are Zed."}, *QUESTION]
    assert params == GenerationParams(max_new_tokens=7, temperature=0.3, top_p=0.6, top_k=5)


def test_system_prompt_setting_is_the_default_of_the_page_and_the_api(
    engine: ChatEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYSTEM_PROMPT", "You are Zed.")
    recording = RecordingEngine(engine)
    demo = build_ui(recording, server_settings_from_env(), INFO)
    (box,) = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "System prompt"]
    assert box.value == "You are Zed."  # what the page sends unless the user edits it
    chat = api_function(demo)
    list(chat("你是谁？", max_new_tokens=4, do_sample=False))
    list(chat("你是谁？", system_prompt="You are Amy.", max_new_tokens=4, do_sample=False))
    list(chat("你是谁？", system_prompt="", max_new_tokens=4, do_sample=False))
    # A history with its own system message keeps it: the default is for calls that send none, as on /v1.
    cat = [{"role": "system", "content": "You are a cat."}]
    list(chat("你是谁？", cat, max_new_tokens=4, do_sample=False))
    sent = [messages[0] for messages, _ in recording.asked]
    assert sent == [
        {"role": "system", "content": "You are Zed."},
        {"role": "system", "content": "You are Amy."},
        {"role": "user", "content": "你是谁？"},  # blank: no system message
        {"role": "system", "content": "You are a cat."},
    ]


def test_generation_shares_one_pool_sized_to_the_engine_and_ui_events_wait_for_nothing(
    engine: ChatEngine,
) -> None:
    demo = build_ui(engine, ServerSettings(queue_size=7), INFO)
    functions = list(demo.fns.values())
    generating = [fn for fn in functions if fn.concurrency_id == GENERATION_POOL]
    assert sorted(fn.name for fn in generating) == ["answer", "answer", "chat"]
    assert {fn.concurrency_limit for fn in generating} == {engine.max_concurrency}
    clicks = [fn for fn in functions if fn not in generating and any(t[1] != "unload" for t in fn.targets)]
    # The steps that refuse what was typed run queued (Gradio 6 shows a gr.Error only from a queued event),
    # without a concurrency limit: they never wait for a reply. The others skip the queue.
    checking = [fn for fn in clicks if fn.name in ("add_question", "drop_answer")]
    assert sorted(fn.name for fn in checking) == ["add_question", "drop_answer"]
    assert all(fn.queue and fn.concurrency_limit is None for fn in checking)
    assert not any(fn.queue for fn in clicks if fn not in checking)
    assert [fn.api_name for fn in functions if fn.api_visibility == "public"] == ["chat"]
    assert demo._queue.max_size == 7
    # Stop, Undo and Clear abort the reply and cancel it on screen (Gradio adds a cancel-only event on the
    # same triggers); Undo and Clear change the chat only once that is done.
    answers = {fn._id for fn in generating if fn.name == "answer"}
    stops = [fn for fn in functions if fn.name == "stop_reply" and fn.targets[0][1] != "unload"]
    assert sorted(len(fn.targets) for fn in stops) == [1, 2, 2]  # Stop; Undo button + icon; Clear + icon
    for fn in stops:
        (cancelling,) = [f for f in functions if f.is_cancel_function and f.targets == fn.targets]
        assert set(cancelling.cancels) >= answers
    after_stop = {fn.name for fn in functions if fn.trigger_after in {stop._id for stop in stops}}
    assert after_stop == {"undo_turn", "<lambda>"}


def test_stop_ends_the_reply_in_the_engine_and_it_no_longer_updates_the_chat(
    engine: ChatEngine, engine_log: EngineLog
) -> None:
    """Stop aborts the reply in the engine at once (not when Gradio next resumes the answer event), and
    after Stop / Undo / Clear the chat belongs to them: the answer event yields nothing that changes it
    (Gradio would deliver it, and repeat the event's last output on completion, after their update)."""
    answer, stop = page_handlers(build_ui(engine, ServerSettings(), INFO))
    request = gr.Request(session_hash="page-under-test")
    session = page_session(request)
    updates = answer([{"role": "user", "content": "请介绍一下你自己"}], "", 200, 0.8, 0.8, 1, request)
    chat, _ = next(updates)
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"]
    running = engine._by_session[session]  # the transformers engine's own record of the reply
    wait_until(lambda: running.generated >= 5)  # text the answer event has not shown yet is waiting
    stop(request)
    reason, tokens = engine_log.reply_end(session, timeout_s=60)  # while the answer event is still paused
    assert (reason, tokens < 200) == ("abort", True)
    rest = list(updates)
    assert rest == [(gr.skip(), gr.skip())]  # no update: the chat stays as Stop / Undo / Clear left it


def test_the_reply_length_fits_the_engines_session(engine: ChatEngine) -> None:
    demo = build_ui(engine, ServerSettings(), INFO)
    (slider,) = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "Max new tokens"]
    # Up to what the session leaves a short question; by default half of it, the other half the chat's.
    assert (slider.maximum, slider.value) == (SESSION_LEN - 32, SESSION_LEN // 2)  # not 2048 / 1024
    default = inspect.signature(api_function(demo)).parameters["max_new_tokens"].default
    assert default == SESSION_LEN // 2
    assert GenerationParams().max_new_tokens > SESSION_LEN  # what the defaults would have been


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"system_prompt": None}, "system_prompt must be text"),
        ({"message": None}, "the message must be text"),
        ({"history": "hello"}, "must be a list"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"max_new_tokens": SESSION_LEN}, f"max_new_tokens must be at most {SESSION_LEN - 32} here"),
        ({"max_new_tokens": SESSION_LEN - 31}, f"at most {SESSION_LEN - 32} here .* got {SESSION_LEN - 31}"),
        ({"temperature": 5.0}, "temperature must be between"),
        ({"top_p": 0.0}, "top_p must be between"),
        ({"top_k": 0}, "top_k must be between"),
        ({"max_new_tokens": 4096}, "max_new_tokens must be between"),
        ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer"),
        ({"history": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"message": "   "}, "Type a message first"),
    ],
)
def test_chat_api_refuses_bad_values_with_a_message(engine: ChatEngine, bad: dict, message: str) -> None:
    chat = api_function(build_ui(engine, ServerSettings(), INFO))
    with pytest.raises(gr.Error, match=message):
        list(chat(**{"message": "hi", **bad}))


def test_a_failure_while_streaming_is_shown_as_a_gradio_error(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, engine_log: EngineLog
) -> None:
    engine = TransformersEngine(tiny_model_dir, EngineSettings(backend="transformers", max_batch_size=2))

    def broken_prefill(*args: object) -> None:
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(engine, "_prefill", broken_prefill)
    try:
        chat = api_function(build_ui(engine, ServerSettings(), INFO))
        with pytest.raises(gr.Error, match=r"the server failed to answer \(request \w+\)") as caught:
            list(chat("你是谁？", do_sample=False))
        assert "injected" not in caught.value.message  # no internal text for the user: it is in the log
        request_id = caught.value.message.split("(request ")[1].split(")")[0]
        assert engine_log.wait_for(f"(?s)request {request_id}: failed to answer\n.*injected prefill", 1.0)
    finally:
        engine.close()


def test_launch_options_serve_more_streams_than_gradios_default_40_threads(rambling_model_dir: Path) -> None:
    """Every one of 44 streams (> Gradio's default ``max_threads`` of 40) is generating at the same time."""
    streams = 44
    engine = TransformersEngine(
        rambling_model_dir, EngineSettings(backend="transformers", session_len=512, max_batch_size=streams)
    )
    settings = ServerSettings(port=free_port())
    demo = build_ui(engine, settings, INFO)
    options = launch_options(engine, settings, demo)
    assert options["max_threads"] == streams + UI_THREADS
    try:
        demo.launch(**options, prevent_thread_lock=True, quiet=True)
        # one client (session) per stream: a session has one reply at a time
        clients = [Client(f"http://127.0.0.1:{settings.port}/", verbose=False) for _ in range(streams)]
        jobs = [
            client.submit(f"question {i}", max_new_tokens=400, do_sample=False, api_name="/chat")
            for i, client in enumerate(clients)
        ]
        first: dict[int, float] = {}
        done: dict[int, float] = {}
        deadline = time.monotonic() + 300
        while len(done) < streams and time.monotonic() < deadline:
            now = time.monotonic()
            for i, job in enumerate(jobs):
                if i not in first and job.outputs():
                    first[i] = now
                if i not in done and job.done():
                    done[i] = now
            time.sleep(0.02)
        assert len(done) == streams, f"only {len(done)} of {streams} replies finished"
        assert all(job.exception() is None for job in jobs)
        assert len(first) == streams
        # With 40 threads, 4 streams would only start once others had ended.
        assert max(first.values()) < min(done.values()), "not every stream was generating at once"
        for client in clients:
            client.close()
    finally:
        demo.close()
        engine.close()

