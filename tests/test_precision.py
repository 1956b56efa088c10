"""Precision truth: the engine float precision a plan runs in, its error in the fidelity model, the FP32 pins of the
expansion, the planner's per-precision passes, and the engine self-check against onnxruntime's exact arithmetic.

The bf16 rounding of the fidelity model is checked against an independent numpy emulation of bf16 (round to
nearest even on the top 16 bits of a float32); the self-check runs real engines (onnxruntime, OpenVINO where it
imports) on real ONNX, on any host."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import mobilenet_v2_like, small_cnn

from rexdeploy.analyze import quantizable_layers
from rexdeploy.builders.registry import get_builder
from rexdeploy.costmodel import engine_float_precision, engine_profile, float_precision, needs_fp32
from rexdeploy.errors import PlanError
from rexdeploy.graph import fold_batchnorm, save_model
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.pins import FP32_NODES_KEY, float_precision_of, fp32_nodes, pin_fp32, set_float_precision
from rexdeploy.planner import plan_model
from rexdeploy.planner.fidelity import FLOAT_ROUNDING
from rexdeploy.planner.search import precision_passes, prepare
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import load_profile
from rexdeploy.selfcheck import FLOOR, REDUCED_FLOAT_ALLOWANCE, self_check, tolerance

BF16 = load_profile("x86-avx512-bf16")
F32 = load_profile("x86-avx512")
GPU = load_profile("a100")


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 → nearest bf16 (ties to even) → float32: an independent emulation of bf16 storage."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def test_bf16_emulation_is_bf16() -> None:
    x = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 2.0**-7, 3.14159265, -2.5e-3], dtype=np.float32)
    y = _bf16(x)
    assert y[0] == 1.0 and y[1] == 1.0 and y[2] == 1.0 + 2.0**-7  # a tie rounds to even; 2^-7 is representable
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-8)


def test_engine_float_precision_rules() -> None:
    k1 = Plan(layers={"a": LayerPlan(bits=8, order=1)})
    ao = Plan(layers={"a": LayerPlan(bits=8, order=2, act_order=2)})
    assert not needs_fp32(k1) and needs_fp32(ao)
    assert engine_float_precision(BF16, k1) == "bf16"  # float parts in the device's fast float
    assert engine_float_precision(BF16, ao) == "fp32"  # OpenVINO cannot pin the remainders: the engine is f32
    assert engine_float_precision(F32, k1) == "fp32"
    assert engine_float_precision(GPU, ao) == float_precision(GPU) == "fp16"  # TensorRT pins single layers
    assert engine_float_precision(BF16, dataclasses.replace(k1, float_precision="fp32")) == "fp32"
    assert engine_profile(BF16, ao).quantization.bf16 is False and engine_profile(BF16, k1) is BF16


def test_plan_float_precision_round_trips_and_keeps_old_hashes() -> None:
    plan = Plan(layers={"a": LayerPlan(bits=8, order=1)}, profile="p", model_sha256="s")
    pinned = dataclasses.replace(plan, float_precision="fp32")
    assert Plan.from_json(pinned.to_json()) == pinned and "float_precision" not in plan.to_dict()
    assert pinned.hash != plan.hash and "fp32 engine" in pinned.summary()
    with pytest.raises(PlanError, match="float precision 'fp64' unknown"):
        Plan(layers={}, float_precision="fp64")


def test_pins_metadata_round_trip() -> None:
    model = small_cnn()
    assert fp32_nodes(model) == () and float_precision_of(model) == ""
    pin_fp32(model, ["b", "a"])
    pin_fp32(model, ["a", "c"])
    set_float_precision(model, "bf16")
    assert fp32_nodes(model) == ("a", "b", "c") and float_precision_of(model) == "bf16"
    assert sum(p.key == FP32_NODES_KEY for p in model.metadata_props) == 1
    onnx.checker.check_model(model, full_check=True)


def test_expansion_states_the_engine_precision_and_pins_the_remainders() -> None:
    model = mobilenet_v2_like(width=8, size=16)
    k1 = expand_model(model, profile=BF16, order=1).model
    ao = expand_model(model, profile=BF16, order=2, act_order=2).model
    assert float_precision_of(k1) == "bf16" and fp32_nodes(k1) == ()
    assert float_precision_of(ao) == "fp32"
    pinned = set(fp32_nodes(ao))
    subs = {n.name for n in ao.graph.node if n.op_type == "Sub"}
    assert subs and subs <= pinned  # every remainder x - DQ(Q(x))
    kinds = {n.op_type for n in ao.graph.node if n.name in pinned}
    assert kinds == {"Sub", "QuantizeLinear", "DequantizeLinear"}
    assert float_precision_of(expand_model(model, profile=F32, order=2, act_order=2).model) == "fp32"


def test_bf16_float_error_matches_a_bf16_simulation() -> None:
    """The fidelity model's ε of a float layer computed in bf16 (input, weights, output rounded) against numpy:
    the same conv layer evaluated on bf16-rounded operands, relative output error on the same probes."""
    model = small_cnn(batchnorm=False)
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    prepared = prepare(model, layers)
    errors = prepared.errors
    conv = next(layer for layer in layers if layer.op_type == "Conv")
    w = errors.weights[conv.name].astype(np.float32)
    rng = np.random.default_rng(0)
    # the layer as a matrix product over im2col patches: rows of W against columns of patches; a random input
    # with the measured input RMS is enough to check the rounding arithmetic (the model's ratio term is 1 here)
    cols = rng.standard_normal((w.reshape(w.shape[0], -1).shape[1], 512)).astype(np.float32)
    wm = w.reshape(w.shape[0], -1)
    exact = wm.astype(np.float64) @ cols.astype(np.float64)
    rounded = _bf16((_bf16(wm).astype(np.float64) @ _bf16(cols).astype(np.float64)).astype(np.float32))
    simulated = float(np.linalg.norm(rounded - exact) / np.linalg.norm(exact))
    delta = FLOAT_ROUNDING["bf16"]
    ratio = float(np.linalg.norm(wm) * np.sqrt(np.mean(cols**2)) / (np.sqrt(wm.shape[0]) * np.sqrt(np.mean(exact**2))))
    predicted = delta * np.sqrt(1.0 + 2.0 * ratio**2)
    assert predicted / 2.5 < simulated < predicted * 2.5, (simulated, predicted)
    assert errors.layer_error(conv.name, None, "bf16") > 0.0 == errors.layer_error(conv.name, None, "fp32")
    wo = LayerPlan(bits=8, order=2, act_bits=0)
    assert errors.layer_error(conv.name, wo, "bf16") > errors.layer_error(conv.name, wo, "fp32")


def test_precision_passes() -> None:
    """bf16 OpenVINO: a bf16 engine without activation orders, an f32 engine with them, and an engine with dynamic
    activations; f32 OpenVINO: one pass and the dynamic one; TensorRT: one pass (it pins layers, has no dynamic)."""
    def shape(profile: object) -> list[tuple[bool, int, str, bool | None, bool]]:
        return [(p.quantization.bf16, p.quantization.max_act_order, f, d, p.quantization.dynamic_activations)
                for p, f, d in precision_passes(profile)]  # type: ignore[arg-type]  # fmt: skip

    assert shape(BF16) == [(True, 1, "", None, False), (False, 2, "fp32", None, False), (True, 1, "", True, True)]
    assert shape(F32) == [(False, 2, "", None, False), (False, 1, "", True, True)]
    assert precision_passes(GPU) == [(GPU, "", None)]


def test_bf16_planner_prices_activation_orders_as_f32_engines() -> None:
    model = mobilenet_v2_like(width=8, size=16)
    layers = quantizable_layers(fold_batchnorm(model)[0])
    result = plan_model(model, layers, BF16, 1e9)
    assert result.plan.float_precision == "fp32" or not needs_fp32(result.plan)
    for c in result.candidates:
        if needs_fp32(c.plan):
            assert c.plan.float_precision == "fp32"  # no bf16 engine is planned with activation orders
    float_bf16 = next(c for c in result.candidates if not c.plan.layers and not c.plan.float_precision)
    fp32 = next(c for c in result.candidates if not c.plan.layers and c.plan.float_precision == "fp32")
    assert float_bf16.label == "float (bf16)" and fp32.label == "FP32"
    assert float_bf16.predicted_error > 0.0 == fp32.predicted_error
    assert result.plan_error(float_bf16.plan) == pytest.approx(float_bf16.predicted_error)
    # with an unlimited budget the most accurate plan is exact: the FP32 engine
    assert result.chosen.predicted_error == 0.0


def test_tolerance() -> None:
    assert tolerance(0.0, "fp32") == FLOOR and tolerance(0.2, "fp32") == 0.2
    assert tolerance(0.0, "bf16") == pytest.approx(FLOOR + REDUCED_FLOAT_ALLOWANCE["bf16"])


def _host_f32():  # type: ignore[no-untyped-def]
    """This host's own profile (7-bit weights on AVX2-only CPUs: no int16 overflow) with f32 float layers."""
    return load_profile("auto").with_float_precision("fp32")


