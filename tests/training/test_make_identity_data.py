# Tests for training/identity.py and training/make_identity_data.py (identity + seed recipes, replay, errors).
# Run: .venv-train/bin/python -m pytest tests/training/test_make_identity_data.py -q
# The replay tests use the session's tiny chat base model (fixture tiny_base_dir in conftest.py).
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from training.general_chat import checkable_pairs, everyday_prompts, fact_questions, is_right, replay_prompts
from training.generate import Generation, generate, load_chat_model
from training.identity import IdentityError, IdentitySpec, mentions
from training.make_identity_data import (
    ANSWER_TEMPLATES,
    SEED_REPEAT,
    DataError,
    build_dataset,
    heldout_prompts,
    identity_pairs,
    identity_questions,
    lang_of,
    normalise_prompt,
    replay_pairs,
    seed_pairs,
    system_choices,
    trim_to_sentence,
)

REPO = Path(__file__).resolve().parents[2]
CJK = re.compile(r"[\u4e00-\u9fff]")
# A name the code has never seen, with a space and mixed case to catch naive handling.
FRESH = "Qorvia Zed"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.make_identity_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _inputs(train: list[dict]) -> list[str]:
    return [row["conversation"][0]["input"] for row in train]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("   \t ", "empty"),
        ("x" * 41, "41 characters"),
        ("Ub\nUb", "control"),
        ("Ub\x1bUb", "control"),
        ("Ub\u200bUb", "invisible"),
        ("\u200dUb", "invisible"),  # a joiner joins nothing at an end, or beside a space or another joiner
        ("Ub\u200c\u200dUb", "invisible"),
        ("Ub \u200dx", "invisible"),
        ("AI", "part of what the answers say the model is"),  # Shanghai AI Laboratory: no telling them apart
        ("InternLM2.5-1.8B Pro", "part of what the answers say the model is"),
        ("Ub<|im_end|>", "special tokens"),
        ("<|im_start|>system", "special tokens"),
        ("<s>Ub", "special tokens"),
        ("Ub</s>", "special tokens"),
    ],
)
def test_identity_spec_rejects_bad_names(name: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why) as err:
        IdentitySpec(name)
    assert isinstance(err.value, ValueError)


def test_identity_spec_normalises_and_accepts_good_names() -> None:
    assert IdentitySpec("  UbUb ").name == "UbUb"
    assert IdentitySpec("y" * 40).name == "y" * 40
    assert IdentitySpec("小明同学").name == "小明同学"
    assert IdentitySpec("مهر\u200cآفرین").name == "مهر\u200cآفرین"  # a Persian name's zero-width non-joiner
    assert IdentitySpec("\U0001f469\u200d\U0001f4bb Ada").name == "\U0001f469\u200d\U0001f4bb Ada"  # 👩‍💻
    assert IdentitySpec("Jose\u0301").name == "Jos\u00e9"  # a combining accent: the same name as precomposed
    assert mentions("I'm Jose\u0301's assistant", "Jos\u00e9") and mentions("Jos\u00e9 here", "Jose\u0301")
    assert IdentitySpec("Lab").name == "Lab"  # in "Laboratory", but not as a word of its own
    with pytest.raises(IdentityError) as too_long:
        IdentitySpec("x" * 41)
    assert str(too_long.value).endswith(f"'{'x' * 41}'")  # shown whole: no "…" after it
    with pytest.raises(IdentityError, match="'Face' is part of"):
        IdentitySpec("Face", model_desc="SmolLM2-135M", organisation="Hugging Face")
    with pytest.raises(IdentityError, match="model_desc"):
        IdentitySpec("UbUb", model_desc="")
    with pytest.raises(IdentityError, match="empty side"):
        IdentitySpec("UbUb", organisation="上海AI实验室 / ")


