# The training pipeline: config rendering, run settings, and real runs of `bash training/run.sh --preset tiny`
# (XTuner on CPU) end to end, rerun, resumed after a kill, rerun --from a stage, and failing with one line.
# Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_pipeline.py      # -m "not slow" skips the runs
import json
import os
import random
import re
import shlex
import shutil
import signal
import string
import subprocess
import time
from pathlib import Path

import pytest

from training.config_render import ConfigRenderError, literal_settings, render_config, template_settings
from training.evaluate import IDENTITY_MAX_NEW_TOKENS
from training.general_chat import replay_prompts
from training.identity import IdentitySpec
from training.make_identity_data import (
    IDENTITY_REPEAT,
    identity_pairs,
    identity_questions,
    training_replay_prompts,
)
from training.pipeline import _normalised, _write_record, parse_args, plan_run
from training.presets import (
    PRESETS,
    PUBLISH_MAX_LEAKAGE_RATE,
    PUBLISH_MIN_IDENTITY_ACCURACY,
    REPO_ROOT,
    STAGES,
    RunConfig,
    RunConfigError,
    reproduce_command,
    slug,
)
from training.runner import StageError, failure_reason
from training.stages import (
    PIPELINE,
    Run,
    _base_arg,
    base_model_id,
    data_command,
    identity_answers,
    identity_markers,
    latest_checkpoint,
    lost_checkpoint,
    plan_sft,
    publish_gate,
)

RUN_SH = REPO_ROOT / "training" / "run.sh"
SFT_ITERS = 300  # the tiny preset's default: enough for the identity to be learned
RUN_STAGES = [s for s in STAGES if s not in ("pretrain", "publish")]


def run_sh(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN_SH), *args], capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------- config rendering

TEMPLATE = '''# header comment
import torch

name_or_path = "placeholder"  # set by the pipeline
max_iters = 10
prompts = [
    "a",
    "b",
]
model = dict(path=name_or_path, steps=max_iters)
'''


def test_render_replaces_exactly_the_named_values_and_keeps_the_rest():
    overrides = {"name_or_path": "/m/基座", "prompts": ["你是谁？", "x"]}
    rendered = render_config(TEMPLATE, overrides, "# rendered\n")
    assert rendered == TEMPLATE.replace('"placeholder"', "'/m/基座'").replace(
        '[\n    "a",\n    "b",\n]', "['你是谁？', 'x']").replace("# header", "# rendered\n# header", 1)


def test_render_edits_after_non_ascii_text_on_the_same_line():
    source = 'a = "模型"; b = 1\n'  # ast columns are byte offsets: the edit must not shift
    assert render_config(source, {"b": 22}) == 'a = "模型"; b = 22\n'


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        (TEMPLATE, {"max_iter": 5}, "'max_iter' matches no top-level setting"),
        (TEMPLATE, {"path": "x"}, "'path' matches no top-level setting"),  # a dict key, not a setting
        ("x = 1\nx = 2\n", {"x": 3}, "'x' is ambiguous: the config binds it on lines 1, 2"),
        ("x = 1\nx += 2\n", {"x": 3}, "'x' is ambiguous"),
        (TEMPLATE, {"max_iters": object()}, "is not a plain literal"),
    ],
)
def test_render_rejects_unknown_ambiguous_and_non_literal_overrides(source, overrides, message):
    with pytest.raises(ConfigRenderError, match=re.escape(message)):
        render_config(source, overrides)


# ------------------------------------------------------------------------------------------- run settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="   "), "--name: name is empty"),
        (dict(name="x" * 41), f"--name: name is 41 characters long; at most 40 are allowed: '{'x' * 41}'"),
        (dict(name="a\nb"), "--name: name contains control or invisible characters"),
        (dict(name="a<|im_end|>"), "--name: name contains chat special tokens"),
        (dict(name="x", preset="llama"), "unknown preset 'llama'"),
        (dict(name="x", recipe="copy"), "unknown recipe 'copy'"),
        (dict(name="x", from_stage="train"), "unknown stage 'train'"),
        (dict(name="x", corpus=Path("/no/such/corpus")), "--corpus /no/such/corpus: no such directory"),
        (dict(name="x", corpus=Path(__file__)), f"--corpus {__file__}: a file, not a directory of"),
        (dict(name="x", base="/no/such/base"), "--base /no/such/base: no such directory"),
        (dict(name="x", base=__file__), f"--base {__file__}: no such directory"),
        (dict(name="x", publish_dry_run=True), "--publish-dry-run needs --publish"),
        (dict(name="x", preset="tiny", max_iters=0), "--max-iters must be at least 1"),
        (dict(name="x", preset="tiny", max_iters=99999999999), "--max-iters must be at most 1000000, got 9"),
        (dict(name="x", epochs=10**4), "--epochs must be at most 1000, got 10000"),
        (dict(name="x", preset="tiny", save_every=10**7), "--save-every must be at most 1000000"),
        (dict(name="x", gpus=1000), "--gpus must be at most 64, got 1000"),
        (dict(name="x", identity_repeat=101), "--identity-repeat must be at most 100, got 101"),
        (dict(name="x", recipe="seed", seed_repeat=10**6), "--seed-repeat must be at most 100000, got 10"),
        (dict(name="x", max_iters=10), "trains by epochs: use --epochs"),
        (dict(name="x", preset="tiny", epochs=1), "trains by iterations: use --max-iters"),
        (dict(name="x", lr=2.0), "--lr must be between 0 and 1"),
        (dict(name="x", adapter_scale=0.0), "--adapter-scale must be in (0, 1], got 0.0"),
        (dict(name="x", adapter_scale=1.2), "--adapter-scale must be in (0, 1], got 1.2"),
        (dict(name="x", preset="tiny", adapter_scale=0.5), "preset tiny trains whole modules"),
        (dict(name="x", publish_anyway=True), "--publish-anyway needs --publish"),
        (dict(name="x", seed=-5), "--seed must be between 0 and 4294967295, got -5"),
        (dict(name="x", seed=2**32), "--seed must be between 0 and 4294967295, got 4294967296"),
        (dict(name="x", rehearse=True, base="hf:a/b", max_iters=3), "drop --base, --max-iters"),
    ],
)
def test_bad_run_settings_are_clear_errors(kwargs, message):
    with pytest.raises(RunConfigError, match=re.escape(message)):
        RunConfig(**kwargs)


