"""report.json, schema version 1: validate, load and write the record of one edgekiln run.

The schema is documented key by key in ``docs/report-schema.md``. Validation is strict about
types and required keys and lenient about unknown extra keys (a newer edgekiln may add some).
Every problem names its JSON path, the value found and what is expected:

>>> report = new_report("validate", created="2026-12-03T19:10:00Z")
>>> validate_report(report)
[]
>>> report["targets"] = [{"name": "onnxruntime", "accuracy": 1.7}]
>>> validate_report(report)[0]
'targets[0].artifact: missing; expected a string'
>>> [p for p in validate_report(report) if p.startswith("targets[0].accuracy")]
['targets[0].accuracy: expected a fraction in [0, 1] or null, got 1.7 (number)']
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.ir import atomic_write

__all__ = [
    "SCHEMA_VERSION",
    "ReportError",
    "load_report",
    "new_report",
    "utc_now",
    "validate_report",
    "write_report",
]

SCHEMA_VERSION = 1
SCHEMA_DOC = "docs/report-schema.md"

TARGET_NAME = re.compile(r"^(onnxruntime|litert|tflm|mcu:[a-z0-9][a-z0-9_.-]*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CREATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


class ReportError(ValueError):
    """A report file that cannot be used: missing, not JSON, or not schema version 1.

    ``problems`` lists each schema problem (empty for a missing file or invalid JSON).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------
