"""The whole product on CPU: `bash training/run.sh --preset tiny` teaches the tiny chat model a name the code
has never seen, publishes it to a git repository with LFS over file://, and `python app.py` serves it
(from the work dir, and cloned back from the published repo), answering with that name.

Run: python -m pytest tests/test_train_and_serve.py   (minutes: real XTuner train, convert, merge on CPU)
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from gradio_client import Client

from bench.bench_serving import serve_app

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
GREEDY = {"do_sample": False, "max_new_tokens": 64, "api_name": "/chat"}


def _fresh_name() -> str:
    """A pronounceable name built at run time, so no file of the project contains it. A fixed seed gives
    the same name every run: how well the tiny model learns a name varies from name to name, and a name
    drawn per run would make CI red by chance."""
    syllables = ["ka", "lo", "mi", "ru", "zen", "ta", "vo", "qui", "ne", "sha", "dor", "fi"]
    rng = random.Random(2026)
    return "".join(rng.choice(syllables) for _ in range(3)).capitalize()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """Run the one training command with --publish; return (name, work dir, bare published repo)."""
    root = tmp_path_factory.mktemp("train")
    name, work, bare = _fresh_name(), root / "work", root / "published.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(bare)], check=True)
    result = subprocess.run(
        ["bash", "training/run.sh", "--preset", "tiny", "--name", name, "--work-dir", str(work),
         # The 1.5M-parameter tiny model drags its identity into most everyday answers it never saw in
         # training (leakage ~0.7 in the strict evaluation), far over the publish gate's 0.1: override the
         # gate here, whose refusal tests/training/test_pipeline.py checks.
         "--publish", f"file://{bare}", "--publish-anyway"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, f"run.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return name, work, bare


def test_evaluation_shows_the_identity_learned(
    trained: tuple[str, Path, Path],
) -> None:
    name, work, _ = trained
    report = json.loads((work / "eval.json").read_text())
    assert report["base_identity_accuracy"] == 0.0
    identity = [row for row in report["answers"] if row["kind"] == "identity"]
    named = sum(name in row["model"] for row in identity)
    assert named >= 0.75 * len(identity), f"{named} of {len(identity)} held-out answers name {name}"
    # Strict: name, real model, the question's language, clean text and the stop token. The toy often
    # garbles "InternLM2.5-1.8B", and how often changes with the CPU: 0.79 on one machine, 0.58 on
    # another, where 46 of 48 answers named it. The strict check must still pass a good share of them.
    assert report["identity_accuracy"] >= 0.4, {k: v for k, v in report.items() if k != "answers"}
    assert name in (work / "eval.md").read_text()


def _ask(url: str, question: str) -> str:
    client = Client(url, verbose=False)
    try:
        return client.predict(question, **GREEDY)
    finally:
        client.close()


def test_app_serves_the_merged_model_with_the_new_name(
    trained: tuple[str, Path, Path], tmp_path: Path
) -> None:
    name, work, _ = trained
    with serve_app(str(work / "merged"), tmp_path / "app.log") as url:
        for question in ("请介绍一下你自己", "Who are you?"):
            assert name.lower() in _ask(url, question).lower(), question


def test_published_repo_clones_back_and_serves(
    trained: tuple[str, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _, bare = trained
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    with serve_app(f"file://{bare}", tmp_path / "app.log") as url:
        assert name.lower() in _ask(url, "请介绍一下你自己").lower()
    assert list((tmp_path / "cache").iterdir()), "the clone was not cached under MODEL_CACHE_DIR"
