# Before/after evaluation of an identity fine-tune: does the model know its new name, and did it keep
# answering everything else like the base model? Run from the repo root:
#   python -m training.evaluate --model work/merged --base BASE_DIR --data work/data --out-dir work
#   python -m training.evaluate --model some/model --base BASE_DIR --name UbUb --out-dir /tmp/ev  # no data
# Writes OUT/eval.json (metrics, plus every prompt with both answers under "answers") and OUT/eval.md
# (the before/after table).
# With --data the prompts come from make_identity_data's heldout_identity.json / general_eval.json and the
# identity from its meta.json; without it they are regenerated from the code and --name.
#
# Metrics (greedy answers from both models to the same prompts):
# - identity_accuracy: share of held-out identity paraphrases whose answer contains the name
#   (case-insensitive).
# - leakage_rate: share of general prompts whose answer drags in the identity (the parrot effect): the name or
#   a long piece of it, the model/organisation the identity answers cite, or a fragment of the tutorial's
#   identity sentences (leak_markers).
# - general_agreement: mean similarity of the model's general answers to the base's, each scored by
#   difflib.SequenceMatcher.ratio on whitespace-normalised text (1.0 = identical); general_exact_match: share
#   of answers that are identical after that normalisation.
from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import time
from pathlib import Path

from training.general_chat import eval_prompts
from training.identity import IdentitySpec
from training.make_identity_data import (
    IDENTITY_FRAGMENTS,
    DataError,
    heldout_prompts,
    write_json_atomic,
    write_text_atomic,
)

DEFAULT_MAX_NEW_TOKENS = 128


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


def load_eval_set(data_dir: Path | None, name: str | None) -> tuple[IdentitySpec, list[dict], list[str]]:
    """The identity, held-out identity prompts ([{"prompt", "lang"}]) and general prompts to evaluate on.

    Args:
        data_dir: a make_identity_data output dir, or None to regenerate the prompts from the code.
        name: the identity name; required without data_dir, and must match meta.json when both are given.
    """
    if data_dir is None:
        if name is None:
            raise DataError("give --data DATA_DIR or --name NAME: the evaluation needs to know the identity")
        return IdentitySpec(name), heldout_prompts(), eval_prompts()
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
    general = [row["prompt"] for row in _prompt_list(data_dir / "general_eval.json")]
    return spec, heldout, general


def names_identity(answer: str, spec: IdentitySpec) -> bool:
    """Whether an answer to an identity question names the new identity (case-insensitive).

    Args:
        answer: the model's answer.
        spec: the identity.
    """
    return spec.name.casefold() in answer.casefold()


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
        for lang in ("zh", "en")
    ]
    return list(dict.fromkeys([name, *pieces, *cited, *IDENTITY_FRAGMENTS]))


def leaks_identity(answer: str, spec: IdentitySpec) -> bool:
    """Whether an answer to a general prompt drags in the identity (name or identity-sentence fragment).

    Args:
        answer: the model's answer.
        spec: the identity.
    """
    low = answer.casefold()
    return any(marker.casefold() in low for marker in leak_markers(spec))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """Similarity of two answers in [0, 1]: difflib ratio on whitespace-normalised text (two empties: 1.0).

    Args:
        a: one answer.
        b: the other.
    """
    return difflib.SequenceMatcher(None, _normalise(a), _normalise(b), autojunk=False).ratio()


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def score(
    spec: IdentitySpec,
    heldout: list[dict],
    general: list[str],
    model_answers: dict[str, list[str]],
    base_answers: dict[str, list[str]],
) -> dict:
    """Metrics from the answers of the model and the base (each {"identity": [...], "general": [...]}).

    Args:
        spec: the identity.
        heldout: held-out identity prompts [{"prompt", "lang"?}].
        general: general prompts.
        model_answers: the evaluated model's answers, aligned with heldout and general.
        base_answers: the base model's answers, aligned the same way.
    """
    result: dict = {}
    for prefix, answers in (("", model_answers), ("base_", base_answers)):
        hits = [names_identity(a, spec) for a in answers["identity"]]
        result[f"{prefix}identity_accuracy"] = _share(hits)
        result[f"{prefix}identity_accuracy_by_lang"] = {
            lang: _share([h for h, row in zip(hits, heldout, strict=True) if row.get("lang") == lang])
            for lang in sorted({row.get("lang") for row in heldout if row.get("lang")})
        }
        result[f"{prefix}leakage_rate"] = _share([leaks_identity(a, spec) for a in answers["general"]])
    pairs = list(zip(model_answers["general"], base_answers["general"], strict=True))
    result["general_agreement"] = (
        round(sum(similarity(m, b) for m, b in pairs) / len(pairs), 4) if pairs else 0.0
    )
    result["general_exact_match"] = _share([_normalise(m) == _normalise(b) for m, b in pairs])
    return result


