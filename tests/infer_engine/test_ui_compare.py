"""The compare view ("Before" / "After", ``COMPARE_MODEL_SOURCE``) in process, on two real transformers
engines: one question goes to both, each chat keeps its own answers (and sends them back to its own model),
Stop aborts the reply in both engines, Retry / Undo / Clear act on both chats, one page's Stop leaves another
page's replies alone, and two TurboMind engines split the KV-cache memory that one would take.

Run: .venv/bin/python -m pytest tests/infer_engine/test_ui_compare.py -q
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pytest
from log_capture import EngineLog
from recording_engine import RecordingEngine

from infer_engine.engine import ChatEngine, create_engine
from infer_engine.lmdeploy_engine import one_card_settings, turbomind_config
from infer_engine.settings import EngineSettings, GenerationParams, ServerSettings, SettingsError
from infer_engine.ui import GENERATION_POOL, Comparison, ModelInfo, build_ui, page_session

AFTER = ModelInfo(name="UbUb", source="test")
BEFORE = ModelInfo(name="base", source="test base")
SETTINGS = EngineSettings(backend="transformers", session_len=512)
GREEDY = {"system_prompt": "", "max_new_tokens": 24, "temperature": 0.8, "top_p": 0.8, "top_k": 1}
LONG = {**GREEDY, "max_new_tokens": 400}


def engine_on(model_dir: Path) -> Iterator[ChatEngine]:
    engine = create_engine(model_dir, SETTINGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tuned(tiny_model_dir: Path) -> Iterator[ChatEngine]:
    """The demo model: the "After" side, whose greedy answers end by themselves."""
    yield from engine_on(tiny_model_dir)


@pytest.fixture(scope="module")
def base(rambling_model_dir: Path) -> Iterator[ChatEngine]:
    """Random weights: the "Before" side, a model that answers differently."""
    yield from engine_on(rambling_model_dir)


@pytest.fixture(scope="module")
def slow_pair(slow_rambling_model_dir: Path) -> Iterator[tuple[ChatEngine, ChatEngine]]:
    """Two engines whose greedy replies run long and slowly: replies to stop midway."""
    after = create_engine(slow_rambling_model_dir, SETTINGS)
    before = create_engine(slow_rambling_model_dir, SETTINGS)
    yield after, before
    after.close()
    before.close()


def handlers(demo: gr.Blocks) -> dict[str, Callable]:
    """The page's event functions by name (``answer_side_by_side``: the answer event of both chats)."""
    return {fn.name: fn.fn for fn in demo.fns.values()}


def last_chats(updates: Iterator) -> tuple[list, list]:
    """The "Before" and "After" chats as the answer event leaves them (the last update that sets each)."""
    chats = list(updates)
    before = [update[0] for update in chats if update[0] != gr.skip()]
    after = [update[2] for update in chats if update[2] != gr.skip()]
    return before[-1], after[-1]


def own_answer(engine: ChatEngine, messages: list[dict]) -> str:
    """What ``engine`` answers greedily to ``messages`` by itself, with the page's greedy values."""
    params = GenerationParams(max_new_tokens=GREEDY["max_new_tokens"], top_k=1)
    return "".join(engine.stream_chat(messages, params, "own-answer"))


