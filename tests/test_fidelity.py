"""Fidelity on real data: a residual CNN fine-tuned with int8 QAT on MNIST, on every runtime.

Issue 3 and 4 targets: top-1 agreement with the fake-quantized PyTorch model of at least 99.5%
on every runtime, at least 99% of output values within 1 LSB of the output scale, and the
simulator equal to TFLM value for value. The measured figures are printed (-s shows them).
"""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekiln.config import parse_config
from edgekiln.formats.tflite import read_tflite
from edgekiln.ir import load_graph
from edgekiln.run import prepare_run_dir, run

MNIST = {
    "data": {"source": "mnist"},
    "train": {"float_epochs": 2, "qat_epochs": 1},
    "targets": {"names": ["onnxruntime", "litert", "tflm", "mcu:stm32h743"], "latency_runs": 1},
}


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    from pathlib import Path

    out = tmp_path_factory.mktemp("fidelity") / "mnist"
    report = run(parse_config(MNIST, Path.cwd()), prepare_run_dir(out))
    return out, report


def test_every_runtime_agrees_with_the_fake_quant_model(mnist_run):
    _, report = mnist_run
    print("\nfake-quant accuracy", report["training"]["fake_quant_accuracy"])
    for t in report["targets"]:
        assert t["ok"], t["error"]
        print(
            f"{t['name']:<16} agreement {t['agreement']:.4f} within_1 {t['lsb']['within_1']:.4f}"
            f" max {t['lsb']['max']} histogram {t['lsb']['histogram']}"
        )
        assert t["agreement"] >= 0.995, t["name"]
        assert t["lsb"]["within_1"] >= 0.99, t["name"]
    assert report["training"]["fake_quant_accuracy"] > 0.9


def test_runtime_pairs_are_measured_and_the_simulator_is_bit_exact(mnist_run):
    _, report = mnist_run
    names = [t["name"] for t in report["targets"]]
    pairs = {(p["a"], p["b"]): p for p in report["pairwise"]}
    assert len(pairs) == len(names) * (len(names) - 1) // 2  # every pair kept, none hidden
    for (a, b), p in pairs.items():
        print(f"{a} vs {b}: {p['differing']}/{p['compared']} differ, max {p['max_lsb']} LSB")
    assert pairs[("tflm", "mcu:stm32h743")]["differing"] == 0


def _onnx_qparams(model: onnx.ModelProto) -> dict[str, list[tuple[np.ndarray, np.ndarray, int]]]:
    """Every (scale, zero point, axis) a QuantizeLinear writes or a DequantizeLinear reads, by
    the int8 tensor's name: an activation has one of each, with the same parameters."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default
        scale, zero_point = (np.atleast_1d(inits[n]) for n in node.input[1:3])
        found.setdefault(name, []).append((scale, zero_point, axis))
    return found


def test_onnx_and_tflite_carry_the_graphs_parameters(mnist_run):
    out, _ = mnist_run
    graph = load_graph(out / "graph.npz")
    tfl = {t.name: t for t in read_tflite(out / "model.tflite").tensors}
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    onnx_q = _onnx_qparams(model)
    assert not set(graph.tensors) - set(onnx_q), "graph tensors missing from model.onnx"
    assert not set(graph.tensors) - set(tfl), "graph tensors missing from model.tflite"
    per_channel = 0
    for name, tensor in graph.tensors.items():
        t = tfl[name]
        for scale, zero_point, axis in onnx_q[name]:  # one per Q/DQ node of the tensor
            # tensor by tensor, the two artifacts hold the same numbers, in the same dtype
            np.testing.assert_array_equal(scale, t.scale, err_msg=name, strict=True)
            np.testing.assert_array_equal(zero_point, t.zero_point, err_msg=name)
            if t.scale.size > 1:  # per channel: each file's channel axis holds that many
                assert shapes[name][axis] == t.shape[t.quantized_dimension] == t.scale.size, name
        np.testing.assert_array_equal(t.scale, tensor.quant.scale, err_msg=name)
        np.testing.assert_array_equal(t.zero_point, tensor.quant.zero_point, err_msg=name)
        per_channel += t.scale.size > 1
    print(f"\n{len(graph.tensors)} tensors equal in both artifacts, {per_channel} per channel")
    assert per_channel >= 3  # the weights and biases of the convolutions at least
    report = json.loads((out / "report.json").read_text())
    assert {a["format"] for a in report["artifacts"]} == {"onnx", "tflite", "graph"}
