"""Every emitted form compiles on OpenVINO's CPU plugin and agrees with onnxruntime's exact arithmetic of the same
ONNX (the engine self-check), on the host's own profile: conv nets, a transformer block (MatMul layers after ReLU:
uint8 inputs), int8 with activation orders, weight-only. A form the engine refuses or miscompiles fails here, not in
a user's build."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from models import conv_relu_gemm, mobilenet_v2_like, small_cnn, transformer_block

from rexdeploy.analyze import quantizable_layers
from rexdeploy.builders.registry import get_builder
from rexdeploy.graph import fold_batchnorm, save_model
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.pins import float_precision_of
from rexdeploy.planner.search import prepare
from rexdeploy.profile import load_profile
from rexdeploy.selfcheck import self_check

pytestmark = pytest.mark.openvino

MODELS = {
    "small_cnn": lambda: small_cnn(),
    "conv_relu_gemm": lambda: conv_relu_gemm(batch=1),
    "mobilenet_v2_like": lambda: mobilenet_v2_like(width=8, size=16),
    "transformer_block": lambda: transformer_block(hidden=32, seq=6),
}
SETTINGS = {
    "W8A8 K=1": {"order": 1},
    "W8A8 K=2": {"order": 2},
    "W8A8 K=2 act order 2": {"order": 2, "act_order": 2},
    "weight-only K=2": {"order": 2, "act_bits": 0},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_openvino_compiles_and_agrees_with_the_exact_arithmetic(tmp_path: Path, name: str, setting: str) -> None:
    pytest.importorskip("openvino")
    builder = get_builder("openvino")
    profile = load_profile("auto")
    model: onnx.ModelProto = MODELS[name]()
    result = expand_model(model, profile=profile, **SETTINGS[setting])  # type: ignore[arg-type]
    path = save_model(result.model, tmp_path / "rex.onnx")
    engine = builder.build(path, profile, tmp_path / "engine")
    precision = {"fp32": "fp32", "bf16": "bf16"}.get(float_precision_of(result.model), "fp32")
    # the tolerance the build would use: the error model's prediction for this plan in this engine's precision
    errors = prepare(model, quantizable_layers(fold_batchnorm(model)[0])).errors
    predicted = errors.network_error(errors.plan_errors(result.plan.layers, precision))
    check = self_check(builder, engine, path, predicted, precision)
    assert check.passed, check.text
