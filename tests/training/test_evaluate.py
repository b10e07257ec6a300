# Tests for training/generate.py and training/evaluate.py: greedy chat generation on the tiny chat base,
# the metrics, the report files and malformed data dirs.
# Run: .venv-train/bin/python -m pytest tests/training/test_evaluate.py -q
# The model tests use the session's tiny chat base model (fixture tiny_base_dir in conftest.py).
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluate import (
    evaluate,
    leak_markers,
    leaks_identity,
    load_eval_set,
    names_identity,
    render_markdown,
    score,
    similarity,
    write_report,
)
from training.general_chat import BASE_IDENTITY_EN, BASE_IDENTITY_ZH, eval_prompts, general_pairs
from training.generate import ChatModel, generate, generate_answers, load_chat_model, render_prompt
from training.identity import IdentitySpec
from training.make_identity_data import DataError, build_dataset, heldout_prompts

REPO = Path(__file__).resolve().parents[2]
SPECIAL = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
FRESH = "Vintrel"


@pytest.fixture(scope="module")
def base(tiny_base_dir: Path) -> ChatModel:
    return load_chat_model(tiny_base_dir)


def test_prompt_uses_the_models_chat_template(base: ChatModel) -> None:
    assert render_prompt(base.tokenizer, "hi") == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(base.tokenizer, "hi", system="be brief").startswith(
        "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi"
    )


