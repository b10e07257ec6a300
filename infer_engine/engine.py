"""The one engine interface the app uses, and the choice between its two backends.

    engine = create_engine(model_dir, EngineSettings())
    stream = engine.stream_chat(messages, GenerationParams(), session_id="page-42")
    for delta in stream: ...          # text pieces as they are decoded
    engine.abort("page-42")           # Stop button / tab closed: the generation really ends
    engine.close()

Both backends resend the whole transcript each turn (LMDeploy 0.18 is stateless) and trim it by tokens, oldest
turns first, so that prompt + ``max_new_tokens`` fit ``session_len``; ``ChatStream.dropped_messages`` tells
the UI. Bad input raises ``ChatInputError`` from ``stream_chat`` itself, before anything is queued.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from infer_engine.chat_format import (
    ChatInputError,
    Message,
    TrimmedPrompt,
    normalise_messages,
    trim_messages,
)
from infer_engine.model_source import read_json_object
from infer_engine.settings import (
    MIN_PROMPT_TOKENS,
    EngineSettings,
    GenerationParams,
    SettingsError,
    reply_token_limit,
)

__all__ = [
    "ChatEngine",
    "ChatInputError",
    "ChatStream",
    "GenerationError",
    "Message",
    "Update",
    "create_engine",
    "lmdeploy_available",
    "lmdeploy_unavailable",
    "pick_backend",
    "prepare_prompt",
]


class GenerationError(RuntimeError):
    """The backend failed while generating one reply; other sessions and the engine keep working."""


@dataclass(frozen=True)
class Update:
    """One step of a reply as a backend reports it.

    Args:
        text: new text since the previous update ("" when none).
        completion_tokens: tokens generated so far (the stop token not counted).
        finish_reason: ``stop``, ``length`` or ``abort`` on the last update, None before.
    """

    text: str
    completion_tokens: int
    finish_reason: str | None = None


def _nothing() -> None:
    return None


@dataclass(eq=False)
class ChatStream:
    """One reply being generated: iterate it for text deltas; the counters fill in as it runs.

    Iterating raises ``GenerationError`` if the backend fails on this reply. ``close()`` (and the iterator
    being closed, e.g. by Gradio on Stop / tab close) aborts the generation, even before iteration started.

    Args:
        updates: the backend's generator of ``Update``s for this reply; it raises ``GenerationError``.
        prompt_tokens: tokens in the (trimmed) prompt.
        dropped_messages: how many of the oldest messages were dropped to fit ``session_len``.
        cancel: the backend's abort for this very reply (idempotent).
    """

    updates: Generator[Update, None, None] = field(repr=False)
    prompt_tokens: int
    dropped_messages: int = 0
    cancel: Callable[[], None] = field(default=_nothing, repr=False)
    completion_tokens: int = field(default=0, init=False)
    finish_reason: str | None = field(default=None, init=False)  # stop, length, abort or error once ended

    def __post_init__(self) -> None:
        self._deltas = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def _run(self) -> Generator[str, None, None]:
        try:
            for update in self.updates:
                self.completion_tokens = update.completion_tokens
                self.finish_reason = update.finish_reason or self.finish_reason
                if update.text:
                    yield update.text
        except GenerationError:
            self.finish_reason = "error"
            raise
        finally:
            self._end()

    def _end(self) -> None:
        self.updates.close()
        self.cancel()  # a no-op once the backend has finished; before that it aborts the reply
        if self.finish_reason is None:
            self.finish_reason = "abort"

    def close(self) -> None:
        """Stop consuming: aborts the generation if it is still running (a no-op once it has finished)."""
        self._deltas.close()
        self._end()  # also when iteration never started (closing the unstarted generator runs no finally)


class ChatEngine(Protocol):
    """What the app needs from a backend."""

    name: str
    settings: EngineSettings  # what it was built with (``session_len`` bounds a reply's ``max_new_tokens``)
    max_concurrency: int  # requests the backend really decodes at once: the UI queue's concurrency

    def stream_chat(
        self, messages: Sequence[Message], params: GenerationParams, session_id: str
    ) -> ChatStream:
        """Start a reply to ``messages`` (last one from the user) for the page ``session_id``; a new reply for
        the same page aborts the one still running. Raises ``ChatInputError`` for a malformed or too long
        conversation and ``SettingsError`` when ``params`` is not a ``GenerationParams``."""
        ...

    def fit_prompt(self, messages: Sequence[Message], params: GenerationParams) -> TrimmedPrompt:
        """Check and trim ``messages`` as ``stream_chat`` will, starting nothing: the page refuses a question
        that cannot be answered before it enters the chat. Raises as ``stream_chat``."""
        ...

    def abort(self, session_id: str) -> None:
        """Stop the reply now being generated for ``session_id``, if any."""
        ...

    def close(self) -> None:
        """Stop everything and free the model."""
        ...


def prepare_prompt(
    tokenizer: Any, messages: Sequence[Message], params: GenerationParams, session_len: int
) -> TrimmedPrompt:
    """What every backend does before queueing a reply: check ``params`` and the conversation, and trim it
    (oldest turns first) to prompt ids that leave ``params.max_new_tokens`` of ``session_len`` for the reply.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        messages: the conversation; the last message is the user's.
        params: sampling values for the reply (must be a ``GenerationParams``).
        session_len: most tokens of prompt + reply.
    """
    if not isinstance(params, GenerationParams):
        raise SettingsError(f"params must be GenerationParams, got {type(params).__name__}")
    most = reply_token_limit(session_len)
    if params.max_new_tokens > most:
        raise SettingsError(f"max_new_tokens must be at most {most} here (a session of {session_len} tokens "
                            f"keeps {MIN_PROMPT_TOKENS} for the prompt), got {params.max_new_tokens}")
    return trim_messages(tokenizer, normalise_messages(messages), params.max_new_tokens, session_len)


def lmdeploy_unavailable() -> str | None:
    """Why LMDeploy's TurboMind cannot serve here (no CUDA GPU, not installed, its native module fails to
    load); None when it can."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        from lmdeploy import turbomind

        return None if turbomind.is_available() else "LMDeploy's TurboMind native module is not available"
    except Exception as exc:  # an import error anywhere in LMDeploy's large tree means "not available"
        logger.info("LMDeploy unavailable: {}", exc)
        return f"LMDeploy does not import ({type(exc).__name__}: {exc})"


