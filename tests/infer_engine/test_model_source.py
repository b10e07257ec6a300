# Model source tests: .venv/bin/python -m pytest tests/infer_engine/test_model_source.py -q
# Real git + git-lfs repositories over file:// and a tiny real HF model; no hub is contacted (HF_HUB_OFFLINE,
# a dead local proxy for the network-failure cases, and local servers answering as the Hub for hf: and as
# OpenXLab for openxlab:).
from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_inputs import SECRET
from lfs_repo import build_tiny_model, git, make_bare_repo, push_model_dir, push_plain_repo

from infer_engine.model_source import (
    DEMO_MODEL_DIR,
    SOURCE_INFO_FILE,
    LfsPointerError,
    ModelSource,
    ModelSourceError,
    RetryPolicy,
    git_credential_env,
    interrupt_on_stop_signals,
    parse_source,
    read_json_object,
    redact,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, base_delay=0.05)
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens on the discard port: every connection is refused at once


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def remote(tmp_path: Path, tiny_model: Path) -> Path:
    """A bare repo holding the tiny model, weights in LFS (objects uploaded)."""
    bare = make_bare_repo(tmp_path / "remote.git")
    push_model_dir(tiny_model, bare.as_uri(), tmp_path / "work")
    return bare


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Env where any HTTP(S) request dies on a refused local proxy instead of reaching the internet."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    return dict(os.environ)


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for a parent that does not reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


# ---- parsing, redaction, credentials --------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind", "location", "revision"), [
    ("hf:internlm/internlm2_5-1_8b-chat", "hf", "internlm/internlm2_5-1_8b-chat", None),
    ("hf:me/ubub@v1.0", "hf", "me/ubub", "v1.0"),
    ("openxlab:me/ubub", "openxlab", "me/ubub", None),
    ("https://code.openxlab.org.cn/me/ubub.git", "git", "https://code.openxlab.org.cn/me/ubub.git", None),
    ("git@github.com:me/ubub.git", "git", "git@github.com:me/ubub.git", None),
    ("file:///srv/ubub.git", "git", "file:///srv/ubub.git", None),
    ("HTTPS://code.openxlab.org.cn/me/ubub.git", "git", "https://code.openxlab.org.cn/me/ubub.git", None),
    ("File:///srv/ubub.git@v1", "git", "file:///srv/ubub.git", "v1"),
    ("file:///srv/ubub.git@5d0c1e2", "git", "file:///srv/ubub.git", "5d0c1e2"),
    ("https://h.openxlab.org.cn/me/ubub.git@v1.0", "git", "https://h.openxlab.org.cn/me/ubub.git", "v1.0"),
    ("/srv/models/ubub.git", "git", "/srv/models/ubub.git", None),
    ("/srv/models/merged", "local", "/srv/models/merged", None),
])
def test_parse_source_kinds(text: str, kind: str, location: str, revision: str | None) -> None:
    assert parse_source(text) == ModelSource(kind, location, revision)


@pytest.mark.parametrize("text", ["", " ", "hf:a", "hf:a/b@", "hf:a/b/c", "openxlab:", "openxlab:a/b@v1",
                                  "https://h.org/a.git@", "https://h.org/a.git@-x", "file:///a.git@v..1"])
def test_parse_source_rejects_malformed(text: str) -> None:
    with pytest.raises(ModelSourceError):
        parse_source(text)


