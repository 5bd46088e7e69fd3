"""Recipes: every key optional, every mistake named by its key path."""

import re
from pathlib import Path

import pytest

from edgekiln.config import (
    DEFAULT_TARGETS,
    ConfigError,
    boards_from_doc,
    load_boards,
    load_config,
    parse_config,
)


def _parse(doc: dict, base: Path = Path(".")):
    return parse_config(doc, base)


def _whole(message: str) -> str:
    """A pattern matching exactly ``message``: the tests pin every word of it."""
    return f"^{re.escape(message)}$"


BOARD = {
    "name": "mine",
    "core": "cortex-m4",
    "clock_hz": 80_000_000,
    "sram_bytes": 131072,
    "flash_bytes": 524288,
}
REPORT_NAMES = (
    "'^(onnxruntime|litert|tflm|mcu:[a-z0-9][a-z0-9_.-]*)$' (report.json's target names); use "
    "lowercase letters, digits, '_', '.' and '-'"
)


def test_empty_recipe_is_the_builtin_default():
    config = _parse({})
    assert config.model.source == "edgekiln.models:small_cnn"
    assert config.data.source == "mnist"
    assert config.targets.names == DEFAULT_TARGETS
    assert config.recipe().sparsity == 0.5
    assert load_config(None).targets == config.targets


