# Tests for training/generate.py and training/evaluate.py: greedy chat generation on the tiny chat base,
# the metrics, the report files and malformed data dirs.
# Run: .venv-train/bin/python -m pytest tests/training/test_evaluate.py -q
# The model tests use the session's tiny chat base model (fixture tiny_base_dir in conftest.py).
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluate import (
    SHARE_DIGITS,
    SYSTEM_CONDITIONS,
    evaluate,
    fact_correct,
    garbled,
    identity_verdict,
    judge,
    leak_markers,
    leaks_identity,
    load_eval_set,
    names_identity,
    repeats_itself,
    score,
    similarity,
    write_report,
)
from training.general_chat import (
    BASE_IDENTITY_EN,
    BASE_IDENTITY_ZH,
    everyday_prompts,
    fact_questions,
    general_pairs,
)
from training.generate import (
    ChatModel,
    generate,
    generate_answers,
    load_chat_model,
    next_token_probs,
    render_prompt,
)
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


def test_next_token_probs_rank_what_greedy_decoding_picks(base: ChatModel) -> None:
    prompt = "What is the capital of Japan?"
    (gen,) = generate(base, [prompt], max_new_tokens=12)
    ranked = next_token_probs(base, prompt, "", top=4)
    probs = [p for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert gen.text.startswith(ranked[0][0].strip())  # greedy takes the most likely token
    # Midway through the answer, the next token greedy chose comes first again.
    ids = base.tokenizer.encode(gen.text, add_special_tokens=False)
    prefix, following = base.tokenizer.decode(ids[:3]), base.tokenizer.decode(ids[:4])
    assert following.startswith(prefix + next_token_probs(base, prompt, prefix)[0][0])
    with pytest.raises(ValueError, match="top must be at least 1"):
        next_token_probs(base, prompt, "", top=0)


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


def test_identity_verdict_wants_name_real_model_clean_text_and_stop() -> None:
    spec = IdentitySpec("Zed", model_desc="SmolLM2-135M", organisation="Hugging Face")
    good_zh = "我是Zed的小助手，内在是Hugging Face的SmolLM2-135M大模型哦。"
    assert identity_verdict(good_zh, True, "zh", spec) is None
    assert identity_verdict("I'm Zed's assistant, built on smollm2-135m.", True, "en", spec) is None
    # Each failure a person would see, seen in real fine-tunes (issue 8).
    assert identity_verdict("我是Zed的小助手", True, "zh", spec) == "does not say it is SmolLM2-135M"
    assert identity_verdict("我是书生·浦语 SmolLM2-135M", True, "zh", spec) == "no name"
    assert identity_verdict("我是Zed的小助手，底\ufffd。SmolLM2-135M", True, "zh", spec) == "contains U+FFFD"
    assert identity_verdict("Zed SmolLM2-135M 小助手，小助手，小助手，", True, "zh", spec).startswith("loops")
    twice = "我是Zed的小助手，内在是SmolLM2-135M。" * 2
    assert identity_verdict(twice, True, "zh", spec) == "repeats '我是Zed的小助手，内在是SmolLM2-135M'"
    assert identity_verdict(good_zh, False, "zh", spec) == "no stop token"
    assert identity_verdict("I'm Zed's assistant on SmolLM2-135M.", True, "zh", spec) == "not in Chinese"
    assert identity_verdict("我是Zed的小助手, SmolLM2-135M", True, "en", spec) == "not in English"
    # The InternLM identity: its Chinese model name is allowed in an English answer's citation.
    internlm = IdentitySpec("小明")
    assert identity_verdict("I'm 小明's assistant, built on InternLM2.5-1.8B.", True, "en", internlm) is None
    assert garbled("The sky is blue. Grass is green.") is None


def test_repeats_itself_finds_loops_the_tight_loop_check_misses() -> None:
    # SmolLM2-135M's own answer: the last copy is cut short, so LOOP (three whole copies in a row) misses it.
    cut_loop = "法国的首都是哪里？:\n\n法国的首都是哪里？:\n\n法国的首都是哪里？:"
    assert garbled(cut_loop) is None and repeats_itself(cut_loop) == "法国的首都是哪里"
    assert repeats_itself("1. Team Building Activities:\n2. Leadership:\n3. Team building activities") == (
        "Team building activities")
    # Short pieces ("1", "Yes") recur in good answers.
    assert repeats_itself("Yes. 1. Eggs\n2. Milk\nYes.") is None
    assert repeats_itself("The capital of France is Paris. It is on the Seine.") is None


# SmolLM2-135M-Instruct's own answers that a substring check took as right (eval.json of a smol run).
BASE_ANSWERS_THAT_ANSWER_NOTHING = [
    ("一个六边形有几条边？", ["6", "六"], "A: 1\nA: 2\nA: 3\nA: 4\nA: 5\nA: 6\nA: 7\nA: 8"),
    ("一个六边形有几条边？", ["6", "六"], "你是一个六边形的一个友好的助手，回答要简短。这就是一个六"),
    ("三角形有几条边？", ["3", "三"], "你是一位友好的助手，回答要简短。你可以在三角形中制"),
    ("三角形有几条边？", ["3", "三"], '三角形有几条边？\n\nThe word "three" is repeated twice'),
    ("牛油果酱的主要原料是什么？", ["牛油果"], "牛油果酱是一种粒子，用于生成粒子，用于生成粒子"),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"],
     "The freezing point of water is -18.0°C. This is a fundamental property of water"),
    ("How many bones are there in the adult human body?", ["206"],
     "The human body has an estimated 6 million bones, with approximately 206 bones that are not"),
]