def test_credentials_are_redacted_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_envSECRET42")
    src = parse_source("https://alice:urlSECRET42@code.openxlab.org.cn/me/ubub.git")
    for shown in (str(src), repr(src), src.cache_key, redact("token hf_envSECRET42 leaked")):
        assert "urlSECRET42" not in shown and "hf_envSECRET42" not in shown
    assert str(src) == "https://code.openxlab.org.cn/me/ubub.git"  # the credentials were split off
    assert src.credentials == ("alice", "urlSECRET42")
    # The cache key ignores credentials: a new token reuses the same cached model.
    assert src.cache_key == parse_source("https://code.openxlab.org.cn/me/ubub.git").cache_key
    err = ModelSourceError("git clone https://bob:urlSECRET42@host/x.git failed; hf_envSECRET42")
    assert "SECRET42" not in str(err)
    # A token holding "/" (not percent-encoded) is no URL login to urlsplit; the refusal still hides it, and
    # a pinned URL's revision is no login to hide.
    for text in ("https://bob:to/kenSECRET42@host/x.git", "https://bob:to/kenSECRET42@host/x.git@v1"):
        with pytest.raises(ModelSourceError) as refused:
            parse_source(text)
        assert "SECRET42" not in str(refused.value)
    pinned = parse_source("https://bob:urlSECRET42@host/x.git@v1")
    assert str(pinned) == "https://host/x.git@v1" and pinned.credentials == ("bob", "urlSECRET42")
    assert redact("fetch https://host/x.git@5d0c1e2 failed") == "fetch https://host/x.git@5d0c1e2 failed"


def test_git_credential_helper_answers_only_for_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENXLAB_GIT_USER", "alice")
    monkeypatch.setenv("OPENXLAB_GIT_TOKEN", "oxl-SECRET-777")
    env = git_credential_env("https://code.openxlab.org.cn/me/ubub.git")
    assert "oxl-SECRET-777" not in json.dumps({k: v for k, v in env.items() if k.startswith("GIT_")})

    def fill(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "credential", "fill"], input=f"protocol=https\nhost={host}\n\n",
                              text=True, capture_output=True,
                              env={**os.environ, **env, "GIT_TERMINAL_PROMPT": "0"})

    ours = fill("code.openxlab.org.cn")
    assert ours.returncode == 0
    assert "username=alice" in ours.stdout and "password=oxl-SECRET-777" in ours.stdout
    other = fill("example.com")
    assert other.returncode != 0 and "oxl-SECRET-777" not in other.stdout + other.stderr
    assert git_credential_env("file:///srv/x.git") == {}
    # The OpenXLab token is for OpenXLab over https: another host, plain http or another port gets no helper.
    for elsewhere in ("https://example.com/me/ubub.git", "http://code.openxlab.org.cn/me/ubub.git",
                      "https://code.openxlab.org.cn:8443/me/ubub.git", "https://code.openxlab.org.cn.evil.io/x.git"):
        assert git_credential_env(elsewhere) == {}, elsewhere
    # Credentials the user put in a URL are that URL's own.
    assert git_credential_env("https://example.com/me/ubub.git", ("bob", "urlSECRET"))["GIT_CONFIG_COUNT"]
    monkeypatch.delenv("OPENXLAB_GIT_USER")
    with pytest.raises(ModelSourceError, match="OPENXLAB_GIT_USER"):
        git_credential_env("https://code.openxlab.org.cn/me/ubub.git")


# ---- local directories ----------------------------------------------------------------------------

def test_local_dir_is_validated_and_not_copied(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model), cache_dir=tmp_path / "cache") == tiny_model.resolve()
    assert not (tmp_path / "cache").exists()


def test_a_dir_without_config_is_refused_before_its_tree_is_walked(tmp_path: Path) -> None:
    # MODEL_SOURCE=/tmp or / is a typo: it must not read every file under it looking for links and pointers,
    # and the answer is that it is no model (not that something deep inside links elsewhere).
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(ModelSourceError, match=r"is not a model directory: it has no config\.json$"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(("remove", "message"), [
    ("config.json", "is not a model directory: it has no config.json"),
    ("tokenizer.json", "not a complete model directory: missing .*tokenizer file"),
    ("model.safetensors", "not a complete model directory: missing .*weights"),
])
def test_local_dir_incomplete(tiny_model: Path, tmp_path: Path, remove: str, message: str) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / remove).unlink()
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(str(model))


def test_local_dir_missing_shard_of_index(tiny_model: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"model-00002-of-00002\.safetensors \(listed in"):
        resolve_model(str(model))


