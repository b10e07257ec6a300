"""The transformers backend end to end on the tiny demo model: streaming, Stop, tab close, several users.

Replies of the trained demo model end after a few dozen tokens, too soon to stop one reliably in the middle.
The Stop tests therefore use an "endless" engine on ``rambling_model_dir`` (tests/conftest.py): the served
model's tokenizer and shape with random weights, whose greedy reply provably runs to ``max_new_tokens``
(checked in its fixture). That a reply really ended in the engine is read from the decoder thread's own log
line (``engine_log``), never from the stream's ``finish_reason`` after ``close()``, which the stream sets
itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from log_capture import EngineLog

from infer_engine.chat_format import ChatInputError, encode_chat
from infer_engine.engine import ChatStream, GenerationError
from infer_engine.hf_engine import IncrementalDecoder, TransformersEngine, sample_rows, torch_threads
from infer_engine.settings import EngineSettings, GenerationParams, SettingsError

GREEDY = GenerationParams(max_new_tokens=40, do_sample=False)
LONG = GenerationParams(max_new_tokens=400, do_sample=False)  # the endless model's replies run this long
PROMPTS = ["请介绍一下你自己", "Who are you?", "你可以做什么？", "Please introduce yourself", "hello world"]
SETTINGS = EngineSettings(backend="transformers", device="cpu", session_len=512, max_batch_size=3)
END_S = 60.0  # most seconds to wait for a reply's end line: a stop is proven by its reason and token count


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    """One engine for the module; at most 3 rows per batch, so a 4th concurrent request waits its turn."""
    engine = TransformersEngine(tiny_model_dir, SETTINGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def solo(engine: TransformersEngine) -> dict[str, tuple[str, int]]:
    """Each prompt's greedy answer (text, tokens) when it is the only request."""
    answers = {}
    for prompt in PROMPTS:
        stream = engine.stream_chat(ask(prompt), GREEDY, "solo")
        answers[prompt] = ("".join(stream), stream.completion_tokens)
    return answers


@pytest.fixture(scope="module")
def endless(rambling_model_dir: Path) -> Iterator[TransformersEngine]:
    """An engine on the served model's shape with random weights: greedy replies only stop at the limit."""
    engine = TransformersEngine(rambling_model_dir, SETTINGS)
    reply = engine.stream_chat(ask(PROMPTS[0]), LONG, "probe")
    "".join(reply)
    assert (reply.finish_reason, reply.completion_tokens) == ("length", LONG.max_new_tokens)
    yield engine
    engine.close()


def generate_reference(engine: TransformersEngine, prompt: str, max_new_tokens: int) -> tuple[str, int, bool]:
    """Greedy ``model.generate`` on the same prompt ids: text, new tokens (stop excluded), stopped or not."""
    ids = encode_chat(engine.tokenizer, ask(prompt))
    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=engine.stop_ids
        )
    new = out[0, len(ids) :].tolist()
    stopped = bool(new) and new[-1] in engine.stop_ids
    new = new[:-1] if stopped else new
    return engine.tokenizer.decode(new, skip_special_tokens=True), len(new), stopped


def consume(stream: ChatStream, log: dict[str, Any]) -> None:
    """Read a stream to the end in a thread, noting when its first text and its end arrived."""
    try:
        for delta in stream:
            log.setdefault("first", time.perf_counter())
            log["text"] = log.get("text", "") + delta
    except GenerationError as exc:
        log["error"] = exc
    log["end"] = time.perf_counter()


def run_together(streams: dict[str, ChatStream]) -> dict[str, dict[str, Any]]:
    logs: dict[str, dict[str, Any]] = {name: {} for name in streams}
    threads = [threading.Thread(target=consume, args=(s, logs[name])) for name, s in streams.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stream never ended"
    return logs


def long_reply_ids(engine: TransformersEngine, prompt: str) -> list[int]:
    """The endless model's greedy reply ids (``model.generate``) to ``prompt``."""
    ids = encode_chat(engine.tokenizer, ask(prompt))
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=200, do_sample=False)
    return out[0, len(ids) :].tolist()


def cpu_seconds_while_idle(seconds: float) -> float:
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


