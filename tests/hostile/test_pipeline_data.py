"""NaN / inf, empty and diverging data in the pipeline: calibrate, fit and capture each refuse
it with a ValueError that names the layer, the value and the way out, never a hang or a crash.

Each case is counted in the session's hostile tally, as the target cases of test_data.py are.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from edgekiln.pipeline.capture import capture
from edgekiln.pipeline.prepare import prepare
from edgekiln.pipeline.train import Loss, TrainConfig, calibrate, fit
from tests.hostile.tally import ERROR_NAMED, TALLY, judge

GOOD = np.random.default_rng(3).normal(0, 1, (8, 1, 8, 8)).astype(np.float32)
LABELS = np.zeros(8, np.int64)


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return prepare(net, torch.from_numpy(GOOD[:1]))


def _calibrated() -> nn.Module:
    model = _prepared()
    calibrate(model, GOOD)
    return model


def _where(value: float, dtype: type = np.float32) -> np.ndarray:
    return np.where(GOOD > 1, value, GOOD).astype(dtype)


def _diverge() -> None:
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32) * 1e20  # grads: inf
    model = prepare(nn.Sequential(nn.Linear(64, 64)), torch.from_numpy(x[:1]))
    fit(model, x, None, TrainConfig(batch_size=8, lr=5.0), loss=Loss.MSE)


def _capture_after_nan_calibration() -> None:
    model = _prepared()
    try:
        calibrate(model, _where(np.nan))
    except ValueError:
        pass  # a user who catches the error and captures anyway
    capture(model)


def _capture_with(path: str, buffer: str, value: float) -> None:
    model = _calibrated()
    getattr(model.get_submodule(path).observer, buffer).fill_(value)
    capture(model)


# (case, stage, call, pattern the message must match)
PIPELINE_DATA: list[tuple[str, str, Callable[[], object], str]] = [
    ("values: NaN", "calibrate", lambda: calibrate(_prepared(), _where(np.nan)), r"holds nan"),
    ("values: inf", "calibrate", lambda: calibrate(_prepared(), _where(np.inf)), r"holds inf"),
    (
        "values: -inf float64",
        "calibrate",
        lambda: calibrate(_prepared(), np.full(GOOD.shape, -np.inf)),
        r"holds -inf",
    ),
    ("empty batch", "calibrate", lambda: calibrate(_prepared(), GOOD[:0]), r"set is empty"),
    ("values: NaN", "fit", lambda: fit(_prepared(), _where(np.nan), LABELS, TrainConfig()), r"nan"),
    ("values: inf", "fit", lambda: fit(_prepared(), _where(np.inf), LABELS, TrainConfig()), r"inf"),
    ("empty batch", "fit", lambda: fit(_prepared(), GOOD[:0], LABELS[:0], TrainConfig()), r"empty"),
    ("diverged: inputs of 1e20", "fit", _diverge, r"training diverged.*learning rate"),
    ("never calibrated", "capture", lambda: capture(_prepared()), r"never observed data"),
    ("range kept NaN", "capture", _capture_after_nan_calibration, r"non-finite .*\[nan, nan\]"),
    (
        "activation max inf",
        "capture",
        lambda: _capture_with("_1_quant.quantizer", "max_val", np.inf),
        r"output of module '1'.*non-finite observed range \[.*, inf\]",
    ),
    (
        "weight min NaN",
        "capture",
        lambda: _capture_with("0.parametrizations.weight.0.quantizer", "min_val", np.nan),
        r"weight of module '0'.*non-finite observed range \[nan, ",
    ),
]


pytestmark = pytest.mark.usefixtures("fail_after_60s")  # the bug these pin was a hang


@pytest.mark.parametrize(
    "case,stage,call,pattern", PIPELINE_DATA, ids=[f"{c[1]}: {c[0]}" for c in PIPELINE_DATA]
)
def test_hostile_pipeline_data_is_refused_by_name(case, stage, call, pattern):
    verdict = judge(call, names=pattern)
    TALLY.record("data in the pipeline", case, stage, verdict)
    assert verdict.outcome == ERROR_NAMED, str(verdict)
    assert verdict.error in ("ValueError", "CaptureError"), str(verdict)
    assert re.search(pattern, verdict.message), verdict.message  # case-sensitive, as before
    assert re.search(
        r"clean the data|lower the learning rate|pass at least one|calibrat", verdict.message
    )


def test_good_data_still_calibrates_trains_and_captures():
    model = _prepared()
    losses = fit(model, GOOD, LABELS, TrainConfig(batch_size=4))
    assert len(losses) == 1 and np.isfinite(losses[0])
    calibrate(model, GOOD)
    graph = capture(model)
    assert graph.inputs and graph.outputs
