"""Training-time constraints on layer kernels: fake-quantization, pruning, clipping, L1, L2, ...

Usage::

    constrain(conv, Clip(-1.0, 1.0), Prune(0.5), FakeQuant())
    conv.weight            # the kernel the forward pass uses: clipped, masked, fake-quantized

Design
------
A constraint is a small validated config object (:class:`Clip`, :class:`L1`, :class:`L2`,
:class:`Prune`, :class:`Transform`, :class:`FakeQuant`). :func:`constrain` turns each into a module
registered with ``torch.nn.utils.parametrize`` on ``module.<name>``, in the order given, so state
(masks, observers, step counters) lives in buffers and travels with ``state_dict``. Configs can be
shared between layers; each layer gets its own state.

Two kinds of work happen:

- **Forward-time** (in the parametrization, every forward): :class:`Prune` multiplies by its mask,
  :class:`Transform` applies its function, :class:`FakeQuant` observes (training) and
  fake-quantizes. Gradients flow through them (straight-through for fake-quantization).
- **Projections** (on the stored tensor ``module.parametrizations.<name>.original``, under
  ``torch.no_grad()``, never inside the forward graph): :class:`Clip` clamps, :class:`L1`
  soft-thresholds, :class:`L2` shrinks, :class:`Prune` updates its mask on its schedule's steps and
  zeroes the pruned stored weights (so momentum cannot move them and masks never revive).

When projections run: once per change of the stored tensor. ``constrain`` runs the new constraints'
projections at once (step 0). Then a forward pre-hook on the module runs them before a forward
builds its graph, when the module is training, grad is enabled, and the stored tensor changed since
the last projection (detected with the tensor's in-place version counter, which every optimizer
step bumps). :func:`apply_projections` does the same on demand, e.g. right after
``optimizer.step()`` or before export. So, whichever way they are triggered, projections run exactly
once per optimizer step: gradient accumulation (several forwards per step) does not apply L1 twice.
``state_dict()`` runs pending projections first, so a checkpoint holds projected tensors, and
``load_state_dict`` counts what it loads as projected: training resumes on the same steps.
A *step* of a pruning schedule is one such projection.

Ordering rules (checked, with errors that say the way out):

- :class:`FakeQuant` is last and appears once: anything after it would make the exported kernel
  differ from the quantized one.
- :class:`Prune` appears once per tensor (two masks cannot be reconciled; use a schedule).
- :class:`Clip`, :class:`L1`, :class:`L2` act on the stored tensor, so they may not follow a
  :class:`Transform` (they would not act on the transform's output, as their position suggests).
- Clip, L1, L2 and Transform stack freely (two Clips intersect).

Known shortcoming: the version counter is local to a process. DDP's initial broadcast copies rank
0's parameters in place, which bumps the counter (on every rank with torch 2.13; the copy may skip
rank 0 in other versions), so the next forward would count a projection step that no optimizer
took. :func:`edgekiln.distributed.wrap` runs :func:`apply_projections` before wrapping and
:func:`mark_projected` after it; do the same when wrapping by hand. It goes away when
projections are keyed to optimizer steps.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgekiln.pipeline.quant import (
    WEIGHT_SPEC,
    FakeQuantizer,
    ObserverKind,
    QuantSpec,
)
from edgekiln.pipeline.schedules import ConstantSparsity, SparsitySchedule

__all__ = [
    "L1",
    "L2",
    "ChannelGroup",
    "Clip",
    "Constraint",
    "FakeQuant",
    "Pattern",
    "PatternKind",
    "Prune",
    "Transform",
    "apply_projections",
    "constrain",
    "constraints_of",
    "freeze_masks",
    "mark_projected",
    "prune_mask",
    "set_fake_quant",
    "start_qat",
    "weight_quantizer",
]

logger = logging.getLogger(__name__)


# Sparsity patterns -------------------------------------------------------------------------------


class PatternKind(enum.Enum):
    """The shape of what pruning removes."""

    UNSTRUCTURED = "unstructured"
    """Single weights, smallest magnitude first."""
    CHANNEL = "channel"
    """Whole output filters (dim 0), smallest L2 norm first."""
    N_OF_M = "n:m"
    """N kept out of every M consecutive input elements (dim 1), e.g. 2:4."""


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A pruning pattern; build it from a string with :meth:`parse`.

    ``"unstructured"``, ``"channel"`` or ``"N:M"`` (N kept out of every M consecutive elements
    along the input dimension: for a conv weight ``(O, I, kh, kw)`` the groups run along ``I`` at
    each output channel and kernel position; for a linear weight ``(O, I)`` along ``I``). An N:M
    pattern fixes the sparsity at ``1 - N/M``.

    >>> Pattern.parse("2:4").sparsity
    0.5
    >>> str(Pattern.parse("channel"))
    'channel'
    """

    kind: PatternKind
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, value: Pattern | PatternKind | str) -> Pattern:
        """Turn "unstructured", "channel" or "N:M" (1 <= N < M) into a Pattern."""
        if isinstance(value, Pattern):
            return value
        if isinstance(value, PatternKind) and value is not PatternKind.N_OF_M:
            return cls(value)
        if isinstance(value, str):
            if value in ("unstructured", "channel"):
                return cls(PatternKind(value))
            match = _NM_RE.match(value)
            if match:
                n, m = int(match.group(1)), int(match.group(2))
                if 1 <= n < m:
                    return cls(PatternKind.N_OF_M, n, m)
        raise ValueError(
            f"pattern={value!r} is not known: allowed 'unstructured', 'channel' or 'N:M' with "
            "1 <= N < M, e.g. '2:4'"
        )

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (``1 - N/M``); None for the others."""
        if self.kind is PatternKind.N_OF_M:
            return 1.0 - self.n / self.m
        return None

    def __str__(self) -> str:
        if self.kind is PatternKind.N_OF_M:
            return f"{self.n}:{self.m}"
        return self.kind.value


# Constraint configs ------------------------------------------------------------------------------


class Constraint:
    """Base of the constraint configs. Subclasses are frozen dataclasses; :func:`constrain` applies
    them. ``stackable`` says whether a tensor may carry several of the kind."""

    stackable: ClassVar[bool] = True
    projection_only: ClassVar[bool] = False

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        """The module that applies this constraint to ``tensor`` (``where`` names it in errors)."""
        raise NotImplementedError


def _check_finite(owner: str, field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}({field_name}={value!r}): {field_name} must be a finite number")
    return float(value)


@dataclass(frozen=True)
class Clip(Constraint):
    """Projection: clamp the stored weight into ``[min, max]`` after every optimizer step.

    Raises:
        ValueError: A bound not finite, or ``min >= max``.

    >>> Clip(-1, 1)
    Clip(min=-1.0, max=1.0)
    """

    min: float
    max: float
    projection_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        low = _check_finite("Clip", "min", self.min)
        high = _check_finite("Clip", "max", self.max)
        if not low < high:
            raise ValueError(f"Clip(min={low}, max={high}) needs min < max")
        object.__setattr__(self, "min", low)
        object.__setattr__(self, "max", high)

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        return _ProjectionModule(self)

    def project(self, stored: Tensor) -> None:
        """Clamp ``stored`` in place."""
        stored.clamp_(self.min, self.max)


def _check_strength(owner: str, value: object) -> float:
    strength = _check_finite(owner, "strength", value)
    if strength < 0:
        raise ValueError(f"{owner}(strength={strength}): strength must be >= 0")
    return strength


@dataclass(frozen=True)
class L1(Constraint):
    """Projection: proximal L1 step ``w = sign(w) * max(|w| - strength, 0)`` per optimizer step.

    ``strength`` is the per-step threshold, i.e. ``lr * lambda`` for a penalty ``lambda * |w|_1``.
    Unlike an L1 term in the loss, it produces exact zeros.

    Raises:
        ValueError: ``strength`` negative or not finite.

    >>> w = torch.tensor([0.5, -0.05, -0.3])
    >>> L1(0.1).project(w); w.tolist()
    [0.4000000059604645, 0.0, -0.20000001788139343]
    """

    strength: float
    projection_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", _check_strength("L1", self.strength))

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        return _ProjectionModule(self)

    def project(self, stored: Tensor) -> None:
        """Soft-threshold ``stored`` in place."""
        if self.strength > 0:
            shrunk = stored - torch.sign(stored) * self.strength
            stored.copy_(torch.where(stored.abs() > self.strength, shrunk, 0.0))


@dataclass(frozen=True)
class L2(Constraint):
    """Projection: proximal L2 step ``w = w / (1 + strength)`` per optimizer step.

    ``strength`` is ``lr * lambda`` for a penalty ``lambda / 2 * |w|^2``.

    Raises:
        ValueError: ``strength`` negative or not finite.

    >>> w = torch.tensor([1.0, -2.0])
    >>> L2(1.0).project(w); w.tolist()
    [0.5, -1.0]
    """

    strength: float
    projection_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", _check_strength("L2", self.strength))

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        return _ProjectionModule(self)

    def project(self, stored: Tensor) -> None:
        """Shrink ``stored`` in place."""
        if self.strength > 0:
            stored.div_(1.0 + self.strength)


@dataclass(frozen=True)
class Transform(Constraint):
    """Forward-time: apply ``fn(tensor) -> tensor`` (same shape and dtype) in every forward.

    Gradients flow through ``fn``. ``name`` labels it in reprs (default: the function's name).

    Raises:
        TypeError: ``fn`` not callable.

    >>> lin = constrain(nn.Linear(2, 1), Transform(torch.tanh))
    >>> constraints_of(lin)
    [Transform(tanh)]
    """

    fn: Callable[[Tensor], Tensor]
    name: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"Transform needs a callable tensor -> tensor, got {type(self.fn).__name__} "
                f"{self.fn!r}; e.g. Transform(torch.tanh)"
            )

    def __repr__(self) -> str:
        label = self.name or getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"Transform({label})"

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        return _TransformModule(self)


def _check_prune_sparsity(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Prune(sparsity={value!r}): sparsity must be a number in [0, 1) or a schedule "
            "such as PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)"
        )
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"Prune(sparsity={value!r}): sparsity is the fraction of zeros, allowed [0, 1)"
        )
    return float(value)


@dataclass(frozen=True, repr=False)
class Prune(Constraint):
    """Magnitude pruning with a mask buffer, updated on the schedule's steps.

    Args:
        sparsity: Fraction of zeros in [0, 1), or a schedule (:class:`ConstantSparsity`,
            :class:`PolynomialDecay`). For an "N:M" pattern it is fixed at ``1 - N/M``: leave it
            None (or give exactly that value).
        pattern: "unstructured" (single weights), "channel" (whole output filters, by L2 norm)
            or "N:M" such as "2:4" (see :class:`Pattern`).
        flattened_from: For an N:M pattern on a Linear fed by a flatten of a ``(C, *spatial)``
            map: that shape. The groups then run along ``C`` at each spatial position, which is
            the order TFLite stores the columns in (NHWC flatten), so the artifact keeps N:M.
        group: For the "channel" pattern: a :class:`ChannelGroup` of layers whose outputs meet
            in a residual add; they prune the same channels, chosen by their summed L2 norms
            (``prepare`` builds these groups).

    Pruning is per tensor (each layer reaches the target on its own), or per group. Scores are
    magnitudes of the tensor at this constraint's position (after earlier Transforms). A weight
    once pruned stays pruned; the achieved sparsity never falls. The "channel" pattern also
    masks the layer's bias at the pruned output channels (when the layer has one), so a pruned
    channel outputs exactly 0.0 and ``capture`` can remove it from the graph.

    Raises:
        ValueError: A bad sparsity or pattern, a sparsity that disagrees with an N:M pattern,
            ``flattened_from`` without an N:M pattern or ``group`` without "channel".

    >>> Prune(0.5)
    Prune(sparsity=0.5, pattern='unstructured')
    >>> Prune(pattern="2:4").schedule
    ConstantSparsity(sparsity=0.5, begin_step=0)
    """

    sparsity: float | SparsitySchedule | None = None
    pattern: Pattern | PatternKind | str = "unstructured"
    flattened_from: tuple[int, ...] | None = None
    group: ChannelGroup | None = field(default=None, compare=False)
    schedule: SparsitySchedule = field(init=False)
    stackable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        pattern = Pattern.parse(self.pattern)
        object.__setattr__(self, "pattern", pattern)
        self._check_layout(pattern)
        sparsity = self.sparsity
        if pattern.sparsity is not None:
            fixed = pattern.sparsity
            if isinstance(sparsity, SparsitySchedule):
                raise ValueError(
                    f"Prune(pattern='{pattern}') prunes all at once at sparsity {fixed}: a "
                    "schedule cannot ramp it; use pattern='unstructured' or 'channel' with a "
                    "schedule, or drop the schedule"
                )
            if sparsity is not None and not math.isclose(_check_prune_sparsity(sparsity), fixed):
                raise ValueError(
                    f"Prune(sparsity={sparsity!r}, pattern='{pattern}'): the {pattern} pattern "
                    f"fixes the sparsity at {fixed}; leave sparsity out or pass {fixed}"
                )
            schedule: SparsitySchedule = ConstantSparsity(fixed)
        elif sparsity is None:
            raise ValueError(
                f"Prune(pattern='{pattern}') needs a sparsity: a number in [0, 1) such as "
                "Prune(0.5), or a schedule such as PolynomialDecay(0.0, 0.8, 0, 1000)"
            )
        elif isinstance(sparsity, SparsitySchedule):
            schedule = sparsity
        else:
            schedule = ConstantSparsity(_check_prune_sparsity(sparsity))
        object.__setattr__(self, "schedule", schedule)

    def _check_layout(self, pattern: Pattern) -> None:
        shape = self.flattened_from
        if shape is not None:
            ok = isinstance(shape, tuple) and len(shape) >= 1
            ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            if pattern.kind is not PatternKind.N_OF_M or not ok:
                raise ValueError(
                    f"Prune(flattened_from={shape!r}, pattern='{pattern}'): flattened_from is a "
                    "tuple of positive ints (C, *spatial) and applies to N:M patterns only; "
                    "drop it or use pattern='2:4'"
                )
        if self.group is not None and (
            pattern.kind is not PatternKind.CHANNEL or not isinstance(self.group, ChannelGroup)
        ):
            raise ValueError(
                f"Prune(group={self.group!r}, pattern='{pattern}'): group takes a ChannelGroup "
                "and applies to pattern='channel' only; drop it or use pattern='channel'"
            )

    def __repr__(self) -> str:
        extra = f", flattened_from={self.flattened_from}" if self.flattened_from else ""
        return f"Prune(sparsity={self.sparsity!r}, pattern='{self.pattern}'{extra})"

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        pattern = Pattern.parse(self.pattern)
        if pattern.kind is PatternKind.N_OF_M and self.flattened_from is not None:
            channels, count = self.flattened_from[0], math.prod(self.flattened_from)
            if tensor.dim() != 2 or tensor.shape[1] != count or channels % pattern.m:
                raise ValueError(
                    f"{where}: Prune(pattern='{pattern}', flattened_from={self.flattened_from}) "
                    f"needs a (O, {count}) kernel with C={channels} a multiple of {pattern.m}; "
                    f"got {tuple(tensor.shape)}. Use pattern='unstructured' for this layer."
                )
        elif pattern.kind is PatternKind.N_OF_M:
            if tensor.dim() < 2 or tensor.shape[1] % pattern.m:
                raise ValueError(
                    f"{where}: pattern '{pattern}' groups {pattern.m} consecutive input elements "
                    f"(dim 1) but the tensor has shape {tuple(tensor.shape)}; dim 1 must be a "
                    f"multiple of {pattern.m}. Use pattern='unstructured' for this layer."
                )
        elif pattern.kind is PatternKind.CHANNEL and tensor.dim() < 1:
            raise ValueError(f"{where}: channel pruning needs a tensor with an output dimension")
        return _PruneModule(self, tensor)


@dataclass(frozen=True)
class FakeQuant(Constraint):
    """Forward-time: fake-quantize the kernel (the TFLite int8 weight scheme by default).

    Args:
        spec: The integer grid (:data:`WEIGHT_SPEC`: symmetric, per output channel, [-127, 127]).
        observer: "last_value" (default: the range of the current kernel, as TF-MOT does for
            weights), "minmax" (running) or "moving_average".
        freeze_after: Freeze the scale after this many training forwards; None never.

    Raises:
        ValueError: ``spec`` not a QuantSpec, or an unknown observer.

    >>> from edgekiln.pipeline.quant import weight_spec
    >>> lin = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[0.5, -0.26], [1.27, 0.013]]))
    >>> constrain(lin, FakeQuant(weight_spec(4))).weight.tolist()  # scales 0.5/7 and 1.27/7
    [[0.5, -0.2857142984867096], [1.2699999809265137, 0.0]]
    """

    spec: QuantSpec = WEIGHT_SPEC
    observer: ObserverKind | str = ObserverKind.LAST_VALUE
    freeze_after: int | None = None
    stackable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise ValueError(
                f"FakeQuant(spec={self.spec!r}): spec must be a QuantSpec, e.g. weight_spec(4)"
            )
        object.__setattr__(self, "observer", ObserverKind.parse(self.observer))
        if self.freeze_after is not None and (
            isinstance(self.freeze_after, bool)
            or not isinstance(self.freeze_after, int)
            or self.freeze_after < 1
        ):
            raise ValueError(
                f"FakeQuant(freeze_after={self.freeze_after!r}): must be a positive int or None"
            )

    def build(self, tensor: Tensor, where: str) -> ConstraintModule:
        if self.spec.per_channel and tensor.dim() <= self.spec.axis:
            raise ValueError(
                f"{where}: per-channel axis {self.spec.axis} does not exist in a tensor of shape "
                f"{tuple(tensor.shape)}; use a per-tensor QuantSpec for it"
            )
        return _FakeQuantModule(self, tensor)


# The modules that apply them ----------------------------------------------------------------------


class ConstraintModule(nn.Module):
    """A parametrization built from a :class:`Constraint` (held in ``.constraint``)."""

    constraint: Constraint
    has_projection: ClassVar[bool] = False

    def project(self, stored: Tensor, chain_input: Callable[[], Tensor]) -> None:
        """Project ``stored`` in place (no grad); ``chain_input()``: the value at this position."""

    def extra_repr(self) -> str:
        return repr(self.constraint)


class _ProjectionModule(ConstraintModule):
    """Clip / L1 / L2: identity in forward, work in :meth:`project`."""

    has_projection = True

    def __init__(self, constraint: Clip | L1 | L2) -> None:
        super().__init__()
        self.constraint = constraint

    def forward(self, x: Tensor) -> Tensor:
        return x

    def project(self, stored: Tensor, chain_input: Callable[[], Tensor]) -> None:
        self.constraint.project(stored)  # type: ignore[attr-defined]


class _TransformModule(ConstraintModule):
    def __init__(self, constraint: Transform) -> None:
        super().__init__()
        self.constraint = constraint
        self.fn = constraint.fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _PruneModule(ConstraintModule):
    """Mask multiply in forward; mask update (on schedule steps) and stored zeroing in project."""

    has_projection = True
    mask: Tensor
    step: Tensor
    frozen: Tensor

    def __init__(self, constraint: Prune, tensor: Tensor) -> None:
        super().__init__()
        self.constraint = constraint
        self.pattern = Pattern.parse(constraint.pattern)
        self.schedule = constraint.schedule
        self.flattened_from = constraint.flattened_from
        self.register_buffer("mask", torch.ones_like(tensor, dtype=tensor.dtype))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("frozen", torch.tensor(False))
        self.__dict__["group"] = constraint.group  # shared, not a submodule: no state of its own

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask

    def project(self, stored: Tensor, chain_input: Callable[[], Tensor]) -> None:
        step = int(self.step)
        if not bool(self.frozen) and self.schedule.should_update(step):
            self.update_mask(chain_input(), self.schedule.value(step))
        stored.mul_(self.mask)
        self.step += 1

    def channel_kept(self) -> Tensor:
        """``(O,)`` bool: output channels with any weight kept."""
        return (self.mask != 0).reshape(self.mask.shape[0], -1).any(dim=1)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, *args, **kwargs
    ) -> None:
        # Checkpoints written before masks could be frozen have no "frozen" entry.
        state_dict.setdefault(prefix + "frozen", self.frozen.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_mask(self, value: Tensor, sparsity: float) -> None:
        """Prune more of ``value`` (by magnitude) until ``sparsity``; pruned entries stay pruned."""
        kept = self.mask != 0
        group: ChannelGroup | None = self.__dict__.get("group")
        if self.pattern.kind is PatternKind.N_OF_M and self.flattened_from is not None:
            shape = (value.shape[0], *self.flattened_from)  # (O, C, *spatial): groups along C
            moved = _n_of_m_mask(value.abs().reshape(shape), kept.reshape(shape), *self._nm())
            new = moved.reshape(value.shape)
        elif self.pattern.kind is PatternKind.N_OF_M:
            new = _n_of_m_mask(value.abs(), kept, *self._nm())
        elif self.pattern.kind is PatternKind.CHANNEL:
            if group is not None:
                keep = group.decide(int(self.step), sparsity).to(value.device)
            else:
                norms = value.reshape(value.shape[0], -1).norm(dim=1)  # (O,)
                keep = _top_keep(norms, self.channel_kept(), sparsity)  # (O,) bool
            new = keep.reshape((-1,) + (1,) * (value.dim() - 1)).expand_as(value)
        else:
            new = _top_keep(value.abs().flatten(), kept.flatten(), sparsity).reshape(value.shape)
        self.mask.copy_(new & kept)
        logger.debug(
            "step %d: mask sparsity %.4f (target %.4f)",
            int(self.step),
            1.0 - float(self.mask.mean()),
            sparsity,
        )

    def _nm(self) -> tuple[int, int]:
        return self.pattern.n, self.pattern.m


class _ChannelBiasMask(ConstraintModule):
    """The bias of a channel-pruned layer: zero at the pruned output channels (forward and
    stored), so a pruned channel outputs exactly 0.0 and can be removed from the graph."""

    has_projection = True

    def __init__(self, prune: _PruneModule) -> None:
        super().__init__()
        self.constraint = prune.constraint
        self.__dict__["prune"] = prune  # the weight's prune module owns the mask

    def _channel_mask(self, like: Tensor) -> Tensor:
        return self.__dict__["prune"].channel_kept().to(like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._channel_mask(x)

    def project(self, stored: Tensor, chain_input: Callable[[], Tensor]) -> None:
        stored.mul_(self._channel_mask(stored))


class ChannelGroup:
    """Layers that prune the same output channels: their outputs meet in a residual add, and
    channel ``c`` of the sum is zero (and removable) only when it is zero in every branch.

    A channel's score is the sum over the members of their filter L2 norms (at the Prune's
    position in each chain). The first member to update at a step decides for all of them.
    ``prepare`` builds the groups for the "channel" pattern; build one by hand with the layers
    (Conv or Linear modules) before constraining them:

    >>> a, b = nn.Conv2d(2, 4, 1), nn.Conv2d(3, 4, 1)
    >>> group = ChannelGroup([a, b])
    >>> for layer in (a, b):
    ...     _ = constrain(layer, Prune(0.5, pattern="channel", group=group))
    >>> bool(torch.equal(prune_mask(a)[:, 0, 0, 0], prune_mask(b)[:, 0, 0, 0]))
    True

    Raises:
        ValueError: Fewer than one layer, or layers with different output channel counts.
    """

    def __init__(self, layers: list[nn.Module], name: str = "weight") -> None:
        sizes = {int(getattr(m, name).shape[0]) for m in layers}
        if not layers or len(sizes) != 1:
            raise ValueError(
                f"ChannelGroup needs layers with one output channel count, got {sorted(sizes)}; "
                "group only layers whose outputs are added together"
            )
        self.layers = list(layers)
        self.name = name
        self._decided: tuple[int, Tensor, Tensor] | None = None  # (step, kept before, keep)

    def __repr__(self) -> str:
        return f"ChannelGroup({len(self.layers)} layers)"

    def _members(self) -> list[tuple[Tensor, _PruneModule | None]]:
        """(value at the Prune's position, its prune module or None) per layer."""
        out: list[tuple[Tensor, _PruneModule | None]] = []
        for layer in self.layers:
            plist = _plist(layer, self.name)
            prune = None
            if plist is not None:
                for index, p in enumerate(plist):
                    if isinstance(p, _PruneModule):
                        prune = p
                        out.append((_chain_value(plist, index), p))
                        break
            if prune is None:
                value = getattr(layer, self.name)
                if not isinstance(value, Tensor):
                    raise TypeError(
                        f"ChannelGroup: {type(layer).__name__}.{self.name} is not a tensor; "
                        "group layers by the name of their kernel (name='weight')"
                    )
                out.append((value.detach(), None))
        return out

    @torch.no_grad()
    def decide(self, step: int, sparsity: float) -> Tensor:
        """``(O,)`` bool: the channels every member keeps at ``step`` (computed once per step)."""
        members = self._members()
        kept = torch.ones(members[0][0].shape[0], dtype=torch.bool)
        for _, prune in members:
            if prune is not None:
                kept &= prune.channel_kept().cpu()
        cached = self._decided
        if cached is not None and cached[0] == step and torch.equal(cached[1], kept):
            return cached[2]
        score = sum(value.reshape(value.shape[0], -1).norm(dim=1).cpu() for value, _ in members)
        keep = _top_keep(score, kept, sparsity)  # type: ignore[arg-type]
        self._decided = (step, kept, keep)
        return keep


def _top_keep(score: Tensor, kept: Tensor, sparsity: float) -> Tensor:
    """Bool mask keeping the ``(1 - sparsity)`` largest scores; already-pruned entries lose."""
    total = score.numel()
    n_keep = total - round(sparsity * total)
    if n_keep >= int(kept.sum()):
        return kept.clone()
    score = torch.where(kept, score, torch.full_like(score, -1.0))  # scores are >= 0
    keep = torch.zeros_like(kept)
    keep[torch.topk(score, n_keep, sorted=False).indices] = True
    return keep


def _n_of_m_mask(score: Tensor, kept: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive elements along dim 1."""
    moved = score.movedim(1, -1)  # (O, *kernel, I): groups run along I
    kept_moved = kept.movedim(1, -1)
    groups = torch.where(kept_moved, moved, torch.full_like(moved, -1.0)).reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


class _FakeQuantModule(ConstraintModule):
    def __init__(self, constraint: FakeQuant, tensor: Tensor) -> None:
        super().__init__()
        self.constraint = constraint
        self.quantizer = FakeQuantizer(
            constraint.spec, observer=constraint.observer, freeze_after=constraint.freeze_after
        )
        self.quantizer.observer.observe(tensor)  # a weight needs no calibration data

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x)


# Putting constraints on and reading them back ----------------------------------------------------


def _describe(module: nn.Module, name: str) -> str:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # parametrize injects a subclass named Parametrized<Class>
    return f"{cls.__name__}.{name}"


def _registered(module: nn.Module, name: str) -> nn.ModuleList:
    """The parametrization list of ``module.<name>`` just registered (never missing)."""
    plist = _plist(module, name)
    if plist is None:
        raise RuntimeError(f"parametrization of {type(module).__name__}.{name} did not register")
    return plist


def _plist(module: nn.Module, name: str) -> nn.ModuleList | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return module.parametrizations[name]  # type: ignore[index,no-any-return,return-value]


def constraints_of(module: nn.Module, name: str = "weight") -> list[Constraint]:
    """The constraints on ``module.<name>``, in the order they apply.

    >>> constraints_of(constrain(nn.Linear(4, 2), Clip(-1, 1), FakeQuant()))
    [Clip(min=-1.0, max=1.0), FakeQuant(spec=QuantSpec(bits=8, symmetric=True, \
per_channel=True, axis=0, narrow_range=True), observer=<ObserverKind.LAST_VALUE: 'last_value'>, \
freeze_after=None)]
    """
    plist = _plist(module, name)
    if plist is None:
        return []
    return [p.constraint for p in plist if isinstance(p, ConstraintModule)]


def weight_quantizer(module: nn.Module, name: str = "weight") -> FakeQuantizer | None:
    """The FakeQuantizer of ``module.<name>`` (its ``qparams()`` give the kernel's scales), or None.

    >>> weight_quantizer(constrain(nn.Linear(4, 2), FakeQuant())).spec.per_channel
    True
    """
    plist = _plist(module, name)
    if plist is None:
        return None
    for p in plist:
        if isinstance(p, _FakeQuantModule):
            return p.quantizer
    return None


def prune_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The pruning mask of ``module.<name>`` (1 kept, 0 pruned), or None if it is not pruned."""
    plist = _plist(module, name)
    if plist is None:
        return None
    for p in plist:
        if isinstance(p, _PruneModule):
            return p.mask
    return None


def _check_order(where: str, existing: list[Constraint], new: tuple[Constraint, ...]) -> None:
    sequence = [*existing, *new]
    for i, constraint in enumerate(sequence):
        earlier = sequence[:i]
        if any(isinstance(c, FakeQuant) for c in earlier):
            raise ValueError(
                f"{where}: {constraint!r} comes after FakeQuant, but FakeQuant must be the last "
                "constraint (the exported kernel is the quantized one). Put it before FakeQuant, "
                "e.g. constrain(layer, Prune(0.5), FakeQuant())."
            )
        if not constraint.stackable and any(type(c) is type(constraint) for c in earlier):
            raise ValueError(
                f"{where} already has a {type(constraint).__name__} constraint and cannot carry "
                "two "
                f"({type(constraint).__name__} does not stack: one mask / one scale per tensor). "
                "Use one with a schedule, or build a fresh layer."
            )
        if constraint.projection_only and any(isinstance(c, Transform) for c in earlier):
            raise ValueError(
                f"{where}: {constraint!r} comes after a Transform, but it acts on the stored "
                "tensor, not on the transform's output. Put Clip/L1/L2 before the Transform."
            )


def constrain(module: nn.Module, *constraints: Constraint, name: str = "weight") -> nn.Module:
    """Put ``constraints`` on ``module.<name>``, in order; returns ``module``.

    Afterwards ``module.<name>`` reads the kernel the forward pass uses. Calling again appends.
    Projections of the new constraints run at once (step 0); see the module docstring for when
    they run later.

    Raises:
        TypeError: ``module`` is not an nn.Module, or an argument is not a Constraint.
        ValueError: No constraints, no such parameter, or an order rule broken (see module docs).

    >>> conv = nn.Conv2d(8, 4, 3)
    >>> _ = constrain(conv, Prune(pattern="2:4"), FakeQuant())
    >>> float((conv.weight == 0).float().mean())
    0.5
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"constrain() needs an nn.Module, got {type(module).__name__}")
    where = _describe(module, name)
    if not constraints:
        raise ValueError(
            f"constrain({where}) got no constraints; e.g. constrain(layer, Prune(0.5))"
        )
    for i, constraint in enumerate(constraints):
        if not isinstance(constraint, Constraint):
            raise TypeError(
                f"constrain({where}): argument {i + 1} is {type(constraint).__name__} "
                f"{constraint!r}, not a Constraint; allowed Clip, L1, L2, Prune, Transform, "
                "FakeQuant (e.g. Prune(0.5)). Pass the tensor name as name=..."
            )
    if _plist(module, name) is None and not isinstance(getattr(module, name, None), nn.Parameter):
        available = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(
            f"{type(module).__name__} has no parameter {name!r} to constrain; its parameters: "
            f"{available or 'none'}. Pass name=... or constrain the layer that owns the kernel."
        )
    _check_order(where, constraints_of(module, name), constraints)
    _project_module(module)  # pending projections of the constraints already there run first

    for constraint in constraints:
        with torch.no_grad():
            value = getattr(module, name).detach()  # the kernel so far
        built = constraint.build(value, where)
        built.to(device=value.device)
        parametrize.register_parametrization(
            module, name, built, unsafe=not isinstance(constraint, Transform)
        )
        plist = _registered(module, name)
        index = len(plist) - 1
        with torch.no_grad():
            built.project(_stored(plist), functools.partial(_chain_value, plist, index))
        if isinstance(built, _PruneModule) and built.pattern.kind is PatternKind.CHANNEL:
            _mask_bias(module, name, built)

    _remember_version(module, name)
    _install_hooks(module)
    return module


def _mask_bias(module: nn.Module, name: str, prune: _PruneModule) -> None:
    """Put the channel mask of ``module.weight`` on ``module.bias`` too (same output channels)."""
    bias = getattr(module, "bias", None)
    if name != "weight" or not isinstance(bias, Tensor) or bias.dim() != 1:
        return
    if bias.shape[0] != prune.mask.shape[0]:
        return
    built = _ChannelBiasMask(prune)
    parametrize.register_parametrization(module, "bias", built, unsafe=True)
    plist = _registered(module, "bias")
    with torch.no_grad():
        built.project(_stored(plist), functools.partial(_chain_value, plist, len(plist) - 1))
    _remember_version(module, "bias")


# Phases: prune first, then QAT with frozen masks -------------------------------------------------


def _prune_modules(model: nn.Module) -> list[tuple[str, _PruneModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PruneModule)]


def freeze_masks(model: nn.Module) -> int:
    """Stop every pruning mask in ``model`` from changing; returns how many masks it froze.

    A frozen mask still zeroes its stored weights after every optimizer step (masks never come
    back to life); it only stops pruning more. Warns when a mask is frozen below the sparsity
    its schedule ends at (the pruning phase was too short). The flag is a buffer, so it travels
    with ``state_dict``.

    >>> lin = constrain(nn.Linear(8, 2), Prune(0.5))
    >>> freeze_masks(lin)
    1
    """
    short = []
    count = 0
    for path, prune in _prune_modules(model):
        prune.frozen.fill_(True)
        count += 1
        achieved = 1.0 - float(prune.mask.mean())
        final = prune.schedule.final_value
        if achieved < final - 0.01:
            short.append(f"{path or type(model).__name__} at {achieved:.3f} (target {final:.3f})")
    if short:
        warnings.warn(
            f"masks frozen below their schedule's final sparsity: {'; '.join(short)}. Run the "
            "pruning phase past the schedule's end_step before freeze_masks / start_qat",
            stacklevel=2,
        )
    return count


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Turn fake-quantization of weights and activations on or off; returns how many quantizers.

    Off, every quantizer passes its input through (observers still calibrate in training mode):
    the first phase of ``sparsity_mode="prune_then_qat"``.

    >>> lin = constrain(nn.Linear(2, 2), FakeQuant())
    >>> set_fake_quant(lin, False), bool(weight_quantizer(lin).enabled)
    (1, False)
    """
    count = 0
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.enable(bool(enabled))
            count += 1
            continue
        enable = getattr(module, "enable", None)  # prepare's FixedQuant (softmax outputs)
        if getattr(module, "_edgekiln_quant", False) and callable(enable):
            enable(bool(enabled))
            count += 1
    return count


def start_qat(model: nn.Module) -> None:
    """Switch a model from its pruning phase to QAT: project, freeze the masks, fake-quantize.

    The step ``edgekiln run`` takes between the two phases of ``sparsity_mode="prune_then_qat"``
    (``prepare`` starts such a model with fake-quantization off).

    >>> lin = constrain(nn.Linear(8, 2), Prune(0.5), FakeQuant())
    >>> _ = set_fake_quant(lin, False)
    >>> start_qat(lin)
    >>> bool(lin.parametrizations.weight[0].frozen), bool(weight_quantizer(lin).enabled)
    (True, True)
    """
    apply_projections(model)
    freeze_masks(model)
    set_fake_quant(model, True)


# Projections -------------------------------------------------------------------------------------


def _stored(plist: nn.ModuleList) -> Tensor:
    """The stored tensor under a parametrization list (``module.parametrizations.<name>``)."""
    return plist.original  # type: ignore[return-value]


@torch.no_grad()
def _chain_value(plist: nn.ModuleList, index: int) -> Tensor:
    """The tensor entering parametrization ``index``: the stored one through those before it."""
    value = _stored(plist)
    for p in list(plist)[:index]:
        value = p(value)
    return value


def _versions(module: nn.Module) -> dict[str, int]:
    versions: dict[str, int] | None = module.__dict__.get("_edgekiln_versions")
    if versions is None:
        versions = {}
        module.__dict__["_edgekiln_versions"] = versions
    return versions


def _remember_version(module: nn.Module, name: str) -> None:
    plist = _plist(module, name)
    if plist is not None:
        _versions(module)[name] = _stored(plist)._version


def _project_module(module: nn.Module) -> int:
    """Project every constrained tensor of ``module`` whose stored value changed; count them."""
    if not parametrize.is_parametrized(module):
        return 0
    versions = _versions(module)
    projected = 0
    for name, plist in module.parametrizations.items():  # type: ignore[union-attr,operator]
        stored = _stored(plist)
        if versions.get(name) == stored._version:
            continue
        with torch.no_grad():
            for index, p in enumerate(plist):
                if isinstance(p, ConstraintModule) and p.has_projection:
                    p.project(stored, functools.partial(_chain_value, plist, index))
        versions[name] = stored._version
        projected += 1
    return projected


def apply_projections(model: nn.Module) -> int:
    """Run the pending projections of every constrained tensor in ``model``; returns how many ran.

    Call it after ``optimizer.step()`` if you want the stored weights projected at once (the
    forward pre-hook would otherwise do it before the next training forward), and before export.
    A tensor unchanged since its last projection is skipped, so calling twice is harmless.

    >>> lin = constrain(nn.Linear(2, 1), Clip(-0.1, 0.1))
    >>> with torch.no_grad():
    ...     _ = lin.parametrizations.weight.original.fill_(3.0)
    >>> apply_projections(lin), lin.weight.tolist(), apply_projections(lin)
    (1, [[0.10000000149011612, 0.10000000149011612]], 0)
    """
    return sum(_project_module(m) for m in model.modules())


def mark_projected(model: nn.Module) -> None:
    """Count the current value of every constrained tensor in ``model`` as projected (no step).

    For a value written in place that was already projected elsewhere, e.g. the projected
    weights DDP copies from rank 0 to every rank when it wraps the model. The schedules'
    step counters do not move.

    >>> lin = constrain(nn.Linear(2, 1), Prune(0.5))
    >>> with torch.no_grad():
    ...     _ = lin.parametrizations.weight.original.mul_(1.0)
    >>> mark_projected(lin); apply_projections(lin), int(lin.parametrizations.weight[0].step)
    (0, 1)
    """
    for module in model.modules():
        _after_load_hook(module, None)


def _projection_pre_hook(module: nn.Module, args: object) -> None:
    if module.training and torch.is_grad_enabled():
        _project_module(module)


def _after_load_hook(module: nn.Module, incompatible_keys: object) -> None:
    # A loaded tensor was projected when it was saved: do not project it (or step) again.
    if parametrize.is_parametrized(module):
        for name in module.parametrizations:  # type: ignore[union-attr]
            _remember_version(module, name)


def _before_save_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    # A checkpoint holds projected tensors, so that loading it can count them as projected.
    _project_module(module)


def _install_hooks(module: nn.Module) -> None:
    if module.__dict__.get("_edgekiln_hooked"):
        return
    module.register_forward_pre_hook(_projection_pre_hook)
    module.register_state_dict_pre_hook(_before_save_hook)
    module.register_load_state_dict_post_hook(_after_load_hook)
    module.__dict__["_edgekiln_hooked"] = True
