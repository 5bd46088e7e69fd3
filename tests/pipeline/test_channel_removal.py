"""Channel pruning that ships: coordinated masks, exact removal at capture, smaller artifacts.

The exactness claim is bit for bit: the reference executor and the MCU simulator (itself
bit-exact with TFLM's kernels) give identical int8 outputs with and without the removed
channels, on a pruned model with a residual add, a concatenation, a depthwise conv and a
flatten. Zero LSB is the right tolerance: a removed channel holds the zero point everywhere, so
the integer kernels add ``(q - zero_point) * w = 0`` for it and nothing else changes.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekiln.exporters.tflite import tflite_bytes, write_tflite
from edgekiln.ir import OpType
from edgekiln.ir.reference import run_reference
from edgekiln.pipeline.capture import capture
from edgekiln.pipeline.constraints import constraints_of, prune_mask
from edgekiln.pipeline.prepare import prepare
from edgekiln.pipeline.recipe import Recipe
from edgekiln.sparsity_stats import artifact_stats, compare_sparsity
from edgekiln.targets.mcu import simulate


def _conv_bn(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups), nn.BatchNorm2d(c_out)
    )


class ResCat(nn.Module):
    """Stem, residual block, concatenation of two branches, pointwise + depthwise, flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 8)
        self.b1, self.b2 = _conv_bn(8, 8), _conv_bn(8, 8)
        self.left, self.right = _conv_bn(8, 8, 1), _conv_bn(8, 8)
        self.pw = _conv_bn(16, 16, 1)
        self.dw = _conv_bn(16, 16, 3, groups=16)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b2(F.relu(self.b1(x))))
        x = F.max_pool2d(x, 2)  # (N, 8, 6, 6)
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)  # (N, 16, 6, 6)
        x = F.relu(self.dw(F.relu(self.pw(x))))
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread (torch's pool on 2 shared cores is many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(32, 1, 12, 12)


@pytest.fixture(scope="module")
def pruned(data):
    torch.manual_seed(1)
    net = ResCat()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(data)  # BatchNorm statistics that are not the identity
    model = prepare(net.eval(), data, Recipe(sparsity=0.5, pattern="channel"))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        model(data).square().mean().backward()
        opt.step()
    return model.eval()


def _channels(module: nn.Module) -> list[int]:
    mask = prune_mask(module)
    return mask.reshape(mask.shape[0], -1).any(dim=1).int().tolist()


def test_layers_meeting_in_an_add_prune_the_same_channels(pruned):
    assert _channels(pruned.get_submodule("stem.0")) == _channels(pruned.get_submodule("b2.0"))
    assert _channels(pruned.get_submodule("pw.0")) == _channels(
        pruned.get_submodule("dw.0")
    )  # depthwise: channel c in = out
    assert sum(_channels(pruned.get_submodule("stem.0"))) == 4
    assert _channels(pruned.get_submodule("b1.0")) != _channels(
        pruned.get_submodule("stem.0")
    )  # its own choice
    assert constraints_of(pruned.fc) and prune_mask(pruned.fc) is None  # classes stay


def test_pruned_channels_output_exactly_zero(pruned):
    conv = pruned.get_submodule("b1.0")
    dead = [i for i, keep in enumerate(_channels(conv)) if not keep]
    assert dead and torch.all(conv.bias[dead] == 0)
    assert torch.all(conv.parametrizations.bias.original[dead] == 0)  # stored, too


def test_removal_is_exact_in_the_reference_and_the_simulator(pruned, data):
    dense = capture(pruned, remove_pruned_channels=False)
    small = capture(pruned)
    removal = small.metadata["channel_removal"]
    assert removal["layers"]["stem.0"]["out_after"] == 4
    assert removal["layers"]["fc"]["in_after"] == 8 * 9  # the flatten lost whole blocks
    assert removal["layers"]["dw.0"]["out_after"] == 8
    cat = next(op for op in small.ops if op.type == OpType.CONCAT)
    assert small.tensor(cat.outputs[0]).shape[1] == 8  # 4 + 4 of 16

    x = dense.tensor(dense.inputs[0]).quant.quantize_input(data.numpy())
    ref_dense, ref_small = run_reference(dense, x), run_reference(small, x)
    assert np.array_equal(ref_dense[dense.outputs[0]], ref_small[small.outputs[0]])
    nhwc = np.transpose(x, (0, 2, 3, 1))
    sim_dense = simulate(tflite_bytes(dense), nhwc).output
    sim_small = simulate(tflite_bytes(small), nhwc).output
    assert np.array_equal(sim_dense, sim_small)

    with torch.no_grad():  # and the graph is still the model it was trained as
        fq = pruned(data).numpy()
    out = small.tensor(small.outputs[0]).quant
    assert np.abs(out.quantize(fq).astype(int) - ref_small[small.outputs[0]]).max() <= 1


def test_removal_is_exact_on_tflm(pruned, data, tmp_path):
    pytest.importorskip("tflite_micro")
    from edgekiln.targets.tflm import run_tflm

    dense = write_tflite(capture(pruned, remove_pruned_channels=False), tmp_path / "d.tflite")
    small = write_tflite(capture(pruned), tmp_path / "s.tflite")
    a = run_tflm(dense, data.numpy()[:8], runs=1, warmup=0)
    b = run_tflm(small, data.numpy()[:8], runs=1, warmup=0)
    assert a.ok and b.ok, (a.error, b.error)
    assert np.array_equal(a.outputs, b.outputs)


def test_the_artifact_is_smaller_and_does_fewer_macs(pruned):
    dense = capture(pruned, remove_pruned_channels=False)
    small = capture(pruned)
    section = compare_sparsity(dense, small, "nucleo-l4r5zi")
    ratios = section["ratios"]
    assert ratios["tflite_bytes"] < 0.75 and ratios["macs"] < 0.5
    assert ratios["estimated_ms"] < 0.75 and ratios["gzip_bytes"] < 0.75
    assert section["channel_removal"]["channels_removed"] > 0
    json.dumps(section)  # report-ready
    stats = artifact_stats(dense)
    assert stats["macs"] == sum(op["macs"] for op in stats["ops"])
    assert {row["layer"] for row in stats["layers"]} >= {"stem.0", "fc"}


def test_unknown_board_is_named(pruned):
    with pytest.raises(ValueError, match=r"nosuchboard"):
        artifact_stats(capture(pruned), "nosuchboard")