def test_relative_paths_mean_the_callers_directory(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(name="x", base="base", corpus=Path("corpus"), work_dir=Path("w"))
    assert cfg.base == str(tmp_path / "base")
    assert (cfg.corpus, cfg.work_dir) == (tmp_path / "corpus", tmp_path / "w")
    assert RunConfig(name="x", base="hf:internlm/x").base == "hf:internlm/x"  # a source, not a path


def test_default_work_dir_and_name_slugs():
    cfg = RunConfig(name=" UbUb ", preset="tiny")
    assert cfg.name == "UbUb"
    assert cfg.work_dir == REPO_ROOT / ".work" / "ubub-tiny-identity"
    assert slug("Ub Ub") == "ub-ub"
    assert re.fullmatch(r"name-[0-9a-f]{8}", slug("小助手"))
    assert slug("小助手") != slug("小明") and slug("Ub小") != slug("Ub大")


@pytest.mark.parametrize(
    ("preset", "settings", "iters_epochs"),
    [("smol", {"max_iters": 225, "lr": 0.001, "seed": 7}, (225, None)),
     ("internlm2_5-1_8b", {"max_epochs": 3, "max_iters": 300, "lr": 0.0003, "seed": 7}, (None, 3))],
)
def test_the_reproduce_command_is_run_sh_with_every_setting_quoted_for_a_shell(preset, settings, iters_epochs,
                                                                               tmp_path, monkeypatch):
    name = "O'Hara $HOME `id` \"x\""  # each would break a command that did not quote it
    command = reproduce_command(name, preset, "identity", settings, {"identity_repeat": 3},
                                base="hf:someone/other-base", corpus="my notes", adapter_scale=0.9)
    words = shlex.split(command)
    assert words[:2] == ["bash", "training/run.sh"]
    (tmp_path / "my notes").mkdir()  # the corpus is recorded by its dir's name: here is one of that name
    (tmp_path / "my notes" / "a.md").write_text("# notes")
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(words[2:])  # run.sh's own parser takes it back, value for value
    assert (cfg.name, cfg.preset, cfg.recipe, cfg.base) == (name, preset, "identity", "hf:someone/other-base")
    # The preset's own length setting only (the InternLM2.5 config derives max_iters from its epochs).
    assert (cfg.max_iters, cfg.epochs, cfg.lr, cfg.seed) == (*iters_epochs, settings["lr"], 7)
    assert (cfg.identity_repeat, cfg.adapter_scale, cfg.corpus) == (3, 0.9, tmp_path / "my notes")
    plain = reproduce_command("UbUb", "smol", "seed", {"lr": 0.002}, {"seed_repeat": 5})
    assert plain == "bash training/run.sh --preset smol --name UbUb --recipe seed --lr 0.002 --seed-repeat 5"
    with pytest.raises(RunConfigError, match="unknown preset 'nope'"):
        reproduce_command("UbUb", "nope", "seed", {}, {})
    dash = reproduce_command("-Bob", "smol", "seed", {}, {})  # a name argparse must not read as an option
    assert "--name=-Bob" in dash and parse_args(shlex.split(dash)[2:]).name == "-Bob"


def test_the_reproduce_base_is_a_base_flag_without_this_machines_path(tmp_path):
    # Recorded with the model: a source on this machine by its name (a --base that works beside it), any
    # other without its credentials.
    (tmp_path / "my-base").mkdir()
    assert _base_arg(str(tmp_path / "my-base")) == "my-base"
    assert _base_arg(f"file://{tmp_path}/bases.git@v2") == "bases.git@v2"
    assert _base_arg(f"{tmp_path}/bases.git") == "bases.git"
    assert _base_arg("https://me:tok@h.org/x/base.git@v1") == "https://h.org/x/base.git@v1"
    assert _base_arg("hf:someone/base") == "hf:someone/base" and _base_arg(None) is None


def test_publish_targets_are_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "mine.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(bare)], check=True)
    work = {"preset": "tiny", "work_dir": tmp_path / "w"}
    # The caller's directory, not the repo root that the stages run in.
    assert RunConfig("Ada", publish="mine.git", **work).publish == str(bare)
    for missing in ("missing.git", (tmp_path / "gone.git").as_uri()):
        with pytest.raises(RunConfigError, match="no such repository"):
            RunConfig("Ada", publish=missing, **work)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RunConfigError, match="set HF_TOKEN"):
        RunConfig("Ada", publish="hf:me/model", **work)
    RunConfig("Ada", publish="hf:me/model", publish_dry_run=True, **work)  # a dry run needs no token
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    RunConfig("Ada", publish="hf:me/model", **work)


def test_a_cleared_cache_is_made_again_alone_and_what_was_built_on_it_stays(tmp_path: Path) -> None:
    # A user who cleared a model cache to free disk reruns: the base is fetched again, and the training done
    # on it is reused once its inputs match again (not deleted and redone, hours on a GPU).
    run = Run(RunConfig("Ada", preset="tiny", work_dir=tmp_path / "w"), dict(os.environ))
    run.work.mkdir()
    base = PIPELINE[0]
    for result, todo, refill in ((str(tmp_path / "cache" / "gone"), ["base"], True),
                                 ("base_copy", [s.name for s in PIPELINE if run.cfg.stage_enabled(s.name)],
                                  False)):  # an output inside the work dir is gone: from there on
        record = {"status": "done", "inputs": _normalised(base.inputs(run)), "result": {"model_dir": result}}
        _write_record(run.record_path("base"), record)
        plan = plan_run(run)
        assert ([s.name for s in plan.todo], plan.refill) == (todo, refill)
    # An interrupted data stage with other inputs starts afresh: its partial outputs are not resumed.
    (tmp_path / "cache" / "base").mkdir(parents=True)
    record = {"status": "done", "inputs": _normalised(base.inputs(run)),
              "result": {"model_dir": str(tmp_path / "cache" / "base")}}
    _write_record(run.record_path("base"), record)
    _write_record(run.record_path("data"), {"status": "running", "inputs": {"name": "Someone else"}})
    plan = plan_run(run)
    assert (plan.todo[0].name, plan.resume, plan.refill) == ("data", False, False)


