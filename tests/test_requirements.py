"""The Space's GPU runtime (requirements.txt) must resolve as one set: LMDeploy 0.18 caps torch at 2.12.1
and peft at 0.14, Gradio 6.31 needs huggingface-hub >= 1.16. pip resolves it without installing anything."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_space_requirements_resolve(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--report", str(report), "-r", str(ROOT / "requirements.txt")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    assert chosen["lmdeploy"] == "0.18.0"
    assert chosen["gradio"] == "6.31.0"
    assert tuple(int(x) for x in chosen["torch"].split("+")[0].split(".")[:2]) <= (2, 12)
    assert int(chosen["huggingface-hub"].split(".")[0]) >= 1


def test_cpu_environment_has_no_cuda_stack() -> None:
    """The CPU app environment (built from requirements-cpu.txt) must not pull CUDA torch or NVIDIA wheels."""
    import importlib.metadata

    import torch

    assert torch.version.cuda is None, f"CUDA torch {torch.__version__} in the CPU environment"
    nvidia = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if d.metadata["Name"].lower().startswith(("nvidia-", "triton")))
    assert nvidia == [], nvidia
