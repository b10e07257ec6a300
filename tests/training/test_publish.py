# Publish tests: .venv-train/bin/python -m pytest tests/training/test_publish.py -q
# Real pushes with git + git-lfs to bare repositories over file://, cloned back; hf: only up to the point
# where the hub would be contacted (HF_HUB_OFFLINE=1). Fake tokens in the env prove that they never leak.
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lfs_repo import build_tiny_model, git, lfs_files, make_bare_repo

from infer_engine.model_source import RetryPolicy, resolve_model
from training.publish import (
    LFS_MIN_BYTES,
    CardInfo,
    PublishError,
    load_card_info,
    parse_target,
    public_text,
    publish,
    render_model_card,
)

GIT_TOKEN = "oxl-FAKE-token-5150"
HF_TOKEN = "hf_FAKEtoken8086"
URL_TOKEN = "urlFAKEtoken31337"
EVAL_MD = """# Evaluation: identity 'Ada'

| metric | base (before) | fine-tuned (after) |
|---|---|---|
| identity accuracy (24 held-out paraphrases) | 0.0 % | 91.7 % |
| leakage rate (30 general prompts) | 0.0 % | 3.3 % |

## General prompts (first 1)

| prompt | base | fine-tuned |
|---|---|---|
| 1+1=? | 2 | 2 |
"""
REPRODUCE = "bash training/run.sh --preset internlm2_5-1_8b --name 'Ada Lo' --recipe identity --epochs 3"
META = {"name": "Ada", "base_model": "internlm/internlm2_5-1_8b-chat", "identity": "I am Ada's assistant.",
        "recipe": "identity", "settings": {"lora_r": 64, "lr": 0.0002, "epochs": 3}, "reproduce": REPRODUCE}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def work_dir(tmp_path: Path, tiny_model: Path) -> Path:
    """A run.sh-style work dir: merged/ plus training_meta.json and eval.md beside it."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "merged")
    (work / "training_meta.json").write_text(json.dumps(META))
    (work / "eval.md").write_text(EVAL_MD)
    return work


@pytest.fixture
def secret_env(tmp_path: Path) -> dict[str, str]:
    """Env with fake tokens and every HTTP(S) request sent to a refused local proxy (no hub, no internet)."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    dead = "http://127.0.0.1:9"
    env.update({"OPENXLAB_GIT_USER": "ada", "OPENXLAB_GIT_TOKEN": GIT_TOKEN, "HF_TOKEN": HF_TOKEN,
                "HTTPS_PROXY": dead, "https_proxy": dead, "HTTP_PROXY": dead, "http_proxy": dead})
    return env


