"""``prepare``: turn a float model into one that trains what the int8 device will compute.

Steps, in order:

1. trace the model with ``torch.fx`` (a copy: the user's model is left as it was);
2. fold every BatchNorm into the conv or linear before it (eval-mode statistics);
3. put the recipe's constraints on every Conv1d, Conv2d and Linear kernel, with the sparsity
   pattern fitted to the graph (see "Sparsity patterns" below);
4. insert activation quantizers wherever the int8 scheme quantizes a tensor: after the
   input, after each conv / linear / add (after its ReLU when one follows, so the output
   range absorbs it), and after average pooling and means. Ops whose int8 kernels need equal
   input and output parameters (max pool, average pool, mean, reshape, pad, concatenation)
   get no parameters of their own: they share one quantizer with their inputs, so the
   trained model already computes what the device computes. Softmax outputs get TFLite's
   fixed parameters (scale 1/256, zero point -128). Identity nodes (``nn.Identity``,
   ``nn.Dropout``) are looked through: ``conv -> Identity -> ReLU`` fuses like ``conv -> ReLU``;
5. round every conv / linear bias onto its int32 grid ``input_scale * weight_scale`` in the
   forward (:class:`BiasQuant`, straight-through gradient), with the scale of the quantizer
   that feeds the layer and the weight's FakeQuant scales: ``capture`` rounds with the same
   function, so the fake-quantized model adds the bias the int8 graph stores; and give the
   weight quantizer of every conv and linear with a bias, and the output quantizer of every
   conv, linear and add, a scale floor (see "Scale floors" below).

``capture`` reads the prepared model back through the same classification
(``edgekiln.pipeline.ops``).

Sparsity patterns
-----------------
- ``"channel"``: layers whose outputs are added together (a residual add, through ReLUs, pools
  and depthwise convs, which keep channels aligned) share one :class:`ChannelGroup`, so they
  prune the same channels and the sum loses them too; ``capture`` then removes the pruned
  channels from the graph. Layers whose outputs are the model's outputs (the classifier) are
  not channel-pruned: that would delete classes.
- ``"N:M"``: a Linear fed by a flatten of a ``(C, H, W)`` map groups its columns along ``C``
  (``Prune.flattened_from``), the order TFLite stores them in, so the artifact keeps N:M.
  Layers where N:M cannot apply (depthwise or grouped convs, an input dimension that is not a
  multiple of M, e.g. a first conv on 1 or 3 channels) are left dense, with a warning.

Scale floors
------------
An observed range says nothing about the scale when it is (near) zero: a ReLU after a conv
that is negative on all calibration data sees [0, 0] and would get ``MIN_SCALE`` (2**-23),
making the requantization multiplier ``input_scale * weight_scale / output_scale`` about 800
or more. XNNPACK (LiteRT's default) refuses multipliers of 256 or more, and the next layer's
int32 bias grid (``output_scale * its weight scale``) gets so fine that a bias overflows int32.
So the output scale of a conv or linear is kept at or above its coarsest accumulator step,
``input_scale * max_c weight_scale[c]`` (every requantization multiplier <= 1): an int32
accumulator moves in steps of ``input_scale * weight_scale[c]``, so an output step finer than
the coarsest of them only buys resolution for the other channels, and a live layer's range
spans thousands of such steps (the floor binds only for dead or nearly dead outputs).

An add's output scale is kept at or above ``(s_a + s_b) / 127``. LiteRT's builtin int8 ADD
holds the requantized sum plus the output zero point in int16 and wraps past it (measured: an
all-negative residual into a ReLU gave 127 for -128, 255 LSB off). Two int8 inputs span at most
``255 * (s_a + s_b)``, so the floor keeps that sum within ``32767 - 128`` output steps, and it
keeps every input-to-output multiplier at or below 128, half of XNNPACK's limit of 256. It binds
only where the output range is under about 1% of the inputs' ranges (a ReLU after an add that
is negative on the calibration data). The model input keeps ``MIN_SCALE`` for a zero range (an
all-zero input has no producer to take a step from).

A conv or linear weight scale is kept, per output channel, at or above
``|bias[c]| / (input_scale * 2**30)``, so its int32 bias stays within ``2**30`` steps of
``input_scale * weight_scale[c]`` (half of int32: room for the bias to move between updates).
The weight's FakeQuant and :class:`BiasQuant` both read the floored scale, so training and
``capture`` agree. It binds only where an input step times a weight step is under ``2**-30``
of the bias: a dead or near-dead input range (``MIN_SCALE``, data near zero) or an all-zero
filter, where the input adds almost nothing to the bias and coarser weights cost nothing.

``recipe.sparsity_mode = "prune_then_qat"`` starts the model with fake-quantization off (the
pruning phase); ``edgekiln.pipeline.constraints.start_qat(model)`` freezes the masks and turns
QAT on for the second phase.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from edgekiln.pipeline.constraints import (
    ChannelGroup,
    Constraint,
    Pattern,
    PatternKind,
    Prune,
    constrain,
    set_fake_quant,
    weight_quantizer,
)
from edgekiln.pipeline.ops import (
    FUSABLE_ROLES,
    NEW_VALUE_ROLES,
    SHARED_REQUANT_ROLES,
    SHARED_ROLES,
    NodeInfo,
    Role,
    classify,
    unsupported,
    weighted_layer,
    where,
)
from edgekiln.pipeline.quant import (
    FakeQuantizer,
    activation_spec,
    fake_quantize,
    fake_quantize_bias,
)
from edgekiln.pipeline.recipe import Recipe, SparsityMode

logger = logging.getLogger(__name__)

SOFTMAX_SCALE = 1.0 / 256.0
SOFTMAX_ZERO_POINT = -128
ADD_INT16_STEPS = 127.0
"""An add's output scale floor is ``(s_a + s_b) / ADD_INT16_STEPS`` (LiteRT's int16 sum): the
exact limit is ``(32767 - 128) / 255 = 127.996``, less a margin for float32 rounding."""
BIAS_STEPS_LIMIT = 2.0**30
"""A weight scale floor keeps ``|bias| / (input_scale * weight_scale)`` at or below this: half of
int32's range, so a bias that moves after the floor was last set still fits."""


