# Build the project's tiny *chat* base model, the CPU stand-in for InternLM2.5-1.8B-Chat.
# Run from the repo root, in either environment (.venv-train: transformers 4.48, .venv: transformers 5):
#   python -m training.make_tiny_base --out DIR [--seed 0] [--steps N]
# It trains a byte-level BPE tokenizer and a small LlamaForCausalLM on the synthetic chat set of
# training/general_chat.py, with InternLM2's chat format and special tokens, and saves an HF model dir that
# both transformers versions load. --steps 0 gives an untrained but correctly formatted model.
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from training import general_chat
from training.general_chat import ChatPair

# Tiny model contract shared by the whole project (see the brief): fixed ids for the special tokens.
UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, IM_START, IM_END)
BOS_ID, EOS_ID, IM_END_ID = 1, 2, 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # no token_type_ids: Llama's generate() rejects them
ZH_FUNCTION_CHARS = "的是了吗呢吧和在有会"
IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)
SOURCE_FILES = (Path(__file__), Path(general_chat.__file__))


class TinyBaseError(ValueError):
    """Bad settings or output location for the tiny base model."""


@dataclass(frozen=True)
class TinyBaseConfig:
    """Everything that decides the tiny base model; one config, validated here.

    Args:
        seed: seed for weight init and batch order.
        steps: optimiser steps (0 = untrained model with the right format).
        vocab_size: upper bound of the BPE vocabulary (the small corpus may give fewer tokens).
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention, like InternLM2).
        intermediate_size: MLP width.
        max_position_embeddings: longest context the model config allows.
        batch_size: sequences per optimiser step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 10 %).
        warmup_steps: warm-up length in steps.
        threads: torch threads while building. 1 by default: these matrices are too small to gain much from
            more, and on a shared 2-core machine extra threads spin against other processes (10x slower seen).
    """

    seed: int = 0
    steps: int = 500
    vocab_size: int = 2000
    hidden_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    threads: int = 1

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "max_position_embeddings", "batch_size", "threads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TinyBaseError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0:
            raise TinyBaseError(f"steps and warmup_steps must be >= 0, got {self.steps}, {self.warmup_steps}")
        if self.vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise TinyBaseError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (special + byte tokens)")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise TinyBaseError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if not 0 < self.lr < 1:
            raise TinyBaseError(f"lr must be in (0, 1), got {self.lr}")


@dataclass(frozen=True)
class Reply:
    """A greedy reply.

    Args:
        text: the decoded reply without special tokens.
        stopped: whether generation ended on `<|im_end|>` (rather than `</s>` or the token limit).
    """

    text: str
    stopped: bool


def train_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the contract's special tokens, bos prepended like InternLM2's.

    Args:
        corpus: training text lines.
        vocab_size: upper bound of the vocabulary size.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    # Chinese has no spaces, so the byte-level regex sees a whole Chinese sentence as one "word", and BPE on
    # this small corpus would make entire answers single tokens. Splitting Chinese runs at common function
    # characters keeps tokens at word size (北京, 首都, 星期一), as in real Chinese vocabularies.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"[{ZH_FUNCTION_CHARS}]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    # XTuner's EvaluateChatHook encodes its prompt with add_special_tokens=True and relies on this to get <s>.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids are {ids}, the tiny model contract needs 0..4")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=4096, model_input_names=MODEL_INPUT_NAMES)


def prompt_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat rendered with the chat template, ending with the assistant header.

    Args:
        tokenizer: the tiny tokenizer.
        messages: the conversation so far ({"role", "content"} dicts).
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer: PreTrainedTokenizerFast, pair: ChatPair) -> tuple[list[int], list[int]]:
    """Input ids and labels of one exchange; only the answer and its `<|im_end|>` are learned.

    Args:
        tokenizer: the tiny tokenizer.
        pair: the exchange.
    """
    prompt = prompt_ids(tokenizer, pair.messages()[:1])
    answer = tokenizer(pair.answer, add_special_tokens=False)["input_ids"] + [IM_END_ID]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def build_model(vocab_size: int, config: TinyBaseConfig) -> LlamaForCausalLM:
    """A randomly initialised Llama model with an untied output head (like InternLM2).

    Args:
        vocab_size: number of token ids.
        config: model sizes and seed.
    """
    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=EOS_ID, tie_word_embeddings=False)
    return LlamaForCausalLM(model_config).float()


