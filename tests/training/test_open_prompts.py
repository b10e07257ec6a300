# Tests of the open-ended replay prompts: python -m pytest tests/training/test_open_prompts.py -q
from collections import Counter

from training.general_chat import EVERYDAY_PROMPTS, everyday_prompts, fact_questions, is_identity_prompt
from training.make_identity_data import identity_questions, lang_of, normalise_prompt
from training.open_prompts import OPEN_PROMPTS, open_prompts
from training.presets import PRESETS


def test_families_are_not_the_evaluations() -> None:
    # Leakage is measured on families training never sees; replaying one of them would hide leakage.
    assert set(OPEN_PROMPTS).isdisjoint({*EVERYDAY_PROMPTS, "fact"})
    assert len(OPEN_PROMPTS) >= 10


def test_bilingual_balanced_and_in_their_language() -> None:
    for family, by_lang in OPEN_PROMPTS.items():
        assert set(by_lang) == {"zh", "en"} and len(by_lang["zh"]) == len(by_lang["en"]) >= 6, family
        for lang, prompts in by_lang.items():
            assert all(lang_of(p) == lang for p in prompts), (family, lang)
    assert len(open_prompts()) == sum(len(p) for by_lang in OPEN_PROMPTS.values() for p in by_lang.values())


def test_no_duplicate_identity_question_or_evaluation_prompt() -> None:
    keys = Counter(normalise_prompt(p) for p in open_prompts())
    assert [k for k, n in keys.items() if n > 1] == []
    assert [p for p in open_prompts() if is_identity_prompt(p)] == []
    evaluated = {normalise_prompt(q["prompt"]) for q in [*everyday_prompts(), *fact_questions()]}
    trained = {normalise_prompt(q) for q, _, _ in identity_questions()}
    assert set(keys).isdisjoint(evaluated | trained)


def test_real_bases_replay_them_and_the_tiny_one_does_not() -> None:
    # The tiny base only knows general_chat's tables; its answers to open questions would teach nothing.
    replaying = {name for name, preset in PRESETS.items() if preset.open_replay}
    assert replaying == {"smol", "internlm2_5-1_8b"}
