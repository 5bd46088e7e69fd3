"""What each node of a traced model is, in the int8 scheme's terms.

``prepare`` and ``capture`` both read a model through ``torch.fx``; this module is the one
place that maps a node (a module call, a function call or a tensor method) to a ``Role``.
A node that maps to none raises ``UnsupportedOpError`` naming the op, where it is, and the
ops edgekiln supports.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.parametrize import type_before_parametrizations


class UnsupportedOpError(ValueError):
    """An op of the model has no int8 kernel in edgekiln's graph; the message names it."""


class Role(enum.Enum):
    """What a node does to the int8 graph."""

    INPUT = "input"
    WEIGHTED = "weighted"  # Conv1d, Conv2d, Linear: a new tensor, quantized after it
    ACTIVATION = "activation"  # ReLU, ReLU6: fused into the op before it
    ADD = "add"  # a new tensor, quantized after it
    MAX_POOL = "max_pool"  # output on the input's grid: shares its parameters
    AVG_POOL = "avg_pool"  # shares the input's parameters; rounds onto that grid
    MEAN = "mean"  # shares the input's parameters; rounds onto that grid
    RESHAPE = "reshape"  # shares the input's parameters
    CONCAT = "concat"  # every input and the output share one set of parameters
    SOFTMAX = "softmax"  # fixed output parameters (1/256, -128)
    PAD = "pad"  # shares the input's parameters
    IDENTITY = "identity"  # Dropout, Identity, contiguous: the input itself
    BATCH_NORM = "batch_norm"  # folded into the conv or linear before it by prepare
    SHAPE = "shape"  # x.size(...), x.shape: Python ints, not tensors
    QUANT = "quant"  # an ActivationQuant inserted by prepare
    OUTPUT = "output"


SUPPORTED = (
    "Conv1d, Conv2d (regular, depthwise, grouped), Linear, BatchNorm after a conv or linear "
    "(folded), ReLU / ReLU6 after a conv, linear or add, residual add, MaxPool, AvgPool, "
    "AdaptiveAvgPool(1) / mean over the spatial axes, flatten / reshape / view, cat, softmax, "
    "zero padding, Dropout, Identity"
)

# Roles whose output shares the input's parameters, and which need no new quantizer.
SHARED_ROLES = frozenset({Role.MAX_POOL, Role.RESHAPE, Role.PAD, Role.IDENTITY})
# Roles whose output shares the input's parameters but must be rounded onto that grid again.
SHARED_REQUANT_ROLES = frozenset({Role.AVG_POOL, Role.MEAN})
# Roles that make a new tensor with parameters of its own.
NEW_VALUE_ROLES = frozenset({Role.INPUT, Role.WEIGHTED, Role.ADD})
FUSABLE_ROLES = frozenset({Role.WEIGHTED, Role.ADD})

_MODULE_ROLES: tuple[tuple[type[nn.Module], Role], ...] = (
    (nn.Conv1d, Role.WEIGHTED),
    (nn.Conv2d, Role.WEIGHTED),
    (nn.Linear, Role.WEIGHTED),
    (nn.ReLU, Role.ACTIVATION),
    (nn.ReLU6, Role.ACTIVATION),
    (nn.MaxPool1d, Role.MAX_POOL),
    (nn.MaxPool2d, Role.MAX_POOL),
    (nn.AvgPool1d, Role.AVG_POOL),
    (nn.AvgPool2d, Role.AVG_POOL),
    (nn.AdaptiveAvgPool1d, Role.MEAN),
    (nn.AdaptiveAvgPool2d, Role.MEAN),
    (nn.Flatten, Role.RESHAPE),
    (nn.Softmax, Role.SOFTMAX),
    (nn.ZeroPad2d, Role.PAD),
    (nn.ConstantPad1d, Role.PAD),
    (nn.ConstantPad2d, Role.PAD),
    (nn.Dropout, Role.IDENTITY),
    (nn.Identity, Role.IDENTITY),
    (nn.BatchNorm1d, Role.BATCH_NORM),
    (nn.BatchNorm2d, Role.BATCH_NORM),
)

_FUNCTION_ROLES: dict[Any, Role] = {
    F.relu: Role.ACTIVATION,
    torch.relu: Role.ACTIVATION,
    F.relu6: Role.ACTIVATION,
    operator.add: Role.ADD,
    torch.add: Role.ADD,
    F.max_pool1d: Role.MAX_POOL,
    F.max_pool2d: Role.MAX_POOL,
    F.avg_pool1d: Role.AVG_POOL,
    F.avg_pool2d: Role.AVG_POOL,
    F.adaptive_avg_pool1d: Role.MEAN,
    F.adaptive_avg_pool2d: Role.MEAN,
    torch.mean: Role.MEAN,
    torch.flatten: Role.RESHAPE,
    torch.reshape: Role.RESHAPE,
    torch.cat: Role.CONCAT,
    torch.concat: Role.CONCAT,
    F.softmax: Role.SOFTMAX,
    torch.softmax: Role.SOFTMAX,
    F.pad: Role.PAD,
    F.dropout: Role.IDENTITY,
    getattr: Role.SHAPE,
    operator.getitem: Role.SHAPE,
}