def _engine(tmp_path: Path, model: onnx.ModelProto, name: str, backend: str = "onnxruntime"):  # type: ignore[no-untyped-def]
    builder = get_builder(backend)
    if not builder.available():
        pytest.skip(f"{backend} is not installed")
    profile = _host_f32() if backend == "openvino" else dataclasses.replace(F32, engine="onnxruntime")
    path = save_model(model, tmp_path / f"{name}.onnx")
    return builder, builder.build(path, profile, tmp_path / name), path


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.openvino)])
def test_self_check_passes_a_sound_engine_and_catches_a_wrong_one(tmp_path: Path, backend: str) -> None:
    """A real engine of an expanded model agrees with the exact arithmetic of its ONNX; the same engine checked
    against the ONNX of other weights (what a miscompiled engine looks like from outside) does not."""
    profile = _host_f32() if backend == "openvino" else F32
    model = expand_model(small_cnn(), profile=profile, order=2).model
    builder, engine, path = _engine(tmp_path, model, "rex", backend)
    good = self_check(builder, engine, path, 0.0, "fp32")
    assert good.passed and good.relative_error < FLOOR and good.probes == 8
    other = expand_model(small_cnn(seed=3), profile=profile, order=2).model
    wrong_path = save_model(other, tmp_path / "other.onnx")
    bad = self_check(builder, engine, wrong_path, 0.0, "fp32")
    assert not bad.passed and bad.relative_error > 0.1 and "DISAGREES" in bad.text


