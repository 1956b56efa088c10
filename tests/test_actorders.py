"""Activation residual orders (LayerPlan.act_order): numerics, kept terms, emitted graphs vs the numpy reference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import small_cnn
from reference import (
    activation_scales,
    bias_correction_means,
    checked_expansion,
    fake_quant_int8,
    fake_quant_uint8,
    rel_error,
    rex_order_weights,
    run_exact,
    run_reference,
)

from rexdeploy.actorders import (
    activation_order_scales,
    activation_scale,
    expand_activation,
    first_range,
    kept_terms,
    term_bound,
)
from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.costmodel import layer_terms
from rexdeploy.errors import PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.planner import plan_model
from rexdeploy.plans import LayerPlan, Plan, uniform_plan
from rexdeploy.profile import Profile, load_profile

PROFILE = load_profile("x86-avx512")
UNSIGNED = frozenset({"r1", "r2", "flat"})  # small_cnn's ReLU outputs: x_1 is uint8 on an OpenVINO profile


# numerics


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    amax=st.floats(1e-3, 1e3),
    act_order=st.integers(1, 3),
)
def test_activation_orders_sum_to_x_within_half_the_last_step(seed: int, amax: float, act_order: int) -> None:
    x = (np.random.default_rng(seed).uniform(-1.0, 1.0, 512) * amax).astype(np.float32)
    scales = activation_order_scales(amax / 127.0, act_order)
    parts = expand_activation(x, scales)
    assert len(parts) == act_order
    for xj, s in zip(parts, scales, strict=True):  # each order is an int8 code times its scale
        codes = xj / np.float32(s)
        assert np.allclose(codes, np.rint(codes), atol=1e-3)
        assert np.abs(codes).max() <= 127.0 + 1e-3
    remainder = np.abs(x.astype(np.float64) - np.sum(parts, axis=0, dtype=np.float64)).max()
    # |x - Σ x_j| <= s_J / 2, up to float32 arithmetic on the remainders
    assert remainder <= scales[-1] / 2 + 4 * np.finfo(np.float32).eps * amax


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), amax=st.floats(1e-3, 1e3), act_order=st.integers(1, 3))
def test_unsigned_first_order_is_a_uint8_code_and_halves_the_step(seed: int, amax: float, act_order: int) -> None:
    """x >= 0 with a uint8 first order (scale amax / 255): x_1 codes in [0, 255] (bit for bit the reference's
    uint8 Q/DQ), the remainders int8; the sum is within half the last step."""
    x = (np.random.default_rng(seed).uniform(0.0, 1.0, 512) * amax).astype(np.float32)
    scales = activation_order_scales(activation_scale(amax, unsigned=True), act_order)
    parts = expand_activation(x, scales, unsigned=True)
    codes = parts[0] / np.float32(scales[0])
    assert np.allclose(codes, np.rint(codes), atol=1e-3) and codes.min() >= 0.0 and codes.max() <= 255.0 + 1e-3
    np.testing.assert_array_equal(parts[0], fake_quant_uint8(x, scales[0]))
    for xj, s in zip(parts[1:], scales[1:], strict=True):
        assert np.abs(xj / np.float32(s)).max() <= 127.0 + 1e-3
    remainder = np.abs(x.astype(np.float64) - np.sum(parts, axis=0, dtype=np.float64)).max()
    assert remainder <= scales[-1] / 2 + 4 * np.finfo(np.float32).eps * amax
    # x_1 alone: within half its step, which is 127/255 of the int8 step on the same range
    assert np.abs(x - parts[0]).max() <= scales[0] / 2 + 4 * np.finfo(np.float32).eps * amax
    assert scales[0] == pytest.approx(activation_scale(amax) * 127 / 255, rel=1e-6)


def test_each_order_shrinks_the_error_254_fold() -> None:
    x = np.random.default_rng(0).uniform(-6.0, 6.0, 100_000).astype(np.float32)
    errors = [
        float(np.abs(x - np.sum(expand_activation(x, activation_order_scales(6.0 / 127, j)), axis=0)).max())
        for j in (1, 2)
    ]
    assert errors[0] == pytest.approx(6.0 / 127 / 2, rel=0.01)
    assert 200 < errors[0] / errors[1] < 260


def test_scales_follow_the_first() -> None:
    assert activation_order_scales(0.5, 3) == pytest.approx([0.5, 0.5 / 254, 0.5 / 254**2], rel=1e-7)
    assert first_range(2.0, 1) == 2.0
    assert first_range(2.0, 2) > 2.0  # J >= 2 widens the first range (clipping costs more than rounding)
    with pytest.raises(PlanError, match="activation order 9"):
        first_range(1.0, 9)


def test_term_bounds() -> None:
    assert term_bound(1, 1, 8) == 1.0
    assert term_bound(2, 1, 8) == pytest.approx(1 / 254)
    assert term_bound(1, 2, 8) == pytest.approx(1 / 254)  # 8-bit weights: ρ_w = 1 / (2·127) = ρ_a
    assert term_bound(1, 2, 7) == pytest.approx(1 / 126)
    assert term_bound(2, 2, 4) == pytest.approx(1 / (254 * 14))


@pytest.mark.parametrize(("bits", "order", "act_order", "want"), [
    (8, 3, 1, [(1, 1), (1, 2), (1, 3)]),  # the paper's expansion is never cut
    (8, 1, 3, [(1, 1), (2, 1), (3, 1)]),
    (8, 2, 2, [(1, 1), (1, 2), (2, 1), (2, 2)]),  # (2,2) = 1/254² equals the truncation: kept
    (7, 2, 2, [(1, 1), (1, 2), (2, 1)]),  # (2,2) = 1/(254·126) < 1/126²: dropped
    (8, 3, 2, [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]),  # (2,3) = 1/254³ < 1/254²
    (4, 3, 2, [(1, 1), (1, 2), (1, 3), (2, 1)]),  # ρ_w = 1/14: truncation 1/14³ > (2,2) = 1/(254·14)
])  # fmt: skip
def test_kept_terms(bits: int, order: int, act_order: int, want: list[tuple[int, int]]) -> None:
    assert kept_terms(bits, order, act_order) == want


# plans


def test_plan_validation_and_json() -> None:
    with pytest.raises(PlanError, match="needs act_bits 8"):
        LayerPlan(act_bits=0, act_order=2)
    with pytest.raises(PlanError, match="activation order 4 not supported; use 1 to 3"):
        LayerPlan(act_order=4)
    plan = uniform_plan(["a", "b"], bits=8, order=2, act_order=2)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash
    assert "act_order=2" in plan.summary()
    # act_order = 1 is left out of the JSON: a plan written before the field existed keeps its hash
    one = uniform_plan(["a"], bits=8, order=2)
    assert "act_order" not in json.loads(one.to_json())["layers"]["a"]
    assert one.hash != uniform_plan(["a"], bits=8, order=2, act_order=2).hash


# the emitted graph


@pytest.mark.parametrize(("bits", "order", "act_order", "form", "terms"), [
    (8, 1, 2, "branches", {(1, 1), (2, 1)}),
    (8, 2, 2, "branches", {(1, 1), (1, 2), (2, 1), (2, 2)}),
    (7, 2, 2, "branches", {(1, 1), (1, 2), (2, 1)}),
    (8, 2, 3, "branches", {(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)}),  # (3,2) = 1/254³ < 1/254²
    (8, 3, 2, "concat", {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}),
])  # fmt: skip
def test_graph_matches_numpy_reference(
    probe: np.ndarray, bits: int, order: int, act_order: int, form: str, terms: set[tuple[int, int]]
) -> None:
    expanded, got, folded, ranges = checked_expansion(small_cnn(), probe, PROFILE, bits=bits, order=order,
                                                      act_order=act_order, form=form)  # fmt: skip
    # the data-free range widened 4x for J >= 2, / 127 (int8) or / 255 (uint8 x_1 of a ReLU output)
    scales = activation_scales(ranges, act_order, unsigned=UNSIGNED)
    assert expanded.activation_scales == pytest.approx(scales, rel=1e-12)
    want = run_reference(
        folded,
        {"x": probe},
        order_weights=rex_order_weights(bits, order),
        act_scales=scales,
        terms=terms,
        act_order=act_order,
        unsigned=UNSIGNED,
        input_means=bias_correction_means(small_cnn()),
    )[0]
    # float32 (onnxruntime) vs float64 (reference) upstream of a layer flips a few codes of x_2, whose step is
    # 254x finer than x_1's: on these 4 layers that is ~1e-5 relative (each input quantizer matches bit for
    # bit when fed the same tensor) — still 100x below what the activation orders change
    assert rel_error(got, want) < 5e-5
    # the reference without the activation orders is far off: the test sees them
    single = run_reference(folded, {"x": probe}, order_weights=rex_order_weights(bits, order),
                           act_scales=scales, unsigned=UNSIGNED, input_means=bias_correction_means(small_cnn()))[0]  # fmt: skip
    assert rel_error(got, single) > 100 * rel_error(got, want)


def test_second_activation_order_cuts_the_error(probe: np.ndarray) -> None:
    model = small_cnn()
    fp32 = run_exact(model, probe)
    err = {
        j: rel_error(run_exact(expand_model(model, profile=PROFILE, bits=8, order=2, act_order=j).model, probe), fp32)
        for j in (1, 2)
    }
    assert err[1] / err[2] > 20.0


def test_weights_are_shared_between_activation_orders() -> None:
    model = small_cnn(batchnorm=False)
    one = expand_model(model, profile=PROFILE, bits=8, order=2, act_order=1).model
    two = expand_model(model, profile=PROFILE, bits=8, order=2, act_order=2).model

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(len(i.raw_data) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims)

    assert weight_bytes(two) == weight_bytes(one)
    ops = [n.op_type for n in two.graph.node]
    # the first layer's input: Q, DQ (x_1), Sub (remainder), Q, DQ (x_2)
    assert ops[:5] == ["QuantizeLinear", "DequantizeLinear", "Sub", "QuantizeLinear", "DequantizeLinear"]
    convs = [n for n in two.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 * 4  # 3 conv layers; K=2 and J=2 on 8-bit weights: 4 terms each
    assert len({n.name for n in two.graph.node}) == len(two.graph.node)


def test_layer_input_shared_by_two_layers_gets_one_chain() -> None:
    from models import transformer_block

    model = transformer_block()
    expanded = expand_model(model, profile=PROFILE, bits=8, order=1, act_order=2)
    onnx.checker.check_model(expanded.model, full_check=True)
    subs = [n for n in expanded.model.graph.node if n.op_type == "Sub" and n.name.endswith("_r1_Sub")]
    assert len({n.input[0] for n in subs}) == len(subs)  # one remainder chain per quantized tensor


def test_ensemble_with_activation_orders(probe: np.ndarray) -> None:
    model = small_cnn()
    fp32 = run_exact(model, probe)
    ens = expand_model(model, profile=PROFILE, bits=4, order=4, split=(2, 2), act_order=2)
    onnx.checker.check_model(ens.model, full_check=True)
    plain = expand_model(model, profile=PROFILE, bits=4, order=4, split=(2, 2), act_order=1)
    assert rel_error(run_exact(ens.model, probe), fp32) < rel_error(run_exact(plain.model, probe), fp32)


def test_reference_fake_quant_matches_numerics() -> None:
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    s = activation_order_scales(3.0 / 127, 2)
    parts = expand_activation(x, s)
    np.testing.assert_array_equal(parts[0], fake_quant_int8(x, s[0]))
    np.testing.assert_array_equal(parts[1], fake_quant_int8(x - parts[0], s[1]))


# cost model and planner


def _layer() -> object:
    model = small_cnn(batchnorm=False)
    return next(layer for layer in quantizable_layers(model) if layer.group == 1)


def test_cost_terms_count_the_kept_products() -> None:
    layer = _layer()
    base = layer_terms(layer, precision="int8", bits=8, order=2)  # type: ignore[arg-type]
    two = layer_terms(layer, precision="int8", bits=8, order=2, act_order=2)  # type: ignore[arg-type]
    seven = layer_terms(layer, precision="int8", bits=7, order=2, act_order=2)  # type: ignore[arg-type]
    assert (base.extra.branches, two.extra.branches, seven.extra.branches) == (1.0, 3.0, 2.0)
    assert two.extra.macs == 3 * layer.macs  # type: ignore[attr-defined]
    assert two.first.quant_bytes == 2 * base.first.quant_bytes > 0  # one more Q/DQ (+ Sub) of the input
    weight_only = layer_terms(layer, precision="fp32", bits=8, order=2, act_order=1)  # type: ignore[arg-type]
    assert weight_only.first.quant_bytes == 0.0


def _planner_profile(**quantization: object) -> Profile:
    base = load_profile("x86-avx512")
    table = {c: {**p, "fp32": 1.0} for c, p in base.cost.throughput_gmacs.items()}
    cost = dataclasses.replace(base.cost, throughput_gmacs=table, layer_overhead_us=0.5, branch_overhead_us=0.5)
    return dataclasses.replace(base, cost=cost, quantization=dataclasses.replace(base.quantization, **quantization))


def test_int8_only_profile_never_plans_float_and_uses_activation_orders() -> None:
    model = small_cnn()
    layers = quantizable_layers(fold_batchnorm(model)[0])
    result = plan_model(model, layers, _planner_profile(float_activations=False), 1e9)
    assert all(c.label != "FP32" for c in result.candidates)
    assert all(len(c.plan.layers) == len(layers) and all(lp.act_bits == 8 for lp in c.plan.layers.values())
               for c in result.candidates)  # fmt: skip
    assert any(lp.act_order == 2 for lp in result.plan.layers.values())  # the most accurate plan needs them
    capped = plan_model(model, layers, _planner_profile(float_activations=False, max_act_order=1), 1e9)
    assert all(lp.act_order == 1 for c in capped.candidates for lp in c.plan.layers.values())
    assert result.chosen.predicted_error < capped.chosen.predicted_error


def test_fidelity_model_sees_what_activation_orders_buy() -> None:
    model = small_cnn(batchnorm=False)
    layers = quantizable_layers(model)
    result = plan_model(model, layers, _planner_profile(float_activations=False), 1e9)
    by_label = {c.label: c for c in result.candidates}
    one, two = by_label["uniform W8A8 K=2"], by_label["uniform W8A8 K=2 act order 2"]
    x = np.random.default_rng(5).standard_normal((32, 3, 8, 8)).astype(np.float32)
    fp32 = run_exact(model, x)
    measured = [rel_error(run_exact(expand_model(model, c.plan).model, x), fp32) for c in (one, two)]
    assert two.predicted_error < one.predicted_error / 5
    assert measured[1] < measured[0] / 5
    assert two.predicted_latency_ms > one.predicted_latency_ms
