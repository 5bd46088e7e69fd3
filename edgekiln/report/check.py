"""The regression gate: compare a report with a baseline report, target by target.

``edgekiln check REPORT --baseline BASELINE`` exits with ``int(check_reports(...).status)``:
0 PASS, 1 REGRESSION, 2 UNUSABLE (a report that does not load, a different schema version,
no target in common).

Per target present in both reports, with thresholds ``t``:

- ``ok``: a target that passed in the baseline and fails now is a regression.
- ``accuracy``, ``agreement``: a fall of more than ``t.max_accuracy_drop`` /
  ``t.max_agreement_drop`` (fractions: 0.005 = 0.5 points) is a regression; falls within
  float noise (1e-9) are not.
- ``arena_bytes``, ``flash_bytes``: growth beyond ``baseline * (1 + t.max_*_growth)``.
- ``latency_ms``: growth beyond ``baseline * (1 + t.max_latency_growth)``, compared only when
  both reports give the same ``latency_kind``: a measured time against an estimated one says
  nothing, and measured times are noisy between machines and runs, so a baseline should be
  recorded on the machine that checks.
- A metric the baseline has and this report lacks (null) is a regression for accuracy,
  agreement, arena and flash (the gate cannot vouch for it), and a note for latency.

Targets in only one of the reports, and targets failing in both, are notes.

>>> from edgekiln.report.schema import new_report
>>> base, now = new_report(created="2026-12-03T19:10:00Z"), new_report()
>>> t = {"name": "mcu:nrf52840", "artifact": "model.tflite", "ok": True, "error": None,
...      "accuracy": 0.981, "agreement": 1.0, "lsb": None, "latency_ms": 41.5,
...      "latency_p90_ms": 41.5, "latency_kind": "estimated", "arena_bytes": 41216,
...      "flash_bytes": 98304, "board": None, "details": {}}
>>> base["targets"] = [t]
>>> now["targets"] = [dict(t, accuracy=0.970)]
>>> result = check_reports(now, base)
>>> int(result.status), [(r.target, r.metric) for r in result.regressions]
(1, [('mcu:nrf52840', 'accuracy')])
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from edgekiln.report.schema import SCHEMA_VERSION, validate_report

__all__ = [
    "CheckResult",
    "CheckStatus",
    "Regression",
    "ThresholdError",
    "Thresholds",
    "check_reports",
    "format_check",
]

NOISE = 1e-9  # accuracy and agreement are fractions of a test set: below this is float noise


class CheckStatus(enum.IntEnum):
    """The gate's verdict; ``int(status)`` is the exit code of ``edgekiln check``."""

    PASS = 0
    REGRESSION = 1
    UNUSABLE = 2


class ThresholdError(ValueError):
    """A regression threshold out of range or of the wrong type; the message names the key."""