def test_one_question_goes_to_both_models_and_each_chat_keeps_its_own_answers(
    tuned: ChatEngine, base: ChatEngine
) -> None:
    after, before = RecordingEngine(tuned), RecordingEngine(base)
    page = handlers(build_ui(after, ServerSettings(), AFTER, compare=Comparison(before, BEFORE)))
    request = gr.Request(session_hash="page-compare")
    before_chat, after_chat, textbox = page["add_question"]([], [], "你是谁？", "", 48)
    question = [{"role": "user", "content": "你是谁？"}]
    assert (before_chat, after_chat, textbox) == (question, question, "")
    answer = page["answer_side_by_side"]
    before_chat, after_chat = last_chats(answer(before_chat, after_chat, *GREEDY.values(), request))
    before_text, after_text = before_chat[-1]["content"], after_chat[-1]["content"]
    assert after_text == own_answer(tuned, question) and "UbUb" in after_text
    assert before_text == own_answer(base, question)
    assert before_text != after_text

    # The next question: each model gets its own history back, never the other's answers.
    before_chat, after_chat, _ = page["add_question"](before_chat, after_chat, "你可以做什么？", "", 48)
    last_chats(answer(before_chat, after_chat, *GREEDY.values(), request))
    sent_to_base, sent_to_tuned = before.asked[-1][0], after.asked[-1][0]
    assert sent_to_base[1] == {"role": "assistant", "content": before_text}
    assert sent_to_tuned[1] == {"role": "assistant", "content": after_text}


