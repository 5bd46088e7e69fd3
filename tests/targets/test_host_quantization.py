"""Float data given to an int8-input artifact: every target quantizes it on the host to the
integers the fake-quantized model computes, and the float-input artifacts' own QUANTIZE ops
round as measured.

The graph is one RESHAPE (a flatten of a single-channel 4x4 input), whose int8 kernel copies
bytes, so each target's int8 output is the int8 input it was given: 0 LSB is the right bound.
The data sits within four float32 units of half steps, where ``round(x / scale)`` (the old
host rule, and ONNX QuantizeLinear) and the fake-quantized model's ``rint(x * (1 / scale))``
part; exact half steps are in it too, where TFLite's reference ``TfLiteRound`` (half away from
zero) parts from both.
"""

import numpy as np
import pytest

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import write_tflite
from edgekiln.ir import Graph, QParams
from edgekiln.ir.builder import GraphBuilder
from edgekiln.targets.base import TargetResult
from edgekiln.targets.litert import run_litert
from edgekiln.targets.mcu import run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.ir.test_quantize_input import division_rule, fake_quant_integers, near_half_steps

# synthetic_kws input parameters; near their half steps 27 of 2,340 values part under division
SCALE, ZERO_POINT = 0.0185538717, -34
FAST = {"runs": 1, "warmup": 0}


def _flatten_graph() -> Graph:
    b = GraphBuilder(np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 1, 4, 4))
    y = b.flatten(b.input)
    g = b.build([y])
    quant = QParams.per_tensor(SCALE, ZERO_POINT)
    for name in (g.inputs[0], y):  # RESHAPE carries its input's parameters
        g.tensors[name].quant = quant
    return g


@pytest.fixture(scope="module")
def data():
    """(N, 1, 4, 4) float32 near half steps, and the fake-quantized model's integers (N, 16)."""
    x = near_half_steps(SCALE, ZERO_POINT)
    x = np.concatenate([x, np.zeros((-x.size) % 16, np.float32)]).reshape(-1, 1, 4, 4)
    expected = fake_quant_integers(x, SCALE, ZERO_POINT).reshape(len(x), 16)
    old = division_rule(x, SCALE, ZERO_POINT).reshape(len(x), 16)
    assert (old != expected).sum() >= 20  # the data reaches values where division is one off
    return x, expected


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root, g = tmp_path_factory.mktemp("host_quant"), _flatten_graph()
    return {
        "onnx int8": write_onnx(g, root / "int8.onnx", int8_io=True),
        "onnx float": write_onnx(g, root / "float.onnx"),
        "tflite int8": write_tflite(g, root / "int8.tflite"),
        "tflite float": write_tflite(g, root / "float.tflite", float_io=True),
    }


def _integers(r: TargetResult, n: int) -> np.ndarray:
    """The int8 values a target computed, (N, 16); float outputs are on the grid, so dividing
    by the scale gives their integers back exactly."""
    assert r.ok, r.error
    if r.outputs is not None and r.outputs.dtype == np.int8:
        return r.outputs.reshape(n, 16).astype(np.int8)
    real = r.real_outputs().reshape(n, 16)
    return (np.rint(real / np.float32(SCALE)) + ZERO_POINT).astype(np.int8)


INT8_INPUT_RUNS = {
    "onnxruntime": lambda a, x: run_onnxruntime(a["onnx int8"], x, **FAST),
    "litert xnnpack": lambda a, x: run_litert(a["tflite int8"], x, **FAST),
    "litert builtin": lambda a, x: run_litert(a["tflite int8"], x, xnnpack=False, **FAST),
    "tflm": lambda a, x: run_tflm(a["tflite int8"], x, **FAST),
    "mcu:nucleo-l4r5zi": lambda a, x: run_mcu(a["tflite int8"], x, board="nucleo-l4r5zi"),
}


@pytest.mark.parametrize("target", list(INT8_INPUT_RUNS))
def test_int8_input_gets_the_fake_quantized_models_integers(artifacts, data, target):
    x, expected = data
    got = _integers(INT8_INPUT_RUNS[target](artifacts, x), len(x))
    np.testing.assert_array_equal(got, expected)


def test_reference_interpreter_input_is_the_fake_quantized_models(data):
    x, expected = data
    quant = _flatten_graph().tensor("input").quant
    assert quant is not None
    np.testing.assert_array_equal(quant.quantize_input(x).reshape(len(x), 16), expected)


def _half_away_of_division(x: np.ndarray) -> np.ndarray:
    """TFLite's reference QUANTIZE: ``TfLiteRound(x / scale) + zero_point`` in float32,
    half away from zero (float64 for the + 0.5, exact for a float32 quotient)."""
    q = (x.astype(np.float32) / np.float32(SCALE)).astype(np.float64)
    return np.clip(np.sign(q) * np.floor(np.abs(q) + 0.5) + ZERO_POINT, -128, 127).astype(np.int8)


# Float-input artifacts quantize in the runtime (measured, ORT 1.32, ai-edge-litert 2.3, TFLM):
# the host cannot choose the rule, so these pin what each runtime does.
FLOAT_INPUT_RUNS = {
    "onnxruntime QuantizeLinear": (
        lambda a, x: run_onnxruntime(a["onnx float"], x, **FAST),
        lambda x: division_rule(x, SCALE, ZERO_POINT),
    ),
    "litert xnnpack QUANTIZE": (
        lambda a, x: run_litert(a["tflite float"], x, **FAST),
        lambda x: fake_quant_integers(x, SCALE, ZERO_POINT),
    ),
    "litert builtin QUANTIZE": (
        lambda a, x: run_litert(a["tflite float"], x, xnnpack=False, **FAST),
        lambda x: fake_quant_integers(x, SCALE, ZERO_POINT),
    ),
    "litert reference QUANTIZE": (
        lambda a, x: run_litert(
            a["tflite float"], x, xnnpack=False, reference_kernels=True, **FAST
        ),
        _half_away_of_division,
    ),
    "tflm QUANTIZE": (
        lambda a, x: run_tflm(a["tflite float"], x, **FAST),
        _half_away_of_division,
    ),
}


@pytest.mark.parametrize("runtime", list(FLOAT_INPUT_RUNS))
def test_float_input_quantize_ops_round_as_measured(artifacts, data, runtime):
    x, _ = data
    run, rule = FLOAT_INPUT_RUNS[runtime]
    got = _integers(run(artifacts, x), len(x))
    np.testing.assert_array_equal(got, rule(x).reshape(len(x), 16))
