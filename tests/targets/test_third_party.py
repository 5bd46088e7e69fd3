"""Int8 TFLite files edgekiln did not write, on TFLM, LiteRT, the simulator and `edgekiln validate`.

The files come from tflite-micro's model editor (tests/targets/mcu/cases.py), as another tool
would write them: tensor names ``t1``, ``c2``, ..., parameters no edgekiln graph holds, no
edgekiln metadata. Every runner must read the input's scale and zero point from the file:
float NCHW data quantized by the runner and int8 NHWC data quantized here with the file's
parameters give the same outputs.

No installed wheel ships an int8 or a QUANTIZE-fronted model: the one .tflite file in the
environment is tflite-micro's ``sine_float.tflite``, float throughout (run in test_litert.py).
So the float-input file with a QUANTIZE in front is built here with the same editor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekiln.cli import main
from edgekiln.formats.tflite import read_tflite
from edgekiln.targets.litert import run_litert
from edgekiln.targets.mcu import compare_results, run_mcu
from edgekiln.targets.tflm import run_tflm
from tests.formats.tflite_cases import REQUANT_LSB, lsb
from tests.targets.mcu import cases
from tests.targets.mcu._tfl import ACT, FLOAT32, INT8, INT32, OPT, PAD, B, Net, options

FAST = {"runs": 2, "warmup": 1}
BOARD = "nrf52840"
# cases.chain(): the requantizing ops on its longest path are CONV_2D, DEPTHWISE_CONV_2D,
# CONV_2D, ADD, MEAN, FULLY_CONNECTED and SOFTMAX (MAX_POOL_2D moves values); XNNPACK
# requantizes in float, TFLM in fixed point, so each may move the result by one step.
CHAIN_REQUANT_OPS = 7


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The chain file, float NCHW data and that data quantized with the file's own parameters."""
    data, _ = cases.chain()
    path = tmp_path_factory.mktemp("third_party") / "chain.tflite"
    path.write_bytes(data)
    x = np.random.default_rng(1).normal(0, 1, (cases.BATCH, 3, 12, 12)).astype(np.float32)
    return path, x, _quantize_nhwc(path, x)


def _input_params(path) -> tuple[float, int]:
    model = read_tflite(path)
    tensor = model.tensors[model.inputs[0]]
    return float(tensor.scale[0]), int(tensor.zero_point[0])


def _quantize_nhwc(path, x: np.ndarray, params: tuple[float, int] | None = None) -> np.ndarray:
    """``x`` (NCHW float) as the file's int8 NHWC input, on the grid ``params`` (default: the
    file's own input scale and zero point)."""
    scale, zero_point = params or _input_params(path)
    q = np.clip(np.round(x / np.float32(scale)) + zero_point, -128, 127).astype(np.int8)
    return np.ascontiguousarray(q.transpose(0, 2, 3, 1))


def _runs(path, x: np.ndarray, **kwargs) -> dict:
    return {
        "tflm": run_tflm(path, x, **FAST, **kwargs),
        "litert": run_litert(path, x, **FAST, **kwargs),
        "mcu": run_mcu(path, x, board=BOARD, **kwargs),
    }


def test_input_quantization_is_read_from_the_file(chain):
    path, x, xq = chain
    assert _input_params(path) == (float(np.float32(0.02)), -5)  # what cases.chain() wrote
    from_float, from_int8 = _runs(path, x), _runs(path, xq)
    for name, r in from_float.items():
        assert r.ok and from_int8[name].ok, (name, r.error, from_int8[name].error)
        assert r.outputs.dtype == np.int8 and r.outputs.shape == (cases.BATCH, 5), name
        np.testing.assert_array_equal(r.outputs, from_int8[name].outputs, err_msg=name)
        assert r.details["input_layout"] == "NCHW", name
        assert from_int8[name].details["input_layout"] == "artifact", name
        assert (r.output_scale, r.output_zero_point) == (1 / 256, -128), name
    assert from_float["litert"].details["input_dtype"] == "int8"
    # the equality above is not an accident: another zero point changes the outputs
    shifted = run_tflm(path, _quantize_nhwc(path, x, (0.02, 0)), **FAST)
    assert np.count_nonzero(shifted.outputs != from_float["tflm"].outputs) > 0


def test_runtimes_and_the_simulator_agree(chain):
    path, x, _ = chain
    tflm = run_tflm(path, x, keep_intermediates=True, **FAST)
    sim = run_mcu(path, x, board=BOARD, keep_intermediates=True)
    assert tflm.ok and sim.ok, (tflm.error, sim.error)
    # the simulator re-implements TFLM's integer kernels: every tensor, value for value
    layers = compare_results(tflm, sim)
    assert layers.identical and not layers.missing
    assert len(layers.layers) == 10  # the input and the outputs of the 9 operators
    reference = run_litert(path, x, reference_kernels=True, **FAST)
    # TFLM's kernels are ports of LiteRT's reference kernels; measured bit-identical here
    assert lsb(tflm.outputs, reference.outputs) == 0
    xnnpack = run_litert(path, x, **FAST)
    assert xnnpack.details["xnnpack"] is True
    # measured: 1 LSB on 2 of 120 values
    assert lsb(tflm.outputs, xnnpack.outputs) <= CHAIN_REQUANT_OPS * REQUANT_LSB