# ---- pieces ------------------------------------------------------------------------------------------------


def test_incremental_decoder_never_splits_a_character(tokenizer: Any) -> None:
    text = "我是UbUb的小助手 😀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), (
        "the text should contain a split UTF-8 character"
    )
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_flush_drops_a_partial_character_at_the_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids[:cut]) + decoder.flush()
    assert text == tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    assert "\ufffd" not in text


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 2), (5, 4), (64, 4)])
def test_torch_threads_on_a_cpu_leave_a_core_to_the_server(
    cores: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert torch_threads(EngineSettings(), torch.device("cpu")) == threads


def test_torch_threads_set_explicitly_win_everywhere() -> None:
    assert torch_threads(EngineSettings(torch_threads=3), torch.device("cpu")) == 3
    assert torch_threads(EngineSettings(torch_threads=3), torch.device("cuda")) == 3


def test_sample_rows_honours_each_rows_settings() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, 2.7, -5.0]]).repeat(4, 1)
    params = [
        GenerationParams(do_sample=False),
        GenerationParams(do_sample=True, top_k=1),
        GenerationParams(do_sample=True, top_k=100, top_p=0.01),
        GenerationParams(do_sample=True, top_k=3, top_p=1.0, temperature=2.0),
    ]
    seen = set()
    for _ in range(200):
        greedy, top1, tiny_p, top3 = sample_rows(logits, params)
        assert greedy == top1 == tiny_p == 1
        assert top3 in (1, 2, 3)
        seen.add(top3)
    assert seen == {1, 2, 3}


def test_sampling_draws_from_the_top_p_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log().unsqueeze(0)
    draws = 4000

    def frequencies(params: GenerationParams) -> list[float]:
        tokens = sample_rows(logits.repeat(draws, 1), [params] * draws)
        return [tokens.count(t) / draws for t in range(4)]

    plain = frequencies(GenerationParams(temperature=1.0, top_k=100, top_p=1.0))
    assert plain[:3] == pytest.approx([0.5, 0.3, 0.2], abs=0.04)
    nucleus = frequencies(GenerationParams(temperature=1.0, top_k=100, top_p=0.7))  # keeps {0, 1}: 0.8 >= 0.7
    assert nucleus == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.04)


# ---- streaming ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_streaming_equals_plain_greedy_generate(engine: TransformersEngine, prompt: str) -> None:
    stream = engine.stream_chat(ask(prompt), GREEDY, "stream")
    deltas = list(stream)
    text, tokens, stopped = generate_reference(engine, prompt, GREEDY.max_new_tokens)
    assert "".join(deltas) == text
    assert stream.completion_tokens == tokens
    assert stream.finish_reason == ("stop" if stopped else "length")
    assert stream.prompt_tokens == len(encode_chat(engine.tokenizer, ask(prompt)))
    assert stream.dropped_messages == 0
    assert all(deltas), "no empty deltas"


def test_a_reply_cut_by_max_new_tokens_never_ends_in_half_a_character(endless: TransformersEngine) -> None:
    reply = long_reply_ids(endless, PROMPTS[0])
    cuts = [k for k in range(1, len(reply)) if endless.tokenizer.decode(reply[:k]).endswith("\ufffd")]
    assert cuts, "the rambling model's reply should split a character somewhere"
    params = GenerationParams(max_new_tokens=cuts[0], do_sample=False)
    stream = endless.stream_chat(ask(PROMPTS[0]), params, "cut")
    text = "".join(stream)
    assert (stream.finish_reason, stream.completion_tokens) == ("length", cuts[0])
    assert text == endless.tokenizer.decode(reply[: cuts[0]], skip_special_tokens=True).rstrip("\ufffd")
    assert not text.endswith("\ufffd")  # (random weights may also emit a stray byte inside the text)


def test_sampled_reply_streams_and_respects_max_new_tokens(engine: TransformersEngine) -> None:
    stream = engine.stream_chat(
        ask("你是谁？"), GenerationParams(max_new_tokens=12, temperature=1.5), "sample"
    )
    "".join(stream)
    assert stream.finish_reason in ("stop", "length")
    assert 0 <= stream.completion_tokens <= 12