def test_retry_undo_and_clear_act_on_both_chats(tuned: ChatEngine, base: ChatEngine) -> None:
    demo = build_ui(tuned, ServerSettings(), AFTER, compare=Comparison(base, BEFORE))
    page = handlers(demo)
    turn = [{"role": "user", "content": "hi"}]
    before_chat = [*turn, {"role": "assistant", "content": "b1"}, {"role": "user", "content": "q2"}]
    after_chat = [*turn, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    before_chat.append({"role": "assistant", "content": "b2"})
    after_chat.append({"role": "assistant", "content": "a2"})
    assert page["drop_answer"](before_chat, after_chat) == (before_chat[:3], after_chat[:3])
    assert page["undo_turn"](before_chat, after_chat) == (before_chat[:2], "", after_chat[:2], "", "q2")
    # Clear empties both chats and notices; Retry, Undo and Clear answer the buttons and both chats' icons.
    functions = list(demo.fns.values())
    (clear,) = [fn for fn in functions if fn.name == "<lambda>"]
    assert clear.fn() == ([], "", [], "")
    boxes = {"chatbot", "notice", "chatbot-before", "notice-before"}
    assert {block.elem_id for block in clear.outputs} == boxes
    both = {"chatbot", "chatbot-before"}

    def icon_chats(fn: object, icon: str) -> set[str]:
        return {demo.blocks[target].elem_id for target, event in fn.targets if event == icon}

    (drop,) = [fn for fn in functions if fn.name == "drop_answer"]
    assert {block.elem_id for block in drop.inputs} == both
    # Retry (the button or either chat's icon) ends the reply still running on the server first, then drops
    # the answer; the new one runs once the old event is over (trigger mode "always_last").
    (replacing,) = [fn for fn in functions if fn.name == "replace_reply" and icon_chats(fn, "retry")]
    assert icon_chats(replacing, "retry") == both
    (undo,) = [fn for fn in functions if fn.name == "undo_turn"]
    assert {block.elem_id for block in undo.inputs} == both
    assert {block.elem_id for block in undo.outputs} == boxes | {"msg"}  # a stale notice goes too
    # One event answers in both chats, on the generation pool; Stop, Undo and Clear cancel it.
    answers = [fn for fn in functions if fn.name == "answer_side_by_side"]
    assert len(answers) == 2 and {fn.concurrency_id for fn in answers} == {GENERATION_POOL}
    assert {fn.trigger_mode for fn in answers} == {"always_last"}
    for fn in answers:
        assert [block.elem_id for block in fn.inputs[:2]] == ["chatbot-before", "chatbot"]
        assert [block.elem_id for block in fn.outputs] == [
            "chatbot-before", "notice-before", "chatbot", "notice"
        ]
    stops = [fn for fn in functions if fn.name == "stop_reply" and fn.targets[0][1] != "unload"]
    assert sorted(len(fn.targets) for fn in stops) == [1, 3, 3]  # Stop; Undo + 2 icons; Clear + 2 icons
    icons = [icon_chats(fn, "undo") | icon_chats(fn, "clear") for fn in stops if len(fn.targets) == 3]
    assert icons == [both, both]
    for fn in stops:
        (cancelling,) = [f for f in functions if f.is_cancel_function and f.targets == fn.targets]
        assert set(cancelling.cancels) >= {fn._id for fn in answers}


def wait_for_ends(log: EngineLog, session: str, count: int, timeout_s: float = 120.0) -> list[str]:
    """The finish reasons of ``count`` replies of ``session`` as the engines logged them (one line each, from
    the decoder thread that really ended it), waiting for them."""
    pattern = re.compile(rf"^session {re.escape(session)} request \d+: (\w+) \(")
    deadline = time.monotonic() + timeout_s
    while len(ends := [m[1] for m in map(pattern.search, list(log.messages)) if m]) < count:
        assert time.monotonic() < deadline, f"{len(ends)} of {count} replies of {session} ended: {ends}"
        time.sleep(0.01)
    return ends


def wait_until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def start_both(page: dict[str, Callable], session_hash: str) -> Iterator:
    """Start the side-by-side answer to a long reply on the page ``session_hash``; wait for a first text."""
    chats = page["add_question"]([], [], "请介绍一下你自己", "", 48)[:2]
    updates = page["answer_side_by_side"](*chats, *LONG.values(), gr.Request(session_hash=session_hash))
    assert any(chat != gr.skip() and chat[-1]["content"] for chat in next(updates)[::2])
    return updates


def test_stop_aborts_the_reply_in_both_engines_and_leaves_other_pages_alone(
    slow_pair: tuple[ChatEngine, ChatEngine], engine_log: EngineLog
) -> None:
    after, before = slow_pair
    page = handlers(build_ui(after, ServerSettings(), AFTER, compare=Comparison(before, BEFORE)))
    other_updates = start_both(page, "page-other")
    updates = start_both(page, "page-stopping")
    session = page_session(gr.Request(session_hash="page-stopping"))
    wait_until(lambda: all(session in engine._by_session for engine in (before, after)))
    running = [engine._by_session[session] for engine in (before, after)]  # the engines' own records
    wait_until(lambda: all(request.generated >= 2 for request in running))
    page["stop_reply"](gr.Request(session_hash="page-stopping"))
    # Both engines end the page's reply at once, while its answer event is still paused.
    assert wait_for_ends(engine_log, session, 2) == ["abort", "abort"]
    assert all(request.generated < LONG["max_new_tokens"] for request in running)
    # No update after Stop: the chats stay as Stop / Undo / Clear left them (text on its way is dropped).
    assert list(updates) == [(gr.skip(),) * 4]
    # The other page's replies ran to their end on both sides.
    other_before, other_after = last_chats(other_updates)
    assert other_before[-1]["content"] and other_after[-1]["content"]
    other = page_session(gr.Request(session_hash="page-other"))
    assert wait_for_ends(engine_log, other, 2) == ["length", "length"]


def test_two_turbomind_engines_share_the_kv_cache_memory_of_one() -> None:
    """TurboMind takes ``cache_max_entry_count`` of the memory free when each engine opens: opened one after
    the other, the two caches together take what one engine's took, in equal parts."""
    for share in (0.5, 0.8, 0.9, 0.99):
        one = EngineSettings(backend="lmdeploy", cache_max_entry_count=share, max_batch_size=4)
        first, second = one_card_settings(one, 2)
        free = 80.0  # GiB free before the first cache (any amount: the shares are relative)
        taken_first = first.cache_max_entry_count * free
        taken_second = second.cache_max_entry_count * (free - taken_first)
        assert taken_first == pytest.approx(taken_second) == pytest.approx(share * free / 2)
        for settings in (first, second):  # LMDeploy's own config takes them; everything else is unchanged
            config = turbomind_config(settings)
            assert 0 < config.cache_max_entry_count < 1
            assert (config.max_batch_size, config.session_len) == (4, one.session_len)
    assert one_card_settings(EngineSettings(), 1) == [EngineSettings()]
    with pytest.raises(SettingsError, match="engines"):
        one_card_settings(EngineSettings(), 0)
