"""Tests of edgekiln.pipeline.quant: specs, qparams, fake-quantization and observers."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

from edgekiln.pipeline import quant
from edgekiln.pipeline.quant import (
    ACTIVATION_SPEC,
    MIN_SCALE,
    WEIGHT_SPEC,
    FakeQuantizer,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverKind,
    QuantSpec,
    activation_spec,
    compute_qparams,
    fake_quantize,
    make_observer,
    weight_spec,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny and the CI box is shared (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_doctests() -> None:
    assert doctest.testmod(quant, raise_on_error=False).failed == 0


# QuantSpec ---------------------------------------------------------------------------------------


def test_spec_ranges() -> None:
    assert (WEIGHT_SPEC.qmin, WEIGHT_SPEC.qmax) == (-127, 127)
    assert (ACTIVATION_SPEC.qmin, ACTIVATION_SPEC.qmax) == (-128, 127)
    assert (weight_spec(2).qmin, weight_spec(2).qmax) == (-1, 1)
    assert (activation_spec(4).qmin, activation_spec(4).qmax) == (-8, 7)
    assert weight_spec() == WEIGHT_SPEC and activation_spec() == ACTIVATION_SPEC


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, r"QuantSpec.bits=9 is not supported: allowed 2 to 8"),
        ({"bits": 1}, r"QuantSpec.bits=1 is not supported: allowed 2 to 8"),
        ({"bits": "8"}, r"QuantSpec.bits must be an int from 2 to 8, got '8'"),
        ({"axis": -1}, r"QuantSpec.axis must be a non-negative int \(0: output channels\), got -1"),
        ({"symmetric": 1}, r"QuantSpec.symmetric must be True or False, got 1"),
        ({"narrow_range": None}, r"QuantSpec.narrow_range must be True or False, got None"),
    ],
)
def test_spec_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


# compute_qparams ---------------------------------------------------------------------------------


def test_qparams_asymmetric_tflite_rule() -> None:
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), ACTIVATION_SPEC)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and scale.shape == ()
    assert scale.item() == pytest.approx(4.0 / 255.0)
    assert zp.item() == -128 - round(-1.0 / (4.0 / 255.0))  # -64


def test_qparams_range_widened_to_zero() -> None:
    scale, zp = compute_qparams(torch.tensor(2.0), torch.tensor(5.0), ACTIVATION_SPEC)
    assert scale.item() == pytest.approx(5.0 / 255.0)
    assert zp.item() == -128  # min widened to 0
    scale, zp = compute_qparams(torch.tensor(-5.0), torch.tensor(-2.0), ACTIVATION_SPEC)
    assert zp.item() == 127


def test_qparams_symmetric_per_channel() -> None:
    scale, zp = compute_qparams(torch.tensor([-2.54, -0.1]), torch.tensor([1.0, 0.3]), WEIGHT_SPEC)
    assert scale.shape == (2,) and zp.tolist() == [0, 0]
    assert scale.tolist() == pytest.approx([2.54 / 127, 0.3 / 127])


def test_qparams_zero_range_gives_min_scale() -> None:
    for spec in (WEIGHT_SPEC, ACTIVATION_SPEC):
        scale, zp = compute_qparams(torch.zeros(3), torch.zeros(3), spec)
        assert scale.tolist() == [MIN_SCALE] * 3
        assert torch.isfinite(scale).all() and (scale > 0).all()
    _, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), ACTIVATION_SPEC)
    assert zp.item() == -128


def test_qparams_errors() -> None:
    with pytest.raises(ValueError, match=r"min_val and max_val of one shape, got \(2,\) and \(\)"):
        compute_qparams(torch.zeros(2), torch.tensor(1.0), WEIGHT_SPEC)
    with pytest.raises(ValueError, match=r"non-finite range .*observe finite data first"):
        compute_qparams(torch.tensor(float("inf")), torch.tensor(1.0), WEIGHT_SPEC)
    with pytest.raises(ValueError, match=r"needs min_val <= max_val, got min 2.0 and max 1.0"):
        compute_qparams(torch.tensor(2.0), torch.tensor(1.0), WEIGHT_SPEC)


# fake_quantize -----------------------------------------------------------------------------------


def test_fake_quantize_equals_torch_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    obs = MinMaxObserver(WEIGHT_SPEC)
    obs.observe(w)
    scale, zp = obs.qparams()
    expected = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -127, 127)
    assert torch.equal(fake_quantize(w, scale, zp, WEIGHT_SPEC), expected)
    # The grid really is int8: (w_q / scale) are integers in [-127, 127].
    codes = expected / scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4


def test_fake_quantize_equals_torch_per_tensor() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 10) * 3 + 1
    obs = MinMaxObserver(ACTIVATION_SPEC)
    obs.observe(x)
    scale, zp = obs.qparams()
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)
    assert torch.equal(fake_quantize(x, scale, zp, ACTIVATION_SPEC), expected)
    expected = torch.fake_quantize_per_tensor_affine(x, scale.item(), zp.item(), -128, 127)
    assert torch.equal(fake_quantize(x, scale, zp, ACTIVATION_SPEC), expected)


def test_fake_quantize_straight_through_gradient() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.2, 5.0], requires_grad=True)
    scale = torch.tensor(1.0 / 127)  # representable range [-1, 1]
    zp = torch.tensor(0, dtype=torch.int32)
    y = fake_quantize(x, scale, zp, QuantSpec(8, symmetric=True, narrow_range=True))
    (y * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]

    w = torch.randn(4, 3, requires_grad=True)
    scale = torch.full((4,), 0.01)
    fake_quantize(w, scale, torch.zeros(4, dtype=torch.int32), WEIGHT_SPEC).sum().backward()
    assert w.grad is not None
    assert torch.equal(w.grad, (w.detach().abs() <= 1.27).float())


# Observers ---------------------------------------------------------------------------------------


def test_minmax_observer_per_channel() -> None:
    obs = MinMaxObserver(WEIGHT_SPEC)
    assert not obs.observed
    obs.observe(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    obs.observe(torch.tensor([[3.0, 0.0], [0.1, -0.1]]))
    assert obs.observed
    assert obs.min_val.tolist() == [-2.0, pytest.approx(-0.1)] and obs.max_val.tolist() == [
        3.0,
        0.5,
    ]


def test_per_channel_reduces_over_every_dim_but_axis() -> None:
    obs = MinMaxObserver(QuantSpec(8, symmetric=True, per_channel=True, axis=1))
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = 7.0
    x[0, 0, 0] = -1.0
    obs.observe(x)
    assert obs.min_val.tolist() == [-1.0, 0.0, 0.0] and obs.max_val.tolist() == [0.0, 0.0, 7.0]
    with pytest.raises(ValueError, match=r"per-channel axis 1 does not exist in a tensor of shape"):
        obs.observe(torch.zeros(5))


def test_moving_average_observer() -> None:
    obs = MovingAverageMinMaxObserver(ACTIVATION_SPEC, averaging_constant=0.25)
    obs.observe(torch.tensor([-4.0, 4.0]))
    obs.observe(torch.tensor([0.0, 8.0]))
    assert obs.min_val.item() == -3.0 and obs.max_val.item() == 5.0
    last = make_observer("last_value", ACTIVATION_SPEC)
    last.observe(torch.tensor([-4.0, 4.0]))
    last.observe(torch.tensor([0.3, 0.7]))
    assert last.min_val.item() == pytest.approx(0.3) and last.max_val.item() == pytest.approx(0.7)


def test_observer_freeze_and_errors() -> None:
    obs = MinMaxObserver(ACTIVATION_SPEC)
    with pytest.raises(
        RuntimeError, match=r"MinMaxObserver has not observed any data.*calibration"
    ):
        obs.qparams()
    obs.observe(torch.tensor([0.0, 1.0]))
    obs.freeze()
    obs.observe(torch.tensor([5.0]))
    assert obs.max_val.item() == 1.0
    obs.unfreeze()
    obs.observe(torch.tensor([5.0]))
    assert obs.max_val.item() == 5.0
    with pytest.raises(ValueError, match=r"averaging_constant=0 must be in \(0, 1\]"):
        MovingAverageMinMaxObserver(ACTIVATION_SPEC, averaging_constant=0)
    with pytest.raises(ValueError, match=r"observer='ema' is not known: allowed 'minmax', "):
        make_observer("ema", ACTIVATION_SPEC)
    with pytest.raises(TypeError, match=r"MinMaxObserver needs a QuantSpec, got 8"):
        MinMaxObserver(8)  # type: ignore[arg-type]
    assert ObserverKind.parse(ObserverKind.MINMAX) is ObserverKind.MINMAX


def test_observer_state_dict_round_trip_adopts_per_channel_shape() -> None:
    obs = MovingAverageMinMaxObserver(WEIGHT_SPEC)
    obs.observe(torch.randn(6, 5))
    obs.freeze()
    fresh = MovingAverageMinMaxObserver(WEIGHT_SPEC)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.max_val, obs.max_val)
    assert bool(fresh.frozen)
    assert all(torch.equal(a, b) for a, b in zip(fresh.qparams(), obs.qparams(), strict=True))


# FakeQuantizer -----------------------------------------------------------------------------------


def test_fake_quantizer_training_then_eval() -> None:
    fq = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
    x = torch.tensor([-1.0, 0.5, 3.0])
    y = fq(x)
    scale, zp = fq.qparams()
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127))
    fq.eval()
    fq(torch.tensor([100.0]))
    assert fq.observer.max_val.item() == 3.0  # eval does not observe
    assert int(fq.steps) == 1


def test_fake_quantizer_eval_without_calibration_errors() -> None:
    fq = FakeQuantizer().eval()
    with pytest.raises(RuntimeError, match=r"never observed data. Calibration data must pass"):
        fq(torch.ones(2))


def test_fake_quantizer_disabled_passes_through_but_observes() -> None:
    fq = FakeQuantizer(observer="minmax")
    fq.enable(False)
    x = torch.tensor([0.1234, 2.0])
    assert torch.equal(fq(x), x)
    assert fq.observed and fq.observer.max_val.item() == 2.0
    fq.enable()
    assert not torch.equal(fq(x), x)


def test_fake_quantizer_freeze_after() -> None:
    fq = FakeQuantizer(observer="minmax", freeze_after=2)
    fq(torch.tensor([1.0]))
    fq(torch.tensor([2.0]))
    fq(torch.tensor([9.0]))
    assert fq.observer.max_val.item() == 2.0 and int(fq.steps) == 2 and bool(fq.observer.frozen)
    fq.unfreeze()
    fq(torch.tensor([9.0]))
    assert fq.observer.max_val.item() == 9.0
    with pytest.raises(ValueError, match=r"freeze_after=0 must be a positive int"):
        FakeQuantizer(freeze_after=0)


def test_fake_quantizer_shared_between_callers() -> None:
    shared = FakeQuantizer(observer="minmax")
    a = torch.tensor([0.0, 1.0])
    b = torch.tensor([-3.0, 0.5])
    ya, yb = shared(a), shared(b)  # two graph points, one scale
    assert shared.observer.min_val.item() == -3.0 and shared.observer.max_val.item() == 1.0
    assert int(shared.steps) == 2
    scale, zp = shared.qparams()
    assert torch.equal(yb, torch.fake_quantize_per_tensor_affine(b, scale, zp, -128, 127))
    assert ya.shape == a.shape


def test_fake_quantizer_state_dict_round_trip() -> None:
    fq = FakeQuantizer(WEIGHT_SPEC, observer="moving_average", freeze_after=5)
    for _ in range(3):
        fq(torch.randn(4, 3))
    fresh = FakeQuantizer(WEIGHT_SPEC, observer="moving_average", freeze_after=5)
    fresh.load_state_dict(fq.state_dict())
    x = torch.randn(4, 3)
    assert torch.equal(fresh.eval()(x), fq.eval()(x)) and int(fresh.steps) == 3


def test_observers_all_reduce_under_distributed(tmp_path: Path) -> None:
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        obs = MinMaxObserver(WEIGHT_SPEC)
        obs.observe(torch.tensor([[1.0, -2.0]]))
        assert obs.min_val.tolist() == [-2.0] and obs.max_val.tolist() == [1.0]
    finally:
        dist.destroy_process_group()


def test_observer_reset() -> None:
    obs = MinMaxObserver(WEIGHT_SPEC)
    obs.observe(torch.ones(3, 2))
    obs.reset()
    assert not obs.observed and obs.min_val.shape == (3,)
    with pytest.raises(RuntimeError, match=r"has not observed any data"):
        obs.qparams()
    obs.observe(torch.full((3, 2), -2.0))
    assert obs.min_val.tolist() == [-2.0] * 3


@pytest.mark.parametrize("zero_point", [-128, -3, 0, 77, 127])
def test_fast_per_tensor_path_equals_torch_values_and_gradients(zero_point):
    """The per-tensor fast path must equal torch's kernel bit for bit, rounding ties included."""
    scale = torch.tensor(0.0173)
    steps = torch.arange(-300, 300, dtype=torch.float32)
    ties = (steps + 0.5) * scale  # exactly between two grid points (up to float32 rounding)
    x = torch.cat([ties, torch.randn(5000) * 3, torch.tensor([0.0, -0.0, 1e6, -1e6])])
    x = x.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours = fake_quantize(x, scale, torch.tensor(zero_point, dtype=torch.int32), ACTIVATION_SPEC)
    ref = torch.fake_quantize_per_tensor_affine(x_ref, scale, torch.tensor(zero_point), -128, 127)
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_float64_input_takes_torchs_own_path():
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    out = fake_quantize(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), ACTIVATION_SPEC)
    assert out.dtype == torch.float64


