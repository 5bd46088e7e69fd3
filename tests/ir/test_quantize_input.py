"""``quantize_input``: float model inputs onto the int8 grid, as the fake-quantized model does.

The fake-quantized model computes ``rint(x * f32(1 / scale)) + zero_point`` in float32; ONNX
QuantizeLinear (``QParams.quantize``) computes ``round(x / scale)``. The two differ only where
``x / scale`` lies within a float32 unit of a half step, so the data here is built there.
"""

import numpy as np
import pytest

from edgekiln.ir import GraphError, QParams
from edgekiln.ir.graph import quantize_input


def near_half_steps(scale: float, zero_point: int, ulps: int = 4) -> np.ndarray:
    """Float32 values within ``ulps`` units of every half step ``(k + 0.5) * scale`` that lands
    on the int8 grid (k + zero_point in [-128, 127], plus two steps of clamping on each side).
    """
    s = np.float32(scale)
    k = np.arange(-130 - zero_point, 130 - zero_point, dtype=np.float32)
    x = ((k + np.float32(0.5)) * s).astype(np.float32)  # (260,) float32
    for _ in range(ulps):
        x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, -np.inf)])
    return np.unique(x)


def division_rule(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The host rule edgekiln used before: ``round(x / scale) + zero_point``, half to even."""
    q = np.round(x.astype(np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def fake_quant_integers(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The int8 values the fake-quantized model's activation quantizer gives ``x``.

    ``fake_quantize`` returns ``(q - zero_point) * scale`` in float32; dividing by the scale
    gives back ``q`` exactly (every rule rounds a value on the grid to its own integer).
    """
    torch = pytest.importorskip("torch")
    from edgekiln.pipeline.quant import ACTIVATION_SPEC, fake_quantize

    out = fake_quantize(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.tensor(scale, dtype=torch.float32),
        torch.tensor(zero_point, dtype=torch.int32),
        ACTIVATION_SPEC,
    ).numpy()
    return (np.rint(out / np.float32(scale)) + zero_point).astype(np.int8)


def test_real_numbers():
    # 1.55 / 0.1 is 15.499999 in float32, 1.55 * f32(1 / 0.1) = 1.55 * 10.0 is 15.5 -> 16;
    # -0.25 is exactly -2.5 steps: half to even gives -2 (TFLite's TfLiteRound would give -3)
    x = np.array([1.55, -0.25, 0.0, 300.0, -300.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize_input(x, 0.1, 0), [16, -2, 0, 127, -128])
    np.testing.assert_array_equal(division_rule(x, 0.1, 0), [15, -2, 0, 127, -128])
    np.testing.assert_array_equal(quantize_input(x, 0.1, -128), [-112, -128, -128, 127, -128])
    out = quantize_input(x, 0.1, 128, np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [144, 126, 128, 255, 0])


@pytest.mark.parametrize(
    ("scale", "zero_point"),
    # 1/255 (images in [0, 1]), the kws and cifar-like input scales measured on edgekiln's
    # built-in data, and scales where division and reciprocal part often
    [(1 / 255, -128), (0.0185538717, -34), (0.0392157, 0), (0.007, 3), (0.3, -20), (0.1, 0)],
)
def test_equals_the_fake_quantized_model_near_every_half_step(scale, zero_point):
    x = near_half_steps(scale, zero_point)
    expected = fake_quant_integers(x, scale, zero_point)
    np.testing.assert_array_equal(quantize_input(x, scale, zero_point), expected)


def test_equals_the_fake_quantized_model_on_random_scales_and_data():
    rng = np.random.default_rng(0)
    parted = 0
    for scale in rng.uniform(1e-4, 1.0, size=40).astype(np.float32):
        zero_point = int(rng.integers(-128, 128))
        x = np.concatenate(
            [
                near_half_steps(float(scale), zero_point, ulps=2),
                rng.normal(0.0, 64 * float(scale), size=2000).astype(np.float32),
            ]
        )
        expected = fake_quant_integers(x, float(scale), zero_point)
        np.testing.assert_array_equal(quantize_input(x, float(scale), zero_point), expected)
        parted += int((division_rule(x, float(scale), zero_point) != expected).sum())
    assert parted > 100  # the data reaches the values where division would be one off


def test_qparams_quantize_input_is_per_tensor():
    q = QParams.per_tensor(0.1, -3)
    x = np.array([[1.55, 2.35]], dtype=np.float32)
    np.testing.assert_array_equal(q.quantize_input(x), quantize_input(x, 0.1, -3))
    with pytest.raises(GraphError, match="per-tensor parameters, got 2 scales along axis 0"):
        QParams.per_channel(np.array([0.1, 0.2])).quantize_input(x)
