"""Hostile recipes: a missing or broken recipe file, a data file that is missing, cut short or
holds the wrong arrays, a model source that cannot be imported or whose callable raises, a
board table with bad values, and a bad ``edgekiln validate --boards`` file.

Each goes through ``edgekiln.run`` in this process, as ``edgekiln run`` would take it, and must
stop with an error naming the recipe key, the file or the callable (a ConfigError, before any
training): never an exception from deep inside, and leave no state.json that would make the
same ``--out`` look like a run to resume. Every case is counted in the session's hostile
tally. tests/test_config.py and tests/test_run.py pin some of these messages word for word;
here they are counted with the rest of the hostile inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekiln.config import load_boards, load_config, parse_config
from edgekiln.run import prepare_run_dir, run
from tests.hostile.tally import ERROR_NAMED, TALLY, judge

MODULE = "hostile_usernet"  # not test_run.py's "usernet": sys.modules would hand back that one

USERNET = """\
import torch.nn as nn


def make(hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def broken():
    raise RuntimeError("no weights here")


def needs_arg(width):
    return make(width)


def not_a_module():
    return 42


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward exploded")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    """A user's directory: the model module and .npz files, good and hostile (1x3x4 inputs)."""
    root = tmp_path_factory.mktemp("hostile_recipes")
    (root / f"{MODULE}.py").write_text(USERNET)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 1, 3, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    splits = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}
    np.savez(root / "data.npz", **splits)
    (root / "truncated.npz").write_bytes((root / "data.npz").read_bytes()[:200])
    (root / "garbage.npz").write_bytes(b"not a zip archive " * 8)
    np.savez(root / "no_x_test.npz", a=x)
    np.savez(root / "nan.npz", **{**splits, "x_train": np.where(x[:40] > 2, np.nan, x[:40])})
    np.savez(root / "short_labels.npz", **{**splits, "y_train": y[:10]})
    np.savez(root / "float_labels.npz", **{**splits, "y_train": y[:40] + 0.5})
    np.savez(root / "int_inputs.npz", **{**splits, "x_test": (x[40:] * 10).astype(np.int32)})
    np.savez(root / "objects.npz", **{**splits, "x_train": np.array([{"a": 1}] * 40)})
    np.savez(root / "empty_test.npz", **{**splits, "x_test": x[:0], "y_test": y[:0]})
    square = rng.normal(size=(20, 1, 4, 4)).astype(np.float32)  # 16 features, make() takes 12
    np.savez(root / "square.npz", x_train=square, y_train=y[:20], x_test=square, y_test=y[:20])
    (root / "cut.toml").write_text('[model]\nsource = "hostile_usernet:ma')
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00\x01recipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield root
        sys.modules.pop(MODULE, None)


def _doc(**tables: dict) -> dict:
    doc = {
        "model": {"source": f"{MODULE}:make"},
        "data": {"source": "data.npz"},
        "train": {"float_epochs": 1, "qat_epochs": 1, "lr": 0.01},
        "export": {"formats": ["tflite"]},
        "targets": {"names": ["mcu:rp2040"]},
    }
    return {**doc, **tables}


def _run(**tables: dict) -> Callable[[Path, Path], object]:
    """The recipe ``_doc(**tables)`` run in ``project`` into a fresh directory."""
    return lambda project, out: run(parse_config(_doc(**tables), project), prepare_run_dir(out))


def _model(source: str, **model: object) -> Callable[[Path, Path], object]:
    return _run(model={"source": f"{MODULE}:{source}", **model})


def _data(name: str) -> Callable[[Path, Path], object]:
    return _run(data={"source": name})


def _recipe(name: str) -> Callable[[Path, Path], object]:
    return lambda project, out: load_config(project / name)


# (category, case, call, the pattern that names the problem)
HOSTILE_RECIPES: list[tuple[str, str, Callable[[Path, Path], object], str]] = [
    ("recipe file", "missing", _recipe("nowhere.toml"), r"nowhere\.toml' does not exist"),
    ("recipe file", "cut short", _recipe("cut.toml"), r"cut\.toml' is not valid TOML"),
    ("recipe file", "binary bytes", _recipe("binary.toml"), r"binary\.toml' is not valid TOML"),
    (
        "recipe: model source",
        "module missing",
        _run(model={"source": "nopkg_edgekiln_hostile:make"}),
        r"cannot import 'nopkg_edgekiln_hostile'.*install the package",
    ),
    (
        "recipe: model source",
        "callable missing",
        _model("build"),
        rf"{MODULE} has no callable 'build'; name a function",
    ),
    (
        "recipe: model source",
        "callable raises",
        _model("broken"),
        rf"source = '{MODULE}:broken': calling it raised RuntimeError: no weights here",
    ),
    (
        "recipe: model source",
        "callable needs an argument",
        _model("needs_arg"),
        r"calling it raised TypeError: .*missing 1 required positional argument: 'width'",
    ),
    (
        "recipe: model source",
        "callable returns no module",
        _model("not_a_module"),
        rf"'{MODULE}:not_a_module' returned int, not a torch.nn.Module",
    ),
    (
        "recipe: model source",
        "forward raises",
        _model("Boom", input_shape=[1, 3, 4]),
        r"does not accept data of shape \[1, 3, 4\].*RuntimeError: forward exploded",
    ),
    ("recipe: data file", "missing", _data("missing.npz"), r"missing\.npz' does not exist"),
    (
        "recipe: data file",
        "cut short",
        _data("truncated.npz"),
        r"truncated\.npz.*the \.npz archive is damaged or cut short",
    ),
    (
        "recipe: data file",
        "not an .npz",
        _data("garbage.npz"),
        r"garbage\.npz.*not an \.npz archive",
    ),
    (
        "recipe: data file",
        "x_test missing",
        _data("no_x_test.npz"),
        r"key 'x_test' is missing .*keys present: \['a'\]",
    ),
    ("recipe: data file", "NaN inputs", _data("nan.npz"), r"x_train contains \d+ NaN or inf"),
    (
        "recipe: data file",
        "labels of another length",
        _data("short_labels.npz"),
        r"y_train has 10 labels but x_train has 40 samples",
    ),
    (
        "recipe: data file",
        "float labels",
        _data("float_labels.npz"),
        r"y_train has dtype float64, expected integer class ids",
    ),
    (
        "recipe: data file",
        "integer inputs",
        _data("int_inputs.npz"),
        r"x_test has dtype int32, expected floating point",
    ),
    (
        "recipe: data file",
        "object arrays",
        _data("objects.npz"),
        r"objects\.npz'.*Object arrays cannot be loaded",
    ),
    (
        "recipe: data file",
        "empty test split",
        _data("empty_test.npz"),
        r"x_test has shape \(0, 1, 3, 4\), expected \(N, \*input_shape\) with N >= 1",
    ),
    (
        "recipe: data file",
        "wrong sample shape",
        _data("square.npz"),
        rf"'{MODULE}:make' does not accept data of shape \[1, 4, 4\]",
    ),
]

