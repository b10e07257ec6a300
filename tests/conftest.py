"""Model fixtures shared by tests/infer_engine and tests/app: the embedded demo model, the model the app
serves, a "rambling" twin of it with random weights whose greedy replies run long (to test Stop), and a slow
rambling one (the app tests' model) whose long reply surely outlasts what a test does meanwhile.

Run: .venv/bin/python -m pytest tests -q --ignore=tests/training
tests/training runs in the training venv, which has neither gradio nor the serving stack: everything heavy is
imported inside the fixtures, never at module level here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

DEMO_MODEL = Path(__file__).resolve().parents[1] / "infer_engine" / "demo_model"


@pytest.fixture(scope="session", autouse=True)
def app_port_not_7860() -> None:
    """``app.py`` started by a test listens (or checks it could) on a port free at the session's start, not on
    Gradio's 7860, which a demo someone runs on the same machine may hold: a test that stops before serving
    would fail on "Address already in use" instead of what it tests. A value already set is kept."""
    import socket  # not bench.bench_serving.free_port: the training env shares this file, not its imports

    if "GRADIO_SERVER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["GRADIO_SERVER_PORT"] = str(probe.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded demo model directory (``infer_engine/demo_model``)."""
    assert (DEMO_MODEL / "config.json").is_file(), (
        f"no demo model in {DEMO_MODEL}: build it with `bash training/run.sh --preset tiny --name UbUb`"
    )
    return DEMO_MODEL


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model dir the app serves (``MODEL_SOURCE`` or the embedded demo model), for in-process tests."""
    from infer_engine.model_source import resolve_model

    return resolve_model(os.environ.get("MODEL_SOURCE") or None, tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def rambling_model_dir(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served model's shapes and tokenizer with random weights (seed 0): its greedy replies run to
    ``max_new_tokens``, long enough to stop one midway."""
    from bench.bench_serving import random_weights_copy

    return random_weights_copy(served_model_dir, tmp_path_factory.mktemp("rambling") / "model")


SLOW_DEPTH = 8  # the slow rambling model has this many times the served model's layers
CRAWL_DEPTH = 64  # the crawling one: about 18 tokens a second on a 2-core machine, as SmolLM2-135M decodes


def _deeper_rambling_copy(served_model_dir: Path, depth: int, dest: Path) -> Path:
    from bench.bench_serving import random_weights_copy

    deep = dest / "config"
    shutil.copytree(served_model_dir, deep, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
    config = json.loads((deep / "config.json").read_text())
    config["num_hidden_layers"] *= depth
    (deep / "config.json").write_text(json.dumps(config, indent=2))
    return random_weights_copy(deep, dest / "model")


@pytest.fixture(scope="session")
def slow_rambling_model_dir(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rambling model ``SLOW_DEPTH`` times as deep (so as slow): on a 2-core machine the served tiny model
    decodes its longest reply (2048 tokens) in about 4 s, less than a browser test needs to open another
    page and get an answer there; tests that must stop or outlast a reply still running use this one."""
    return _deeper_rambling_copy(served_model_dir, SLOW_DEPTH, tmp_path_factory.mktemp("slow-rambling"))


@pytest.fixture(scope="session")
def crawling_model_dir(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rambling model ``CRAWL_DEPTH`` times as deep: each token takes as long as a real small model's on
    a CPU, so that what the page does between two tokens of a running reply can be tested."""
    return _deeper_rambling_copy(served_model_dir, CRAWL_DEPTH, tmp_path_factory.mktemp("crawling"))
