# Hostile model sources: .venv/bin/python -m pytest tests/infer_engine/test_hostile_sources.py -q
# Each case ends in one clear error (or a validated model), runs nothing it was not meant to run (a marker
# file stays absent), and leaks no token: not in messages, not in git's command lines (what `ps` shows),
# not in cache directory names. Real git over file:// and a local HTTP server; no hub is contacted.
from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hostile_inputs import SECRET, add_legacy_tokenizer_code, add_remote_code, git_argv_recorder
from lfs_repo import build_tiny_model, make_bare_repo, push_plain_repo

from infer_engine import model_source
from infer_engine.model_source import (
    ModelSourceError,
    RemoteCodeError,
    RetryPolicy,
    check_remote_code,
    parse_source,
    redact,
    resolve_model,
)
from infer_engine.settings import EngineSettings

REPO = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=2, base_delay=0.05)
HF_TOKEN_LIKE = "hf_" + "Ab3" * 10

# (text, what redact() must make of it): every URL form a token can hide in.
REDACT_TABLE = [
    (f"https://alice:{SECRET}@host/r.git", "https://***@host/r.git"),
    (f"https://alice:p@ss{SECRET}@host/r.git", "https://***@host/r.git"),  # '@' inside the password
    (f"https://alice:pa/ss{SECRET}@host/r.git", "https://***@host/r.git"),  # '/' inside the password
    (f"https://{SECRET}@github.com/o/r.git", "https://***@github.com/o/r.git"),  # token as the user name
    (f"https://alice%3A{SECRET}%40x@host/r", "https://***@host/r"),  # percent-encoded userinfo
    (f"http://host/r.git?token={SECRET}", "http://host/r.git?***"),
    (f"https://host/r?a=1&access_token={SECRET}", "https://host/r?***"),
    (f"https://host/r#{SECRET}", "https://host/r?***"),
    (f"ssh://git:{SECRET}@host:22/r.git", "ssh://***@host:22/r.git"),
    (f"alice:{SECRET}@host:o/r.git", "***@host:o/r.git"),  # scp-like with a password
    (f"git clone https://x:{SECRET}@h/r.git failed", "git clone https://***@h/r.git failed"),
    (f"remote: 'https://x:{SECRET}@h/r'", "remote: 'https://***@h/r'"),
    (f"hf:o/r?token={SECRET}", "hf:o/r?token=***"),
    (f"login with {HF_TOKEN_LIKE} failed", "login with *** failed"),
]


@pytest.mark.parametrize(("text", "shown"), REDACT_TABLE)
def test_redact_handles_every_url_form(text: str, shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "_SEEN_SECRETS", set())  # only the patterns, not remembered tokens
    assert redact(text) == shown
    assert SECRET not in redact(text) and HF_TOKEN_LIKE not in redact(text)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# (source, part of the one-line error): options, remote helpers, odd transports and tokens where none belong.
HOSTILE_SOURCES = [
    ("-ux@x:;touch {mark};#", "must not start with '-'"),  # the reproduced git option injection
    ("--upload-pack=touch {mark}", "must not start with '-'"),
    ("ext::sh -c touch% {mark}", "remote-helper transports"),
    ("fd::7", "remote-helper transports"),
    ("ssh://-oProxyCommand=touch%20{mark}/r.git", "host name is not valid"),
    ("git@host:--upload-pack=touch${{IFS}}{mark}", "must not start with '-'"),
    ("ftp://host/r.git", "unsupported URL scheme 'ftp'"),
    ("evilhelper://host/r.git", "unsupported URL scheme 'evilhelper'"),
    ("https://host/r.git?token=" + SECRET, "no query or fragment"),
    ("https://host/r.git#" + SECRET, "no query or fragment"),
    (f"ssh://git:{SECRET}@host/r.git", "cannot carry a password"),
    (f"alice:{SECRET}@host:o/r.git", "cannot carry a password"),
    (f"file://u:{SECRET}@/srv/r.git", "cannot carry a password"),
    ("hf:owner/..", "expected hf:OWNER/REPO"),
    ("hf:owner/repo@--force", "expected hf:OWNER/REPO"),
    ("hf:owner/repo@main;touch", "expected hf:OWNER/REPO"),
    ("openxlab:../../etc/passwd", "expected openxlab:OWNER/REPO"),
    ("/tmp/x\n--upload-pack=touch {mark}", "control characters"),
    ("{tmp}/no-such-model", "model directory not found"),
]