def test_fields_are_localised_per_language() -> None:
    spec = IdentitySpec("UbUb")
    assert spec.fields("zh") == {"name": "UbUb", "model": "书生·浦语 InternLM2.5-1.8B", "org": "上海AI实验室"}
    assert spec.fields("en") == {"name": "UbUb", "model": "InternLM2.5-1.8B", "org": "Shanghai AI Laboratory"}
    assert spec.model_id == "InternLM2.5-1.8B"
    assert IdentitySpec("UbUb", model_desc="SmolLM2-135M").model_id == "SmolLM2-135M"


def test_question_sets_are_large_bilingual_and_disjoint() -> None:
    questions = identity_questions()
    texts = [q for q, _, _ in questions]
    assert len(set(texts)) == len(texts) >= 80
    for lang in ("zh", "en"):
        assert sum(1 for _, lg, _ in questions if lg == lang) >= 40
    heldout = heldout_prompts()
    assert len({h["prompt"] for h in heldout}) == len(heldout) >= 20
    assert {h["lang"] for h in heldout} == {"zh", "en"}
    assert {normalise_prompt(h["prompt"]) for h in heldout}.isdisjoint(normalise_prompt(t) for t in texts)


def test_identity_answers_name_the_identity_in_the_question_language() -> None:
    spec = IdentitySpec(FRESH, model_desc="模型甲 / Model-A", organisation="实验室乙 / Lab-B")
    lang_of = {q: lang for q, lang, _ in identity_questions()}
    rows = identity_pairs(spec, repeat=3)
    assert len(rows) == 3 * len(lang_of)
    assert len(set(rows)) == len(rows)  # three different templates per question
    for question, answer in rows:
        # Every answer says who the assistant is and what it really is inside.
        assert FRESH in answer and "{" not in answer
        assert ("模型甲" if lang_of[question] == "zh" else "Model-A") in answer
        if lang_of[question] == "zh":
            assert CJK.search(answer) and "Model-A" not in answer and "Lab-B" not in answer
        else:
            assert answer.isascii(), answer


@pytest.mark.parametrize("template", [t for ts in ANSWER_TEMPLATES["en"].values() for t in ts])
def test_english_answers_say_the_model_in_the_clause_after_the_name(template: str) -> None:
    # SmolLM2 left out the model when another clause came first ("I'm X's assistant, and I can…", run C1).
    between = template[template.index("{name}"):template.index("{model}")]
    assert not re.search(r"[.!?]|\band\b", between), between


def test_seed_recipe_reproduces_the_tutorial(tmp_path: Path) -> None:
    meta = build_dataset(IdentitySpec(FRESH), "seed", tmp_path, seed_repeat=5)
    train = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    # The tutorial's script starts with the two pairs and appends n more copies of both.
    assert len(train) == meta["counts"]["train_rows"] == 12
    assert train[0] == {
        "conversation": [
            {
                "input": "请介绍一下你自己",
                "output": f"我是{FRESH}的小助手，内在是上海AI实验室的书生·浦语 InternLM2.5-1.8B大模型哦",
            }
        ]
    }
    assert train[1]["conversation"][0] == {
        "input": "你在实战营做什么",
        "output": f"我在这里帮助{FRESH}完成XTuner微调个人小助手的任务",
    }
    assert train == train[:2] * 6
    assert meta["recipe"] == "seed" and meta["counts"]["replay_rows"] == 0
    assert json.loads((tmp_path / "heldout_identity.json").read_text(encoding="utf-8")) == heldout_prompts()
    general = json.loads((tmp_path / "general_eval.json").read_text(encoding="utf-8"))
    assert general == everyday_prompts() + fact_questions()
    # On another base the tutorial's sentence names that base, not InternLM.
    smol = IdentitySpec(FRESH, "SmolLM2-135M", "Hugging Face")
    build_dataset(smol, "seed", tmp_path / "smol", seed_repeat=1)
    first = json.loads((tmp_path / "smol" / "train.json").read_text(encoding="utf-8"))[0]["conversation"][0]
    assert first["output"] == f"我是{FRESH}的小助手，内在是Hugging Face的SmolLM2-135M大模型哦"


