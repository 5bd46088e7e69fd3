"""Tests of edgekiln.pipeline.recipe."""

from __future__ import annotations

import doctest

import pytest
from torch import nn

from edgekiln.pipeline import recipe as recipe_module
from edgekiln.pipeline.constraints import (
    L1,
    L2,
    Clip,
    FakeQuant,
    Pattern,
    PatternKind,
    Prune,
    constrain,
    weight_quantizer,
)
from edgekiln.pipeline.quant import ObserverKind, weight_spec
from edgekiln.pipeline.recipe import Recipe, RecipeError
from edgekiln.pipeline.schedules import PolynomialDecay


def test_doctests() -> None:
    assert doctest.testmod(recipe_module, raise_on_error=False).failed == 0


def test_defaults() -> None:
    r = Recipe()
    assert (r.weight_bits, r.activation_bits, r.sparsity, r.clip, r.l1, r.l2) == (
        8,
        8,
        0.0,
        None,
        0.0,
        0.0,
    )
    assert r.pattern == Pattern(PatternKind.UNSTRUCTURED)
    assert r.observer is ObserverKind.MOVING_AVERAGE
    assert r.weight_observer is ObserverKind.LAST_VALUE
    assert r.weight_constraints() == [FakeQuant()]
    assert not r.prunes


def test_weight_constraints_order() -> None:
    r = Recipe(weight_bits=4, sparsity=0.5, clip=(-2, 2), l1=1e-4, l2=1e-3, observer="minmax")
    assert r.weight_constraints() == [
        Clip(-2.0, 2.0),
        L1(1e-4),
        L2(1e-3),
        Prune(0.5),
        FakeQuant(weight_spec(4)),
    ]
    layer = constrain(nn.Linear(8, 4), *r.weight_constraints())
    quantizer = weight_quantizer(layer)
    assert quantizer is not None and quantizer.spec.qmax == 7


def test_n_of_m_pattern_and_schedule() -> None:
    r = Recipe(pattern="2:4")
    assert r.prunes and r.weight_constraints()[0] == Prune(pattern="2:4")
    assert Recipe(pattern="2:4", sparsity=0.5).weight_constraints()[0] == Prune(pattern="2:4")
    schedule = PolynomialDecay(0.0, 0.7, 0, 100)
    r = Recipe(sparsity=schedule, pattern="channel", freeze_observers_after=50)
    prune, fq = r.weight_constraints()
    assert prune == Prune(schedule, pattern="channel") and fq == FakeQuant(freeze_after=50)


def test_from_dict_and_tables() -> None:
    r = Recipe.from_dict({"weight_bits": 6, "clip": [-1, 1], "sparsity": 0.25})
    assert r.weight_bits == 6 and r.clip == (-1.0, 1.0) and r.sparsity == 0.25
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    doc = tomllib.loads(
        """
        [quantize]
        weight_bits = 8
        observer = "minmax"
        l1 = 1e-5

        [sparsity]
        target = 0.8
        pattern = "unstructured"
        schedule = "polynomial"
        begin_step = 10
        end_step = 1010
        frequency = 50

        [export]
        formats = ["onnx"]
        """
    )
    r = Recipe.from_tables(doc)
    assert r.observer is ObserverKind.MINMAX and r.l1 == 1e-5
    assert r.sparsity == PolynomialDecay(0.0, 0.8, 10, 1010, frequency=50, power=3)
    r = Recipe.from_tables({"sparsity": {"target": 0.5, "pattern": "channel"}})
    assert r.sparsity == 0.5 and str(r.pattern) == "channel"
    assert Recipe.from_tables({}) == Recipe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 16}, r"\[quantize\] weight_bits = 16 is not valid: allowed an integer"),
        ({"activation_bits": True}, r"\[quantize\] activation_bits = True is not valid"),
        ({"observer": "ema"}, r"\[quantize\] observer = 'ema' is not valid: allowed 'minmax', "),
        ({"weight_observer": 3}, r"\[quantize\] weight_observer = 3 is not valid"),
        ({"freeze_observers_after": 0}, r"\[quantize\] freeze_observers_after = 0 is not valid"),
        ({"clip": (1, -1)}, r"\[quantize\] clip = \(1, -1\) is not valid: allowed \[min, max\]"),
        ({"clip": 1.0}, r"\[quantize\] clip = 1.0 is not valid: allowed \[min, max\]"),
        ({"clip": (0, float("inf"))}, r"\[quantize\] clip = inf is not valid: allowed a finite"),
        ({"l1": -1}, r"\[quantize\] l1 = -1 is not valid: allowed a finite number >= 0.0"),
        ({"l2": "big"}, r"\[quantize\] l2 = 'big' is not valid"),
        ({"pattern": "4:8:2"}, r"\[sparsity\] pattern = '4:8:2' is not valid: allowed 'unstruc"),
        ({"sparsity": 1.2}, r"\[sparsity\] target = 1.2 is not valid: allowed a finite number"),
        (
            {"sparsity": 0.3, "pattern": "2:4"},
            r"\[sparsity\] target = 0.3 is not valid: allowed 0.5 or none: pattern '2:4' fixes",
        ),
        (
            {"sparsity": PolynomialDecay(0, 0.5, 0, 10), "pattern": "1:4"},
            r"\[sparsity\] schedule = PolynomialDecay\(.*\) is not valid: allowed none with",
        ),
    ],
)
def test_recipe_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        Recipe(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"quantize": {"bits": 8}}, r"\[quantize\] bits is not a known key: allowed weight_bits"),
        ({"quantize": [1]}, r"\[quantize\] must be a table of keys, got list"),
        ({"sparsity": 0.5}, r"\[sparsity\] must be a table of keys, got float"),
        ({"sparsity": {"amount": 0.5}}, r"\[sparsity\] amount is not a known key: allowed target"),
        (
            {"quantize": {"sparsity": 0.5}},
            r"\[quantize\] sparsity belongs in the \[sparsity\] table \(as target\)",
        ),
        (
            {"sparsity": {"target": 0.5, "end_step": 10}},
            r"\[sparsity\] end_step applies to schedule = 'polynomial' only",
        ),
        (
            {"sparsity": {"schedule": "cosine"}},
            r"\[sparsity\] schedule = 'cosine' is not valid: allowed 'constant' or 'polynomial'",
        ),
        (
            {"sparsity": {"schedule": "polynomial", "target": 0.5}},
            r"\[sparsity\] schedule = 'polynomial' needs target and end_step",
        ),
        (
            {"sparsity": {"schedule": "polynomial", "target": 0.5, "end_step": 0}},
            r"\[sparsity\] end_step must be an int >= 1, got 0",
        ),
        (
            {"sparsity": {"schedule": "polynomial", "target": 0.1, "initial": 0.4, "end_step": 9}},
            r"\[sparsity\] target=0.1 is below initial=0.4",
        ),
        (
            {"sparsity": {"pattern": "diagonal"}},
            r"\[sparsity\] pattern = 'diagonal' is not valid",
        ),
    ],
)
def test_table_errors(document: dict[str, object], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        Recipe.from_tables(document)


def test_from_dict_errors() -> None:
    with pytest.raises(RecipeError, match=r"\[train\] lr is not a known key: allowed weight_bits"):
        Recipe.from_dict({"lr": 0.1}, where="train")
    with pytest.raises(RecipeError, match=r"\[quantize\] must be a table of keys, got str"):
        Recipe.from_dict("weight_bits=8")  # type: ignore[arg-type]
    assert issubclass(RecipeError, ValueError)
