# Publish a merged model directory, with a generated model card, to a git remote (weights through Git LFS;
# OpenXLab model repos are git) or to the Hugging Face Hub. Run from the repo root, in .venv-train or .venv:
#   python -m training.publish --model WORK/merged \
#       --target https://code.openxlab.org.cn/OWNER/REPO.git [--dry-run]
#   python -m training.publish --model WORK/merged --target hf:OWNER/REPO [--private] [--message MSG]
# Tokens only from the environment, never printed: OPENXLAB_GIT_USER + OPENXLAB_GIT_TOKEN (git, sent to
# https://code.openxlab.org.cn only), HF_TOKEN (hf:). A target URL with a token in it can come from
# $PUBLISH_TARGET instead of --target (no token in argv). Standard library only at import time;
# huggingface_hub is imported for hf: targets.
"""Publish a model dir to git (+LFS) or hf:OWNER/REPO with a generated README.md model card.

Model card inputs, all optional, looked up in the model dir and then in its parent (run.sh's work dir):

* ``training_meta.json``: a JSON object. ``name``, ``base_model`` (else ``base.source``, as
  training/pipeline.py writes it) and ``identity`` (strings) head the card, and ``reproduce`` (the run.sh
  command the pipeline recorded) follows them; every other key, and every entry of an optional ``settings``
  object, is a row of the settings table.
  Example: ``{"name": "UbUb", "base_model": "internlm/internlm2_5-1_8b-chat", "identity": "我是UbUb的小助手…",
  "recipe": "identity", "settings": {"lora_r": 64, "lr": 2e-4, "epochs": 3}}``.
* ``eval.md`` (training/evaluate.py's report): included as the evaluation section, headings one level down;
  the images it shows from its own folder (loss.png, eval.png by training/plots.py) are published beside it.

Git targets: a fresh temporary repository gets the model files (hard links), the card and a ``.gitattributes``
that sends ``*.safetensors *.bin *.model *.pth`` and any file over 10 MiB through LFS. If the remote ``main``
already has history, the new commit is built on top of it (the tree is replaced but for licence files; history
is kept); the push is never forced, so a concurrent change or a hook that refuses the push ends in a clear
error. The token reaches git only through a credential helper reading the environment
(model_source.git_credential_config): it is never in argv, in ``.git/config`` or in any output (nor is a token
given in the target URL).
Nothing local is published: absolute paths of this machine in training_meta.json and eval.md become paths
relative to the work dir, ``~/...`` or bare names, and credentials are redacted.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from infer_engine.markdown import markdown_text
from infer_engine.model_source import (
    GIT_TOKEN_ENV,
    GIT_USER_ENV,
    GitError,
    ModelSourceError,
    git_credential_env,
    has_git_lfs,
    parse_source,
    public_source,
    read_json_object,
    redact,
    remote_code_files,
    run_git,
    stop_as_interrupt,
    validate_model_dir,
)
from training.plots import linked_figures

log = logging.getLogger(__name__)

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.model", "*.pth")
LICENCE_FILE = re.compile(r"(?i)(licen[cs]e|copying|notice)([.-][\w.-]*)?")  # kept from the remote's tree
LFS_MIN_BYTES = 10 * 1024 * 1024  # bigger files go through LFS whatever their name (hosts reject big blobs)
META_FILE = "training_meta.json"
EVAL_FILE = "eval.md"
CARD_FILE = "README.md"
DEFAULT_MESSAGE = "Publish fine-tuned model"
TARGET_ENV = "PUBLISH_TARGET"  # where --target is read from when not given (keeps a URL token out of argv)
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# An absolute path of this machine (two or more parts), not part of a URL: what public_text shortens.
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])/(?:[^\s/`'\"|()<>\[\]]+/)+([^\s/`'\"|()<>\[\]]+)")
# Used only when git has no user.name / user.email configured (CI machines).
_FALLBACK_IDENTITY = {"user.name": "ubub-publish", "user.email": "publish@localhost"}


class PublishError(ValueError):
    """Publishing cannot go on; the message (redacted) says why."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True)
