# Copy a finished smol run's LoRA adapter into the repo as the demo adapter (`make demo-adapter` runs it after
# `bash training/run.sh --preset smol --name UbUb ...`). From the repo root:
#   python -m training.export_demo_adapter WORK_DIR [--out infer_engine/demo_adapter] [--meta PATH]
# Copies adapter_config.json + adapter_model.safetensors (≤ 10 MB) and writes demo_meta.json: the name, base,
# recipe, LoRA settings and the run's evaluation summary. The app merges it into the base at first start
# (infer_engine/smol_demo.py).
"""Export a smol run's adapter and its facts as the committed demo adapter."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from infer_engine.smol_demo import ADAPTER_FILES, BASE_NAME, META_FILE
from training.convert_merge import META_FILE as TRAINING_META
from training.presets import PRESETS, reproduce_command
from training.smol_base import PACKAGE, PACKAGE_VERSION, find_gguf, provenance
from training.stages import public_base

MAX_FILE_BYTES = 10_000_000  # the repo's limit for one file (tests/test_repo_size.py)
EVAL_KEYS = ("identity_accuracy", "identity_accuracy_zh", "identity_accuracy_en", "base_identity_accuracy",
             "leakage_rate", "base_leakage_rate", "general_agreement", "facts_kept", "base_facts_correct")


class ExportError(ValueError):
    """The run dir lacks what the demo adapter needs (the message names it)."""


def demo_meta(training_meta: dict, data_settings: dict, base_source: dict,
              eval_json: dict | None) -> dict[str, object]:
    """The committed metadata of the demo adapter.

    Args:
        training_meta: the run's merged/training_meta.json (name, preset, recipe, lora, settings, created).
        data_settings: the "settings" of the run's data/meta.json (identity_repeat or seed_repeat).
        base_source: where the base weights come from (training.smol_base.provenance of the GGUF file).
        eval_json: the run's eval.json, if it was evaluated.
    """
    settings = training_meta.get("settings") or {}
    scale = training_meta.get("adapter_scale", 1.0)
    return {
        "name": training_meta["name"],
        "base": {"name": BASE_NAME, "package": f"{PACKAGE}=={PACKAGE_VERSION}",
                 "source": base_source},
        "preset": training_meta.get("preset"),
        "recipe": training_meta.get("recipe"),
        "lora": training_meta.get("lora"),
        "adapter_scale": scale,
        "settings": {k: settings.get(k) for k in ("max_iters", "lr", "batch_size", "pack_to_max_length",
                                                  "max_length", "seed", "contrast_weight", "base_kl_weight")
                     if k in settings},
        "created": training_meta.get("created"),
        "eval": {k: eval_json.get(k) for k in EVAL_KEYS if k in eval_json} if eval_json else None,
        "made_with": reproduce_command(training_meta["name"], training_meta["preset"],
                                       training_meta["recipe"], settings, data_settings, adapter_scale=scale),
    }


def export_adapter(work: Path, out: Path, training_meta: Path | None = None) -> Path:
    """Copy WORK/hf_adapter's files and write demo_meta.json into ``out`` (replaced atomically).

    Args:
        work: the run's work dir (hf_adapter/, merged/training_meta.json, data/meta.json, eval.json).
        out: the demo adapter dir to write.
        training_meta: the run's training_meta.json (default: WORK/merged/training_meta.json).
    """
    adapter, meta_path = work / "hf_adapter", training_meta or work / "merged" / TRAINING_META
    data_meta = work / "data" / "meta.json"
    for path in [adapter / name for name in ADAPTER_FILES] + [meta_path, data_meta]:
        if not path.is_file():
            raise ExportError(f"{path} not found: run bash training/run.sh --preset smol first")
    too_big = [name for name in ADAPTER_FILES if (adapter / name).stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise ExportError(f"{', '.join(too_big)} is over {MAX_FILE_BYTES} bytes: lower the LoRA rank")
    meta = _read_object(meta_path)
    if meta.get("preset") != "smol":
        raise ExportError(f"{meta_path}: preset {meta.get('preset')!r}; the demo adapter is for smol's base")
    base = (meta.get("base") or {}).get("source")
    if base != public_base(PRESETS["smol"].default_base):  # the app merges the adapter into that base
        raise ExportError(f"{meta_path}: trained on {base!r}; the demo adapter is for smol's own base")
    if meta.get("corpus"):
        raise ExportError(f"{meta_path}: trained after pre-training on {meta['corpus']!r}; the demo adapter "
                          "is merged into smol's own base as it is")
    eval_path = work / "eval.json"
    data_settings = _read_object(data_meta).get("settings") or {}
    eval_json = _read_object(eval_path) if eval_path.is_file() else None
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(out, partial) if out.is_dir() else partial.mkdir(parents=True)  # keeps README.md
    for name in ADAPTER_FILES:
        shutil.copyfile(adapter / name, partial / name)
    # The training machine's path of the base says nothing to others: keep its dir name only.
    config = json.loads((partial / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = Path(str(config.get("base_model_name_or_path") or BASE_NAME)).name
    # peft writes target_modules from a set, in an order that changes from run to run; sorted, a retrained
    # identical adapter gives identical files, and the app's cache key (their hashes) does not change.
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    (partial / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    record = demo_meta(meta, data_settings, provenance(find_gguf()), eval_json)
    (partial / META_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                                     encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def _read_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_demo_adapter", description=__doc__)
    parser.add_argument("work", type=Path, help="the smol run's work dir")
    parser.add_argument("--out", type=Path, default=Path("infer_engine/demo_adapter"),
                        help="demo adapter dir (default: infer_engine/demo_adapter)")
    parser.add_argument("--meta", type=Path,
                        help="the run's training_meta.json (default: WORK/merged/training_meta.json)")
    args = parser.parse_args(argv)
    try:
        print(export_adapter(args.work, args.out, args.meta))
    except ExportError as err:
        print(f"export_demo_adapter: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
