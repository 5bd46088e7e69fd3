"""Top-level wiring: one call from a prepared model (or a saved graph) to an artifact file."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekiln.ir import Graph


class IO(str, enum.Enum):
    """The element type at an artifact's boundary."""

    INT8 = "int8"  # what microcontroller firmware feeds: the TFLite default
    FLOAT = "float"  # the model quantizes its input and dequantizes its output: the ONNX default


FORMATS = {".onnx": "ONNX (QDQ)", ".tflite": "TFLite (int8 flatbuffer)"}


def export(
    model_or_graph: Any,
    example_inputs: Any = None,
    path: str | os.PathLike[str] = "model.onnx",
    *,
    io: IO | str | None = None,
) -> Path:
    """Write a prepared model or a captured ``Graph`` as an int8 artifact; the suffix picks it.

    ``.onnx`` writes a QDQ model (float input/output by default), ``.tflite`` a fully int8
    flatbuffer (int8 input/output by default). ``io="float"`` or ``io="int8"`` overrides the
    default. A model is captured first (``edgekiln.capture(model, example_inputs)``); a graph
    is written as it is, so ``.onnx`` and ``.tflite`` from one graph carry identical scales.
    The file is written atomically.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}: "
            f"use one of {', '.join(FORMATS)}"
        )
    boundary = _io(io)
    graph = (
        model_or_graph
        if isinstance(model_or_graph, Graph)
        else _capture(model_or_graph, example_inputs)
    )
    if suffix == ".onnx":
        from edgekiln.exporters.onnx import write_onnx

        return write_onnx(graph, path, int8_io=boundary == IO.INT8)
    from edgekiln.exporters.tflite import write_tflite

    return write_tflite(graph, path, float_io=boundary == IO.FLOAT)


def _io(io: IO | str | None) -> IO | None:
    if io is None or isinstance(io, IO):
        return io
    try:
        return IO(io)
    except ValueError:
        allowed = ", ".join(repr(v.value) for v in IO)
        raise ValueError(f"io={io!r} is not an artifact boundary: use {allowed} or None") from None


def _capture(model: Any, example_inputs: Sequence[Any] | Any) -> Graph:
    from edgekiln.pipeline.capture import capture

    return capture(model, example_inputs)
