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
from torch import Tensor, fx, nn

from edgekiln.pipeline.ops import where
from edgekiln.pipeline.prepare import ActivationQuant
from edgekiln.pipeline.quant import FakeQuantizer


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


def _check_not_empty(x: np.ndarray, stage: str, what: str) -> None:
    n = len(x) if np.ndim(x) else 0
    if n == 0:
        raise ValueError(
            f"{stage}: the {what} set is empty (0 samples, x of shape {tuple(np.shape(x))}): pass "
            "at least one sample, batch first (x.shape[0] is the number of samples)"
        )


def _forward(
    model: nn.Module, xb: Tensor, x: np.ndarray, rows: Tensor | slice, stage: str, diverged: str
) -> Tensor:
    """``model(xb)``; a fake-quantizer's non-finite range is re-raised naming where it sits.

    ``x[rows]`` is the global batch ``xb`` is this rank's share of, searched for the sample
    that holds NaN or inf (every rank finds the same one); ``diverged`` is the way out when the
    batch is finite. Nothing is checked until a forward raises.
    """
    try:
        return model(xb)
    except ValueError as error:
        found = _non_finite_quantizers(model)
        if not found:
            raise
        quantizers = f"{len(found)} fake-quantizer{'s' if len(found) > 1 else ''}"
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        index = np.arange(len(x))[rows.numpy() if isinstance(rows, Tensor) else rows]
        values = torch.from_numpy(np.asarray(x[index], dtype=np.float32).reshape(len(index), -1))
        bad = ~torch.isfinite(values).all(dim=1)  # (B,) bool: what the model saw, as float32
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            value = float(values[first][~torch.isfinite(values[first])][0])  # nan, inf or -inf
            cause = (
                f"Sample {int(index[first])} of x holds {value} ({int(bad.sum())} of this "
                f"batch's {len(index)} samples hold NaN or inf): clean the data (np.nan_to_num, "
                "or drop those samples)"
            )
        else:
            cause = f"This batch of x is finite: {diverged}"
        raise ValueError(
            f"{stage}: {quantizers} observed a non-finite range, so no scale: {shown}. {cause}, "
            "then prepare the model again (an observed range keeps its NaN or inf)"
        ) from error


def _non_finite_quantizers(model: nn.Module) -> list[str]:
    """Each FakeQuantizer whose observed range holds NaN or inf: its module path, its site."""
    outputs: dict[int, str] = {}  # id(FakeQuantizer) -> the layer whose output it quantizes
    for gm in model.modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
                if isinstance(module, ActivationQuant) and isinstance(node.args[0], fx.Node):
                    outputs.setdefault(id(module.quantizer), f"the output of {where(node.args[0])}")
    found = []
    for path, module in model.named_modules():
        if isinstance(module, FakeQuantizer) and module.observed:
            if module.observer.range_is_finite:
                continue
            layer, _, parametrized = path.partition(".parametrizations.")
            site = outputs.get(id(module))
            if site is None and parametrized:
                site = f"the {parametrized.split('.')[0]} of layer {layer!r}"
            at = f", {site}" if site else ""
            found.append(f"{path!r} ({module.observer.describe_range()}{at})")
    return found


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
        ValueError: An empty ``x``; no labels for classification; a fake-quantizer that
            observed NaN or inf (in ``x``, or because training diverged), named by module path;
            under torch.distributed, a model not in DistributedDataParallel or a
            ``batch_size`` the world size does not divide.
    """
    _check_not_empty(x, "fit", "training")
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
    diverged = (
        f"training diverged (or the model held NaN or inf before fit); lower the learning rate "
        f"(TrainConfig.lr={config.lr})"
    )
    history = []
    model.train()
    for epoch in range(first_epoch, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(xt), generator=generator)  # the same on every rank
        total = 0.0
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]  # global
            idx = batch  # this rank's rows of it
            weight = None
            if world_size > 1:
                idx, weight = batch_share(idx, rank, world_size)
            xb = xt[idx].to(device)
            target = yt[idx].to(device) if loss == Loss.CROSS_ENTROPY and yt is not None else xb
            optimizer.zero_grad(set_to_none=True)
            output = _forward(model, xb, x, batch, f"fit, epoch {epoch} step {step}", diverged)
            if weight is None:
                value = criterion(output, target)
            else:
                value = (_per_sample_loss(loss, output, target) * weight.to(device)).sum()
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

    Raises:
        ValueError: An empty ``x``, or a fake-quantizer that observed NaN or inf (named by its
            module path, with a sample of ``x`` that holds one).
    """
    _check_not_empty(x, "calibrate", "calibration")
    rank, world_size = _world()
    device = _device(model)
    diverged = "the model held NaN or inf before calibrate (a diverged training run?)"
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                rows = slice(i, i + batch_size)
                xb = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
                if world_size > 1:
                    xb = xb[batch_share(torch.arange(len(xb)), rank, world_size)[0]]
                _forward(model, xb.to(device), x, rows, "calibrate", diverged)
    finally:
        model.train(was_training)


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of logits ``outputs`` (N, classes) against class ids ``y``."""
    return float((outputs.argmax(axis=1) == np.asarray(y)).mean())
