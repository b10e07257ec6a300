# Serving speed on this machine, measured side by side in one run (what `make bench` runs):
#   .venv/bin/python -m bench.bench_serving [--model SOURCE] [--new-tokens 256] [--rounds 5]
#   .venv/bin/python -m bench.bench_serving --app-torch-threads 1 2     # compare apps' TORCH_THREADS
# Paths: raw `model.generate`, the engine's `stream_chat` in process, and over HTTP against `python app.py`
# on 127.0.0.1 (started here: one app per --app-torch-threads value, 0 = the app's default) the OpenAI-style
# `/v1/chat/completions` as server-sent events (httpx) and Gradio's `/chat` (gradio_client). Each with 1, 4
# and 8 concurrent clients (raw: one batched `generate` of that many rows): aggregate tokens/s and time to the
# first token, then PASS/MISS per target. All decode the same greedy reply (checked on every run), with the
# served model's shapes and random weights (see `random_weights_copy`). Loopback only, bounded.
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from gradio_client import Client
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from infer_engine.chat_format import encode_chat
from infer_engine.engine import ChatEngine, create_engine
from infer_engine.model_source import resolve_model
from infer_engine.settings import EngineSettings, GenerationParams

REPO = Path(__file__).resolve().parents[1]
CANDIDATE_PROMPTS = (  # the longest greedy answer among these is used
    "请介绍一下你自己",
    "Tell me a very long story about the sea.",
    "写一篇关于春天的长文章。",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
)
CLIENT_COUNTS = (1, 4, 8)
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class Run:
    """One timed reply: tokens decoded, wall seconds, seconds to the first token (None: not observed)."""

    tokens: int
    seconds: float
    first_token_s: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(
    model_source: str,
    log_path: Path,
    timeout_s: float = START_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``python app.py`` on a free 127.0.0.1 port; yield its URL once it serves; stop it on exit.

    Args:
        model_source: what the app serves (``MODEL_SOURCE``; empty = the embedded demo model).
        log_path: file that receives the app's stdout and stderr.
        timeout_s: most seconds to wait for the app to serve.
        extra_env: more environment variables for the app (e.g. ``TORCH_THREADS``, ``MAX_BATCH_SIZE``).
    """
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "MODEL_SOURCE": model_source,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}/"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"app.py exited with code {process.returncode}; log:\n{log_path.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"app.py not serving {url} after {timeout_s:.0f}s; log:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def random_weights_copy(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """Save ``model_dir``'s model with fresh random weights (same shapes, tokenizer, template) to ``out``.

    A trained tiny model ends its answers after a few tokens even when sampled hot. Here the output rows of
    the end tokens are zeroed: their logit is always 0 while the largest of the other random logits is
    positive, so greedy replies run to ``max_new_tokens`` whatever the batch. Decode speed depends on the
    shapes only, so this measures the served model's speed, and gives tests a reply long enough to stop.

    Args:
        model_dir: the model whose architecture and tokenizer to copy.
        out: directory to create.
        seed: torch seed for the weights: the same seed gives the same model (and greedy replies).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    with torch.no_grad():
        model.get_output_embeddings().weight[sorted(end_ids)] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (model_dir / "generation_config.json").exists():  # the served eos ids, not ones derived from config
        shutil.copy(model_dir / "generation_config.json", out / "generation_config.json")
    return out


def engine_reply(
    engine: ChatEngine, prompt: str, new_tokens: int, session_id: str = "bench"
) -> tuple[Run, str]:
    """Greedy reply through the engine, as the app calls it; return the timing and the text."""
    messages = [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    stream = engine.stream_chat(
        messages, GenerationParams(max_new_tokens=new_tokens, do_sample=False), session_id
    )
    text, first = "", None
    for delta in stream:
        if first is None:
            first = time.perf_counter() - started
        text += delta
    return Run(stream.completion_tokens, time.perf_counter() - started, first), text


def raw_batch(model, tokenizer, prompt_ids: list[int], new_tokens: int, rows: int) -> tuple[list[Run], str]:
    """Greedy ``model.generate`` of ``rows`` copies of the prompt at once (one "client" per row); return each
    row's run and row 0's text. The first token is timed by a separate one-token ``generate`` (prefill + one
    step), since ``generate`` reports nothing before it ends."""
    ids = torch.tensor([prompt_ids] * rows)
    options = {"attention_mask": torch.ones_like(ids), "do_sample": False}
    options["pad_token_id"] = tokenizer.pad_token_id
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **options)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **options)
        seconds = time.perf_counter() - started
    generated = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return [Run(len(generated), seconds, first) for _ in range(rows)], text


