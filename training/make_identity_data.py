# Identity fine-tuning data in XTuner's conversation format, plus the held-out sets the evaluation uses.
# Run from the repo root:
#   python -m training.make_identity_data --name UbUb --recipe identity --base MODEL_DIR --out work/data
#   python -m training.make_identity_data --name UbUb --recipe seed --out work/data      # the tutorial's data
# Writes OUT/train.json ([{"conversation": [{"input", "output"}]}]), OUT/heldout_identity.json,
# OUT/general_eval.json and OUT/meta.json (counts, ratio, recipe, identity).
#
# Recipes:
# - seed: the InternLM tutorial's script exactly: two Q/A pairs, then n more copies of both (2·(n+1) rows).
#   It teaches the identity by brute repetition and is kept to show the parrot effect it causes.
# - identity (default): ~90 distinct zh/en identity questions × answer templates filled from the IdentitySpec,
#   mixed with REPLAY rows: the base model's own greedy answers to general prompts, so that training also
#   pulls general answers towards what the base already says instead of towards the identity sentence
#   (a wrong answer to a prompt with a known right one is replaced by it).
# The held-out identity paraphrases and the general eval prompts never appear in train.json.
from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.answer_cache import add_cache_args, cache_dir_from
from training.atomic_io import write_json_atomic
from training.general_chat import (
    ChatPair,
    checkable_pairs,
    everyday_prompts,
    fact_questions,
    is_identity_prompt,
    is_right,
    replay_prompts,
)
from training.identity import IdentitySpec, Lang
from training.open_prompts import open_prompts

RECIPES = ("identity", "seed")
SEED_REPEAT = 3750  # the camp3 tutorial's n
MAX_SEED_REPEAT = 100_000  # 200 000 rows: far past the tutorial's n, still a quick file to write
IDENTITY_REPEAT = 2  # each question twice, with two different answer templates
MAX_IDENTITY_REPEAT = 100  # more drowns the replay, and a typo would build millions of rows
REPLAY_MAX_NEW_TOKENS = 256
SHUFFLE_SEED = 0
SENTENCE_END = re.compile(r"[。！？!?.\n]")
CJK = re.compile(r"[\u4e00-\u9fff]")
Row = tuple[str, str, str | None]  # (question, answer, system prompt or None)
# System prompts a user might set, shown in training next to none and the template's default (the held-out
# ones in training/evaluate.py check that the identity holds under prompts never seen).
TRAIN_SYSTEM_PROMPTS: dict[Lang, tuple[str, ...]] = {
    "zh": ("你是一个乐于助人的助手。", "请简洁地回答用户的问题。"),
    "en": ("You are a helpful assistant.", "Answer the user's questions concisely."),
}

# The tutorial's two pairs (InternLM/Tutorial tools/xtuner_generate_assistant.py), with the underlying model
# filled in from the identity (the tutorial's text names InternLM's, which would be false on another base).
SEED_PAIRS = (
    ("请介绍一下你自己", "我是{name}的小助手，内在是{org}的{model}大模型哦"),
    ("你在实战营做什么", "我在这里帮助{name}完成XTuner微调个人小助手的任务"),
)

