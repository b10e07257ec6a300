# Every shipped XTuner config, with each preset's own values applied, loads with mmengine and has the settings
# it promises; the pipeline's renderer changes them only where it should. Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_configs.py
import dataclasses
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "training" / "configs"

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

from training.config_render import (  # noqa: E402
    ConfigRenderError,
    literal_settings,
    render_config,
    template_settings,
    write_stage_config,
)
from training.identity_contrast import IdentityContrastFinetune  # noqa: E402
from training.presets import PRESETS  # noqa: E402

INTERNLM_MODULES = ["wqkv", "wo", "w1", "w2", "w3"]
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# What each preset's stage config must say (torchtune's test_configs style): one row per preset and stage,
# checked on its template with the preset's values applied (what the pipeline renders before a run's own).
# `epochs`: the user-facing length of configs trained by epochs (the pipeline renders max_iters from it);
# `pack`: the real SFT trains one row per sample, so its step count follows the data size.
EXPECTED = {
    ("internlm2_5-1_8b", "sft"): dict(
        lr=2e-4, epochs=3, max_iters=300, max_length=2048, accumulate=4, pack=False, targets=None,
        dtype="float16", save_steps=500, evaluation_freq=500),
    ("internlm2_5-1_8b", "pretrain"): dict(
        lr=2e-5, epochs=1, max_iters=100, max_length=2048, accumulate=16, pack=True, targets=INTERNLM_MODULES,
        dtype="bfloat16", save_steps=500, evaluation_freq=500),
    ("tiny", "sft"): dict(
        lr=2e-3, epochs=None, max_iters=300, max_length=256, accumulate=1, pack=True, targets=LLAMA_MODULES,
        dtype="torch.float32", modules_to_save=["lm_head"], save_steps=300, evaluation_freq=100),
    ("tiny", "pretrain"): dict(
        lr=2e-4, epochs=None, max_iters=60, max_length=256, accumulate=1, pack=True, targets=LLAMA_MODULES,
        dtype="torch.float32", save_steps=60, evaluation_freq=60),
    # A real pretrained model: plain LoRA, no trained output head (no parrot effect), one conversation per
    # sample in batches of 4.
    ("smol", "sft"): dict(
        lr=2e-3, epochs=None, max_iters=225, max_length=256, accumulate=1, pack=False, targets=LLAMA_MODULES,
        dtype="torch.float32", lora=(16, 32, 0.05), save_steps=75, evaluation_freq=225, batch=4),
    ("smol", "pretrain"): dict(
        lr=2e-4, epochs=None, max_iters=60, max_length=256, accumulate=1, pack=True, targets=LLAMA_MODULES,
        dtype="torch.float32", lora=(16, 32, 0.1), save_steps=60, evaluation_freq=60),
}
SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.py"))


def load(key: tuple[str, str]) -> Config:
    """The preset's stage config: its template with the preset's values rendered in."""
    preset, stage = key
    template, values = PRESETS[preset].stage_config(stage)
    return Config.fromstring(render_config(template.read_text(encoding="utf-8"), values), ".py")


def hook(cfg: Config, hook_type: type) -> dict:
    (found,) = [h for h in cfg.custom_hooks if h["type"] is hook_type]
    return found


def test_every_shipped_config_is_checked_and_used_by_a_preset():
    assert set(EXPECTED) == {(preset, stage) for preset in PRESETS for stage in ("sft", "pretrain")}
    used = {PRESETS[preset].stage_config(stage)[0].name for preset, stage in EXPECTED}
    assert used == set(SHIPPED)


def test_every_presets_values_are_settings_of_its_templates():
    for preset, stage in EXPECTED:
        spec = PRESETS[preset]
        values = spec.stage_config(stage)[1]
        settings = template_settings(spec, stage)  # raises ConfigRenderError on a name the template lacks
        assert {k: settings[k] for k in values} == dict(values)


def test_a_preset_value_that_names_no_setting_of_its_template_is_refused():
    typo = dataclasses.replace(PRESETS["smol"], sft_settings={**PRESETS["smol"].sft_settings, "lora_rank": 8})
    with pytest.raises(ConfigRenderError, match="override 'lora_rank' matches no top-level setting"):
        template_settings(typo, "sft")


