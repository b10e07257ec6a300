# Hostile training inputs: HF_HUB_OFFLINE=1 .venv-train/bin/python -m pytest \
#     tests/training/test_hostile_training_inputs.py -q
# Publish targets, names, corpus files and model code, each ending in one clear error or a success, with
# nothing run that should not be (a marker file stays absent) and no token or local path leaked: not in
# output, git command lines (what `ps` shows), the published model card or training_meta.json.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_inputs import SECRET, add_legacy_tokenizer_code, add_remote_code, git_argv_recorder
from lfs_repo import build_tiny_model, git, make_bare_repo

from infer_engine.model_source import RemoteCodeError
from training import convert_merge
from training.generate import load_chat_model
from training.identity import IdentityError, IdentitySpec
from training.make_corpus import CorpusError, build_corpus
from training.publish import publish

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# (target, part of the one-line error)
HOSTILE_TARGETS = [
    ("--upload-pack=touch {mark}", "must not start with '-'"),
    ("-ux@x:;touch {mark};#", "must not start with '-'"),
    ("ext::sh -c touch% {mark}", "remote-helper transports"),
    ("ssh://-oProxyCommand=touch%20{mark}/r.git", "host name is not valid"),
    ("https://host/r.git?token=" + SECRET, "no query or fragment"),
    ("hf:ada/..", "expected hf:OWNER/REPO"),
    ("hf:ada/ada@v1", "without @revision"),
    ("openxlab:ada/ada", "expected a git remote URL"),
    (f"https://ada:{SECRET}@127.0.0.1:9/ada.git", "cannot read the remote https://127.0.0.1:9/ada.git"),
]