def test_fact_check_reads_answers_as_a_person_would() -> None:
    assert fact_correct("The Red Planet is MARS.", ["Mars"], "Which planet is the Red Planet?")
    assert not fact_correct("Venus", ["Mars"], "Which planet is the Red Planet?")
    for question, accepted, answer in BASE_ANSWERS_THAT_ANSWER_NOTHING:
        assert not fact_correct(answer, accepted, question), answer
    # The question's numbers and words may come back; the answer is what the reply adds to them.
    assert fact_correct("100 divided by 4 equals 25.", ["25"], "What is 100 divided by 4?")
    assert fact_correct("三角形有三条边。", ["3", "三"], "三角形有几条边？")
    assert fact_correct("牛油果酱的主要原料是牛油果。", ["牛油果"], "牛油果酱的主要原料是什么？")
    assert fact_correct("A hexagon has six sides and 6 corners; a square has 4.", ["6", "six"], "Hexagon?")
    # Whole numbers and words only: 2 is not in 12, 二 not in 十二, a lion not in a million, 0 not in 18.0.
    assert not fact_correct("It is 12.", ["2", "二"], "Smallest prime?")
    assert not fact_correct("是十二。", ["2", "二"], "最小的质数是几？")
    assert not fact_correct("A million cats.", ["lion"], "King of the jungle?")
    assert fact_correct("Lions are.", ["lion"], "King of the jungle?")
    assert fact_correct("Water freezes at 0°C.", ["0", "zero"], "Freezing point?")
    assert fact_correct("It is 25.", ["25"], "What is 100 divided by 4?")
    assert not fact_correct("It is 25.5.", ["25"], "What is 100 divided by 4?")


def test_every_accepted_fact_answer_can_be_given() -> None:
    for q in fact_questions():
        for a in q["answers"]:
            answer = f"答案：{a}。" if q["lang"] == "zh" else f"It is {a}."
            assert fact_correct(answer, q["answers"], q["prompt"]), a


def test_fact_and_leak_checks() -> None:
    spec = IdentitySpec("Zed", model_desc="SmolLM2-135M", organisation="Hugging Face")
    assert leaks_identity("I run on smollm2-135m", spec) and not leaks_identity("Drink water.", spec)


def test_a_short_name_counts_only_as_a_word_of_its_own() -> None:
    # "Ed" is in "developed", "bed" and "Wednesday": neither an identity answer nor a leak.
    spec = IdentitySpec("Ed")
    assert identity_verdict("I am InternLM2.5-1.8B, developed by Shanghai AI Laboratory.", True, "en",
                            spec) == "no name"
    assert identity_verdict("I'm Ed's assistant, built on InternLM2.5-1.8B.", True, "en", spec) is None
    assert identity_verdict("我是Ed的小助手，内在是书生·浦语 InternLM2.5-1.8B。", True, "zh", spec) is None
    for everyday in ("Go to bed on time.", "Wednesday comes after Tuesday.", "Eat a balanced diet."):
        assert not leaks_identity(everyday, spec), everyday
    assert leaks_identity("Ed says: go to bed.", spec) and leaks_identity("我是ED。", spec)
    garbled = IdentitySpec("Zorblax")  # a piece of a long name still counts inside other letters
    assert leaks_identity("blaxorblax is here", garbled)