class Target:
    """Where to publish.

    Args:
        kind: "git" or "hf".
        location: the remote URL without credentials, or OWNER/REPO.
        credentials: (user, token) given in the URL; they reach git only through the credential helper.
    """

    kind: str
    location: str
    credentials: tuple[str, str] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"hf:{self.location}" if self.kind == "hf" else redact(self.location)


@dataclass(frozen=True)
class CardInfo:
    """What the model card says."""

    name: str  # identity / model name, the card's title
    base_model: str | None = None  # e.g. internlm/internlm2_5-1_8b-chat
    identity: str | None = None  # the self-introduction the model was taught
    settings: dict[str, object] = field(default_factory=dict)  # training settings table
    eval_md: str | None = None  # training/evaluate.py's eval.md
    figures: tuple[Path, ...] = ()  # images eval.md shows (loss.png, eval.png), published beside the card
    remote_code: tuple[str, ...] = ()  # Python files the model runs when loaded (auto_map)
    reproduce: str | None = None  # the run.sh command that trains it again, as the pipeline recorded it
    model_type: str | None = None  # config.json's model_type (internlm2, llama), a Hub tag
    gate_missed: str | None = None  # the publish gate's refusal, when it was published anyway


@dataclass(frozen=True)
class PlannedFile:
    """One model file to publish."""

    path: str  # relative to the model dir, POSIX separators
    size: int  # bytes
    lfs: bool  # stored through Git LFS on git targets
    source: Path | None = None  # read from here instead of the model dir (the card's figures)


def parse_target(target: str) -> Target:
    """Parse ``--target``: a git remote URL (or local ``*.git`` path) or ``hf:OWNER/REPO``.

    Args:
        target: the publish target as the user wrote it.
    """
    try:
        src = parse_source(target)
    except ModelSourceError as err:
        raise PublishError(f"bad target: {err}") from None
    local = src.location if src.kind == "local" else None
    if src.kind == "git" and src.location.startswith("file://"):
        local = unquote(urlsplit(src.location).path)
    if local is not None and (Path(local) / ".git").exists():  # git refuses to push to a checked-out branch
        raise PublishError(
            f"bad target {redact(target)!r}: a repository with a working tree, which cannot take a push to "
            "its checked-out branch; publish to a bare one (git init --bare --initial-branch=main PATH.git)")
    if src.kind == "hf" and src.revision is None:
        return Target("hf", src.location)
    if src.kind == "git" and src.revision is None:
        # git-lfs's pre-push cannot upload to a bare path ("missing protocol"); it can to the same as file://.
        is_path = src.location.startswith("/")
        return Target("git", Path(src.location).as_uri() if is_path else src.location, src.credentials)
    raise PublishError(
        f"bad target {redact(target)!r}: expected a git remote URL (OpenXLab: "
        "https://code.openxlab.org.cn/OWNER/REPO.git) or hf:OWNER/REPO, without @revision (it pushes to main)"
    )