def test_bad_input_is_refused_before_anything_is_queued(engine: TransformersEngine) -> None:
    with pytest.raises(ChatInputError, match="must end with a user message"):
        engine.stream_chat([*ask("hi"), {"role": "assistant", "content": "hello"}], GREEDY, "bad")
    with pytest.raises(ChatInputError, match="too long"):
        engine.stream_chat(ask("word " * 600), GREEDY, "bad")
    with pytest.raises(SettingsError, match="params must be GenerationParams"):
        engine.stream_chat(ask("hi"), {"max_new_tokens": 10}, "bad")  # type: ignore[arg-type]


# ---- Stop, tab close, replacement --------------------------------------------------------------------------


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads alive now that were not in ``before``: a count would also change when an earlier test's
    thread ends meanwhile (seen in CI: 5 == 6)."""
    return [thread.name for thread in threading.enumerate() if thread not in before]


def test_stop_ends_the_generation_and_the_worker_goes_idle(
    endless: TransformersEngine, engine_log: EngineLog
) -> None:
    threads_before = set(threading.enumerate())
    stream = endless.stream_chat(ask(PROMPTS[0]), LONG, "stop")
    next(iter(stream))
    endless.abort("stop")
    assert engine_log.reply_end("stop", END_S)[0] == "abort"
    "".join(stream)
    assert stream.finish_reason == "abort"  # as the engine reported it: the stream was never closed
    assert stream.completion_tokens < LONG.max_new_tokens // 2
    assert new_threads(threads_before) == []  # no thread per request, none left behind
    assert cpu_seconds_while_idle(0.5) < 0.1, "something keeps burning CPU after Stop"


def test_what_streamed_before_stop_is_the_start_of_the_reply(endless: TransformersEngine) -> None:
    full = "".join(endless.stream_chat(ask(PROMPTS[1]), GREEDY, "full"))
    stream = endless.stream_chat(ask(PROMPTS[1]), LONG, "partial")
    partial = next(iter(stream))
    endless.abort("partial")
    partial += "".join(stream)
    assert full.startswith(partial)


def test_closing_the_stream_aborts_it(endless: TransformersEngine, engine_log: EngineLog) -> None:
    stream = endless.stream_chat(ask(PROMPTS[0]), LONG, "tab")
    next(iter(stream))
    stream.close()  # what Gradio does to the generator when the tab goes away
    reason, tokens = engine_log.reply_end("tab", END_S)
    assert reason == "abort"
    assert tokens < LONG.max_new_tokens // 2


def test_closing_an_unread_stream_aborts_it(endless: TransformersEngine, engine_log: EngineLog) -> None:
    stream = endless.stream_chat(ask(PROMPTS[0]), LONG, "unread")
    stream.close()  # e.g. the UI failed before it started reading
    reason, tokens = engine_log.reply_end("unread", END_S)
    assert reason == "abort"
    assert tokens < LONG.max_new_tokens // 2


def test_stop_reaches_a_request_still_waiting_for_a_batch_slot(
    endless: TransformersEngine, engine_log: EngineLog
) -> None:
    running = [
        endless.stream_chat(ask(PROMPTS[0]), LONG, f"busy-{i}") for i in range(SETTINGS.max_batch_size)
    ]
    for stream in running:
        next(iter(stream))  # every batch slot is taken, for 400 tokens
    waiting = endless.stream_chat(ask(PROMPTS[0]), LONG, "waiting")
    endless.abort("waiting")
    assert engine_log.reply_end("waiting", END_S) == ("abort", 0)  # never decoded: it did not wait
    assert list(waiting) == []
    assert waiting.finish_reason == "abort"
    for i, stream in enumerate(running):
        stream.close()
        assert engine_log.reply_end(f"busy-{i}", END_S)[0] == "abort"


def test_a_new_reply_for_the_same_page_replaces_the_running_one(endless: TransformersEngine) -> None:
    first = endless.stream_chat(ask(PROMPTS[0]), LONG, "page")
    next(iter(first))
    second = endless.stream_chat(ask(PROMPTS[0]), GREEDY, "page")
    assert "".join(second) == "".join(endless.stream_chat(ask(PROMPTS[0]), GREEDY, "other"))
    "".join(first)
    assert first.finish_reason == "abort"
    assert first.completion_tokens < LONG.max_new_tokens // 2


def test_stop_after_a_replacement_stops_the_new_reply(
    endless: TransformersEngine, engine_log: EngineLog
) -> None:
    first = endless.stream_chat(ask(PROMPTS[0]), LONG, "replaced")
    next(iter(first))
    second = endless.stream_chat(ask(PROMPTS[0]), LONG, "replaced")
    assert engine_log.reply_end("replaced", END_S)[0] == "abort"  # the first, ended by the replacement
    after_first = len(engine_log.messages)
    next(iter(second))
    endless.abort("replaced")  # the page's Stop now: it must reach the second reply
    reason, tokens = engine_log.reply_end("replaced", END_S, after=after_first)
    assert (reason, tokens < LONG.max_new_tokens // 2) == ("abort", True)
    "".join(first)
    "".join(second)


def test_abort_of_an_unknown_session_is_a_no_op(
    engine: TransformersEngine, solo: dict[str, tuple[str, int]]
) -> None:
    running = engine.stream_chat(ask(PROMPTS[0]), GREEDY, "somebody")
    engine.abort("nobody")
    assert "".join(running) == solo[PROMPTS[0]][0]  # nobody else's reply is touched


# ---- several users -----------------------------------------------------------------------------------------


def test_concurrent_sessions_each_get_their_own_answer(
    engine: TransformersEngine, solo: dict[str, tuple[str, int]]
) -> None:
    streams = {p: engine.stream_chat(ask(p), GREEDY, f"user-{i}") for i, p in enumerate(PROMPTS[:4])}
    streams["sampled"] = engine.stream_chat(ask("hello"), GenerationParams(max_new_tokens=20), "user-sampled")
    logs = run_together(streams)  # 5 requests, 3 rows per batch: two wait, then join as rows finish
    for prompt in PROMPTS[:4]:
        assert logs[prompt].get("text", "") == solo[prompt][0], prompt
        assert streams[prompt].completion_tokens == solo[prompt][1]
    assert streams["sampled"].finish_reason in ("stop", "length")


def test_concurrent_sessions_all_make_progress(endless: TransformersEngine) -> None:
    params = GenerationParams(max_new_tokens=100, do_sample=False)
    streams = {p: endless.stream_chat(ask(p), params, f"progress-{i}") for i, p in enumerate(PROMPTS[:3])}
    logs = run_together(streams)
    # Batched: every user sees text before any of them is done (a lock per request would serialise them).
    assert max(log["first"] for log in logs.values()) < min(log["end"] for log in logs.values())
    assert all(stream.completion_tokens == 100 for stream in streams.values())


@pytest.mark.parametrize("part", ["_without_aborted", "_decode_step"])
def test_a_failing_loop_step_fails_its_batch_and_the_engine_goes_on(
    engine: TransformersEngine, solo: dict[str, tuple[str, int]], monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    original = getattr(engine, part)

    def fails_once(*args: Any) -> Any:  # a fault no one row can be blamed for, once
        monkeypatch.setattr(engine, part, original)
        raise RuntimeError(f"injected failure in {part}")

    monkeypatch.setattr(engine, part, fails_once)
    failed = engine.stream_chat(ask(PROMPTS[0]), GREEDY, "failed")
    with pytest.raises(GenerationError, match="injected failure"):
        "".join(failed)
    assert failed.finish_reason == "error"
    after = engine.stream_chat(ask(PROMPTS[1]), GREEDY, "after-failure")
    assert "".join(after) == solo[PROMPTS[1]][0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_decoder_thread_is_reported_not_waited_for(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TransformersEngine(tiny_model_dir, SETTINGS)
    take_inbox = engine._take_inbox

    def dies(*args: Any, **kwargs: Any) -> bool:  # what nothing should do: end the thread for good
        monkeypatch.setattr(engine, "_take_inbox", take_inbox)
        raise SystemExit

    try:
        stream = engine.stream_chat(ask(PROMPTS[0]), LONG, "orphan")
        monkeypatch.setattr(engine, "_take_inbox", dies)  # taken on the thread's next round
        started = time.monotonic()
        with pytest.raises(GenerationError, match="decoder thread has stopped"):
            "".join(stream)
        assert time.monotonic() - started < 5  # noticed by the consumer's poll, not a hang
        with pytest.raises(GenerationError, match="decoder thread has stopped"):
            engine.stream_chat(ask("hi"), GREEDY, "late")
    finally:
        engine.close()


def test_a_failing_request_does_not_break_the_others(
    engine: TransformersEngine, solo: dict[str, tuple[str, int]]
) -> None:
    good = {p: engine.stream_chat(ask(p), GREEDY, f"good-{i}") for i, p in enumerate(PROMPTS[:2])}
    # An internal failure inside the decoder thread: a token id the model has no embedding for.
    broken = engine._start([len(engine.tokenizer) + 100], GREEDY, "broken", dropped=0)
    logs = run_together({**good, "broken": broken})
    assert isinstance(logs["broken"]["error"], GenerationError)
    assert broken.finish_reason == "error"
    for prompt in good:
        assert logs[prompt]["text"] == solo[prompt][0]
    after = engine.stream_chat(ask(PROMPTS[2]), GREEDY, "after")
    assert "".join(after) == solo[PROMPTS[2]][0]


# ---- shutdown ----------------------------------------------------------------------------------------------


def test_close_aborts_running_replies_and_ends_the_thread(tiny_model_dir: Path) -> None:
    threads_before = set(threading.enumerate())
    engine = TransformersEngine(tiny_model_dir, SETTINGS)
    assert engine.max_concurrency == SETTINGS.max_batch_size
    stream = engine.stream_chat(ask(PROMPTS[0]), GREEDY, "closing")
    engine.close()
    "".join(stream)
    assert stream.finish_reason == "abort"
    assert not engine._worker.is_alive()
    assert new_threads(threads_before) == []
    with pytest.raises(GenerationError, match="closed"):
        engine.stream_chat(ask("hi"), GREEDY, "late")
    engine.close()  # twice is fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_serves_on_a_gpu(tiny_model_dir: Path, solo: dict[str, tuple[str, int]]) -> None:
    """On a GPU machine, DEVICE=cuda serves the same greedy answers as the CPU."""
    engine = TransformersEngine(tiny_model_dir, EngineSettings(backend="transformers", device="cuda"))
    try:
        assert engine.device.type == "cuda"
        assert "".join(engine.stream_chat(ask(PROMPTS[0]), GREEDY, "gpu")) == solo[PROMPTS[0]][0]
    finally:
        engine.close()


REMOTE_MODELING = '''
"""A model with its own modelling code and the older interface of e.g. InternLM2's remote code: the KV cache
is ``past_key_values`` and every position's logits come back (no ``logits_to_keep``)."""
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "remote_tiny"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=past_key_values, use_cache=use_cache)
'''


@pytest.fixture(scope="module")
def remote_code_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's weights and tokenizer behind its own modelling file (``auto_map``)."""
    model_dir = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(
        model_type="remote_tiny",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def test_a_model_with_its_own_modelling_code_serves_the_same_replies(
    remote_code_model_dir: Path, solo: dict[str, tuple[str, int]]
) -> None:
    """The ``past_key_values`` / all-logits path (InternLM2's remote code) decodes what the Llama path does,
    alone and batched."""
    with pytest.raises(ValueError, match="trust_remote_code"):  # its code runs only when the operator allows
        TransformersEngine(remote_code_model_dir, SETTINGS)
    engine = TransformersEngine(remote_code_model_dir, dataclasses.replace(SETTINGS, trust_remote_code=True))
    try:
        assert type(engine.model).__name__ == "RemoteForCausalLM"
        assert (engine._cache_arg, engine._last_logits) == ("past_key_values", {})
        streams = {p: engine.stream_chat(ask(p), GREEDY, f"remote-{i}") for i, p in enumerate(PROMPTS[:4])}
        logs = run_together(streams)
        for prompt in PROMPTS[:4]:
            assert logs[prompt].get("text", "") == solo[prompt][0], prompt
    finally:
        engine.close()
