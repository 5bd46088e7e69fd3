"""The TFLite reader and checker: read-back, every broken field named, hostile bytes refused."""

import random
from pathlib import Path

import numpy as np
import pytest

import edgekiln.exporters.tflite as exporter
from edgekiln.exporters.tflite import _serialize, _Writer, tflite_bytes
from edgekiln.formats.tflite import OPCODE_NAMES, TfliteFormatError, check_tflite, read_tflite
from tests.formats.tflite_cases import case_graph


def _broken(name: str, mutate=None, **serialize) -> bytes:
    """The bytes of a case graph with ``mutate(writer)`` applied before serializing."""
    w = _Writer(case_graph(name), float_io=False, float_model=False, lower_grouped_conv=False)
    inputs, outputs = w.collect()
    if mutate is not None:
        result = mutate(w, inputs, outputs)
        if result is not None:
            inputs, outputs = result
    return _serialize(w, inputs, outputs, **serialize)


def _tensor(w, suffix):
    return next(t for t in w.tensors if t.name.startswith(suffix))


def test_read_back_conv_options_and_tensors():
    model = check_tflite(tflite_bytes(case_graph("dilated")))
    conv = model.operators[0]
    assert conv.opcode == "CONV_2D" and conv.version == 3
    assert conv.options["padding"] == "SAME"
    assert conv.options["fused_activation_function"] == "NONE"
    assert (conv.options["stride_w"], conv.options["dilation_h_factor"]) == (1, 2)
    assert model.tensors[conv.inputs[2]].dtype == np.int32
    assert model.size_bytes > 0 and model.opcodes() == ["CONV_2D"]
    reshape = read_tflite(tflite_bytes(case_graph("flatten_linear"))).operators[1]
    assert reshape.options["new_shape"] == [-1, 486]


def test_reads_a_tensorflow_converted_file():
    import tflite_micro

    path = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    model = check_tflite(path)
    assert [op.opcode for op in model.operators] == ["FULLY_CONNECTED"] * 3
    assert model.signature_inputs == ["dense_input"]
    assert model.operators[0].options["fused_activation_function"] == "RELU"


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="TFLite file 'nope.tflite' does not exist"):
        read_tflite("nope.tflite")


def _set(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)


def _no_inputs(w, inputs, outputs):
    w.graph.inputs = []  # the signature lists the graph's inputs
    return [], outputs


BROKEN = {
    "identifier": (
        lambda: _broken("conv2d", identifier=b"TFL2"),
        "file identifier is b'TFL2', expected b\"TFL3\"",
    ),
    "version": (
        lambda: _broken("conv2d", schema_version=2),
        "model.version is 2, expected 3",
    ),
    "buffer0": (
        lambda: _broken("conv2d", buffer0=b"\x01\x02"),
        r"model.buffers\[0\] must exist and be empty .* buffer 0 of 2 bytes",
    ),
    "no_inputs": (
        lambda: _broken("conv2d", _no_inputs),
        "subgraph.inputs is empty",
    ),
    "output_out_of_range": (
        lambda: _broken("conv2d", lambda w, i, o: (i, [99])),
        r"subgraph.outputs names tensor 99; the subgraph has 4 tensors \(valid 0..3\)",
    ),
    "op_input_out_of_range": (
        lambda: _broken("conv2d", lambda w, i, o: w.ops[0].inputs.__setitem__(1, 42)),
        r"operator 0 \(CONV_2D\) inputs name tensor 42; the subgraph has 4 tensors",
    ),
    "buffer_size": (
        lambda: _broken("conv2d", lambda w, i, o: _set(_tensor(w, "w"), shape=(6, 3, 3, 5))),
        r"tensor 2 'w1' buffer 1 holds 216 bytes, but shape \[6, 3, 3, 5\] of int8 needs 270",
    ),
    "scale_count": (
        lambda: _broken(
            "conv2d",
            lambda w, i, o: _set(
                _tensor(w, "w"), scale=np.ones(5, np.float32), zero_point=np.zeros(5, np.int64)
            ),
        ),
        r"tensor 2 'w1' has 5 scales but dimension 0 \(quantized_dimension\) of shape "
        r"\[6, 3, 3, 4\] has 6 channels",
    ),
    "zero_scale": (
        lambda: _broken(
            "conv2d", lambda w, i, o: _set(w.tensors[0], scale=np.zeros(1, np.float32))
        ),
        r"tensor 0 'input' has quantization.scale \[0.0\]; every scale must be positive",
    ),
    "conv_options": (
        lambda: _broken("conv2d", lambda w, i, o: _set(w.ops[0], options_type="NONE", options={})),
        r"operator 0 \(CONV_2D\) has builtin_options NONE; the kernel needs Conv2DOptions",
    ),
    "depthwise_dimension": (
        lambda: _broken("depthwise", lambda w, i, o: _set(_tensor(w, "w"), quantized_dimension=0)),
        r"filter tensor 2 'w1' is quantized per channel along dimension 0; DEPTHWISE_CONV_2D "
        r"needs quantized_dimension 3",
    ),
    "activation_without_quantization": (
        lambda: _broken("conv2d", lambda w, i, o: _set(w.tensors[0], scale=None)),
        r"operator 0 \(CONV_2D\) uses int8 tensor 0 'input' without quantization parameters",
    ),
    "order": (
        lambda: _broken("flatten_linear", lambda w, i, o: w.ops.reverse()),
        r"operator 0 \(FULLY_CONNECTED\) reads tensor 4 't4' before any operator writes it",
    ),
}


