# XTuner QLoRA continued pre-training of InternLM2.5-1.8B-Chat on plain text. Needs a CUDA GPU.
# Run it through the pipeline, which renders a per-run copy with the settings below filled in, merges the
# result and fine-tunes that on the identity data:
#   bash training/run.sh --name NAME --corpus DIR_OF_TXT_AND_MD
# By hand (after editing the settings), from the repo root:
#   .venv-train/bin/python -m xtuner.tools.train \
#       training/configs/internlm2_5_1_8b_qlora_pretrain.py --work-dir W
# Based on XTuner's internlm2_1_8b_full_custom_pretrain_e1, as 4-bit QLoRA on the attention and MLP
# projections.
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
from xtuner.dataset.map_fns import pretrain_map_fn
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook, ThroughputHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune

#######################################################################
#              PART 1  Settings (rendered by training/pipeline.py)    #
#######################################################################
pretrained_model_name_or_path = "internlm/internlm2_5-1_8b-chat"
# Whether the model may run Python code it ships (auto_map): the official InternLM2.5 base needs its own
# modeling code; the pipeline sets this per run (allowed for the preset's base or with --trust-remote-code).
trust_remote_code = True
data_path = "corpus.json"  # [{"text": ...}], from training/make_corpus.py
max_length = 2048
pack_to_max_length = True

batch_size = 1  # per device
accumulative_counts = 16
dataloader_num_workers = 0
max_epochs = 1
# Rendered by the pipeline from the packed corpus (training/schedule.py): iterations in all, and its warm-up.
max_iters = 100
warmup_ratio = 0.03
warmup_iters = 3  # at least 1: mmengine refuses an empty warm-up ("end should be larger than begin")
# Rendered by the pipeline: "bfloat16" on GPUs with bf16 in hardware (compute capability >= 8), else float16.
dtype = "bfloat16"
optim_type = AdamW
lr = 2e-5  # low: shift the knowledge, keep the chat behaviour
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
seed = 42

save_steps = 500
save_total_limit = 2  # checkpoints kept (-1: all); at least 2: mmengine deletes the oldest before it saves

evaluation_freq = 500
SYSTEM = ""
evaluation_inputs = ["上海是", "Shanghai is"]  # plain continuations: no chat template in pre-training

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
    type=SupervisedFinetune,
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
        # InternLM2's fused attention (wqkv, wo) and MLP (w1, w2, w3) projections.
        target_modules=["wqkv", "wo", "w1", "w2", "w3"],
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
    dataset_map_fn=pretrain_map_fn,  # loss on every token of the text
    template_map_fn=None,
    remove_unused_columns=True,
    shuffle_before_pack=False,  # keep neighbouring chunks of a document together
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=False,
    # XTuner's default (32) packs 32 shards each on its own, dropping each shard's leftover tokens; with one
    # process only the tail after the last full sequence is dropped (the dry run reports it).
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
