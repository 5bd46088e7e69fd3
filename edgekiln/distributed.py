"""Data-parallel fine-tuning under ``torchrun``: PyTorch's own DistributedDataParallel (DDP).

``torchrun --nproc-per-node=2 -m edgekiln run RECIPE.toml`` starts two processes (ranks); each
calls :func:`init_distributed`, builds the same model, wraps it with :func:`wrap` and trains it
with :func:`edgekiln.pipeline.train.fit`, which gives each rank its share of every global batch.
What keeps the ranks one model:

- gradients are averaged by DDP (an all-reduce after every backward), so every rank takes the
  same optimizer step on the same weights;
- observers all-reduce each observed range (``edgekiln.pipeline.quant``: min of the ranks' mins,
  max of their maxes), which is exactly the range of the whole global batch;
- pruning masks are computed from those identical weights on identical schedule steps
  (:func:`wrap` makes DDP's initial broadcast count as no projection step);
- :func:`check_replicas` proves it after training: every rank hashes every parameter and buffer
  (weights, masks, observer ranges, step counters) and a mismatch is an error naming the tensors.

Only rank 0 writes files (:func:`on_main` runs a step there and hands its result, or its error,
to every rank). Capture, export and validation run on rank 0 alone, after :func:`shutdown`.

Backends: ``gloo``, on CPU, is the default even where CUDA exists: ``edgekiln run`` trains,
prepares and captures on the CPU, and ``nccl`` reduces CUDA tensors only (observers all-reduce
during ``prepare``, on the CPU). ``init_distributed("nccl")`` puts each rank on
``cuda:LOCAL_RANK`` for a loop of your own that keeps the model and data there; that path was
not exercised here (no GPU). The default becomes ``nccl`` on GPUs when the run moves models there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistContext",
    "DistributedError",
    "ReplicaMismatchError",
    "all_ok",
    "barrier",
    "broadcast_object",
    "check_replicas",
    "init_distributed",
    "on_main",
    "replica_digest",
    "shard",
    "shutdown",
    "sync_from_main",
    "wrap",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this fails instead of hanging


class DistributedError(RuntimeError):
    """A distributed run that cannot go on: a bad launch environment, or another rank failed."""


class ReplicaMismatchError(DistributedError):
    """Ranks that should hold one model hold different tensors after training."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a run: its rank among ``world_size`` processes.

    The default is a single process (rank 0 of 1, no backend): every function here is then a
    no-op, so one code path serves both.

    >>> ctx = DistContext()
    >>> ctx.is_main, ctx.is_distributed, str(ctx.device)
    (True, False, 'cpu')
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one rank that writes the run directory."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True while a process group joins ``world_size > 1`` processes (not after shutdown).

        So after :func:`shutdown`, rank 0 goes on alone and every helper here is a no-op.
        """
        dist = torch.distributed
        return (
            self.backend is not None
            and self.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
        )

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` under nccl, else the CPU."""
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )


def init_distributed(
    backend: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> DistContext:
    """Join the process group ``torchrun`` set up, or return a single-process context.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and lets PyTorch read ``MASTER_ADDR`` and
    ``MASTER_PORT``). Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, nothing is initialized.
    ``backend`` None means ``gloo`` (see the module docstring for nccl). Called twice, it
    returns the context of the group already joined.

    >>> init_distributed(env={})
    DistContext(rank=0, world_size=1, local_rank=0, backend=None)

    Raises:
        DistributedError: A malformed torchrun environment, or an unknown backend.
    """
    env = os.environ if env is None else env
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            dist.get_rank(),
            dist.get_world_size(),
            int(env.get("LOCAL_RANK", dist.get_rank())),
            str(dist.get_backend()),
        )
    world_size = _env_int(env, "WORLD_SIZE", 1, minimum=1)
    if world_size == 1:
        return DistContext()
    rank = _env_int(env, "RANK", None, minimum=0)
    local_rank = _env_int(env, "LOCAL_RANK", rank, minimum=0)
    if rank >= world_size:
        raise DistributedError(
            f"RANK={rank} must be below WORLD_SIZE={world_size}; launch with torchrun, which "
            "sets both"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise DistributedError(
                f"WORLD_SIZE={world_size} but {name} is not set: the ranks cannot find each "
                "other. Launch with `torchrun --nproc-per-node=N -m edgekiln run ...`, which "
                "sets it"
            )
    if not dist.is_available():
        raise DistributedError(
            f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed; install "
            "a build with it or run a single process"
        )
    chosen = backend or "gloo"
    if chosen not in BACKENDS:
        raise DistributedError(f"backend={chosen!r} is not one of {BACKENDS}; use gloo on CPU")
    if chosen == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        chosen,
        rank=rank,
        world_size=world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )
    logger.info("rank %d of %d joined the %s process group", rank, world_size, chosen)
    return DistContext(rank, world_size, local_rank, chosen)


