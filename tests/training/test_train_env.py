"""The training env as a user's machine gets it, without a GPU and without building it:
python -m pytest tests/training/test_train_env.py -q
training/requirements-cuda.txt is resolved with pip's own resolver (metadata only) and the chosen
wheels' file lists are read over HTTP ranges:
bitsandbytes must ship a CUDA library for the resolved torch's CUDA version (else it loads its CPU
library without a word and the 4-bit load fails at the start of sft), and every triton.ops module it
imports must exist in the resolved triton. training/make_train_env.sh --check runs the Python and
driver checks against fake python / nvidia-smi commands."""

import re
import subprocess
from pathlib import Path

import pytest
from user_machine import Resolved, cuda_majors, cuda_runtime, fake_command, remote_wheel, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cuda_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolved]:
    """What `pip install -r training/requirements-cuda.txt` installs on a user's Linux machine."""
    requirements = REPO / "training" / "requirements-cuda.txt"
    return resolve(requirements, tmp_path_factory.mktemp("cuda") / "report.json")


def test_bitsandbytes_ships_a_library_for_torchs_cuda(cuda_env: dict[str, Resolved]) -> None:
    torch_cuda = cuda_runtime(cuda_env["torch"])
    assert cuda_majors(cuda_env) == {torch_cuda.split(".")[0]}
    # bitsandbytes loads libbitsandbytes_cuda<major><minor>.so for torch.version.cuda.
    library = f"bitsandbytes/libbitsandbytes_cuda{torch_cuda.replace('.', '')}.so"
    with remote_wheel(cuda_env["bitsandbytes"].url) as wheel:
        shipped = sorted(n for n in wheel.namelist() if n.endswith(".so"))
    torch = cuda_env["torch"].version
    assert library in shipped, f"torch {torch} is CUDA {torch_cuda}; bitsandbytes ships {shipped}"


def test_triton_has_what_bitsandbytes_imports(cuda_env: dict[str, Resolved]) -> None:
    """bitsandbytes 0.45 imports triton.ops.* whenever triton is installed; triton >= 3.2 has no triton.ops"""
    with remote_wheel(cuda_env["bitsandbytes"].url) as wheel:
        sources = [wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".py")]
    imports = re.compile(r"^\s*(?:from|import) (triton\.ops[\w.]*)", re.M)
    wanted = {module for source in sources for module in imports.findall(source)}
    with remote_wheel(cuda_env["triton"].url) as wheel:
        modules = {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in wheel.namelist()
                   if n.endswith(".py")}
    assert wanted <= modules, f"triton {cuda_env['triton'].version} lacks {sorted(wanted - modules)}"


def check(tmp_path: Path, *, python: str = "3.11", driver: str | None = None,
          train_env: str | None = None) -> subprocess.CompletedProcess:
    """training/make_train_env.sh --check on a machine with this Python and NVIDIA driver (None: no GPU).

    Args:
        tmp_path: a fresh folder for the fake commands and the (never created) venv.
        python: the major.minor the fake python prints.
        driver: the driver version the fake nvidia-smi prints; None makes it fail as without a GPU.
        train_env: the TRAIN_ENV override, if any.
    """
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "python3", python)
    fake_command(bin_dir, "nvidia-smi", driver or "No devices were found", rc=0 if driver else 6)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"} | ({"TRAIN_ENV": train_env} if train_env else {})
    return subprocess.run(["bash", "training/make_train_env.sh", str(tmp_path / "venv"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("python", ["3.10", "3.13"])
def test_refuses_python_outside_3_11_to_3_12(tmp_path: Path, python: str) -> None:
    result = check(tmp_path, python=python)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"Python {python}" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_cpu_without_a_gpu(tmp_path: Path, python: str) -> None:
    result = check(tmp_path, python=python)
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'venv'} <- cpu: training/requirements.txt" in result.stdout
    assert not (tmp_path / "venv").exists()


def test_cuda_with_a_gpu_on_torchs_cuda(tmp_path: Path, cuda_env: dict[str, Resolved]) -> None:
    """With a GPU the script builds requirements-cuda.txt, and checks the driver for the CUDA version that the
    resolved torch is built for."""
    result = check(tmp_path, driver="535.54.03")
    assert result.returncode == 0, result.stderr
    assert "cuda: training/requirements-cuda.txt" in result.stdout
    assert f"torch CUDA {cuda_runtime(cuda_env['torch'])}," in result.stdout


def test_refuses_a_driver_too_old_for_cuda_12(tmp_path: Path) -> None:
    result = check(tmp_path, driver="470.82.01")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "470.82.01" in result.stderr and "TRAIN_ENV=cpu" in result.stderr


@pytest.mark.parametrize(("driver", "train_env", "rc", "said"), [
    ("550.54.15", "cpu", 0, "<- cpu:"),
    (None, "cuda", 1, "nvidia-smi reports none"),
    (None, "gpu", 1, "TRAIN_ENV must be cpu or cuda"),
])
def test_train_env_override(tmp_path: Path, driver: str | None, train_env: str, rc: int, said: str) -> None:
    result = check(tmp_path, driver=driver, train_env=train_env)
    assert result.returncode == rc
    assert said in result.stdout + result.stderr