def sse_reply(http: httpx.Client, url: str, prompt: str, new_tokens: int) -> tuple[Run, str]:
    """Greedy reply streamed from ``/v1/chat/completions`` as server-sent events; tokens from its usage."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces, first, tokens = [], None, 0
    started = time.perf_counter()
    with http.stream("POST", url + "v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            piece = event["choices"][0]["delta"].get("content") if event["choices"] else None
            if piece:
                first = first or time.perf_counter() - started
                pieces.append(piece)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Run(tokens, time.perf_counter() - started, first), "".join(pieces)


def chat_reply(client: Client, prompt: str, new_tokens: int, tokens: int) -> tuple[Run, str]:
    """Greedy reply streamed from Gradio's ``/chat`` (``Client.submit``); ``tokens``: what the engine decodes.

    The first streamed text is awaited by polling every 2 ms, the rest with a blocking ``result()``:
    gradio_client's job iterator polls every 1 ms throughout, which on a small box slows the server measured.
    """
    started = time.perf_counter()
    job = client.submit(prompt, max_new_tokens=new_tokens, do_sample=False, api_name="/chat")
    deadline = started + REQUEST_TIMEOUT_S
    while not job.outputs() and not job.done() and time.perf_counter() < deadline:
        time.sleep(0.002)
    first = time.perf_counter() - started
    text = job.result(timeout=REQUEST_TIMEOUT_S)
    return Run(tokens, time.perf_counter() - started, first), text


def chat_http_reply(
    http: httpx.Client, url: str, prompt: str, new_tokens: int, tokens: int
) -> tuple[Run, str]:
    """Greedy reply streamed from Gradio's ``/chat`` over its plain HTTP API (``POST /gradio_api/call/chat``,
    then its server-sent events), without gradio_client: the server's share of the ``/chat`` time."""
    data = [prompt, None, "", new_tokens, 0.8, 0.8, 40, False]  # /chat's parameters, do_sample last
    started = time.perf_counter()
    event_id = (
        http.post(url + "gradio_api/call/chat", json={"data": data}).raise_for_status().json()["event_id"]
    )
    first, text, kind = None, "", ""
    with http.stream("GET", url + f"gradio_api/call/chat/{event_id}", timeout=REQUEST_TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind in ("generating", "complete"):
                text = json.loads(line[6:])[0]
                first = first or (time.perf_counter() - started if text else None)
                if kind == "complete":
                    break
            elif line.startswith("data: ") and kind == "error":
                raise RuntimeError(f"/chat failed: {line[6:]}")
    return Run(tokens, time.perf_counter() - started, first), text


def pick_prompt(engine: ChatEngine, new_tokens: int) -> tuple[str, int, str]:
    """The candidate prompt with the longest greedy answer (at most ``new_tokens``): prompt, tokens, text.

    Greedy decoding gives the same tokens on every path, so every path is asked for exactly that many: the
    reply ends there on its own (``measure`` checks each path's tokens and text against the engine's).
    """
    best = ("", -1, "")
    for prompt in CANDIDATE_PROMPTS:
        run, text = engine_reply(engine, prompt, new_tokens)
        if run.tokens > best[1]:
            best = (prompt, run.tokens, text)
        if run.tokens == new_tokens:
            break
    return best


def together(replies: Sequence[Callable[[], tuple[Run, str]]]) -> tuple[list[Run], list[str]]:
    """Run the replies at once, one thread each, released together; return each one's run (``seconds`` = the
    wall time of the whole group) and text."""
    barrier = threading.Barrier(len(replies) + 1)
    results: list[tuple[Run, str] | None] = [None] * len(replies)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = replies[i]()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(replies))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - started
    if any(r is None for r in results):
        raise RuntimeError(f"{sum(r is None for r in results)} of {len(replies)} concurrent replies failed")
    return [Run(run.tokens, wall, run.first_token_s) for run, _ in results], [text for _, text in results]


ClientsPath = Callable[[int], tuple[list[Run], list[str]]]  # n clients at once -> each one's run and text


