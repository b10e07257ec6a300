# Shared fixtures for the training tests; run with: python -m pytest tests/training -q
from pathlib import Path

import pytest

from training.make_tiny_base import cached_tiny_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    """The trained tiny chat base model (HF dir), built once per machine and source version under
    <repo>/.cache/ (git-ignored). Treat it as read-only: copy it before changing anything."""
    return cached_tiny_base(REPO / ".cache")
