"""How long the built-in default `edgekiln run` takes, stage by stage (target: under 3 minutes).

One run of the default recipe (small CNN, MNIST-5k, 2 float epochs, 1 QAT epoch with 50%
sparsity, ONNX + TFLite, five targets) into a temporary directory. Each stage's wall time is
printed with its ratio to the float-training stage of the same run, and the total with its
ratio to the 180 s budget.

    .venv/bin/python benchmarks/default_run.py [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from edgekiln.config import load_config
from edgekiln.run import prepare_run_dir, run

BUDGET_S = 180.0


class StageClock:
    """A run Progress that records how long each stage took."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._stage = ""
        self._t0 = 0.0

    def start(self, stage: str, total: int | None) -> None:
        self._stage, self._t0 = stage, time.perf_counter()

    def advance(self, n: int = 1, note: str = "") -> None:
        pass

    def finish(self) -> None:
        self.times[self._stage] = self.times.get(self._stage, 0.0) + time.perf_counter() - self._t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = StageClock()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run(load_config(None), prepare_run_dir(Path(tmp) / "run"), progress=clock)
        total = time.perf_counter() - t0
    base = clock.times.get("float training") or 1.0
    print(f"default run, torch threads={args.threads}")
    print(f"{'stage':<18} {'seconds':>8} {'x float training':>17}")
    for stage, seconds in clock.times.items():
        print(f"{stage:<18} {seconds:>8.1f} {seconds / base:>17.2f}")
    other = total - sum(clock.times.values())
    print(f"{'(data, setup)':<18} {other:>8.1f} {other / base:>17.2f}")
    print(f"{'total':<18} {total:>8.1f} {total / base:>17.2f}")
    print(
        f"\ntotal / {BUDGET_S:.0f} s budget = {total / BUDGET_S:.2f}  "
        f"({'within' if total <= BUDGET_S else 'OVER'} the budget)"
    )
    ok = sum(t["ok"] for t in report["targets"])
    print(
        f"targets ok: {ok} of {len(report['targets'])}; "
        f"fake-quant accuracy {report['training']['fake_quant_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
