"""Wrong-shape, wrong-dtype, NaN / inf and empty data, and labels of the wrong length, on every
target: each must raise a ValueError naming the problem before any runtime child starts. So
must a missing artifact file. Every case is counted in the session's hostile tally.

Also: a model file is data, not code. Nothing in edgekiln unpickles a file a user gave it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgekiln.exporters.onnx import write_onnx
from edgekiln.exporters.tflite import write_tflite
from edgekiln.targets.litert import run_litert
from edgekiln.targets.mcu import run_mcu
from edgekiln.targets.onnxruntime import run_onnxruntime
from edgekiln.targets.tflm import run_tflm
from tests.hostile.mutate import hostile_graph
from tests.hostile.tally import ERROR_NAMED, TALLY, judge

GOOD = np.random.default_rng(2).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)

# (case, x, y, pattern the message must match)
BAD_DATA = [
    ("shape: wrong channels", np.zeros((2, 5, 8, 8), np.float32), None, r"shape"),
    ("shape: wrong rank", np.zeros((2, 192), np.float32), None, r"shape"),
    ("shape: one sample, no batch axis", np.zeros((3, 8, 8), np.float32), None, r"shape"),
    ("dtype: int64", GOOD.astype(np.int64), None, r"int64"),
    ("dtype: bool", GOOD > 0, None, r"bool"),
    ("dtype: int16", GOOD.astype(np.int16), None, r"int16"),
    ("dtype: complex64", GOOD.astype(np.complex64), None, r"complex"),
    ("dtype: object", GOOD.astype(object), None, r"object"),
    ("values: NaN", np.where(GOOD > 1, np.nan, GOOD).astype(np.float32), None, r"NaN"),
    ("values: inf", np.where(GOOD > 1, np.inf, GOOD).astype(np.float32), None, r"inf"),
    ("values: -inf float64", np.full(GOOD.shape, -np.inf), None, r"inf"),
    ("empty batch", np.zeros((0, 3, 8, 8), np.float32), None, r"empty|at least one"),
    ("empty array", np.zeros((0,), np.float32), None, r"shape|empty"),
    ("labels: too few", GOOD, np.array([1]), r"label|y "),
    ("labels: float", GOOD, np.array([0.5, 1.5]), r"label|y "),
    ("labels: 2-D", GOOD, np.zeros((2, 5), np.int64), r"label|y "),
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    g = hostile_graph()
    d = tmp_path_factory.mktemp("data")
    return {
        "onnx": write_onnx(g, d / "m.onnx", int8_io=True),
        "onnx_float_io": write_onnx(g, d / "f.onnx"),
        "tflite": write_tflite(g, d / "m.tflite"),
    }


def _targets(artifacts):
    return {
        "onnxruntime": lambda x, y: run_onnxruntime(artifacts["onnx"], x, y, runs=0),
        "onnxruntime_float_io": lambda x, y: run_onnxruntime(
            artifacts["onnx_float_io"], x, y, runs=0
        ),
        "litert": lambda x, y: run_litert(artifacts["tflite"], x, y, runs=1, warmup=0),
        "tflm": lambda x, y: run_tflm(artifacts["tflite"], x, y, runs=1, warmup=0),
        "mcu": lambda x, y: run_mcu(artifacts["tflite"], x, y, board="nucleo-l4r5zi"),
    }


@pytest.mark.parametrize("case,x,y,pattern", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_by_name_on_every_target(artifacts, monkeypatch, case, x, y, pattern):
    started = []

    def no_child(*args, **kwargs):  # bad data must be refused before any runtime starts
        started.append(args[0].__name__)
        raise AssertionError("a runtime child was started for bad data")

    for module in ("onnxruntime", "litert", "tflm"):
        monkeypatch.setattr(f"edgekiln.targets.{module}.run_isolated", no_child)
    problems = []
    for target, call in _targets(artifacts).items():
        verdict = judge(lambda call=call: call(x, y), names=pattern)
        TALLY.record("data on a target", case, target, verdict)
        if verdict.outcome != ERROR_NAMED:  # not even a failed target: refused before a child
            problems.append(f"{target}: {str(verdict)[:200]}")
    assert not started
    assert not problems, "\n".join(problems)


def test_good_data_still_runs_everywhere(artifacts):
    y = np.array([0, 1])
    for target, call in _targets(artifacts).items():
        r = call(GOOD, y)
        assert r.ok, (target, r.error)
        assert r.outputs.shape[0] == 2


def test_missing_artifact_is_named(tmp_path):
    calls = {
        "litert": lambda p: run_litert(p, GOOD),
        "tflm": lambda p: run_tflm(p, GOOD),
        "mcu": lambda p: run_mcu(p, GOOD, board="nucleo-l4r5zi"),
        "onnxruntime": lambda p: run_onnxruntime(p, GOOD),
    }
    problems = []
    for target, call in calls.items():
        suffix = ".onnx" if target == "onnxruntime" else ".tflite"
        missing = tmp_path / f"nowhere{suffix}"
        verdict = judge(lambda c=call, p=missing: c(p), names=rf"nowhere\{suffix}.*does not exist")
        TALLY.record("missing file", f"artifact {missing.name}", target, verdict)
        if verdict.outcome != ERROR_NAMED or verdict.error != "FileNotFoundError":
            problems.append(f"{target}: {verdict}")
    assert not problems, "\n".join(problems)


# ---- a model file is data, not code ----------------------------------------------------------

EDGEKILN = Path(__file__).resolve().parents[2] / "edgekiln"
# The only unpickling allowed: run_isolated's own call and result files, which the parent and
# its child write into a private temporary directory a moment before reading them.
PICKLE_ALLOWED = {"targets/base.py", "targets/_isolated.py"}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(EDGEKILN)): p.read_text() for p in sorted(EDGEKILN.rglob("*.py"))}


def test_nothing_unpickles_user_files():
    offenders = []
    for name, text in _sources().items():
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load|\bcloudpickle", code):
                if name not in PICKLE_ALLOWED:
                    offenders.append(f"{name}:{line_no}: {line.strip()}")
            if "allow_pickle=True" in code.replace(" ", ""):
                offenders.append(f"{name}:{line_no}: {line.strip()}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{name}:{line_no}: np.load without allow_pickle=False")
    assert not offenders, "\n".join(offenders)


def test_every_torch_load_is_weights_only():
    calls = []
    for name, text in _sources().items():
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            calls.append((name, match.group(1)))
            assert "weights_only=True" in match.group(1), f"{name}: torch.load({match.group(1)})"
    # informative: where they are (the run's checkpoints), so a new one gets looked at
    assert all(name in {"run.py", "cli.py", "pipeline/train.py"} for name, _ in calls), calls