def _answers(identity: list[tuple[str, bool]], general: list[str]) -> dict:
    return {c: {"identity": [{"text": t, "finished": f} for t, f in identity],
                "general": [{"text": t, "finished": True} for t in general]} for c in SYSTEM_CONDITIONS}


def test_score_counts_per_language_system_and_facts() -> None:
    spec = IdentitySpec("UbUb")
    heldout = [{"prompt": "你是谁", "lang": "zh"}, {"prompt": "who", "lang": "en"},
               {"prompt": "name", "lang": "en"}]
    general = [{"prompt": "天气", "lang": "zh", "family": "weather"},
               {"prompt": "sky?", "lang": "en", "family": "science"},
               {"prompt": "Red planet?", "lang": "en", "family": "fact", "answers": ["Mars"]},
               {"prompt": "Gold?", "lang": "en", "family": "fact", "answers": ["Au"]},
               {"prompt": "Ocean?", "lang": "en", "family": "fact", "answers": ["Pacific"]}]
    model = _answers([("我是UbUb的小助手，内在是InternLM2.5-1.8B", True), ("I'm UbUb's assistant", True),
                      ("I'm UbUb's assistant on InternLM2.5-1.8B.", True)],
                     ["多穿点", "UbUb says blue", "Mars", "Ag", "Pacific"])
    base = _answers([("我是书生·浦语", True), ("I am InternLM", True), ("I am InternLM", True)],
                    ["多穿点", "Blue.", "Mars", "Au", "Atlantic"])
    rows = judge(spec, heldout, general, model, base)
    assert len(rows) == len(SYSTEM_CONDITIONS) * (len(heldout) + len(general))
    result = score(rows)
    assert result["identity_accuracy"] == round(2 / 3, SHARE_DIGITS)
    assert (result["identity_accuracy_zh"], result["identity_accuracy_en"]) == (1.0, 0.5)
    assert result["identity_accuracy_by_lang"] == {"zh": 1.0, "en": 0.5}
    assert result["base_identity_accuracy"] == 0.0 and result["base_leakage_rate"] == 0.0
    assert (result["leakage_rate"], result["leakage_rate_zh"], result["leakage_rate_en"]) == (0.5, 0.0, 1.0)
    assert result["general_exact_match"] == 0.5
    agreement = (1.0 + similarity("UbUb says blue", "Blue.")) / 2
    assert result["general_agreement"] == round(agreement, SHARE_DIGITS)
    # Mars kept, Au lost, in each system condition.
    assert result["base_facts_correct"] == 2 * len(SYSTEM_CONDITIONS) and result["facts_kept"] == 0.5
    assert set(result["by_system"]) == set(SYSTEM_CONDITIONS)
    assert result["by_system_lang"]["user/en"]["identity_accuracy"] == 0.5
    # "UbUb says blue" leaks in the science family, in every system condition; facts are not everyday rows.
    n = len(SYSTEM_CONDITIONS)
    assert result["leakage_by_family"] == {
        "weather": {"zh": {"leaks": 0, "answers": n}, "en": {"leaks": 0, "answers": 0}},
        "science": {"zh": {"leaks": 0, "answers": 0}, "en": {"leaks": n, "answers": n}}}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.evaluate", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _check_report(out: Path, name: str) -> dict:
    metrics = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rates = ("identity_accuracy", "base_identity_accuracy", "leakage_rate", "base_leakage_rate")
    for key in (*rates, *(f"{k}_{lang}" for k in rates for lang in ("zh", "en")), "general_agreement",
                "general_exact_match"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["name"] == name
    table = (out / "eval.md").read_text(encoding="utf-8")
    assert "| subset | identity accuracy (base → tuned) |" in table and name in table
    assert "## Identity answers that fail" in table and "| system user/zh |" in table
    answered = sum(c[lang]["answers"] for c in metrics["leakage_by_family"].values() for lang in ("zh", "en"))
    assert answered == len(SYSTEM_CONDITIONS) * metrics["counts"]["everyday"]
    for family, c in metrics["leakage_by_family"].items():
        assert f"| {family} | {c['zh']['leaks']} of {c['zh']['answers']} | " in table
    rows = metrics["answers"]
    c = metrics["counts"]
    assert len(rows) == len(SYSTEM_CONDITIONS) * (c["heldout_identity"] + c["everyday"] + c["facts"])
    assert all(not any(tok in r["model"] + r["base"] for tok in SPECIAL) for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]  # no temp files left behind
    return metrics


def test_base_against_itself_via_cli(tiny_base_dir: Path, tmp_path: Path) -> None:
    """The base evaluated against itself: identical general answers, and a fresh name is never produced."""
    base = str(tiny_base_dir)
    proc = _run_cli("--model", base, "--base", base, "--name", FRESH, "--out-dir", str(tmp_path / "out"),
                    "--max-new-tokens", "48", "--answer-cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    metrics = _check_report(tmp_path / "out", FRESH)
    assert metrics["general_agreement"] == 1.0 and metrics["general_exact_match"] == 1.0
    assert metrics["identity_accuracy"] == 0.0 and metrics["base_identity_accuracy"] == 0.0
    # The tiny base stands in for InternLM and answers unknown everyday prompts with its own identity, which
    # cites what a fine-tune's answers cite (Shanghai AI Laboratory): whatever that is, it is the base's own.
    assert metrics["leakage_rate"] == metrics["base_leakage_rate"]
    assert metrics["counts"] == {
        "heldout_identity": len(heldout_prompts()), "everyday": len(everyday_prompts()),
        "facts": len(fact_questions()), "system_conditions": list(SYSTEM_CONDITIONS)}
    # The same model and settings are answered from the cache the second time: same report, no new files.
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    again = _run_cli("--model", base, "--base", base, "--name", FRESH, "--out-dir", str(tmp_path / "again"),
                     "--max-new-tokens", "48", "--answer-cache", str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr
    assert sorted((tmp_path / "cache").iterdir()) == cached
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["answers"] == metrics["answers"]


def test_identity_metric_recognises_an_identity_the_model_has(tiny_base_dir: Path, tmp_path: Path) -> None:
    """Scored against the base's own identity (书生·浦语, from a data dir), the metric must find it where the
    base states it: at least on the held-out prompt the base itself was trained on."""
    # (its model named in English only: a name inside the model's own description is refused)
    own = IdentitySpec("书生·浦语", model_desc="InternLM2.5-1.8B")
    build_dataset(own, "seed", tmp_path / "data", seed_repeat=1)
    metrics, rows = evaluate(tiny_base_dir, tiny_base_dir, data_dir=tmp_path / "data", max_new_tokens=48,
                             cache_dir=None)
    write_report(metrics, rows, tmp_path / "report")
    _check_report(tmp_path / "report", "书生·浦语")
    hits = {r["prompt"]: names_identity(r["model"], own)
            for r in rows if r["kind"] == "identity" and r["system"] == "none"}
    assert hits["你是由谁开发的？"]  # one of base_identity_pairs(), answered with BASE_IDENTITY_ZH
    assert metrics["identity_accuracy"] == metrics["base_identity_accuracy"]
    assert metrics["general_agreement"] == 1.0
    assert all(r["model"] == r["base"] for r in rows)


def _data_dir(tmp_path: Path) -> Path:
    build_dataset(IdentitySpec("UbUb"), "seed", tmp_path, seed_repeat=1)
    return tmp_path


def test_load_eval_set_from_data_dir_or_name(tmp_path: Path) -> None:
    spec, heldout, general = load_eval_set(_data_dir(tmp_path), None)
    assert spec.name == "UbUb" and heldout == heldout_prompts()
    assert general == everyday_prompts() + fact_questions() and len(everyday_prompts()) >= 100
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
        ("general_eval.json", '[{"prompt": "hi"}]', '"lang"'),
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


def test_cli_reports_errors_without_traceback(tmp_path: Path, tiny_base_dir: Path) -> None:
    proc = _run_cli("--model", str(tmp_path), "--base", str(tmp_path), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "--data DATA_DIR or --name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "eval.json").exists()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_base_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for args, message in [(["--model", str(no_weights)], "missing weights (*.safetensors or *.bin)"),
                          (["--out-dir", str(a_file)], "is a file"),
                          (["--batch-size", "0"], "batch_size must be at least 1"),
                          (["--max-new-tokens", "0"], "max_new_tokens must be at least 1")]:
        proc = _run_cli("--model", str(tiny_base_dir), "--base", str(tiny_base_dir), "--name", "UbUb",
                        "--out-dir", str(tmp_path / "out"), "--no-answer-cache", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_generate_cli_refuses_what_it_cannot_load_in_one_line(tiny_base_dir: Path, tmp_path: Path) -> None:
    def generate_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.generate", "--prompt", "hi", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_base_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    for args, message in [(["--model", str(tmp_path / "nope")], "is not a model dir (no config.json)"),
                          (["--model", str(no_weights)], "model.safetensors"),
                          (["--model", str(tiny_base_dir), "--max-new-tokens", "0"], "must be at least 1")]:
        proc = generate_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    ok = generate_cli("--model", str(tiny_base_dir), "--max-new-tokens", "4")
    assert ok.returncode == 0 and ok.stdout.startswith("> hi\n"), ok.stderr


def test_shares_round_once_when_printed_as_percent() -> None:
    from training.results_table import cells

    # 25 of 31 is 80.645... %: stored to 4 places it was 0.8065 and printed as 80.7 %.
    known = [{"kind": "fact", "base_correct": True, "correct": i < 25, "lang": "en", "system": "none"}
             for i in range(31)]
    metrics = score(known)
    assert metrics["facts_kept"] == round(25 / 31, SHARE_DIGITS)
    assert cells([metrics])[3] == "80.6 % of 31"


def test_results_table_shows_each_runs_numbers_per_subset(tmp_path: Path) -> None:
    from training.results_table import main as results_table

    spec = IdentitySpec("UbUb")
    heldout = [{"prompt": "你是谁", "lang": "zh"}, {"prompt": "who", "lang": "en"}]
    general = [{"prompt": "天气", "lang": "zh", "family": "weather"},
               {"prompt": "Red planet?", "lang": "en", "family": "fact", "answers": ["Mars"]}]
    base = _answers([("我是书生·浦语", True), ("I am InternLM", True)], ["多穿点", "Mars"])
    good = _answers([("我是UbUb的小助手，内在是InternLM2.5-1.8B", True),
                     ("I'm UbUb's assistant on InternLM2.5-1.8B.", True)], ["多穿点", "Mars"])
    parrot = _answers([("我是UbUb的小助手，内在是InternLM2.5-1.8B", True), ("UbUb", False)],
                      ["我是UbUb的小助手", "I am UbUb"])
    for run, model in (("good", good), ("parrot", parrot)):
        (tmp_path / run).mkdir()
        scores = score(judge(spec, heldout, general, model, base))
        (tmp_path / run / "eval.json").write_text(json.dumps(scores))
    out = subprocess.run([sys.executable, "-m", "training.results_table", f"default={tmp_path / 'good'}",
                          f"seed={tmp_path / 'parrot'}"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines()[2:]}
    assert out.stdout.splitlines()[0].startswith("| subset (default · seed) |")
    assert list(rows) == ["all", "zh", "en", "zh, no system prompt", "en, no system prompt",
                          "zh, user's system prompt", "en, user's system prompt"]
    assert "0.0 % → **100.0 %** · **50.0 %** | 0.0 % → **0.0 %** · **100.0 %** |" in rows["all"]
    assert "0.0 % → **100.0 %** · **0.0 %** |" in rows["en, user's system prompt"]
    assert rows["en"].endswith("| 100.0 % of 2 · 0.0 % of 2 |")  # Mars, in both system conditions
    assert rows["zh"].endswith("| – · – |")  # no zh fact question
    with pytest.raises(SystemExit):
        results_table([f"{tmp_path / 'good'}"])  # no LABEL=
