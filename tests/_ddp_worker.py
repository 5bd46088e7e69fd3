"""A rank of the distributed tests, started by ``torchrun`` (see tests/test_distributed.py).

``python -m torch.distributed.run --nproc-per-node=2 tests/_ddp_worker.py MODE OUT``

- ``train``: QAT + 50% pruning (a polynomial schedule, so masks change during the run) on the
  digits; every rank saves its scales, zero points, masks and weights to ``OUT/rank<r>.pt``;
  then rank 0 leaves the group and trains the same model in one process (``OUT/single.pt``).
  Also records the errors of the distributed rules (``OUT/errors<r>.json``).
- ``fail``: rank 1 raises after its first epoch while rank 0 trains on; rank 0 would write
  ``manifest.json`` at the very end, as ``edgekiln run`` does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

N_TRAIN = 577  # 9 global batches of 64 and a last one of 1 row: rank 1 gets a weight-0 row
BATCH = 64
EPOCHS = int(os.environ.get("EDGEKILN_TEST_EPOCHS", "2"))


def build(x: np.ndarray) -> torch.nn.Module:
    from edgekiln import Recipe, prepare
    from edgekiln.models import small_cnn
    from edgekiln.pipeline.schedules import PolynomialDecay

    torch.manual_seed(0)
    model = small_cnn(input_size=8, width=8).eval()
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=12, frequency=3)
    return prepare(model, torch.from_numpy(x[:4]), Recipe(sparsity=schedule))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Scales, zero points, masks and stored weights of a prepared model, by name."""
    from edgekiln.pipeline.constraints import apply_projections
    from edgekiln.pipeline.quant import FakeQuantizer

    apply_projections(model)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            scale, zero_point = module.qparams()
            out[f"{name}.scale"] = scale.detach().clone()
            out[f"{name}.zero_point"] = zero_point.detach().clone()
        if hasattr(module, "mask") and hasattr(module, "step"):
            out[f"{name}.mask"] = module.mask.clone()
            out[f"{name}.step"] = module.step.clone()
    for name, param in model.named_parameters():
        out[f"{name}.param"] = param.detach().clone()
    return out


def train(out: Path) -> None:
    from edgekiln.distributed import (
        all_ok,
        check_replicas,
        init_distributed,
        on_main,
        shutdown,
        wrap,
    )
    from edgekiln.models import load_dataset
    from edgekiln.pipeline.train import TrainConfig, fit

    torch.set_num_threads(1)
    ctx = init_distributed()
    assert ctx.world_size == 2, ctx
    data = load_dataset("digits")
    x, y = data.x_train[:N_TRAIN], data.y_train[:N_TRAIN]
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=2e-3, seed=3)

    errors: dict[str, str] = {}
    model = build(x)
    for key, call in (
        ("not_ddp", lambda: fit(model, x, y, config)),
        ("batch", lambda: fit(wrap(model, ctx), x, y, TrainConfig(batch_size=63))),
    ):
        try:
            call()
        except ValueError as e:
            errors[key] = str(e)
    try:
        on_main(lambda: (_ for _ in ()).throw(FileExistsError("runs/x is not empty")), ctx)
    except Exception as e:
        errors["on_main"] = f"{type(e).__name__}: {e}"
    errors["all_ok"] = json.dumps(all_ok(ctx.rank == 0, f"rank {ctx.rank} had no data", ctx))
    (out / f"errors{ctx.rank}.json").write_text(json.dumps(errors))

    model = build(x)  # afresh: the error checks above wrapped the first one
    path = trajectory(model)
    losses = fit(wrap(model, ctx), x, y, config, on_epoch_end=path.record)
    check_replicas(model, ctx)
    saved = {"state": snapshot(model), "losses": losses, "path": path.points}
    torch.save(saved, out / f"rank{ctx.rank}.pt")
    shutdown(ctx)
    if ctx.is_main:
        runs = {"single": 1} | (
            {"single_2threads": 2} if os.environ.get("EDGEKILN_TEST_EPOCHS") else {}
        )
        for name, threads in runs.items():
            torch.set_num_threads(threads)
            single = build(x)
            path = trajectory(single)
            losses = fit(single, x, y, config, on_epoch_end=path.record)
            saved = {"state": snapshot(single), "losses": losses, "path": path.points}
            torch.save(saved, out / f"{name}.pt")


class trajectory:  # noqa: N801 - a tiny recorder used as a callback
    """The stored weights after each epoch, flattened into one vector."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.points = model, []

    def record(self, epoch: int, loss: float) -> None:
        self.points.append(torch.cat([p.detach().flatten() for p in self.model.parameters()]))


def fail(out: Path) -> None:
    from edgekiln.distributed import init_distributed, on_main, wrap
    from edgekiln.models import load_dataset
    from edgekiln.pipeline.train import TrainConfig, fit
    from edgekiln.report import write_manifest

    torch.set_num_threads(1)
    ctx = init_distributed()
    data = load_dataset("digits")
    x, y = data.x_train[:256], data.y_train[:256]
    run_dir = on_main(lambda: (out / "run").mkdir() or out / "run", ctx)
    model = build(x)

    def epoch_end(epoch: int, loss: float) -> None:
        if ctx.rank == 1:
            raise RuntimeError(f"rank 1 deliberately failed after epoch {epoch}")
        if ctx.is_main:
            (run_dir / f"epoch{epoch}.txt").write_text(f"{loss}\n")

    fit(wrap(model, ctx), x, y, TrainConfig(epochs=30, batch_size=32), on_epoch_end=epoch_end)
    if ctx.is_main:
        write_manifest(run_dir)


if __name__ == "__main__":
    {"train": train, "fail": fail}[sys.argv[1]](Path(sys.argv[2]))