BOARD = {"name": "my-m4", "core": "cortex-m4", "clock_hz": 80_000_000, "sram_bytes": 131072,
         "flash_bytes": 524288}  # fmt: skip


def _board(**changes: object) -> Callable[[Path, Path], object]:
    """The recipe with one [[targets.boards]] table, ``changes`` applied (None drops a key)."""
    board = {k: v for k, v in {**BOARD, **changes}.items() if v is not None}
    return _run(targets={"names": ["mcu:my-m4"], "boards": [board]})


def _boards_file(text: str | bytes | None) -> Callable[[Path, Path], object]:
    """``edgekiln validate --boards FILE``'s reading of a file holding ``text`` (None: none)."""

    def call(project: Path, out: Path) -> object:
        path = out.parent / "boards.toml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        return load_boards(path)

    return call


HOSTILE_RECIPES += [
    (
        "recipe: boards",
        "wait states out of range",
        _board(flash_wait_states=16),
        r"'flash_wait_states' = 16 is invalid: it must be a whole number from 0 to 15",
    ),
    (
        "recipe: boards",
        "wait states negative",
        _board(flash_wait_states=-1),
        r"'flash_wait_states' = -1 is invalid",
    ),
    (
        "recipe: boards",
        "wait states as text",
        _board(flash_wait_states="3"),
        r"'flash_wait_states' = '3' is invalid",
    ),
    (
        "recipe: boards",
        "wait states true",
        _board(flash_wait_states=True),
        r"'flash_wait_states' = True is invalid",
    ),
    ("recipe: boards", "unknown key", _board(ram=1), r"board key\(s\) 'ram' are not known"),
    ("recipe: boards", "core missing", _board(core=None), r"board 'my-m4' lacks key\(s\) core"),
    ("recipe: boards", "unknown core", _board(core="cortex-a53"), r"'cortex-a53'.*cortex-m4"),
    ("recipe: boards", "zero SRAM", _board(sram_bytes=0), r"sram_bytes.*0.*positive integer"),
    (
        "boards file",
        "missing",
        _boards_file(None),
        r"boards\.toml' does not exist; name a \.toml file holding \[\[boards\]\] tables",
    ),
    ("boards file", "not TOML", _boards_file("[[boards]\nname ="), r"is not valid TOML"),
    ("boards file", "binary bytes", _boards_file(b"\xff\xfe\x00"), r"is not valid TOML"),
    (
        "boards file",
        "no boards",
        _boards_file("[model]\n"),
        r"holds no boards: expected \[\[boards\]\] tables",
    ),
    (
        "boards file",
        "a board without a name",
        _boards_file('[[boards]]\ncore = "cortex-m4"\n'),
        r"\[\[boards\]\] number 1: board '\?' lacks key\(s\) name, clock_hz",
    ),
]

# Cases edgekiln gets wrong in a file this suite does not own: each runs as a strict xfail, so
# it fails loudly once fixed and the entry can go.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _params() -> list:
    params = []
    for category, case, call, pattern in HOSTILE_RECIPES:
        bug = KNOWN_BUGS.get((category, case), "")
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        params.append(pytest.param(category, case, call, pattern, bug, marks=marks))
    return params


@pytest.mark.parametrize(
    "category,case,call,pattern,bug", _params(), ids=[f"{c[0]}: {c[1]}" for c in HOSTILE_RECIPES]
)
def test_hostile_recipe_stops_with_a_named_error(
    project, tmp_path, category, case, call, pattern, bug
):
    verdict = judge(lambda: call(project, tmp_path / "out"), names=pattern)
    where = {"recipe file": "load_config", "boards file": "load_boards"}.get(category, "run")
    TALLY.record(category, case, where, verdict, known_bug=bug)
    assert verdict.outcome == ERROR_NAMED, str(verdict)
    assert verdict.error == "ConfigError", str(verdict)  # the recipe's own error, by key
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing looks like a finished run
    assert not (tmp_path / "out" / "state.json").exists()  # nor like one to resume: --out reusable


def test_the_good_recipe_runs(project, tmp_path):
    # the same project with nothing hostile: every refusal above is the hostile part's doing
    report = _run()(project, tmp_path / "out")
    assert report["targets"][0]["ok"]