def test_zero_point_rounds_ties_away_from_zero() -> None:
    # scale 255/16 / 255 = 1/16 exactly and min / scale = -2.5: TfLiteRound gives -3, so the
    # zero point is -128 + 3 (rounding half to even would give -126)
    scale, zp = compute_qparams(torch.tensor(-0.15625), torch.tensor(15.78125), ACTIVATION_SPEC)
    assert scale.item() == 0.0625 and zp.item() == -125


@pytest.mark.parametrize(
    "change",
    ["observe", "load_state_dict", "floor", "reset", "deepcopy"],
)
def test_cached_qparams_follow_every_change_of_the_range(change: str) -> None:
    """Observer.qparams keeps its result until the range or the floor changes, however it does."""
    import copy

    fq = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
    fq(torch.tensor([-1.0, 1.0]))
    before = fq.qparams()[0].item()
    assert fq.qparams()[0] is fq.qparams()[0]  # cached: one forward asks several times
    if change == "observe":
        fq(torch.tensor([-4.0, 4.0]))  # min / max updated in place (out=)
    elif change == "load_state_dict":
        other = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
        other(torch.tensor([-4.0, 4.0]))
        fq.load_state_dict(other.state_dict())  # copy_ into the same buffers
    elif change == "floor":
        fq.add_scale_floor(_Floor(1.0))
        fq(torch.tensor([-1.0, 1.0]))  # the floor buffer is updated in place
    elif change == "reset":
        fq.observer.reset()
        fq.observer.observe(torch.tensor([-4.0, 4.0]))
    else:
        fq.observer.min_val.fill_(-4.0)
        fq.observer.max_val.fill_(4.0)
        fq = copy.deepcopy(fq)
    after = fq.qparams()[0].item()
    expected = 1.0 if change == "floor" else 8.0 / 255.0
    assert before == pytest.approx(2.0 / 255.0) and after == pytest.approx(expected)


class _Floor:
    """A scale floor source (an object, as add_scale_floor asks, not a lambda)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> torch.Tensor:
        return torch.tensor(self.value)
