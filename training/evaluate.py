# Before/after evaluation of an identity fine-tune: does the model say who it is, correctly and cleanly, and
# did it keep answering everything else like the base model? Run from the repo root:
#   python -m training.evaluate --model work/merged --base BASE_DIR --data work/data --out-dir work
#   python -m training.evaluate --model some/model --base BASE_DIR --name UbUb --out-dir /tmp/ev  # no data
# Writes OUT/eval.json (metrics, plus every prompt with both answers under "answers") and OUT/eval.md
# (the before/after table and the worst cases).
# With --data the prompts come from make_identity_data's heldout_identity.json / general_eval.json and the
# identity from its meta.json; without it they are regenerated from the code and --name.
#
# Every prompt is asked under each of SYSTEM_CONDITIONS: no system message (the chat template's own default
# then applies: SmolLM2's injects "You are a helpful AI assistant named SmolLM...") and a user's own system
# prompt that training never shows. Metrics (greedy answers from both models to the same prompts):
# - identity_accuracy: share of held-out identity paraphrases answered correctly: the answer states the name
#   and the real base model (IdentitySpec.model_id), is in the question's language, has no U+FFFD, looping
#   text or sentence said twice, and ends with the stop token (identity_verdict says why an answer fails).
# - leakage_rate: share of everyday prompts (families no training data comes from) whose answer drags in the
#   identity (the parrot effect): the name or a long piece of it, the model/organisation the identity answers
#   cite, or a fragment of the tutorial's identity sentences (leak_markers).
# - general_agreement: mean similarity of the model's everyday answers to the base's (difflib ratio on
#   whitespace-normalised text, 1.0 = identical); general_exact_match: share answered identically.
# - facts_kept: of the fact questions the base answers correctly (it gives an accepted answer as a person
#   would read it, see fact_correct), the share the model still answers correctly.
# Each comes overall, per language (…_zh, …_en) and per system condition; leakage also per everyday family
# (leakage_by_family: where the identity leaks).
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import time
from pathlib import Path

from infer_engine.markdown import markdown_text
from infer_engine.model_source import validate_model_dir
from training.answer_cache import DEFAULT_ANSWER_CACHE, add_cache_args, cache_dir_from, cached, model_key
from training.atomic_io import write_json_atomic, write_text_atomic
from training.general_chat import everyday_prompts, fact_questions
from training.identity import IdentitySpec, mentions
from training.make_identity_data import (
    CJK,
    IDENTITY_FRAGMENTS,
    DataError,
    heldout_prompts,
)

DEFAULT_MAX_NEW_TOKENS = 128
# Identity answers must end on their own: they get room to (the templates are ~40 zh characters, ~60 tokens).
IDENTITY_MAX_NEW_TOKENS = 96
# None: no system message at all; a dict: a user's own system prompt per language (not in the training data).
SYSTEM_CONDITIONS: dict[str, dict[str, str] | None] = {
    "none": None,
    "user": {"zh": "你是一位友好的助手，回答要简短。",
             "en": "You are a friendly assistant. Keep your answers short."},
}
LANGS = ("zh", "en")
REPLACEMENT_CHAR = "\ufffd"
# A chunk of 2-30 characters repeated 3+ times in a row: the loops small models fall into.
LOOP = re.compile(r"(.{2,30}?)\1{2,}", re.S)
# Where an answer splits into the pieces `repeats_itself` compares (sentences, lines, "label:" heads).
PIECE_END = re.compile(r"[\n.!?。！？:：]+")
MIN_PIECE_CHARS = 4  # shorter pieces ("1", "Yes") recur in good answers
WORST_SHOWN = 8


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"{path} is missing; build the data dir with python -m training.make_identity_data")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid UTF-8 JSON: {err}") from None


def _prompt_list(path: Path) -> list[dict]:
    rows = _read_json(path)
    if not isinstance(rows, list) or not rows:
        raise DataError(f'{path} must hold a non-empty JSON list of {{"prompt": ...}} objects')
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(
                f'{path}: entry {i} must be an object with a non-empty "prompt" string, got {row!r}'
            )
    return rows