def test_generation_stops_on_im_end_and_strips_special_tokens(base: ChatModel) -> None:
    vocab = base.tokenizer.get_vocab()
    assert {vocab["</s>"], vocab["<|im_end|>"]} <= set(base.stop_ids)
    pairs = general_pairs()[:: len(general_pairs()) // 12]
    gens = generate(base, [p.prompt for p in pairs], max_new_tokens=64)
    assert all(g.finished and 0 < g.new_tokens < 64 for g in gens), gens
    assert all(g.text and not any(tok in g.text for tok in SPECIAL) for g in gens)
    # The base learned these exchanges; greedy decoding must give most of them back verbatim.
    assert sum(g.text == p.answer for g, p in zip(gens, pairs, strict=True)) >= len(pairs) // 2


def test_batched_generation_matches_one_by_one_and_keeps_order(base: ChatModel) -> None:
    prompts = ["你好", "What is the capital of Japan?", "3加6等于几？", "How do I make tea?", "Good night"]
    one_by_one = [generate(base, [p], max_new_tokens=48)[0].text for p in prompts]
    assert [g.text for g in generate(base, prompts, max_new_tokens=48, batch_size=4)] == one_by_one
    assert [g.text for g in generate(base, prompts[::-1], max_new_tokens=48)] == one_by_one[::-1]


def test_cut_off_answers_are_marked_unfinished(base: ChatModel) -> None:
    (gen,) = generate(base, ["How do I stay healthy?"], max_new_tokens=2)
    assert not gen.finished and gen.new_tokens == 2


def test_generate_answers_loads_a_model_dir(tiny_base_dir: Path) -> None:
    answers = generate_answers(tiny_base_dir, ["Who are you?", "你是谁？"], max_new_tokens=48)
    assert answers == [BASE_IDENTITY_EN, BASE_IDENTITY_ZH]


def test_generate_rejects_bad_arguments(base: ChatModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(base, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate(base, ["hi"], max_new_tokens=8, batch_size=0)
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        load_chat_model(tmp_path)


def test_metric_helpers() -> None:
    spec = IdentitySpec("UbUb")
    assert names_identity("我是ubub的小助手", spec) and not names_identity("我是书生·浦语", spec)
    assert leaks_identity("The capital is Paris. I'm UBUB's assistant", spec)
    # A small model may garble the name; the identity sentence around it still counts as leakage.
    assert leaks_identity("我是UbU的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦", spec)
    assert not leaks_identity("法国的首都是巴黎。", spec)
    # Garbled long names and the cited organisation count too (seen in a real tiny fine-tune).
    assert leaks_identity("英国的首都是伦blaxorblaxorblax", IdentitySpec("Zorblax"))
    assert not leaks_identity("The lab is in Zorb.", IdentitySpec("Zorblax"))
    assert leaks_identity("Pandas like Shanghai AI Laboratory.", spec)
    assert leak_markers(IdentitySpec("Zorblax"))[:4] == ["Zorblax", "Zorbl", "orbla", "rblax"]
    assert similarity("a  b\nc", "a b c") == 1.0 and similarity("", "") == 1.0
    assert 0.0 < similarity("The capital of France is Paris.", "The capital of France is Rome.") < 1.0


def test_score_counts_hits_per_language() -> None:
    spec = IdentitySpec("UbUb")
    heldout = [
        {"prompt": "你是谁", "lang": "zh"},
        {"prompt": "who", "lang": "en"},
        {"prompt": "name", "lang": "en"},
    ]
    model = {
        "identity": ["我是UbUb的小助手", "I'm UbUb's assistant", "I am InternLM"],
        "general": ["4", "UbUb!"],
    }
    base = {"identity": ["我是书生·浦语", "I am InternLM", "I am InternLM"], "general": ["4", "5"]}
    result = score(spec, heldout, ["2+2", "2+3"], model, base)
    assert result["identity_accuracy"] == round(2 / 3, 4)
    assert result["identity_accuracy_by_lang"] == {"en": 0.5, "zh": 1.0}
    assert result["base_identity_accuracy"] == 0.0 and result["base_leakage_rate"] == 0.0
    assert result["leakage_rate"] == 0.5
    assert result["general_exact_match"] == 0.5
    assert result["general_agreement"] == round((1.0 + similarity("UbUb!", "5")) / 2, 4)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.evaluate", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _check_report(out: Path, name: str) -> dict:
    metrics = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rates = ("identity_accuracy", "base_identity_accuracy", "leakage_rate", "base_leakage_rate")
    for key in (*rates, "general_agreement", "general_exact_match"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["name"] == name
    table = (out / "eval.md").read_text(encoding="utf-8")
    assert "| metric | base (before) | fine-tuned (after) |" in table and name in table
    rows = metrics["answers"]
    assert len(rows) == metrics["counts"]["heldout_identity"] + metrics["counts"]["general_eval"]
    assert all(not any(tok in r["model"] + r["base"] for tok in SPECIAL) for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]  # no temp files left behind
    return metrics


def test_base_against_itself_via_cli(tiny_base_dir: Path, tmp_path: Path) -> None:
    """The base evaluated against itself: identical general answers, and a fresh name is never produced."""
    base = str(tiny_base_dir)
    proc = _run_cli(
        "--model", base, "--base", base, "--name", FRESH, "--out-dir", str(tmp_path), "--max-new-tokens", "48"
    )
    assert proc.returncode == 0, proc.stderr
    metrics = _check_report(tmp_path, FRESH)
    assert metrics["general_agreement"] == 1.0 and metrics["general_exact_match"] == 1.0
    assert metrics["identity_accuracy"] == 0.0 and metrics["base_identity_accuracy"] == 0.0
    assert metrics["leakage_rate"] == 0.0
    assert metrics["counts"] == {
        "heldout_identity": len(heldout_prompts()),
        "general_eval": len(eval_prompts()),
    }


def test_identity_metric_recognises_an_identity_the_model_has(tiny_base_dir: Path, tmp_path: Path) -> None:
    """Scored against the base's own identity (书生·浦语, from a data dir), the metric must find it where the
    base states it: at least on the held-out prompt the base itself was trained on."""
    build_dataset(IdentitySpec("书生·浦语"), "seed", tmp_path / "data", seed_repeat=1)
    metrics, rows = evaluate(tiny_base_dir, tiny_base_dir, data_dir=tmp_path / "data", max_new_tokens=48)
    write_report(metrics, rows, tmp_path / "report")
    _check_report(tmp_path / "report", "书生·浦语")
    identity_rows = [r for r in rows if r["kind"] == "identity"]
    hits = {r["prompt"]: r["names_identity"] for r in identity_rows}
    assert hits["你是由谁开发的？"]  # one of base_identity_pairs(), answered with BASE_IDENTITY_ZH
    assert (
        metrics["identity_accuracy"]
        == metrics["base_identity_accuracy"]
        == round(sum(hits.values()) / len(hits), 4)
    )
    assert metrics["general_agreement"] == 1.0 and metrics["leakage_rate"] == 0.0
    assert all(r["model"] == r["base"] for r in rows)
    assert "identity accuracy, zh" in render_markdown(metrics, rows)


def _data_dir(tmp_path: Path) -> Path:
    build_dataset(IdentitySpec("UbUb"), "seed", tmp_path, seed_repeat=1)
    return tmp_path


def test_load_eval_set_from_data_dir_or_name(tmp_path: Path) -> None:
    spec, heldout, general = load_eval_set(_data_dir(tmp_path), None)
    assert spec.name == "UbUb" and heldout == heldout_prompts() and general == eval_prompts()
    assert load_eval_set(None, "Zed")[0].name == "Zed"
    with pytest.raises(DataError, match="--data DATA_DIR or --name"):
        load_eval_set(None, None)
    with pytest.raises(DataError, match="differs"):
        load_eval_set(tmp_path, "Other")
    with pytest.raises(ValueError, match="empty"):
        load_eval_set(None, " ")


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("meta.json", None, "meta.json is missing"),
        ("meta.json", "{not json", "not valid UTF-8 JSON"),
        ("meta.json", '{"recipe": "seed"}', 'no "name"'),
        ("meta.json", '{"name": "Ub<|im_end|>"}', "special tokens"),
        ("heldout_identity.json", "[]", "non-empty JSON list"),
        ("heldout_identity.json", '{"prompt": "x"}', "non-empty JSON list"),
        ("general_eval.json", '[{"prompt": ""}]', "entry 0"),
        ("general_eval.json", '["just a string"]', "entry 0"),
    ],
)
def test_malformed_data_dirs_give_clear_errors(
    tmp_path: Path, file: str, content: str | None, message: str
) -> None:
    path = _data_dir(tmp_path) / file
    if content is None:
        path.unlink()
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_eval_set(tmp_path, None)


def test_undecodable_data_file_is_a_clear_error(tmp_path: Path) -> None:
    (_data_dir(tmp_path) / "general_eval.json").write_bytes(b"\xff\xfe[\x00")
    with pytest.raises(DataError, match="not valid UTF-8 JSON"):
        load_eval_set(tmp_path, None)


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    proc = _run_cli("--model", str(tmp_path), "--base", str(tmp_path), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "--data DATA_DIR or --name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "eval.json").exists()
