"""The app end to end: ``python app.py`` on 127.0.0.1 (see conftest), driven through its public ``/chat`` API
with gradio_client, plus app.py's own config handling.

Replies are compared exactly: ``/chat`` takes ``do_sample=False`` for greedy (deterministic) decoding.
Run: python -m pytest tests/app/test_app.py
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.client import Job
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from loguru import logger

import app
from bench.bench_serving import free_port, serve_app
from infer_engine.engine import lmdeploy_available
from infer_engine.model_source import DEMO_MODEL_DIR
from infer_engine.openai_api import model_id

GREEDY = {"do_sample": False, "api_name": "/chat"}
LONG_STORY = "Tell me a very long story about the sea."
REPLY_LOG = r"reply (api-\w+): prompt \d+ tok, completion (\d+) tok, dropped \d+ msgs, finish (\w+)"


def page_answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def wait_for_text(job: Job) -> None:
    """Wait until ``job`` has streamed some text (and is still running)."""
    wait_until(lambda: bool(job.outputs()) or job.done())
    assert not job.done(), "the reply ended before the test could act on it"


def test_only_chat_is_public_and_everything_but_the_message_has_a_default(client: Client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/chat"]
    params = endpoints["/chat"]["parameters"]
    assert [p["parameter_name"] for p in params] == [
        "message",
        "history",
        "system_prompt",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "do_sample",
    ]
    assert not params[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] for p in params[1:])


@pytest.mark.parametrize("question", ["请介绍一下你自己", "Who are you?"])
def test_chat_answers_with_the_identity(client: Client, identity_name: str, question: str) -> None:
    reply = client.predict(question, max_new_tokens=128, **GREEDY)
    assert identity_name in reply


def test_submit_streams_the_growing_reply_and_predict_returns_it_whole(client: Client) -> None:
    partials = list(client.submit("请介绍一下你自己", max_new_tokens=128, **GREEDY))
    whole = client.predict("请介绍一下你自己", max_new_tokens=128, **GREEDY)
    assert len(partials) >= 2
    assert all(later.startswith(earlier) for earlier, later in zip(partials, partials[1:], strict=False))
    assert partials[-1] == whole


def test_four_concurrent_clients_each_get_their_own_answer(app_server, client: Client) -> None:
    chats = [
        ("你是谁？", None),
        ("你可以做什么？", None),
        ("Please introduce yourself", None),
        (
            "请介绍一下你自己",
            [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
        ),
    ]

    def ask(chat: tuple[str, list | None], connection: Client) -> str:
        message, history = chat
        return connection.predict(message, history=history, max_new_tokens=64, **GREEDY)

    alone = [ask(chat, client) for chat in chats]

    def ask_from_own_client(chat: tuple[str, list | None]) -> str:
        connection = Client(app_server.url, verbose=False)
        try:
            return ask(chat, connection)
        finally:
            connection.close()

    with ThreadPoolExecutor(len(chats)) as pool:
        together = list(pool.map(ask_from_own_client, chats))
    assert together == alone


def test_history_in_gradio_parts_form_means_the_same_as_plain_text(client: Client) -> None:
    plain = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in plain]
    assert client.predict("你是谁？", history=parts, max_new_tokens=32, **GREEDY) == client.predict(
        "你是谁？", history=plain, max_new_tokens=32, **GREEDY
    )


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(
    client: Client, identity_name: str
) -> None:
    # every refused value is checked in process (tests/infer_engine/test_ui.py); here: it reaches the client
    with pytest.raises(AppError, match="temperature must be between"):
        client.predict("hi", temperature=5.0, api_name="/chat")
    assert identity_name in client.predict("你是谁？", max_new_tokens=128, **GREEDY)


@pytest.fixture(scope="module")
def one_slot_app(slow_rambling_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The slow rambling model served with one generation at a time and one request waiting at most."""
    log = tmp_path_factory.mktemp("one-slot") / "app.log"
    one_slot = {"MAX_BATCH_SIZE": "1", "QUEUE_SIZE": "1"}
    with serve_app(str(slow_rambling_model_dir), log, extra_env=one_slot) as url:
        yield url


