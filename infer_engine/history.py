"""Pure operations on a chat history of plain ``{"role", "content": str}`` messages (used by the UI and
the ``/chat`` API). ``chat_format.plain_messages`` turns a Gradio 6 Chatbot value (content as a list of parts,
extra ``metadata``/``options`` keys) or an API history into that form; bad input raises ``ChatInputError``
with a message for the user.

    history = append_user(plain_messages(chatbot_value), "你是谁？")
    history, question = retry(history)      # drop the last answer, to generate it again
    history, question = undo(history)       # drop the last turn, put the question back in the textbox
"""

from __future__ import annotations

from collections.abc import Sequence

from infer_engine.chat_format import ChatInputError, Message, check_history_size, checked_text


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
    if not checked_text(text, "the message").strip():
        raise ChatInputError("Type a message first.")
    if needs_answer(history):
        history = [*history, {"role": "assistant", "content": ""}]
    history = [*history, {"role": "user", "content": text}]
    check_history_size(history)
    return history


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
    if not checked_text(system_prompt, "system_prompt").strip():
        return list(history)
    if any(m["role"] == "system" for m in history):
        raise ChatInputError("Give the system prompt either in the history or as system_prompt, not both.")
    return [{"role": "system", "content": system_prompt}, *history]