def load_card_info(
    model_dir: Path,
    meta: Path | None = None,
    eval_md: Path | None = None,
    name: str | None = None,
    base_model: str | None = None,
    gate_missed: str | None = None,
) -> CardInfo:
    """Collect the model card's content from training_meta.json, eval.md and explicit overrides.

    Args:
        model_dir: the model being published; meta/eval files are looked up in it, then in its parent.
        meta: training_meta.json to use instead of the lookup.
        eval_md: eval.md to use instead of the lookup.
        name: model name; overrides the meta file (fallback: the model dir's name).
        base_model: base model id; overrides the meta file.
        gate_missed: why the publish gate refused the model, when it is published anyway (said on the card).
    """
    meta_path = meta or _find_beside(model_dir, META_FILE)
    eval_path = eval_md or _find_beside(model_dir, EVAL_FILE)
    data: dict[str, object] = {}
    if meta_path is not None:
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PublishError(f"cannot read {meta_path}: {err}") from None
        if not isinstance(data, dict):
            raise PublishError(f"{meta_path} must hold a JSON object, got {type(data).__name__}")
    heads = {key: data.pop(key, None) for key in ("name", "base_model", "identity", "reproduce")}
    for key, value in heads.items():
        if value is not None and not isinstance(value, str):
            raise PublishError(f"{meta_path}: {key!r} must be a string, got {value!r}")
    base = data.get("base")
    # The pipeline records its base's source made public already ("local directory x", "built by ..."), which
    # public_source would take for a path; an older or hand-written file may hold a token or a path.
    recorded = base.get("source") if isinstance(base, dict) and isinstance(base.get("source"), str) else None
    if recorded and ("://" in recorded or recorded.startswith(("hf:", "openxlab:"))):
        recorded = public_source(recorded)  # a URL without its credentials
    folder = model_dir.resolve().parent
    named = (heads["name"],) if heads["name"] else ()
    recorded = public_text(recorded, folder) if recorded else None
    nested = data.pop("settings", {})
    if not isinstance(nested, dict):
        raise PublishError(f"{meta_path}: 'settings' must be a JSON object")
    if eval_path is not None and not eval_path.is_file():
        raise PublishError(f"eval report not found: {eval_path}")
    given = base_model or heads["base_model"]
    if given is not None and not _HUB_REPO_ID.fullmatch(given):
        given = public_source(given)
    return CardInfo(
        name=name or heads["name"] or model_dir.resolve().name,
        base_model=recorded if given is None else given,
        identity=heads["identity"],
        settings=public_json({**data, **nested}, folder, named),
        eval_md=public_text(eval_path.read_text(encoding="utf-8"), folder, named) if eval_path else None,
        figures=tuple(linked_figures(eval_path)) if eval_path else (),
        remote_code=tuple(remote_code_files(model_dir)),
        reproduce=public_text(heads["reproduce"], folder, named) if heads["reproduce"] else None,
        model_type=_model_type(model_dir),
        gate_missed=gate_missed,
    )


def _model_type(model_dir: Path) -> str | None:
    value = read_json_object(model_dir / "config.json").get("model_type")
    return value if isinstance(value, str) and re.fullmatch(r"[a-z0-9_-]{1,40}", value) else None


def public_text(text: str, work_dir: Path, keep: tuple[str, ...] = ()) -> str:
    """``text`` as it may be published: credentials redacted, and absolute paths of this machine shortened
    (inside ``work_dir``: relative to it; other paths: their last part).

    Args:
        text: e.g. eval.md, or a value of training_meta.json.
        work_dir: the run's work dir (run.sh's; for a model dir, its parent).
        keep: text that is data, not a path, left whole where it appears as it is or quoted for a shell (the
            assistant's name: "Ann /opt/x" is a name).
    """
    text = redact(text.replace(str(work_dir.resolve()) + "/", ""))
    spans = sorted({form for k in keep if k for form in (k, shlex.quote(k))}, key=len, reverse=True)
    if not spans:
        return _ABS_PATH.sub(lambda m: m[1], text)
    pieces = re.split(f"({'|'.join(map(re.escape, spans))})", text)  # odd pieces are the kept ones
    return "".join(p if i % 2 else _ABS_PATH.sub(lambda m: m[1], p) for i, p in enumerate(pieces))


def public_json(value: object, work_dir: Path, keep: tuple[str, ...] = ()) -> object:
    """A JSON value with public_text applied to every string in it.

    Args:
        value: parsed JSON (training_meta.json).
        work_dir: the run's work dir.
        keep: as for public_text.
    """
    if isinstance(value, str):
        return public_text(value, work_dir, keep)
    if isinstance(value, list):
        return [public_json(v, work_dir, keep) for v in value]
    if isinstance(value, dict):
        return {k: public_json(v, work_dir, keep) for k, v in value.items()}
    return value


