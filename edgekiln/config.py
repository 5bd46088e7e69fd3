"""The run recipe: a TOML file whose every key is optional, turned into validated dataclasses.

The tables and their defaults (the built-in default run is this file with nothing in it)::

    [model]
    source = "edgekiln.models:small_cnn"   # "edgekiln.models:NAME" or "pkg.module:callable"
    input_shape = [1, 28, 28]              # (C, H, W) without the batch; default: the data's shape
    kwargs = {}                            # keyword arguments for the callable

    [data]
    source = "mnist"                       # mnist | digits | synthetic_* | path/to/data.npz
    limit = 0                              # at most this many samples per split; 0 = all

    [train]
    float_epochs = 2                       # float training before QAT; 0 = use the model as given
    qat_epochs = 1                         # quantization-aware fine-tuning
    prune_epochs = 1                       # pruning before QAT ([sparsity] mode = "prune_then_qat")
    batch_size = 64
    lr = 0.002                             # Adam, float phase
    qat_lr = 0.0005                        # Adam, QAT phase
    seed = 0

    [quantize]  and  [sparsity]            # the fields of edgekiln.Recipe (see pipeline/recipe.py)
    # default: int8 QAT, [sparsity] target = 0.5, pattern = "unstructured"; also 0.5 when the
    # table has no target (an N:M pattern fixes it at 1 - N/M); target = 0 turns pruning off

    [export]
    formats = ["onnx", "tflite"]
    onnx_io = "float"                      # float | int8 boundary of the ONNX artifact
    tflite_io = "int8"                     # int8 | float boundary of the TFLite artifact

    [targets]
    names = ["onnxruntime", "litert", "tflm", "mcu:nucleo-l4r5zi", "mcu:nrf52840"]
    kernels = "cmsis-nn"                   # cmsis-nn | reference: the simulator's latency model
    latency_runs = 50                      # timed runs per measured target (after 5 warm-ups)
    [[targets.boards]]                     # a board of your own, usable as "mcu:NAME"
    name = "my-board"  core = "cortex-m4"  clock_hz = 80_000_000  sram_bytes = 262144 ...
    flash_wait_states = 4                  # optional; without it the latency model assumes 5

    [check]                                # thresholds recorded in the report for `edgekiln check`
    max_accuracy_drop = 0.005

Strings are accepted only here and turned into the library's enums and objects; every error
names the key path (``[train] lr``), the value given and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

if TYPE_CHECKING:
    from edgekiln.targets.mcu.boards import Board

BUILTIN_DATA = (
    "mnist",
    "digits",
    "synthetic_kws",
    "synthetic_vww",
    "synthetic_cifar",
    "synthetic_anomaly",
)
DEFAULT_TARGETS = ("onnxruntime", "litert", "tflm", "mcu:nucleo-l4r5zi", "mcu:nrf52840")
RUNTIME_TARGETS = ("onnxruntime", "litert", "tflm")
FORMATS = ("onnx", "tflite")
IO_CHOICES = ("float", "int8")
KERNEL_CHOICES = ("cmsis-nn", "reference")
DEFAULT_SPARSITY = 0.5  # [sparsity] target when the recipe gives none


class ConfigError(ValueError):
    """A recipe key with a bad value, an unknown key or table, or a missing file."""


def _fail(where: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where} = {value!r} is not valid: allowed {allowed}")


def _int(where: str, value: Any, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise _fail(where, value, f"a whole number {bound}")
    return value


def _float(where: str, value: Any, low: float, high: float) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not math.isfinite(value) or not low < value < high:
        raise _fail(where, value, f"a number in ({low:g}, {high:g})")
    return float(value)


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(where, value, " | ".join(choices))
    return str(value)


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{name}] must be a table of keys, got {type(table).__name__} {table!r}; "
            f"write [{name}] on a line of its own, then one key = value per line"
        )
    return dict(table)


def _no_unknown(name: str, table: dict[str, Any], cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in table:
        if key not in known:
            raise ConfigError(
                f"[{name}] {key} is not a recipe key: allowed keys are {', '.join(known)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Which model: a built-in architecture or a user's callable returning an nn.Module."""

    source: str = "edgekiln.models:small_cnn"
    input_shape: tuple[int, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> ModelConfig:
        """Validate ``[model]``."""
        _no_unknown("model", table, cls)
        source = table.get("source", cls.source)
        if not isinstance(source, str) or source.count(":") != 1 or not all(source.split(":")):
            raise _fail(
                "[model] source", source, '"edgekiln.models:NAME" or "package.module:callable"'
            )
        shape = table.get("input_shape")
        if shape is not None:
            if not isinstance(shape, list) or not 1 <= len(shape) <= 3:
                raise _fail("[model] input_shape", shape, "a list of 1 to 3 sizes like [1, 28, 28]")
            shape = tuple(_int("[model] input_shape", d, 1) for d in shape)
        kwargs = table.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise _fail("[model] kwargs", kwargs, "a table of keyword arguments")
        return cls(source, shape, dict(kwargs))


@dataclass(frozen=True)
class DataConfig:
    """Which data: a built-in offline set or a user's ``.npz`` (resolved against the recipe)."""

    source: str = "mnist"
    limit: int = 0

    @classmethod
    def from_table(cls, table: dict[str, Any], base: Path) -> DataConfig:
        """Validate ``[data]``; a path is resolved against ``base`` and must exist."""
        _no_unknown("data", table, cls)
        source = table.get("source", cls.source)
        if not isinstance(source, str) or not source:
            raise _fail("[data] source", source, f"{' | '.join(BUILTIN_DATA)} or a path to .npz")
        if source not in BUILTIN_DATA:
            if not source.endswith(".npz"):
                raise _fail(
                    "[data] source", source, f"{' | '.join(BUILTIN_DATA)} or a path ending in .npz"
                )
            path = (base / source).resolve()
            if not path.is_file():
                raise ConfigError(f"[data] source: file {str(path)!r} does not exist")
            source = str(path)
        return cls(source, _int("[data] limit", table.get("limit", 0), 0))

    @property
    def is_builtin(self) -> bool:
        """True for a built-in data set name."""
        return self.source in BUILTIN_DATA


@dataclass(frozen=True)
class TrainSection:
    """The two training phases: float, then quantization-aware."""

    float_epochs: int = 2
    qat_epochs: int = 1
    prune_epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    qat_lr: float = 5e-4
    seed: int = 0

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> TrainSection:
        """Validate ``[train]``."""
        _no_unknown("train", table, cls)
        d = cls()
        return cls(
            float_epochs=_int("[train] float_epochs", table.get("float_epochs", d.float_epochs), 0),
            qat_epochs=_int("[train] qat_epochs", table.get("qat_epochs", d.qat_epochs), 0),
            prune_epochs=_int("[train] prune_epochs", table.get("prune_epochs", d.prune_epochs), 0),
            batch_size=_int("[train] batch_size", table.get("batch_size", d.batch_size), 1),
            lr=_float("[train] lr", table.get("lr", d.lr), 0, 10),
            qat_lr=_float("[train] qat_lr", table.get("qat_lr", d.qat_lr), 0, 10),
            seed=_int("[train] seed", table.get("seed", d.seed), 0),
        )


@dataclass(frozen=True)
class ExportConfig:
    """Which artifacts, and their boundaries."""

    formats: tuple[str, ...] = FORMATS
    onnx_io: str = "float"
    tflite_io: str = "int8"

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> ExportConfig:
        """Validate ``[export]``."""
        _no_unknown("export", table, cls)
        formats = table.get("formats", list(FORMATS))
        if not isinstance(formats, list) or not formats:
            raise _fail("[export] formats", formats, 'a non-empty list of "onnx", "tflite"')
        formats = tuple(_choice("[export] formats", f, FORMATS) for f in formats)
        return cls(
            formats,
            _choice("[export] onnx_io", table.get("onnx_io", "float"), IO_CHOICES),
            _choice("[export] tflite_io", table.get("tflite_io", "int8"), IO_CHOICES),
        )


@dataclass(frozen=True)
class TargetsConfig:
    """Where the artifacts run."""

    names: tuple[str, ...] = DEFAULT_TARGETS
    kernels: str = "cmsis-nn"
    latency_runs: int = 50
    boards: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_table(cls, table: dict[str, Any], formats: tuple[str, ...]) -> TargetsConfig:
        """Validate ``[targets]``; each target needs the artifact format it runs."""
        _no_unknown("targets", table, cls)
        names = table.get("names", list(DEFAULT_TARGETS))
        if not isinstance(names, list):
            raise _fail("[targets] names", names, "a list of target names")
        boards = table.get("boards", [])
        if not isinstance(boards, list) or not all(isinstance(b, dict) for b in boards):
            raise _fail("[targets] boards", boards, "an array of tables ([[targets.boards]])")
        board_names = _check_boards(boards)
        for i, name in enumerate(names):
            if not isinstance(name, str) or not (
                name in RUNTIME_TARGETS or name.startswith("mcu:")
            ):
                raise _fail(
                    "[targets] names",
                    name,
                    f"{' | '.join(RUNTIME_TARGETS)} | mcu:BOARD (see `edgekiln targets`)",
                )
            _check_report_name("[targets] names", name, name)
            if name in names[:i]:
                raise ConfigError(
                    f"[targets] names: {name!r} appears twice in {names}; list each target once"
                )
            needs = "onnx" if name == "onnxruntime" else "tflite"
            if needs not in formats:
                raise ConfigError(
                    f"[targets] names: target {name!r} runs the {needs} artifact, but "
                    f"[export] formats = {list(formats)}; add {needs!r} to [export] formats"
                )
            if name.startswith("mcu:"):
                _check_board(name[4:], board_names)
        return cls(
            tuple(names),
            _choice("[targets] kernels", table.get("kernels", "cmsis-nn"), KERNEL_CHOICES),
            _int("[targets] latency_runs", table.get("latency_runs", 50), 0, 10_000),
            tuple(dict(b) for b in boards),
        )


def _check_boards(
    boards: list[dict[str, Any]], array: str = "[[targets.boards]]"
) -> dict[str, Board]:
    """Build every board table (of the array ``array``) as the run will, now; by name."""
    from edgekiln.targets.mcu.boards import Board

    built: dict[str, Board] = {}
    for number, table in enumerate(boards, start=1):
        where = f"{array} number {number}"
        name = table.get("name")
        named = f"{where} (name = {name!r})" if isinstance(name, str) else where
        try:
            board = Board.from_dict(dict(table))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{named}: {e}") from None
        _check_report_name(f"{where}: name", board.name, board.target)
        if board.name in built:
            raise ConfigError(
                f"{named}: a board named {board.name!r} appears twice; give each board its own name"
            )
        built[board.name] = board
    return built


def _check_report_name(where: str, value: str, target: str) -> None:
    """Refuse a target name ``report.json`` would reject (after the whole run)."""
    from edgekiln.report.schema import TARGET_NAME

    if not TARGET_NAME.match(target):
        raise _fail(
            where,
            value,
            f"a name for which {target!r} matches {TARGET_NAME.pattern!r} (report.json's "
            "target names); use lowercase letters, digits, '_', '.' and '-'",
        )


def _check_board(name: str, custom: Collection[str]) -> None:
    if name in custom:
        return
    from edgekiln.targets.mcu.boards import BOARDS, get_board

    try:
        get_board(name)
    except (KeyError, ValueError):
        mine = f"; this recipe defines {', '.join(sorted(custom))}" if custom else ""
        raise ConfigError(
            f"[targets] names: mcu:{name} is not a board: the built-in ones are "
            f"{', '.join(sorted(BOARDS))}{mine}. Define your own in a [[targets.boards]] table "
            "(name, core, clock_hz, sram_bytes, flash_bytes) and name it here as mcu:NAME"
        ) from None


@dataclass(frozen=True)
class RunConfig:
    """A whole run: every table of the recipe, validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    quantize: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] = field(default_factory=lambda: {"target": DEFAULT_SPARSITY})
    export: ExportConfig = field(default_factory=ExportConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    check: dict[str, Any] = field(default_factory=dict)
    source: str = "built-in default"
    raw: dict[str, Any] = field(default_factory=dict)  # the TOML document, for --resume
    base: str = "."  # the directory paths in the recipe resolve against

    def recipe(self) -> Any:
        """The ``edgekiln.Recipe`` of the ``[quantize]`` and ``[sparsity]`` tables."""
        from edgekiln.pipeline.recipe import Recipe

        return Recipe.from_tables({"quantize": self.quantize, "sparsity": self.sparsity})

    def as_dict(self) -> dict[str, Any]:
        """The resolved recipe as TOML-shaped tables (for the report)."""
        return {
            "model": {
                "source": self.model.source,
                "input_shape": self.model.input_shape,
                "kwargs": self.model.kwargs,
            },
            "data": {"source": self.data.source, "limit": self.data.limit},
            "train": dict(self.train.__dict__),
            "quantize": self.quantize,
            "sparsity": self.sparsity,
            "export": {
                "formats": list(self.export.formats),
                "onnx_io": self.export.onnx_io,
                "tflite_io": self.export.tflite_io,
            },
            "targets": {
                "names": list(self.targets.names),
                "kernels": self.targets.kernels,
                "latency_runs": self.targets.latency_runs,
                "boards": list(self.targets.boards),
            },
            "check": self.check,
            "source": self.source,
        }


TABLES = ("model", "data", "train", "quantize", "sparsity", "export", "targets", "check")


def parse_config(doc: dict[str, Any], base: Path, source: str = "recipe") -> RunConfig:
    """A RunConfig from a parsed TOML document; paths resolve against ``base``."""
    for key in doc:
        if key not in TABLES:
            raise ConfigError(
                f"[{key}] is not a recipe table: allowed tables are {', '.join(TABLES)}"
            )
    export = ExportConfig.from_table(_table(doc, "export"))
    config = RunConfig(
        model=ModelConfig.from_table(_table(doc, "model")),
        data=DataConfig.from_table(_table(doc, "data"), base),
        train=TrainSection.from_table(_table(doc, "train")),
        quantize=_table(doc, "quantize"),
        sparsity=_sparsity_table(doc),
        export=export,
        targets=TargetsConfig.from_table(_table(doc, "targets"), export.formats),
        check=_table(doc, "check"),
        source=source,
        raw=doc,
        base=str(base),
    )
    _check_recipe(config)
    return config


def _sparsity_table(doc: dict[str, Any]) -> dict[str, Any]:
    """``[sparsity]`` with its target filled in when the recipe gives none.

    The default prunes ``DEFAULT_SPARSITY`` whether the table is missing or holds other keys
    (``pattern``, ``mode``, ``sweep``); an N:M pattern fixes the target at ``1 - N/M`` instead.
    ``target = 0`` turns pruning off (except with an N:M pattern, which fixes it). A polynomial
    schedule needs its own target.
    """
    from edgekiln.pipeline.constraints import Pattern

    table = _table(doc, "sparsity")
    if "target" in table or table.get("schedule", "constant") != "constant":
        return table
    try:
        fixed = Pattern.parse(table.get("pattern", "unstructured")).sparsity
    except (TypeError, ValueError):
        return table  # the recipe check names the bad pattern
    return {**table, "target": DEFAULT_SPARSITY if fixed is None else fixed}


def _check_recipe(config: RunConfig) -> None:
    from edgekiln.pipeline.recipe import RecipeError

    try:
        config.recipe()
    except RecipeError as e:
        raise ConfigError(str(e)) from None
    _check_thresholds(config.check)


def _check_thresholds(table: dict[str, Any]) -> None:
    from edgekiln.report.check import ThresholdError, Thresholds, threshold_rule

    _no_unknown("check", table, Thresholds)
    for key, value in table.items():
        try:
            Thresholds.from_dict({key: value})
        except ThresholdError:
            example = f"{key} = {getattr(Thresholds, key)!r}"
            raise _fail(f"[check] {key}", value, f"{threshold_rule(key)}, e.g. {example}") from None


def load_config(path: str | Path | None) -> RunConfig:
    """The RunConfig of a TOML recipe file, or the built-in default for ``None``."""
    if path is None:
        return parse_config({}, Path.cwd(), "built-in default")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"recipe file {str(path)!r} is a directory: name a .toml file, e.g. "
            f"{str(path / 'recipe.toml')!r} (or --resume {str(path)!r} to finish a run there)"
        )
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe file {str(path)!r} is not valid TOML: {e}") from None
    return parse_config(doc, path.parent.resolve(), str(path))


def boards_from_doc(doc: dict[str, Any], source: str = "boards file") -> dict[str, Board]:
    """The boards of a parsed TOML document, by name: its ``[[boards]]`` tables, or a recipe's
    ``[[targets.boards]]``, each checked as a recipe's boards are (``edgekiln validate --boards``).

    >>> boards = boards_from_doc({"boards": [{"name": "my-m4", "core": "cortex-m4",
    ...     "clock_hz": 80_000_000, "sram_bytes": 131072, "flash_bytes": 524288,
    ...     "flash_wait_states": 3}]})
    >>> boards["my-m4"].target, boards["my-m4"].flash_wait_states
    ('mcu:my-m4', 3)
    """
    targets = doc.get("targets", {})
    in_recipe = isinstance(targets, dict) and "boards" in targets
    if "boards" in doc and in_recipe:
        raise ConfigError(
            f"{source} holds both [[boards]] and [[targets.boards]] tables; keep one of the two "
            "arrays (a boards file has [[boards]], a recipe [[targets.boards]])"
        )
    if not ("boards" in doc or in_recipe):
        found = ", ".join(sorted(doc)) or "nothing"
        raise ConfigError(
            f"{source} holds no boards: expected [[boards]] tables (or a recipe's "
            f"[[targets.boards]]), found {found}; add one [[boards]] table per board with the "
            "keys name, core, clock_hz, sram_bytes and flash_bytes"
        )
    array = "[[targets.boards]]" if in_recipe else "[[boards]]"
    boards = targets["boards"] if in_recipe else doc["boards"]
    if not isinstance(boards, list) or not all(isinstance(b, dict) for b in boards):
        raise _fail(f"{source}: {array[1:-1]}", boards, f"an array of tables ({array})")
    if not boards:
        raise ConfigError(f"{source}: {array[1:-1]} is empty; add at least one {array} table")
    try:
        return _check_boards(boards, array)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_boards(path: str | Path) -> dict[str, Board]:
    """The boards of a TOML file (see ``boards_from_doc``), by name."""
    path = Path(path)
    where = f"boards file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory: name a .toml file holding [[boards]] tables")
    if not path.is_file():
        raise ConfigError(
            f"{where} does not exist; name a .toml file holding [[boards]] tables (or a recipe "
            "with [[targets.boards]])"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    return boards_from_doc(doc, where)