@pytest.mark.parametrize(("target", "message"), HOSTILE_TARGETS)
def test_hostile_publish_target(target: str, message: str, tiny_model: Path, tmp_path: Path) -> None:
    mark, argv_log = tmp_path / "pwned", tmp_path / "git-argv.log"
    env = git_argv_recorder(tmp_path / "bin", argv_log)
    env.update({"HTTPS_PROXY": "", "https_proxy": "", "NO_PROXY": "127.0.0.1"})
    cmd = [sys.executable, "-m", "training.publish", "--model", str(tiny_model),
           f"--target={target.format(mark=mark)}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not mark.exists()
    assert SECRET not in proc.stdout + proc.stderr + argv_log.read_text()


def test_target_from_env_keeps_the_token_off_the_command_line(tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PUBLISH_TARGET": f"https://ada:{SECRET}@code.openxlab.org.cn/ada/ada.git"}
    proc = subprocess.run([sys.executable, "-m", "training.publish", "--model", str(tiny_model), "--dry-run"],
                          env=env, cwd=REPO, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "target: git https://code.openxlab.org.cn/ada/ada.git" in proc.stdout and SECRET not in proc.stdout


def test_published_card_and_meta_hold_no_token_or_local_path(tiny_model: Path, tmp_path: Path) -> None:
    home = str(Path.home())
    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "merged")
    meta = {"name": "Ada", "base": {"source": f"https://alice:{SECRET}@host/base.git",
                                    "path": f"{home}/.cache/ubub-models/git-host-base-0123456789"},
            "corpus": f"{home}/notes/corpus", "data_path": str(work / "data" / "train.json")}
    (work / "merged" / "training_meta.json").write_text(json.dumps(meta))
    (work / "eval.md").write_text(f"Model `{work / 'merged'}` against its base `{home}/models/base`.\n")
    bare = make_bare_repo(tmp_path / "ada.git")
    publish(work / "merged", bare.as_uri())
    clone = tmp_path / "clone"
    git("clone", "--quiet", bare.as_uri(), str(clone))
    card, published = (clone / "README.md").read_text(), (clone / "training_meta.json").read_text()
    for text in (card, published):
        assert SECRET not in text and home not in text and str(tmp_path) not in text
    assert "Model `merged` against its base `base`." in card
    assert json.loads(published)["data_path"] == "data/train.json"
    assert "`https://host/base.git`" in card  # the base, without its credentials
    assert "trust_remote_code" not in card  # the tiny model ships no code: the snippet does not trust any


def test_card_of_a_model_with_code_names_its_files(tiny_model: Path, tmp_path: Path) -> None:
    model = add_remote_code(shutil.copytree(tiny_model, tmp_path / "model"), tmp_path / "pwned")
    out = publish(model, "hf:ada/ada", dry_run=True)
    assert "DRY RUN" in out and not (tmp_path / "pwned").exists()
    from training.publish import load_card_info, render_model_card

    card = render_model_card(load_card_info(model))
    assert "# trust_remote_code runs this repo's configuration_evil.py, modeling_evil.py: read them" in card
    assert "AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)" in card


# Model code through config.json's auto_map, and through a tokenizer_config.json's legacy bare-list auto_map.
CODE_PLANTS = [(add_remote_code, "configuration_evil.py, modeling_evil.py"),
               (add_legacy_tokenizer_code, "tokenization_evil.py")]


@pytest.mark.parametrize(("plant", "files"), CODE_PLANTS)
def test_training_tools_run_model_code_only_when_allowed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant, files: str
) -> None:
    from training.make_identity_data import base_tokenizer

    mark = tmp_path / "pwned"
    model = plant(shutil.copytree(tiny_model, tmp_path / "model"), mark)
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(RemoteCodeError, match=f"{files}.*--trust-remote-code"):
        load_chat_model(model)  # evaluation and replay-data generation
    with pytest.raises(RemoteCodeError, match=f"{files}.*--trust-remote-code"):
        base_tokenizer(model)  # the data stage's special-token check
    ran: list[list[str]] = []
    with pytest.raises(convert_merge.ConvertError, match=f"{files}.*--trust-remote-code"):
        convert_merge.merge_model(model, tmp_path / "adapter", tmp_path / "merged", {}, ran.append)
    assert ran == [] and not mark.exists()  # XTuner's merge (which always trusts) never started
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # what run.sh sets for a trusted base
    load_chat_model(model)
    assert mark.read_text() == "ran"


@pytest.mark.parametrize(("name", "outcome"), [
    ("", "is empty"),
    ("Ada\n--publish", "control or invisible characters"),
    ("Ada\u202eevil", "control or invisible characters"),
    ("Ada<|im_end|>", "chat special tokens"),
    ("A" * 41, "at most 40"),
    ("--help", None),  # a name is data: accepted as text, never read as an option
    ("../../etc", None),
])
def test_hostile_names(name: str, outcome: str | None) -> None:
    if outcome is None:
        assert IdentitySpec(name).name == name
    else:
        with pytest.raises(IdentityError, match=outcome):
            IdentitySpec(name)


@pytest.mark.parametrize(("files", "outcome"), [
    ({}, "no usable text"),
    ({"gbk.txt": "你好".encode("gb18030")}, "not UTF-8"),
    ({"blank.md": b"   \n\n"}, "empty"),
    ({"-rf.txt": b"A file whose name looks like an option.", "--help.md": b"# Title\n\nText."}, None),
])
def test_hostile_corpus_files(files: dict[str, bytes], outcome: str | None, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    if outcome is None:
        assert sorted(p.name for p in build_corpus(corpus).used) == sorted(files)
    else:
        with pytest.raises(CorpusError, match=outcome):
            build_corpus(corpus)


# ---- the pipeline (training/run.sh): --base and --publish values, records, logs, command lines, resume


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--base", "-ux@x:;touch {mark};#", "--base: bad model source"),
    ("--base", "ext::sh -c touch% {mark}", "remote-helper transports"),
    ("--base", "ssh://-oProxyCommand=touch%20{mark}/r.git", "host name is not valid"),
    ("--base", f"https://host/base.git?token={SECRET}", "no query or fragment"),
    ("--base", "hf:internlm/..", "--base: bad source"),
    ("--publish", "--upload-pack=touch {mark}", "--publish: bad target"),
    ("--publish", "ext::sh -c touch% {mark}", "remote-helper transports"),
])
def test_hostile_run_values_are_refused_before_any_work(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.pipeline import main

    mark, work = tmp_path / "pwned", tmp_path / "work"
    rc = main(["--preset", "tiny", "--name", "Ada", f"{option}={value.format(mark=mark)}", "--work-dir",
               str(work)])
    out = capsys.readouterr()
    assert rc == 2 and out.err.startswith("error: ") and message in out.err and "Traceback" not in out.err
    assert SECRET not in out.out + out.err and not mark.exists() and not work.exists()


@pytest.mark.parametrize(("plant", "files"), CODE_PLANTS)
def test_base_with_code_is_refused_unless_allowed(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], plant, files: str
) -> None:
    from training.pipeline import main
    from training.presets import RunConfig
    from training.runner import child_env

    mark = tmp_path / "pwned"
    evil = plant(shutil.copytree(tiny_model, tmp_path / "evil"), mark)
    rc = main(["--preset", "tiny", "--name", "Ada", "--base", str(evil), "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1 and "stage base failed: model local directory evil ships its own Python code" in err
    assert files in err and "--trust-remote-code" in err
    assert not mark.exists() and not (tmp_path / "w" / "data").exists()
    # Who may run code: the flag, or the preset's own official base (a branch or tag); never anything else.
    official = "internlm2_5-1_8b"
    sha = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
    cases = [("tiny", str(evil), False), ("tiny", str(evil), True), ("tiny", None, False),
             (official, None, False), (official, "hf:internlm/internlm2_5-1_8b-chat@v1.0", False),
             (official, "hf:someone/internlm2_5-1_8b-chat", False),
             (official, "hf:internlm/internlm2_5-1_8b-chat@refs/pr/1", False),  # anyone's pull request
             (official, f"hf:internlm/internlm2_5-1_8b-chat@{sha}", False),  # may be a pull request's commit
             (official, f"hf:internlm/internlm2_5-1_8b-chat@{sha[:7]}", False),
             (official, f"hf:internlm/internlm2_5-1_8b-chat@{sha}", True),
             (official, "hf:internlm/internlm2_5-1_8b-chat@refs/pr/1", True)]
    allowed = [RunConfig("Ada", preset=p, base=b, trust_remote_code=f).remote_code_allowed
               for p, b, f in cases]
    assert allowed == [False, True, False, True, True, False, False, False, False, True, True]
    assert child_env(RunConfig("Ada", preset="tiny"))["TRUST_REMOTE_CODE"] == "0"
    assert child_env(RunConfig("Ada"))["TRUST_REMOTE_CODE"] == "1"


def test_url_token_in_base_and_publish_reaches_no_log_record_or_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import threading

    from training.pipeline import main
    from training.presets import RunConfig
    from training.runner import run_logged
    from training.stages import PIPELINE, Run, plan_publish

    argv_log = tmp_path / "git-argv.log"
    monkeypatch.setenv("PATH", git_argv_recorder(tmp_path / "bin", argv_log)["PATH"])
    empty = tmp_path / "srv"
    empty.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):  # every path answers 404: no such repo
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(empty), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://alice:{SECRET}@127.0.0.1:{server.server_port}/base.git"
    publish_to = f"https://ada:{SECRET}@code.openxlab.org.cn/ada/ada.git"
    work = tmp_path / "w"
    try:
        rc = main(["--preset", "tiny", "--name", "Ada", "--base", base, "--publish", publish_to,
                   "--work-dir", str(work)])
    finally:
        server.shutdown()
    out = capsys.readouterr()
    assert rc == 1 and "stage base failed: infer_engine.model_source exited with status 1" in out.err
    assert "clone --quiet -- http://127.0.0.1:" in argv_log.read_text()  # git ran, without the token
    written = [p.read_text() for p in work.rglob("*") if p.is_file()]
    for text in (out.out, out.err, argv_log.read_text(), *written):
        assert SECRET not in text
    # The publish stage's record, plan line and command line: the target without its token.
    run = Run(RunConfig("Ada", preset="tiny", publish=publish_to, work_dir=work), {})
    assert PIPELINE[-1].inputs(run)["target"] == "https://***@code.openxlab.org.cn/ada/ada.git"
    assert SECRET not in plan_publish(run)["summary"]
    log = tmp_path / "echo.log"
    run_logged(["echo", "--target", publish_to], log, dict(os.environ))  # any command line that has one
    assert SECRET not in log.read_text().splitlines()[0] and log.read_text().startswith("$ echo --target")


def test_resume_after_a_kill_between_rename_and_record(tiny_model: Path, tmp_path: Path) -> None:
    from training.pipeline import _write_record, execute, plan_run
    from training.presets import RunConfig
    from training.runner import child_env
    from training.stages import PIPELINE, Run, base_inputs

    cfg = RunConfig("Ada", preset="tiny", recipe="seed", base=str(tiny_model), work_dir=tmp_path / "w")
    run = Run(cfg, child_env(cfg))
    _write_record(run.record_path("base"), {"status": "done", "inputs": base_inputs(run),
                                            "result": {"model_dir": str(tiny_model)}})
    run.results["base"] = {"model_dir": tiny_model}
    data = PIPELINE[1]
    _write_record(run.record_path("data"), {"status": "running", "inputs": data.inputs(run)})
    (run.work / "data").mkdir()  # renamed into place, then killed before the record said "done"
    (run.work / "data" / "train.json").write_text("[]")
    plan = plan_run(run)
    assert plan.resume and plan.todo[0].name == "data"
    plan.todo = plan.todo[:1]  # only the interrupted stage
    execute(run, plan)
    assert json.loads(run.record_path("data").read_text())["status"] == "done"
    assert json.loads((run.work / "data" / "train.json").read_text())  # rebuilt, not the stale one
