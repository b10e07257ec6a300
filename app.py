# Chat Space entry point: serves a chat model as a Gradio 6 page, a public `/chat` API and, on the same port,
# an OpenAI-compatible `/v1` API (chat completions, models).
#   python app.py                          # the built-in tiny demo model on http://127.0.0.1:7860
#   MODEL_SOURCE=demo:tuned python app.py  # SmolLM2 with the committed demo adapter (what `make demo` serves)
#   python app.py --model hf:owner/repo    # or MODEL_SOURCE=...: a local dir, git URL, openxlab:owner/repo
#   GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 python app.py    # what a Space runs
# Engine and server settings come from env vars (BACKEND, SESSION_LEN, MAX_BATCH_SIZE, QUANT_POLICY,
# QUEUE_SIZE, SYSTEM_PROMPT, MODEL_CACHE_DIR, API_KEYS, TRUST_REMOTE_CODE, ...): see infer_engine/settings.py.
# Flags override the env. A model that ships its own Python code (InternLM2.5) needs TRUST_REMOTE_CODE=1.
#   COMPARE_MODEL_SOURCE=hf:owner/base python app.py    # the page shows the base's replies beside the model's
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a Space or an offline box
# Tracebacks in the log without local variable values (loguru reads this at import): they can hold user
# text, keys or tokens.
os.environ.setdefault("LOGURU_DIAGNOSE", "False")
# Gradio reads GRADIO_SERVER_PORT when it is imported and dies with a traceback on "" or "http", and checks a
# port is free on GRADIO_SERVER_NAME as it was at import, whatever --host says: both values are kept away from
# it until main() has checked them against the flags (the app passes host and port to launch() itself).
_GRADIO_ENV = {name: os.environ.pop(name) for name in ("GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME")
               if name in os.environ}

from loguru import logger  # noqa: E402

from infer_engine.chat_format import PromptTooLongError  # noqa: E402
from infer_engine.engine import ChatEngine, create_engine  # noqa: E402
from infer_engine.lmdeploy_engine import one_card_settings  # noqa: E402
from infer_engine.model_source import (  # noqa: E402
    DEMO_MODEL_DIR,
    check_remote_code,
    parse_source,
    read_json_object,
    redact,
    resolve_model,
    stop_as_interrupt,
)
from infer_engine.openai_api import model_id, openai_routes  # noqa: E402
from infer_engine.settings import (  # noqa: E402
    BACKENDS,
    GenerationParams,
    ServerSettings,
    SettingsError,
    engine_settings_from_env,
    said_as,
    server_settings_from_env,
)
from infer_engine.smol_demo import display_name  # noqa: E402
from infer_engine.ui import Comparison, ModelInfo, build_ui, launch_options  # noqa: E402
from training.identity import IdentityError, IdentitySpec  # noqa: E402

MAX_ERROR_CHARS = 600  # of a loader's message: enough for its reason, not a wall


class InterceptHandler(logging.Handler):
    """Hands stdlib ``logging`` records (``infer_engine.model_source``, libraries) to loguru, which the app's
    own log uses: one stream, one format (loguru's documented recipe)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:  # report the real caller
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def route_std_logging() -> None:
    """Send stdlib logging to loguru: warnings from everyone, and ``infer_engine``'s info messages (e.g.
    "model ...: using cache (no network)"). Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(handler, InterceptHandler) for handler in root.handlers):
        root.addHandler(InterceptHandler())
    logging.getLogger("infer_engine").setLevel(logging.INFO)


def assistant_name(model_dir: Path) -> str | None:
    """The assistant's name a model trained by this project carries (training_meta.json's ``name``), if it is
    one the pipeline accepts; the page and ``/v1/models`` call the model by it, not by its directory
    (``merged`` for a work dir).

    Args:
        model_dir: the resolved local model directory.
    """
    try:
        return IdentitySpec(read_json_object(model_dir / "training_meta.json").get("name")).name
    except IdentityError:
        return None


