"""Failing examples the generator found, shrunk to small specs and kept as explicit tests.

Fixed bugs stay here as ordinary tests; bugs in files this suite may not change are
``xfail(strict=True)`` tests whose reason names the file and the cause (they start passing,
and so failing the suite, the day the bug is fixed: then drop the marker).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekiln.exporters.tflite import write_tflite
from edgekiln.targets.litert import run_litert
from tests.property.harness import PER_OP_LSB, check_spec, lsb, propagated_bound
from tests.property.strategies import Conv, Data, Head, ModelSpec, Pad, Residual, make_data

# A conv whose bias (-20) makes every output negative, then a ReLU: calibration sees the output
# range [0, 0], which gets the minimum scale (float32 eps); input x filter / output scale ~ 800.
DEAD_RELU = ModelSpec(
    channels=3,
    spatial=(4, 4),
    blocks=(Conv(3, 3, padding=1, activation="relu", bias_shift=-20.0),),
    head=Head("none"),
    data=Data(),
    seed=200,
)

# A huge input range (outliers x 1000) into a conv with ReLU6 (output scale 6 / 255): the int32
# bias step input_scale x weight_scale is ~20 output LSB (XNNPACK refuses the ratio, see above).
# Found by scripts/differential.py --seed 7.
COARSE_BIAS = ModelSpec(
    channels=4,
    spatial=(30,),
    blocks=(Pad(1, 0), Conv(3, 2, padding="same", activation="relu6")),
    head=Head("none", classes=10),
    data=Data("outliers", 3.0, 2151),
    seed=63398,
)


def test_dead_relu_layer_runs_everywhere_within_bounds():
    # Was: the dead output got scale float32 eps, input x filter / output scale ~ 800, and
    # LiteRT's default XNNPACK refused the model. Fixed in prepare.py: conv and linear outputs
    # get a scale floor of input scale x largest weight scale (every multiplier <= 1).
    outcome = check_spec(DEAD_RELU)
    assert outcome.status == "ok", outcome.report()
    assert outcome.refusals == []


def test_xnnpack_refusal_names_the_operator_and_the_way_out(tmp_path):
    """A hand-made graph still carrying a degenerate output scale (the ratio XNNPACK refuses)
    gets a failed target that says why, and runs with xnnpack=False."""
    from edgekiln.ir.builder import GraphBuilder

    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    b = GraphBuilder(x, seed=0)
    dead = b.conv(b.input, 3, 3, padding=1, activation="relu", bias=np.full(3, -100.0))
    path = write_tflite(b.build([dead]), tmp_path / "dead.tflite")
    refused = run_litert(path, x, runs=1, warmup=0)
    assert not refused.ok
    assert "XNNPACK accepts requantization scales below 256" in refused.error
    assert "CONV_2D" in refused.error and "run with xnnpack=False" in refused.error
    assert run_litert(path, x, xnnpack=False, runs=1, warmup=0).ok


def test_coarse_bias_grid_is_inside_the_fake_quant_bound():
    # Was 9 LSB apart: the fake-quantized model added the float bias, the int8 graph the bias
    # rounded to input_scale x weight_scale. Fixed in prepare.py (BiasQuant): training rounds
    # the bias onto that grid too, so the fake-quant model and every runtime agree, and the
    # harness's bound no longer allows a float-bias term (the fake-quant bound here is 1).
    outcome = check_spec(COARSE_BIAS)
    assert outcome.status == "ok", outcome.report()
    diff, bound = outcome.end_to_end["fake_quant"]
    assert diff <= 1 and bound == 1  # was 1 + 20 (the float-bias term) before BiasQuant
    runtimes = set(outcome.end_to_end) - {"fake_quant"}
    assert {"onnxruntime", "litert", "tflm"} <= runtimes
    assert all(outcome.end_to_end[r][0] <= 1 for r in runtimes)


def _prepared(spec: ModelSpec):
    from edgekiln import Recipe, capture, prepare
    from edgekiln.pipeline.train import calibrate, predict
    from tests.property.strategies import build_model

    cal = make_data(spec.data, spec.input_shape, 32, 0)
    x = make_data(spec.data, spec.input_shape, 8, 1)
    p = prepare(build_model(spec), torch.from_numpy(cal[:4]), Recipe(observer=spec.observer))
    calibrate(p, cal, batch_size=8)
    return capture(p.eval()), predict(p, x), x


def test_fake_quant_model_matches_the_int8_graph_with_a_coarse_bias_grid():
    from edgekiln.ir.reference import run_reference

    g, fq, x = _prepared(COARSE_BIAS)
    reference = run_reference(g, g.tensor(g.inputs[0]).quant.quantize(x))[g.outputs[0]]
    got = g.tensor(g.outputs[0]).quant.quantize(fq)
    assert lsb(reference, got) <= propagated_bound(g, PER_OP_LSB["fake_quant"])[g.outputs[0]]


def test_dead_relu_model_runs_on_litert_default_kernels(tmp_path):
    g, _, x = _prepared(DEAD_RELU)
    r = run_litert(write_tflite(g, tmp_path / "m.tflite"), x, runs=1, warmup=0)
    assert r.ok, r.error


class _ConvIdentityRelu(nn.Module):
    """The common ``bn = BatchNorm2d(c) if use_bn else nn.Identity()`` pattern, without BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def test_prepare_accepts_identity_between_conv_and_relu():
    from edgekiln import prepare

    prepare(_ConvIdentityRelu().eval(), torch.zeros(2, 2, 6, 6))


