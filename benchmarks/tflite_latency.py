"""Batch-1 latency of one CNN on the TFLite runtimes, as ratios from a single run.

Rows: LiteRT int8 with XNNPACK, LiteRT int8 builtin kernels (no delegate), LiteRT float32 TFLite
of the same (dequantized) weights, ONNX Runtime on the int8 QDQ ONNX artifact (exact int8 mode
and ORT's default uint8 rewrite) when the ONNX writer is importable, and TFLM's kernels on the
host. Absolute times drift between runs on this machine; ratios within one run are what to
quote (DESIGN.md). Each runtime runs in its own child process, one thread.

Run: ``.venv/bin/python benchmarks/tflite_latency.py [--runs 200]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edgekiln.exporters.tflite import write_tflite
from edgekiln.ir import Graph
from edgekiln.targets.litert import run_litert
from edgekiln.targets.tflm import run_tflm


def _graph() -> Graph:
    """The benchmarked model: the default small CNN (edgekiln.models.small_cnn, 1x28x28),
    prepared and calibrated on 256 MNIST images and captured. Latency depends on the structure
    and the kernels, not on training, so calibration is enough here."""
    import torch

    from edgekiln import capture, prepare
    from edgekiln.models import load_dataset, small_cnn
    from edgekiln.pipeline.train import calibrate

    torch.manual_seed(0)
    x = load_dataset("mnist").x_train[:256]
    prepared = prepare(small_cnn().eval(), torch.from_numpy(x[:2]))
    calibrate(prepared, x)
    return capture(prepared.eval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    timing = {"runs": args.runs, "warmup": args.warmup}

    graph = _graph()
    x = np.random.default_rng(1).normal(0, 1, (4, 1, 28, 28)).astype(np.float32)
    root = Path(tempfile.mkdtemp(prefix="edgekiln-bench-"))
    int8 = write_tflite(graph, root / "cnn_int8.tflite")
    fp32 = write_tflite(graph, root / "cnn_fp32.tflite", float_model=True)

    rows: list[tuple[str, float | None, str]] = []

    def add(label: str, result) -> None:
        if result.ok:
            rows.append((label, result.latency.median_ms, ""))
        else:
            rows.append((label, None, result.error.splitlines()[0]))

    add("LiteRT int8, XNNPACK", run_litert(int8, x, xnnpack=True, **timing))
    add("LiteRT int8, builtin kernels", run_litert(int8, x, xnnpack=False, **timing))
    add("LiteRT fp32, XNNPACK", run_litert(fp32, x, xnnpack=True, **timing))
    add("LiteRT fp32, builtin kernels", run_litert(fp32, x, xnnpack=False, **timing))
    try:
        from edgekiln.exporters.onnx import write_onnx
        from edgekiln.targets.onnxruntime import run_onnxruntime
    except ImportError as e:
        rows.append(("ONNX Runtime", None, f"skipped: {e}"))
    else:
        onnx_path = write_onnx(graph, root / "cnn_int8.onnx")
        add("ORT int8 QDQ, exact int8", run_onnxruntime(onnx_path, x, int8_exact=True, **timing))
        add("ORT int8 QDQ, ORT default", run_onnxruntime(onnx_path, x, int8_exact=False, **timing))
    tflm = run_tflm(int8, x, runs=max(args.runs // 4, 10), warmup=5)
    add("TFLM kernels on host", tflm)

    base = rows[0][1]
    print(f"model: {graph.name}, {len(graph.ops)} ops, input 1x28x28, batch 1, 1 thread")
    print(f"{'runtime':32s} {'median ms':>10s} {'vs LiteRT int8 XNNPACK':>24s}")
    for label, ms, note in rows:
        if ms is None:
            print(f"{label:32s} {'-':>10s} {'-':>24s}  {note}")
        else:
            ratio = f"{ms / base:.2f}x" if base else "-"
            print(f"{label:32s} {ms:10.3f} {ratio:>24s}")
    if tflm.ok:
        print(
            f"TFLM arena: {tflm.details['arena_bytes']} bytes; ops to register: "
            f"{', '.join(tflm.details['op_registrations'])}"
        )


if __name__ == "__main__":
    main()
