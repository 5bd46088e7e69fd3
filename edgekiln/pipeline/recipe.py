"""The recipe: one validated set of training-time constraint settings, from Python or from TOML.

TOML layout and how it maps to :class:`Recipe` fields (:meth:`Recipe.from_tables` reads both tables,
:meth:`Recipe.from_dict` one flat table)::

    [quantize]
    weight_bits = 8                  # weight_bits, 2..8
    activation_bits = 8              # activation_bits, 2..8
    observer = "moving_average"      # observer (activations): minmax | moving_average | last_value
    weight_observer = "last_value"   # weight_observer: minmax | moving_average | last_value
    freeze_observers_after = 2000    # freeze_observers_after (training forwards), optional
    clip = [-1.0, 1.0]               # clip, optional
    l1 = 0.0                         # l1: per-step soft threshold (lr * lambda)
    l2 = 0.0                         # l2: per-step shrink (lr * lambda)

    [sparsity]
    target = 0.8                     # sparsity = target (a number in [0, 1)) ...
    pattern = "unstructured"         # pattern: unstructured | channel | N:M (e.g. "2:4")
    schedule = "polynomial"          # ... or a schedule: constant (default) | polynomial
    initial = 0.0                    #   PolynomialDecay.initial_sparsity
    begin_step = 0                   #   PolynomialDecay.begin_step
    end_step = 1000                  #   PolynomialDecay.end_step
    frequency = 100                  #   PolynomialDecay.frequency
    power = 3                        #   PolynomialDecay.power
    mode = "joint"                   # sparsity_mode: joint | prune_then_qat
    sweep = [0.25, 0.5, 0.75]        # sparsity_sweep: targets edgekiln run compares, optional

In a flat table (``from_dict``), the ``[sparsity]`` keys may appear as ``sparsity`` (a number) and
``pattern``. Errors are :class:`RecipeError` naming the key path (``[sparsity] pattern``), the value
given and what is allowed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from edgekiln.pipeline.constraints import L1, L2, Clip, Constraint, FakeQuant, Pattern, Prune
from edgekiln.pipeline.quant import ObserverKind, weight_spec
from edgekiln.pipeline.schedules import PolynomialDecay, SparsitySchedule

__all__ = ["Recipe", "RecipeError", "SparsityMode"]


class SparsityMode(str, enum.Enum):
    """How pruning and quantization-aware training share the fine-tuning.

    ``JOINT``: masks and fake-quantization train together from the first step.
    ``PRUNE_THEN_QAT``: a pruning phase with fake-quantization off (``prepare`` starts the model
    so), then :func:`edgekiln.pipeline.constraints.start_qat` freezes the masks and QAT runs
    with them fixed. Either way a pruned weight never comes back.

    >>> SparsityMode("prune_then_qat")
    <SparsityMode.PRUNE_THEN_QAT: 'prune_then_qat'>
    """

    JOINT = "joint"
    PRUNE_THEN_QAT = "prune_then_qat"


class RecipeError(ValueError):
    """A recipe key with a bad value, or an unknown key; the message names the key path."""


def _fail(where: str, key: str, value: object, allowed: str) -> RecipeError:
    return RecipeError(f"[{where}] {key} = {value!r} is not valid: allowed {allowed}")


def _bits(where: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise _fail(where, key, value, "an integer from 2 to 8")
    return value


def _number(where: str, key: str, value: object, low: float, high: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and math.isfinite(value) and value >= low  # type: ignore[arg-type,operator]
    ok = ok and (high is None or value < high)  # type: ignore[operator]
    if not ok:
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise _fail(where, key, value, f"a finite number {bound}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Training-time constraint settings for every conv/linear kernel (and the activation bits).

    Args:
        weight_bits: Weight grid width (symmetric, per output channel, narrow range), 2..8.
        activation_bits: Activation grid width (asymmetric, per tensor), 2..8.
        sparsity: Fraction of zero weights in [0, 1), or a schedule. 0 means no pruning, except
            with an N:M pattern, which fixes it at ``1 - N/M``.
        pattern: "unstructured", "channel" or "N:M" (turned into a :class:`Pattern`).
        clip: ``(min, max)`` to clamp stored weights into after every step, or None.
        l1: Per-step L1 soft threshold (``lr * lambda``), >= 0.
        l2: Per-step L2 shrink (``lr * lambda``), >= 0.
        observer: Activation observer: "minmax", "moving_average" or "last_value".
        weight_observer: Weight observer (default "last_value": the current kernel's range).
        freeze_observers_after: Freeze observers after this many training forwards; None never.
        sparsity_mode: "joint" (prune during QAT) or "prune_then_qat" (prune with
            fake-quantization off, then QAT with frozen masks); see :class:`SparsityMode`.
        sparsity_sweep: Sparsity targets to fine-tune and compare, each in [0, 1), ascending;
            empty for none. :meth:`at_sparsity` gives the recipe of one point.

    Raises:
        RecipeError: Any field out of its allowed values.

    >>> Recipe(sparsity=0.5, clip=(-1, 1)).weight_constraints()[:2]
    [Clip(min=-1.0, max=1.0), Prune(sparsity=0.5, pattern='unstructured')]
    >>> str(Recipe(pattern="2:4").pattern)
    '2:4'
    """

    weight_bits: int = 8
    activation_bits: int = 8
    sparsity: float | SparsitySchedule = 0.0
    pattern: Pattern | str = "unstructured"
    clip: tuple[float, float] | None = None
    l1: float = 0.0
    l2: float = 0.0
    observer: ObserverKind | str = ObserverKind.MOVING_AVERAGE
    weight_observer: ObserverKind | str = ObserverKind.LAST_VALUE
    freeze_observers_after: int | None = None
    sparsity_mode: SparsityMode | str = SparsityMode.JOINT
    sparsity_sweep: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        where = "quantize"
        _bits(where, "weight_bits", self.weight_bits)
        _bits(where, "activation_bits", self.activation_bits)
        for key in ("observer", "weight_observer"):
            try:
                object.__setattr__(self, key, ObserverKind.parse(getattr(self, key)))
            except ValueError:
                allowed = ", ".join(repr(k.value) for k in ObserverKind)
                raise _fail(where, key, getattr(self, key), allowed) from None
        after = self.freeze_observers_after
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 1
        ):
            raise _fail(where, "freeze_observers_after", after, "a positive integer or none")
        if self.clip is not None:
            clip = self.clip
            if not isinstance(clip, (tuple, list)) or len(clip) != 2:
                raise _fail(where, "clip", clip, "[min, max] with min < max")
            low = _number(where, "clip", clip[0], -math.inf)
            high = _number(where, "clip", clip[1], -math.inf)
            if not low < high:
                raise _fail(where, "clip", clip, "[min, max] with min < max")
            object.__setattr__(self, "clip", (low, high))
        object.__setattr__(self, "l1", _number(where, "l1", self.l1, 0.0))
        object.__setattr__(self, "l2", _number(where, "l2", self.l2, 0.0))
        self._check_sparsity()
        try:
            object.__setattr__(self, "sparsity_mode", SparsityMode(self.sparsity_mode))
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in SparsityMode)
            raise _fail("sparsity", "mode", self.sparsity_mode, allowed) from None
        self._check_sweep()

    def _check_sweep(self) -> None:
        sweep = self.sparsity_sweep
        allowed = "a list of sparsity targets in [0, 1), ascending, e.g. [0.25, 0.5, 0.75]"
        if not isinstance(sweep, (tuple, list)):
            raise _fail("sparsity", "sweep", sweep, allowed)
        values = tuple(_number("sparsity", "sweep", v, 0.0, 1.0) for v in sweep)
        if list(values) != sorted(set(values)):
            raise _fail("sparsity", "sweep", list(sweep), allowed)
        if values and Pattern.parse(self.pattern).sparsity is not None:
            raise _fail(
                "sparsity",
                "sweep",
                list(sweep),
                f"none with pattern '{self.pattern}' (it fixes "
                "the sparsity); sweep with pattern 'unstructured' or 'channel'",
            )
        object.__setattr__(self, "sparsity_sweep", values)

    def at_sparsity(self, sparsity: float) -> Recipe:
        """This recipe at one sweep point: ``sparsity`` as the (final) target, no sweep.

        A schedule keeps its shape and ends at ``sparsity`` instead.

        >>> r = Recipe(pattern="channel", sparsity_sweep=[0.25, 0.5])
        >>> [x.sparsity for x in map(r.at_sparsity, r.sparsity_sweep)]
        [0.25, 0.5]
        """
        target: float | SparsitySchedule = sparsity
        if isinstance(self.sparsity, PolynomialDecay):
            s = _number("sparsity", "sweep", sparsity, 0.0, 1.0)
            initial = min(self.sparsity.initial_sparsity, s)
            target = replace(self.sparsity, initial_sparsity=initial, final_sparsity=s)
        return replace(self, sparsity=target, sparsity_sweep=())

    def _check_sparsity(self) -> None:
        try:
            pattern = Pattern.parse(self.pattern)
        except ValueError:
            allowed = "'unstructured', 'channel' or 'N:M' with 1 <= N < M, e.g. '2:4'"
            raise _fail("sparsity", "pattern", self.pattern, allowed) from None
        object.__setattr__(self, "pattern", pattern)
        if isinstance(self.sparsity, SparsitySchedule):
            if pattern.sparsity is not None:
                raise _fail(
                    "sparsity", "schedule", self.sparsity, f"none with pattern '{pattern}'"
                ) from None
            return
        sparsity = _number("sparsity", "target", self.sparsity, 0.0, 1.0)
        if pattern.sparsity is not None and sparsity not in (0.0, pattern.sparsity):
            raise _fail(
                "sparsity",
                "target",
                self.sparsity,
                f"{pattern.sparsity} or none: pattern '{pattern}' fixes it",
            )
        object.__setattr__(self, "sparsity", sparsity)

    @property
    def prunes(self) -> bool:
        """True when the recipe puts a :class:`Prune` on the kernels."""
        pattern = Pattern.parse(self.pattern)
        return (
            isinstance(self.sparsity, SparsitySchedule)
            or self.sparsity > 0
            or pattern.sparsity is not None
        )

    def weight_constraints(self) -> list[Constraint]:
        """Fresh constraints for one kernel: Clip / L1 / L2 projections, then Prune, then FakeQuant.

        >>> Recipe(weight_bits=4, l1=1e-4).weight_constraints()[0]
        L1(strength=0.0001)
        """
        out: list[Constraint] = []
        if self.clip is not None:
            out.append(Clip(*self.clip))
        if self.l1 > 0:
            out.append(L1(self.l1))
        if self.l2 > 0:
            out.append(L2(self.l2))
        if self.prunes:
            pattern = Pattern.parse(self.pattern)
            if pattern.sparsity is not None:
                out.append(Prune(pattern=pattern))
            else:
                out.append(Prune(self.sparsity, pattern=pattern))
        out.append(
            FakeQuant(
                weight_spec(self.weight_bits),
                observer=self.weight_observer,
                freeze_after=self.freeze_observers_after,
            )
        )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "quantize") -> Recipe:
        """A recipe from one flat table whose keys are the field names (``where`` names it).

        Raises:
            RecipeError: An unknown key or a bad value; the message names ``[where] key``.

        >>> Recipe.from_dict({"weight_bits": 4, "sparsity": 0.5}).weight_bits
        4
        >>> try:
        ...     Recipe.from_dict({"l1": -0.5})
        ... except RecipeError as exc:
        ...     print(exc)
        [quantize] l1 = -0.5 is not valid: allowed a finite number >= 0.0
        """
        if not isinstance(d, Mapping):
            raise RecipeError(f"[{where}] must be a table of keys, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                raise RecipeError(
                    f"[{where}] {key} is not a known key: allowed {', '.join(allowed)}"
                )
        values = dict(d)
        for key in ("clip", "sparsity_sweep"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_tables(cls, document: Mapping[str, Any]) -> Recipe:
        """A recipe from a parsed TOML document with ``[quantize]`` and ``[sparsity]`` tables.

        Other top-level tables are ignored (they belong to other stages).

        Raises:
            RecipeError: An unknown key or a bad value in either table.

        >>> doc = {"quantize": {"weight_bits": 8},
        ...        "sparsity": {"schedule": "polynomial", "target": 0.8, "end_step": 1000}}
        >>> Recipe.from_tables(doc).sparsity.value(1000)
        0.8
        """
        quantize = document.get("quantize", {})
        if not isinstance(quantize, Mapping):
            raise RecipeError(f"[quantize] must be a table of keys, got {type(quantize).__name__}")
        recipe_fields = dict(quantize)
        for key, as_key in (
            ("sparsity", "target"),
            ("pattern", "pattern"),
            ("sparsity_mode", "mode"),
        ):
            if key in recipe_fields:
                raise RecipeError(f"[quantize] {key} belongs in the [sparsity] table (as {as_key})")
        table = document.get("sparsity")
        if table is not None:
            recipe_fields.update(_sparsity_fields(table))
        return cls.from_dict(recipe_fields, where="quantize")


_SPARSITY_KEYS = (
    "target",
    "pattern",
    "schedule",
    "initial",
    "begin_step",
    "end_step",
    "frequency",
    "power",
    "mode",
    "sweep",
)


def _sparsity_fields(table: object) -> dict[str, Any]:
    """Turn a ``[sparsity]`` table into the ``sparsity`` and ``pattern`` fields."""
    where = "sparsity"
    if not isinstance(table, Mapping):
        raise RecipeError(f"[{where}] must be a table of keys, got {type(table).__name__}")
    for key in table:
        if key not in _SPARSITY_KEYS:
            raise RecipeError(
                f"[{where}] {key} is not a known key: allowed {', '.join(_SPARSITY_KEYS)}"
            )
    out: dict[str, Any] = {}
    if "pattern" in table:
        out["pattern"] = table["pattern"]
    if "mode" in table:
        out["sparsity_mode"] = table["mode"]
    if "sweep" in table:
        sweep = table["sweep"]
        out["sparsity_sweep"] = tuple(sweep) if isinstance(sweep, list) else sweep
    schedule = table.get("schedule", "constant")
    target = table.get("target")
    if schedule == "constant":
        for key in ("initial", "begin_step", "end_step", "frequency", "power"):
            if key in table:
                raise RecipeError(
                    f"[{where}] {key} applies to schedule = 'polynomial' only (schedule is "
                    "'constant')"
                )
        if target is not None:
            out["sparsity"] = target
        return out
    if schedule != "polynomial":
        raise _fail(where, "schedule", schedule, "'constant' or 'polynomial'")
    if target is None or "end_step" not in table:
        raise RecipeError(f"[{where}] schedule = 'polynomial' needs target and end_step")
    try:
        out["sparsity"] = PolynomialDecay(
            initial_sparsity=table.get("initial", 0.0),
            final_sparsity=target,
            begin_step=table.get("begin_step", 0),
            end_step=table["end_step"],
            frequency=table.get("frequency", 100),
            power=table.get("power", 3),
        )
    except ValueError as exc:
        message = str(exc).replace("PolynomialDecay.", "")
        message = message.replace("final_sparsity", "target").replace("initial_sparsity", "initial")
        raise RecipeError(f"[{where}] {message}") from None
    return out
