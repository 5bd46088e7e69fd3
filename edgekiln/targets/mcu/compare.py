"""Layer-by-layer comparison of two runs of one model, in LSB of each tensor's scale.

Runtime-agnostic: feed it int8 tensors by IR tensor name from any two of ONNX Runtime,
LiteRT, TFLM, the simulator or the fake-quantized model, with both in one layout.

>>> import numpy as np
>>> a = {"x": np.array([1, 2, 3], np.int8), "y": np.array([5, 5], np.int8)}
>>> b = {"x": np.array([1, 2, 3], np.int8), "y": np.array([5, 7], np.int8)}
>>> r = compare_layers(a, b, ["x", "y"], {"x": 0.1, "y": 0.2})
>>> r.first_divergence, r.layers[1].max_lsb, r.layers[1].mismatches
('y', 2, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
        """True when every compared tensor matches exactly."""
        return self.first_divergence is None

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
    in ``missing``). Shapes must match; a mismatch raises ValueError naming the tensor."""
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
