"""The latency cost model: known numbers on a hand-made profile, and how predictions move with the plan."""

from __future__ import annotations

import dataclasses

import pytest

from rexdeploy.analyze import Layer
from rexdeploy.costmodel import (
    float_precision,
    layer_precision,
    output_elements,
    predict_layer_us,
    predict_layers_us,
    predict_model_ms,
    throughput,
)
from rexdeploy.errors import ProfileError
from rexdeploy.plans import LayerPlan, Plan, uniform_plan
from rexdeploy.profile import CostModel, Profile, Quantization, list_profiles, load_profile

COST = CostModel(
    layer_overhead_us=10.0,
    branch_overhead_us=5.0,
    bandwidth_gbps=10.0,  # 10 kB per µs
    throughput_gmacs={
        "conv": {"fp32": 100.0, "int8": 200.0},  # 100 / 200 kMAC per µs
        "pointwise": {"fp32": 50.0, "int8": 100.0},
        "depthwise": {"fp32": 10.0},
        "gemm": {"fp32": 20.0, "int8": 40.0, "int4": 80.0},
    },
    model_overhead_us=30.0,
    concat_factor=1.5,
    activation_bandwidth_gbps=5.0,  # 5 kB per µs
)
PROFILE = Profile(name="hand", engine="openvino", device="CPU", cost=COST)


def conv(channels: int = 64, spatial: int = 28, name: str = "conv") -> Layer:
    """A 3x3 conv, ``channels`` in and out, on a ``spatial``² map."""
    w = (channels, channels, 3, 3)
    macs = channels * channels * 9 * spatial * spatial
    return Layer(name, "Conv", "conv", "x", "y", "w", "b", w, 1, macs)


def depthwise(channels: int = 64, spatial: int = 28) -> Layer:
    w = (channels, 1, 3, 3)
    return Layer("dw", "Conv", "depthwise", "x", "y", "w", None, w, channels, channels * 9 * spatial * spatial)


def gemm(n: int = 1024) -> Layer:
    return Layer("fc", "Gemm", "gemm", "x", "y", "w", "b", (n, n), 1, n * n)


def test_known_numbers_for_a_hand_made_profile() -> None:
    layer = conv(64, 28)  # 28.9 MMAC, 36 864 weights, 50 176 output elements
    macs, weights, outputs = 28_901_376, 36_864, 50_176
    assert (layer.macs, layer.weight_count, output_elements(layer)) == (macs, weights, outputs)
    fp32 = 10.0 + macs / 100e3 + 4 * weights / 10e3 + 4 * outputs / 5e3
    assert predict_layer_us(PROFILE, layer) == pytest.approx(fp32)
    int8_k1 = 10.0 + macs / 200e3 + weights / 10e3 + 4 * outputs / 5e3
    assert predict_layer_us(PROFILE, layer, bits=8, order=1) == pytest.approx(int8_k1)
    extra = 5.0 + macs / 200e3 + weights / 10e3 + 4 * outputs / 5e3
    assert predict_layer_us(PROFILE, layer, bits=8, order=2) == pytest.approx(int8_k1 + extra)
    assert predict_layer_us(PROFILE, layer, bits=8, order=3) == pytest.approx(int8_k1 + 2 * extra)
    assert predict_layer_us(PROFILE, layer, bits=8, order=2, form="concat") == pytest.approx(int8_k1 + 1.5 * extra)


def test_sparse_orders_scale_with_their_kept_channels() -> None:
    layer = conv(64, 28)
    macs, weights, outputs = layer.macs, layer.weight_count, output_elements(layer)
    k1 = predict_layer_us(PROFILE, layer, bits=8, order=1)
    # gamma 0.5 at K = 2: order 2 keeps 32 of 64 channels
    half = 5.0 + 0.5 * macs / 200e3 + 0.5 * weights / 10e3 + 4 * outputs / 5e3
    assert predict_layer_us(PROFILE, layer, bits=8, order=2, gamma=0.5) == pytest.approx(k1 + half)
    costs = [predict_layer_us(PROFILE, layer, bits=8, order=2, gamma=g) for g in (0.0, 0.25, 0.5, 1.0)]
    assert costs[0] == pytest.approx(k1)  # gamma 0: the order keeps no channel and is not emitted
    assert costs == sorted(costs) and len(set(costs)) == 4
    assert costs[-1] == pytest.approx(predict_layer_us(PROFILE, layer, bits=8, order=2))  # gamma >= K-1: dense
    # sparse orders are emitted as branches: the concat factor does not apply to them
    sparse_concat = predict_layer_us(PROFILE, layer, bits=8, order=2, gamma=0.5, form="concat")
    assert sparse_concat == pytest.approx(costs[2])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_prediction_grows_with_order_and_macs(order: int) -> None:
    small, big = conv(64, 14), conv(64, 28)
    assert predict_layer_us(PROFILE, big, bits=8, order=order) > predict_layer_us(PROFILE, small, bits=8, order=order)
    assert predict_layer_us(PROFILE, big, bits=8, order=order + 1) > predict_layer_us(PROFILE, big, bits=8, order=order)


