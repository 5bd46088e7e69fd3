"""Recipes: every key optional, every mistake named by its key path."""

from pathlib import Path

import pytest

from edgekiln.config import DEFAULT_TARGETS, ConfigError, load_config, parse_config


def _parse(doc: dict, base: Path = Path(".")):
    return parse_config(doc, base)


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
        ({"targets": {"names": ["mcu:esp32"]}}, r"mcu:esp32: unknown board 'esp32'; known boards"),
        (
            {"export": {"formats": ["tflite"]}, "targets": {"names": ["onnxruntime"]}},
            r"runs the onnx artifact, but \[export\] formats = \['tflite'\]; add 'onnx'",
        ),
        ({"targets": {"kernels": "fast"}}, r"\[targets\] kernels = 'fast' is not valid"),
        ({"sparsity": {"pattern": "3:2"}}, r"\[sparsity\] pattern"),
        ({"quantize": {"weight_bits": 16}}, r"\[quantize\] weight_bits = 16 is not valid"),
        ({"check": {"max_accuracy_drop": -1}}, r"\[check\]"),
    ],
)
def test_every_recipe_error_names_its_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        _parse(doc)


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file .*nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(bad)