class ActivationQuant(nn.Module):
    """A point in the graph where an activation is quantized.

    Several points may share one ``FakeQuantizer`` (and so one scale and zero point). Only
    points that make a new value observe; points after average pooling and means round onto
    the shared grid without widening it.
    """

    _edgekiln_quant = True

    def __init__(self, quantizer: FakeQuantizer, observe: bool = True) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.observe = observe

    def forward(self, x: Tensor) -> Tensor:
        if self.observe:
            return self.quantizer(x)
        if not bool(self.quantizer.enabled):
            return x
        scale, zero_point = self.quantizer.qparams()
        return fake_quantize(x, scale, zero_point, self.quantizer.spec)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the shared quantizer, float32 and int32, shape ``()``."""
        return self.quantizer.qparams()


class FixedQuant(nn.Module):
    """Quantization with fixed parameters (softmax outputs: scale 1/256, zero point -128)."""

    _edgekiln_quant = True
    scale: Tensor
    zero_point: Tensor

    def __init__(self, scale: float, zero_point: int, bits: int = 8) -> None:
        super().__init__()
        self.spec = activation_spec(bits)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))
        self.enabled = True

    def enable(self, enabled: bool = True) -> None:
        """Turn fake-quantization on (or off: pass-through, for a float pruning phase)."""
        self.enabled = bool(enabled)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The fixed ``(scale, zero_point)``."""
        return self.scale, self.zero_point


def _quantizing(source: ActivationQuant | FixedQuant) -> bool:
    """Whether ``source`` fake-quantizes (it passes values through when turned off)."""
    if isinstance(source, FixedQuant):
        return source.enabled
    return bool(source.quantizer.enabled) and source.quantizer.observed


