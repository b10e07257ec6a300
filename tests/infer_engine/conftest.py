"""Engine-layer fixtures: the demo model's tokenizer and the engine's log (the model fixtures are in
tests/conftest.py).

Run: .venv/bin/python -m pytest tests/infer_engine -q
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from log_capture import EngineLog
from loguru import logger
from transformers import AutoTokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    """The demo model's tokenizer (byte-level BPE; <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def engine_log() -> Iterator[EngineLog]:
    """Everything the engine logs during the test."""
    log = EngineLog()
    handler = logger.add(lambda message: log.messages.append(str(message)), format="{message}", level="INFO")
    yield log
    logger.remove(handler)
