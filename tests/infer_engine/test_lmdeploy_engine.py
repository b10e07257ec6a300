"""LMDeploy 0.18 config translation on CPU: LMDeploy's config objects construct without a GPU.

The engine itself (TurboMind streaming, abort, concurrency) needs a CUDA GPU and is not run here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from infer_engine.chat_format import stop_token_ids, token_id
from infer_engine.lmdeploy_engine import LMDeployEngine, generation_config, turbomind_config
from infer_engine.settings import EngineSettings, GenerationParams, SettingsError


def test_turbomind_config_carries_every_engine_setting() -> None:
    settings = EngineSettings(
        backend="lmdeploy",
        session_len=8192,
        max_batch_size=32,
        cache_max_entry_count=0.5,
        quant_policy=8,
        tp=2,
        enable_prefix_caching=True,
    )
    config = turbomind_config(settings)
    assert type(config).__name__ == "TurbomindEngineConfig"
    assert config.session_len == 8192
    assert config.max_batch_size == 32
    assert config.cache_max_entry_count == 0.5
    assert int(config.quant_policy) == 8
    assert config.tp == 2
    assert config.enable_prefix_caching is True


@pytest.mark.parametrize("quant_policy", [0, 4, 8])
def test_every_allowed_kv_quantisation_is_accepted_by_lmdeploy(quant_policy: int) -> None:
    assert int(turbomind_config(EngineSettings(quant_policy=quant_policy)).quant_policy) == quant_policy


def test_our_validation_catches_what_lmdeploy_accepts_silently() -> None:
    from lmdeploy import GenerationConfig, TurbomindEngineConfig

    # LMDeploy 0.18 takes these without a word...
    TurbomindEngineConfig(tp=3, cache_max_entry_count=1.5, session_len=-1)
    GenerationConfig(max_new_tokens=0)
    # ...we do not.
    for bad in ({"tp": 3}, {"cache_max_entry_count": 1.5}, {"session_len": -1}):
        with pytest.raises(SettingsError):
            EngineSettings(**bad)
    with pytest.raises(SettingsError):
        GenerationParams(max_new_tokens=0)


def test_generation_config_samples_only_when_asked(tokenizer) -> None:
    stop_ids = stop_token_ids(tokenizer, [2, 4])
    sampled = generation_config(
        GenerationParams(max_new_tokens=300, temperature=0.7, top_p=0.9, top_k=20), stop_ids, ["<|im_end|>"]
    )
    assert type(sampled).__name__ == "GenerationConfig"
    assert sampled.do_sample is True  # LMDeploy >= 0.6 is greedy unless told otherwise
    assert (sampled.max_new_tokens, sampled.temperature, sampled.top_p, sampled.top_k) == (300, 0.7, 0.9, 20)
    assert sampled.stop_words == ["<|im_end|>"]
    assert set(sampled.stop_token_ids) == {tokenizer.eos_token_id, token_id(tokenizer, "<|im_end|>")}
    assert sampled.skip_special_tokens is True
    greedy = generation_config(GenerationParams(do_sample=False), stop_ids)
    assert greedy.do_sample is False
    assert greedy.stop_words is None


def test_lmdeploy_accepts_our_prebuilt_prompt_ids() -> None:
    """The injection-safe path relies on these LMDeploy 0.18 APIs; a version that drops them fails here."""
    from lmdeploy import Pipeline
    from lmdeploy.serve.core.async_engine import AsyncEngine
    from lmdeploy.serve.managers.session_manager import Session

    preprocess = inspect.signature(AsyncEngine.preprocess).parameters
    assert {"messages", "session_id", "gen_config", "input_ids"} <= set(preprocess)
    assert "stream_response" in inspect.signature(AsyncEngine.generate).parameters
    assert callable(Pipeline.session)
    assert inspect.iscoroutinefunction(Session.async_abort)


def test_the_engine_refuses_to_start_without_a_gpu(tiny_model_dir: Path) -> None:
    with pytest.raises(SettingsError, match="needs a CUDA GPU and LMDeploy's TurboMind"):
        LMDeployEngine(tiny_model_dir, EngineSettings(backend="lmdeploy"))
