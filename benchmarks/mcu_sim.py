"""Simulator vs TFLM on the host: throughput ratio on one batch, arena planned vs measured.

Run: .venv/bin/python -m benchmarks.mcu_sim [--batch 256] [--captured]

Models: GraphBuilder graphs shaped like the MLPerf Tiny reference architectures
(tests/targets/mcu/graphs.py). ``--captured`` switches to the registered PyTorch reference
models captured with ``edgekiln.capture`` (random weights, calibrated on random data), the
hook for when those are the models of record. Times are wall clock on this machine, one run;
quote the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekiln.exporters.tflite import write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.targets.mcu import get_board, run_mcu, simulate
from edgekiln.targets.mcu.memory import memory_report
from edgekiln.targets.tflm import run_tflm
from tests.targets.mcu import graphs


def _graphs(captured: bool) -> dict:
    if not captured:
        return {name: fn() for name, fn in graphs.GRAPHS.items()}
    import torch  # only for the --captured hook

    from edgekiln.models.registry import get_model
    from edgekiln.pipeline.capture import capture

    shapes = {
        "resnet8": (1, 3, 32, 32),
        "ds_cnn": (1, 1, 49, 10),
        "mobilenet_v1_025": (1, 3, 96, 96),
    }
    out = {}
    for name, shape in shapes.items():
        model = get_model(name).eval()
        out[name] = capture(model, torch.randn(*shape))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--captured", action="store_true", help="use edgekiln.capture models")
    args = parser.parse_args()
    board = get_board("nucleo-l4r5zi")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, graph in _graphs(args.captured).items():
            path = write_tflite(graph, Path(tmp) / f"{name}.tflite")
            model = read_tflite(path)
            inp = model.tensor(model.inputs[0])
            rng = np.random.default_rng(0)
            x = rng.integers(-128, 128, (args.batch, *inp.shape[1:])).astype(np.int8)

            t0 = time.perf_counter()
            sim = simulate(model, x).output
            sim_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            tflm = run_tflm(path, x, warmup=0, runs=1)
            tflm_wall_s = time.perf_counter() - t0
            tflm_invoke_s = tflm.latency.median_ms * args.batch / 1000.0 if tflm.latency else 0

            mem = memory_report(model, "reference")
            est = run_mcu(path, x[:1], board=board)
            rows.append((
                name, int(np.sum(sim != tflm.outputs)), sim.size, sim_s, tflm_invoke_s,
                tflm_wall_s, mem.arena_bytes, mem.arena_total_bytes,
                tflm.details.get("arena_bytes"), est.latency.median_ms,
            ))  # fmt: skip
    head = ("model", "mismatch", "values", "sim s", "tflm invoke s", "tflm wall s",
            "speed-up", "planned B", "planned+ovh B", "TFLM arena B", "L4R5 est ms")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        name, mism, n, s, ti, tw, plan, total, meas, ms = r
        print(f"{name} | {mism} | {n} | {s:.2f} | {ti:.2f} | {tw:.2f} | {ti / s:.1f}x | "
              f"{plan} | {total} | {meas} | {ms:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