class BiasQuant(nn.Module):
    """Parametrization of a conv / linear ``bias``: round it onto ``input_scale * weight_scale``.

    ``input_scale`` is read, at every forward, from the activation quantizer that feeds the
    layer, and ``weight_scale`` (per output channel) from the weight's FakeQuant, which the
    layer's forward has just run (``conv(x, self.weight, self.bias)`` reads the weight
    first). Values come from :func:`edgekiln.pipeline.quant.fake_quantize_bias`, which
    ``capture`` also uses, so training and the int8 graph agree integer for integer. The
    bias passes through unchanged while either quantizer is off (a float pruning phase).

    Both quantizers are plain references, not submodules: they are saved, moved and
    counted where they live, and ``copy.deepcopy`` of the model re-points the references.
    """

    _source: ActivationQuant | FixedQuant
    _weight_quantizer: FakeQuantizer

    def __init__(
        self, source: ActivationQuant | FixedQuant, weight_quantizer: FakeQuantizer
    ) -> None:
        super().__init__()
        self.__dict__["_source"] = source
        self.__dict__["_weight_quantizer"] = weight_quantizer

    @property
    def source(self) -> ActivationQuant | FixedQuant:
        """The activation quantizer whose scale is the layer's input scale."""
        return self._source

    def forward(self, bias: Tensor) -> Tensor:
        if not (bool(self._weight_quantizer.enabled) and _quantizing(self._source)):
            return bias
        input_scale, _ = self._source.qparams()
        weight_scale, _ = self._weight_quantizer.qparams()
        return fake_quantize_bias(bias, input_scale, weight_scale)


class _AccumulatorStep:
    """Scale floor of a conv / linear output: ``input_scale * max_c weight_scale[c]``."""

    def __init__(
        self, source: ActivationQuant | FixedQuant, weight_quantizer: FakeQuantizer
    ) -> None:
        self.source = source
        self.weight_quantizer = weight_quantizer

    def __call__(self) -> Tensor | None:
        if not _quantizing(self.source):
            return None
        input_scale, _ = self.source.qparams()  # float32, shape ()
        weight_scale, _ = self.weight_quantizer.qparams()  # float32, shape (C_out,) or ()
        return input_scale.reshape(()) * weight_scale.max()


class _BiasGridFloor:
    """Weight scale floor of a conv / linear: ``|bias| / (input_scale * BIAS_STEPS_LIMIT)``.

    float32, shape ``(C_out,)``: the bias before :class:`BiasQuant` (channel masks applied),
    so the floor is set before the bias is rounded with the floored scale. No host reads.
    """

    def __init__(self, source: ActivationQuant | FixedQuant, module: nn.Module) -> None:
        self.source = source
        self.module = module

    @torch.no_grad()
    def __call__(self) -> Tensor | None:
        if isinstance(self.source, ActivationQuant) and not self.source.quantizer.observed:
            return None
        bias = unrounded_bias(self.module)
        if bias is None:
            return None
        input_scale, _ = self.source.qparams()  # float32, shape ()
        grid = input_scale.to(bias.device).reshape(()) * BIAS_STEPS_LIMIT
        return bias.detach().float().abs() / grid  # float32, shape (C_out,)


class _AddInputStep:
    """Scale floor of an add's output: ``sum(input scales) / ADD_INT16_STEPS``."""

    def __init__(self, sources: list[ActivationQuant | FixedQuant]) -> None:
        self.sources = sources

    def __call__(self) -> Tensor | None:
        scales = [s.qparams()[0].reshape(()) for s in self.sources if _quantizing(s)]
        if not scales:
            return None
        return torch.stack(scales).sum() / ADD_INT16_STEPS