@pytest.mark.parametrize(("source", "message"), HOSTILE_SOURCES)
def test_hostile_source_is_refused_and_runs_nothing(source: str, message: str, tmp_path: Path) -> None:
    mark, argv_log = tmp_path / "pwned", tmp_path / "git-argv.log"
    env = git_argv_recorder(tmp_path / "bin", argv_log)
    text = source.format(mark=mark, tmp=tmp_path)
    cache = tmp_path / "ca:che"  # a ':' in the cache path made the reproduced injection work
    cmd = [sys.executable, "-m", "infer_engine.model_source", text, "--cache-dir", str(cache)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr
    assert not mark.exists()
    assert SECRET not in proc.stderr + argv_log.read_text()
    assert argv_log.read_text() == ""  # refused before any git command


def test_url_token_reaches_git_only_through_the_credential_helper(tiny_model: Path, tmp_path: Path) -> None:
    # A real dumb-HTTP git server behind Basic auth; the password holds '@' and '/' and is percent-encoded.
    password = f"p@ss/{SECRET}"
    push_plain_repo(shutil.copytree(tiny_model, tmp_path / "work"),
                    make_bare_repo(tmp_path / "srv" / "model.git"))
    expected = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
    seen: list[str] = []

    class AuthHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "srv"), **kwargs)

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="models"')
                self.end_headers()
            else:
                super().do_GET()

        def log_message(self, *args) -> None:
            pass

    argv_log = tmp_path / "git-argv.log"
    env = git_argv_recorder(tmp_path / "bin", argv_log)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://alice:{password.replace('@', '%40').replace('/', '%2F')}@127.0.0.1:{server.server_port}"
    try:
        proc = subprocess.run([sys.executable, "-m", "infer_engine.model_source", f"{url}/model.git",
                               "--cache-dir", str(tmp_path / "cache")], env=env, cwd=REPO, text=True,
                              capture_output=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert expected in seen  # git authenticated with the URL's credentials...
    commands = argv_log.read_text()
    assert "clone --quiet -- http://127.0.0.1:" in commands
    for shown in (commands, proc.stdout, proc.stderr, *os.listdir(tmp_path / "cache")):
        assert SECRET not in shown and "alice" not in shown  # ...which never were on a command line
    info = json.loads((Path(proc.stdout.strip()) / ".model_source.json").read_text())
    assert info["source"] == f"http://127.0.0.1:{server.server_port}/model.git"


def _model_repo_with_links(tiny_model: Path, tmp_path: Path) -> Path:
    work = shutil.copytree(tiny_model, tmp_path / "linked")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        shutil.move(work / name, outside / name)
        (work / name).symlink_to(outside / name)
    return work


def test_fetched_repo_with_links_outside_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    bare = push_plain_repo(_model_repo_with_links(tiny_model, tmp_path),
                           make_bare_repo(tmp_path / "links.git"))
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match=r"link outside its directory: model\.safetensors -> /.*"
                                               r"tokenizer\.json -> /"):
        resolve_model(bare.as_uri(), cache_dir=cache, retry=FAST)
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_local_dir_links_outside_refused_inside_and_hf_snapshots_accepted(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelSourceError, match=r"link outside its directory: model\.safetensors -> "):
        resolve_model(str(_model_repo_with_links(tiny_model, tmp_path)))
    inside = shutil.copytree(tiny_model, tmp_path / "inside")
    (inside / "sub").mkdir()
    shutil.move(inside / "tokenizer.json", inside / "sub" / "tokenizer.json")
    (inside / "tokenizer.json").symlink_to("sub/tokenizer.json")
    assert resolve_model(str(inside)) == inside
    # The Hugging Face cache layout: snapshots/REV/FILE -> ../../blobs/HASH.
    repo = tmp_path / "hub" / "models--o--r"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for path in tiny_model.iterdir():
        shutil.copy(path, repo / "blobs" / path.name)
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    assert resolve_model(str(snapshot)) == snapshot


# Model code through config.json's auto_map, and through a tokenizer_config.json's legacy bare-list auto_map.
CODE_PLANTS = [(add_remote_code, "configuration_evil.py, modeling_evil.py"),
               (add_legacy_tokenizer_code, "tokenization_evil.py")]