def test_validate_command_on_the_file(chain, tmp_path, capsys):
    path, x, _ = chain
    y = np.arange(cases.BATCH) % 5
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    argv = [
        "validate",
        str(path),
        "--data",
        str(tmp_path / "d.npz"),
        "--target",
        "tflm",
        "--target",
        "litert",
        "--runs",
        "2",
        "--json",
        str(tmp_path / "v.json"),
        "--save-outputs",
        str(tmp_path / "o.npz"),
    ]
    assert main(argv) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "v.json").read_text())
    entries = {t["name"]: t for t in report["targets"]}
    assert set(entries) == {"tflm", "litert"}
    for name, entry in entries.items():
        assert entry["ok"], entry["error"]
        assert entry["details"]["input_layout"] == "NCHW", name
    assert entries["litert"]["details"]["input_dtype"] == "int8"
    # the command ran what the runners run: quantized with the file's parameters, same outputs
    saved = np.load(tmp_path / "o.npz")
    direct = run_tflm(path, _quantize_nhwc(path, x), **FAST)
    np.testing.assert_array_equal(saved["tflm"], direct.outputs)
    assert entries["tflm"]["accuracy"] == float(np.mean(direct.outputs.argmax(1) == y))
    (pair,) = report["pairwise"]
    assert (pair["a"], pair["b"], pair["compared"]) == ("tflm", "litert", cases.BATCH * 5)
    assert pair["max_lsb"] <= CHAIN_REQUANT_OPS * REQUANT_LSB
    assert pair["max_lsb"] == lsb(saved["tflm"], saved["litert"])


def _quantize_fronted(*, float_io: bool) -> bytes:
    """QUANTIZE, CONV_2D, MEAN, FULLY_CONNECTED (and DEQUANTIZE) as another tool writes it;
    ``float_io=False`` gives the same int8 core without the float boundary ops."""
    rng = np.random.default_rng(5)
    n = Net()
    q = n.act((1, 8, 8, 3), 0.031, 7)
    first = n.act((1, 8, 8, 3), 0, 0, FLOAT32) if float_io else q
    if float_io:
        n.op(B.QUANTIZE, [first], [q])
    ws = rng.uniform(0.002, 0.02, 6)
    w = n.const(rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8), INT8, ws, 0)
    b = n.const(rng.integers(-2000, 2000, 6).astype(np.int32), INT32, 0.031 * ws, 0)
    c = n.act((1, 8, 8, 6), 0.05, -128)
    n.op(B.CONV_2D, [q, w, b], [c], OPT.Conv2DOptions,
         options("Conv2DOptionsT", padding=PAD.SAME, strideW=1, strideH=1, dilationWFactor=1,
                 dilationHFactor=1, fusedActivationFunction=ACT.RELU))  # fmt: skip
    axes = n.const(np.array([1, 2], dtype=np.int32), INT32)
    g = n.act((1, 6), 0.03, -60)
    n.op(B.MEAN, [c, axes], [g], OPT.ReducerOptions, options("ReducerOptionsT", keepDims=False))
    ws = rng.uniform(0.005, 0.02, 1)
    w = n.const(rng.integers(-127, 128, (4, 6)).astype(np.int8), INT8, ws, 0)
    bias = n.const(rng.integers(-500, 500, 4).astype(np.int32), INT32, 0.03 * ws, 0)
    f = n.act((1, 4), 0.06, 2)
    n.op(B.FULLY_CONNECTED, [g, w, bias], [f], OPT.FullyConnectedOptions,
         options("FullyConnectedOptionsT"))  # fmt: skip
    if not float_io:
        return n.build([q], [f])
    out = n.act((1, 4), 0, 0, FLOAT32)
    n.op(B.DEQUANTIZE, [f], [out])
    return n.build([first], [out])


def test_float_input_file_with_quantize_in_front(tmp_path):
    float_path, core_path = tmp_path / "float_io.tflite", tmp_path / "core.tflite"
    float_path.write_bytes(_quantize_fronted(float_io=True))
    core_path.write_bytes(_quantize_fronted(float_io=False))
    ops = [op.opcode for op in read_tflite(float_path).operators]
    assert ops == ["QUANTIZE", "CONV_2D", "MEAN", "FULLY_CONNECTED", "DEQUANTIZE"]
    x = np.random.default_rng(2).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    cores = _runs(core_path, _quantize_nhwc(core_path, x))
    for name, r in _runs(float_path, x).items():
        core = cores[name]
        assert r.ok and core.ok, (name, r.error, core.error)
        assert r.outputs.dtype == np.float32 and r.output_scale is None, name
        assert r.details["input_layout"] == "NCHW", name
        # on each runner, the file's QUANTIZE does what the runner does for an int8 input and
        # its DEQUANTIZE maps the same int8 outputs to real values: the integers agree exactly
        steps = np.round(r.outputs / np.float32(0.06)) + 2
        np.testing.assert_array_equal(steps, core.outputs.astype(np.float32), err_msg=name)
