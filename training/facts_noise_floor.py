# What "facts kept" reads for a change that teaches nothing: the base with random Gaussian noise on the weight
# matrices of its layers, at a few sizes, evaluated against the unchanged base exactly as a fine-tune is
# (training.evaluate). Set a fine-tune's facts kept beside the noise's at the same agreement with the base:
# a small model's greedy answers are often near-ties, and any change flips some of them (README, "Where the
# facts go"). Run from the repo root, in the training env:
#   .venv-train/bin/python -m training.facts_noise_floor --base BASE_DIR --name UbUb --out-dir /tmp/floor \
#       --scales 0.005 0.01 0.02 --seeds 1 2
# Writes OUT/floor.json (one row per size and seed) and each evaluation's eval.json / eval.md under OUT/.
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

from training.answer_cache import add_cache_args, cache_dir_from
from training.atomic_io import write_json_atomic
from training.evaluate import DEFAULT_MAX_NEW_TOKENS, evaluate, write_report

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth")


def perturbed_copy(base_dir: Path, out_dir: Path, scale: float, seed: int) -> int:
    """Save the base with N(0, (scale * std of the matrix)^2) noise added to every weight matrix inside its
    decoder layers (not the embeddings or the output head) into out_dir; returns how many matrices changed.

    Args:
        base_dir: a HF model dir (weights, config, tokenizer files).
        out_dir: where the copy goes (created; its other files are copied from base_dir as they are).
        scale: noise size relative to each matrix's own standard deviation (0: an exact copy).
        seed: seed of the noise.
    """
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be 0 or more, got {scale}")
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"{base_dir} is not a model dir: it has no config.json")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.add_(torch.randn(weight.shape, generator=generator) * scale * weight.std())
                changed += 1
    if not changed:
        raise ValueError(f"{base_dir}: no weight matrices under '.layers.' to perturb")
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns(*WEIGHT_FILES), dirs_exist_ok=True)
    model.save_pretrained(out_dir)
    return changed


def noise_floor(base_dir: Path, name: str, scales: list[float], seeds: list[int], out_dir: Path,
                max_new_tokens: int, batch_size: int, cache_dir: Path | None) -> list[dict]:
    """Evaluate a perturbed copy of the base per (scale, seed) against the base; one summary row each.

    Args:
        base_dir: the base model dir.
        name: the identity name the evaluation's leakage markers use (any: noise teaches none).
        scales: noise sizes (see perturbed_copy).
        seeds: noise seeds; every scale is run with each.
        out_dir: each evaluation's report goes to OUT/scale-SCALE-seed-SEED/.
        max_new_tokens: most tokens per everyday or fact answer (as the preset's evaluation).
        batch_size: prompts decoded together.
        cache_dir: answer cache for the base's answers (None: none).
    """
    rows = []
    for scale in scales:
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="noisy-base-") as tmp:
                changed = perturbed_copy(base_dir, Path(tmp), scale, seed)
                metrics, answers = evaluate(Path(tmp), base_dir, None, name, max_new_tokens, batch_size,
                                            cache_dir, cache_model=False)
            write_report(metrics, answers, out_dir / f"scale-{scale:g}-seed-{seed}")
            rows.append({"scale": scale, "seed": seed, "matrices": changed,
                         **{k: metrics[k] for k in ("general_agreement", "facts_kept", "base_facts_correct",
                                                    "leakage_rate", "identity_accuracy")}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Facts kept and agreement of the base with random noise.")
    parser.add_argument("--base", required=True, type=Path, help="base model dir")
    parser.add_argument("--name", default="UbUb", help="identity name for the evaluation's markers")
    parser.add_argument("--out-dir", required=True, type=Path, help="where floor.json and the reports go")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="most tokens per everyday/fact answer (40 for the smol preset's evaluation)")
    parser.add_argument("--batch-size", type=int, default=16)
    add_cache_args(parser)
    args = parser.parse_args(argv)
    try:
        rows = noise_floor(args.base, args.name, args.scales, args.seeds, args.out_dir, args.max_new_tokens,
                           args.batch_size, cache_dir_from(args))
    except (ValueError, OSError) as err:
        print(f"facts_noise_floor: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json_atomic(args.out_dir / "floor.json", rows)
    print("| noise | seed | agreement with base | facts kept |")
    print("|---|---|---|---|")
    for r in rows:
        kept = "—" if r["facts_kept"] is None else f"{100 * r['facts_kept']:.1f} %"
        print(f"| {r['scale']:g} | {r['seed']} | {r['general_agreement']:.3f} | {kept} of "
              f"{r['base_facts_correct']} |")


if __name__ == "__main__":
    main()