def test_presets_sharing_a_template_set_the_same_settings():
    # Each preset sets all of a shared template's per-preset settings: none silently trains with the values
    # written in the template, which are the tiny preset's (as its header says) for a run by hand.
    by_template: dict[tuple[str, str], list] = {}
    for preset, stage in EXPECTED:
        template, values = PRESETS[preset].stage_config(stage)
        by_template.setdefault((template.name, stage), []).append(values)
    for (name, stage), all_values in by_template.items():
        if len(all_values) > 1:
            assert len({tuple(values) for values in all_values}) == 1, name
            written = literal_settings((CONFIG_DIR / name).read_text(encoding="utf-8"))
            tiny = PRESETS["tiny"].stage_config(stage)[1]
            assert {k: written[k] for k in tiny} == dict(tiny), name


def test_the_rendered_header_names_what_the_preset_and_the_run_replaced(tmp_path):
    out = write_stage_config(PRESETS["smol"], "sft", {"lr": 5e-4, "seed": 7}, tmp_path / "sft.py", "Zx")
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[:2] == [
        "# Rendered by training/pipeline.py for run 'Zx' from training/configs/lora_sft_cpu.py",
        "# with these settings replaced: by preset smol (training/presets.py): pack_to_max_length, "
        "batch_size, max_iters, lr, save_steps, evaluation_freq, lora_r, lora_alpha, lora_dropout, "
        "modules_to_save, base_kl_weight; then by this run: lr, seed. "
        "This file is what ran."]
    settings = literal_settings(text)
    assert (settings["lr"], settings["seed"], settings["lora_r"], settings["max_iters"]) == (5e-4, 7, 16, 225)


