"""The TensorRT builder plugin: pure settings / trtexec command / Q/DQ lint everywhere, and one real
build-and-time test that runs wherever ``tensorrt`` imports and a CUDA GPU is visible."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import threading
import tomllib
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_tensorrt import (
    NetLayer,
    ShapeRange,
    TensorRTBuilder,
    TrtBuildSettings,
    engine_from_plan,
    layer_precisions,
    layers_to_pin,
    lint_qdq,
    precision_summary,
    select_settings,
    trt_logger,
    trtexec_command,
)
from rexdeploy_tensorrt import qdq_lint as ql
from rexdeploy_tensorrt import settings as trt_settings
from rexdeploy_tensorrt.cuda_device import PINS, cuda_mismatch, installed_cuda_majors
from rexdeploy_tensorrt.engine_info import precision_of
from rexdeploy_tensorrt.precision_pins import unmatched_pins
from rexdeploy_tensorrt.timing import timed_loop
from rexdeploy_tensorrt.trt_logger import LogSink

from rexdeploy import costmodel
from rexdeploy.builders.base import Builder, TimingSettings
from rexdeploy.errors import BuildError, EngineUnavailableError, InputError
from rexdeploy.pins import pin_fp32
from rexdeploy.profile import Profile, load_profile

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------------------------------------
# inline models


def qdq_conv(
    *,
    cin: int = 4,
    cout: int = 8,
    k: int = 3,
    hw: int = 8,
    batch: int | str = "N",
    act_scale: float = 0.05,
    act_zero_point: int = 0,
    weight_axis: int = 0,
    weight_scale_on_cin: bool = False,
    weight_dq: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """x → Q(int8, per-tensor) → DQ → Conv(W = DQ(int8 per output channel), bias) → y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) * 0.1).astype(np.float32)
    reduce_axes = (1, 2, 3) if not weight_scale_on_cin else (0, 2, 3)
    w_scale = (np.abs(w).max(axis=reduce_axes) / 127.0).astype(np.float32)
    bcast = w_scale.reshape(-1, 1, 1, 1) if not weight_scale_on_cin else w_scale.reshape(1, -1, 1, 1)
    w_q = np.clip(np.rint(w / bcast), -127, 127).astype(np.int8)
    bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(act_scale, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(act_zero_point, dtype=np.int8), "x_zp"),
        numpy_helper.from_array(bias, "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
    ]
    if weight_dq:
        inits += [
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp"),
        ]
        nodes.append(
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=weight_axis)
        )
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, hw, hw])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
    return m


