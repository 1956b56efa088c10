"""The demo model expanded and built with OpenVINO keeps its accuracy on all 1,797 digits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from reference import assert_engine_agrees, run_exact

from rexdeploy.api import expand_model
from rexdeploy.builders.registry import get_builder
from rexdeploy.demo import demo_model_path, load_digits_inputs
from rexdeploy.graph import load_model, save_model
from rexdeploy.profile import Profile, load_profile

pytestmark = pytest.mark.openvino


def host_f32(**quantization: object) -> Profile:
    """This host's auto profile with its float layers pinned to f32: on AMX CPUs auto is xeon-spr, which
    computes them in bf16 (2^-8 relative steps, far above what the engines are held to here)."""
    host = load_profile("auto")
    return dataclasses.replace(host, quantization=dataclasses.replace(host.quantization, bf16=False, **quantization))


@pytest.mark.parametrize("bits", [8, None])  # None: the host profile's default (7 bits on AVX2-only CPUs)
def test_demo_expanded_int8_keeps_accuracy_on_openvino(tmp_path: Path, bits: int | None) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("sklearn")
    x, labels = load_digits_inputs()
    builder = get_builder("openvino")
    host = host_f32()
    profile = load_profile("x86-avx512") if bits == 8 else host
    fp32_engine = builder.build(demo_model_path(), host, tmp_path / "fp32")
    expanded = expand_model(load_model(demo_model_path()), profile=profile, bits=bits, order=2, act_bits=8)
    path = save_model(expanded.model, tmp_path / "rex.onnx")
    rex_engine = builder.build(path, host, tmp_path / "rex")

    def accuracy(engine: object) -> float:
        logits = np.concatenate([builder.run(engine, {"input": x[i : i + 1]})[0] for i in range(len(x))])  # type: ignore[arg-type]
        return float(np.mean(np.argmax(logits, axis=1) == labels))

    fp32_acc, rex_acc = accuracy(fp32_engine), accuracy(rex_engine)
    assert fp32_acc > 0.98
    assert rex_acc >= fp32_acc - 0.005, (rex_acc, fp32_acc)
    # the conv/gemm layers really ran as integer kernels
    precisions = builder.precision_summary(rex_engine)  # type: ignore[attr-defined]
    assert precisions.get("Convolution", {}).keys() & {"i8", "u8"}, precisions
    if bits is None:  # on the host's own profile OpenVINO computes what the graph says (no int16 overflow)
        got = [builder.run(rex_engine, {"input": x[i : i + 1]})[0] for i in range(64)]
        want = [run_exact(expanded.model, x[i : i + 1], "input") for i in range(64)]
        assert_engine_agrees(got, want, act_order=1)


@pytest.mark.openvino
@pytest.mark.slow
def test_int8_only_profile_builds_a_quantized_engine_even_where_fp32_is_faster(tmp_path: Path) -> None:
    """On an int8-only device (float_activations = false) the FP32 engine is only a baseline: the planner
    quantizes every layer (activation orders allowed) and build never falls back to FP32."""
    pytest.importorskip("openvino")
    from rexdeploy.builders.base import TimingSettings
    from rexdeploy.closedloop import build

    int8_only = host_f32(float_activations=False)  # f32: in bf16 the activation orders' remainders are lost
    report = build(demo_model_path(), int8_only, budget_ms=1000.0, out_dir=tmp_path / "out",
                   timing=TimingSettings(warmup_s=0.05, duration_s=0.2), use_cache=False)  # fmt: skip
    layers = report.plan.layers
    assert len(layers) == 5 and all(lp.act_bits == 8 for lp in layers.values())
    assert any(lp.act_order == 2 for lp in layers.values())  # a generous budget buys the second activation order
    assert report.fidelity.relative_error < 5e-3
