"""`make demo-adapter`'s last step: a smol run's adapter and facts copied into the repo as the demo adapter.
Run: .venv-train/bin/python -m pytest tests/training/test_export_demo_adapter.py -q"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from infer_engine.smol_demo import ADAPTER_FILES, DEMO_ADAPTER_DIR, META_FILE, adapter_meta
from training.config_render import template_settings
from training.export_demo_adapter import ExportError, export_adapter
from training.pipeline import parse_args
from training.presets import PRESETS
from training.smol_base import find_gguf, provenance


def _run_dir(work: Path, preset: str, **changes: object) -> Path:
    """A finished run's outputs as the pipeline leaves them (adapter files taken from the committed one)."""
    (work / "merged").mkdir(parents=True)
    shutil.copytree(DEMO_ADAPTER_DIR, work / "hf_adapter")
    meta = {"name": "Qorvia Zed", "preset": preset, "recipe": "seed", "created": "2026-11-30T19:14:28+00:00",
            "base": {"source": "built by training.smol_base.cached_smol_base"}, "corpus": None,
            "lora": {"r": 16}, "adapter_scale": 0.9, **changes,
            "settings": {"max_iters": 150, "lr": 0.001, "batch_size": 4, "contrast_weight": 1.0,
                         "base_kl_weight": 1.0, "data_path": "/home/me/data.json",
                         "identity_answers": ["I'm Qorvia Zed's assistant."]}}
    (work / "merged" / "training_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (work / "data").mkdir()
    (work / "data" / "meta.json").write_text(json.dumps({"settings": {"seed_repeat": 7}}), encoding="utf-8")
    (work / "eval.json").write_text(json.dumps({"identity_accuracy": 0.98, "leakage_rate": 0.01,
                                                "rows": [1, 2, 3]}), encoding="utf-8")
    return work


def test_export_copies_the_adapter_and_writes_its_facts(tmp_path: Path) -> None:
    work = _run_dir(tmp_path / "work", "smol")
    out = tmp_path / "demo_adapter"
    out.mkdir()
    (out / "README.md").write_text("how it was made\n", encoding="utf-8")
    assert export_adapter(work, out) == out
    for name in ADAPTER_FILES[1:]:
        assert (out / name).read_bytes() == (work / "hf_adapter" / name).read_bytes()
    assert "/" not in json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    meta = adapter_meta(out)
    assert (meta["name"], meta["recipe"]) == ("Qorvia Zed", "seed")
    # Only the settings that shape training: no paths of the trainer's, no list of identity answers.
    assert meta["settings"] == {"max_iters": 150, "lr": 0.001, "batch_size": 4, "contrast_weight": 1.0,
                                "base_kl_weight": 1.0}
    assert meta["eval"] == {"identity_accuracy": 0.98, "leakage_rate": 0.01}
    assert meta["adapter_scale"] == 0.9  # the share of the trained change the adapter's lora_alpha keeps
    assert meta["made_with"] == ("bash training/run.sh --preset smol --name 'Qorvia Zed' --recipe seed "
                                 "--max-iters 150 --lr 0.001 --seed-repeat 7 --adapter-scale 0.9")
    assert meta["base"]["source"] == provenance(find_gguf())
    assert (out / "README.md").read_text() == "how it was made\n"  # the hand-written header stays
    assert sorted(p.name for p in out.iterdir()) == sorted([*ADAPTER_FILES, META_FILE, "README.md"])


def test_export_writes_the_same_config_for_the_same_adapter(tmp_path: Path) -> None:
    # peft saves target_modules from a set: the same adapter comes out in another order run to run.
    exported = []
    for i, modules in enumerate((["o_proj", "down_proj", "q_proj"], ["q_proj", "o_proj", "down_proj"])):
        work = _run_dir(tmp_path / f"work{i}", "smol")
        config = json.loads((work / "hf_adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        (work / "hf_adapter" / "adapter_config.json").write_text(
            json.dumps({**config, "target_modules": modules}), encoding="utf-8")
        exported.append((export_adapter(work, tmp_path / f"out{i}") / "adapter_config.json").read_bytes())
    assert exported[0] == exported[1]
    assert json.loads(exported[0])["target_modules"] == ["down_proj", "o_proj", "q_proj"]


@pytest.mark.parametrize(
    ("preset", "changes", "message"),
    [("tiny", {}, "preset 'tiny'"),
     ("smol", {"base": {"source": "hf:someone/smol-finetune"}}, "trained on 'hf:someone/smol-finetune'"),
     ("smol", {"corpus": "notes"}, "trained after pre-training on 'notes'")],
)
def test_export_refuses_a_run_on_another_base(tmp_path: Path, preset: str, changes: dict,
                                              message: str) -> None:
    # The app merges the demo adapter into smol's own base, as the package ships it.
    out = tmp_path / "demo_adapter"
    with pytest.raises(ExportError, match=message):
        export_adapter(_run_dir(tmp_path / "work", preset, **changes), out)
    assert not out.exists()


@pytest.mark.parametrize(("text", "message"), [("{bad", "cannot read .*training_meta.json"),
                                               ("[1, 2]", "must hold a JSON object, got list")])
def test_a_broken_run_record_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    work = _run_dir(tmp_path / "work", "smol")
    (work / "merged" / "training_meta.json").write_text(text, encoding="utf-8")
    with pytest.raises(ExportError, match=message):
        export_adapter(work, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_committed_adapter_says_how_to_train_it_again() -> None:
    # made_with is a command a user can paste: run.sh's own parser takes it, with the recorded settings.
    meta = adapter_meta(DEMO_ADAPTER_DIR)
    command = shlex.split(meta["made_with"])
    assert command[:2] == ["bash", "training/run.sh"]
    cfg = parse_args(command[2:])
    settings = meta["settings"]
    assert (cfg.name, cfg.preset, cfg.recipe) == (meta["name"], meta["preset"], meta["recipe"])
    # A value given at today's default is that default (RunConfig keeps it as None).
    lr = template_settings(PRESETS[cfg.preset], "sft")["lr"] if cfg.lr is None else cfg.lr
    assert (cfg.max_iters, lr, cfg.seed) == (settings["max_iters"], settings["lr"], settings["seed"])
    assert cfg.adapter_scale == meta["adapter_scale"]
    assert "--identity-repeat" in command  # the data's shape, not left to a default that may change
