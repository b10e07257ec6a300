"""The app end to end: ``python app.py`` on 127.0.0.1 (see conftest), driven through its public ``/chat`` API
with gradio_client, plus app.py's own config handling.

Replies are compared exactly: ``/chat`` takes ``do_sample=False`` for greedy (deterministic) decoding.
Run: python -m pytest tests/app/test_app.py
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from loguru import logger

import app
from infer_engine.model_source import DEMO_MODEL_DIR
from infer_engine.ui import UI_THREADS

GREEDY = {"do_sample": False, "api_name": "/chat"}
REPLY_LOG = r"reply (api-\w+): prompt \d+ tok, completion (\d+) tok, dropped \d+ msgs, finish (\w+)"


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


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"temperature": 5.0}, "temperature must be between"),
        ({"top_p": 0.0}, "top_p must be between"),
        ({"top_k": 0}, "top_k must be between"),
        ({"max_new_tokens": 4096}, "max_new_tokens must be between"),
        ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer"),
        ({"history": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"message": "   "}, "Type a message first"),
        ({"system_prompt": None}, "system_prompt must be text"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(
    client: Client, bad: dict, message: str
) -> None:
    with pytest.raises(AppError, match=message):
        client.predict(**{"message": "hi", **bad}, api_name="/chat")
    assert isinstance(client.predict("你是谁？", max_new_tokens=8, **GREEDY), str)


def test_cancelling_a_streamed_reply_aborts_it_in_the_engine(rambling_app) -> None:
    client = Client(rambling_app.url, verbose=False)
    offset = len(rambling_app.log())
    job = client.submit("Tell me a very long story about the sea.", max_new_tokens=2048, **GREEDY)
    deadline = time.monotonic() + 60
    while not job.outputs():  # cancel once the reply is streaming
        assert not job.done() and time.monotonic() < deadline, "no streamed text to cancel"
        time.sleep(0.05)
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
    (tmp_path / "my-model").mkdir()
    local = app.model_info(str(tmp_path / "my-model"), tmp_path / "my-model")
    assert (local.name, local.source) == ("my-model", "local directory my-model")


def test_bad_flag_value_is_reported_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert app.main(["--port", "70000"]) == 2
    assert "port must be between 1 and 65535" in capsys.readouterr().err


def test_the_app_serves_with_more_threads_than_its_concurrency(app_server) -> None:
    started = re.search(r"concurrency (\d+), queue size \d+, (\d+) server threads", app_server.log())
    assert started, "no start line in the app log"
    assert int(started[2]) == int(started[1]) + UI_THREADS


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--backend", "lmdeploy"], {}, "BACKEND=lmdeploy needs a CUDA GPU"),
        (["--backend", "transformers"], {"DEVICE": "cuda"}, "device=cuda was asked for, but no CUDA GPU"),
    ],
)
def test_settings_that_need_a_gpu_fail_clearly_without_one(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert app.main(["--model", "", *argv]) == 2  # the demo model: nothing to download
    err = capsys.readouterr().err
    assert "app.py: invalid setting:" in err and message in err
    assert "Traceback" not in err


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
