# Pictures of a run for eval.md and the model card: the training curves (loss.png) and the before/after
# evaluation metrics (eval.png). Not a command: the pipeline's evaluate stage calls add_figures, and
# training/publish.py publishes the figures eval.md links to (linked_figures). matplotlib comes with mmengine
# in .venv-train; it is imported only when drawing, with the Agg backend (no display needed).
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

LOSS_PNG = "loss.png"
EVAL_PNG = "eval.png"
# training/evaluate.py's eval.json: (label, before key or the base's fixed value, after key).
EVAL_BARS: tuple[tuple[str, str | float, str], ...] = (
    ("identity accuracy", "base_identity_accuracy", "identity_accuracy"),
    ("leakage rate", "base_leakage_rate", "leakage_rate"),
    ("agreement with base", 1.0, "general_agreement"),
    ("identical to base", 1.0, "general_exact_match"),
)
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _pyplot():  # matplotlib.pyplot, imported late: drawing is its only use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_training_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], out: Path) -> Path:
    """Loss (top) and learning rate (bottom) against iteration, one column per training; a dashed line marks
    where a resumed attempt's records begin.

    Args:
        runs: training name ("pre-training", "SFT") -> its metrics.jsonl records in order (empty: skipped).
        out: the PNG to write.
    """
    runs = {name: rows for name, rows in runs.items() if rows}
    if not runs:
        raise ValueError("no training records to draw")
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 4.6), squeeze=False, sharex="col")
    for col, (name, rows) in enumerate(runs.items()):
        iters = [r["iter"] for r in rows]
        loss_ax, lr_ax = axes[0][col], axes[1][col]
        loss_ax.plot(iters, [r["loss"] for r in rows], marker=".", color="tab:blue")
        loss_ax.set_title(f"{name}: {len(rows)} records, iteration {iters[-1]}", fontsize=10)
        loss_ax.set_ylabel("loss")
        lr_ax.plot(iters, [r.get("lr", float("nan")) for r in rows], color="tab:orange")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("iteration")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        for before, row in zip(rows, rows[1:], strict=False):
            if row.get("attempt") != before.get("attempt"):
                for ax in (loss_ax, lr_ax):
                    ax.axvline(row["iter"], color="grey", linestyle="--", linewidth=1)
                loss_ax.annotate("resumed", (row["iter"], 1), xycoords=("data", "axes fraction"),
                                 xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        for ax in (loss_ax, lr_ax):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def eval_bars(metrics: Mapping[str, object]) -> list[tuple[str, float, float]]:
    """The (label, before, after) pairs of training/evaluate.py's metrics that are shares in [0, 1].

    Args:
        metrics: eval.json's object.
    """
    bars = []
    for label, before, after in EVAL_BARS:
        base = metrics.get(before) if isinstance(before, str) else before
        tuned = metrics.get(after)
        if isinstance(base, int | float) and isinstance(tuned, int | float):
            bars.append((label, float(base), float(tuned)))
    return bars


def draw_eval_chart(bars: Sequence[tuple[str, float, float]], out: Path) -> Path:
    """Horizontal bars, base (before) beside fine-tuned (after), for each metric.

    Args:
        bars: from eval_bars.
        out: the PNG to write.
    """
    if not bars:
        raise ValueError("no evaluation metrics to draw")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.55 * len(bars) + 1.4))
    rows = range(len(bars))
    height = 0.38
    for offset, which, color, name in ((-height / 2, 1, "tab:gray", "base (before)"),
                                       (height / 2, 2, "tab:blue", "fine-tuned (after)")):
        values = [bar[which] for bar in bars]
        drawn = ax.barh([r + offset for r in rows], values, height=height, color=color, label=name)
        ax.bar_label(drawn, labels=[f"{100 * v:.0f} %" for v in values], padding=2, fontsize=8)
    ax.set_yticks(list(rows), [bar[0] for bar in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25 %", "50 %", "75 %", "100 %"])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict[str, float | int]]:
    """The records of a metrics.jsonl (training/progress.py's write_metrics).

    Args:
        path: the file.
    """
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def figures_markdown(figures: Sequence[str]) -> str:
    """The markdown that shows the figures (file names relative to the report).

    Args:
        figures: names among EVAL_PNG and LOSS_PNG.
    """
    alt = {EVAL_PNG: "Evaluation before and after fine-tuning",
           LOSS_PNG: "Training loss and learning rate per iteration"}
    return "\n\n".join(f"![{alt[name]}]({name})" for name in figures)


def insert_after_first_table(markdown: str, snippet: str) -> str:
    """`markdown` with `snippet` (a paragraph) right after its first table, or at the end if it has none.

    Args:
        markdown: a report.
        snippet: markdown to insert.
    """
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return markdown.rstrip("\n") + f"\n\n{snippet}\n"
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([*lines[:end], "", snippet, *lines[end:]]) + "\n"


def add_figures(report_dir: Path, trainings: Mapping[str, Path]) -> list[str]:
    """Draw eval.png (from report_dir/eval.json) and loss.png (from the metrics.jsonl files that exist) into
    report_dir and show them in its eval.md right after the first table; return the figures' file names.

    Args:
        report_dir: holds training/evaluate.py's eval.json and eval.md.
        trainings: training name ("pre-training", "SFT") -> its metrics.jsonl (missing ones are skipped).
    """
    figures = []
    bars = eval_bars(json.loads((report_dir / "eval.json").read_text(encoding="utf-8")))
    if bars:
        figures.append(draw_eval_chart(bars, report_dir / EVAL_PNG).name)
    runs = {name: read_metrics(path) for name, path in trainings.items() if path.is_file()}
    if any(runs.values()):
        figures.append(draw_training_curves(runs, report_dir / LOSS_PNG).name)
    if figures:
        report = report_dir / "eval.md"
        text = insert_after_first_table(report.read_text(encoding="utf-8"), figures_markdown(figures))
        tmp = report.with_name(f".{report.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(report)
    return figures


def linked_figures(report: Path) -> list[Path]:
    """The PNG files a markdown report shows from its own folder (`![..](name.png)`), to publish with it;
    links elsewhere, and symlinks, are left out.

    Args:
        report: a markdown file.
    """
    folder = report.parent
    names = dict.fromkeys(_IMAGE_LINK.findall(report.read_text(encoding="utf-8")))
    return [folder / name for name in names if re.fullmatch(r"[\w.-]+\.png", name) and name[0] != "."
            and (folder / name).is_file() and not (folder / name).is_symlink()]