@pytest.mark.parametrize("field", list(BROKEN))
def test_checker_names_each_broken_field(field):
    make, message = BROKEN[field]
    with pytest.raises(TfliteFormatError, match=message):
        check_tflite(make())


def test_unknown_opcode(monkeypatch):
    monkeypatch.setitem(exporter.OPCODES, "BOGUS", 250)
    data = _broken("conv2d", lambda w, i, o: _set(w.ops[0], opcode="BOGUS"))
    with pytest.raises(TfliteFormatError, match="operator 0 has builtin opcode 250, which the"):
        check_tflite(data)


def test_short_and_truncated_files():
    with pytest.raises(TfliteFormatError, match="a flatbuffer needs at least 8"):
        read_tflite(b"TFL3")
    data = tflite_bytes(case_graph("conv2d"))
    with pytest.raises(TfliteFormatError):
        check_tflite(data[: len(data) // 2])


def test_hostile_bytes_raise_only_format_errors():
    # bit flips and truncations of a real model: each either still checks out or raises
    # TfliteFormatError; never IndexError, struct.error or a crash
    data = tflite_bytes(case_graph("flatten_linear"))
    rng = random.Random(0)
    refused = 0
    for _ in range(400):
        b = bytearray(data)
        if rng.random() < 0.3:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        try:
            check_tflite(bytes(b))
        except TfliteFormatError:
            refused += 1
    assert refused > 100


def _opcode_fields_model(fields: list[tuple[int | None, int | None]]) -> bytes:
    """A hand-built model with one operator per (deprecated_builtin_code, builtin_code) entry;
    ``None`` leaves the field out of the file, as writers that fill only one of them do."""
    import flatbuffers
    import tflite

    b = flatbuffers.Builder(256)
    tflite.BufferStart(b)
    buffers = [tflite.BufferEnd(b)]
    tensors = []
    for i in range(len(fields) + 1):
        name = b.CreateString(f"t{i}")
        shape = b.CreateNumpyVector(np.array([1, 4], np.int32))
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
        tflite.TensorAddName(b, name)
        tensors.append(tflite.TensorEnd(b))
    opcodes = []
    for deprecated, builtin in fields:
        tflite.OperatorCodeStart(b)
        if deprecated is not None:
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, deprecated)
        if builtin is not None:
            tflite.OperatorCodeAddBuiltinCode(b, builtin)
        tflite.OperatorCodeAddVersion(b, 1)
        opcodes.append(tflite.OperatorCodeEnd(b))
    operators = []
    for k in range(len(fields)):
        ins = b.CreateNumpyVector(np.array([k], np.int32))
        outs = b.CreateNumpyVector(np.array([k + 1], np.int32))
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, k)
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        operators.append(tflite.OperatorEnd(b))

    def vector(start, items):
        start(b, len(items))
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    tensors_vec = vector(tflite.SubGraphStartTensorsVector, tensors)
    operators_vec = vector(tflite.SubGraphStartOperatorsVector, operators)
    inputs = b.CreateNumpyVector(np.array([0], np.int32))
    outputs = b.CreateNumpyVector(np.array([len(fields)], np.int32))
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs)
    tflite.SubGraphAddOutputs(b, outputs)
    tflite.SubGraphAddOperators(b, operators_vec)
    subgraph = tflite.SubGraphEnd(b)
    opcodes_vec = vector(tflite.ModelStartOperatorCodesVector, opcodes)
    subgraphs_vec = vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = vector(tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddBuffers(b, buffers_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_opcode_is_the_larger_of_the_deprecated_and_the_new_field():
    # Regression: a file that fills only builtin_code (tflite-micro's model editor does) was
    # read as ADD for every op below 127, because tflite's BuiltinCode() falls back to the
    # deprecated field there. Schema rule: opcode = max(deprecated_builtin_code, builtin_code).
    data = _opcode_fields_model([
        (None, 17),  # only builtin_code: MAX_POOL_2D
        (None, 25),  # only builtin_code: SOFTMAX
        (9, None),  # only the deprecated field (old converters): FULLY_CONNECTED
        (3, 3),  # both, as TensorFlow's converter and edgekiln's writer: CONV_2D
        (127, 150),  # a code above 127: the deprecated field holds the placeholder
        (None, 0),  # ADD written explicitly in builtin_code
    ])  # fmt: skip
    model = read_tflite(data)
    assert [op.opcode for op in model.operators] == [
        "MAX_POOL_2D", "SOFTMAX", "FULLY_CONNECTED", "CONV_2D", OPCODE_NAMES[150], "ADD",
    ]  # fmt: skip
