"""An ordinary PyTorch training loop, and the two read-outs every stage needs.

edgekiln's constraints need nothing special from the loop: projections (clip, L1, L2,
pruning masks) run before each training forward, fake-quantizers observe in training mode.
This loop is what ``edgekiln run`` uses; users are free to write their own.

Under ``torch.distributed`` (``torchrun``, see ``edgekiln.distributed``) the same loop trains a
DistributedDataParallel model data-parallel: ``TrainConfig.batch_size`` stays the *global*
batch, every rank draws the same shuffled order and takes its share of each global batch
(:func:`batch_share`), and the loss is weighted so that DDP's gradient average is the gradient
of the global batch's mean loss. Observers all-reduce their ranges, so they see the global
batch's min and max. A run on N ranks therefore computes what one process computes with the
same batch size, up to float summation order (measured in ``docs/distributed.md``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


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


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def batch_share(index: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """This rank's rows of one global batch and the weight of each row's loss.

    Rank ``r`` takes rows ``r, r + N, ...`` (``N = world_size``). Each row weighs
    ``N / len(index)``, so summing weighted losses on every rank and averaging over ranks (what
    DDP does to gradients) gives the global batch's mean loss. A rank left without a row (a
    last batch smaller than N) takes the batch's first row with weight 0: it still runs the
    forward and backward the other ranks wait for, and a repeated row changes no observed range.

    >>> batch_share(torch.arange(5), rank=1, world_size=2)
    (tensor([1, 3]), tensor([0.4000, 0.4000]))
    >>> batch_share(torch.tensor([7]), rank=1, world_size=2)
    (tensor([7]), tensor([0.]))
    """
    rows = index[rank::world_size]
    if len(rows) == 0:
        return index[:1], torch.zeros(1)
    return rows, torch.full((len(rows),), world_size / len(index))


def _check_distributed(model: nn.Module, config: TrainConfig, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise ValueError(
            f"fit: torch.distributed is initialized with world size {world_size}, but the model "
            f"is a {type(model).__name__}, not DistributedDataParallel: its gradients would not "
            "be averaged and the ranks would drift apart. Pass "
            "edgekiln.distributed.wrap(model, ctx), or train before init_process_group"
        )
    if config.batch_size % world_size:
        below = config.batch_size - config.batch_size % world_size
        raise ValueError(
            f"TrainConfig.batch_size={config.batch_size} is the global batch and must split "
            f"evenly over world size {world_size} (each rank takes batch_size / world_size): "
            f"use batch_size {below or world_size} or {below + world_size}, or a number of "
            f"processes that divides {config.batch_size}"
        )


def _per_sample_loss(loss: Loss, output: Tensor, target: Tensor) -> Tensor:
    if loss == Loss.CROSS_ENTROPY:
        return nn.functional.cross_entropy(output, target, reduction="none")
    return ((output - target) ** 2).flatten(1).mean(dim=1)  # (B,): MSELoss per sample


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

    Under ``torch.distributed`` pass the model wrapped in DistributedDataParallel
    (``edgekiln.distributed.wrap``) and the whole ``x`` on every rank: each rank trains on its
    share of every global batch of ``config.batch_size`` rows (see :func:`batch_share`), and the
    losses returned and given to ``on_step`` are the global batch's, equal on every rank.

    Raises:
        ValueError: No labels for classification; under torch.distributed, a model not in
            DistributedDataParallel or a ``batch_size`` the world size does not divide.
    """
    if loss == Loss.CROSS_ENTROPY and y is None:
        raise ValueError("classification training needs labels y; pass y or use Loss.MSE")
    rank, world_size = _world()
    if world_size > 1:
        _check_distributed(model, config, world_size)
    device = _device(model)
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
        order = torch.randperm(len(xt), generator=generator)  # the same on every rank
        total = 0.0
        for step in range(steps):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            weight = None
            if world_size > 1:
                idx, weight = batch_share(idx, rank, world_size)
            xb = xt[idx].to(device)
            target = yt[idx].to(device) if loss == Loss.CROSS_ENTROPY and yt is not None else xb
            optimizer.zero_grad(set_to_none=True)
            if weight is None:
                value = criterion(model(xb), target)
            else:
                per_sample = _per_sample_loss(loss, model(xb), target)
                value = (per_sample * weight.to(device)).sum()
            value.backward()
            optimizer.step()
            loss_value = _global_loss(value, world_size)
            total += loss_value
            if on_step is not None:
                on_step(epoch, step, steps, loss_value)
        history.append(total / steps)
        if on_epoch_end is not None:
            on_epoch_end(epoch, total / steps)
    return history


def _global_loss(value: Tensor, world_size: int) -> float:
    """The global batch's mean loss: the mean over ranks of their weighted sums."""
    if world_size == 1:
        return float(value.item())
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return float(total.item()) / world_size


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs of ``model`` in eval mode on ``x`` (float32, batch first), as float32 numpy.

    Runs in this process only (no collective): under torch.distributed give it the unwrapped
    model, on whichever ranks need the outputs.
    """
    was_training = model.training
    device = _device(model)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            out.append(model(xb.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)


def calibrate(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> None:
    """Let every observer of a prepared model see ``x`` without training it (post-training).

    Observers update in training mode; gradients are off, so no projection or optimizer runs.
    Under torch.distributed call it on every rank with the whole ``x``: each rank passes its
    share of every batch, and the all-reduced ranges are those of the whole batch, as in one
    process.
    """
    rank, world_size = _world()
    device = _device(model)
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            if world_size > 1:
                xb = xb[batch_share(torch.arange(len(xb)), rank, world_size)[0]]
            model(xb.to(device))
    model.train(was_training)


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of logits ``outputs`` (N, classes) against class ids ``y``."""
    return float((outputs.argmax(axis=1) == np.asarray(y)).mean())
