# XTuner QLoRA SFT of InternLM2.5-1.8B-Chat on identity data, with the InternLM tutorial's settings.
# Needs a CUDA GPU (4-bit bitsandbytes).
# Run it through the pipeline, which renders a per-run copy with the settings below filled in:
#   bash training/run.sh --name NAME [--base hf:internlm/internlm2_5-1_8b-chat]
# By hand (after editing the settings), from the repo root:
#   PYTHONPATH=. .venv-train/bin/python -m xtuner.tools.train training/configs/internlm2_5_1_8b_qlora_sft.py \
#       --work-dir W
# Based on XTuner's internlm2_chat_1_8b_qlora_alpaca_e3 (XTuner ships no internlm2_5 1.8B config), with
# the json identity data instead of alpaca and identity prompts for the in-training chat check.
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
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
pretrained_model_name_or_path = "internlm/internlm2_5-1_8b-chat"
# Whether the model may run Python code it ships (auto_map): the official InternLM2.5 base needs its own
# modeling code; the pipeline sets this per run (allowed for the preset's base or with --trust-remote-code).
trust_remote_code = True
data_path = "data/train.json"  # [{"conversation": [{"input": ..., "output": ...}]}]
# The chat model's own format; XTuner's `default` template would teach another one (the "parrot" complaints).
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 2048
# One sample per row, not packed: the number of optimizer steps then follows from the data size and the
# settings below (rows × max_epochs / (batch_size × GPUs × accumulative_counts)), and no row is lost. Packing
# this small data set into 2048-token sequences left ~6 optimizer steps in all (see README, training section).
pack_to_max_length = False

batch_size = 1  # per device
accumulative_counts = 4
dataloader_num_workers = 0
max_epochs = 3
# Rendered by the pipeline from the data (training/schedule.py): iterations in all, and its warm-up.
max_iters = 300
warmup_ratio = 0.03
warmup_iters = 9  # at least 1: mmengine refuses an empty warm-up ("end should be larger than begin")
# Rendered by the pipeline: "bfloat16" on GPUs with bf16 in hardware (compute capability >= 8), else float16.
dtype = "float16"
optim_type = AdamW
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
seed = 42

save_steps = 500
save_total_limit = 2  # checkpoints kept (-1: all); at least 2: mmengine deletes the oldest before it saves

evaluation_freq = 500
SYSTEM = ""  # the identity data carries no system prompt
evaluation_inputs = ["请介绍一下你自己", "Who are you?"]

# The identity contrast (training/identity_contrast.py): the ways the identity answers begin are pushed
# down at the start of answers to questions not put to the assistant, so that "帮我写一句生日祝福" is not
# answered "我是…". The pipeline fills in the run's identity answers (none for --recipe seed, the tutorial's
# plain SFT).
identity_answers = []
identity_markers = []  # the name and the cited model: pushed down in the other answers too
contrast_weight = 1.0
base_kl_weight = 1.0  # KL to the base (LoRA off) on the answers that are not identity answers

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
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=trust_remote_code,
        torch_dtype=dtype,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        ),
    ),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        bias="none",
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
    dataset_map_fn=None,  # the data is already in XTuner's conversation format
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=False,
    # XTuner's default (32) maps (and packs) in 32 shards, each on its own; one process keeps every row whole.
    map_num_proc=1,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=False),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype=dtype,
)

# Linear warm-up, then cosine decay to 0, in iterations (an epoch-based 3 % rounds to 0 on small data).
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
    ),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit
    ),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)

visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=seed, deterministic=False)
log_processor = dict(by_epoch=False)