# Step 1: a small declarative spec, one node per JSON value kind.


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    """``value`` as JSON (cut at 60 characters) followed by its JSON type."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_json_type(value)})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Spec:
    expected: str

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        raise NotImplementedError

    def _fail(self, value: Any, path: str, out: list[str], nullable: bool) -> None:
        expected = self.expected + (" or null" if nullable else "")
        out.append(f"{path}: expected {expected}, got {_show(value)}")


@dataclass(frozen=True)
class _Prim(_Spec):
    expected: str
    test: Callable[[Any], bool]

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        if not self.test(value):
            self._fail(value, path, out, nullable)


@dataclass(frozen=True)
class _Null(_Spec):
    inner: _Spec

    @property
    def expected(self) -> str:  # type: ignore[override]
        return self.inner.expected + " or null"

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        if value is not None:
            self.inner.check(value, path, out, nullable=True)


@dataclass(frozen=True)
class _Obj(_Spec):
    fields: Mapping[str, _Spec]
    expected: str = "an object"
    optional: frozenset[str] = frozenset()

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        if not isinstance(value, Mapping):
            self._fail(value, path, out, nullable)
            return
        for key, spec in self.fields.items():
            where = _join(path, key)
            if key not in value:
                if key in self.optional:
                    continue
                out.append(f"{where}: missing; expected {spec.expected}")
            else:
                spec.check(value[key], where, out)


@dataclass(frozen=True)
class _List(_Spec):
    item: _Spec
    expected: str = field(default="")

    def __post_init__(self) -> None:
        if not self.expected:
            object.__setattr__(self, "expected", f"a list of {self.item.expected}")

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        if not isinstance(value, (list, tuple)):
            self._fail(value, path, out, nullable)
            return
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]", out)


@dataclass(frozen=True)
class _Histogram(_Spec):
    expected: str = 'an object of counts keyed by LSB difference ({"0": 995, "1": 5})'

    def check(self, value: Any, path: str, out: list[str], nullable: bool = False) -> None:
        if not isinstance(value, Mapping):
            self._fail(value, path, out, nullable)
            return
        for key, count in value.items():
            if not (isinstance(key, str) and key.isdigit()):
                out.append(
                    f"{path}: key {key!r} is not an LSB difference; expected keys that are "
                    'non-negative integers written as strings ("0", "1", ...)'
                )
            _COUNT.check(count, f"{path}[{json.dumps(str(key))}]", out)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _relative_path(v: Any) -> bool:
    if not isinstance(v, str) or not v or v.startswith(("/", "\\")) or ":" in v[:3]:
        return False
    return ".." not in re.split(r"[/\\]", v)


_STR = _Prim("a string", lambda v: isinstance(v, str))
_INT = _Prim("an integer", _is_int)
_COUNT = _Prim("a non-negative integer", lambda v: _is_int(v) and v >= 0)
_POS_INT = _Prim("a positive integer", lambda v: _is_int(v) and v > 0)
_NUM = _Prim("a finite number", _is_num)
_NONNEG = _Prim("a finite number >= 0", lambda v: _is_num(v) and v >= 0)
_POSITIVE = _Prim("a finite number > 0", lambda v: _is_num(v) and v > 0)
_FRACTION = _Prim("a fraction in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1)
_BOOL = _Prim("true or false", lambda v: isinstance(v, bool))
_ANY_OBJ = _Prim("an object", lambda v: isinstance(v, Mapping))


def _enum(*values: str) -> _Prim:
    shown = " | ".join(json.dumps(v) for v in values)
    return _Prim(f"one of {shown}", lambda v: isinstance(v, str) and v in values)


_TARGET = _Obj(
    {
        "name": _Prim(
            'a target name: "onnxruntime", "litert", "tflm" or "mcu:<board>"',
            lambda v: isinstance(v, str) and bool(TARGET_NAME.match(v)),
        ),
        "artifact": _STR,
        "ok": _BOOL,
        "error": _Null(_STR),
        "accuracy": _Null(_FRACTION),
        "agreement": _Null(_FRACTION),
        "lsb": _Null(
            _Obj(
                {"max": _COUNT, "mean": _NONNEG, "within_1": _FRACTION, "histogram": _Histogram()},
                "an object {max, mean, within_1, histogram}",
            )
        ),
        "latency_ms": _Null(_NONNEG),
        "latency_p90_ms": _Null(_NONNEG),
        "latency_kind": _Null(_enum("measured", "estimated")),
        "arena_bytes": _Null(_COUNT),
        "flash_bytes": _Null(_COUNT),
        "board": _Null(
            _Obj(
                {
                    "name": _STR,
                    "core": _STR,
                    "clock_hz": _POS_INT,
                    "sram_bytes": _POS_INT,
                    "flash_bytes": _POS_INT,
                },
                "an object {name, core, clock_hz, sram_bytes, flash_bytes}",
            )
        ),
        "details": _ANY_OBJ,
    },
    "a target object",
)

_CHECK_KEYS = (
    "max_accuracy_drop",
    "max_agreement_drop",
    "max_arena_growth",
    "max_flash_growth",
    "max_latency_growth",
)

REPORT_SPEC = _Obj(
    {
        "schema_version": _Prim("1", lambda v: v == SCHEMA_VERSION and _is_int(v)),
        "edgekiln_version": _STR,
        "kind": _enum("run", "validate"),
        "created": _Prim(
            'a UTC ISO 8601 time "YYYY-MM-DDTHH:MM:SSZ"',
            lambda v: isinstance(v, str) and bool(_CREATED.match(v)),
        ),
        "recipe": _Null(_ANY_OBJ),
        "model": _Null(
            _Obj(
                {
                    "source": _STR,
                    "input_shape": _List(_POS_INT),
                    "parameters": _Null(_COUNT),
                    "task": _enum("classification", "reconstruction"),
                },
                "an object {source, input_shape, parameters, task}",
            )
        ),
        "data": _Null(
            _Obj(
                {"source": _STR, "description": _STR, "n_train": _COUNT, "n_test": _COUNT},
                "an object {source, description, n_train, n_test}",
            )
        ),
        "training": _Null(
            _Obj(
                {
                    "float_accuracy": _Null(_FRACTION),
                    "fake_quant_accuracy": _Null(_FRACTION),
                    "float_epochs": _COUNT,
                    "qat_epochs": _COUNT,
                    "loss_history": _Obj(
                        {"float": _List(_NUM), "qat": _List(_NUM)}, "an object {float, qat}"
                    ),
                    "seconds": _NONNEG,
                },
                "an object {float_accuracy, fake_quant_accuracy, float_epochs, qat_epochs, "
                "loss_history, seconds}",
            )
        ),
        "sparsity": _Null(
            _Obj(
                {
                    "total": _FRACTION,
                    "layers": _List(
                        _Obj(
                            {
                                "name": _STR,
                                "shape": _List(_COUNT),
                                "zeros": _COUNT,
                                "total": _COUNT,
                                "sparsity": _FRACTION,
                            },
                            "an object {name, shape, zeros, total, sparsity}",
                        )
                    ),
                },
                "an object {total, layers}",
            )
        ),
        "quantization": _Null(
            _Obj(
                {
                    "layers": _List(
                        _Obj(
                            {
                                "name": _STR,
                                "scale": _POSITIVE,
                                "zero_point": _INT,
                                "sqnr_db": _Null(
                                    _NUM
                                ),  # null: no noise or no signal (SQNR undefined)
                                "clipped_fraction": _FRACTION,
                            },
                            "an object {name, scale, zero_point, sqnr_db, clipped_fraction}",
                        )
                    )
                },
                "an object {layers}",
            )
        ),
        "artifacts": _List(
            _Obj(
                {
                    "path": _Prim("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
                    "format": _enum("onnx", "tflite", "graph"),
                    "bytes": _COUNT,
                    "gzip_bytes": _COUNT,
                    "sha256": _Prim(
                        "64 lowercase hex digits",
                        lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
                    ),
                },
                "an object {path, format, bytes, gzip_bytes, sha256}",
            )
        ),
        "targets": _List(_TARGET),
        "pairwise": _List(
            _Obj(
                {
                    "a": _STR,
                    "b": _STR,
                    "compared": _COUNT,
                    "differing": _COUNT,
                    "max_lsb": _COUNT,
                    "histogram": _Histogram(),
                },
                "an object {a, b, compared, differing, max_lsb, histogram}",
            )
        ),
        "check": _Null(
            _Obj(
                {key: _NONNEG for key in _CHECK_KEYS},
                "an object of thresholds (any of: " + ", ".join(_CHECK_KEYS) + ")",
                optional=frozenset(_CHECK_KEYS),
            )
        ),
    },
    "a JSON object (the report)",
)


# ---------------------------------------------------------------------------------------------
# Step 2: rules that span several values.


def _cross_checks(report: Mapping[str, Any], out: list[str]) -> None:
    targets = report.get("targets")
    names: dict[str, int] = {}
    if isinstance(targets, list):
        for i, target in enumerate(targets):
            if not isinstance(target, Mapping):
                continue
            name = target.get("name")
            if isinstance(name, str):
                if name in names:
                    out.append(
                        f"targets[{i}].name: {name!r} appears twice (also targets[{names[name]}]);"
                        " each target is reported once"
                    )
                names.setdefault(name, i)
            if target.get("latency_ms") is not None and target.get("latency_kind") is None:
                out.append(
                    f"targets[{i}].latency_kind: null while latency_ms is set; expected "
                    '"measured" or "estimated" (check compares latency only of the same kind)'
                )
            if target.get("ok") is False and not target.get("error"):
                out.append(
                    f"targets[{i}].error: a failed target (ok false) needs an error text, "
                    f"got {_show(target.get('error'))}"
                )
    pairwise = report.get("pairwise")
    if isinstance(pairwise, list) and isinstance(targets, list):
        for i, pair in enumerate(pairwise):
            if not isinstance(pair, Mapping):
                continue
            for side in ("a", "b"):
                name = pair.get(side)
                if isinstance(name, str) and name not in names:
                    known = ", ".join(sorted(names)) or "none"
                    out.append(
                        f"pairwise[{i}].{side}: {name!r} is not a target of this report "
                        f"(targets: {known})"
                    )
    artifacts = report.get("artifacts")
    if report.get("kind") == "run" and isinstance(artifacts, list):
        for i, artifact in enumerate(artifacts):
            path = artifact.get("path") if isinstance(artifact, Mapping) else None
            if isinstance(path, str) and path and not _relative_path(path):
                out.append(
                    f"artifacts[{i}].path: {path!r} is not relative to the run directory; a run "
                    "report names its artifacts like \"model.onnx\" (no leading '/', no '..')"
                )
    created = report.get("created")
    if isinstance(created, str) and _CREATED.match(created):
        try:
            _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            out.append(f"created: {created!r} is not a real date and time")


def validate_report(obj: Any) -> list[str]:
    """Every way ``obj`` departs from report schema version 1; an empty list when it conforms.

    Each problem starts with the JSON path (``targets[2].accuracy``), then the value found
    and what is expected. Unknown extra keys are allowed. A different ``schema_version`` is
    reported alone, since the rest of the layout may legitimately differ.

    >>> validate_report({"schema_version": 2})
    ['schema_version: this edgekiln reads report schema version 1, got 2; read it with the \
edgekiln version that wrote it']
    """
    if isinstance(obj, Mapping):
        version = obj.get("schema_version")
        if _is_int(version) and version != SCHEMA_VERSION:
            return [
                f"schema_version: this edgekiln reads report schema version {SCHEMA_VERSION}, "
                f"got {version}; read it with the edgekiln version that wrote it"
            ]
    out: list[str] = []
    REPORT_SPEC.check(obj, "", out)
    if out and out[0].startswith(": expected"):
        return ["report" + out[0]]
    if isinstance(obj, Mapping):
        _cross_checks(obj, out)
    return out


# ---------------------------------------------------------------------------------------------
# Step 3: files.


def utc_now() -> str:
    """The current UTC time in the report's format, e.g. ``"2026-12-03T19:10:00Z"``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_report(kind: str = "run", created: str | None = None) -> dict[str, Any]:
    """A valid, empty report of ``kind`` ("run" or "validate"): every section null or empty.

    The run fills in what it measured. ``created`` defaults to now (UTC).

    >>> r = new_report("run", created="2026-12-03T19:10:00Z")
    >>> r["schema_version"], r["kind"], r["targets"], r["model"]
    (1, 'run', [], None)
    """
    if kind not in ("run", "validate"):
        raise ReportError(f'report kind must be "run" or "validate", got {kind!r}')
    from edgekiln import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "edgekiln_version": __version__,
        "kind": kind,
        "created": created or utc_now(),
        "recipe": None,
        "model": None,
        "data": None,
        "training": None,
        "sparsity": None,
        "quantization": None,
        "artifacts": [],
        "targets": [],
        "pairwise": [],
        "check": None,
    }


def _problems_message(where: str, problems: Sequence[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    return (
        f"{where} does not follow report schema version {SCHEMA_VERSION} "
        f"({len(problems)} problem{'s' if len(problems) != 1 else ''}; see {SCHEMA_DOC}):\n"
        f"{shown}{more}"
    )


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json; raise :class:`ReportError` when it cannot be used.

    The error names the path, and for invalid JSON the line and column; for schema problems
    it lists every one (also in ``ReportError.problems``).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ReportError(
            f"report {path} {what}; pass the report.json that `edgekiln run` or "
            "`edgekiln validate` wrote into its run directory"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"report {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(
            f"report {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    problems = validate_report(obj)
    if problems:
        raise ReportError(_problems_message(f"report {path}", problems), problems)
    return obj


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Validate ``report`` and write it as JSON (sorted keys, indent 2) atomically to ``path``.

    Raises :class:`ReportError` listing the schema problems, and writes nothing, when the
    report does not conform. Returns the path written.
    """
    problems = validate_report(report)
    if problems:
        raise ReportError(_problems_message("the report to write", problems), problems)
    data = (json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))
