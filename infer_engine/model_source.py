# Resolve a model source to a validated local Hugging Face model directory, fetched into a cache on first use.
#   python -m infer_engine.model_source [SOURCE] [--cache-dir DIR] [--refresh]    # prints the local directory
# SOURCE (default: $MODEL_SOURCE; empty -> the embedded demo model):
#   a local directory | a git URL (https://, http://, ssh://, git@host:path, file://, /path/repo.git) |
#   openxlab:OWNER/REPO (openxlab SDK) | hf:OWNER/REPO[@REVISION] (huggingface_hub) |
#   demo:tuned | demo:base (SmolLM2 with / without the committed demo adapter, built once: smol_demo.py).
# Standard library only at import time: the training env (transformers 4.48, huggingface-hub 0.36) reuses this
# module for `training/run.sh --base SOURCE`, so huggingface_hub / openxlab are imported by the fetchers only.
"""Model source: local dir, git (+ LFS), openxlab:, hf: -> one validated local model directory.

Fetched models live under one cache dir (``$MODEL_CACHE_DIR`` or ``~/.cache/ubub-models``), one subdirectory
per source. A cached model is reused without any network call. Downloads go to a hidden ``.KEY.partial``
directory beside the target and are renamed into place only after validation, so an interrupted download never
leaves a directory that looks complete; a leftover partial directory is removed on the next try. Network
failures are retried with exponential backoff. Git LFS pointer stubs in place of weights are reported,
never returned.

Sources are data, never options: a leading ``-``, remote-helper transports (``ext::``, ``fd::``) and URL
schemes other than https, http, ssh, git and file are refused, git gets ``--`` before every positional and
``GIT_ALLOW_PROTOCOL``, and a fetched or local model whose files link outside its directory is refused.
Credentials (``HF_TOKEN``, ``OPENXLAB_GIT_TOKEN``, ``user:token@`` in URLs) never leave the process but to
their own host (``OPENXLAB_GIT_TOKEN``: https://code.openxlab.org.cn only): a URL's credentials are split off
when it is parsed and reach git only through a credential helper reading the environment; ``redact`` scrubs
every message. A model that ships its own Python code (``auto_map``) is loaded only when the operator allows
it (``check_remote_code``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
CACHE_DIR_ENV = "MODEL_CACHE_DIR"
GIT_USER_ENV = "OPENXLAB_GIT_USER"
GIT_TOKEN_ENV = "OPENXLAB_GIT_TOKEN"
OPENXLAB_GIT_HOST = "code.openxlab.org.cn"  # the only host $OPENXLAB_GIT_TOKEN is ever sent to, over https
# Values of these variables are scrubbed from every message we produce.
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", GIT_TOKEN_ENV, "OPENXLAB_AK", "OPENXLAB_SK")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
LFS_POINTER_PREFIXES = (b"version https://git-lfs.github.com/spec/", b"version https://hawser.github.com/spec/")
LFS_POINTER_MAX_BYTES = 1024  # the LFS spec caps pointer files at 1024 bytes
SOURCE_INFO_FILE = ".model_source.json"  # provenance written into each cached model dir
GIT_SCHEMES = ("https", "http", "ssh", "git", "file")  # the only transports git may use (GIT_ALLOW_PROTOCOL)
# Config files whose ``auto_map`` names Python modules that transformers imports with trust_remote_code=True.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                       "preprocessor_config.json")
# Where git's credential helper reads the user name and token (set only in git's own environment).
_HELPER_USER, _HELPER_TOKEN = "UBUB_GIT_HELPER_USER", "UBUB_GIT_HELPER_TOKEN"
# git-lfs's filter config, passed per command: without it (`git lfs install` never run on the machine)
# `git lfs pull` downloads nothing and only warns "Git LFS is not installed for this repository".
LFS_FILTER_CONFIG = {
    "filter.lfs.process": "git-lfs filter-process", "filter.lfs.smudge": "git-lfs smudge -- %f",
    "filter.lfs.clean": "git-lfs clean -- %f", "filter.lfs.required": "true",
}
OPENXLAB_INSTALL = (
    "pip install --no-deps openxlab==0.1.3 && pip install oss2 requests pytz filelock pyyaml tqdm rich "
    "(its own pins downgrade setuptools/requests), or use the git route: https://code.openxlab.org.cn/OWNER/REPO.git"
)

SourceKind = Literal["local", "git", "openxlab", "hf", "demo"]
DEMO_KINDS = ("tuned", "base")  # demo:tuned (base + committed adapter) and demo:base, built by smol_demo.py
# Hub repo ids: OWNER/REPO, each part starting with a letter or digit, no "--" or ".." (the Hub's own rule).
_REPO_ID = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w./-]{0,199}")
_SCHEME = re.compile(r"([A-Za-z][\w+.-]*)://")
_HELPER_TRANSPORT = re.compile(r"[A-Za-z][\w+.-]*::")  # git's <transport>::<address> (ext::, fd::, ...)
_HOST = re.compile(r"[A-Za-z0-9][\w.-]*|\[[0-9A-Fa-f:.]+\]")
_SCP_LIKE = re.compile(r"([^\s/@:]+(?::[^\s/]*)?)@([A-Za-z0-9][\w.-]*):(?!//)(\S+)")  # user@host:path
# Redaction: the userinfo of a URL (greedy to the last "@", so "u:p@ss@host" and "u:p/ss@host" go whole);
# a URL's whole query and fragment; the userinfo of an scp-like address; every other "?key=value" or
# "&key=value" value; Hugging Face tokens.
_REDACT = (
    (re.compile(r"(?<=://)(?:(?!\.git@)[^\s'\"<>])*@"), "***@"),  # not into a pinned "REPO.git@REVISION"
    (re.compile(r"(://[^\s'\"<>?#]*)[?#][^\s'\"<>]*"), r"\1?***"),
    (re.compile(r"(?<![^\s'\"(<=,;])[^\s/'\"]+@(?=[A-Za-z0-9][\w.-]*:(?!//|\d+\b))"), "***@"),
    (re.compile(r"(?<=[?&#;])([^\s=&#;'\"]+)=[^\s&#;'\"]*"), r"\1=***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "***"),
)
_SEEN_SECRETS: set[str] = set()  # credentials split off URLs in this process: scrubbed wherever they show up
# stderr fragments of git / git-lfs failures that a later attempt may not hit (network, server hiccups).
_TRANSIENT_GIT = (
    "could not resolve host", "failed to connect", "timed out", "connection reset", "connection refused",
    "early eof", "rpc failed", "hung up unexpectedly", "temporary failure", "returned error: 5", "http 5",
)
# ... unless one of these says that trying again cannot help.
_PERMANENT_GIT = (
    "filter lfs failed", "not a git repository", "does not appear to be a git repository", "not found",
    "authentication failed", "could not read username", "returned error: 4", "permission denied",
)


def redact(text: str) -> str:
    """Return ``text`` with every credential replaced by ``***``: the user info of URLs (``https://u:p@host``,
    ``ssh://user@host``, scp-like ``user@host:path``, percent-encoded or not), query and fragment parameter
    values (``?token=...``, ``&access_token=...``), Hugging Face tokens, the values of the secret env vars
    and every credential split off a URL by ``parse_source`` in this process.

    Args:
        text: any message that may contain a URL or a token.
    """
    for pattern, replacement in _REDACT:
        text = pattern.sub(replacement, text)
    env_secrets = [os.environ.get(name, "") for name in SECRET_ENVS]
    for value in env_secrets + sorted(_SEEN_SECRETS, key=len, reverse=True):
        if len(value) >= 4:  # (shorter ones would scrub ordinary words)
            text = text.replace(value, "***")
    return text


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message (always redacted) tells the user what to do."""

    transient = False  # True when a later attempt may succeed (network); the retry loop looks at it

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class NetworkError(ModelSourceError):
    """A fetch failed in a way worth retrying (connection, timeout, server error)."""

    transient = True


class LfsPointerError(ModelSourceError):
    """Git LFS pointer stubs were found where file contents (weights) should be."""

    def __init__(self, where: str, pointers: list[str], hint: str) -> None:
        self.pointers = pointers
        shown = ", ".join(pointers[:8]) + (f" (+{len(pointers) - 8} more)" if len(pointers) > 8 else "")
        super().__init__(
            f"{where}: {len(pointers)} file(s) are Git LFS pointer stubs, not the real content: {shown}. "
            + hint
        )


class GitError(ModelSourceError):
    """A git command failed; ``transient`` is guessed from its stderr."""

    def __init__(self, command: str, stderr: str) -> None:
        self.stderr = redact(stderr)
        text = stderr.lower()
        self.transient = any(s in text for s in _TRANSIENT_GIT) and not any(s in text for s in _PERMANENT_GIT)
        lines = [ln for ln in self.stderr.splitlines() if ln.strip() and "%" not in ln]  # drop progress lines
        super().__init__(f"git {command} failed: " + (" | ".join(lines[-4:]) or "no error output"))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently network fetches are retried."""

    attempts: int = 4  # total tries, >= 1
    base_delay: float = 2.0  # seconds before the 2nd try; doubled for each further try
    max_delay: float = 60.0  # cap for one wait

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid RetryPolicy {self}: need attempts >= 1 and non-negative delays")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return min(self.base_delay * 2 ** (attempt - 1), self.max_delay)


@dataclass(frozen=True, repr=False)
class ModelSource:
    """A parsed model source; ``str()`` and ``repr()`` show it with credentials redacted.

    Args:
        kind: "local", "git", "openxlab", "hf" or "demo".
        location: absolute directory path, git URL (an http(s) URL without its credentials), OWNER/REPO, or
            one of DEMO_KINDS.
        revision: the commit, tag or branch of hf:OWNER/REPO@REVISION or a git URL@REVISION.
        credentials: (user, token) split off an http(s) URL; they reach git through the credential helper.
    """

    kind: SourceKind
    location: str
    revision: str | None = None
    credentials: tuple[str, str] | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"ModelSource({self.kind!r}, {str(self)!r})"

    def __str__(self) -> str:
        if self.kind == "local":
            return redact(self.location)
        if self.kind == "git":
            return redact(self.location) + (f"@{self.revision}" if self.revision else "")
        return f"{self.kind}:{self.location}" + (f"@{self.revision}" if self.revision else "")

    @property
    def local_name(self) -> str | None:
        """A directory's or git repository's on this machine (a path, ``file://``): its last part (and
        ``@REVISION``); None for a source elsewhere."""
        if self.kind != "local" and not (self.kind == "git" and self.location.startswith(("/", "file://"))):
            return None
        return Path(self.location.rstrip("/")).name + (f"@{self.revision}" if self.revision else "")

    @property
    def public(self) -> str:
        """How it may be shown to others (a page, a record, a model card): ``str()``, but a source on this
        machine by its ``local_name`` only: a path of the machine tells who and where its owner is."""
        if self.local_name is None:
            return str(self)
        return f"{'local directory' if self.kind == 'local' else 'local git repository'} {self.local_name}"

    @property
    def cache_key(self) -> str:
        """Directory name in the cache: a readable slug plus a hash of the credential-free source."""
        bare = re.sub(r"^([a-z]+://)?[^@/]*@", r"\1", self.location)  # an ssh login name (no secret is left)
        ident = f"{self.kind}|{bare}|{self.revision or ''}"
        tail = re.sub(r"^[a-z]+://", "", bare).removesuffix(".git")
        slug = re.sub(r"[^A-Za-z0-9._]+", "-", tail + (f"-{self.revision}" if self.revision else ""))
        slug = slug[-48:].strip("-.") or "model"
        return f"{self.kind}-{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def public_source(source: str) -> str:
    """How a model source may be stored, logged or published: ``ModelSource.public`` (no credentials, no path
    of this machine).

    Args:
        source: a model source as the user gave it (parsed with ``parse_source``; an invalid one is redacted).
    """
    try:
        src = parse_source(source)
    except ModelSourceError:
        return redact(source)
    return src.public


def _reject(text: str, why: str) -> ModelSourceError:
    return ModelSourceError(f"bad model source {text!r}: {why}")


def _parse_url(text: str, scheme: str) -> ModelSource:
    """A scheme://... git URL, checked part by part; http(s) credentials are split off."""
    if scheme not in GIT_SCHEMES:
        raise _reject(text, f"unsupported URL scheme {scheme!r}: use one of "
                      + ", ".join(f"{s}://" for s in GIT_SCHEMES))
    if re.search(r"\s", text):
        raise _reject(text, "URLs must not contain spaces")
    parts = urlsplit(text)
    pinned = re.fullmatch(r"(.*\.git)@([^@]*)", parts.path)  # REPO.git@REVISION: a commit id, tag or branch
    if pinned:
        if not _REVISION.fullmatch(pinned[2]):
            raise _reject(text, "expected URL.git@REVISION, the revision a commit id, tag or branch")
        try:
            return replace(_parse_url(urlunsplit(parts._replace(path=pinned[1])), scheme), revision=pinned[2])
        except ModelSourceError:
            raise _reject(text, "not a valid git URL") from None  # said with the whole text, redacted
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise _reject(text, "a git URL takes no query or fragment (?.../#...); give a token through "
                      f"{GIT_USER_ENV}/{GIT_TOKEN_ENV} instead")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if scheme != "file" or hostport:
        host = hostport.rsplit(":", 1)[0] if not hostport.endswith("]") else hostport
        port = hostport[len(host) + 1:]
        if not _HOST.fullmatch(host) or (port and not port.isdigit()):
            raise _reject(text, "the host name is not valid")
    if not userinfo:
        return ModelSource("git", text)
    user, has_token, token = userinfo.partition(":")
    if scheme in ("http", "https"):
        credentials = (unquote(user), unquote(token))
        # a lone user name may be a token (https://TOKEN@github.com/...)
        secret = (token, credentials[1]) if has_token else (user, credentials[0])
        _SEEN_SECRETS.update(value for value in secret if len(value) >= 6)
        return ModelSource("git", urlunsplit(parts._replace(netloc=hostport)), credentials=credentials)
    if scheme == "ssh" and not has_token:
        return ModelSource("git", text)  # the login name; ssh authenticates with keys
    raise _reject(text, f"{scheme}:// URLs cannot carry a password or token")


def parse_source(source: str) -> ModelSource:
    """Parse a model source string; raise ModelSourceError on a malformed or unsafe one.

    Sources are data, never options or commands: no leading ``-``, no control characters, no remote-helper
    transports (``ext::``, ``fd::``), URL schemes only from ``GIT_SCHEMES``.

    Args:
        source: a local dir, a git URL or ``*.git`` path, ``openxlab:OWNER/REPO``, ``hf:OWNER/REPO[@REV]``,
            ``demo:tuned`` or ``demo:base``.
    """
    text = source.strip()
    if not text:
        raise ModelSourceError("empty model source")
    if text.startswith("-"):
        raise _reject(text, "it must not start with '-' (it would be read as an option)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise _reject(text, "it contains control characters")
    if text.startswith("hf:"):
        repo, sep, revision = text[3:].partition("@")
        if not _REPO_ID.fullmatch(repo) or (sep and not _REVISION.fullmatch(revision)):
            raise ModelSourceError(f"bad source {text!r}: expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
        return ModelSource("hf", repo, revision or None)
    if text.startswith("openxlab:"):
        repo = text.removeprefix("openxlab:")
        if not _REPO_ID.fullmatch(repo):
            raise ModelSourceError(f"bad source {text!r}: expected openxlab:OWNER/REPO")
        return ModelSource("openxlab", repo)
    if text.startswith("demo:"):
        kind = text.removeprefix("demo:")
        if kind not in DEMO_KINDS:
            expected = " or ".join(f"demo:{k}" for k in DEMO_KINDS)
            raise ModelSourceError(f"bad source {text!r}: expected {expected}")
        return ModelSource("demo", kind)
    if _HELPER_TRANSPORT.match(text):
        raise _reject(text, "git remote-helper transports (ext::, fd::, ...) are not allowed")
    scheme = _SCHEME.match(text)
    if scheme:  # HTTPS:// is https:// (git itself knows only the lower-case name)
        return _parse_url(scheme[1].lower() + text[len(scheme[1]):], scheme[1].lower())
    scp = _SCP_LIKE.fullmatch(text)
    if scp:
        if ":" in scp[1]:
            raise _reject(text, "ssh addresses cannot carry a password or token")
        if scp[3].startswith("-"):
            raise _reject(text, "the repository path must not start with '-'")
        return ModelSource("git", text)
    path = str(Path(text).expanduser().resolve())
    return ModelSource("git" if text.rstrip("/").endswith(".git") else "local", path)


def default_cache_dir() -> Path:
    """``$MODEL_CACHE_DIR`` or ``~/.cache/ubub-models``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "ubub-models").expanduser()


def find_lfs_pointers(model_dir: Path) -> list[str]:
    """Relative paths of the files under ``model_dir`` that are Git LFS pointer stubs (``.git`` is skipped).

    Args:
        model_dir: the directory to scan.
    """
    found = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if rel.parts[0] == ".git" or not path.is_file() or path.stat().st_size > LFS_POINTER_MAX_BYTES:
            continue
        with path.open("rb") as fh:
            if fh.read(64).startswith(LFS_POINTER_PREFIXES):
                found.append(rel.as_posix())
    return found


def links_leaving(model_dir: Path) -> list[str]:
    """Symbolic links under ``model_dir`` (``.git`` skipped) that point outside it, as "PATH -> TARGET".

    A Hugging Face cache snapshot (``.../snapshots/REV``) may link into its own ``../../blobs``.

    Args:
        model_dir: a resolved directory.
    """
    allowed = [model_dir]
    if model_dir.parent.name == "snapshots":
        allowed.append(model_dir.parent.parent / "blobs")
    leaving = []
    for top, dirs, files in os.walk(model_dir):
        dirs[:] = [d for d in dirs if not (top == str(model_dir) and d == ".git")]
        for name in dirs + files:
            path = Path(top, name)
            if not path.is_symlink():
                continue
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling link or a loop
                target = None
            if target is None or not any(target.is_relative_to(root) for root in allowed):
                leaving.append(f"{path.relative_to(model_dir).as_posix()} -> {os.readlink(path)}")
    return sorted(leaving)


def validate_model_dir(model_dir: Path, name: str | None = None) -> Path:
    """Check that ``model_dir`` is a complete HF model directory and return it resolved.

    Complete means: config.json, a tokenizer file, at least one weights file, every shard a ``*.index.json``
    lists, no Git LFS pointer stub anywhere, and no symbolic link to anything outside the directory (a
    fetched repo could otherwise make us read, serve or publish any file of this machine).

    Args:
        model_dir: the directory to check.
        name: what to call it in error messages (default: its path).
    """
    root = Path(model_dir).expanduser().resolve()
    name = name or str(root)
    if not root.is_dir():
        raise ModelSourceError(f"model directory not found: {name}")
    if not (root / "config.json").is_file():  # before walking the tree: MODEL_SOURCE=/ must not read it all
        raise ModelSourceError(f"{name} is not a model directory: it has no config.json")
    leaving = links_leaving(root)
    if leaving:
        shown = ", ".join(leaving[:5]) + (f" (+{len(leaving) - 5} more)" if len(leaving) > 5 else "")
        raise ModelSourceError(f"{name}: refusing a model whose files link outside its directory: {shown}")
    pointers = find_lfs_pointers(root)
    if pointers:
        raise LfsPointerError(
            name, pointers, "The weights were never downloaded: run `git lfs pull` in that repository "
            "(install git-lfs first if needed: apt-get install git-lfs).",
        )
    missing = []
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer file (" + " or ".join(TOKENIZER_FILES) + ")")
    if not any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in root.iterdir()):
        missing.append("weights (*.safetensors or *.bin)")
    for index in sorted(root.glob("*.index.json")):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing += [f"{s} (listed in {index.name})" for s in sorted(shards) if not (root / s).is_file()]
    if missing:
        raise ModelSourceError(f"{name} is not a complete model directory: missing {', '.join(missing)}")
    return root


class RemoteCodeError(ModelSourceError):
    """The model ships Python code to run at load time and the operator has not allowed that."""


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing, unreadable, not JSON or not an object.

    Args:
        path: e.g. a model directory's config.json.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _auto_map_refs(auto_map: object) -> list[str]:
    # Every class reference in an auto_map, in each shape transformers imports from: {"AutoModel": "m.C"},
    # {"AutoTokenizer": [slow, fast]}, and a tokenizer_config's legacy bare list [slow, fast].
    entries = list(auto_map.values()) if isinstance(auto_map, dict) else [auto_map]
    refs = [r for entry in entries for r in (entry if isinstance(entry, list) else [entry])]
    return [r for r in refs if isinstance(r, str)]


def remote_code_files(model_dir: Path) -> list[str]:
    """The Python files a model's ``auto_map`` entries make transformers import with trust_remote_code
    (``module.py``, or ``module.py from OWNER/REPO`` for code taken from another repo).

    Args:
        model_dir: a model directory.
    """
    files = set()
    for config in REMOTE_CODE_CONFIGS:
        for ref in _auto_map_refs(read_json_object(model_dir / config).get("auto_map") or {}):
            repo, _, ref = ref.rpartition("--")
            module = ref.rpartition(".")[0].replace(".", "/") + ".py"
            files.add(f"{module} from {repo}" if repo else module)
    return sorted(files)


def check_remote_code(
    model_dir: Path, allowed: bool, how_to_allow: str, name: str | None = None
) -> list[str]:
    """Refuse a model that ships Python code unless the operator allowed running it; return its files.

    Args:
        model_dir: the resolved model directory.
        allowed: the operator's choice (TRUST_REMOTE_CODE, --trust-remote-code, a trusted preset).
        how_to_allow: the setting to name in the error, e.g. "TRUST_REMOTE_CODE=1".
        name: what to call the model (default: its directory name).
    """
    files = remote_code_files(model_dir)
    name = name or Path(model_dir).name
    if files and not allowed:
        raise RemoteCodeError(
            f"model {name} ships its own Python code, which would run in this process with its access to "
            f"your files and tokens: {', '.join(files)}. Read those files; if you trust them, allow it with "
            f"{how_to_allow}"
        )
    if files:
        log.warning("model %s: running its own code (allowed): %s", name, ", ".join(files))
    return files


def git_credential_env(
    remote: str, credentials: tuple[str, str] | None = None, env: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """Environment that makes git (and git-lfs) answer credential requests for ``remote`` from variables.

    The helper prints the user name and token from variables set only in git's environment, so the token
    never appears in argv, in a config file or in a credential store (other helpers are reset for the
    command). The credentials are ``credentials`` (split off the URL) or ``$OPENXLAB_GIT_USER`` /
    ``$OPENXLAB_GIT_TOKEN``, the latter only for https://code.openxlab.org.cn (another host, or plain http,
    would get the user's OpenXLab token). Empty when there are none or ``remote`` is not http(s).

    Args:
        remote: the URL git will talk to (without credentials).
        credentials: (user, token) from the source URL; None: from the environment.
        env: the environment the result is added to (its git config entries are kept).
    """
    match = re.match(r"(https?://)(?:[^/@]*@)?([^/]+)", remote)
    if not match:
        return {}
    if credentials is None:
        parts = urlsplit(remote)
        openxlab = (parts.scheme, parts.hostname, parts.port) in (("https", OPENXLAB_GIT_HOST, None),
                                                                   ("https", OPENXLAB_GIT_HOST, 443))
        if not os.environ.get(GIT_TOKEN_ENV) or not openxlab:
            return {}
        if not os.environ.get(GIT_USER_ENV):
            raise ModelSourceError(
                f"{GIT_TOKEN_ENV} is set but {GIT_USER_ENV} is not: set it to your user name")
        credentials = (os.environ[GIT_USER_ENV], os.environ[GIT_TOKEN_ENV])
    helper = (
        '!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
        f'"${_HELPER_USER}" "${_HELPER_TOKEN}"; }}; f'
    )
    config = {"credential.helper": "", f"credential.{match[1]}{match[2]}.helper": helper}
    return {**git_config_env(config, env), _HELPER_USER: credentials[0], _HELPER_TOKEN: credentials[1]}


def git_config_env(settings: dict[str, str], env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Env vars (GIT_CONFIG_COUNT/KEY_n/VALUE_n) adding ``settings`` to git's config, after any already set.

    Args:
        settings: config key -> value, applied in order with command-line precedence.
        env: the environment the result is added to (its GIT_CONFIG_COUNT entries are kept).
    """
    if not settings:
        return {}
    start = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    env = {"GIT_CONFIG_COUNT": str(start + len(settings))}
    for i, (key, value) in enumerate(settings.items(), start):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


def on_parent_death(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child ``sig`` when this process dies, even by SIGKILL (None off Linux).

    Args:
        sig: the signal the child gets.
    """
    if sys.platform != "linux":
        return None
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    return lambda: prctl(pr_set_pdeathsig, sig)


@contextlib.contextmanager
def stop_as_interrupt() -> Iterator[Callable[[], int]]:
    """While inside, SIGTERM (a Space or container stopping, a pipeline stopping its stage) and SIGHUP (the
    terminal closed, ssh dropped) interrupt as Ctrl-C does, so a fetch or push stops with its git / git-lfs
    processes (``run_git``) and a partial download is removed; yields a function giving the signal that came
    (SIGINT unless another)."""
    came = [signal.SIGINT]

    def interrupt(signum: int, frame: object) -> None:
        came[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield lambda: int(came[0])
        return
    previous = interrupt_on_stop_signals(interrupt)
    try:
        yield lambda: int(came[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_on_stop_signals(handler: Callable[[int, object], None]) -> dict[signal.Signals, object]:
    """Install ``handler`` for SIGTERM and SIGHUP, except a signal that is ignored (``nohup`` sets SIGHUP so:
    it must keep working); return the handlers it replaced.

    Args:
        handler: a signal handler, e.g. one that raises KeyboardInterrupt or exits.
    """
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    return previous


def run_git(
    args: list[str],
    cwd: Path | None = None,
    remote: str | None = None,
    config: dict[str, str] | None = None,
    credentials: tuple[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` without prompts, on the allowed transports only; raise GitError (redacted stderr)
    when it fails. Callers put ``--`` before positionals that come from users.

    Args:
        args: git arguments, e.g. ``["clone", "--", url, dest]``.
        cwd: working directory.
        remote: the URL the command talks to; credentials for it come from the env (git_credential_env).
        config: extra git config for this command and its children (git-lfs), passed through the env.
        credentials: (user, token) for ``remote`` split off its URL; None: from the environment.
    """
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never",
                "GIT_ALLOW_PROTOCOL": ":".join(GIT_SCHEMES)}
    full_env.update(git_config_env(config or {}, full_env))
    if remote:
        full_env.update(git_credential_env(remote, credentials, full_env))
    # Its own process group, so that a stop (Ctrl-C, SIGTERM turned into an exception by the caller) ends git
    # and the git-lfs it started too; left alone they would go on writing into a removed partial dir.
    # And SIGTERM if this process is killed outright: git then ends its git-lfs.
    with subprocess.Popen(["git", *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=on_parent_death(signal.SIGTERM)) as git:
        try:
            stdout, stderr = git.communicate()
        except BaseException:
            _stop_group(git)
            raise
    if git.returncode != 0:
        raise GitError(" ".join(args[:2]) if args[0] == "lfs" else args[0], stderr or stdout)
    return subprocess.CompletedProcess(git.args, git.returncode, stdout, stderr)


def _stop_group(process: subprocess.Popen) -> None:
    # SIGTERM first (git-lfs removes its temporary files), then SIGKILL for whatever of the group is left,
    # even when a second Ctrl-C cuts the wait short.
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def has_git_lfs() -> bool:
    """True when the git-lfs binary is on PATH."""
    return shutil.which("git-lfs") is not None


def resolve_model(
    source: str | None,
    cache_dir: Path | None = None,
    retry: RetryPolicy | None = None,
    refresh: bool = False,
) -> Path:
    """Return a validated local model directory for ``source``, fetching it into the cache the first time.

    Args:
        source: local dir, git URL, ``openxlab:OWNER/REPO``, ``hf:OWNER/REPO[@REV]`` or ``demo:tuned|base``
            (built on first use); None/"" -> the embedded tiny demo model.
        cache_dir: cache root for fetched models; default ``$MODEL_CACHE_DIR`` or ``~/.cache/ubub-models``.
        retry: attempts and backoff for network failures; default ``RetryPolicy()``.
        refresh: fetch again even if cached (the cached copy is replaced only once the new one is complete).
    """
    if not source or not source.strip():
        if not DEMO_MODEL_DIR.is_dir():
            raise ModelSourceError(
                f"no model source given and the embedded demo model is missing at {DEMO_MODEL_DIR}: "
                "set MODEL_SOURCE / --model, or build the demo model (see README)"
            )
        return validate_model_dir(DEMO_MODEL_DIR)
    src = parse_source(source)
    if src.kind == "local":
        return validate_model_dir(Path(src.location))
    if src.kind == "hf" and src.revision is None:
        log.warning("model %s follows the repo's moving main branch: pin the version you checked, "
                    "e.g. %s@<commit id from the repo's 'Files and versions' page>", src, src)
    root = (cache_dir or default_cache_dir()).expanduser()  # "~/models", as a Space's settings pass it
    if src.kind == "demo":
        from infer_engine.smol_demo import resolve_demo  # torch, transformers, peft: app env only

        return validate_model_dir(resolve_demo(src.location, root))
    target = root / src.cache_key
    if target.is_dir() and not refresh:
        # A complete entry needs no lock, so a read-only, pre-built cache works.
        fetched = read_json_object(target / SOURCE_INFO_FILE)
        log.info("model %s: using cache %s (revision %s, fetched %s; no network: --refresh fetches it again)",
                 src, target, fetched.get("revision") or "unknown", fetched.get("fetched_at") or "earlier")
        return _validate_cached(target, src)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = (root / f".{src.cache_key}.lock").open("a")
    except OSError as err:
        raise ModelSourceError(
            f"cannot fetch {src} into the model cache {root} ({err.strerror or err}): set {CACHE_DIR_ENV} "
            "(python -m infer_engine.model_source: --cache-dir) to a writable directory"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two app workers must not fetch into the same partial dir
        if target.is_dir() and not refresh:  # another process fetched it while we waited
            return _validate_cached(target, src)
        partial = root / f".{src.cache_key}.partial"
        revision = _with_retries(lambda: _fetch_into(src, partial), retry or RetryPolicy(), src)
        fetched_at = datetime.now(UTC).isoformat(timespec="seconds")
        info = {"source": str(src), "revision": revision, "fetched_at": fetched_at}
        (partial / SOURCE_INFO_FILE).write_text(json.dumps(info))
        _move_into_place(partial, target)
    log.info("model %s: fetched into %s (revision %s)", src, target, revision or "unknown")
    return target


def _validate_cached(target: Path, src: ModelSource) -> Path:
    try:
        return validate_model_dir(target)
    except ModelSourceError as err:
        raise ModelSourceError(f"{err} (the cached copy of {src}: fetch it again with --refresh, "
                               "or delete that directory)") from None


def _with_retries(step: Callable[[], str | None], policy: RetryPolicy, src: ModelSource) -> str | None:
    for attempt in range(1, policy.attempts + 1):
        try:
            return step()
        except ModelSourceError as err:
            if not err.transient:
                raise
            if attempt == policy.attempts:
                raise ModelSourceError(
                    f"could not fetch {src} after {attempt} attempt(s); last error: {err}"
                ) from None  # the chained error may hold the raw URL
            wait = policy.delay(attempt)
            log.warning("model %s: attempt %d/%d failed (%s); retrying in %.2fs",
                        src, attempt, policy.attempts, err, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_into(src: ModelSource, partial: Path) -> str | None:
    # A partial dir left by a killed run is stale (we hold the lock): start clean, and never leave one behind.
    shutil.rmtree(partial, ignore_errors=True)
    try:
        revision = _FETCHERS[src.kind](src, partial)
        pointers = find_lfs_pointers(partial)
        if pointers:
            hint = ("git-lfs is not installed, so only pointers were cloned: apt-get install git-lfs"
                    if src.kind == "git" and not has_git_lfs()
                    else "The remote does not have these LFS objects (pushed without git-lfs?).")
            raise LfsPointerError(str(src), pointers, hint)
        validate_model_dir(partial, name=str(src))
        return revision
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _fetch_git(src: ModelSource, dest: Path) -> str:
    log.info("model %s: git clone (LFS weights may take minutes)", src)
    # The clone checks out LFS pointers (smudge filter off, so it works even where git-lfs is configured but
    # missing); the objects come from one explicit `git lfs pull`, whose failure we can report.
    # No --depth: the history is only small pointer blobs (pull fetches HEAD's LFS objects), and dumb-HTTP
    # servers cannot serve shallow clones.
    no_smudge = {"filter.lfs.process": "", "filter.lfs.smudge": "", "filter.lfs.required": "false"}
    run_git(["clone", "--quiet", "--", src.location, str(dest)], remote=src.location, config=no_smudge,
            credentials=src.credentials)
    if src.revision:  # a commit id or tag as it is, a branch as the clone names it (origin/BRANCH)
        commits = [_commit_of(dest, name) for name in (src.revision, f"origin/{src.revision}")]
        if not any(commits):
            raise ModelSourceError(f"{src}: the repository has no revision {src.revision!r} (give a commit "
                                   "id, tag or branch)")
        run_git(["checkout", "--quiet", "--detach", next(c for c in commits if c), "--"], cwd=dest,
                config=no_smudge)
    else:
        _check_out_a_branch(src, dest, no_smudge)
    if has_git_lfs():
        try:
            run_git(["lfs", "pull"], cwd=dest, remote=src.location, config=LFS_FILTER_CONFIG,
                    credentials=src.credentials)
        except GitError as err:
            if err.transient:
                raise
            pointers = find_lfs_pointers(dest)
            if pointers:
                raise LfsPointerError(str(src), pointers, f"`git lfs pull` failed: {err}") from None
            raise
    revision = run_git(["rev-parse", "HEAD"], cwd=dest).stdout.strip()
    shutil.rmtree(dest / ".git")  # it would hold a second copy of every LFS object
    return revision


def _commit_of(repo: Path, name: str) -> str:
    # The commit a revision names in ``repo``; "" when it names none (no such ref, or an unborn branch).
    return subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True).stdout.strip()


def _check_out_a_branch(src: ModelSource, dest: Path, config: dict[str, str]) -> None:
    """After a clone whose remote HEAD names a branch without commits (a bare repo made by an older
    ``git init --bare``, HEAD ``master``, that was pushed ``main``): check out ``main``, or the one branch.

    Args:
        src: the git source (for the message).
        dest: the clone.
        config: the clone's git config (LFS smudge off).
    """
    if _commit_of(dest, "HEAD"):
        return
    listed = run_git(["for-each-ref", "--format=%(refname:lstrip=3)", "refs/remotes/origin"], cwd=dest).stdout
    branches = [b for b in listed.split() if b != "HEAD"]
    if not branches:
        raise ModelSourceError(f"{src} has no commits: publish a model to it first")
    if "main" not in branches and len(branches) > 1:
        raise ModelSourceError(f"{src}: its HEAD names a branch without commits, and it has several "
                               f"({', '.join(sorted(branches))}); set its HEAD to the model's branch")
    branch = "main" if "main" in branches else branches[0]
    log.info("model %s: its HEAD names a branch without commits; using branch %s", src, branch)
    run_git(["checkout", "--quiet", "-b", branch, "--track", f"origin/{branch}"], cwd=dest, config=config)


def _fetch_openxlab(src: ModelSource, dest: Path) -> None:
    try:
        from openxlab.model import download
    except ImportError as err:
        raise ModelSourceError(
            f"{src} needs the openxlab SDK, which cannot be imported here ({err}). "
            f"Install it: {OPENXLAB_INSTALL}"
        ) from None
    dest.mkdir(parents=True)
    try:
        # The SDK prints progress on stdout; keep stdout for our CLI's one line of output.
        with contextlib.redirect_stdout(sys.stderr), _openxlab_keys_in_memory():
            paths = download(model_repo=src.location, output=str(dest), cache=False)
    except Exception as err:  # third-party SDK boundary: requests errors, or anything else it raises
        raise _sdk_error(src, err) from None
    if paths is None:  # the SDK catches ValueError, prints "Error: ..." and returns None
        raise ModelSourceError(
            f"openxlab could not download {src} (see its 'Error:' line above): check OWNER/REPO, and set "
            "OPENXLAB_AK / OPENXLAB_SK for a private repo"
        )


@contextlib.contextmanager
def _openxlab_keys_in_memory() -> Iterator[None]:
    """With OPENXLAB_AK/OPENXLAB_SK set, point the SDK's config dir (``~/.openxlab``) at a private temporary
    dir for the call: the SDK (0.1.3) reads the keys from the env when that dir has no config.json, and the
    session token it stores there is deleted afterwards. ``openxlab.login`` would write AK/SK to disk."""
    if not (os.environ.get("OPENXLAB_AK") and os.environ.get("OPENXLAB_SK")):
        yield  # no keys given: the SDK's own login (`openxlab login`), or anonymous for public repos
        return
    from openxlab.config import const

    saved = const.DEFAULT_CONFIG_DIR
    with tempfile.TemporaryDirectory(prefix="openxlab-") as tmp:
        const.DEFAULT_CONFIG_DIR = tmp
        try:
            yield
        finally:
            const.DEFAULT_CONFIG_DIR = saved


def _fetch_hf(src: ModelSource, dest: Path) -> str | None:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise ModelSourceError(f"{src} needs huggingface_hub ({err}): pip install huggingface_hub") from None
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(
            f"{src} is not in the model cache and HF_HUB_OFFLINE is set: unset it to download, "
            "or pass a local directory"
        )
    log.info("model %s: downloading from the Hugging Face Hub", src)
    try:
        snapshot_download(repo_id=src.location, revision=src.revision, local_dir=dest)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        first = str(err).splitlines()[0]
        raise ModelSourceError(f"{src}: {first} (private or gated repos need HF_TOKEN)") from None
    except LocalEntryNotFoundError as err:  # raised when the hub cannot be reached and nothing is cached
        raise NetworkError(f"{src}: cannot reach the Hugging Face Hub ({str(err).splitlines()[0]})") from None
    except Exception as err:  # third-party SDK boundary
        raise _sdk_error(src, err) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # hub bookkeeping for local_dir downloads
    return src.revision


def _sdk_error(src: ModelSource, err: Exception) -> ModelSourceError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    network = type(err).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "httpx2", "httpcore")
    if isinstance(status, int):
        transient = status >= 500 or status == 429
    else:
        transient = isinstance(err, OSError) or network
    message = f"{src}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return NetworkError(message) if transient else ModelSourceError(message)


_FETCHERS: dict[str, Callable[[ModelSource, Path], str | None]] = {
    "git": _fetch_git, "openxlab": _fetch_openxlab, "hf": _fetch_hf,
}


def main(argv: list[str] | None = None) -> int:
    """CLI: print the local directory for a model source (logs go to stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=os.environ.get("MODEL_SOURCE", ""),
                        help="model source (default $MODEL_SOURCE; empty: the embedded demo model)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $MODEL_CACHE_DIR)")
    parser.add_argument("--refresh", action="store_true", help="fetch again even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    with stop_as_interrupt() as stopped:
        try:
            path = resolve_model(args.source or None, args.cache_dir, refresh=args.refresh)
        except ModelSourceError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: git stopped, nothing half-fetched was kept
            print("error: stopped; nothing was kept", file=sys.stderr)
            return 128 + stopped()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