def test_precision_picks_the_right_throughput() -> None:
    layer = gemm(1024)
    macs, weights, out_us = layer.macs, layer.weight_count, 4 * 1024 / 5e3  # out_us: writing the output
    assert layer_precision(PROFILE, bits=None) == "fp32"
    assert layer_precision(PROFILE, bits=8, act_bits=8) == "int8"
    assert layer_precision(PROFILE, bits=8, act_bits=0) == "fp32"  # weight-only computes in float
    assert layer_precision(PROFILE, bits=4, act_bits=0) == "fp32"  # no int4 weight-only kernels
    int4_profile = dataclasses.replace(PROFILE, quantization=Quantization(int4_weight_only=True))
    assert layer_precision(int4_profile, bits=4, act_bits=0) == "int4"
    assert predict_layer_us(PROFILE, layer) == pytest.approx(10.0 + macs / 20e3 + 4 * weights / 10e3 + out_us)
    assert predict_layer_us(PROFILE, layer, bits=8) == pytest.approx(10.0 + macs / 40e3 + weights / 10e3 + out_us)
    # weight-only in float streams float weights (dequantized once at load): exactly the FP32 layer's cost
    weight_only = 10.0 + macs / 20e3 + 4 * weights / 10e3 + out_us
    assert weight_only == pytest.approx(predict_layer_us(PROFILE, layer))
    assert predict_layer_us(PROFILE, layer, bits=8, act_bits=0) == pytest.approx(weight_only)
    assert predict_layer_us(int4_profile, layer, bits=4, act_bits=0) == pytest.approx(
        10.0 + macs / 80e3 + 0.5 * weights / 10e3 + out_us
    )
    assert predict_layer_us(PROFILE, layer, bits=8, precision="fp32") == pytest.approx(weight_only)


def test_float_precision_follows_the_engine() -> None:
    assert float_precision(PROFILE) == "fp32"
    assert float_precision(dataclasses.replace(PROFILE, quantization=Quantization(bf16=True))) == "bf16"
    assert float_precision(load_profile("xeon-spr")) == "bf16"
    assert float_precision(load_profile("a100")) == "fp16"


def test_missing_precision_falls_back_then_fails_with_a_hint() -> None:
    assert throughput(COST, "depthwise", "int8") == 10.0  # int8 → fp32
    assert throughput(COST, "gemm", "bf16") == 20.0  # bf16 → fp16 → fp32
    with pytest.raises(ProfileError, match=r"no \[cost.throughput_gmacs.depthwise\] rate for int8.*calibrate"):
        throughput(dataclasses.replace(COST, throughput_gmacs={"depthwise": {"int4": 1.0}}), "depthwise", "int8")


def test_plan_level_sum_and_unplanned_layers_are_float() -> None:
    layers = [conv(64, 28, "a"), conv(32, 14, "b"), depthwise(), gemm(256)]
    fp32 = [predict_layer_us(PROFILE, layer) for layer in layers]
    assert predict_model_ms(PROFILE, layers) == pytest.approx((30.0 + sum(fp32)) / 1e3)
    assert predict_model_ms(PROFILE, layers, Plan(layers={})) == pytest.approx((30.0 + sum(fp32)) / 1e3)
    plan = Plan(layers={"a": LayerPlan(bits=8, order=2), "fc": LayerPlan(bits=8, order=1, act_bits=0)})
    per_layer = predict_layers_us(PROFILE, layers, plan)
    assert per_layer["a"] == pytest.approx(predict_layer_us(PROFILE, layers[0], bits=8, order=2))
    assert per_layer["b"] == pytest.approx(fp32[1])
    assert per_layer["dw"] == pytest.approx(fp32[2])
    assert per_layer["fc"] == pytest.approx(predict_layer_us(PROFILE, layers[3], bits=8, act_bits=0))
    assert predict_model_ms(PROFILE, layers, plan) == pytest.approx((30.0 + sum(per_layer.values())) / 1e3)
    assert predict_model_ms(PROFILE, layers, plan.layers) == predict_model_ms(PROFILE, layers, plan)
    k3 = uniform_plan([layer.name for layer in layers], bits=8, order=3)
    k2 = uniform_plan([layer.name for layer in layers], bits=8, order=2)
    assert predict_model_ms(PROFILE, layers, k3) > predict_model_ms(PROFILE, layers, k2)


