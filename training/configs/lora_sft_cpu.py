# XTuner LoRA SFT on CPU for the `tiny` and `smol` presets: the identity fine-tune of their chat model.
# Run it through the pipeline, which renders a per-run copy with the preset's values (`sft_settings` of its
# row in training/presets.py) and then the run's settings filled in:
#   bash training/run.sh --preset tiny --name NAME
# By hand (the values below are the tiny preset's; set the model and data paths), from the repo root:
#   PYTHONPATH=.:training/cpu_shims .venv-train/bin/python -m xtuner.tools.train \
#       training/configs/lora_sft_cpu.py --work-dir WORK
# Same recipe as internlm2_5_1_8b_qlora_sft.py, changed only where CPU needs it
# (../shared/notes/xtuner-0.2-on-cpu.md): plain LoRA in fp32 (plus modules trained in full where a preset
# says so), OptimWrapper, one map process, InfiniteSampler with an iteration-based loop and schedule, Llama
# module names.

# ruff: noqa: E402 (the patch below must run before the imports)
# XTuner's SupervisedFinetune asks torch.cpu.is_bf16_supported(), which CPU torch lacks. mmengine parses
# this file with lazy imports (the `torch` imported below is a placeholder): use the real one via __import__.
if not hasattr(__import__("torch").cpu, "is_bf16_supported"):
    __import__("torch").cpu.is_bf16_supported = lambda: False
# mmengine's `pytorch` launcher (--gpus N: N processes over gloo on CPU) calls torch.cuda.set_device, which
# CPU torch lacks: there is no device to pick.
if not __import__("torch").cuda.is_available():
    __import__("torch").cuda.set_device = lambda device: None

import torch
from datasets import load_dataset
from mmengine.dataset import InfiniteSampler
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook, ThroughputHook
from xtuner.engine.runner import TrainLoop
from xtuner.utils import PROMPT_TEMPLATE

from training.identity_contrast import IdentityContrastFinetune

#######################################################################
#              PART 1  Settings (rendered by training/pipeline.py)    #
#######################################################################
pretrained_model_name_or_path = "tiny-base"
# Whether the model may run Python code it ships (auto_map): the CPU presets' bases (the tiny model, the
# converted SmolLM2) are plain Llama with no code of their own; the pipeline sets this per run
# (--trust-remote-code).
trust_remote_code = False
data_path = "data/train.json"  # [{"conversation": [{"input": ..., "output": ...}]}]
# The InternLM2 chat format (ChatML, also SmolLM2's own) the model is served with; XTuner's `default` template
# would teach another one.
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 256
pack_to_max_length = True  # per preset

batch_size = 1  # per preset
accumulative_counts = 1
dataloader_num_workers = 0
# Iterations, not epochs: mmengine sleeps 2 s at every epoch restart of a DefaultSampler, which dominates on
# tiny data, and an epoch-based 3 % warm-up rounds to 0 iterations (LinearLR then raises begin == end).
max_iters = 300  # per preset
# Rendered by the pipeline (training/schedule.py): round(warmup_ratio × max_iters), at least 1 and below
# max_iters, so that --max-iters 1 still has a (never reached) cosine phase.
warmup_ratio = 0.034
warmup_iters = 10
optim_type = AdamW
lr = 2e-3  # per preset
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1
seed = 42

save_steps = 300  # per preset
save_total_limit = 2  # mmengine deletes the oldest before writing the next: with 1, a run stopped mid-save
#                       would be left with no checkpoint to resume from

evaluation_freq = 100  # per preset
SYSTEM = ""  # system prompts, where any, are in the data rows
evaluation_inputs = ["请介绍一下你自己", "Who are you?"]

# LoRA, per preset (the reasons for each preset's values are beside them in training/presets.py).
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
modules_to_save = ["lm_head"]  # trained in full beside the LoRA (None: the LoRA alone)

# The identity contrast (training/identity_contrast.py): the ways the identity answers begin are pushed
# down at the start of answers to questions not put to the assistant, so that "帮我写一句生日祝福" is not
# answered "我是…". The pipeline fills in the run's identity answers (none for --recipe seed, the tutorial's
# plain SFT).
identity_answers = []
identity_markers = []  # the name and the cited model: pushed down in the other answers too
contrast_weight = 1.0
base_kl_weight = 0.0  # KL to the base (LoRA off) on the answers that are not identity answers; per preset

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=trust_remote_code,
    padding_side="right",
)

model = dict(
    type=IdentityContrastFinetune,
    identity_answers=identity_answers,
    identity_markers=identity_markers,
    contrast_weight=contrast_weight,
    base_kl_weight=base_kl_weight,
    contrast_tokenizer=tokenizer,
    prompt_template=prompt_template,
    use_varlen_attn=False,
    use_activation_checkpointing=False,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=trust_remote_code,
        torch_dtype=torch.float32,
    ),
    lora=dict(
        type=LoraConfig,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=dict(train=data_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=None,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=False,
    # The default (32) forks 32 workers and packs each shard on its own: slow, and short packed samples.
    map_num_proc=1,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=InfiniteSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=False),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# OptimWrapper: AmpOptimWrapper asserts a GPU.
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)

# mmengine's cosine decays from the lr the warm-up left, (warmup_iters - 1) / warmup_iters of lr: the pipeline
# renders either a warm-up of 10+ iterations or 1, which starts at the full lr (see training/schedule.py).
# max(): with max_iters == 1 the cosine phase is never reached but must not be empty.
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5 if warmup_iters > 1 else 1.0, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=warmup_iters,
         end=max(max_iters, warmup_iters + 1)),
]

train_cfg = dict(type=TrainLoop, max_iters=max_iters)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    # Adds tokens_per_sec (and tflops) to every logged iteration: the progress line and metrics.jsonl show it.
    dict(type=ThroughputHook),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template,
        max_new_tokens=64,
    ),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit
    ),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="gloo"),
)
# Only used with several processes: CPU modules take no device_ids (mmengine's default passes LOCAL_RANK).
model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)

visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=seed, deterministic=False)
log_processor = dict(by_epoch=False)