@dataclass(frozen=True)
class Result:
    """One path at one client count over the rounds: the best aggregate tokens/s and the best first token
    (the clients' median). Best, not median: other work on a shared machine only ever slows a round down, so
    the least disturbed round is the closest to the path's own speed (``timeit`` reasons the same way)."""

    tokens_per_s: float
    first_token_s: float | None


def summarise(groups: Sequence[Sequence[Run]]) -> Result:
    """Best aggregate tokens/s (tokens of all clients / the group's wall time) and best median first token."""
    rate = max(sum(r.tokens for r in g) / g[0].seconds for g in groups)
    firsts = [statistics.median(f) for g in groups if (f := [r.first_token_s for r in g if r.first_token_s])]
    return Result(rate, min(firsts) if firsts else None)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def targets(results: dict[str, dict[int, Result]], apps: Sequence[str]) -> list[tuple[str, float, str, bool]]:
    """(label, value, target, met) for each serving target (issue 9), per app."""
    raw, engine = results["raw"][1], results["engine"][1]
    rows = [("engine / raw, 1 client", engine.tokens_per_s / raw.tokens_per_s, ">=", 0.95)]
    for app in apps:
        sse = results[f"SSE, {app}"]
        over = (sse[1].first_token_s or math.inf) - (engine.first_token_s or 0.0)
        rows += [
            (f"SSE / engine, 1 client, {app}", sse[1].tokens_per_s / engine.tokens_per_s, ">=", 0.95),
            (f"SSE first token - engine's (ms), {app}", over * 1000, "<=", 10),
            (f"SSE 8 clients / 1 client, {app}", sse[8].tokens_per_s / sse[1].tokens_per_s, ">=", 4),
        ]
        for chat in ("/chat gradio_client", "/chat HTTP"):
            ratio = results[f"{chat}, {app}"][1].tokens_per_s / raw.tokens_per_s
            rows.append((f"{chat} / raw, 1 client, {app}", ratio, ">=", 0.8))
    return [
        (label, value, f"{op} {goal}", value >= goal if op == ">=" else value <= goal)
        for label, value, op, goal in rows
    ]


def report(results: dict[str, dict[int, Result]], apps: Sequence[str], tokens: int, rounds: int) -> None:
    """Print the table (per client count: every path's aggregate tokens/s and first token) and the targets."""
    print(f"\n{tokens} greedy tokens per reply, best of {rounds} rounds, first token: the clients' median")
    print(f"{'clients':<8}{'path':<36}{'tok/s':>9}{'first token ms':>16}{'x raw':>7}{'x 1 client':>12}")
    for n in CLIENT_COUNTS:
        raw = results["raw"][n].tokens_per_s
        for name, by_count in results.items():
            result = by_count[n]
            scale = result.tokens_per_s / by_count[1].tokens_per_s
            label = {"raw": "raw model.generate (batched)", "engine": "engine stream_chat"}.get(name, name)
            print(
                f"{n:<8}{label:<36}{result.tokens_per_s:>9.1f}{ms(result.first_token_s):>16}"
                f"{result.tokens_per_s / raw:>7.2f}{scale:>12.2f}"
            )
    print("\ntargets")
    for label, value, goal, met in targets(results, apps):
        print(f"{label:<44}{value:>8.2f}  target {goal}: {'PASS' if met else 'MISS'}")


def app_label(threads: int) -> str:
    return "app" if threads == 0 else f"app TORCH_THREADS={threads}"


