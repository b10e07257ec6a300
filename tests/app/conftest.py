"""App-level fixtures: the real ``python app.py`` served on a free 127.0.0.1 port, and its log.

``app_server`` serves what a user gets: ``MODEL_SOURCE`` when set (e.g. a tiny model built elsewhere), else
the embedded demo model. A trained tiny model ends every answer within a few tokens, so tests that stop a
long reply use ``rambling_app``: the tokenizer and a deeper stack of random weights, whose greedy replies run
long, and slowly enough (``slow_rambling_model_dir``) that a test surely acts while one still runs. One server
of each per test session; tests read the log (token counts, finish reasons) to see that a
reply was really aborted. The model fixtures (``served_model_dir``, ``slow_rambling_model_dir``) are in
tests/conftest.py.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gradio_client import Client

from bench.bench_serving import serve_app


@dataclass
class RunningApp:
    """A running ``app.py``: its URL and the file that holds its stdout and stderr."""

    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the app has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, after: int = 0, timeout_s: float = 60.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log past character ``after``; return the match.

        Args:
            pattern: regular expression to find.
            after: ignore log text before this offset (``len(app.log())`` taken before an action).
            timeout_s: most seconds to wait.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.compile(pattern).search(self.log(), after)
            if match:
                return match
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{pattern!r} not in the app log within {timeout_s}s; log tail:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)


def _run_app(
    model_source: str, tmp_path_factory: pytest.TempPathFactory, extra_env: dict[str, str] | None = None
) -> Iterator[RunningApp]:
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with serve_app(model_source, log_path, extra_env=extra_env) as url:
        yield RunningApp(url=url, log_path=log_path)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """``python app.py`` serving what a user gets (``MODEL_SOURCE`` or the demo model), once per session."""
    yield from _run_app(os.environ.get("MODEL_SOURCE", ""), tmp_path_factory)


@pytest.fixture(scope="session")
def rambling_app(
    slow_rambling_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """``python app.py`` serving the slow rambling model, for tests that stop or outlast a long reply."""
    yield from _run_app(str(slow_rambling_model_dir), tmp_path_factory)


@pytest.fixture(scope="session")
def crawling_app(crawling_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """``python app.py`` serving the crawling model, whose tokens come as slowly as a real small model's."""
    yield from _run_app(str(crawling_model_dir), tmp_path_factory)


@pytest.fixture(scope="session")
def compare_app(
    slow_rambling_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """``python app.py`` in the compare view: what a user gets (``MODEL_SOURCE`` or the demo model) as "After"
    and, as "Before" (``COMPARE_MODEL_SOURCE``), the slow rambling model, whose long replies can be stopped.
    """
    compare = {"COMPARE_MODEL_SOURCE": str(slow_rambling_model_dir)}
    yield from _run_app(os.environ.get("MODEL_SOURCE", ""), tmp_path_factory, compare)


@pytest.fixture(scope="session")
def api_keys() -> tuple[str, ...]:
    """The ``API_KEYS`` that ``keyed_app`` accepts."""
    return ("test-key-one", "test-key-two")


@pytest.fixture(scope="session")
def keyed_app(
    rambling_model_dir: Path, api_keys: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """``python app.py`` with ``API_KEYS`` set and room for two requests only (one decoding, one queued),
    serving the rambling model so that its replies hold their places."""
    limits = {"API_KEYS": ",".join(api_keys), "MAX_BATCH_SIZE": "1", "QUEUE_SIZE": "1"}
    yield from _run_app(str(rambling_model_dir), tmp_path_factory, limits)


@pytest.fixture(scope="session")
def identity_name() -> str:
    """The name the demo model introduces itself with (``make demo-model`` trains it with ``--name UbUb``)."""
    return "UbUb"


@pytest.fixture
def client(app_server: RunningApp) -> Iterator[Client]:
    """A gradio_client connection to the app (its own Gradio session)."""
    connection = Client(app_server.url, verbose=False)
    yield connection
    connection.close()
