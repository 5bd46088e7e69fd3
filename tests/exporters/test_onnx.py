"""The ONNX QDQ writer: structure, exact parameters, names, IO modes and atomic writes.

Numbers (ONNX Runtime vs the reference, in LSB) live in tests/targets/test_onnxruntime.py.
"""

import doctest
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import edgekiln.exporters.onnx as onnx_exporter
from edgekiln.exporters.onnx import to_onnx_model, write_onnx
from edgekiln.ir import DType, GraphError, OpType, QParams
from edgekiln.ir.builder import GraphBuilder


def every_op_graph_2d():
    """Conv (regular, depthwise, grouped, dilated, asymmetric pads), add+relu, relu6, pools
    with padding, pad, mean, reshape, linear, concat of convs and of linears, softmax."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(rng.normal(size=(4, 3, 12, 12)).astype(np.float32), seed=0)
    a = b.conv(b.input, 8, 3, padding=((1, 0), (2, 1)), activation="relu")
    c = b.conv(a, 8, 3, padding=1, groups=8, activation="relu6")
    d = b.conv(c, 8, 3, padding=2, dilation=2, groups=2)
    s = b.add(a, d, activation="relu")
    e = b.conv(s, 8, 3, stride=2, padding=1)
    p = b.max_pool(e, 3, 2, padding=1)
    q = b.avg_pool(p, 3, 2, padding=1)
    pd = b.pad(q, ((0, 0), (0, 0), (1, 0), (0, 1)))
    f = b.flatten(b.mean(pd, keepdims=True))
    l1 = b.linear(f, 10, activation="relu")
    l2 = b.requantize_like(b.linear(b.mean(e), 10), l1)
    sm = b.softmax(b.concat([l1, l2]))
    c1 = b.conv(e, 4, 1)
    c2 = b.requantize_like(b.conv(e, 4, 1), c1)
    return b.build([sm, b.concat([c1, c2])])


def every_op_graph_1d():
    """1-D conv (regular, dilated depthwise, grouped strided), pools, mean, softmax with beta."""
    rng = np.random.default_rng(1)
    b = GraphBuilder(rng.normal(size=(4, 4, 32)).astype(np.float32), seed=1)
    a = b.conv(b.input, 8, 5, padding=((2, 1),), activation="relu")
    c = b.conv(a, 8, 3, padding=2, dilation=2, groups=8)
    d = b.conv(c, 8, 3, groups=4, stride=2)
    q = b.avg_pool(b.max_pool(d, 2), 3, 1, padding=1)
    return b.build([b.softmax(b.linear(b.mean(q), 6), beta=0.5)])


GRAPHS = [every_op_graph_2d, every_op_graph_1d]


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("make", GRAPHS)
@pytest.mark.parametrize("int8_io", [False, True])
def test_checker_and_strict_shape_inference_pass(make, int8_io):
    model = to_onnx_model(make(), int8_io=int8_io)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"  # batch stays symbolic through every op


@pytest.mark.parametrize("make", GRAPHS)
def test_weights_are_int8_and_biases_int32_initializers(make):
    g = make()
    inits = _inits(to_onnx_model(g))
    for t in g.constants():
        if t.name in inits:
            np.testing.assert_array_equal(inits[t.name], t.data)
            assert inits[t.name].dtype == (np.int8 if t.dtype == DType.INT8 else np.int32)
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in inits.values())


@pytest.mark.parametrize("make", GRAPHS)
def test_scales_and_zero_points_are_the_graphs(make):
    g = make()
    inits = _inits(to_onnx_model(g))
    for name, t in g.tensors.items():
        if t.is_constant and f"{name}_scale" not in inits:
            continue  # a 0-D conv weight written as its block-diagonal twin (checked below)
        scale, zp = inits[f"{name}_scale"], inits[f"{name}_zero_point"]
        if t.dtype == DType.INT32:  # bias: input scale * weight scale, computed in float32
            continue
        np.testing.assert_array_equal(scale.reshape(-1), t.quant.scale)  # bit-identical
        np.testing.assert_array_equal(zp.reshape(-1), t.quant.zero_point)
        assert zp.dtype == np.int8
    for op in g.ops:
        if op.type in (OpType.CONV, OpType.LINEAR):
            x, w, bias = (g.tensor(n) for n in op.inputs)
            expected = (x.quant.scale * w.quant.scale).astype(np.float32)
            np.testing.assert_array_equal(inits[f"{bias.name}_scale"], expected)
            np.testing.assert_allclose(inits[f"{bias.name}_scale"], bias.quant.scale, rtol=1e-6)


def test_per_axis_dequantize_on_weights_and_biases():
    model = to_onnx_model(every_op_graph_2d())
    inits = _inits(model)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert [(a.name, a.i) for a in node.attribute] == [("axis", 0)]
            assert inits[node.input[1]].ndim == 1


def test_ir_names_are_kept():
    g = every_op_graph_2d()
    model = to_onnx_model(g)
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    activations = {n for n, t in g.tensors.items() if not t.is_constant}
    assert q_outputs == activations
    node_names = {n.name for n in model.graph.node}
    assert {op.name for op in g.ops} <= node_names
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(json.loads(meta["edgekiln.int8_tensors"])) == activations


def test_fused_activations_sit_before_quantize():
    g = every_op_graph_2d()
    nodes = {n.name: n for n in to_onnx_model(g).graph.node}
    relu6 = next(op for op in g.ops if op.attrs.get("activation") == "relu6")
    clip = nodes[f"{relu6.name}/Clip"]
    assert clip.op_type == "Clip" and clip.output[0] == f"{relu6.outputs[0]}_real"
    assert [
        numpy_helper.to_array(t).item()
        for t in to_onnx_model(g).graph.initializer
        if t.name in clip.input[1:]
    ] == [0.0, 6.0]
    relu = next(op for op in g.ops if op.attrs.get("activation") == "relu")
    assert nodes[f"{relu.name}/Relu"].op_type == "Relu"


def test_ops_and_their_attributes():
    g = every_op_graph_2d()
    nodes = {n.name: n for n in to_onnx_model(g).graph.node}
    attrs = {
        name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for name, n in nodes.items()
    }
    first = g.ops[0]  # padding ((1, 0), (2, 1)): ONNX lists all begins, then all ends
    assert nodes[first.name].op_type == "Conv"
    assert attrs[first.name]["pads"] == [1, 2, 0, 1]
    avg = next(op for op in g.ops if op.type == OpType.AVG_POOL)
    assert attrs[avg.name]["count_include_pad"] == 0
    kinds = {op.type: nodes[op.name].op_type for op in g.ops}
    assert kinds[OpType.LINEAR] == "Gemm" and attrs[g.ops[-1].name] == {"axis": 1}
    assert kinds[OpType.MEAN] in ("GlobalAveragePool", "ReduceMean")
    assert kinds[OpType.PAD] == "Pad" and kinds[OpType.SOFTMAX] == "Softmax"


@pytest.mark.parametrize("int8_io", [False, True])
def test_float_and_int8_io(int8_io):
    g = every_op_graph_1d()
    model = to_onnx_model(g, int8_io=int8_io)
    want = TensorProto.INT8 if int8_io else TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == want
    assert model.graph.output[0].type.tensor_type.elem_type == want
    names = (g.inputs[0], g.outputs[0])
    expected = names if int8_io else tuple(f"{n}_float" for n in names)
    assert (model.graph.input[0].name, model.graph.output[0].name) == expected


def test_float_model_has_no_qdq_and_dequantized_weights():
    g = every_op_graph_1d()
    model = to_onnx_model(g, float_model=True)
    onnx.checker.check_model(model, full_check=True)
    assert not any("Quantize" in n.op_type for n in model.graph.node)
    inits = _inits(model)
    w = g.tensor(g.ops[0].inputs[1])
    np.testing.assert_array_equal(inits[w.name], w.quant.dequantize(w.data))


def test_write_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_onnx(every_op_graph_1d(), path)
    assert path.read_bytes() == b"old model"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left


def test_written_file_loads(tmp_path):
    path = write_onnx(every_op_graph_1d(), tmp_path / "sub" / "m.onnx", int8_io=True)
    onnx.checker.check_model(str(path), full_check=True)


def test_non_finite_scale_is_refused():
    g = every_op_graph_1d()
    name = g.ops[0].outputs[0]
    g.tensors[name].quant = QParams.per_tensor(float("nan"), 0)
    with pytest.raises(GraphError, match=f"tensor '{name}' has a non-finite"):
        to_onnx_model(g)


def test_bias_scale_that_is_not_input_times_weight_is_refused():
    g = every_op_graph_1d()
    op = g.ops[0]
    bias = g.tensor(op.inputs[2])
    bias.quant = QParams.per_channel(bias.quant.scale * 1.01)
    with pytest.raises(GraphError, match=r"is not input scale \* weight scale"):
        to_onnx_model(g)


def test_int8_io_with_float_model_is_refused():
    with pytest.raises(ValueError, match="int8_io=True and float_model=True contradict"):
        to_onnx_model(every_op_graph_1d(), int8_io=True, float_model=True)


def test_docstring_examples():
    assert doctest.testmod(onnx_exporter).failed == 0


def test_bias_with_wrong_channel_count_is_refused():
    g = every_op_graph_1d()
    op = g.ops[0]
    bias = g.tensor(op.inputs[2])
    bias.quant = QParams.per_tensor(float(bias.quant.scale[0]), 0)
    with pytest.raises(GraphError, match=r"needs 8 per-channel scales"):
        to_onnx_model(g)
