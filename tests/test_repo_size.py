"""The repo stays small: no tracked file over 10 MB (weights are built at first start, not committed; the demo
adapter is the one big file). Run: python -m pytest tests/test_repo_size.py -q"""

import subprocess
from pathlib import Path

from training.export_demo_adapter import MAX_FILE_BYTES

ROOT = Path(__file__).resolve().parent.parent


def test_no_tracked_file_is_over_10_mb() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / name for name in listed.decode().split("\0") if name]
    assert any(path.name == "adapter_model.safetensors" for path in files)  # the listing is the repo's
    sizes = {path.relative_to(ROOT).as_posix(): path.stat().st_size for path in files if path.is_file()}
    assert {name: size for name, size in sizes.items() if size > MAX_FILE_BYTES} == {}
