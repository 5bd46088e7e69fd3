"""LiteRT target: every op against the reference in LSB, kernels compared, user errors named.

Bounds come from tests/formats/tflite_cases.py (1 LSB per requantizing op, 0 for data
movement). Measured on this machine (32 samples per case): XNNPACK runs 17 of the 18 cases and
agrees with the reference to 0 LSB on 16 and 1 LSB on relu6 (it requantizes in float, like the
reference); on avg_pool it takes no op (it has no int8 AVERAGE_POOL_2D), so LiteRT's builtin
kernel runs it, 1 LSB off. The builtin and reference kernels differ by at most 1 LSB per op,
stepwise, and by at most 2 end to end (add_relu, concat: two requantizing ops on the path).
"""

from pathlib import Path

import numpy as np
import pytest

from edgekiln.exporters.tflite import write_tflite
from edgekiln.formats.tflite import TfliteFormatError
from edgekiln.targets.litert import run_litert
from tests.formats.tflite_cases import (
    CASES,
    case_graph,
    chain_bound,
    float_graph_output,
    lsb,
    op_bound,
    reference_output,
    sample_data,
    stepwise_lsb,
)

FAST = {"runs": 3, "warmup": 1}
# Cases whose every op XNNPACK declines (it has no int8 AVERAGE_POOL_2D): no DELEGATE node.
NOT_DELEGATED = {"avg_pool"}


@pytest.fixture(scope="module")
def artifacts(tflite_case_artifacts):
    return tflite_case_artifacts


@pytest.mark.parametrize("name", list(CASES))
def test_xnnpack_matches_reference(artifacts, name):
    graph = case_graph(name)
    x = sample_data(name)
    r = run_litert(artifacts[name], x, **FAST)
    assert r.ok, r.error
    # whether the delegate was applied (a DELEGATE node in LiteRT's graph), not only asked for
    assert r.details["xnnpack"] is (name not in NOT_DELEGATED)
    assert r.details["op_resolver"] == "AUTO"
    assert lsb(reference_output(graph, x), r.outputs) <= chain_bound(name)


@pytest.mark.parametrize("name", list(CASES))
def test_builtin_kernels_stepwise_and_end_to_end(artifacts, name):
    graph = case_graph(name)
    x = sample_data(name)
    r = run_litert(artifacts[name], x, xnnpack=False, keep_intermediates=True, **FAST)
    assert r.ok, r.error
    assert r.details["op_resolver"] == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    assert r.details["xnnpack"] is False
    for op_name, diff in stepwise_lsb(graph, r.details["intermediates"]).items():
        assert diff <= op_bound(graph, op_name), (op_name, diff)
    assert lsb(reference_output(graph, x), r.outputs) <= chain_bound(name)


def test_xnnpack_detail_says_whether_the_delegate_ran(artifacts):
    x = sample_data("conv2d", n=2)
    runs = {
        "default": run_litert(artifacts["conv2d"], x, **FAST),
        "off": run_litert(artifacts["conv2d"], x, xnnpack=False, **FAST),
        "reference": run_litert(artifacts["conv2d"], x, reference_kernels=True, **FAST),
        # the delegate hides intermediate tensors, so keep_intermediates turns it off
        "intermediates": run_litert(artifacts["conv2d"], x, keep_intermediates=True, **FAST),
    }
    assert {k: r.details["xnnpack"] for k, r in runs.items()} == {
        "default": True,
        "off": False,
        "reference": False,
        "intermediates": False,
    }
    assert runs["intermediates"].details["op_resolver"] == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"


def test_flatten_linear_is_not_silently_wrong(artifacts):
    # conv -> flatten -> linear with H, W = 9: without the column re-order the outputs would be
    # tens of LSB off; with it they match the reference
    graph = case_graph("flatten_linear")
    x = sample_data("flatten_linear")
    r = run_litert(artifacts["flatten_linear"], x, **FAST)
    assert lsb(reference_output(graph, x), r.outputs) <= chain_bound("flatten_linear")
    assert r.outputs.shape == (len(x), 7)


