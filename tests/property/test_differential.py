"""Differential testing with generated models (issue 8): every runtime against the reference.

Each example is a random valid PyTorch model (``strategies.model_specs``) taken through
prepare, calibrate, capture, ONNX and TFLite export, then ONNX Runtime, LiteRT (builtin kernels
and XNNPACK), TFLM and the MCU simulator; ``harness.check_spec`` checks the properties (the
simulator equals TFLM bit for bit, identical quantization parameters in both artifacts, per-op
and propagated end-to-end LSB bounds, nothing crashes).

CI runs a fixed, seeded sample (profile "ci", 10 models). The long run is
``EDGEKILN_HYPOTHESIS=long EDGEKILN_HYPOTHESIS_EXAMPLES=300 pytest tests/property`` or, with
counts per property, ``python scripts/differential.py --models 300``. A failing example shrinks
to a small ``ModelSpec``; paste it into test_regressions.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given

from tests.property.harness import (
    Outcome,
    check_spec,
    end_to_end_summary,
    propagated_bound,
    reference_bound,
)
from tests.property.strategies import active_settings, model_specs

SEEN: list[Outcome] = []


# torch's note that an even kernel with padding="same" pads a copy of the input: generated
# models may draw one on purpose (the exporters must handle its asymmetric padding)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@active_settings()
@given(spec=model_specs())
def test_generated_models_keep_every_property(spec):
    outcome = check_spec(spec)
    SEEN.append(outcome)
    assert outcome.status != "violation", outcome.report()


def test_sample_covered_the_op_set_and_reports_counts(tmp_path_factory):
    # runs after the property test (file order): the sample must have exercised the op set
    if not SEEN:
        pytest.skip(
            "test_generated_models_keep_every_property did not run in this session (deselected, "
            "or this test run alone), so there is no sample to check; run the whole file"
        )
    ops: Counter = Counter()
    values: Counter = Counter()
    for o in SEEN:
        ops.update(o.op_types)
        values.update(o.values)
    status = Counter(o.status for o in SEEN)
    report = {
        "models": len(SEEN),
        "status": dict(status),
        "ops": dict(ops),
        "values": dict(values),
        "end_to_end": end_to_end_summary(SEEN),  # per runtime, with the vacuous checks counted
    }
    path = tmp_path_factory.mktemp("differential") / "report.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\ndifferential sample: {json.dumps(report)}")
    assert status["ok"] >= len(SEEN) // 2, report
    assert {"conv", "linear", "add", "concat", "mean"} <= set(ops), ops


def test_propagated_bound_grows_with_gain_and_stops_at_move_ops():
    import numpy as np

    from edgekiln.ir.builder import GraphBuilder
    from tests.property.harness import PER_OP_LSB

    b = GraphBuilder(np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32))
    c = b.conv(b.input, 3, 3, padding=1)
    m = b.max_pool(c, 2)
    g = b.build([b.linear(b.flatten(m), 4)])
    e = propagated_bound(g, PER_OP_LSB["tflm"])
    assert e[c] == 1  # exact inputs: only the conv's own rounding
    assert e[m] == e[c]  # max pool moves values: no new error
    assert e[g.outputs[0]] >= 2  # the linear adds its rounding to the propagated one


def _dead_relu_after_a_conv():
    """input -> conv -> conv + ReLU whose bias (-100) keeps every output at 0 (scale 1e-8)."""
    import numpy as np

    from edgekiln.ir.builder import GraphBuilder
    from edgekiln.ir.reference import run_reference

    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    b = GraphBuilder(x)
    c = b.conv(b.input, 3, 3, padding=1)
    dead = b.conv(c, 2, 3, padding=1, activation="relu", bias=np.full(2, -100.0))
    g = b.build([dead])
    return g, run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x)), c, dead


def test_reference_bound_is_the_own_rounding_where_a_relu_saturates():
    from tests.property.harness import INT8_SPAN, PER_OP_LSB

    g, reference, c, dead = _dead_relu_after_a_conv()
    static = propagated_bound(g, PER_OP_LSB["tflm"])
    assert static[dead] == INT8_SPAN  # 1 LSB upstream times a gain of ~1e7: vacuous
    e = reference_bound(g, reference, PER_OP_LSB["tflm"])
    assert (e[c] == 1).all()  # exact inputs: the conv's own rounding
    # every pre-activation value is ~ -100, far below 0 by more than the upstream error can move
    # it: both the runtime and the reference give the zero point, up to the own rounding
    assert (e[dead] == 1).all()


def test_reference_bound_follows_each_value_and_never_passes_the_static_one():
    import numpy as np

    from edgekiln.ir.builder import GraphBuilder
    from edgekiln.ir.reference import run_reference
    from tests.property.harness import PER_OP_LSB

    x = np.random.default_rng(1).normal(size=(4, 2, 6, 6)).astype(np.float32)
    b = GraphBuilder(x, seed=1)
    c = b.conv(b.input, 3, 3, padding=1, activation="relu")
    s = b.add(c, b.conv(c, 3, 3, padding=1))
    m = b.max_pool(s, 2)
    g = b.build([b.softmax(b.linear(b.flatten(m), 4))])
    reference = run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x))
    for input_lsb in (0, 1):
        static = propagated_bound(g, PER_OP_LSB["onnxruntime"], input_lsb)
        e = reference_bound(g, reference, PER_OP_LSB["onnxruntime"], input_lsb)
        for name, bound in e.items():
            assert bound.shape == reference[name].shape
            assert bound.max() <= static[name], name
            r = reference[name].astype(np.int64)
            room = np.maximum(r + 128, 127 - r)  # the int8 range around each value
            assert (bound <= room).all(), name
    # a 1 LSB input error reaches a padded 3x3 conv's corner outputs through 4 of its 9 taps,
    # and a ReLU that saturates by more than the error holds it at the own rounding: the bound
    # differs from value to value
    e = reference_bound(g, reference, PER_OP_LSB["onnxruntime"], 1)
    assert e[g.inputs[0]].min() == 1
    assert e[c].min() < e[c].max()
    assert e[m].max() <= e[s].max()  # max pool moves values


def _rounding_adversary(graph, xq, input_lsb, own, rng, push):
    """A "runtime" every per-op bound admits: each op is the reference op on this runtime's own
    inputs, then moved by up to ``own`` steps (``push`` +1 / -1: always that way, 0: at random),
    clamped to int8; the input starts ``input_lsb`` away. Returns every activation."""
    import numpy as np

    from edgekiln.ir.reference import float_op
    from tests.property.harness import REQUANT_OPS, _real_input

    def moved(q, steps):
        step = np.full(q.shape, push) if push else rng.integers(-1, 2, q.shape)
        return np.clip(q.astype(np.int64) + steps * step, -128, 127).astype(np.int8)

    values = {graph.inputs[0]: moved(xq, input_lsb)}
    for op in graph.ops:
        real = [_real_input(graph, n, values) for n in op.inputs]
        q = graph.tensor(op.outputs[0]).quant.quantize(float_op(op, real, graph))
        values[op.outputs[0]] = moved(q, own) if op.type in REQUANT_OPS else q
    return values


def test_reference_bound_holds_against_a_runtime_that_rounds_adversarially():
    # soundness of the propagation itself: a runtime that uses all of every per-op allowance
    # (and an input off by one step) stays inside the bound at every value of every tensor
    import numpy as np

    from edgekiln.ir.builder import GraphBuilder
    from edgekiln.ir.reference import run_reference
    from tests.property.harness import PER_OP_LSB

    x = np.random.default_rng(2).normal(size=(8, 2, 8, 8)).astype(np.float32)
    x[:, :, :2] *= 40.0  # outliers: coarse input steps, large downstream gains
    b = GraphBuilder(x, seed=2)
    c = b.conv(b.input, 4, 3, padding=1, activation="relu")
    r = b.add(c, b.conv(c, 4, 3, padding=1), activation="relu")
    p = b.pad(b.avg_pool(r, 2), ((0, 0), (0, 0), (1, 0), (0, 1)))
    k = b.conv(p, 4, 1, activation="relu6")
    cat = b.concat([k, b.requantize_like(b.max_pool(p, 3, 1, padding=1), k)])
    g = b.build([b.softmax(b.linear(b.mean(cat), 5), beta=2.0)])
    xq = g.tensor(g.inputs[0]).quant.quantize(x)
    reference = run_reference(g, xq)
    rng = np.random.default_rng(0)
    for input_lsb in (0, 1):
        bound = reference_bound(g, reference, PER_OP_LSB["tflm"], input_lsb)
        for push in (1, -1, 0, 0, 0):
            got = _rounding_adversary(g, xq, input_lsb, 1, rng, push)
            for name, e in bound.items():
                d = np.abs(got[name].astype(np.int64) - reference[name].astype(np.int64))
                assert (d <= e).all(), (name, input_lsb, push, int((d - e).max()))