def test_full_recipe_round_trips(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\nsource = "edgekiln.models:small_cnn"\ninput_shape = [1, 8, 8]\n'
        "kwargs = {input_size = 8}\n"
        '[data]\nsource = "d.npz"\n'
        "[train]\nfloat_epochs = 1\nqat_epochs = 2\nbatch_size = 32\nlr = 0.01\n"
        '[quantize]\nobserver = "minmax"\n'
        '[sparsity]\ntarget = 0.5\npattern = "2:4"\n'
        '[export]\nformats = ["tflite"]\n'
        '[targets]\nnames = ["tflm", "mcu:mine"]\n'
        '[[targets.boards]]\nname = "mine"\ncore = "cortex-m4"\nclock_hz = 80000000\n'
        "sram_bytes = 131072\nflash_bytes = 524288\n"
        "[check]\nmax_accuracy_drop = 0.01\n"
    )
    config = load_config(recipe)
    assert config.data.source == str((tmp_path / "d.npz").resolve())
    assert config.model.kwargs == {"input_size": 8}
    assert config.train.qat_epochs == 2 and config.export.formats == ("tflite",)
    assert config.targets.names == ("tflm", "mcu:mine")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"modle": {}}, r"\[modle\] is not a recipe table: allowed tables are model, data"),
        ({"train": {"epochs": 3}}, r"\[train\] epochs is not a recipe key: allowed keys are"),
        ({"train": {"lr": -1}}, r"\[train\] lr = -1 is not valid: allowed a number in \(0, 10\)"),
        ({"train": {"batch_size": 0}}, r"\[train\] batch_size = 0 is not valid"),
        ({"train": {"qat_epochs": "2"}}, r"\[train\] qat_epochs = '2' is not valid"),
        ({"model": {"source": "small_cnn"}}, r"\[model\] source = 'small_cnn' is not valid"),
        ({"model": {"input_shape": [0, 28]}}, r"\[model\] input_shape = 0 is not valid"),
        ({"data": {"source": "cifar100"}}, r"\[data\] source = 'cifar100' is not valid"),
        ({"data": {"source": "missing.npz"}}, r"\[data\] source: file .*missing.npz' does not"),
        ({"export": {"formats": ["pb"]}}, r"\[export\] formats = 'pb' is not valid"),
        ({"export": {"onnx_io": "uint8"}}, r"\[export\] onnx_io = 'uint8' is not valid"),
        ({"targets": {"names": ["tensorrt"]}}, r"\[targets\] names = 'tensorrt' is not valid"),
        (
            {"targets": {"names": ["mcu:esp32"]}},
            r"\[targets\] names: mcu:esp32 is not a board: the built-in ones are alif-e7-hp, "
            r"nrf52840, nucleo-l4r5zi, rp2040, stm32h743, stm32u575\. Define your own in a "
            r"\[\[targets\.boards\]\] table \(name, core, clock_hz, sram_bytes, flash_bytes\) and "
            r"name it here as mcu:NAME$",
        ),
        (
            {"export": {"formats": ["tflite"]}, "targets": {"names": ["onnxruntime"]}},
            r"runs the onnx artifact, but \[export\] formats = \['tflite'\]; add 'onnx'",
        ),
        ({"targets": {"kernels": "fast"}}, r"\[targets\] kernels = 'fast' is not valid"),
        ({"sparsity": {"pattern": "3:2"}}, r"\[sparsity\] pattern"),
        ({"quantize": {"weight_bits": 16}}, r"\[quantize\] weight_bits = 16 is not valid"),
        (
            {"check": {"max_accuracy_drop": -1}},
            _whole(
                "[check] max_accuracy_drop = -1 is not valid: allowed a fraction in [0, 1] "
                "(fractions: 0.005 = 0.5 points, 0.10 = 10 %), e.g. max_accuracy_drop = 0.005"
            ),
        ),
        (
            {"check": {"max_latency_growth": "10%"}},
            _whole(
                "[check] max_latency_growth = '10%' is not valid: allowed a finite number >= 0 "
                "(fractions: 0.005 = 0.5 points, 0.10 = 10 %), e.g. max_latency_growth = 0.1"
            ),
        ),
        (
            {"check": {"max_acuracy_drop": 0.01}},
            _whole(
                "[check] max_acuracy_drop is not a recipe key: allowed keys are "
                "max_accuracy_drop, max_agreement_drop, max_arena_growth, max_flash_growth, "
                "max_latency_growth"
            ),
        ),
        (
            {"model": {"kwargs": 3}},
            _whole("[model] kwargs = 3 is not valid: allowed a table of keyword arguments"),
        ),
        (
            {"model": {"input_shape": 28}},
            _whole(
                "[model] input_shape = 28 is not valid: allowed a list of 1 to 3 sizes like "
                "[1, 28, 28]"
            ),
        ),
        (
            {"model": {"input_shape": [1, 1, 28, 28]}},
            _whole(
                "[model] input_shape = [1, 1, 28, 28] is not valid: allowed a list of 1 to 3 "
                "sizes like [1, 28, 28]"
            ),
        ),
        (
            {"data": {"source": "data.csv"}},
            _whole(
                "[data] source = 'data.csv' is not valid: allowed mnist | digits | synthetic_kws "
                "| synthetic_vww | synthetic_cifar | synthetic_anomaly or a path ending in .npz"
            ),
        ),
        (
            {"train": {"float_epochs": -1}},
            _whole("[train] float_epochs = -1 is not valid: allowed a whole number >= 0"),
        ),
        (
            {"train": {"qat_lr": 0}},
            _whole("[train] qat_lr = 0 is not valid: allowed a number in (0, 10)"),
        ),
        (
            {"train": {"qat_lr": -0.1}},
            _whole("[train] qat_lr = -0.1 is not valid: allowed a number in (0, 10)"),
        ),
        (
            {"export": {"formats": []}},
            _whole(
                '[export] formats = [] is not valid: allowed a non-empty list of "onnx", "tflite"'
            ),
        ),
        (
            {"export": {"formats": ["onnx", "pb"]}},
            _whole("[export] formats = 'pb' is not valid: allowed onnx | tflite"),
        ),
        (
            {"targets": {"names": "tflm"}},
            _whole("[targets] names = 'tflm' is not valid: allowed a list of target names"),
        ),
        (
            {"train": 3},
            _whole(
                "[train] must be a table of keys, got int 3; write [train] on a line of its own, "
                "then one key = value per line"
            ),
        ),
        (
            {"sparsity": 0.5},
            _whole(
                "[sparsity] must be a table of keys, got float 0.5; write [sparsity] on a line of "
                "its own, then one key = value per line"
            ),
        ),
        (
            {"targets": {"names": ["tflm", "litert", "tflm"]}},
            _whole(
                "[targets] names: 'tflm' appears twice in ['tflm', 'litert', 'tflm']; list each "
                "target once"
            ),
        ),
        (
            {"targets": {"names": ["mcu:NRF52840"]}},
            _whole(
                "[targets] names = 'mcu:NRF52840' is not valid: allowed a name for which "
                f"'mcu:NRF52840' matches {REPORT_NAMES}"
            ),
        ),
        (
            {"targets": {"names": ["mcu:mine"], "boards": [{**BOARD, "core": "cortex-m9"}]}},
            _whole(
                "[[targets.boards]] number 1 (name = 'mine'): board key 'core' = 'cortex-m9' is "
                "invalid: it must be one of cortex-m0plus, cortex-m4, cortex-m7, cortex-m33, "
                "cortex-m55"
            ),
        ),
        (
            {
                "targets": {
                    "names": ["tflm"],
                    "boards": [BOARD, {**BOARD, "name": "fast", "clock_hz": -1}],
                }
            },
            _whole(
                "[[targets.boards]] number 2 (name = 'fast'): board key 'clock_hz' = -1 is "
                "invalid: it must be a positive integer"
            ),
        ),
        (
            {"targets": {"names": ["tflm"], "boards": [{**BOARD, "cores": "cortex-m4"}]}},
            _whole(
                "[[targets.boards]] number 1 (name = 'mine'): board key(s) 'cores' are not known; "
                "a board has clock_hz, core, flash_bytes, flash_wait_states, name, notes, source, "
                "sram_bytes"
            ),
        ),
        (
            {"targets": {"names": ["mcu:mine"], "boards": [{**BOARD, "flash_wait_states": 16}]}},
            _whole(
                "[[targets.boards]] number 1 (name = 'mine'): board key 'flash_wait_states' = 16 "
                "is invalid: it must be a whole number from 0 to 15 (the CPU cycles a flash read "
                "waits at clock_hz, from the part's flash latency table; a 4-bit latency field "
                "holds no more), or left out, in which case the latency estimate assumes the "
                "anchor board's and says so"
            ),
        ),
        (
            {"targets": {"names": ["tflm"], "boards": [{"core": "cortex-m4"}]}},
            _whole(
                "[[targets.boards]] number 1: board '?' lacks key(s) name, clock_hz, sram_bytes, "
                "flash_bytes"
            ),
        ),
        (
            {"targets": {"names": ["tflm"], "boards": [{**BOARD, "name": "My Board"}]}},
            _whole(
                "[[targets.boards]] number 1: name = 'My Board' is not valid: allowed a name for "
                f"which 'mcu:My Board' matches {REPORT_NAMES}"
            ),
        ),
        (
            {"targets": {"names": ["tflm"], "boards": [BOARD, BOARD]}},
            _whole(
                "[[targets.boards]] number 2 (name = 'mine'): a board named 'mine' appears twice; "
                "give each board its own name"
            ),
        ),
    ],
)
def test_every_recipe_error_names_its_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        _parse(doc)


