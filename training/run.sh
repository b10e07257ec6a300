#!/usr/bin/env bash
# The one command: a name in, a merged, evaluated (optionally published) assistant out.
#   bash training/run.sh --name NAME [--preset internlm2_5-1_8b|smol|tiny] [--base SOURCE] [--work-dir DIR]
#       [--corpus DIR] [--recipe identity|seed] [--publish TARGET] [--from STAGE] [--max-iters N] ...
#   bash training/run.sh --help      # every option
# Works from any directory. Creates .venv-train on first use (training/make_train_env.sh), then runs
# `python -m training.pipeline` in it; interrupted runs resume when the same command is run again.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv-train"
bash "$repo/training/make_train_env.sh" "$venv" >&2
py="$venv/bin/python"
path="$repo"
# CPU torch has no importable torchvision (make_train_env.sh removes the CUDA wheel), but XTuner imports
# torchvision.transforms at module load: put the import-only stub first, never over a real torchvision.
if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
  path="$path:$repo/training/cpu_shims"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m training.pipeline "$@"
