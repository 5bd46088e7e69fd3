"""Tests of edgekiln.pipeline.constraints, and of the sparsity report of constrained models."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

from edgekiln.pipeline import constraints, sparsity
from edgekiln.pipeline.constraints import (
    L1,
    L2,
    Clip,
    FakeQuant,
    Pattern,
    PatternKind,
    Prune,
    Transform,
    apply_projections,
    constrain,
    constraints_of,
    prune_mask,
    weight_quantizer,
)
from edgekiln.pipeline.quant import ACTIVATION_SPEC, WEIGHT_SPEC, QuantSpec, weight_spec
from edgekiln.pipeline.schedules import PolynomialDecay
from edgekiln.pipeline.sparsity import sparsity_report


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny and the CI box is shared (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_doctests() -> None:
    for module in (constraints, sparsity):
        assert doctest.testmod(module, raise_on_error=False).failed == 0


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, check=None) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, 6, 6)
        out = model(x)
        loss = out.square().mean() - out.mean()  # pushes weights around
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if check is not None:
            check()


# Forward-time constraints -------------------------------------------------------------------------


def test_fake_quant_kernel_equals_torch_per_channel() -> None:
    conv = nn.Conv2d(3, 6, 3)
    stored = conv.weight.detach().clone()
    constrain(conv, FakeQuant())
    quantizer = weight_quantizer(conv)
    assert quantizer is not None
    scale, zp = quantizer.qparams()
    assert scale.shape == (6,) and zp.dtype == torch.int32
    expected = torch.fake_quantize_per_channel_affine(stored, scale, zp, 0, -127, 127)
    assert torch.equal(conv.weight, expected)
    assert torch.equal(conv.eval().weight, expected)  # eval needs no calibration for weights


def test_fake_quant_other_spec_and_observer() -> None:
    lin = constrain(nn.Linear(4, 3), FakeQuant(weight_spec(4), observer="minmax", freeze_after=2))
    quantizer = weight_quantizer(lin)
    assert quantizer is not None and quantizer.spec.qmax == 7
    codes = lin.weight / quantizer.qparams()[0].reshape(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4


def test_transform_applied_with_gradient() -> None:
    lin = nn.Linear(3, 2)
    stored = lin.weight.detach().clone()
    constrain(lin, Transform(lambda w: 2 * w, name="double"))
    assert torch.equal(lin.weight, 2 * stored)
    lin(torch.ones(1, 3)).sum().backward()
    original = lin.parametrizations.weight.original
    assert original.grad is not None and torch.equal(original.grad, torch.full((2, 3), 2.0))
    assert repr(constraints_of(lin)[0]) == "Transform(double)"


def test_prune_then_fake_quant_composition_keeps_exact_zeros() -> None:
    lin = constrain(nn.Linear(16, 8), Prune(0.75), FakeQuant())
    mask = prune_mask(lin)
    assert mask is not None and int((mask == 0).sum()) == 96
    assert torch.equal(lin.weight == 0, mask == 0) or bool((lin.weight[mask == 0] == 0).all())
    assert constraints_of(lin)[0] == Prune(0.75)


# Masks through optimizers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_masks_survive_100_optimizer_steps(make_optimizer) -> None:
    model = _cnn()
    for layer in _layers(model):
        constrain(layer, Prune(0.5), FakeQuant())
    masks = {id(layer): prune_mask(layer).clone() for layer in _layers(model)}  # type: ignore[union-attr]
    optimizer = make_optimizer(model.parameters())

    def check() -> None:
        for layer in _layers(model):
            mask = prune_mask(layer)
            assert mask is not None and torch.equal(mask, masks[id(layer)])
            kernel = layer.weight
            assert bool((kernel[mask == 0] == 0).all()), "a pruned weight came back"

    _train(model, optimizer, 100, check)
    apply_projections(model)
    for layer in _layers(model):
        mask = prune_mask(layer)
        stored = layer.parametrizations.weight.original
        assert bool((stored[mask == 0] == 0).all())  # stored tensor zeroed too
        assert float((layer.weight == 0).float().mean()) >= 0.5


def test_two_of_four_holds_exactly() -> None:
    model = _cnn()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        constrain(conv, Prune(pattern="2:4"), FakeQuant())
    _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 20)
    for conv in convs:
        mask = prune_mask(conv)
        assert mask is not None
        groups = mask.movedim(1, -1).reshape(-1, 4)  # 4 consecutive input channels
        assert torch.equal(groups.sum(dim=1), torch.full((groups.shape[0],), 2.0))
        kernel = conv.weight.movedim(1, -1).reshape(-1, 4)
        assert bool(((kernel != 0).sum(dim=1) <= 2).all())


def test_one_of_four_and_channel_patterns() -> None:
    lin = constrain(nn.Linear(8, 4), Prune(pattern="1:4"))
    assert float((lin.weight == 0).float().mean()) == 0.75
    conv = nn.Conv2d(2, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(8.0).reshape(8, 1, 1, 1).expand(8, 2, 3, 3))
    constrain(conv, Prune(0.25, pattern="channel"))
    zero_filters = (conv.weight.reshape(8, -1) == 0).all(dim=1)
    assert zero_filters.tolist() == [True, True] + [False] * 6  # the two smallest L2 norms


def test_polynomial_schedule_ramps_and_masks_never_revive() -> None:
    lin = nn.Linear(20, 10)
    schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10, frequency=2, power=1)
    constrain(lin, Prune(schedule))
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.5)
    previous = prune_mask(lin).clone()  # type: ignore[union-attr]
    seen = []
    for step in range(1, 14):
        optimizer.zero_grad()
        lin(torch.randn(4, 20)).sum().backward()
        optimizer.step()
        apply_projections(lin)
        mask = prune_mask(lin)
        assert mask is not None
        assert bool((mask <= previous).all()), "a pruned weight came back"
        previous = mask.clone()
        seen.append((step, round(1 - float(mask.mean()), 2)))
    assert seen[:5] == [(1, 0.0), (2, 0.16), (3, 0.16), (4, 0.32), (5, 0.32)]
    assert seen[-1] == (13, 0.8)
    assert int(lin.parametrizations.weight[0].step) == 14


# Projections -------------------------------------------------------------------------------------


def test_clip_respected_after_every_step() -> None:
    model = _cnn()
    for layer in _layers(model):
        constrain(layer, Clip(-0.05, 0.05))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def check() -> None:
        apply_projections(model)
        for layer in _layers(model):
            stored = layer.parametrizations.weight.original
            assert stored.min() >= -0.05 and stored.max() <= 0.05
            assert layer.weight.abs().max() <= 0.05

    check()
    _train(model, optimizer, 10, check)


def test_projection_runs_before_training_forward_only() -> None:
    lin = constrain(nn.Linear(2, 1), Clip(-1.0, 1.0))
    original = lin.parametrizations.weight.original
    with torch.no_grad():
        original.fill_(5.0)
    lin.eval()
    lin(torch.ones(1, 2))
    assert original.max().item() == 5.0  # eval: no side effect
    lin.train()
    with torch.no_grad():
        lin(torch.ones(1, 2))
    assert original.max().item() == 5.0  # no grad: no side effect
    lin(torch.ones(1, 2))
    assert original.max().item() == 1.0


def test_l1_gives_exact_zeros_and_l2_shrinks() -> None:
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.05, -0.2, 0.5, -0.01]]))
    constrain(lin, L1(0.1))
    assert lin.weight.tolist() == [[0.0, pytest.approx(-0.1), pytest.approx(0.4), 0.0]]
    assert int((lin.weight == 0).sum()) == 2

    lin2 = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin2.weight.copy_(torch.tensor([[1.0, -3.0]]))
    constrain(lin2, L2(0.5))
    assert lin2.weight.tolist() == [[pytest.approx(2 / 3), pytest.approx(-2.0)]]


def test_l1_under_training_produces_zeros() -> None:
    model = _cnn()
    for layer in _layers(model):
        constrain(layer, L1(2e-3), FakeQuant())
    _train(model, torch.optim.SGD(model.parameters(), lr=1e-3), 30)
    report = sparsity_report(model)
    assert report.zeros > 0 and report.sparsity > 0.05


def test_projection_once_per_optimizer_step_with_gradient_accumulation() -> None:
    lin = constrain(nn.Linear(3, 2), L1(0.01), Prune(0.5))
    prune_module = lin.parametrizations.weight[1]
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    assert int(prune_module.step) == 1  # step 0 ran in constrain()
    for _ in range(3):  # three micro-batches, one optimizer step
        lin(torch.randn(2, 3)).sum().backward()
    assert int(prune_module.step) == 1
    optimizer.step()
    lin(torch.randn(2, 3))
    lin(torch.randn(2, 3))
    assert int(prune_module.step) == 2
    assert apply_projections(lin) == 0


def test_constrain_appends() -> None:
    lin = constrain(nn.Linear(4, 4), Clip(-1, 1))
    constrain(lin, Prune(0.5))
    constrain(lin, FakeQuant())
    assert [type(c) for c in constraints_of(lin)] == [Clip, Prune, FakeQuant]
    assert float((lin.weight == 0).float().mean()) == 0.5


def test_constrain_other_tensor_name() -> None:
    lin = nn.Linear(4, 4)
    constrain(lin, Clip(-0.01, 0.01), name="bias")
    assert lin.bias.abs().max() <= 0.01 and constraints_of(lin) == []
    assert constraints_of(lin, "bias") == [Clip(-0.01, 0.01)]
    assert weight_quantizer(lin) is None and prune_mask(lin) is None


def test_reprs() -> None:
    assert repr(Clip(-1, 1)) == "Clip(min=-1.0, max=1.0)"
    assert repr(L1(1e-3)) == "L1(strength=0.001)"
    assert repr(L2(0)) == "L2(strength=0.0)"
    assert repr(Prune(pattern="2:4")) == "Prune(sparsity=None, pattern='2:4')"
    assert repr(Transform(torch.tanh)) == "Transform(tanh)"
    assert "observer=<ObserverKind.LAST_VALUE" in repr(FakeQuant())
    assert Pattern.parse("unstructured").kind is PatternKind.UNSTRUCTURED


# State -------------------------------------------------------------------------------------------


def _constrained_cnn() -> nn.Sequential:
    model = _cnn()
    schedule = PolynomialDecay(0.2, 0.6, begin_step=0, end_step=6, frequency=2)
    for layer in _layers(model):
        constrain(layer, Clip(-0.5, 0.5), Prune(schedule), FakeQuant(observer="moving_average"))
    return model


def test_state_dict_round_trip() -> None:
    model = _constrained_cnn()
    _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 4)
    state = copy.deepcopy(model.state_dict())
    assert any(k.endswith("weight.2.quantizer.observer.min_val") for k in state)
    assert any(k.endswith("weight.1.mask") for k in state)

    fresh = _constrained_cnn()
    torch.manual_seed(123)
    for p in fresh.parameters():  # make sure nothing matches by accident
        p.data.normal_()
    fresh.load_state_dict(state)
    for a, b in zip(_layers(model), _layers(fresh), strict=True):
        pa, pb = a.parametrizations.weight, b.parametrizations.weight
        assert torch.equal(pa[1].mask, pb[1].mask) and int(pa[1].step) == int(pb[1].step)
        assert torch.equal(pa[2].quantizer.observer.min_val, pb[2].quantizer.observer.min_val)
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(model.eval()(x), fresh.eval()(x))

    # Training continues identically: the load counts as projected, schedules in step.
    model.train()
    fresh.train()
    for m in (model, fresh):
        _train(m, torch.optim.SGD(m.parameters(), lr=1e-2), 3)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert [int(layer.parametrizations.weight[1].step) for layer in _layers(fresh)] == [
        7,
        7,
        7,
    ]  # one pending


def test_deepcopy_keeps_constraints_and_hooks() -> None:
    model = _constrained_cnn()
    twin = copy.deepcopy(model)
    _train(twin, torch.optim.Adam(twin.parameters(), lr=0.5), 2)
    twin(torch.randn(1, 4, 6, 6))  # the pre-hook projects the last step
    for layer in _layers(twin):
        stored = layer.parametrizations.weight.original
        assert stored.abs().max() <= 0.5  # the copy's projections ran


def test_sparsity_report_reads_forward_kernel() -> None:
    model = _cnn()
    constrain(model[0], Prune(0.5))
    report = sparsity_report(model)
    assert [row.path for row in report.layers] == ["0", "2", "6"]
    assert report.layers[0].sparsity == 0.5 and report.layers[0].shape == (8, 4, 3, 3)
    assert report.layers[0].zeros == 144 and report.layers[1].zeros == 0
    as_dict = report.as_dict()
    assert as_dict["zeros"] == 144 and as_dict["layers"][0]["sparsity"] == 0.5
    assert as_dict["total"] == 288 + 576 + 32


# Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Clip(1, -1), ValueError, r"Clip\(min=1.0, max=-1.0\) needs min < max"),
        (lambda: Clip(float("nan"), 1), ValueError, r"Clip\(min=nan\): min must be a finite"),
        (lambda: Clip(0, "1"), ValueError, r"Clip\(max='1'\): max must be a finite number"),
        (lambda: L1(-1), ValueError, r"L1\(strength=-1.0\): strength must be >= 0"),
        (lambda: L2(float("inf")), ValueError, r"L2\(strength=inf\): strength must be a finite"),
        (lambda: Transform(3), TypeError, r"Transform needs a callable tensor -> tensor, got int"),
        (lambda: Prune(), ValueError, r"Prune\(pattern='unstructured'\) needs a sparsity"),
        (lambda: Prune(1.0), ValueError, r"Prune\(sparsity=1.0\): .*allowed \[0, 1\)"),
        (lambda: Prune("half"), ValueError, r"Prune\(sparsity='half'\): sparsity must be a number"),
        (
            lambda: Prune(0.3, pattern="2:4"),
            ValueError,
            r"the 2:4 pattern fixes the sparsity at 0.5; leave sparsity out or pass 0.5",
        ),
        (
            lambda: Prune(PolynomialDecay(0, 0.5, 0, 10), pattern="2:4"),
            ValueError,
            r"Prune\(pattern='2:4'\) prunes all at once .* a schedule cannot ramp it",
        ),
        (lambda: Prune(0.5, pattern="4:2"), ValueError, r"pattern='4:2' is not known: allowed"),
        (lambda: Prune(0.5, pattern="block"), ValueError, r"pattern='block' is not known"),
        (lambda: FakeQuant(8), ValueError, r"FakeQuant\(spec=8\): spec must be a QuantSpec"),
        (lambda: FakeQuant(observer="ema"), ValueError, r"observer='ema' is not known"),
        (
            lambda: FakeQuant(freeze_after=-3),
            ValueError,
            r"FakeQuant\(freeze_after=-3\): must be a positive int or None",
        ),
    ],
)
def test_constraint_config_errors(build, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_constrain_errors() -> None:
    with pytest.raises(TypeError, match=r"constrain\(\) needs an nn.Module, got Tensor"):
        constrain(torch.zeros(2), Clip(-1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"constrain\(Linear.weight\) got no constraints"):
        constrain(nn.Linear(2, 2))
    with pytest.raises(
        TypeError,
        match=r"constrain\(Linear.weight\): argument 1 is float 0.5, not a Constraint; allowed",
    ):
        constrain(nn.Linear(2, 2), 0.5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"Linear has no parameter 'kernel' to constrain; its parameters: "
        r"\['weight', 'bias'\]",
    ):
        constrain(nn.Linear(2, 2), Clip(-1, 1), name="kernel")
    with pytest.raises(ValueError, match=r"Linear.weight: Clip\(.*\) comes after FakeQuant"):
        constrain(nn.Linear(2, 2), FakeQuant(), Clip(-1, 1))
    with pytest.raises(ValueError, match=r"comes after FakeQuant, but FakeQuant must be the last"):
        constrain(nn.Linear(2, 2), FakeQuant(), FakeQuant())
    layer = constrain(nn.Linear(4, 2), Prune(0.5))
    with pytest.raises(
        ValueError, match=r"Linear.weight already has a Prune constraint and cannot carry two"
    ):
        constrain(layer, Prune(0.7))
    with pytest.raises(ValueError, match=r"L1\(strength=0.1\) comes after a Transform"):
        constrain(nn.Linear(2, 2), Transform(torch.tanh), L1(0.1))
    with pytest.raises(
        ValueError,
        match=r"Conv2d.weight: pattern '2:4' groups 4 consecutive input elements \(dim 1\) but "
        r"the tensor has shape \(4, 3, 3, 3\)",
    ):
        constrain(nn.Conv2d(3, 4, 3), Prune(pattern="2:4"))
    with pytest.raises(
        ValueError,
        match=r"Linear.bias: per-channel axis 1 does not exist in a tensor of shape \(2,\)",
    ):
        constrain(nn.Linear(2, 2), FakeQuant(QuantSpec(8, per_channel=True, axis=1)), name="bias")


def test_accepted_specs() -> None:
    lin = constrain(nn.Linear(2, 2), FakeQuant(ACTIVATION_SPEC))
    quantizer = weight_quantizer(lin)
    assert quantizer is not None and quantizer.spec == ACTIVATION_SPEC
    assert FakeQuant().spec == WEIGHT_SPEC