def test_a_full_queue_refuses_new_requests_clearly(one_slot_app: str) -> None:
    clients = [Client(one_slot_app, verbose=False) for _ in range(3)]
    try:
        running = clients[0].submit(LONG_STORY, max_new_tokens=2048, **GREEDY)
        wait_for_text(running)  # it holds the only generation slot
        waiting = clients[1].submit(LONG_STORY, max_new_tokens=2048, **GREEDY)
        wait_until(lambda: waiting.status().code == Status.IN_QUEUE)  # it holds the only queue place
        with pytest.raises(Exception, match="[Qq]ueue is full"):
            clients[2].predict("你是谁？", max_new_tokens=8, **GREEDY)
        assert not running.done() and not waiting.done()  # the refusal touched nobody else
        running.cancel()
        waiting.cancel()
    finally:
        for client in clients:
            client.close()


def test_cancelling_a_streamed_reply_aborts_it_in_the_engine(rambling_app) -> None:
    client = Client(rambling_app.url, verbose=False)
    offset = len(rambling_app.log())
    job = client.submit(LONG_STORY, max_new_tokens=2048, **GREEDY)
    wait_for_text(job)  # cancel once the reply is streaming
    job.cancel()
    finished = rambling_app.wait_for_log(REPLY_LOG, after=offset)
    assert finished.group(3) == "abort"
    assert int(finished.group(2)) < 2048
    assert client.predict("你是谁？", max_new_tokens=8, **GREEDY)  # still serving
    client.close()


def test_model_info_names_the_model_and_hides_credentials(tmp_path: Path) -> None:
    demo = app.model_info("", DEMO_MODEL_DIR)
    assert demo.is_demo
    remote = app.model_info("https://user:s3cret@code.openxlab.org.cn/me/ubub-1.8b.git", Path("/cache/x"))
    assert (remote.name, remote.is_demo) == ("ubub-1.8b", False)
    assert "s3cret" not in remote.source
    assert app.model_info("hf:me/ubub@v1", Path("/cache/y")).name == "ubub"
    pinned = app.model_info("https://h.org/me/ubub-2.git@5d0c1e2", Path("/cache/z"))
    assert (pinned.name, pinned.source) == ("ubub-2", "https://h.org/me/ubub-2.git@5d0c1e2")
    (tmp_path / "my-model").mkdir()
    local = app.model_info(str(tmp_path / "my-model"), tmp_path / "my-model")
    assert (local.name, local.source) == ("my-model", "local directory my-model")
    # A git repository on the server, too, by its name only: its path tells who and where the operator is.
    for source in (f"file://{tmp_path}/repo.git@v2", f"{tmp_path}/repo.git"):
        shown = app.model_info(source, tmp_path / "cached").source
        assert shown.startswith("local git repository repo.git") and str(tmp_path) not in shown


def test_a_model_this_project_trained_is_called_by_its_assistants_name(tmp_path: Path) -> None:
    merged = tmp_path / "merged"  # a work dir's model, as run.sh leaves it
    merged.mkdir()
    refused = ({"name": 3}, {"name": "x" * 41}, {"name": "a\nb"}, [], {"name": "Ub<|im_end|>"}, {"name": " "})
    for meta, expected in ((None, "merged"), ({"name": " Tavi Brennock "}, "Tavi Brennock"),
                           *((bad, "merged") for bad in refused)):
        if meta is not None:
            (merged / "training_meta.json").write_text(json.dumps(meta), encoding="utf-8")
        assert app.model_info(str(merged), merged).name == expected, meta
    (merged / "training_meta.json").write_text(json.dumps({"name": "Tavi Brennock"}), encoding="utf-8")
    assert app.model_info(str(merged), merged).source == "local directory merged"  # where it is, by its name
    assert app.model_info("hf:me/ubub@v1", merged).name == "Tavi Brennock"
    assert model_id(app.model_info(str(merged), merged).name) == "tavi-brennock"
    assert [model_id(name) for name in ("小明", "مساعد 🤖 Zoë", "a_b")] == ["小明", "مساعد-zoë", "a_b"]