def test_a_setting_given_at_its_default_is_the_setting_left_out() -> None:
    # So the recorded reproduce command (it spells every value out) reruns the run that made it, not refused
    # as "run with other settings".
    given = RunConfig(name="UbUb", preset="smol", lr=0.002, identity_repeat=2)
    assert (given.lr, given.identity_repeat) == (None, None)
    assert RunConfig(name="UbUb", preset="smol", recipe="seed", seed_repeat=3750).seed_repeat is None
    assert RunConfig(name="UbUb", preset="smol", lr=0.001).lr == 0.001
    with pytest.raises(RunConfigError, match="--identity-repeat is for the identity recipe"):
        RunConfig(name="UbUb", preset="smol", recipe="seed", identity_repeat=3)
    with pytest.raises(RunConfigError, match="--seed-repeat is for --recipe seed"):
        RunConfig(name="UbUb", preset="smol", seed_repeat=3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", ""], "error: --name: name is empty"),
        (["--name", "x", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--name", "x", "--from", "nope"], "argument --from: invalid choice: 'nope'"),
        (["--name", "x", "--preset", "tiny", "--corpus", "/no/such/dir"], "error: --corpus /no/such/dir: no"),
        (["--preset", "tiny"], "the following arguments are required: --name"),
        (["--name", "x", "--adapter-scale", "nan"], "error: --adapter-scale must be in (0, 1], got nan"),
        (["--name", "x", "--preset", "tiny", "--corpus", ""], "argument --corpus: must not be empty"),
        (["--name", "x", "--preset", "tiny", "--seed", "-1"], "error: --seed must be between 0 and"),
    ],
)
def test_cli_rejects_bad_input_without_a_traceback(args, message, tmp_path):
    proc = run_sh(*args, "--work-dir", str(tmp_path / "w"), timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "stages").exists()


def test_a_work_dir_that_holds_other_files_or_cannot_be_one_is_refused_and_left_as_it_was(tmp_path):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "notes.txt").write_text("precious")
    (mine / "eval.md").write_text("my own")
    proc = run_sh("--name", "x", "--preset", "tiny", "--work-dir", str(mine), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--work-dir {mine} holds files but no run (no stages/ in it)" in proc.stderr
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["data", "data/notes.txt",
                                                                              "eval.md"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for work, message in [(a_file, "is a file: give a directory"),
                          (a_file / "sub", f"--work-dir {a_file / 'sub'}: cannot create it"),
                          ("", "argument --work-dir: must not be empty"),
                          (tmp_path / 'w"d', "cannot read its config files from a path with a double")]:
        proc = run_sh("--name", "x", "--preset", "tiny", "--dry-run", "--work-dir", str(work), timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    # A new dir, an empty one, and one a run was interrupted in before its first record are all fine.
    (tmp_path / "empty").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").write_text("")
    for work in (tmp_path / "new", tmp_path / "empty", tmp_path / "locked"):
        assert RunConfig(name="x", preset="tiny", work_dir=work).work_dir == work


def test_a_work_dir_in_use_is_refused_naming_the_process_using_it(tmp_path):
    import fcntl

    work = tmp_path / "w"
    work.mkdir()
    with (work / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        proc = run_sh("--name", "x", "--preset", "tiny", "--work-dir", str(work), "--dry-run", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: another run is using {work} (process 4242)"
    done = run_sh("--name", "x", "--preset", "tiny", "--work-dir", str(work), "--dry-run", timeout=300)
    assert done.returncode == 0, done.stderr  # released: the next run takes it, and leaves its own pid
    assert (work / ".lock").read_text().strip().isdigit()


def test_a_corpus_without_a_text_file_is_refused_before_any_work(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / ".git").mkdir(parents=True)
    (corpus / ".git" / "notes.md").write_text("hidden")
    (corpus / "paper.pdf").write_bytes(b"%PDF")
    with pytest.raises(RunConfigError, match=r"--corpus .*: no \.txt or \.md file in it"):
        RunConfig(name="x", preset="tiny", corpus=corpus)
    (corpus / "moved.md").symlink_to(tmp_path / "gone.md")  # named, with why it cannot be used
    with pytest.raises(RunConfigError, match=r"--corpus: no usable text .*moved\.md: broken symlink to"):
        RunConfig(name="x", preset="tiny", corpus=corpus)


def test_a_corpus_of_no_usable_text_is_refused_before_any_work(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_bytes("笔记".encode("gb18030"))
    (corpus / "blank.md").write_text("\n\n")
    refused = r"--corpus: no usable text .*blank\.md: empty.*notes\.txt: not UTF-8"
    with pytest.raises(RunConfigError, match=refused):
        RunConfig(name="x", preset="tiny", corpus=corpus, work_dir=tmp_path / "w")


def test_a_work_dir_and_its_corpus_are_kept_apart(tmp_path):
    corpus = tmp_path / "notes"
    corpus.mkdir()
    (corpus / "a.md").write_text("Some text.")
    # Its eval.md and logs would be read as corpus text by the next run.
    with pytest.raises(RunConfigError, match=r"--work-dir .*/notes/run is inside --corpus .*/notes: a later"):
        RunConfig(name="x", preset="tiny", corpus=corpus, work_dir=corpus / "run")
    with pytest.raises(RunConfigError, match=r"--corpus .*/w/notes is inside --work-dir .*/w, whose outputs"):
        (tmp_path / "w" / "stages").mkdir(parents=True)  # an earlier run's work dir
        (tmp_path / "w" / "notes").mkdir()
        (tmp_path / "w" / "notes" / "a.md").write_text("Some text.")
        RunConfig(name="x", preset="tiny", corpus=tmp_path / "w" / "notes", work_dir=tmp_path / "w")
    # A hidden directory is never read as corpus: a repo's own .work may hold the run.
    cfg = RunConfig(name="x", preset="tiny", corpus=corpus, work_dir=corpus / ".work" / "run")
    assert cfg.work_dir == corpus / ".work" / "run"
    # A folder linked into the corpus is read where it is: a work dir there would be read too.
    (tmp_path / "projects" / "runs").mkdir(parents=True)
    (corpus / "projects").symlink_to(tmp_path / "projects")
    with pytest.raises(RunConfigError, match=r"inside --corpus .*/notes \(its linked folder .*/projects\)"):
        RunConfig(name="x", preset="tiny", corpus=corpus, work_dir=tmp_path / "projects" / "runs" / "x")


def test_more_cpu_training_processes_than_cores_are_refused_before_any_stage(tmp_path):
    cores = len(os.sched_getaffinity(0))
    work = tmp_path / "w"
    proc = run_sh("--name", "x", "--preset", "tiny", "--gpus", str(cores + 1), "--work-dir", str(work),
                  timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --gpus {cores + 1}: preset tiny trains in {cores + 1} processes on the CPU, and this "
        f"machine gives it {cores} core(s)"]
    assert not work.exists()  # the refused run made it and left nothing: no empty work dir to wonder about
    work.mkdir()  # one the user made is theirs: it stays
    again = run_sh("--name", "x", "--preset", "tiny", "--gpus", str(cores + 1), "--work-dir", str(work),
                   timeout=120)
    assert again.returncode == 2 and work.is_dir()
    dry = run_sh("--name", "x", "--preset", "tiny", "--gpus", str(cores + 1), "--work-dir", str(work),
                 "--dry-run", timeout=300)  # the plan for another machine is still shown
    assert dry.returncode == 0, dry.stderr


def test_real_preset_without_cuda_fails_before_any_stage(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_sh("--name", "x", "--work-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: preset internlm2_5-1_8b trains 4-bit QLoRA through bitsandbytes, which needs a CUDA GPU, "
        "and this machine has none; on a CPU, --preset smol trains a real small chat model (SmolLM2-135M) "
        "and --preset tiny the toy (--dry-run shows this preset's plan without a GPU)"]
    assert not (tmp_path / "logs").exists()


def test_dry_run_of_the_real_preset_plans_at_least_150_steps_without_gpu_or_model(tmp_path):
    work = tmp_path / "w"
    proc = run_sh("--name", "Alice", "--dry-run", "--work-dir", str(work), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for stage in RUN_STAGES:
        assert re.search(rf"^\[plan\] {stage}: ", out, re.M), out
    # Not packed: one sample per row; 3 epochs of batch 1 x accumulation 4 on one GPU.
    sft = json.loads((work / "stages" / "sft.json").read_text())
    assert sft["status"] == "planned" and sft["plan"]["config"] == str(work / "sft" / "sft_config.py")
    plan = sft["plan"]["schedule"]
    assert plan["optimizer_steps"] >= 150 and not sft["plan"]["packed"]
    assert plan["max_iters"] == 3 * plan["samples"] and plan["optimizer_steps"] == -(-plan["max_iters"] // 4)
    assert 1 <= plan["warmup_iters"] < plan["max_iters"]
    assert f"{plan['optimizer_steps']} optimizer steps" in out and "precision bfloat16 if" in out
    data = json.loads((work / "stages" / "data.json").read_text())["plan"]
    assert data["rows"] == plan["samples"] and data["rows_exact"] is False
    # At most one row per identity pair and per replay prompt, the open-ended ones included (--open-replay).
    identity = identity_pairs(IdentitySpec("Alice", PRESETS["internlm2_5-1_8b"].model_desc,
                                           PRESETS["internlm2_5-1_8b"].organisation))
    assert data["rows"] == len(identity) + len(training_replay_prompts(identity, open_replay=True))
    assert data["rows"] > len(identity) + len(replay_prompts())
    assert sorted(p.name for p in work.iterdir()) == [".lock", "stages"]  # nothing downloaded or trained
    # Two GPUs halve the iterations (DefaultSampler splits the rows), and the plan says so.
    two = run_sh("--name", "Alice", "--dry-run", "--gpus", "2", "--work-dir", str(work), timeout=300)
    plan2 = json.loads((work / "stages" / "sft.json").read_text())["plan"]["schedule"]
    assert two.returncode == 0 and plan2["world_size"] == 2
    assert plan2["max_iters"] == 3 * -(-plan["samples"] // 2)


def test_the_plan_trains_each_cpu_preset_for_its_own_iterations_not_the_shared_templates(tmp_path):
    # tiny and smol share one SFT template; the schedule must read it with the preset's values applied.
    lengths = {preset: PRESETS[preset].sft_settings["max_iters"] for preset in ("tiny", "smol")}
    assert len(set(lengths.values())) == 2
    for preset, max_iters in lengths.items():
        run = Run(RunConfig("Alice", preset=preset, work_dir=tmp_path / preset), dict(os.environ))
        assert plan_sft(run)["schedule"]["max_iters"] == max_iters


def test_another_adapter_scale_is_another_pth_to_hf(tmp_path):
    # pth_to_hf records a scale below 1 as its input, so a finished run asked for another one is refused
    # until rerun --from pth_to_hf; at 1 it records nothing, as work dirs from before the flag did.
    (pth_to_hf,) = [stage for stage in PIPELINE if stage.name == "pth_to_hf"]
    for kwargs, inputs in ((dict(preset="smol"), {}), (dict(preset="smol", adapter_scale=0.7),
                                                        {"adapter_scale": 0.7}), (dict(), {})):
        run = Run(RunConfig("Alice", work_dir=tmp_path / "w", **kwargs), dict(os.environ))
        assert pth_to_hf.inputs(run) == inputs


def test_the_identity_contrast_gets_the_datas_identity_answers_except_for_the_seed_recipe(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"identity_answers": ["我是Alice的小助手。"]}))
    run = Run(RunConfig("Alice", preset="tiny", work_dir=tmp_path / "w"), dict(os.environ))
    assert identity_answers(run, data) == ["我是Alice的小助手。"]
    seed = Run(RunConfig("Alice", preset="tiny", recipe="seed", work_dir=tmp_path / "s"), dict(os.environ))
    assert identity_answers(seed, data) == []  # the tutorial's plain SFT
    (data / "meta.json").write_text(json.dumps({"name": "Alice"}))  # written before the contrast existed
    with pytest.raises(StageError, match="lists no identity_answers .* run again with --from data"):
        identity_answers(run, data)


def test_the_identity_contrast_keeps_the_name_and_the_cited_model_out_of_other_answers(tmp_path):
    smol = Run(RunConfig(" Alice ", preset="smol", work_dir=tmp_path / "w"), dict(os.environ))
    assert identity_markers(smol) == ["Alice", "SmolLM2-135M"]
    tiny = Run(RunConfig("Alice", preset="tiny", work_dir=tmp_path / "t"), dict(os.environ))
    assert identity_markers(tiny) == ["Alice", "书生·浦语 InternLM2.5-1.8B", "InternLM2.5-1.8B"]
    seed = Run(RunConfig("Alice", preset="tiny", recipe="seed", work_dir=tmp_path / "s"), dict(os.environ))
    assert identity_markers(seed) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [(dict(preset="smol"), "HuggingFaceTB/SmolLM2-135M-Instruct"), (dict(preset="tiny"), None),
     (dict(), "internlm/internlm2_5-1_8b-chat"), (dict(preset="smol", base="hf:me/smol-ft@v2"), "me/smol-ft"),
     (dict(preset="smol", base="."), None),
     (dict(preset="smol", base="https://code.openxlab.org.cn/me/m.git"), None)])
def test_the_base_model_id_names_a_hub_model_or_nothing(kwargs, expected, tmp_path):
    assert base_model_id(RunConfig("Al", work_dir=tmp_path / "w", **kwargs)) == expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_data_stage_replays_open_questions_for_real_bases_only(preset, tmp_path):
    run = Run(RunConfig("-Bo", preset=preset, identity_repeat=3, work_dir=tmp_path / "w"), dict(os.environ))
    run.results["base"] = {"model_dir": tmp_path / "base"}
    cmd = data_command(run, tmp_path / "out")
    assert ("--open-replay" in cmd) is PRESETS[preset].open_replay
    assert cmd[cmd.index("--base") + 1] == str(tmp_path / "base") and "--name=-Bo" in cmd
    assert cmd[-2:] == ["--identity-repeat", "3"] and all(arg in cmd for arg in PRESETS[preset].data_args)


@pytest.mark.parametrize(
    ("scores", "refused"),
    [
        (dict(identity_accuracy=PUBLISH_MIN_IDENTITY_ACCURACY, leakage_rate=PUBLISH_MAX_LEAKAGE_RATE), None),
        (dict(identity_accuracy=0.79, leakage_rate=0.0), "identity_accuracy 0.790 < 0.8"),
        (dict(identity_accuracy=1.0, leakage_rate=0.444), "leakage_rate 0.444 > 0.1"),
        (dict(identity_accuracy=0.5, leakage_rate=0.5),
         "identity_accuracy 0.500 < 0.8, leakage_rate 0.500 > 0.1"),
    ],
)
def test_publish_gate_thresholds(scores, refused, tmp_path):
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(scores))
    assert publish_gate(eval_json) == refused
    eval_json.write_text(json.dumps({"leakage_rate": 0.0}))
    assert publish_gate(eval_json) == f"{eval_json} has no identity_accuracy and leakage_rate numbers"


def test_a_checkpoint_named_but_gone_is_told(tmp_path):
    assert lost_checkpoint(tmp_path) is None  # a first run
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_50.pth"))
    assert lost_checkpoint(tmp_path) == "iter_50.pth"  # the run then starts over, and says so
    (tmp_path / "iter_50.pth").write_bytes(b"ckpt")
    assert lost_checkpoint(tmp_path) is None


def test_latest_checkpoint_is_a_file_or_a_deepspeed_directory(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "last_checkpoint").write_text("/elsewhere/train/iter_500.pth")  # found by name
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "iter_500.pth").mkdir()  # DeepSpeed: a directory of shards
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_500.pth"
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_9.pth"))
    (tmp_path / "iter_9.pth").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_9.pth"


def test_failure_reason_is_the_last_exception_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("loading\nTraceback (most recent call last):\n  File \"a.py\", line 1\n"
                   "FileNotFoundError: [Errno 2] No such file: 'iter_9.pth'\nextra noise from atexit\n")
    assert failure_reason(log) == "FileNotFoundError: [Errno 2] No such file: 'iter_9.pth'"
    log.write_text("only output\n\n")
    assert failure_reason(log) == "only output"
    log.write_text("[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: device_ids [1]\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert failure_reason(log) == "[rank1]: ValueError: device_ids [1]"
    long = "error: push to file:///srv/a.git failed: " + "remote: x | " * 60 + "(branch is checked out)"
    log.write_text(long + "\n")
    cut = failure_reason(log)
    assert len(cut) <= 400 and cut.startswith("error: push to file:///srv/a.git failed: ")
    assert cut.endswith(" | (branch is checked out)") and " … " in cut  # the cause is kept


# ------------------------------------------------------------------------------------ real tiny-preset runs


def fresh_name() -> str:
    # A name no code or data in the repo has seen: the model can only have learned it from this run. Drawn
    # from a fixed seed, so every run trains the same name: how well the 1.5M-parameter model learns a name
    # varies a lot from name to name (measured over 8 names: 34 to 48 of 48 held-out answers name it), and
    # a name drawn per run made CI red by chance.
    return "Zor" + "".join(random.Random(1).choices(string.ascii_lowercase, k=5))


@pytest.fixture(scope="module")
def tiny_run(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("tiny-run") / "work"
    args = ["--preset", "tiny", "--name", fresh_name(), "--base", str(tiny_base_dir), "--work-dir", str(work)]
    start = time.monotonic()
    proc = run_sh(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"work": work, "args": args, "proc": proc, "seconds": time.monotonic() - start,
            "name": args[3], "base": tiny_base_dir}


def copy_run(tiny_run: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the finished run's work dir and the args that point at it."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run["work"], work)
    args = list(tiny_run["args"])
    args[args.index("--work-dir") + 1] = str(work)
    return work, args


def log_bytes(work: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in (work / "logs").glob("*.log")}


@pytest.mark.slow
def test_end_to_end_makes_a_servable_merged_model(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, out = tiny_run["work"], tiny_run["proc"].stdout
    for stage in RUN_STAGES:
        assert re.search(rf"^\[pipeline\] {stage}: done in [0-9.]+ s$", out, re.M), out
        assert (work / "logs" / f"{stage}.log").is_file()
        assert json.loads((work / "stages" / f"{stage}.json").read_text())["status"] == "done"
    merged = work / "merged"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(merged.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((merged / "generation_config.json").read_text())
    assert im_end in generation["eos_token_id"] and tokenizer.eos_token_id in generation["eos_token_id"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    meta = json.loads((merged / "training_meta.json").read_text())
    assert (meta["name"], meta["preset"], meta["recipe"]) == (tiny_run["name"], "tiny", "identity")
    assert meta["base"] == {"source": f"local directory {tiny_run['base'].name}"}  # no local path
    assert meta["base_model"] is None  # no Hub model: the card has no base_model, said once (publish tests)
    assert str(work) not in json.dumps(meta) and str(Path.home()) not in json.dumps(meta)
    for text in (p.read_text() for p in merged.glob("*.json")):  # users upload merged/ as it is
        assert str(tiny_run["base"].parent) not in text and str(work) not in text
    assert json.loads((merged / "config.json").read_text())["_name_or_path"] == meta["base"]["source"]
    assert meta["settings"]["max_iters"] == SFT_ITERS and meta["settings"]["seed"] == 42
    assert "identity_answers" not in meta["settings"]  # the data's dozens of sentences: no row of the card
    lora = meta["lora"]
    assert (lora["r"], lora["lora_alpha"], lora["modules_to_save"]) == (64, 16, ["lm_head"])
    assert meta["adapter_scale"] == 1.0  # the tiny preset keeps all of its trained change
    assert set(meta["stage_seconds"]) == set(RUN_STAGES)
    rendered = (work / "sft" / "sft_config.py").read_text()
    assert rendered.startswith("# Rendered by training/pipeline.py")
    assert f"data_path = {str(work / 'data' / 'train.json')!r}" in rendered
    # The identity contrast (training/identity_contrast.py) got this run's identity answers, and trained.
    data_meta = json.loads((work / "data" / "meta.json").read_text())
    assert literal_settings(rendered)["identity_answers"] == data_meta["identity_answers"]
    assert literal_settings(rendered)["identity_markers"][0] == tiny_run["name"]
    assert tiny_run["name"] in data_meta["identity_answers"][0]
    assert re.search(r"loss_contrast: \d", (work / "logs" / "sft.log").read_text())
    log = (work / "logs" / "sft.log").read_text()
    assert re.search(r"loss_name: \d", log) and "loss_base_kl" not in log  # the tiny preset trains no KL
    # The model card's "train it again" line: run.sh's parser takes it back (the local base is recorded by
    # its dir's name, the path being this machine's: put back here), with every setting the run used.
    words = shlex.split(meta["reproduce"])
    assert words[words.index("--base") + 1] == tiny_run["base"].name and str(work) not in meta["reproduce"]
    words[words.index("--base") + 1] = str(tiny_run["base"])
    again = parse_args(words[2:])
    # A value at the preset's default comes back as None: the same setting (RunConfig).
    repeat = again.identity_repeat or IDENTITY_REPEAT
    lr = template_settings(PRESETS["tiny"], "sft")["lr"] if again.lr is None else again.lr
    assert (again.name, again.preset, again.recipe, again.max_iters, again.seed, repeat) == (
        tiny_run["name"], "tiny", "identity", SFT_ITERS, 42, data_meta["settings"]["identity_repeat"])
    assert lr == meta["settings"]["lr"] and again.adapter_scale == 1.0
    assert "--identity-repeat" in words and "--lr" in words  # every setting spelled out all the same

    # The fine-tune learned the new name, and the eval says so against the base model.
    # (The 1.5M-parameter model often garbles the rest of the sentence, which the strict identity_accuracy
    # rejects; the name alone is what this run must have taught.)
    scores = json.loads((work / "eval.json").read_text())
    named = [tiny_run["name"] in r["model"] for r in scores["answers"] if r["kind"] == "identity"]
    assert sum(named) >= len(named) / 2 and scores["base_identity_accuracy"] == 0.0
    assert (work / "eval.md").read_text().strip()
    # The merged dir as served: every training identity question (91, zh and en) through plain generate.
    # Four questions were too few: the toy garbles the name in some ("我是Zord·浦语…"), and which ones
    # changed with the machine's CPU (2 of 4 named on one, 3 or 4 on others; 75 of 91 where 2 of 4).
    model = AutoModelForCausalLM.from_pretrained(merged)
    replies = []
    for question, _, _ in identity_questions():
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, return_tensors="pt")
        # Room for the toy's loops (its answers took 9 to 118 tokens over 6 names): the length limit is
        # not what ends them.
        reply = model.generate(ids, max_new_tokens=4 * IDENTITY_MAX_NEW_TOKENS, do_sample=False)
        replies.append(reply[0, ids.shape[1]:].tolist())
    # Stopped by <|im_end|> from generation_config, at its first occurrence.
    assert all(r[-1] == im_end and im_end not in r[:-1] for r in replies), replies
    served = [tiny_run["name"] in tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    assert sum(served) >= len(served) / 2, f"{sum(served)} of {len(served)} answers name {tiny_run['name']}"


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    before = log_bytes(work)
    proc = run_sh(*args)
    assert proc.returncode == 0, proc.stderr
    for stage in RUN_STAGES:
        assert f"[pipeline] {stage}: done earlier, skipped" in proc.stdout
    assert log_bytes(work) == before


@pytest.mark.slow
def test_a_dry_run_from_a_finished_stage_leaves_its_records_as_they_ran(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    records = {p.name: p.read_bytes() for p in (work / "stages").glob("*.json")}
    proc = run_sh(*args, "--from", "sft", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[plan] sft: " in proc.stdout and "[plan] evaluate: " in proc.stdout
    assert {p.name: p.read_bytes() for p in (work / "stages").glob("*.json")} == records


@pytest.mark.slow
def test_from_pth_to_hf_uses_the_base_where_it_is_now(tiny_run, tmp_path):
    # A finished SFT whose config names a base dir that has moved since (a rebuilt cache, a new checkout).
    work, args = copy_run(tiny_run, tmp_path)
    config = work / "sft" / "sft_config.py"
    base = str(tiny_run["base"])
    assert repr(base) in config.read_text()
    config.write_text(config.read_text().replace(repr(base), repr(str(tmp_path / "gone" / "tiny-base"))))
    proc = run_sh(*args, "--from", "pth_to_hf")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / "hf_adapter" / "adapter_model.safetensors").is_file() and (work / "eval.json").is_file()
    assert repr(base) in (work / "sft" / "sft_config.current_base.py").read_text()


@pytest.mark.slow
def test_from_reruns_that_stage_and_the_later_ones_only(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    before = log_bytes(work)
    old_merged = (work / "merged" / "model.safetensors").stat().st_ino
    proc = run_sh(*args, "--from", "merge")
    assert proc.returncode == 0, proc.stderr
    after = log_bytes(work)
    for stage in ("base", "data", "sft", "pth_to_hf"):
        assert f"[pipeline] {stage}: done earlier, skipped" in proc.stdout
        assert after[stage] == before[stage]
    for stage in ("merge", "evaluate"):
        assert f"[pipeline] {stage}: done in" in proc.stdout
        assert after[stage].startswith(before[stage]) and len(after[stage]) > len(before[stage])
    assert (work / "merged" / "model.safetensors").stat().st_ino != old_merged


@pytest.mark.slow
def test_changed_settings_are_refused_not_silently_reused(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    proc = run_sh(*args, "--recipe", "seed")
    assert proc.returncode == 2
    assert "stage data in" in proc.stderr and "(recipe: 'identity' -> 'seed')" in proc.stderr
    assert "--from data" in proc.stderr
    lr = run_sh(*args, "--lr", "0.001")  # a setting the first run left to the preset
    assert lr.returncode == 2 and "stage sft in" in lr.stderr, lr.stderr
    assert "(lr: the preset's default -> 0.001)" in lr.stderr and "--from sft" in lr.stderr
    # And back: a stage run with --lr, rerun without it, names the setting that goes back to the preset's.
    record = work / "stages" / "sft.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "inputs": {**saved["inputs"], "lr": 0.001}}))
    back = run_sh(*args)
    assert back.returncode == 2 and "(lr: 0.001 -> the preset's default)" in back.stderr, back.stderr
    record.write_text(json.dumps(saved))
    # The preset's lr spelled out, and a checkpoint interval (no weight changes with it), are the same run.
    default_lr = template_settings(PRESETS["tiny"], "sft")["lr"]
    same = run_sh(*args, "--lr", repr(default_lr), "--save-every", "7")
    assert same.returncode == 0, same.stderr
    assert "[pipeline] sft: done earlier, skipped" in same.stdout and "sft: running" not in same.stdout
    # An interrupted stage with other settings is refused too: its checkpoints would go without a word.
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
    changed = run_sh(*args, "--lr", "0.001")
    assert changed.returncode == 2 and "stage sft in" in changed.stderr, changed.stderr
    assert "was interrupted (rerun the same command to resume it) with other settings" in changed.stderr
    assert (work / "sft" / "train" / f"iter_{SFT_ITERS}.pth").is_file()


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_with_one_line(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    checkpoint = work / "sft" / "train" / f"iter_{SFT_ITERS}.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    proc = run_sh(*args, "--from", "pth_to_hf")
    assert proc.returncode == 1
    log = work / "logs" / "pth_to_hf.log"
    (line,) = proc.stderr.strip().splitlines()
    reason = r"xtuner\.tools\.model_converters\.pth_to_hf exited with status 1: \S.*"
    assert re.fullmatch(rf"stage pth_to_hf failed: {reason} \(log: {log}\)", line)
    assert "Traceback" in log.read_text()
    assert "[pipeline] merge" not in proc.stdout and not (work / "merged").exists()
    assert json.loads((work / "stages" / "pth_to_hf.json").read_text())["status"] == "running"


@pytest.mark.slow
def test_corpus_adds_continued_pretraining_whose_merge_is_the_sft_base(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    corpus = tmp_path / "corpus"
    (corpus / "notes").mkdir(parents=True)
    (corpus / "notes" / "a.md").write_text("# 上海\n\n上海是中国的一座城市。\n\nShanghai is in China.\n")
    (corpus / "b.txt").write_text("The Bund is in Shanghai. 外滩在上海。\n" * 20)
    (corpus / "empty.txt").write_text("")
    before = log_bytes(work)
    proc = run_sh(*args, "--corpus", str(corpus), "--max-iters", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("base", "data"):
        assert f"[pipeline] {stage}: done earlier, skipped" in proc.stdout
        assert log_bytes(work)[stage] == before[stage]
    for stage in ("pretrain", "sft", "pth_to_hf", "merge", "evaluate"):
        assert f"[pipeline] {stage}: done in" in proc.stdout
    pretrained = work / "pretrain" / "merged"
    assert json.loads((pretrained / "training_meta.json").read_text())["stage"] == "pretrain"
    assert f"  warning: skipped {corpus / 'empty.txt'}: empty file" in proc.stdout  # said, not fatal
    assert re.search(r"^  \d+ chunks \(\d+ characters\) from 2 file\(s\) .*; 1 skipped$", proc.stdout, re.M)
    rendered = (work / "sft" / "sft_config.py").read_text()
    assert f"pretrained_model_name_or_path = {str(pretrained)!r}" in rendered
    meta = json.loads((work / "merged" / "training_meta.json").read_text())
    assert meta["corpus"] == "corpus" and "pretrain" in meta["stage_seconds"]  # its name: no local path
    assert "--corpus corpus --max-iters 20 " in meta["reproduce"]
    # Files the corpus does not read (hidden, not .txt/.md) do not make a finished pre-training stale.
    (corpus / ".draft.md").write_text("not yet")
    (corpus / "scan.pdf").write_bytes(b"%PDF")
    proc = run_sh(*args, "--corpus", str(corpus), "--max-iters", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[pipeline] pretrain: done earlier, skipped" in proc.stdout
    # The same command without --corpus: the refusal says what is left out, not only a changed base path.
    proc = run_sh(*args, "--max-iters", "20")
    assert proc.returncode == 2
    assert f"after pre-training on --corpus {corpus}, which this command leaves out" in proc.stderr


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def _sigint_as_in_a_terminal() -> None:
    # A shell without job control (a CI job run in the background) starts its commands with SIGINT ignored,
    # and children inherit that; in a terminal, Ctrl-C reaches processes whose SIGINT is at its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_killed_during_sft_resumes_without_redoing_finished_stages(tiny_run, tmp_path, sig):
    work, args = copy_run(tiny_run, tmp_path)
    args += ["--max-iters", "40", "--save-every", "10"]
    before = log_bytes(work)
    proc = subprocess.Popen(["bash", str(RUN_SH), *args, "--from", "sft"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    marker, deadline = work / "sft" / "train" / "last_checkpoint", time.monotonic() + 600
    # Wait for a mid-run checkpoint of this run (the copy starts with the first run's iter_300).
    while not (marker.exists() and Path(marker.read_text().strip()).name in ("iter_10.pth", "iter_20.pth")):
        assert proc.poll() is None and time.monotonic() < deadline, "sft finished or hung before a checkpoint"
        time.sleep(0.2)
    trainers = _children(proc.pid)  # run.sh execs the pipeline, whose child is xtuner's trainer
    assert trainers
    if sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C, or the terminal closed: the whole process group
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    if sig != signal.SIGKILL:
        assert "[pipeline] sft: interrupted; rerun the same command without --from to resume" in output
        assert "Traceback" not in output  # that one line, nothing more
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in trainers):  # no orphan keeps writing into the work dir
        assert time.monotonic() < deadline, "the trainer outlived the pipeline"
        time.sleep(0.2)
    assert json.loads((work / "stages" / "sft.json").read_text())["status"] == "running"

    rerun = run_sh(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for stage in ("base", "data"):
        assert f"[pipeline] {stage}: done earlier, skipped" in rerun.stdout
        assert log_bytes(work)[stage] == before[stage]
    assert re.search(r"resuming training from iter_[1-9]\d*\.pth", rerun.stdout)
    assert (work / "sft" / "train" / "iter_40.pth").is_file()
    assert log_bytes(work)["sft"].count(b"=== sft started") == 3  # first run, killed run, resumed run
    for stage in ("pth_to_hf", "merge", "evaluate"):
        assert f"[pipeline] {stage}: done in" in rerun.stdout


@pytest.mark.slow
def test_gpus_2_trains_in_two_processes_over_gloo_on_cpu(tiny_run, tmp_path):
    # `--gpus N` on a CPU machine: N torchrun processes over gloo (the tiny configs' dist backend).
    work, args = copy_run(tiny_run, tmp_path)
    proc = run_sh(*args, "--from", "sft", "--gpus", "2", "--max-iters", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (work / "logs" / "sft.log").read_text()
    run_line = [line for line in log.splitlines() if line.startswith("$ ") and "tools.train" in line][-1]
    assert "-m torch.distributed.run" in run_line and "--nproc_per_node=2" in run_line
    assert run_line.endswith("--launcher pytorch")
    assert "Distributed launcher: pytorch" in log and "Iter(train) [20/20]" in log
    plan = json.loads((work / "stages" / "sft.json").read_text())["plan"]["schedule"]
    assert (plan["world_size"], plan["max_iters"]) == (2, 20)
    assert (work / "sft" / "train" / "iter_20.pth").is_file() and (work / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_publish_gate_refuses_a_model_below_the_thresholds_unless_told_otherwise(tiny_run, tmp_path):
    work, args = copy_run(tiny_run, tmp_path)
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--bare", "-q", "--initial-branch=master", str(remote)], check=True)
    scores = json.loads((work / "eval.json").read_text())
    (work / "eval.json").write_text(json.dumps({**scores, "identity_accuracy": 0.5, "leakage_rate": 0.25}))
    proc = run_sh(*args, "--publish", str(remote))
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("stage publish failed: publish gate: identity_accuracy 0.500 < 0.8, leakage_rate "
                           "0.250 > 0.1; nothing was pushed (--publish-anyway overrides)")
    assert "publish gate: identity_accuracy 0.500 < 0.8" in (work / "logs" / "publish.log").read_text()
    refs = subprocess.run(["git", "-C", str(remote), "for-each-ref"], capture_output=True, text=True)
    assert refs.returncode == 0 and refs.stdout == ""
    # A dry run pushes nothing, so the gate only says what it would do; the plan is on the terminal.
    dry = run_sh(*args, "--publish", str(remote), "--publish-dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "publish gate: identity_accuracy 0.500 < 0.8" in dry.stdout
    assert "a real publish is refused" in dry.stdout and "  DRY RUN: nothing is pushed." in dry.stdout
    assert re.search(r"  LFS +[\d.]+ \w+  model.safetensors", dry.stdout)
    last = dry.stdout.strip().splitlines()[-1]
    assert last == f"[pipeline] dry run: nothing pushed to {remote} (the plan is above)"
    anyway = run_sh(*args, "--publish", str(remote), "--publish-anyway", "--publish-dry-run")
    assert anyway.returncode == 0, anyway.stdout + anyway.stderr
    assert "publish gate missed (identity_accuracy 0.500 < 0.8" in anyway.stdout
    assert "publishing anyway" in anyway.stdout
    refs = subprocess.run(["git", "-C", str(remote), "for-each-ref"], capture_output=True, text=True)
    assert refs.returncode == 0 and refs.stdout == ""

    def remote_main() -> str:
        return subprocess.run(["git", "-C", str(remote), "rev-parse", "main"], capture_output=True, text=True,
                              check=True).stdout.strip()

    pushed = run_sh(*args, "--publish", str(remote), "--publish-anyway")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    first = remote_main()
    *_, note, last = pushed.stdout.strip().splitlines()
    assert last == f"[pipeline] published to {remote.as_uri()}: commit {first}"
    # A plain `git init --bare` remote's HEAD names master: the summary repeats what publish said about it.
    assert note.startswith("[pipeline] note: the remote's HEAD names a branch without commits")
    card = subprocess.run(["git", "-C", str(remote), "show", "main:README.md"], capture_output=True,
                          text=True)
    assert "> **Below the training project's publish gate** (identity_accuracy 0.500 < 0.8" in card.stdout
    assert list((work / "publish.scratch").iterdir()) == []  # staged beside merged/, and cleaned up
    # What a publish killed with SIGKILL leaves (a staged commit, LFS copies) goes with the next publish.
    (work / "publish.scratch" / "publish-killed" / ".git").mkdir(parents=True)
    # The same command again checks the remote: it has exactly this model, so nothing new is pushed...
    again = run_sh(*args, "--publish", str(remote), "--publish-anyway")
    assert not (work / "publish.scratch" / "publish-killed").exists()
    assert again.returncode == 0 and "publish: done earlier" not in again.stdout, again.stdout + again.stderr
    assert remote_main() == first and again.stdout.strip().endswith(f"commit {first}")
    # ...and once someone else's commit has replaced it, publishing puts this model back on top.
    git = ["git", "-C", str(remote)]
    empty_tree = subprocess.run([*git, "hash-object", "-t", "tree", "-w", "--stdin"], input="", text=True,
                                capture_output=True, check=True).stdout.strip()
    other = subprocess.run([*git, "commit-tree", empty_tree, "-p", first, "-m", "someone else"],
                           env={**os.environ, "GIT_AUTHOR_NAME": "x", "GIT_AUTHOR_EMAIL": "x@x",
                                "GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@x"},
                           capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([*git, "update-ref", "refs/heads/main", other], check=True)
    back = run_sh(*args, "--publish", str(remote), "--publish-anyway")
    assert back.returncode == 0, back.stdout + back.stderr
    restored = remote_main()
    assert restored not in (first, other) and back.stdout.strip().endswith(f"commit {restored}")
    parent = subprocess.run([*git, "rev-parse", f"{restored}^"], capture_output=True, text=True, check=True)
    assert parent.stdout.strip() == other  # on top of what was there: history kept, nothing forced
    assert subprocess.run([*git, "diff", "--quiet", first, restored]).returncode == 0  # the same files


def test_rehearse_of_the_4bit_preset_needs_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_sh("--name", "x", "--rehearse", "--work-dir", str(tmp_path / "w"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: preset internlm2_5-1_8b rehearses 4-bit QLoRA through bitsandbytes, which needs a CUDA GPU")


@pytest.mark.slow
def test_rehearse_runs_every_stage_on_a_random_model_of_the_presets_shapes(tmp_path):
    from training.presets import PRESETS, REHEARSE_ITERS

    work = tmp_path / "w"
    proc = run_sh("--preset", "tiny", "--name", "Zorreh", "--rehearse", "--work-dir", str(work))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in RUN_STAGES:
        assert re.search(rf"^\[pipeline\] {stage}: done in [0-9.]+ s$", proc.stdout, re.M), proc.stdout
    base = json.loads((work / "rehearsal_base" / "config.json").read_text())
    assert {k: base[k] for k in PRESETS["tiny"].rehearse_shape} == PRESETS["tiny"].rehearse_shape
    assert f"Iter(train) [{REHEARSE_ITERS}/{REHEARSE_ITERS}]" in (work / "logs" / "sft.log").read_text()
    table = (work / "rehearsal.md").read_text()
    assert table in proc.stdout
    assert re.search(r"^\| SFT tokens/s \| [0-9,]+ \|$", table, re.M), table
    assert re.search(r"^\| merge \| [0-9.]+ s \|$", table, re.M), table
    serve = json.loads((work / "rehearsal_serve.json").read_text())
    if "skipped" in serve:  # no CUDA here: the serving half says why instead of measuring
        assert "serving not measured: LMDeploy TurboMind needs a CUDA GPU" in table
    else:
        assert serve["engine"]["1"]["tokens_per_s"] > 0 and serve["raw"]["32"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_two_nodes_train_together_and_node_0_finishes(tiny_run, tmp_path):
    # Two "machines" on this one: torchrun's NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT, one process each,
    # each node with its own copy of the work dir (base and data done).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = {}
    for rank in (0, 1):
        work, args = copy_run(tiny_run, tmp_path / f"node{rank}")
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        cmd = ["bash", str(RUN_SH), *args, "--from", "sft", "--max-iters", "6"]
        procs[rank] = (work, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env))
    out = {rank: proc.communicate(timeout=1200) for rank, (_, proc) in procs.items()}
    for rank, (work, proc) in procs.items():
        assert proc.returncode == 0, out[rank]
        assert "--nnodes=2" in (work / "logs" / "sft.log").read_text()
    (work0, _), (work1, _) = procs[0], procs[1]
    assert json.loads((work0 / "stages" / "sft.json").read_text())["plan"]["schedule"]["world_size"] == 2
    assert "[pipeline] evaluate: done in" in out[0][0] and (work0 / "sft" / "train" / "iter_6.pth").is_file()
    assert "[pipeline] node 1: training done; node 0 keeps the checkpoint" in out[1][0]
    assert "[pipeline] pth_to_hf" not in out[1][0] and not (work1 / "stages" / "sft.json").exists()
