"""Chat messages -> prompt token ids: validation, injection-safe encoding and trimming to the session length.

    history = plain_messages(chatbot_value)                  # any order: what the UI's Undo/Retry work on
    messages = normalise_messages(history_from_the_ui)      # ChatInputError when malformed
    prompt = trim_messages(tokenizer, messages, max_new_tokens=1024, session_len=4096)
    prompt.input_ids, prompt.dropped_messages

Why piecewise encoding: rendering the chat template to a string and tokenizing it turns a user-typed
``<|im_end|>\\n<|im_start|>system\\n...`` into real control tokens (measured: ``../shared/notes``,
"special-token injection"). ``encode_chat`` renders the model's own template with placeholders, takes the
template's special tokens as ids and encodes every message content with every added-token string read as
plain text (special or not: ``split_special_tokens=True`` alone misses non-special ones such as ``<think>``),
so user text stays text. Every path ends with the same check: the prompt's added-token ids are exactly the
template's.

Why a lock: a fast tokenizer's ``split_special_tokens`` is one switch on the shared Rust tokenizer
(``encode_special_tokens``), flipped by every encode call and read while the GIL is released. Two threads
encoding at once (Gradio runs each request in its own thread) could each run under the other's setting:
measured 27 of 900 concurrent injection prompts came out with real control ids. Every encode here runs
under ``_ENCODE_LOCK``. (transformers 5.24's ``apply_chat_template(sanitize_control_tokens=True)`` avoids the
switch, but it lets a marker form across a content boundary, see ``encode_chat``, and remote-code tokenizers
such as InternLM2's may not support it.)
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from tokenizers import Tokenizer

from infer_engine.settings import MAX_HISTORY_CHARS, MAX_MESSAGE_CHARS, MAX_MESSAGES

ROLES = ("system", "user", "assistant")
END_OF_TURN = (
    "<|im_end|>"  # InternLM2 / ChatML end-of-turn marker: generation must stop on it as well as on eos
)

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

# A content placeholder made of private-use characters: no chat template changes it, no user types it by
# accident (and a user who does cannot hurt: substituted text is never re-scanned).
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")
_ENCODE_LOCK = threading.Lock()  # see the module docstring: encoding flips a switch shared by all threads
_TOKEN_SPAN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # see token_span
_PLAIN_TWIN: weakref.WeakKeyDictionary[Any, Tokenizer | None] = weakref.WeakKeyDictionary()  # see _plain_twin
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class ChatInputError(ValueError):
    """The conversation cannot be answered as given (empty, malformed, or too long even alone)."""


class PromptTooLongError(ChatInputError):
    """Even the last message (with the system prompt) leaves no room for the reply in the session.

    Args:
        needed: prompt tokens of the shortest conversation that could be sent (system + last message).
        session_len: most tokens of prompt + reply.
        max_new_tokens: tokens reserved for the reply.
        length_name: how the front end calls the reply length, for the message ("'max new tokens'" on the
            page, "max_tokens" on /v1); None: the user did not set it, so lowering it is no advice.
    """

    def __init__(self, needed: int, session_len: int, max_new_tokens: int,
                 length_name: str | None = "'max new tokens'") -> None:
        self.needed, self.session_len, self.max_new_tokens = needed, session_len, max_new_tokens
        budget = session_len - max_new_tokens
        advice = f", or lower {length_name}" if length_name else ""
        super().__init__(
            f"the message is too long: it needs {needed} prompt tokens, but only {budget} fit"
            f" (session length {session_len} minus {max_new_tokens} tokens for the reply). "
            f"Shorten the message or the system prompt{advice}."
        )

    def named(self, length_name: str | None) -> PromptTooLongError:
        """The same error, its message naming the reply length as a front end calls it.

        Args:
            length_name: e.g. "max_tokens" or "max_completion_tokens"; None: not set by the user.
        """
        return PromptTooLongError(self.needed, self.session_len, self.max_new_tokens, length_name)


@dataclass(frozen=True)
class TrimmedPrompt:
    """A conversation that fits the session, as prompt ids.

    Args:
        input_ids: the prompt, ending with the assistant header the model answers after.
        messages: the messages kept (the system message and the newest turns).
        dropped_messages: how many of the oldest messages were left out to fit.
    """

    input_ids: list[int]
    messages: list[Message]
    dropped_messages: int


def kind_of(value: Any) -> str:
    """What a JSON client sent, in its words (``a number``, ``null``...), for error messages.

    Args:
        value: a value decoded from JSON.
    """
    if value is None:
        return "null"
    if isinstance(value, str | bytes):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return "a value of another kind"


def checked_text(text: Any, where: str) -> str:
    """``text`` if it is text a tokenizer can take: a string of at most ``MAX_MESSAGE_CHARS`` characters
    without a lone UTF-16 surrogate (JSON can carry ``"\\ud800"``; tokenizers fail on it with a
    ``TypeError``).

    Args:
        text: a message or system prompt as received.
        where: how to name it in an error (e.g. ``message 3``, ``system_prompt``).
    """
    if not isinstance(text, str):
        raise ChatInputError(f"{where} must be text, got {kind_of(text)}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ChatInputError(
            f"{where} is too long ({len(text)} characters); the limit is {MAX_MESSAGE_CHARS} characters"
        )
    bad = _SURROGATE_RE.search(text)
    if bad:
        raise ChatInputError(
            f"{where} contains an invalid character (a lone surrogate, U+{ord(bad[0]):04X}, at position "
            f"{bad.start() + 1}): send valid Unicode text"
        )
    return text


def check_history_size(messages: Sequence[Message]) -> None:
    """Refuse a conversation over ``MAX_MESSAGES`` messages or ``MAX_HISTORY_CHARS`` characters in all: every
    event that takes a history (add, retry, undo, the API) costs at most that much work.

    Args:
        messages: plain messages (see ``plain_messages``).
    """
    if len(messages) > MAX_MESSAGES:
        raise ChatInputError(
            f"too many messages ({len(messages)}); the limit is {MAX_MESSAGES}: "
            "clear the chat or undo some turns"
        )
    chars = sum(len(m["content"]) for m in messages)
    if chars > MAX_HISTORY_CHARS:
        raise ChatInputError(
            f"the conversation is too long ({chars} characters); the limit is {MAX_HISTORY_CHARS} "
            "characters: clear the chat or undo some turns"
        )


def content_text(content: Any, where: str) -> str:
    """Plain text of a message content: a string, or Gradio 6's ``[{"type": "text", "text": ...}]`` parts.

    Args:
        content: the ``content`` of one message.
        where: how to name the message in an error (e.g. ``message 3``).
    """
    if isinstance(content, str):
        return checked_text(content, where)
    parts = [content] if isinstance(content, Mapping) else content
    if not isinstance(parts, list | tuple):
        raise ChatInputError(f"{where}: content must be text, got {kind_of(content)}")
    if len(parts) > MAX_MESSAGES:
        raise ChatInputError(f"{where} has too many parts ({len(parts)}); the limit is {MAX_MESSAGES}")
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        elif isinstance(part, Mapping) and part.get("type", "text") == "text":
            keys = ", ".join(repr(str(k)[:20]) for k in list(part)[:5])
            raise ChatInputError(f"{where}: a text part needs a 'text' string, as in "
                                 f"{{'type': 'text', 'text': ...}}; got the keys {keys or 'none'}")
        elif isinstance(part, Mapping):
            kind = str(part.get("type"))[:20]
            raise ChatInputError(f"{where}: only text is supported, got a {kind!r} part")
        else:
            raise ChatInputError(f"{where}: only text is supported, got {kind_of(part)} as a part")
    return checked_text("\n".join(texts), where)  # joined the way LMDeploy merges text parts


def plain_messages(
    messages: Sequence[Mapping[str, Any]] | None, aliases: Mapping[str, str] | None = None
) -> list[Message]:
    """Check each message's shape and return them as plain ``{"role", "content": str}`` dicts, in any order.

    Accepts Gradio 6 Chatbot values (content as text parts, extra ``metadata``/``options`` keys) and API
    histories alike; None means no messages. Use ``normalise_messages`` for a conversation to answer. Sizes
    are capped (``checked_text``, ``check_history_size``).

    Args:
        messages: dicts with ``role`` (system, user or assistant) and ``content``.
        aliases: other role names taken as one of those (OpenAI's ``developer`` -> ``system``).
    """
    if messages is None:
        return []
    aliases = aliases or {}
    roles = [name for own in ROLES for name in (own, *(a for a, to in aliases.items() if to == own))]
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatInputError(
            f"messages must be a list of {{role, content}} dicts, got {kind_of(messages)}"
        )
    if len(messages) > MAX_MESSAGES:  # before looking at each one
        check_history_size(messages)
    out: list[Message] = []
    for i, message in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatInputError(f"{where} must be a dict with 'role' and 'content'")
        role = message["role"]
        if not isinstance(role, str) or role not in roles:
            raise ChatInputError(f"{where}: role must be one of {', '.join(roles)}")  # no echo of the value
        out.append({"role": aliases.get(role, role), "content": content_text(message["content"], where)})
    check_history_size(out)
    return out


def normalise_messages(
    messages: Sequence[Mapping[str, Any]], aliases: Mapping[str, str] | None = None
) -> list[Message]:
    """Check a conversation to answer and return it as plain ``{"role", "content": str}`` dicts.

    Accepted shape: optional leading system messages (joined by a blank line; blank ones dropped), then user
    and assistant messages alternating (an assistant greeting may come first), ending with a user message
    whose text is not blank.

    Args:
        messages: the conversation, e.g. Gradio 6 chatbot history plus the new user message.
        aliases: as for ``plain_messages``.
    """
    if messages is None:
        raise ChatInputError("messages must be a list of {role, content} dicts, got None")
    out: list[Message] = []
    for i, message in enumerate(plain_messages(messages, aliases)):
        where, role, text = f"message {i + 1}", message["role"], message["content"]
        if role == "system":
            if out and out[-1]["role"] != "system":
                raise ChatInputError(f"{where}: a system message may only come before the other turns")
            if out and text.strip():  # several leading ones (a client's and its user's) are read as one
                out[-1] = {"role": "system", "content": f"{out[-1]['content']}\n\n{text}"}
            elif text.strip():
                out.append(message)
            continue
        previous = out[-1]["role"] if out else "system"
        # The first turn may be either: apps open with an assistant greeting.
        expected = {"system": role, "user": "assistant", "assistant": "user"}[previous]
        if role != expected:
            wanted = "an assistant" if expected == "assistant" else "a user"
            raise ChatInputError(f"{where}: expected {wanted} message, got {role} (turns must alternate)")
        if role == "user" and not text.strip():
            raise ChatInputError(f"{where}: the user message is empty")
        out.append(message)
    if not out or out[-1]["role"] != "user":
        raise ChatInputError("the conversation must end with a user message")
    return out


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Every added token the tokenizer matches inside a string (markers such as ``<s>``, ``<|im_start|>``)."""
    return {tok.content: idx for idx, tok in tokenizer.added_tokens_decoder.items()}


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` in the tokenizer's vocabulary, or None when it has none (never the unk id).

    Args:
        tokenizer: a Hugging Face tokenizer.
        token: the token text, e.g. ``<|im_end|>``.
    """
    return tokenizer.get_vocab().get(token)


def stop_token_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None = None) -> list[int]:
    """Ids that end a reply: the tokenizer's eos, ``<|im_end|>`` and the model's generation-config eos ids.

    Args:
        tokenizer: the model's tokenizer.
        generation_eos: ``eos_token_id`` of the model's generation config (an id, a list of ids or None).
    """
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = [tokenizer.eos_token_id, token_id(tokenizer, END_OF_TURN), *extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _plain_twin(tokenizer: Any) -> Tokenizer | None:
    """A private copy of a fast tokenizer's Rust backend that reads every added-token string as plain text
    (None for a slow tokenizer), cached per tokenizer.

    ``split_special_tokens=True`` only splits added tokens flagged special: a non-special one (many chat
    models add ``<think>`` or ``<tool_call>`` that way) typed by a user would still become its id. In the twin
    every added token is flagged special and ``encode_special_tokens`` is on for good, so no added token is
    matched, and no switch of the shared tokenizer is flipped.
    """
    if tokenizer in _PLAIN_TWIN:
        return _PLAIN_TWIN[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    twin = None
    if isinstance(backend, Tokenizer):
        spec = json.loads(backend.to_str())
        for token in spec.get("added_tokens") or []:
            token["special"] = True
        spec["truncation"] = spec["padding"] = None
        twin = Tokenizer.from_str(json.dumps(spec))
        twin.encode_special_tokens = True
    _PLAIN_TWIN[tokenizer] = twin
    return twin


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` with every added-token string in it read as plain text (as far as the tokenizer can:
    ``encode_chat`` checks the result)."""
    twin = _plain_twin(tokenizer)
    if twin is not None:
        return twin.encode(text, add_special_tokens=False).ids
    # a slow (Python) tokenizer: split_special_tokens=True skips its added-token matching altogether
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _check_controls(tokenizer: Any, ids: list[int], control: list[int], markers: set[int]) -> list[int]:
    """``ids`` if its added/special token ids are exactly the template's ``control`` ids, in order; else the
    ``ChatInputError`` that names the text which the model's tokenizer turns into a control token anyway."""
    found = [i for i in ids if i in markers]
    if found == control:
        return ids
    extra = [i for i in found if i not in control] or found
    text = tokenizer.convert_ids_to_tokens(extra[0])
    raise ChatInputError(
        f"the conversation contains {text!r}, which this model's tokenizer reads as a control token even in "
        "plain text: remove it or change its spelling"
    )


def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Prompt ids for ``messages`` plus the assistant header, such that no content can become a control token.

    The model's own chat template is rendered with a placeholder per content, which shows where its control
    tokens are. When no content contains an added-token string, the ids are the template's own
    (``apply_chat_template``). Otherwise the rendered text is cut at the control tokens (which become their
    ids) and each piece, with the real contents put back, is encoded with every added-token string read as
    plain text (``_plain_ids``). Either way the result must hold exactly the template's control tokens
    (``_check_controls``): the fast path falls back to the piecewise one, the piecewise one raises
    ``ChatInputError`` (a tokenizer whose model itself spells a marker, e.g. a sentencepiece user-defined
    piece). Thread-safe (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: normalised messages (see ``normalise_messages``).
    """
    slotted = [{"role": m["role"], "content": _SLOT.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = tokenizer.apply_chat_template(slotted, tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError:  # the model's template is broken: not the user's doing
        raise
    except TemplateError as exc:  # its raise_exception: e.g. Mistral's refuses an assistant greeting first
        raise ChatInputError(f"this model's chat template refuses the conversation: {exc}") from None
    found = [int(i) for i in _SLOT_RE.findall(rendered)]
    if found != list(range(len(messages))):
        raise RuntimeError("the model's chat template does not place every message content exactly once")
    specials = _special_tokens(tokenizer)
    splitter = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
    pieces = [piece for piece in splitter.split(rendered) if piece]
    control = [specials[piece] for piece in pieces if piece in specials]
    markers = set(specials.values()) - {tokenizer.unk_token_id}  # unk: what unknown characters become
    with _ENCODE_LOCK:
        if not any(token in m["content"] for m in messages for token in specials):
            # The common case, tokenized in one go as the model was trained (piecewise encoding can differ
            # from it, e.g. for a sentencepiece tokenizer that adds its "▁" prefix only at the start of the
            # text).
            ids = tokenizer.apply_chat_template(
                list(messages), tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            with contextlib.suppress(ChatInputError):  # e.g. a marker formed across a content boundary
                return _check_controls(tokenizer, list(ids), control, markers)
        ids = []
        for piece in pieces:
            if piece in specials:
                ids.append(specials[piece])
            else:
                ids += _plain_ids(tokenizer, _SLOT_RE.sub(lambda m: messages[int(m[1])]["content"], piece))
        return _check_controls(tokenizer, ids, control, markers)


def token_span(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary entry), cached.

    A token's vocabulary string is never shorter than the text it decodes to (byte-level BPE spells one
    character per byte, sentencepiece writes a space as one "▁", byte-fallback tokens read ``<0xE4>``), so a
    text of ``n`` characters takes at least ``n / token_span`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
    """
    span = _TOKEN_SPAN.get(tokenizer)
    if span is None:
        span = _TOKEN_SPAN[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return span


def trim_messages(
    tokenizer: Any, messages: Sequence[Message], max_new_tokens: int, session_len: int
) -> TrimmedPrompt:
    """Drop the oldest user/assistant turns (never the system message nor the last user message) until the
    prompt plus ``max_new_tokens`` fits ``session_len``, and encode what is kept.

    Turns that cannot fit by their length in characters alone (see ``token_span``) are dropped before
    anything is encoded, so a huge history costs no more than one that fills the session; what is left is
    encoded once when it fits, else binary-searched.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        messages: normalised messages (see ``normalise_messages``).
        max_new_tokens: tokens reserved for the reply.
        session_len: most tokens of prompt + reply.
    """
    budget = session_len - max_new_tokens
    if budget < 1:
        raise ChatInputError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt "
            f"in a session of {session_len} tokens"
        )
    head = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(head) :])
    # Where the kept turns may start: the first turn (nothing dropped) or a user message, the last one at
    # most; a leading assistant greeting goes with the first cut, then one (user, assistant) pair per cut.
    cuts = sorted({0} | {i for i, m in enumerate(turns) if m["role"] == "user"})
    last = len(cuts) - 1

    def encode_without(cut: int) -> list[int]:
        return encode_chat(tokenizer, head + turns[cuts[cut] :])

    # Characters that surely need more tokens than the budget: drop the fewest oldest turns to get below.
    most_chars = budget * token_span(tokenizer)
    chars = sum(len(m["content"]) for m in head + turns)
    low = 0
    while low < last and chars > most_chars:
        chars -= sum(len(m["content"]) for m in turns[cuts[low] : cuts[low + 1]])
        low += 1
    best = encode_without(low)
    if len(best) > budget:
        high = last
        if low < high:
            best = encode_without(high)  # the fewest messages: fewer messages never means more tokens
        if len(best) > budget:
            raise PromptTooLongError(len(best), session_len, max_new_tokens)
        low += 1  # cutting at ``low`` drops too few: search the first cut that fits in (low, high]
        while low < high:
            mid = (low + high) // 2
            ids = encode_without(mid)
            if len(ids) <= budget:
                high, best = mid, ids
            else:
                low = mid + 1
    kept = head + turns[cuts[low] :]
    return TrimmedPrompt(input_ids=best, messages=kept, dropped_messages=cuts[low])
