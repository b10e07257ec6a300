# Side-by-side results of finished runs as one Markdown table (the README's smol results come from it):
#   python -m training.results_table "default recipe=.work/a" "--recipe seed=.work/b"
# Each argument is LABEL=WORK_DIR of a run whose evaluate stage is done (it reads WORK_DIR/eval.json).
"""One Markdown table of several runs' evaluation numbers, per language and system-prompt condition."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (row label, where its metrics are in eval.json: None = the top level, else (section, key))
SUBSETS: tuple[tuple[str, tuple[str, str] | None], ...] = (
    ("all", None),
    ("zh", ("lang", "zh")),
    ("en", ("lang", "en")),
    ("zh, no system prompt", ("by_system_lang", "none/zh")),
    ("en, no system prompt", ("by_system_lang", "none/en")),
    ("zh, user's system prompt", ("by_system_lang", "user/zh")),
    ("en, user's system prompt", ("by_system_lang", "user/en")),
)
COLUMNS = ("identity accuracy (base → runs)", "leakage (base → runs)", "agreement with base",
           "base-correct facts kept")


class ResultsError(ValueError):
    """An argument is not LABEL=DIR, or the dir has no readable eval.json."""


def subset_metrics(scores: dict, where: tuple[str, str] | None) -> dict:
    """One subset's metrics (identity_accuracy, leakage_rate, general_agreement, facts_kept, ...).

    Args:
        scores: a run's eval.json.
        where: None for all answers, ("lang", "zh"|"en") or ("by_system_lang", "none/zh" ...).
    """
    if where is None:
        return scores
    section, key = where
    if section == "lang":
        suffix = f"_{key}"
        return {k[: -len(suffix)]: v for k, v in scores.items() if k.endswith(suffix)}
    return scores[section][key]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def cells(runs: list[dict]) -> list[str]:
    """One subset's table cells in COLUMNS order: each metric of every run, base first where it has one.

    Args:
        runs: every run's metrics of this subset (from subset_metrics()), in the order to show them.
    """
    def facts(m: dict) -> str:
        return "–" if m.get("facts_kept") is None else f"{_pct(m['facts_kept'])} of {m['base_facts_correct']}"

    return [f"{_pct(runs[0]['base_identity_accuracy'])} → "
            + " · ".join(f"**{_pct(m['identity_accuracy'])}**" for m in runs),
            f"{_pct(runs[0]['base_leakage_rate'])} → "
            + " · ".join(f"**{_pct(m['leakage_rate'])}**" for m in runs),
            " · ".join(f"{m['general_agreement']:.3f}" for m in runs),
            " · ".join(facts(m) for m in runs)]


def render(runs: list[tuple[str, dict]]) -> str:
    """The Markdown table: one row per subset; in each cell the runs' numbers in order (base → run · run).

    Args:
        runs: (label, eval.json contents) per run, in the order to show them; the base is the first run's.
    """
    labels = " · ".join(label for label, _ in runs)
    lines = [f"| subset ({labels}) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for subset, where in SUBSETS:
        lines.append(f"| {subset} | " + " | ".join(cells([subset_metrics(s, where) for _, s in runs])) + " |")
    return "\n".join(lines) + "\n"


def load_run(arg: str) -> tuple[str, dict]:
    """(label, eval.json) from a LABEL=WORK_DIR argument.

    Args:
        arg: LABEL=WORK_DIR.
    """
    label, sep, work = arg.partition("=")
    if not sep or not label.strip() or not work.strip():
        raise ResultsError(f"expected LABEL=WORK_DIR, got {arg!r}")
    path = Path(work) / "eval.json"
    try:
        return label.strip(), json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: {err} (has the run's evaluate stage finished?)") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Several runs' evaluation numbers as one Markdown table.")
    parser.add_argument("runs", nargs="+", metavar="LABEL=WORK_DIR",
                        help="finished runs; the base's numbers are the first run's")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(arg) for arg in args.runs]
        print(render(runs), end="")
    except (ResultsError, KeyError) as err:
        print(f"results_table: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