@pytest.mark.parametrize(("plant", "files"), CODE_PLANTS)
def test_model_code_runs_only_when_allowed(tiny_model: Path, tmp_path: Path, plant, files: str) -> None:
    from infer_engine.hf_engine import TransformersEngine

    mark = tmp_path / "pwned"
    model = plant(shutil.copytree(tiny_model, tmp_path / "model"), mark)
    # The app refuses it with one line naming the files and the setting; nothing ran.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRUST_REMOTE_CODE", None)
    proc = subprocess.run([sys.executable, "app.py", "--model", str(model)], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert files in proc.stderr and "TRUST_REMOTE_CODE=1" in proc.stderr
    assert not mark.exists()
    with pytest.raises(RemoteCodeError, match=files):
        check_remote_code(model, allowed=False, how_to_allow="TRUST_REMOTE_CODE=1")
    # The engine itself never runs it by default (transformers falls back to its own Llama code) ...
    engine = TransformersEngine(model, EngineSettings(device="cpu", torch_threads=1))
    engine.close()
    assert not mark.exists()
    # ... and does when the operator allows it.
    engine = TransformersEngine(model, EngineSettings(device="cpu", torch_threads=1, trust_remote_code=True))
    engine.close()
    assert mark.read_text() == "ran"


def test_trust_remote_code_setting_is_validated() -> None:
    from infer_engine.settings import SettingsError, engine_settings_from_env, trust_remote_code_from_env

    assert engine_settings_from_env({}).trust_remote_code is False
    assert engine_settings_from_env({"TRUST_REMOTE_CODE": "1"}).trust_remote_code is True
    assert trust_remote_code_from_env({"TRUST_REMOTE_CODE": "yes"}) is True
    with pytest.raises(SettingsError, match="TRUST_REMOTE_CODE must be true or false"):
        trust_remote_code_from_env({"TRUST_REMOTE_CODE": "maybe"})
    with pytest.raises(SettingsError, match="trust_remote_code must be true or false"):
        EngineSettings(trust_remote_code="1")


def test_unpinned_hub_source_warns_to_pin(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.WARNING, logger="infer_engine.model_source")
    for source in ("hf:someone/ubub", "hf:someone/ubub@0123abc"):
        with pytest.raises(ModelSourceError):  # offline: the fetch itself fails; the warning comes first
            resolve_model(source, cache_dir=tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hf:someone/ubub follows the repo's moving main branch" in warnings[0]
    assert "hf:someone/ubub@<commit id" in warnings[0]


def test_bad_cache_dir_is_one_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    proc = subprocess.run([sys.executable, "-m", "infer_engine.model_source", "hf:someone/ubub@v1",
                           "--cache-dir", str(not_a_dir / "sub")], cwd=REPO, text=True, capture_output=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot fetch hf:someone/ubub@v1 into the model cache" in proc.stderr
    assert "set MODEL_CACHE_DIR (python -m infer_engine.model_source: --cache-dir) to a" in proc.stderr


def test_complete_cache_entry_is_used_without_writing(tiny_model: Path, tmp_path: Path) -> None:
    # A pre-built cache shipped read-only (a Space image, a shared disk): serving it must write nothing.
    cache = tmp_path / "cache"
    entry = cache / parse_source("hf:someone/ubub@v1").cache_key
    shutil.copytree(tiny_model, entry)
    before = sorted(os.listdir(cache))
    if os.geteuid() != 0:  # root ignores permissions: there the unchanged listing is the check
        cache.chmod(0o555)
    try:
        assert resolve_model("hf:someone/ubub@v1", cache_dir=cache) == entry
    finally:
        cache.chmod(0o755)
    assert sorted(os.listdir(cache)) == before  # no lock file was created


def test_openxlab_keys_never_written_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openxlab", reason="openxlab is installed only in the dev env (--no-deps)")
    from openxlab.config import const
    from openxlab.xlab.handler import user_token

    home = tmp_path / "home"
    monkeypatch.setattr(const, "DEFAULT_CONFIG_DIR", str(home / ".openxlab"))
    monkeypatch.setenv("OPENXLAB_AK", "ak-FAKE-1234")
    monkeypatch.setenv("OPENXLAB_SK", SECRET)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the model API is unreachable

    class AuthStandIn:  # the SDK's sign-in service, answered locally (it is not what is under test)
        def auth(self, ak: str) -> tuple[str, str]:
            return "nonce", "HmacSHA256"

        def get_jwt(self, ak: str, d: str) -> dict[str, str]:
            return {"jwt": "jwt", "expiration": "2099-01-01 00:00:00", "sso_uid": "u",
                    "refresh_token": "r", "refresh_expiration": "2099-01-01 00:00:00"}

    monkeypatch.setattr(user_token, "AUTH_CLIENT", AuthStandIn())
    with pytest.raises(ModelSourceError):
        resolve_model("openxlab:me/ubub", cache_dir=tmp_path / "cache", retry=FAST)
    written = [p.read_text() for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert not any(SECRET in text or "ak-FAKE-1234" in text for text in written)
    assert str(home / ".openxlab") == const.DEFAULT_CONFIG_DIR  # restored after the download
