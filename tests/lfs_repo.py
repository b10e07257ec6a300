# Helpers (not tests) shared by tests/infer_engine/test_model_source.py and tests/training/test_publish.py.
# Importable from any test module: pyproject.toml puts tests/ on pytest's pythonpath.
"""Real fixtures for model-repo tests: a tiny HF model (tiny-model contract), git + git-lfs repos over file://.

Everything here uses the real tools (transformers, tokenizers, git, git-lfs); nothing is faked. Git runs with
a fixed identity so the tests do not depend on the machine's global git config, and git-lfs is enabled per
repository (``git lfs install --local``) so no global ``git lfs install`` is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

GIT_IDENTITY = ["-c", "user.name=tests", "-c", "user.email=tests@example.invalid"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
LFS_ATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in ("*.safetensors", "*.bin"))


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git and return stdout; fail the test with git's stderr when it fails."""
    proc = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def build_tiny_model(dest: Path) -> Path:
    """Save a tiny LlamaForCausalLM and a locally trained byte-level BPE tokenizer to ``dest`` (< 1 MB)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Who are you? I am UbUb's assistant.", "你是谁？我是UbUb的小助手。"] * 20
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],  # Llama's generate() rejects token_type_ids
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=[2, 4], pad_token_id=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [2, 4]
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def make_bare_repo(path: Path) -> Path:
    """Create an empty bare repository whose HEAD is ``main`` (as hosting services do)."""
    git("init", "--quiet", "--bare", "--initial-branch=main", str(path))
    return path


def push_model_dir(model_dir: Path, remote: str, work: Path, upload_lfs_objects: bool = True) -> None:
    """Commit ``model_dir`` with LFS-tracked weights in a new repo at ``work`` and push it to ``remote`` main.

    With ``upload_lfs_objects=False`` the push skips git-lfs's pre-push hook, so the remote gets the pointer
    files but not the LFS objects (the broken state of a repo pushed without git-lfs).
    """
    shutil.copytree(model_dir, work)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("lfs", "install", "--local", cwd=work)
    (work / ".gitattributes").write_text(LFS_ATTRIBUTES)
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "add model", cwd=work)
    git("push", "--quiet", *([] if upload_lfs_objects else ["--no-verify"]), remote, "HEAD:refs/heads/main",
        cwd=work)


def push_plain_repo(work: Path, bare: Path) -> Path:
    """Commit the files in ``work`` (a new repo there; no LFS: weights as plain blobs, links as links) and
    push them to ``bare``'s main, ready to be served over dumb HTTP; returns ``bare``."""
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "model", cwd=work)
    git("push", "--quiet", bare.as_uri(), "HEAD:refs/heads/main", cwd=work)
    git("update-server-info", cwd=bare)
    return bare


def lfs_files(repo: Path) -> list[str]:
    """Paths that git-lfs manages in the checkout ``repo`` (``git lfs ls-files --name-only``)."""
    return git("lfs", "ls-files", "--name-only", cwd=repo).splitlines()
