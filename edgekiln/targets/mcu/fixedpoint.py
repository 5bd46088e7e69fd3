"""Fixed-point primitives of TFLite Micro's int8 kernels, vectorised over int64 numpy arrays.

TFLM requantizes every int32 accumulator with gemmlowp-style arithmetic: a real multiplier is
stored as an int32 significand in Q0.31 plus a power-of-two shift (``quantize_multiplier``),
and applied with a saturating, rounding "doubling high multiply" followed by a rounding right
shift (``multiply_by_quantized_multiplier``). TFLM compiles the "double rounding" form of that
multiply unless ``TFLITE_SINGLE_ROUNDING`` is defined; the ``tflite-micro`` wheel does not
define it (the simulator's bit-exactness tests against that wheel pin this), so
``DOUBLE_ROUNDING`` is the default here and the single-rounding form is kept for builds
that define it.

Every function takes and returns int64 arrays holding int32 values (int64 leaves room for
products without overflow); scalars work too. Results that C would compute in int32 are
wrapped to int32 the way two's complement hardware does, so hostile parameters never raise
numpy overflow errors.

>>> quantize_multiplier(0.0123)
(1690499128, -6)
>>> int(multiply_by_quantized_multiplier(1000, 1690512457, -6))
12
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
DOUBLE_ROUNDING = "double"
SINGLE_ROUNDING = "single"


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """Split a real multiplier into (Q0.31 significand, shift) as TFLite's QuantizeMultiplier.

    ``real = significand / 2**31 * 2**shift`` with the significand in ``[2**30, 2**31)``;
    zero gives ``(0, 0)`` and shifts below -31 collapse to ``(0, 0)`` as in TFLite.

    >>> quantize_multiplier(0.5), quantize_multiplier(3.0)
    ((1073741824, 0), (1610612736, 2))
    """
    if real_multiplier == 0.0 or not math.isfinite(real_multiplier):
        if real_multiplier == 0.0:
            return 0, 0
        raise ValueError(f"multiplier must be finite, got {real_multiplier!r}")
    q, shift = math.frexp(real_multiplier)
    q_fixed = _round_half_away(q * (1 << 31))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(q_fixed), int(shift)


def quantize_multipliers(real_multipliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_multiplier`` for each element: (significands, shifts), both int64 arrays."""
    pairs = [quantize_multiplier(float(m)) for m in np.asarray(real_multipliers).reshape(-1)]
    mult = np.array([p[0] for p in pairs], dtype=np.int64)
    shift = np.array([p[1] for p in pairs], dtype=np.int64)
    return mult, shift


