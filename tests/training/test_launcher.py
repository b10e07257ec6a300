# How training is launched: one process, torchrun over --gpus processes (and nodes), DeepSpeed, precision.
# Run in the training env:
#   .venv-train/bin/python -m pytest tests/training/test_launcher.py
import sys
from pathlib import Path

import pytest

from training.launcher import gpu_precision, train_command, world
from training.presets import RunConfig, RunConfigError

CONFIG, WORK = Path("/w/sft/sft_config.py"), Path("/w/sft/train")


def test_one_process_runs_xtuner_train_directly():
    assert train_command(CONFIG, WORK, 1, None, {}) == [
        sys.executable, "-m", "xtuner.tools.train", str(CONFIG), "--work-dir", str(WORK)]


def test_several_gpus_run_torchrun_with_the_pytorch_launcher_like_xtuner_train():
    cmd = train_command(CONFIG, WORK, 4, "zero2", {}, resume_from=WORK / "iter_500.pth")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=1", "--node_rank=0", "--nproc_per_node=4", "--master_addr=127.0.0.1"} <= set(cmd)
    port = next(a for a in cmd if a.startswith("--master_port="))
    assert 0 < int(port.split("=")[1]) < 65536
    # torchrun's own options first, then the module and its arguments (XTuner's bundled DeepSpeed json).
    assert cmd[cmd.index("-m", 3):] == [
        "-m", "xtuner.tools.train", str(CONFIG), "--work-dir", str(WORK), "--deepspeed", "deepspeed_zero2",
        "--resume", str(WORK / "iter_500.pth"), "--launcher", "pytorch"]


def test_several_nodes_come_from_torchruns_environment():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29511"}
    cmd = train_command(CONFIG, WORK, 8, None, env)
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.0.0.5",
            "--master_port=29511"} <= set(cmd)
    assert world(8, env) == (2, 16)
    with pytest.raises(RunConfigError, match="MASTER_ADDR"):
        train_command(CONFIG, WORK, 1, None, {"NNODES": "2"})
    with pytest.raises(RunConfigError, match="NNODES"):
        world(1, {"NNODES": "two"})


def test_gpu_options_are_validated():
    with pytest.raises(RunConfigError, match="--gpus must be at least 1"):
        RunConfig(name="x", gpus=0)
    with pytest.raises(RunConfigError, match="--deepspeed: choose zero2 or zero3"):
        RunConfig(name="x", deepspeed="zero1")
    with pytest.raises(RunConfigError, match="--deepspeed trains on CUDA GPUs"):
        RunConfig(name="x", preset="tiny", deepspeed="zero2")


def test_precision_is_none_without_cuda_else_bf16_only_from_ampere():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(0)
        assert gpu_precision(1) == ("bfloat16" if major >= 8 else "float16")
    else:
        assert gpu_precision(1) is None
