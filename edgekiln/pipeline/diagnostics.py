"""Where quantization costs precision: the error each activation quantizer introduces."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekiln.pipeline.prepare import ActivationQuant


def _eval_forward(model: nn.Module, x: np.ndarray, hooks: list[Any]) -> None:
    """One eval-mode forward of ``x`` through ``model``; then remove ``hooks``, restore the mode."""
    was_training = model.training
    model.eval()
    try:
        model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def quantization_error(model: nn.Module, x: np.ndarray) -> list[dict[str, Any]]:
    """Per activation quantizer of a prepared model, on inputs ``x`` (eval mode):

    ``sqnr_db``, the signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - q)^2)``
    of the values entering the quantizer against what leaves it, and ``clipped_fraction``,
    the share of values outside the representable range. Quantizers that share parameters
    (max pool, concatenation) are reported where the value is made.
    """
    rows: list[dict[str, Any]] = []
    hooks = []

    def record(name: str) -> Any:
        def hook(module: ActivationQuant, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
            real = inputs[0].float()
            scale, zero_point = module.qparams()
            lo = float(scale) * (module.quantizer.spec.qmin - int(zero_point))
            hi = float(scale) * (module.quantizer.spec.qmax - int(zero_point))
            noise = float(((real - out) ** 2).sum())
            signal = float((real**2).sum())
            sqnr = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None
            rows.append(
                {
                    "name": name,
                    "scale": float(scale),
                    "zero_point": int(zero_point),
                    "sqnr_db": round(sqnr, 3) if sqnr is not None else None,
                    "clipped_fraction": float(((real < lo) | (real > hi)).float().mean()),
                }
            )

        return hook

    for name, module in model.named_modules():
        if isinstance(module, ActivationQuant) and module.observe:
            hooks.append(module.register_forward_hook(record(name)))
    _eval_forward(model, x, hooks)
    return rows


@torch.no_grad()
def fake_quant_intermediates(model: nn.Module, graph: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every quantized tensor of a prepared model on ``x``, as the graph's int8 values.

    Keys are the graph's tensor names (``graph`` is ``capture(model)``), values int8 arrays in
    PyTorch's layout, batch first: the fake-quantized model's side of a layer-by-layer
    comparison with any runtime (``edgekiln.targets.mcu.compare``). Outputs of ops that only
    move values (max pool, reshape, pad, concatenation) have no quantizer of their own and are
    left out, as is a tensor whose channels ``capture`` removed (pruned filters).
    """
    nodes = graph.metadata.get("fx_nodes", {})
    by_name = {node.name: node for node in model.graph.nodes}  # type: ignore[union-attr]
    modules = dict(model.named_modules())
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for tensor_name, node_name in nodes.items():
        node = by_name.get(node_name)
        if node is None or node.op != "call_module":
            continue

        def keep(
            module: nn.Module, inputs: Any, out: torch.Tensor, name: str = tensor_name
        ) -> None:
            captured[name] = out.detach().float().numpy()

        hooks.append(modules[str(node.target)].register_forward_hook(keep))
    _eval_forward(model, x, hooks)
    values = {}
    for name, real in captured.items():
        tensor = graph.tensors.get(name)
        if tensor is None or tensor.quant is None or tuple(real.shape[1:]) != tensor.shape[1:]:
            continue
        values[name] = tensor.quant.quantize(real)
    return values
