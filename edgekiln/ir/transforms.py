"""Graph transforms that make pruning pay off in the artifact (numpy only).

:func:`remove_pruned_channels` deletes the channels that a channel-pruned model computes as
exact zeros: the producer loses those output filters (weights, bias, per-channel scales), and
every consumer loses the matching input channels, so the written file is smaller and does fewer
MACs. The removal is exact, not an approximation: a removed channel holds the quantized 0.0 (its
zero point) at every position, so the integer kernels accumulate ``(q - zero_point) * w = 0`` for
it, and every remaining value, scale and zero point stays as it was.

Which channels are proven zero, op by op (``z`` marks a channel that is exactly 0.0):

- CONV / LINEAR: output channel ``o`` is zero when its int32 bias is 0 and every int8 weight of
  ``o`` that reads a non-zero input channel is 0 (so a zero input can make a filter dead). Fused
  ReLU / ReLU6 keep 0.0 at 0.0. A depthwise conv whose input channel is zero outputs its bias:
  that output channel is zero only when the bias is 0 too.
- ADD: zero where both inputs are zero.
- MAX_POOL, AVG_POOL, MEAN (over spatial axes), PAD (pads with 0.0): the input's zero channels.
- CONCAT along channels: each input's zero channels at its offset.
- RESHAPE that flattens ``(N, C, *S)`` to ``(N, C * prod(S))``: channel ``c`` becomes the block
  of features ``c * prod(S) ... (c + 1) * prod(S) - 1``.

A zero channel is removed only where every op touching it can lose it; otherwise it stays (and
is counted in :attr:`ChannelRemoval.kept_zero`, with the reason in ``notes``):

- graph inputs and outputs keep every channel (their shape is the model's interface);
- ADD, pools, MEAN, PAD and depthwise convs tie a channel of their input to the same channel
  of their output (a residual add loses channel ``c`` only if both branches and the sum lose
  it); CONCAT ties each input to its slice of the output; a flatten ties channel ``c`` to its
  whole block of features;
- grouped convs (1 < groups, not depthwise), depthwise convs with a channel multiplier > 1,
  SOFTMAX, reshapes other than a flatten, and weights shared by two ops refuse: the channels
  they touch stay;
- a tensor never loses all of its channels (one stays, so no shape becomes 0).

``edgekiln.capture`` calls it by default (``capture(..., remove_pruned_channels=True)``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekiln.ir.graph import Graph, GraphError, Op, OpType, QParams, Tensor

__all__ = ["ChannelRemoval", "remove_pruned_channels"]

_ELEMENTWISE = frozenset({OpType.MAX_POOL, OpType.AVG_POOL, OpType.PAD})


@dataclass
class ChannelRemoval:
    """What :func:`remove_pruned_channels` did.

    Attributes:
        removed: Activation tensor -> indices (original numbering, along axis 1) it lost.
        kept_zero: Activation tensor -> how many proven-zero channels it had to keep.
        layers: Op name -> ``{"out_before", "out_after", "in_before", "in_after"}`` for every
            CONV / LINEAR whose kernel shrank.
        notes: Why zero channels were kept (one line per reason).
    """

    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept_zero: dict[str, int] = field(default_factory=dict)
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def channels_removed(self) -> int:
        """Output channels removed from CONV / LINEAR ops, summed over the graph."""
        return sum(v["out_before"] - v["out_after"] for v in self.layers.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists instead of tuples).

        >>> ChannelRemoval(removed={"x": (1, 2)}).as_dict()["removed"]
        {'x': [1, 2]}
        """
        return {
            "removed": {k: list(v) for k, v in self.removed.items()},
            "kept_zero": dict(self.kept_zero),
            "layers": {k: dict(v) for k, v in self.layers.items()},
            "channels_removed": self.channels_removed,
            "notes": list(self.notes),
        }