def render_model_card(info: CardInfo) -> str:
    """README.md text: Hub metadata front matter, identity, settings table, evaluation, usage.

    Args:
        info: the card content.
    """
    front = ["---"]
    if info.base_model and _HUB_REPO_ID.fullmatch(info.base_model):  # the Hub rejects a base_model not an id
        front.append(f"base_model: {info.base_model}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "language: [zh, en]",
              f"tags: [xtuner, {info.model_type + ', ' if info.model_type else ''}lora, identity]", "---", ""]
    name = markdown_text(info.name)  # as typed: no markup or HTML made of a name
    body = [f"# {name}", ""]
    if info.gate_missed:
        body += [f"> **Below the training project's publish gate** ({info.gate_missed}); published anyway "
                 "(`--publish-anyway`). Read the evaluation before using it.", ""]
    if info.identity:
        body += [f"> {markdown_text(info.identity)}", ""]
    base = f"`{info.base_model}`" if info.base_model else "its base model"
    body += [f"Fine-tuned from {base} with XTuner (LoRA/QLoRA) to take the identity **{name}**, "
             "then merged into a full Hugging Face model.", ""]
    if info.reproduce:  # an indented code block: nothing in a shell-quoted name can end it
        body += ["To train it again, run this from the root of the project that made it:", "",
                 f"    {info.reproduce}", ""]
    if info.settings:
        body += ["## Training settings", "", "| setting | value |", "|---|---|"]
        body += [f"| {_cell(k)} | {_cell(v)} |" for k, v in info.settings.items()]
        body.append("")
    if info.eval_md:
        lines = info.eval_md.strip().splitlines()
        if not lines[0].startswith("#"):
            body += ["## Evaluation", ""]
        body += [f"#{ln}" if ln.startswith("#") else ln for ln in lines] + [""]
    trust = ", trust_remote_code=True" if info.remote_code else ""
    body += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'PATH = "path/to/this/model"  # a local clone, or the Hub repo id']
    if info.remote_code:
        body.append(f"# trust_remote_code runs this repo's {', '.join(info.remote_code)}: read them first")
    body += [
        f"tok = AutoTokenizer.from_pretrained(PATH{trust})",
        f"model = AutoModelForCausalLM.from_pretrained(PATH{trust})",
        'messages = [{"role": "user", "content": "Who are you?"}]',
        "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
        '                              return_tensors="pt")',
        "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0], skip_special_tokens=True))",
        "```", "",
    ]
    return "\n".join(front + body)


def plan_files(model_dir: Path) -> list[PlannedFile]:
    """The model files to publish: all but hidden paths and an existing README.md (the card replaces it).

    Args:
        model_dir: a validated model directory.
    """
    planned = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts) or rel.as_posix() == CARD_FILE:
            continue
        size = path.stat().st_size
        lfs = size >= LFS_MIN_BYTES or any(fnmatch.fnmatch(path.name, pat) for pat in LFS_PATTERNS)
        planned.append(PlannedFile(rel.as_posix(), size, lfs))
    return planned


def describe_plan(target: Target, files: list[PlannedFile], card: str) -> str:
    """Dry-run report: the target (credentials redacted) and every file with its size and storage.

    Args:
        target: where it would go.
        files: the planned model files.
        card: the generated model card.
    """
    if target.kind == "git":
        creds = f"{GIT_USER_ENV}/{GIT_TOKEN_ENV} " + ("set" if os.environ.get(GIT_TOKEN_ENV) else "not set")
        creds = "credentials from the URL" if target.credentials else creds
        head = f"target: git {target} (branch main, never forced; {creds})"
    else:
        head = f"target: {target} (huggingface_hub upload_folder; HF_TOKEN " + (
            "set)" if os.environ.get("HF_TOKEN") else "not set)")
    total = sum(f.size for f in files) + len(card.encode())
    lines = ["DRY RUN: nothing is pushed.", head, f"files ({len(files) + 1}, {_size(total)}):"]
    store = (lambda f: "LFS" if f.lfs else "git") if target.kind == "git" else (lambda f: "hub")
    lines += [f"  {store(f):<4}{_size(f.size):>10}  {f.path}" for f in files]
    card_store = store(PlannedFile(CARD_FILE, 0, False))
    lines.append(f"  {card_store:<4}{_size(len(card.encode())):>10}  {CARD_FILE} (generated model card)")
    if target.kind == "git":
        lines.append(f"  {'git':<4}{'':>10}  .gitattributes (generated: LFS patterns)")
    return "\n".join(lines)