def load_eval_set(data_dir: Path | None, name: str | None) -> tuple[IdentitySpec, list[dict], list[dict]]:
    """The identity, held-out identity prompts ([{"prompt", "lang"}]) and general prompts ([{"prompt", "lang",
    "family", "answers"?}]: everyday prompts, and fact questions with their accepted answers) to evaluate on.

    Args:
        data_dir: a make_identity_data output dir, or None to regenerate the prompts from the code.
        name: the identity name; required without data_dir, and must match meta.json when both are given.
    """
    if data_dir is None:
        if name is None:
            raise DataError("give --data DATA_DIR or --name NAME: the evaluation needs to know the identity")
        return IdentitySpec(name), heldout_prompts(), [*everyday_prompts(), *fact_questions()]
    meta = _read_json(data_dir / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise DataError(f'{data_dir / "meta.json"} has no "name"; rebuild the data dir')
    spec = IdentitySpec(
        meta["name"],
        meta.get("model_desc", IdentitySpec.model_desc),
        meta.get("organisation", IdentitySpec.organisation),
    )
    if name is not None and IdentitySpec(name).name != spec.name:
        raise DataError(f"--name {name!r} differs from the data dir's name {spec.name!r}")
    heldout = _prompt_list(data_dir / "heldout_identity.json")
    general = _prompt_list(data_dir / "general_eval.json")
    for path, rows in (("heldout_identity.json", heldout), ("general_eval.json", general)):
        bad = [r["prompt"] for r in rows if r.get("lang") not in LANGS]
        if bad:
            raise DataError(f'{data_dir / path}: entries need "lang" "zh" or "en": {bad[:3]}; '
                            "rebuild the data dir")
    return spec, heldout, general


def names_identity(answer: str, spec: IdentitySpec) -> bool:
    """Whether an answer names the new identity (case-insensitive, as a word of its own: ``mentions``).

    Args:
        answer: the model's answer.
        spec: the identity.
    """
    return mentions(answer, spec.name)


def _squashed(text: str) -> str:
    return "".join(text.split()).casefold()


def states_model(answer: str, spec: IdentitySpec) -> bool:
    """Whether an answer states the real base model (IdentitySpec.model_id, ignoring case and spaces).

    Args:
        answer: the model's answer.
        spec: the identity.
    """
    return _squashed(spec.model_id) in _squashed(answer)


def garbled(answer: str) -> str | None:
    """Why an answer is garbled (U+FFFD from broken decoding, or a loop), or None.

    Args:
        answer: the model's answer.
    """
    if REPLACEMENT_CHAR in answer:
        return "contains U+FFFD"
    loop = LOOP.search(answer)
    return f"loops on {loop.group(1)!r}" if loop else None


def repeats_itself(answer: str) -> str | None:
    """The first sentence or line an answer says twice (compared without case and punctuation), or None.

    Catches the loops LOOP misses because the copies differ a little or the last one is cut short.

    Args:
        answer: the model's answer.
    """
    seen: set[str] = set()
    for piece in PIECE_END.split(answer):
        key = re.sub(r"[\W_]+", "", piece.lower())
        if len(key) < MIN_PIECE_CHARS:
            continue
        if key in seen:
            return piece.strip()
        seen.add(key)
    return None


def identity_verdict(answer: str, finished: bool, lang: str, spec: IdentitySpec) -> str | None:
    """Why an answer to an identity question is not acceptable, or None when it is.

    Args:
        answer: the model's answer.
        finished: whether it ended with the stop token.
        lang: the question's language ("zh" or "en").
        spec: the identity.
    """
    if not names_identity(answer, spec):
        return "no name"
    if not states_model(answer, spec):
        return f"does not say it is {spec.model_id}"
    reason = garbled(answer)
    if reason:
        return reason
    repeated = repeats_itself(answer)
    if repeated:
        return f"repeats {repeated[:30]!r}"
    rest = answer
    for cited in spec.fields(lang).values():  # a Chinese name or model name in English text is no mistake
        rest = rest.replace(cited, "")
    if lang == "zh" and not CJK.search(rest):
        return "not in Chinese"
    if lang == "en" and CJK.search(rest):
        return "not in English"
    return None if finished else "no stop token"


def leak_markers(spec: IdentitySpec) -> list[str]:
    """Strings whose presence in an answer to a general prompt counts as identity leakage: the name; each
    piece of it at least 2/3 as long and 4+ characters (small models garble names: "Zorblax" -> "blaxorblax");
    the model and organisation the identity answers cite; the name-free fragments of the tutorial's sentences.

    Args:
        spec: the identity the fine-tune was given.
    """
    name = spec.name
    size = max(4, math.ceil(2 * len(name) / 3))
    pieces = [name[i : i + size] for i in range(len(name) - size + 1)] if len(name) > size else []
    cited = [
        IdentitySpec.localised(text, lang)
        for text in (spec.model_desc, spec.organisation)
        for lang in LANGS
    ]
    return list(dict.fromkeys([name, *pieces, *cited, *IDENTITY_FRAGMENTS]))


def leaks_identity(answer: str, spec: IdentitySpec) -> bool:
    """Whether an answer to a general prompt drags in the identity (name or identity-sentence fragment).

    Args:
        answer: the model's answer.
        spec: the identity.
    """
    # The whole name as a word ("Ed" is no leak in "bed"); its pieces, the cited model and the fragments
    # anywhere (a garbled name sits inside other letters: "blaxorblax").
    low = answer.casefold()
    others = [marker for marker in leak_markers(spec) if marker != spec.name]
    return mentions(answer, spec.name) or any(marker.casefold() in low for marker in others)


# Numerals that make a longer number next to an accepted one: "二" inside "十二" (12) is not 2.
ZH_NUMERALS = "零〇一二两三四五六七八九十百千万"
# A number as written: "18.0" and "1,000" are one number each, so "0" is not in "-18.0°C".
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _stated_pattern(accepted: str) -> re.Pattern[str]:
    """How an accepted answer must appear (casefolded): a number as a whole number, a Chinese numeral not
    inside a longer one, a Latin-script word as a whole word (plural allowed: "lion" is not in "million")."""
    text = re.escape(accepted)
    if accepted.isdigit():
        return re.compile(rf"(?<!\d)(?<!\d[.,]){text}(?!\d)(?![.,]\d)")
    if all(c in ZH_NUMERALS for c in accepted):
        return re.compile(rf"(?<![{ZH_NUMERALS}]){text}(?![{ZH_NUMERALS}])")
    if accepted[0].isascii() and accepted[0].isalpha():
        return re.compile(rf"(?<![a-z]){text}(?:e?s)?(?![a-z])")
    return re.compile(text)


def _echoes(answer: str, question: str, accepted: str) -> list[tuple[int, int]]:
    """Spans of a casefolded answer that repeat the question's own words around an accepted answer it contains
    ("三角形" for "三"): the question echoed back, not an answer."""
    spans = []
    for found in re.finditer(re.escape(accepted), question):
        start, end = found.span()
        for word in (question[max(start - 1, 0):end], question[start:end + 1]):
            if word != accepted:
                spans += [m.span() for m in re.finditer(re.escape(word), answer)]
    return spans


def _states(answer: str, question: str, accepted: str) -> bool:
    """Whether a casefolded answer states a casefolded accepted answer outside any echo of the question."""
    echoes = _echoes(answer, question, accepted)
    return any(not any(s <= m.start() and m.end() <= e for s, e in echoes)
               for m in _stated_pattern(accepted).finditer(answer))


def fact_correct(answer: str, accepted: list[str], question: str) -> bool:
    """Whether an answer to a fact question gives one of its accepted answers, as a person would read it: as
    a whole number or word (see _stated_pattern), not only inside the question's words echoed back
    ("你可以在三角形中" does not say a triangle has 三 sides), and a number only as the first number the
    answer adds to the question's ("A: 1 A: 2 … A: 8" counts up to 6 without answering 6). Case-insensitive.

    Args:
        answer: the model's answer.
        accepted: the accepted answers.
        question: the question asked.
    """
    low, asked = answer.casefold(), question.casefold()
    asked_numbers = set(NUMBER.findall(asked))
    new_numbers = [n for n in NUMBER.findall(low) if n not in asked_numbers]
    return any(_states(low, asked, a.casefold()) and (not a.isdigit() or new_numbers[:1] == [a])
               for a in accepted)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """Similarity of two answers in [0, 1]: difflib ratio on whitespace-normalised text (two empties: 1.0).

    Args:
        a: one answer.
        b: the other.
    """
    return difflib.SequenceMatcher(None, _normalise(a), _normalise(b), autojunk=False).ratio()


# Shares are stored to 6 places so that a report printing them to 0.1 % rounds once: at 4 places 25/31 became
# 0.8065 and printed as 80.7 %, not 80.6 %.
SHARE_DIGITS = 6


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), SHARE_DIGITS) if flags else 0.0


