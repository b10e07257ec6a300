# Every shipped XTuner config loads with mmengine and has the settings it promises; the pipeline's renderer
# changes them only where it should. Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_configs.py
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "training" / "configs"

# Building a config's XTuner objects imports xtuner.dataset, which imports torchvision at module load: use the
# same import-only stub that training/run.sh puts on PYTHONPATH when CPU torch has no torchvision.
if importlib.util.find_spec("torchvision") is None:
    sys.path.insert(0, str(REPO_ROOT / "training" / "cpu_shims"))

pytest.importorskip("xtuner", reason="needs the training env (.venv-train)")

from mmengine.config import Config  # noqa: E402
from mmengine.dataset import DefaultSampler, InfiniteSampler  # noqa: E402
from mmengine.hooks import CheckpointHook  # noqa: E402
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR, OptimWrapper  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402
from xtuner.dataset.map_fns import pretrain_map_fn  # noqa: E402
from xtuner.engine.hooks import EvaluateChatHook  # noqa: E402
from xtuner.engine.runner import TrainLoop  # noqa: E402
from xtuner.utils import PROMPT_TEMPLATE  # noqa: E402

from training.config_render import render_config  # noqa: E402
from training.presets import PRESETS  # noqa: E402

INTERNLM_MODULES = ["wqkv", "wo", "w1", "w2", "w3"]
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# What each shipped config must say (torchtune's test_configs style): one row per file.
# `epochs`: the user-facing length of configs trained by epochs (the pipeline renders max_iters from it);
# `pack`: the real SFT trains one row per sample, so its step count follows the data size.
EXPECTED = {
    "internlm2_5_1_8b_qlora_sft.py": dict(
        kind="sft", gpu=True, lr=2e-4, epochs=3, max_iters=300, max_length=2048, accumulate=4, pack=False,
        targets=None, dtype="float16"),
    "internlm2_5_1_8b_qlora_pretrain.py": dict(
        kind="pretrain", gpu=True, lr=2e-5, epochs=1, max_iters=100, max_length=2048, accumulate=16,
        pack=True, targets=INTERNLM_MODULES, dtype="bfloat16"),
    "tiny_lora_sft_cpu.py": dict(
        kind="sft", gpu=False, lr=2e-3, epochs=None, max_iters=300, max_length=256, accumulate=1, pack=True,
        targets=LLAMA_MODULES, dtype="torch.float32", modules_to_save=["lm_head"]),
    "tiny_lora_pretrain_cpu.py": dict(
        kind="pretrain", gpu=False, lr=2e-4, epochs=None, max_iters=60, max_length=256, accumulate=1,
        pack=True, targets=LLAMA_MODULES, dtype="torch.float32"),
    # A real pretrained model: plain LoRA, no trained output head, a moderate step (no parrot effect).
    "smol_lora_sft_cpu.py": dict(
        kind="sft", gpu=False, lr=1e-3, epochs=None, max_iters=150, max_length=256, accumulate=1, pack=True,
        targets=LLAMA_MODULES, dtype="torch.float32", lora=(16, 32, 0.05)),
    "smol_lora_pretrain_cpu.py": dict(
        kind="pretrain", gpu=False, lr=2e-4, epochs=None, max_iters=60, max_length=256, accumulate=1,
        pack=True, targets=LLAMA_MODULES, dtype="torch.float32", lora=(16, 32, 0.1)),
}


def load(name: str) -> Config:
    return Config.fromfile(str(CONFIG_DIR / name))


def hook(cfg: Config, hook_type: type) -> dict:
    (found,) = [h for h in cfg.custom_hooks if h["type"] is hook_type]
    return found