def _env_int(env: Mapping[str, str], name: str, default: int | None, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistributedError(
                f"{name} is not set but WORLD_SIZE is; launch with torchrun, which sets both"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise DistributedError(
            f"environment variable {name}={raw!r} must be a whole number >= {minimum}; launch "
            "with torchrun, which sets it"
        )
    return value


def shutdown(ctx: DistContext | None = None) -> None:
    """Leave the process group (safe to call twice, or without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        logger.info("rank %d left the process group", ctx.rank if ctx else -1)


# ---- data ------------------------------------------------------------------------------------


def shard(
    x: np.ndarray, y: np.ndarray | None, ctx: DistContext
) -> tuple[np.ndarray, np.ndarray | None]:
    """This rank's strided shard of ``(x, y)``: rows ``rank, rank + N, ...``, equal on every rank.

    For a loop of your own (``fit`` needs no shard: it splits every global batch itself, which is
    what keeps it equal to a single process). The last ``len(x) % N`` rows are left out so every
    rank holds the same number of rows and runs the same number of steps; a rank with fewer
    steps would leave the others waiting in a collective. Views, not copies.

    >>> xs, ys = shard(np.arange(7), np.arange(7) * 10, DistContext(rank=1, world_size=2))
    >>> xs.tolist(), ys.tolist()
    ([1, 3, 5], [10, 30, 50])
    """
    n = len(x) - len(x) % ctx.world_size
    if n < len(x):
        logger.info("shard: %d of %d rows left out to keep ranks equal", len(x) - n, len(x))
    rows = slice(ctx.rank, n, ctx.world_size)
    return x[rows], (None if y is None else y[rows])


# ---- the model -------------------------------------------------------------------------------


def wrap(
    model: nn.Module,
    ctx: DistContext,
    *,
    broadcast_buffers: bool | None = None,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``model`` in DistributedDataParallel (or ``model`` itself in a single process).

    Every rank must call it, in the same order, with an identically built model (DDP copies
    rank 0's parameters to the others). Pending projections (pruning masks, clipping) run
    first, and DDP's copy is counted as no projection step, so schedules stay aligned with a
    single-process run.

    ``broadcast_buffers`` None means: only when the model has BatchNorm layers (their running
    statistics come from each rank's shard, so rank 0's are copied to the others every
    forward). A prepared model has none (``prepare`` folds them): its buffers (observer ranges,
    masks, counters) are equal on every rank by construction, and :func:`check_replicas` proves
    it instead of a broadcast hiding a difference. ``find_unused_parameters`` is only needed for
    a model whose forward skips some parameters.

    Returns the DDP module; the trained model is ``wrapped.module`` (save and capture that).
    """
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from edgekiln.pipeline.constraints import apply_projections, mark_projected

    if broadcast_buffers is None:
        broadcast_buffers = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
    model = model.to(ctx.device)
    apply_projections(model)  # the same pending work on every rank, before rank 0's copy
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers (per forward) to forward_sync_buffers
    if _accepts(DistributedDataParallel.__init__, "forward_sync_buffers"):
        wrapped = DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=find_unused_parameters,
            forward_sync_buffers=broadcast_buffers,
        )
    else:
        wrapped = DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=find_unused_parameters,
            broadcast_buffers=broadcast_buffers,
        )
    mark_projected(model)  # DDP's in-place copy of projected weights is not a training step
    return wrapped


