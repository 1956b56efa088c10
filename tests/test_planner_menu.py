"""The planner's ``allow_float=False`` menu: every layer quantized, no FP32 candidate, still the best fit."""

from __future__ import annotations

import onnx
import pytest
from models import small_cnn
from test_planner import PROFILE

from rexdeploy.analyze import Layer
from rexdeploy.api import quantizable_layers
from rexdeploy.costmodel import predict_model_ms
from rexdeploy.errors import BudgetError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.planner import plan_model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture(scope="module")
def layers(model: onnx.ModelProto) -> list[Layer]:
    return quantizable_layers(fold_batchnorm(model)[0])


def test_quantized_only_menu_quantizes_every_layer(model: onnx.ModelProto, layers: list[Layer]) -> None:
    full = plan_model(model, layers, PROFILE, 1e9)
    only = plan_model(model, layers, PROFILE, 1e9, allow_float=False)
    assert any(c.label == "FP32" for c in full.candidates)
    assert not any(c.label == "FP32" for c in only.candidates)
    names = {layer.name for layer in layers}
    assert all(set(c.plan.layers) == names for c in only.candidates)
    # predictions are the cost model's, and the chosen plan is the most accurate candidate
    for c in only.candidates[:5]:
        assert c.predicted_latency_ms == pytest.approx(predict_model_ms(PROFILE, layers, c.plan))
    assert only.chosen.predicted_error == min(c.predicted_error for c in only.candidates)


def test_quantized_only_fastest_plan_is_no_faster_than_the_full_menu(model: onnx.ModelProto,
                                                                     layers: list[Layer]) -> None:  # fmt: skip
    full = plan_model(model, layers, PROFILE, 1e9)
    only = plan_model(model, layers, PROFILE, 1e9, allow_float=False)
    fastest_full = min(c.predicted_latency_ms for c in full.candidates)
    fastest_only = min(c.predicted_latency_ms for c in only.candidates)
    assert fastest_only >= fastest_full - 1e-12
    with pytest.raises(BudgetError):
        plan_model(model, layers, PROFILE, fastest_only * 0.99, allow_float=False)
