"""remove_pruned_channels on hand-built graphs: what it proves zero, what it removes, what it
refuses, and that every remaining value is bit for bit what the dense graph computes."""

import numpy as np
import pytest

from edgekiln.ir import GraphError, OpType
from edgekiln.ir.builder import GraphBuilder
from edgekiln.ir.reference import run_reference
from edgekiln.ir.transforms import remove_pruned_channels

RNG = np.random.default_rng(0)
X = RNG.normal(0, 1, (16, 4, 6, 6)).astype(np.float32)


def _conv(b: GraphBuilder, x: str, c_in: int, c_out: int, dead: list[int], **kw) -> str:
    """A 3x3 conv (or depthwise, with groups=) whose filters ``dead`` are zero with zero bias."""
    groups = kw.get("groups", 1)
    w = RNG.normal(0, 0.3, (c_out, c_in // groups, 3, 3)).astype(np.float32)
    bias = RNG.normal(0, 0.1, c_out).astype(np.float32)
    w[dead], bias[dead] = 0.0, 0.0
    return b.conv(x, c_out, 3, padding=1, weight=w, bias=bias, **kw)


def _same_outputs(dense, small) -> None:
    q = dense.tensor(dense.inputs[0]).quant.quantize(X)
    a, b = run_reference(dense, q), run_reference(small, q)
    for name in dense.outputs:
        assert np.array_equal(a[name], b[name]), name


def test_residual_add_concat_pool_flatten():
    b = GraphBuilder(X, seed=1)
    stem = _conv(b, b.input, 4, 8, [1, 2, 5], activation="relu")
    branch = _conv(b, stem, 8, 8, [1, 2, 6], activation="relu")
    added = b.add(stem, branch, activation="relu")  # zero where both are: 1, 2
    pooled = b.max_pool(added, 2)
    cat = b.concat([pooled, b.max_pool(pooled, 1)])  # zero: 1, 2 and 8 + 1, 8 + 2
    y = b.linear(b.flatten(b.avg_pool(cat, 3)), 3)
    dense = b.build([y])

    small, removal = remove_pruned_channels(dense)

    assert removal.removed[added] == (1, 2)
    assert removal.removed[cat] == (1, 2, 9, 10)
    assert removal.kept_zero[stem] == 1 and removal.kept_zero[branch] == 1  # 5 and 6: not shared
    assert small.tensor(cat).shape == (1, 12, 3, 3)
    fc = next(op for op in small.ops if op.type == OpType.LINEAR)
    assert small.tensor(fc.inputs[1]).shape == (3, 12)  # flattened (12, 1, 1): 12 columns
    _same_outputs(dense, small)
    assert small.metadata["channel_removal"]["removed"][added] == [1, 2]
    assert dense.tensor(cat).shape == (1, 16, 3, 3)  # the input graph is left alone


def test_flatten_block_and_per_channel_scales_follow():
    b = GraphBuilder(X, seed=2)
    h = _conv(b, b.input, 4, 6, [0, 3], activation="relu")
    flat = b.flatten(h)  # (1, 6 * 36)
    y = b.linear(flat, 5)
    dense = b.build([y])
    small, removal = remove_pruned_channels(dense)
    conv = small.ops[0]
    w_dense, w_small = dense.tensor(dense.ops[0].inputs[1]), small.tensor(conv.inputs[1])
    keep = [1, 2, 4, 5]
    assert np.array_equal(w_small.quant.scale, w_dense.quant.scale[keep])
    assert np.array_equal(
        small.tensor(conv.inputs[2]).data, dense.tensor(conv.inputs[2]).data[keep]
    )
    assert removal.removed[flat] == tuple(range(0, 36)) + tuple(range(108, 144))
    assert small.ops[1].attrs["shape"] == (1, 4 * 36)
    _same_outputs(dense, small)


def test_a_dead_filter_downstream_of_removed_inputs_is_zero_too():
    b = GraphBuilder(X, seed=3)
    h = _conv(b, b.input, 4, 4, [0, 1], activation="relu")
    w = RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w[2, 2:] = 0.0  # filter 2 reads only channels 0 and 1, which are zero
    bias = np.array([0.1, -0.1, 0.0, 0.2], dtype=np.float32)
    g = b.conv(h, 4, 3, padding=1, weight=w, bias=bias, activation="relu")
    y = b.linear(b.mean(g), 2)
    dense = b.build([y])
    small, removal = remove_pruned_channels(dense)
    assert removal.removed[g] == (2,)
    _same_outputs(dense, small)


def test_depthwise_keeps_a_channel_whose_bias_is_not_zero():
    b = GraphBuilder(X, seed=4)
    h = _conv(b, b.input, 4, 4, [0, 1], activation="relu")
    w = RNG.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)
    bias = np.array([0.0, 0.5, 0.1, 0.1], dtype=np.float32)  # channel 1 outputs its bias
    d = b.conv(h, 4, 3, padding=1, groups=4, weight=w, bias=bias, activation="relu")
    y = b.linear(b.mean(d), 2)
    dense = b.build([y])
    small, removal = remove_pruned_channels(dense)
    assert removal.removed[h] == (0,) and removal.removed[d] == (0,)
    dw = small.ops[1]
    assert dw.attrs["groups"] == 3 and small.tensor(dw.inputs[1]).shape == (3, 1, 3, 3)
    _same_outputs(dense, small)


def test_refusals_grouped_conv_and_graph_output():
    b = GraphBuilder(X, seed=5)
    h = _conv(b, b.input, 4, 4, [0, 1], activation="relu")
    grouped = _conv(b, h, 4, 4, [], groups=2)
    dense = b.build([grouped])
    _, removal = remove_pruned_channels(dense)
    assert removal.removed == {} and removal.kept_zero[h] == 2
    assert any("grouped conv (groups=2)" in note for note in removal.notes)

    b = GraphBuilder(X, seed=6)
    out = _conv(b, b.input, 4, 4, [2])
    _, removal = remove_pruned_channels(b.build([out]))
    assert removal.removed == {} and "graph input or output" in removal.notes[0]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # builder: all-zero map
def test_a_tensor_keeps_one_channel():
    b = GraphBuilder(X, seed=7)
    h = _conv(b, b.input, 4, 3, [0, 1, 2])
    y = b.linear(b.mean(h), 2)
    small, removal = remove_pruned_channels(b.build([y]))
    assert removal.removed[h] == (1, 2) and small.tensor(h).shape == (1, 1, 6, 6)


def test_no_zero_channel_gives_an_equal_copy():
    b = GraphBuilder(X, seed=8)
    y = b.linear(b.flatten(_conv(b, b.input, 4, 4, [], activation="relu")), 2)
    dense = b.build([y])
    small, removal = remove_pruned_channels(dense)
    assert removal.removed == {} and removal.channels_removed == 0
    assert [t.shape for t in small.tensors.values()] == [t.shape for t in dense.tensors.values()]
    assert "channel_removal" not in small.metadata


def test_activation_weight_is_a_graph_error():
    b = GraphBuilder(X, seed=9)
    y = b.linear(b.flatten(_conv(b, b.input, 4, 2, [])), 2)
    dense = b.build([y])
    dense.ops[0].inputs[1] = dense.inputs[0]  # an activation where the kernel belongs
    with pytest.raises(GraphError, match=r"remove_pruned_channels needs constant weights"):
        remove_pruned_channels(dense)
