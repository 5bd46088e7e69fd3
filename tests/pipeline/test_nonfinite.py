"""NaN, inf and empty data in calibrate, fit and capture: each is refused by name, never a hang.

A NaN range once made the per-tensor fake-quant search for its gradient interval forever, and an
inf range divided by zero there; these tests pin the errors that replaced both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekiln.pipeline.capture import CaptureError, capture
from edgekiln.pipeline.prepare import ActivationQuant, prepare
from edgekiln.pipeline.quant import (
    ACTIVATION_SPEC,
    FakeQuantizer,
    MinMaxObserver,
    fake_quantize,
)
from edgekiln.pipeline.train import Loss, TrainConfig, calibrate, fit

X = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
Y = np.zeros(16, np.int64)


pytestmark = pytest.mark.usefixtures("fail_after_60s")  # the bug these pin was a hang


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return prepare(net, torch.from_numpy(X[:1]))


def _with(value: float, row: int = 5) -> np.ndarray:
    x = X.copy()
    x[row, 0, 2, 3] = value
    return x


# ---- the primitive and the module ------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.5])
def test_fake_quantize_refuses_a_scale_that_is_not_positive_and_finite(scale):
    zero_point = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(
        ValueError,
        match=r"^fake_quantize needs a positive, finite scale, got scale (nan|inf|0|-0\.5): "
        r"compute it from a finite range \(compute_qparams\); one that held NaN or inf gives",
    ):
        fake_quantize(torch.ones(3), torch.tensor(scale), zero_point, ACTIVATION_SPEC)


@pytest.mark.parametrize(
    "value,seen", [(float("nan"), r"\[nan, nan\]"), (float("inf"), r"\[1, inf\]")]
)
def test_fake_quantizer_names_the_range_it_observed(value, seen):
    fq = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
    with pytest.raises(
        ValueError,
        match=rf"FakeQuantizer has no usable scale: it observed the range {seen}, which gives "
        r"scale (nan|inf)\. The calibration or training data holds NaN or inf values; clean the "
        r"data, or lower the learning rate if training diverged",
    ):
        fq(torch.tensor([1.0, value]))


def test_observer_range_text():
    obs = MinMaxObserver(ACTIVATION_SPEC)
    assert not obs.range_is_finite  # unobserved: +inf, -inf
    obs.observe(torch.tensor([-0.25, 2.0]))
    assert obs.range_is_finite and obs.describe_range() == "[-0.25, 2]"
    obs.observe(torch.tensor([float("-inf")]))
    assert not obs.range_is_finite and obs.describe_range() == "[-inf, 2]"


# ---- calibrate and fit -----------------------------------------------------------------------


def test_calibrate_with_nan_names_the_quantizer_and_the_sample():
    with pytest.raises(
        ValueError,
        match=r"calibrate: 1 fake-quantizer observed a non-finite range, so no scale: "
        r"'input_1_quant\.quantizer' \(\[nan, nan\], the output of node 'input_1'\)\. "
        r"Sample 5 of x holds nan \(1 of this batch's 16 samples hold NaN or inf\): clean the "
        r"data \(np\.nan_to_num, or drop those samples\), then prepare the model again",
    ):
        calibrate(_prepared(), _with(float("nan")))


def test_calibrate_with_inf_names_the_value_and_the_batch_it_was_in():
    with pytest.raises(
        ValueError,
        match=r"calibrate: .*'input_1_quant\.quantizer' \(\[-?[\d.]+, inf\], the output of node "
        r"'input_1'\)\. Sample 13 of x holds inf \(1 of this batch's 4 samples",
    ):
        calibrate(_prepared(), _with(float("inf"), row=13), batch_size=4)
    with pytest.raises(ValueError, match=r"\[-inf, [\d.]+\].*Sample 2 of x holds -inf"):
        calibrate(_prepared(), _with(float("-inf"), row=2))


def test_fit_with_inf_in_a_training_forward_names_the_step_and_the_sample():
    with pytest.raises(
        ValueError,
        match=r"fit, epoch 0 step \d: 1 fake-quantizer observed a non-finite range, so no "
        r"scale: 'input_1_quant\.quantizer' \(\[-?[\d.]+, inf\], the output of node "
        r"'input_1'\)\. Sample 5 of x holds inf .*: clean the data",
    ):
        fit(_prepared(), _with(float("inf")), Y, TrainConfig(batch_size=4))


def test_fit_that_diverges_names_the_layers_and_the_learning_rate():
    # inputs of 1e20 overflow the gradients to inf; Adam then makes the weights NaN, and the
    # next forward meets them: the batch is finite, so the way out is the learning rate
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32) * 1e20
    model = prepare(nn.Sequential(nn.Linear(64, 64)), torch.from_numpy(x[:1]))
    with pytest.raises(
        ValueError,
        match=r"fit, epoch 0 step 1: 2 fake-quantizers observed a non-finite range, so no "
        r"scale: '0\.parametrizations\.weight\.0\.quantizer' \(\[nan, nan\] over 64 channels, "
        r"the weight of layer '0'\); '_0_quant\.quantizer' \(\[nan, nan\], the output of "
        r"module '0'\)\. This batch of x is finite: training diverged .*; lower the learning "
        r"rate \(TrainConfig\.lr=5\.0\), then prepare the model again",
    ):
        fit(model, x, None, TrainConfig(batch_size=8, lr=5.0), loss=Loss.MSE)


def test_fit_refuses_an_empty_training_set():
    with pytest.raises(
        ValueError,
        match=r"fit: the training set is empty \(0 samples, x of shape \(0, 1, 8, 8\)\): pass "
        r"at least one sample, batch first",
    ):
        fit(_prepared(), X[:0], Y[:0], TrainConfig())
    with pytest.raises(ValueError, match=r"fit: the training set is empty"):
        fit(nn.Linear(3, 2), np.zeros((0, 3), np.float32), None, TrainConfig(), loss=Loss.MSE)


def test_calibrate_refuses_an_empty_calibration_set():
    with pytest.raises(
        ValueError, match=r"calibrate: the calibration set is empty \(0 samples, x of shape"
    ):
        calibrate(_prepared(), X[:0])


def test_a_value_error_without_a_non_finite_range_passes_through():
    class Refuses(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("my own error")

    with pytest.raises(ValueError, match=r"^my own error$"):
        calibrate(Refuses(), X)


# ---- capture ---------------------------------------------------------------------------------


def _calibrated() -> nn.Module:
    model = _prepared()
    calibrate(model, X)
    return model


def test_capture_names_an_activation_range_that_is_not_finite():
    model = _calibrated()
    model.get_submodule("_1_quant").quantizer.observer.max_val.fill_(float("inf"))
    with pytest.raises(
        CaptureError,
        match=r"the output of module '1' \(quantizer '_1_quant'\) has a non-finite observed "
        r"range \[[\d.e-]+, inf\], so no scale\. The calibration or training data holds NaN or "
        r"inf values; clean the data, or lower the learning rate if training diverged",
    ):
        capture(model)


def test_capture_names_a_weight_range_that_is_not_finite():
    model = _calibrated()
    model.get_submodule("0.parametrizations.weight.0.quantizer").observer.min_val.fill_(
        float("nan")
    )
    with pytest.raises(
        CaptureError,
        match=r"the weight of module '0' has a non-finite observed range \[nan, [\d.e-]+\] over "
        r"4 channels, so no scale\. The calibration or training data",
    ):
        capture(model)


def test_capture_names_a_scale_floor_that_is_not_finite():
    model = _calibrated()
    model.get_submodule("_1_quant").quantizer.scale_floor.fill_(float("inf"))
    with pytest.raises(
        CaptureError,
        match=r"the output of module '1' \(quantizer '_1_quant'\) has scale inf from its scale "
        r"floor inf \(its observed range \[[\d.e-]+, [\d.e-]+\] is finite\)",
    ):
        capture(model)


def test_capture_lists_every_quantizer_never_observed():
    with pytest.raises(
        CaptureError,
        match=r"^3 of the model's 3 activation quantizers never observed data, so they have no "
        r"scale, at the output of: node 'input_1'; module '1'; module '3'\. Pass calibration "
        r"data through the model in training mode \(edgekiln\.calibrate\(model, x\), or "
        r"model\.train\(\); model\(x\)\) or fine-tune it before capture$",
    ):
        capture(_prepared())


def test_capture_lists_the_first_three_unobserved_and_counts_the_rest():
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
    model = prepare(net, torch.zeros(1, 4))
    quants = [m for m in model.modules() if isinstance(m, ActivationQuant)]
    assert len(quants) == 6
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 4))
    quants[2].quantizer.observer.reset()  # the output of the second layer only
    with pytest.raises(
        CaptureError, match=r"^1 of the model's 6 .*, at the output of: module '1'\."
    ):
        capture(model)
    for q in quants:
        q.quantizer.observer.reset()
    with pytest.raises(
        CaptureError,
        match=r"^6 of the model's 6 .*, at the output of: node 'input_1'; module '0'; "
        r"module '1'; and 3 more\. Pass",
    ):
        capture(model)
