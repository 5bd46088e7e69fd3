"""Every reference architecture goes the whole way: prepare, calibrate, capture, both
exporters, and the int8 TFLite on TFLM and the simulator, which agree value for value on the
outputs and on every layer, with the arena TFLM plans."""

import numpy as np
import pytest
import torch

from edgekiln import capture, export, prepare
from edgekiln.formats.tflite import read_tflite
from edgekiln.models import MODELS
from edgekiln.pipeline.train import calibrate
from edgekiln.targets.base import run_isolated
from edgekiln.targets.mcu import compare_results, run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.targets.mcu import _tflm_child


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(name, 16 float samples, .tflite path, .onnx path) of one calibrated, captured model."""
    name = request.param
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.factory().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *spec.input_shape)).astype(np.float32)
    prepared = prepare(model, torch.from_numpy(x[:2]))
    calibrate(prepared, x)
    graph = capture(prepared.eval())
    d = tmp_path_factory.mktemp(name)
    return name, x, export(graph, None, d / "m.tflite"), export(graph, None, d / "m.onnx")


def test_reference_model_exports_and_runs(exported):
    name, x, tflite, onnx_path = exported
    tflm = run_tflm(tflite, x[:4], runs=1)
    sim = run_mcu(tflite, x[:4], board="stm32h743")
    ort = run_onnxruntime(onnx_path, x[:4], runs=0)
    assert tflm.ok, tflm.error
    assert ort.ok, ort.error
    np.testing.assert_array_equal(sim.outputs, tflm.outputs)  # bit-exact simulator
    lsb = np.abs(
        np.round(ort.real_outputs() / tflm.output_scale)
        - (tflm.outputs.astype(np.float32) - tflm.output_zero_point)
    )
    # ORT rounds in float, TFLM in fixed point: a value on a rounding boundary moves 1 LSB per
    # requantizing op, and a few such moves can stack along the deepest path of these models.
    assert lsb.max() <= 4, name
    assert tflm.details["arena_bytes"] > 0 and sim.details["arena_bytes"] > 0


def test_reference_model_is_bit_exact_on_every_layer_and_plans_tflms_arena(exported):
    # Zero tolerance on every activation: the simulator re-implements TFLM's integer kernels.
    # Two samples suffice: a kernel that rounds differently parts on most values of a layer.
    name, x, tflite, _ = exported
    tflm = run_tflm(tflite, x[:2], keep_intermediates=True, runs=1, warmup=0)
    sim = run_mcu(tflite, x[:2], board="stm32h743", kernels="reference", keep_intermediates=True)
    assert tflm.ok, tflm.error
    r = compare_results(tflm, sim)
    m = read_tflite(tflite)
    every = [m.tensor(i).name for i in m.inputs] + [
        m.tensor(i).name for op in m.operators for i in op.outputs
    ]
    assert [d.name for d in r.layers] == every and not r.missing, (name, r.missing)
    differ = {d.name: d.mismatches for d in r.layers if d.mismatches}
    assert r.identical and not differ, (name, differ)
    # The planned arena (reference kernels: no CMSIS-NN scratch) is TFLM's own plan, byte for
    # byte: the non-persistent "head" of print_allocations (TFLM's total adds 64-bit structs).
    (head,) = run_isolated(_tflm_child.tflm_arena_head, [tflite.read_bytes()])
    assert sim.details["arena_bytes"] == head, name