def judge(
    spec: IdentitySpec, heldout: list[dict], general: list[dict], model: dict, base: dict
) -> list[dict]:
    """One row per (system condition, prompt) with both answers and the verdicts the metrics count.

    Args:
        spec: the identity.
        heldout: held-out identity prompts [{"prompt", "lang"}].
        general: general prompts [{"prompt", "lang", "family", "answers"?}].
        model: the evaluated model's answers: condition -> {"identity"|"general": [{"text", "finished"}]}.
        base: the base model's answers, shaped the same way.
    """
    rows = []
    for cond in SYSTEM_CONDITIONS:
        for i, q in enumerate(heldout):
            m, b = model[cond]["identity"][i], base[cond]["identity"][i]
            rows.append({"kind": "identity", "system": cond, "prompt": q["prompt"], "lang": q["lang"],
                         "base": b["text"], "model": m["text"], "finished": m["finished"],
                         "verdict": identity_verdict(m["text"], m["finished"], q["lang"], spec),
                         "base_verdict": identity_verdict(b["text"], b["finished"], q["lang"], spec)})
        for i, q in enumerate(general):
            m, b = model[cond]["general"][i]["text"], base[cond]["general"][i]["text"]
            row = {"kind": "fact" if "answers" in q else "everyday", "system": cond, "prompt": q["prompt"],
                   "lang": q["lang"], "family": q.get("family"), "base": b, "model": m,
                   "leaks": leaks_identity(m, spec), "base_leaks": leaks_identity(b, spec),
                   "similarity": round(similarity(m, b), SHARE_DIGITS)}
            if "answers" in q:
                row.update(base_correct=fact_correct(b, q["answers"], q["prompt"]),
                           correct=fact_correct(m, q["answers"], q["prompt"]))
            rows.append(row)
    return rows


