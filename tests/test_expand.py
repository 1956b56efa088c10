"""The expansion pass: numbers against the independent numpy reference, op sequences, checker, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import no_conv_model, quantized_model, small_cnn
from onnx import TensorProto, helper, numpy_helper
from reference import (
    activation_scales,
    bias_correction_means,
    checked_expansion,
    rel_error,
    rex_weight_map,
    run_exact,
    run_reference,
)

from rexdeploy.api import expand_model
from rexdeploy.errors import PlanError, UnsupportedModelError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.expand import expand
from rexdeploy.plans import LayerPlan, Plan, uniform_plan
from rexdeploy.profile import load_profile

PROFILE = load_profile("x86-avx512")
# small_cnn's quantized inputs that are >= 0 by construction (ReLU outputs: r1, r2 and the pool's input r3 — a
# join between the int8 pwconv and fc, rexdeploy.passes.residual — and the pooled ReLU output): an OpenVINO
# profile quantizes them to uint8 (zero-point 0, range / 255), the image input x to int8
UNSIGNED = frozenset({"r1", "r2", "r3", "flat"})


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize(("bits", "order", "act_bits", "form"), [
    (8, 1, 8, "branches"),
    (8, 2, 8, "branches"),
    (4, 3, 8, "branches"),
    (4, 3, 0, "branches"),
    (3, 2, 0, "concat"),
    (5, 3, 8, "concat"),
])  # fmt: skip
def test_expanded_graph_matches_numpy_reference(
    probe: np.ndarray, trans_b: bool, bits: int, order: int, act_bits: int, form: str
) -> None:
    model = small_cnn(trans_b=trans_b)
    expanded, got, folded, ranges = checked_expansion(model, probe, PROFILE, bits=bits, order=order,
                                                      act_bits=act_bits, form=form, joins=True)  # fmt: skip
    scales = activation_scales(ranges, unsigned=UNSIGNED) if act_bits == 8 else None
    want = run_reference(folded, {"x": probe}, weight_map=rex_weight_map(bits, order), act_scales=scales,
                         unsigned=UNSIGNED, input_means=bias_correction_means(model))[0]  # fmt: skip
    fp32 = run_exact(model, probe)
    quant_error = rel_error(got, fp32)
    # the graph computes exactly the simulated quantization: its distance to the reference is float32
    # rounding, far below the quantization error itself
    assert rel_error(got, want) < 1e-5
    assert quant_error > 1e-4
    # the pass used the scales the reference derived from the ranges it was given, on exactly the layer inputs
    # and the pooled head's input (the pool sits between the int8 pwconv and fc)
    assert expanded.activation_scales == pytest.approx(scales or {}, rel=1e-12)
    assert (act_bits == 8) == (set(expanded.activation_scales) == {"x", "r1", "r2", "r3", "flat"})


@pytest.mark.parametrize(("bits", "order", "gamma", "act_bits"), [(4, 3, 0.5, 8), (4, 3, 1.0, 0), (8, 2, 0.25, 8),
                                                                  (8, 3, 0.0, 8)])  # fmt: skip
def test_sparse_expansion_matches_numpy_reference(
    probe: np.ndarray, bits: int, order: int, gamma: float, act_bits: int
) -> None:
    """Sparse orders (paper Eq. 12): each order k >= 2 keeps the channels of largest residual L1 norm; one γ per
    layer, set in the plan (the default plan would split γ across layers, linear+)."""
    model = small_cnn()
    names = ["conv1", "dwconv", "pwconv", "fc"]
    plan = uniform_plan(names, bits=bits, order=order, gamma=gamma, act_bits=act_bits)
    # a plan that names no profile: int8 activations everywhere (what every engine runs)
    expanded, got, folded, ranges = checked_expansion(model, probe, PROFILE, plan, joins=True)
    assert {lp.gamma for lp in expanded.plan.layers.values()} == {gamma}
    scales = activation_scales(ranges) if act_bits == 8 else None
    means = bias_correction_means(model)
    want, dense, first = (
        run_reference(folded, {"x": probe}, weight_map=weights, act_scales=scales, input_means=means)[0]
        for weights in (rex_weight_map(bits, order, gamma), rex_weight_map(bits, order), rex_weight_map(bits, 1))
    )
    assert rel_error(got, want) < 1e-5
    # the sparse orders are neither the dense expansion nor absent (γ = 0: absent, the order-1 graph)
    if gamma > 0:
        assert rel_error(got, dense) > 100 * rel_error(got, want)
        assert rel_error(got, first) > 100 * rel_error(got, want)
    else:
        assert rel_error(got, first) < 1e-5


def test_weight_only_error_falls_with_order(probe: np.ndarray) -> None:
    model = small_cnn()
    fp32 = run_exact(model, probe)
    errors = [
        rel_error(run_exact(expand_model(model, profile=PROFILE, bits=4, order=k, act_bits=0).model, probe), fp32)
        for k in (1, 2, 3)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 20.0


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_op_sequence_branches() -> None:
    model = small_cnn(batchnorm=False)
    ops = _ops(expand_model(model, profile=PROFILE, bits=8, order=2, act_bits=8).model)
    assert ops[:7] == [
        "QuantizeLinear",
        "DequantizeLinear",
        "DequantizeLinear",
        "Conv",
        "DequantizeLinear",
        "Conv",
        "Add",
    ]
    assert ops.count("Conv") == 6 and ops.count("Gemm") == 2
    assert ops.count("QuantizeLinear") == 5  # one Q/DQ per quantized layer input, one on the pool's input
    assert ops.count("DequantizeLinear") == 5 + 8  # activations + one per weight order
    assert ops.count("Add") == 4
    assert "BatchNormalization" not in ops


def test_op_sequence_concat_and_weight_only() -> None:
    model = small_cnn()
    ops = _ops(expand_model(model, profile=PROFILE, bits=4, order=3, act_bits=0, form="concat").model)
    assert ops[:4] == ["DequantizeLinear", "Conv", "Split", "Sum"]
    assert "QuantizeLinear" not in ops
    assert ops.count("Split") == 3  # the grouped depthwise conv falls back to branches
    assert ops.count("Conv") == 2 + 3


def test_order_one_keeps_the_node_output_and_bias() -> None:
    model = small_cnn(batchnorm=False)
    out = expand_model(model, profile=PROFILE, bits=8, order=1).model
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [c.output[0] for c in convs] == ["c1", "dw", "pw"]
    assert [len(c.input) for c in convs] == [3, 3, 2]
    weights = {i.name: i for i in out.graph.initializer}
    assert weights["conv1_w1_int8"].data_type == onnx.TensorProto.INT8
    assert "c1_w" not in weights  # the float weight is gone


def test_batchnorm_is_folded_exactly(probe: np.ndarray) -> None:
    model = small_cnn()
    folded, stats = fold_batchnorm(model)
    assert "BatchNormalization" not in _ops(folded)
    assert set(stats) == {"bn1"}
    np.testing.assert_allclose(run_exact(folded, probe), run_exact(model, probe), rtol=1e-5, atol=1e-5)


def test_plan_for_another_model_is_refused() -> None:
    plan = Plan(layers={"not_a_layer": LayerPlan()})
    with pytest.raises(PlanError, match=r"not_a_layer.*was it made for another model"):
        expand_model(small_cnn(), plan)


def test_bits_above_profile_limit_refused() -> None:
    with pytest.raises(PlanError, match=r"8-bit weights exceed what profile 'x86-avx2'.*--bits 7"):
        expand_model(small_cnn(), profile=load_profile("x86-avx2"), bits=8)


def test_no_quantizable_layer_and_quantized_model(tmp_path: object) -> None:
    with pytest.raises(UnsupportedModelError, match="no Conv or Gemm"):
        expand_model(no_conv_model(), profile=PROFILE)
    from pathlib import Path

    from rexdeploy.graph import load_model

    path = Path(str(tmp_path)) / "q.onnx"
    onnx.save(quantized_model(), str(path))
    with pytest.raises(UnsupportedModelError, match=r"already quantized.*QuantizeLinear.*FP32 model"):
        load_model(path)


@pytest.mark.parametrize("which", ["demo", "mobilenet_v2_like"])
def test_int4_weight_only_k3_is_20x_better_than_k1(which: str) -> None:
    """Issue acceptance: weights-only int4, K = 3 at least 20x smaller output error than K = 1."""
    from models import mobilenet_v2_like

    from rexdeploy.demo import demo_model_path, load_digits_inputs
    from rexdeploy.graph import load_model

    if which == "demo":
        pytest.importorskip("sklearn")
        model, name = load_model(demo_model_path()), "input"
        x = load_digits_inputs()[0][:256]
    else:
        model, name = mobilenet_v2_like(), "x"
        x = np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32)
    fp32 = run_exact(model, x, name)
    errors = [
        rel_error(run_exact(expand_model(model, profile=PROFILE, bits=4, order=k, act_bits=0).model, x, name), fp32)
        for k in (1, 3)
    ]
    assert errors[0] > 20.0 * errors[1], errors


# --------------------------------------------------------------------------------------------------
# uint8 activations for tensors >= 0


def _zero_points(model: onnx.ModelProto) -> dict[str, int]:
    """The zero-point element type of each activation QuantizeLinear, by the tensor it quantizes."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize(("profile", "unsigned"), [("x86-avx512", True), ("x86-avx2", True), ("h100", False)])
