"""Reference architectures and offline datasets.

Datasets need only numpy, so ``from edgekiln.models import load_dataset`` works on a validation
machine without PyTorch. The models and the registry import torch on first use (module-level
``__getattr__``), which also lets a recipe name a model as ``"edgekiln.models:small_cnn"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgekiln.models.datasets import DATASETS, Dataset, check_input_shape, load_dataset, load_npz

if TYPE_CHECKING:
    from edgekiln.models.architectures import (
        count_parameters,
        ds_cnn,
        fc_autoencoder,
        mobilenet_v1_025,
        resnet8,
        small_cnn,
    )
    from edgekiln.models.registry import MODELS, ModelSpec, Task, get_model

__all__ = [
    "DATASETS",
    "MODELS",
    "Dataset",
    "ModelSpec",
    "Task",
    "check_input_shape",
    "count_parameters",
    "ds_cnn",
    "fc_autoencoder",
    "get_model",
    "load_dataset",
    "load_npz",
    "mobilenet_v1_025",
    "resnet8",
    "small_cnn",
]

# Public name -> submodule that defines it; importing that submodule imports torch.
_TORCH_NAMES = {
    "count_parameters": "architectures",
    "ds_cnn": "architectures",
    "fc_autoencoder": "architectures",
    "mobilenet_v1_025": "architectures",
    "resnet8": "architectures",
    "small_cnn": "architectures",
    "MODELS": "registry",
    "ModelSpec": "registry",
    "Task": "registry",
    "get_model": "registry",
}


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        module = importlib.import_module(f"edgekiln.models.{_TORCH_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'edgekiln.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
