"""ONNX Runtime target: per-op agreement with the reference in LSB, IO modes, kernel modes,
and failures that come back as results (or raise before any child starts).

Each ``run_onnxruntime`` call starts a child process (~2 s), so runs are shared through
module-scoped fixtures.
"""

import doctest
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import edgekiln.targets.onnxruntime as ort_target
from edgekiln.exporters.onnx import to_onnx_model, write_onnx
from edgekiln.ir import DType, Graph, OpType
from edgekiln.ir.builder import GraphBuilder
from edgekiln.ir.reference import float_op, run_reference
from edgekiln.targets.onnxruntime import (
    KERNEL_MODE_DEFAULT,
    KERNEL_MODE_INT8,
    cpu_has_vnni,
    run_onnxruntime,
)
from tests.exporters.test_onnx import every_op_graph_1d, every_op_graph_2d

# Largest difference, in LSB of the op's output scale, between ORT's int8 kernels
# (qdqisint8allowed=1) and the reference op given the *same* int8 inputs.
#
# - conv / linear (QLinearConv, QGemm): the int32 accumulator is exact in both; ORT rescales it
#   by the float32 multiplier input_scale * weight_scale / output_scale and rounds, the
#   reference sums dequantized float32 products and divides by output_scale. The two real values
#   differ by float32 rounding (~1e-6 relative), so they round to different integers only next
#   to a .5 boundary, and then by one step: 1 LSB. Measured: 1 (conv), 0 (linear).
# - add (QLinearAdd), avg_pool (QLinearAveragePool), mean (QLinearGlobalAveragePool; ReduceMean
#   runs in float), softmax (QLinearSoftmax, a 256-entry exp table): each computes the real value
#   by another float route and rounds once: 1 LSB. Measured: add 0, avg_pool 1, mean 1,
#   softmax 0 (16 random graphs, both 1-D and 2-D).
# - max_pool, reshape, pad, concat move int8 values (shared parameters; pad writes the zero
#   point): exact, 0 LSB.
PER_OP_LSB = {
    OpType.CONV: 1,
    OpType.LINEAR: 1,
    OpType.ADD: 1,
    OpType.AVG_POOL: 1,
    OpType.MEAN: 1,
    OpType.SOFTMAX: 1,
    OpType.MAX_POOL: 0,
    OpType.RESHAPE: 0,
    OpType.PAD: 0,
    OpType.CONCAT: 0,
}


