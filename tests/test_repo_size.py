"""The repo stays small: no tracked file over 10 MB (weights are built at first start, not committed; the demo
adapter is the one big file). Run: python -m pytest tests/test_repo_size.py -q"""

import re
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


def test_shipped_models_name_no_path_of_the_machine_that_made_them() -> None:
    # Users push these dirs to their Space as they are; a path such as /home/NAME/... would go with them.
    texts = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
             for folder in ("infer_engine/demo_model", "infer_engine/demo_adapter")
             for path in sorted((ROOT / folder).iterdir()) if path.suffix in (".json", ".md", ".jinja")}
    assert {"infer_engine/demo_model/config.json", "infer_engine/demo_adapter/adapter_config.json"} <= set(
        texts)
    pattern = re.compile(r"(?<![\w.])/(?:home|root|tmp|work|Users|mnt|data)/")
    assert {name: pattern.findall(text) for name, text in texts.items() if pattern.search(text)} == {}