def _batches(examples: list[tuple[list[int], list[int]]],
             config: TinyBaseConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffles of the examples, right-padded per batch."""
    generator = torch.Generator().manual_seed(config.seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            chunk = [examples[i] for i in order[start:start + config.batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), EOS_ID)
            labels = torch.full((len(chunk), width), IGNORE_INDEX)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, labs) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                labels[row, :len(labs)] = torch.tensor(labs)
                mask[row, :len(ids)] = 1
            yield {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def train_model(model: LlamaForCausalLM, examples: list[tuple[list[int], list[int]]],
                config: TinyBaseConfig) -> list[float]:
    """Full-parameter AdamW training; returns the loss of every step.

    Args:
        model: the model to train in place.
        examples: (input_ids, labels) pairs from encode_pair.
        config: steps, batch size, learning-rate schedule and seed.
    """
    if config.steps == 0:
        return []
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for _, batch in zip(range(config.steps), _batches(examples, config), strict=False):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def greedy_replies(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
                   max_new_tokens: int = 64, batch_size: int = 64) -> list[Reply]:
    """Greedy single-turn replies, stopping at `<|im_end|>` or `</s>`.

    Args:
        model: the chat model.
        tokenizer: its tokenizer.
        prompts: user messages, each asked in a fresh conversation.
        max_new_tokens: reply length limit in tokens.
        batch_size: prompts decoded together (left-padded).
    """
    model.eval()
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[EOS_ID] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=EOS_ID)
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in (EOS_ID, IM_END_ID)), len(row))
            replies.append(Reply(tokenizer.decode(row[:stop], skip_special_tokens=True),
                                 stop < len(row) and row[stop] == IM_END_ID))
    return replies


def exact_match(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                pairs: Sequence[ChatPair]) -> float:
    """Share of exchanges whose greedy reply is exactly the answer and ends with `<|im_end|>`.

    Args:
        model: the chat model.
        tokenizer: its tokenizer.
        pairs: the exchanges to check.
    """
    if not pairs:
        raise TinyBaseError("exact_match needs at least one exchange")
    replies = greedy_replies(model, tokenizer, [p.prompt for p in pairs])
    return sum(r.stopped and r.text == p.answer for r, p in zip(replies, pairs, strict=True)) / len(pairs)


def split_exact_match(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> dict[str, float]:
    """Greedy exact-match on the replay prompts, the eval prompts and the base identity questions.

    Args:
        model: the chat model.
        tokenizer: its tokenizer.
    """
    general = {p.prompt: p for p in general_chat.general_pairs()}
    return {
        "replay": exact_match(model, tokenizer, [general[p] for p in general_chat.replay_prompts()]),
        "eval": exact_match(model, tokenizer, [general[p] for p in general_chat.eval_prompts()]),
        "identity": exact_match(model, tokenizer, general_chat.base_identity_pairs()),
    }


def training_pairs() -> list[ChatPair]:
    """Every exchange the base model learns: the general set plus its own identity."""
    return general_chat.general_pairs() + general_chat.base_identity_pairs()


def save_model_dir(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save weights (safetensors), tokenizer, chat template and generation config so that both
    transformers 4.48 and 5.x load the directory.

    Args:
        model: the trained model.
        tokenizer: its tokenizer.
        out: an existing, empty directory.
    """
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID],
                                               pad_token_id=EOS_ID)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Each transformers version writes its own tokenizer_config.json (5.x: class "TokenizersBackend" and a
    # list of "extra_special_tokens", which 4.48 cannot read). Write one that both read, template included.
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "unk_token": UNK, "additional_special_tokens": [IM_START, IM_END], "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": tokenizer.model_max_length,
        "model_input_names": MODEL_INPUT_NAMES,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2),
                                               encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


