"""Simulator vs TFLM on the host: throughput on one batch, arena planned vs measured, latency.

Run: ``.venv/bin/python benchmarks/mcu_sim.py [--batch 256] [--graphs]``

Models (default ``--captured``): the registered MLPerf Tiny reference models
(``edgekiln.models``: resnet8, ds_cnn, mobilenet_v1_025, fc_autoencoder) prepared with the
default recipe, calibrated on 256 samples of their offline dataset and captured with
``edgekiln.capture``: the graphs users export. ``--graphs`` uses the GraphBuilder stand-ins of
tests/targets/mcu/graphs.py instead (no torch needed).

Speed: the simulator runs the whole batch in-process (everything counted: model reading,
parameter preparation, kernels); TFLM runs one sample at a time in a child process, as firmware
does, and only its ``set_input`` + ``invoke`` loop over the same batch is timed (interpreter
start-up and allocation excluded, which favours TFLM). Wall and CPU seconds are both printed:
on a shared machine CPU seconds are the steadier figure. Times are one run on this machine;
quote the ratios, not the absolute numbers.

Arena: "planned" is the simulator's plan for TFLM's reference kernels, "TFLM head" the
non-persistent arena TFLM itself planned (print_allocations), "TFLM total" all TFLM used on
this 64-bit host (head + persistent structs), "planned+ovh" the plan plus the estimated
interpreter state of a 32-bit MCU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The stand-in graphs and the TFLM child live with the tests; run as a file, the repository
# root is not on the path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekiln.exporters.tflite import write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.targets.base import run_isolated
from edgekiln.targets.mcu import get_board, simulate
from edgekiln.targets.mcu.latency import MLPERF_TINY_V05_L4R5ZI_MS, estimate_ms
from edgekiln.targets.mcu.memory import memory_report
from edgekiln.targets.tflm import run_tflm
from tests.targets.mcu import _tflm_child, graphs

CAPTURED = ("resnet8", "ds_cnn", "mobilenet_v1_025", "fc_autoencoder")


def _captured_graphs() -> dict[str, tuple[object, np.ndarray]]:
    """(graph, float test inputs) of each reference model, calibrated on its dataset."""
    import torch

    from edgekiln import Recipe, capture, prepare
    from edgekiln.models import load_dataset
    from edgekiln.models.registry import MODELS, get_model
    from edgekiln.pipeline.train import calibrate

    torch.manual_seed(0)
    out = {}
    for name in CAPTURED:
        ds = load_dataset(MODELS[name].dataset)
        model = get_model(name).eval()
        prepared = prepare(model, torch.from_numpy(ds.x_train[:64]), Recipe())
        calibrate(prepared, ds.x_train[:256])
        out[name] = (capture(prepared.eval()), ds.x_test)
    return out


def _builder_graphs() -> dict[str, tuple[object, None]]:
    return {name: (fn(), None) for name, fn in graphs.GRAPHS.items()}


def _batch(model, x_float: np.ndarray | None, batch: int) -> np.ndarray:
    """int8 inputs in the artifact's layout: the dataset's test samples, or random."""
    inp = model.tensor(model.inputs[0])
    if x_float is None:
        rng = np.random.default_rng(0)
        return rng.integers(-128, 128, (batch, *inp.shape[1:])).astype(np.int8)
    x = np.resize(x_float, (batch, *x_float.shape[1:]))  # repeats samples if too few
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    x = x.reshape(batch, *inp.shape[1:])
    q = np.round(x / float(inp.scale[0])) + int(inp.zero_point[0])
    return np.clip(q, -128, 127).astype(np.int8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--graphs", action="store_true", help="GraphBuilder stand-ins")
    args = parser.parse_args()
    board = get_board("nucleo-l4r5zi")
    models = _builder_graphs() if args.graphs else _captured_graphs()
    speed, arena = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (graph, x_float) in models.items():
            path = write_tflite(graph, Path(tmp) / f"{name}.tflite")
            model = read_tflite(path)
            x = _batch(model, x_float, args.batch)

            t0, c0 = time.perf_counter(), time.process_time()
            sim = simulate(model, x).output
            sim_wall, sim_cpu = time.perf_counter() - t0, time.process_time() - c0

            tflm = run_tflm(path, x, warmup=0, runs=1)
            if not tflm.ok:
                raise SystemExit(f"TFLM failed on {name}: {tflm.error}")
            tflm_cpu, tflm_wall = run_isolated(
                _tflm_child.tflm_invoke_seconds, path.read_bytes(), x, timeout=900
            )
            mismatches = int(np.sum(sim.reshape(tflm.outputs.shape) != tflm.outputs))
            speed.append((name, sim.size, mismatches, sim_wall, sim_cpu, tflm_wall, tflm_cpu))

            mem = memory_report(model, "reference")
            (head,) = run_isolated(_tflm_child.tflm_arena_head, [path.read_bytes()])
            est = estimate_ms(model, board, "cmsis-nn")
            arena.append((name, mem.arena_bytes, head, mem.arena_total_bytes,
                          tflm.details["arena_bytes"], est,
                          MLPERF_TINY_V05_L4R5ZI_MS.get(name)))  # fmt: skip

    print(f"batch {args.batch}, {'GraphBuilder stand-ins' if args.graphs else 'captured models'}")
    print("model | values | mismatches | sim wall s | sim cpu s | TFLM wall s | TFLM cpu s | "
          "wall ratio | cpu ratio")  # fmt: skip
    for name, n, mism, sw, sc, ti, tc in speed:
        print(f"{name} | {n} | {mism} | {sw:.2f} | {sc:.2f} | {ti:.2f} | {tc:.2f} | "
              f"{ti / sw:.1f}x | {tc / sc:.1f}x")  # fmt: skip
    print()
    print("model | planned B | TFLM head B | planned+ovh (32-bit) B | TFLM total (64-bit) B | "
          "L4R5 est ms | MLPerf v0.5 ms | est/published")  # fmt: skip
    for name, plan, head, total, measured, est, pub in arena:
        ratio = f"{est / pub:.2f}" if pub else "-"
        pub_s = f"{pub:.1f}" if pub else "-"
        print(f"{name} | {plan} | {head} | {total} | {measured} | {est:.0f} | {pub_s} | {ratio}")


if __name__ == "__main__":
    main()
