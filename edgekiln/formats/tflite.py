"""Read and check TFLite flatbuffers without TensorFlow (shared by exporter, targets, simulator).

``read_tflite`` turns a ``.tflite`` file into plain dataclasses (numpy arrays for constants and
quantization). ``check_tflite`` reads and then verifies every structural rule a runtime relies
on. LiteRT refuses a model that breaks one of them; TensorFlow Lite Micro does not check and
crashes the process or silently computes garbage, so every artifact is checked before a runtime
sees it.

A hostile file (truncated, bit-flipped, not a flatbuffer) raises ``TfliteFormatError``, never an
``IndexError`` or ``struct.error`` from the flatbuffer accessors: offsets and vector lengths are
guarded and accessor errors are converted.

>>> try:
...     check_tflite(b"TFL3")
... except TfliteFormatError as e:
...     print(e)
TFLite file is 4 bytes; a flatbuffer needs at least 8 (root offset, "TFL3" identifier)
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import tflite
from tflite.utils import BUILTIN_OPCODE2NAME

logger = logging.getLogger(__name__)

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3

# TensorType enum value -> numpy dtype (the types a TFLite file can hold that numpy can hold).
TENSOR_DTYPES: dict[int, np.dtype] = {
    tflite.TensorType.FLOAT32: np.dtype(np.float32),
    tflite.TensorType.FLOAT16: np.dtype(np.float16),
    tflite.TensorType.INT32: np.dtype(np.int32),
    tflite.TensorType.UINT8: np.dtype(np.uint8),
    tflite.TensorType.INT64: np.dtype(np.int64),
    tflite.TensorType.BOOL: np.dtype(np.bool_),
    tflite.TensorType.INT16: np.dtype(np.int16),
    tflite.TensorType.INT8: np.dtype(np.int8),
    tflite.TensorType.FLOAT64: np.dtype(np.float64),
    tflite.TensorType.UINT64: np.dtype(np.uint64),
    tflite.TensorType.UINT32: np.dtype(np.uint32),
    tflite.TensorType.UINT16: np.dtype(np.uint16),
}
OPCODE_NAMES: dict[int, str] = dict(BUILTIN_OPCODE2NAME)
OPCODES: dict[str, int] = {name: code for code, name in OPCODE_NAMES.items()}


class TfliteFormatError(ValueError):
    """A TFLite file that cannot be read or breaks a structural rule.

    The message names what is wrong: the tensor (index and name), the operator (index and
    opcode) or the model field, the value found and what is allowed.
    """


@dataclass
class TfliteTensor:
    """One tensor of the subgraph. ``data`` is set for constants (buffer contents)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None
    scale: np.ndarray  # (0,), (1,) or (C,) float32
    zero_point: np.ndarray  # same length as scale (or empty), int64
    quantized_dimension: int
    buffer: int = 0
    type_code: int = 0  # the TensorType enum value as stored
    is_variable: bool = False

    @property
    def is_quantized(self) -> bool:
        """True when the tensor carries at least one scale."""
        return self.scale.size > 0


@dataclass
class TfliteOperator:
    """One operator: builtin opcode name, version, tensor indices and its options."""

    index: int
    opcode: str  # builtin name as in the schema, e.g. "CONV_2D"; "CUSTOM" for custom ops
    version: int
    inputs: list[int]  # -1 marks an absent optional input
    outputs: list[int]
    options: dict[str, Any]  # builtin options fields in snake_case, enums as their names
    options_type: str = "NONE"  # the BuiltinOptions union member, e.g. "Conv2DOptions"
    builtin_code: int = 0
    custom_code: str | None = None


@dataclass
class TfliteModel:
    """A single-subgraph TFLite model, read into plain Python and numpy."""

    version: int
    tensors: list[TfliteTensor]
    operators: list[TfliteOperator]
    inputs: list[int]
    outputs: list[int]
    description: str
    signature_inputs: list[str]
    signature_outputs: list[str]
    size_bytes: int
    identifier: bytes = b""
    num_buffers: int = 0
    buffer0_size: int = 0
    signature_key: str | None = None
    signature_tensors: dict[str, int] = field(default_factory=dict)  # name -> tensor index

    def tensor(self, index: int) -> TfliteTensor:
        """The tensor at ``index``."""
        return self.tensors[index]

    def input_tensors(self) -> list[TfliteTensor]:
        """The subgraph's input tensors, in order."""
        return [self.tensors[i] for i in self.inputs]

    def output_tensors(self) -> list[TfliteTensor]:
        """The subgraph's output tensors, in order."""
        return [self.tensors[i] for i in self.outputs]

    def opcodes(self) -> list[str]:
        """Distinct opcode names in first-use order."""
        return list(dict.fromkeys(op.opcode for op in self.operators))


