"""Engine-layer fixtures: the embedded tiny demo model (InternLM2 chat format, Llama layout), its tokenizer.

Run: .venv/bin/python -m pytest tests/infer_engine -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

DEMO_MODEL = Path(__file__).resolve().parents[2] / "infer_engine" / "demo_model"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded demo model directory (``infer_engine/demo_model``)."""
    assert (DEMO_MODEL / "config.json").is_file(), (
        f"no demo model in {DEMO_MODEL}: build it with `bash training/run.sh --preset tiny --name UbUb`"
    )
    return DEMO_MODEL


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    """The demo model's tokenizer (byte-level BPE; <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)
