"""Sparsity report: how many zeros each conv/linear kernel carries in the forward pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerSparsity:
    """One kernel: module path, shape, zero count, element count and the fraction of zeros."""

    path: str
    shape: tuple[int, ...]
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros."""
        return self.zeros / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer rows in module order, and the totals over all of them.

    >>> model = nn.Sequential(nn.Linear(4, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]]))
    >>> report = sparsity_report(model)
    >>> report.layers[0].path, report.layers[0].zeros, report.sparsity
    ('0', 3, 0.375)
    """

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def zeros(self) -> int:
        """Zeros over every kernel."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def total(self) -> int:
        """Elements over every kernel."""
        return sum(layer.total for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every kernel."""
        return self.zeros / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"layers": [...], "zeros", "total", "sparsity"}``.

        >>> sparsity_report(nn.Linear(2, 2)).as_dict()["layers"][0]["shape"]
        [2, 2]
        """
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = list(layer.shape)
            row["sparsity"] = layer.sparsity
            layers.append(row)
        return {
            "layers": layers,
            "zeros": self.zeros,
            "total": self.total,
            "sparsity": self.sparsity,
        }


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Count the zeros of every Conv1d / Conv2d / Linear kernel as the forward pass uses it.

    The kernel is ``module.weight``: for a constrained layer that is the masked (and, with
    FakeQuant, fake-quantized) tensor, not the stored one. Read it in the mode you care about
    (eval mode uses the stored quantization parameters).
    """
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, _LAYER_TYPES):
            weight = module.weight
            layers.append(
                LayerSparsity(
                    path=path,
                    shape=tuple(weight.shape),
                    zeros=int((weight == 0).sum()),
                    total=weight.numel(),
                )
            )
    return SparsityReport(layers)