def measure(
    model_dir: Path, new_tokens: int, rounds: int, log_dir: Path, app_threads: Sequence[int]
) -> tuple[dict[str, dict[int, Result]], list[str], int]:
    """Time every path at every client count, interleaved round by round so that load hits all alike.

    Returns the results per path and client count, the app labels and the tokens per reply.

    Args:
        model_dir: the model to serve and to load raw.
        new_tokens: greedy tokens per reply (at most).
        rounds: timed rounds per path and client count (after one warm-up round).
        log_dir: where the apps' logs go.
        app_threads: one app per value, started with that ``TORCH_THREADS`` (0 = the app's default).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = create_engine(model_dir, EngineSettings(backend="transformers"))  # sets torch threads first
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        prompt, tokens, engine_text = pick_prompt(engine, new_tokens)
        ends = "" if tokens == new_tokens else f" (the model ends its answer there, not at {new_tokens})"
        print(f"prompt: {prompt!r} -> {tokens} greedy tokens on every path{ends}")
        print(f"torch threads in this process (raw, engine): {torch.get_num_threads()}")
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        with contextlib.ExitStack() as stack:
            urls = {
                app_label(n): stack.enter_context(
                    serve_app(
                        str(model_dir),
                        log_dir / f"app-{n}.log",
                        extra_env={"TORCH_THREADS": str(n)} if n else None,
                    )
                )
                for n in app_threads
            }

            def engine_path(n: int) -> tuple[list[Run], list[str]]:
                return together([functools.partial(engine_reply, engine, prompt, tokens, f"bench-{i}")
                                 for i in range(n)])  # fmt: skip

            def sse_path(url: str, n: int) -> tuple[list[Run], list[str]]:
                with contextlib.ExitStack() as clients:
                    https = [clients.enter_context(httpx.Client()) for _ in range(n)]
                    return together([functools.partial(sse_reply, h, url, prompt, tokens) for h in https])

            def chat_http_path(url: str, n: int) -> tuple[list[Run], list[str]]:
                with contextlib.ExitStack() as clients:
                    https = [clients.enter_context(httpx.Client()) for _ in range(n)]
                    replies = [
                        functools.partial(chat_http_reply, h, url, prompt, tokens, tokens) for h in https
                    ]
                    return together(replies)

            def chat_path(url: str, n: int) -> tuple[list[Run], list[str]]:
                clients = [Client(url, verbose=False) for _ in range(n)]  # connects before the clock starts
                try:
                    replies = [functools.partial(chat_reply, c, prompt, tokens, tokens) for c in clients]
                    return together(replies)
                finally:
                    for client in clients:
                        client.close()

            def raw_path(n: int) -> tuple[list[Run], list[str]]:
                runs, text = raw_batch(model, tokenizer, prompt_ids, tokens, n)
                return runs, [text] * n

            paths: dict[str, ClientsPath] = {"raw": raw_path, "engine": engine_path}
            for app, url in urls.items():
                paths[f"SSE, {app}"] = functools.partial(sse_path, url)
                paths[f"/chat gradio_client, {app}"] = functools.partial(chat_path, url)
                paths[f"/chat HTTP, {app}"] = functools.partial(chat_http_path, url)
            groups: dict[str, dict[int, list[list[Run]]]] = {p: {n: [] for n in CLIENT_COUNTS} for p in paths}
            for round_ in range(rounds + 1):  # round 0 warms up
                for n in CLIENT_COUNTS:
                    for name, path in paths.items():
                        runs, texts = path(n)
                        if any(r.tokens != tokens for r in runs) or any(t != engine_text for t in texts):
                            raise RuntimeError(
                                f"the {name} path decoded another reply with {n} clients: the comparison "
                                "would be unfair"
                            )
                        if round_:
                            groups[name][n].append(runs)
    finally:
        engine.close()
    results = {name: {n: summarise(g) for n, g in by_count.items()} for name, by_count in groups.items()}
    return results, list(urls), tokens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_serving", description="Serving speed: raw vs engine vs SSE vs /chat."
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL_SOURCE", ""),
        help="model source (default MODEL_SOURCE, else the embedded demo model)",
    )
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per reply (at most)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path (the best is reported)")
    parser.add_argument(
        "--app-torch-threads",
        type=int,
        nargs="+",
        default=[0],
        help="start one app per value with that TORCH_THREADS, measured side by side (0 = app default)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.new_tokens <= 2048:
        parser.error("--rounds must be 1-20 and --new-tokens 1-2048")
    if not all(0 <= n <= 256 for n in args.app_torch_threads) or len(set(args.app_torch_threads)) > 3:
        parser.error("--app-torch-threads takes up to 3 values, each 0-256")

    served = resolve_model(args.model or None)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_weights_copy(served, Path(tmp) / "model")
        print(f"model: shapes and tokenizer of {served}, random weights (see random_weights_copy)")
        print(f"cpu count: {os.cpu_count()}, usable cores: {len(os.sched_getaffinity(0))}, "
              f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
        app_threads = list(dict.fromkeys(args.app_torch_threads))
        results, apps, tokens = measure(model_dir, args.new_tokens, args.rounds, Path(tmp), app_threads)
    report(results, apps, tokens, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