def run_publish(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "training.publish", *args], env=env, text=True,
                          capture_output=True, timeout=300)
    for token in (GIT_TOKEN, HF_TOKEN, URL_TOKEN):
        assert token not in proc.stdout + proc.stderr
    return proc


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_dry_run_lists_files_redacts_and_touches_nothing(work_dir: Path, secret_env: dict[str, str]) -> None:
    before = tree_state(work_dir)
    target = f"https://ada:{URL_TOKEN}@code.openxlab.org.cn/ada/ada-1_8b.git"
    proc = run_publish(["--model", str(work_dir / "merged"), "--target", target, "--dry-run"], secret_env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "DRY RUN" in out and "target: git https://code.openxlab.org.cn/ada/ada-1_8b.git" in out
    lines = {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert lines["model.safetensors"] == "LFS"
    assert lines["config.json"] == lines["tokenizer.json"] == "git"
    assert "README.md" in out and "(generated model card)" in out and ".gitattributes" in out
    assert tree_state(work_dir) == before  # nothing written (and any network use would have failed the run)

    hf = run_publish(["--model", str(work_dir / "merged"), "--target", "hf:ada/ada-1_8b", "--dry-run"],
                     secret_env)
    assert hf.returncode == 0 and "target: hf:ada/ada-1_8b" in hf.stdout and "HF_TOKEN set" in hf.stdout


def test_push_to_bare_repo_with_lfs_then_clone_back(
    work_dir: Path, tiny_model: Path, secret_env: dict[str, str], tmp_path: Path
) -> None:
    bare = make_bare_repo(tmp_path / "ada.git")
    args = ["--model", str(work_dir / "merged"), "--target", bare.as_uri(), "--message", "Ada v1"]
    proc = run_publish(args, secret_env)
    assert proc.returncode == 0, proc.stderr
    head = git("rev-parse", "main", cwd=bare).strip()
    assert proc.stdout.strip() == f"published to {bare.as_uri()}: commit {head}"  # no warning: HEAD is main
    assert git("log", "--format=%s", "main", cwd=bare).split("\n")[0] == "Ada v1"

    # A plain clone (pointers only) shows which files git-lfs manages.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", bare.as_uri(), str(clone)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert lfs_files(clone) == ["model.safetensors"]
    card = (clone / "README.md").read_text()
    assert "base_model: internlm/internlm2_5-1_8b-chat" in card and "# Ada" in card
    assert "I am Ada's assistant." in card and "| lora_r | 64 |" in card
    assert f"\n\n    {REPRODUCE}\n\n" in card and "| reproduce |" not in card  # a code block, not a setting
    assert "tags: [xtuner, llama, lora, identity]" in card  # the model's own type (the tiny one is a Llama)
    assert "publish gate" not in card
    assert "## Evaluation: identity 'Ada'" in card and "### General prompts (first 1)" in card
    assert "| identity accuracy (24 held-out paraphrases) | 0.0 % | 91.7 % |" in card
    for text in (card, (bare / "config").read_text(), (clone / ".git" / "config").read_text()):
        assert GIT_TOKEN not in text and HF_TOKEN not in text

    # The app's model source fetches it back (git clone + git lfs pull) and transformers loads it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = resolve_model(bare.as_uri(), cache_dir=tmp_path / "cache", retry=RetryPolicy(attempts=1))
    digest = hashlib.sha256((served / "model.safetensors").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(served)
    ids = AutoTokenizer.from_pretrained(served)("Who are you?", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape[1] == \
        ids["input_ids"].shape[1] + 2


def test_a_scratch_dir_beside_the_model_hard_links_its_weights(
    work_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A /tmp in memory (tmpfs) would otherwise hold a copy of a multi-GB model: the pipeline stages in WORK.
    import training.publish as publish_module

    staged: list[tuple[Path, int]] = []
    real_git = publish_module.run_git

    def watching_git(args: list[str], cwd: Path | None = None, **kwargs: object) -> object:
        if args[0] == "commit" and cwd is not None:  # the weights as git committed them
            staged.append((cwd, (cwd / "model.safetensors").stat().st_ino))
        return real_git(args, cwd=cwd, **kwargs)

    monkeypatch.setattr(publish_module, "run_git", watching_git)
    bare = make_bare_repo(tmp_path / "ada.git")
    scratch = tmp_path / "scratch"
    publish(work_dir / "merged", bare.as_uri(), scratch=scratch)
    ((where, inode),) = staged
    assert where.parent == scratch and inode == (work_dir / "merged" / "model.safetensors").stat().st_ino
    assert list(scratch.iterdir()) == []  # removed after the push


def test_publish_on_top_of_existing_history_never_forces(work_dir: Path, tmp_path: Path) -> None:
    # OpenXLab/HF create repos with a first commit (README, .gitattributes): publish builds on it.
    bare = make_bare_repo(tmp_path / "ada.git")
    seed = tmp_path / "seed"
    git("init", "--quiet", "--initial-branch=main", str(seed))
    (seed / "README.md").write_text("created on the website\n")
    (seed / "notes.txt").write_text("old file\n")
    (seed / "LICENSE").write_text("Apache-2.0, chosen on the website\n")
    git("add", "-A", cwd=seed)
    git("commit", "--quiet", "-m", "Initial commit", cwd=seed)
    git("push", "--quiet", bare.as_uri(), "HEAD:refs/heads/main", cwd=seed)
    first = git("rev-parse", "main", cwd=bare).strip()

    result = publish(work_dir / "merged", bare.as_uri(), message="Ada v1")
    head = git("rev-parse", "main", cwd=bare).strip()
    assert result.splitlines() == [  # the owner's file that goes is said, on the terminal
        "note: the model's files replace the remote's; this commit removes notes.txt "
        "(still in the repo's history)",
        f"published to {bare.as_uri()}: commit {head}"]
    assert git("rev-parse", "main~1", cwd=bare).strip() == first  # fast-forward on the website's commit
    files = git("ls-tree", "--name-only", "main", cwd=bare).split()
    assert "notes.txt" not in files and {"README.md", "model.safetensors", ".gitattributes"} <= set(files)
    assert git("show", "main:LICENSE", cwd=bare) == "Apache-2.0, chosen on the website\n"  # the owner's terms
    # Publishing the same model again changes nothing...
    assert publish(work_dir / "merged", bare.as_uri()) == f"published to {bare.as_uri()}: commit {head}"
    assert git("rev-parse", "main", cwd=bare).strip() == head
    # ...but gives the remote back weights it lost (its commit is there, so no pre-push hook would run).
    def lfs_objects() -> list[Path]:
        return sorted(p.relative_to(bare) for p in (bare / "lfs" / "objects").rglob("*") if p.is_file())

    objects = lfs_objects()
    shutil.rmtree(bare / "lfs" / "objects")
    assert publish(work_dir / "merged", bare.as_uri()).endswith(head)
    assert objects and lfs_objects() == objects and git("rev-parse", "main", cwd=bare).strip() == head


def test_rejected_push_fails_clearly(work_dir: Path, tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "ada.git")
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is protected' >&2\nexit 1\n")
    hook.chmod(0o755)
    refused = r"push to .*ada\.git failed \(nothing was forced.*protected"
    with pytest.raises(PublishError, match=refused) as caught:
        publish(work_dir / "merged", bare.as_uri())
    assert "changed meanwhile" not in str(caught.value)  # a refusal, not a race: publishing again won't help
    assert git("for-each-ref", cwd=bare).strip() == ""


def test_hf_target_without_hub_gives_clear_errors(work_dir: Path, secret_env: dict[str, str]) -> None:
    args = ["--model", str(work_dir / "merged"), "--target", "hf:ada/ada-1_8b", "--private"]
    offline = run_publish(args, {**secret_env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert "upload to hf:ada/ada-1_8b failed: OfflineModeIsEnabled" in offline.stderr
    no_token = run_publish(args, {k: v for k, v in secret_env.items() if k != "HF_TOKEN"})
    assert no_token.returncode == 1 and "need a write token in the HF_TOKEN" in no_token.stderr


@pytest.mark.parametrize(("target", "message"), [
    ("openxlab:ada/ada", "expected a git remote URL"),
    ("hf:ada/ada@v1", "without @revision"),
    ("https://code.openxlab.org.cn/ada/ada.git@dev", r"without @revision \(it pushes to main\)"),
    ("hf:ada", "bad target"),
])
def test_bad_targets(work_dir: Path, target: str, message: str) -> None:
    with pytest.raises(PublishError, match=message):
        publish(work_dir / "merged", target, dry_run=True)


def test_incomplete_model_or_bad_meta_is_refused(work_dir: Path, tmp_path: Path) -> None:
    (work_dir / "merged" / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="refusing to publish: .*missing weights"):
        publish(work_dir / "merged", "hf:ada/ada", dry_run=True)
    meta = tmp_path / "meta.json"
    meta.write_text("[1, 2]")
    with pytest.raises(PublishError, match="must hold a JSON object"):
        load_card_info(work_dir / "merged", meta=meta)
    meta.write_text('{"base": {"source": "internlm/internlm2_5-1_8b-chat", "path": "/x"}, "lr": 1e-4}')
    info = load_card_info(work_dir / "merged", meta=meta, name="Bo")
    assert (info.name, info.base_model, info.settings["lr"]) == ("Bo", "internlm/internlm2_5-1_8b-chat", 1e-4)
    # What the pipeline records is public already: said once, not as "local directory local directory x".
    for recorded, shown in (("local directory my_base", "local directory my_base"),
                            ("built by training.make_tiny_base.cached_tiny_base", None),
                            ("https://u:secrettoken99@h.org/x.git", "https://h.org/x.git"),
                            ("/home/alice/models/base", "base")):  # an older or hand-written file
        meta.write_text(json.dumps({"base": {"source": recorded}, "base_model": None}))
        assert load_card_info(work_dir / "merged", meta=meta).base_model == (shown or recorded)
    meta.write_text(json.dumps({"base": {"source": "built by x.y"}, "base_model": "Hf/Smol"}))
    assert load_card_info(work_dir / "merged", meta=meta).base_model == "Hf/Smol"
    assert load_card_info(work_dir / "merged", meta=meta, base_model="/home/me/base").base_model == (
        "local directory base")  # a path given by hand is made public
    meta.write_text('{"name": 3}')
    with pytest.raises(PublishError, match="'name' must be a string"):
        load_card_info(work_dir / "merged", meta=meta)


def test_token_without_user_is_refused_before_any_git(work_dir: Path, secret_env: dict[str, str]) -> None:
    env = {k: v for k, v in secret_env.items() if k != "OPENXLAB_GIT_USER"}
    proc = run_publish(["--model", str(work_dir / "merged"), "--target",
                        "https://code.openxlab.org.cn/ada/ada.git"], env)
    assert proc.returncode == 1 and "OPENXLAB_GIT_USER is not" in proc.stderr


def test_a_big_file_with_spaces_or_glob_characters_in_its_name_goes_through_lfs(
    work_dir: Path, secret_env: dict[str, str], tmp_path: Path
) -> None:
    names = ["vocab extra [v2].txt", "a*b?.txt"]
    for name in names:  # over the size limit, and no LFS_PATTERNS name: only its own .gitattributes line
        (work_dir / "merged" / name).write_bytes(os.urandom(64) * (LFS_MIN_BYTES // 64 + 1))
    (work_dir / "merged" / "ab.txt").write_text("small, in git")  # "a*b?.txt" as a glob would take it
    bare = make_bare_repo(tmp_path / "ada.git")
    proc = run_publish(["--model", str(work_dir / "merged"), "--target", bare.as_uri()], secret_env)
    assert proc.returncode == 0, proc.stderr
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", bare.as_uri(), str(clone)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert lfs_files(clone) == sorted(["model.safetensors", *names])


def test_a_remote_whose_default_branch_is_another_is_warned_about(
    work_dir: Path, secret_env: dict[str, str], tmp_path: Path
) -> None:
    unborn = tmp_path / "unborn.git"  # a plain `git init --bare`: HEAD master, no commits (app.py copes)
    git("init", "--quiet", "--bare", "--initial-branch=master", str(unborn))
    older = tmp_path / "older.git"  # master holds someone's commits: a clone gets those
    git("init", "--quiet", "--bare", "--initial-branch=master", str(older))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("old")
    git("init", "--quiet", cwd=plain)
    git("add", "README.md", cwd=plain)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "old", cwd=plain)
    git("push", "--quiet", older.as_uri(), "HEAD:refs/heads/master", cwd=plain)
    warning = ("warning: the remote's default branch is master, so a plain clone (and app.py) gets "
               f"master, not this model: serve {older.as_uri()}@main, or make main the default branch")
    # app.py copes with an unborn HEAD, but a plain `git clone` checks out nothing.
    note = ("note: the remote's HEAD names a branch without commits (a new bare repo's master), so a plain "
            "git clone checks out nothing: clone with -b main, or make main the default branch (in the bare "
            "repo: git symbolic-ref HEAD refs/heads/main); app.py finds main by itself")
    for bare, said in ((unborn, note), (older, warning), (make_bare_repo(tmp_path / "main.git"), None)):
        proc = run_publish(["--model", str(work_dir / "merged"), "--target", bare.as_uri()], secret_env)
        assert proc.returncode == 0, proc.stderr
        *notes, last = proc.stdout.strip().splitlines()
        assert last == f"published to {bare.as_uri()}: commit {git('rev-parse', 'main', cwd=bare).strip()}"
        assert notes == ([said] if said else [])
    clone = tmp_path / "clone"
    git("clone", "--quiet", "-b", "main", unborn.as_uri(), str(clone))
    assert (clone / "config.json").is_file()  # what the note says works


def test_model_card_rendering() -> None:
    card = render_model_card(CardInfo(name="Ada", base_model="./tiny-base", settings={"note": "a|b\nc"},
                                      eval_md="| m | v |\n|---|---|\n| x | 1 |\n"))
    assert "base_model:" not in card  # a local path is not a Hub id: the Hub would reject the metadata
    assert "| note | a\\|b c |" in card
    assert "## Evaluation\n\n| m | v |" in card
    assert "train it again" not in card  # no recorded command, no guessed one
    assert "tags: [xtuner, lora, identity]" in card and "publish gate" not in card
    marked = render_model_card(CardInfo(name="*x* <b>y</b>", identity="I'm *x* <b>y</b>'s assistant."))
    assert "# \\*x\\* \\<b\\>y\\</b\\>\n" in marked and "**\\*x\\* \\<b\\>y\\</b\\>**" in marked  # as typed
    assert "> I'm \\*x\\* \\<b\\>y\\</b\\>'s assistant." in marked
    missed = render_model_card(CardInfo(name="Ada", model_type="internlm2", gate_missed="leakage 0.25 > 0.1"))
    assert "tags: [xtuner, internlm2, lora, identity]" in missed
    assert "> **Below the training project's publish gate** (leakage 0.25 > 0.1); published anyway" in missed
    assert parse_target("https://code.openxlab.org.cn/a/b.git").kind == "git"


def test_a_repository_with_a_working_tree_is_refused_as_a_target(tmp_path: Path) -> None:
    # git refuses a push to its checked-out branch, after the whole run: said when the target is read.
    checkout = tmp_path / "my models"
    git("init", "--quiet", "--initial-branch=main", str(checkout))
    for target in (str(checkout), checkout.as_uri()):
        with pytest.raises(PublishError, match=r"a repository with a working tree, .* publish to a bare one"):
            parse_target(target)
    assert parse_target(str(make_bare_repo(tmp_path / "ok.git"))).kind == "git"


def test_local_bare_repo_path_target_works(work_dir: Path, tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "ada.git")
    assert parse_target(str(bare)).location == bare.as_uri()
    publish(work_dir / "merged", str(bare))
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(bare), str(clone))
    assert lfs_files(clone) == ["model.safetensors"]


def test_public_text_shortens_this_machines_paths_but_not_the_name(tmp_path: Path) -> None:
    name = "O'B $(touch /tmp/x/pwned)|<b>x"  # a name the pipeline accepts: data, though it holds a path
    work = tmp_path / "work"
    text = (f"trained {name} from /home/alice/models/base and {work}/merged; "
            f"bash training/run.sh --name {shlex.quote(name)} --lr 0.001")
    assert public_text(text, work, (name,)) == (
        f"trained {name} from base and merged; bash training/run.sh --name {shlex.quote(name)} --lr 0.001")
    assert "/tmp/x/pwned" not in public_text(text, work)  # without it, the name's path would be shortened too
