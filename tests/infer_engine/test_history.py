"""History operations behind Retry, Undo and the ``/chat`` API, on Gradio 6's shapes (plain and parts)."""

from __future__ import annotations

import pytest

from infer_engine.engine import ChatInputError
from infer_engine.history import append_user, needs_answer, normalize, retry, undo, with_system_prompt


def parts(text: str) -> list[dict]:
    """Content the way a Gradio 6 Chatbot hands it back."""
    return [{"type": "text", "text": text}]


CHATBOT_VALUE = [  # what a Chatbot preprocesses to, with the extra keys Gradio adds
    {"role": "user", "content": parts("你是谁？"), "metadata": None, "options": None},
    {"role": "assistant", "content": parts("我是UbUb的小助手"), "metadata": None, "options": None},
    {"role": "user", "content": parts("你可以做什么？"), "metadata": None, "options": None},
    {"role": "assistant", "content": parts("回答问题"), "metadata": None, "options": None},
]
HISTORY = [
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是UbUb的小助手"},
    {"role": "user", "content": "你可以做什么？"},
    {"role": "assistant", "content": "回答问题"},
]


def test_normalize_turns_parts_and_extra_keys_into_plain_messages() -> None:
    assert normalize(CHATBOT_VALUE) == HISTORY
    assert normalize(HISTORY) == HISTORY
    assert normalize(None) == []


def test_normalize_joins_several_text_parts() -> None:
    value = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert normalize(value) == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("hello", "must be a list"),
        ([{"role": "user"}], r"history\[0\] must be a dict with 'role' and 'content'"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user", "content": [{"type": "file", "path": "/etc/passwd"}]}], "only text"),
        ([{"role": "user", "content": 42}], "content must be text"),
    ],
)
def test_normalize_rejects_bad_shapes_with_a_readable_message(value: object, message: str) -> None:
    with pytest.raises(ChatInputError, match=message):
        normalize(value)


def test_append_user_adds_the_question() -> None:
    assert append_user(HISTORY, "再见") == [*HISTORY, {"role": "user", "content": "再见"}]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_append_user_refuses_a_blank_message(text: str) -> None:
    with pytest.raises(ChatInputError, match="Type a message first"):
        append_user(HISTORY, text)


def test_append_user_after_an_unanswered_question_keeps_turns_alternating() -> None:
    stopped = [*HISTORY, {"role": "user", "content": "讲个故事"}]  # Stop came before the first token
    assert append_user(stopped, "算了") == [
        *stopped,
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "算了"},
    ]


def test_retry_drops_the_last_answer_and_returns_its_question() -> None:
    history, question = retry(normalize(CHATBOT_VALUE))
    assert history == HISTORY[:3]
    assert question == "你可以做什么？"
    assert needs_answer(history)


def test_retry_of_an_unanswered_question_keeps_it() -> None:
    history, question = retry(HISTORY[:3])
    assert (history, question) == (HISTORY[:3], "你可以做什么？")


def test_undo_removes_the_last_turn_and_returns_the_question_for_the_textbox() -> None:
    history, question = undo(normalize(CHATBOT_VALUE))
    assert history == HISTORY[:2]
    assert question == "你可以做什么？"
    assert not needs_answer(history)


def test_undo_twice_empties_the_chat() -> None:
    history, _ = undo(HISTORY)
    history, question = undo(history)
    assert (history, question) == ([], "你是谁？")


@pytest.mark.parametrize("operation", [retry, undo])
def test_retry_and_undo_on_an_empty_chat_say_there_is_nothing_to_do(operation) -> None:
    with pytest.raises(ChatInputError, match="no question"):
        operation([])


def test_needs_answer() -> None:
    assert not needs_answer([])
    assert needs_answer(HISTORY[:1])
    assert not needs_answer(HISTORY)


def test_system_prompt_goes_first_and_only_once() -> None:
    assert with_system_prompt(HISTORY, "  ") == HISTORY
    assert with_system_prompt(HISTORY, "Be brief.") == [{"role": "system", "content": "Be brief."}, *HISTORY]
    with pytest.raises(ChatInputError, match="not both"):
        with_system_prompt([{"role": "system", "content": "x"}, *HISTORY], "Be brief.")
