# Tests for training/facts_noise_floor.py on the tiny chat base: which weights the noise touches, and the
# evaluation of a noisy copy against the base through the CLI.
# Run: .venv-train/bin/python -m pytest tests/training/test_facts_noise_floor.py -q
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.facts_noise_floor import main, perturbed_copy


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_noise_touches_only_the_layers_matrices_and_follows_its_seed(tiny_base_dir: Path, tmp_path: Path):
    base = weights(tiny_base_dir)
    changed = perturbed_copy(tiny_base_dir, tmp_path / "a", 0.05, seed=1)
    a = weights(tmp_path / "a")
    moved = {k for k in base if not torch.equal(base[k].float(), a[k].float())}
    assert moved and len(moved) == changed
    assert all(".layers." in k and base[k].dim() == 2 for k in moved)
    assert not any("embed" in k or "norm" in k for k in moved)
    # Its size follows the scale: about 5 % of each matrix's spread.
    k = sorted(moved)[0]
    ratio = (a[k].float() - base[k].float()).std() / base[k].float().std()
    assert 0.03 < ratio.item() < 0.07
    perturbed_copy(tiny_base_dir, tmp_path / "b", 0.05, seed=1)
    perturbed_copy(tiny_base_dir, tmp_path / "c", 0.05, seed=2)
    assert torch.equal(weights(tmp_path / "b")[k], a[k]) and not torch.equal(weights(tmp_path / "c")[k], a[k])
    # Everything but the weights is the base's own (tokenizer, chat template).
    assert (tmp_path / "a" / "tokenizer_config.json").read_bytes() == (
        tiny_base_dir / "tokenizer_config.json").read_bytes()


def test_a_bad_scale_or_base_dir_is_refused(tiny_base_dir: Path, tmp_path: Path):
    for scale in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="scale must be 0 or more"):
            perturbed_copy(tiny_base_dir, tmp_path / "x", scale, seed=1)
    with pytest.raises(ValueError, match="no config.json"):
        perturbed_copy(tmp_path, tmp_path / "x", 0.1, seed=1)
    assert not (tmp_path / "x").exists()


def test_an_exact_copy_agrees_with_the_base_and_noise_does_not(tiny_base_dir: Path, tmp_path: Path, capsys):
    main(["--base", str(tiny_base_dir), "--name", "Zx", "--out-dir", str(tmp_path), "--scales", "0", "0.5",
          "--seeds", "3", "--max-new-tokens", "8", "--batch-size", "64", "--no-answer-cache"])
    rows = json.loads((tmp_path / "floor.json").read_text())
    assert [(r["scale"], r["seed"]) for r in rows] == [(0.0, 3), (0.5, 3)]
    exact, noisy = rows
    assert exact["general_agreement"] == 1.0 and exact["leakage_rate"] == 0.0
    assert exact["facts_kept"] in (None, 1.0)
    assert noisy["general_agreement"] < 0.9
    assert (tmp_path / "scale-0.5-seed-3" / "eval.md").is_file()
    assert "| 0.5 | 3 |" in capsys.readouterr().out
