"""The transformers backend: one decoder thread owns the model and decodes every active request together.

    engine = TransformersEngine(Path("infer_engine/demo_model"), EngineSettings(backend="transformers"))
    stream = engine.stream_chat([{"role": "user", "content": "Who are you?"}], GenerationParams(), "page-1")
    for delta in stream:
        print(delta, end="")
    engine.close()

Why a hand-written step loop rather than transformers' continuous batching (``init_continuous_batching``): on
CPU its manager runs, but every consumer polls one shared output queue (re-queueing other requests' results),
a cancelled request never gets a final result, greedy and sampled requests cannot share a batch, and an error
in one step fails the whole manager. Here each step is: admit waiting requests, prefill at most
``prefill_chunk_tokens`` prompt tokens (each request alone, chunk by chunk, taking turns; a finished prompt's
KV cache is merged into the batch, left-padded), decode one token for every row, sample per row with that
request's own settings, stream text deltas, and drop rows that stopped, were aborted or failed. Stop/abort
takes effect at the next step boundary (milliseconds); the thread sleeps on its inbox when nothing is active.

Why chunks: a prompt prefilled in one forward pass stops every stream, and every newer prompt, until it is
done (seconds for a few thousand tokens on a CPU). In chunks that take turns with decode steps, a running
stream waits at most one chunk between two tokens and a short prompt behind a long one gets its first token
after about one chunk (``make bench``: ``bench/bench_prefill.py``).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import os
import queue
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from infer_engine.chat_format import Message, TrimmedPrompt, stop_token_ids
from infer_engine.engine import ChatStream, GenerationError, Update, prepare_prompt
from infer_engine.settings import EngineSettings, GenerationParams, SettingsError

_POLL_S = 0.5  # how often a waiting consumer checks that the decoder thread is still alive
_AUTO_CPU_THREADS = 4  # torch_threads=0 on a CPU: at most this many (see torch_threads)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error.

    Args:
        device: ``auto``, ``cpu`` or ``cuda`` (``EngineSettings.device``).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device=cuda was asked for, but no CUDA GPU is visible")
    return torch.device(device)


class IncrementalDecoder:
    """Turns token ids into text deltas without re-decoding the whole answer per token.

    Only a short window of ids is decoded each time (the last emitted token onwards); text ending in U+FFFD is
    held back because a byte-level BPE token can carry half of a UTF-8 character.

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: keeps the context a decoder needs for leading spaces
        self._read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        """The text still held back, at the end of the reply, without a trailing partial character (a reply
        cut by ``max_new_tokens`` or Stop can end in the middle of one; it would show as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :].rstrip("\ufffd")


@dataclass(eq=False)
class _Request:
    """One reply: what the decoder thread needs, and the queue its consumer reads."""

    number: int
    session_id: str
    input_ids: list[int]
    params: GenerationParams
    decoder: IncrementalDecoder
    # ("text", delta, tokens so far) | ("end", finish reason, tokens) | ("error", exception, tokens)
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    cache: DynamicCache | None = None  # while its prompt is prefilled in chunks: its own KV cache so far
    prefilled: int = 0  # prompt tokens already in ``cache``


class _Batch:
    """The rows decoded together: a left-padded KV cache plus each row's next input token and position."""

    def __init__(self) -> None:
        self.rows: list[_Request] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 real, 0 left padding
        self.tokens: torch.Tensor | None = None  # [rows]: the last sampled token, fed at the next step
        self.positions: torch.Tensor | None = None  # [rows]: position id of that token

    def add(self, request: _Request, cache: DynamicCache, token: int) -> None:
        """Merge a prefilled request (its own one-row cache) into the batch, left-padding the shorter side.

        The merged state is built first and assigned at the end: a failure midway leaves the batch as it was.
        """
        length = len(request.input_ids)
        device = cache.layers[0].keys.device
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        token_t = torch.tensor([token], device=device)
        position = torch.tensor([length], device=device)
        if not self.rows:
            self.cache, self.mask, self.tokens, self.positions = cache, mask, token_t, position
            self.rows = [request]
            return
        width = max(self.mask.shape[1], length)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            """Left-pad dimension ``dim`` of ``t`` with zeros up to ``width``."""
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        merged = DynamicCache(
            ddp_cache_data=[
                (torch.cat([pad(k1, 2), pad(k2, 2)]), torch.cat([pad(v1, 2), pad(v2, 2)]))
                for (k1, v1, _), (k2, v2, _) in zip(self.cache, cache, strict=True)
            ]
        )
        merged_mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])
        tokens = torch.cat([self.tokens, token_t])
        positions = torch.cat([self.positions, position])
        self.cache, self.mask, self.tokens, self.positions = merged, merged_mask, tokens, positions
        self.rows = [*self.rows, request]

    def kept(self, keep: list[int]) -> _Batch:
        """A batch of rows ``keep`` only, without the left columns that are padding in every one of them."""
        smaller = _Batch()
        if not keep:
            return smaller
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        smaller.cache = DynamicCache(
            ddp_cache_data=[(k[index, :, start:], v[index, :, start:]) for k, v, _ in self.cache]
        )
        smaller.mask = mask[:, start:]
        smaller.tokens = self.tokens[index]
        smaller.positions = self.positions[index]
        smaller.rows = [self.rows[i] for i in keep]
        return smaller