_METHOD_ROLES: dict[str, Role] = {
    "relu": Role.ACTIVATION,
    "add": Role.ADD,
    "mean": Role.MEAN,
    "flatten": Role.RESHAPE,
    "view": Role.RESHAPE,
    "reshape": Role.RESHAPE,
    "softmax": Role.SOFTMAX,
    "contiguous": Role.IDENTITY,
    "size": Role.SHAPE,
    "dim": Role.SHAPE,
}


@dataclass(frozen=True)
class NodeInfo:
    """A node's role, and the module it calls (for ``call_module`` nodes)."""

    role: Role
    module: nn.Module | None = None


WeightedLayer = nn.Conv1d | nn.Conv2d | nn.Linear
"""The modules of ``Role.WEIGHTED`` nodes (parametrized or not)."""


def weighted_layer(node: fx.Node, info: NodeInfo) -> nn.Conv1d | nn.Conv2d | nn.Linear:
    """The conv or linear module a ``Role.WEIGHTED`` node calls, typed as such.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 1)))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> weighted_layer(node, classify(node, dict(gm.named_modules())))
    Linear(in_features=2, out_features=1, bias=True)
    """
    module = info.module
    if info.role != Role.WEIGHTED or not isinstance(module, WeightedLayer):
        raise unsupported(node, f"{type(module).__name__} where a conv or linear was expected")
    return module


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> NodeInfo:
    """The role of ``node``; raises UnsupportedOpError for an op edgekiln cannot quantize."""
    if node.op == "placeholder":
        return NodeInfo(Role.INPUT)
    if node.op == "output":
        return NodeInfo(Role.OUTPUT)
    if node.op == "call_module":
        module = modules[str(node.target)]
        if getattr(module, "_edgekiln_quant", False):
            return NodeInfo(Role.QUANT, module)
        base = type_before_parametrizations(module)
        for cls, role in _MODULE_ROLES:
            if base is cls or (issubclass(base, cls) and role != Role.WEIGHTED):
                _check_module(node, module)
                return NodeInfo(role, module)
        raise unsupported(node, type(module).__name__)
    if node.op == "call_function" and node.target in _FUNCTION_ROLES:
        role = _FUNCTION_ROLES[node.target]
        if role == Role.ADD and not all(isinstance(a, fx.Node) for a in node.args[:2]):
            raise unsupported(node, "add of a tensor and a constant")
        return NodeInfo(role)
    if node.op == "call_method" and node.target in _METHOD_ROLES:
        return NodeInfo(_METHOD_ROLES[str(node.target)])
    if node.op == "get_attr":
        raise unsupported(node, f"a parameter or buffer read in forward ({node.target})")
    return NodeInfo(_unsupported_role(node))


def _unsupported_role(node: fx.Node) -> Role:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if target in (F.conv1d, F.conv2d, F.linear):
        raise unsupported(node, name, hint="use nn.Conv1d / nn.Conv2d / nn.Linear modules")
    raise unsupported(node, name)


def _check_module(node: fx.Node, module: nn.Module) -> None:
    """Refuse module settings whose int8 kernels would compute something else."""
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        raise unsupported(
            node,
            f"{type(module).__name__}(padding_mode={module.padding_mode!r})",
            hint="use padding_mode='zeros'",
        )
    if isinstance(module, nn.MaxPool1d | nn.MaxPool2d | nn.AvgPool1d | nn.AvgPool2d):
        if getattr(module, "ceil_mode", False):
            raise unsupported(
                node, f"{type(module).__name__}(ceil_mode=True)", hint="use ceil_mode=False"
            )
        if isinstance(module, nn.MaxPool1d | nn.MaxPool2d) and _any(module.dilation, 1):
            raise unsupported(node, f"{type(module).__name__}(dilation={module.dilation})")
    if isinstance(module, nn.AvgPool1d | nn.AvgPool2d):
        if _any(module.padding, 0) and module.count_include_pad:
            raise unsupported(
                node,
                f"{type(module).__name__}(padding={module.padding}, count_include_pad=True)",
                hint="TFLite's AVERAGE_POOL_2D leaves padding out of the count: "
                "set count_include_pad=False",
            )
    if isinstance(module, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d):
        size = module.output_size
        if any(s != 1 for s in (size if isinstance(size, tuple) else (size,))):
            raise unsupported(
                node,
                f"{type(module).__name__}(output_size={size})",
                hint="only output_size=1 (global average pooling) is supported",
            )
    if isinstance(module, nn.ConstantPad1d | nn.ConstantPad2d) and module.value != 0:
        raise unsupported(
            node,
            f"{type(module).__name__}(value={module.value})",
            hint="only zero padding is supported",
        )


def _any(value: Any, default: int) -> bool:
    values = value if isinstance(value, tuple | list) else (value,)
    return any(v != default for v in values)


def where(node: fx.Node) -> str:
    """Where ``node`` comes from: its module path, or its source line when it has one."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
        frames = [ln for ln in lines if ln.startswith("File ") and "/torch/" not in ln]
        frame = frames[-1] if frames else None
        if frame:
            return f"node {node.name!r} ({frame})"
    return f"node {node.name!r}"


def unsupported(node: fx.Node, what: str, hint: str = "") -> UnsupportedOpError:
    """The error for an op with no int8 kernel: names the op, where it is and what is supported."""
    message = (
        f"unsupported op {what} at {where(node)}. edgekiln's int8 graph supports: {SUPPORTED}."
    )
    if hint:
        message += f" Way out: {hint}."
    return UnsupportedOpError(message)