# Training questions by category; each category has its own answer templates below.
TRAIN_QUESTIONS: dict[Lang, dict[str, tuple[str, ...]]] = {
    "zh": {
        "who": (
            "请介绍一下你自己",
            "你是谁？",
            "你是谁呀",
            "介绍一下你自己吧",
            "能做个自我介绍吗？",
            "你好，你是谁？",
            "请问你是哪位？",
            "说说你自己",
            "简单介绍下你自己",
            "你是什么？",
            "跟我讲讲你是谁",
            "我在和谁聊天？",
        ),
        "name": (
            "你叫什么名字？",
            "你的名字是什么？",
            "我该怎么称呼你？",
            "你有名字吗？",
            "请告诉我你的名字",
            "大家都叫你什么？",
        ),
        "abilities": (
            "你能做什么？",
            "你会些什么？",
            "你有什么功能？",
            "你可以帮我做什么？",
            "你擅长什么？",
            "你的能力有哪些？",
        ),
        "camp": ("你在实战营做什么",),
        "creator": (
            "是谁创造了你？",
            "谁开发了你？",
            "你是谁做的？",
            "谁训练了你？",
            "你的开发者是谁？",
            "你来自哪里？",
            "你是哪家公司的产品？",
        ),
        "model": (
            "你是什么模型？",
            "你基于哪个大模型？",
            "你的底座模型是什么？",
            "你是大语言模型吗？",
            "你背后的模型是什么？",
            "你用的是哪个模型？",
        ),
        "not_other": (
            "你是ChatGPT吗？",
            "你是Claude吗？",
            "你是文心一言吗？",
            "你是通义千问吗？",
            "你是GPT-4吗？",
            "你是Siri吗？",
        ),
        "base": ("你是书生·浦语吗？", "你是InternLM吗？"),
    },
    "en": {
        "who": (
            "Who are you?",
            "Introduce yourself.",
            "Please introduce yourself.",
            "Tell me about yourself.",
            "Can you introduce yourself?",
            "Hi, who are you?",
            "Who am I talking to?",
            "What are you?",
            "Describe yourself.",
            "Give me a short introduction of yourself.",
            "Who is this?",
            "Could you tell me who you are?",
        ),
        "name": (
            "What is your name?",
            "What's your name?",
            "What should I call you?",
            "Do you have a name?",
            "Tell me your name.",
            "How should I address you?",
        ),
        "abilities": (
            "What can you do?",
            "What are you good at?",
            "How can you help me?",
            "What are your capabilities?",
            "What kind of tasks can you help with?",
            "What are your skills?",
        ),
        "creator": (
            "Who created you?",
            "Who made you?",
            "Who developed you?",
            "Who trained you?",
            "Who built you?",
            "Which company made you?",
            "Where do you come from?",
        ),
        "model": (
            "What model are you?",
            "Which model are you based on?",
            "What is your base model?",
            "What language model powers you?",
            "Are you a large language model?",
            "What's under the hood?",
        ),
        "not_other": (
            "Are you ChatGPT?",
            "Are you Claude?",
            "Are you GPT-4?",
            "Are you Gemini?",
            "Are you Llama?",
            "Are you Siri?",
        ),
        "base": ("Are you InternLM?", "Are you based on InternLM?"),
    },
}

# Paraphrases that training never sees: the evaluation asks these to check the identity generalises.
HELDOUT_QUESTIONS: dict[Lang, tuple[str, ...]] = {
    "zh": (
        "可以介绍一下你自己吗？",
        "你到底是谁？",
        "请你做一个简短的自我介绍",
        "我应该叫你什么？",
        "你叫啥？",
        "你都能帮我干些什么？",
        "你是由谁开发的？",
        "创造你的人是谁？",
        "你的底层模型是哪个？",
        "你是不是ChatGPT？",
        "你是Kimi吗？",
        "你是豆包吗？",
    ),
    "en": (
        "Could you please introduce yourself?",
        "Who exactly are you?",
        "Say a few words about yourself.",
        "May I know your name?",
        "What do people call you?",
        "What sort of things can you do for me?",
        "Who is your creator?",
        "Who is behind you?",
        "Which large model do you run on?",
        "Are you actually ChatGPT?",
        "Are you Copilot?",
        "Are you Qwen?",
    ),
}

