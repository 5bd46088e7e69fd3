"""Quantization primitives: specs, scale/zero-point math, fake-quantization, observers.

The file reads top-down in layers, each using only the ones above it:

1. :class:`QuantSpec`, the integer grid (bits, symmetric or not, per channel or not).
2. :func:`compute_qparams`, the TFLite rule from an observed range to ``(scale, zero_point)``.
3. :func:`fake_quantize`, quantize-dequantize with a straight-through gradient, and
   :func:`fake_quantize_bias`, the int32 bias grid ``input_scale * weight_scale``.
4. Observers (:class:`MinMaxObserver`, :class:`MovingAverageMinMaxObserver`) that track a range in
   buffers, so a ``state_dict`` carries them.
5. :class:`FakeQuantizer`, the module that observes then fake-quantizes; one instance may be shared
   by several graph points (max pool, reshape and concatenation carry their input's parameters).

The scheme is TFLite's int8 scheme (see ``DESIGN.md``): weights symmetric, per output channel,
narrow range [-127, 127], zero point 0; activations asymmetric, per tensor, [-128, 127].

Distributed training: when ``torch.distributed`` is initialized, observers all-reduce the range of
every observation (MIN of mins, MAX of maxes) so that every rank computes the same parameters.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATION_SPEC",
    "MIN_SCALE",
    "NON_FINITE_WAY_OUT",
    "WEIGHT_SPEC",
    "FakeQuantizer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "ObserverKind",
    "QuantSpec",
    "activation_spec",
    "bias_steps",
    "compute_qparams",
    "fake_quantize",
    "fake_quantize_bias",
    "make_observer",
    "weight_spec",
]

logger = logging.getLogger(__name__)

NON_FINITE_WAY_OUT = (
    "The calibration or training data holds NaN or inf values; clean the data, or lower the "
    "learning rate if training diverged, then prepare the model again (an observed range keeps "
    "its NaN or inf)"
)
"""The way out of a non-finite observed range, for the errors that meet one."""

MIN_SCALE: float = float(torch.finfo(torch.float32).eps)
"""Smallest scale :func:`compute_qparams` returns (float32 machine epsilon, 2**-23 ≈ 1.19e-07).

