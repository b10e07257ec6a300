"""Backend choice (on a CPU machine and on a GPU one) and the one interface the app uses."""

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


def test_lmdeploy_is_available_only_with_cuda_and_turbomind() -> None:
    if not torch.cuda.is_available():
        assert lmdeploy_available() is False
        assert engine_module.lmdeploy_unavailable() == "no CUDA GPU is visible"
    else:  # a GPU machine: TurboMind's native module decides
        from lmdeploy import turbomind

        assert lmdeploy_available() is turbomind.is_available()


def test_pick_backend() -> None:
    assert pick_backend(EngineSettings()) == ("lmdeploy" if lmdeploy_available() else "transformers")  # auto
    assert pick_backend(EngineSettings(backend="transformers")) == "transformers"
    assert (
        pick_backend(EngineSettings(backend="lmdeploy")) == "lmdeploy"
    )  # asked for: the engine says why not


def test_create_engine_with_transformers_serves_the_demo_model(tiny_model_dir: Path) -> None:
    engine = create_engine(tiny_model_dir, EngineSettings(backend="transformers", max_batch_size=2))
    try:
        assert isinstance(engine, TransformersEngine)
        assert (engine.name, engine.max_concurrency) == ("transformers", 2)
        greedy = GenerationParams(max_new_tokens=64, do_sample=False)
        stream = engine.stream_chat([{"role": "user", "content": "你是谁？"}], greedy, "p")
        assert "UbUb" in "".join(stream)  # the demo model's trained answer (make demo-model --name UbUb)
        assert (stream.finish_reason, stream.completion_tokens) == ("length", 64)  # it goes on past the name
    finally:
        engine.close()


def test_a_session_longer_than_the_model_knows_is_warned_about(tiny_model_dir: Path) -> None:
    from loguru import logger

    assert engine_module.model_context_length(tiny_model_dir) == 4096
    warnings: list[str] = []
    handler = logger.add(lambda m: warnings.append(str(m)), level="WARNING", format="{message}")
    try:
        for session_len in (4096, 8192):
            settings = EngineSettings(backend="transformers", session_len=session_len)
            create_engine(tiny_model_dir, settings).close()
    finally:
        logger.remove(handler)
    assert len(warnings) == 1 and "SESSION_LEN=8192 is longer than the 4096 positions" in warnings[0]


def test_the_public_names_the_ui_imports_exist() -> None:
    for name in engine_module.__all__:
        assert hasattr(engine_module, name), name
    assert issubclass(engine_module.ChatInputError, ValueError)
    assert issubclass(engine_module.GenerationError, RuntimeError)


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
