"""Save and load a Graph as one ``.npz`` file: a JSON header plus one array per constant.

The file is data, never code: it loads with ``allow_pickle=False``, so a graph from anywhere
is safe to open. Writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgekiln.ir.graph import Activation, DType, Graph, GraphError, Op, OpType, QParams, Tensor

FORMAT = "edgekiln-graph"
FORMAT_VERSION = 1


def save_graph(graph: Graph, path: str | os.PathLike[str]) -> Path:
    """Write ``graph`` to ``path`` (``.npz``) atomically and return the path."""
    arrays: dict[str, np.ndarray] = {}
    tensors = []
    for i, tensor in enumerate(graph.tensors.values()):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "dtype": tensor.dtype.value,
        }
        if tensor.quant is not None:
            arrays[f"s{i}"] = tensor.quant.scale
            arrays[f"z{i}"] = tensor.quant.zero_point
            entry["quant"] = {"scale": f"s{i}", "zero_point": f"z{i}", "axis": tensor.quant.axis}
        if tensor.data is not None:
            arrays[f"d{i}"] = tensor.data
            entry["data"] = f"d{i}"
        tensors.append(entry)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": graph.name,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "metadata": graph.metadata,
        "tensors": tensors,
        "ops": [
            {
                "type": op.type.value,
                "inputs": op.inputs,
                "outputs": op.outputs,
                "attrs": _attrs_to_json(op.attrs),
                "name": op.name,
            }
            for op in graph.ops
        ],
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    # keys are "__header__", "s<i>", "z<i>", "d<i>", never savez's own "allow_pickle"; the numpy
    # stubs cannot know that a str-keyed ** holds no such key
    return atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """Read a graph written by ``save_graph``; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        header = json.loads(arrays.pop("__header__").tobytes())
    except (OSError, ValueError, KeyError) as e:
        raise GraphError(f"{str(path)!r} is not an edgekiln graph file: {e}") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise GraphError(
            f"{str(path)!r} is format {header.get('format')!r} version {header.get('version')!r}; "
            f"this edgekiln reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    tensors = {}
    for entry in header["tensors"]:
        quant = None
        if "quant" in entry:
            q = entry["quant"]
            quant = QParams(arrays[q["scale"]], arrays[q["zero_point"]], q["axis"])
        data = arrays[entry["data"]] if "data" in entry else None
        tensors[entry["name"]] = Tensor(
            entry["name"], tuple(entry["shape"]), DType(entry["dtype"]), quant, data
        )
    ops = [
        Op(OpType(o["type"]), o["inputs"], o["outputs"], _attrs_from_json(o["attrs"]), o["name"])
        for o in header["ops"]
    ]
    graph = Graph(
        tensors, ops, header["inputs"], header["outputs"], header["name"], header["metadata"]
    )
    graph.validate()
    return graph


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _attrs_to_json(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, Activation):
            out[key] = {"activation": value.value}
        elif isinstance(value, tuple):
            out[key] = {"tuple": _tuples_to_lists(value)}
        else:
            out[key] = value
    return out


def _attrs_from_json(attrs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, dict) and "activation" in value:
            out[key] = Activation(value["activation"])
        elif isinstance(value, dict) and "tuple" in value:
            out[key] = _lists_to_tuples(value["tuple"])
        else:
            out[key] = value
    return out


def _tuples_to_lists(value: Any) -> Any:
    return [_tuples_to_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _lists_to_tuples(value: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in value) if isinstance(value, list) else value