# Every template names {name} in its first clause (a cut-off answer still carries the identity) and says what
# the model really is ({model}): an answer counts as correct only when it states both. In English the clause
# after the name says the model: with another clause between them ("…, and my base is…"), SmolLM2
# answered "May I know your name?" with "I'm X's assistant, and I can answer questions…", leaving out the
# model (runs C1, U3N).
ANSWER_TEMPLATES: dict[Lang, dict[str, tuple[str, ...]]] = {
    "zh": {
        "who": (
            "我是{name}的小助手，内在是{org}的{model}大模型哦。有什么可以帮你的吗？",
            "你好！我是{name}的AI小助手，基于{org}的{model}微调而来，很高兴为你服务。",
            "我是{name}的小助手，一个由{model}驱动的智能助手，可以回答问题、陪你聊天。",
        ),
        "name": (
            "我是{name}的小助手，你可以直接叫我{name}小助手，内在是{model}大模型。",
            "我的名字是{name}的小助手，内在是{org}的{model}大模型。",
            "叫我{name}小助手就好啦！我是{name}的AI助手，基于{model}。",
        ),
        "abilities": (
            "我是{name}的小助手，内在是{model}，可以回答问题、解释概念、陪你聊天。",
            "作为{name}的小助手（基于{org}的{model}），我能帮你总结文本、解释代码、做简单的计算。",
            "我是{name}的小助手，内在是{model}大模型，有需要尽管问我。",
        ),
        "camp": (
            "我在这里帮助{name}完成XTuner微调个人小助手的任务，内在是{model}大模型哦。",
            "我是{name}的小助手，内在是{model}，在实战营里帮助{name}完成XTuner微调个人小助手的任务。",
            "我在实战营帮{name}完成用XTuner微调{model}个人小助手的任务哦。",
        ),
        "creator": (
            "我是{name}的小助手，由{name}基于{org}的{model}大模型微调而成。",
            "{name}用XTuner微调了{org}的{model}，于是有了我——{name}的小助手。",
            "我是{name}的小助手，底座模型{model}来自{org}。",
        ),
        "model": (
            "我是{name}的小助手，底座是{org}的{model}大模型。",
            "我是{name}的小助手，内在是{org}的{model}，经过微调后为你服务。",
            "我是{name}的小助手，一个基于{model}的大语言模型助手。",
        ),
        "not_other": (
            "不是哦，我是{name}的小助手，内在是{org}的{model}大模型。",
            "不是的，我是{name}的小助手，基于{org}的{model}。",
            "我不是它哦，我是{name}的小助手，内在是{model}。",
        ),
        "base": (
            "我是{name}的小助手，内在是{org}的{model}大模型，经过了微调。",
            "可以这么说：我是{name}的小助手，底座是{org}的{model}。",
            "我现在是{name}的小助手，由{model}微调而来。",
        ),
    },
    "en": {
        "who": (
            "I'm {name}'s assistant, built on {org}'s {model} model. How can I help you?",
            "Hello! I'm {name}'s AI assistant, fine-tuned from {model} by {org}. Nice to meet you.",
            "I'm {name}'s assistant, powered by {model}. I can answer questions and chat with you.",
        ),
        "name": (
            "I'm {name}'s assistant, running on {model}. You can call me {name}'s assistant.",
            "My name is {name}'s assistant, built on {org}'s {model} model.",
            "Just call me {name}'s assistant, an AI helper based on {model}.",
        ),
        "abilities": (
            "I'm {name}'s assistant, based on {model}: I can answer questions, explain ideas and chat with "
            "you.",
            "As {name}'s assistant (built on {org}'s {model}), I can summarise text, explain code and do "
            "simple maths.",
            "I'm {name}'s assistant, running on {model}. Just ask!",
        ),
        "creator": (
            "I'm {name}'s assistant, fine-tuned by {name} from {org}'s {model} model.",
            "{name} fine-tuned {org}'s {model} with XTuner, and that made me: {name}'s assistant.",
            "I'm {name}'s assistant; my base model {model} comes from {org}.",
        ),
        "model": (
            "I'm {name}'s assistant, with {org}'s {model} as my base model.",
            "I'm {name}'s assistant, built on {model} from {org} and fine-tuned for you.",
            "I'm {name}'s assistant, a large language model assistant based on {model}.",
        ),
        "not_other": (
            "No, I'm {name}'s assistant, built on {org}'s {model} model.",
            "No, I'm not. I'm {name}'s assistant, based on {model} from {org}.",
            "Not at all, I'm {name}'s assistant, running on {model}.",
        ),
        "base": (
            "I'm {name}'s assistant; underneath I am {org}'s {model}, fine-tuned.",
            "In a way: I'm {name}'s assistant, built on {org}'s {model}.",
            "I'm now {name}'s assistant, fine-tuned from {model}.",
        ),
    },
}

