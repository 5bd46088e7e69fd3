"""The simulator against TFLM's own kernels (tflite-micro wheel, in a child process).

Tolerance: ZERO mismatching values. The simulator re-implements TFLM's reference integer
kernels step by step (same multipliers, same rounding), so any difference at all is a bug,
not quantization noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.formats.tflite import read_tflite
from edgekiln.targets.base import run_isolated
from edgekiln.targets.mcu.interpreter import SimulationError, simulate
from tests.targets.mcu import _tflm_child, cases

REFUSED_BY_TFLM = {"concat_different"}


@pytest.fixture(scope="module")
def tflm_results() -> dict[str, tuple[bytes, np.ndarray, dict | str]]:
    built = cases.build_cases()
    built["chain"] = cases.chain()
    results = run_isolated(_tflm_child.run_tflm_many, list(built.values()), timeout=240)
    return {name: (*built[name], r) for name, r in zip(built, results, strict=True)}


@pytest.mark.parametrize("name", sorted(set(cases.CASES) - REFUSED_BY_TFLM))
def test_single_op_bit_exact(tflm_results, name):
    model, x, tflm = tflm_results[name]
    assert isinstance(tflm, dict), tflm
    sim = simulate(model, x).output
    assert sim.shape == tflm["output"].shape
    assert sim.dtype == tflm["output"].dtype
    mismatches = int(np.sum(sim != tflm["output"]))
    assert mismatches == 0, f"{name}: {mismatches} of {sim.size} values differ"


def test_every_intermediate_of_a_cnn_is_bit_exact(tflm_results):
    model, x, tflm = tflm_results["chain"]
    m = read_tflite(model)
    sim = simulate(m, x, keep_intermediates=True)
    compared = 0
    for t in m.tensors:
        if t.data is not None or t.index not in tflm["tensors"]:
            continue
        expected = tflm["tensors"][t.index].reshape(sim.tensors[t.name].shape)
        assert np.array_equal(sim.tensors[t.name], expected), t.name
        compared += 1
    assert compared == len(m.operators) + 1  # every op output and the input


def test_concatenation_with_different_parameters_is_refused_like_tflm(tflm_results):
    model, x, tflm = tflm_results["concat_different"]
    assert isinstance(tflm, str) and "allocate" in tflm
    with pytest.raises(SimulationError, match="CONCATENATION copies bytes and refuses"):
        simulate(model, x)


def test_planned_arena_equals_tflm_measured_plan():
    # TFLM's "head" is its planned non-persistent arena (activations and scratch). The
    # planner follows GreedyMemoryPlanner rule for rule, so the bytes match exactly.
    from edgekiln.exporters.tflite import tflite_bytes
    from edgekiln.targets.mcu.memory import memory_report
    from tests.targets.mcu import graphs

    models = [tflite_bytes(graphs.resnet8()), tflite_bytes(graphs.every_op_cnn())]
    heads = run_isolated(_tflm_child.tflm_arena_head, models, timeout=120)
    planned = [memory_report(read_tflite(m), "reference").arena_bytes for m in models]
    assert planned == heads