def remove_pruned_channels(graph: Graph) -> tuple[Graph, ChannelRemoval]:
    """A copy of ``graph`` without the channels it provably computes as 0.0, and a record.

    ``graph`` itself is left unchanged. The result computes bit for bit what ``graph`` computes
    on every remaining channel (see the module docstring for the proof rules and refusals); a
    graph with no provably-zero channel comes back as an equal copy.

    Raises:
        GraphError: ``graph`` breaks a graph rule (it is validated first).

    >>> import numpy as np
    >>> from edgekiln.ir import Activation, DType, Graph, Op, OpType, QParams, Tensor
    >>> q = QParams.per_tensor(0.1, 0)
    >>> w = np.array([[1, 2], [0, 0], [3, 0]], dtype=np.int8)  # (C_out=3, C_in=2): row 1 dead
    >>> w2 = np.array([[5, 6, 7]], dtype=np.int8)
    >>> t = {
    ...     "x": Tensor("x", (1, 2), DType.INT8, q),
    ...     "w": Tensor("w", (3, 2), DType.INT8, QParams.per_channel(np.ones(3)), w),
    ...     "b": Tensor("b", (3,), DType.INT32, QParams.per_channel(np.full(3, 0.1)),
    ...                 np.array([4, 0, 1], dtype=np.int32)),
    ...     "h": Tensor("h", (1, 3), DType.INT8, q),
    ...     "w2": Tensor("w2", (1, 3), DType.INT8, QParams.per_channel(np.ones(1)), w2),
    ...     "b2": Tensor("b2", (1,), DType.INT32, QParams.per_channel(np.full(1, 0.1)),
    ...                  np.zeros(1, dtype=np.int32)),
    ...     "y": Tensor("y", (1, 1), DType.INT8, q),
    ... }
    >>> relu = {"activation": Activation.RELU}
    >>> g = Graph(t, [Op(OpType.LINEAR, ["x", "w", "b"], ["h"], relu, "fc1"),
    ...               Op(OpType.LINEAR, ["h", "w2", "b2"], ["y"], relu, "fc2")], ["x"], ["y"])
    >>> small, removal = remove_pruned_channels(g)
    >>> removal.removed, small.tensor("w2").data.tolist(), removal.layers["fc1"]["out_after"]
    ({'h': (1,)}, [[5, 7]], 2)
    """
    graph.validate()
    zero = _zero_channels(graph)
    keep_zero, notes = _removable(graph, zero)
    removal = ChannelRemoval(notes=notes)
    for name, z in zero.items():
        removable = keep_zero[name]
        if removable.any():
            removal.removed[name] = tuple(int(i) for i in np.flatnonzero(removable))
        kept = int(z.sum() - removable.sum())
        if kept:
            removal.kept_zero[name] = kept
    keep = {name: ~r for name, r in keep_zero.items()}
    return _apply(graph, keep, removal), removal


# 1. Which channels are exactly zero ------------------------------------------------------------


def _channels(tensor: Tensor) -> int:
    return int(tensor.shape[1]) if len(tensor.shape) >= 2 else 0