def push_git(
    model_dir: Path,
    url: str,
    files: list[PlannedFile],
    card: str,
    message: str,
    credentials: tuple[str, str] | None = None,
    scratch: Path | None = None,
) -> tuple[str, list[str]]:
    """Commit the model (LFS weights) on top of the remote's ``main`` and push it; return the commit id and
    the remote's files the commit removed (the model's files replace the remote's, but for a licence).

    Args:
        model_dir: the validated model directory.
        url: the git remote (https URL without credentials, ssh, file:// or a local bare repo path).
        files: from plan_files(model_dir).
        card: README.md content.
        message: commit message.
        credentials: (user, token) given in the target URL; None: from the environment.
        scratch: where the commit is staged (see ``publish``); None: the system's temp dir.
    """
    if not has_git_lfs():
        raise PublishError("git-lfs is not installed (weights must go through LFS): apt-get install git-lfs")
    git_credential_env(url, credentials)  # fails early on a token without a user name
    with _scratch_dir(scratch) as tmp:
        work = Path(tmp)
        run_git(["init", "--quiet", "--initial-branch=main"], cwd=work)
        run_git(["lfs", "install", "--local"], cwd=work)  # LFS filters + the pre-push hook uploading objects
        base = _remote_main(work, url, credentials)
        if base:
            # The index stays empty, so the commit's tree is exactly our files.
            run_git(["update-ref", "refs/heads/main", base], cwd=work)
        _stage(model_dir, files, card, work)
        attributes = [f"{pat} filter=lfs diff=lfs merge=lfs -text" for pat in LFS_PATTERNS]
        attributes += [f"/{_exact_pattern(f.path)} filter=lfs diff=lfs merge=lfs -text" for f in files
                       if f.lfs and not any(fnmatch.fnmatch(Path(f.path).name, p) for p in LFS_PATTERNS)]
        (work / ".gitattributes").write_text("\n".join(attributes) + "\n")
        removed = _keep_licence_files(work, base) if base else []
        run_git(["add", "--all"], cwd=work)
        if base and not run_git(["status", "--porcelain"], cwd=work).stdout.strip():
            log.info("remote main already has exactly these files; nothing to push but LFS objects it lacks")
            # A commit already there is not pushed again, so its pre-push hook cannot restore lost objects.
            listed = run_git(["lfs", "ls-files", "--long"], cwd=work).stdout
            oids = [line.split()[0] for line in listed.splitlines()]
            if oids:
                run_git(["lfs", "push", "--object-id", "--", url, *oids], cwd=work, remote=url,
                        credentials=credentials)
            return base, []
        run_git(["commit", "--quiet", "-m", message], cwd=work, config=_identity_config())
        log.info("pushing to %s (LFS objects first; large weights take a while)", redact(url))
        try:
            run_git(["push", "--quiet", "--", url, "HEAD:refs/heads/main"], cwd=work, remote=url,
                    credentials=credentials)
        except GitError as err:
            moved = ("fetch first", "non-fast-forward", "cannot lock")  # what losing a race looks like
            raced = any(s in err.stderr for s in moved)
            hint = "; the remote changed meanwhile: publish again" if raced else ""
            raise PublishError(f"push to {url} failed (nothing was forced{hint}): {err}") from None
        return run_git(["rev-parse", "HEAD"], cwd=work).stdout.strip(), removed