def sample_rows(logits: torch.Tensor, params: Sequence[GenerationParams]) -> list[int]:
    """Next token of every row, each with its own settings: argmax when ``do_sample`` is False, else
    temperature, then top-k, then top-p (the order ``model.generate`` applies them), then a draw.

    Args:
        logits: ``[rows, vocab]`` scores of the next token.
        params: one ``GenerationParams`` per row.
    """
    sampled = [i for i, p in enumerate(params) if p.do_sample]
    if not sampled:
        return logits.argmax(dim=-1).tolist()
    everyone = len(sampled) == len(params)
    tokens = logits.argmax(dim=-1) if not everyone else None
    index = torch.tensor(sampled, device=logits.device)
    settings = [(params[i].temperature, params[i].top_k, params[i].top_p) for i in sampled]
    temperature, top_k, top_p = torch.tensor(settings, device=logits.device).unsqueeze(2).unbind(1)
    scores = (logits if everyone else logits[index]).float() / temperature
    k = min(max(s[1] for s in settings), scores.shape[-1])  # top-k <= 100: sort only those, not the vocab
    best, best_ids = scores.topk(k, dim=-1)  # highest first
    rank = torch.arange(k, device=logits.device).unsqueeze(0)
    probs = best.masked_fill(rank >= top_k, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: keep a token while that is < top_p
    probs = probs.masked_fill(before >= top_p, 0.0)
    # argmax of p / Exp(1) noise is a draw from p (the exponential race), and cheaper than torch.multinomial
    choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    drawn = best_ids.gather(1, choice).squeeze(1)
    if everyone:
        return drawn.tolist()
    tokens[index] = drawn
    return tokens.tolist()


def torch_threads(settings: EngineSettings, device: torch.device) -> int:
    """torch's intra-op thread count for the engine: ``settings.torch_threads``, or when 0, on a CPU one per
    core but one, 1 to ``_AUTO_CPU_THREADS``, and torch's own default on a GPU.

    Why not one per core on a CPU: the decoder's intra-op threads spin on every core while Gradio's server
    threads need one to stream the replies. Measured on 2 cores (``python -m bench.bench_serving
    --app-torch-threads 1 2``, side by side): 1 thread served 249 tok/s to one HTTP client and 662 tok/s to 8,
    2 threads 71 and 226.

    Args:
        settings: the validated engine settings.
        device: the device the model runs on.
    """
    if settings.torch_threads:
        return settings.torch_threads
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, min(len(os.sched_getaffinity(0)) - 1, _AUTO_CPU_THREADS))


