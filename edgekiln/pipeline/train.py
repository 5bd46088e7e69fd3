"""An ordinary PyTorch training loop, and the two read-outs every stage needs.

edgekiln's constraints need nothing special from the loop: projections (clip, L1, L2,
pruning masks) run before each training forward, fake-quantizers observe in training mode.
This loop is what ``edgekiln run`` uses; users are free to write their own.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class Loss(str, enum.Enum):
    """What the model is trained to do."""

    CROSS_ENTROPY = "cross_entropy"  # classification: y holds class ids
    MSE = "mse"  # reconstruction: the target is the input itself


@dataclass(frozen=True)
class TrainConfig:
    """Epochs, batch size, learning rate (Adam) and the seed of the shuffling."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (name == "batch_size")
            ):
                raise ValueError(
                    f"TrainConfig.{name}={value!r} must be a whole number >= "
                    f"{int(name == 'batch_size')}"
                )
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 10):
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be a number in (0, 10)")


# on_step(epoch, step, steps_per_epoch, loss)
StepCallback = Callable[[int, int, int, float], None]


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray | None,
    config: TrainConfig,
    *,
    loss: Loss = Loss.CROSS_ENTROPY,
    on_step: StepCallback | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    first_epoch: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``x`` (float32, batch first); return each epoch's mean loss.

    ``y`` holds class ids for ``Loss.CROSS_ENTROPY`` and is ignored for ``Loss.MSE``. Each
    epoch shuffles with its own seed (``config.seed`` and the epoch number), so a run resumed
    at ``first_epoch`` with the saved ``optimizer`` repeats what an uninterrupted run does.
    ``on_epoch_end(epoch, mean_loss)`` is where a caller saves a checkpoint.
    """
    if loss == Loss.CROSS_ENTROPY and y is None:
        raise ValueError("classification training needs labels y; pass y or use Loss.MSE")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    criterion: nn.Module = nn.CrossEntropyLoss() if loss == Loss.CROSS_ENTROPY else nn.MSELoss()
    steps = max(1, -(-len(xt) // config.batch_size))
    history = []
    model.train()
    for epoch in range(first_epoch, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for step in range(steps):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb = xt[idx]
            target = yt[idx] if loss == Loss.CROSS_ENTROPY and yt is not None else xb
            optimizer.zero_grad(set_to_none=True)
            value = criterion(model(xb), target)
            value.backward()
            optimizer.step()
            loss_value = value.item()
            total += loss_value
            if on_step is not None:
                on_step(epoch, step, steps, loss_value)
        history.append(total / steps)
        if on_epoch_end is not None:
            on_epoch_end(epoch, total / steps)
    return history


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs of ``model`` in eval mode on ``x`` (float32, batch first), as float32 numpy."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))))
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)


def calibrate(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> None:
    """Let every observer of a prepared model see ``x`` without training it (post-training).

    Observers update in training mode; gradients are off, so no projection or optimizer runs.
    """
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
    model.train(was_training)


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of logits ``outputs`` (N, classes) against class ids ``y``."""
    return float((outputs.argmax(axis=1) == np.asarray(y)).mean())