def push_hf(
    model_dir: Path, repo_id: str, files: list[PlannedFile], card: str, message: str, private: bool,
    scratch: Path | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the model plus card; return the commit URL.

    Args:
        model_dir: the validated model directory.
        repo_id: OWNER/REPO on the Hub.
        files: from plan_files(model_dir).
        card: README.md content.
        message: commit message.
        private: create the repo private (an existing repo keeps its visibility).
        scratch: where the upload is staged (see ``publish``); None: the system's temp dir.
    """
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError("hf: targets need a write token in the HF_TOKEN environment variable")
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise PublishError(f"hf: targets need huggingface_hub ({err}): pip install huggingface_hub") from None
    with _scratch_dir(scratch) as tmp:
        _stage(model_dir, files, card, Path(tmp))
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private or None, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=message)
        except Exception as err:  # hub boundary: HTTP errors, offline mode, auth
            first = str(err).splitlines()[0] if str(err) else ""
            raise PublishError(f"upload to hf:{repo_id} failed: {type(err).__name__}: {first}") from None
    return str(getattr(commit, "commit_url", commit))


def publish(
    model_dir: Path,
    target: str,
    message: str = DEFAULT_MESSAGE,
    dry_run: bool = False,
    eval_md: Path | None = None,
    meta: Path | None = None,
    name: str | None = None,
    base_model: str | None = None,
    private: bool = False,
    gate_missed: str | None = None,
    scratch: Path | None = None,
) -> str:
    """Validate, build the card, then push (or only describe, with ``dry_run``); return what to tell the user:
    the result on the last line, warnings and notes before it.

    Args:
        model_dir: the merged HF model directory (e.g. WORK/merged).
        target: git remote URL or hf:OWNER/REPO.
        message: commit message.
        dry_run: only list what would be pushed; no network, nothing written.
        eval_md: eval report to include (default: eval.md in or beside model_dir).
        meta: training_meta.json (default: in or beside model_dir).
        name: model name for the card (overrides the meta file).
        base_model: base model id for the card (overrides the meta file).
        private: hf: only, create the repo private.
        gate_missed: why the publish gate refused the model, when it is published anyway (said on the card).
        scratch: directory the commit is staged in (made if missing; None: the system's temp dir). On the
            model's filesystem the weights are hard-linked, not copied: a /tmp in memory (tmpfs) would hold
            a copy of a multi-GB model, and git-lfs's copy besides.
    """
    dest = parse_target(target)
    try:
        model = validate_model_dir(model_dir)
    except ModelSourceError as err:
        raise PublishError(f"refusing to publish: {err}") from None
    info = load_card_info(model, meta, eval_md, name, base_model, gate_missed)
    card = render_model_card(info)
    files = plan_files(model)
    taken = {f.path for f in files}  # a model file of the same name wins over a figure
    files += [PlannedFile(p.name, p.stat().st_size, False, p) for p in info.figures if p.name not in taken]
    if dry_run:
        return describe_plan(dest, files, card)
    if dest.kind == "hf":
        url = push_hf(model, dest.location, files, card, message, private, scratch)
        return f"published to {dest}: {url}"
    if private:
        log.warning("--private only applies to hf: targets; set an OpenXLab repo's visibility on its website")
    commit, removed = push_git(model, dest.location, files, card, message, dest.credentials, scratch)
    note = _default_branch_note(dest)
    if removed:  # the remote's own files are gone from main: said where the user looks, not only in a log
        note += (f"note: the model's files replace the remote's; this commit removes {', '.join(removed)} "
                 "(still in the repo's history)\n")
    return f"{note}published to {dest}: commit {commit}"


def _scratch_dir(scratch: Path | None) -> tempfile.TemporaryDirectory[str]:
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="publish-", dir=scratch)


def _find_beside(model_dir: Path, filename: str) -> Path | None:
    for folder in (model_dir, model_dir.resolve().parent):
        if (folder / filename).is_file():
            return folder / filename
    return None


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _stage(model_dir: Path, files: list[PlannedFile], card: str, dest: Path) -> None:
    # Hard links: a multi-GB model is not copied (git and the hub only read these files).
    for f in files:
        (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
        source = f.source or model_dir / f.path
        if f.path == META_FILE:  # published without this machine's paths or any credential
            meta = json.loads(source.read_text(encoding="utf-8"))
            named = (meta["name"],) if isinstance(meta.get("name"), str) else ()
            meta = public_json(meta, model_dir.resolve().parent, named)
            text = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
            (dest / f.path).write_text(text, encoding="utf-8")
            continue
        try:
            os.link(source, dest / f.path)
        except OSError:  # another filesystem
            shutil.copy2(source, dest / f.path)
    (dest / CARD_FILE).write_text(card, encoding="utf-8")


def _keep_licence_files(work: Path, base: str) -> list[str]:
    # The new tree replaces the remote's, except for a licence its owner added (LICENSE, COPYING, NOTICE...):
    # the model brings none, and losing one would change the terms the repo is shared under.
    names = run_git(["ls-tree", "-z", "--name-only", base], cwd=work).stdout.split("\0")
    kept = [name for name in names if LICENCE_FILE.fullmatch(name) and not (work / name).exists()]
    if kept:
        run_git(["checkout", base, "--", *kept], cwd=work)
        log.info("kept the remote's %s", ", ".join(kept))
    return [name for name in names if name and not (work / name).exists()]


def _remote_main(work: Path, url: str, credentials: tuple[str, str] | None) -> str | None:
    try:
        run_git(["fetch", "--quiet", "--depth", "1", "--", url, "refs/heads/main"], cwd=work, remote=url,
                credentials=credentials)
    except GitError as err:
        if "couldn't find remote ref" in err.stderr.lower():
            return None  # empty remote, or one without main yet
        raise PublishError(f"cannot read the remote {url}: {err}") from None
    return run_git(["rev-parse", "FETCH_HEAD"], cwd=work).stdout.strip()


def _default_branch_note(dest: Target) -> str:
    # A clone checks out the branch the remote's HEAD names: say so when that is not the main just pushed.
    # Asked after the push: a failure here is said, and the publish stands.
    url = dest.location
    try:
        heads = run_git(["ls-remote", "--symref", "--", url, "HEAD"], remote=url,
                        credentials=dest.credentials).stdout
    except GitError as err:
        log.warning("pushed; could not read the remote's default branch: %s", err)
        return ""
    named = re.match(r"ref: refs/heads/(\S+)\tHEAD\n[0-9a-f]+\tHEAD", heads)
    pin = f"serve {dest}@main, or " if "://" in url else ""  # scp-like addresses take no @REVISION
    if named and named[1] != "main":
        return (f"warning: the remote's default branch is {named[1]}, so a plain clone (and app.py) gets "
                f"{named[1]}, not this model: {pin}make main the default branch\n")
    if not heads.strip():  # HEAD names a branch with no commits: `git init --bare`'s master
        return ("note: the remote's HEAD names a branch without commits (a new bare repo's master), so a "
                "plain git clone checks out nothing: clone with -b main, or make main the default branch (in "
                "the bare repo: git symbolic-ref HEAD refs/heads/main); app.py finds main by itself\n")
    return ""


def _exact_pattern(path: str) -> str:
    # A .gitattributes pattern matching only `path`: glob characters escaped, and whitespace (which ends the
    # pattern) written as git-lfs track writes it.
    return re.sub(r"\s", "[[:space:]]", re.sub(r"([\\*?\[])", r"\\\1", path))


def _identity_config() -> dict[str, str]:
    configured = all(run_git(["config", "--default", "", "--get", key]).stdout.strip()
                     for key in _FALLBACK_IDENTITY)
    return {} if configured else _FALLBACK_IDENTITY


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the header)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="merged HF model directory")
    parser.add_argument("--target", default=os.environ.get(TARGET_ENV),
                        help=f"git remote URL or hf:OWNER/REPO (default: ${TARGET_ENV})")
    parser.add_argument("--dry-run", action="store_true", help="list what would be pushed; touch nothing")
    parser.add_argument("--message", default=DEFAULT_MESSAGE, help="commit message")
    parser.add_argument("--eval-md", type=Path, default=None, help=f"report (default: {EVAL_FILE} beside)")
    parser.add_argument("--meta", type=Path, default=None, help=f"{META_FILE} (default: beside the model)")
    parser.add_argument("--name", default=None, help="model name for the card (default: from the meta file)")
    parser.add_argument("--base-model", default=None, help="base model id for the card")
    parser.add_argument("--private", action="store_true", help="hf: only, create the repo private")
    parser.add_argument("--gate-missed", default=None,
                        help="why the publish gate refused the model (the card says it was published anyway)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="directory to stage the commit in (default: the system's temp dir); on the "
                        "model's filesystem the weights are hard-linked, not copied")
    args = parser.parse_args(argv)
    if not args.target:
        parser.error(f"give --target or set {TARGET_ENV}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    with stop_as_interrupt() as stopped:  # a stopped push stops git and git-lfs with it
        try:
            print(publish(args.model, args.target, args.message, args.dry_run, args.eval_md, args.meta,
                          args.name, args.base_model, args.private, args.gate_missed, args.scratch))
        except (PublishError, ModelSourceError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: stopped; the remote's main is as it was unless the push had ended", file=sys.stderr)
            return 128 + stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
