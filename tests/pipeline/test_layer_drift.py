"""Layer by layer: the fake-quantized PyTorch model against TFLM, tensor by tensor."""

import numpy as np
import torch

from edgekiln import capture, export, prepare
from edgekiln.models import small_cnn
from edgekiln.pipeline.diagnostics import fake_quant_intermediates
from edgekiln.pipeline.train import calibrate
from edgekiln.targets.base import TargetResult
from edgekiln.targets.mcu.compare import compare_results
from edgekiln.targets.tflm import run_tflm


def test_fake_quant_model_and_tflm_agree_layer_by_layer(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    prepared = prepare(small_cnn(input_size=8).eval(), torch.from_numpy(x[:2]))
    calibrate(prepared, x)
    graph = capture(prepared.eval())
    path = export(graph, None, tmp_path / "m.tflite")

    ours = fake_quant_intermediates(prepared, graph, x[:4])
    assert set(ours) >= {graph.inputs[0], graph.outputs[0]}
    assert all(v.dtype == np.int8 for v in ours.values())
    tflm = run_tflm(path, x[:4], runs=1, keep_intermediates=True)
    fq = TargetResult("fake_quant", "", ok=True, details={"intermediates": ours})
    comparison = compare_results(fq, tflm)
    moved = {op.outputs[0] for op in graph.ops if op.type.value in ("max_pool", "reshape")}
    assert len(comparison.layers) >= 7 and set(comparison.missing) == moved
    # each op rounds once: in float (PyTorch) or in fixed point (TFLM); a value on a rounding
    # boundary moves 1 LSB and such moves can meet in the residual add (measured: at most 2)
    assert comparison.max_lsb <= 2
    assert comparison.layers[0].mismatches == 0  # the input: both quantize it alike
