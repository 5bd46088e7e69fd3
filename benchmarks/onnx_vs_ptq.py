"""edgekiln's int8 ONNX artifact vs ONNX Runtime's own post-training quantization vs fp32.

One run, one machine, one set of session options: every model runs through
``edgekiln.targets.onnxruntime.run_onnxruntime`` (child process, ORT_ENABLE_ALL, batch-1
latency after warm-up). Speeds are printed as ratios against fp32 on the same runtime: absolute
times drift between runs, ratios taken in one run do not (DESIGN.md).

Models, all from the same weights:

- ``edgekiln``: ``write_onnx(graph)`` -- the QDQ artifact with the graph's own scales;
- ``ort-ptq``: ``onnxruntime.quantization.quantize_static`` on the trained float model (QDQ,
  per-channel int8 weights, int8 activations, MinMax calibration);
- ``fp32``: the trained float model, exported by torch.

The model is the default small CNN trained on MNIST-5k (4,000 train / 1,000 test images): 2
float epochs, then 1 epoch of edgekiln int8 QAT (no sparsity) for edgekiln's artifact; ORT's PTQ
quantizes the float model after calibrating on 256 training images. Accuracy is on the test set.

Run: ``.venv/bin/python benchmarks/onnx_vs_ptq.py [--runs 200] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edgekiln.exporters.onnx import write_onnx
from edgekiln.ir import Graph
from edgekiln.targets.base import TargetResult
from edgekiln.targets.onnxruntime import cpu_has_vnni, run_onnxruntime


def _trained_models(d: Path) -> tuple[Graph, Path, np.ndarray, np.ndarray, np.ndarray]:
    """Train the default small CNN on MNIST-5k: float (2 epochs), then edgekiln QAT (1 epoch).

    Returns the captured QAT graph, the float model as an fp32 ONNX file (torch's exporter),
    a calibration batch from the training set for ORT's PTQ, and the test set (x, y).
    """
    import torch

    from edgekiln import Recipe, capture, prepare
    from edgekiln.models import load_dataset, small_cnn
    from edgekiln.pipeline.train import TrainConfig, fit

    torch.manual_seed(0)
    data = load_dataset("mnist")
    float_model = small_cnn()
    fit(float_model, data.x_train, data.y_train, TrainConfig(epochs=2, lr=2e-3))
    float_model.eval()
    fp32 = d / "fp32.onnx"
    torch.onnx.export(
        float_model,
        torch.from_numpy(data.x_train[:1]),
        str(fp32),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    prepared = prepare(float_model, torch.from_numpy(data.x_train[:2]), Recipe())
    fit(prepared, data.x_train, data.y_train, TrainConfig(epochs=1, lr=5e-4, seed=1))
    graph = capture(prepared.eval())
    assert data.y_test is not None
    return graph, fp32, data.x_train[:256], data.x_test, data.y_test


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

    with tempfile.TemporaryDirectory(prefix="edgekiln-bench-") as tmp:
        d = Path(tmp)
        graph, fp32, calibration, x, y = _trained_models(d)
        ours = write_onnx(graph, d / "edgekiln.onnx")
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


if __name__ == "__main__":
    main()
