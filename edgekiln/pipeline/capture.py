"""``capture``: read a prepared model into edgekiln's quantized graph, once.

The graph carries int8 weights (the fake-quantized kernels divided by their scales, so the
integers are exactly those training used), int32 biases at ``input_scale * weight_scale``,
and every activation's scale and zero point from its observer. Export and validation read
only the graph.

Channels that channel pruning zeroed (all-zero filter and zero bias) are then removed from the
graph by ``edgekiln.ir.transforms.remove_pruned_channels``: the producer loses its output
filters and every consumer the matching inputs, through residual adds, concatenations, pools
and flattens. That removal is exact (the integers of every remaining channel are unchanged),
so the graph computes bit for bit what the trained model computes, with fewer MACs and bytes.
It runs at capture rather than at export so that both artifacts, the report's MAC counts and
every target read the same smaller graph; ``remove_pruned_channels=False`` keeps the dense
graph (the "before" of a size and latency comparison). What was removed is in
``graph.metadata["channel_removal"]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgekiln.ir import (
    SOFTMAX_OUTPUT_SCALE,
    SOFTMAX_OUTPUT_ZERO_POINT,
    Activation,
    DType,
    Graph,
    Op,
    OpType,
    QParams,
)
from edgekiln.ir import Tensor as IRTensor
from edgekiln.ir.transforms import remove_pruned_channels as _remove_pruned_channels
from edgekiln.pipeline.constraints import weight_quantizer
from edgekiln.pipeline.ops import Role, classify, unsupported, weighted_layer, where
from edgekiln.pipeline.prepare import ActivationQuant, FixedQuant, unrounded_bias
from edgekiln.pipeline.quant import NON_FINITE_WAY_OUT, FakeQuantizer, bias_steps

INT32_MAX = 2**31 - 1


class CaptureError(ValueError):
    """The prepared model cannot become an int8 graph; the message names the layer and why."""


def capture(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    *,
    remove_pruned_channels: bool = True,
) -> Graph:
    """The int8 graph of a model made by ``edgekiln.prepare`` and calibrated (or fine-tuned).

    ``example_inputs`` fixes shapes (only the first sample is used); by default the shapes
    given to ``prepare``. The model is read in eval mode and left in the mode it was in.
    ``remove_pruned_channels`` (default True) removes the channels channel pruning zeroed
    (exactly: see the module docstring); False keeps every channel.

    A model whose fake-quantization is off (the pruning phase of ``prune_then_qat``) is
    captured with a warning: its float forward is not what the int8 graph computes.
    """
    if not isinstance(model, fx.GraphModule) or not any(
        getattr(m, "_edgekiln_quant", False) for m in model.modules()
    ):
        raise CaptureError(
            f"capture needs a model made by edgekiln.prepare(model, example_inputs), got "
            f"{type(model).__name__}; prepare it, then train or calibrate it, then capture"
        )
    inputs = _example(model, example_inputs)
    modules = dict(model.named_modules())
    _check_observed(model, modules)
    _warn_if_fake_quant_off(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(model).propagate(*inputs)
        graph = _Capture(model, modules).run()
    finally:
        model.train(was_training)
    if remove_pruned_channels:
        graph, _ = _remove_pruned_channels(graph)
    return graph


def _warn_if_fake_quant_off(model: nn.Module) -> None:
    off = [
        name
        for name, m in model.named_modules()
        if hasattr(m, "enabled") and hasattr(m, "enable") and not bool(m.enabled)
    ]
    if off:
        warnings.warn(
            f"capturing with fake-quantization off in {len(off)} quantizers (e.g. {off[0]!r}): "
            "the model's float outputs are not what the int8 graph computes. In "
            "sparsity_mode='prune_then_qat' call start_qat(model) and fine-tune before capture",
            stacklevel=3,
        )


def _example(model: fx.GraphModule, example_inputs: Any) -> tuple[Tensor, ...]:
    if example_inputs is None:
        shapes = getattr(model, "meta_input_shapes", None)
        if not shapes:
            raise CaptureError("capture needs example_inputs for a model without input shapes")
        return tuple(torch.zeros(1, *shape) for shape in shapes)
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    return tuple(x[:1].detach().float() for x in example_inputs)


def _check_observed(model: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Every quantizer observed, with a finite range and a usable scale, before ShapeProp.

    ShapeProp runs the model's forward, which divides by every activation scale; a quantizer
    that never observed data, or observed NaN or inf, is named here by its layer instead.
    """
    points: list[tuple[str, FakeQuantizer]] = []  # (what it quantizes, quantizer), graph order
    activations: list[tuple[str, str, FakeQuantizer]] = []  # (its layer, what, quantizer)
    for node in model.graph.nodes:
        info = classify(node, modules)
        if info.role == Role.QUANT and isinstance(info.module, ActivationQuant):
            quantizer = info.module.quantizer
            if all(quantizer is not q for *_, q in activations):  # one point per shared quantizer
                what = f"the output of {_site(node)} (quantizer {node.target!r})"
                activations.append((_site(node), what, quantizer))
                points.append((what, quantizer))
        if info.role == Role.WEIGHTED:
            weight = weight_quantizer(weighted_layer(node, info))
            if weight is None:
                raise CaptureError(
                    f"{where(node)} has no FakeQuant on its weight; edgekiln.prepare adds one "
                    "(a recipe cannot turn weight quantization off)"
                )
            points.append((f"the weight of {where(node)}", weight))

    # A NaN or inf range first: calibrating again cannot mend it (min and max keep it).
    for what, quantizer in points:
        if quantizer.observed and not quantizer.observer.range_is_finite:
            raise CaptureError(
                f"{what} has a non-finite observed range {quantizer.observer.describe_range()}, "
                f"so no scale. {NON_FINITE_WAY_OUT}"
            )

    unobserved = [site for site, _, quantizer in activations if not quantizer.observed]
    if unobserved:
        shown = "; ".join(unobserved[:3])  # a site may hold commas (its source line)
        more = f"; and {len(unobserved) - 3} more" if len(unobserved) > 3 else ""
        raise CaptureError(
            f"{len(unobserved)} of the model's {len(activations)} activation quantizers never "
            f"observed data, so they have no scale, at the output of: {shown}{more}. Pass "
            "calibration data through the model in training mode (edgekiln.calibrate(model, x), "
            "or model.train(); model(x)) or fine-tune it before capture"
        )
    for what, quantizer in points:
        if not quantizer.observed:  # a weight's (every activation's was observed)
            raise CaptureError(
                f"{what} was never observed: run one training forward (model.train(); model(x)) "
                "before capture"
            )

    for _, what, quantizer in activations:
        scale = float(quantizer.qparams()[0])  # float32, shape ()
        if not 0 < scale < math.inf:  # the range is finite, so the scale floor made it
            raise CaptureError(
                f"{what} has scale {scale:.6g} from its scale floor "
                f"{float(quantizer.scale_floor):.6g} (its observed range "
                f"{quantizer.observer.describe_range()} is finite): a layer feeding it has a "
                f"non-finite scale. {NON_FINITE_WAY_OUT}"
            )