def model_info(source: str, model_dir: Path) -> ModelInfo:
    """What the page says about the model: a short name, where it came from, whether it is the tiny demo.

    Args:
        source: the model source as given (empty = the built-in demo model).
        model_dir: the resolved local model directory.
    """
    if not source or model_dir.resolve() == DEMO_MODEL_DIR.resolve():
        return ModelInfo(name="Tiny demo model", source="built-in demo model", is_demo=True)
    if source.strip().startswith("demo:"):  # SmolLM2, with or without the committed demo adapter
        shown = source.strip()
        return ModelInfo(name=display_name(shown.removeprefix("demo:")), source=f"built-in demo {shown}")
    src = parse_source(source)
    where = Path(redact(src.location).rstrip("/")).name.removesuffix(".git") or "model"  # no @REV, no login
    return ModelInfo(name=assistant_name(model_dir) or where, source=src.public, is_demo=False)


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (a host that is no address of this machine, a port in
    use), found before any model loads; None when it can.

    Args:
        host: the interface (GRADIO_SERVER_NAME / --host).
        port: the TCP port (GRADIO_SERVER_PORT / --port).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        return f"the host {host!r} (GRADIO_SERVER_NAME or --host) is no name or address known here ({err})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            return (f"cannot listen on {host}:{port}: {err.strerror or err} (GRADIO_SERVER_NAME / --host, "
                    "GRADIO_SERVER_PORT / --port)")
    return None


def fetch_model(
    source: str, server: ServerSettings, trust_remote_code: bool, refresh: bool = False
) -> tuple[Path, ModelInfo]:
    """Resolve a model source to a checked local directory (else ``ModelSourceError``) and say what it is.

    Args:
        source: the model source as given (empty = the built-in demo model).
        server: the server settings (``cache_dir``).
        trust_remote_code: whether a model that ships its own Python code may be served.
        refresh: fetch a git, hf: or openxlab: source again even if it is cached.
    """
    model_dir = resolve_model(source or None, server.cache_dir, refresh=refresh)
    info = model_info(source, model_dir)
    check_remote_code(model_dir, trust_remote_code, "TRUST_REMOTE_CODE=1", info.name)
    return model_dir, info