# Was a strict xfail (capture refused: "a bias does not fit int32"); fixed in capture.py (fb759fe)
# by raising an all-zero filter's weight scale at capture. Now prepare floors every weight scale
# in training (see NEAR_ZERO_INPUT below), which covers this filter, and capture's refit is gone.
def test_capture_accepts_a_dead_output_channel_with_a_bias():
    from edgekiln import capture, prepare
    from edgekiln.pipeline.train import calibrate

    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight[0].zero_()
        conv.bias.fill_(0.5)
    x = np.random.default_rng(0).normal(0, 1e-3, (16, 2, 6, 6)).astype(np.float32)
    p = prepare(nn.Sequential(conv).eval(), torch.from_numpy(x[:2]))
    calibrate(p, x)
    capture(p.eval())


# Found by the 10-minute long run (scripts/differential.py --seed 1), shrunk by hand: a 1-D
# residual add calibrated on all-zero data (input scale float32 eps).
ZERO_RESIDUAL_1D = ModelSpec(
    channels=1,
    spatial=(18,),
    blocks=(Residual(kernel=3, activation="relu"),),
    head=Head("none"),
    data=Data("zeros", seed=516),
    seed=826,
)


# Was a strict xfail: LiteRT computed this ADD 255 LSB off at a float32-eps input scale. The
# add's output scale floor (largest input scale / 128, prepare.py) avoids that degenerate scale,
# and LiteRT now matches the reference.
def test_litert_add_on_a_zero_range_1d_residual():
    outcome = check_spec(ZERO_RESIDUAL_1D)
    assert outcome.status == "ok", outcome.report()


def test_zero_range_1d_residual_is_exact_on_tflm_and_onnxruntime():
    outcome = check_spec(ZERO_RESIDUAL_1D)
    assert outcome.max_step_lsb["tflm"]["add"] == 0
    assert outcome.max_step_lsb["onnxruntime"]["add"] == 0
    assert outcome.end_to_end["tflm"][0] == 0 and outcome.end_to_end["onnxruntime"][0] == 0
    assert outcome.max_step_lsb["litert"]["add"] == 0  # 255 before the add scale floor


# Found by the 8-minute long run after the pipeline fixes (scripts/differential.py --seed 1):
# all-negative data into a residual block whose ReLU follows the add, in 2-D this time.
NEGATIVE_RESIDUAL_2D = ModelSpec(
    channels=1,
    spatial=(4, 4),
    blocks=(Residual(kernel=3, activation="relu", inner_relu=False),),
    head=Head("mean", classes=2),
    data=Data("negative", 3.0, 2),
    observer="minmax",
    seed=1,
)


# Was a strict xfail: LiteRT's builtin int8 ADD holds the requantized sum in int16, and an add
# output scale of max(input scales) / 128 let it wrap (127 for -128, 255 LSB). The floor is now
# (s_a + s_b) / ADD_INT16_STEPS (prepare.py), and LiteRT matches the reference.
def test_litert_add_on_a_negative_residual_2d():
    outcome = check_spec(NEGATIVE_RESIDUAL_2D)
    assert outcome.status == "ok", outcome.report()


def test_negative_residual_2d_is_exact_on_tflm_and_onnxruntime():
    outcome = check_spec(NEGATIVE_RESIDUAL_2D)
    assert outcome.max_step_lsb["tflm"]["add"] == 0
    assert outcome.max_step_lsb["onnxruntime"]["add"] == 0
    assert outcome.max_step_lsb["litert"]["add"] == 0  # 255 before the int16 floor
    # the static bound reaches the int8 span here (the residual's gain), the per-value one,
    # which sees the ReLU after the add saturate, still checks every output value
    assert outcome.static_bound["tflm"] == 255
    assert outcome.vacuous == [] and outcome.end_to_end["tflm"][1] < 255


# Data near zero (normal x 1e-6: input scale MIN_SCALE) into a conv with a sizeable bias: the
# int32 bias grid input_scale x weight_scale (~2e-10) holds 2.x in ~1e10 steps, over int32.
NEAR_ZERO_INPUT = ModelSpec(
    channels=2,
    spatial=(6, 6),
    blocks=(Conv(4, 3, padding=1, activation="relu", bias_shift=2.0),),
    head=Head("none"),
    data=Data("normal", -6.0, 5),
    seed=3,
)

# Found by scripts/differential.py --models 40 --seed 1 (1 of 40 refused; 21 of 300): all-zero
# data into a depthwise conv with a dead filter and biases near 20, then a grouped conv and a head.
ZERO_INPUT_DEPTHWISE = ModelSpec(
    channels=3,
    spatial=(12, 11),
    blocks=(
        Conv(
            6,
            1,
            padding="same",
            groups="dw",
            activation="relu6",
            bias_shift=20.0,
            dead_channel=True,
        ),
        Conv(4, 1, padding="same", groups=2, batch_norm=True),
    ),
    head=Head("mean", hidden=8, classes=8, softmax=True),
    data=Data("zeros", 0.0, 225),
    observer="moving_average",
    sparsity=0.5,
    seed=359,
)


# Was refused at capture ("a bias does not fit int32 at scale input x weight scale"): only an
# all-zero filter got a coarser weight scale, at capture. Fixed in prepare.py: every conv and
# linear weight scale is floored in training to |bias| / (input_scale x 2**30), so the bias fits
# and the fake-quant model still computes what the int8 graph computes.
@pytest.mark.parametrize("spec", [NEAR_ZERO_INPUT, ZERO_INPUT_DEPTHWISE], ids=["conv", "dw"])
def test_a_bias_over_a_near_zero_input_range_exports(spec):
    outcome = check_spec(spec)
    assert outcome.status == "ok", outcome.report()
    assert outcome.refusals == []
    diff, bound = outcome.end_to_end["fake_quant"]
    assert diff <= bound and diff <= 1, outcome.report()
