# Helpers (not tests) shared by tests/infer_engine/test_hostile_sources.py and
# tests/training/test_hostile_training_inputs.py. Importable from any test module (tests/ is on pythonpath).
"""Hostile-input fixtures: a model that ships Python code which leaves a marker file when it runs, and a
``git`` on PATH that records every command line it is given (what ``ps`` would show) before running git."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SECRET = "s3cretTOKEN-4711"  # the token hidden in hostile URLs; it must show up nowhere


def add_remote_code(model_dir: Path, marker: Path) -> Path:
    """Give ``model_dir`` (a Llama-layout model) an ``auto_map`` whose module creates ``marker`` on import.

    Args:
        model_dir: a model directory to edit in place.
        marker: the file the model's code creates when it runs.
    """
    code = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n")
    (model_dir / "configuration_evil.py").write_text(code)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def add_legacy_tokenizer_code(model_dir: Path, marker: Path) -> Path:
    """Give ``model_dir`` a tokenizer_config.json ``auto_map`` in the legacy bare-list form ([slow, fast]),
    which transformers still imports from, whose module creates ``marker`` on import.

    Args:
        model_dir: a model directory with a fast tokenizer, edited in place.
        marker: the file the model's code creates when it runs.
    """
    (model_dir / "tokenization_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def git_argv_recorder(bin_dir: Path, log: Path) -> dict[str, str]:
    """An environment whose ``git`` appends its argv (one line per call) to ``log``, then runs the real git.

    Args:
        bin_dir: a new directory for the wrapper script.
        log: the file that collects the command lines.
    """
    real = shutil.which("git")
    assert real, "git is not installed"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "git"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "git $*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    log.touch()
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