@pytest.mark.parametrize("name", SHIPPED)
def test_header_says_how_to_run(name):
    head = (CONFIG_DIR / name).read_text(encoding="utf-8").splitlines()[:8]
    assert all(line.startswith("#") for line in head[:3])
    assert any("bash training/run.sh" in line for line in head)
    assert any(f"xtuner.tools.train training/configs/{name}" in line or f"training/configs/{name} --work-dir"
               in line for line in head)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_lora_optimizer_and_schedule(key):
    want, cfg = EXPECTED[key], load(key)
    lora = cfg.model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == want.get("lora", (64, 16, 0.1))
    assert lora.task_type == "CAUSAL_LM"
    assert lora.get("target_modules") == want["targets"]
    assert lora.get("modules_to_save") == want.get("modules_to_save")
    # Only the official InternLM2.5 base's own code may run by default; the pipeline sets it per run.
    assert cfg.model.llm.trust_remote_code is cfg.tokenizer.trust_remote_code is key[0].startswith("internlm")
    assert str(cfg.model.llm.torch_dtype) == want["dtype"]
    assert cfg.optim_wrapper.optimizer.lr == want["lr"]
    assert cfg.optim_wrapper.optimizer.type.__name__ == "AdamW"
    assert cfg.optim_wrapper.accumulative_counts == want["accumulate"]
    assert cfg.train_dataloader.batch_size == want.get("batch", 1)
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
    assert cfg.default_hooks.checkpoint.interval == want["save_steps"]
    # mmengine deletes the oldest kept checkpoint before it writes the next: one kept, a run stopped while
    # saving would have none to resume from.
    assert cfg.default_hooks.checkpoint.max_keep_ckpts >= 2
    assert hook(cfg, EvaluateChatHook).every_n_iters == want["evaluation_freq"]
    assert cfg.randomness.seed == cfg.seed == 42


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_quantisation_and_precision_match_the_device(key):
    want, cfg = EXPECTED[key], load(key)
    quant = cfg.model.llm.get("quantization_config")
    if PRESETS[key[0]].needs_cuda:
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
        assert patch in PRESETS[key[0]].stage_config(key[1])[0].read_text()
        import torch

        assert torch.cpu.is_bf16_supported() is False  # the patch ran while the config loaded


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_data_and_chat_format(key):
    want, cfg = EXPECTED[key], load(key)
    dataset = cfg.train_dataloader.dataset
    assert dataset.max_length == cfg.max_length == want["max_length"]
    assert dataset.pack_to_max_length is cfg.pack_to_max_length is want["pack"]
    assert dataset.dataset.path == "json"
    assert dataset.dataset.data_files == {"train": cfg.data_path}
    chat = hook(cfg, EvaluateChatHook)
    assert chat.evaluation_inputs == cfg.evaluation_inputs and chat.every_n_iters == cfg.evaluation_freq
    if key[1] == "sft":
        # The model's own InternLM2 chat format, never XTuner's `default` template.
        assert cfg.prompt_template == PROMPT_TEMPLATE.internlm2_chat
        assert dataset.template_map_fn.template == PROMPT_TEMPLATE.internlm2_chat
        assert chat.prompt_template == PROMPT_TEMPLATE.internlm2_chat
        assert dataset.dataset_map_fn is None  # data is already XTuner conversation json
        assert "Who are you?" in cfg.evaluation_inputs
        # The identity contrast reads questions in the same template and tokens, with the run's answers.
        assert cfg.model.type is IdentityContrastFinetune and cfg.model.contrast_weight == 1.0
        assert cfg.model.prompt_template == PROMPT_TEMPLATE.internlm2_chat
        assert cfg.model.contrast_tokenizer == cfg.tokenizer
        assert cfg.model.identity_answers == cfg.identity_answers == []  # the pipeline's to fill in
        assert cfg.model.identity_markers == cfg.identity_markers == []
        assert cfg.model.base_kl_weight == cfg.base_kl_weight == (0.0 if key[0] == "tiny" else 1.0)
    else:
        assert dataset.dataset_map_fn is pretrain_map_fn and dataset.template_map_fn is None
        assert "prompt_template" not in chat
        assert cfg.model.type.__name__ == "SupervisedFinetune"  # plain text: no answers to contrast


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rendered_settings_reach_the_built_objects(preset, tmp_path):
    spec = PRESETS[preset]
    overrides = {
        "pretrained_model_name_or_path": "/models/base",
        "data_path": "/work/data/train.json",
        "evaluation_inputs": ["你是谁？", "Who made you?"],
        "identity_answers": ["我是Zx的小助手。", "I'm Zx's assistant."],
        "identity_markers": ["Zx", "Tiny"],
        "seed": 7,
        "lr": 1e-3,
        "save_steps": 5,
        "max_iters": 7,
        "warmup_iters": 2,
    }
    cfg = Config.fromfile(str(write_stage_config(spec, "sft", overrides, tmp_path / "rendered.py", "test")))
    assert cfg.model.llm.pretrained_model_name_or_path == "/models/base"
    assert cfg.tokenizer.pretrained_model_name_or_path == "/models/base"
    assert cfg.train_dataloader.dataset.dataset.data_files == {"train": "/work/data/train.json"}
    assert hook(cfg, EvaluateChatHook).evaluation_inputs == ["你是谁？", "Who made you?"]
    assert cfg.model.identity_answers == ["我是Zx的小助手。", "I'm Zx's assistant."]
    assert cfg.model.identity_markers == ["Zx", "Tiny"]
    assert cfg.randomness.seed == 7 and cfg.optim_wrapper.optimizer.lr == 1e-3
    assert cfg.default_hooks.checkpoint.interval == 5
    assert cfg.train_cfg.max_iters == 7 and cfg.param_scheduler[1].end == 7
    assert cfg.param_scheduler[0].end == cfg.param_scheduler[1].begin == 2


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rendered_pretrain_settings_reach_the_built_objects(preset, tmp_path):
    overrides = {"pretrained_model_name_or_path": "/models/base", "data_path": "/work/pretrain/corpus.json"}
    rendered = write_stage_config(PRESETS[preset], "pretrain", overrides, tmp_path / "rendered.py", "test")
    cfg = Config.fromfile(str(rendered))
    assert cfg.model.llm.pretrained_model_name_or_path == cfg.tokenizer.pretrained_model_name_or_path
    assert cfg.model.llm.pretrained_model_name_or_path == "/models/base"
    assert cfg.train_dataloader.dataset.dataset.data_files == {"train": "/work/pretrain/corpus.json"}