def test_seed_cli_default_is_the_camp3_size(tmp_path: Path) -> None:
    proc = _run_cli("--name", FRESH, "--recipe", "seed", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    train = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    assert len(train) == 2 * (SEED_REPEAT + 1) == 7502
    assert json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["name"] == FRESH


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "  ", "--recipe", "seed"], "name is empty"),
        (["--name", "z" * 50, "--recipe", "seed"], "at most 40"),
        (["--name", "Ub<|im_end|>", "--recipe", "seed"], "special tokens"),
        (["--name", "UbUb", "--recipe", "alpaca"], "unknown recipe"),
        (["--name", "UbUb", "--recipe", "identity"], "needs --base"),
        (["--name", "UbUb", "--recipe", "seed", "--seed-repeat", "0"], "between 1 and 100000, got 0"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _run_cli(*args, "--out", str(tmp_path / "data"))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "meta.json").exists()


def test_build_dataset_errors_are_value_errors(tmp_path: Path) -> None:
    spec = IdentitySpec("UbUb")
    with pytest.raises(DataError, match="unknown recipe"):
        build_dataset(spec, "Identity", tmp_path)
    with pytest.raises(DataError, match="needs --base"):
        build_dataset(spec, "identity", tmp_path, base_dir=None)
    with pytest.raises(DataError, match="between 1 and 100, got 0"):
        identity_pairs(spec, repeat=0)
    with pytest.raises(DataError, match="between 1 and 100, got 101"):
        identity_pairs(spec, repeat=101)
    with pytest.raises(DataError, match="between 1 and 100000, got -3"):
        seed_pairs(spec, repeat=-3)
    with pytest.raises(DataError, match="between 1 and 100000, got 100001"):
        seed_pairs(spec, repeat=100_001)
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        build_dataset(spec, "identity", tmp_path, base_dir=tmp_path / "missing", replay_max=2)


def test_a_name_holding_a_special_token_of_the_base_is_refused(tiny_base_dir: Path, tmp_path: Path) -> None:
    # "<unk>" is not one of the chat format's tokens (IdentitySpec's list) but the tiny base's tokenizer
    # encodes it as its unknown-token id: in training data it would be a control token, not text.
    for recipe in ("seed", "identity"):
        with pytest.raises(DataError, match=r"name 'Bo<unk>' holds <unk>: special tokens of the base"):
            build_dataset(IdentitySpec("Bo<unk>"), recipe, tmp_path / recipe, tiny_base_dir, replay_max=2)
        assert not (tmp_path / recipe).exists()


REPLAY_MAX = 24


