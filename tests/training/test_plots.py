# training/plots.py: loss.png and the before/after chart drawn from real records, shown in eval.md and
# published with the model card; and a real tiny run (`bash training/run.sh --preset tiny --corpus ...`) that
# must leave metrics.jsonl, loss.png and a card that shows it. Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_plots.py -q     # -m "not slow" skips the run
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
from lfs_repo import git, make_bare_repo

from training import publish
from training.plots import (
    EVAL_PNG,
    LOSS_PNG,
    add_figures,
    draw_training_curves,
    eval_bars,
    insert_after_first_table,
    linked_figures,
)
from training.presets import REPO_ROOT
from training.progress import training_records

DATA = Path(__file__).parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"identity_accuracy": 0.9583, "base_identity_accuracy": 0.0, "leakage_rate": 0.0556,
           "base_leakage_rate": 0.0, "general_agreement": 0.6886, "general_exact_match": 0.25}
EVAL_MD = """# Evaluation: identity 'Zed'

| metric | base (before) | fine-tuned (after) |
|---|---|---|
| identity accuracy | 0.0 % | 95.8 % |

Definitions:

- **identity_accuracy**: share of held-out identity paraphrases whose answer contains the name.
"""


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_training_curves_have_a_column_per_training(tmp_path):
    sft = training_records(DATA / "sft_resumed_train")
    one = draw_training_curves({"SFT": sft}, tmp_path / "one.png")
    two = draw_training_curves({"pre-training": sft[:4], "SFT": sft, "empty": []}, tmp_path / "two.png")
    (w1, h1), (w2, h2) = png_size(one), png_size(two)
    assert h1 == h2 and w2 > 1.8 * w1  # the empty training draws no column
    with pytest.raises(ValueError, match="no training records"):
        draw_training_curves({"SFT": []}, tmp_path / "none.png")


def test_eval_bars_take_the_shares_eval_json_has():
    assert eval_bars(METRICS) == [("identity accuracy", 0.0, 0.9583), ("leakage rate", 0.0, 0.0556),
                                  ("agreement with base", 1.0, 0.6886), ("identical to base", 1.0, 0.25)]
    assert eval_bars({"identity_accuracy": 0.5, "base_identity_accuracy": None}) == []


def test_figures_go_right_after_the_first_table():
    snippet = "![x](loss.png)"
    text = insert_after_first_table(EVAL_MD, snippet)
    lines = text.splitlines()
    table_end = lines.index("| identity accuracy | 0.0 % | 95.8 % |")
    assert lines[table_end + 1 : table_end + 4] == ["", snippet, ""]
    assert text.replace(f"\n{snippet}\n", "") == EVAL_MD
    assert insert_after_first_table("# no table\n", snippet) == f"# no table\n\n{snippet}\n"


def report_dir(tmp_path: Path) -> Path:
    report = tmp_path / "work"
    (report / "sft").mkdir(parents=True)
    (report / "eval.json").write_text(json.dumps(METRICS))
    (report / "eval.md").write_text(EVAL_MD)
    shutil.copy(DATA / "sft_resumed_train" / "20261130_172303" / "vis_data" / "scalars.json",
                report / "sft" / "metrics.jsonl")  # the same JSON-lines records
    return report


def test_add_figures_draws_both_and_links_them_from_eval_md(tmp_path):
    report = report_dir(tmp_path)
    figures = add_figures(report, {"pre-training": report / "pretrain" / "metrics.jsonl",
                                   "SFT": report / "sft" / "metrics.jsonl"})
    assert figures == [EVAL_PNG, LOSS_PNG]
    for name in figures:
        assert png_size(report / name)[0] > 300
    assert linked_figures(report / "eval.md") == [report / EVAL_PNG, report / LOSS_PNG]
    text = (report / "eval.md").read_text()
    assert "![Evaluation before and after fine-tuning](eval.png)" in text
    assert "![Training loss and learning rate per iteration](loss.png)" in text


def test_only_pngs_beside_the_report_are_published_with_it(tmp_path):
    report = tmp_path / "eval.md"
    (tmp_path / "ok.png").write_bytes(PNG_MAGIC)
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "link.png").symlink_to(tmp_path / "eval.json")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(PNG_MAGIC)
    report.write_text("![a](ok.png) ![b](eval.json) ![c](link.png) ![d](sub/deep.png) ![e](../x.png) "
                      "![f](missing.png) [g](ok.png) ![a again](ok.png)")
    assert linked_figures(report) == [tmp_path / "ok.png"]


def test_the_card_shows_the_figures_and_a_real_push_puts_them_beside_it(tmp_path, tiny_base_dir):
    report = report_dir(tmp_path)
    add_figures(report, {"SFT": report / "sft" / "metrics.jsonl"})
    model = shutil.copytree(tiny_base_dir, report / "merged")
    card = publish.render_model_card(publish.load_card_info(model))
    assert "](loss.png)" in card and "](eval.png)" in card
    plan = publish.publish(model, "hf:someone/zed", dry_run=True)
    assert re.search(r"^  hub +\d+\.\d kB  loss\.png$", plan, re.M), plan
    bare = make_bare_repo(tmp_path / "zed.git")
    publish.publish(model, bare.as_uri())
    for name in (LOSS_PNG, EVAL_PNG):
        shown = subprocess.run(["git", "show", f"main:{name}"], cwd=bare, capture_output=True, check=True)
        assert shown.stdout == (report / name).read_bytes()
    assert git("show", "main:README.md", cwd=bare) == card


@pytest.mark.slow
def test_a_tiny_run_records_its_training_and_shows_the_curves(tiny_base_dir, tmp_path):
    work, corpus = tmp_path / "work", tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("The Bund is in Shanghai. 外滩在上海。\n" * 40)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "training" / "run.sh"), "--preset", "tiny", "--name", "Zedplot",
         "--base", str(tiny_base_dir), "--work-dir", str(work), "--corpus", str(corpus), "--max-iters", "20",
         "--publish", "hf:someone/zedplot", "--publish-dry-run", "--publish-anyway"],  # 20 iterations: gated
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # Not a terminal: plain status lines from the stages' own records, no control characters.
    assert re.search(r"^\[pipeline\] sft: iter 20/20  loss \d+\.\d{4}  lr \S+  \d+ tok/s  elapsed \S+  "
                     r"eta 0:00:00$", out, re.M), out
    assert re.search(r"^\[pipeline\] pretrain: iter \d+/\d+  loss ", out, re.M), out
    for stage, what in (("data", "replay answers from the base"), ("evaluate", "answers from merged")):
        assert re.search(rf"^\[pipeline\] {stage}: {what} (\d+)/\1 prompts  elapsed ", out, re.M), out
    assert not re.search(r"[\r\x1b]", out)

    sft = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in sft] == [10, 20]
    assert all({"loss", "lr", "grad_norm", "tokens_per_sec", "time"} <= set(r) for r in sft)
    assert (work / "pretrain" / "metrics.jsonl").read_text().strip()
    assert png_size(work / LOSS_PNG)[0] > 600  # two columns: pre-training and SFT
    assert png_size(work / EVAL_PNG)[0] > 300
    assert f"[pipeline] training curves: {work / LOSS_PNG}" in out
    assert linked_figures(work / "eval.md") == [work / EVAL_PNG, work / LOSS_PNG]
    card = publish.render_model_card(publish.load_card_info(work / "merged"))
    assert "](loss.png)" in card and "](eval.png)" in card
    published = (work / "logs" / "publish.log").read_text()
    assert re.search(r"  loss\.png$", published, re.M) and re.search(r"  eval\.png$", published, re.M)
