"""2:4 through QAT into the .tflite, prune-then-QAT phases with frozen masks, and the errors of
the new sparsity settings."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgekiln.exporters.tflite import tflite_bytes
from edgekiln.formats.tflite import read_tflite
from edgekiln.models import load_dataset, small_cnn
from edgekiln.pipeline.capture import capture
from edgekiln.pipeline.constraints import (
    ChannelGroup,
    FakeQuant,
    Prune,
    apply_projections,
    constrain,
    freeze_masks,
    prune_mask,
    set_fake_quant,
    start_qat,
    weight_quantizer,
)
from edgekiln.pipeline.prepare import prepare
from edgekiln.pipeline.recipe import Recipe, SparsityMode
from edgekiln.pipeline.schedules import PolynomialDecay
from edgekiln.pipeline.train import TrainConfig, fit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread. On 2 shared cores, torch's default thread pool makes these
    steps ~50x slower (measured 8 s vs 0.16 s for 50 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_of_four_groups(model_bytes: bytes) -> dict[str, int]:
    """Weights of every CONV_2D / FULLY_CONNECTED with >= 4 inputs -> groups with < 2 zeros."""
    model = read_tflite(model_bytes)
    bad = {}
    for op in model.operators:
        if op.opcode not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        w = model.tensor(op.inputs[1])
        if w.shape[-1] % 4:
            continue  # no complete group along the input dim (a first conv on 1 channel)
        groups = w.data.reshape(-1, 4)  # (O, kh, kw, I) or (O, I): input dim last
        bad[w.name] = int(np.sum((groups == 0).sum(axis=1) < 2))
    return bad


def test_two_of_four_survives_qat_and_export():
    data = load_dataset("digits", limit=256)
    torch.manual_seed(0)
    net = small_cnn(input_size=8)
    example = torch.from_numpy(data.x_train[:32])
    with pytest.warns(UserWarning, match=r"they stay dense: stem\.0 \(1 inputs\)"):
        model = prepare(net.eval(), example, Recipe(pattern="2:4"))
    assert prune_mask(model.get_submodule("fc")) is not None
    fit(model, data.x_train, data.y_train, TrainConfig(epochs=1, batch_size=32, lr=1e-3))
    bad = _two_of_four_groups(tflite_bytes(capture(model.eval())))
    assert len(bad) == 4 and "fc.weight" in bad  # 3 convs + the fc after the flatten
    assert bad == dict.fromkeys(bad, 0)


def test_n_of_m_after_a_flatten_groups_channels_at_each_position():
    fc = nn.Linear(8 * 2 * 2, 3)
    constrain(fc, Prune(pattern="2:4", flattened_from=(8, 2, 2)), FakeQuant())
    mask = prune_mask(fc).reshape(3, 8, 4)  # (O, C, H * W): NCHW columns
    per_group = mask.reshape(3, 2, 4, 4).sum(dim=2)  # 4 consecutive channels at one position
    assert torch.all(per_group == 2)


def _phase_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=20, frequency=5)
    recipe = Recipe(sparsity=schedule, sparsity_mode="prune_then_qat")
    return prepare(net, torch.randn(4, 2, 6, 6), recipe)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    torch.manual_seed(1)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 2, 6, 6)).square().mean().backward()
        opt.step()


def test_prune_then_qat_masks_never_come_back():
    model = _phase_model()
    conv = model.get_submodule("0")
    assert not bool(weight_quantizer(conv).enabled)  # phase 1: pruning only
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    _steps(model, opt, 25)  # past the schedule's end
    start_qat(model)
    assert bool(weight_quantizer(conv).enabled)
    masks = {n: prune_mask(model.get_submodule(n)).clone() for n in ("0", "3")}
    _steps(model, opt, 100)
    apply_projections(model)  # the last step's projection (the next forward would run it)
    for name, before in masks.items():
        layer = model.get_submodule(name)
        assert torch.equal(prune_mask(layer), before)
        assert torch.all(layer.parametrizations.weight.original[before == 0] == 0)
        assert torch.all(layer.weight[before == 0] == 0)
        assert abs(float(1 - before.mean()) - 0.5) < 0.01


def test_freezing_before_the_schedule_ends_warns():
    model = _phase_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, opt, 6)
    with pytest.warns(UserWarning, match=r"masks frozen below their schedule's final sparsity: "):
        assert freeze_masks(model) == 2


def test_capture_with_fake_quant_off_warns():
    model = _phase_model()
    _steps(model, torch.optim.SGD(model.parameters(), lr=0.01), 2)
    with pytest.warns(UserWarning, match=r"capturing with fake-quantization off .* start_qat"):
        capture(model.eval())
    set_fake_quant(model, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture(model.eval())


def test_frozen_flag_travels_and_old_checkpoints_load():
    model = _phase_model()
    state = model.state_dict()
    key = next(k for k in state if k.endswith(".frozen"))
    del state[key]  # a checkpoint from before masks could freeze
    model.load_state_dict(state)
    with pytest.warns(UserWarning, match="masks frozen below"):  # the schedule has not run
        start_qat(model)
    assert bool(model.state_dict()[key])


def test_channel_pruning_masks_the_bias():
    conv = nn.Conv2d(2, 4, 3)
    constrain(conv, Prune(0.5, pattern="channel"), FakeQuant())
    dead = prune_mask(conv).reshape(4, -1).sum(dim=1) == 0
    assert int(dead.sum()) == 2 and torch.all(conv.bias[dead] == 0)
    assert torch.all(conv.bias[~dead] != 0)


def test_recipe_mode_and_sweep():
    doc = {"sparsity": {"target": 0.5, "pattern": "channel", "mode": "prune_then_qat",
                        "sweep": [0.25, 0.5, 0.75]}}  # fmt: skip
    r = Recipe.from_tables(doc)
    assert r.sparsity_mode is SparsityMode.PRUNE_THEN_QAT and r.sparsity_sweep == (0.25, 0.5, 0.75)
    assert r.at_sparsity(0.75).sparsity == 0.75 and r.at_sparsity(0.75).sparsity_sweep == ()
    ramp = Recipe(sparsity=PolynomialDecay(0.2, 0.8, 0, 100), sparsity_sweep=[0.1])
    point = ramp.at_sparsity(0.1).sparsity
    assert (point.initial_sparsity, point.final_sparsity, point.end_step) == (0.1, 0.1, 100)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: Recipe(sparsity_mode="later"),
            r"\[sparsity\] mode = 'later' is not valid: allowed 'joint', 'prune_then_qat'",
        ),
        (
            lambda: Recipe(sparsity_sweep=[0.5, 0.25]),
            r"\[sparsity\] sweep = \[0.5, 0.25\] is not valid: allowed a list of sparsity "
            r"targets in \[0, 1\), ascending",
        ),
        (
            lambda: Recipe(sparsity_sweep=[0.5, 1.0]),
            r"\[sparsity\] sweep = 1.0 is not valid: allowed a finite number \[0.0, 1.0\)",
        ),
        (
            lambda: Recipe(pattern="2:4", sparsity_sweep=[0.5]),
            r"\[sparsity\] sweep = \[0.5\] is not valid: allowed none with pattern '2:4'",
        ),
        (
            lambda: Recipe.from_tables({"quantize": {"sparsity_mode": "joint"}}),
            r"\[quantize\] sparsity_mode belongs in the \[sparsity\] table \(as mode\)",
        ),
        (
            lambda: Prune(0.5, flattened_from=(8, 2, 2)),
            r"Prune\(flattened_from=\(8, 2, 2\), pattern='unstructured'\): flattened_from is a "
            r"tuple of positive ints .* applies to N:M patterns only",
        ),
        (
            lambda: Prune(0.5, group=ChannelGroup([nn.Linear(2, 2)])),
            r"Prune\(group=ChannelGroup\(1 layers\), pattern='unstructured'\): group takes a "
            r"ChannelGroup and applies to pattern='channel' only",
        ),
        (
            lambda: ChannelGroup([nn.Linear(2, 2), nn.Linear(2, 3)]),
            r"ChannelGroup needs layers with one output channel count, got \[2, 3\]",
        ),
        (
            lambda: constrain(nn.Linear(30, 2), Prune(pattern="2:4", flattened_from=(6, 5))),
            r"Linear.weight: Prune\(pattern='2:4', flattened_from=\(6, 5\)\) needs a \(O, 30\) "
            r"kernel with C=6 a multiple of 4; got \(2, 30\)\. Use pattern='unstructured'",
        ),
    ],
)
def test_errors_name_the_rule_and_the_way_out(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_dead_filter_with_a_bias_is_captured():
    """Unstructured pruning can empty a whole filter while its bias stays: capture gives that
    channel a weight scale its bias fits at (any scale represents zero weights)."""
    from edgekiln.ir.reference import run_reference
    from edgekiln.pipeline.train import calibrate

    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight[0].zero_()
        conv.bias.fill_(0.5)
    x = np.random.default_rng(0).normal(0, 1e-3, (16, 2, 6, 6)).astype(np.float32)
    model = prepare(nn.Sequential(conv).eval(), torch.from_numpy(x[:2]))
    calibrate(model, x)
    graph = capture(model.eval())
    q = graph.tensor(graph.inputs[0]).quant.quantize_input(x)
    out = run_reference(graph, q)[graph.outputs[0]]
    with torch.no_grad():
        fq = model(torch.from_numpy(x)).numpy()
    expected = graph.tensor(graph.outputs[0]).quant.quantize(fq)
    assert np.abs(out.astype(int) - expected).max() <= 1  # 1 LSB: int32 bias rounding