def wrap_int32(x: np.ndarray) -> np.ndarray:
    """Wrap int64 values to int32 range as two's complement arithmetic does (kept in int64)."""
    x = np.asarray(x, dtype=np.int64)
    return ((x - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN


def saturating_rounding_doubling_high_mul(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul: ``round(a * b / 2**31)``, saturated.

    Ties round up (toward +infinity: 1.5 -> 2, -1.5 -> -1); the one overflow,
    ``INT32_MIN * INT32_MIN``, gives INT32_MAX.

    >>> int(saturating_rounding_doubling_high_mul(-2**31, -2**31))
    2147483647
    >>> saturating_rounding_doubling_high_mul(np.array([3, -3]), 2**30).tolist()
    [2, -1]
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    t = ab + nudge
    high = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high).astype(np.int64)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: ``x / 2**exponent`` rounded half away from zero.

    >>> rounding_divide_by_pot(np.array([5, -5, 6, -6]), 1).tolist()
    [3, -3, 3, -3]
    """
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    if np.any((exponent < 0) | (exponent > 62)):
        raise ValueError(f"rounding shift must be in [0, 62], got {exponent}")
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def saturating_left_shift(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp SaturatingRoundingMultiplyByPOT for a positive exponent: ``x * 2**e``, saturated."""
    x = np.asarray(x, dtype=np.int64)
    return np.clip(x << exponent, INT32_MIN, INT32_MAX)


def rescale(x: np.ndarray, src_integer_bits: int, dst_integer_bits: int) -> np.ndarray:
    """gemmlowp Rescale between fixed-point formats (raw int32 values)."""
    exponent = src_integer_bits - dst_integer_bits
    if exponent > 0:
        return saturating_left_shift(x, exponent)
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    return np.asarray(x, dtype=np.int64)


def multiply_by_quantized_multiplier(
    x: np.ndarray,
    multiplier: np.ndarray | int,
    shift: np.ndarray | int,
    rounding: str = DOUBLE_ROUNDING,
) -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier: ``x * multiplier / 2**31 * 2**shift`` in integers.

    ``x`` holds int32 values (as every TFLM caller's int32 operand does); ``multiplier`` and
    ``shift`` broadcast against it (per channel along the last axis). ``rounding="double"``
    (TFLM's default build) rounds after the high multiply and again after the right shift;
    ``"single"`` (``TFLITE_SINGLE_ROUNDING``) rounds once.

    >>> int(multiply_by_quantized_multiplier(-3, 1 << 30, -1))  # -3 * 0.5 / 2 = -0.75
    -1
    """
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == SINGLE_ROUNDING:
        total_shift = 31 - np.clip(shift, -31, 30)
        rounding_term = np.int64(1) << (total_shift - 1)
        return wrap_int32((x * multiplier + rounding_term) >> total_shift)
    if rounding != DOUBLE_ROUNDING:
        raise ValueError(f"rounding must be 'double' or 'single', got {rounding!r}")
    if multiplier.size and multiplier.min() >= 0 and multiplier.max() <= INT32_MAX:
        return _double_rounding_fast(x, multiplier, shift)
    return multiply_by_quantized_multiplier_reference(x, multiplier, shift)


def multiply_by_quantized_multiplier_reference(
    x: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int
) -> np.ndarray:
    """The double-rounding form composed literally from the gemmlowp primitives.

    The definition ``multiply_by_quantized_multiplier`` is tested against (any multiplier).
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left_shift = np.maximum(shift, 0)
    right_shift = np.maximum(-shift, 0)
    shifted = wrap_int32(x << left_shift)
    return rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(shifted, multiplier), right_shift
    )


def _double_rounding_fast(x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Double rounding for multipliers in [0, 2**31) in five in-place int64 passes.

    Why it equals the reference (``multiply_by_quantized_multiplier_reference``):

    - SaturatingRoundingDoublingHighMul(a, b) is ``trunc((a*b + nudge) / 2**31)`` with nudge
      ``2**30`` for ``a*b >= 0`` and ``1 - 2**30`` otherwise. For ``a*b >= 0`` that is
      ``floor((a*b + 2**30) / 2**31)``. For ``a*b < 0``, ``t = a*b + 1 - 2**30 < 0`` and
      ``trunc(t / 2**31) = ceil(t / 2**31) = floor((t + 2**31 - 1) / 2**31)
      = floor((a*b + 2**30) / 2**31)``. Both signs: ``(a*b + 2**30) >> 31``. Its one
      saturating case needs ``b == INT32_MIN``, excluded by ``0 <= b < 2**31``; and
      ``|a*b| < 2**62`` fits int64.
    - RoundingDivideByPOT(v, e) rounds half away from zero: ``(v + 2**(e-1)) >> e`` for
      ``v >= 0`` and ``(v + 2**(e-1) - 1) >> e`` for ``v < 0`` (``e >= 1``); ``v >> 63`` is
      the ``-1`` of the negative case. For ``e == 0`` it is ``v`` itself, so that ``-1`` is
      masked off there.
    """
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    v = wrap_int32(x << left) if np.any(left) else x
    high = np.multiply(v, multiplier, dtype=np.int64)  # a fresh array: x is never modified
    high += 1 << 30
    high >>= 31
    if not np.any(right):
        return high
    negative = high >> 63  # -1 where high < 0, else 0
    if not np.all(right > 0):
        negative &= -(right > 0).astype(np.int64)
    high += negative
    high += (np.int64(1) << right) >> 1
    high >>= right
    return high


def _round_half_away(value: float) -> int:
    """std::round: halves go away from zero (Python's round() goes to even)."""
    return math.floor(abs(value) + 0.5) * (1 if value >= 0 else -1)


# ---- softmax: gemmlowp's fixed-point exp and reciprocal, as TFLM's int8 softmax uses them ----

SOFTMAX_DIFF_INTEGER_BITS = 5  # input differences in Q5.26
SOFTMAX_ACCUM_INTEGER_BITS = 12  # sum of exps in Q12.19


def _fx_mul(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    return saturating_rounding_doubling_high_mul(a, b)


def exp_on_interval_between_negative_one_quarter_and_0_excl(a: np.ndarray) -> np.ndarray:
    """exp(a) for a in [-1/4, 0), Q0.31 in and out: 4th-order Taylor series around -1/8."""
    constant_term = 1895147668  # exp(-1/8) in Q0.31
    constant_1_over_3 = 715827883
    x = np.asarray(a, dtype=np.int64) + (1 << 28)  # a + 1/8
    x2 = _fx_mul(x, x)
    x3 = _fx_mul(x2, x)
    x4 = _fx_mul(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    poly = rounding_divide_by_pot(_fx_mul(wrap_int32(x4_over_4 + x3), constant_1_over_3) + x2, 1)
    return wrap_int32(constant_term + _fx_mul(constant_term, wrap_int32(x + poly)))


# exp(-2**k) in Q0.31 for k = -2..4: the barrel shifter's factors (gemmlowp constants).
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308),
               (2, 39332535), (3, 720401), (4, 242))  # fmt: skip


def exp_on_negative_values(
    a: np.ndarray, integer_bits: int = SOFTMAX_DIFF_INTEGER_BITS
) -> np.ndarray:
    """exp(a) for a <= 0 given in Q(integer_bits).(31 - integer_bits); result in Q0.31."""
    a = np.asarray(a, dtype=np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = exp_on_interval_between_negative_one_quarter_and_0_excl(
        rescale(a_mod_quarter_minus_one_quarter, integer_bits, 0)
    )
    remainder = wrap_int32(a_mod_quarter_minus_one_quarter - a)
    for exponent, factor in _EXP_BARREL:
        if integer_bits > exponent:
            bit = (remainder >> (fractional_bits + exponent)) & 1
            result = np.where(bit == 1, _fx_mul(result, factor), result)
    return np.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: np.ndarray) -> np.ndarray:
    """1 / (1 + a) for a in [0, 1): Q0.31 in and out, three Newton-Raphson steps in Q2.29."""
    a = np.asarray(a, dtype=np.int64)
    s = a + INT32_MAX  # RoundingHalfSum(a, One) in int64, then (s + sign) / 2 truncated
    sign = np.where(s >= 0, 1, -1)
    t = s + sign
    half_denominator = np.where(t >= 0, t // 2, -((-t) // 2))
    x = wrap_int32(1515870810 + _fx_mul(half_denominator, -1010580540))  # 48/17 - 32/17 * d
    one_q2 = 1 << 29
    for _ in range(3):
        half_denominator_times_x = _fx_mul(half_denominator, x)
        one_minus = wrap_int32(one_q2 - half_denominator_times_x)
        x = wrap_int32(x + saturating_left_shift(_fx_mul(x, one_minus), 2))
    return saturating_left_shift(x, 1)


def get_reciprocal(x: np.ndarray, x_integer_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """TFLite GetReciprocal: (Q0.31 reciprocal of the normalised x, num_bits_over_unit)."""
    x = np.asarray(x, dtype=np.int64)
    headroom_plus_one = _count_leading_zeros32(x)
    num_bits_over_unit = x_integer_digits - headroom_plus_one
    shifted = ((x & 0xFFFFFFFF) << headroom_plus_one) & 0xFFFFFFFF
    shifted_sum_minus_one = wrap_int32(shifted - (1 << 31))
    return one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), num_bits_over_unit


def _count_leading_zeros32(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, dtype=np.int64) & 0xFFFFFFFF
    bits = np.zeros(u.shape, dtype=np.int64)
    nz = u > 0
    bits[nz] = np.floor(np.log2(u[nz].astype(np.float64))).astype(np.int64) + 1
    # log2 in float64 is exact enough for 32-bit values except just below powers of two
    too_big = nz & ((np.int64(1) << np.maximum(bits - 1, 0)) > u)
    bits[too_big] -= 1
    return 32 - bits


def preprocess_softmax_scaling(beta: float, input_scale: float) -> tuple[int, int, int]:
    """TFLM's softmax preparation: (input_multiplier, input_left_shift, diff_min).

    ``beta * input_scale`` maps an int8 difference to Q5.26, capped at the largest int32;
    ``diff_min`` is the most negative difference whose exp still matters.
    """
    integer_bits = SOFTMAX_DIFF_INTEGER_BITS
    real = min(float(beta) * float(input_scale) * (1 << (31 - integer_bits)), (1 << 31) - 1.0)
    multiplier, left_shift = quantize_multiplier(real)
    if left_shift < 0:
        raise ValueError(
            f"softmax beta * input scale = {beta * input_scale:g} is too small for TFLM's int8 "
            "softmax (its multiplier must be >= 1 in Q5.26); use a larger input scale"
        )
    max_input_rescaled = (
        1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift)
    )
    diff_min = -math.floor(max_input_rescaled)
    return multiplier, left_shift, diff_min