def load_error(exc: BaseException) -> str:
    """A loader's exception as one line (transformers' can run to dozens), credentials scrubbed.

    Args:
        exc: what creating the engine raised.
    """
    text = " ".join(str(exc).split())
    text = text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}…"
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def system_prompt_problem(system_prompt: str, engines: Sequence[ChatEngine]) -> str | None:
    """Why ``SYSTEM_PROMPT`` would make every chat fail (None: a short question fits beside it and a reply
    of the default length, in every engine's session).

    Args:
        system_prompt: the operator's default system prompt ("" = none).
        engines: the engines that will answer with it.
    """
    if not system_prompt.strip():
        return None
    chat = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hi"}]
    for engine in engines:
        try:
            engine.fit_prompt(chat, engine.settings.default_params())
        except PromptTooLongError as exc:
            return (f"SYSTEM_PROMPT needs about {exc.needed} tokens with a short question, and SESSION_LEN="
                    f"{exc.session_len} leaves {exc.session_len - exc.max_new_tokens} beside the default "
                    f"reply of {exc.max_new_tokens}: shorten it or raise SESSION_LEN")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python app.py", description="Serve a chat model as a Gradio app.")
    parser.add_argument("--model", help="model source (overrides MODEL_SOURCE; empty = the demo model)")
    parser.add_argument("--host", help="interface to listen on (overrides GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides GRADIO_SERVER_PORT)")
    parser.add_argument("--backend", choices=BACKENDS, help="engine backend (overrides BACKEND)")
    parser.add_argument("--refresh", action="store_true",
                        help="fetch a git, hf: or openxlab: model again even if cached (after a new publish)")
    args = parser.parse_args(argv)

    route_std_logging()
    try:
        # A flag replaces its variable, which is then not read at all: a bad value there does not matter.
        overridden = {"MODEL_SOURCE": args.model, "GRADIO_SERVER_NAME": args.host,
                      "GRADIO_SERVER_PORT": args.port, "BACKEND": args.backend}
        env = {name: value for name, value in {**os.environ, **_GRADIO_ENV}.items()
               if overridden.get(name) is None}
        from_env = server_settings_from_env(env)
        flags = {"model_source": "--model", "host": "--host", "port": "--port"}
        server = said_as(flags, lambda: dataclasses.replace(
            from_env,
            model_source=from_env.model_source if args.model is None else args.model.strip(),
            host=args.host or from_env.host,
            port=from_env.port if args.port is None else args.port,
        ))
        engine_settings = engine_settings_from_env(env)
        if args.backend:
            engine_settings = dataclasses.replace(engine_settings, backend=args.backend)
    except SettingsError as exc:
        print(f"app.py: invalid setting: {exc}", file=sys.stderr)
        return 2
    problem = listen_problem(server.host, server.port)
    if problem:
        print(f"app.py: {problem}", file=sys.stderr)
        return 1
    reply_tokens = engine_settings.default_params().max_new_tokens
    if reply_tokens < GenerationParams().max_new_tokens:
        logger.warning(
            "SESSION_LEN={} is short: 'max new tokens' defaults to {} (not {}), half of it, leaving the "
            "other half to the conversation (the slider goes up to {})",
            engine_settings.session_len,
            reply_tokens,
            GenerationParams().max_new_tokens,
            engine_settings.max_reply_tokens,
        )

    started = time.perf_counter()
    sources = {"model": server.model_source}
    if server.compare_model_source:
        sources["compare model (COMPARE_MODEL_SOURCE)"] = server.compare_model_source
    for what, source in sources.items():  # a typo in the second source is said before the first downloads
        try:
            if source:
                parse_source(source)
        except ValueError as exc:
            print(f"app.py: cannot get the {what}: {exc}", file=sys.stderr)
            return 1
    models = []
    with stop_as_interrupt() as stopped:
        for what, source in sources.items():
            try:
                models.append(fetch_model(source, server, engine_settings.trust_remote_code, args.refresh))
            except ValueError as exc:  # ModelSourceError: bad source, LFS pointers, failed fetch, remote code
                print(f"app.py: cannot get the {what}: {exc}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the download stopped, nothing half-done was kept
                print(f"app.py: stopped while getting the {what}; start again to fetch it", file=sys.stderr)
                return 128 + stopped()
            logger.info("{}: {} ({})", what, models[-1][1].source, models[-1][0])
    # Two engines on one GPU share the KV-cache memory that one would take (no effect on transformers).
    each = one_card_settings(engine_settings, len(models))
    with contextlib.ExitStack() as engines:
        built = []
        for what, (model_dir, _), settings in zip(sources, models, each, strict=True):
            try:
                built.append(engines.enter_context(contextlib.closing(create_engine(model_dir, settings))))
            except SettingsError as exc:  # known only now: BACKEND=lmdeploy or DEVICE=cuda without a GPU
                print(f"app.py: invalid setting: {exc}", file=sys.stderr)
                return 2
            except Exception as exc:  # the files are there but do not load: bad JSON, cut or wrong weights
                print(f"app.py: cannot load the {what} from {model_dir}: {load_error(exc)}", file=sys.stderr)
                return 1
        engine, *compared = built
        problem = system_prompt_problem(server.system_prompt, [engine, *compared])
        if problem:
            print(f"app.py: invalid setting: {problem}", file=sys.stderr)
            return 2
        info = models[0][1]
        compare = Comparison(compared[0], models[1][1]) if compared else None
        demo = build_ui(engine, server, info, compare=compare)
        options = launch_options(engine, server, demo)
        # the OpenAI-compatible /v1 API on the same app and port, served before Gradio's own routes; it (and
        # /chat) serves the main model only
        options["app_kwargs"]["routes"] = openai_routes(engine, server, model_id(info.name))
        logger.info(
            "starting on http://{}:{}: engine {}, concurrency {}, queue size {}, {} server threads, "
            "model{} loaded in {:.1f}s",
            server.host,
            server.port,
            engine.name,
            engine.max_concurrency,
            server.queue_size,
            options["max_threads"],
            "s" if compare else "",
            time.perf_counter() - started,
        )
        try:
            demo.launch(**options)
        except OSError as exc:  # taken since listen_problem looked: "Cannot find empty port in range: ..."
            print(f"app.py: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr)
            return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