@pytest.mark.parametrize(
    ("table", "sparsity", "pattern"),
    [
        ({"pattern": "channel"}, 0.5, "channel"),
        ({"mode": "prune_then_qat"}, 0.5, "unstructured"),
        ({"sweep": [0.25, 0.75]}, 0.5, "unstructured"),
        ({"pattern": "2:4"}, 0.5, "2:4"),  # an N:M pattern fixes the sparsity at 1 - N/M
        ({"pattern": "1:4"}, 0.75, "1:4"),
    ],
)
def test_a_sparsity_table_without_target_prunes_by_default(table, sparsity, pattern):
    config = _parse({"sparsity": table})
    recipe = config.recipe()
    assert recipe.prunes and recipe.sparsity == sparsity and str(recipe.pattern) == pattern
    assert config.as_dict()["sparsity"] == {**table, "target": sparsity}  # the report's recipe


def test_target_zero_turns_pruning_off():
    assert not _parse({"sparsity": {"target": 0, "pattern": "channel"}}).recipe().prunes
    assert _parse({"sparsity": {"target": 0, "pattern": "2:4"}}).recipe().prunes  # 2:4 fixes it


def test_a_valid_board_is_kept_as_written():
    doc = {"targets": {"names": ["mcu:mine"], "boards": [BOARD]}}
    assert _parse(doc).targets.boards == (BOARD,)
    timed = {**BOARD, "flash_wait_states": 3}
    doc = {"targets": {"names": ["mcu:mine"], "boards": [timed]}}
    assert _parse(doc).targets.boards == (timed,)