FALLBACKS = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "int8": ("int8", "fp32"),
}


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_predicts(name: str) -> None:
    """Each shipped profile's prediction for a float and a W·A8 K = 2 network, worked out by hand from its
    coefficients with the module docstring's formula."""
    profile = load_profile(name)
    cost = profile.cost
    layers = [conv(64, 28, "a"), depthwise(), gemm(512)]
    plan = uniform_plan(["a", "dw", "fc"], bits=min(profile.weight_bits("conv")), order=2)
    fp32, rex = predict_model_ms(profile, layers), predict_model_ms(profile, layers, plan)

    def mac_us(op_class: str, precision: str, macs: int) -> float:  # GMAC/s = 1e3 MAC/µs
        table = cost.throughput_gmacs[op_class]
        return macs / (next(table[p] for p in FALLBACKS[precision] if p in table) * 1e3)

    def byte_us(n: float, gbps: float) -> float:  # GB/s = 1e3 B/µs; a zero rate drops the term
        return n / (gbps * 1e3) if gbps > 0.0 else 0.0

    q = profile.quantization
    floating = (
        "bf16"
        if profile.engine == "openvino" and q.bf16
        else "fp16"
        if profile.engine == "tensorrt" and q.fp16
        else "fp32"
    )
    float_bytes = 4.0 if floating == "fp32" else 2.0
    # op class: (MACs, weights, output elements, input elements) per sample
    shapes = {
        "conv": (64 * 64 * 9 * 28 * 28, 64 * 64 * 9, 64 * 28 * 28, 64 * 28 * 28),
        "depthwise": (64 * 9 * 28 * 28, 64 * 9, 64 * 28 * 28, 64 * 28 * 28),
        "gemm": (512 * 512, 512 * 512, 512, 512),  # one row: a vector product, the gemm rates
    }
    float_us = rex_us = 0.0
    for op_class, (macs, weights, outputs, inputs) in shapes.items():
        write = byte_us(4 * outputs, cost.activation_bandwidth_gbps)
        float_us += (cost.layer_overhead_us + mac_us(op_class, floating, macs)
                     + byte_us(float_bytes * weights, cost.bandwidth_gbps) + write)  # fmt: skip
        # int8 input: each of the 2 dense orders runs the MACs over int8 weights and writes an output; the input
        # is quantized once; the second order is a branch
        one_order = mac_us(op_class, "int8", macs) + byte_us(weights, cost.bandwidth_gbps) + write
        rex_us += (cost.layer_overhead_us + one_order + byte_us(4 * inputs, cost.quantize_bandwidth_gbps)
                   + cost.branch_overhead_us + one_order)  # fmt: skip
    assert fp32 == pytest.approx((cost.model_overhead_us + float_us) / 1e3, rel=1e-12)
    assert rex == pytest.approx((cost.model_overhead_us + rex_us) / 1e3, rel=1e-12)


def test_zero_bandwidth_drops_the_memory_term() -> None:
    layer = conv(64, 28)
    no_memory = dataclasses.replace(
        PROFILE, cost=dataclasses.replace(COST, bandwidth_gbps=0.0, activation_bandwidth_gbps=0.0)
    )
    assert predict_layer_us(no_memory, layer) == pytest.approx(10.0 + layer.macs / 100e3)


def test_matrix_products_take_the_matmul_rates() -> None:
    from models import transformer_block

    from rexdeploy.analyze import find_layers
    from rexdeploy.costmodel import cost_class, layer_terms

    tokens = [layer for layer in find_layers(transformer_block(seq=16)) if layer.op_type == "MatMul"]
    vector = [layer for layer in find_layers(transformer_block(seq=1)) if layer.name != "mm_left"]
    assert tokens and vector
    assert {cost_class(layer) for layer in tokens} == {"matmul"}  # 16 rows: a matrix product
    assert {cost_class(layer) for layer in vector} == {"gemm"}  # batch-1 vector product, as calibrated
    # (mm_left, W_l @ h, multiplies its 1x1 weight into the 32 columns of h: a matrix product again)
    assert layer_terms(tokens[0], precision="int8", bits=8).op_class == "matmul"
    # a profile without matmul rates costs them as 1×1 convolutions
    profile = load_profile("x86-avx512")
    assert "matmul" not in profile.cost.throughput_gmacs
    assert throughput(profile.cost, "matmul", "int8") == throughput(profile.cost, "pointwise", "int8")