def _site(quant_node: fx.Node) -> str:
    """Where the value an activation quantizer point reads is made: its layer, or the input."""
    source = quant_node.args[0] if isinstance(quant_node.args[0], fx.Node) else quant_node
    return where(source)


class _Capture:
    """One walk over the prepared graph, node by node, building the int8 graph."""

    def __init__(self, model: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.tensors: dict[str, IRTensor] = {}
        self.ops: list[Op] = []
        self.value: dict[fx.Node, str] = {}  # fx node -> IR tensor name
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.quant_nodes: dict[str, str] = {}  # IR tensor -> fx node whose output it is

    def run(self) -> Graph:
        for node in self.model.graph.nodes:
            info = classify(node, self.modules)
            handler = getattr(self, f"_{info.role.value}")
            handler(node, info.module)
        for name, tensor in self.tensors.items():
            if tensor.quant is None:
                raise CaptureError(f"tensor {name!r} was never given a scale (an edgekiln bug)")
        graph = Graph(
            self.tensors,
            self.ops,
            self.inputs,
            self.outputs,
            name=type(self.model).__name__,
            metadata={"fx_nodes": self.quant_nodes},
        )
        graph.validate()
        return graph

    # ---- helpers ---------------------------------------------------------------------------

    def _shape_of(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise unsupported(node, "an op with a non-tensor output")
        return (1, *tuple(int(d) for d in meta.shape[1:]))

    def _new(self, node: fx.Node, quant: QParams | None = None) -> str:
        name = node.name
        self.tensors[name] = IRTensor(name, self._shape_of(node), DType.INT8, quant)
        self.value[node] = name
        return name

    def _op(
        self,
        kind: OpType,
        node: fx.Node,
        inputs: list[str],
        attrs: dict[str, Any],
        quant: QParams | None = None,
    ) -> None:
        out = self._new(node, quant)
        label = str(node.target) if node.op == "call_module" else node.name
        self.ops.append(Op(kind, inputs, [out], attrs, name=label))

    def _arg(self, node: fx.Node, i: int = 0) -> str:
        arg = node.args[i] if len(node.args) > i else None
        if not isinstance(arg, fx.Node):
            raise unsupported(node, f"an op whose argument {i} is {arg!r}, not a tensor")
        return self.value[arg]

    def _quant_of(self, name: str) -> QParams:
        quant = self.tensors[name].quant
        if quant is None:
            raise CaptureError(f"tensor {name!r} is read before its scale is known")
        return quant

    def _producer(self, name: str) -> Op | None:
        return next((op for op in reversed(self.ops) if name in op.outputs), None)

    def _normalized(self, node: fx.Node) -> dict[str, Any]:
        args = node.normalized_arguments(self.model, normalize_to_only_use_kwargs=True)
        return dict(args.kwargs) if args is not None else {}

    # ---- one method per role ---------------------------------------------------------------

    def _input(self, node: fx.Node, module: nn.Module | None) -> None:
        self.inputs.append(self._new(node))

    def _output(self, node: fx.Node, module: nn.Module | None) -> None:
        results = node.args[0]
        results = results if isinstance(results, tuple | list) else (results,)
        for r in results:
            if not isinstance(r, fx.Node):
                raise unsupported(node, "a model output that is not a tensor")
            self.outputs.append(self.value[r])

    def _quant(self, node: fx.Node, module: nn.Module | None) -> None:
        name = self._arg(node)
        if not isinstance(module, ActivationQuant | FixedQuant):
            raise CaptureError(f"{where(node)} is not an edgekiln quantizer (an edgekiln bug)")
        scale, zero_point = module.qparams()
        quant = QParams.per_tensor(float(scale), int(zero_point))
        tensor = self.tensors[name]
        if tensor.quant is None:
            tensor.quant = quant
        elif not tensor.quant.equals(quant):
            raise CaptureError(f"tensor {name!r} has two different scales (an edgekiln bug)")
        self.value[node] = name
        self.quant_nodes[name] = node.name

    def _weighted(self, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        s_in = self._quant_of(x).scale  # (1,) float32
        layer = str(node.target)
        layer_module = weighted_layer(node, classify(node, self.modules))
        quantizer = weight_quantizer(layer_module)
        if quantizer is None:
            raise CaptureError(f"{where(node)} has no FakeQuant on its weight (an edgekiln bug)")
        for pname, param in layer_module.named_parameters():
            if not bool(torch.isfinite(param).all()):
                what = "weight" if "weight" in pname else pname
                raise CaptureError(f"layer {layer!r} has a non-finite {what}: refusing to export")
        with torch.no_grad():
            w = layer_module.weight.detach().float()
            scale, _ = quantizer.qparams()
            scale = scale.reshape(-1).expand(w.shape[0]).float()  # (C_out,) float32
            bias = unrounded_bias(layer_module)  # what training rounds (BiasQuant), masks on
            b = bias.detach().float() if bias is not None else torch.zeros(w.shape[0])
        w_np, s_w = w.numpy(), scale.numpy().astype(np.float32)
        for what, arr in (("weight", w_np), ("weight scale", s_w), ("bias", b.numpy())):
            if not np.all(np.isfinite(arr)):
                raise CaptureError(f"layer {layer!r} has a non-finite {what}: refusing to export")
        # The weight scales are the trained ones, floored by prepare so that each bias fits.
        w_q = QParams.per_channel(s_w, axis=0)
        w_int = w_q.quantize(w_np)  # (C_out, C_in / g, *k) int8
        # The rounding training applies (BiasQuant): round(b / (s_in * s_w)) half to even.
        steps, b_scale_t = bias_steps(b, torch.tensor(s_in), torch.tensor(s_w))
        b_scale = b_scale_t.numpy()  # (C_out,) float32
        b_int = steps.numpy()  # (C_out,) float64 integers
        if np.abs(b_int).max(initial=0) > INT32_MAX:
            c = int(np.abs(b_int).argmax())
            raise CaptureError(
                f"layer {layer!r}: a bias does not fit int32 at scale input x weight scale: "
                f"output channel {c} has bias {float(b[c]):.6g}, {abs(b_int[c]):.4g} steps of "
                f"{float(s_in[0]):.6g} x {float(s_w[c]):.6g}, over int32's {INT32_MAX}. prepare "
                "floors each weight scale so that a bias spans at most 2**30 steps, and training "
                "forwards set that floor: calibrate again (edgekiln.calibrate(model, x)) with the "
                "weight quantizers unfrozen (FakeQuantizer.unfreeze(), or a larger recipe "
                "freeze_observers_after), then capture. This happens to a checkpoint saved "
                "before weight floors, or a bias that grew after its floor froze"
            )
        w_name, b_name = f"{layer}.weight", f"{layer}.bias"
        self.tensors[w_name] = IRTensor(w_name, w_int.shape, DType.INT8, w_q, w_int)
        b_data = b_int.astype(np.int32)
        self.tensors[b_name] = IRTensor(
            b_name, b_data.shape, DType.INT32, QParams.per_channel(b_scale), b_data
        )
        if isinstance(layer_module, nn.Linear):
            if len(self.tensors[x].shape) != 2:
                raise unsupported(
                    node,
                    f"Linear on a {len(self.tensors[x].shape)}-D input",
                    hint="flatten to (N, features) before the Linear",
                )
            self._op(OpType.LINEAR, node, [x, w_name, b_name], {"activation": Activation.NONE})
            return
        self._op(OpType.CONV, node, [x, w_name, b_name], _conv_attrs(layer_module))

    def _activation(self, node: fx.Node, module: nn.Module | None) -> None:
        name = self._arg(node)
        op = self._producer(name)
        if op is None or "activation" not in op.attrs:
            raise unsupported(node, "an activation that is not fused")
        relu6 = isinstance(module, nn.ReLU6) or getattr(node.target, "__name__", "") == "relu6"
        op.attrs["activation"] = Activation.RELU6 if relu6 else Activation.RELU
        self.value[node] = name

    def _add(self, node: fx.Node, module: nn.Module | None) -> None:
        a, b = self._arg(node, 0), self._arg(node, 1)
        if self.tensors[a].shape != self.tensors[b].shape:
            raise unsupported(
                node,
                f"add with broadcasting {self.tensors[a].shape} + {self.tensors[b].shape}",
                hint="add tensors of one shape",
            )
        self._op(OpType.ADD, node, [a, b], {"activation": Activation.NONE})

    def _max_pool(self, node: fx.Node, module: nn.Module | None) -> None:
        self._pool(OpType.MAX_POOL, node, module)

    def _avg_pool(self, node: fx.Node, module: nn.Module | None) -> None:
        self._pool(OpType.AVG_POOL, node, module)

    def _pool(self, kind: OpType, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        nsp = len(self.tensors[x].shape) - 2
        p = vars(module) if module is not None else self._normalized(node)
        if p.get("ceil_mode") or (kind == OpType.AVG_POOL and p.get("divisor_override")):
            raise unsupported(node, f"{kind.value} with ceil_mode or divisor_override")
        kernel = _tuple(p["kernel_size"], nsp)
        stride = _tuple(p.get("stride") or p["kernel_size"], nsp)
        pads = _tuple(p.get("padding", 0), nsp)
        if kind == OpType.AVG_POOL and any(pads) and p.get("count_include_pad", True):
            raise unsupported(
                node, "avg pool with padding counted", hint="set count_include_pad=False"
            )
        attrs = {"kernel": kernel, "stride": stride, "padding": tuple((q, q) for q in pads)}
        self._op(kind, node, [x], attrs, self._quant_of(x))

    def _mean(self, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        ndim = len(self.tensors[x].shape)
        spatial = tuple(range(2, ndim))
        if module is not None or node.target in (
            torch.nn.functional.adaptive_avg_pool1d,
            torch.nn.functional.adaptive_avg_pool2d,
        ):
            if module is None and _tuple(node.args[1], ndim - 2) != (1,) * (ndim - 2):
                raise unsupported(node, "adaptive average pooling to a size other than 1")
            axes, keepdims = spatial, True
        else:
            p = dict(node.kwargs)
            dims = _ints(node, p.get("dim", node.args[1] if len(node.args) > 1 else None))
            keepdims = bool(p.get("keepdim", node.args[2] if len(node.args) > 2 else False))
            axes = tuple(sorted(d % ndim for d in dims))
            if axes != spatial:
                raise unsupported(
                    node,
                    f"mean over axes {axes}",
                    hint=f"average over the spatial axes {spatial} only",
                )
        self._op(OpType.MEAN, node, [x], {"axes": axes, "keepdims": keepdims}, self._quant_of(x))

    def _reshape(self, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        shape = self._shape_of(node)
        self._op(OpType.RESHAPE, node, [x], {"shape": shape}, self._quant_of(x))

    def _concat(self, node: fx.Node, module: nn.Module | None) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        if not isinstance(tensors, list | tuple) or not all(
            isinstance(t, fx.Node) for t in tensors
        ):
            raise unsupported(node, "concatenation of something other than a list of tensors")
        names = [self.value[t] for t in tensors if isinstance(t, fx.Node)]
        (dim,) = _ints(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
        axis = dim % len(self.tensors[names[0]].shape)
        if axis == 0:
            raise unsupported(node, "concatenation along the batch axis")
        self._op(OpType.CONCAT, node, names, {"axis": axis}, self._quant_of(names[0]))

    def _softmax(self, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        shape = self.tensors[x].shape
        if isinstance(module, nn.Softmax):
            dim = module.dim
        else:
            given = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dim = _ints(node, given)[0] if given is not None else None
        if len(shape) != 2 or dim is None or dim % 2 != 1:
            raise unsupported(
                node,
                f"softmax over dim {dim} of a {len(shape)}-D tensor",
                hint="apply softmax to (N, classes) over dim=1",
            )
        fixed = QParams.per_tensor(SOFTMAX_OUTPUT_SCALE, SOFTMAX_OUTPUT_ZERO_POINT)
        self._op(OpType.SOFTMAX, node, [x], {"beta": 1.0}, fixed)

    def _pad(self, node: fx.Node, module: nn.Module | None) -> None:
        x = self._arg(node)
        ndim = len(self.tensors[x].shape)
        if isinstance(module, nn.ConstantPad1d | nn.ConstantPad2d | nn.ZeroPad2d):
            given = module.padding  # (left, right, top, bottom): last axis first
        else:
            p = self._normalized(node)
            if p.get("mode", "constant") != "constant" or (p.get("value") or 0) != 0:
                raise unsupported(node, "padding that is not zero padding")
            given = p["pad"]
        flat = _ints(node, given)
        flat = flat if isinstance(given, tuple | list) else flat * (2 * (ndim - 2))
        pairs = [(0, 0)] * ndim
        for i in range(len(flat) // 2):
            pairs[ndim - 1 - i] = (int(flat[2 * i]), int(flat[2 * i + 1]))
        if pairs[0] != (0, 0) or pairs[1] != (0, 0) or any(p < 0 for pr in pairs for p in pr):
            raise unsupported(node, "padding of the batch or channel axes, or negative padding")
        self._op(OpType.PAD, node, [x], {"padding": tuple(pairs)}, self._quant_of(x))

    def _identity(self, node: fx.Node, module: nn.Module | None) -> None:
        self.value[node] = self._arg(node)

    def _shape(self, node: fx.Node, module: nn.Module | None) -> None:
        """Shape arithmetic (x.size(0)) makes no tensor."""

    def _batch_norm(self, node: fx.Node, module: nn.Module | None) -> None:
        raise unsupported(node, "BatchNorm left in a prepared model")


def _conv_attrs(module: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    nsp = module.weight.dim() - 2
    kernel = tuple(module.kernel_size)
    stride = _tuple(module.stride, nsp)
    dilation = _tuple(module.dilation, nsp)
    padding = module.padding
    if padding == "valid":
        pads = ((0, 0),) * nsp
    elif padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in _tuple(padding, nsp))
    return {
        "stride": stride,
        "padding": pads,
        "dilation": dilation,
        "groups": int(module.groups),
        "activation": Activation.NONE,
    }


def _ints(node: fx.Node, value: object) -> tuple[int, ...]:
    """An fx argument that must be an int or a sequence of ints, as a tuple (None: empty)."""
    if value is None:
        return ()
    values = value if isinstance(value, list | tuple) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise unsupported(node, f"an op with argument {value!r} where ints were expected")
    return tuple(int(v) for v in values)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values