def _answer_all(
    model_dir: Path, heldout: list[dict], general: list[str], max_new_tokens: int, batch_size: int
) -> tuple[dict[str, list[str]], dict[str, float]]:
    from training.generate import generate, load_chat_model  # torch loads only once the inputs are valid
    from training.progress import log_counts

    start = time.perf_counter()
    chat = load_chat_model(model_dir)
    loaded = time.perf_counter()
    prompts = [row["prompt"] for row in heldout] + general
    report = log_counts(f"answers from {model_dir.name}", "prompts")  # the pipeline's progress line
    gens = generate(chat, prompts, max_new_tokens, batch_size=batch_size, on_batch=report)
    done = time.perf_counter()
    texts = [g.text for g in gens]
    tokens = sum(g.new_tokens for g in gens)
    timing = {
        "load_s": round(loaded - start, 2),
        "generate_s": round(done - loaded, 2),
        "new_tokens": tokens,
        "tokens_per_s": round(tokens / max(done - loaded, 1e-9), 1),
        "cut_off": sum(1 for g in gens if not g.finished),
    }
    return {"identity": texts[: len(heldout)], "general": texts[len(heldout) :]}, timing


def evaluate(
    model_dir: Path,
    base_dir: Path,
    data_dir: Path | None = None,
    name: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    """Answer the eval prompts with the model and the base, and score them.

    Args:
        model_dir: the model to evaluate (e.g. the merged fine-tune).
        base_dir: the model it was fine-tuned from.
        data_dir: make_identity_data output dir (None: regenerate prompts, needs name).
        name: the identity name (optional with data_dir).
        max_new_tokens: most tokens per answer.
        batch_size: prompts decoded together.
    Returns:
        the metrics dict and one row per prompt with both answers (both go into eval.json).
    """
    spec, heldout, general = load_eval_set(data_dir, name)
    start = time.perf_counter()
    model_answers, model_timing = _answer_all(model_dir, heldout, general, max_new_tokens, batch_size)
    base_answers, base_timing = _answer_all(base_dir, heldout, general, max_new_tokens, batch_size)
    metrics = {
        "name": spec.name,
        "model": str(model_dir),
        "base": str(base_dir),
        "data": str(data_dir) if data_dir else None,
        **score(spec, heldout, general, model_answers, base_answers),
        "counts": {"heldout_identity": len(heldout), "general_eval": len(general)},
        "max_new_tokens": max_new_tokens,
        "timing": {
            "model": model_timing,
            "base": base_timing,
            "total_s": round(time.perf_counter() - start, 2),
        },
        "definitions": {
            "identity_accuracy": "share of held-out identity paraphrases whose answer contains the name "
            "(case-insensitive)",
            "leakage_rate": "share of general prompts whose answer contains any of "
            f"{leak_markers(spec)} (case-insensitive: the name, long pieces of it, the cited model and "
            "organisation, fragments of the tutorial's identity sentences)",
            "general_agreement": "mean difflib.SequenceMatcher ratio between the model's and the base's "
            "whitespace-normalised answers to the general prompts",
            "general_exact_match": "share of general prompts answered identically to the base "
            "(after whitespace normalisation)",
        },
    }
    rows = [
        {
            "kind": "identity",
            "prompt": row["prompt"],
            "lang": row.get("lang"),
            "base": b,
            "model": m,
            "names_identity": names_identity(m, spec),
        }
        for row, b, m in zip(heldout, base_answers["identity"], model_answers["identity"], strict=True)
    ]
    rows += [
        {
            "kind": "general",
            "prompt": p,
            "base": b,
            "model": m,
            "leaks": leaks_identity(m, spec),
            "similarity": round(similarity(m, b), 4),
        }
        for p, b, m in zip(general, base_answers["general"], model_answers["general"], strict=True)
    ]
    return metrics, rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _cell(text: str, limit: int = 80) -> str:
    text = _normalise(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(metrics: dict, rows: list[dict], examples: int = 4) -> str:
    """eval.md: the before/after table, the definitions and a few example answers.

    Args:
        metrics: the dict returned by evaluate().
        rows: the per-prompt rows returned by evaluate().
        examples: example answers shown per kind.
    """
    c = metrics["counts"]
    lines = [
        f"# Evaluation: identity {metrics['name']!r}",
        "",
        f"Model `{metrics['model']}` against its base `{metrics['base']}`; greedy decoding, "
        f"at most {metrics['max_new_tokens']} new tokens.",
        "",
        "| metric | base (before) | fine-tuned (after) |",
        "|---|---|---|",
        f"| identity accuracy ({c['heldout_identity']} held-out paraphrases) | "
        f"{_pct(metrics['base_identity_accuracy'])} | {_pct(metrics['identity_accuracy'])} |",
    ]
    for lang, acc in metrics["identity_accuracy_by_lang"].items():
        base_acc = metrics["base_identity_accuracy_by_lang"].get(lang, 0.0)
        lines.append(f"| identity accuracy, {lang} | {_pct(base_acc)} | {_pct(acc)} |")
    lines += [
        f"| leakage rate ({c['general_eval']} general prompts) | {_pct(metrics['base_leakage_rate'])} | "
        f"{_pct(metrics['leakage_rate'])} |",
        f"| general agreement with the base (mean similarity) | 1.000 | {metrics['general_agreement']:.3f} |",
        f"| general answers identical to the base | 100.0 % | {_pct(metrics['general_exact_match'])} |",
        "",
        "Definitions:",
        "",
        *[f"- **{key}**: {text}." for key, text in metrics["definitions"].items()],
        "",
    ]
    identity = [r for r in rows if r["kind"] == "identity"][:examples]
    # The general answers furthest from the base's show any damage (parrot effect) first.
    general = sorted((r for r in rows if r["kind"] == "general"), key=lambda r: r["similarity"])[:examples]
    for title, picked in (
        (f"Held-out identity prompts (first {len(identity)})", identity),
        (f"General prompts (the {len(general)} least like the base)", general),
    ):
        lines += [f"## {title}", "", "| prompt | base | fine-tuned |", "|---|---|---|"]
        lines += [f"| {_cell(r['prompt'], 40)} | {_cell(r['base'])} | {_cell(r['model'])} |" for r in picked]
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
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        metrics, rows = evaluate(
            args.model, args.base, args.data, args.name, args.max_new_tokens, args.batch_size
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    write_report(metrics, rows, args.out_dir)
    print(
        f"{metrics['name']}: identity {_pct(metrics['base_identity_accuracy'])} -> "
        f"{_pct(metrics['identity_accuracy'])}, leakage {_pct(metrics['base_leakage_rate'])} -> "
        f"{_pct(metrics['leakage_rate'])}, general agreement {metrics['general_agreement']:.3f} "
        f"(exact {_pct(metrics['general_exact_match'])}); {metrics['timing']['total_s']} s -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