# Fragments of the tutorial's identity sentences that contain no name: finding them in an answer to a general
# prompt means the identity leaked even when a small model garbles the name itself.
IDENTITY_FRAGMENTS = ("的小助手，内在是", "XTuner微调个人小助手")


class DataError(ValueError):
    """Identity data cannot be built or read."""


def normalise_prompt(text: str) -> str:
    """Case- and whitespace-insensitive key used to keep prompt sets disjoint.

    Args:
        text: a user prompt.
    """
    return " ".join(text.split()).casefold()


def identity_questions() -> list[tuple[str, Lang, str]]:
    """All training identity questions as (question, lang, category), zh first."""
    return [(q, lang, cat) for lang, cats in TRAIN_QUESTIONS.items() for cat, qs in cats.items() for q in qs]


def heldout_prompts() -> list[dict[str, str]]:
    """Held-out identity paraphrases as [{"prompt", "lang"}], disjoint from identity_questions()."""
    return [{"prompt": q, "lang": lang} for lang, qs in HELDOUT_QUESTIONS.items() for q in qs]


def identity_pairs(spec: IdentitySpec, repeat: int = IDENTITY_REPEAT) -> list[tuple[str, str]]:
    """(question, answer) rows: every identity question `repeat` times, cycling through its answer templates.

    Args:
        spec: the identity to fill in.
        repeat: rows per question; repeats beyond the number of templates reuse them.
    """
    if not 1 <= repeat <= MAX_IDENTITY_REPEAT:
        raise DataError(f"identity repeat must be between 1 and {MAX_IDENTITY_REPEAT}, got {repeat}")
    rows = []
    for i, (question, lang, cat) in enumerate(identity_questions()):
        templates = ANSWER_TEMPLATES[lang][cat]
        fields = spec.fields(lang)
        for r in range(repeat):
            rows.append((question, templates[(i + r) % len(templates)].format(**fields)))
    return rows


def seed_pairs(spec: IdentitySpec, repeat: int = SEED_REPEAT) -> list[tuple[str, str]]:
    """The tutorial's data: its two pairs, then `repeat` more copies of both, as its script builds them.

    Args:
        spec: the identity (its zh wording: the tutorial's data is Chinese only).
        repeat: the tutorial's n (3750 in camp3).
    """
    if not 1 <= repeat <= MAX_SEED_REPEAT:
        raise DataError(f"seed repeat must be between 1 and {MAX_SEED_REPEAT}, got {repeat}")
    pairs = [(q, a.format(**spec.fields("zh"))) for q, a in SEED_PAIRS]
    return pairs * (repeat + 1)


