"""Pure operations on a chat history in Gradio 6's messages format (used by the UI and the ``/chat`` API).

Gradio 6 hands a Chatbot's value back with each ``content`` as a list of parts (``[{"type": "text", ...}]``)
plus ``metadata``/``options`` keys, even when the app returned plain strings; API callers send plain
``{"role", "content"}`` dicts. ``normalize`` turns either shape into the engine's ``Message`` dicts (in
any order: the engine checks the conversation's shape); the other functions take that form. Bad input
raises ``ChatInputError`` with a message for the user.

    history = append_user(normalize(chatbot_value), "你是谁？")
    history, question = retry(history)      # drop the last answer, to generate it again
    history, question = undo(history)       # drop the last turn, put the question back in the textbox
"""

from __future__ import annotations

from collections.abc import Sequence

# One parser for message content (str or Gradio's parts list) in the package: chat_format owns it.
from infer_engine.chat_format import ROLES, _content_text
from infer_engine.engine import ChatInputError, Message


def normalize(history: Sequence[object] | None) -> list[Message]:
    """Turn a Chatbot value or an API history into plain ``{"role", "content": str}`` messages.

    Args:
        history: dicts with ``role`` and ``content`` (extra keys such as ``metadata`` are ignored);
            None means an empty history.
    """
    if history is None:
        return []
    if isinstance(history, str | bytes) or not isinstance(history, Sequence):
        raise ChatInputError("history must be a list of {role, content} messages")
    messages = []
    for i, item in enumerate(history):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ChatInputError(f"history[{i}] must be a dict with 'role' and 'content', got {item!r}")
        if item["role"] not in ROLES:
            raise ChatInputError(f"history[{i}] has role {item['role']!r}; use one of {', '.join(ROLES)}")
        messages.append({"role": item["role"], "content": _content_text(item["content"], f"history[{i}]")})
    return messages


def needs_answer(history: Sequence[Message]) -> bool:
    """True when the history ends with a question that has no answer yet.

    Args:
        history: the normalised history.
    """
    return bool(history) and history[-1]["role"] == "user"


def append_user(history: Sequence[Message], text: str) -> list[Message]:
    """Add the user's new question to the history.

    A question left without an answer (stopped before its first token) first gets an empty answer, so that
    turns keep alternating as the chat format requires and that question is still sent, not lost.

    Args:
        history: the normalised history.
        text: what the user typed; must contain more than whitespace.
    """
    if not isinstance(text, str) or not text.strip():
        raise ChatInputError("Type a message first.")
    if needs_answer(history):
        history = [*history, {"role": "assistant", "content": ""}]
    return [*history, {"role": "user", "content": text}]


def _last_question(history: Sequence[Message], action: str) -> int:
    for i in range(len(history) - 1, -1, -1):
        if history[i]["role"] == "user":
            return i
    raise ChatInputError(f"There is no question to {action} yet.")


def retry(history: Sequence[Message]) -> tuple[list[Message], str]:
    """Drop the answer to the last question so that it can be generated again.

    Returns the history ending with that question, and the question.

    Args:
        history: the normalised history.
    """
    last = _last_question(history, "retry")
    return list(history[: last + 1]), history[last]["content"]


def undo(history: Sequence[Message]) -> tuple[list[Message], str]:
    """Remove the last turn (the last question and its answer).

    Returns the shorter history, and the question to put back in the textbox.

    Args:
        history: the normalised history.
    """
    last = _last_question(history, "undo")
    return list(history[:last]), history[last]["content"]


def with_system_prompt(history: Sequence[Message], system_prompt: str) -> list[Message]:
    """The conversation sent to the engine: the system prompt (if any) first, then the history.

    Args:
        history: the normalised history; it may hold a system message only if ``system_prompt`` is blank.
        system_prompt: instructions for the model; blank means none.
    """
    if not system_prompt.strip():
        return list(history)
    if any(m["role"] == "system" for m in history):
        raise ChatInputError("Give the system prompt either in the history or as system_prompt, not both.")
    return [{"role": "system", "content": system_prompt}, *history]
