"""compare_results across runtimes: TFLM vs the simulator, ONNX Runtime vs TFLM, layouts.

Tolerances: TFLM vs the simulator ZERO everywhere (the simulator re-implements TFLM's
kernels). ONNX Runtime vs TFLM: 1 LSB where they first part. Both compute the same integer
accumulators from the same inputs there, but ORT requantizes in float (round half to even of
acc * scale ratio) where TFLM uses gemmlowp fixed point (double rounding), so a value on a
rounding boundary lands one step apart; more would mean they disagree on the real value.
Downstream layers read inputs that already differ by 1 LSB, so differences compound: measured
on this CNN (64 samples) 1 LSB in every layer and 2 LSB on 4 of 320 values of the last linear
layer, hence 2 LSB there.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import write_tflite
from edgekiln.ir.builder import GraphBuilder
from edgekiln.targets.base import TargetResult
from edgekiln.targets.mcu import compare_results, run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.targets.mcu import graphs


def _small_cnn(seed: int = 0):
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng.normal(0, 1, (16, 2, 10, 10)).astype(np.float32), seed=seed)
    x = b.conv(b.input, 6, 3, padding=1, activation="relu")
    x = b.conv(x, 6, 3, padding=1, groups=6, activation="relu6")
    x = b.max_pool(x, 2)
    x = b.linear(b.flatten(x), 16, activation="relu")
    return b.build([b.linear(x, 5)])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    g = graphs.every_op_cnn()
    small = _small_cnn()
    return {
        "every_op": write_tflite(g, d / "every_op.tflite"),
        "small_tflite": write_tflite(small, d / "small.tflite"),
        "small_onnx": write_onnx(small, d / "small.onnx"),
    }


def test_tflm_and_simulator_agree_on_every_layer(written):
    x = np.random.default_rng(1).normal(0, 1, (6, 3, 12, 12)).astype(np.float32)
    tflm = run_tflm(written["every_op"], x, keep_intermediates=True, runs=1, warmup=0)
    sim = run_mcu(written["every_op"], x, board="nucleo-l4r5zi", keep_intermediates=True)
    assert tflm.ok, tflm.error
    r = compare_results(tflm, sim)
    assert r.first_divergence is None and r.max_lsb == 0
    assert len(r.layers) >= 15 and not r.missing  # every activation of the model compared


def test_onnxruntime_and_tflm_differ_by_at_most_one_lsb_and_name_the_layer(written):
    x = np.random.default_rng(2).normal(0, 1, (64, 2, 10, 10)).astype(np.float32)
    ort = run_onnxruntime(written["small_onnx"], x, keep_intermediates=True, runs=0)
    tflm = run_tflm(written["small_tflite"], x, keep_intermediates=True, runs=1, warmup=0)
    assert ort.ok and tflm.ok, (ort.error, tflm.error)
    r = compare_results(ort, tflm)
    names = [d.name for d in r.layers]
    assert len(names) >= 5  # input, conv, depthwise, pool, flatten, linears
    assert r.first_divergence in names  # they part somewhere, and the report says where
    first = next(d for d in r.layers if d.name == r.first_divergence)
    assert first.mismatches > 0 and first.max_lsb == 1  # a rounding step, nothing more
    assert r.max_lsb <= 2  # compounded downstream (see the module docstring)


def test_layouts_are_aligned_by_rank_and_missing_intermediates_are_an_error():
    nchw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(np.int8)
    a = TargetResult("a", "none.onnx", True, details={"intermediates": {"t": nchw}})
    b = TargetResult("b", "none.tflite", True,
                     details={"intermediates": {"t": nchw.transpose(0, 2, 3, 1)}})  # fmt: skip
    r = compare_results(a, b)
    assert r.identical and r.layers[0].count == nchw.size
    with pytest.raises(ValueError, match="run it with keep_intermediates=True"):
        compare_results(a, TargetResult("tflm", "m.tflite", True))
    c = TargetResult("c", "x", True, details={"intermediates": {"t": nchw[:, :2]}})
    with pytest.raises(ValueError, match=r"tensor 't' has shape \(2, 3, 4, 5\) in one run"):
        compare_results(a, c)


def test_no_tensor_in_common_is_not_identical():
    # Runs of two different graphs share no tensor name: nothing is compared, and "identical"
    # must not claim otherwise.
    a = TargetResult("a", "none.onnx", True, details={"intermediates": {"x": np.zeros(3, np.int8)}})
    b = TargetResult(
        "b", "none.tflite", True, details={"intermediates": {"y": np.ones(3, np.int8)}}
    )
    r = compare_results(a, b)
    assert r.layers == [] and r.first_divergence is None and not r.identical
    assert sorted(r.missing) == ["x", "y"]