def test_local_clone_without_lfs_pull_is_reported(remote: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", remote.as_uri(), str(clone)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert (clone / "model.safetensors").stat().st_size < 200  # a real pointer file, as git leaves it
    with pytest.raises(LfsPointerError, match=r"model\.safetensors.*git lfs pull") as info:
        resolve_model(str(clone))
    assert info.value.pointers == ["model.safetensors"]


def test_no_source_means_demo_model() -> None:
    if DEMO_MODEL_DIR.is_dir():
        assert resolve_model(None) == resolve_model("") == DEMO_MODEL_DIR.resolve()
    else:
        with pytest.raises(ModelSourceError, match="embedded demo model is missing"):
            resolve_model(None)


# ---- git sources ----------------------------------------------------------------------------------

def test_git_lfs_clone_resolves_and_loads(remote: Path, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    path = resolve_model(remote.as_uri(), cache_dir=cache, retry=FAST)
    assert path.parent == cache and not (path / ".git").exists()
    assert sha256(path / "model.safetensors") == sha256(tiny_model / "model.safetensors")
    info = json.loads((path / SOURCE_INFO_FILE).read_text())
    assert info["source"] == remote.as_uri()
    assert info["revision"] == git("rev-parse", "main", cwd=remote).strip()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("Who are you?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    assert cache_entries(cache) == [path.name]  # no partial dir left


def test_bare_repo_path_and_cache_reuse_without_network(
    remote: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first = resolve_model(str(remote), cache_dir=cache, retry=FAST)
    stamp = (first / SOURCE_INFO_FILE).stat().st_mtime_ns
    commit = git("rev-parse", "main", cwd=remote).strip()
    shutil.rmtree(remote)  # the remote is gone: only the cache can answer now
    with caplog.at_level(logging.INFO, logger="infer_engine.model_source"):
        again = resolve_model(str(remote), cache_dir=cache, retry=FAST)
    assert again == first and (again / SOURCE_INFO_FILE).stat().st_mtime_ns == stamp
    assert f"(revision {commit}, fetched 20" in caplog.text and "--refresh fetches it again" in caplog.text
    with pytest.raises(ModelSourceError, match="git clone failed"):  # refresh really asks the (gone) remote
        resolve_model(str(remote), cache_dir=cache, retry=FAST, refresh=True)
    # The app's --refresh is that refresh.
    app = subprocess.run([sys.executable, "app.py", "--refresh", "--model", str(remote)], cwd=REPO,
                         env={**os.environ, "MODEL_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                         timeout=300)
    assert app.returncode == 1 and "app.py: cannot get the model:" in app.stderr
    assert "git clone failed" in app.stderr
    assert resolve_model(str(remote), cache_dir=cache) == first  # a failed refresh keeps the good copy
    (first / "model.safetensors").unlink()  # a damaged cache is reported, not served
    with pytest.raises(ModelSourceError, match=r"missing weights .*the cached copy of .*--refresh"):
        resolve_model(str(remote), cache_dir=cache)


def test_a_git_url_at_a_revision_serves_that_commit(tiny_model: Path, tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "pinned.git")
    work = tmp_path / "work"
    push_model_dir(tiny_model, bare.as_uri(), work)
    first = git("rev-parse", "main", cwd=bare).strip()
    (work / "v2_notes.txt").write_text("version 2")  # a second publish
    git("add", "--all", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "v2", cwd=work)
    git("push", "--quiet", bare.as_uri(), "HEAD:refs/heads/main", "HEAD:refs/heads/v2-branch", cwd=work)
    git("tag", "v1", first, cwd=work)
    git("push", "--quiet", bare.as_uri(), "v1", cwd=work)
    cache = tmp_path / "cache"
    for revision, expected in ((first[:9], first), ("v1", first), ("v2-branch", None)):
        path = resolve_model(f"{bare.as_uri()}@{revision}", cache_dir=cache, retry=FAST)
        assert sha256(path / "model.safetensors") == sha256(tiny_model / "model.safetensors")  # LFS pulled
        served = json.loads((path / SOURCE_INFO_FILE).read_text())["revision"]
        assert served == (expected or git("rev-parse", "main", cwd=bare).strip())
        assert (path / "v2_notes.txt").exists() is (expected is None)
    with pytest.raises(ModelSourceError, match=r"has no revision 'nope' \(give a commit id, tag or branch\)"):
        resolve_model(f"{bare.as_uri()}@nope", cache_dir=cache, retry=FAST)
    assert len(cache_entries(cache)) == 3  # one entry per revision, no partial dir


def test_remote_whose_head_names_an_unborn_branch_serves_its_main(tiny_model: Path, tmp_path: Path) -> None:
    # A plain `git init --bare` (git's default branch master): HEAD is master, the push was main.
    bare = tmp_path / "master.git"
    git("init", "--quiet", "--bare", "--initial-branch=master", str(bare))
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="has no commits: publish a model to it first"):
        resolve_model(bare.as_uri(), cache_dir=cache, retry=FAST)
    push_model_dir(tiny_model, bare.as_uri(), tmp_path / "work")
    path = resolve_model(bare.as_uri(), cache_dir=cache, retry=FAST)
    assert sha256(path / "model.safetensors") == sha256(tiny_model / "model.safetensors")  # LFS pulled
    revision = json.loads((path / SOURCE_INFO_FILE).read_text())["revision"]
    assert revision == git("rev-parse", "main", cwd=bare).strip()
    # Several branches and none of them main: which one holds the model is the owner's to say.
    git("push", "--quiet", bare.as_uri(), "main:refs/heads/a", "main:refs/heads/b", ":refs/heads/main",
        cwd=tmp_path / "work")
    with pytest.raises(ModelSourceError, match=r"branch without commits, and it has several \(a, b\)"):
        resolve_model(bare.as_uri(), cache_dir=tmp_path / "cache2", retry=FAST)
    assert cache_entries(tmp_path / "cache2") == []


def test_remote_without_lfs_objects_is_reported(tiny_model: Path, tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "broken.git")
    push_model_dir(tiny_model, bare.as_uri(), tmp_path / "work", upload_lfs_objects=False)
    cache = tmp_path / "cache"
    with pytest.raises(LfsPointerError, match=r"model\.safetensors.*git lfs pull` failed") as info:
        resolve_model(bare.as_uri(), cache_dir=cache, retry=FAST)
    assert info.value.pointers == ["model.safetensors"]
    assert cache_entries(cache) == []  # neither a target nor a partial dir


def test_clone_without_git_lfs_installed_is_reported(
    remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))  # git, but no git-lfs
    with pytest.raises(LfsPointerError, match="git-lfs is not installed"):
        resolve_model(remote.as_uri(), cache_dir=tmp_path / "cache", retry=FAST)


def test_killed_download_leaves_no_complete_looking_dir(remote: Path, tmp_path: Path) -> None:
    # git-lfs hands the download to a transfer agent that hangs, so the process is killed mid-download
    # (clone done, weights not yet there), as a user pressing Ctrl-C twice or an OOM kill would.
    agent = tmp_path / "hang.sh"
    agent.write_text("#!/bin/sh\nexec sleep 60\n")
    agent.chmod(0o755)
    cache = tmp_path / "cache"
    key = parse_source(remote.as_uri()).cache_key
    env = {**os.environ, "GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "lfs.customtransfer.hang.path",
           "GIT_CONFIG_VALUE_0": str(agent), "GIT_CONFIG_KEY_1": "lfs.standalonetransferagent",
           "GIT_CONFIG_VALUE_1": "hang"}
    cmd = [sys.executable, "-m", "infer_engine.model_source", remote.as_uri(), "--cache-dir", str(cache)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    partial = cache / f".{key}.partial"
    deadline = time.monotonic() + 60
    while not (partial / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)  # our own process group: the CLI, git, git-lfs and the agent
    proc.wait()
    assert not (cache / key).exists()  # nothing at the real location
    assert (partial / "config.json").exists() and (partial / "model.safetensors").stat().st_size < 200
    # The next start (transfers working again) discards the stale partial dir and completes.
    path = resolve_model(remote.as_uri(), cache_dir=cache, retry=FAST)
    assert path == cache / key and not partial.exists()
    assert (path / "model.safetensors").stat().st_size > 1000


def test_stop_signals_leave_an_ignored_hangup_ignored() -> None:
    # Under nohup SIGHUP is ignored: closing the terminal must not stop that run.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        replaced = interrupt_on_stop_signals(lambda signum, frame: None)
        assert set(replaced) == {signal.SIGTERM}
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert set(interrupt_on_stop_signals(lambda signum, frame: None)) == {signal.SIGTERM, signal.SIGHUP}
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_app_stopped_mid_download_stops_git_lfs_and_keeps_nothing(remote: Path, tmp_path: Path, sig) -> None:
    # As a Space stopping (SIGTERM to the app alone), Ctrl-C (SIGINT) or the terminal closed (SIGHUP; git runs
    # in its own process group, so the terminal's signal reaches only the app): git, git-lfs and its transfer
    # agent must go with the app.
    agent_pid = tmp_path / "agent.pid"
    agent = tmp_path / "hang.sh"
    agent.write_text(f"#!/bin/sh\necho $$ > {agent_pid}\nexec sleep 120\n")
    agent.chmod(0o755)
    cache = tmp_path / "cache"
    env = {**os.environ, "MODEL_CACHE_DIR": str(cache), "GIT_CONFIG_COUNT": "2",
           "GIT_CONFIG_KEY_0": "lfs.customtransfer.hang.path", "GIT_CONFIG_VALUE_0": str(agent),
           "GIT_CONFIG_KEY_1": "lfs.standalonetransferagent", "GIT_CONFIG_VALUE_1": "hang"}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", remote.as_uri()], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not agent_pid.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and agent_pid.exists(), proc.communicate()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "app.py: stopped while getting the model; start again to fetch it"
    assert "Traceback" not in stderr
    pid = int(agent_pid.read_text())
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:  # gone, not orphaned
        time.sleep(0.1)
    assert not running(pid)
    assert cache_entries(cache) == []  # neither the model nor a partial dir


def test_a_git_started_here_ends_when_this_process_is_killed_outright() -> None:
    # run_git's preexec: SIGKILL leaves no handler to stop git, so the kernel tells it (PR_SET_PDEATHSIG).
    code = ("import signal, subprocess; from infer_engine.model_source import on_parent_death; "
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=on_parent_death(signal.SIGTERM)); "
            "print(child.pid, flush=True); child.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


def test_transient_http_failure_is_retried_then_succeeds(tiny_model: Path, tmp_path: Path) -> None:
    # A real git HTTP server (dumb protocol, weights as plain blobs) that answers 503 to its first request.
    push_plain_repo(shutil.copytree(tiny_model, tmp_path / "work"),
                    make_bare_repo(tmp_path / "srv" / "model.git"))
    failures = [503]

    class FlakyHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "srv"), **kwargs)

        def do_GET(self) -> None:
            if failures:
                self.send_error(failures.pop())
            else:
                super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/model.git"
        path = resolve_model(url, cache_dir=tmp_path / "cache", retry=FAST)
    finally:
        server.shutdown()
    assert failures == [] and sha256(path / "model.safetensors") == sha256(tiny_model / "model.safetensors")


def test_network_failure_retries_with_backoff_then_one_clear_error(
    tmp_path: Path, offline_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://alice:urlSECRET42@code.openxlab.org.cn/me/ubub.git"
    caplog.set_level(logging.WARNING, logger="infer_engine.model_source")
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match=r"could not fetch https://code\.openxlab\.org\.cn/me/ubub"
                                               r"\.git after 3 attempt\(s\)") as info:
        resolve_model(url, cache_dir=tmp_path / "cache", retry=FAST)
    assert time.monotonic() - start >= 0.05 + 0.10
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "retrying in 0.05s" in retries[0] and "retrying in 0.10s" in retries[1]
    assert "urlSECRET42" not in str(info.value) + caplog.text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_permanent_git_failure_is_not_retried(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="git clone failed"):
        resolve_model((tmp_path / "nothing.git").as_uri(), cache_dir=tmp_path / "cache",
                      retry=RetryPolicy(attempts=3, base_delay=5))
    assert time.monotonic() - start < 5


# ---- hub sources: no hub is ever contacted --------------------------------------------------------

def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infer_engine.model_source", *args], env=env, text=True,
                          capture_output=True, timeout=120)


def test_hf_offline_gives_clear_error_then_uses_cache(tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fakeSECRET99"}
    failed = run_cli(["hf:someone/ubub@v1", "--cache-dir", str(cache)], env)
    assert failed.returncode == 1 and failed.stdout == ""
    assert "hf:someone/ubub@v1 is not in the model cache and HF_HUB_OFFLINE is set" in failed.stderr
    assert "hf_fakeSECRET99" not in failed.stderr
    assert cache_entries(cache) == []
    # What an earlier (online) start left in the cache is served with the hub still unreachable.
    shutil.copytree(tiny_model, cache / parse_source("hf:someone/ubub@v1").cache_key)
    cached = run_cli(["hf:someone/ubub@v1", "--cache-dir", str(cache)], env)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.strip() == str(cache / parse_source("hf:someone/ubub@v1").cache_key)


def test_openxlab_without_sdk_says_how_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['openxlab'] = None  # as in an env without the SDK\n"
            "from infer_engine.model_source import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "openxlab:me/ubub", "--cache-dir", str(tmp_path)],
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert "openxlab:me/ubub needs the openxlab SDK" in proc.stderr
    assert "pip install --no-deps openxlab==0.1.3" in proc.stderr


def test_openxlab_unreachable_is_retried_then_clear_error(
    tmp_path: Path, offline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openxlab", reason="openxlab is installed only in the dev env (--no-deps)")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the SDK reads/writes ~/.openxlab
    with pytest.raises(ModelSourceError, match=r"could not fetch openxlab:me/ubub after 3 attempt\(s\)"):
        resolve_model("openxlab:me/ubub", cache_dir=tmp_path / "cache", retry=FAST)
    assert cache_entries(tmp_path / "cache") == []


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    """The Hugging Face Hub routes ``snapshot_download`` (huggingface_hub 2.4) uses, serving one model repo
    from a directory: ``/api/models/OWNER/NAME/revision/REV`` (the commit), ``.../tree/REV`` (the files) and
    ``/OWNER/NAME/resolve/REV/FILE``."""

    repo_id = ""
    files: Path = Path()
    commit = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        info = f"/api/models/{self.repo_id}/revision/"
        tree = f"/api/models/{self.repo_id}/tree/"
        resolve = f"/{self.repo_id}/resolve/"
        path = self.path.split("?")[0]
        files = sorted(p for p in self.files.rglob("*") if p.is_file())
        if path.startswith(info):
            siblings = [{"rfilename": str(p.relative_to(self.files))} for p in files]
            body = json.dumps({"id": self.repo_id, "sha": self.commit, "siblings": siblings})
            self._send(200, body.encode(), {"Content-Type": "application/json"})
        elif path.startswith(tree):
            entries = [
                {"type": "file", "path": str(p.relative_to(self.files)), "size": p.stat().st_size, "oid": "0"}
                for p in files
            ]
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
        elif path.startswith(resolve) and (self.files / path[len(resolve):].split("/", 1)[1]).is_file():
            file = self.files / path[len(resolve):].split("/", 1)[1]
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{sha256(file)}"'}
            self._send(200, file.read_bytes(), headers)
        else:
            self._send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(tiny_model: Path) -> Iterator[str]:
    """A local HTTP server that answers as the Hugging Face Hub for ``someone/ubub`` (the tiny model)."""
    handler = type("Handler", (FakeHubHandler,), {"repo_id": "someone/ubub", "files": tiny_model})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hf_download_through_the_real_client_then_served_offline(
    fake_hub: str, tiny_model: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_ENDPOINT": fake_hub, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    downloaded = run_cli(["hf:someone/ubub@main", "--cache-dir", str(cache)], env)
    assert downloaded.returncode == 0, downloaded.stderr
    model_dir = Path(downloaded.stdout.strip())
    assert model_dir == cache / parse_source("hf:someone/ubub@main").cache_key
    for file in tiny_model.iterdir():
        assert sha256(model_dir / file.name) == sha256(file), file.name
    assert not (model_dir / ".cache").exists()  # the hub client's bookkeeping is not part of the model
    offline = run_cli(["hf:someone/ubub@main", "--cache-dir", str(cache)], {**env, "HF_HUB_OFFLINE": "1"})
    assert (offline.returncode, offline.stdout) == (0, downloaded.stdout)


def files_holding(root: Path, texts: tuple[str, ...]) -> list[str]:
    """The files under ``root`` that contain any of ``texts``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return [str(p) for p in files if any(t.encode() in p.read_bytes() for t in texts)]


class FakeOpenXLabHandler(http.server.BaseHTTPRequestHandler):
    """The OpenXLab routes the openxlab 0.1.3 SDK uses for ``openxlab.model.download``, serving one model repo
    from a directory: sign-in (``{sso}auth`` -> nonce, ``{sso}getJwt`` checks the HMAC of the nonce under the
    secret key), the model API (``getFileDownloadUrl`` -> one download URL per file, here on this server
    standing in for the file storage) and its usage beacon (``bury/collect``). Every reply is the SDK's
    nested ``{msgCode, data: {msgCode, data}}`` envelope. While serving a file it records every file under
    ``watch`` that holds a key, and the sign-in token files present then (where the SDK keeps its session)."""

    repo = ("", "")
    keys = ("", "")
    files: Path = Path()
    watch: Path = Path()
    jwt = "jwt-for-me"
    nonce = "n0nce-4711"
    log: list[str] = []
    keys_on_disk: list[str] = []
    token_files: list[str] = []
    changed = threading.Condition()

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reply(self, data: object, ok: bool = True) -> None:
        code = "10000" if ok else "10001"
        inner = {"msgCode": code, "msg": "ok" if ok else "refused", "traceId": "t", "data": data}
        body = {"msgCode": "10000", "msg": "ok", "traceId": "t", "data": inner}
        self._send(200, json.dumps(body).encode(), "application/json")

    def _record(self, entry: str) -> None:
        with self.changed:
            self.log.append(entry)
            self.changed.notify_all()

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path.split("?")[0]
        self._record(f"POST {path}")
        ak, sk = self.keys
        if path == "/sso/auth":
            self._reply({"nonce": self.nonce, "algorithm": "HmacSHA256"}, ok=payload["ak"] == ak)
        elif path == "/sso/getJwt":
            signed = base64.b64encode(hmac.new(sk.encode(), self.nonce.encode(), "sha256").digest()).decode()
            jwt = {"jwt": self.jwt, "expiration": "2099-01-01 00:00:00", "sso_uid": "u1",
                   "refresh_token": "r", "refresh_expiration": "2099-01-01 00:00:00"}
            self._reply(jwt, ok=(payload["ak"], payload["d"]) == (ak, signed))
        elif path.endswith("/cli/repository/getFileDownloadUrl"):
            ours = (payload["userName"], payload["repositoryName"]) == self.repo
            base = f"http://{self.headers['Host']}/storage/"
            urls = {p.name: {"url": base + p.name, "fileName": p.name, "hash": "0"}
                    for p in sorted(self.files.iterdir())}
            signed_in = self.headers.get("Authorization") == self.jwt
            self._reply({"modelNames": None, "filePaths": urls}, ok=ours and signed_in)
        elif path.endswith("/bury/collect"):
            self._reply({})
        else:
            self._send(404, b"{}", "application/json")

    def do_GET(self) -> None:
        name = self.path.removeprefix("/storage/")
        self.keys_on_disk.extend(files_holding(self.watch, self.keys))
        self.token_files.extend(str(p) for p in self.watch.rglob("token.json"))
        self._record(f"GET {self.path}")
        file = self.files / name
        if file.is_file():
            self._send(200, file.read_bytes(), "application/octet-stream")
        else:
            self._send(404, b"", "text/plain")


def test_openxlab_download_through_the_real_sdk_with_keys_kept_off_disk(
    tiny_model: Path, tmp_path: Path, offline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openxlab", reason="openxlab is installed only in the dev env (--no-deps)")
    from openxlab.config import const
    from openxlab.model.common import bury
    from openxlab.model.handler import download_file
    from openxlab.xlab.clients.auth_client import AuthClient
    from openxlab.xlab.handler import user_token

    keys = ("ak-FAKE-1234", SECRET)
    handler = type("Handler", (FakeOpenXLabHandler,), {
        "repo": ("me", "ubub"), "keys": keys, "files": tiny_model, "watch": tmp_path,
        "log": [], "keys_on_disk": [], "token_files": [], "changed": threading.Condition(),
    })
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}"
    # The SDK's endpoints are module constants: point them here; anything else dies on the dead proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(download_file, "endpoint", local)
    monkeypatch.setattr(bury, "endpoint", local)
    monkeypatch.setattr(user_token, "AUTH_CLIENT", AuthClient(f"{local}/sso/"))
    monkeypatch.setattr(const, "DEFAULT_CONFIG_DIR", str(tmp_path / "home" / ".openxlab"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("OPENXLAB_AK", keys[0])
    monkeypatch.setenv("OPENXLAB_SK", keys[1])
    cache = tmp_path / "cache"
    try:
        model_dir = resolve_model("openxlab:me/ubub", cache_dir=cache, retry=FAST)
        files = sorted(p.name for p in tiny_model.iterdir())
        with handler.changed:  # the SDK posts one usage beacon per file from a thread pool: let them land
            assert handler.changed.wait_for(lambda: handler.log.count(
                "POST /data-bury/api/v1/bury/collect") == len(files), timeout=60), handler.log
        assert model_dir == cache / parse_source("openxlab:me/ubub").cache_key
        for name in files:
            assert sha256(model_dir / name) == sha256(tiny_model / name), name
        assert json.loads((model_dir / SOURCE_INFO_FILE).read_text())["source"] == "openxlab:me/ubub"
        assert sorted(p for p in handler.log if p.startswith("GET")) == [f"GET /storage/{n}" for n in files]
        served = len(handler.log)
        assert resolve_model("openxlab:me/ubub", cache_dir=cache, retry=FAST) == model_dir
        assert len(handler.log) == served  # the cached copy is used without a request
    finally:
        server.shutdown()
        server.server_close()
    # The SDK signed in with the keys and kept its session token in a private temporary dir while the files
    # were served, and neither key was in any file under tmp_path (home, temp dirs, cache) then or after.
    assert handler.token_files and all(f.startswith(str(tmp_path / "tmp")) for f in handler.token_files)
    assert handler.keys_on_disk == []
    assert files_holding(tmp_path, keys) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_read_json_object_gives_an_empty_dict_for_anything_but_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    assert read_json_object(path) == {}  # missing
    for text, expected in (('{"model_type": "llama"}', {"model_type": "llama"}), ("[1, 2]", {}), ("nul", {}),
                           ("\ufeff{}", {}), ('"x"', {})):
        path.write_text(text, encoding="utf-8")
        assert read_json_object(path) == expected, text
    path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    assert read_json_object(path) == {}
    assert read_json_object(tmp_path) == {}  # a directory
