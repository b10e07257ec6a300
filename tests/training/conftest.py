# Shared fixtures for the training tests; run with: python -m pytest tests/training -q
import importlib.util
import sys
from pathlib import Path

import pytest

from training.make_tiny_base import cached_tiny_base

REPO = Path(__file__).resolve().parents[2]
# XTuner's modules import torchvision at load: where CPU torch has none, the import-only stub that
# training/run.sh also puts on PYTHONPATH.
if importlib.util.find_spec("torchvision") is None:
    sys.path.insert(0, str(REPO / "training" / "cpu_shims"))


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    """The trained tiny chat base model (HF dir), built once per machine and source version under
    <repo>/.cache/ (git-ignored). Treat it as read-only: copy it before changing anything."""
    return cached_tiny_base(REPO / ".cache")