def test_every_shipped_config_is_checked_and_used_by_a_preset():
    shipped = {p.name for p in CONFIG_DIR.glob("*.py")}
    assert shipped == set(EXPECTED)
    used = {name for preset in PRESETS.values() for name in (preset.sft_config, preset.pretrain_config)}
    assert used == shipped


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_says_how_to_run(name):
    head = (CONFIG_DIR / name).read_text(encoding="utf-8").splitlines()[:8]
    assert all(line.startswith("#") for line in head[:3])
    assert any("bash training/run.sh" in line for line in head)
    assert any(f"xtuner.tools.train training/configs/{name}" in line or f"training/configs/{name} --work-dir"
               in line for line in head)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lora_optimizer_and_schedule(name):
    want, cfg = EXPECTED[name], load(name)
    lora = cfg.model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == want.get("lora", (64, 16, 0.1))
    assert lora.task_type == "CAUSAL_LM"
    assert lora.get("target_modules") == want["targets"]
    assert lora.get("modules_to_save") == want.get("modules_to_save")
    # Only the official InternLM2.5 base's own code may run by default; the pipeline sets it per run.
    assert cfg.model.llm.trust_remote_code is cfg.tokenizer.trust_remote_code is name.startswith("internlm")
    assert str(cfg.model.llm.torch_dtype) == want["dtype"]
    assert cfg.optim_wrapper.optimizer.lr == want["lr"]
    assert cfg.optim_wrapper.optimizer.type.__name__ == "AdamW"
    assert cfg.optim_wrapper.accumulative_counts == want["accumulate"]
    assert cfg.train_dataloader.batch_size == 1
    assert cfg.get("max_epochs") == want["epochs"]
    # Every config trains by iterations (the pipeline derives them from epochs and the data), with an
    # iteration warm-up: an epoch-based 3 % of a small epoch rounds to zero and LinearLR refuses begin == end.
    assert cfg.train_cfg == {"type": TrainLoop, "max_iters": want["max_iters"]}
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, cosine.type) == (LinearLR, CosineAnnealingLR)
    assert not warmup.by_epoch and not cosine.by_epoch
    assert warmup.begin == 0 and warmup.end == cosine.begin == cfg.warmup_iters
    assert cosine.end == cfg.max_iters
    assert 0 < cfg.warmup_iters < cfg.max_iters and 0 < cfg.warmup_ratio < 0.05
    assert cfg.default_hooks.checkpoint.type is CheckpointHook
    assert cfg.randomness.seed == cfg.seed == 42


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quantisation_and_precision_match_the_device(name):
    want, cfg = EXPECTED[name], load(name)
    quant = cfg.model.llm.get("quantization_config")
    if want["gpu"]:
        assert quant.type is BitsAndBytesConfig
        assert quant.load_in_4bit and not quant.load_in_8bit
        assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("nf4", True)
        # One rendered setting, so that the pipeline picks bf16 or fp16 for the GPU in all three places.
        assert quant.bnb_4bit_compute_dtype == cfg.dtype == want["dtype"]
        assert cfg.optim_wrapper.type is AmpOptimWrapper and cfg.optim_wrapper.dtype == want["dtype"]
        assert cfg.train_dataloader.sampler.type is DefaultSampler
        assert cfg.train_dataloader.dataset.map_num_proc == 1  # XTuner's 32 packs 32 shards each on its own
        assert cfg.pretrained_model_name_or_path == "internlm/internlm2_5-1_8b-chat"
    else:
        # CPU: no bitsandbytes, no AMP (it asserts a GPU), one map process, no 2 s sleep per epoch restart.
        assert quant is None
        assert cfg.optim_wrapper.type is OptimWrapper
        assert cfg.train_dataloader.dataset.map_num_proc == 1
        assert cfg.train_dataloader.sampler.type is InfiniteSampler
        patch = 'if not hasattr(__import__("torch").cpu, "is_bf16_supported"):'
        assert patch in (CONFIG_DIR / name).read_text()
        import torch

        assert torch.cpu.is_bf16_supported() is False  # the patch ran while the config loaded


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_and_chat_format(name):
    want, cfg = EXPECTED[name], load(name)
    dataset = cfg.train_dataloader.dataset
    assert dataset.max_length == cfg.max_length == want["max_length"]
    assert dataset.pack_to_max_length is cfg.pack_to_max_length is want["pack"]
    assert dataset.dataset.path == "json"
    assert dataset.dataset.data_files == {"train": cfg.data_path}
    chat = hook(cfg, EvaluateChatHook)
    assert chat.evaluation_inputs == cfg.evaluation_inputs and chat.every_n_iters == cfg.evaluation_freq
    if want["kind"] == "sft":
        # The model's own InternLM2 chat format, never XTuner's `default` template.
        assert cfg.prompt_template == PROMPT_TEMPLATE.internlm2_chat
        assert dataset.template_map_fn.template == PROMPT_TEMPLATE.internlm2_chat
        assert chat.prompt_template == PROMPT_TEMPLATE.internlm2_chat
        assert dataset.dataset_map_fn is None  # data is already XTuner conversation json
        assert "Who are you?" in cfg.evaluation_inputs
    else:
        assert dataset.dataset_map_fn is pretrain_map_fn and dataset.template_map_fn is None
        assert "prompt_template" not in chat


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rendered_settings_reach_the_built_objects(preset, tmp_path):
    spec = PRESETS[preset]
    overrides = {
        "pretrained_model_name_or_path": "/models/base",
        "data_path": "/work/data/train.json",
        "evaluation_inputs": ["你是谁？", "Who made you?"],
        "seed": 7,
        "lr": 1e-3,
        "save_steps": 5,
        "max_iters": 7,
        "warmup_iters": 2,
    }
    rendered = tmp_path / "rendered.py"
    rendered.write_text(render_config((CONFIG_DIR / spec.sft_config).read_text(encoding="utf-8"), overrides,
                                      "# rendered for a test\n"), encoding="utf-8")
    cfg = Config.fromfile(str(rendered))
    assert cfg.model.llm.pretrained_model_name_or_path == "/models/base"
    assert cfg.tokenizer.pretrained_model_name_or_path == "/models/base"
    assert cfg.train_dataloader.dataset.dataset.data_files == {"train": "/work/data/train.json"}
    assert hook(cfg, EvaluateChatHook).evaluation_inputs == ["你是谁？", "Who made you?"]
    assert cfg.randomness.seed == 7 and cfg.optim_wrapper.optimizer.lr == 1e-3
    assert cfg.default_hooks.checkpoint.interval == 5
    assert cfg.train_cfg.max_iters == 7 and cfg.param_scheduler[1].end == 7
    assert cfg.param_scheduler[0].end == cfg.param_scheduler[1].begin == 2


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rendered_pretrain_settings_reach_the_built_objects(preset, tmp_path):
    overrides = {"pretrained_model_name_or_path": "/models/base", "data_path": "/work/pretrain/corpus.json"}
    rendered = tmp_path / "rendered.py"
    source = (CONFIG_DIR / PRESETS[preset].pretrain_config).read_text(encoding="utf-8")
    rendered.write_text(render_config(source, overrides), encoding="utf-8")
    cfg = Config.fromfile(str(rendered))
    assert cfg.model.llm.pretrained_model_name_or_path == cfg.tokenizer.pretrained_model_name_or_path
    assert cfg.model.llm.pretrained_model_name_or_path == "/models/base"
    assert cfg.train_dataloader.dataset.dataset.data_files == {"train": "/work/pretrain/corpus.json"}