A constant tensor (for example an all-zero ReLU output, or a pruned-away filter) has a zero range;
dividing by a zero scale would give NaN, so the scale is floored here, as PyTorch's observers do.
"""


# 1. The integer grid ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: a signed ``bits``-bit grid, symmetric or affine, per channel or not

    Args:
        bits: Width of the signed integer grid, 2 to 8.
        symmetric: Zero point fixed at 0 and the range centred on 0 (TFLite weights).
        per_channel: One scale per slice along ``axis`` (TFLite weights: per output channel).
        axis: The channel dimension when ``per_channel`` (0 for conv and linear weights).
        narrow_range: Drop the most negative code, so int8 spans [-127, 127] (TFLite weights).

    Raises:
        ValueError: ``bits`` outside 2..8, a negative ``axis``, or a non-bool flag.

    >>> WEIGHT_SPEC.qmin, WEIGHT_SPEC.qmax
    (-127, 127)
    >>> ACTIVATION_SPEC.qmin, ACTIVATION_SPEC.qmax
    (-128, 127)
    >>> QuantSpec(4, symmetric=True, narrow_range=True).qmax
    7
    """

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantSpec.bits must be an int from 2 to 8, got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(
                f"QuantSpec.bits={self.bits} is not supported: allowed 2 to 8 "
                "(int8 kernels carry at most 8 bits)"
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or self.axis < 0:
            raise ValueError(
                f"QuantSpec.axis must be a non-negative int (0: output channels), got {self.axis!r}"
            )
        for field in ("symmetric", "per_channel", "narrow_range"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise ValueError(f"QuantSpec.{field} must be True or False, got {value!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer code: -2**(bits-1), plus one with ``narrow_range``."""
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Largest integer code: 2**(bits-1) - 1."""
        return 2 ** (self.bits - 1) - 1


WEIGHT_SPEC = QuantSpec(8, symmetric=True, per_channel=True, axis=0, narrow_range=True)
"""TFLite int8 weights: symmetric, per output channel (axis 0), [-127, 127], zero point 0."""

ACTIVATION_SPEC = QuantSpec(8, symmetric=False, per_channel=False, narrow_range=False)
"""TFLite int8 activations: asymmetric, per tensor, [-128, 127]."""


def weight_spec(bits: int = 8) -> QuantSpec:
    """The weight scheme (symmetric, per output channel, narrow range) at ``bits`` bits.

    >>> weight_spec(4).qmin, weight_spec(4).qmax
    (-7, 7)
    """
    return QuantSpec(bits, symmetric=True, per_channel=True, axis=0, narrow_range=True)


def activation_spec(bits: int = 8) -> QuantSpec:
    """The activation scheme (asymmetric, per tensor, full range) at ``bits`` bits.

    >>> activation_spec(4).qmin, activation_spec(4).qmax
    (-8, 7)
    """
    return QuantSpec(bits, symmetric=False, per_channel=False, narrow_range=False)


# 2. From a range to (scale, zero_point) -----------------------------------------------------------


def compute_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """TFLite quantization parameters for the range ``[min_val, max_val]``.

    The range is first widened to include 0, so that 0.0 (padding, ReLU's floor, pruned weights) is
    exactly representable. Then:

    - symmetric: ``scale = max(|min|, |max|) / qmax``, ``zero_point = 0``;
    - asymmetric: ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``, rounding half away from zero
      (TFLite's nudging).

    A zero range gives ``scale = MIN_SCALE`` (float32 epsilon), never 0 or NaN.

    Args:
        min_val: Observed minimum, shape ``()`` per tensor or ``(C,)`` per channel.
        max_val: Observed maximum, same shape as ``min_val``.
        spec: The integer grid.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the shape of ``min_val``.

    Raises:
        ValueError: The shapes differ, a bound is not finite, or ``min_val > max_val``.

    >>> scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), ACTIVATION_SPEC)
    >>> round(scale.item(), 6), zp.item()
    (0.015686, -64)
    >>> scale, zp = compute_qparams(torch.tensor([-0.5, 0.0]), torch.tensor([0.254, 0.0]),
    ...                             WEIGHT_SPEC)
    >>> [round(v, 6) for v in scale.tolist()], zp.tolist()  # 0.5 / 127; a zero range: MIN_SCALE
    ([0.003937, 0.0], [0, 0])
    """
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"compute_qparams needs min_val and max_val of one shape, got "
            f"{tuple(min_val.shape)} and {tuple(max_val.shape)}"
        )
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError(
            "compute_qparams got a non-finite range (min "
            f"{min_val.tolist()}, max {max_val.tolist()}): observe finite data first"
        )
    if bool((min_val > max_val).any()):
        raise ValueError(
            f"compute_qparams needs min_val <= max_val, got min {min_val.tolist()} "
            f"and max {max_val.tolist()}"
        )
    return _qparams_from_range(min_val, max_val, spec)


def _qparams_from_range(
    min_val: Tensor, max_val: Tensor, spec: QuantSpec, floor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`compute_qparams` without the input checks (the observers' hot path).

    ``floor`` (float32, shape ``()`` or that of ``min_val``) raises the scale to at least that
    value, channel by channel, before the zero point is computed (see
    :meth:`FakeQuantizer.add_scale_floor`).
    """
    min_val = torch.clamp(min_val.float(), max=0.0)  # widened to include 0
    max_val = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-min_val, max_val) / spec.qmax  # float32, shape of min_val
        scale = torch.clamp(scale, min=MIN_SCALE)
        if floor is not None:
            scale = torch.maximum(scale, floor)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    scale = (max_val - min_val) / float(spec.qmax - spec.qmin)  # float32, shape of min_val
    scale = torch.clamp(scale, min=MIN_SCALE)
    if floor is not None:
        scale = torch.maximum(scale, floor)
    # min_val <= 0 here, and for x <= 0 rounding half away from zero (TfLiteRound) is ceil(x - 0.5)
    zero_point = spec.qmin - torch.ceil(min_val / scale - 0.5)
    zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax).to(torch.int32)  # int32
    return scale, zero_point


# 3. Quantize-dequantize ---------------------------------------------------------------------------


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize ``x`` onto the grid of ``spec`` and back, with a straight-through gradient.

    Values equal ``torch.fake_quantize_per_channel_affine`` (per channel) or
    ``torch.fake_quantize_per_tensor_affine`` (per tensor), which this calls: ``x / scale`` is
    rounded half to even, shifted by the zero point and clamped to ``[qmin, qmax]``. The gradient is
    1 where ``x`` lies inside the representable range and 0 outside, as in those ops.

    Args:
        x: Float tensor.
        scale: float32, shape ``()`` or ``(C,)`` with ``C = x.shape[spec.axis]`` per channel.
        zero_point: Integer tensor of the shape of ``scale``.
        spec: The integer grid.

    Returns:
        A tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: Per tensor on float32 ``x``, a scale that is not positive and finite (a NaN
            or inf range gives one). Only that path checks, because it reads the scale on the
            host anyway; the per-channel and other-dtype paths would pay a device sync for it,
            so there a NaN or inf scale makes NaN values, which the next float32 per-tensor
            quantizer (every activation of a prepared model) or ``capture`` refuses.

    >>> spec = QuantSpec(4, symmetric=True, narrow_range=True)  # per tensor, [-7, 7]
    >>> fake_quantize(torch.tensor([0.04, 0.26, 9.0]), torch.tensor(0.1),
    ...               torch.tensor(0, dtype=torch.int32), spec).tolist()
    [0.0, 0.30000001192092896, 0.699999988079071]
    """
    scale = scale.to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if spec.per_channel:
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero_point, spec.axis, spec.qmin, spec.qmax
        )
    if x.dtype != torch.float32:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zero_point.reshape(()), spec.qmin, spec.qmax
        )
    return _FakeQuantizePerTensor.apply(x, scale.reshape(()), int(zero_point), spec.qmin, spec.qmax)


class _FakeQuantizePerTensor(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine``'s arithmetic, in a fraction of its time on CPU.

    Its kernel computes ``zero_point + nearbyint(x * (1.0f / scale))``, clamps, and returns
    ``(q - zero_point) * scale``, all in float32; these ops do the same (``torch.round`` rounds
    half to even, like ``nearbyint``), so the values are identical (tests pin it), in four
    in-place passes over one new tensor. The gradient passes where the unclamped ``q`` lies in
    ``[qmin, qmax]``, as there: that set of ``x`` is an interval (multiplying by a positive
    float32 and rounding are both monotone), whose float32 ends :func:`_grid_interval` finds
    exactly, so the backward is one fused ``hardtanh_backward`` pass and nothing activation
    sized is saved but ``x`` itself.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, scale: Tensor, zero_point: int, qmin: int, qmax: int
    ) -> Tensor:
        # round(x / s) + zp clamped to [qmin, qmax], minus zp, equals round(x / s) clamped to
        # [qmin - zp, qmax - zp]: integers in float32 are exact.
        inv_scale = torch.reciprocal(scale)  # float32, shape ()
        out = torch.mul(x, inv_scale).round_().clamp_(qmin - zero_point, qmax - zero_point)
        inv = float(inv_scale)  # the one host read of the scale
        if not 0.0 < inv < math.inf:  # NaN fails both; _grid_interval would never end
            raise ValueError(
                f"fake_quantize needs a positive, finite scale, got scale {float(scale):.6g}: "
                "compute it from a finite range (compute_qparams); one that held NaN or inf "
                "gives a scale of nan or inf"
            )
        ctx.save_for_backward(x)
        ctx.interval = _grid_interval(inv, qmin - zero_point, qmax - zero_point)
        return out.mul_(scale)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor, None, None, None, None]:
        (x,) = ctx.saved_tensors
        below, above = ctx.interval  # gradient where below < x < above
        return torch.ops.aten.hardtanh_backward(grad, x, below, above), None, None, None, None


def _grid_interval(inv_scale: float, lo: int, hi: int) -> tuple[float, float]:
    """The float32 ``(below, above)`` with ``lo <= rint(f32(x * inv_scale)) <= hi`` exactly for
    ``below < x < above``: the largest float32 under the interval and the smallest over it.

    ``inv_scale`` must be positive and finite (the caller checks: NaN would search forever).

    >>> _grid_interval(1.0, -2, 2)  # x in [-2.5, 2.5]: rint(-2.5) = -2, rint(2.5) = 2
    (-2.500000238418579, 2.500000238418579)
    """
    inv = np.float32(inv_scale)

    def step(x: np.float32) -> float:
        return float(np.rint(np.float32(x * inv)))

    def edge(target: float, inside: Callable[[float], bool], outward: float) -> np.float32:
        x = np.float32(target / float(inv))  # within a few float32 steps of the edge
        while inside(step(x)):
            x = np.nextafter(x, np.float32(outward))
        while not inside(step(x)):
            x = np.nextafter(x, np.float32(-outward))
        return np.nextafter(x, np.float32(outward))  # first x outside, on that side

    with np.errstate(over="ignore"):
        below = edge(lo - 0.5, lambda q: q >= lo, -np.inf)
        above = edge(hi + 0.5, lambda q: q <= hi, np.inf)
    return float(below), float(above)


def bias_steps(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor]:
    """The int32 bias grid of a conv or linear: ``(steps, scale)``.

    ``scale = input_scale * weight_scale`` (float32, shape ``(C_out,)``: the product is taken in
    float32, as the exporters store it) and ``steps = round(bias / scale)`` computed in float64
    and rounded half to even (``np.round``'s rule), float64 integers of shape ``(C_out,)``.
    Training (:func:`fake_quantize_bias`) and ``capture`` both call this, so the bias the
    fake-quantized model adds is the one the int8 graph stores, integer for integer.

    >>> steps, scale = bias_steps(torch.tensor([0.3125, 0.4]), torch.tensor(0.5),
    ...                           torch.tensor([0.25, 0.5]))
    >>> steps.tolist(), scale.tolist()  # 2.5 steps round to 2 (half to even), 1.6 to 2
    ([2.0, 2.0], [0.125, 0.25])
    """
    channels = bias.shape[0]
    s_in = input_scale.detach().to(device=bias.device, dtype=torch.float32).reshape(())
    s_w = weight_scale.detach().to(device=bias.device, dtype=torch.float32).reshape(-1)
    scale = (s_in * s_w.expand(channels)).contiguous()  # (C_out,) float32
    steps = torch.round(bias.detach().double() / scale.double())  # (C_out,) float64 integers
    return steps, scale


def fake_quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """``bias`` rounded onto its int32 grid ``input_scale * weight_scale``, straight through.

    The value is ``steps * scale`` of :func:`bias_steps` (in float64, then cast to the bias's
    dtype); the gradient with respect to ``bias`` is 1 (no gradient to the scales).

    >>> fake_quantize_bias(torch.tensor([0.12, -0.26]), torch.tensor(0.5),
    ...                    torch.tensor([0.1, 0.2])).tolist()
    [0.10000000149011612, -0.30000001192092896]
    """
    return _FakeQuantizeBias.apply(bias, input_scale, weight_scale)


class _FakeQuantizeBias(torch.autograd.Function):
    """:func:`fake_quantize_bias`: the value is exact (not ``b + (q - b).detach()``, whose two
    float32 operations can miss ``q`` by one unit in the last place)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, bias: Tensor, input_scale: Tensor, weight_scale: Tensor
    ) -> Tensor:
        steps, scale = bias_steps(bias, input_scale, weight_scale)
        return (steps * scale.double()).to(bias.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


# 4. Observers -------------------------------------------------------------------------------------


class ObserverKind(enum.Enum):
    """Which observer tracks a range; strings are turned into these at the public edge."""

    MINMAX = "minmax"
    """Running min and max over everything observed."""
    MOVING_AVERAGE = "moving_average"
    """Exponential moving average of each batch's min and max (activations)."""
    LAST_VALUE = "last_value"
    """The min and max of the latest observation only (weights; TF-MOT's LastValueQuantizer)."""

    @classmethod
    def parse(cls, value: ObserverKind | str) -> ObserverKind:
        """Turn ``"minmax"``, ``"moving_average"`` or ``"last_value"`` into an ObserverKind.

        >>> ObserverKind.parse("minmax")
        <ObserverKind.MINMAX: 'minmax'>
        """
        if isinstance(value, cls):
            return value
        allowed = ", ".join(repr(k.value) for k in cls)
        if isinstance(value, str):
            for kind in cls:
                if kind.value == value:
                    return kind
        raise ValueError(f"observer={value!r} is not known: allowed {allowed}")


class Observer(nn.Module):
    """Base of the range observers; the range lives in buffers ``min_val`` and ``max_val``.

    Buffers start as ``+inf`` / ``-inf`` with shape ``()``; a per-channel observer takes shape
    ``(C,)`` at its first observation (and on ``load_state_dict``). ``frozen`` is a bool buffer.
    """

    min_val: Tensor
    max_val: Tensor
    frozen: Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__} needs a QuantSpec, got {spec!r}")
        self.spec = spec
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("frozen", torch.tensor(False))
        self._observed = False  # mirrors "the range is finite", kept off the hot path
        # qparams() computed from a range are kept until the range or the floor changes: one
        # forward asks for them several times (the quantizer, the bias grid, the scale floors).
        self._qparams_key: _QparamsKey | None = None
        self._qparams_cache: tuple[Tensor, Tensor] = (torch.tensor(0.0), torch.tensor(0))

    def extra_repr(self) -> str:
        return f"spec={self.spec}"

    @property
    def observed(self) -> bool:
        """True once data has been observed (or a range was loaded with ``load_state_dict``)."""
        return self._observed

    def reset(self) -> None:
        """Forget the observed range (``min_val = +inf``, ``max_val = -inf``)."""
        self.min_val = torch.full_like(self.min_val, float("inf"))
        self.max_val = torch.full_like(self.max_val, float("-inf"))
        self._observed = False

    def freeze(self) -> None:
        """Stop updating the range; :meth:`observe` becomes a no-op."""
        self.frozen.fill_(True)

    def unfreeze(self) -> None:
        """Resume updating the range."""
        self.frozen.fill_(False)

    @property
    def range_is_finite(self) -> bool:
        """True when every bound of the range is finite (a host read: not for the hot path).

        An unobserved range (``+inf``, ``-inf``) is not finite; a NaN or inf in the data observed
        makes a range that is not finite, and it stays so (min and max keep a NaN or an inf).
        """
        return bool(torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all())

    def describe_range(self) -> str:
        """The range for a message: ``[min, max]``, over all channels when per channel.

        >>> obs = MinMaxObserver(ACTIVATION_SPEC)
        >>> obs.observe(torch.tensor([-1.5, float("inf")]))
        >>> obs.describe_range()
        '[-1.5, inf]'
        """
        text = f"[{_bound(self.min_val.min())}, {_bound(self.max_val.max())}]"
        if self.min_val.numel() > 1:
            text += f" over {self.min_val.numel()} channels"
        return text

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Min and max of ``x``: over all of it, or per channel over every dim but ``spec.axis``."""
        x = x.detach()
        if self.spec.per_channel:
            if x.dim() <= self.spec.axis:
                raise ValueError(
                    f"{type(self).__name__}: per-channel axis {self.spec.axis} does not exist in "
                    f"a tensor of shape {tuple(x.shape)}; use a per-tensor QuantSpec"
                )
            x = x.transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)
            min_val, max_val = torch.aminmax(x, dim=1)
        else:
            min_val, max_val = torch.aminmax(x)
        return _all_reduce_range(min_val.float(), max_val.float())

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range with ``x`` unless frozen."""
        if bool(self.frozen):
            return
        min_val, max_val = self.batch_range(x)
        if not self.observed or self.min_val.shape != min_val.shape:
            self._set(min_val, max_val)
        else:
            self._update(min_val, max_val)

    def _set(self, min_val: Tensor, max_val: Tensor) -> None:
        self.min_val = min_val.clone()
        self.max_val = max_val.clone()
        self._observed = True

    def _update(self, min_val: Tensor, max_val: Tensor) -> None:
        raise NotImplementedError

    def qparams(self, floor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the observed range (see :func:`compute_qparams`).

        ``floor`` (float32, shape ``()`` or ``(C,)`` per channel), when given, is the smallest
        scale returned (channel by channel).

        Raises:
            RuntimeError: Nothing was observed yet.
        """
        if not self.observed:
            raise RuntimeError(
                f"{type(self).__name__} has not observed any data, so it has no scale: pass data "
                "through the model in training mode (calibration) before asking for qparams"
            )
        key = _QparamsKey.of(self.min_val, self.max_val, floor)
        if key is not None and key == self._qparams_key:
            return self._qparams_cache
        self._qparams_cache = _qparams_from_range(self.min_val, self.max_val, self.spec, floor)
        self._qparams_key = key
        return self._qparams_cache

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A per-channel range takes shape (C,) only once observed: adopt the saved shape.
        for name in ("min_val", "max_val"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._observed = bool(torch.isfinite(self.min_val).all() and self.min_val.numel() > 0)


@dataclass(frozen=True, eq=False)
class _QparamsKey:
    """What ``Observer.qparams`` was computed from: the range and floor tensors themselves (not
    their ids, which a freed tensor hands on) and their in-place version counters."""

    tensors: tuple[Tensor | None, ...]
    versions: tuple[int, ...]

    @staticmethod
    def of(*tensors: Tensor | None) -> _QparamsKey | None:
        """The key of these tensors now; None when one keeps no version (an inference tensor)."""
        try:
            versions = tuple(-1 if t is None else t._version for t in tensors)
        except RuntimeError:  # inference-mode tensors do not count their in-place updates
            return None
        return _QparamsKey(tensors, versions)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _QparamsKey)
            and self.versions == other.versions
            and all(a is b for a, b in zip(self.tensors, other.tensors, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]


def _bound(value: Tensor) -> str:
    """One bound of a range as text: ``-1.5``, ``nan``, ``inf`` (NaN wins over inf)."""
    return f"{float(value):.6g}"


def _all_reduce_range(min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
    """Make a range identical on every rank (no-op unless torch.distributed is initialized)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(max_val, op=dist.ReduceOp.MAX)
    return min_val, max_val


class MinMaxObserver(Observer):
    """Running min and max over everything observed.

    >>> obs = MinMaxObserver(ACTIVATION_SPEC)
    >>> obs.observe(torch.tensor([-1.0, 2.0])); obs.observe(torch.tensor([0.5, 3.0]))
    >>> obs.min_val.item(), obs.max_val.item()
    (-1.0, 3.0)
    """

    def _update(self, min_val: Tensor, max_val: Tensor) -> None:
        torch.minimum(self.min_val, min_val, out=self.min_val)
        torch.maximum(self.max_val, max_val, out=self.max_val)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each observation's min and max.

    ``min <- min + averaging_constant * (batch_min - min)``; the first observation is taken as is.
    ``averaging_constant=1.0`` keeps the latest observation only (the "last value" observer).

    Raises:
        ValueError: ``averaging_constant`` outside (0, 1].

    >>> obs = MovingAverageMinMaxObserver(ACTIVATION_SPEC, averaging_constant=0.5)
    >>> obs.observe(torch.tensor([-1.0, 2.0])); obs.observe(torch.tensor([0.0, 4.0]))
    >>> obs.min_val.item(), obs.max_val.item()
    (-0.5, 3.0)
    """

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01) -> None:
        super().__init__(spec)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"averaging_constant={averaging_constant!r} must be in (0, 1]: 0.01 averages over "
                "about 100 batches, 1.0 keeps the last batch only"
            )
        self.averaging_constant = float(averaging_constant)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, averaging_constant={self.averaging_constant}"

    def _update(self, min_val: Tensor, max_val: Tensor) -> None:
        if self.averaging_constant == 1.0:
            self.min_val, self.max_val = min_val, max_val  # fresh tensors from batch_range
            return
        self.min_val.add_(min_val - self.min_val, alpha=self.averaging_constant)
        self.max_val.add_(max_val - self.max_val, alpha=self.averaging_constant)


def make_observer(kind: ObserverKind | str, spec: QuantSpec) -> Observer:
    """Build the observer named by ``kind`` ("minmax", "moving_average" or "last_value").

    >>> make_observer("last_value", WEIGHT_SPEC).averaging_constant
    1.0
    """
    kind = ObserverKind.parse(kind)
    if kind is ObserverKind.MINMAX:
        return MinMaxObserver(spec)
    if kind is ObserverKind.LAST_VALUE:
        return MovingAverageMinMaxObserver(spec, averaging_constant=1.0)
    return MovingAverageMinMaxObserver(spec)


# 5. The fake quantizer module ---------------------------------------------------------------------


class FakeQuantizer(nn.Module):
    """Observe, then fake-quantize with the observed range.

    - Training mode, observer not frozen: observe ``x`` (no gradient), then fake-quantize with the
      parameters of the range so far.
    - Eval mode (or frozen): fake-quantize with the stored parameters.
    - ``enabled`` False: return ``x`` unchanged (still observing in training): float warm-up.

    ``freeze_after=N`` freezes the observer after N training forwards (counted in the ``steps``
    buffer). A shared instance counts the calls of every graph point that uses it. Nothing here
    assumes a single caller: several graph points may share one instance and so one scale.

    A scale floor (:meth:`add_scale_floor`, set up by ``prepare`` on the outputs of convs, linears
    and adds, and on the weights of convs and linears with a bias) keeps the scale from falling
    far below the grid of the values that make the tensor, or that its bias needs; it is the
    ``scale_floor`` buffer (float32, shape ``()``, or ``(C,)`` on a per-channel quantizer),
    updated with the range, so it travels with ``state_dict``.

    Args:
        spec: The integer grid (default: activations).
        observer: An observer kind ("minmax", "moving_average", "last_value") or an Observer.
        freeze_after: Training forwards after which the observer freezes; None never.

    Raises:
        ValueError: ``freeze_after`` not a positive int, or an unknown observer kind; at a
            forward (per tensor, float32), an observed range that holds NaN or inf.

    >>> fq = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
    >>> fq(torch.tensor([-1.0, 0.3, 3.0])).tolist()  # scale 4/255, zero point -64
    [-1.003921627998352, 0.2980392277240753, 2.9960784912109375]
    >>> fq.eval()(torch.tensor([4.0])).tolist()  # clamped to the calibrated range
    [2.9960784912109375]
    """

    enabled: Tensor
    steps: Tensor
    scale_floor: Tensor

    def __init__(
        self,
        spec: QuantSpec = ACTIVATION_SPEC,
        observer: Observer | ObserverKind | str = ObserverKind.MOVING_AVERAGE,
        freeze_after: int | None = None,
    ) -> None:
        super().__init__()
        if freeze_after is not None and (
            isinstance(freeze_after, bool) or not isinstance(freeze_after, int) or freeze_after < 1
        ):
            raise ValueError(
                f"freeze_after={freeze_after!r} must be a positive int (training forwards) or None"
            )
        self.spec = spec
        self.observer = (
            observer if isinstance(observer, Observer) else make_observer(observer, spec)
        )
        self.freeze_after = freeze_after
        self.register_buffer("enabled", torch.tensor(True))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        # float32, shape () (a per-channel floor: (C,), see add_scale_floor); 0 is none
        self.register_buffer("scale_floor", torch.tensor(0.0))
        self._floor_sources: list[Callable[[], Tensor | None]] = []

    def extra_repr(self) -> str:
        return f"spec={self.spec}, freeze_after={self.freeze_after}"

    @property
    def observed(self) -> bool:
        """True once the observer has seen data."""
        return self.observer.observed

    def enable(self, enabled: bool = True) -> None:
        """Turn fake-quantization on (or off: pass-through, still observing in training)."""
        self.enabled.fill_(enabled)

    def freeze(self) -> None:
        """Freeze the observer: the scale and zero point stop moving."""
        self.observer.freeze()

    def unfreeze(self) -> None:
        """Let the observer update again."""
        self.observer.unfreeze()

    def add_scale_floor(self, source: Callable[[], Tensor | None]) -> None:
        """Keep the scale at or above ``source()`` (float32; None: no floor yet).

        A source returns shape ``()``, or on a per-channel quantizer ``()`` or ``(C,)`` (one
        floor per channel). Sources are read after each observation in training and their
        largest value (channel by channel) is kept in the ``scale_floor`` buffer, so eval,
        ``capture`` and a reloaded checkpoint use the floor training used; on a per-channel
        quantizer that has observed, the buffer takes shape ``(C,)`` here. A source must be an
        object (not a lambda) for ``copy.deepcopy`` to re-point its references.

        >>> fq = FakeQuantizer(ACTIVATION_SPEC, observer="minmax")
        >>> fq.add_scale_floor(lambda: torch.tensor(0.5))
        >>> _ = fq(torch.zeros(3))  # a zero range would get MIN_SCALE
        >>> fq.qparams()[0].item()
        0.5
        >>> wq = FakeQuantizer(WEIGHT_SPEC, observer="minmax")  # per channel: one floor each
        >>> wq.observer.observe(torch.tensor([[0.5], [0.0]]))
        >>> wq.add_scale_floor(lambda: torch.tensor([0.001, 0.25]))
        >>> _ = wq(torch.tensor([[0.5], [0.0]]))
        >>> [round(s, 6) for s in wq.qparams()[0].tolist()]  # 0.5 / 127 binds, then the floor
        [0.003937, 0.25]
        """
        if not callable(source):
            raise TypeError(
                f"add_scale_floor needs a callable returning a scale tensor or None, got "
                f"{type(source).__name__}"
            )
        self._floor_sources.append(source)
        if self.spec.per_channel and self.observed:
            self.scale_floor = torch.zeros_like(self.observer.min_val)  # float32, shape (C,)

    def _update_scale_floor(self) -> None:
        floor: Tensor | None = None
        for source in self._floor_sources:
            value = source()
            if value is not None:
                value = value.detach().float()
                floor = value if floor is None else torch.maximum(floor, value)
        if floor is None:
            return
        if not self.spec.per_channel and floor.dim():
            floor = floor.amax()  # shape ()
        if floor.shape == self.scale_floor.shape:
            self.scale_floor.copy_(floor)
        else:  # a (C,) floor into a () buffer: a fresh quantizer, or an older checkpoint's
            self.scale_floor = floor.to(self.scale_floor.device, copy=True)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A per-channel floor is (C,); one saved before weights had floors (or by a quantizer
        # that never observed) is (): adopt the saved shape, as the observer does its range.
        key = prefix + "scale_floor"
        if key in state_dict and state_dict[key].shape != self.scale_floor.shape:
            self.scale_floor = torch.empty(state_dict[key].shape, device=self.scale_floor.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)``: float32 and int32, shape ``()`` or ``(C,)``.

        Raises:
            RuntimeError: Nothing was observed yet.
        """
        return self.observer.qparams(self.scale_floor if self._floor_sources else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.observer.frozen):
            self.observer.observe(x)
            self._update_scale_floor()
            self.steps += 1
            if self.freeze_after is not None and int(self.steps) >= self.freeze_after:
                self.observer.freeze()
                logger.debug("observer frozen after %d training forwards", int(self.steps))
        if not bool(self.enabled):
            return x
        if not self.observer.observed:
            raise RuntimeError(
                "FakeQuantizer has no scale yet: it is in eval mode (or frozen) and never observed "
                "data. Calibration data must pass through the model in training mode first."
            )
        scale, zero_point = self.qparams()
        try:
            return fake_quantize(x, scale, zero_point, self.spec)
        except ValueError as error:
            if self.observer.range_is_finite and bool(torch.isfinite(scale).all()):
                raise
            shown = _bound(self.scale_floor.max())  # () or (C,)
            floor = f" (scale floor {shown})" if self._floor_sources else ""
            raise ValueError(
                f"FakeQuantizer has no usable scale: it observed the range "
                f"{self.observer.describe_range()}, which gives scale "
                f"{_bound(scale.reshape(-1)[0])}{floor}. {NON_FINITE_WAY_OUT}"
            ) from error
