# convert_merge.scale_adapter: a LoRA adapter kept at a share of its trained strength, as PEFT really merges
# it (a tiny Llama built inline, a LoRA with random A and B). Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_convert_merge.py -q
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from training.convert_merge import ConvertError, scale_adapter


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama dir and a LoRA adapter dir for it whose B is not zero (so it changes the model),
    with one module at its own alpha (alpha_pattern)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        alpha_pattern={"down_proj": 2}, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _merged_delta(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What merging the adapter changes in each weight of the base, as PEFT merges it."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    return {k: v - base[k] for k, v in merged.state_dict().items()}


def test_a_scaled_adapter_merges_that_share_of_the_trained_change(lora_pair, tmp_path):
    base, adapter = lora_pair
    full = _merged_delta(base, adapter)
    changed = [k for k, d in full.items() if d.abs().max() > 0]
    # Every LoRA module moved, the ones with their own alpha too, and nothing else did.
    assert {k.split(".")[-2] for k in changed} == {"q_proj", "v_proj", "down_proj"}
    scaled = tmp_path / "scaled"
    shutil.copytree(adapter, scaled)
    scale_adapter(scaled, 0.4)
    config = json.loads((scaled / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(3.2)
    assert config["alpha_pattern"] == {"down_proj": pytest.approx(0.8)}
    part = _merged_delta(base, scaled)
    for k in full:
        torch.testing.assert_close(part[k], 0.4 * full[k], rtol=1e-4, atol=1e-6)


def test_scale_1_leaves_the_adapter_untouched(lora_pair, tmp_path):
    _, adapter = lora_pair
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    scale_adapter(copy, 1.0)
    assert (copy / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()


@pytest.mark.parametrize(
    ("edit", "scale", "message"),
    [
        ({}, 0.0, "adapter scale must be in (0, 1], got 0.0"),
        ({}, 1.5, "adapter scale must be in (0, 1], got 1.5"),
        ({"modules_to_save": ["lm_head"]}, 0.5, "also trains ['lm_head'] in full; only a plain LoRA"),
        ({"peft_type": "IA3"}, 0.5, "is not a LoRA adapter with a lora_alpha"),
    ],
)
def test_what_cannot_be_scaled_is_refused_and_left_as_it_was(lora_pair, tmp_path, edit, scale, message):
    _, adapter = lora_pair
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    before = path.read_bytes()
    with pytest.raises(ConvertError, match=re.escape(message)):
        scale_adapter(copy, scale)
    assert path.read_bytes() == before
