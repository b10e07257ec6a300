"""Settings validation in one place: every bound, bools vs ints, NaN, and the env parsing errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from infer_engine.settings import (
    EngineSettings,
    GenerationParams,
    ServerSettings,
    SettingsError,
    engine_settings_from_env,
    server_settings_from_env,
)


def test_defaults_are_valid_and_match_the_ui() -> None:
    params = GenerationParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.do_sample) == (
        1024,
        0.8,
        0.8,
        40,
        True,
    )
    engine = EngineSettings()
    assert (engine.backend, engine.quant_policy, engine.tp, engine.enable_prefix_caching) == (
        "auto",
        0,
        1,
        True,
    )


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("max_new_tokens", [1, 2048], [0, 2049, -1]),
        ("temperature", [0.01, 2.0, 1], [0.0, 2.01, -0.5]),
        ("top_p", [0.01, 1.0], [0.0, 1.01]),
        ("top_k", [1, 100], [0, 101]),
    ],
)
def test_generation_params_bounds(field: str, good: list, bad: list) -> None:
    for value in good:
        assert getattr(GenerationParams(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(SettingsError, match=field):
            GenerationParams(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", True),  # a bool is not a count
        ("max_new_tokens", 12.0),  # nor is a float
        ("max_new_tokens", "12"),
        ("top_k", False),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", True),
        ("top_p", "0.5"),
        ("do_sample", 1),
        ("do_sample", "yes"),
    ],
)
def test_generation_params_reject_wrong_types(field: str, value: object) -> None:
    with pytest.raises(SettingsError, match=field):
        GenerationParams(**{field: value})


def test_generation_params_store_floats() -> None:
    assert isinstance(GenerationParams(temperature=1).temperature, float)


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("backend", ["auto", "lmdeploy", "transformers"], ["turbomind", "", None]),
        ("session_len", [64, 1_048_576], [63, 1_048_577, -1]),
        ("max_batch_size", [1, 1024], [0, 1025]),
        ("cache_max_entry_count", [0.01, 0.5, 0.99], [0.0, 1.0, 1.5, -0.1]),
        ("quant_policy", [0, 4, 8], [3, 16, 42]),
        ("tp", [1, 2, 4, 8], [0, 3, 16]),
        ("enable_prefix_caching", [True, False], [1, "true", None]),
        ("device", ["auto", "cpu", "cuda"], ["gpu", "CUDA"]),
        ("torch_threads", [0, 1, 256], [-1, 257, True]),
    ],
)
def test_engine_settings_bounds(field: str, good: list, bad: list) -> None:
    for value in good:
        assert getattr(EngineSettings(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(SettingsError, match=field):
            EngineSettings(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quant_policy", False),  # False == 0 must not pass as "no quantisation"
        ("quant_policy", 8.0),  # 8.0 == 8 must not pass either
        ("tp", True),  # True == 1
        ("session_len", True),
        ("max_batch_size", 8.0),
        ("cache_max_entry_count", math.nan),
        ("cache_max_entry_count", True),
    ],
)
def test_engine_settings_reject_bools_floats_and_nan(field: str, value: object) -> None:
    with pytest.raises(SettingsError, match=field):
        EngineSettings(**{field: value})


@pytest.mark.parametrize(
    ("session_len", "most", "default"),
    [(64, 32, 32), (512, 480, 256), (1056, 1024, 528), (2048, 2016, 1024), (4096, 2048, 1024),
     (1_048_576, 2048, 1024)],
)
def test_a_short_session_lowers_the_reply_length(session_len: int, most: int, default: int) -> None:
    # The slider goes up to `most`; by default a reply takes at most half the session, the rest is the chat's.
    settings = EngineSettings(session_len=session_len)
    assert settings.max_reply_tokens == most
    assert settings.default_params() == GenerationParams(max_new_tokens=default)


def test_engine_settings_from_env_parses_every_type() -> None:
    env = {
        "BACKEND": "transformers",
        "SESSION_LEN": " 2048 ",
        "MAX_BATCH_SIZE": "4",
        "CACHE_MAX_ENTRY_COUNT": "0.5",
        "QUANT_POLICY": "8",
        "TP": "2",
        "ENABLE_PREFIX_CACHING": "off",
        "DEVICE": "cpu",
        "TORCH_THREADS": "2",
        "UNRELATED": "ignored",
    }
    assert engine_settings_from_env(env) == EngineSettings(
        backend="transformers",
        session_len=2048,
        max_batch_size=4,
        cache_max_entry_count=0.5,
        quant_policy=8,
        tp=2,
        enable_prefix_caching=False,
        device="cpu",
        torch_threads=2,
    )
    assert engine_settings_from_env({}) == EngineSettings()
    assert engine_settings_from_env({"BACKEND": " Transformers ", "DEVICE": "CPU"}) == EngineSettings(
        backend="transformers", device="cpu")
    assert engine_settings_from_env({"SESSION_LEN": "  "}) == EngineSettings()  # blank = unset


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SESSION_LEN": "4k"}, "SESSION_LEN must be a whole number"),
        ({"SESSION_LEN": "4096.0"}, "SESSION_LEN must be a whole number"),
        ({"SESSION_LEN": "8_192"}, "SESSION_LEN must be a whole number"),
        ({"SESSION_LEN": "８１９２"}, "SESSION_LEN must be a whole number"),
        ({"QUANT_POLICY": "int8"}, "QUANT_POLICY must be a whole number"),
        ({"QUANT_POLICY": "3"}, "QUANT_POLICY must be one of 0, 4, 8"),
        ({"ENABLE_PREFIX_CACHING": "maybe"}, "ENABLE_PREFIX_CACHING must be true or false"),
        ({"CACHE_MAX_ENTRY_COUNT": "nan"}, "CACHE_MAX_ENTRY_COUNT must be"),
        ({"CACHE_MAX_ENTRY_COUNT": "1.5"}, "CACHE_MAX_ENTRY_COUNT must be"),
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE must be between 1 and 1024, got 0"),
        ({"SESSION_LEN": "10"}, "SESSION_LEN must be between 64 and 1048576, got 10"),
        ({"DEVICE": "tpu"}, "DEVICE must be one of auto, cpu, cuda"),
        ({"CACHE_MAX_ENTRY_COUNT": "lots"}, "CACHE_MAX_ENTRY_COUNT must be a number"),
        ({"BACKEND": "vllm"}, "BACKEND must be one of"),
        ({"TP": "3"}, "TP must be one of"),
    ],
)
def test_engine_settings_from_env_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        engine_settings_from_env(env)


def test_a_cache_dir_from_the_home_dir_is_expanded() -> None:  # a Space's settings do not expand "~"
    assert server_settings_from_env({"MODEL_CACHE_DIR": "~/models"}).cache_dir == Path.home() / "models"
    with pytest.raises(SettingsError, match="MODEL_CACHE_DIR: cannot expand '~nosuchuser9': no such home"):
        server_settings_from_env({"MODEL_CACHE_DIR": "~nosuchuser9/models"})


def test_server_settings_from_env() -> None:
    env = {
        "MODEL_SOURCE": " hf:someone/model ",
        "MODEL_CACHE_DIR": "/tmp/models",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "8080",
        "QUEUE_SIZE": "16",
        "SYSTEM_PROMPT": "Be brief.",
        "COMPARE_MODEL_SOURCE": " hf:someone/base@v1 ",
    }
    assert server_settings_from_env(env) == ServerSettings(
        model_source="hf:someone/model",
        cache_dir=Path("/tmp/models"),
        host="0.0.0.0",
        port=8080,
        queue_size=16,
        system_prompt="Be brief.",
        compare_model_source="hf:someone/base@v1",
    )
    assert server_settings_from_env({}) == ServerSettings()
    assert server_settings_from_env({"COMPARE_MODEL_SOURCE": "  "}).compare_model_source == ""  # off


def test_api_keys_come_from_a_comma_separated_list_and_never_show_in_a_repr() -> None:
    settings = server_settings_from_env({"API_KEYS": " sk-one, sk-two ,,"})
    assert settings.api_keys == ("sk-one", "sk-two")
    assert "sk-one" not in repr(settings)
    assert server_settings_from_env({"API_KEYS": "  "}).api_keys == ()  # blank = unset: an open API
    with pytest.raises(SettingsError, match="API_KEYS is set but holds no key"):
        server_settings_from_env({"API_KEYS": " , "})  # meant to protect /v1: not silently left open
    with pytest.raises(SettingsError, match="API key 2 must not contain spaces") as caught:
        ServerSettings(api_keys=("sk-one", "sk two"))
    assert "sk two" not in str(caught.value)  # the message names the key by number only
    with pytest.raises(SettingsError, match="API key 1 must be printable ASCII"):
        ServerSettings(api_keys=("clé",))


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"GRADIO_SERVER_PORT": "http"}, "GRADIO_SERVER_PORT must be a whole number"),
        ({"GRADIO_SERVER_PORT": "0"}, "GRADIO_SERVER_PORT must be between 1 and 65535"),
        ({"GRADIO_SERVER_PORT": "70000"}, "GRADIO_SERVER_PORT must be between 1 and 65535"),
        ({"QUEUE_SIZE": "-1"}, "QUEUE_SIZE must be between"),
        ({"QUEUE_SIZE": "many"}, "QUEUE_SIZE must be a whole number"),
        ({"SYSTEM_PROMPT": "x" * 20_001}, r"SYSTEM_PROMPT is too long \(20001 characters\)"),
    ],
)
def test_server_settings_from_env_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        server_settings_from_env(env)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": " "}, "host must not be empty"),
        ({"host": None}, "host must be text"),
        ({"model_source": 3}, "model_source must be text"),
        ({"compare_model_source": None}, "compare_model_source must be text"),
        ({"system_prompt": None}, "system_prompt must be text"),
        ({"cache_dir": "/tmp/x"}, "cache_dir must be a path"),
        ({"port": True}, "port must be an integer"),
    ],
)
def test_server_settings_reject_wrong_types(kwargs: dict, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        ServerSettings(**kwargs)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)
