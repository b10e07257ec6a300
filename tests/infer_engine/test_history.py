"""History operations behind Retry, Undo and the ``/chat`` API, on Gradio 6's shapes (plain and parts, made
plain by ``chat_format.plain_messages``, whose own checks are in test_chat_format.py)."""

from __future__ import annotations

import pytest

from infer_engine.chat_format import plain_messages
from infer_engine.engine import ChatInputError
from infer_engine.history import append_user, needs_answer, retry, undo, with_system_prompt


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


def test_append_user_adds_the_question() -> None:
    assert append_user(HISTORY, "再见") == [*HISTORY, {"role": "user", "content": "再见"}]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_append_user_refuses_a_blank_message(text: str) -> None:
    with pytest.raises(ChatInputError, match="Type a message first"):
        append_user(HISTORY, text)


@pytest.mark.parametrize("text", [None, 42, ["hi"]])
def test_append_user_refuses_a_message_that_is_not_text(text: object) -> None:
    with pytest.raises(ChatInputError, match="the message must be text"):
        append_user(HISTORY, text)  # type: ignore[arg-type]


def test_append_user_after_an_unanswered_question_keeps_turns_alternating() -> None:
    stopped = [*HISTORY, {"role": "user", "content": "讲个故事"}]  # Stop came before the first token
    assert append_user(stopped, "算了") == [
        *stopped,
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "算了"},
    ]


def test_retry_drops_the_last_answer_and_returns_its_question() -> None:
    history, question = retry(plain_messages(CHATBOT_VALUE))
    assert history == HISTORY[:3]
    assert question == "你可以做什么？"
    assert needs_answer(history)


def test_retry_of_an_unanswered_question_keeps_it() -> None:
    history, question = retry(HISTORY[:3])
    assert (history, question) == (HISTORY[:3], "你可以做什么？")


def test_undo_removes_the_last_turn_and_returns_the_question_for_the_textbox() -> None:
    history, question = undo(plain_messages(CHATBOT_VALUE))
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


@pytest.mark.parametrize("system_prompt", [None, 3, ["x"]])
def test_a_system_prompt_that_is_not_text_is_refused(system_prompt: object) -> None:
    with pytest.raises(ChatInputError, match="system_prompt must be text"):
        with_system_prompt(HISTORY, system_prompt)  # type: ignore[arg-type]
