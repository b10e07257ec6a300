# Greedy batched chat generation with a model dir's own chat template (used for replay data and evaluation).
# Run from the repo root, e.g.:
#   python -m training.generate --model work/merged --prompt "你是谁？" --prompt "What is 2 plus 3?"
#   python -m training.generate --model work/merged --prompt "What is the largest ocean on Earth?" \
#       --after "The largest ocean on Earth is the"        # the most likely next tokens there, not an answer
# Works in .venv-train (transformers 4.48) and .venv (transformers 5.x). A model that ships its own Python
# code (real InternLM2 dirs) loads only with TRUST_REMOTE_CODE=1 (training/run.sh sets it for a trusted base).
# Greedy decoding makes answers reproducible, so base-vs-fine-tune comparisons are fair.
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from infer_engine.model_source import check_remote_code
from infer_engine.settings import trust_remote_code_from_env

# The InternLM2 end-of-turn token: chat models stop here, and must, or they run on into a new turn.
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Args:
        text: the answer, special tokens removed, surrounding whitespace stripped.
        finished: True when the model stopped on an end token, False when max_new_tokens cut it off.
        new_tokens: number of tokens generated (stop token excluded).
    """

    text: str
    finished: bool
    new_tokens: int


@dataclass
class ChatModel:
    """A loaded model and tokenizer, ready for generate().

    Args:
        model: the causal LM in eval mode.
        tokenizer: its tokenizer, padding on the left (batched decoding needs the prompts right-aligned).
        stop_ids: token ids that end an answer (eos and <|im_end|>).
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    stop_ids: list[int]


def _stop_ids(
    tokenizer: transformers.PreTrainedTokenizerBase, model: transformers.PreTrainedModel
) -> list[int]:
    ids: set[int] = set()
    config_eos = model.generation_config.eos_token_id
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if IM_END in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(IM_END))
    if not ids:
        raise ValueError("the model defines no end-of-sequence token, so generation could never stop")
    return sorted(ids)


def load_tokenizer(
    model_dir: str | Path, trust_remote_code: bool | None = None
) -> transformers.PreTrainedTokenizerBase:
    """A HF model dir's tokenizer, refusing one whose files would run the model's own code unless allowed.

    Args:
        model_dir: a HF model dir.
        trust_remote_code: let a model that ships Python code run it; None: ``$TRUST_REMOTE_CODE``.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model dir (no config.json)")
    trust = trust_remote_code_from_env() if trust_remote_code is None else trust_remote_code
    check_remote_code(model_dir, trust, "TRUST_REMOTE_CODE=1 (training/run.sh: --trust-remote-code)")
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)


def load_chat_model(model_dir: str | Path, trust_remote_code: bool | None = None) -> ChatModel:
    """Load a HF model dir for greedy chat generation (GPU in bf16 when there is one, else CPU in fp32).

    Args:
        model_dir: a HF model dir with tokenizer files and a chat template.
        trust_remote_code: let a model that ships Python code run it; None: ``$TRUST_REMOTE_CODE``.
    """
    model_dir = Path(model_dir)
    trust = trust_remote_code_from_env() if trust_remote_code is None else trust_remote_code
    tokenizer = load_tokenizer(model_dir, trust)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir} has no chat template; the answers would not be chat answers")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    # transformers 5 renamed torch_dtype to dtype; 4.48 (the XTuner env) only knows torch_dtype.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust, **{dtype_kw: dtype})
    model.to("cuda" if cuda else "cpu").eval()
    return ChatModel(model, tokenizer, _stop_ids(tokenizer, model))


def render_prompt(
    tokenizer: transformers.PreTrainedTokenizerBase, prompt: str, system: str | None = None
) -> str:
    """The text the model sees for one user turn: its own chat template plus the assistant header.

    Args:
        tokenizer: the model's tokenizer (carries the chat template).
        prompt: the user's message.
        system: optional system message placed before it.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(chat: ChatModel, texts: list[str]) -> transformers.BatchEncoding:
    """Rendered prompts as one left-padded batch on the model's device.

    Args:
        chat: a model loaded with load_chat_model.
        texts: prompts already rendered by render_prompt (and any start of the answer).
    """
    # The template already starts with bos; add_special_tokens=False keeps it from being doubled.
    enc = chat.tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        return_token_type_ids=False,  # some tokenizers emit them; causal LMs reject them in generate()
    )
    return enc.to(chat.model.device)


