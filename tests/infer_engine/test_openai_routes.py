"""The ``/v1`` routes (``infer_engine/openai_api.py``) on a real engine with a short session, in process:
requests a client can send that once got a bare 500 or a misleading error. The running app's API is tested
end to end in tests/app/test_openai_api.py.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/infer_engine/test_openai_routes.py -q
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from recording_engine import RecordingEngine
from starlette.requests import Request

from infer_engine.engine import create_engine
from infer_engine.openai_api import MAX_NAMED_FIELDS, APIError, openai_routes, read_json
from infer_engine.settings import MIN_PROMPT_TOKENS, EngineSettings, ServerSettings

SESSION_LEN = 256
MOST = SESSION_LEN - MIN_PROMPT_TOKENS  # what the page's slider allows
CHAT = "/v1/chat/completions"
HI = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path) -> Iterator[TestClient]:
    engine = create_engine(tiny_model_dir, EngineSettings(backend="transformers", session_len=SESSION_LEN))
    app = FastAPI(routes=openai_routes(engine, ServerSettings(api_keys=("k1",)), "tiny"))
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer k1"}) as client:
        yield client
    engine.close()


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_reply_longer_than_the_session_allows_is_refused_naming_the_field_sent(api, field) -> None:
    # Under the engine's 2048 but over what a 256-token session leaves: the page's slider ends at MOST.
    refused = error(api.post(CHAT, json={**HI, field: MOST + 1}), 400)
    assert refused["param"] == field
    assert refused["message"].startswith(f"{field} must be at most {MOST} here")
    answered = api.post(CHAT, json={**HI, field: MOST, "temperature": 0})
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["role"] == "assistant"


def test_without_max_tokens_the_reply_has_what_the_prompt_leaves(api) -> None:
    # OpenAI's: a prompt longer than the default reply length leaves is answered whole, not refused, and no
    # earlier turn is dropped only to keep that default free.
    turns = [{"role": "user", "content": "my name is Bob, remember it"},
             {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "请介绍一下你自己。" * 6}]
    body = {"model": "m", "messages": turns, "temperature": 0}
    whole = api.post(CHAT, json=body).json()["usage"]
    alone = api.post(CHAT, json={**body, "max_tokens": 1}).json()["usage"]
    assert whole["prompt_tokens"] == alone["prompt_tokens"] > SESSION_LEN - MOST  # nothing dropped
    assert 1 <= whole["completion_tokens"] <= SESSION_LEN - whole["prompt_tokens"]
    # A message that cannot fit at all: the code clients trim their history on, the field they know.
    huge = error(api.post(CHAT, json={**HI, "messages": [{"role": "user", "content": "长" * 3000}]}), 400)
    assert (huge["code"], huge["param"]) == ("context_length_exceeded", "messages")
    # Lowering max_tokens is advice only to a client that set it.
    assert huge["message"].endswith("Shorten the message or the system prompt.")
    assert "max new tokens" not in huge["message"]
    long = [{"role": "user", "content": "长" * 3000}]
    huge = error(api.post(CHAT, json={**HI, "max_tokens": 8, "messages": long}), 400)
    assert huge["code"] == "context_length_exceeded" and "lower max_tokens" in huge["message"]


def test_a_field_name_no_utf_8_can_carry_is_a_400_with_it_escaped(api) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "\\ud800x": 1}'
    refused = error(api.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert refused["message"] == "Unrecognized request argument supplied: \\ud800x"
    assert refused["param"] == "\\ud800x"


def test_thousands_of_unknown_fields_are_named_a_few_at_a_time(api) -> None:
    fields = {f"field{i:05}" + "y" * 100: 1 for i in range(2000)}
    refused = error(api.post(CHAT, json={**HI, **fields}), 400)
    assert refused["message"].endswith(f"(and {2000 - MAX_NAMED_FIELDS} more)")
    assert len(refused["message"]) < 500 and refused["param"] == "field00000" + "y" * 30 + "…"


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_json_nested_deeper_than_python_recurses_is_a_400(api, nested: str) -> None:
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + nested + "}"
    refused = error(api.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert "must be JSON" in refused["message"]
    assert api.post(CHAT, json={**HI, "max_tokens": 1}).status_code == 200  # still serving


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", CHAT, "POST"), ("PUT", "/v1/models", "GET"), ("DELETE", "/v1/models/tiny", "GET"),
     ("POST", "/v1/models/org/name", "GET")],
)
def test_a_real_endpoint_asked_with_another_method_is_a_405_saying_which(api, method, path, allowed) -> None:
    response = api.request(method, path)
    refused = error(response, 405)
    assert refused["message"] == f"{path} takes {allowed}, not {method}"
    assert response.headers["allow"] == allowed
    assert error(api.get("/v1/nothing"), 404)["code"] == "unknown_url"


def test_a_missing_key_gets_401_with_the_scheme_to_use(api) -> None:
    response = api.get("/v1/models", headers={"Authorization": ""})
    assert error(response, 401)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert api.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_a_client_gone_before_its_body_came_is_a_plain_refusal() -> None:
    # What Starlette's request.stream() raises when the connection closes mid-body (ClientDisconnect) must not
    # escape as an unhandled ASGI exception with a traceback in the server log.
    parts = iter([{"type": "http.request", "body": b'{"model":', "more_body": True},
                  {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(parts)

    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": [(b"content-length", b"1000")]}
    with pytest.raises(APIError, match="closed the connection before the whole body was sent"):
        asyncio.run(read_json(Request(scope, receive)))


def test_the_operators_system_prompt_goes_first_unless_the_request_has_one(tiny_model_dir: Path) -> None:
    # As on the page: SYSTEM_PROMPT is the default of a conversation without a system message.
    engine = RecordingEngine(create_engine(tiny_model_dir, EngineSettings(backend="transformers")))
    app = FastAPI(routes=openai_routes(engine, ServerSettings(system_prompt="Answer in one line."), "tiny"))
    own = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "hi"}]
    with TestClient(app) as client:
        for messages in (HI["messages"], own):
            body = {"model": "m", "messages": messages, "max_tokens": 2, "temperature": 0}
            assert client.post(CHAT, json=body).status_code == 200
        # An error names the message by the client's count, not counting the system prompt put first.
        twice = {"model": "m", "messages": [{"role": "user", "content": c} for c in "ab"]}
        refused = error(client.post(CHAT, json=twice), 400)
        assert refused["message"].startswith("message 2: expected an assistant message, got user")
    assert [asked for asked, _ in engine.asked] == [
        [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "hi"}], own]
    engine.close()


def test_a_blank_system_message_sent_turns_the_operators_default_off(tiny_model_dir: Path) -> None:
    # The client chose "no system prompt": SYSTEM_PROMPT is only for requests that say nothing about it.
    # OpenAI's "developer" role is the system one of its newer models.
    engine = RecordingEngine(create_engine(tiny_model_dir, EngineSettings(backend="transformers")))
    app = FastAPI(routes=openai_routes(engine, ServerSettings(system_prompt="Answer in one line."), "tiny"))
    hi = {"role": "user", "content": "hi"}
    with TestClient(app) as client:
        for first in ({"role": "system", "content": "  "}, {"role": "developer", "content": ""},
                      {"role": "developer", "content": "Be a pirate."}):
            body = {"model": "m", "messages": [first, hi], "max_tokens": 2, "temperature": 0}
            assert client.post(CHAT, json=body).status_code == 200
    assert [asked for asked, _ in engine.asked] == [
        [hi], [hi], [{"role": "system", "content": "Be a pirate."}, hi]]
    engine.close()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.001}, {"top_p": 0},
                                      {"temperature": 0.7, "top_p": 0.005}])
def test_near_zero_temperature_or_top_p_decodes_greedily(tiny_model_dir: Path, sampling: dict) -> None:
    # OpenAI accepts 0 <= temperature <= 2 and 0 <= top_p <= 1; below the page's 0.01 only the most likely
    # token is left, which greedy decoding picks exactly.
    engine = RecordingEngine(create_engine(tiny_model_dir, EngineSettings(backend="transformers")))
    app = FastAPI(routes=openai_routes(engine, ServerSettings(), "tiny"))
    with TestClient(app) as client:
        reply = client.post(CHAT, json={**HI, "max_tokens": 8, **sampling})
        assert reply.status_code == 200, reply.text
        sampled = client.post(CHAT, json={**HI, "max_tokens": 8, "temperature": 0.01, "top_p": 0.01})
        assert sampled.status_code == 200, sampled.text
    (_, greedy), (_, smallest) = engine.asked
    assert greedy.do_sample is False and smallest.do_sample is True  # 0.01 is still sampling, as on the page
    engine.close()


@pytest.mark.parametrize(("sampling", "param", "message"), [
    ({"temperature": 99, "top_p": 0}, "temperature", "temperature must be between 0 and 2.0, got 99"),
    ({"temperature": "hot", "top_p": 0}, "temperature", "temperature must be a number"),
    ({"temperature": -5, "top_p": 0}, "temperature", "temperature must be between 0 and 2.0, got -5"),
    ({"temperature": 0, "top_p": 5}, "top_p", "top_p must be between 0 and 1.0, got 5"),
    ({"temperature": 0, "top_p": "abc"}, "top_p", "top_p must be a number"),
])
def test_greedy_by_one_value_still_checks_the_other(api, sampling: dict, param: str, message: str) -> None:
    refused = error(api.post(CHAT, json={**HI, "max_tokens": 2, **sampling}), 400)
    assert refused["param"] == param and refused["message"].startswith(message), refused