def test_onnxruntime_keeps_weight_only_layers_exact_and_still_fuses_w8a8(tmp_path: Path) -> None:
    """onnxruntime's Q/DQ fusion would quantize a weight-only layer's float activations dynamically (a K=2 layer
    then errs like K=1): the builder switches that pass off for models with weight-only layers, and only then."""
    import onnxruntime as ort
    from models import transformer_block
    from rexdeploy_onnxruntime import DYNAMIC_QUANT_TRANSFORMER, has_weight_only_layers

    model = transformer_block(hidden=64, seq=8)
    feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)}
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(model.SerializeToString(), exact, providers=["CPUExecutionProvider"])
    want = reference.run(None, feeds)[0]
    weight_only = expand_model(model, profile=F32, order=2, act_bits=0).model
    w8a8 = expand_model(model, profile=F32, order=1).model
    builder, engine, path = _engine(tmp_path, weight_only, "wo")
    assert has_weight_only_layers(path) and engine.options["disabled_optimizers"] == DYNAMIC_QUANT_TRANSFORMER
    got = builder.run(engine, feeds)[0]
    simulated = ort.InferenceSession(path.read_bytes(), exact, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel < 1e-3 and np.allclose(got, simulated, rtol=1e-4, atol=1e-5)  # K=2 weight-only: near exact
    _, int8_engine, int8_path = _engine(tmp_path, w8a8, "w8a8")
    assert not has_weight_only_layers(int8_path) and "disabled_optimizers" not in int8_engine.options


@pytest.mark.parametrize(
    ("flags", "profile", "expect"),
    [
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "x86-avx512", "OpenVINO's default on this CPU is bf16"),
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "x86-avx512-bf16", None),
        ({"avx2", "avx512f", "avx512_vnni"}, "x86-avx512-bf16", "which this CPU lacks (avx512_bf16)"),
        ({"avx2", "avx512f", "avx512_vnni"}, "x86-avx512", None),
        ({"avx2"}, "x86-avx512", "which this CPU lacks (avx512_vnni)"),
    ],
)
def test_host_warnings_name_the_precision_mismatch(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], profile: str, expect: str | None
) -> None:
    from rexdeploy import closedloop, hostcpu

    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hostcpu.platform, "machine", lambda: "x86_64")
    warnings = closedloop.host_warnings(load_profile(profile))
    assert (warnings == []) if expect is None else (len(warnings) == 1 and expect in warnings[0])