def generate(
    chat: ChatModel,
    prompts: list[str],
    max_new_tokens: int,
    system: str | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Greedy answers to single-turn prompts, in the order given.

    Args:
        chat: a model loaded with load_chat_model.
        prompts: user messages, one answer each.
        max_new_tokens: most tokens per answer; an answer cut off here has finished=False.
        system: optional system message for every prompt.
        batch_size: prompts decoded together (left-padded); prompts are length-sorted to waste little padding.
        on_batch: called with (answers done, answers in all) after each batch, for progress reports.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tok = chat.tokenizer
    texts = [render_prompt(tok, p, system) for p in prompts]
    # Explicit config: the model dir's sampling defaults (temperature, top_p...) must not switch greedy off.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=chat.stop_ids,
        pad_token_id=tok.pad_token_id,
    )
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    results: list[Generation | None] = [None] * len(texts)
    stop = set(chat.stop_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode(chat, [texts[i] for i in idx])
        with torch.inference_mode():
            out = chat.model.generate(**enc, generation_config=config)
        for row, i in enumerate(idx):
            new = out[row, enc["input_ids"].shape[1] :].tolist()
            end = next((k for k, t in enumerate(new) if t in stop), None)
            kept = new if end is None else new[:end]
            results[i] = Generation(
                tok.decode(kept, skip_special_tokens=True).strip(), end is not None, len(kept)
            )
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return [r for r in results if r is not None]


def next_token_probs(
    chat: ChatModel, prompt: str, prefix: str, top: int = 5, system: str | None = None
) -> list[tuple[str, float]]:
    """The `top` most likely next tokens and their probabilities once the answer has begun with `prefix`: how
    close a greedy answer was to going another way.

    Args:
        chat: a model loaded with load_chat_model.
        prompt: the user's message.
        prefix: the start of the answer ("" for its first token).
        top: how many tokens to list.
        system: optional system message.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    enc = encode(chat, [render_prompt(chat.tokenizer, prompt, system) + prefix])
    with torch.inference_mode():
        logits = chat.model(**enc).logits[0, -1]
    values, indices = torch.topk(torch.softmax(logits.float(), -1), top)
    return [(chat.tokenizer.decode([i]), v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def generate_answers(
    model_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int,
    system: str | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Load a model dir and return its greedy answers to prompts (texts only, in order).

    Args:
        model_dir: a HF model dir with tokenizer files and a chat template.
        prompts: user messages, one answer each.
        max_new_tokens: most tokens per answer.
        system: optional system message for every prompt.
        batch_size: prompts decoded together.
    """
    chat = load_chat_model(model_dir)
    return [g.text for g in generate(chat, prompts, max_new_tokens, system, batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Greedy chat answers from a HF model dir.")
    parser.add_argument("--model", required=True, help="HF model dir")
    parser.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--after", default=None,
                        help="list the most likely next tokens after this start of the answer instead")
    args = parser.parse_args()
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        chat = load_chat_model(args.model)
    except (ValueError, OSError) as err:  # not a model dir, no weights, no chat template, code not allowed
        parser.error(str(err))
    if args.after is not None:
        for prompt in args.prompt:
            ranked = next_token_probs(chat, prompt, args.after, system=args.system)
            print(f"> {prompt}\n{args.after!r} -> " + ", ".join(f"{t!r} {p:.3f}" for t, p in ranked))
        return
    start = time.perf_counter()
    gens = generate(chat, args.prompt, args.max_new_tokens, args.system)
    seconds = time.perf_counter() - start
    for prompt, gen in zip(args.prompt, gens, strict=True):
        print(f"> {prompt}\n{gen.text}{'' if gen.finished else ' [cut at max_new_tokens]'}\n")
    tokens = sum(g.new_tokens for g in gens)
    print(f"{len(gens)} answers, {tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.0f} tok/s)")


if __name__ == "__main__":
    main()
