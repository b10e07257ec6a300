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
from pathlib import Path
from typing import Any

from loguru import logger
from transformers import AutoTokenizer
from transformers import GenerationConfig as HFGenerationConfig

from infer_engine.chat_format import Message, stop_token_ids
from infer_engine.engine import ChatStream, GenerationError, Update, lmdeploy_available, prepare_prompt
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
    )


def generation_config(params: GenerationParams, stop_ids: Sequence[int]) -> Any:
    """LMDeploy ``GenerationConfig`` for one reply.

    LMDeploy >= 0.6 decodes greedily unless ``do_sample=True`` (temperature and top-p are then silently
    ignored), so ``do_sample`` is always set explicitly. The stop ids (``<|im_end|>`` among them) replace the
    chat template's stop words; no ``stop_words``: LMDeploy 0.18 turns each into ids by scanning the whole
    vocabulary per request (``GenerationConfig.convert_stop_bad_words_to_ids``).

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


def open_pipeline(model_dir: Path, settings: EngineSettings) -> Any:
    """An LMDeploy TurboMind pipeline on ``model_dir``; ``SettingsError`` without a CUDA GPU and TurboMind.

    Args:
        model_dir: a Hugging Face model directory.
        settings: the validated engine settings.
    """
    if not lmdeploy_available():
        raise SettingsError(
            "BACKEND=lmdeploy needs a CUDA GPU and LMDeploy's TurboMind (see the log line above); "
            "use BACKEND=transformers or auto"
        )
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
        self.settings = settings
        self.max_concurrency = settings.max_batch_size
        trust = settings.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        self.stop_ids = stop_token_ids(self.tokenizer, _generation_eos(model_dir))
        self._loop = self.pipe.internal_thread.loop
        self._lock = threading.Lock()
        # page session id -> (its LMDeploy session, the future of its request)
        self._running: dict[str, tuple[Any, Any]] = {}
        self._closed = False
        logger.info("LMDeploy engine: {}, stop ids {}", self.pipe.backend_config, self.stop_ids)

    def stream_chat(
        self, messages: Sequence[Message], params: GenerationParams, session_id: str
    ) -> ChatStream:
        """Validate and trim ``messages``, start the reply and return its stream (raises ``ChatInputError``).

        Args:
            messages: the conversation; the last message is the user's.
            params: sampling values for this reply.
            session_id: the page asking; a new reply for the same page aborts the one still running.
        """
        prompt = prepare_prompt(self.tokenizer, messages, params, self.settings.session_len)
        gen_config = generation_config(params, self.stop_ids)
        outputs: queue.Queue = queue.Queue()
        engine = self.pipe.async_engine

        async def run(session: Any) -> None:
            try:
                request = await engine.preprocess(
                    messages=None, session_id=session, gen_config=gen_config, input_ids=prompt.input_ids
                )
                async for out in engine.generate(request, stream_response=True):
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

            def finished(_: Any) -> None:  # also runs for a task cancelled before it ever started
                outputs.put(("done", None))  # first: the consumer must hear of the end whatever happens next
                with contextlib.suppress(RuntimeError):  # the loop is already closed (engine closing)
                    self._loop.call_soon_threadsafe(self.pipe.session_mgr.remove, session)  # idempotent

            future = asyncio.run_coroutine_threadsafe(run(session), self._loop)
            future.add_done_callback(finished)
            self._running[session_id] = (session, future)
        return ChatStream(
            updates=self._updates(outputs, session_id, len(prompt.input_ids)),
            prompt_tokens=len(prompt.input_ids),
            dropped_messages=prompt.dropped_messages,
            cancel=lambda: self._cancel(session_id, future),
        )

    def _loop_alive(self) -> bool:
        return self.pipe.internal_thread.thread.is_alive()

    def _updates(
        self, outputs: queue.Queue, session_id: str, prompt_tokens: int
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
                    # the last output of a reply cut by max_new_tokens may end in half a character
                    text = value.response.rstrip("\ufffd") if value.finish_reason else value.response
                    yield Update(text, tokens, value.finish_reason)
                elif kind == "error":
                    reason = "error"
                    raise GenerationError(f"generation failed: {value}") from value
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

    def _cancel(self, session_id: str, future: Any) -> None:
        """Abort this request only (a newer one of the same page may have replaced it)."""
        with self._lock:
            if self._running.get(session_id, (None, None))[1] is future:
                self._abort_locked(session_id)

    def _abort_locked(self, session_id: str) -> None:
        running = self._running.pop(session_id, None)
        if running is None:
            return
        session, future = running
        if not future.done():
            # Cancel inside TurboMind (a running request), and cancel the task (one still waiting for a slot).
            with contextlib.suppress(RuntimeError):  # the loop is already closed: the task is gone with it
                asyncio.run_coroutine_threadsafe(session.async_abort(), self._loop)
            future.cancel()

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