def lmdeploy_available() -> bool:
    """True only when a CUDA GPU is visible and LMDeploy's TurboMind native module really imports."""
    return lmdeploy_unavailable() is None


def pick_backend(settings: EngineSettings) -> str:
    """Resolve ``settings.backend`` (``auto`` included) to ``lmdeploy`` or ``transformers``.

    Args:
        settings: the validated engine settings.
    """
    if settings.backend != "auto":
        return settings.backend
    return "lmdeploy" if lmdeploy_available() else "transformers"


def model_context_length(model_dir: Path) -> int | None:
    """The positions a model was made for (config.json's ``max_position_embeddings``), if it says.

    Args:
        model_dir: a Hugging Face model directory.
    """
    value = read_json_object(model_dir / "config.json").get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def create_engine(model_dir: Path, settings: EngineSettings) -> ChatEngine:
    """Build the backend that ``settings`` asks for on the model in ``model_dir``.

    Args:
        model_dir: a complete Hugging Face model directory (weights, tokenizer, chat template).
        settings: the validated engine settings.
    """
    backend = pick_backend(settings)
    logger.info("engine backend: {} (requested {})", backend, settings.backend)
    trained = model_context_length(model_dir)
    if trained is not None and settings.session_len > trained:
        logger.warning("SESSION_LEN={} is longer than the {} positions model {} was made for: a long "
                       "conversation may turn to nonsense before it is cut", settings.session_len, trained,
                       model_dir.name)
    if backend == "lmdeploy":
        from infer_engine.lmdeploy_engine import LMDeployEngine

        return LMDeployEngine(model_dir, settings)
    from infer_engine.hf_engine import TransformersEngine

    return TransformersEngine(model_dir, settings)
