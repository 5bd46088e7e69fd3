"""The TFLite writer refuses a conv or linear whose weight or bias is not a quantized constant."""

import dataclasses

import numpy as np
import pytest

from edgekiln.exporters.tflite import TfliteExportError, tflite_bytes
from edgekiln.ir import DType
from edgekiln.ir.builder import GraphBuilder
from tests.formats.tflite_cases import CAL_2D


@pytest.mark.parametrize("float_model", [False, True])
def test_float_weight_without_scales_is_refused(float_model):
    b = GraphBuilder(CAL_2D)
    g = b.build([b.conv(b.input, out_channels=2, kernel=3)])
    w_name = g.ops[0].inputs[1]
    w = g.tensor(w_name)
    # a float32 constant without quantization is a valid graph tensor, but no TFLite int8 weight
    g.tensors[w_name] = dataclasses.replace(
        w, dtype=DType.FLOAT32, quant=None, data=w.data.astype(np.float32)
    )
    with pytest.raises(
        TfliteExportError,
        match=rf"conv op 'conv0': TFLite needs weight/bias '{w_name}' as a quantized constant "
        r"\(int8 weight or int32 bias with scales\), but the graph holds a constant without "
        r"scales; capture the model again",
    ):
        tflite_bytes(g, float_model=float_model)
