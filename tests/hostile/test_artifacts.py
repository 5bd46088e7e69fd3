"""Truncated, bit-flipped and field-mutated .tflite and .onnx files through every target.

Every outcome must be a rejection naming the problem, a clean error, a failed target with an
error, or a run of a mutant that is still a valid model: never a crash of this process, an
unnamed exception or a hang (targets run with a timeout). Every case is counted in the session's
hostile tally (``tests/hostile/tally.py``), which goes to ``.pytest-reports/hostile.json`` and
the terminal summary.

Runtime child processes cost ~1 s each, so all mutants go through the checks every target makes
before a child starts, and through the in-process simulator; only mutants that pass those
checks (the dangerous ones) reach TFLM, LiteRT and ONNX Runtime, up to ``CHILD_RUNS`` of the
byte-level ones per artifact in CI (``EDGEKILN_HOSTILE_CHILD_RUNS`` raises it). A valid mutant
over that budget is counted as ``not run`` on those runtimes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import tflite_bytes
from edgekiln.formats.tflite import check_tflite
from edgekiln.targets.litert import run_litert
from edgekiln.targets.mcu import run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.hostile.mutate import (
    bit_flips,
    hostile_graph,
    onnx_field_mutants,
    tflite_field_mutants,
    truncations,
)
from tests.hostile.tally import RAN, TALLY, judge, not_run

CHILD_RUNS = int(os.environ.get("EDGEKILN_HOSTILE_CHILD_RUNS", "4"))
TIMEOUT = 60.0
KINDS = {"truncate": "truncated", "bit_flip": "bit-flipped", "field": "field-mutated"}
X = np.random.default_rng(1).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def graph():
    return hostile_graph()


@pytest.fixture(scope="module")
def tflite_data(graph):
    return tflite_bytes(graph)


@pytest.fixture(scope="module")
def onnx_data(graph, tmp_path_factory):
    return write_onnx(graph, tmp_path_factory.mktemp("h") / "m.onnx", int8_io=True).read_bytes()


def _tflite_targets(path: Path, child: bool) -> dict:
    calls = {"mcu": lambda: run_mcu(path, X, board="nucleo-l4r5zi")}
    if child:
        calls["tflm"] = lambda: run_tflm(path, X, runs=1, warmup=0, timeout=TIMEOUT)
        calls["litert"] = lambda: run_litert(path, X, runs=1, warmup=0, timeout=TIMEOUT)
    else:  # the parent-side checks only: a file that fails them never reaches a child
        calls["tflm"] = lambda: _parent_checks(run_tflm, path)
        calls["litert"] = lambda: _parent_checks(run_litert, path)
    return calls


def _parent_checks(run, path: Path):
    return run(path, X[:0])  # an empty batch: raises after the artifact checks, before a child


def _over_budget(budget: int) -> str:
    return f"passes the artifact checks; over the budget of {budget} runtime child processes"


def _run_tflite_mutants(kind, mutants, tmp_path, child_budget):
    failed = []
    for name, data in mutants:
        path = tmp_path / f"{name.replace('/', '_')}.tflite"
        path.write_bytes(data)
        checked = judge(lambda p=path: check_tflite(p))
        child = checked.outcome == RAN and child_budget > 0
        child_budget -= child
        verdicts = {"check_tflite": checked}
        for target, call in _tflite_targets(path, child).items():
            if not child and target in ("tflm", "litert") and checked.outcome == RAN:
                verdicts[target] = not_run(_over_budget(CHILD_RUNS))  # valid, never started
            else:
                verdicts[target] = judge(call)
        for target, verdict in verdicts.items():
            case = TALLY.record(f"tflite {KINDS[kind]}", name, target, verdict)
            if not case.passes:
                failed.append(f"{name} on {target}: {verdict}")
    return failed


def test_truncated_tflite(tflite_data, tmp_path):
    failed = _run_tflite_mutants("truncate", truncations(tflite_data, 24), tmp_path, CHILD_RUNS)
    assert not failed, "\n".join(failed)


def test_bit_flipped_tflite(tflite_data, tmp_path):
    failed = _run_tflite_mutants("bit_flip", bit_flips(tflite_data, 48), tmp_path, CHILD_RUNS)
    assert not failed, "\n".join(failed)


def test_field_mutated_tflite(tflite_data, tmp_path):
    mutants = list(tflite_field_mutants(tflite_data))
    assert len(mutants) >= 25  # the patches found their fields
    failed = _run_tflite_mutants("field", mutants, tmp_path, len(mutants))
    assert not failed, "\n".join(failed)


def test_hostile_tflite_scales_are_named(tflite_data, tmp_path):
    mutants = dict(tflite_field_mutants(tflite_data))
    for name in ("activation.scale=nan", "const.scale=0", "activation.scale=-1"):
        path = tmp_path / "m.tflite"
        path.write_bytes(mutants[name])
        with pytest.raises(ValueError, match=r"quantization.scale .* every scale must be positive"):
            run_tflm(path, X)
    path.write_bytes(mutants["operator.opcode_index=99"])
    with pytest.raises(ValueError, match="opcode"):
        run_litert(path, X)


def _parses(data: bytes) -> bool:
    try:
        onnx.load_from_string(data)
    except Exception:
        return False
    return True


def _run_onnx_mutants(kind, mutants, tmp_path, child_budget):
    failed = []
    for name, data in mutants:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        parses = _parses(data)
        if parses and child_budget <= 0:
            verdict = not_run(_over_budget(CHILD_RUNS))
        else:
            child_budget -= parses
            verdict = judge(lambda p=path: run_onnxruntime(p, X, runs=0, timeout=TIMEOUT))
        case = TALLY.record(f"onnx {KINDS[kind]}", name, "onnxruntime", verdict)
        if not case.passes:
            failed.append(f"{name}: {verdict}")
    return failed


def test_truncated_onnx(onnx_data, tmp_path):
    failed = _run_onnx_mutants("truncate", truncations(onnx_data, 12), tmp_path, CHILD_RUNS)
    assert not failed, "\n".join(failed)


def test_bit_flipped_onnx(onnx_data, tmp_path):
    failed = _run_onnx_mutants("bit_flip", bit_flips(onnx_data, 24), tmp_path, CHILD_RUNS)
    assert not failed, "\n".join(failed)


def test_field_mutated_onnx(onnx_data, tmp_path):
    mutants = list(onnx_field_mutants(onnx_data))
    failed = _run_onnx_mutants("field", mutants, tmp_path, len(mutants))
    assert not failed, "\n".join(failed)


def test_onnx_bad_scales_fail_the_target_by_name(onnx_data, tmp_path):
    # ONNX Runtime itself runs a scale of 0, NaN or -1 and returns garbage; the target refuses
    mutants = dict(onnx_field_mutants(onnx_data))
    for name in ("activation.scale=0", "activation.scale=nan", "weight.scale=0"):
        path = tmp_path / "m.onnx"
        path.write_bytes(mutants[name])
        r = run_onnxruntime(path, X, runs=0)
        assert not r.ok
        assert re.search(
            r"node '.*' of tensor '.*' has scale .* must be positive and finite", r.error
        )
    (tmp_path / "good.onnx").write_bytes(onnx_data)
    with pytest.raises(ValueError, match="an empty batch; pass at least one sample"):
        run_onnxruntime(tmp_path / "good.onnx", X[:0])