def test_relu_outputs_are_uint8_where_the_engine_runs_them(profile: str, unsigned: bool) -> None:
    """OpenVINO profiles: the ReLU outputs get uint8 (zero-point 0, scale range / 255), the signed image input
    int8; TensorRT (int8 only): int8 everywhere. The op sequence is the same either way."""
    model = small_cnn()
    prof = load_profile(profile)
    bits = min(8, max(prof.weight_bits("conv")))
    ranges = {"x": 3.0, "r1": 5.1, "r2": 2.55, "r3": 4.0, "flat": 1.0}  # r3: the pool's input (a join)
    expanded = expand_model(model, profile=prof, bits=bits, order=2, act_bits=8, ranges=ranges)
    onnx.checker.check_model(expanded.model, full_check=True)
    u8, i8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
    want = {"x": i8, **{t: u8 if unsigned else i8 for t in UNSIGNED}}
    assert _zero_points(expanded.model) == want
    assert expanded.activation_scales == pytest.approx(
        {t: r / (255.0 if unsigned and t in UNSIGNED else 127.0) for t, r in ranges.items()}, rel=1e-12
    )
    signed = expand_model(model, profile=prof, bits=bits, order=2, act_bits=8, ranges=ranges)
    assert _ops(expanded.model) == _ops(signed.model)


