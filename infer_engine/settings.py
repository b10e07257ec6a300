"""Every user-facing setting of the server, validated in one place.

Three config objects, one per concern:
- ``GenerationParams``: one request's sampling values (from the UI sliders or the ``/chat`` API).
- ``EngineSettings``: how the inference engine is built (backend choice and LMDeploy TurboMind knobs).
- ``ServerSettings``: where the model comes from and how the Gradio server runs.

LMDeploy 0.18 silently accepts unknown or out-of-range engine settings (``tp=3``,
``cache_max_entry_count=1.5``, ``session_len=-1``) and GenerationConfig accepts ``max_new_tokens=0``, so
nothing reaches an engine unchecked.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

BACKENDS = ("auto", "lmdeploy", "transformers")
QUANT_POLICIES = (0, 4, 8)
T = TypeVar("T")
MAX_NEW_TOKENS = 2048  # the most tokens one reply may ask for
MIN_TEMPERATURE = MIN_TOP_P = 0.01  # smaller values sample (nearly) only the most likely token: greedy
MIN_PROMPT_TOKENS = 32  # what a session keeps for the prompt at least (a short question in the chat format)
# Input limits of every event and API call (checked by ``chat_format.checked_text`` / ``check_history_size``
# and ``ui.BodySizeLimit``): what one request can make the server parse and scan. A session of 4096 tokens
# holds about 16 000 characters, so these stay far above any conversation a model can read.
MAX_MESSAGE_CHARS = 20_000  # one message, or the system prompt
MAX_MESSAGES = 500  # messages in one history
MAX_HISTORY_CHARS = 200_000  # all messages of one history together
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # one HTTP request body (a full history JSON-escaped as \uXXXX fits)


class SettingsError(ValueError):
    """A setting is missing, of the wrong type or out of range; the message names it."""


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise SettingsError(f"{name} must be text, got {value!r}")
    return value


def _check_float(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a number between {low} and {high}, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple) -> object:
    # compare types too: False == 0 and 4.0 == 4 would otherwise pass as 0 and 4
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise SettingsError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationParams:
    """Sampling values for one reply.

    Args:
        max_new_tokens: most tokens the reply may have (1-2048; the engine's ``max_reply_tokens`` bounds it
            further).
        temperature: sampling temperature (0.01-2); ignored when ``do_sample`` is False.
        top_p: nucleus sampling mass (0.01-1).
        top_k: sample among the k most likely tokens (1-100).
        do_sample: sample when True, greedy decoding when False (tests and evaluation use greedy).
    """

    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 40
    do_sample: bool = True

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        temperature = _check_float("temperature", self.temperature, MIN_TEMPERATURE, 2.0)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", _check_float("top_p", self.top_p, MIN_TOP_P, 1.0))
        _check_int("top_k", self.top_k, 1, 100)
        if not isinstance(self.do_sample, bool):
            raise SettingsError(f"do_sample must be true or false, got {self.do_sample!r}")


def reply_token_limit(session_len: int) -> int:
    """The most ``max_new_tokens`` a reply may ask for in a session: it keeps ``MIN_PROMPT_TOKENS`` for the
    prompt (bigger values could never be answered; ``session_len`` >= 64 leaves at least 32). The page's
    slider ends there, and both APIs refuse more.

    Args:
        session_len: most tokens of prompt + reply.
    """
    return min(MAX_NEW_TOKENS, session_len - MIN_PROMPT_TOKENS)


@dataclass(frozen=True)
class EngineSettings:
    """How the inference engine is built.

    Args:
        backend: ``auto`` (LMDeploy when CUDA and TurboMind really work, else transformers), ``lmdeploy`` or
            ``transformers``.
        session_len: most tokens of prompt + reply; older turns are dropped to fit (64-1048576).
        max_batch_size: most requests decoded together; also the UI's concurrency (1-1024).
        cache_max_entry_count: LMDeploy: share of free GPU memory for the KV cache (0 < x < 1).
        quant_policy: LMDeploy KV-cache quantisation: 0 (off), 4 (int4) or 8 (int8).
        tp: LMDeploy tensor-parallel GPU count (1, 2, 4 or 8).
        enable_prefix_caching: LMDeploy: reuse the KV cache of a shared prompt prefix (the resent transcript).
        device: transformers backend device: ``auto``, ``cpu`` or ``cuda``.
        prefill_chunk_tokens: transformers backend: most prompt tokens prefilled between two decode steps
            (16-1048576): a long prompt is prefilled in chunks that take turns with the running streams and
            the other prompts, so it cannot freeze them (a value above ``session_len`` turns chunking off).
        torch_threads: transformers backend: torch's intra-op threads for the whole process (0 = on a CPU
            one per core but one, 1 to 4, leaving a core to the web server; torch's default on a GPU; else
            1-256). See ``hf_engine.torch_threads``.
        trust_remote_code: let a model that ships its own Python code (``auto_map`` in its config, e.g.
            InternLM2.5) run it in the server process. Off by default: such a model is refused with an error
            naming its files. Only for models whose code you have read or whose publisher you trust.
    """

    backend: str = "auto"
    session_len: int = 4096
    max_batch_size: int = 8
    cache_max_entry_count: float = 0.8
    quant_policy: int = 0
    tp: int = 1
    enable_prefix_caching: bool = True
    device: str = "auto"
    prefill_chunk_tokens: int = 512
    torch_threads: int = 0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_int("session_len", self.session_len, 64, 1_048_576)
        _check_int("max_batch_size", self.max_batch_size, 1, 1024)
        cache = _check_float("cache_max_entry_count", self.cache_max_entry_count, 0.0, 1.0)
        if not 0.0 < cache < 1.0:
            raise SettingsError(f"cache_max_entry_count must be strictly between 0 and 1, got {cache}")
        object.__setattr__(self, "cache_max_entry_count", cache)
        _check_choice("quant_policy", self.quant_policy, QUANT_POLICIES)
        _check_choice("tp", self.tp, (1, 2, 4, 8))
        if not isinstance(self.enable_prefix_caching, bool):
            raise SettingsError(
                f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}"
            )
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 16, 1_048_576)
        _check_int("torch_threads", self.torch_threads, 0, 256)
        if not isinstance(self.trust_remote_code, bool):
            raise SettingsError(f"trust_remote_code must be true or false, got {self.trust_remote_code!r}")

    @property
    def max_reply_tokens(self) -> int:
        """The most ``max_new_tokens`` a reply may ask for (see ``reply_token_limit``)."""
        return reply_token_limit(self.session_len)

    def default_params(self) -> GenerationParams:
        """``GenerationParams()`` with ``max_new_tokens`` lowered to half the session when the session is too
        short for the default, so that the conversation keeps the other half (at ``max_reply_tokens`` a
        1024-token session would leave a question 32 tokens): what the UI and both APIs start from."""
        defaults = GenerationParams()  # half a session (>= 64) is never over max_reply_tokens
        return replace(defaults, max_new_tokens=min(defaults.max_new_tokens, self.session_len // 2))


@dataclass(frozen=True)
class ServerSettings:
    """Where the model comes from and how the Gradio server runs.

    Args:
        model_source: local dir, git URL, ``openxlab:owner/repo``, ``hf:owner/repo[@rev]`` or ``demo:tuned`` /
            ``demo:base`` (SmolLM2 with / without the committed demo adapter); empty = the embedded tiny demo
            model.
        cache_dir: where downloaded models are cached (None = the model source's default).
        host: interface to listen on.
        port: TCP port to listen on (1-65535).
        queue_size: most requests waiting in Gradio's queue before new ones are refused (1-10000).
        system_prompt: default system prompt: the page's, and the API's for a request without one ("" = none,
            as the identity data was trained).
        api_keys: bearer keys the OpenAI-compatible API (``/v1``) accepts (none = open); kept out of reprs.
        compare_model_source: a second model (the base before tuning), in ``model_source``'s syntax, whose
            replies the page shows beside the served model's ("before / after"); empty = no comparison.
    """

    model_source: str = ""
    cache_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 64
    system_prompt: str = ""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    compare_model_source: str = ""

    def __post_init__(self) -> None:
        _check_int("port", self.port, 1, 65535)
        _check_int("queue_size", self.queue_size, 1, 10_000)
        _check_str("model_source", self.model_source)
        _check_str("compare_model_source", self.compare_model_source)
        if len(_check_str("system_prompt", self.system_prompt)) > MAX_MESSAGE_CHARS:  # refused in every chat
            chars = len(self.system_prompt)
            raise SettingsError(f"system_prompt is too long ({chars} characters); the limit is "
                                f"{MAX_MESSAGE_CHARS} characters")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            raise SettingsError(f"cache_dir must be a path, got {self.cache_dir!r}")
        if not _check_str("host", self.host).strip():
            raise SettingsError("host must not be empty")
        if not isinstance(self.api_keys, tuple):
            raise SettingsError("api_keys must be a tuple of keys")
        for number, key in enumerate(self.api_keys, 1):  # the message never shows a key
            if not isinstance(key, str) or not key.isascii() or not key.isprintable() or not key.strip():
                raise SettingsError(f"API key {number} must be printable ASCII text (an HTTP header value)")
            if any(c.isspace() or c == "," for c in key):
                raise SettingsError(f"API key {number} must not contain spaces or commas")


def _parse(kind: type, raw: str, name: str) -> object:
    """Turn one environment string into the field's type, with an error that names the variable."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    # int() and float() also take "1_000" and full-width digits: a number setting is written in ASCII digits.
    if kind in _NUMBER_FORMS and not _NUMBER_FORMS[kind][0].fullmatch(text):
        raise SettingsError(f"{name} must be {_NUMBER_FORMS[kind][1]}, got {raw!r}")
    return kind(text)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_NUMBER_FORMS = {int: (re.compile(r"[+-]?[0-9]+"), "a whole number"),
                 float: (re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"), "a number")}


# The environment variable that sets each ServerSettings field (EngineSettings: the field's name in capitals).
SERVER_ENV = {"model_source": "MODEL_SOURCE", "cache_dir": "MODEL_CACHE_DIR", "host": "GRADIO_SERVER_NAME",
              "port": "GRADIO_SERVER_PORT", "queue_size": "QUEUE_SIZE", "system_prompt": "SYSTEM_PROMPT",
              "api_keys": "API_KEYS", "compare_model_source": "COMPARE_MODEL_SOURCE"}


def said_as(names: Mapping[str, str], make: Callable[[], T]) -> T:
    """``make()``, with a SettingsError about a field said by the name the user set it by (``SESSION_LEN``,
    ``--port``) instead of the field's.

    Args:
        names: field name -> the name to say.
        make: builds the settings object.
    """
    try:
        return make()
    except SettingsError as err:
        name, _, rest = str(err).partition(" ")
        if name in names:
            raise SettingsError(f"{names[name]} {rest}") from None
        raise


def engine_settings_from_env(env: Mapping[str, str] = os.environ) -> EngineSettings:
    """Read ``EngineSettings`` from upper-case env vars (``BACKEND``, ``SESSION_LEN``, ``QUANT_POLICY``, ...).

    Args:
        env: the environment to read (defaults to the process environment).
    """
    values: dict[str, object] = {}
    for f in fields(EngineSettings):
        raw = env.get(f.name.upper())
        if raw is not None and raw.strip():
            kind = _TYPES[str(f.type)]  # the text ones are choices (BACKEND, DEVICE): AUTO is auto
            values[f.name] = _parse(kind, raw.lower() if kind is str else raw, f.name.upper())
    return said_as({f.name: f.name.upper() for f in fields(EngineSettings)}, lambda: EngineSettings(**values))


def trust_remote_code_from_env(env: Mapping[str, str] = os.environ) -> bool:
    """``TRUST_REMOTE_CODE`` alone (default false), for tools that load models but take no engine settings
    (training.generate: evaluation and replay data).

    Args:
        env: the environment to read (defaults to the process environment).
    """
    raw = env.get("TRUST_REMOTE_CODE", "")
    return bool(_parse(bool, raw, "TRUST_REMOTE_CODE")) if raw.strip() else False


def _api_keys(raw: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in raw.split(",") if key.strip())
    if raw.strip() and not keys:  # " , ": meant to protect /v1, would leave it open
        raise SettingsError(f"API_KEYS is set but holds no key ({raw!r}); unset it for an open API")
    return keys


def _home_path(value: str, name: str) -> Path:
    # A Space's settings pass "~/models" as typed: the shell that would expand it is not there.
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~nosuchuser
        home = value.split("/")[0]
        raise SettingsError(f"{name}: cannot expand {home!r}: no such home directory") from None


def server_settings_from_env(env: Mapping[str, str] = os.environ) -> ServerSettings:
    """Read ``ServerSettings`` from ``MODEL_SOURCE``, ``MODEL_CACHE_DIR``, ``GRADIO_SERVER_NAME``/``PORT``,
    ``QUEUE_SIZE``, ``SYSTEM_PROMPT``, ``API_KEYS`` (comma-separated) and ``COMPARE_MODEL_SOURCE``.

    Args:
        env: the environment to read (defaults to the process environment).
    """
    cache = env.get("MODEL_CACHE_DIR", "").strip()
    port = env.get("GRADIO_SERVER_PORT", "").strip()
    queue = env.get("QUEUE_SIZE", "").strip()
    return said_as(SERVER_ENV, lambda: ServerSettings(
        model_source=env.get("MODEL_SOURCE", "").strip(),
        cache_dir=_home_path(cache, "MODEL_CACHE_DIR") if cache else None,
        host=env.get("GRADIO_SERVER_NAME", "").strip() or "127.0.0.1",
        port=_parse(int, port, "GRADIO_SERVER_PORT") if port else 7860,
        queue_size=_parse(int, queue, "QUEUE_SIZE") if queue else 64,
        system_prompt=env.get("SYSTEM_PROMPT", ""),
        api_keys=_api_keys(env.get("API_KEYS", "")),
        compare_model_source=env.get("COMPARE_MODEL_SOURCE", "").strip(),
    ))
