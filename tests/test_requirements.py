"""The app environments as a user's machine gets them: python -m pytest tests/test_requirements.py -q
The Space's GPU runtime (requirements.txt) must resolve as one set on one CUDA major (LMDeploy 0.18
is built for CUDA 12; a CUDA 13 torch beside it sees no GPU on older drivers), the CPU app env must
hold no CUDA wheels, and scripts/make_app_env.sh refuses a too-old Python before building anything.
Resolution is pip's own, metadata only."""

import subprocess
from pathlib import Path

import pytest
from user_machine import Resolved, cuda_majors, cuda_runtime, fake_command, resolve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolved]:
    """What `pip install -r requirements.txt` installs on a user's Linux machine (the Space's build)."""
    return resolve(ROOT / "requirements.txt", tmp_path_factory.mktemp("space") / "report.json")


def test_space_requirements_resolve(space: dict[str, Resolved]) -> None:
    assert space["lmdeploy"].version == "0.18.0"
    assert space["gradio"].version == "6.31.0"
    assert space["transformers"].version == "5.24.0"
    assert int(space["huggingface-hub"].version.split(".")[0]) >= 1


def test_space_torch_runs_on_lmdeploys_cuda(space: dict[str, Resolved]) -> None:
    """torch's CUDA runtime (from its requirements) has LMDeploy's CUDA major; no other major is installed."""
    lmdeploy_major = cuda_runtime(space["lmdeploy"])
    torch_cuda = cuda_runtime(space["torch"])
    assert torch_cuda.split(".")[0] == lmdeploy_major, (
        f"torch {space['torch'].version} is built for CUDA {torch_cuda}, LMDeploy for CUDA {lmdeploy_major}")
    assert cuda_majors(space) == {lmdeploy_major}


def test_cpu_environment_has_no_cuda_stack() -> None:
    """The CPU app environment (built from requirements-cpu.txt) must not pull CUDA torch or NVIDIA wheels."""
    import importlib.metadata

    import torch

    assert torch.version.cuda is None, f"CUDA torch {torch.__version__} in the CPU environment"
    nvidia = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if d.metadata["Name"].lower().startswith(("nvidia-", "triton")))
    assert nvidia == [], nvidia


def test_app_env_refuses_old_python(tmp_path: Path) -> None:
    """Python 3.10 (Ubuntu 22.04's) gets one line naming the version, and no venv is created."""
    python = fake_command(tmp_path / "bin", "python3", "3.10")
    venv = tmp_path / "venv"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python)}
    result = subprocess.run(["bash", "scripts/make_app_env.sh", str(venv), "--dev"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()] and "Python 3.10" in result.stderr
    assert ">= 3.11" in result.stderr
    assert not venv.exists()
