# XTuner checkpoint -> HF LoRA adapter -> merged, servable HF model dir (safetensors, tokenizer, chat
# template, generation_config that stops on <|im_end|>, training_meta.json). Used by training/pipeline.py;
# by hand, from the repo root in .venv-train (add training/cpu_shims to PYTHONPATH on CPU torch):
#   python -m training.convert_merge --config WORK/sft/sft_config.py --checkpoint WORK/sft/iter_300.pth \
#       --base BASE_MODEL_DIR --out WORK/merged
# XTuner's tools run as `python -m xtuner.tools.model_converters.{pth_to_hf,merge}` (the `xtuner` CLI exits 0
# even when they fail), and every step also checks that its outputs exist.
"""Convert an XTuner LoRA checkpoint, merge it into its base model, and finalize the result for serving."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from infer_engine.model_source import RemoteCodeError, check_remote_code
from training.atomic_io import write_text_atomic

IM_END = "<|im_end|>"
META_FILE = "training_meta.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

CommandRunner = Callable[[list[str]], None]


class ConvertError(ValueError):
    """A conversion step produced no usable output (the message says what is missing)."""


def run_command(cmd: list[str]) -> None:
    """Run one command, raising ConvertError on a non-zero exit (the default CommandRunner).

    Args:
        cmd: the argv to run.
    """
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise ConvertError(f"{' '.join(cmd[:4])} ... exited with status {rc}")


def _fresh_partial(out: Path) -> Path:
    # Steps write beside their target and rename at the end, so a half-written dir never looks complete.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def scale_adapter(adapter: Path, scale: float) -> None:
    """Set a LoRA adapter to `scale` times the strength it was trained at, by scaling its lora_alpha (and any
    per-module alpha) in adapter_config.json: PEFT adds (alpha / r) * B @ A, so the change to the base is
    scaled exactly, and whatever merges or loads the adapter (XTuner, PEFT, the app) applies the same one.

    Args:
        adapter: a PEFT LoRA adapter dir (edited in place).
        scale: the share of the trained change to keep, 0 < scale <= 1 (1: leave the adapter as it is).
    """
    if not 0 < scale <= 1:
        raise ConvertError(f"adapter scale must be in (0, 1], got {scale}")
    if scale == 1:
        return
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or not isinstance(config.get("lora_alpha"), int | float):
        raise ConvertError(f"{path} is not a LoRA adapter with a lora_alpha; cannot scale it")
    if config.get("modules_to_save"):  # fully trained copies of modules: alpha does not scale them
        raise ConvertError(f"{path} also trains {config['modules_to_save']} in full; only a plain LoRA "
                           "can be scaled")
    config["lora_alpha"] = config["lora_alpha"] * scale
    config["alpha_pattern"] = {k: v * scale for k, v in (config.get("alpha_pattern") or {}).items()}
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def pth_to_hf(config: Path, checkpoint: Path, out: Path, run: CommandRunner = run_command,
              scale: float = 1.0) -> Path:
    """Convert an XTuner training checkpoint into a Hugging Face LoRA adapter dir (safetensors).

    Args:
        config: the XTuner config the checkpoint was trained with (it rebuilds the model).
        checkpoint: the `iter_N.pth` written by xtuner.tools.train.
        out: adapter directory to create; replaced atomically.
        run: how to run the converter command (the pipeline passes a logging runner).
        scale: the share of the trained change the adapter keeps (scale_adapter; 1: all of it).
    """
    partial = _fresh_partial(out)
    run([sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf",
         str(config), str(checkpoint), str(partial), "--safe-serialization"])
    missing = [name for name in ADAPTER_FILES if not (partial / name).is_file()]
    if missing:
        raise ConvertError(f"pth_to_hf wrote no {', '.join(missing)} in {partial}")
    scale_adapter(partial, scale)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def merge_model(base: Path, adapter: Path, out: Path, meta: Mapping[str, object],
                run: CommandRunner = run_command, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and finalize the result as a servable model dir.

    XTuner's merge tool always loads with trust_remote_code=True, so a base that ships Python code is refused
    here unless ``trust_remote_code`` allows it.

    Args:
        base: the model dir the adapter was trained on.
        adapter: the adapter dir written by pth_to_hf.
        out: merged model directory to create; replaced atomically once finalized.
        meta: facts about the run for training_meta.json (name, preset, settings, ...).
        run: how to run the merge command (the pipeline passes a logging runner).
        trust_remote_code: let a base (and so the merged model) that ships Python code run it.
    """
    try:
        check_remote_code(base, trust_remote_code, "--trust-remote-code")
    except RemoteCodeError as err:
        raise ConvertError(str(err)) from None
    partial = _fresh_partial(out)
    # XTuner's merge loads the base in fp16 whatever its dtype, so the merged weights are fp16.
    run([sys.executable, "-m", "xtuner.tools.model_converters.merge",
         str(base), str(adapter), str(partial), "--safe-serialization"])
    if not (partial / "config.json").is_file():
        raise ConvertError(f"merge wrote no config.json in {partial}")
    finalize(partial, meta, trust_remote_code)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def finalize(
    model_dir: Path, meta: Mapping[str, object], trust_remote_code: bool = False
) -> dict[str, object]:
    """Make a merged dir servable and check it: eos includes <|im_end|>, chat template renders the InternLM2
    format, weights are safetensors only; then write training_meta.json. Returns the facts it added.

    Args:
        model_dir: the merged model directory (edited in place).
        meta: facts about the run to store in training_meta.json.
        trust_remote_code: let a model that ships Python code run it while loading its tokenizer and config.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    if not weights or pickled:
        found = ", ".join(weights + pickled) or "no weights"
        raise ConvertError(f"{model_dir}: expected safetensors weights only, found {found}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end_id is None or im_end_id == tokenizer.unk_token_id:
        raise ConvertError(f"{model_dir}: the tokenizer has no {IM_END} token, so replies could never stop")
    if not tokenizer.chat_template:
        raise ConvertError(f"{model_dir}: the tokenizer has no chat_template")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    if not prompt.endswith("<|im_start|>assistant\n"):
        raise ConvertError(f"{model_dir}: the chat template is not InternLM2's format (renders {prompt!r})")

    # The model was trained to end replies with <|im_end|>, never </s>: generation must stop on both.
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        generation = GenerationConfig.from_model_config(model_config)
    eos = generation.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    for token_id in (tokenizer.eos_token_id, im_end_id):
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    generation.eos_token_id = [i for i in eos_ids if i is not None]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(model_dir)

    # XTuner's merge records the base's path on this machine; the model is published as it is.
    config_path = model_dir / "config.json"
    model_config_json = json.loads(config_path.read_text(encoding="utf-8"))
    if "_name_or_path" in model_config_json:
        base = meta.get("base")  # the pipeline's {"source": public name}, or a name
        base = meta.get("base_model") or (base.get("source") if isinstance(base, Mapping) else base)
        model_config_json["_name_or_path"] = str(base or "")
        write_text_atomic(config_path, json.dumps(model_config_json, ensure_ascii=False, indent=2) + "\n")

    added = {
        "eos_token_id": generation.eos_token_id,
        "im_end_id": im_end_id,
        "weights": weights,
        "torch_dtype": model_config_json.get("torch_dtype"),
    }
    write_meta(model_dir, {**meta, **added})
    return added


def write_meta(model_dir: Path, meta: Mapping[str, object]) -> None:
    """Write training_meta.json atomically.

    Args:
        model_dir: the model directory.
        meta: JSON-serialisable facts about how the model was made.
    """
    tmp = model_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / META_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.convert_merge", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="XTuner config the checkpoint came from")
    parser.add_argument("--checkpoint", type=Path, required=True, help="iter_N.pth from xtuner.tools.train")
    parser.add_argument("--base", type=Path, required=True, help="model dir the adapter was trained on")
    parser.add_argument("--out", type=Path, required=True, help="merged model dir to create")
    parser.add_argument("--adapter-scale", type=float, default=1.0,
                        help="share of the trained change to merge, in (0, 1] (default 1: all of it)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a base that ships its own Python code (e.g. InternLM2.5) to run it")
    args = parser.parse_args(argv)
    for path in (args.config, args.checkpoint, args.base):
        if not path.exists():
            parser.error(f"not found: {path}")
    if not 0 < args.adapter_scale <= 1:
        parser.error(f"--adapter-scale must be in (0, 1], got {args.adapter_scale}")
    adapter = args.out.with_name(args.out.name + ".adapter")
    try:
        pth_to_hf(args.config, args.checkpoint, adapter, scale=args.adapter_scale)
        merge_model(args.base, adapter, args.out, {"base": args.base.name, "config": args.config.name,
                                                   "adapter_scale": args.adapter_scale},
                    trust_remote_code=args.trust_remote_code)
    except ConvertError as err:
        print(f"convert_merge: error: {err}", file=sys.stderr)
        return 1
    print(f"merged model: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