def test_uint8_activation_orders_keep_int8_remainders(probe: np.ndarray) -> None:
    """With J = 2 the first order of a ReLU output is uint8 and the remainder x − x_1 (either sign) int8 (the graph
    against the numpy reference: test_actorders); at J = 1 uint8 cuts the error of int8 on the same ranges."""
    model = small_cnn()
    expanded = checked_expansion(model, probe, PROFILE, bits=8, order=1, act_order=2)[0]
    zps = _zero_points(expanded.model)
    assert zps["r1"] == onnx.TensorProto.UINT8 and zps["r1_a2_r1"] == onnx.TensorProto.INT8
    assert zps["x"] == zps["x_a2_r1"] == onnx.TensorProto.INT8
    fp32 = run_exact(model, probe)
    u8, _, _, _ = checked_expansion(model, probe, PROFILE, bits=8, order=2, act_bits=8)
    i8, _, _, _ = checked_expansion(model, probe, load_profile("h100"), bits=8, order=2, act_bits=8)
    err_u8, err_i8 = (rel_error(run_exact(e.model, probe), fp32) for e in (u8, i8))
    assert err_u8 < 0.75 * err_i8, (err_u8, err_i8)


def test_unsigned_activations_follow_the_profile_engine() -> None:
    from rexdeploy.passes.expand import unsigned_activations_for

    assert unsigned_activations_for("x86-avx512") and unsigned_activations_for("core-ultra")
    assert not unsigned_activations_for("h100") and not unsigned_activations_for("orin")
    assert not unsigned_activations_for("")  # a plan made without a profile: int8, which every engine runs
    assert not unsigned_activations_for("no-such-profile")


