"""The GPU backend: LMDeploy 0.18 TurboMind, fed our own injection-safe prompt ids.

    engine = LMDeployEngine(Path("merged"), EngineSettings(backend="lmdeploy", quant_policy=8))
    for delta in engine.stream_chat(messages, GenerationParams(), "page-1"): ...
    engine.abort("page-1"); engine.close()

Why not ``Pipeline.stream_infer``: it always passes the prompt as ``messages`` (rendered with the chat
template, then tokenized as one string, which turns user-typed ``<|im_end|>`` into control tokens), and
``AsyncEngine.preprocess`` rejects a request that has both ``messages`` and ``input_ids``. So each request
runs ``pipe.async_engine.preprocess(messages=None, input_ids=...)`` + ``generate`` on the pipeline's own event
loop (what ``stream_infer`` does inside), with one ``pipe.session()`` per request. Stop or tab close aborts
that session (TurboMind cancels in about 2 ms) and cancels the task, which also covers a request still waiting
for a free slot.

What this wrapper uses of the pipeline is exactly: ``internal_thread.loop`` / ``.thread``, ``session()`` (and
the session's ``async_abort()``), ``session_mgr.remove``, ``async_engine.preprocess`` / ``generate`` (outputs
with ``response``, ``generate_token_len``, ``finish_reason``), ``backend_config`` and ``close()``. TurboMind
needs a CUDA GPU; on CPU the tests drive this wrapper with a stand-in pipeline that has that interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loguru import logger
from transformers import AutoTokenizer
from transformers import GenerationConfig as HFGenerationConfig

from infer_engine.chat_format import Message, TrimmedPrompt, stop_token_ids
from infer_engine.engine import ChatStream, GenerationError, Update, lmdeploy_unavailable, prepare_prompt
from infer_engine.settings import EngineSettings, GenerationParams, SettingsError

_POLL_S = 0.5  # how often a waiting consumer checks that LMDeploy's event loop thread is still alive


def turbomind_config(settings: EngineSettings) -> Any:
    """LMDeploy ``TurbomindEngineConfig`` for ``settings`` (checked by us: LMDeploy takes ``tp=3`` silently).

    Args:
        settings: the validated engine settings.
    """
    from lmdeploy import TurbomindEngineConfig

    return TurbomindEngineConfig(
        session_len=settings.session_len,
        max_batch_size=settings.max_batch_size,
        cache_max_entry_count=settings.cache_max_entry_count,
        quant_policy=settings.quant_policy,
        tp=settings.tp,
        enable_prefix_caching=settings.enable_prefix_caching,
        enable_metrics=False,  # on by default in 0.18: per-step bookkeeping nobody reads here
    )


def one_card_settings(settings: EngineSettings, engines: int) -> list[EngineSettings]:
    """Settings for ``engines`` TurboMind engines opened one after another on the same GPU(s) (the compare
    view's base and tuned models), whose KV caches together take what one engine's would: each gets an equal
    part of ``settings.cache_max_entry_count`` of the memory that was free for the first one.

    TurboMind reads ``cache_max_entry_count`` as a share of the memory free when *that* engine allocates its
    cache, i.e. after the engines before it took theirs: with 0.8 and two engines, the first gets 0.4 and the
    second 0.4 / 0.6 = 0.667 of the 60 % left. The second model's weights come out of that rest too, so its
    cache is that much smaller, never larger (each share stays below 1).

    Args:
        settings: the validated engine settings for one engine alone.
        engines: how many engines share the card, in the order they are opened (1-8).
    """
    if isinstance(engines, bool) or not isinstance(engines, int) or not 1 <= engines <= 8:
        raise SettingsError(f"engines must be an integer between 1 and 8, got {engines!r}")
    part = settings.cache_max_entry_count / engines
    return [replace(settings, cache_max_entry_count=part / (1 - taken * part)) for taken in range(engines)]


def generation_config(params: GenerationParams, stop_ids: Sequence[int]) -> Any:
    """LMDeploy ``GenerationConfig`` for one reply.

    LMDeploy >= 0.6 decodes greedily unless ``do_sample=True`` (temperature and top-p are then silently
    ignored), so ``do_sample`` is always set explicitly. The reply ends on token ids (``<|im_end|>`` among
    them), never on ``stop_words``: LMDeploy resolves a stop word to every vocabulary entry that contains it
    (``Tokenizer.indexes_containing_token``), so a word would also stop the reply on any token that merely
    contains it.

    Args:
        params: the validated sampling values.
        stop_ids: token ids that end the reply (eos, ``<|im_end|>``, generation-config eos).
    """
    from lmdeploy import GenerationConfig

    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=list(stop_ids),
        skip_special_tokens=True,
    )


def check_turbomind_supports(model_dir: Path, trust_remote_code: bool) -> None:
    """Refuse (``SettingsError``) a model TurboMind does not serve (LMDeploy would use its PyTorch engine).

    Args:
        model_dir: a Hugging Face model directory.
        trust_remote_code: whether the model's own code may run (to read its config).
    """
    from lmdeploy.archs import get_model_arch
    from lmdeploy.turbomind.supported_models import is_supported

    if not is_supported(str(model_dir), trust_remote_code=trust_remote_code):
        arch, _ = get_model_arch(str(model_dir), trust_remote_code=trust_remote_code)
        raise SettingsError(
            f"LMDeploy's TurboMind does not serve this model ({arch}); LMDeploy would fall back to its "
            "PyTorch engine, which this app does not drive: use BACKEND=transformers"
        )


def check_turbomind_serves(pipe: Any) -> None:
    """Refuse (``SettingsError``) an opened pipeline that runs anything but TurboMind.

    Args:
        pipe: an opened LMDeploy pipeline.
    """
    backend = pipe.async_engine.backend
    if backend != "turbomind":
        raise SettingsError(
            f"LMDeploy serves this model with its {backend} engine, not TurboMind: use BACKEND=transformers"
        )


def open_pipeline(model_dir: Path, settings: EngineSettings) -> Any:
    """An LMDeploy TurboMind pipeline on ``model_dir``; ``SettingsError`` without a CUDA GPU and TurboMind, or
    for a model TurboMind does not serve.

    Args:
        model_dir: a Hugging Face model directory.
        settings: the validated engine settings.
    """
    why = lmdeploy_unavailable()
    if why:
        raise SettingsError(
            f"BACKEND=lmdeploy needs a CUDA GPU and LMDeploy's TurboMind, and here {why}; "
            "use BACKEND=transformers or auto"
        )
    check_turbomind_supports(model_dir, settings.trust_remote_code)
    from lmdeploy import ChatTemplateConfig, pipeline

    # Our requests carry their own ids; the 'hf' template (the tokenizer's own) is only what LMDeploy keeps
    # for anything else. 0.18 has no 'internlm2' template name.
    return pipeline(
        str(model_dir),
        backend_config=turbomind_config(settings),
        chat_template_config=ChatTemplateConfig(model_name="hf", model_path=str(model_dir)),
        trust_remote_code=settings.trust_remote_code,
    )


def _generation_eos(model_dir: Path) -> int | list[int] | None:
    """``eos_token_id`` of the model's ``generation_config.json`` (None when it has none)."""
    try:
        return HFGenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        return None


@dataclass(eq=False)
class _Request:
    """One reply in flight: its LMDeploy session and the future of its task on LMDeploy's loop.

    Args:
        session: the LMDeploy session of this request.
        future: the request's task, as a ``concurrent.futures.Future``.
        streaming: set once LMDeploy yielded an output: the request holds a batch slot, and TurboMind's
            session abort reaches it.
        aborted: set when this wrapper stopped it (Stop, replacement, close): an end without a finish reason
            is then an abort, not a failure.
    """

    session: Any
    future: Any
    streaming: bool = False
    aborted: bool = False


class LMDeployEngine:
    """LMDeploy TurboMind backend (CUDA only).

    Args:
        model_dir: a Hugging Face model directory (weights, tokenizer with chat template, generation config).
        settings: the validated engine settings.
        pipe: an LMDeploy pipeline already opened on ``model_dir`` (None: open one with ``open_pipeline``).
    """

    name = "lmdeploy"

    def __init__(self, model_dir: Path, settings: EngineSettings, pipe: Any | None = None) -> None:
        self.pipe = open_pipeline(model_dir, settings) if pipe is None else pipe
        try:
            check_turbomind_serves(self.pipe)
        except SettingsError:
            self.pipe.close()
            raise
        self.settings = settings
        self.max_concurrency = settings.max_batch_size
        trust = settings.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        self.stop_ids = stop_token_ids(self.tokenizer, _generation_eos(model_dir))
        self._loop = self.pipe.internal_thread.loop
        self._lock = threading.Lock()
        self._running: dict[str, _Request] = {}  # page session id -> its reply in flight
        self._aborting: set[asyncio.Task] = set()  # TurboMind aborts under way (touched on the loop only)
        self._closed = False
        logger.info("LMDeploy engine: {}, stop ids {}", self.pipe.backend_config, self.stop_ids)

    def fit_prompt(self, messages: Sequence[Message], params: GenerationParams) -> TrimmedPrompt:
        """Check and trim ``messages`` as ``stream_chat`` will (raises ``ChatInputError``), starting nothing.

        Args:
            messages: the conversation; the last message is the user's.
            params: sampling values for the reply (its ``max_new_tokens`` is kept free for it).
        """
        return prepare_prompt(self.tokenizer, messages, params, self.settings.session_len)

    def stream_chat(
        self, messages: Sequence[Message], params: GenerationParams, session_id: str
    ) -> ChatStream:
        """Validate and trim ``messages``, start the reply and return its stream (raises ``ChatInputError``).

        Args:
            messages: the conversation; the last message is the user's.
            params: sampling values for this reply.
            session_id: the page asking; a new reply for the same page aborts the one still running.
        """
        prompt = self.fit_prompt(messages, params)
        gen_config = generation_config(params, self.stop_ids)
        outputs: queue.Queue = queue.Queue()
        engine, ids = self.pipe.async_engine, prompt.input_ids

        async def run(request: _Request) -> None:
            try:
                prepared = await engine.preprocess(
                    messages=None, session_id=request.session, gen_config=gen_config, input_ids=ids
                )
                async for out in engine.generate(prepared, stream_response=True):
                    request.streaming = True
                    outputs.put(("out", out))
            except Exception as exc:  # RequestError (e.g. context too long) or an engine failure
                logger.exception("session {}: LMDeploy request failed", session_id)
                outputs.put(("error", exc))

        with self._lock:
            if self._closed:
                raise GenerationError("the engine is closed")
            if not self._loop_alive():
                raise GenerationError("LMDeploy's event loop has stopped (see the log); restart the app")
            self._abort_locked(session_id)
            session = self.pipe.session()
            request = _Request(session, future=None)

            def finished(_: Any) -> None:  # also runs for a task cancelled before it ever started
                outputs.put(("done", None))  # first: the consumer must hear of the end whatever happens next
                with contextlib.suppress(RuntimeError):  # the loop is already closed (engine closing)
                    self._loop.call_soon_threadsafe(self.pipe.session_mgr.remove, session)  # idempotent

            request.future = asyncio.run_coroutine_threadsafe(run(request), self._loop)
            request.future.add_done_callback(finished)
            self._running[session_id] = request
        return ChatStream(
            updates=self._updates(outputs, session_id, request, len(prompt.input_ids)),
            prompt_tokens=len(prompt.input_ids),
            dropped_messages=prompt.dropped_messages,
            cancel=lambda: self._cancel(session_id, request),
        )

    def _loop_alive(self) -> bool:
        return self.pipe.internal_thread.thread.is_alive()

    def _updates(
        self, outputs: queue.Queue, session_id: str, request: _Request, prompt_tokens: int
    ) -> Generator[Update, None, None]:
        started, tokens, reason = time.perf_counter(), 0, None
        try:
            while True:
                try:
                    kind, value = outputs.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self._loop_alive():
                        reason = "error"
                        raise GenerationError("LMDeploy's event loop has stopped") from None
                    continue
                if kind == "out":
                    tokens, reason = value.generate_token_len, value.finish_reason or reason
                    # The final output (the one with a finish reason) carries no new text: LMDeploy 0.18 sends
                    # '' there, or the previous output's text again when that ends in U+FFFD. Partial
                    # characters never reach us: its incremental detokenizer holds them back.
                    yield Update("" if value.finish_reason else value.response, tokens, value.finish_reason)
                elif kind == "error":
                    reason = "error"
                    raise GenerationError(f"generation failed: {value}") from value
                elif reason is None and not request.aborted:
                    # LMDeploy ends a request without a result only when its task was cancelled: not by us,
                    # so by its event loop shutting down under it.
                    reason = "error"
                    raise GenerationError("LMDeploy ended the reply without a result (did its loop stop?)")
                else:
                    return
        finally:
            logger.info(
                "session {}: {} ({} prompt + {} new tokens, {:.2f} s)",
                session_id,
                reason or "abort",
                prompt_tokens,
                tokens,
                time.perf_counter() - started,
            )

    def _cancel(self, session_id: str, request: _Request) -> None:
        """Abort this request only (a newer one of the same page may have replaced it)."""
        with self._lock:
            if self._running.get(session_id) is request:
                self._abort_locked(session_id)

    def _abort_locked(self, session_id: str) -> None:
        request = self._running.pop(session_id, None)
        if request is None or request.future.done():
            return
        request.aborted = True
        # TurboMind ends a request that holds a slot (it answers with an 'abort' output); the coroutine is
        # created on the loop itself, so a loop already closed leaves no coroutine that is never awaited.
        with contextlib.suppress(RuntimeError):  # the loop is already closed: the task is gone with it
            self._loop.call_soon_threadsafe(self._abort_session, request.session)
        if not request.streaming:  # maybe still waiting for a slot, where the session abort cannot reach it
            request.future.cancel()

    def _abort_session(self, session: Any) -> None:
        """Runs on LMDeploy's loop: start TurboMind's abort of ``session``."""
        task = self._loop.create_task(session.async_abort())
        self._aborting.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._aborting.discard)

    def abort(self, session_id: str) -> None:
        """Stop the reply now being generated for ``session_id`` (no-op when there is none).

        Args:
            session_id: the page whose reply to stop.
        """
        with self._lock:
            self._abort_locked(session_id)

    def close(self) -> None:
        """Abort every reply and shut LMDeploy down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for session_id in list(self._running):
                self._abort_locked(session_id)
        self.pipe.close()
