"""prepare() and capture(): BN folding, quantizer placement, shared parameters, the graph."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekiln.ir import OpType
from edgekiln.ir.reference import run_reference
from edgekiln.pipeline.capture import CaptureError, capture
from edgekiln.pipeline.ops import UnsupportedOpError
from edgekiln.pipeline.prepare import ActivationQuant, fold_batch_norm, prepare


class Branchy(nn.Module):
    """Every supported op kind: BN, fused ReLUs, a residual add, pools, concat, pad, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.pw(torch.relu(self.dw(x))))
        x = self.pool(x)
        x = torch.cat([x, self.side(x)], dim=1)
        x = F.avg_pool2d(x, 2, 1)
        x = F.pad(x, (0, 1, 0, 1))
        return self.fc(torch.flatten(x, 1))


def _calibrated(model: nn.Module, x: torch.Tensor, steps: int = 4) -> nn.Module:
    prepared = prepare(model, x)
    prepared.train()
    with torch.no_grad():
        for _ in range(steps):
            prepared(x)
    return prepared.eval()


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(64, 1, 14, 14)


@pytest.fixture(scope="module")
def model(data: torch.Tensor) -> nn.Module:
    torch.manual_seed(1)
    net = Branchy()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(data)  # BatchNorm running statistics that are not the identity
    return net.eval()


def test_folded_conv_equals_conv_bn_in_eval_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 8, 8)
    expected = bn.eval()(conv(x))
    fold_batch_norm(conv, bn)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=0)


def test_prepare_leaves_the_users_model_alone(model, data):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_concat_inputs_and_pool_share_one_quantizer(model, data):
    prepared = _calibrated(model, data)
    quants = {n: m for n, m in prepared.named_children() if isinstance(m, ActivationQuant)}
    # the add's output feeds the max pool, which feeds the concat with the side conv:
    # one observer must guard all of them, and the average pool after the concat too
    shared = quants["relu_2_quant"].quantizer
    assert quants["side_quant"].quantizer is shared
    assert quants["avg_pool2d_quant"].quantizer is shared
    assert not quants["avg_pool2d_quant"].observe


def test_captured_graph_matches_fake_quant_model(model, data):
    prepared = _calibrated(model, data)
    graph = capture(prepared)
    kinds = [op.type for op in graph.ops]
    assert kinds == [
        OpType.CONV,
        OpType.CONV,
        OpType.CONV,
        OpType.ADD,
        OpType.MAX_POOL,
        OpType.CONV,
        OpType.CONCAT,
        OpType.AVG_POOL,
        OpType.PAD,
        OpType.RESHAPE,
        OpType.LINEAR,
    ]
    x = graph.tensor(graph.inputs[0]).quant.quantize_input(data.numpy())
    ours = run_reference(graph, x)[graph.outputs[0]].astype(np.int32)
    with torch.no_grad():
        expected = graph.tensor(graph.outputs[0]).quant.quantize(prepared(data).numpy())
    # The reference rounds each op once in float like the fake-quant model, but sums in another
    # order (float32 einsum vs torch's conv): per layer 0.1-0.4% of values sit on a rounding
    # boundary and move 1 LSB (measured), and the 588-input linear layer at the end gathers
    # those moves, so its outputs may differ by 1 LSB; never by more.
    diff = np.abs(ours - expected)
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.8


def test_weights_are_the_fake_quantized_integers(model, data):
    prepared = _calibrated(model, data)
    graph = capture(prepared)
    w = graph.tensor("c1.weight")
    fq_weight = prepared.c1.weight.detach().numpy()
    np.testing.assert_allclose(w.quant.dequantize(w.data), fq_weight, rtol=0, atol=1e-7)
    assert np.abs(w.data).max() == 127  # symmetric, narrow range: each channel's max maps to 127


def test_pruned_zeros_reach_the_graph(data):
    from edgekiln.pipeline.recipe import Recipe

    net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 12 * 12, 4))
    prepared = prepare(net, data, Recipe(sparsity=0.5))
    prepared.train()
    prepared(data)
    graph = capture(prepared.eval())
    w = graph.tensor("0.weight").data
    assert (w == 0).mean() >= 0.5


def test_unobserved_layer_is_named(model, data):
    prepared = prepare(model, data)
    with pytest.raises(
        CaptureError,
        match=r"^6 of the model's 6 activation quantizers never observed data, so they have no "
        r"scale, at the output of: node 'x'; node 'relu' \(File .*test_prepare_capture\.py\", "
        r"line \d+, in forward\); node 'relu_1' \(File .*\); and 3 more\. Pass calibration "
        r"data through the model in training mode",
    ):
        capture(prepared)


def test_capture_needs_a_prepared_model(model):
    with pytest.raises(CaptureError, match="needs a model made by edgekiln.prepare"):
        capture(model)


def test_non_finite_weight_is_refused(model, data):
    prepared = _calibrated(model, data)
    with torch.no_grad():
        prepared.fc.parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(CaptureError, match="layer 'fc' has a non-finite weight"):
        capture(prepared)


class Sigmoidal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class LoneRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pool(self.conv(x)))


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (Sigmoidal(), r"unsupported op sigmoid at node 'sigmoid' \(File .*test_prepare_capture"),
        (LoneRelu(), "ReLU / ReLU6 not directly after a conv, linear or add.*Way out"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), "unsupported op GELU at module '1'"),
        (nn.Sequential(nn.AvgPool2d(3, padding=1)), "count_include_pad=False"),
        (nn.Sequential(nn.BatchNorm2d(1)), "BatchNorm2d not directly after a conv or linear"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "padding_mode"),
    ],
)
def test_unsupported_ops_are_named(net, message, data):
    with pytest.raises(UnsupportedOpError, match=message):
        prepare(net, data)


def test_error_lists_what_is_supported(data):
    with pytest.raises(UnsupportedOpError, match="supports: Conv1d, Conv2d"):
        prepare(Sigmoidal(), data)


def test_prepared_state_dict_round_trip(model, data):
    prepared = _calibrated(model, data)
    fresh = prepare(model, data)
    fresh.load_state_dict(prepared.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(data), prepared(data), rtol=0, atol=0)


def test_softmax_gets_tflite_fixed_parameters(data):
    net = nn.Sequential(nn.Flatten(), nn.Linear(196, 5), nn.Softmax(dim=1))
    graph = capture(_calibrated(net, data))
    out = graph.tensor(graph.outputs[0]).quant
    assert float(out.scale[0]) == 1 / 256 and int(out.zero_point[0]) == -128


def test_conv1d_and_global_mean(data):
    net = nn.Sequential(
        nn.Conv1d(14, 6, 3, padding=1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    x = data[:, 0]  # (N, 14, 14) as (N, C, L)
    graph = capture(_calibrated(net, x))
    assert [op.type for op in graph.ops] == [
        OpType.CONV,
        OpType.MEAN,
        OpType.RESHAPE,
        OpType.LINEAR,
    ]
    assert graph.ops[0].attrs["activation"].value == "relu6"