def _weighted_zero(graph: Graph, op: Op, x_zero: np.ndarray) -> np.ndarray:
    """Output channels of a CONV / LINEAR that are 0.0 whatever the non-zero inputs hold."""
    w, b = _constants(graph, op)
    c_out, c_in_group = w.shape[0], w.shape[1]
    groups = int(op.attrs.get("groups", 1))
    per_group = c_out // groups
    # input channel read by weight (o, i): (o // per_group) * c_in_group + i
    index = (np.arange(c_out) // per_group)[:, None] * c_in_group + np.arange(c_in_group)[None]
    live = (w != 0).reshape(c_out, c_in_group, -1).any(axis=2) & ~x_zero[index]  # (O, I)
    return ~live.any(axis=1) & (b == 0)


def _constants(graph: Graph, op: Op) -> tuple[np.ndarray, np.ndarray]:
    """The int8 weight and int32 bias data of a CONV / LINEAR."""
    w, b = graph.tensor(op.inputs[1]), graph.tensor(op.inputs[2])
    if w.data is None or b.data is None:
        raise GraphError(
            f"{op.type.value} op {op.name!r}: remove_pruned_channels needs constant weights and "
            f"bias, but {w.name!r} or {b.name!r} is an activation; capture the model again"
        )
    return w.data, b.data


def _flatten_block(graph: Graph, op: Op) -> int | None:
    """``prod(spatial)`` when ``op`` flattens (N, C, *S) to (N, C * prod(S)), else None."""
    x = graph.tensor(op.inputs[0]).shape
    y = graph.tensor(op.outputs[0]).shape
    if len(y) == 2 and len(x) >= 2 and y[1] == int(np.prod(x[1:])):
        return int(np.prod(x[2:], dtype=np.int64))
    return None


def _keeps_channels(graph: Graph, op: Op) -> bool:
    """True for a RESHAPE that keeps axis 1 and only regroups the spatial axes."""
    x = graph.tensor(op.inputs[0]).shape
    y = graph.tensor(op.outputs[0]).shape
    return len(x) >= 2 and len(y) >= 2 and x[1] == y[1]


def _zero_channels(graph: Graph) -> dict[str, np.ndarray]:
    """Activation tensor -> bool (C,): channel proven to hold 0.0 everywhere."""
    zero = {n: np.zeros(_channels(graph.tensor(n)), dtype=bool) for n in graph.inputs}
    for op in graph.ops:
        out = op.outputs[0]
        size = _channels(graph.tensor(out))
        # the graph is validated and topologically sorted: every activation input is known
        xs = [zero[n] for n in op.inputs if not graph.tensor(n).is_constant]
        z = np.zeros(size, dtype=bool)
        if op.type in (OpType.CONV, OpType.LINEAR):
            z = _weighted_zero(graph, op, xs[0])
        elif op.type == OpType.ADD:
            z = xs[0] & xs[1]
        elif op.type in _ELEMENTWISE:
            z = xs[0].copy()
        elif op.type == OpType.MEAN and 1 not in op.attrs["axes"]:
            z = xs[0].copy()
        elif op.type == OpType.CONCAT:
            z = np.concatenate(xs) if op.attrs["axis"] == 1 else np.logical_and.reduce(xs)
        elif op.type == OpType.RESHAPE:
            block = _flatten_block(graph, op)
            if block is not None:
                z = np.repeat(xs[0], block)
            elif _keeps_channels(graph, op):
                z = xs[0].copy()
        zero[out] = z
    return zero


# 2. Which of them every op touching them can lose -----------------------------------------------


def _is_depthwise(graph: Graph, op: Op) -> bool:
    w = graph.tensor(op.inputs[1])
    c_in = _channels(graph.tensor(op.inputs[0]))
    groups = int(op.attrs["groups"])
    return groups > 1 and groups == c_in and w.shape[0] == c_in and w.shape[1] == 1


def _removable(graph: Graph, zero: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list]:
    """Shrink the zero sets until every op agrees; return them and the reasons for pins."""
    rem = {name: z.copy() for name, z in zero.items()}
    notes: list[str] = []

    def pin(name: str, why: str) -> None:
        if rem[name].any():
            notes.append(f"{name!r}: {int(rem[name].sum())} zero channels kept: {why}")
        rem[name][:] = False

    for name in graph.inputs + graph.outputs:
        pin(name, "graph input or output")
    weight_uses: dict[str, int] = {}
    for op in graph.ops:
        if op.type in (OpType.CONV, OpType.LINEAR):
            weight_uses[op.inputs[1]] = weight_uses.get(op.inputs[1], 0) + 1
    for op in graph.ops:
        acts = [n for n in op.inputs if not graph.tensor(n).is_constant] + op.outputs
        where = f"{op.type.value} op {op.name!r}"
        if op.type in (OpType.CONV, OpType.LINEAR):
            if weight_uses[op.inputs[1]] > 1:
                for n in acts:
                    pin(n, f"{where} shares its weight {op.inputs[1]!r} with another op")
            elif op.type == OpType.CONV and op.attrs["groups"] > 1 and not _is_depthwise(graph, op):
                for n in acts:
                    pin(n, f"{where} is a grouped conv (groups={op.attrs['groups']})")
        elif op.type == OpType.SOFTMAX:
            for n in acts:
                pin(n, f"{where} is a softmax")
        elif op.type == OpType.MEAN and 1 in op.attrs["axes"]:
            for n in acts:
                pin(n, f"{where} averages over channels")
        elif op.type == OpType.RESHAPE:
            if _flatten_block(graph, op) is None and not _keeps_channels(graph, op):
                for n in acts:
                    pin(n, f"{where} is a reshape other than a flatten")

    changed = True
    while changed:
        changed = False
        for op in graph.ops:
            changed |= _tie(graph, op, rem)
        for r in rem.values():
            if r.size and r.all():
                r[0] = False  # a tensor keeps at least one channel
                changed = True
    return rem, notes


def _tie(graph: Graph, op: Op, rem: dict[str, np.ndarray]) -> bool:
    """Make ``op``'s tied channels agree (a channel goes only if it goes everywhere)."""
    ins = [n for n in op.inputs if not graph.tensor(n).is_constant]
    out = op.outputs[0]
    before = [rem[n].copy() for n in [*ins, out]]
    same_channels = op.type in (OpType.ADD, *_ELEMENTWISE) or (
        op.type == OpType.MEAN and 1 not in op.attrs["axes"]
    )
    if op.type == OpType.CONV and _is_depthwise(graph, op):
        same_channels = True
    if op.type == OpType.RESHAPE and _keeps_channels(graph, op):
        same_channels = True
    if op.type == OpType.CONCAT and op.attrs["axis"] != 1:
        same_channels = True
    if same_channels:
        both = np.logical_and.reduce([rem[n] for n in [*ins, out]])
        for n in [*ins, out]:
            rem[n] &= both
    elif op.type == OpType.CONCAT:
        start = 0
        for n in ins:
            stop = start + rem[n].size
            both = rem[n] & rem[out][start:stop]
            rem[n] &= both
            rem[out][start:stop] &= both
            start = stop
    elif op.type == OpType.RESHAPE:
        block = _flatten_block(graph, op)
        if block is not None:
            whole = rem[ins[0]] & rem[out].reshape(-1, block).all(axis=1)
            rem[ins[0]] &= whole
            rem[out] &= np.repeat(whole, block)
    after = [rem[n] for n in [*ins, out]]
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


# 3. Cut them out -------------------------------------------------------------------------------


def _slice_quant(quant: QParams | None, keep: np.ndarray) -> QParams | None:
    if quant is None or quant.axis is None:
        return quant
    return QParams(quant.scale[keep], quant.zero_point[keep], quant.axis)


def _apply(graph: Graph, keep: dict[str, np.ndarray], removal: ChannelRemoval) -> Graph:
    tensors = {name: copy.copy(t) for name, t in graph.tensors.items()}
    for name, k in keep.items():
        if k.size and not k.all():
            t = tensors[name]
            t.shape = (t.shape[0], int(k.sum()), *t.shape[2:])
    ops = []
    for op in graph.ops:
        new = Op(op.type, list(op.inputs), list(op.outputs), dict(op.attrs), op.name)
        if op.type in (OpType.CONV, OpType.LINEAR):
            _shrink_weighted(graph, new, tensors, keep, removal)
        elif op.type == OpType.RESHAPE:
            new.attrs["shape"] = tensors[op.outputs[0]].shape
        ops.append(new)
    metadata = dict(graph.metadata)
    if removal.removed:
        metadata["channel_removal"] = removal.as_dict()
    result = Graph(tensors, ops, list(graph.inputs), list(graph.outputs), graph.name, metadata)
    try:
        result.validate()
    except GraphError as e:  # a rule above is wrong: say so rather than write a broken file
        raise GraphError(f"remove_pruned_channels produced an invalid graph (a bug): {e}") from e
    return result


def _shrink_weighted(
    graph: Graph,
    op: Op,
    tensors: dict[str, Tensor],
    keep: dict[str, np.ndarray],
    removal: ChannelRemoval,
) -> None:
    x, w_name, b_name = op.inputs
    keep_out, keep_in = keep[op.outputs[0]], keep[x]
    if keep_out.all() and keep_in.all():
        return
    w, b = graph.tensor(w_name), graph.tensor(b_name)
    w_data, b_data = _constants(graph, op)
    depthwise = op.type == OpType.CONV and _is_depthwise(graph, op)
    data = w_data[keep_out]
    if not depthwise:
        data = data[:, keep_in]
    tensors[w_name] = Tensor(w_name, data.shape, w.dtype, _slice_quant(w.quant, keep_out), data)
    b_data = b_data[keep_out]
    tensors[b_name] = Tensor(b_name, b_data.shape, b.dtype, _slice_quant(b.quant, keep_out), b_data)
    if depthwise:
        op.attrs["groups"] = int(keep_out.sum())
    removal.layers[op.name or op.outputs[0]] = {
        "out_before": int(w.shape[0]),
        "out_after": int(data.shape[0]),
        "in_before": int(keep_in.size),
        "in_after": int(keep_in.sum()),
    }
