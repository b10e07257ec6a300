"""Backend choice on this (CPU) machine and the one interface the app uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infer_engine import engine as engine_module
from infer_engine.engine import create_engine, lmdeploy_available, pick_backend
from infer_engine.hf_engine import TransformersEngine
from infer_engine.settings import EngineSettings, GenerationParams


def test_lmdeploy_is_unavailable_without_cuda() -> None:
    assert not torch.cuda.is_available(), "these tests describe the CPU machine"
    assert lmdeploy_available() is False


def test_pick_backend_on_cpu() -> None:
    assert pick_backend(EngineSettings()) == "transformers"  # auto
    assert pick_backend(EngineSettings(backend="transformers")) == "transformers"
    assert (
        pick_backend(EngineSettings(backend="lmdeploy")) == "lmdeploy"
    )  # asked for: the engine says why not


def test_create_engine_auto_serves_the_demo_model_with_transformers(tiny_model_dir: Path) -> None:
    engine = create_engine(tiny_model_dir, EngineSettings(device="cpu", max_batch_size=2))
    try:
        assert isinstance(engine, TransformersEngine)
        assert (engine.name, engine.max_concurrency) == ("transformers", 2)
        stream = engine.stream_chat(
            [{"role": "user", "content": "你是谁？"}], GenerationParams(max_new_tokens=8), "p"
        )
        text = "".join(stream)
        assert stream.finish_reason in ("stop", "length")
        assert stream.completion_tokens <= 8
        assert isinstance(text, str)
    finally:
        engine.close()


def test_the_public_names_the_ui_imports_exist() -> None:
    for name in engine_module.__all__:
        assert hasattr(engine_module, name), name
    assert issubclass(engine_module.ChatInputError, ValueError)
    assert issubclass(engine_module.GenerationError, RuntimeError)


def test_create_engine_with_lmdeploy_on_cpu_fails_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="BACKEND=lmdeploy needs a CUDA GPU"):
        create_engine(tiny_model_dir, EngineSettings(backend="lmdeploy"))
