"""The phases of `edgekiln run`'s fine-tuning: prune_then_qat with and without pruning epochs."""

import warnings
from pathlib import Path

import pytest

from edgekiln.config import parse_config
from edgekiln.run import prepare_run_dir, run

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("prune_epochs", [0, 1])
def test_prune_then_qat_ends_quantized_and_pruned(tmp_path, prune_epochs):
    # With prune_epochs = 0 the QAT epochs once ran with fake-quantization still off (only the
    # end of a pruning epoch switched it on), so the trained model was a float one.
    doc = {
        "model": {"kwargs": {"input_size": 8}},
        "data": {"source": "digits", "limit": 400},
        "train": {"float_epochs": 1, "prune_epochs": prune_epochs, "qat_epochs": 1},
        "sparsity": {"target": 0.5, "mode": "prune_then_qat"},
        "export": {"formats": ["tflite"]},
        "targets": {"names": ["tflm"]},
    }
    with warnings.catch_warnings():
        # capture warns when it captures a model with fake-quantization off
        warnings.filterwarnings("error", message="capturing with fake-quantization off")
        report = run(parse_config(doc, REPO), prepare_run_dir(tmp_path / "run"))
    assert report["sparsity"]["total"] == pytest.approx(0.5, abs=0.02)
    tflm = report["targets"][0]
    assert tflm["ok"], tflm["error"]
    # The fake-quantized model computes what the int8 artifact computes only if QAT was on.
    assert tflm["agreement"] >= 0.99
    assert tflm["lsb"]["max"] <= 2
