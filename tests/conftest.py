"""Shared fixtures: one reduced end-to-end run that several test modules read, a hang guard."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekiln.config import parse_config
from edgekiln.run import prepare_run_dir, run

REPO = Path(__file__).parents[1]

# small_cnn on scikit-learn's 8x8 digits: the default pipeline at a size a test can afford.
DIGITS = {
    "model": {"kwargs": {"input_size": 8}},
    "data": {"source": "digits"},
    "train": {"float_epochs": 3, "qat_epochs": 1, "lr": 0.005},
    "targets": {"names": ["onnxruntime", "litert", "tflm", "mcu:nrf52840"], "latency_runs": 3},
}


@pytest.fixture
def fail_after_60s() -> Iterator[None]:
    """A hang fails the test, as a crash, after 60 s (a NaN range once looped forever)."""

    def hang(signum: int, frame: object) -> None:
        raise TimeoutError("still running after 60 s: a hang, as a non-finite range once was")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    config = parse_config(DIGITS, REPO)
    report = run(config, prepare_run_dir(out))
    return out, report
