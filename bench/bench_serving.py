# Serving speed on this machine, measured side by side in one run (what `make bench` runs):
#   .venv/bin/python -m bench.bench_serving [--model SOURCE] [--new-tokens 256] [--rounds 3]
#   .venv/bin/python -m bench.bench_serving --app-torch-threads 1 2     # compare apps' TORCH_THREADS
# Paths: raw `model.generate` vs the engine's `stream_chat` vs the `/chat` endpoint over HTTP (gradio_client
# against `python app.py` on 127.0.0.1, started here: one app per --app-torch-threads value, 0 = the app's
# default), then time to first token and aggregate tokens/s with 1, 4 and 8 concurrent HTTP clients per app.
# All decode the same greedy reply (checked on every run), with the served model's shapes and random weights
# (see `random_weights_copy`). Loopback only; bounded loops; ends by itself.
from __future__ import annotations

import argparse
import contextlib
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
TARGETS = {"engine": 0.95, "http": 0.8, "four_clients": 2.0}
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


def engine_reply(engine: ChatEngine, prompt: str, new_tokens: int) -> tuple[Run, str]:
    """Greedy reply through the engine, as the app calls it; return the timing and the text."""
    messages = [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    stream = engine.stream_chat(
        messages, GenerationParams(max_new_tokens=new_tokens, do_sample=False), "bench"
    )
    text, first = "", None
    for delta in stream:
        if first is None:
            first = time.perf_counter() - started
        text += delta
    return Run(stream.completion_tokens, time.perf_counter() - started, first), text


def raw_reply(model, tokenizer, prompt_ids: list[int], new_tokens: int) -> tuple[Run, str]:
    """Greedy ``model.generate`` of at most ``new_tokens`` tokens; return the timing and the text."""
    ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - started
    generated = out[0, ids.shape[1] :].tolist()
    return Run(len(generated), seconds, None), tokenizer.decode(generated, skip_special_tokens=True)


def http_reply(client: Client, prompt: str, new_tokens: int, tokens: int) -> tuple[Run, str]:
    """Greedy reply streamed from ``/chat`` (``Client.submit``); ``tokens``: what the engine decodes.

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


def concurrent_http(url: str, clients: int, prompt: str, tokens: int, expected: str) -> list[Run]:
    """``clients`` clients (own sessions) send the same greedy request at once; return each one's run.

    Also returns through ``Run.seconds`` the wall time of the whole group (the same for every client).
    Every reply must be ``expected`` (the engine's text).
    """
    connections = [Client(url, verbose=False) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    results: list[Run | None] = [None] * clients

    def one(i: int) -> None:
        barrier.wait()
        run, text = http_reply(connections[i], prompt, tokens, tokens)
        if text == expected:
            results[i] = run

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - started
    for connection in connections:
        connection.close()
    if any(r is None for r in results):
        raise RuntimeError(
            f"{sum(r is None for r in results)} of {clients} concurrent requests did not finish "
            "or decoded another reply"
        )
    return [Run(r.tokens, wall, r.first_token_s) for r in results]


def median_run(runs: Sequence[Run]) -> Run:
    """The run with the median tokens/s (its own first-token time kept)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def report(runs: dict[str, list[Run]], groups: dict[str, dict[int, list[Run]]], tokens: int) -> None:
    """Print both tables and the ratios against the targets.

    Args:
        runs: timed single-stream runs per path (``raw``, ``engine``, one ``http ...`` per app).
        groups: per app, per client count, each client's run (``seconds`` = the group's wall time).
        tokens: tokens decoded per reply.
    """
    best = {name: median_run(r) for name, r in runs.items()}
    raw = best["raw"].tokens_per_s
    print(f"\nsingle stream, median of {len(runs['raw'])} rounds, {tokens} tokens per reply")
    print(f"{'path':<26}{'tok/s':>9}{'seconds':>9}{'first token ms':>16}{'x raw':>8}")
    labels = {"raw": "raw model.generate", "engine": "engine stream_chat"}
    for name, run in best.items():
        ratio = run.tokens_per_s / raw
        label = labels.get(name, f"HTTP /chat, {name}")
        print(f"{label:<26}{run.tokens_per_s:>9.1f}{run.seconds:>9.3f}{ms(run.first_token_s):>16}{ratio:>8.2f}")

    aggregate = {
        app: {n: sum(r.tokens for r in group) / group[0].seconds for n, group in by_count.items()}
        for app, by_count in groups.items()
    }
    for app, by_count in groups.items():
        print(f"\nconcurrent HTTP clients, {app}, {tokens} tokens each")
        print(f"{'clients':<9}{'aggregate tok/s':>16}{'wall s':>9}{'median first token ms':>23}{'x one':>8}")
        for n, group in by_count.items():
            first = ms(statistics.median(r.first_token_s for r in group))
            speedup = aggregate[app][n] / aggregate[app][1]
            print(f"{n:<9}{aggregate[app][n]:>16.1f}{group[0].seconds:>9.2f}{first:>23}{speedup:>8.2f}")

    print("\ntargets")
    ratios = {"engine / raw": ("engine", best["engine"].tokens_per_s / raw)}
    for app in groups:
        ratios[f"HTTP / raw, {app}"] = ("http", best[app].tokens_per_s / raw)
        ratios[f"4 clients / 1, {app}"] = ("four_clients", aggregate[app][4] / aggregate[app][1])
    for label, (key, value) in ratios.items():
        outcome = "PASS" if value >= TARGETS[key] else "MISS"
        print(f"{label:<30}{value:>6.2f}  target >= {TARGETS[key]}: {outcome}")


def app_label(threads: int) -> str:
    return "app default threads" if threads == 0 else f"app TORCH_THREADS={threads}"


def measure(
    model_dir: Path, new_tokens: int, rounds: int, log_dir: Path, app_threads: Sequence[int]
) -> tuple[dict[str, list[Run]], dict[str, dict[int, list[Run]]], int]:
    """Time the paths side by side, then the concurrent clients per app; return (runs, groups, tokens).

    Args:
        model_dir: the model to serve and to load raw.
        new_tokens: greedy tokens per reply (at most).
        rounds: timed rounds per path.
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
            clients = {app: Client(url, verbose=False) for app, url in urls.items()}
            paths: dict[str, Callable[[], tuple[Run, str]]] = {
                "raw": lambda: raw_reply(model, tokenizer, prompt_ids, tokens),
                "engine": lambda: engine_reply(engine, prompt, tokens),
            }
            for app, client in clients.items():
                paths[app] = lambda client=client: http_reply(client, prompt, tokens, tokens)
            runs: dict[str, list[Run]] = {name: [] for name in paths}
            for round_ in range(rounds + 1):  # round 0 warms up; interleaved, so load hits every path alike
                for name, path in paths.items():
                    run, text = path()
                    if run.tokens != tokens or text != engine_text:  # every path decodes the very same reply
                        raise RuntimeError(
                            f"the {name} path decoded a different reply: the comparison would be unfair"
                        )
                    if round_:
                        runs[name].append(run)
            for client in clients.values():
                client.close()
            groups = {
                app: {n: concurrent_http(url, n, prompt, tokens, engine_text) for n in CLIENT_COUNTS}
                for app, url in urls.items()
            }
    finally:
        engine.close()
    return runs, groups, tokens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_serving", description="Serving speed: raw vs engine vs HTTP."
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL_SOURCE", ""),
        help="model source (default MODEL_SOURCE, else the embedded demo model)",
    )
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per reply (at most)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path (median reported)")
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
        print(f"cpu count: {os.cpu_count()}, usable cores: {len(os.sched_getaffinity(0))}")
        app_threads = list(dict.fromkeys(args.app_torch_threads))
        runs, groups, tokens = measure(model_dir, args.new_tokens, args.rounds, Path(tmp), app_threads)
    report(runs, groups, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
