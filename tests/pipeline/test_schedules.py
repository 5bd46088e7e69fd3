"""Tests of edgekiln.pipeline.schedules."""

from __future__ import annotations

import doctest

import pytest

from edgekiln.pipeline import schedules
from edgekiln.pipeline.schedules import ConstantSparsity, PolynomialDecay


def test_doctests() -> None:
    assert doctest.testmod(schedules, raise_on_error=False).failed == 0


def test_constant() -> None:
    s = ConstantSparsity(0.6)
    assert [s.value(k) for k in (0, 1, 10_000)] == [0.6, 0.6, 0.6]
    assert [s.should_update(k) for k in (0, 1, 100)] == [True, False, False]
    late = ConstantSparsity(0.6, begin_step=10)
    assert (late.value(9), late.value(10), late.should_update(10)) == (0.0, 0.6, True)
    assert s.final_value == 0.6


def test_polynomial_values_at_chosen_steps() -> None:
    s = PolynomialDecay(0.1, 0.9, begin_step=100, end_step=500, frequency=100, power=3)
    # s = final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power
    assert s.value(0) == 0.0 and s.value(99) == 0.0
    assert s.value(100) == pytest.approx(0.1)
    assert s.value(200) == pytest.approx(0.9 - 0.8 * 0.75**3)  # 0.5625
    assert s.value(300) == pytest.approx(0.8)
    assert s.value(500) == pytest.approx(0.9) and s.value(10_000) == pytest.approx(0.9)
    assert [k for k in range(0, 700) if s.should_update(k)] == [100, 200, 300, 400, 500]


def test_polynomial_reaches_final_when_frequency_does_not_divide() -> None:
    s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=250, frequency=100, power=1)
    assert [k for k in range(400) if s.should_update(k)] == [0, 100, 200, 250]
    assert s.value(250) == 0.5 and s.final_value == 0.5


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ConstantSparsity(1.0), r"ConstantSparsity.sparsity=1.0 is outside \[0, 1\)"),
        (lambda: ConstantSparsity(-0.1), r"ConstantSparsity.sparsity=-0.1 is outside \[0, 1\)"),
        (lambda: ConstantSparsity("a"), r"ConstantSparsity.sparsity must be a number in \[0, 1\)"),
        (lambda: ConstantSparsity(0.5, -1), r"ConstantSparsity.begin_step must be an int >= 0"),
        (
            lambda: PolynomialDecay(0.5, 0.2, 0, 10),
            r"final_sparsity=0.2 is below initial_sparsity=0.5: pruned weights never come back",
        ),
        (
            lambda: PolynomialDecay(0.0, 0.5, 10, 10),
            r"PolynomialDecay.end_step must be an int >= 11, got 10",
        ),
        (
            lambda: PolynomialDecay(0.0, 0.5, 0, 10, frequency=0),
            r"PolynomialDecay.frequency must be an int >= 1, got 0",
        ),
        (
            lambda: PolynomialDecay(0.0, 0.5, 0, 10, power=0),
            r"PolynomialDecay.power must be a number > 0, got 0",
        ),
        (
            lambda: PolynomialDecay(0.0, float("nan"), 0, 10),
            r"PolynomialDecay.final_sparsity=nan is outside \[0, 1\)",
        ),
    ],
)
def test_schedule_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
