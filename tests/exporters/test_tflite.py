"""The TFLite writer: layout, parameters copied exactly, padding choices, file structure."""

import flatbuffers
import numpy as np
import pytest
import tflite

from edgekiln.exporters.tflite import (
    TfliteExportError,
    _padding_modes,
    tflite_bytes,
    write_tflite,
)
from edgekiln.formats.tflite import read_tflite
from edgekiln.ir.builder import GraphBuilder
from tests.formats.tflite_cases import CAL_2D, CASES, case_graph


@pytest.mark.parametrize("name", list(CASES))
def test_quantization_is_exactly_the_graphs(name):
    graph = case_graph(name)
    model = read_tflite(tflite_bytes(graph))
    by_name = {t.name: t for t in model.tensors}
    for tensor in graph.tensors.values():
        t = by_name[tensor.name]  # every graph tensor keeps its name
        assert t.dtype == tensor.dtype.numpy
        assert np.array_equal(t.scale, tensor.quant.scale), tensor.name
        assert np.array_equal(t.zero_point, tensor.quant.zero_point.astype(np.int64))
        if tensor.quant.is_per_channel:
            depthwise = t.shape[0] == 1 and len(t.shape) == 4
            assert t.quantized_dimension == (3 if depthwise else 0), tensor.name


def test_conv_and_depthwise_weights_are_nhwc():
    graph = case_graph("depthwise")
    model = read_tflite(tflite_bytes(graph))
    w_name = graph.ops[0].inputs[1]
    t = next(t for t in model.tensors if t.name == w_name)
    assert t.shape == (1, 3, 3, 8) and t.quantized_dimension == 3
    assert np.array_equal(t.data, graph.tensor(w_name).data.transpose(1, 2, 3, 0))
    assert model.operators[0].options["depth_multiplier"] == 2
    graph = case_graph("conv2d")
    model = read_tflite(tflite_bytes(graph))
    w_name = graph.ops[0].inputs[1]
    t = next(t for t in model.tensors if t.name == w_name)
    assert np.array_equal(t.data, graph.tensor(w_name).data.transpose(0, 2, 3, 1))
    assert model.tensors[model.inputs[0]].shape == (1, 9, 9, 4)


def test_linear_after_flatten_gets_hwc_columns():
    graph = case_graph("flatten_linear")
    model = read_tflite(tflite_bytes(graph))
    linear = graph.ops[-1]
    w = graph.tensor(linear.inputs[1]).data  # (7, 6*9*9) in (C, H, W) column order
    t = next(t for t in model.tensors if t.name == linear.inputs[1])
    expected = w.reshape(7, 6, 9, 9).transpose(0, 2, 3, 1).reshape(7, -1)
    assert np.array_equal(t.data, expected)
    assert not np.array_equal(t.data, w)
    assert [op.opcode for op in model.operators] == ["CONV_2D", "RESHAPE", "FULLY_CONNECTED"]


def test_flatten_that_is_an_output_goes_through_transpose():
    model = read_tflite(tflite_bytes(case_graph("reshape")))
    assert [op.opcode for op in model.operators] == ["TRANSPOSE", "RESHAPE"]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "pad", "modes"),
    [
        (9, 3, 1, 1, (1, 1), {"SAME"}),
        (9, 3, 2, 1, (1, 1), {"SAME"}),  # PyTorch p=1, s=2 on odd size is TF SAME
        (8, 3, 2, 1, (1, 1), set()),  # PyTorch pads the start, TF SAME pads only the end
        (8, 3, 2, 1, (0, 1), {"SAME"}),
        (9, 3, 1, 1, (0, 0), {"VALID"}),
        (9, 2, 2, 1, (0, 0), {"VALID"}),  # last row unused by both
        (9, 3, 1, 2, (2, 2), {"SAME"}),
        (5, 1, 1, 1, (0, 0), {"SAME", "VALID"}),
    ],
)
def test_padding_modes(size, kernel, stride, dilation, pad, modes):
    assert _padding_modes(size, kernel, stride, dilation, pad) == modes


def test_asymmetric_padding_becomes_pad_then_valid():
    model = read_tflite(tflite_bytes(case_graph("stride2_asym_pad")))
    assert [op.opcode for op in model.operators] == ["PAD", "CONV_2D"]
    assert model.operators[1].options["padding"] == "VALID"
    paddings = next(t for t in model.tensors if t.name.endswith("/pad/paddings"))
    assert paddings.data.tolist() == [[0, 0], [1, 0], [0, 2], [0, 0]]


def test_max_pool_padding_that_is_not_same_is_refused():
    b = GraphBuilder(CAL_2D)
    g = b.build([b.max_pool(b.input, 2, 2, padding=1)])
    with pytest.raises(
        TfliteExportError, match=r"max_pool op 'max_pool0': padding \(\(1, 1\), \(1, 1\)\)"
    ):
        tflite_bytes(g)


def test_file_structure(tmp_path):
    graph = case_graph("concat")
    path = write_tflite(graph, tmp_path / "sub" / "m.tflite")
    data = path.read_bytes()
    assert data == tflite_bytes(graph) and data[4:8] == b"TFL3"
    model = read_tflite(data)
    assert model.version == 3 and model.buffer0_size == 0
    assert model.signature_key == "serving_default"
    assert model.signature_inputs == ["input"] and model.signature_outputs == graph.outputs
    assert model.description == "edgekiln export of graph 'concat'"
    fb = tflite.Model.GetRootAs(data, 0)
    for i in range(1, fb.BuffersLength()):
        buf = fb.Buffers(i)
        if buf.DataLength():
            o = flatbuffers.number_types.UOffsetTFlags.py_type(buf._tab.Offset(4))
            assert buf._tab.Vector(o) % 16 == 0, f"buffer {i} not 16-byte aligned"


def test_float_io_and_float_model_variants():
    graph = case_graph("conv2d")
    fio = read_tflite(tflite_bytes(graph, float_io=True))
    assert [op.opcode for op in fio.operators] == ["QUANTIZE", "CONV_2D", "DEQUANTIZE"]
    assert fio.tensors[fio.inputs[0]].name == "input:float"
    assert fio.tensors[fio.inputs[0]].dtype == np.float32
    fm = read_tflite(tflite_bytes(graph, float_model=True))
    assert [op.opcode for op in fm.operators] == ["CONV_2D"]
    assert all(t.dtype == np.float32 and t.scale.size == 0 for t in fm.tensors)
    w_name = graph.ops[0].inputs[1]
    w = next(t for t in fm.tensors if t.name == w_name)
    real = graph.tensor(w_name).quant.dequantize(graph.tensor(w_name).data)
    assert np.array_equal(w.data, real.transpose(0, 2, 3, 1))


def test_grouped_conv_native_and_lowered():
    graph = case_graph("grouped")
    native = read_tflite(tflite_bytes(graph))
    assert [op.opcode for op in native.operators] == ["CONV_2D"]
    assert native.tensors[native.operators[0].inputs[1]].shape == (6, 3, 3, 2)
    lowered = read_tflite(tflite_bytes(graph, lower_grouped_conv=True))
    assert [op.opcode for op in lowered.operators] == [
        "SPLIT",
        "CONV_2D",
        "CONV_2D",
        "CONCATENATION",
    ]
    out = graph.tensor(graph.outputs[0]).quant
    for t in lowered.tensors:
        if "/group" in t.name and t.data is None:
            assert np.array_equal(t.scale, out.scale)  # one output parameter set: exact
