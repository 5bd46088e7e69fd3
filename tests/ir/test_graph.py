"""The graph's rules, its file format, and the reference executor."""

import numpy as np
import pytest

from edgekiln.ir import GraphError, QParams, load_graph, save_graph
from edgekiln.ir.builder import GraphBuilder
from edgekiln.ir.reference import run_reference


def _graph():
    rng = np.random.default_rng(0)
    b = GraphBuilder(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
    a = b.conv(b.input, 8, 3, padding=1, activation="relu")
    c = b.conv(a, 8, 3, padding=1, groups=8)
    s = b.add(a, c, activation="relu")
    p = b.max_pool(s, 2)
    return b, b.build([b.linear(b.mean(p), 5)])


def test_reference_matches_builder_calibration():
    b, g = _graph()
    x = g.tensor(g.inputs[0]).quant.quantize(b.float_value(b.input))
    out = g.outputs[0]
    expected = g.tensor(out).quant.quantize(b.float_value(out))
    np.testing.assert_array_equal(run_reference(g, x)[out], expected)


def test_save_load_round_trip(tmp_path):
    _, g = _graph()
    g2 = load_graph(save_graph(g, tmp_path / "g.npz"))
    assert [op.attrs for op in g2.ops] == [op.attrs for op in g.ops]
    for name, t in g.tensors.items():
        assert t.shape == g2.tensors[name].shape
        if t.data is not None:
            np.testing.assert_array_equal(t.data, g2.tensors[name].data)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_graph(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(GraphError, match="is not an edgekiln graph file"):
        load_graph(tmp_path / "other.npz")


def test_validate_names_non_finite_scale():
    _, g = _graph()
    name = g.ops[0].outputs[0]
    g.tensors[name].quant = QParams.per_tensor(float("nan"), 0)
    with pytest.raises(GraphError, match=f"tensor '{name}' has a non-finite"):
        g.validate()


def test_validate_requires_shared_params_for_max_pool():
    _, g = _graph()
    pool = next(op for op in g.ops if op.type.value == "max_pool")
    g.tensors[pool.outputs[0]].quant = QParams.per_tensor(0.5, 0)
    with pytest.raises(GraphError, match="share one observer"):
        g.validate()