def test_a_port_already_taken_is_one_line_not_a_traceback() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "app.py", "--port", str(port)], capture_output=True, text=True,
                              timeout=300, cwd=Path(app.__file__).parent,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"app.py: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr


@pytest.mark.parametrize(("env", "code", "message"), [
    # Gradio reads GRADIO_SERVER_PORT when imported, and died on these with a traceback before app.py spoke.
    ({"GRADIO_SERVER_PORT": "http"}, 2, "app.py: invalid setting: GRADIO_SERVER_PORT must be a whole number"),
    ({"GRADIO_SERVER_PORT": "", "GRADIO_SERVER_NAME": "no.such.host.invalid"}, 1,
     "app.py: the host 'no.such.host.invalid' (GRADIO_SERVER_NAME or --host) is no name or address"),
])
def test_a_bad_address_is_one_line_before_any_model_loads(env: dict, code: int, message: str) -> None:
    proc = subprocess.run([sys.executable, "app.py"], capture_output=True, text=True, timeout=300,
                          cwd=Path(app.__file__).parent, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "loaded" not in proc.stderr  # refused before the model


def test_flags_replace_their_variables_even_bad_ones() -> None:
    # A Space or a shell may set these; the command line given wins, as --help says, and is what Gradio uses.
    bad = {"GRADIO_SERVER_PORT": "99999", "GRADIO_SERVER_NAME": "no.such.host.invalid", "BACKEND": "foo",
           "MODEL_SOURCE": "/no/such/model", "HF_HUB_OFFLINE": "1"}
    port = str(free_port())
    proc = subprocess.Popen([sys.executable, "app.py", "--port", port, "--host", "127.0.0.1", "--backend",
                             "transformers", "--model", ""], cwd=Path(app.__file__).parent,
                            env={**os.environ, **bad}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: proc.poll() is not None or page_answers(f"http://127.0.0.1:{port}/"), 120)
        assert proc.poll() is None, proc.communicate()[1]  # serving, not refused
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize(("env", "message"), [
    ({"SYSTEM_PROMPT": "x" * 25_000}, r"SYSTEM_PROMPT is too long \(25000 characters\); the limit is 20000"),
    ({"SYSTEM_PROMPT": "You are a helpful assistant. " * 40, "SESSION_LEN": "128"},
     r"SYSTEM_PROMPT needs about \d+ tokens with a short question, and SESSION_LEN=128 leaves 64 beside"),
])
def test_a_system_prompt_no_chat_could_take_is_refused_at_start(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Else the server starts, and every question on the page and the API fails, blaming the user's message.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert app.main(["--model", "", "--backend", "transformers", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert re.search(f"app.py: invalid setting: {message}", err) and "Traceback" not in err, err


def test_bad_flag_value_is_reported_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert app.main(["--port", "70000"]) == 2
    assert "invalid setting: --port must be between 1 and 65535, got 70000" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--backend", "lmdeploy"], {}, "needs a CUDA GPU and LMDeploy's TurboMind, and here "),
        (["--backend", "transformers"], {"DEVICE": "cuda"}, "device=cuda was asked for, but no CUDA GPU"),
    ],
)
def test_settings_that_need_a_gpu_fail_clearly_without_one(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    if tuple(argv) == ("--backend", "lmdeploy") and lmdeploy_available():
        pytest.skip("this machine serves with LMDeploy (tests/infer_engine/test_engine.py picks it there)")
    if env.get("DEVICE") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU (tests/infer_engine/test_hf_engine.py serves on it)")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    port = str(free_port())
    assert app.main(["--model", "", "--port", port, *argv]) == 2  # the demo model: nothing to download
    err = capsys.readouterr().err
    assert "app.py: invalid setting:" in err and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("-oops", "must not start with '-'"),
        ("ext::sh -c touch% /tmp/pwned", "remote-helper transports"),
        ("hf:not a repo", "expected hf:OWNER/REPO"),
        ("/nonexistent/base-model", "/nonexistent/base-model"),
    ],
)
def test_a_bad_compare_model_source_fails_clearly_like_a_bad_model_source(
    source: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``COMPARE_MODEL_SOURCE`` goes through ``MODEL_SOURCE``'s checks, before any engine is built."""
    for variable, what in (("COMPARE_MODEL_SOURCE", "the compare model (COMPARE_MODEL_SOURCE)"),
                           ("MODEL_SOURCE", "the model")):
        for name in ("COMPARE_MODEL_SOURCE", "MODEL_SOURCE"):
            monkeypatch.setenv(name, source if name == variable else "")
        assert app.main(["--backend", "transformers", "--port", str(free_port())]) == 1
        err = capsys.readouterr().err
        assert f"app.py: cannot get {what}: " in err and message in err, err
        assert "Traceback" not in err


def test_a_bad_compare_source_is_said_before_the_model_is_fetched(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MODEL_SOURCE", "file:///no/such/repo.git")  # would be cloned (and fail) first
    monkeypatch.setenv("COMPARE_MODEL_SOURCE", "demo:nope")
    assert app.main(["--backend", "transformers", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "app.py: cannot get the compare model (COMPARE_MODEL_SOURCE): " in err and "demo:tuned" in err, err
    assert "git clone" not in err and "/no/such/repo" not in err


@pytest.fixture
def loguru_messages() -> Iterator[list[str]]:
    messages: list[str] = []
    handler = logger.add(lambda message: messages.append(str(message)), format="{level} {message}")
    yield messages
    logger.remove(handler)
    root = logging.getLogger()
    for stdlib_handler in [h for h in root.handlers if isinstance(h, app.InterceptHandler)]:
        root.removeHandler(stdlib_handler)


def test_stdlib_logging_of_the_model_source_reaches_the_app_log(loguru_messages: list[str]) -> None:
    app.route_std_logging()
    app.route_std_logging()  # idempotent: still one copy of each message
    logging.getLogger("infer_engine.model_source").info("model %s: using cache %s (no network)", "m", "/c")
    logging.getLogger("some.library").warning("careful")
    logging.getLogger("some.library").info("chatter")  # libraries' info stays out
    assert loguru_messages == ["INFO model m: using cache /c (no network)\n", "WARNING careful\n"]


def test_logged_tracebacks_show_no_local_values(tmp_path: Path) -> None:
    """A traceback in the app's log names the failing lines but never the values of local variables (user
    text, keys, tokens): app.py turns loguru's diagnose mode off before loguru is imported."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import app\nfrom loguru import logger\n\n"
        "def answer():\n    token = 'hf_secret_in_a_local'\n    return token + 1\n\n"
        "try:\n    answer()\nexcept TypeError:\n    logger.exception('reply failed')\n"
    )
    root = Path(app.__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "LOGURU_DIAGNOSE"} | {"PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=root, env=env)
    assert "reply failed" in result.stderr and "return token + 1" in result.stderr, result.stderr
    assert "hf_secret_in_a_local" not in result.stderr


@pytest.mark.parametrize(("break_it", "reason"), [
    (lambda d: (d / "config.json").write_text("{bad json"), "is not a valid JSON file"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4096]),
     "SafetensorError"),
])
def test_a_model_dir_that_does_not_load_is_one_line_not_a_traceback(
    break_it, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Its files are all there (the source's checks pass), but transformers cannot load them.
    broken = tmp_path / "broken model"
    shutil.copytree(DEMO_MODEL_DIR, broken)
    break_it(broken)
    monkeypatch.setenv("MODEL_SOURCE", str(broken))
    assert app.main(["--backend", "transformers", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if text.startswith("app.py:")]
    assert line.startswith(f"app.py: cannot load the model from {broken}: ") and reason in line, err
    assert "Traceback" not in err and len(line) < 1000