def test_a_boards_file_or_a_recipe_gives_its_boards(tmp_path):
    own = tmp_path / "boards.toml"
    own.write_text(
        '[[boards]]\nname = "mine"\ncore = "cortex-m4"\nclock_hz = 80_000_000\n'
        "sram_bytes = 131072\nflash_bytes = 524288\nflash_wait_states = 3\n"
        '[[boards]]\nname = "other"\ncore = "cortex-m7"\nclock_hz = 216_000_000\n'
        "sram_bytes = 327680\nflash_bytes = 1048576\n"
    )
    boards = load_boards(own)
    assert sorted(boards) == ["mine", "other"]
    assert boards["mine"].flash_wait_states == 3 and boards["other"].flash_wait_states is None
    assert boards["other"].target == "mcu:other"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[train]\nlr = 0.01\n[targets]\nnames = ["mcu:mine"]\n'
        '[[targets.boards]]\nname = "mine"\ncore = "cortex-m4"\nclock_hz = 80000000\n'
        "sram_bytes = 131072\nflash_bytes = 524288\n"
    )
    assert list(load_boards(recipe)) == ["mine"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"board": [BOARD]},
            "b.toml holds no boards: expected [[boards]] tables (or a recipe's "
            "[[targets.boards]]), found board; add one [[boards]] table per board with the keys "
            "name, core, clock_hz, sram_bytes and flash_bytes",
        ),
        (
            {"targets": {"names": ["tflm"]}},
            "b.toml holds no boards: expected [[boards]] tables (or a recipe's "
            "[[targets.boards]]), found targets; add one [[boards]] table per board with the "
            "keys name, core, clock_hz, sram_bytes and flash_bytes",
        ),
        (
            {"boards": [BOARD], "targets": {"boards": [BOARD]}},
            "b.toml holds both [[boards]] and [[targets.boards]] tables; keep one of the two "
            "arrays (a boards file has [[boards]], a recipe [[targets.boards]])",
        ),
        (
            {"boards": []},
            "b.toml: [boards] is empty; add at least one [[boards]] table",
        ),
        (
            {"boards": 3},
            "b.toml: [boards] = 3 is not valid: allowed an array of tables ([[boards]])",
        ),
        (
            {"boards": [{**BOARD, "core": "cortex-m9"}]},
            "b.toml: [[boards]] number 1 (name = 'mine'): board key 'core' = 'cortex-m9' is "
            "invalid: it must be one of cortex-m0plus, cortex-m4, cortex-m7, cortex-m33, "
            "cortex-m55",
        ),
        (
            {"targets": {"boards": [BOARD, {**BOARD, "clock_hz": 0}]}},
            "b.toml: [[targets.boards]] number 2 (name = 'mine'): board key 'clock_hz' = 0 is "
            "invalid: it must be a positive integer",
        ),
        (
            {"boards": [BOARD, BOARD]},
            "b.toml: [[boards]] number 2 (name = 'mine'): a board named 'mine' appears twice; "
            "give each board its own name",
        ),
        (
            {"boards": [{**BOARD, "name": "Mine"}]},
            "b.toml: [[boards]] number 1: name = 'Mine' is not valid: allowed a name for which "
            f"'mcu:Mine' matches {REPORT_NAMES}",
        ),
    ],
)
def test_every_boards_file_error_reads_as_the_recipes(doc, message):
    with pytest.raises(ConfigError, match=_whole(message)):
        boards_from_doc(doc, "b.toml")


def test_missing_and_broken_boards_files(tmp_path):
    where = str(tmp_path / "nope.toml")
    with pytest.raises(
        ConfigError,
        match=_whole(
            f"boards file {where!r} does not exist; name a .toml file holding [[boards]] tables "
            "(or a recipe with [[targets.boards]])"
        ),
    ):
        load_boards(tmp_path / "nope.toml")
    with pytest.raises(
        ConfigError,
        match=_whole(
            f"boards file {str(tmp_path)!r} is a directory: name a .toml file holding [[boards]] "
            "tables"
        ),
    ):
        load_boards(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[boards]\nname = 1")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(f'boards file {str(bad)!r}')} is not valid TOML: "
    ):
        load_boards(bad)


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file .*nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"is a directory: name a \.toml file, e\.g\. '.*recipe"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(bad)