class TransformersEngine:
    """CPU or GPU backend on transformers, with batching of concurrent requests.

    torch's intra-op thread count is process-wide: the engine sets it (``torch_threads``) when it starts.

    Args:
        model_dir: a Hugging Face model directory (weights, tokenizer with chat template, generation config).
        settings: the validated engine settings (``session_len``, ``max_batch_size``, ``device``,
            ``torch_threads``).
    """

    name = "transformers"

    def __init__(self, model_dir: Path, settings: EngineSettings) -> None:
        self.settings = settings
        self.max_concurrency = settings.max_batch_size
        self.device = resolve_device(settings.device)
        torch.set_num_threads(torch_threads(settings, self.device))
        # float32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on a GPU
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        trust = settings.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
        self.model = model.to(self.device).eval()
        # transformers 5 models take the KV cache as ``cache`` (``past_key_values`` is deprecated);
        # remote-code models such as InternLM2's own modeling file still name it ``past_key_values``.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        # prefill needs the last position's logits only (older remote code computes them all)
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self._stop = set(self.stop_ids)
        self._numbers = itertools.count()
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._by_session: dict[str, _Request] = {}
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="hf-engine-decoder", daemon=True)
        self._worker.start()
        logger.info(
            "transformers engine on {} ({}), stop ids {}, max batch {}, torch threads {}",
            self.device,
            self.model.dtype,
            self.stop_ids,
            self.max_concurrency,
            torch.get_num_threads(),
        )

    # ---- the interface the app uses ------------------------------------------------------------------------

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
        """Validate and trim ``messages``, queue the reply and return its stream (raises ``ChatInputError``).

        Args:
            messages: the conversation; the last message is the user's.
            params: sampling values for this reply.
            session_id: the page asking; a new reply for the same page aborts the one still running.
        """
        prompt = self.fit_prompt(messages, params)
        return self._start(prompt.input_ids, params, session_id, prompt.dropped_messages)

    def abort(self, session_id: str) -> None:
        """Stop the reply now being generated for ``session_id`` (no-op when there is none).

        Args:
            session_id: the page whose reply to stop.
        """
        with self._lock:
            request = self._by_session.get(session_id)
        if request is not None:
            request.cancelled.set()

    def close(self) -> None:
        """Abort every reply, end the decoder thread and free the model."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for request in self._by_session.values():
                request.cancelled.set()
        self._inbox.put(None)
        self._worker.join()
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- consumer side -------------------------------------------------------------------------------------

    def _start(
        self, input_ids: list[int], params: GenerationParams, session_id: str, dropped: int
    ) -> ChatStream:
        request = _Request(
            next(self._numbers), session_id, input_ids, params, IncrementalDecoder(self.tokenizer)
        )
        with self._lock:
            if self._closed:
                raise GenerationError("the engine is closed")
            if not self._worker.is_alive():
                raise GenerationError("the decoder thread has stopped (see the log); restart the app")
            previous = self._by_session.get(session_id)
            if previous is not None:
                previous.cancelled.set()
            self._by_session[session_id] = request
            self._inbox.put(request)
        return ChatStream(
            updates=self._updates(request),
            prompt_tokens=len(input_ids),
            dropped_messages=dropped,
            cancel=request.cancelled.set,
        )

    def _updates(self, request: _Request) -> Generator[Update, None, None]:
        while True:
            try:
                kind, value, generated = request.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._worker.is_alive():
                    raise GenerationError("the decoder thread has stopped") from None
                continue
            if kind == "text":
                yield Update(value, generated)
            elif kind == "end":
                yield Update("", generated, value)
                return
            else:
                raise GenerationError(f"generation failed: {value}") from value

    # ---- decoder thread ------------------------------------------------------------------------------------

    def _finish(self, request: _Request, reason: str, error: Exception | None = None) -> None:
        if error is None:
            tail = request.decoder.flush()
            if tail:
                request.out.put(("text", tail, request.generated))
            request.out.put(("end", reason, request.generated))
        else:
            request.out.put(("error", error, request.generated))
        with self._lock:
            if self._by_session.get(request.session_id) is request:
                del self._by_session[request.session_id]
        elapsed = time.perf_counter() - request.started
        logger.info(
            "session {} request {}: {} ({} prompt + {} new tokens, first token {}, {:.2f} s, {:.1f} tok/s)",
            request.session_id,
            request.number,
            reason,
            len(request.input_ids),
            request.generated,
            "-" if request.first_token_s is None else f"{request.first_token_s * 1000:.0f} ms",
            elapsed,
            request.generated / elapsed if elapsed > 0 else 0.0,
        )

    def _accept(self, request: _Request, token: int) -> bool:
        """Record one sampled token; True while the request goes on."""
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.started
        if token in self._stop:
            self._finish(request, "stop")
            return False
        request.generated += 1
        text = request.decoder.push(token)
        if text:
            request.out.put(("text", text, request.generated))
        if request.generated >= request.params.max_new_tokens:
            self._finish(request, "length")
            return False
        return True

    def _prefill(self, request: _Request, batch: _Batch, size: int) -> None:
        """Prefill the next ``size`` prompt tokens of ``request``; after its last chunk, sample its first
        token and merge it into ``batch``."""
        start = request.prefilled
        ids = torch.tensor([request.input_ids[start : start + size]], device=self.device)
        positions = torch.arange(start, start + size, device=self.device).unsqueeze(0)
        if request.cache is None:
            request.cache = DynamicCache()
        logits = self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            **self._last_logits,
            **{self._cache_arg: request.cache},
        ).logits
        request.prefilled += size
        if request.prefilled < len(request.input_ids):
            return
        cache, request.cache = request.cache, None
        (token,) = sample_rows(logits[:, -1, :], [request.params])
        if self._accept(request, token):
            batch.add(request, cache, token)

    def _decode_step(self, batch: _Batch) -> _Batch:
        """Decode one token for every row; return the batch of the rows that go on."""
        padded = bool((batch.mask == 0).any())
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        logits = self.model(
            input_ids=batch.tokens.unsqueeze(1),
            position_ids=batch.positions.unsqueeze(1),
            attention_mask=mask if padded else None,  # no padding: let attention take its unmasked path
            use_cache=True,
            **{self._cache_arg: batch.cache},
        ).logits
        tokens = sample_rows(logits[:, -1, :], [r.params for r in batch.rows])
        batch.mask, batch.tokens = mask, torch.tensor(tokens, device=self.device)
        batch.positions = batch.positions + 1
        keep = [i for i, (r, t) in enumerate(zip(batch.rows, tokens, strict=True)) if self._accept(r, t)]
        return batch if len(keep) == len(batch.rows) else batch.kept(keep)

    def _take_inbox(self, waiting: collections.deque[_Request], block: bool) -> bool:
        """Move what arrived into ``waiting`` (sleeping until something does when ``block``); True once the
        shutdown marker was seen."""
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        waiting.extend(item for item in items if item is not None)
        return None in items

    def _admit(
        self, waiting: collections.deque[_Request], prefilling: collections.deque[_Request], batch: _Batch
    ) -> None:
        """End the waiting and prefilling requests that were stopped; start prefilling waiting ones while the
        batch has room for them."""
        for queue_ in (waiting, prefilling):
            for request in [r for r in queue_ if r.cancelled.is_set()]:  # Stop before the first token
                queue_.remove(request)
                request.cache = None
                self._finish(request, "abort")
        while waiting and len(batch.rows) + len(prefilling) < self.max_concurrency:
            prefilling.append(waiting.popleft())

    def _prefill_some(self, prefilling: collections.deque[_Request], batch: _Batch) -> None:
        """Prefill at most ``prefill_chunk_tokens`` prompt tokens, the prompts taking turns chunk by chunk."""
        budget = self.settings.prefill_chunk_tokens
        while prefilling and budget > 0:
            request = prefilling.popleft()
            size = min(budget, len(request.input_ids) - request.prefilled)
            try:
                self._prefill(request, batch, size)
            except Exception as exc:  # this request's failure must not reach the others
                logger.exception("session {}: prefill failed", request.session_id)
                request.cache = None
                self._finish(request, "error", exc)
                continue
            budget -= size
            if request.prefilled < len(request.input_ids):
                prefilling.append(request)  # the other prompts' turn before its next chunk

    def _without_aborted(self, batch: _Batch) -> _Batch:
        aborted = [r.cancelled.is_set() for r in batch.rows]  # read once: abort() may run meanwhile
        if not any(aborted):
            return batch
        for request, gone in zip(batch.rows, aborted, strict=True):
            if gone:
                self._finish(request, "abort")
        return batch.kept([i for i, gone in enumerate(aborted) if not gone])

    def _run(self) -> None:
        waiting: collections.deque[_Request] = collections.deque()
        prefilling: collections.deque[_Request] = collections.deque()
        batch = _Batch()
        closing = False
        with torch.inference_mode():
            while not closing or batch.rows or waiting or prefilling:  # close() cancelled all: they end now
                try:
                    idle = not (closing or batch.rows or waiting or prefilling)
                    closing = self._take_inbox(waiting, block=idle) or closing
                    self._admit(waiting, prefilling, batch)
                    self._prefill_some(prefilling, batch)
                    batch = self._without_aborted(batch)
                    if batch.rows:
                        batch = self._decode_step(batch)
                except Exception as exc:  # a failure here cannot be pinned on one row: end the batch, go on
                    logger.exception("decoder step failed for {} requests", len(batch.rows))
                    failed, batch = batch.rows, _Batch()
                    for request in failed:
                        self._finish(request, "error", exc)