@dataclass(frozen=True)
class BuildReport:
    """What a build produced.

    Args:
        out: the model directory.
        num_params: parameter count.
        vocab_size: tokenizer size.
        final_loss: mean loss of the last 20 steps (None when untrained).
        exact_match: greedy exact-match per split ("replay", "eval", "identity"); empty when untrained.
        seconds: wall time of the build.
    """

    out: Path
    num_params: int
    vocab_size: int
    final_loss: float | None
    exact_match: dict[str, float]
    seconds: float


def build_tiny_base(out: Path, config: TinyBaseConfig = TinyBaseConfig()) -> BuildReport:
    """Train the tokenizer and model and write the model dir atomically (temporary dir, then rename).

    Args:
        out: where the model dir goes; must not exist yet (or be empty).
        config: model and training settings.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TinyBaseError(f"{out} is not an empty directory; remove it or choose another")
    started = time.perf_counter()
    with torch_threads(config.threads):
        tokenizer = train_tokenizer(general_chat.tokenizer_corpus(), config.vocab_size)
        model = build_model(len(tokenizer), config)
        losses = train_model(model, [encode_pair(tokenizer, p) for p in training_pairs()], config)
        scores = split_exact_match(model, tokenizer) if config.steps else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model_dir(model, tokenizer, tmp)
        (tmp / "tiny_base.json").write_text(json.dumps(
            {"config": asdict(config), "exact_match": scores, "final_loss": _tail_mean(losses)}, indent=2))
        _apply_umask(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildReport(out, sum(p.numel() for p in model.parameters()), len(tokenizer), _tail_mean(losses),
                       scores, time.perf_counter() - started)


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes the dir private (and some savers their files); give it the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _tail_mean(losses: list[float], n: int = 20) -> float | None:
    return sum(losses[-n:]) / len(losses[-n:]) if losses else None


def source_hash(config: TinyBaseConfig = TinyBaseConfig()) -> str:
    """Hash of the generating source files and the config: the cache key of a build.

    Args:
        config: the build settings.
    """
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for path in SOURCE_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_tiny_base(cache_root: Path, config: TinyBaseConfig = TinyBaseConfig()) -> Path:
    """Return the model dir for `config` under `cache_root`, building it once per machine and source version.
    Concurrent callers (pipeline, tests) wait on a file lock instead of building twice.

    Args:
        cache_root: directory holding cached builds (created if missing).
        config: the build settings.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    out = cache_root / f"tiny-base-{source_hash(config)}"
    with open(cache_root / ".tiny-base.lock", "w") as lock, _locked(lock):
        if not (out / "config.json").exists():
            build_tiny_base(out, config)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with n torch intra-op threads, then restore the previous count.

    Args:
        n: thread count inside the block.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(handle) -> Iterator[None]:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.make_tiny_base",
                                     description="Build the tiny chat base model.")
    parser.add_argument("--out", type=Path, required=True, help="model dir to create (must not exist)")
    parser.add_argument("--seed", type=int, default=TinyBaseConfig.seed, help="seed for init and batch order")
    parser.add_argument("--steps", type=int, default=TinyBaseConfig.steps,
                        help="training steps (0 = untrained)")
    args = parser.parse_args(argv)
    try:
        report = build_tiny_base(args.out, TinyBaseConfig(seed=args.seed, steps=args.steps))
    except TinyBaseError as err:
        print(f"make_tiny_base: {err}", file=sys.stderr)
        return 2
    size_mb = sum(f.stat().st_size for f in report.out.iterdir()) / 1e6
    scores = ", ".join(f"{name} {score:.1%}" for name, score in report.exact_match.items()) or "untrained"
    loss = "-" if report.final_loss is None else f"{report.final_loss:.4f}"
    print(f"wrote {report.out}: {report.num_params:,} params, vocab {report.vocab_size}, {size_mb:.1f} MB, "
          f"final loss {loss}, greedy exact match: {scores}; {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
