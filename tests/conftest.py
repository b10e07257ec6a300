"""Model fixtures shared by tests/infer_engine and tests/app: the embedded demo model, the model the app
serves, and a "rambling" twin of it with random weights whose greedy replies run long (to test Stop).

Run: .venv/bin/python -m pytest tests -q --ignore=tests/training
tests/training runs in the training venv, which has neither gradio nor the serving stack: everything heavy is
imported inside the fixtures, never at module level here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEMO_MODEL = Path(__file__).resolve().parents[1] / "infer_engine" / "demo_model"


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
