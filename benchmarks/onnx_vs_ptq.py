"""edgekiln's int8 ONNX artifact vs ONNX Runtime's own post-training quantization vs fp32.

One run, one machine, one set of session options: every model runs through
``edgekiln.targets.onnxruntime.run_onnxruntime`` (child process, ORT_ENABLE_ALL, batch-1
latency after warm-up). Speeds are printed as ratios against fp32 on the same runtime: absolute
times drift between runs, ratios taken in one run do not (DESIGN.md).

Models, all from the same weights:

- ``edgekiln``: ``write_onnx(graph)`` -- the QDQ artifact with the graph's own scales;
- ``ort-ptq``: ``onnxruntime.quantization.quantize_static`` on the float model of the same
  dequantized weights (QDQ, per-channel int8 weights, int8 activations, MinMax calibration on
  the same calibration data);
- ``fp32``: ``write_onnx(graph, float_model=True)``.

Hooks for the lead:

- ``_edgekiln_graph()`` builds the graph with GraphBuilder (random weights, calibrated on random
  data) until ``edgekiln.capture`` of a QAT-trained model exists; switch it there.
- ``_evaluation_data()`` returns None until real data and a trained model are wired; return
  ``(x, y)`` (float NCHW, integer labels) and the table gains top-1 accuracy per model.

Run: ``.venv/bin/python benchmarks/onnx_vs_ptq.py [--runs 200] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edgekiln.exporters.onnx import write_onnx
from edgekiln.ir import Graph
from edgekiln.ir.builder import GraphBuilder
from edgekiln.targets.base import TargetResult
from edgekiln.targets.onnxruntime import cpu_has_vnni, run_onnxruntime


def _edgekiln_graph() -> tuple[Graph, np.ndarray]:
    """The quantized graph to benchmark and its float calibration batch (N, C, H, W).

    TODO(lead): replace with ``edgekiln.capture(qat_model, example)`` once capture lands; keep
    returning the calibration batch the PTQ baseline calibrates on.
    """
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(64, 1, 28, 28)).astype(np.float32)
    b = GraphBuilder(calibration, seed=0, name="small_cnn")
    t = b.conv(b.input, 16, 3, padding=1, activation="relu")
    t = b.max_pool(t, 2)
    t = b.conv(t, 32, 3, padding=1, activation="relu")
    t = b.max_pool(t, 2)
    t = b.conv(t, 32, 3, padding=1, groups=32, activation="relu6")
    t = b.conv(t, 64, 1, activation="relu")
    t = b.linear(b.flatten(b.mean(t, keepdims=True)), 10)
    return b.build([t]), calibration


def _evaluation_data() -> tuple[np.ndarray, np.ndarray] | None:
    """Held-out (x, y) for accuracy; None until the lead wires real data and training."""
    return None


def _ort_ptq(float_model: Path, calibration: np.ndarray, out: Path) -> Path:
    """ONNX Runtime's static QDQ quantization of ``float_model`` (per-channel, int8/int8)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{"input": calibration[i : i + 1]} for i in range(len(calibration))]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantize_static(
        str(float_model),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    graph, calibration = _edgekiln_graph()
    evaluation = _evaluation_data()
    x, y = evaluation if evaluation is not None else (calibration, None)
    with tempfile.TemporaryDirectory(prefix="edgekiln-bench-") as tmp:
        d = Path(tmp)
        ours = write_onnx(graph, d / "edgekiln.onnx")
        fp32 = write_onnx(graph, d / "fp32.onnx", float_model=True)
        ptq = _ort_ptq(fp32, calibration, d / "ort_ptq.onnx")
        common = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads}
        results: dict[str, TargetResult] = {
            "fp32": run_onnxruntime(fp32, x, y, **common),
            "edgekiln (int8 x int8)": run_onnxruntime(ours, x, y, **common),
            "edgekiln (ORT default)": run_onnxruntime(ours, x, y, int8_exact=False, **common),
            "ort-ptq (int8 x int8)": run_onnxruntime(ptq, x, y, **common),
            "ort-ptq (ORT default)": run_onnxruntime(ptq, x, y, int8_exact=False, **common),
        }
    _print_table(results, args.threads)


def _print_table(results: dict[str, TargetResult], threads: int) -> None:
    failed = {name: r.error for name, r in results.items() if not r.ok}
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    base = results["fp32"].latency.median_ms
    reference = np.argmax(results["fp32"].outputs, axis=1)
    print(f"ONNX Runtime, {threads} thread(s), batch 1, CPU VNNI: {cpu_has_vnni()}")
    header = f"{'model':26s} {'median ms':>10s} {'p90 ms':>8s} {'vs fp32':>8s} {'top-1=fp32':>11s}"
    print(header + f" {'accuracy':>9s}  int8 kernels")
    for name, r in results.items():
        lat = r.latency
        agree = float(np.mean(np.argmax(r.outputs, axis=1) == reference))
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        kernels = sorted(
            k.split(".")[-1]
            for k in r.details["optimized_ops"]
            if "QLinear" in k or k.endswith("QGemm")
        )
        print(
            f"{name:26s} {lat.median_ms:10.4f} {lat.p90_ms:8.4f} {lat.median_ms / base:8.2f} "
            f"{agree:11.4f} {acc:>9s}  {','.join(kernels) or '-'}"
        )
    if results["fp32"].accuracy is None:
        print("accuracy: not wired yet (return (x, y) from _evaluation_data())")


if __name__ == "__main__":
    main()
