"""Import-only stub of torchvision.transforms.functional (see training/cpu_shims/README.md)."""

from enum import Enum

from torchvision import _WHY


class InterpolationMode(Enum):
    """Imported by name at module load by xtuner/dataset/internvl_dataset.py; values as in torchvision."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name: str):
    raise AttributeError(f"torchvision.transforms.functional.{name}: {_WHY}")