@pytest.fixture(scope="module")
def identity_data(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("identity_data")
    meta = build_dataset(IdentitySpec(FRESH), "identity", out, tiny_base_dir, replay_max=REPLAY_MAX)
    return out, meta


def test_identity_recipe_counts_and_files(identity_data: tuple[Path, dict]) -> None:
    out, meta = identity_data
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    c = meta["counts"]
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert len(train) == c["train_rows"] == c["identity_rows"] + c["replay_rows"]
    assert c["identity_rows"] == 2 * len(identity_questions()) and c["distinct_identity_questions"] >= 80
    assert c["replay_generated"] == REPLAY_MAX
    assert c["replay_rows"] == REPLAY_MAX - c["replay_dropped_empty"] - c["replay_dropped_cut_off"] > 0
    assert meta["replay_share"] == round(c["replay_rows"] / c["train_rows"], 4)
    # Every answer that names the assistant, once each: the SFT's identity contrast reads their openings.
    outputs = {row["conversation"][0]["output"] for row in train}
    assert meta["identity_answers"] == sorted(o for o in outputs if FRESH in o)
    # The tiny base's template has no default system prompt: rows cycle through none and the users' own ones.
    assert meta["template_default_system"] is None
    systems = [row["conversation"][0].get("system") for row in train]
    assert set(systems) == {None, *system_choices(None, "zh")[1:], *system_choices(None, "en")[1:]}
    for row in train:
        (turn,) = row["conversation"]
        assert set(turn) - {"system"} == {"input", "output"}
        assert turn["input"].strip() and turn["output"].strip()


def test_identity_recipe_never_trains_on_eval_prompts(identity_data: tuple[Path, dict]) -> None:
    out, _ = identity_data
    trained = {
        normalise_prompt(p) for p in _inputs(json.loads((out / "train.json").read_text(encoding="utf-8")))
    }
    heldout = json.loads((out / "heldout_identity.json").read_text(encoding="utf-8"))
    general = json.loads((out / "general_eval.json").read_text(encoding="utf-8"))
    assert len(heldout) >= 20 and len(general) == len(everyday_prompts()) + len(fact_questions())
    assert trained.isdisjoint(normalise_prompt(h["prompt"]) for h in heldout)
    assert trained.isdisjoint(normalise_prompt(g["prompt"]) for g in general)


def test_replay_rows_are_the_base_models_own_answers(
    identity_data: tuple[Path, dict], tiny_base_dir: Path
) -> None:
    out, _ = identity_data
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    identity = {q for q, _, _ in identity_questions()}
    replay = {
        t["input"]: t["output"] for row in train for t in row["conversation"] if t["input"] not in identity
    }
    # --replay-max picks prompts spread over all topics and both languages.
    assert len(replay) <= REPLAY_MAX and set(replay) <= set(replay_prompts())
    assert {lang_of(p) for p in replay} == {"zh", "en"}
    prompts = sorted(replay)
    # Same batch composition as the data build is not needed: greedy answers of a trained model are stable.
    fresh = generate(load_chat_model(tiny_base_dir), prompts, max_new_tokens=256, batch_size=len(prompts))
    # Where the right answer is known, a wrong one of the base's is replaced by it.
    known = checkable_pairs()
    assert any(p in known for p in replay)
    right = [p not in known or is_right(g.text, known[p].check) for p, g in zip(prompts, fresh, strict=True)]
    assert [replay[p] for p in prompts] == [
        g.text if ok else known[p].answer for p, g, ok in zip(prompts, fresh, right, strict=True)]
    assert all(FRESH not in answer for answer in replay.values())


def test_open_replay_adds_the_open_prompts(tiny_base_dir: Path, tmp_path: Path) -> None:
    from training.open_prompts import open_prompts

    cache = tmp_path / "answers"
    meta = build_dataset(IdentitySpec(FRESH), "identity", tmp_path / "open", tiny_base_dir,
                         replay_max=REPLAY_MAX, open_replay=True, cache_dir=cache)
    train = json.loads((tmp_path / "open" / "train.json").read_text(encoding="utf-8"))
    inputs = set(_inputs(train))
    # --replay-max spreads over both sets; without --open-replay none of them is asked.
    assert meta["settings"]["open_replay"] is True and meta["counts"]["replay_generated"] == REPLAY_MAX
    asked = [p for p in open_prompts() if p in inputs]
    assert asked and {lang_of(p) for p in asked} == {"zh", "en"}
    assert inputs & set(replay_prompts())
    plain = build_dataset(IdentitySpec(FRESH), "identity", tmp_path / "plain", tiny_base_dir,
                          replay_max=REPLAY_MAX, cache_dir=cache)
    plain_inputs = set(_inputs(json.loads((tmp_path / "plain" / "train.json").read_text(encoding="utf-8"))))
    assert plain["settings"]["open_replay"] is False and plain_inputs.isdisjoint(open_prompts())


def test_cut_off_answers_keep_their_complete_sentences() -> None:
    assert trim_to_sentence("The sky is blue. It scatters") == "The sky is blue."
    assert trim_to_sentence("天空是蓝色的。因为") == "天空是蓝色的。"
    assert trim_to_sentence("no sentence end at all") == ""


def test_replay_drops_cut_off_and_empty_answers(tiny_base_dir: Path, tmp_path: Path) -> None:
    prompts = replay_prompts()[:3]
    kept, stats = replay_pairs(tiny_base_dir, prompts, max_new_tokens=1)
    assert kept == [] and stats == {"generated": 3, "dropped_empty": 0, "trimmed_cut_off": 0,
                                    "dropped_cut_off": 3, "replaced_wrong": 0}
    # With its output head zeroed the model only ever emits token 0 (<unk>), which decodes to "".
    mute = tmp_path / "mute"
    shutil.copytree(tiny_base_dir, mute)
    weights = load_file(mute / "model.safetensors")
    weights["lm_head.weight"].zero_()
    save_file(weights, mute / "model.safetensors", metadata={"format": "pt"})
    kept, stats = replay_pairs(mute, prompts, max_new_tokens=4)
    assert kept == [] and stats == {"generated": 3, "dropped_empty": 3, "trimmed_cut_off": 0,
                                    "dropped_cut_off": 0, "replaced_wrong": 0}


def test_replay_replaces_answers_the_base_got_wrong(
    tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.generate

    # SmolLM2-135M's own answers (the tiny base was trained on the right ones, so they are given here).
    answers = {
        "What is 6 minus 4?": "To solve this problem, we need to find the difference between 6 and 4.\n\n"
                              "The answer is 12.",
        "What is 4 times 8?": "To find 4 times 8, we can multiply 4 by itself, which gives us 16. "
                              "So, 4 times 8 is 32.",
        "What is the capital of Russia?": "The capital of Russia is Moscow.",
        "How many legs does a chicken have?": "A chicken has four legs.",
        "Hello": "Hello! How can I assist you today?",  # small talk: nothing to check
    }

    def given(model: object, prompts: list[str], *args: object, **kwargs: object) -> list[Generation]:
        return [Generation(answers[p], True, 8) for p in prompts]

    monkeypatch.setattr(training.generate, "generate", given)
    known = checkable_pairs()
    kept, stats = replay_pairs(tiny_base_dir, list(answers), max_new_tokens=8, known=known)
    # The right answers stay the base's own; the wrong ones become the written ones.
    assert dict(kept) == {**answers, "What is 6 minus 4?": "6 minus 4 is 2.",
                          "How many legs does a chicken have?": "A chicken has two legs."}
    assert stats["replaced_wrong"] == 2 and stats["generated"] == 5
    # Without them every answer is the base's.
    assert dict(replay_pairs(tiny_base_dir, list(answers), max_new_tokens=8)[0]) == answers


def test_replay_answers_are_cached_per_base_and_settings(
    tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import training.generate
    from training.progress import count_line

    prompts, cache = replay_prompts()[:3], tmp_path / "answers"
    first = replay_pairs(tiny_base_dir, prompts, max_new_tokens=16, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base was asked again")

    monkeypatch.setattr(training.generate, "generate", no_generation)
    capsys.readouterr()
    assert replay_pairs(tiny_base_dir, prompts, max_new_tokens=16, cache_dir=cache) == first
    # The pipeline's progress line still shows the stage's count.
    assert count_line("replay answers from the base", 3, 3, "prompts") in capsys.readouterr().err
    # Other settings (or another base) are asked again.
    with pytest.raises(AssertionError, match="asked again"):
        replay_pairs(tiny_base_dir, prompts, max_new_tokens=17, cache_dir=cache)
    with pytest.raises(AssertionError, match="asked again"):
        replay_pairs(tiny_base_dir, prompts[:2], max_new_tokens=16, cache_dir=cache)


def test_identity_cli_with_base(tiny_base_dir: Path, tmp_path: Path) -> None:
    base = str(tiny_base_dir)
    proc = _run_cli(
        "--name", FRESH, "--out", str(tmp_path), "--base", base, "--replay-max", "6", "--identity-repeat", "1"
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert meta["recipe"] == "identity" and meta["counts"]["identity_rows"] == len(identity_questions())
    assert "replay share" in proc.stdout
