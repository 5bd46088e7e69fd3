"""Layer-by-layer comparison of two runs of one model, in LSB of each tensor's scale.

Runtime-agnostic: ``compare_layers`` takes int8 tensors by IR tensor name from any two of ONNX
Runtime, LiteRT, TFLM, the simulator or the fake-quantized model, with both in one layout.
``compare_results`` does the bookkeeping for two TargetResults run with
``keep_intermediates=True``: every target keys ``details["intermediates"]`` by tensor name (the
ONNX and TFLite writers both keep the IR's activation names), ONNX Runtime in the IR's layout,
LiteRT, TFLM and ``run_mcu`` with 4-D tensors already transposed to NCHW. What still differs is
handled here: a 4-D tensor left NHWC is transposed by rank, a 1-D model's (N, C, 1, L) TFLite
tensor is squeezed to the IR's (N, C, L), and a flatten after a convolution, which TFLite holds
in (H, W, C) order, is put back in the IR's (C, H, W) order (read from the artifact).

>>> import numpy as np
>>> a = {"x": np.array([1, 2, 3], np.int8), "y": np.array([5, 5], np.int8)}
>>> b = {"x": np.array([1, 2, 3], np.int8), "y": np.array([5, 7], np.int8)}
>>> r = compare_layers(a, b, ["x", "y"], {"x": 0.1, "y": 0.2})
>>> r.first_divergence, r.layers[1].max_lsb, r.layers[1].mismatches
('y', 2, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekiln.targets.base import TargetResult


@dataclass
class TensorDiff:
    """How one tensor differs between the runs. ``histogram`` maps |difference| in LSB to count."""

    name: str
    count: int
    mismatches: int
    max_lsb: int
    mean_abs_lsb: float
    max_real: float  # max |difference| in real units (LSB x scale)
    histogram: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class LayerComparison:
    """Per-tensor differences in ``order`` and the first tensor where the runs part."""

    layers: list[TensorDiff]
    first_divergence: str | None
    missing: list[str]

    @property
    def identical(self) -> bool:
        """True when at least one tensor was compared and every compared tensor matches exactly.

        False when no tensor name was in both runs (``layers`` is empty): nothing was compared.
        """
        return bool(self.layers) and self.first_divergence is None

    @property
    def max_lsb(self) -> int:
        """The largest difference in LSB over all compared tensors."""
        return max((d.max_lsb for d in self.layers), default=0)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "layers": [d.as_dict() for d in self.layers],
            "first_divergence": self.first_divergence,
            "missing": self.missing,
        }


def compare_layers(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    order: list[str],
    scales: dict[str, float],
) -> LayerComparison:
    """Compare ``a`` and ``b`` tensor by tensor in ``order`` (names in only one run are listed
    in ``missing``; when no name is in both, ``layers`` is empty and ``identical`` False).
    Shapes must match; a mismatch raises ValueError naming the tensor."""
    layers: list[TensorDiff] = []
    missing: list[str] = []
    first: str | None = None
    for name in order:
        if name not in a or name not in b:
            missing.append(name)
            continue
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape:
            raise ValueError(
                f"tensor {name!r} has shape {x.shape} in one run and {y.shape} in the other; "
                "bring both to one layout (e.g. NCHW) before comparing"
            )
        d = np.abs(x.astype(np.int64) - y.astype(np.int64))
        values, counts = np.unique(d, return_counts=True)
        diff = TensorDiff(
            name=name,
            count=int(d.size),
            mismatches=int(np.count_nonzero(d)),
            max_lsb=int(d.max()) if d.size else 0,
            mean_abs_lsb=float(d.mean()) if d.size else 0.0,
            max_real=float(d.max() * scales.get(name, 1.0)) if d.size else 0.0,
            histogram={int(v): int(c) for v, c in zip(values, counts, strict=True)},
        )
        if diff.mismatches and first is None:
            first = name
        layers.append(diff)
    return LayerComparison(layers, first, missing)


def compare_results(
    a: TargetResult, b: TargetResult, *, order: list[str] | None = None
) -> LayerComparison:
    """Compare two targets' runs of one model tensor by tensor (run both with
    ``keep_intermediates=True``); ``first_divergence`` names the first layer where they part.

    ``order`` defaults to the execution order read from either artifact (TFLite operators or
    ONNX nodes), else the names of ``a`` then those only ``b`` has; scales (for ``max_real``)
    come from the artifacts too. When no name is in both runs, ``layers`` is empty and
    ``identical`` is False.

    >>> r = compare_results(run_tflm(p, x, keep_intermediates=True),  # doctest: +SKIP
    ...                     run_mcu(p, x, board="rp2040", keep_intermediates=True))
    >>> r.first_divergence, r.max_lsb  # doctest: +SKIP
    (None, 0)
    """
    values = [_intermediates(r) for r in (a, b)]
    infos = [_artifact_info(r.artifact) for r in (a, b)]
    for info, vals in zip(infos, values, strict=True):
        for name, chw in info["hwc_flat"].items():
            if name in vals:
                vals[name] = _hwc_flat_to_chw(vals[name], chw)
    if order is None:
        fallback = list(values[0]) + [n for n in values[1] if n not in values[0]]
        order = next((i["order"] for i in infos if i["order"]), None) or fallback
        order = [n for n in order if n in values[0] or n in values[1]]
    scales = {**infos[1]["scales"], **infos[0]["scales"]}
    aligned_a, aligned_b = {}, {}
    for name in order:
        if name in values[0] and name in values[1]:
            aligned_a[name], aligned_b[name] = _align(values[0][name], values[1][name], name)
    result = compare_layers(aligned_a, aligned_b, order, scales)
    return result


def _intermediates(r: TargetResult) -> dict[str, np.ndarray]:
    inter = (r.details or {}).get("intermediates")
    if not inter:
        raise ValueError(
            f"target {r.target!r} returned no intermediate tensors (details['intermediates']); "
            "run it with keep_intermediates=True to compare layers"
        )
    return {str(k): np.asarray(v) for k, v in inter.items()}


def _align(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Bring two values of one tensor to one layout (NHWC -> NCHW by rank, 1-D squeeze)."""
    if x.shape == y.shape:
        return x, y
    if x.ndim == y.ndim == 4:
        if np.transpose(x, (0, 3, 1, 2)).shape == y.shape:
            return np.transpose(x, (0, 3, 1, 2)), y
        if np.transpose(y, (0, 3, 1, 2)).shape == x.shape:
            return x, np.transpose(y, (0, 3, 1, 2))
    if x.ndim == 4 and y.ndim == 3 and x.shape[2] == 1 and x.shape[:2] + x.shape[3:] == y.shape:
        return x[:, :, 0], y
    if y.ndim == 4 and x.ndim == 3 and y.shape[2] == 1 and y.shape[:2] + y.shape[3:] == x.shape:
        return x, y[:, :, 0]
    raise ValueError(
        f"tensor {name!r} has shape {x.shape} in one run and {y.shape} in the other, and no "
        "layout change (NHWC/NCHW, 1-D squeeze) relates them; compare runs of one artifact "
        "graph, or pass order= without this tensor"
    )


