"""Cost-model terms beyond the layer's own kernel: activation quantization, sparse gather/scatter, ensembles,
and refitting coefficients on whole-network measurements (:func:`rexdeploy.calibrate.fit_network_terms`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rexdeploy.analyze import Layer
from rexdeploy.calibrate import NetworkPoint, coefficient_vector, fit_network_terms, network_row
from rexdeploy.costmodel import input_elements, plan_layer_terms, predict_layer_us, predict_model_ms
from rexdeploy.errors import RexError
from rexdeploy.numerics import kept_channels
from rexdeploy.plans import LayerPlan, uniform_plan
from rexdeploy.profile import CostModel, Profile

COST = CostModel(
    layer_overhead_us=10.0,
    branch_overhead_us=5.0,
    bandwidth_gbps=10.0,
    throughput_gmacs={"conv": {"fp32": 100.0, "int8": 200.0}, "gemm": {"fp32": 20.0, "int8": 40.0}},
    model_overhead_us=30.0,
    activation_bandwidth_gbps=5.0,
    quantize_bandwidth_gbps=2.0,  # 2 kB of fp32 activations quantized per µs
    sparse_overhead_us=7.0,
)
PROFILE = Profile(name="hand", engine="openvino", device="CPU", cost=COST)


def conv(cin: int = 32, cout: int = 64, spatial: int = 14, name: str = "conv") -> Layer:
    macs = cout * cin * 9 * spatial * spatial
    return Layer(name, "Conv", "conv", f"{name}.x", f"{name}.y", "w", "b", (cout, cin, 3, 3), 1, macs)


def gemm(cin: int = 256, cout: int = 128, rows: int = 1, name: str = "fc") -> Layer:
    return Layer(name, "Gemm", "gemm", f"{name}.x", f"{name}.y", "w", "b", (cout, cin), 1, cout * cin * rows)


def test_input_elements_are_positions_times_input_channels() -> None:
    assert input_elements(conv(32, 64, 14)) == 32 * 14 * 14
    assert input_elements(gemm(256, 128, rows=64)) == 64 * 256
    dw = Layer("dw", "Conv", "depthwise", "x", "y", "w", None, (48, 1, 3, 3), 48, 48 * 9 * 10 * 10)
    assert input_elements(dw) == 48 * 10 * 10


def test_an_int8_input_pays_its_quantization_a_float_input_does_not() -> None:
    layer = conv(32, 64, 14)
    quant_us = 4 * 32 * 14 * 14 / 2e3  # fp32 bytes of the input / 2 kB per µs
    no_quant = dataclasses.replace(PROFILE, cost=dataclasses.replace(COST, quantize_bandwidth_gbps=0.0))
    int8 = predict_layer_us(PROFILE, layer, bits=8, order=1)
    assert int8 - predict_layer_us(no_quant, layer, bits=8, order=1) == pytest.approx(quant_us)
    # weight-only (float input) and unquantized layers pay nothing for it
    assert predict_layer_us(PROFILE, layer, bits=8, act_bits=0) == predict_layer_us(no_quant, layer, bits=8, act_bits=0)
    assert predict_layer_us(PROFILE, layer) == predict_layer_us(no_quant, layer)
    # the input is quantized once, whatever the number of orders
    k3 = predict_layer_us(PROFILE, layer, bits=8, order=3) - predict_layer_us(no_quant, layer, bits=8, order=3)
    assert k3 == pytest.approx(quant_us)


def test_every_ensemble_predictor_quantizes_its_own_input() -> None:
    layer = conv(32, 64, 14)
    one = uniform_plan([layer.name], bits=8, order=2, act_bits=8)
    two = uniform_plan([layer.name], bits=8, order=2, split=(1, 1), act_bits=8)
    quant_us = 4 * 32 * 14 * 14 / 2e3
    assert (predict_model_ms(PROFILE, [layer], two) - predict_model_ms(PROFILE, [layer], one)) * 1e3 == pytest.approx(
        quant_us
    )


def test_a_sparse_order_pays_the_gather_scatter_overhead_a_dense_one_does_not() -> None:
    layer = conv(32, 64, 14)
    free = dataclasses.replace(PROFILE, cost=dataclasses.replace(COST, sparse_overhead_us=0.0))
    assert kept_channels(64, 0.5, 2) < 64
    assert predict_layer_us(PROFILE, layer, bits=8, order=2, gamma=0.5) - predict_layer_us(
        free, layer, bits=8, order=2, gamma=0.5
    ) == pytest.approx(7.0)
    assert predict_layer_us(PROFILE, layer, bits=8, order=3, gamma=0.5) - predict_layer_us(
        free, layer, bits=8, order=3, gamma=0.5
    ) == pytest.approx(14.0)
    assert predict_layer_us(PROFILE, layer, bits=8, order=2) == predict_layer_us(free, layer, bits=8, order=2)


def _points(cost: CostModel, layers: list[Layer], plans: dict[str, dict[str, LayerPlan] | None]) -> list[NetworkPoint]:
    profile = dataclasses.replace(PROFILE, cost=cost)
    out = []
    for label, plan in plans.items():
        lts = tuple(plan_layer_terms(profile, layer, (plan or {}).get(layer.name)) for layer in layers)
        out.append(NetworkPoint("net", label, lts, predict_model_ms(profile, layers, plan)))
    return out


PLANS: dict[str, dict[str, LayerPlan] | None] = {
    "fp32": None,
    "k1": {n: LayerPlan(bits=8, order=1) for n in ("a", "b", "fc")},
    "k2": {n: LayerPlan(bits=8, order=2) for n in ("a", "b", "fc")},
    "k3": {n: LayerPlan(bits=8, order=3) for n in ("a", "b", "fc")},
    "sparse": {n: LayerPlan(bits=8, order=2, gamma=0.25) for n in ("a", "b", "fc")},
    "wo": {n: LayerPlan(bits=8, order=2, act_bits=0) for n in ("a", "b", "fc")},
    "mixed": {"a": LayerPlan(bits=8, order=3), "fc": LayerPlan(bits=8, order=1, act_bits=0)},
    "ens": {n: LayerPlan(bits=8, order=2, split=(1, 1)) for n in ("a", "b", "fc")},
}
LAYERS = [conv(16, 32, 28, "a"), conv(32, 32, 14, "b"), gemm(32 * 14 * 14 // 49, 10, name="fc")]


def test_network_row_reproduces_the_cost_model() -> None:
    points = _points(COST, LAYERS, PLANS)
    rates = [("conv", "fp32"), ("conv", "int8"), ("gemm", "fp32"), ("gemm", "int8")]
    x = coefficient_vector(COST, rates)
    for p in points:
        assert network_row(p, rates) @ x / 1e3 == pytest.approx(p.measured_ms, rel=1e-12)


def test_fit_network_terms_recovers_the_coefficients_it_is_asked_for() -> None:
    truth = dataclasses.replace(COST, quantize_bandwidth_gbps=0.8, sparse_overhead_us=20.0, model_overhead_us=55.0)
    points = _points(truth, LAYERS, PLANS)
    names = ["model_overhead_us", "quantize_bandwidth_gbps", "sparse_overhead_us"]
    fitted = fit_network_terms(points, COST, names)  # starts from the wrong values of COST
    assert fitted.quantize_bandwidth_gbps == pytest.approx(0.8, rel=1e-3)
    assert fitted.sparse_overhead_us == pytest.approx(20.0, rel=1e-3)
    assert fitted.model_overhead_us == pytest.approx(55.0, rel=1e-3)
    # the coefficients not named keep the base's values
    assert fitted.layer_overhead_us == COST.layer_overhead_us
    assert fitted.throughput_gmacs == COST.throughput_gmacs
    # a throughput can be refitted too
    slow = dataclasses.replace(truth, throughput_gmacs={**truth.throughput_gmacs, "conv": {"fp32": 60.0, "int8": 200.0}})
    refit = fit_network_terms(_points(slow, LAYERS, PLANS), truth, ["throughput_gmacs.conv.fp32"])
    assert refit.throughput_gmacs["conv"]["fp32"] == pytest.approx(60.0, rel=1e-3)


def test_fit_network_terms_with_noise_stays_close_and_rejects_unknown_names() -> None:
    truth = dataclasses.replace(COST, quantize_bandwidth_gbps=0.8, sparse_overhead_us=20.0)
    rng = np.random.default_rng(0)
    points = [dataclasses.replace(p, measured_ms=p.measured_ms * (1 + 0.01 * rng.standard_normal()))
              for p in _points(truth, LAYERS, PLANS)]  # fmt: skip
    fitted = fit_network_terms(points, COST, ["quantize_bandwidth_gbps", "sparse_overhead_us"])
    assert fitted.quantize_bandwidth_gbps == pytest.approx(0.8, rel=0.1)
    assert fitted.sparse_overhead_us == pytest.approx(20.0, rel=0.25)
    with pytest.raises(RexError, match="cannot fit"):
        fit_network_terms(points, COST, ["throughput_gmacs.depthwise.int8"])
