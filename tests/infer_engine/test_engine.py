"""Backend choice on this (CPU) machine and the one interface the app uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infer_engine import engine as engine_module
from infer_engine.engine import (
    ChatStream,
    GenerationError,
    Update,
    create_engine,
    lmdeploy_available,
    pick_backend,
)
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


def test_a_chat_stream_keeps_the_backends_counters_and_reports_failures() -> None:
    def updates():
        yield Update("我是", 2)
        yield Update("", 3)  # a token that completes no character yet
        yield Update("UbUb", 5, "stop")

    stream = ChatStream(updates(), prompt_tokens=7)
    assert list(stream) == ["我是", "UbUb"]
    assert (stream.prompt_tokens, stream.completion_tokens, stream.finish_reason) == (7, 5, "stop")

    def failing():
        yield Update("a", 1)
        raise GenerationError("boom")

    broken = ChatStream(failing(), prompt_tokens=1)
    with pytest.raises(GenerationError, match="boom"):
        list(broken)
    assert broken.finish_reason == "error"


def test_closing_a_chat_stream_cancels_the_backend_even_before_it_started() -> None:
    cancelled = []
    updates = (Update("x", 1) for _ in range(3))
    never_read = ChatStream(updates, prompt_tokens=1, cancel=lambda: cancelled.append(1))
    never_read.close()
    assert cancelled and never_read.finish_reason == "abort"