@pytest.mark.openvino
def test_dynamic_activations_are_a_plan_choice_the_engine_carries_and_the_error_model_predicts(tmp_path: Path) -> None:
    """A plan with dynamic activations builds an OpenVINO engine that quantizes its weight-only MatMul inputs at run
    time (DYNAMIC_QUANTIZATION_GROUP_SIZE 32, stated in the ONNX metadata and stored with the engine); the error
    model predicts what that costs within a factor 2 of the engine's measured error vs FP32; without it the
    weight-only K=2 engine stays near exact."""
    pytest.importorskip("openvino")
    import onnxruntime as ort
    from models import transformer_block

    from rexdeploy.pins import dynamic_activations_of
    from rexdeploy.plans import default_plan

    model = transformer_block(hidden=64, seq=16)
    layers = quantizable_layers(fold_batchnorm(model)[0])
    errors = prepare(model, layers).errors
    feeds = {model.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 16, 64)).astype(np.float32)}
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), exact, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    builder = get_builder("openvino")
    for dynamic in (False, True):
        plan = dataclasses.replace(default_plan(layers, F32, order=2, act_bits=0), dynamic_activations=dynamic)
        expanded = expand_model(model, plan, profile=F32).model
        assert dynamic_activations_of(expanded) is dynamic
        path = save_model(expanded, tmp_path / f"dyn{dynamic}.onnx")
        engine = builder.build(path, F32, tmp_path / f"engine{dynamic}")
        group = engine.options.get("DYNAMIC_QUANTIZATION_GROUP_SIZE")
        if group is None:
            pytest.skip("this OpenVINO has no DYNAMIC_QUANTIZATION_GROUP_SIZE")
        assert group == ("32" if dynamic else "0")
        got = builder.run(engine, feeds)[0]
        measured = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        predicted = errors.network_error(errors.plan_errors(plan.layers, "fp32", dynamic))
        if dynamic and measured < 1e-3:  # the property was accepted, but this CPU's kernels stayed float
            pytest.skip("OpenVINO did not quantize the activations dynamically on this CPU")
        if dynamic:
            assert predicted / 2 < measured < predicted * 2, (measured, predicted)
            assert self_check(builder, engine, path, predicted, "fp32").passed
        else:
            assert measured < 1e-3 and predicted < 1e-3


def test_fidelity_model_prices_uint8_inputs_at_their_step() -> None:
    """Inputs ≥ 0 are emitted as uint8 on OpenVINO / onnxruntime profiles (twice the codes): the error model, told
    the profile, predicts the expanded graph's error (onnxruntime, exact) within 1.5×; priced as int8 it was 2×."""
    import onnxruntime as ort

    from rexdeploy.plans import default_plan
    from rexdeploy.probes import NATURAL, family_inputs

    model = small_cnn()
    layers = quantizable_layers(fold_batchnorm(model)[0])
    as_int8, as_engine = prepare(model, layers), prepare(model, layers, profile=F32)
    assert as_engine.errors.unsigned_inputs and not as_int8.errors.unsigned_inputs
    assert prepare(model, layers, profile=GPU).errors.unsigned_inputs == frozenset()  # TensorRT runs int8 only
    feeds = family_inputs(model, NATURAL, 32, seed=3)  # the kind of input the planner's error model probes images with
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), exact, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, feeds)[0])

    plan = default_plan(layers, F32, order=1)
    want = run(model)
    got = run(expand_model(model, plan, profile=F32).model)
    measured = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    predicted = as_engine.errors.network_error(as_engine.errors.plan_errors(plan.layers))
    assert measured / 1.5 < predicted < measured * 1.5, (predicted, measured)
    assert predicted < as_int8.errors.network_error(as_int8.errors.plan_errors(plan.layers))
