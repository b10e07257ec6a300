# Tests of the synthetic general chat set: python -m pytest tests/training/test_general_chat.py -q
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from training.general_chat import (
    BASE_IDENTITY_EN,
    BASE_IDENTITY_ZH,
    ChatPair,
    base_identity_pairs,
    eval_prompts,
    fact_questions,
    general_pairs,
    is_identity_prompt,
    is_right,
    replay_prompts,
    tokenizer_corpus,
)

REPO = Path(__file__).resolve().parents[2]
DUMP = (
    "import json; from training.general_chat import general_pairs, replay_prompts, eval_prompts;"
    "print(json.dumps([[p.prompt, p.answer, p.lang, p.topic] for p in general_pairs()]"
    " + [replay_prompts(), eval_prompts()], ensure_ascii=False))"
)


def test_same_data_in_a_fresh_interpreter():
    fresh = subprocess.run([sys.executable, "-c", DUMP], cwd=REPO, capture_output=True, text=True, check=True)
    here = [[p.prompt, p.answer, p.lang, p.topic] for p in general_pairs()]
    here += [replay_prompts(), eval_prompts()]
    assert json.loads(fresh.stdout) == here


def test_a_few_hundred_unique_pairs_in_both_languages_for_every_topic():
    pairs = general_pairs()
    assert 200 <= len(pairs) <= 500
    prompts = [p.prompt for p in pairs]
    assert len(set(prompts)) == len(prompts)
    assert all(p.prompt.strip() and p.answer.strip() for p in pairs)
    topics = {p.topic for p in pairs}
    expected = {"capital", "colour", "animal", "calendar", "opposite", "arithmetic", "small_talk", "how_to"}
    assert expected <= topics
    for topic in topics:
        assert {p.lang for p in pairs if p.topic == topic} == {"zh", "en"}, topic


def test_languages_match_their_text():
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for p in general_pairs():
        if p.lang == "zh":
            assert cjk.search(p.prompt) and cjk.search(p.answer), p
        else:
            assert p.prompt.isascii() and p.answer.isascii(), p


def test_arithmetic_answers_are_correct():
    ops = {"加": int.__add__, "减": int.__sub__, "乘以": int.__mul__,
           "plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}
    patterns = {"zh": re.compile(r"^(\d)(加|减|乘以)(\d)等于(\d+)。$"),
                "en": re.compile(r"^(\d) (plus|minus|times) (\d) is (\d+)\.$")}
    checked = Counter()
    for p in general_pairs():
        match = patterns[p.lang].match(p.answer)
        if match:
            a, op, b, result = match.groups()
            assert ops[op](int(a), int(b)) == int(result), p
            checked[p.lang] += 1
    assert checked["zh"] >= 40 and checked["en"] >= 40


def test_checks_accept_the_written_answers_and_judge_replies():
    pairs = general_pairs()
    assert all(is_right(p.answer, p.check) for p in pairs if p.check)
    checked = {p.topic for p in pairs if p.check}
    assert checked == {"capital", "colour", "animal", "calendar", "opposite", "arithmetic"}
    assert not [p for p in pairs if p.topic in checked and not p.check]
    # A number must be the reply's last one: wrong sums name their operands too.
    assert is_right("To find 4 times 8, we multiply 4 by itself: 16. So, 4 times 8 is 32.", ("32",))
    assert not is_right("We need the difference between 6 and 4.\n\nThe answer is 12.", ("2",))
    assert not is_right("To solve this problem, think of a way to combine 9 and 5.", ("14",))
    # Words: anywhere, any case; one of several is enough.
    assert is_right("THE CAPITAL IS MOSCOW.", ("Moscow",)) and is_right("A dog has 4 legs.", ("four", "4"))
    assert not is_right("The capital of Russia is Paris.", ("Moscow",))


def test_chinese_numerals():
    answers = {p.prompt: p.answer for p in general_pairs()}
    assert answers["用汉字怎么写12？"] == "12用汉字写作十二。"
    assert answers["用汉字怎么写20？"] == "20用汉字写作二十。"
    assert answers["用汉字怎么写59？"] == "59用汉字写作五十九。"


def test_replay_and_eval_split_the_general_prompts():
    general = [p.prompt for p in general_pairs()]
    replay, held_out = replay_prompts(), eval_prompts()
    assert not set(replay) & set(held_out)
    assert sorted(replay + held_out) == sorted(general)
    assert 60 <= len(held_out) <= 120
    by_prompt = {p.prompt: p for p in general_pairs()}
    groups = {(p.topic, p.lang) for p in general_pairs()}
    assert {(by_prompt[q].topic, by_prompt[q].lang) for q in held_out} == groups  # every group is measured


def test_fact_questions_are_bilingual_unique_and_never_replayed():
    from training.make_identity_data import lang_of, normalise_prompt
    from training.open_prompts import open_prompts

    facts = fact_questions()
    # The same 48 facts in each language: one lost fact is about 1 point of facts_kept, not 3.
    assert Counter(f["lang"] for f in facts) == {"zh": 48, "en": 48}
    assert all(lang_of(f["prompt"]) == f["lang"] and f["answers"] for f in facts)
    keys = [normalise_prompt(f["prompt"]) for f in facts]
    assert len(set(keys)) == len(keys)
    # A replayed question would train the base's own answer to it and hide a loss.
    assert set(keys).isdisjoint(normalise_prompt(p) for p in replay_prompts() + open_prompts())
    assert not [f["prompt"] for f in facts if is_identity_prompt(f["prompt"])]


def test_no_identity_question_among_general_prompts():
    identity = base_identity_pairs()
    assert identity and all(is_identity_prompt(p.prompt) for p in identity)
    assert not {p.prompt for p in identity} & {p.prompt for p in general_pairs()}
    assert not [p.prompt for p in general_pairs() if is_identity_prompt(p.prompt)]
    for p in general_pairs():
        assert not any(word in p.answer for word in ("书生", "InternLM", "上海人工智能实验室")), p


def test_base_identity_answers():
    for pair in base_identity_pairs():
        assert pair.answer == (BASE_IDENTITY_ZH if pair.lang == "zh" else BASE_IDENTITY_EN)
    assert {p.lang for p in base_identity_pairs()} == {"zh", "en"}
    assert ChatPair("你是谁？", BASE_IDENTITY_ZH, "zh", "identity").messages() == [
        {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": BASE_IDENTITY_ZH}]


def test_tokenizer_corpus_covers_every_exchange():
    corpus = "\n".join(tokenizer_corpus())
    for p in general_pairs() + base_identity_pairs():
        assert p.prompt in corpus and p.answer in corpus
