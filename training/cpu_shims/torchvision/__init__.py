"""Import-only torchvision stub for the CPU training env (see training/cpu_shims/README.md).

Enabled by training/run.sh when torchvision is not installed; any real use raises with the reason.
"""

# mmengine records this in its environment report at the start of every run.
__version__ = "0.0.0+cpu_shim"

_WHY = (
    "torchvision is not installed in the CPU training env: training/cpu_shims only satisfies XTuner's "
    "import of torchvision.transforms for text-only training"
)


def __getattr__(name: str):
    raise AttributeError(f"torchvision.{name}: {_WHY}")