def prepare(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    recipe: Recipe | None = None,
) -> fx.GraphModule:
    """A copy of ``model`` with BatchNorm folded, kernels constrained and activations quantized.

    ``recipe=None`` means int8 QAT without sparsity. Train the result with an ordinary loop;
    its observers calibrate in training mode. ``example_inputs`` (a batch, or a tuple of
    them) fixes the input shape that ``capture`` will use.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    >>> prepared = prepare(net, torch.zeros(2, 1, 5, 5))
    >>> [n.name for n in prepared.graph.nodes]
    ['input_1', 'input_1_quant', '_0', '_2', '_2_quant', '_3', 'output']
    """
    recipe = recipe or Recipe()
    inputs = _as_tuple(example_inputs)
    gm = _trace(copy.deepcopy(model))
    gm.eval()
    _fold_batch_norms(gm)
    _constrain_kernels(gm, recipe, inputs)
    _insert_quantizers(gm, recipe)
    _link_scales(gm)
    gm.graph.lint()
    gm.recompile()
    # fx.GraphModule is an nn.Module: a plain attribute, read back by capture
    setattr(gm, "meta_input_shapes", [tuple(x.shape[1:]) for x in inputs])  # noqa: B010
    if recipe.prunes and recipe.sparsity_mode is SparsityMode.PRUNE_THEN_QAT:
        set_fake_quant(gm, False)  # phase 1: pruning only; start_qat(gm) begins phase 2
    gm.train(model.training)
    return gm


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of tensors (a batch shaped like the "
            f"model's input), got {type(example_inputs).__name__}"
        )
    return inputs


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__}: {e}. edgekiln's prepare needs a "
            "model without data-dependent control flow in forward (no `if` on tensor values)"
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _fold_batch_norms(gm: fx.GraphModule) -> None:
    """Fold each BatchNorm into the single-use conv or linear feeding it, then drop it."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        info = classify(node, modules)
        if info.role != Role.BATCH_NORM:
            continue
        source = node.args[0]
        producer = classify(source, modules) if isinstance(source, fx.Node) else None
        if (
            not isinstance(source, fx.Node)
            or producer is None
            or producer.role != Role.WEIGHTED
            or len(source.users) != 1
            or info.module is None
        ):
            raise unsupported(
                node,
                type(info.module).__name__ + " not directly after a conv or linear",
                hint="put each BatchNorm right after the conv or linear it normalizes",
            )
        fold_batch_norm(weighted_layer(source, producer), info.module)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        _delete_submodule(gm, str(node.target))


def fold_batch_norm(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine transform into ``layer``'s weight and bias, in place.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    if not isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Linear):
        raise ValueError(
            f"fold_batch_norm folds into a Conv1d, Conv2d or Linear, got {type(layer).__name__}; "
            "put each BatchNorm right after the conv or linear it normalizes"
        )
    if (
        not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d)
        or bn.running_var is None
        or bn.running_mean is None
    ):
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    weight = layer.weight
    if weight.shape[0] != bn.num_features:
        raise ValueError(
            f"BatchNorm over {bn.num_features} features follows a layer with "
            f"{weight.shape[0]} output channels"
        )
    with torch.no_grad():
        factor = bn.running_var.add(bn.eps).rsqrt()  # (C_out,)
        if bn.weight is not None:
            factor = factor * bn.weight
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor
        if bn.bias is not None:
            new_bias = new_bias + bn.bias
        shape = (-1,) + (1,) * (weight.dim() - 1)
        layer.weight = nn.Parameter(weight * factor.reshape(shape))
        layer.bias = nn.Parameter(new_bias)


def _delete_submodule(gm: fx.GraphModule, target: str) -> None:
    if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)


def _constrain_kernels(gm: fx.GraphModule, recipe: Recipe, inputs: tuple[Tensor, ...]) -> None:
    modules = dict(gm.named_modules())
    kind = Pattern.parse(recipe.pattern).kind if recipe.prunes else None
    fitted: dict[fx.Node, Prune | None] = {}
    if kind is PatternKind.CHANNEL:
        fitted = _channel_prunes(gm, modules, _recipe_prune(recipe))
    elif kind is PatternKind.N_OF_M:
        fitted = _n_of_m_prunes(gm, modules, recipe, inputs)
    seen: set[int] = set()
    for node in gm.graph.nodes:
        info = classify(node, modules)
        if info.role == Role.WEIGHTED and id(info.module) not in seen:
            layer = weighted_layer(node, info)
            seen.add(id(layer))
            constraints = recipe.weight_constraints()
            if node in fitted:
                constraints = _with_prune(constraints, fitted[node])
            constrain(layer, *constraints)


def _with_prune(constraints: list[Constraint], prune: Prune | None) -> list[Constraint]:
    """``constraints`` with its Prune replaced by ``prune`` (or dropped for None)."""
    out: list[Constraint] = []
    for c in constraints:
        if not isinstance(c, Prune):
            out.append(c)
        elif prune is not None:
            out.append(prune)
    return out


def _recipe_prune(recipe: Recipe) -> Prune:
    return next(c for c in recipe.weight_constraints() if isinstance(c, Prune))


# Roles whose output channel c is channel c of their (first) input.
_CHANNEL_ALIGNED = frozenset(
    {
        Role.ACTIVATION,
        Role.MAX_POOL,
        Role.AVG_POOL,
        Role.MEAN,
        Role.PAD,
        Role.IDENTITY,
        Role.QUANT,
    }
)


def _is_depthwise(module: nn.Module | None) -> bool:
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _channel_prunes(
    gm: fx.GraphModule, modules: dict[str, nn.Module], prune: Prune
) -> dict[fx.Node, Prune | None]:
    """One Prune per weighted node: shared ChannelGroups for layers whose outputs are added,
    None (no pruning) for layers whose channels are the model's outputs."""
    space = _Groups()
    weighted: list[fx.Node] = []
    for node in gm.graph.nodes:
        info = classify(node, modules)
        args = [a for a in _flat_args(node) if isinstance(a, fx.Node)]
        if info.role == Role.WEIGHTED:
            weighted.append(node)
            if _is_depthwise(info.module):
                space.union(node, args[0])  # depthwise: channel c in, channel c out
        elif info.role in _CHANNEL_ALIGNED and args:
            space.union(node, args[0])
        elif info.role == Role.ADD:
            for arg in args:
                space.union(node, arg)
    heads = {space.find(n) for n in _output_producers(gm, modules)}
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in weighted:
        members.setdefault(space.find(node), []).append(node)
    fitted: dict[fx.Node, Prune | None] = {}
    for root, nodes in members.items():
        if root in heads:
            logger.info("channel pruning leaves out %s: their outputs are the model's outputs",
                        ", ".join(str(n.target) for n in nodes))  # fmt: skip
            fitted.update(dict.fromkeys(nodes))
            continue
        layers = list({id(m): m for m in (modules[str(n.target)] for n in nodes)}.values())
        if len(layers) == 1:
            continue
        group = ChannelGroup(layers)
        for node in nodes:
            fitted[node] = dataclasses.replace(prune, group=group)
    return fitted