@pytest.mark.openvino
def test_openvino_runs_uint8_inputs_in_u8_kernels(tmp_path: object) -> None:
    """OpenVINO's execution graph: the convolutions reading a uint8 ReLU output run u8 integer kernels, the one
    reading the int8 image input an integer kernel too (OpenVINO reports it u8 as well: it shifts int8
    inputs); the outputs equal the graph's exact semantics."""
    pytest.importorskip("openvino")
    import dataclasses
    from pathlib import Path

    from reference import assert_engine_agrees
    from rexdeploy_openvino.precisions import kernel_precisions

    from rexdeploy.builders.registry import get_builder

    host = load_profile("auto")
    if host.engine != "openvino":
        pytest.skip(f"host profile {host.name} is not an OpenVINO profile")
    profile = dataclasses.replace(host, quantization=dataclasses.replace(host.quantization, bf16=False))
    bits = min(8, max(profile.weight_bits("conv")))
    expanded = expand_model(small_cnn(), profile=profile, bits=bits, order=1, act_bits=8)
    assert set(_zero_points(expanded.model).values()) == {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    path = Path(str(tmp_path)) / "rex.onnx"
    onnx.save(expanded.model, str(path))
    builder = get_builder("openvino")
    engine = builder.build(path, profile, Path(str(tmp_path)) / "ov")
    precisions = kernel_precisions(engine)  # by ONNX node: the order-1 layer node of each quantized layer
    assert precisions.get("dwconv_order1") == "u8" and precisions.get("pwconv_order1") == "u8", precisions
    assert {precisions.get("conv1_order1"), precisions.get("fc_order1")} <= {"i8", "u8"}, precisions
    probes = np.random.default_rng(0).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    got = [builder.run(engine, {"x": x})[0] for x in probes]
    assert_engine_agrees(got, [run_exact(expanded.model, x) for x in probes], 1)


# --------------------------------------------------------------------------------------------------
# bias correction from the data-free channel means


def test_bias_correction_removes_the_mean_shift_of_the_weight_error() -> None:
    """x ~ N(running mean, running var) per channel makes BN → Relu exactly the rectified Gaussian the statistics
    describe; a 1×1 Conv with int4 K = 1 weights (large ΔW) reads it. Without the correction the output's mean
    error per channel is −ΔW·E[relu] (numpy); with it (expand_model's default) that shift is gone."""
    rng = np.random.default_rng(6)
    c, o = 8, 6
    mean, var = rng.normal(0.0, 1.0, c), rng.uniform(0.5, 2.0, c)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0.3, 0.5, c)
    w = rng.normal(0.0, 0.4, (o, c, 1, 1))
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             (("g", gamma), ("b", beta), ("m", mean), ("v", var), ("w", w), ("wb", np.zeros(o)))]  # fmt: skip
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w", "wb"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "bc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", o, 4, 4])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = mean[None, :, None, None] + np.sqrt(var)[None, :, None, None] * rng.standard_normal((4000, c, 4, 4))
    x = x.astype(np.float32)
    fp32 = run_exact(model, x)
    corrected = expand_model(model, profile=PROFILE, bits=4, order=1, act_bits=0).model
    folded, _ = fold_batchnorm(model)
    plain = expand(folded, uniform_plan(["conv"], bits=4, order=1, act_bits=0), {}).model
    shift = {name: (run_exact(m, x) - fp32).mean(axis=(0, 2, 3)) for name, m in (("plain", plain), ("corr", corrected))}
    per_channel = (slice(None), None, None)
    z = (x.astype(np.float64) - mean[per_channel]) / np.sqrt(var + 1e-5)[per_channel]
    relu = np.maximum(z * gamma[per_channel] + beta[per_channel], 0.0)
    w_hat = rex_weight_map(4, 1)("conv", w.astype(np.float32).astype(np.float64))
    want_plain = -((w - w_hat)[:, :, 0, 0] @ relu.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(shift["plain"], want_plain, atol=0.02 * np.abs(want_plain).max())
    assert np.abs(shift["corr"]).max() < 0.1 * np.abs(shift["plain"]).max()