def _calibration(g: Graph, seed: int) -> np.ndarray:
    shape = (6, *g.tensor(g.inputs[0]).shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _op_reference(g: Graph, op, values: dict[str, np.ndarray]) -> np.ndarray:
    """The reference result of one op on the int8 inputs ORT itself produced."""
    real = []
    for name in op.inputs:
        t = g.tensor(name)
        if t.data is None:
            real.append(t.quant.dequantize(values[name]))
        elif t.dtype == DType.INT32:
            real.append((t.data * t.quant.scale.astype(np.float64)).astype(np.float32))
        else:
            real.append(t.quant.dequantize(t.data))
    return g.tensor(op.outputs[0]).quant.quantize(float_op(op, real, g))


def _lsb(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.fixture(scope="module", params=[every_op_graph_2d, every_op_graph_1d])
def int8_run(request, tmp_path_factory):
    g = request.param()
    x = _calibration(g, 3)
    path = write_onnx(g, tmp_path_factory.mktemp("ort") / "m.onnx", int8_io=True)
    xq = g.tensor(g.inputs[0]).quant.quantize(x)
    result = run_onnxruntime(path, xq, keep_intermediates=True, runs=5)
    return g, x, xq, path, result


def test_every_op_within_its_lsb_bound(int8_run):
    g, _, xq, _, r = int8_run
    assert r.ok, r.error
    values = {g.inputs[0]: xq, **r.details["intermediates"]}
    seen = set()
    for op in g.ops:
        got = values[op.outputs[0]]
        assert got.dtype == np.int8
        diff = _lsb(got, _op_reference(g, op, values))
        assert diff <= PER_OP_LSB[op.type], f"{op.type.value} op {op.name}: {diff} LSB"
        seen.add(op.type)
    if len(g.inputs[0]) and g.tensor(g.inputs[0]).shape[2:] == (12, 12):  # the 2-D graph
        assert seen == set(PER_OP_LSB)  # every IR op was compared
    assert r.details["kernel_mode"] == KERNEL_MODE_INT8
    assert r.details["optimized_ops"].get("com.microsoft.QLinearConv", 0) >= 1


def test_outputs_intermediates_latency_and_details(int8_run):
    g, _, xq, _, r = int8_run
    np.testing.assert_array_equal(r.outputs, r.details["intermediates"][g.outputs[0]])
    assert r.outputs.shape[0] == xq.shape[0]
    out = g.tensor(g.outputs[0]).quant
    assert (r.output_scale, r.output_zero_point) == (out.scale[0], out.zero_point[0])
    assert r.latency.runs == 5 and r.latency.threads == 1 and r.latency.median_ms > 0
    assert r.details["graph_optimization_level"] == "ORT_ENABLE_ALL"


def test_float_io_gives_the_same_integers(int8_run, tmp_path):
    """float x into a float-IO model == quantized x into an int8-IO model, to the bit."""
    g, x, _, _, r8 = int8_run
    labels = np.arange(x.shape[0]) % g.tensor(g.outputs[0]).shape[1]
    path = write_onnx(g, tmp_path / "f.onnx")
    rf = run_onnxruntime(path, x, labels, runs=0)
    assert rf.ok, rf.error
    assert rf.outputs.dtype == np.float32 and rf.latency is None
    q = np.round(rf.outputs / rf.output_scale) + rf.output_zero_point
    np.testing.assert_array_equal(q, r8.outputs)
    assert rf.accuracy == np.mean(np.argmax(rf.outputs, axis=1) == labels)


def test_nchw_data_feeds_an_nhwc_model(tmp_path):
    """A third-party style model with an NHWC float input (a Transpose in front of ours)."""
    g = every_op_graph_2d()
    model = to_onnx_model(g)
    ours = model.graph.input[0].name
    model.graph.node.insert(0, helper.make_node("Transpose", ["x_nhwc"], [ours], perm=[0, 3, 1, 2]))
    n, c, h, w = (
        d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim
    )
    model.graph.input.pop()
    model.graph.input.append(helper.make_tensor_value_info("x_nhwc", 1, [n, h, w, c]))
    path = tmp_path / "nhwc.onnx"
    onnx.save(model, path)
    x = _calibration(g, 4)
    r = run_onnxruntime(path, x, runs=0)  # NCHW data
    assert r.ok, r.error
    assert r.details["input_layout_transposed"]
    assert r.output_scale == g.tensor(g.outputs[0]).quant.scale[0]  # read through the Transpose
    expected = run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x))[g.outputs[0]]
    q = np.round(r.outputs / r.output_scale) + r.output_zero_point
    assert _lsb(q, expected) <= 2  # end to end: two 1-LSB steps can add up before softmax


# ---- the uint8 x int8 rewrite and saturation -----------------------------------------------


def _saturating_graph() -> tuple[Graph, np.ndarray]:
    """A linear layer whose uint8 inputs sit near 255 and whose weights are all positive.

    Input range [-0.1, 4] gives zero point -122: after ORT's S8 -> U8 rewrite most values are
    above 200, and two neighbouring products 200 * 127 add past int16's 32767.
    """
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.1, 4.0, size=(64, 64)).astype(np.float32)
    b = GraphBuilder(x, seed=0)
    out = b.linear(b.input, 8, weight=rng.uniform(0.5, 1.0, size=(8, 64)))
    return b.build([out]), x