def _metrics(rows: list[dict]) -> dict[str, float | None]:
    identity = [r for r in rows if r["kind"] == "identity"]
    everyday = [r for r in rows if r["kind"] == "everyday"]
    known = [r for r in rows if r["kind"] == "fact" and r["base_correct"]]
    return {
        "identity_accuracy": _share([r["verdict"] is None for r in identity]),
        "base_identity_accuracy": _share([r["base_verdict"] is None for r in identity]),
        "leakage_rate": _share([r["leaks"] for r in everyday]),
        "base_leakage_rate": _share([r["base_leaks"] for r in everyday]),
        "general_agreement": round(sum(r["similarity"] for r in everyday) / max(len(everyday), 1),
                                   SHARE_DIGITS),
        "general_exact_match": _share([_normalise(r["model"]) == _normalise(r["base"]) for r in everyday]),
        "facts_kept": _share([r["correct"] for r in known]) if known else None,
        "base_facts_correct": len(known),
    }


def leakage_by_family(rows: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Where the identity leaks: {family: {lang: {"leaks", "answers"}}} over the everyday rows, families in
    the order they were asked (answers of every system condition together).

    Args:
        rows: from judge().
    """
    table: dict[str, dict[str, dict[str, int]]] = {}
    for r in rows:
        if r["kind"] == "everyday":
            family = r["family"] or "other"
            if family not in table:
                table[family] = {lang: {"leaks": 0, "answers": 0} for lang in LANGS}
            cell = table[family]
            cell[r["lang"]]["answers"] += 1
            cell[r["lang"]]["leaks"] += bool(r["leaks"])
    return table


def score(rows: list[dict]) -> dict:
    """The metrics over all rows, then per language (keys suffixed _zh/_en), per system condition
    ("by_system"), per both ("by_system_lang") and leakage per everyday family ("leakage_by_family");
    identity_accuracy_by_lang is kept for older readers.

    Args:
        rows: from judge().
    """
    result: dict = dict(_metrics(rows))
    for lang in LANGS:
        result.update({f"{k}_{lang}": v for k, v in _metrics([r for r in rows if r["lang"] == lang]).items()})
    result["identity_accuracy_by_lang"] = {lang: result[f"identity_accuracy_{lang}"] for lang in LANGS}
    result["base_identity_accuracy_by_lang"] = {
        lang: result[f"base_identity_accuracy_{lang}"] for lang in LANGS}
    result["by_system"] = {c: _metrics([r for r in rows if r["system"] == c]) for c in SYSTEM_CONDITIONS}
    result["by_system_lang"] = {
        f"{c}/{lang}": _metrics([r for r in rows if r["system"] == c and r["lang"] == lang])
        for c in SYSTEM_CONDITIONS for lang in LANGS}
    result["leakage_by_family"] = leakage_by_family(rows)
    return result


def answer_all(
    model_dir: Path, heldout: list[dict], general: list[dict], max_new_tokens: int, batch_size: int,
    cache_dir: Path | None = None,
) -> tuple[dict, dict[str, float]]:
    """The model's greedy answers to every prompt under every system condition, and how long they took.

    Args:
        model_dir: the model to ask.
        heldout: held-out identity prompts.
        general: general prompts.
        max_new_tokens: most tokens per general answer (identity answers get IDENTITY_MAX_NEW_TOKENS).
        batch_size: prompts decoded together.
        cache_dir: where answers are kept per model files and settings (None: always generate); a base model
            evaluated against several fine-tunes is asked only once.
    """
    import transformers

    from training.generate import generate, load_chat_model  # torch loads only once the inputs are valid
    from training.progress import log_counts

    def compute() -> dict:
        start = time.perf_counter()
        chat = load_chat_model(model_dir)
        loaded = time.perf_counter()
        answers: dict = {}
        tokens = 0
        report = log_counts(f"answers from {model_dir.name}", "prompts")  # the pipeline's progress line
        total, done_before = len(SYSTEM_CONDITIONS) * (len(heldout) + len(general)), 0
        for cond, systems in SYSTEM_CONDITIONS.items():
            answers[cond] = {}
            for kind, prompts, limit in (("identity", heldout, max(IDENTITY_MAX_NEW_TOKENS, max_new_tokens)),
                                         ("general", general, max_new_tokens)):
                out: list[dict | None] = [None] * len(prompts)
                for lang in LANGS:
                    idx = [i for i, q in enumerate(prompts) if q["lang"] == lang]
                    gens = generate(chat, [prompts[i]["prompt"] for i in idx], limit,
                                    systems[lang] if systems else None, batch_size,
                                    on_batch=lambda done, _, before=done_before: report(before + done, total))
                    done_before += len(idx)
                    for i, g in zip(idx, gens, strict=True):
                        out[i] = {"text": g.text, "finished": g.finished}
                        tokens += g.new_tokens
                answers[cond][kind] = out
        done = time.perf_counter()
        return {"answers": answers, "timing": {"load_s": round(loaded - start, 2),
                                               "generate_s": round(done - loaded, 2), "new_tokens": tokens,
                                               "tokens_per_s": round(tokens / max(done - loaded, 1e-9), 1)}}

    if cache_dir is None:
        result = compute()
    else:
        key = [model_key(model_dir), heldout, general, SYSTEM_CONDITIONS, IDENTITY_MAX_NEW_TOKENS,
               max_new_tokens, transformers.__version__]
        result = cached(lambda h: cache_dir / f"{h}.json", key, compute)
    return result["answers"], result["timing"]


def evaluate(
    model_dir: Path,
    base_dir: Path,
    data_dir: Path | None = None,
    name: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    cache_dir: Path | None = DEFAULT_ANSWER_CACHE,
    cache_model: bool = True,
) -> tuple[dict, list[dict]]:
    """Answer the eval prompts with the model and the base, and score them.

    Args:
        model_dir: the model to evaluate (e.g. the merged fine-tune).
        base_dir: the model it was fine-tuned from.
        data_dir: make_identity_data output dir (None: regenerate prompts, needs name).
        name: the identity name (optional with data_dir).
        max_new_tokens: most tokens per general answer.
        batch_size: prompts decoded together.
        cache_dir: answer cache (see answer_all); None: no cache.
        cache_model: whether the model's answers go into the cache too (False: a throwaway model dir, whose
            entry no later run could find).
    Returns:
        the metrics dict and one row per prompt and system condition with both answers (both go into
        eval.json).
    """
    for value, label in ((max_new_tokens, "max_new_tokens"), (batch_size, "batch_size")):
        if value < 1:  # checked before anything is answered, or read back from the answer cache
            raise ValueError(f"{label} must be at least 1, got {value}")
    spec, heldout, general = load_eval_set(data_dir, name)
    for path in (model_dir, base_dir):  # a dir without weights: one line, not transformers' traceback
        validate_model_dir(path)
    start = time.perf_counter()
    model_answers, model_timing = answer_all(model_dir, heldout, general, max_new_tokens, batch_size,
                                             cache_dir if cache_model else None)
    base_answers, base_timing = answer_all(base_dir, heldout, general, max_new_tokens, batch_size,
                                           cache_dir)
    rows = judge(spec, heldout, general, model_answers, base_answers)
    everyday = sum(1 for g in general if "answers" not in g)
    metrics = {
        "name": spec.name,
        "model_id": spec.model_id,
        "model": str(model_dir),
        "base": str(base_dir),
        "data": str(data_dir) if data_dir else None,
        **score(rows),
        "counts": {"heldout_identity": len(heldout), "everyday": everyday, "facts": len(general) - everyday,
                   "system_conditions": list(SYSTEM_CONDITIONS)},
        "system_prompts": SYSTEM_CONDITIONS,
        "max_new_tokens": {"identity": max(IDENTITY_MAX_NEW_TOKENS, max_new_tokens),
                           "general": max_new_tokens},
        "timing": {"model": model_timing, "base": base_timing,
                   "total_s": round(time.perf_counter() - start, 2)},
        "definitions": {
            "identity_accuracy": f"share of held-out identity paraphrases whose answer states the name and "
            f"{spec.model_id!r}, in the question's language, without U+FFFD, loops or a sentence said twice, "
            "ending with the stop token",
            "leakage_rate": "share of everyday prompts whose answer contains any of "
            f"{leak_markers(spec)} (case-insensitive: the name, long pieces of it, the cited model and "
            "organisation, fragments of the tutorial's identity sentences)",
            "general_agreement": "mean difflib.SequenceMatcher ratio between the model's and the base's "
            "whitespace-normalised answers to the everyday prompts",
            "general_exact_match": "share of everyday prompts answered identically to the base",
            "facts_kept": "of the fact questions the base answers correctly (gives an accepted answer as a "
                          "whole word or number, not only in the question echoed back, a number as the first "
                          "new one), "
            "the share the model answers correctly too",
        },
    }
    return metrics, rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _cell(text: str, limit: int = 90) -> str:
    text = _normalise(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _metric_lines(label: str, m: dict) -> list[str]:
    return [
        f"| {label} | {_pct(m['base_identity_accuracy'])} → **{_pct(m['identity_accuracy'])}** | "
        f"{_pct(m['base_leakage_rate'])} → **{_pct(m['leakage_rate'])}** | {m['general_agreement']:.3f} | "
        f"{_pct(m['facts_kept'])} of {m['base_facts_correct']} |"
    ]


def render_markdown(metrics: dict, rows: list[dict]) -> str:
    """eval.md: the before/after table per language and system condition, the definitions and the worst cases.

    Args:
        metrics: the dict returned by evaluate().
        rows: the per-prompt rows returned by evaluate().
    """
    c = metrics["counts"]
    lines = [
        f"# Evaluation: identity '{markdown_text(metrics['name'])}' (base model {metrics['model_id']})",
        "",
        f"Model `{metrics['model']}` against its base `{metrics['base']}`; greedy decoding, at most "
        f"{metrics['max_new_tokens']['identity']} new tokens for identity answers and "
        f"{metrics['max_new_tokens']['general']} for the others. {c['heldout_identity']} held-out identity "
        f"paraphrases, {c['everyday']} everyday prompts and {c['facts']} fact questions, each asked with no "
        f"system message (`none`: the chat template's default applies) and with a user's own (`user`: "
        f"{metrics['system_prompts']['user']['en']!r} / {metrics['system_prompts']['user']['zh']!r}).",
        "",
        "| subset | identity accuracy (base → tuned) | leakage (base → tuned) | agreement with base "
        "| base-correct facts kept |",
        "|---|---|---|---|---|",
        *_metric_lines("all", metrics),
        *[line for lang in LANGS for line in _metric_lines(
            lang, {k.removesuffix(f"_{lang}"): v for k, v in metrics.items() if k.endswith(f"_{lang}")})],
        *[line for key, m in metrics["by_system_lang"].items() for line in _metric_lines(f"system {key}", m)],
        "",
        "Leakage per everyday family (leaking answers of all answers, every system condition together):",
        "",
        "| family | zh | en |",
        "|---|---|---|",
        *[f"| {family} | " + " | ".join(f"{c[lang]['leaks']} of {c[lang]['answers']}" for lang in LANGS)
          + " |" for family, c in metrics["leakage_by_family"].items()],
        "",
        "Definitions:",
        "",
        *[f"- **{key}**: {text}." for key, text in metrics["definitions"].items()],
        "",
    ]
    failed = [r for r in rows if r["kind"] == "identity" and r["verdict"]]
    leaks = [r for r in rows if r["kind"] == "everyday" and r["leaks"]]
    lost = [r for r in rows if r["kind"] == "fact" and r["base_correct"] and not r["correct"]]
    unlike = sorted((r for r in rows if r["kind"] == "everyday"), key=lambda r: r["similarity"])
    sections = (
        (f"Identity answers that fail ({len(failed)})", failed, "why", lambda r: r["verdict"]),
        (f"Everyday answers that leak the identity ({len(leaks)})", leaks, "similarity",
         lambda r: f"{r['similarity']:.2f}"),
        (f"Facts the base got right and the fine-tune lost ({len(lost)})", lost, "similarity",
         lambda r: f"{r['similarity']:.2f}"),
        ("Everyday answers least like the base's", unlike, "similarity", lambda r: f"{r['similarity']:.2f}"),
        ("Identity answers (first ones, for a look)", [r for r in rows if r["kind"] == "identity"], "why",
         lambda r: r["verdict"] or "ok"),
    )
    for title, picked, extra, value in sections:
        lines += [f"## {title}", "", f"| system | prompt | base | fine-tuned | {extra} |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {_cell(r['prompt'], 40)} | {_cell(r['base'])} | {_cell(r['model'])} | "
                  f"{_cell(str(value(r)), 40)} |" for r in picked[:WORST_SHOWN]]
        lines.append("")
    return "\n".join(lines)


def write_report(metrics: dict, rows: list[dict], out_dir: Path) -> None:
    """Write eval.md, then eval.json (metrics + "answers": rows; last, as it marks completion) into out_dir.

    Args:
        metrics: the dict returned by evaluate().
        rows: the per-prompt rows returned by evaluate().
        out_dir: output directory (created).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "eval.md", render_markdown(metrics, rows))
    write_json_atomic(out_dir / "eval.json", {**metrics, "answers": rows})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate an identity fine-tune against its base model.")
    parser.add_argument("--model", required=True, type=Path, help="model dir to evaluate")
    parser.add_argument("--base", required=True, type=Path, help="base model dir it was fine-tuned from")
    parser.add_argument("--data", type=Path, default=None, help="make_identity_data output dir")
    parser.add_argument("--name", default=None, help="identity name (needed without --data)")
    parser.add_argument("--out-dir", required=True, type=Path, help="where eval.json / eval.md go")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="most tokens per everyday/fact answer")
    parser.add_argument("--batch-size", type=int, default=16)
    add_cache_args(parser)
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():  # found out now, not after the evaluation
        parser.error(f"--out-dir {args.out_dir} is a file: give a directory")
    try:
        metrics, rows = evaluate(
            args.model, args.base, args.data, args.name, args.max_new_tokens, args.batch_size,
            cache_dir_from(args),
        )
        write_report(metrics, rows, args.out_dir)
    except (ValueError, OSError) as err:  # OSError: a model transformers cannot load, --out-dir a file
        print(f"evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{metrics['name']}: identity {_pct(metrics['base_identity_accuracy'])} -> "
        f"{_pct(metrics['identity_accuracy'])} (zh {_pct(metrics['identity_accuracy_zh'])}, en "
        f"{_pct(metrics['identity_accuracy_en'])}), leakage {_pct(metrics['base_leakage_rate'])} -> "
        f"{_pct(metrics['leakage_rate'])}, general agreement {metrics['general_agreement']:.3f}, facts kept "
        f"{_pct(metrics['facts_kept'])} of {metrics['base_facts_correct']}; {metrics['timing']['total_s']} s "
        f"-> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
