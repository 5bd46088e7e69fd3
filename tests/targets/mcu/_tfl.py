"""Hand-built single-op int8 TFLite models for the simulator's bit-exactness tests.

They use tflite-micro's own model editor (shipped in the tflite-micro wheel) so ops and
parameters the graph exporter never writes (int8 -> int8 QUANTIZE, DEQUANTIZE, concatenation of
inputs with different parameters, depth multipliers, odd paddings) are covered too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tflite_micro.tensorflow.lite.micro.compression import model_editor as me
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as S

INT8, INT32, FLOAT32 = S.TensorType.INT8, S.TensorType.INT32, S.TensorType.FLOAT32


class Net:
    """Add tensors and ops; ``build()`` returns the .tflite bytes."""

    def __init__(self) -> None:
        self.sg = me.Subgraph()
        self.n = 0

    def act(self, shape: tuple[int, ...], scale: float, zp: int, dtype: int = INT8) -> me.Tensor:
        self.n += 1
        q = (
            None
            if dtype == FLOAT32
            else me.Quantization(scales=[float(scale)], zero_points=[int(zp)])
        )
        t = me.Tensor(shape=shape, dtype=dtype, quantization=q, name=f"t{self.n}")
        self.sg.tensors.append(t)
        return t

    def const(self, data: np.ndarray, dtype: int, scales: Any = None, axis: int = 0) -> me.Tensor:
        self.n += 1
        q = None
        if scales is not None:
            s = np.atleast_1d(np.asarray(scales, dtype=np.float32)).tolist()
            q = me.Quantization(scales=s, zero_points=[0] * len(s), axis=axis)
        t = me.Tensor(shape=data.shape, dtype=dtype, data=np.ascontiguousarray(data),
                      quantization=q, name=f"c{self.n}")  # fmt: skip
        self.sg.tensors.append(t)
        return t

    def op(
        self, code: int, inputs: list, outputs: list, opt_type: int = 0, opt: Any = None
    ) -> None:
        o = me.Operator(opcode=code, inputs=inputs, outputs=outputs)
        if opt is not None:
            o._fb.builtinOptionsType = opt_type
            o._fb.builtinOptions = opt
        self.sg.operators.append(o)

    def build(self, inputs: list, outputs: list) -> bytes:
        self.sg.inputs, self.sg.outputs = inputs, outputs
        model = me.Model(subgraphs=[self.sg])  # the editor fills only builtin_code
        model.buffers.append(me.Buffer(data=b""))
        return bytes(model.build())


def options(cls_name: str, **fields: Any) -> Any:
    opt = getattr(S, cls_name)()
    for k, v in fields.items():
        setattr(opt, k, v)
    return opt


B, OPT = S.BuiltinOperator, S.BuiltinOptions
ACT = S.ActivationFunctionType
PAD = S.Padding
