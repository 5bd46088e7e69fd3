"""Reference architectures: shapes, fx tracing, parameter counts against MLPerf Tiny, registry."""

from __future__ import annotations

import doctest
import importlib
import time

import pytest
import torch
import torch.fx
from torch import nn

import edgekiln.models as models
from edgekiln.models import MODELS, ModelSpec, Task, count_parameters, get_model, small_cnn
from edgekiln.models.architectures import (
    ds_cnn,
    fc_autoencoder,
    mobilenet_v1_025,
    resnet8,
)

# name -> (trainable parameters, total with BatchNorm running statistics). Reference figures:
# DS-CNN 23,756 (NXP eIQ model zoo, MLCommons KWS model); MobileNetV1-0.25 VWW total 221,794
# (same source); ResNet-8 Keras total 78,666 and FC autoencoder ~0.27 M (MLPerf Tiny reference
# models, github.com/mlcommons/tiny).
EXPECTED_PARAMETERS = {
    "small_cnn": (25_290, None),
    "ds_cnn": (23_756, 24_908),
    "mobilenet_v1_025": (216_322, 221_794),
    "resnet8": (78_186, 78_666),
    "fc_autoencoder": (267_928, 269_992),
}


def bn_statistics(model: nn.Module) -> int:
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith(("mean", "var")))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_batch_2(name: str) -> None:
    spec = MODELS[name]
    model = spec.factory().eval()
    out = model(torch.randn(2, *spec.input_shape))
    if spec.task is Task.RECONSTRUCTION:
        assert out.shape == (2, *spec.input_shape)
    else:
        assert out.shape == (2, model.fc.out_features)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_symbolic_trace_matches_eager(name: str) -> None:
    spec = MODELS[name]
    model = spec.factory().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *spec.input_shape)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_reference(name: str) -> None:
    model = get_model(name)
    trainable, total = EXPECTED_PARAMETERS[name]
    assert count_parameters(model) == trainable
    if total is not None:
        assert count_parameters(model) + bn_statistics(model) == total


def test_parameter_counts_in_published_ranges() -> None:
    # Ranges from the MLPerf Tiny paper (Banbury et al., 2021) and the brief.
    assert 20_000 <= count_parameters(ds_cnn()) <= 40_000
    assert 200_000 <= count_parameters(mobilenet_v1_025()) <= 222_000
    assert 75_000 <= count_parameters(resnet8()) <= 80_000
    assert 260_000 <= count_parameters(fc_autoencoder()) <= 275_000


def test_models_contain_only_exportable_layers() -> None:
    allowed = (
        nn.Conv2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Linear,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.Flatten,
        nn.Identity,
        nn.Sequential,
    )
    for name, spec in MODELS.items():
        for path, module in spec.factory().named_modules():
            if path and not isinstance(module, allowed) and list(module.children()) == []:
                pytest.fail(f"{name}: {path} is a {type(module).__name__}")


def test_models_have_no_dropout_or_softmax() -> None:
    for spec in MODELS.values():
        kinds = {type(m) for m in spec.factory().modules()}
        assert not kinds & {nn.Dropout, nn.Softmax}


def test_small_cnn_has_required_building_blocks() -> None:
    model = small_cnn()
    graph = torch.fx.symbolic_trace(model).graph
    targets = {str(node.target) for node in graph.nodes}
    kinds = {type(m) for m in model.modules()}
    assert {nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear} <= kinds
    assert "<built-in function add>" in targets  # the residual add


def test_small_cnn_digits_input_size() -> None:
    model = small_cnn(input_size=8).eval()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert count_parameters(model) == 10_890


def test_small_cnn_rejects_input_size_not_multiple_of_4() -> None:
    with pytest.raises(ValueError, match=r"positive multiple of 4.*input_size=30"):
        small_cnn(input_size=30)


@pytest.mark.parametrize(
    ("factory", "kwargs", "pattern"),
    [
        (small_cnn, {"num_classes": 0}, r"num_classes must be a positive integer.*=0"),
        (ds_cnn, {"num_classes": -1}, r"num_classes must be a positive integer.*=-1"),
        (resnet8, {"num_classes": 2.5}, r"num_classes must be a positive integer.*=2\.5"),
        (fc_autoencoder, {"input_dim": 0}, r"input_dim must be a positive integer"),
    ],
)
def test_factories_reject_bad_sizes(factory, kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        factory(**kwargs)


def test_num_classes_sets_head() -> None:
    assert get_model("ds_cnn", num_classes=35).fc.out_features == 35
    assert get_model("mobilenet_v1_025", num_classes=3).fc.out_features == 3


def test_registry_entries() -> None:
    assert set(MODELS) == {"small_cnn", "ds_cnn", "mobilenet_v1_025", "resnet8", "fc_autoencoder"}
    for spec in MODELS.values():
        assert isinstance(spec, ModelSpec)
        assert spec.dataset in models.DATASETS
        assert spec.description
    assert MODELS["fc_autoencoder"].task is Task.RECONSTRUCTION
    assert MODELS["fc_autoencoder"].task == "reconstruction"
    assert MODELS["resnet8"].task == "classification"


def test_get_model_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'; available: small_cnn, ds_cnn"):
        get_model("resnet9")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_factory_resolves_as_module_attribute(name: str) -> None:
    # Recipes name models as "edgekiln.models:<name>".
    module_name, attr = f"edgekiln.models:{name}".split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    assert factory is MODELS[name].factory


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = models.nope


def test_small_cnn_learns_mnist_in_one_short_epoch() -> None:
    torch.manual_seed(0)
    data = models.load_dataset("mnist")
    model = small_cnn()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    model.train()
    for i in range(0, len(x), 32):
        loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    accuracy = float((predicted == data.y_test).mean())
    assert accuracy > 0.90, f"accuracy {accuracy:.3f} after one epoch ({seconds:.1f} s)"


@pytest.mark.parametrize("module_name", ["architectures", "registry", "datasets"])
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(f"edgekiln.models.{module_name}")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