# ---- reading ---------------------------------------------------------------------------------


def read_tflite(source: bytes | bytearray | memoryview | str | Path) -> TfliteModel:
    """Read a single-subgraph ``.tflite`` file (path or bytes) into a ``TfliteModel``.

    Raises FileNotFoundError for a missing path and TfliteFormatError for anything that is not
    a readable single-subgraph TFLite flatbuffer. It does not run the structural checks; use
    ``check_tflite`` before handing a file to a runtime.
    """
    data = _load(source)
    if len(data) < 8:
        raise TfliteFormatError(
            f"TFLite file is {len(data)} bytes; a flatbuffer needs at least 8 "
            '(root offset, "TFL3" identifier)'
        )
    root = struct.unpack_from("<I", data, 0)[0]
    if root < 8 or root + 4 > len(data):
        raise TfliteFormatError(
            f"TFLite root table offset {root} lies outside the {len(data)}-byte file "
            "(truncated or not a flatbuffer)"
        )
    try:
        return _read_model(data)
    except TfliteFormatError:
        raise
    except (IndexError, struct.error, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise TfliteFormatError(
            f"TFLite file is corrupted or truncated: reading it failed with {type(e).__name__}: {e}"
        ) from None


def _load(source: bytes | bytearray | memoryview | str | Path) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite file {str(path)!r} does not exist (or is not a file)")
    return path.read_bytes()


def _guard_length(n: int, elem_size: int, data: bytes, what: str) -> int:
    """A vector length read from the file, refused when it cannot fit in the file."""
    if n < 0 or n * elem_size > len(data):
        raise TfliteFormatError(
            f"{what} claims {n} entries, more than the {len(data)}-byte file can hold "
            "(corrupted or truncated file)"
        )
    return n


def _int_vector(obj: Any, name: str, data: bytes, what: str) -> list[int]:
    if getattr(obj, f"{name}IsNone")():
        return []
    _guard_length(getattr(obj, f"{name}Length")(), 4, data, what)
    return [int(v) for v in getattr(obj, f"{name}AsNumpy")()]


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def _read_model(data: bytes) -> TfliteModel:
    model = tflite.Model.GetRootAs(data, 0)
    n_sub = _guard_length(model.SubgraphsLength(), 4, data, "model.subgraphs")
    if n_sub != 1:
        raise TfliteFormatError(
            f"TFLite model has {n_sub} subgraphs; edgekiln reads single-subgraph models only "
            "(control flow and multi-signature models are not supported)"
        )
    n_buf = _guard_length(model.BuffersLength(), 4, data, "model.buffers")
    buffers = [model.Buffers(i) for i in range(n_buf)]
    n_codes = _guard_length(model.OperatorCodesLength(), 4, data, "model.operator_codes")
    codes = [_read_opcode(model.OperatorCodes(i)) for i in range(n_codes)]

    sub = model.Subgraphs(0)
    n_tensors = _guard_length(sub.TensorsLength(), 4, data, "subgraph.tensors")
    tensors = [_read_tensor(data, sub.Tensors(i), i, buffers) for i in range(n_tensors)]
    n_ops = _guard_length(sub.OperatorsLength(), 4, data, "subgraph.operators")
    operators = [_read_operator(data, sub.Operators(i), i, codes) for i in range(n_ops)]

    sig_in: list[str] = []
    sig_out: list[str] = []
    sig_key: str | None = None
    sig_tensors: dict[str, int] = {}
    if _guard_length(model.SignatureDefsLength(), 4, data, "model.signature_defs") > 0:
        sig = model.SignatureDefs(0)
        sig_key = _text(sig.SignatureKey())
        for count, get, names in (
            (sig.InputsLength(), sig.Inputs, sig_in),
            (sig.OutputsLength(), sig.Outputs, sig_out),
        ):
            for j in range(_guard_length(count, 4, data, "signature tensor map")):
                entry = get(j)
                names.append(_text(entry.Name()))
                sig_tensors[names[-1]] = int(entry.TensorIndex())

    buffer0 = 0
    if buffers:
        buffer0 = len(_buffer_bytes(data, buffers[0], "buffer 0"))
    return TfliteModel(
        version=int(model.Version()),
        tensors=tensors,
        operators=operators,
        inputs=_int_vector(sub, "Inputs", data, "subgraph.inputs"),
        outputs=_int_vector(sub, "Outputs", data, "subgraph.outputs"),
        description=_text(model.Description()),
        signature_inputs=sig_in,
        signature_outputs=sig_out,
        size_bytes=len(data),
        identifier=data[4:8],
        num_buffers=n_buf,
        buffer0_size=buffer0,
        signature_key=sig_key,
        signature_tensors=sig_tensors,
    )


def _read_opcode(code: Any) -> tuple[int, int, str | None]:
    # The schema's rule: the operator is max(deprecated_builtin_code, builtin_code). Old files
    # fill only the int8 deprecated field; newer writers (tflite-micro's model editor, some
    # converters) fill only ``builtin_code`` and leave the deprecated one at 0. The ``tflite``
    # package's ``BuiltinCode()`` returns the deprecated field for any code below 127, which
    # reads every op of the second kind as ADD (0), so the raw field is read here instead.
    builtin = max(_raw_builtin_code(code), int(code.DeprecatedBuiltinCode()))
    custom = code.CustomCode()
    return builtin, int(code.Version()), None if custom is None else _text(custom)


def _raw_builtin_code(code: Any) -> int:
    """OperatorCode.builtin_code as stored (field 3, vtable offset 10; absent means 0)."""
    o = int(code._tab.Offset(10))
    if o == 0:
        return 0
    return int(code._tab.Get(flatbuffers.number_types.Int32Flags, o + code._tab.Pos))


def _buffer_bytes(data: bytes, buf: Any, what: str) -> bytes:
    offset, size = int(buf.Offset()), int(buf.Size())
    if offset > 1:  # large models keep buffers after the flatbuffer, addressed from file start
        if offset + size > len(data):
            raise TfliteFormatError(
                f"{what} points at bytes {offset}..{offset + size} beyond the "
                f"{len(data)}-byte file (truncated file)"
            )
        return data[offset : offset + size]
    if buf.DataIsNone():
        return b""
    _guard_length(buf.DataLength(), 1, data, what)
    return buf.DataAsNumpy().tobytes()


def _read_tensor(data: bytes, t: Any, index: int, buffers: list[Any]) -> TfliteTensor:
    name = _text(t.Name())
    where = f"tensor {index} {name!r}"
    shape = tuple(_int_vector(t, "Shape", data, f"{where} shape"))
    type_code = int(t.Type())
    if type_code not in TENSOR_DTYPES:
        raise TfliteFormatError(
            f"{where} has tensor type {type_code}, which edgekiln cannot read "
            f"(readable: {sorted(TENSOR_DTYPES)} = float, int and bool types)"
        )
    dtype = TENSOR_DTYPES[type_code]
    buffer = int(t.Buffer())
    if buffer >= len(buffers):
        raise TfliteFormatError(
            f"{where} refers to buffer {buffer}; the model has {len(buffers)} buffers"
        )
    # buffer 0 is the schema's empty sentinel: a tensor pointing at it has no data (the checker
    # refuses a model whose buffer 0 is not empty)
    raw = b"" if buffer == 0 else _buffer_bytes(data, buffers[buffer], f"{where} buffer {buffer}")
    array = None
    if raw:
        if any(d < 0 for d in shape):
            raise TfliteFormatError(f"{where} is a constant with unknown dimensions {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(raw) != expected:
            raise TfliteFormatError(
                f"{where} buffer {buffer} holds {len(raw)} bytes, but shape {list(shape)} of "
                f"{dtype} needs {expected} bytes"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    scale = np.zeros((0,), np.float32)
    zero_point = np.zeros((0,), np.int64)
    qdim = 0
    q = t.Quantization()
    if q is not None:
        if not q.ScaleIsNone():
            _guard_length(q.ScaleLength(), 4, data, f"{where} quantization.scale")
            scale = np.asarray(q.ScaleAsNumpy(), np.float32).copy()
        if not q.ZeroPointIsNone():
            _guard_length(q.ZeroPointLength(), 8, data, f"{where} quantization.zero_point")
            zero_point = np.asarray(q.ZeroPointAsNumpy(), np.int64).copy()
        qdim = int(q.QuantizedDimension())
    return TfliteTensor(
        index=index,
        name=name,
        shape=shape,
        dtype=dtype,
        data=array,
        scale=scale,
        zero_point=zero_point,
        quantized_dimension=qdim,
        buffer=buffer,
        type_code=type_code,
        is_variable=bool(t.IsVariable()),
    )


def _read_operator(
    data: bytes, op: Any, index: int, codes: list[tuple[int, int, str | None]]
) -> TfliteOperator:
    code_index = int(op.OpcodeIndex())
    if code_index >= len(codes):
        raise TfliteFormatError(
            f"operator {index} uses opcode index {code_index}; the model has {len(codes)} "
            "operator codes"
        )
    builtin, version, custom = codes[code_index]
    opcode = OPCODE_NAMES.get(builtin, f"UNKNOWN_{builtin}")
    where = f"operator {index} ({opcode})"
    options_type = _OPTIONS_NAMES.get(int(op.BuiltinOptionsType()), "NONE")
    options: dict[str, Any] = {}
    table = op.BuiltinOptions()
    if options_type != "NONE" and table is not None:
        options = _read_options(data, options_type, table, where)
    return TfliteOperator(
        index=index,
        opcode=opcode,
        version=version,
        inputs=_int_vector(op, "Inputs", data, f"{where} inputs"),
        outputs=_int_vector(op, "Outputs", data, f"{where} outputs"),
        options=options,
        options_type=options_type,
        builtin_code=builtin,
        custom_code=custom,
    )


# ---- builtin options, read generically from the generated schema classes ----------------------

_OPTIONS_NAMES: dict[int, str] = {
    v: k for k, v in vars(tflite.BuiltinOptions).items() if not k.startswith("_")
}
_ENUM_FIELDS: dict[str, type] = {
    "padding": tflite.Padding,
    "fused_activation_function": tflite.ActivationFunctionType,
    "quantized_bias_type": tflite.TensorType,
    "weights_format": tflite.FullyConnectedOptionsWeightsFormat,
}
_SKIP = ("Init", "GetRootAs")
_SKIP_SUFFIX = ("AsNumpy", "Length", "IsNone", "BufferHasIdentifier")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


@functools.cache
def _option_fields(options_type: str) -> tuple[tuple[str, str, bool], ...]:
    """(accessor, snake_case field, is_vector) for one options class."""
    cls = getattr(tflite, options_type)
    fields = []
    for attr, fn in vars(cls).items():
        if not callable(fn) or attr.startswith(_SKIP) or attr.endswith(_SKIP_SUFFIX):
            continue
        is_vector = len(inspect.signature(fn).parameters) == 2  # (self, j)
        fields.append((attr, _snake(attr), is_vector))
    return tuple(fields)


def _enum_name(enum_cls: type, value: int) -> str | int:
    for k, v in vars(enum_cls).items():
        if not k.startswith("_") and v == value:
            return k
    return value


def _read_options(data: bytes, options_type: str, table: Any, where: str) -> dict[str, Any]:
    cls = getattr(tflite, options_type, None)
    if cls is None:
        return {}
    obj = cls()
    obj.Init(table.Bytes, table.Pos)
    options: dict[str, Any] = {}
    for attr, key, is_vector in _option_fields(options_type):
        if is_vector:
            n = _guard_length(getattr(obj, f"{attr}Length")(), 1, data, f"{where} {key}")
            options[key] = [getattr(obj, attr)(j) for j in range(n)]
            continue
        value = getattr(obj, attr)()
        if isinstance(value, bytes):
            value = _text(value)
        elif key in _ENUM_FIELDS:
            value = _enum_name(_ENUM_FIELDS[key], int(value))
        elif not isinstance(value, int | float | bool | str):
            continue  # nested tables (rare, not used by int8 CNN ops)
        options[key] = value
    return options


# ---- checking --------------------------------------------------------------------------------

# Ops whose kernels read their builtin options; without them TFLM uses garbage parameters.
_REQUIRED_OPTIONS: dict[str, str] = {
    "CONV_2D": "Conv2DOptions",
    "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions",
    "SOFTMAX": "SoftmaxOptions",
    "CONCATENATION": "ConcatenationOptions",
}
_QUANTIZED_TYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16))


def check_tflite(source: bytes | bytearray | memoryview | str | Path) -> TfliteModel:
    """Read ``source`` and verify every structural rule; return the model when all hold.

    Checks: the "TFL3" identifier, schema version 3, an empty buffer 0, subgraph inputs and
    outputs present and in range, operator tensor indices in range and ops in dependency order,
    constant buffer sizes matching shape x dtype, quantization arrays matching the channel count
    along ``quantized_dimension``, positive finite scales, quantized activations carrying their
    parameters, options present on ops that read them, depthwise filters quantized along
    dimension 3, and known builtin opcodes. Raises TfliteFormatError naming the first problem.
    """
    data = _load(source)
    model = read_tflite(data)
    if model.identifier != FILE_IDENTIFIER:
        raise TfliteFormatError(
            f'file identifier is {model.identifier!r}, expected b"TFL3" (not a TFLite model, '
            "or written without the identifier)"
        )
    if model.version != SCHEMA_VERSION:
        raise TfliteFormatError(
            f"model.version is {model.version}, expected {SCHEMA_VERSION} (the only TFLite "
            "schema version runtimes accept)"
        )
    if model.num_buffers == 0 or model.buffer0_size != 0:
        raise TfliteFormatError(
            "model.buffers[0] must exist and be empty (the schema reserves it for tensors "
            f"without data); found {model.num_buffers} buffers, buffer 0 of "
            f"{model.buffer0_size} bytes"
        )
    _check_io(model)
    _check_operators(model)  # first: an op's rule names the problem better than a tensor's
    for tensor in model.tensors:
        _check_tensor(tensor)
    return model


def _tensor_where(t: TfliteTensor) -> str:
    return f"tensor {t.index} {t.name!r}"


def _check_io(model: TfliteModel) -> None:
    n = len(model.tensors)
    for label, indices in (("inputs", model.inputs), ("outputs", model.outputs)):
        if not indices:
            raise TfliteFormatError(
                f"subgraph.{label} is empty; a runtime cannot find the model's {label}"
            )
        for i in indices:
            if not 0 <= i < n:
                raise TfliteFormatError(
                    f"subgraph.{label} names tensor {i}; the subgraph has {n} tensors "
                    f"(valid 0..{n - 1})"
                )


def _check_tensor(t: TfliteTensor) -> None:
    where = _tensor_where(t)
    if any(d < 0 for d in t.shape) and t.data is not None:
        raise TfliteFormatError(f"{where} is a constant with negative dimensions {t.shape}")
    if t.zero_point.size and t.zero_point.size != t.scale.size:
        raise TfliteFormatError(
            f"{where} has {t.scale.size} scales but {t.zero_point.size} zero points; "
            "quantization.scale and quantization.zero_point must have one entry each per channel"
        )
    if not t.scale.size:
        return
    if not np.all(np.isfinite(t.scale)) or np.any(t.scale <= 0):
        raise TfliteFormatError(
            f"{where} has quantization.scale {t.scale[:8].tolist()}; every scale must be "
            "positive and finite"
        )
    if t.scale.size > 1:
        qd = t.quantized_dimension
        if not 0 <= qd < len(t.shape):
            raise TfliteFormatError(
                f"{where} has quantized_dimension {qd}, outside its {len(t.shape)} dimensions "
                f"{list(t.shape)}"
            )
        if t.shape[qd] != t.scale.size:
            raise TfliteFormatError(
                f"{where} has {t.scale.size} scales but dimension {qd} (quantized_dimension) "
                f"of shape {list(t.shape)} has {t.shape[qd]} channels"
            )
    if t.dtype in _QUANTIZED_TYPES and t.zero_point.size:
        info = np.iinfo(t.dtype)
        if np.any(t.zero_point < info.min) or np.any(t.zero_point > info.max):
            raise TfliteFormatError(
                f"{where} has zero point {t.zero_point[:8].tolist()} outside the {t.dtype} range "
                f"[{info.min}, {info.max}]"
            )


def _check_operators(model: TfliteModel) -> None:
    n = len(model.tensors)
    written = set(model.inputs) | {t.index for t in model.tensors if t.data is not None}
    written |= {t.index for t in model.tensors if t.is_variable}
    for op in model.operators:
        where = f"operator {op.index} ({op.opcode})"
        if op.opcode.startswith("UNKNOWN_"):
            raise TfliteFormatError(
                f"operator {op.index} has builtin opcode {op.builtin_code}, which the schema "
                "does not define (corrupted file or a newer schema)"
            )
        for label, indices, allow_absent in (
            ("inputs", op.inputs, True),
            ("outputs", op.outputs, False),
        ):
            for i in indices:
                if i == -1 and allow_absent:
                    continue
                if not 0 <= i < n:
                    raise TfliteFormatError(
                        f"{where} {label} name tensor {i}; the subgraph has {n} tensors "
                        f"(valid 0..{n - 1}{', or -1 for an absent input' if allow_absent else ''})"
                    )
        if not op.outputs:
            raise TfliteFormatError(f"{where} has no outputs")
        for i in op.inputs:
            if i != -1 and i not in written:
                raise TfliteFormatError(
                    f"{where} reads tensor {i} {model.tensors[i].name!r} before any operator "
                    "writes it (operators out of dependency order, or a dangling tensor)"
                )
        written |= set(op.outputs)
        required = _REQUIRED_OPTIONS.get(op.opcode)
        if required is not None and op.options_type != required:
            raise TfliteFormatError(
                f"{where} has builtin_options {op.options_type}; the kernel needs {required} "
                "(TFLM would read garbage parameters)"
            )
        _check_quantized_io(model, op, where)
        _check_op_rules(model, op, where)
    for i in model.outputs:
        if i not in written:
            raise TfliteFormatError(
                f"subgraph output tensor {i} {model.tensors[i].name!r} is never written"
            )


def _check_quantized_io(model: TfliteModel, op: TfliteOperator, where: str) -> None:
    if op.opcode in ("QUANTIZE", "DEQUANTIZE", "CUSTOM"):
        return
    for i in [*op.inputs, *op.outputs]:
        if i == -1:
            continue
        t = model.tensors[i]
        if t.dtype in _QUANTIZED_TYPES and not t.is_quantized:
            raise TfliteFormatError(
                f"{where} uses {t.dtype} {_tensor_where(t)} without quantization parameters "
                "(scale and zero point); int8 kernels need them"
            )


def _check_op_rules(model: TfliteModel, op: TfliteOperator, where: str) -> None:
    o = op.options
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        if len(op.inputs) < 2 or op.inputs[1] == -1:
            raise TfliteFormatError(f"{where} has no filter input")
        for key in ("stride_w", "stride_h", "dilation_w_factor", "dilation_h_factor"):
            if o.get(key, 1) < 1:
                raise TfliteFormatError(f"{where} has {key} {o.get(key)}; it must be >= 1")
        if o.get("padding") not in ("SAME", "VALID"):
            raise TfliteFormatError(f"{where} has padding {o.get('padding')!r}")
        weights = model.tensors[op.inputs[1]]
        if len(weights.shape) != 4:
            raise TfliteFormatError(
                f"{where} filter {_tensor_where(weights)} has shape {list(weights.shape)}; "
                "it must be 4-D"
            )
        expected_dim = 3 if op.opcode == "DEPTHWISE_CONV_2D" else 0
        if weights.scale.size > 1 and weights.quantized_dimension != expected_dim:
            raise TfliteFormatError(
                f"{where} filter {_tensor_where(weights)} is quantized per channel along "
                f"dimension {weights.quantized_dimension}; {op.opcode} needs "
                f"quantized_dimension {expected_dim} (output channels)"
            )
        inp = model.tensors[op.inputs[0]]
        if op.opcode == "CONV_2D" and len(inp.shape) == 4 and inp.shape[3] > 0:
            if inp.shape[3] % max(weights.shape[3], 1):
                raise TfliteFormatError(
                    f"{where} input has {inp.shape[3]} channels, not a multiple of the "
                    f"filter's {weights.shape[3]} input channels"
                )
    if op.opcode in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        for key in ("stride_w", "stride_h", "filter_width", "filter_height"):
            if o.get(key, 0) < 1:
                raise TfliteFormatError(f"{where} has {key} {o.get(key)}; it must be >= 1")
    if op.opcode == "FULLY_CONNECTED" and (len(op.inputs) < 2 or op.inputs[1] == -1):
        raise TfliteFormatError(f"{where} has no weights input")
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        _check_bias(model, op, where)


def _check_bias(model: TfliteModel, op: TfliteOperator, where: str) -> None:
    if len(op.inputs) < 3 or op.inputs[2] == -1:
        return
    weights = model.tensors[op.inputs[1]]
    bias = model.tensors[op.inputs[2]]
    channels = weights.shape[3] if op.opcode == "DEPTHWISE_CONV_2D" else weights.shape[0]
    if bias.shape != (channels,):
        raise TfliteFormatError(
            f"{where} bias {_tensor_where(bias)} has shape {list(bias.shape)}; the filter has "
            f"{channels} output channels"
        )
    if weights.dtype == np.int8 and bias.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TfliteFormatError(
            f"{where} bias {_tensor_where(bias)} is {bias.dtype}; int8 kernels need int32 bias"
        )
