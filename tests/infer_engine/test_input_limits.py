"""Every text a request carries is checked before any work: lone surrogates (which JSON can carry and
tokenizers reject with a ``TypeError``), one message's size, and a history's length and total size.

Run: .venv/bin/python -m pytest tests/infer_engine/test_input_limits.py -q
"""

from __future__ import annotations

from typing import Any

import pytest

from infer_engine.chat_format import ChatInputError, encode_chat, normalise_messages, plain_messages
from infer_engine.history import append_user, retry, undo, with_system_prompt
from infer_engine.settings import MAX_HISTORY_CHARS, MAX_MESSAGE_CHARS, MAX_MESSAGES


def user(text: Any) -> dict:
    return {"role": "user", "content": text}


def assistant(text: Any) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("text", ["\ud800", "hi \udfff there", "a\ud83d"])  # lone high/low halves
def test_a_lone_surrogate_is_a_clear_input_error_not_a_type_error(tokenizer: Any, text: str) -> None:
    with pytest.raises(TypeError):  # what reached the tokenizer before
        tokenizer.encode(text)
    for check in (
        lambda: plain_messages([user(text)]),
        lambda: plain_messages([user([{"type": "text", "text": text}])]),
        lambda: append_user([], text),
        lambda: with_system_prompt([user("hi")], text),
    ):
        with pytest.raises(ChatInputError, match=r"invalid character \(a lone surrogate, U\+D[89A-F]"):
            check()


def test_text_that_only_looks_odd_is_accepted(tokenizer: Any) -> None:
    odd = "\x00NUL \u202eRTL override\u200f mark \U0001f600 emoji \ufeff bom"
    ids = encode_chat(tokenizer, normalise_messages([user(odd)]))
    assert odd in tokenizer.decode(ids)


def test_history_length_and_size_are_capped_on_every_history_event() -> None:
    too_many = [user("q"), assistant("a")] * (MAX_MESSAGES // 2) + [user("q")]
    big = MAX_MESSAGE_CHARS - 1
    too_big = [user("q" * big), assistant("a" * big)] * (MAX_HISTORY_CHARS // (2 * big) + 1)
    for history, match in ((too_many, "too many messages"), (too_big, "the conversation is too long")):
        for event in (plain_messages, lambda h: retry(plain_messages(h)), lambda h: undo(plain_messages(h))):
            with pytest.raises(ChatInputError, match=match):
                event(history)
    fits = too_big[: MAX_HISTORY_CHARS // big]  # just under the limit
    plain_messages(fits)
    with pytest.raises(ChatInputError, match="the conversation is too long"):
        append_user(fits, "q" * big)  # the new message tips it over
    with pytest.raises(ChatInputError, match="too long"):
        append_user([], "q" * (MAX_MESSAGE_CHARS + 1))
    with pytest.raises(ChatInputError, match="too long"):
        with_system_prompt([], "s" * (MAX_MESSAGE_CHARS + 1))


def test_huge_part_lists_and_odd_roles_are_refused_briefly() -> None:
    with pytest.raises(ChatInputError, match="too many parts"):
        plain_messages([user(["x"] * (MAX_MESSAGES + 1))])
    with pytest.raises(ChatInputError, match="role must be one of") as caught:
        plain_messages([{"role": "r" * 100_000, "content": "x"}])
    assert len(str(caught.value)) < 100  # the error does not echo a huge value back
    with pytest.raises(ChatInputError, match="role must be one of"):
        plain_messages([{"role": ["user"], "content": "x"}])
