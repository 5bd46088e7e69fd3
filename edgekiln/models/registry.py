"""The model registry: name -> factory, input shape, task and default dataset."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from torch import nn

from edgekiln.models.architectures import (
    ds_cnn,
    fc_autoencoder,
    mobilenet_v1_025,
    resnet8,
    small_cnn,
)

__all__ = ["MODELS", "ModelSpec", "Task", "get_model"]


class Task(str, enum.Enum):
    """What a model's output means, which decides how it is scored."""

    CLASSIFICATION = "classification"  # (N, num_classes) logits, scored by top-1 accuracy
    RECONSTRUCTION = "reconstruction"  # (N, *input_shape) reconstruction, scored by its error


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered reference model.

    Attributes:
        factory: builds the model; keyword arguments go to it (e.g. ``num_classes``).
        input_shape: shape of one input with the factory's defaults, no batch dimension.
        task: classification (logits) or reconstruction (autoencoder).
        dataset: name of the built-in dataset it trains on by default (see ``load_dataset``).
        description: one line for listings and reports.
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    task: Task
    dataset: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "small_cnn": ModelSpec(
        small_cnn,
        (1, 28, 28),
        Task.CLASSIFICATION,
        "mnist",
        "small residual CNN for MNIST 28x28 (input_size=8 for digits), 25,290 parameters",
    ),
    "ds_cnn": ModelSpec(
        ds_cnn,
        (1, 49, 10),
        Task.CLASSIFICATION,
        "synthetic_kws",
        "MLPerf Tiny keyword spotting DS-CNN, 49x10 MFCC, 12 classes, 23,756 parameters",
    ),
    "mobilenet_v1_025": ModelSpec(
        mobilenet_v1_025,
        (3, 96, 96),
        Task.CLASSIFICATION,
        "synthetic_vww",
        "MLPerf Tiny visual wake words MobileNetV1 0.25, 96x96 RGB, 216,322 parameters",
    ),
    "resnet8": ModelSpec(
        resnet8,
        (3, 32, 32),
        Task.CLASSIFICATION,
        "synthetic_cifar",
        "MLPerf Tiny image classification ResNet-8, CIFAR-10 32x32 RGB, 78,186 parameters",
    ),
    "fc_autoencoder": ModelSpec(
        fc_autoencoder,
        (640,),
        Task.RECONSTRUCTION,
        "synthetic_anomaly",
        "MLPerf Tiny anomaly detection dense autoencoder, 640 inputs, 267,928 parameters",
    ),
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``, passing ``kwargs`` to its factory.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).

    >>> get_model("resnet8", num_classes=4).fc.out_features
    4
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(MODELS)}; a model of your own is "
            f"given as 'module:callable', e.g. 'mypackage.models:build'"
        )
    return MODELS[name].factory(**kwargs)