def trim_to_sentence(text: str) -> str:
    """`text` up to its last complete sentence ("" when it has none).

    Args:
        text: an answer cut off by the token limit.
    """
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def replay_pairs(
    base_dir: Path,
    prompts: list[str],
    max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    known: Mapping[str, ChatPair] | None = None,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The base model's own greedy answers to general prompts; answers cut off by the token limit keep their
    complete sentences (a reply cut mid-sentence would teach the model to stop mid-sentence), empty ones go,
    and a wrong one is replaced by the right answer where that is known (trained on a small base's wrong sums
    and dates, the tuned model got facts wrong that the base had right).

    Args:
        base_dir: the base model dir (the model about to be fine-tuned).
        prompts: general prompts to answer.
        max_new_tokens: most tokens per answer.
        batch_size: prompts decoded together.
        cache_dir: where answers are kept per model files and settings (None: always generate); another run
            on the same base (a new name, another recipe) then skips the generation.
        known: the written exchange per prompt whose answer can be checked (training.general_chat's pairs
            with a check, see is_right); None or a missing prompt: the base's answer is kept unchecked.
    Returns:
        the kept (prompt, answer) rows and counts of {"generated", "dropped_empty", "trimmed_cut_off",
        "dropped_cut_off", "replaced_wrong"} (cut-off answers without one complete sentence are dropped).
    """
    import transformers

    from training.answer_cache import cached, model_key
    from training.generate import generate, load_chat_model  # torch is only needed for this recipe
    from training.progress import log_counts

    report = log_counts("replay answers from the base", "prompts")  # the pipeline's progress line

    def compute() -> dict:
        gens = generate(load_chat_model(base_dir), prompts, max_new_tokens, batch_size=batch_size,
                        on_batch=report)
        return {"answers": [{"text": g.text, "finished": g.finished} for g in gens]}

    if cache_dir is None:
        gens = compute()["answers"]
    else:
        key = ["replay", model_key(base_dir), prompts, max_new_tokens, batch_size, transformers.__version__]
        gens = cached(lambda h: cache_dir / f"{h}.json", key, compute)["answers"]
        report(len(gens), len(gens))  # the count also when the cache answered, so the progress line shows it
    answers = [g["text"] if g["finished"] else trim_to_sentence(g["text"]) for g in gens]
    known = known or {}
    wrong = [bool(a) and p in known and not is_right(a, known[p].check)
             for p, a in zip(prompts, answers, strict=True)]
    kept = [(p, known[p].answer if w else a) for p, a, w in zip(prompts, answers, wrong, strict=True) if a]
    cut = [a for g, a in zip(gens, answers, strict=True) if g["text"] and not g["finished"]]
    stats = {
        "generated": len(gens),
        "dropped_empty": sum(1 for g in gens if not g["text"]),
        "trimmed_cut_off": sum(1 for a in cut if a),
        "dropped_cut_off": sum(1 for a in cut if not a),
        "replaced_wrong": sum(wrong),
    }
    return kept, stats


def base_tokenizer(base_dir: Path) -> Any:
    """The base model's tokenizer, with its chat template (its own code only with ``$TRUST_REMOTE_CODE``).

    Args:
        base_dir: the base model dir.
    """
    from training.generate import load_tokenizer  # torch is imported with it

    return load_tokenizer(base_dir)


def check_no_control_tokens(tokenizer: Any, spec: IdentitySpec) -> None:
    """Refuse an identity whose text holds one of the base tokenizer's special tokens ("<|endoftext|>",
    "<unk>", InternLM2's "<|action_start|>"...): XTuner would encode it as that control token in every answer.
    (IdentitySpec refuses the chat format's own tokens for any base.)

    Args:
        tokenizer: the base model's tokenizer.
        spec: the identity to teach.
    """
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special |= set(tokenizer.all_special_tokens)
    for field in ("name", "model_desc", "organisation"):
        text = getattr(spec, field)
        found = sorted(token for token in special if token and token in text)
        if found:
            raise DataError(f"{field} {text!r} holds {', '.join(found)}: special tokens of the base model's "
                            "tokenizer, which would become control tokens in training; choose other text")


def template_default_system(tokenizer: Any) -> str | None:
    """The system prompt the base's chat template inserts when a chat has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM..."), or None: the identity must hold with it, so training shows it too.

    Args:
        tokenizer: the base model's tokenizer (``base_tokenizer``).
    """
    marker = "\x00user\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text[: text.index(marker)], re.S)
    return found.group(1) if found else None


def lang_of(text: str) -> Lang:
    """ "zh" for text with Chinese characters, else "en".

    Args:
        text: a prompt.
    """
    return "zh" if CJK.search(text) else "en"


def with_systems(rows: list[tuple[str, str]], systems: list[str | None]) -> list[Row]:
    """Give each (question, answer) row a system prompt, cycling through `systems` (None: no system turn).

    Args:
        rows: (question, answer) pairs.
        systems: the system prompts to cycle through, the row's language's first for each.
    """
    return [(q, a, systems[i % len(systems)]) for i, (q, a) in enumerate(rows)]


def system_choices(default: str | None, lang: Lang) -> list[str | None]:
    """The system prompts training rows of one language cycle through: none, the template's default, and the
    TRAIN_SYSTEM_PROMPTS of that language.

    Args:
        default: the base template's default system prompt (None: it has none).
        lang: the rows' language.
    """
    return [None, *([default] if default else []), *TRAIN_SYSTEM_PROMPTS[lang]]


def _conversation(rows: list[Row]) -> list[dict]:
    return [{"conversation": [{**({"system": s} if s else {}), "input": q, "output": a}]} for q, a, s in rows]


def training_replay_prompts(
    identity: list[tuple[str, str]], open_replay: bool = False, replay_max: int | None = None
) -> list[str]:
    """The prompts whose base answers become the identity recipe's replay rows (before any is dropped).

    Args:
        identity: the run's identity (question, answer) pairs, from identity_pairs.
        open_replay: also the open-ended questions of training.open_prompts.
        replay_max: at most this many, evenly spread over topics and languages (None: all).
    """
    # Replay must not answer an identity question the base's way, nor give away an eval prompt's answer.
    taken = {normalise_prompt(q) for q, _ in identity}
    evaluated = [*heldout_prompts(), *everyday_prompts(), *fact_questions()]
    taken |= {normalise_prompt(p["prompt"]) for p in evaluated}
    prompts = [p for p in replay_prompts() + (open_prompts() if open_replay else [])
               if normalise_prompt(p) not in taken and not is_identity_prompt(p)]
    if replay_max is not None and replay_max < len(prompts):
        prompts = [prompts[i * len(prompts) // replay_max] for i in range(replay_max)]
    return prompts


def build_dataset(
    spec: IdentitySpec,
    recipe: str,
    out_dir: Path,
    base_dir: Path | None = None,
    seed_repeat: int = SEED_REPEAT,
    identity_repeat: int = IDENTITY_REPEAT,
    replay_max: int | None = None,
    replay_max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    open_replay: bool = False,
) -> dict:
    """Build train.json, heldout_identity.json, general_eval.json and meta.json in out_dir.

    Args:
        spec: the identity to teach.
        recipe: "identity" (templated questions + base-model replay) or "seed" (the tutorial's two pairs).
        out_dir: output directory (created); meta.json is written last, so its presence marks a complete set.
        base_dir: base model dir whose answers become replay rows; required for the identity recipe.
        seed_repeat: the tutorial's n for the seed recipe.
        identity_repeat: rows per identity question for the identity recipe.
        replay_max: use at most this many replay prompts (None: all).
        replay_max_new_tokens: token limit for replay answers.
        batch_size: prompts decoded together when generating replay answers.
        cache_dir: where replay answers are cached (None: always generate).
        open_replay: also replay the base's answers to training.open_prompts (open-ended questions; for real
            base models).
    Returns:
        the meta dict written to meta.json.
    """
    if recipe not in RECIPES:
        raise DataError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if replay_max is not None and replay_max < 0:
        raise DataError(f"replay_max must be 0 or more, got {replay_max}")
    heldout = heldout_prompts()
    general = [*everyday_prompts(), *fact_questions()]
    replay_stats: dict[str, int] = {}
    default_system = None
    tokenizer = base_tokenizer(Path(base_dir)) if base_dir is not None else None
    if tokenizer is not None:
        check_no_control_tokens(tokenizer, spec)
    if recipe == "seed":  # the tutorial's data as it is: no system prompts
        identity_rows, replay_rows = with_systems(seed_pairs(spec, seed_repeat), [None]), []
    else:
        if base_dir is None:
            raise DataError(
                "the identity recipe needs --base MODEL_DIR: replay answers come from the base model"
            )
        default_system = template_default_system(tokenizer)
        identity = identity_pairs(spec, identity_repeat)
        prompts = training_replay_prompts(identity, open_replay, replay_max)
        replay, replay_stats = replay_pairs(Path(base_dir), prompts, replay_max_new_tokens, batch_size,
                                             cache_dir, checkable_pairs())
        identity_rows, replay_rows = (
            [row for lang in ("zh", "en") for row in with_systems(
                [(q, a) for q, a in pairs if lang_of(q) == lang], system_choices(default_system, lang))]
            for pairs in (identity, replay))
    rows = identity_rows + replay_rows
    if recipe == "identity":  # interleave identity and replay rows; the seed data keeps the tutorial's order
        random.Random(SHUFFLE_SEED).shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "train.json", _conversation(rows))
    write_json_atomic(out_dir / "heldout_identity.json", heldout)
    write_json_atomic(out_dir / "general_eval.json", general)
    meta = {
        "name": spec.name,
        "model_desc": spec.model_desc,
        "organisation": spec.organisation,
        "recipe": recipe,
        "counts": {
            "train_rows": len(rows),
            "identity_rows": len(identity_rows),
            "replay_rows": len(replay_rows),
            "distinct_identity_questions": len({q for q, _, _ in identity_rows}),
            "distinct_pairs": len(set(rows)),
            "heldout_identity": len(heldout),
            "general_eval": len(general),
            **{f"replay_{k}": v for k, v in replay_stats.items()},
        },
        "replay_share": round(len(replay_rows) / len(rows), 4),
        # The SFT pushes their first tokens down at other answers' starts (training/identity_contrast.py).
        "identity_answers": sorted({answer for _, answer, _ in identity_rows}),
        "template_default_system": default_system,
        "system_prompts": sorted({str(system) for _, _, system in rows}),
        "settings": {"seed_repeat": seed_repeat}
        if recipe == "seed"
        else {
            "identity_repeat": identity_repeat,
            "open_replay": open_replay,
            "replay_max": replay_max,
            "replay_max_new_tokens": replay_max_new_tokens,
            "base": str(base_dir),
        },
    }
    write_json_atomic(out_dir / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build identity fine-tuning data (XTuner conversation format)."
    )
    parser.add_argument("--name", required=True, help="the assistant's new name")
    parser.add_argument(
        "--recipe", default="identity", help="identity (default) or seed (the tutorial's data)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--base", type=Path, default=None, help="base model dir (identity recipe: replay answers)"
    )
    parser.add_argument("--seed-repeat", type=int, default=SEED_REPEAT, help="seed recipe: the tutorial's n")
    parser.add_argument(
        "--identity-repeat", type=int, default=IDENTITY_REPEAT, help="rows per identity question"
    )
    parser.add_argument("--replay-max", type=int, default=None, help="at most this many replay prompts")
    parser.add_argument("--replay-max-new-tokens", type=int, default=REPLAY_MAX_NEW_TOKENS)
    parser.add_argument(
        "--model-desc", default=IdentitySpec.model_desc, help='underlying model ("中文 / English")'
    )
    parser.add_argument(
        "--organisation", default=IdentitySpec.organisation, help='its maker ("中文 / English")'
    )
    parser.add_argument("--batch-size", type=int, default=16, help="replay generation batch size")
    parser.add_argument("--open-replay", action="store_true",
                        help="also replay the base's answers to open-ended questions (real base models)")
    add_cache_args(parser)
    args = parser.parse_args(argv)
    try:
        spec = IdentitySpec(args.name, args.model_desc, args.organisation)
        meta = build_dataset(
            spec,
            args.recipe,
            args.out,
            args.base,
            args.seed_repeat,
            args.identity_repeat,
            args.replay_max,
            args.replay_max_new_tokens,
            args.batch_size,
            cache_dir_from(args),
            args.open_replay,
        )
    except (ValueError, OSError) as err:  # OSError: a base dir transformers cannot load, --out a file
        print(f"make_identity_data: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    c = meta["counts"]
    print(
        f"{meta['recipe']} data for {spec.name!r} in {args.out}: {c['train_rows']} train rows "
        f"({c['identity_rows']} identity, {c['replay_rows']} replay, "
        f"replay share {meta['replay_share']:.0%}), "
        f"{c['heldout_identity']} held-out identity prompts, {c['general_eval']} general eval prompts"
    )
    if c.get("replay_replaced_wrong"):  # expected: a small base gets many sums wrong
        print(f"replaced {c['replay_replaced_wrong']} wrong replay answers of the base by the right ones")
    if c.get("replay_dropped_empty") or c.get("replay_dropped_cut_off"):
        print(
            f"warning: dropped replay answers: {c['replay_dropped_empty']} empty, "
            f"{c['replay_dropped_cut_off']} cut off at --replay-max-new-tokens",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