def test_nhwc_input_and_int8_input_give_the_same_outputs(artifacts):
    graph = case_graph("conv2d")
    x = sample_data("conv2d")
    nchw = run_litert(artifacts["conv2d"], x, **FAST)
    nhwc = run_litert(artifacts["conv2d"], x.transpose(0, 2, 3, 1), **FAST)
    q = run_litert(artifacts["conv2d"], graph.tensor("input").quant.quantize(x), **FAST)
    assert np.array_equal(nchw.outputs, nhwc.outputs)
    assert np.array_equal(nchw.outputs, q.outputs)
    assert nchw.outputs.shape == (len(x), 6, 9, 9)  # PyTorch layout
    assert nchw.output_scale == float(graph.tensor(graph.outputs[0]).quant.scale[0])


def test_batch_resize_equals_sample_by_sample(artifacts):
    x = sample_data("flatten_linear", n=5)
    whole = run_litert(artifacts["flatten_linear"], x, **FAST)
    one = [run_litert(artifacts["flatten_linear"], x[i : i + 1], **FAST).outputs for i in (0, 4)]
    assert np.array_equal(whole.outputs[[0, 4]], np.concatenate(one))


def test_accuracy_latency_and_details(artifacts):
    x = sample_data("softmax", n=8)
    r = run_litert(artifacts["softmax"], x, np.arange(8) % 10, threads=2, runs=4, warmup=2)
    assert r.ok and 0.0 <= r.accuracy <= 1.0
    assert r.latency.runs == 4 and r.latency.warmup == 2 and r.latency.threads == 2
    assert r.latency.median_ms > 0 and r.latency.p90_ms >= r.latency.median_ms
    assert r.details["ops"] == ["MEAN", "FULLY_CONNECTED", "SOFTMAX"]
    assert (r.output_scale, r.output_zero_point) == (1 / 256, -128)


def test_float_io_and_float_model_run(tmp_path):
    graph = case_graph("flatten_linear")
    x = sample_data("flatten_linear")
    ref = graph.tensor(graph.outputs[0]).quant.dequantize(reference_output(graph, x))
    fio = run_litert(write_tflite(graph, tmp_path / "fio.tflite", float_io=True), x, **FAST)
    assert fio.ok and fio.outputs.dtype == np.float32
    step = float(graph.tensor(graph.outputs[0]).quant.scale[0])
    # float_io adds only QUANTIZE/DEQUANTIZE: the int8 core is unchanged, same bound in steps
    assert np.abs(fio.outputs - ref).max() <= chain_bound("flatten_linear") * step + 1e-6
    fm = run_litert(write_tflite(graph, tmp_path / "fm.tflite", float_model=True), x, **FAST)
    assert fm.ok and fm.outputs.dtype == np.float32 and fm.output_scale is None
    # the float model is the graph's dequantized weights computed in float32 throughout
    assert np.allclose(fm.outputs, float_graph_output(graph, x), rtol=1e-4, atol=1e-4)


def test_third_party_float_model_runs():
    import tflite_micro

    sine = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    r = run_litert(sine, np.array([[0.5], [1.5]], np.float32), **FAST)
    assert r.ok and r.outputs.shape == (2, 1)
    assert np.allclose(r.outputs[:, 0], np.sin([0.5, 1.5]), atol=0.1)


def test_user_mistakes_raise_before_any_child(artifacts, tmp_path):
    path = artifacts["conv2d"]
    with pytest.raises(FileNotFoundError, match="does not exist; export one with"):
        run_litert(tmp_path / "missing.tflite", np.zeros((1, 4, 9, 9), np.float32))
    with pytest.raises(ValueError, match=r"data x has shape \(2, 3, 9, 9\); conv2d.tflite takes"):
        run_litert(path, np.zeros((2, 3, 9, 9), np.float32))
    bad = np.zeros((2, 4, 9, 9), np.float32)
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"holds 1 NaN/inf values \(first at index \(1, 0, 0, 0\)\)"
    ):
        run_litert(path, bad)
    with pytest.raises(ValueError, match="data x has dtype int32"):
        run_litert(path, np.zeros((1, 4, 9, 9), np.int32))
    with pytest.raises(ValueError, match=r"labels y have shape \(3,\)"):
        run_litert(path, np.zeros((2, 4, 9, 9), np.float32), np.zeros(3, int))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x10\x00\x00\x00TFL3" + bytes(40))
    with pytest.raises(TfliteFormatError):
        run_litert(junk, np.zeros((1, 4, 9, 9), np.float32))
