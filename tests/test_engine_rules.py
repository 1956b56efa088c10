"""Every form the pass emits obeys TensorRT's explicit-quantization rules (static lint) and runs on
OpenVINO with its conv / matmul layers in integer kernels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import small_cnn, transformer_block
from reference import assert_engine_agrees, run_exact
from rexdeploy_tensorrt.qdq_lint import errors, lint_qdq

from rexdeploy.api import expand_model
from rexdeploy.profile import load_profile

FORMS = [
    {"bits": 8, "order": 1},
    {"bits": 8, "order": 2},
    {"bits": 4, "order": 3, "gamma": 0.5},
    {"bits": 4, "order": 3, "form": "concat"},
    {"bits": 4, "order": 3, "split": (2, 1)},
    {"bits": 8, "order": 2, "act_order": 2},
    {"bits": 8, "order": 1, "act_order": 3, "form": "concat"},
    {"bits": 8, "order": 3, "act_order": 2, "gamma": 0.5},
]


@pytest.mark.parametrize("make", [small_cnn, transformer_block])
@pytest.mark.parametrize("settings", FORMS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_emitted_qdq_passes_tensorrt_lint(make: object, settings: dict[str, object]) -> None:
    model = expand_model(make(), profile=load_profile("h100"), act_bits=8, **settings).model  # type: ignore[operator]
    findings = lint_qdq(model)
    assert errors(findings) == [], errors(findings)
    # every quantized layer has both inputs dequantized: no "left in float" warnings either
    assert [f for f in findings if "float" in f.message] == []


@pytest.mark.openvino
@pytest.mark.parametrize("settings", FORMS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_openvino_runs_every_form_in_int8(tmp_path: Path, settings: dict[str, object]) -> None:
    pytest.importorskip("openvino")
    from rexdeploy.builders.registry import get_builder

    host = load_profile("auto")
    # float layers in f32 on every host: the auto profile of AMX CPUs (xeon-spr) asks for bf16, whose 8-bit
    # mantissa swamps the activation orders' remainders (x - x_1 is computed in bf16): 2-7e-2 from the graph
    profile = dataclasses.replace(host, quantization=dataclasses.replace(host.quantization, bf16=False))
    settings = {**settings, "bits": min(int(settings["bits"]), max(profile.weight_bits("conv")))}  # type: ignore[call-overload]
    expanded = expand_model(small_cnn(), profile=profile, act_bits=8, **settings)  # type: ignore[arg-type]
    path = tmp_path / "rex.onnx"
    onnx.save(expanded.model, str(path))
    builder = get_builder("openvino")
    engine = builder.build(path, profile, tmp_path / "ov")
    summary = builder.precision_summary(engine)  # type: ignore[attr-defined]
    conv = summary.get("Convolution", {})
    assert conv and set(conv) <= {"i8", "u8"}, summary  # no conv fell back to f32
    probes = np.random.default_rng(0).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    got = [builder.run(engine, {"x": x})[0] for x in probes]
    want = [run_exact(expanded.model, x) for x in probes]
    assert_engine_agrees(got, want, int(settings.get("act_order", 1)))  # type: ignore[call-overload]
