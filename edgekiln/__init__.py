"""edgekiln: quantization-aware fine-tuning, int8 ONNX / TFLite export, and on-device validation.

>>> import edgekiln, torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
>>> prepared = edgekiln.prepare(net, torch.zeros(1, 1, 6, 6), edgekiln.Recipe(sparsity=0.5))
>>> _ = prepared.train()(torch.randn(8, 1, 6, 6))  # calibrate (or fine-tune)
>>> graph = edgekiln.capture(prepared.eval())
>>> [op.type.value for op in graph.ops]
['conv', 'reshape']

Names that need PyTorch load it on first use, so ``edgekiln.ir``, ``edgekiln.exporters`` and
``edgekiln.targets`` work on a machine without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgekiln.api import export
    from edgekiln.ir import Graph, load_graph, save_graph
    from edgekiln.pipeline.capture import CaptureError, capture
    from edgekiln.pipeline.constraints import (
        L1,
        L2,
        Clip,
        Constraint,
        FakeQuant,
        Prune,
        Transform,
        apply_projections,
        constrain,
        constraints_of,
        prune_mask,
        weight_quantizer,
    )
    from edgekiln.pipeline.ops import UnsupportedOpError
    from edgekiln.pipeline.prepare import prepare
    from edgekiln.pipeline.quant import FakeQuantizer, QuantSpec
    from edgekiln.pipeline.recipe import Recipe, RecipeError
    from edgekiln.pipeline.schedules import ConstantSparsity, PolynomialDecay
    from edgekiln.pipeline.sparsity import SparsityReport, sparsity_report
    from edgekiln.pipeline.train import TrainConfig, calibrate, fit, predict

_LAZY = {
    "export": "edgekiln.api",
    "Graph": "edgekiln.ir",
    "load_graph": "edgekiln.ir",
    "save_graph": "edgekiln.ir",
    "CaptureError": "edgekiln.pipeline.capture",
    "capture": "edgekiln.pipeline.capture",
    "L1": "edgekiln.pipeline.constraints",
    "L2": "edgekiln.pipeline.constraints",
    "Clip": "edgekiln.pipeline.constraints",
    "Constraint": "edgekiln.pipeline.constraints",
    "FakeQuant": "edgekiln.pipeline.constraints",
    "Prune": "edgekiln.pipeline.constraints",
    "Transform": "edgekiln.pipeline.constraints",
    "apply_projections": "edgekiln.pipeline.constraints",
    "constrain": "edgekiln.pipeline.constraints",
    "constraints_of": "edgekiln.pipeline.constraints",
    "prune_mask": "edgekiln.pipeline.constraints",
    "weight_quantizer": "edgekiln.pipeline.constraints",
    "FakeQuantizer": "edgekiln.pipeline.quant",
    "QuantSpec": "edgekiln.pipeline.quant",
    "SparsityReport": "edgekiln.pipeline.sparsity",
    "TrainConfig": "edgekiln.pipeline.train",
    "calibrate": "edgekiln.pipeline.train",
    "fit": "edgekiln.pipeline.train",
    "predict": "edgekiln.pipeline.train",
    "UnsupportedOpError": "edgekiln.pipeline.ops",
    "prepare": "edgekiln.pipeline.prepare",
    "Recipe": "edgekiln.pipeline.recipe",
    "RecipeError": "edgekiln.pipeline.recipe",
    "ConstantSparsity": "edgekiln.pipeline.schedules",
    "PolynomialDecay": "edgekiln.pipeline.schedules",
    "sparsity_report": "edgekiln.pipeline.sparsity",
}

__all__ = [
    "L1",
    "L2",
    "CaptureError",
    "Clip",
    "ConstantSparsity",
    "Constraint",
    "FakeQuant",
    "FakeQuantizer",
    "Graph",
    "PolynomialDecay",
    "Prune",
    "QuantSpec",
    "Recipe",
    "RecipeError",
    "SparsityReport",
    "TrainConfig",
    "Transform",
    "UnsupportedOpError",
    "apply_projections",
    "calibrate",
    "capture",
    "constrain",
    "constraints_of",
    "export",
    "fit",
    "load_graph",
    "predict",
    "prepare",
    "prune_mask",
    "save_graph",
    "sparsity_report",
    "weight_quantizer",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgekiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