@dataclass(frozen=True)
class Thresholds:
    """How far each metric may move before ``edgekiln check`` calls it a regression.

    All five are non-negative fractions: ``max_accuracy_drop=0.005`` allows accuracy to fall
    by 0.5 points (0.9810 -> 0.9760); ``max_arena_growth=0.0`` allows no growth;
    ``max_latency_growth=0.10`` allows 10 % slower.

    >>> Thresholds().max_accuracy_drop, Thresholds().max_latency_growth
    (0.005, 0.1)
    >>> Thresholds.from_dict({"max_latency_growth": 0.25}).max_latency_growth
    0.25
    """

    max_accuracy_drop: float = 0.005
    max_agreement_drop: float = 0.0
    max_arena_growth: float = 0.0
    max_flash_growth: float = 0.0
    max_latency_growth: float = 0.10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_threshold(f.name, value, f"Thresholds.{f.name}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "check") -> Thresholds:
        """Thresholds from a mapping (a report's ``check`` section, or CLI options).

        Missing keys take the defaults. Unknown keys are errors (a typo would otherwise
        silently loosen nothing); ``where`` names the source in the message.

        >>> Thresholds.from_dict({"max_acuracy_drop": 0.01})
        Traceback (most recent call last):
        ...
        edgekiln.report.check.ThresholdError: check.max_acuracy_drop: unknown threshold; \
allowed: max_accuracy_drop, max_agreement_drop, max_arena_growth, max_flash_growth, \
max_latency_growth
        """
        if not isinstance(d, Mapping):
            raise ThresholdError(
                f"{where}: expected a table of thresholds, got {type(d).__name__} {d!r}"
            )
        known = [f.name for f in fields(cls)]
        for key, value in d.items():
            if key not in known:
                raise ThresholdError(
                    f"{where}.{key}: unknown threshold; allowed: {', '.join(known)}"
                )
            _check_threshold(key, value, f"{where}.{key}")
        return cls(**{k: float(v) for k, v in d.items()})

    def as_dict(self) -> dict[str, float]:
        """The five thresholds as the report's ``check`` section."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def threshold_rule(name: str) -> str:
    """What threshold ``name`` may be, for messages.

    >>> threshold_rule("max_arena_growth")
    'a finite number >= 0 (fractions: 0.005 = 0.5 points, 0.10 = 10 %)'
    """
    kind = "fraction in [0, 1]" if name in _AT_MOST_ONE else "finite number >= 0"
    return f"a {kind} (fractions: 0.005 = 0.5 points, 0.10 = 10 %)"


_AT_MOST_ONE = ("max_accuracy_drop", "max_agreement_drop")


def _check_threshold(name: str, value: Any, where: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    upper = 1.0 if name in _AT_MOST_ONE else math.inf
    if not is_number or not math.isfinite(value) or not 0 <= value <= upper:
        raise ThresholdError(
            f"{where} must be {threshold_rule(name)}, "
            f"got {value!r}; for example {name} = {getattr(Thresholds, name)!r}"
        )


@dataclass(frozen=True)
class Regression:
    """One metric of one target that moved past its limit.

    ``limit`` is the worst value still allowed (lowest accuracy, largest arena); None for
    ``ok`` (which must stay true) and for a metric missing now.
    """

    target: str
    metric: str
    baseline: float | bool | None
    now: float | bool | None
    limit: float | None


@dataclass
class CheckResult:
    """The verdict of :func:`check_reports`.

    ``status`` is the exit code; ``regressions`` what failed; ``notes`` what could not be
    compared or changed without failing; ``compared_targets`` the targets in both reports;
    ``thresholds`` those applied and ``thresholds_source`` where they came from ("argument",
    "argument+baseline", "baseline" or "defaults").
    """

    status: CheckStatus
    regressions: list[Regression] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared_targets: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    thresholds_source: str = "defaults"


# ---------------------------------------------------------------------------------------------


def _resolve_thresholds(
    explicit: Thresholds | Mapping[str, Any] | None, baseline: Mapping[str, Any]
) -> tuple[Thresholds, str]:
    """Explicit argument > the baseline's recorded ``check`` > defaults (key by key for maps)."""
    if isinstance(explicit, Thresholds):
        return explicit, "argument"
    recorded = baseline.get("check")
    known = {f.name for f in fields(Thresholds)}
    merged: dict[str, Any] = {}
    source = "defaults"
    if isinstance(recorded, Mapping):
        merged.update({k: v for k, v in recorded.items() if k in known})  # newer keys: skip
        source = "baseline"
    if explicit is not None:
        overrides = Thresholds.from_dict(explicit, where="thresholds")
        merged.update({k: getattr(overrides, k) for k in explicit})
        source = "argument+baseline" if source == "baseline" else "argument"
    return Thresholds.from_dict(merged, where="baseline check"), source


def _unusable(note: str, thresholds: Thresholds, source: str) -> CheckResult:
    return CheckResult(
        CheckStatus.UNUSABLE, notes=[note], thresholds=thresholds, thresholds_source=source
    )


def check_reports(
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    thresholds: Thresholds | Mapping[str, Any] | None = None,
) -> CheckResult:
    """Compare ``report`` with ``baseline`` and return the verdict (see the module docstring).

    ``thresholds``: a :class:`Thresholds` replaces all five; a mapping (e.g. only the CLI
    options the user gave, ``{"max_latency_growth": 0.25}``) overrides those keys on top of
    the baseline's recorded ``check``; None uses the baseline's ``check``, then defaults.
    Raises :class:`ThresholdError` for a bad explicit threshold. Invalid reports give
    UNUSABLE with the schema problems as notes.
    """
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        Thresholds.from_dict(thresholds, where="thresholds")  # a caller's mistake: raise
    for name, obj in (("report", report), ("baseline", baseline)):
        version = obj.get("schema_version") if isinstance(obj, Mapping) else None
        if version != SCHEMA_VERSION:
            return _unusable(
                f"{name}: schema_version {version!r}, this edgekiln compares version "
                f"{SCHEMA_VERSION} only; re-create both reports with one edgekiln version",
                Thresholds(),
                "defaults",
            )
    for name, obj in (("report", report), ("baseline", baseline)):
        problems = validate_report(obj)
        if problems:
            shown = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
            return _unusable(f"{name} is not a valid report: {shown}", Thresholds(), "defaults")

    try:
        limits, source = _resolve_thresholds(thresholds, baseline)
    except ThresholdError as e:
        return _unusable(f"baseline: {e}", Thresholds(), "defaults")
    now_targets = {t["name"]: t for t in report["targets"]}
    base_targets = {t["name"]: t for t in baseline["targets"]}
    common = [name for name in base_targets if name in now_targets]
    if not common:
        return _unusable(
            f"no target in common: baseline has {sorted(base_targets) or 'none'}, "
            f"report has {sorted(now_targets) or 'none'}; compare runs of the same targets",
            limits,
            source,
        )

    result = CheckResult(
        CheckStatus.PASS, compared_targets=common, thresholds=limits, thresholds_source=source
    )
    for name in base_targets:
        if name not in now_targets:
            result.notes.append(f"{name}: in the baseline only; not compared")
    for name in now_targets:
        if name not in base_targets:
            result.notes.append(f"{name}: new in this report (not in the baseline); not compared")
    for name in common:
        _compare_target(name, base_targets[name], now_targets[name], limits, result)
    if result.regressions:
        result.status = CheckStatus.REGRESSION
    return result


def _compare_target(
    name: str, base: Mapping[str, Any], now: Mapping[str, Any], t: Thresholds, out: CheckResult
) -> None:
    if base["ok"] and not now["ok"]:
        out.regressions.append(Regression(name, "ok", True, False, None))
        out.notes.append(f"{name}: fails now: {now['error']}")
        return
    if not now["ok"]:
        out.notes.append(f"{name}: failed in the baseline and fails now: {now['error']}")
        return
    if not base["ok"]:
        out.notes.append(f"{name}: failed in the baseline, passes now; nothing to compare")
        return

    for metric, drop in (
        ("accuracy", t.max_accuracy_drop),
        ("agreement", t.max_agreement_drop),
    ):
        b, n = base[metric], now[metric]
        if _missing_now(name, metric, b, n, out):
            continue
        if b is not None and n is not None and n < b - drop - NOISE:
            out.regressions.append(Regression(name, metric, b, n, b - drop))
    for metric, growth in (
        ("arena_bytes", t.max_arena_growth),
        ("flash_bytes", t.max_flash_growth),
    ):
        b, n = base[metric], now[metric]
        if _missing_now(name, metric, b, n, out):
            continue
        if b is not None and n is not None and n > b * (1 + growth):
            out.regressions.append(Regression(name, metric, b, n, b * (1 + growth)))
    _compare_latency(name, base, now, t, out)
    b_lsb, n_lsb = base["lsb"], now["lsb"]
    if b_lsb is not None and n_lsb is not None and n_lsb["max"] > b_lsb["max"]:
        out.notes.append(
            f"{name}: max LSB difference grew from {b_lsb['max']} to {n_lsb['max']} "
            "(not gated; agreement is)"
        )


def _missing_now(name: str, metric: str, b: Any, n: Any, out: CheckResult) -> bool:
    if b is not None and n is None:
        out.regressions.append(Regression(name, metric, b, None, None))
        return True
    if b is None and n is not None:
        out.notes.append(f"{name}: {metric} is new (null in the baseline); not compared")
        return True
    return False


def _compare_latency(
    name: str, base: Mapping[str, Any], now: Mapping[str, Any], t: Thresholds, out: CheckResult
) -> None:
    b, n = base["latency_ms"], now["latency_ms"]
    if b is None or n is None:
        if b is not None:
            out.notes.append(f"{name}: latency_ms missing now (baseline {b:g} ms); not compared")
        return
    b_kind, n_kind = base["latency_kind"], now["latency_kind"]
    if b_kind != n_kind:
        out.notes.append(
            f"{name}: latency not compared: baseline is {b_kind}, this report {n_kind}"
        )
        return
    limit = b * (1 + t.max_latency_growth)
    if n > limit + NOISE:
        out.regressions.append(Regression(name, "latency_ms", b, n, limit))


# ---------------------------------------------------------------------------------------------


def _fmt(metric: str, value: float | bool | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "ok" if value else "failed"
    if metric in ("accuracy", "agreement"):
        return f"{100 * value:.2f}%"
    if metric.endswith("_bytes"):
        return f"{value:,.0f} B"
    if metric == "latency_ms":
        return f"{value:.3f} ms"
    return f"{value:g}"


def _limit_text(r: Regression) -> str:
    if r.metric == "ok":
        return "must pass"
    if r.limit is None:
        return "must be reported"
    bound = "lowest allowed" if r.metric in ("accuracy", "agreement") else "highest allowed"
    return f"{bound} {_fmt(r.metric, r.limit)}"


def format_check(result: CheckResult) -> str:
    """Human-readable verdict: a summary line, one line per regression, then the notes.

    >>> r = CheckResult(CheckStatus.REGRESSION, [Regression("mcu:nrf52840", "arena_bytes",
    ...     41216, 45312, 41216.0)], compared_targets=["mcu:nrf52840"])
    >>> print(format_check(r))
    edgekiln check: REGRESSION (1 regression in 1 compared target; thresholds: defaults)
      mcu:nrf52840  arena_bytes  baseline 41,216 B  now 45,312 B  highest allowed 41,216 B
    """
    n, k = len(result.regressions), len(result.compared_targets)
    if result.status == CheckStatus.UNUSABLE:
        head = "edgekiln check: UNUSABLE (the reports cannot be compared)"
    else:
        head = (
            f"edgekiln check: {result.status.name} ({n} regression{'s' if n != 1 else ''} in "
            f"{k} compared target{'s' if k != 1 else ''}; thresholds: {result.thresholds_source})"
        )
    lines = [head]
    width_t = max((len(r.target) for r in result.regressions), default=0)
    width_m = max((len(r.metric) for r in result.regressions), default=0)
    for r in result.regressions:
        lines.append(
            f"  {r.target:<{width_t}}  {r.metric:<{width_m}}  baseline {_fmt(r.metric, r.baseline)}"
            f"  now {_fmt(r.metric, r.now)}  {_limit_text(r)}"
        )
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)
