"""Pruning schedules: the target sparsity at each training step, and when to recompute masks.

A *step* is one projection of the constrained weight, which happens once per optimizer step (see
:mod:`edgekiln.pipeline.constraints`). Step 0 is the projection made when the constraint is put on.

Masks in edgekiln never bring a pruned weight back, so a schedule's sparsity must not fall:
:class:`PolynomialDecay` rejects ``final_sparsity < initial_sparsity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ConstantSparsity", "PolynomialDecay", "SparsitySchedule"]


def _check_sparsity(owner: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{field} must be a number in [0, 1), got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"{owner}.{field}={value!r} is outside [0, 1): it is the fraction of zero weights"
        )
    return float(value)


def _check_step(owner: str, field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{field} must be an int >= {minimum}, got {value!r}")
    return value


class SparsitySchedule:
    """Base of the schedules: ``value(step)`` is the target, ``should_update(step)`` says when."""

    def value(self, step: int) -> float:
        """Target sparsity (fraction of zeros) at ``step``."""
        raise NotImplementedError

    def should_update(self, step: int) -> bool:
        """True on the steps where masks are recomputed."""
        raise NotImplementedError

    @property
    def final_value(self) -> float:
        """The sparsity the schedule ends at."""
        raise NotImplementedError


@dataclass(frozen=True)
class ConstantSparsity(SparsitySchedule):
    """Prune to ``sparsity`` once, at ``begin_step``, and hold it.

    Recomputing a constant target later would pick the same mask (pruned weights never come back
    and keep the lowest scores), so the mask is computed once.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) or a negative ``begin_step``.

    >>> s = ConstantSparsity(0.5)
    >>> s.value(0), s.should_update(0), s.should_update(100)
    (0.5, True, False)
    """

    sparsity: float
    begin_step: int = 0

    def __post_init__(self) -> None:
        _check_sparsity("ConstantSparsity", "sparsity", self.sparsity)
        _check_step("ConstantSparsity", "begin_step", self.begin_step, 0)

    def value(self, step: int) -> float:
        return float(self.sparsity) if step >= self.begin_step else 0.0

    def should_update(self, step: int) -> bool:
        return step == self.begin_step

    @property
    def final_value(self) -> float:
        return float(self.sparsity)


@dataclass(frozen=True)
class PolynomialDecay(SparsitySchedule):
    """TF-MOT's polynomial schedule: sparsity rises from ``initial`` to ``final`` over the steps.

    ``s(step) = final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power`` for
    ``begin <= step <= end``; 0 before ``begin``; ``final`` after ``end``. Masks are recomputed
    where ``(step - begin) % frequency == 0`` inside ``[begin, end]``, and also at ``end`` itself so
    that the final sparsity is always reached (TF-MOT misses it when ``frequency`` does not divide
    ``end - begin``).

    Raises:
        ValueError: A sparsity outside [0, 1), ``final < initial``, ``end_step <= begin_step``,
            ``frequency < 1`` or ``power <= 0``.

    >>> s = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000, frequency=100, power=3)
    >>> round(s.value(500), 4), s.value(2000), s.should_update(500), s.should_update(550)
    (0.7, 0.8, True, False)
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 100
    power: float = 3

    def __post_init__(self) -> None:
        initial = _check_sparsity("PolynomialDecay", "initial_sparsity", self.initial_sparsity)
        final = _check_sparsity("PolynomialDecay", "final_sparsity", self.final_sparsity)
        if final < initial:
            raise ValueError(
                f"PolynomialDecay.final_sparsity={final} is below initial_sparsity={initial}: "
                "pruned weights never come back, so sparsity can only rise"
            )
        begin = _check_step("PolynomialDecay", "begin_step", self.begin_step, 0)
        _check_step("PolynomialDecay", "end_step", self.end_step, begin + 1)
        _check_step("PolynomialDecay", "frequency", self.frequency, 1)
        power = self.power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise ValueError(f"PolynomialDecay.power must be a number > 0, got {power!r}")

    def value(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return float(self.final_sparsity)
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        initial, final = float(self.initial_sparsity), float(self.final_sparsity)
        return final + (initial - final) * (1.0 - progress) ** self.power

    def should_update(self, step: int) -> bool:
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    @property
    def final_value(self) -> float:
        return float(self.final_sparsity)
