"""OpenAI-compatible HTTP API on the page's own server and port: ``/v1/chat/completions`` (streamed as
server-sent events or whole) and ``/v1/models``, on the same engine, settings and validation as the page.

    routes = openai_routes(engine, server_settings, model_id("UbUb"))
    demo.launch(**options, app_kwargs={"routes": routes})   # Gradio's FastAPI app serves them first

The wire format is OpenAI's Chat Completions, close enough for the ``openai`` package, LangChain's
``ChatOpenAI`` and ``curl -N``. Sampling values become a ``GenerationParams`` (validated there, as for the
page); messages go through the engine's own checks and injection-safe encoding. Errors are OpenAI error
objects: 400 bad request, 401 bad key (``API_KEYS``), 404 unknown path, 405 wrong method, 413 body too large,
503 when ``engine.max_concurrency + queue_size`` API requests are already in flight. A client that disconnects
aborts its reply in the engine at once.

Why a thread per reply: the engine's stream blocks while it waits for text. One thread iterates it and hands
each piece to the event loop, which sends everything decoded so far in one event: no thread hop per token,
and a slow client never slows the decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from loguru import logger
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from infer_engine.chat_format import PromptTooLongError, normalise_messages
from infer_engine.engine import ChatEngine, ChatInputError, ChatStream, GenerationError
from infer_engine.settings import (
    MAX_REQUEST_BYTES,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    GenerationParams,
    ServerSettings,
    SettingsError,
)

EVENT_INTERVAL_S = 0.02  # streamed text: at most ~50 events a second after the first (a person sees no gap)
MAX_STOPS = 4  # OpenAI's own limit on ``stop`` strings
MAX_STOP_CHARS = 256
MAX_NAMED_FIELDS = 5  # unknown fields an error names (a body may hold thousands)
MAX_FIELD_NAME_CHARS = 40
# OpenAI fields this server cannot honour: accepted only when absent or at their "off" value
UNSUPPORTED = {
    "seed": (None,),  # the engine samples batched replies with one shared generator: temperature 0 is exact
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer models take "developer" where older ones "system"
IGNORED = ("user", "metadata", "store", "service_tier")  # bookkeeping fields with no effect on the reply
KNOWN = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
    "stream", "stream_options", "n", *UNSUPPORTED, *IGNORED,
}  # fmt: skip


class APIError(Exception):
    """A request the API refuses: becomes an OpenAI error object with this HTTP status.

    Args:
        status: HTTP status code.
        message: what is wrong and how to fix it.
        param: the request field at fault, if one is.
        code: a machine-readable reason (OpenAI's ``code``).
        kind: OpenAI's error ``type``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # A field name or value echoed back may hold a lone surrogate ("\ud800"), which JSON text may carry
        # but UTF-8 cannot: escaped, the error can always be sent.
        message, param = _sendable(message), param if param is None else _sendable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1", **self.headers} if self.status == 503 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ChatRequest:
    """One validated ``/v1/chat/completions`` request.

    Args:
        messages: the conversation as sent (the engine checks it, as for the page).
        params: sampling values (``temperature`` 0 = greedy).
        stop: strings that end the reply where they first appear (not included).
        stream: answer with server-sent events.
        include_usage: streamed: end with a chunk that carries the token counts.
    """

    messages: list
    params: GenerationParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    length_field: str = "max_tokens"  # the field that set params.max_new_tokens, as its errors name it
    length_given: bool = False  # the client set the reply's length; else it may use what the prompt leaves


def model_id(name: str) -> str:
    """The id ``/v1/models`` lists for a model display name: lower case, letters of any script and digits
    kept (小明 stays 小明), anything else as ``-``.

    Args:
        name: the model's display name (``ModelInfo.name``).
    """
    return re.sub(r"[^\w.-]+", "-", name.lower()).strip("-") or "model"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _below(value: object, low: float) -> bool:
    return _is_number(value) and 0 <= value < low  # type: ignore[operator]


def _stop_strings(value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings of {MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(stops))


def parse_chat_request(body: object, defaults: GenerationParams, system_prompt: str = "") -> ChatRequest:
    """Check a ``/v1/chat/completions`` body and turn it into a ``ChatRequest`` (raises ``APIError``).

    Args:
        body: the parsed JSON body.
        defaults: the sampling values of a field the request leaves out (the page's defaults).
        system_prompt: the operator's default (``SYSTEM_PROMPT``), put first when the request sends no system
            message (a blank one sent turns it off), as the page does; blank: none.
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = [name if len(name) <= MAX_FIELD_NAME_CHARS else f"{name[:MAX_FIELD_NAME_CHARS]}…"
               for name in sorted(set(body) - KNOWN)]
    if unknown:
        more = f" (and {len(unknown) - MAX_NAMED_FIELDS} more)" if len(unknown) > MAX_NAMED_FIELDS else ""
        names = ", ".join(unknown[:MAX_NAMED_FIELDS])
        raise APIError(400, f"Unrecognized request argument supplied: {names}{more}", unknown[0])
    for name, off in UNSUPPORTED.items():
        if not any(type(body.get(name)) is type(value) and body.get(name) == value for value in off):
            hint = ": temperature 0 gives reproducible (greedy) replies" if name == "seed" else ""
            raise APIError(400, f"{name} is not supported by this server; leave it out{hint}", name)
    if not isinstance(body.get("model"), str):
        raise APIError(400, "model is required (any name: this server answers with its one model)", "model")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise APIError(400, "messages is required: a list of {role, content} messages", "messages")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise APIError(400, "n must be 1: this server generates one choice per request", "n")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise APIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "stream_options takes {include_usage: true|false}", "stream_options")
        if options.get("include_usage") not in (None, True, False):
            raise APIError(400, "include_usage must be true or false", "stream_options")
    limits = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(set(map(repr, limits.values()))) > 1:
        raise APIError(400, "max_tokens and max_completion_tokens differ: give one", "max_tokens")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    # OpenAI takes temperature 0 ("as deterministic as possible") and top_p 0; values that small keep only
    # the most likely token, which greedy decoding picks exactly.
    # The other value is still checked when one of them asks for greedy: 99 or "hot" is a client's mistake.
    cold, narrow = _below(temperature, MIN_TEMPERATURE), _below(top_p, MIN_TOP_P)
    values = {
        "max_new_tokens": next(iter(limits.values()), defaults.max_new_tokens),
        "temperature": defaults.temperature if temperature is None or cold else temperature,
        "top_p": defaults.top_p if top_p is None or narrow else top_p,
        "top_k": defaults.top_k if body.get("top_k") is None else body["top_k"],
        "do_sample": not (cold or narrow),
    }
    length_field = next(iter(limits), "max_tokens")
    try:
        params = replace(defaults, **values)
    except SettingsError as exc:
        raise field_error(exc, length_field) from None
    try:  # checked as sent, so that an error names the message by the client's own count
        messages = normalise_messages(body["messages"], ROLE_ALIASES)
    except ChatInputError as exc:
        raise APIError(400, str(exc), "messages") from None
    # A system message sent, even a blank one (which normalise_messages drops), replaces the default.
    first = body["messages"][0]
    if system_prompt.strip() and first.get("role") not in ("system", *ROLE_ALIASES):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return ChatRequest(
        messages=messages,
        params=params,
        stop=_stop_strings(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        length_field=length_field,
        length_given=bool(limits),
    )


def reply_params(engine: ChatEngine, chat: ChatRequest) -> GenerationParams:
    """``chat.params``; when the client set no length, the reply may have what the session leaves after
    the prompt, up to the default length (as OpenAI's: a long prompt is not refused, nor trimmed, only to
    keep the default free for the reply).

    Args:
        engine: the engine that will answer (its tokenizer and session length).
        chat: the validated request.
    """
    if chat.length_given:
        return chat.params
    prompt = engine.fit_prompt(chat.messages, replace(chat.params, max_new_tokens=1))
    left = engine.settings.session_len - len(prompt.input_ids)
    return replace(chat.params, max_new_tokens=max(1, min(chat.params.max_new_tokens, left)))


def field_error(exc: SettingsError, length_field: str) -> APIError:
    """A 400 for a refused sampling value, naming the field that was sent: "top_p must be between 0 and
    1.0, got 1.5"; the engine's "max_new_tokens ..." as "max_tokens ..." (or "max_completion_tokens ...").

    Args:
        exc: the error of ``GenerationParams`` or of the engine's check of it.
        length_field: the request field that gave ``max_new_tokens``.
    """
    field, _, rest = str(exc).partition(" ")
    name = length_field if field == "max_new_tokens" else field
    if name in ("temperature", "top_p"):  # the API takes 0 up to the page's least value too (greedy)
        low = MIN_TEMPERATURE if name == "temperature" else MIN_TOP_P
        rest = rest.replace(f"between {low} ", "between 0 ", 1)
    return APIError(400, f"{name} {rest}" if name else str(exc), name)


def authorized(request: Request, keys: Sequence[str]) -> bool:
    """True when no keys are set, or the request's ``Authorization: Bearer KEY`` is one of them.

    Args:
        request: the HTTP request.
        keys: the accepted keys (``ServerSettings.api_keys``).
    """
    if not keys:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given_bytes = given.strip().encode()
    # compare with every key, in constant time each: the answer's timing tells nothing about a key
    matches = [hmac.compare_digest(given_bytes, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matches)


async def read_json(request: Request) -> object:
    """The request's JSON body, read up to ``MAX_REQUEST_BYTES`` (413 beyond, 400 when it is not JSON)."""
    too_large = APIError(413, f"the request body is over {MAX_REQUEST_BYTES} bytes", code="body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_REQUEST_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise too_large
    except ClientDisconnect:  # gone before the whole body came: nobody reads the answer, nothing to log
        raise APIError(400, "the client closed the connection before the whole body was sent") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; nesting deeper than Python recurses
        raise APIError(400, "the request body must be JSON (Content-Type: application/json)") from None


class StopText:
    """Cuts a streamed reply at the first of some stop strings, holding back only a tail that may start one.

    Args:
        stops: the stop strings (none: text passes through).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Take the next text; return what may be sent now and whether a stop string was found."""
        if not self.stops:
            return text, False
        text = self.held + text
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        longest = max(map(len, self.stops)) - 1
        tails = range(min(longest, len(text)), 0, -1)
        keep = next((n for n in tails if any(s.startswith(text[-n:]) for s in self.stops)), 0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop string."""
        held, self.held = self.held, ""
        return held


_END = object()


class Reply:
    """One engine reply, read from the event loop: a thread starts and iterates the engine's stream and
    hands the text to the loop, which takes everything decoded so far in one piece.

    The first text goes out at once; after that the loop takes text at most every ``min_interval_s`` (the
    end at once): one wake-up, event and client parse per interval instead of per token, which on a small
    CPU leaves the decoder its time.

    Args:
        engine: the engine to ask.
        chat: the validated request.
        session_id: the engine session of this request (named in the log, aborted on disconnect).
        min_interval_s: shortest time between two pieces of text after the first.
    """

    def __init__(
        self, engine: ChatEngine, chat: ChatRequest, session_id: str, min_interval_s: float = EVENT_INTERVAL_S
    ) -> None:
        self.engine, self.session_id, self.min_interval_s = engine, session_id, min_interval_s
        self.stream: ChatStream | None = None
        self.ended = False
        self.first_text_s: float | None = None
        self.started = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._buffer: list[object] = []  # what the thread handed over and the loop has not taken yet
        self._woken = False  # a wake-up is on its way to the loop for what is in the buffer
        self._ready, self._over = asyncio.Event(), asyncio.Event()
        self._pending: list[object] = []
        thread = threading.Thread(target=self._pump, args=(chat,), name=f"reply-{session_id}", daemon=True)
        thread.start()

    def _put(self, item: object, last: bool = False) -> None:
        with self._lock:
            self._buffer.append(item)
            if self._woken and not last:
                return
            self._woken = True
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down): nobody waits for this
            self._loop.call_soon_threadsafe(self._wake, last)

    def _wake(self, last: bool) -> None:
        self._ready.set()
        if last:
            self._over.set()

    def _pump(self, chat: ChatRequest) -> None:
        try:
            stream = self.engine.stream_chat(chat.messages, reply_params(self.engine, chat), self.session_id)
        except Exception as exc:  # ChatInputError and friends: answered as an HTTP error by the loop
            self._put(exc, last=True)
            return
        self._put(stream)
        try:
            for delta in stream:
                self._put(delta)
            self._put(_END, last=True)
        except Exception as exc:  # GenerationError: reported to the client, the server goes on
            self._put(exc, last=True)

    async def _take(self) -> list[object]:
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            items, self._buffer, self._woken = self._buffer, [], False
        return items

    async def start(self) -> ChatStream:
        """Wait until the engine took the request; raises what ``stream_chat`` raised."""
        first, *self._pending = await self._take()
        if isinstance(first, Exception):
            self.ended = True
            raise first
        self.stream = first
        return first

    async def texts(self) -> AsyncIterator[str]:
        """The reply's text as it is decoded (raises ``GenerationError`` when the engine fails midway)."""
        items, self._pending = self._pending, []
        while not self.ended:
            pieces = []
            for item in items or await self._take():
                if item is _END:
                    self.ended = True
                elif isinstance(item, Exception):
                    self.ended = True
                    raise item
                else:
                    pieces.append(item)
            items = []
            if pieces:
                if self.first_text_s is None:
                    self.first_text_s = time.perf_counter() - self.started
                yield "".join(pieces)
            if not self.ended and self.min_interval_s > 0:  # let text gather; the end cuts the wait short
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._over.wait(), self.min_interval_s)

    def abort(self) -> None:
        """Stop the reply in the engine now (a no-op once it has ended)."""
        if not self.ended:
            self.ended = True
            self.engine.abort(self.session_id)

    def log(self, finish: str) -> None:
        stream = self.stream
        logger.info(
            "openai {}: prompt {} tok, completion {} tok, finish {}, first text {}, total {:.2f}s",
            self.session_id,
            stream.prompt_tokens if stream else "-",
            stream.completion_tokens if stream else "-",
            finish,
            "-" if self.first_text_s is None else f"{self.first_text_s:.3f}s",
            time.perf_counter() - self.started,
        )


class _EventStream(StreamingResponse):
    """A ``StreamingResponse`` that runs ``on_close`` however it ends (finished, client gone, never started).

    Starlette cancels the body iterator when the client disconnects; an iterator that never started has no
    ``finally`` to run, so the cleanup lives here.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Any) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies: do not buffer
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(stream: ChatStream) -> dict[str, int]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


def _ended_error(finish: str | None) -> APIError:
    """The error for a reply that ended neither by a stop nor by its length (the server is shutting down)."""
    return APIError(503, f"the reply was stopped ({finish}): the server is closing", kind="server_error")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Admission:
    """Counts the API requests in flight (all on the event loop thread) against a limit.

    Args:
        limit: most requests generating or waiting at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def enter(self) -> None:
        """Count one more request, or raise a 503 ``APIError`` when the limit is reached."""
        if self.active >= self.limit:
            raise APIError(
                503,
                f"the server is busy ({self.active} requests in flight); try again shortly",
                code="queue_full",
                kind="server_overloaded",
            )
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


def openai_routes(engine: ChatEngine, settings: ServerSettings, model: str) -> list[BaseRoute]:
    """The ``/v1`` routes, to serve on the page's FastAPI app (``launch(app_kwargs={"routes": ...})``).

    Args:
        engine: the engine the page uses.
        settings: server settings (``api_keys``; ``queue_size`` beyond the engine's concurrency bounds the
            requests in flight).
        model: the id ``/v1/models`` lists and replies name (see ``model_id``).
    """
    defaults = engine.settings.default_params()  # as the page: max_new_tokens fits the engine's session
    admission = Admission(engine.max_concurrency + settings.queue_size)
    created = int(time.time())
    router = APIRouter(prefix="/v1")
    card = {"id": model, "object": "model", "created": created, "owned_by": "local"}
    if settings.api_keys:
        logger.info("OpenAI-compatible API on /v1 (model {!r}): {} API key(s)", model, len(settings.api_keys))
    else:
        logger.info("OpenAI-compatible API on /v1 (model {!r}): open, no API_KEYS set", model)

    def check_key(request: Request) -> None:
        if not authorized(request, settings.api_keys):
            raise APIError(
                401,
                "Incorrect API key provided: send 'Authorization: Bearer KEY' with one of the server's keys",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        try:
            check_key(request)
        except APIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [card]})

    @router.get("/models/{name:path}")
    async def get_model(request: Request, name: str) -> Response:
        try:
            check_key(request)
            if name != model:
                raise APIError(404, f"The model {name!r} does not exist: this server serves {model!r}",
                               "model", "model_not_found")  # fmt: skip
        except APIError as exc:
            return exc.response()
        return JSONResponse(card)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            check_key(request)
            chat = parse_chat_request(await read_json(request), defaults, settings.system_prompt)
            admission.enter()
        except APIError as exc:
            return exc.response()
        reply = Reply(engine, chat, f"openai-{uuid.uuid4().hex[:12]}")
        try:
            stream = await reply.start()
        except SettingsError as exc:  # max_tokens over what the session leaves for a reply
            admission.leave()
            return field_error(exc, chat.length_field).response()
        except PromptTooLongError as exc:  # clients that trim their history on this code do so
            admission.leave()
            text = str(exc.named(chat.length_field if chat.length_given else None))
            return APIError(400, text, "messages", "context_length_exceeded").response()
        except ChatInputError as exc:
            admission.leave()
            return APIError(400, str(exc), "messages").response()
        except Exception as exc:  # GenerationError: the engine is closed or its decoder died
            admission.leave()
            return APIError(503, f"the engine cannot answer: {exc}", kind="server_error").response()
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if chat.stream:
            return _EventStream(_events(reply, stream, chat, meta), on_close=lambda: _close(reply, admission))
        try:
            return await _whole(request, reply, stream, chat, meta)
        finally:
            _close(reply, admission)

    endpoints = list(router.routes)  # the routes above, before the catch-all below

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(request: Request, path: str) -> Response:
        # A partial match is a real endpoint's path asked with another method.
        allowed = sorted({method for route in endpoints if route.matches(request.scope)[0] is Match.PARTIAL
                          for method in getattr(route, "methods", ())})
        if allowed:
            return APIError(405, f"/v1/{path} takes {', '.join(allowed)}, not {request.method}",
                            code="method_not_allowed", headers={"Allow": ", ".join(allowed)}).response()
        return APIError(
            404,
            f"Unknown endpoint /v1/{path}: this server offers /v1/chat/completions and /v1/models",
            code="unknown_url",
        ).response()

    return router.routes


def _close(reply: Reply, admission: Admission) -> None:
    """After the response: abort the reply if it still runs (client gone), free its place."""
    if not reply.ended:
        reply.abort()
        reply.log("abort (client gone)")
    admission.leave()


async def _whole(
    request: Request, reply: Reply, stream: ChatStream, chat: ChatRequest, meta: dict
) -> Response:
    """The whole reply as one ``chat.completion``; a client that disconnects meanwhile aborts it."""

    async def collect() -> tuple[str, str | None]:
        stop, text = StopText(chat.stop), []
        async for piece in reply.texts():
            kept, hit = stop.push(piece)
            text.append(kept)
            if hit:
                reply.abort()
                return "".join(text), "stop"
        return "".join(text) + stop.flush(), stream.finish_reason

    answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():  # the client left: _close aborts the reply
        answer.cancel()
        return Response(status_code=499)
    try:
        text, finish = answer.result()
    except GenerationError as exc:
        reply.log("error")
        return APIError(500, f"the model failed to answer: {exc}", kind="server_error").response()
    reply.log(str(finish))
    if finish not in ("stop", "length"):
        return _ended_error(finish).response()
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(stream),
        }
    )


async def _events(reply: Reply, stream: ChatStream, chat: ChatRequest, meta: dict) -> AsyncIterator[bytes]:
    """The reply as ``chat.completion.chunk`` server-sent events, ending with ``data: [DONE]``."""
    usage = {"usage": None} if chat.include_usage else {}

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _event({**meta, "object": "chat.completion.chunk", "choices": [choice], **usage})

    yield chunk({"role": "assistant", "content": ""})
    stop, finish = StopText(chat.stop), None
    try:
        async for piece in reply.texts():
            kept, hit = stop.push(piece)
            if kept:
                yield chunk({"content": kept})
            if hit:
                reply.abort()
                finish = "stop"
                break
        else:
            tail = stop.flush()
            if tail:
                yield chunk({"content": tail})
            finish = stream.finish_reason
    except GenerationError as exc:
        reply.log("error")
        yield _event(APIError(500, f"the model failed to answer: {exc}", kind="server_error").body())
        return
    reply.log(str(finish))
    if finish not in ("stop", "length"):
        yield _event(_ended_error(finish).body())
        return
    yield chunk({}, finish)
    if chat.include_usage:
        yield _event({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(stream)})
    yield b"data: [DONE]\n\n"