def _emulate_u8s8_vpmaddubsw(g: Graph, xq: np.ndarray) -> np.ndarray:
    """The linear layer as a u8 x s8 kernel built on vpmaddubsw computes it (no VNNI).

    Activations become uint8 (q + 128), each pair of neighbouring products is added into a
    saturating int16, then the zero-point correction and bias follow in int32.
    """
    op = g.ops[0]
    x_t, w_t, b_t = (g.tensor(n) for n in op.inputs)
    a = xq.astype(np.int32) + 128  # (N, K) uint8 values
    za = int(x_t.quant.zero_point[0]) + 128
    w = w_t.data.astype(np.int32)  # (C_out, K)
    products = a[:, None, :] * w[None, :, :]  # (N, C_out, K)
    pairs = np.clip(products[..., 0::2] + products[..., 1::2], -32768, 32767)
    acc = pairs.sum(-1) - za * w.sum(1) + b_t.data  # (N, C_out) int32
    real = acc * (x_t.quant.scale[0] * w_t.quant.scale)  # float64 (N, C_out)
    return g.tensor(op.outputs[0]).quant.quantize(real.astype(np.float32))


@pytest.fixture(scope="module")
def saturation_runs(tmp_path_factory):
    g, x = _saturating_graph()
    path = write_onnx(g, tmp_path_factory.mktemp("sat") / "sat.onnx")  # float IO: Q -> DQ pair
    runs = {mode: run_onnxruntime(path, x, int8_exact=mode, runs=0) for mode in (True, False)}
    return g, x, runs


def test_graph_saturates_a_vpmaddubsw_kernel():
    g, x = _saturating_graph()
    xq = g.tensor(g.inputs[0]).quant.quantize(x)
    reference = run_reference(g, xq)[g.outputs[0]]
    assert _lsb(_emulate_u8s8_vpmaddubsw(g, xq), reference) > 1  # measured: 32 LSB


def test_int8_exact_is_within_one_lsb_on_the_saturating_graph(saturation_runs):
    g, x, runs = saturation_runs
    r = runs[True]
    assert r.ok, r.error
    reference = run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x))[g.outputs[0]]
    q = np.round(r.outputs / r.output_scale) + r.output_zero_point
    assert _lsb(q, reference) <= PER_OP_LSB[OpType.LINEAR]
    assert r.details["uint8_zero_points_added"] == 0


def test_default_mode_rewrites_to_uint8_and_is_wrong_only_without_vnni(saturation_runs):
    g, x, runs = saturation_runs
    r = runs[False]
    assert r.ok, r.error
    assert r.details["kernel_mode"] == KERNEL_MODE_DEFAULT
    assert r.details["uint8_zero_points_added"] > 0  # ORT's S8 -> U8 rewrite happened
    reference = run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x))[g.outputs[0]]
    q = np.round(r.outputs / r.output_scale) + r.output_zero_point
    if r.details["cpu_vnni"] is False:
        assert _lsb(q, reference) > 1  # vpmaddubsw saturates (see the emulation above)
    else:  # VNNI's vpdpbusd accumulates in int32: the uint8 kernel is exact here
        assert _lsb(q, reference) <= PER_OP_LSB[OpType.LINEAR]


# ---- failures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    g = every_op_graph_1d()
    return g, write_onnx(g, tmp_path_factory.mktemp("small") / "m.onnx")


def test_corrupted_file_is_a_failed_result(tmp_path, small_model):
    _, good = small_model
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[:-300] + b"\xff" * 40)
    r = run_onnxruntime(bad, np.zeros((1, 4, 32), np.float32))
    assert not r.ok and "is not a readable ONNX model" in r.error
    assert bad.exists()  # the artifact is kept


def test_model_ort_rejects_is_a_failed_result(tmp_path, small_model):
    _, good = small_model
    model = onnx.load(good)
    model.graph.node[3].op_type = "NoSuchOp"
    path = tmp_path / "bogus.onnx"
    onnx.save(model, path)
    r = run_onnxruntime(path, np.zeros((1, 4, 32), np.float32), runs=0)
    assert not r.ok and "failed in its child process" in r.error and "NoSuchOp" in r.error