def _output_producers(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """Weighted nodes whose channels reach a model output through channel-keeping ops."""
    found: list[fx.Node] = []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stack = [a for a in _flat_args(output) if isinstance(a, fx.Node)]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        role = classify(node, modules).role
        if role == Role.WEIGHTED:
            found.append(node)
        elif role in _CHANNEL_ALIGNED or role in (Role.ADD, Role.RESHAPE, Role.SOFTMAX):
            stack.extend(a for a in _flat_args(node) if isinstance(a, fx.Node))
    return found


def _n_of_m_prunes(
    gm: fx.GraphModule, modules: dict[str, nn.Module], recipe: Recipe, inputs: tuple[Tensor, ...]
) -> dict[fx.Node, Prune | None]:
    """Fit an N:M Prune to each layer: along C for a Linear after a flatten, none where N:M
    cannot apply (with one warning naming those layers)."""
    pattern = Pattern.parse(recipe.pattern)
    m = pattern.m
    prune = _recipe_prune(recipe)
    with torch.no_grad():
        ShapeProp(gm).propagate(*(x[:1].detach().float() for x in inputs))
    fitted: dict[fx.Node, Prune | None] = {}
    dense: list[str] = []
    for node in gm.graph.nodes:
        info = classify(node, modules)
        if info.role != Role.WEIGHTED:
            continue
        module = weighted_layer(node, info)
        inputs_per_group = module.weight.shape[1]
        groups = module.groups if isinstance(module, nn.Conv1d | nn.Conv2d) else 1
        chw = _flattened_from(node, modules) if isinstance(module, nn.Linear) else None
        if chw is not None and math.prod(chw[1:]) > 1:
            if chw[0] % m:
                dense.append(f"{node.target} (flattened from {chw[0]} channels)")
                fitted[node] = None
            else:
                fitted[node] = dataclasses.replace(prune, flattened_from=chw)
        elif groups > 1 or inputs_per_group % m:
            why = f"groups={groups}" if groups > 1 else f"{inputs_per_group} inputs"
            dense.append(f"{node.target} ({why})")
            fitted[node] = None
    if dense:
        warnings.warn(
            f"pattern '{pattern}' groups {m} consecutive inputs, which these layers cannot "
            f"hold; they stay dense: {', '.join(dense)}. Way out: widen them to a multiple of "
            f"{m} inputs, or use pattern='unstructured'",
            stacklevel=4,  # _n_of_m_prunes < _constrain_kernels < prepare < the caller
        )
    return fitted


def _flattened_from(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, ...] | None:
    """``(C, *spatial)`` when a Linear's input is a flatten of such a map, else None."""
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node):
        role = classify(source, modules).role
        if role in (Role.IDENTITY, Role.QUANT):
            source = source.args[0]
            continue
        if role != Role.RESHAPE:
            return None
        x = source.args[0]
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if meta is None or len(meta.shape) < 3:
            return None
        return tuple(int(d) for d in meta.shape[1:])
    return None