def sync_from_main(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into ``model`` on every rank (in place).

    After float training with BatchNorm: each rank's last forward updated its running
    statistics from its own shard, so the replicas differ there until this copy. Call it on
    every rank before ``prepare`` folds the statistics into the kernels.
    """
    if not ctx.is_distributed:
        return
    model = getattr(model, "module", model)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name`` (a keyword renamed across versions)."""
    import inspect

    return name in inspect.signature(fn).parameters


def replica_digest(model: nn.Module) -> dict[str, str]:
    """A short SHA-256 of every parameter and buffer of ``model`` (unwrapped), by name.

    Covers weights, pruning masks, observer ranges (so scales and zero points), step counters.

    >>> lin = nn.Linear(2, 1, bias=False)
    >>> _ = nn.init.zeros_(lin.weight)
    >>> replica_digest(lin)
    {'weight': '1fe4557706120c1e'}
    """
    model = getattr(model, "module", model)
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().numpy()
        h = hashlib.sha256(f"{data.dtype}{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
        out[name] = h.hexdigest()[:16]
    return out


def check_replicas(model: nn.Module, ctx: DistContext) -> None:
    """Fail unless every rank holds bit-identical parameters and buffers; call it on every rank.

    Pending projections run first on every rank (a checkpoint written on rank 0 alone may
    have run rank 0's already), so all ranks compare the same point of training.

    Raises:
        ReplicaMismatchError: Names the ranks and up to five tensors that differ from rank 0.
    """
    if not ctx.is_distributed:
        return
    from edgekiln.pipeline.constraints import apply_projections

    inner = getattr(model, "module", model)
    apply_projections(inner)
    digests: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(digests, replica_digest(inner))
    reference = digests[0]
    bad = []
    for rank, digest in enumerate(digests[1:], start=1):
        names = sorted(
            k for k in reference.keys() | digest.keys() if reference.get(k) != digest.get(k)
        )
        if names:
            bad.append(f"rank {rank}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if bad:
        raise ReplicaMismatchError(
            "after training the ranks hold different models (they must be identical: the "
            f"gradients, observer ranges and masks are synchronized): {'; '.join(bad)}. This is "
            "a bug in edgekiln or in a custom constraint that draws random numbers or reads "
            "rank-local state; report it with the recipe, or train in a single process"
        )
    logger.info("replicas identical on %d ranks (%d tensors)", ctx.world_size, len(reference))


# ---- coordination ----------------------------------------------------------------------------


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (picklable; e.g. the run directory rank 0 chose)."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here."""
    if ctx.is_distributed:
        torch.distributed.barrier()


def all_ok(ok: bool, error: str | None, ctx: DistContext) -> list[tuple[int, str]]:
    """Tell every rank how every rank fared; returns ``(rank, error)`` of each failed rank.

    Use it at a point every rank reaches without a collective in flight (a stage boundary,
    inside an ``except`` that caught the stage's error), then raise if the list is not empty.
    A rank that dies instead never gets here: ``torchrun`` then stops the others.

    >>> all_ok(False, "no data", DistContext())
    [(0, 'no data')]
    """
    if not ctx.is_distributed:
        return [] if ok else [(0, error or "failed")]
    states: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(states, (bool(ok), error))
    return [(rank, err or "failed") for rank, (good, err) in enumerate(states) if not good]


def on_main(step: Callable[[], T], ctx: DistContext) -> T:
    """Run ``step`` on rank 0 only; every rank returns its result or raises its error.

    For what must happen once (create the run directory, write a file). Other ranks raise
    :class:`DistributedError` carrying rank 0's message, so every rank stops with the reason.

    >>> on_main(lambda: "runs/20250101-120000", DistContext())
    'runs/20250101-120000'
    """
    if not ctx.is_distributed:
        return step()
    result: Any = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = step()
        except Exception as e:  # handed to the other ranks, then raised here too
            error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    result, message = broadcast_object((result, message), ctx)
    if error is not None:
        raise error
    if message is not None:
        raise DistributedError(f"rank 0 failed, so rank {ctx.rank} stops too: {message}")
    return result  # type: ignore[no-any-return]