def _hwc_flat_to_chw(v: np.ndarray, hwc: tuple[int, int, int]) -> np.ndarray:
    h, w, c = hwc
    if v.ndim != 2 or v.shape[1] != h * w * c:
        return v
    return v.reshape(v.shape[0], h, w, c).transpose(0, 3, 1, 2).reshape(v.shape[0], -1)


def _artifact_info(artifact: str) -> dict:
    """Execution order, scales and HWC-flattened tensors of a .tflite or .onnx artifact."""
    info: dict = {"order": [], "scales": {}, "hwc_flat": {}}
    path = Path(artifact)
    if not path.is_file():
        return info
    if path.suffix == ".tflite":
        from edgekiln.formats.tflite import read_tflite

        m = read_tflite(path)
        info["order"] = [m.tensor(i).name for i in m.inputs]
        producer: dict[int, str] = {}
        for op in m.operators:
            info["order"] += [m.tensor(i).name for i in op.outputs]
            producer.update({i: op.opcode for i in op.outputs})
            src = m.tensor(op.inputs[0]) if op.inputs else None
            out = m.tensor(op.outputs[0])
            if src is None or op.opcode != "RESHAPE" or len(out.shape) != 2:
                continue
            # A flatten of an NHWC activation (the writer re-orders what follows it); a
            # reshape fed by TRANSPOSE is already in the graph's element order.
            nhwc = len(src.shape) == 4 and producer.get(src.index) != "TRANSPOSE"
            if nhwc and src.shape[3] > 1 and src.shape[1] * src.shape[2] > 1:
                info["hwc_flat"][out.name] = tuple(int(s) for s in src.shape[1:])
        info["scales"] = {t.name: float(t.scale[0]) for t in m.tensors if t.scale.size}
    elif path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        g = onnx.load(str(path)).graph
        inits = {t.name: t for t in g.initializer}
        for node in g.node:
            if node.op_type == "QuantizeLinear":
                name = node.output[0]
                info["order"].append(name)
                if len(node.input) > 1 and node.input[1] in inits:
                    scale = numpy_helper.to_array(inits[node.input[1]]).reshape(-1)
                    info["scales"][name] = float(scale[0])
    return info