class _Groups:
    """Union-find over graph nodes: nodes in one group share one quantizer."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, node: fx.Node) -> fx.Node:
        self.parent.setdefault(node, node)
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _insert_quantizers(gm: fx.GraphModule, recipe: Recipe) -> None:
    modules = dict(gm.named_modules())
    roles = {node: classify(node, modules).role for node in gm.graph.nodes}
    groups = _Groups()
    points: list[tuple[fx.Node, bool]] = []  # (node after which to quantize, observes)
    fixed: list[fx.Node] = []
    for node, role in roles.items():
        tensor_args = [a for a in _flat_args(node) if roles.get(a) not in (None, Role.SHAPE)]
        if role in NEW_VALUE_ROLES:
            points.append((_fused_end(node, roles), True))
        elif role == Role.ACTIVATION:
            source = _through_identities(tensor_args[0], roles)
            if roles[source] not in FUSABLE_ROLES or len(source.users) != 1:
                raise unsupported(
                    node,
                    "ReLU / ReLU6 not directly after a conv, linear or add",
                    hint="apply the activation right after the conv, linear or residual add "
                    "(its int8 kernel fuses it)",
                )
            _check_activation(node, modules)
            groups.union(node, source)
        elif role in SHARED_ROLES or role in SHARED_REQUANT_ROLES or role == Role.CONCAT:
            for arg in tensor_args:
                groups.union(node, arg)
            if role in SHARED_REQUANT_ROLES:
                points.append((node, False))
        elif role == Role.SOFTMAX:
            fixed.append(node)
    quantizers: dict[fx.Node, FakeQuantizer] = {}
    for node, observes in points:
        root = groups.find(node)
        if root not in quantizers:
            quantizers[root] = FakeQuantizer(
                activation_spec(recipe.activation_bits),
                observer=recipe.observer,
                freeze_after=recipe.freeze_observers_after,
            )
        _insert_after(gm, node, f"{node.name}_quant", ActivationQuant(quantizers[root], observes))
    for node in fixed:
        _insert_after(
            gm,
            node,
            f"{node.name}_quant",
            FixedQuant(SOFTMAX_SCALE, SOFTMAX_ZERO_POINT, recipe.activation_bits),
        )


def _link_scales(gm: fx.GraphModule) -> None:
    """Step 5: BiasQuant on every conv / linear bias; scale floors on weights and on outputs.

    Runs on the graph with its quantizers in place, so each layer's input quantizer is the
    QUANT node before it (through ops that share their input's parameters).
    """
    modules = dict(gm.named_modules())
    infos = {node: classify(node, modules) for node in gm.graph.nodes}
    linked: dict[int, ActivationQuant | FixedQuant] = {}
    for node, info in infos.items():
        if info.role == Role.ADD:
            sources = [_input_quant(a, infos) for a in node.args[:2] if isinstance(a, fx.Node)]
            output = _output_quant(node, infos)
            if output is not None:
                output.add_scale_floor(_AddInputStep(sources))
            continue
        if info.role != Role.WEIGHTED:
            continue
        module = weighted_layer(node, info)
        if not isinstance(node.args[0], fx.Node):
            raise unsupported(node, "a conv or linear whose input is not a tensor")
        source = _input_quant(node.args[0], infos)
        quantizer = weight_quantizer(module)
        if quantizer is None:  # _constrain_kernels put a FakeQuant on every kernel
            raise RuntimeError(f"{where(node)} has no weight FakeQuant (an edgekiln bug)")
        if id(module) in linked:
            if not _same_grid(linked[id(module)], source):
                raise unsupported(
                    node,
                    "one conv or linear module called at two points with different input "
                    "scales (its int32 bias would need two grids)",
                    hint="give each call its own module",
                )
            continue
        linked[id(module)] = source
        if module.bias is not None:
            parametrize.register_parametrization(
                module, "bias", BiasQuant(source, quantizer), unsafe=True
            )
            quantizer.add_scale_floor(_BiasGridFloor(source, module))
        output = _output_quant(node, infos)
        if output is not None:
            output.add_scale_floor(_AccumulatorStep(source, quantizer))


def _same_grid(a: ActivationQuant | FixedQuant, b: ActivationQuant | FixedQuant) -> bool:
    if isinstance(a, ActivationQuant) and isinstance(b, ActivationQuant):
        return a.quantizer is b.quantizer
    return a is b


# Ops between a quantizer and the layer it feeds that keep its parameters.
_SAME_GRID_ROLES = frozenset({Role.MAX_POOL, Role.RESHAPE, Role.PAD, Role.IDENTITY, Role.CONCAT})


def _input_quant(node: fx.Node, infos: dict[fx.Node, NodeInfo]) -> ActivationQuant | FixedQuant:
    """The quantizer whose parameters the tensor ``node`` carries."""
    current = node
    while infos[current].role in _SAME_GRID_ROLES:
        args = [a for a in _flat_args(current) if infos[a].role != Role.SHAPE]
        if not args:
            break
        current = args[0]
    module = infos[current].module
    if not isinstance(module, ActivationQuant | FixedQuant):
        raise RuntimeError(f"no quantizer feeds {where(node)} (an edgekiln bug)")
    return module


def _output_quant(node: fx.Node, infos: dict[fx.Node, NodeInfo]) -> FakeQuantizer | None:
    """The observing quantizer after ``node`` (past its fused ReLU and identities), if any."""
    current = node
    while len(current.users) == 1:
        current = next(iter(current.users))
        info = infos[current]
        if info.role == Role.QUANT:
            module = info.module
            if isinstance(module, ActivationQuant) and module.observe:
                return module.quantizer
            return None
        if info.role not in (Role.ACTIVATION, Role.IDENTITY):
            return None
    return None


def unrounded_bias(module: nn.Module) -> Tensor | None:
    """``module.bias`` before :class:`BiasQuant` rounds it (masks applied), or None.

    ``capture`` rounds this value with the function training uses.

    >>> lin = nn.Linear(2, 1)
    >>> torch.equal(unrounded_bias(lin), lin.bias)
    True
    """
    plist = _bias_parametrizations(module)
    if plist is None or not isinstance(plist[-1], BiasQuant):
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, Tensor) else None
    value = plist.original
    if not isinstance(value, Tensor):  # parametrize stores the original tensor there
        raise TypeError(f"{type(module).__name__}.bias has no stored tensor (an edgekiln bug)")
    for p in list(plist)[:-1]:
        value = p(value)
    return value


def bias_quant(module: nn.Module) -> BiasQuant | None:
    """The :class:`BiasQuant` of ``module.bias``, or None (no bias, or not prepared)."""
    plist = _bias_parametrizations(module)
    if plist is None or not isinstance(plist[-1], BiasQuant):
        return None
    return plist[-1]


def _bias_parametrizations(module: nn.Module) -> nn.ModuleList | None:
    if not parametrize.is_parametrized(module, "bias"):
        return None
    plist = module.parametrizations["bias"]  # type: ignore[index]
    return plist if isinstance(plist, nn.ModuleList) else None


def _through_identities(node: fx.Node, roles: dict[fx.Node, Role]) -> fx.Node:
    """``node``, or the first node before it that is not a single-use identity."""
    while roles[node] == Role.IDENTITY and len(node.users) == 1:
        args = [a for a in _flat_args(node) if roles.get(a) not in (None, Role.SHAPE)]
        if not args:
            break
        node = args[0]
    return node


def _fused_end(node: fx.Node, roles: dict[fx.Node, Role]) -> fx.Node:
    """The node whose output is quantized for ``node``: its ReLU when one follows alone
    (possibly after identities: Dropout, Identity)."""
    if roles[node] not in FUSABLE_ROLES:
        return node
    end = node
    while len(end.users) == 1:
        user = next(iter(end.users))
        if roles[user] == Role.ACTIVATION:
            return user
        if roles[user] != Role.IDENTITY:
            break
        end = user
    return node


def _check_activation(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    if node.op == "call_module":
        return
    extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "inplace"]
    if any(isinstance(a, fx.Node) for a in extra):
        raise unsupported(node, "activation with tensor arguments")


def _flat_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def collect(arg: fx.Node) -> fx.Node:
        found.append(arg)
        return arg

    fx.node.map_arg((node.args, node.kwargs), collect)
    return found


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> None:
    name = name.replace(".", "_")
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args=(node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