def _loop_model(trips: int) -> onnx.ModelProto:
    """y = x + trips, one Loop iteration per addition: 2**62 trips never finish."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["x_in", "one"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", onnx.TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, ["N", 4]),
        ],
        [helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        "spin",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("trips", onnx.TensorProto.INT64, [], [trips])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_hang_is_a_failed_result(tmp_path):
    # 10 s: measured ~3 s for a child to start, import ORT, build the session and run 10 trips
    timeout = 10.0
    x = np.zeros((1, 4), np.float32)
    onnx.save(_loop_model(10), tmp_path / "ten.onnx")
    onnx.save(_loop_model(1 << 62), tmp_path / "spin.onnx")
    # the same time-out lets the finite loop finish: what stops the other one is its run
    finite = run_onnxruntime(tmp_path / "ten.onnx", x, runs=0, timeout=timeout)
    assert finite.ok, finite.error
    np.testing.assert_array_equal(finite.outputs, np.full((1, 4), 10, np.float32))
    start = time.monotonic()
    r = run_onnxruntime(tmp_path / "spin.onnx", x, runs=0, timeout=timeout)
    elapsed = time.monotonic() - start
    assert not r.ok and r.error == "_child_run did not finish within 10 s; stopped it"
    assert timeout <= elapsed < timeout + 5  # waited the whole limit, then stopped the child


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ONNX artifact .*nope.onnx' does not exist"):
        run_onnxruntime(tmp_path / "nope.onnx", np.zeros((1, 4, 32), np.float32))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, 5, 32), np.float32), r"x has shape \(2, 5, 32\); .* expects \('N', 4, 32\)"),
        (np.zeros((2, 4, 32), np.int32), "x has dtype int32; pass float32 data"),
        (np.full((2, 4, 32), np.nan, np.float32), "x holds 256 NaN or infinite values"),
    ],
)
def test_bad_data_raises(small_model, x, match):
    _, path = small_model
    with pytest.raises(ValueError, match=match):
        run_onnxruntime(path, x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y": np.zeros(3, np.int64)}, r"y must be 2 integer class labels of shape \(2,\)"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"runs": -1}, "runs must be >= 0"),
        ({"warmup": -1}, "warmup must be >= 0 runs"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"timeout": 0}, "timeout must be > 0 seconds"),
    ],
)
def test_bad_options_raise(small_model, kwargs, match):
    _, path = small_model
    with pytest.raises(ValueError, match=match):
        run_onnxruntime(path, np.zeros((2, 4, 32), np.float32), **kwargs)


def test_int8_data_into_a_model_with_uint8_input_raises(tmp_path):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "u8",
            [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["N", 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, ["N", 4])],
        )
    )
    path = tmp_path / "u8.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match="x is int8 but model input 'x' is uint8"):
        run_onnxruntime(path, np.zeros((2, 4), np.int8))
    with pytest.raises(ValueError, match="no DequantizeLinear reads it, so its scale is unknown"):
        run_onnxruntime(path, np.zeros((2, 4), np.float32))


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_cpu_vnni_matches_the_cpus_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert cpu_has_vnni() is bool(flags & {"avx512_vnni", "avx_vnni"})


@pytest.mark.parametrize(
    ("system", "cpuinfo", "expected"),
    [
        ("Linux", "flags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni\n", True),
        ("Linux", "processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n", True),
        ("Linux", "flags\t\t: fpu avx2 avx512f avx512vl\n", False),  # AVX-512 without VNNI
        ("Linux", None, None),  # /proc/cpuinfo unreadable
        ("Darwin", "flags\t\t: avx512_vnni\n", None),
    ],
)
def test_cpu_vnni_reads_the_flags_line(monkeypatch, system, cpuinfo, expected):
    class FakeCpuinfo:
        def __init__(self, path: str) -> None:
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            if cpuinfo is None:
                raise PermissionError("/proc/cpuinfo")
            return cpuinfo

    monkeypatch.setattr(ort_target.platform, "system", lambda: system)
    monkeypatch.setattr(ort_target, "Path", FakeCpuinfo)
    assert cpu_has_vnni() is expected


def test_docstring_examples():
    assert doctest.testmod(ort_target).failed == 0


def test_model_with_two_inputs_raises(tmp_path):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["a", "b"], ["y"])],
            "two",
            [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 4]) for n in "ab"],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        )
    )
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match=r"feeds one input; .* has 2: \['a', 'b'\]"):
        run_onnxruntime(path, np.zeros((2, 4), np.float32))
