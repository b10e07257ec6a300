"""Import-only stub of torchvision.transforms (see training/cpu_shims/README.md)."""

from torchvision import _WHY


def __getattr__(name: str):
    raise AttributeError(f"torchvision.transforms.{name}: {_WHY}")
