"""Every reference architecture goes the whole way: prepare, calibrate, capture, both
exporters, and the int8 TFLite on TFLM and the simulator, which agree value for value."""

import numpy as np
import pytest
import torch

from edgekiln import capture, export, prepare
from edgekiln.models import MODELS
from edgekiln.pipeline.train import calibrate
from edgekiln.targets.mcu import run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_model_exports_and_runs(name, tmp_path):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.factory().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *spec.input_shape)).astype(np.float32)
    prepared = prepare(model, torch.from_numpy(x[:2]))
    calibrate(prepared, x)
    graph = capture(prepared.eval())
    tflite = export(graph, None, tmp_path / "m.tflite")
    onnx_path = export(graph, None, tmp_path / "m.onnx")

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