def qdq_gemm(trans_b: int, axis: int) -> onnx.ModelProto:
    """x[1,16] → Q/DQ → Gemm(B = DQ(int8, per-channel on ``axis``), transB) → y[1,8]."""
    k, n = 16, 8
    shape = (n, k) if trans_b else (k, n)
    w_q = np.arange(k * n, dtype=np.int64).reshape(shape) % 100 - 50
    nscale = shape[axis]
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
        numpy_helper.from_array(w_q.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(nscale, 0.01, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(nscale, np.int8), "zw"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], name="dq_w", axis=axis),
        helper.make_node("Gemm", ["xd", "w"], ["y"], name="gemm", transB=trans_b),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def int4_matmul(block_size: int | None) -> onnx.ModelProto:
    """x[2,64] @ DQ(int4 weight [64,16]) — blocked along K when ``block_size`` is given (opset 21)."""
    k, n = 64, 16
    w_q = (np.arange(k * n).reshape(k, n) % 15 - 7).astype(np.int8)
    if block_size:
        scale = np.full((k // block_size, n), 0.02, np.float32)
        dq = helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"], name="dq_w4", axis=0, block_size=block_size)
    else:
        scale = np.full((n,), 0.02, np.float32)
        dq = helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"], name="dq_w4", axis=1)
    wq = helper.make_tensor("wq", TensorProto.INT4, [k, n], w_q.ravel().tolist())
    graph = helper.make_graph(
        [dq, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [wq, numpy_helper.from_array(scale, "sw")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _profile(name: str, **quant: Any) -> Profile:
    base = load_profile(name)
    return replace(base, quantization=replace(base.quantization, **quant))


def rules(findings: list[ql.Finding]) -> set[tuple[str, str]]:
    return {(f.node, f.rule) for f in findings}


# ---------------------------------------------------------------------------------------------
# Q/DQ lint


def test_fixture_is_valid_onnx_and_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    model = qdq_conv()
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((2, 4, 8, 8), np.float32)})
    assert y.shape == (2, 8, 8, 8)


def test_good_qdq_conv_has_no_findings() -> None:
    assert lint_qdq(qdq_conv()) == []


def test_nonzero_zero_point_is_found_on_q_and_dq() -> None:
    findings = lint_qdq(qdq_conv(act_zero_point=3))
    assert {("q_x", ql.ZERO_POINT_NONZERO), ("dq_x", ql.ZERO_POINT_NONZERO)} <= rules(findings)
    f = next(f for f in findings if f.rule == ql.ZERO_POINT_NONZERO)
    assert f.severity == "error" and "zero-point 0" in f.message and "symmetric" in f.message


def test_per_channel_weight_scale_on_input_channel_axis_is_found() -> None:
    findings = lint_qdq(qdq_conv(weight_axis=1, weight_scale_on_cin=True))
    assert rules(findings) == {("dq_w", ql.WEIGHT_AXIS)}
    assert "axis=0" in findings[0].message and "Conv 'conv'" in findings[0].message


def test_per_channel_scale_of_wrong_size_is_found() -> None:
    model = _set_init(qdq_conv(), "w_scale", np.full(3, 0.01, np.float32))
    model = _set_init(model, "w_zp", np.zeros(3, np.int8))
    assert ("dq_w", ql.WEIGHT_SCALE_SIZE) in rules(lint_qdq(model))


def test_missing_dq_on_weights_is_found() -> None:
    findings = lint_qdq(qdq_conv(weight_dq=False))
    assert rules(findings) == {("conv", ql.WEIGHT_NOT_QUANTIZED)}
    assert "DequantizeLinear on the weight" in findings[0].message


def test_negative_and_nonfinite_scales_are_found() -> None:
    findings = lint_qdq(qdq_conv(act_scale=-0.05))
    assert {("q_x", ql.SCALE_NOT_POSITIVE), ("dq_x", ql.SCALE_NOT_POSITIVE)} <= rules(findings)
    scales = np.full(8, 0.01, np.float32)
    scales[2] = np.inf
    assert ("dq_w", ql.SCALE_NOT_POSITIVE) in rules(lint_qdq(_set_init(qdq_conv(), "w_scale", scales)))


def test_scale_computed_at_run_time_is_found() -> None:
    model = qdq_conv()
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    model.graph.node[0].input[1] = "s"
    assert ("q_x", ql.SCALE_NOT_CONSTANT) in rules(lint_qdq(model))


def test_per_channel_activation_scale_is_found() -> None:
    model = _set_init(qdq_conv(), "x_scale", np.full(4, 0.05, np.float32))
    model = _set_init(model, "x_zp", np.zeros(4, np.int8))
    assert ("q_x", ql.ACTIVATION_PER_CHANNEL) in rules(lint_qdq(model))


def test_uint8_zero_point_and_missing_zero_point() -> None:
    model = _set_init(qdq_conv(), "x_zp", np.array(0, np.uint8))
    assert ("q_x", ql.ZERO_POINT_DTYPE) in rules(lint_qdq(model))
    model = qdq_conv()
    for node in model.graph.node[:2]:
        del node.input[2]
    found = lint_qdq(model)
    assert rules(found) == {("q_x", ql.ZERO_POINT_MISSING)}
    assert found[0].severity == "warning"


def test_weight_value_minus_128_is_a_warning() -> None:
    w_q = np.ones((8, 4, 3, 3), np.int8)
    w_q[0, 0, 0, 0] = -128
    found = lint_qdq(_set_init(qdq_conv(), "w_q", w_q))
    assert rules(found) == {("dq_w", ql.WEIGHT_INT8_RANGE)}
    assert found[0].severity == "warning" and "[-127, 127]" in found[0].message


def test_activation_not_from_quantize_is_found() -> None:
    model = qdq_conv()
    model.graph.node[1].input[0] = "x"  # DQ(x) with no Q before it (x is float)
    del model.graph.node[0]
    assert ("conv", ql.ACTIVATION_NOT_QUANTIZED) in rules(lint_qdq(model))


@pytest.mark.parametrize(("trans_b", "axis", "ok"), [(0, 1, True), (0, 0, False), (1, 0, True), (1, 1, False)])
def test_gemm_weight_axis_follows_trans_b(trans_b: int, axis: int, ok: bool) -> None:
    found = lint_qdq(qdq_gemm(trans_b, axis))
    assert (found == []) == ok
    if not ok:
        assert rules(found) == {("dq_w", ql.WEIGHT_AXIS)}


def test_int4_weights_need_block_quantization() -> None:
    assert lint_qdq(int4_matmul(block_size=32), int4_block_sizes=(32, 64)) == []
    assert rules(lint_qdq(int4_matmul(block_size=None))) == {("dq_w4", ql.INT4_NOT_BLOCKED)}
    assert rules(lint_qdq(int4_matmul(block_size=16), int4_block_sizes=(64, 128))) == {("dq_w4", ql.INT4_BLOCK_SIZE)}


def test_lint_and_settings_work_without_loading_external_weights(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(
        qdq_conv(cin=16, cout=32),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    light = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)
    assert lint_qdq(light) == []
    assert select_settings(load_profile("a100"), path, (8, 0)).int8


def test_finding_prints_on_one_line() -> None:
    (f,) = lint_qdq(qdq_conv(weight_dq=False))
    assert "\n" not in str(f) and str(f).startswith("warning: conv: [weight-not-quantized]")


# ---------------------------------------------------------------------------------------------
# settings selection


def test_h100_on_sm90_allows_fp8_and_a_single_model_gets_no_aux_streams() -> None:
    s = select_settings(load_profile("h100"), qdq_conv(), (9, 0))
    # h100 allows fp16 and bf16: the float precision is fp16 (the cost model's), so bf16 is not set
    assert (s.float_precision, s.fp16, s.bf16, s.int8, s.fp8, s.int4) == ("fp16", True, False, True, True, True)
    # not an ensemble: no auxiliary streams (tests/test_tensorrt_aux_streams.py has the ensembles)
    assert s.max_aux_streams == 0 and s.predictors == 1
    # float32 graph + fp16 profile: weakly typed so TensorRT may run the float layers in fp16
    assert not s.strongly_typed and "float32" in s.typing_reason
    # FP8 / INT4 are allowed but come only from Q/DQ types the model holds (int8 here); TF32 never
    assert s.builder_flags() == ("FP16", "INT8") and not s.tf32
    assert s.quantized_types == ("int8",) and s.compute_capability == (9, 0)


def test_a100_and_orin_flags_and_streams() -> None:
    a100 = select_settings(load_profile("a100"), qdq_conv(), (8, 0))
    assert not a100.fp8 and a100.int4 and a100.builder_flags() == ("FP16", "INT8")
    assert a100.max_aux_streams == 0
    orin = select_settings(load_profile("orin"), qdq_conv(), (8, 7))
    assert not orin.fp8 and orin.max_aux_streams == 0


def test_fp8_on_sm80_is_a_build_error_saying_what_is_needed() -> None:
    with pytest.raises(BuildError, match=r"SM 8\.0; FP8 needs SM 8\.9 or newer.*fp8 = false"):
        select_settings(_profile("a100", fp8=True), qdq_conv(), (8, 0))
    with pytest.raises(BuildError, match=r"FP8 needs SM 8\.9"):
        select_settings(load_profile("h100"), qdq_conv(), (8, 6))


def test_unknown_capability_trusts_the_profile() -> None:
    assert select_settings(load_profile("h100"), qdq_conv(), None).fp8


def test_bf16_needs_ampere_only_where_bf16_is_the_float_precision() -> None:
    bf16_only = _profile("a100", fp16=False)
    with pytest.raises(BuildError, match=r"runs float layers in bf16 .*BF16 needs SM 8\.0"):
        select_settings(bf16_only, qdq_conv(), (7, 5))
    s = select_settings(bf16_only, qdq_conv(), (8, 0))
    assert s.float_precision == "bf16" and s.bf16 and not s.fp16 and s.builder_flags() == ("BF16", "INT8")
    # a100 allows bf16 too, but its float precision is fp16: an SM 7.5 GPU can build it
    s = select_settings(load_profile("a100"), qdq_conv(), (7, 5))
    assert not s.bf16 and s.builder_flags() == ("FP16", "INT8")


def test_int4_only_with_int4_weight_only_profile() -> None:
    assert not select_settings(_profile("a100", int4_weight_only=False), qdq_conv(), (8, 0)).int4
    with pytest.raises(BuildError, match="int4_weight_only = true"):
        select_settings(_profile("a100", int4_weight_only=False), int4_matmul(32), (8, 0))
    s = select_settings(load_profile("a100"), int4_matmul(32), (8, 0))
    assert s.int4 and "int4" in s.quantized_types and s.builder_flags() == ("FP16", "INT4")


def test_strongly_typed_when_the_graph_fixes_the_precision() -> None:
    s = select_settings(_profile("a100", fp16=False, bf16=False), qdq_conv(), (8, 0))
    assert s.strongly_typed and s.builder_flags() == () and s.int8


def test_strongly_typed_for_a_float16_graph_with_fp16_profile() -> None:
    model = qdq_conv()
    model.graph.node.append(helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y16", TensorProto.FLOAT16, ["N", 8, 8, 8]))
    s = select_settings(load_profile("a100"), model, (8, 0))
    assert s.strongly_typed and "float16" in s.typing_reason and s.builder_flags() == ()


def _untyped_model() -> onnx.ModelProto:
    model = qdq_conv()
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.UNDEFINED, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_untyped_model_falls_back_to_weak_typing_or_fails_when_strong_is_asked() -> None:
    s = select_settings(_profile("a100", fp16=False, bf16=False), _untyped_model(), (8, 0))
    assert not s.strongly_typed and "no inferred type" in s.typing_reason
    with pytest.raises(BuildError, match="typing='strong' needs a fully typed ONNX"):
        select_settings(load_profile("a100"), _untyped_model(), (8, 0), typing="strong")
    weak = select_settings(_profile("a100", fp16=False, bf16=False), qdq_conv(), (8, 0), typing="weak")
    assert not weak.strongly_typed and weak.builder_flags() == ("INT8",)


def test_dynamic_batch_becomes_one_one_max_batch() -> None:
    s = select_settings(load_profile("a100"), qdq_conv(), (8, 0), max_batch=16)
    assert s.shapes == (ShapeRange("x", (1, 4, 8, 8), (1, 4, 8, 8), (16, 4, 8, 8)),)
    assert s.dynamic
    static = select_settings(load_profile("a100"), qdq_conv(batch=2), (8, 0))
    assert static.shapes == (ShapeRange("x", (2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)),)
    assert not static.dynamic


def test_dynamic_non_batch_dimension_needs_input_shapes() -> None:
    model = qdq_conv()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(BuildError, match=r"dynamic dimension\(s\) \[2\].*input_shapes=\{'x': \(N, \.\.\.\)\}"):
        select_settings(load_profile("a100"), model, (8, 0))
    s = select_settings(load_profile("a100"), model, (8, 0), input_shapes={"x": (1, 4, 8, 8)}, max_batch=2)
    assert s.shapes[0].max == (2, 4, 8, 8)
    with pytest.raises(BuildError, match="unknown input"):
        select_settings(load_profile("a100"), qdq_conv(), (8, 0), input_shapes={"nope": (1,)})


def test_bad_arguments_and_profiles() -> None:
    with pytest.raises(BuildError, match="targets openvino, not TensorRT"):
        select_settings(load_profile("x86-avx512"), qdq_conv(), None)
    with pytest.raises(BuildError, match=r"0\.\.5"):
        select_settings(load_profile("a100"), qdq_conv(), None, builder_optimization_level=7)
    with pytest.raises(BuildError, match="typing"):
        select_settings(load_profile("a100"), qdq_conv(), None, typing="loose")
    with pytest.raises(BuildError, match="not a CUDA device"):
        select_settings(replace(load_profile("a100"), device="cpu"), qdq_conv(), None)


def test_unsigned_and_fp8_models_are_rejected_by_profile() -> None:
    uint8 = _set_init(qdq_conv(), "x_zp", np.array(0, np.uint8))
    with pytest.raises(BuildError, match="signed, symmetric"):
        select_settings(load_profile("a100"), uint8, (8, 0))
    fp8 = qdq_conv()
    for i, t in enumerate(fp8.graph.initializer):
        if t.name == "x_zp":
            fp8.graph.initializer[i].CopyFrom(helper.make_tensor("x_zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    with pytest.raises(BuildError, match="FP8 Q/DQ"):
        select_settings(load_profile("a100"), fp8, (8, 0))
    h100 = select_settings(load_profile("h100"), fp8, (9, 0))
    assert h100.quantized_types == ("fp8", "int8") and "FP8" in h100.builder_flags()
    assert "--fp8" in _args(trtexec_command("m.onnx", h100))


def test_model_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(qdq_conv(), path)
    assert select_settings(load_profile("a100"), path, (8, 0)).int8
    with pytest.raises(Exception, match="not found"):
        select_settings(load_profile("a100"), tmp_path / "missing.onnx", None)


@pytest.mark.parametrize("name", ["a100", "h100", "orin"])
def test_settings_json_round_trip(name: str, tmp_path: Path) -> None:
    cc = {"a100": (8, 0), "h100": (9, 0), "orin": (8, 7)}[name]
    s = select_settings(
        load_profile(name),
        qdq_conv(),
        cc,
        workspace_mib=512,
        timing_cache=tmp_path / "t.cache",
        use_cuda_graph=True,
    )
    again = TrtBuildSettings.from_json(s.to_json())
    assert again == s
    assert json.loads(s.to_json())["shapes"][0]["max"] == [8, 4, 8, 8]
    none_cc = select_settings(load_profile(name), qdq_conv(batch=1), None)
    assert TrtBuildSettings.from_dict(json.loads(none_cc.to_json())) == none_cc


def float_conv(batch: int | str = 1, seed: int = 0, cin: int = 4, cout: int = 8, hw: int = 8) -> onnx.ModelProto:
    """x → Conv(float32 weights, bias) → y: a model with no Q/DQ (what the FP32 reference builds)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "float_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, hw, hw])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _variant(profile: Profile, precision: str) -> Profile:
    """The profile variant the core builds a float baseline with: only ``precision``'s flag (none for fp32)."""
    q = replace(profile.quantization, fp16=precision == "fp16", bf16=precision == "bf16")
    return replace(profile, quantization=q)


@pytest.mark.parametrize("name", ["a100", "h100", "orin"])
def test_float_precision_follows_the_profile_and_the_cost_model(name: str) -> None:
    for variant, want in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")):
        profile = _variant(load_profile(name), variant)
        for model in (float_conv(), qdq_conv()):
            s = select_settings(profile, model, (9, 0))
            assert s.float_precision == want == trt_settings.float_precision(profile)
            assert (s.fp16, s.bf16, s.tf32) == (want == "fp16", want == "bf16", False)
            if want != "bf16":  # the cost model has no TensorRT bf16 (yet): it prices bf16-only profiles as fp32
                assert s.float_precision == costmodel.float_precision(profile)
    # the profile as shipped allows both: fp16, as the cost model says
    assert select_settings(load_profile(name), float_conv(), None).float_precision == "fp16"


def test_the_fp32_reference_sets_no_reduced_precision_flag() -> None:
    fp32 = _variant(load_profile("h100"), "fp32")
    ref = select_settings(fp32, float_conv(), (9, 0))
    # a float32 graph with an fp32 float precision: strongly typed, no flag at all, TF32 cleared
    assert ref.strongly_typed and ref.builder_flags() == () and not ref.tf32
    args = _args(trtexec_command("m.onnx", ref))
    assert "--stronglyTyped" in args and "--noTF32" in args
    assert not {"--fp16", "--bf16", "--int8"} & set(args)
    weak = select_settings(fp32, float_conv(), (9, 0), typing="weak")
    assert weak.builder_flags() == () and "--noTF32" in _args(trtexec_command("m.onnx", weak))
    q = select_settings(fp32, qdq_conv(), (9, 0), typing="weak")
    assert q.builder_flags() == ("INT8",)
    # the default float engine (fp16 on a GPU) is its own build, with the one flag
    default = select_settings(_variant(load_profile("h100"), "fp16"), float_conv(), (9, 0))
    assert not default.strongly_typed and default.builder_flags() == ("FP16",)


def test_default_float_precision_is_pure_and_follows_the_profile() -> None:
    builder = TensorRTBuilder()
    assert builder.default_float_precision(load_profile("a100")) == "fp16"
    assert builder.default_float_precision(_profile("a100", fp16=False)) == "bf16"
    assert builder.default_float_precision(_profile("a100", fp16=False, bf16=False)) == "fp32"
    # the core builds the default float baseline with the variant that has only that flag
    for profile in (load_profile("a100"), _profile("orin", fp16=False)):
        default = builder.default_float_precision(profile)
        assert select_settings(_variant(profile, default), qdq_conv(), (8, 7)).float_precision == default


def test_settings_written_before_float_precision_read_back() -> None:
    s = select_settings(load_profile("a100"), qdq_conv(), (8, 0))
    raw = s.to_dict()
    for key in ("float_precision", "tf32", "fp32_pins"):
        raw.pop(key)
    raw["bf16"] = True  # old engine.json: both flags set, TensorRT's TF32 default on
    old = TrtBuildSettings.from_dict(raw)
    assert old.float_precision == "fp16" and old.tf32 and old.fp32_pins == ()


def test_tensorrt_version_floor_for_int4_and_weak_typing() -> None:
    assert trt_settings.parse_version("10.13.0.35") == (10, 13)
    assert trt_settings.parse_version("10.1.0") == (10, 1) and trt_settings.parse_version("11") == (11, 0)
    int4 = select_settings(load_profile("a100"), int4_matmul(32), (8, 0))
    with pytest.raises(BuildError, match=r"int4 weights, which need TensorRT 10\.1 .*this is TensorRT 10\.0\.1\.6"):
        trt_settings.check_tensorrt_version("10.0.1.6", int4)
    trt_settings.check_tensorrt_version("10.1.0.27", int4)
    trt_settings.check_tensorrt_version("10.0.1.6", select_settings(load_profile("a100"), qdq_conv(), (8, 0)))
    with pytest.raises(BuildError, match="strongly typed networks only"):
        trt_settings.check_tensorrt_version("11.0.0", int4)
    with pytest.raises(BuildError, match=r"--int4 needs TensorRT 10\.1 .*target has 10\.0"):
        trtexec_command("m.onnx", int4, tensorrt_version="10.0")
    assert "--int4" in _args(trtexec_command("m.onnx", int4, tensorrt_version="10.1.0"))


# ---------------------------------------------------------------------------------------------
# FP32 pins


def _pinned(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return pin_fp32(m, names)


# A network as TensorRT's ONNX parser names it (ImporterContext::registerLayer): a node's first layer
# carries its name, further ones <name>_<global counter>; metadata "[ONNX Layer: <name>]".
NETWORK = [
    NetLayer("q_x", "[ONNX Layer: q_x]", "QUANTIZE", (False,)),
    NetLayer("dq_x", "[ONNX Layer: dq_x]", "DEQUANTIZE", (True,)),
    NetLayer("rem", "[ONNX Layer: rem]", "ELEMENTWISE", (True,)),
    NetLayer("rem_7", "[ONNX Layer: rem]", "SHUFFLE", (True,)),  # a further layer of node "rem"
    NetLayer("rem_8", "", "ELEMENTWISE", (True,)),  # no metadata: by name, not an ONNX node's own name
    NetLayer("rem_2", "[ONNX Layer: rem_2]", "ELEMENTWISE", (True,)),  # another node, named like a suffix
    NetLayer("rem_c", "[ONNX Layer: rem]", "CONSTANT", (True,)),  # constants are never constrained
    NetLayer("shape_of_rem", "[ONNX Layer: rem]", "SHAPE", (False,)),
    NetLayer("mixed", "[ONNX Layer: f_add | Local Function: LayerNorm]", "ELEMENTWISE", (True, False)),
    NetLayer("add", "[ONNX Layer: other]", "ELEMENTWISE", (True,)),  # name equals a pin, metadata says other
    NetLayer("ONNXTRT_helper", "", "CAST", (True,)),
    NetLayer("conv", "[ONNX Layer: conv]", "CONVOLUTION", (True,)),
]
ONNX_NODES = {"q_x", "dq_x", "rem", "rem_2", "f_add", "other", "conv", "add"}


def test_layers_to_pin_follow_the_parser_names_and_metadata() -> None:
    pins = layers_to_pin(NETWORK, {"q_x", "dq_x", "rem", "f_add", "add"}, ONNX_NODES)
    got = {(p.name, p.node, p.precision, p.outputs) for p in pins}
    assert got == {
        ("q_x", "q_x", True, ()),  # a Quantize layer computes in float; its int8 output is left alone
        ("dq_x", "dq_x", False, (0,)),  # a Dequantize layer's precision is its int8 input: output type only
        ("rem", "rem", True, (0,)),
        ("rem_7", "rem", True, (0,)),
        ("rem_8", "rem", True, (0,)),
        ("mixed", "f_add", True, (0,)),  # only the float output; local-function metadata read
    }
    assert [p.index for p in pins] == sorted(p.index for p in pins)
    assert unmatched_pins({"q_x", "dq_x", "rem", "f_add", "add", "gone"}, pins) == ["add", "gone"]
    assert layers_to_pin(NETWORK, set(), ONNX_NODES) == []
    assert {p.name for p in layers_to_pin(NETWORK, {"rem_2"}, ONNX_NODES)} == {"rem_2"}


def test_pins_constrain_a_reduced_precision_weak_build() -> None:
    model = _pinned(qdq_conv(), "conv", "dq_x", "q_x")
    s = select_settings(load_profile("a100"), model, (8, 0))
    assert s.fp32_pins == (("conv", "Conv"), ("dq_x", "DequantizeLinear"), ("q_x", "QuantizeLinear"))
    assert s.pins_apply and s.builder_flags() == ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")
    assert TrtBuildSettings.from_json(s.to_json()) == s
    args = _args(trtexec_command("m.onnx", s))
    assert {"--fp16", "--int8", "--noTF32", "--precisionConstraints=obey"} <= set(args)
    assert "--obey_precision_constraints" not in args
    assert "--layerPrecisions=conv:fp32,q_x:fp32" in args  # a DQ layer's precision is its int8 input
    assert "--layerOutputTypes=conv:fp32,dq_x:fp32" in args  # a Q layer's output is int8
    # an fp32 engine needs no constraint: every float layer is FP32 already
    fp32 = select_settings(_variant(load_profile("a100"), "fp32"), model, (8, 0), typing="weak")
    assert fp32.fp32_pins and not fp32.pins_apply and fp32.builder_flags() == ("INT8",)
    assert not any(
        a.startswith(("--precisionConstraints", "--layerPrecisions")) for a in _args(trtexec_command("m.onnx", fp32))
    )


def test_pins_must_name_graph_nodes_and_fit_a_strongly_typed_graph() -> None:
    with pytest.raises(BuildError, match=r"pins 1 node\(s\) the graph does not have \(e\.g\. renamed\)"):
        select_settings(load_profile("a100"), _pinned(qdq_conv(), "conv", "renamed"), (8, 0))
    half = qdq_conv()
    half.graph.node.append(helper.make_node("Cast", ["y"], ["y16"], name="to_half", to=TensorProto.FLOAT16))
    half.graph.output[0].CopyFrom(helper.make_tensor_value_info("y16", TensorProto.FLOAT16, ["N", 8, 8, 8]))
    with pytest.raises(BuildError, match=r"pinned to FP32 compute in float16/bfloat16 .*to_half"):
        select_settings(load_profile("a100"), _pinned(half, "to_half"), (8, 0))
    strong = select_settings(load_profile("a100"), _pinned(half, "conv"), (8, 0))  # conv stays float32
    assert strong.strongly_typed and strong.fp32_pins == (("conv", "Conv"),) and not strong.pins_apply


# ---------------------------------------------------------------------------------------------
# trtexec command


def _args(cmd: str) -> list[str]:
    return shlex.split(cmd)


def test_trtexec_command_for_weakly_typed_dynamic_build(tmp_path: Path) -> None:
    s = select_settings(load_profile("h100"), qdq_conv(), (9, 0), workspace_mib=1024)
    cmd = trtexec_command(tmp_path / "my model.onnx", s, engine_path=tmp_path / "out" / "m.plan")
    args = _args(cmd)
    assert args[0] == "trtexec"
    assert f"--onnx={tmp_path / 'my model.onnx'}" in args
    assert f"--saveEngine={tmp_path / 'out' / 'm.plan'}" in args
    for flag in ("--fp16", "--int8", "--noTF32"):
        assert flag in args
    assert not {"--stronglyTyped", "--bf16", "--fp8", "--int4", "--precisionConstraints=obey"} & set(args)
    assert "--maxAuxStreams=0" in args and "--builderOptimizationLevel=3" in args
    assert "--memPoolSize=workspace:1024" in args
    assert f"--timingCacheFile={tmp_path / 'out' / 'timing.cache'}" in args
    assert "--minShapes=x:1x4x8x8" in args and "--optShapes=x:1x4x8x8" in args
    assert "--maxShapes=x:8x4x8x8" in args
    assert "--profilingVerbosity=detailed" in args and "--skipInference" in args


def test_trtexec_command_strongly_typed_static_with_timing() -> None:
    s = select_settings(_profile("orin", fp16=False, bf16=False), qdq_conv(batch=1), (8, 7), use_cuda_graph=True)
    timing = TimingSettings(warmup_s=0.5, duration_s=2.5, min_runs=50)
    args = _args(trtexec_command("model.onnx", s, timing=timing))
    assert "--stronglyTyped" in args and not {"--fp16", "--int8", "--bf16"} & set(args)
    assert "--saveEngine=model.plan" in args and "--timingCacheFile=timing.cache" in args
    assert not any(a.startswith(("--minShapes", "--shapes")) for a in args)
    assert "--maxAuxStreams=0" in args
    assert {"--warmUp=500", "--duration=3", "--iterations=50", "--noDataTransfers", "--useCudaGraph"} <= set(args)
    assert "--skipInference" not in args


def test_trtexec_command_timing_batch_and_fixed_runs() -> None:
    s = select_settings(load_profile("a100"), qdq_conv(), (8, 0), timing_cache="/caches/a100.cache")
    args = _args(trtexec_command("m.onnx", s, timing=TimingSettings(batch=4, runs=200)))
    assert "--shapes=x:4x4x8x8" in args and "--iterations=200" in args and "--duration=0" in args
    assert "--timingCacheFile=/caches/a100.cache" in args and "--useCudaGraph" not in args


def test_trtexec_quotes_input_names_with_colons() -> None:
    s = TrtBuildSettings(
        profile_name="p",
        device="cuda:0",
        strongly_typed=True,
        typing_reason="",
        fp16=False,
        bf16=False,
        int8=True,
        fp8=False,
        int4=False,
        max_aux_streams=0,
        shapes=(ShapeRange("input:0", (1, 3), (1, 3), (4, 3)),),
    )
    args = _args(trtexec_command("m.onnx", s))
    assert "--maxShapes='input:0':4x3" in args and "--maxAuxStreams=0" in args


def test_trtexec_refuses_names_it_cannot_parse() -> None:
    base = select_settings(load_profile("a100"), qdq_conv(batch=1), (8, 0))
    comma = replace(base, shapes=(ShapeRange("a,b", (1, 3), (1, 3), (4, 3)),))
    with pytest.raises(BuildError, match=r"input name 'a,b' holds ','.*rename it in the ONNX"):
        trtexec_command("m.onnx", comma)
    quote = replace(base, shapes=(ShapeRange("it's", (1, 3), (1, 3), (4, 3)),))
    with pytest.raises(BuildError, match='holds "\'"'):
        trtexec_command("m.onnx", quote)
    pinned = select_settings(load_profile("a100"), _pinned(qdq_conv(batch=1), "conv"), (8, 0))
    star = replace(pinned, fp32_pins=(("blk*1", "Add"),))
    with pytest.raises(BuildError, match=r"node name 'blk\*1' holds '\*'"):
        trtexec_command("m.onnx", star)
    colon = replace(pinned, fp32_pins=(("enc:add", "Add"),))
    assert "--layerPrecisions='enc:add':fp32" in _args(trtexec_command("m.onnx", colon))


# ---------------------------------------------------------------------------------------------
# engine inspector JSON, timing loop


INSPECTOR_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "q_x",
                "LayerType": "Scale",
                "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}],
                "Outputs": [
                    {"Name": "x_q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}
                ],
            },
            {
                "Name": "conv",
                "LayerType": "CaskConvolution",
                "Inputs": [{"Name": "x_q", "Format/Datatype": "Channel major Int8 format"}],
                "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}],
                "Weights": {"Type": "Int8", "Count": 288},
            },
            {"Name": "cast", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "BFloat16"}]},
            {"Name": "dyn", "LayerType": "NoOp", "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]},
        ],
        "Bindings": ["x", "y"],
    }
)


def test_layer_precisions_from_inspector_json() -> None:
    assert layer_precisions(INSPECTOR_JSON) == {"q_x": "fp32", "conv": "int8", "cast": "bf16", "dyn": "unknown"}
    assert layer_precisions(json.dumps({"Layers": ["a + b", "c"], "Bindings": []})) == {
        "a + b": "unknown",
        "c": "unknown",
    }
    assert layer_precisions("not json") == {}
    assert [precision_of(t) for t in ("Half", "Float", "FP8", "Int4", "Int32")] == [
        "fp16",
        "fp32",
        "fp8",
        "int4",
        "int32",
    ]


# Inspector JSON as TensorRT 10 writes it with ProfilingVerbosity.DETAILED (Engine Inspector docs: Name,
# LayerType, Inputs/Outputs with "Format/Datatype", Weights/Bias, Metadata, TacticName).
DETAILED_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "q_x",
                "LayerType": "Scale",
                "Inputs": [
                    {
                        "Name": "x",
                        "Location": "Device",
                        "Dimensions": [1, 4, 8, 8],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "x_q",
                        "Location": "Device",
                        "Dimensions": [1, 4, 8, 8],
                        "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format",
                    }
                ],
                "Metadata": "[ONNX Layer: q_x]",
            },
            {
                "Name": "dq_x + conv",
                "LayerType": "CaskConvolution",
                "Inputs": [
                    {"Name": "x_q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}
                ],
                "Outputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
                "Weights": {"Type": "Int8", "Count": 288},
                "Bias": {"Type": "Float", "Count": 8},
                "Metadata": "[ONNX Layer: dq_x]\x1e[ONNX Layer: conv]",
                "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32",
            },
            {
                "Name": "rem",
                "LayerType": "PointWiseV2",
                "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}],
                "Outputs": [{"Name": "r", "Format/Datatype": "Row major linear FP32"}],
                "Metadata": "[ONNX Layer: rem]",
            },
            {
                "Name": "add",
                "LayerType": "PointWiseV2",
                "Inputs": [{"Name": "r", "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP16 format"}],
            },
            {
                "Name": "Reformatting CopyNode for Output Tensor 0 to add",
                "LayerType": "Reformat",
                "Inputs": [{"Name": "z", "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "out", "Format/Datatype": "Row major linear FP32"}],
            },
            {
                "Name": "{ForeignNode[mm...gelu]}",
                "LayerType": "Myelin",
                "Inputs": [{"Name": "out", "Format/Datatype": "Row major linear BFloat16 format"}],
                "Outputs": [{"Name": "o2", "Format/Datatype": "Row major linear BFloat16 format"}],
            },
            {"Name": "shape", "LayerType": "Shape", "Inputs": [], "Outputs": [{"Format/Datatype": "Int64"}]},
        ],
        "Bindings": ["x", "o2"],
    }
)


def test_precision_summary_from_inspector_json() -> None:
    summary = precision_summary(DETAILED_JSON)
    assert summary == {
        "CaskConvolution": {"int8": 1},
        "Myelin": {"bf16": 1},
        "PointWiseV2": {"fp16": 1, "fp32": 1},
        "Reformat": {"fp16": 1},
        "Scale": {"fp32": 1},
        "Shape": {"int64": 1},
    }
    # the same per-layer precisions as layer_precisions, grouped by LayerType
    per_layer = layer_precisions(DETAILED_JSON)
    kinds = {str(layer["Name"]): str(layer["LayerType"]) for layer in json.loads(DETAILED_JSON)["Layers"]}
    regrouped: dict[str, dict[str, int]] = {}
    for name, precision in per_layer.items():
        regrouped.setdefault(kinds[name], {}).setdefault(precision, 0)
        regrouped[kinds[name]][precision] += 1
    assert regrouped == summary and sum(sum(v.values()) for v in summary.values()) == len(kinds)
    assert precision_summary(json.dumps({"Layers": ["a + b", "c"], "Bindings": []})) == {"unknown": {"unknown": 2}}
    assert precision_summary("not json") == {}


def test_builder_precision_summary_reads_engine_json_without_tensorrt(tmp_path: Path) -> None:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"a plan built elsewhere")
    stored = precision_summary(DETAILED_JSON)
    (tmp_path / "engine.json").write_text(json.dumps({"settings": {}, "precision_summary": stored}))
    assert TensorRTBuilder().precision_summary(engine_from_plan(plan)) == stored


def test_a_loaded_plan_carries_the_options_it_was_built_with(tmp_path: Path) -> None:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"a plan built elsewhere")
    settings = select_settings(load_profile("a100"), _pinned(qdq_conv(), "conv"), (8, 0))
    (tmp_path / "engine.json").write_text(json.dumps({"settings": settings.to_dict()}))
    options = engine_from_plan(plan).options
    assert options == {
        "float_precision": "fp16",
        "typing": "weak",
        "builder_flags": "FP16,INT8,OBEY_PRECISION_CONSTRAINTS",
        "tf32": "off",
        "fp32_pins": "1",
        "max_aux_streams": "0",
    }
    (tmp_path / "engine.json").write_text(json.dumps({"settings": {"device": "cuda:1"}}))
    assert engine_from_plan(plan).options == {} and engine_from_plan(plan).device == "cuda:1"


# ---------------------------------------------------------------------------------------------
# the process-wide logger's sink


def test_log_sink_gives_each_build_its_own_messages() -> None:
    sink = LogSink()
    sink.log(trt_logger.WARNING, "before any build")
    with sink.collect() as first:
        sink.log(trt_logger.ERROR, "first build failed\nsecond line")
        sink.log(trt_logger.VERBOSE, "too chatty")  # below INFO: dropped
    with sink.collect() as second:
        sink.log(trt_logger.INFO, "[MemUsageChange] ...")
        sink.log(trt_logger.ERROR, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
        sink.log(trt_logger.INTERNAL_ERROR, "Assertion failed")
        sink.log(trt_logger.ERROR, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
    assert first.errors() == ["first build failed"] and len(first.messages) == 1
    assert second.errors() == [
        "Network has dynamic or shape inputs, but no optimization profile has been defined.",
        "Assertion failed",
    ]
    assert second.summary() == " | ".join(second.errors())
    assert list(sink.unclaimed) == [(trt_logger.WARNING, "before any build")]
    with sink.collect() as outer, sink.collect() as inner:
        sink.log(trt_logger.WARNING, "seen by both")
    assert outer.warnings() == inner.warnings() == ["seen by both"]
    many = trt_logger.LogRecords([(trt_logger.ERROR, f"e{i}") for i in range(5)])
    assert many.summary(limit=2) == "e0 | e1 (+3 more)" and trt_logger.LogRecords().summary() == ""


def test_log_sink_takes_messages_from_other_threads() -> None:
    sink = LogSink()
    with sink.collect() as records:
        workers = [threading.Thread(target=sink.log, args=(trt_logger.ERROR, f"t{i}")) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert sorted(records.errors()) == sorted(f"t{i}" for i in range(8))
    assert not sink.unclaimed


# ---------------------------------------------------------------------------------------------
# CUDA majors: driver vs installed TensorRT / cuda-python builds


def test_installed_cuda_majors_from_distribution_names() -> None:
    dists = {
        "tensorrt_cu13": "10.14.1.48",
        "tensorrt_cu13_libs": "10.14.1.48",
        "tensorrt-cu13-bindings": "10.14.1.48",
        "cuda-python": "13.0.1",
        "cuda_bindings": "13.0.1",
        "tensorrt": "10.14.1.48",  # the metapackage says nothing about CUDA
        "nvidia-cuda-runtime-cu12": "12.9.79",
        "numpy": "2.3.0",
    }
    assert installed_cuda_majors(dists) == {
        "cuda-bindings": 13,
        "cuda-python": 13,
        "tensorrt-cu13": 13,
        "tensorrt-cu13-bindings": 13,
        "tensorrt-cu13-libs": 13,
    }


def test_cuda_mismatch_names_the_pins_in_one_line() -> None:
    cu13 = {"tensorrt-cu13": 13, "cuda-python": 13}
    line = cuda_mismatch((12, 4), cu13)
    assert line is not None and "\n" not in line
    assert "CUDA 12.4" in line and "tensorrt-cu13 (CUDA 13)" in line and "cuda-python (CUDA 13)" in line
    assert "rexdeploy[tensorrt-cu12]" in line and "cuda-python>=12.6.1,<13" in line
    assert cuda_mismatch((13, 0), cu13) is None  # a driver runs its own major
    assert cuda_mismatch((13, 0), {"tensorrt-cu12": 12, "cuda-python": 12}) is None  # ... and older ones
    assert cuda_mismatch(None, cu13) is None  # no driver: the caller reports "no GPU"
    old = cuda_mismatch((11, 8), {"tensorrt-cu12": 12})
    assert old is not None and "CUDA 11" in old


def test_pyproject_extras_carry_the_pins_the_message_names() -> None:
    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = raw["project"]["optional-dependencies"]
    for major, line in PINS.items():
        pins = extras[f"tensorrt-cu{major}"]
        assert f"rexdeploy[tensorrt-cu{major}]" in line
        assert all(pin in line for pin in pins), (pins, line)
        assert any(p.startswith(f"tensorrt-cu{major}>=10.") and p.endswith(",<11") for p in pins)
    assert "tensorrt>=10.1,<11" in extras["tensorrt"]  # BuilderFlag.INT4 / --int4 need 10.1


class _Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_timed_loop_warms_up_by_time_then_counts_runs() -> None:
    calls: list[int] = []

    def run() -> float:
        calls.append(1)
        return float(len(calls))

    samples, warm, _ = timed_loop(run, TimingSettings(warmup_s=0.35, runs=5), clock=_Clock(0.1))
    assert len(samples) == 5 and warm >= 2 and len(calls) == warm + 5
    assert samples == [float(warm + i + 1) for i in range(5)]


def test_timed_loop_duration_respects_min_runs() -> None:
    samples, warm, seconds = timed_loop(
        lambda: 1.0, TimingSettings(warmup_s=0.0, duration_s=0.05, min_runs=12), clock=_Clock(0.1)
    )
    assert warm == 1 and len(samples) == 12 and seconds > 0.05
    samples, _, _ = timed_loop(lambda: 1.0, TimingSettings(warmup_s=0.0, duration_s=1.0, min_runs=1), _Clock(0.1))
    assert len(samples) >= 5


# ---------------------------------------------------------------------------------------------
# plugin surface without TensorRT


def test_builder_protocol_and_entry_point() -> None:
    builder = TensorRTBuilder()
    assert isinstance(builder, Builder)
    assert builder.name == "tensorrt" and builder.pip_extra == "tensorrt"
    eps = {ep.name: ep for ep in entry_points(group="rexdeploy.builders")}
    assert "tensorrt" in eps, "reinstall the package (pip install -e .) to register the entry points"
    assert eps["tensorrt"].load() is TensorRTBuilder


def test_importing_the_plugin_does_not_import_tensorrt_or_cuda() -> None:
    code = (
        "import sys, rexdeploy_tensorrt\n"
        "from rexdeploy_tensorrt import TensorRTBuilder, select_settings, lint_qdq, trtexec_command\n"
        "TensorRTBuilder().available()\n"
        "bad = [m for m in sys.modules if m == 'tensorrt' or m.startswith(('tensorrt.', 'cuda.')) or m == 'cuda']\n"
        "assert not bad, bad\n"
    )
    if HAS_TENSORRT:  # available() imports it by design; check the plain import only
        code = code.replace("TensorRTBuilder().available()\n", "")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour where TensorRT is not installed")
def test_without_tensorrt_available_is_false_and_build_names_the_extra(tmp_path: Path) -> None:
    builder = TensorRTBuilder()
    assert builder.available() is False
    path = tmp_path / "m.onnx"
    onnx.save(qdq_conv(), path)
    with pytest.raises(EngineUnavailableError, match=r"pip install 'rexdeploy\[tensorrt\]'") as exc:
        builder.build(path, load_profile("a100"), tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(EngineUnavailableError, match="rexdeploy"):
        builder.version()


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour where TensorRT is not installed")
def test_a_tensorrt_that_does_not_import_is_named_with_its_error(tmp_path: Path) -> None:
    """A broken install (a stub wheel, libraries missing) is not reported as "not installed"."""
    broken = tmp_path / "site" / "tensorrt"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    code = (
        "from rexdeploy_tensorrt.builder import import_tensorrt\n"
        "try:\n    import_tensorrt()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("EngineUnavailableError TensorRT is installed but does not import (ImportError: libnvinfer")
    assert "rexdeploy[tensorrt-cu12]" in out and out.count("\n") == 1


def test_engine_from_plan_needs_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        engine_from_plan(tmp_path / "engine.plan")


def test_settings_for_uses_the_out_dir_timing_cache(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(qdq_conv(), path)
    s = TensorRTBuilder(max_batch=2).settings_for(path, load_profile("a100"), (8, 0), tmp_path / "out")
    assert s.timing_cache == str(tmp_path / "out" / "timing.cache") and s.shapes[0].max == (2, 4, 8, 8)


# ---------------------------------------------------------------------------------------------
# the real thing: build, run and time on a GPU with TensorRT


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_run_and_time_a_qdq_conv_engine(tmp_path: Path, cuda_gpu: Any) -> None:
    trt = pytest.importorskip("tensorrt")
    ort = pytest.importorskip("onnxruntime")
    gpu = cuda_gpu
    cc = gpu.compute_capability
    base = load_profile("h100" if cc >= (8, 9) else "a100")
    profile = replace(base, quantization=replace(base.quantization, bf16=cc >= (8, 0), fp8=cc >= (8, 9)))
    strong_only = int(str(trt.__version__).split(".")[0]) >= 11
    builder = TensorRTBuilder(max_batch=4, typing="strong" if strong_only else "auto")

    model = qdq_conv(cin=16, cout=32, hw=16, act_scale=0.03)
    path = tmp_path / "qdq_conv.onnx"
    onnx.save(model, path)
    assert lint_qdq(model) == []
    engine = builder.build(path, profile, tmp_path / "engine")

    plan = tmp_path / "engine" / "engine.plan"
    assert plan.is_file() and plan.stat().st_size > 0
    assert (tmp_path / "engine" / "timing.cache").stat().st_size > 0
    meta = json.loads((tmp_path / "engine" / "engine.json").read_text())
    settings = TrtBuildSettings.from_dict(meta["settings"])
    assert settings.max_aux_streams == 0 and settings.int8  # one predictor: no auxiliary streams
    assert meta["aux_streams"]["used"] == engine.handle.num_aux_streams == 0
    assert meta["tensorrt_version"] == trt.__version__ == engine.backend_version
    assert engine.inputs == {"x": (1, 16, 16, 16)} and engine.build_seconds > 0
    assert "int8" in engine.layer_precisions.values(), engine.layer_precisions

    x = np.random.default_rng(1).standard_normal((2, 16, 16, 16)).astype(np.float32)
    (y_trt,) = builder.run(engine, {"x": x})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y_ort,) = sess.run(None, {"x": x})
    assert y_trt.shape == y_ort.shape == (2, 32, 16, 16)
    # int8 tolerance: at most one activation LSB flips per input element (fp16 rounding ahead of Q),
    # so |Δy[c]| ≤ s_x · Σ|W[c]| (+ fp16 output rounding); on average far less.
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_q")).astype(np.float64)
    w_scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_scale"))
    bound = 0.03 * (np.abs(w) * w_scale.reshape(-1, 1, 1, 1)).sum(axis=(1, 2, 3))
    diff = np.abs(y_trt.astype(np.float64) - y_ort)
    assert np.all(diff <= bound.reshape(1, -1, 1, 1) + 2e-3 * np.abs(y_ort) + 1e-3)
    assert diff.mean() <= 0.05 * np.abs(y_ort).mean()

    # a second handle-less record of the same plan runs too (plan deserialized from disk)
    again = engine_from_plan(plan)
    (y_again,) = builder.run(again, {"x": x})
    np.testing.assert_allclose(y_again, y_trt, rtol=0, atol=1e-5)

    timing_settings = TimingSettings(warmup_s=0.1, duration_s=0.3, min_runs=20, batch=2)
    for timer in (builder, TensorRTBuilder(use_cuda_graph=True)):
        t = timer.time(engine, timing_settings)
        assert t.runs >= 20 and t.batch == 2 and t.warmup_runs >= 1
        assert 0 < t.min_ms <= t.median_ms <= t.p90_ms <= t.p95_ms <= t.p99_ms <= t.max_ms
        assert t.min_ms <= t.mean_ms <= t.max_ms and t.throughput_fps > 0
        assert t.h2d_ms is not None and t.h2d_ms > 0 and t.d2h_ms is not None and t.d2h_ms > 0

    # a second build reuses (and keeps) the timing cache
    engine2 = builder.build(path, profile, tmp_path / "engine")
    assert engine2.artifacts[0] == plan and plan.stat().st_size > 0


def _gpu_profile(gpu: Any) -> tuple[Profile, tuple[int, int]]:
    cc = gpu.compute_capability
    return load_profile("h100" if cc >= (8, 9) else "a100"), cc


def _ort_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the CPU with graph optimizations off: exact FP32 arithmetic."""
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fp32_reference_is_fp32_and_the_fp16_default_is_its_own_engine(tmp_path: Path, cuda_gpu: Any) -> None:
    pytest.importorskip("tensorrt")
    base, _ = _gpu_profile(cuda_gpu)
    builder = TensorRTBuilder(max_batch=2)
    model = float_conv(batch="N", cin=64, cout=64, hw=16)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(3).standard_normal((2, 64, 16, 16)).astype(np.float32)
    (ref,) = _ort_reference(model, {"x": x})
    errors: dict[str, float] = {}
    for precision in ("fp32", builder.default_float_precision(base)):
        engine = builder.build(path, _variant(base, precision), tmp_path / precision)
        assert engine.options["float_precision"] == precision and engine.options["tf32"] == "off"
        summary = builder.precision_summary(engine)
        ran = {p for per_kind in summary.values() for p in per_kind}
        (y,) = builder.run(engine, {"x": x})
        errors[precision] = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
        if precision == "fp32":
            assert not ran & {"fp16", "bf16", "int8", "fp8"}, summary
        else:
            assert precision in ran, summary
    # TF32 (10-bit mantissa) or fp16 would be ~1e-3 off; an FP32 conv (any algorithm) is ~1e-6
    assert errors["fp32"] <= 1e-4, errors
    assert errors["fp16"] > errors["fp32"], errors


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_a_second_build_in_the_process_reports_tensorrts_own_error(tmp_path: Path, cuda_gpu: Any) -> None:
    trt = pytest.importorskip("tensorrt")
    from rexdeploy_tensorrt.builder import build_plan

    profile, cc = _gpu_profile(cuda_gpu)
    builder = TensorRTBuilder(max_batch=2)
    path = tmp_path / "conv.onnx"
    onnx.save(float_conv(batch="N"), path)
    builder.build(path, profile, tmp_path / "ok")  # a builder, a runtime and a live engine now exist
    settings = builder.settings_for(path, profile, cc, tmp_path / "bad")
    broken = replace(settings, shapes=())  # a dynamic batch without its optimization profile
    with pytest.raises(BuildError) as exc:
        build_plan(trt, path, broken, tmp_path / "bad.cache")
    message = str(exc.value)
    assert "no error logged" not in message and "profile" in message.lower(), message


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fp32_pins_hold_inside_an_fp16_engine(tmp_path: Path, cuda_gpu: Any) -> None:
    """(x + 2048) - 2048: in fp16 (spacing 2 at 2048) every |x| < 1 is lost; pinned to FP32 it is kept
    to 2.4e-4. Checks the pinned engine's numbers and the pins it records."""
    pytest.importorskip("tensorrt")
    base, _ = _gpu_profile(cuda_gpu)
    c = numpy_helper.from_array(np.array(2048.0, np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "c"], ["big"], name="add_big"),
            helper.make_node("Sub", ["big", "c"], ["y"], name="sub_back"),
        ],
        "pins",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])],
        [c],
    )
    model = pin_fp32(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), ["add_big", "sub_back"])
    path = tmp_path / "pins.onnx"
    onnx.save(model, path)
    engine = TensorRTBuilder().build(path, _variant(base, "fp16"), tmp_path / "engine")
    assert "OBEY_PRECISION_CONSTRAINTS" in engine.options["builder_flags"]
    meta = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert meta["fp32_pins"]["applied"] and meta["fp32_pins"]["unmatched"] == []
    assert {p["node"] for p in meta["fp32_pins"]["layers"]} == {"add_big", "sub_back"}
    x = np.random.default_rng(5).uniform(-1, 1, (2, 1024)).astype(np.float32)
    (y,) = TensorRTBuilder().run(engine, {"x": x})
    (ref,) = _ort_reference(model, {"x": x})
    assert np.abs(y - ref).max() <= 5e-4
