"""Latency cost model: predict a layer's and a network's latency from the profile's ``[cost]`` coefficients.

A layer of op class ``c`` (conv / pointwise / depthwise / gemm) with ``M`` multiply-accumulates per
sample, ``W`` weights, ``E`` output elements and ``C`` output channels, computing in precision ``p``
with ``K`` residual orders costs, in µs::

    first   = layer_overhead_us  + M / T[c][p]        + W·b / BW       + A·E / BWa  + n_p · A·I / BWq
    extra_k = branch_overhead_us + f_k · M / T[c][p]  + f_k · W·b / BW + A·E / BWa  + [f_k < 1] · S
    layer   = first + ρ · Σ_k extra_k
    model   = model_overhead_us + Σ_layers layer                                          (ms = µs / 1000)

- ``T[c][p]`` = ``throughput_gmacs[c][p]`` (GMAC/s = 10³ MAC/µs); ``BW`` = ``bandwidth_gbps``, the rate
  weights stream at, and ``BWa`` = ``activation_bandwidth_gbps``, the rate activations are written and
  read back at (GB/s = 10³ B/µs; 0 drops that term). A calibrated rate of 10⁶ means the fit found no
  compute cost at all: such layers' time is overhead and memory traffic (e.g. fp32 depthwise on x86-avx2).
- ``b`` = bytes per weight the kernel streams: 4 for an fp32 layer, 2 for fp16/bf16, 1 for an int8 layer (the
  pass stores every order as int8, whatever its bit-width), 0.5 for int4 weight-only kernels. A weight-only
  layer computing in a float precision streams float weights: the engine dequantizes them once at load
  (measured on OpenVINO CPU: such layers run in f32, no faster than the FP32 layer), so weight-only
  quantization buys no speed there — only int4 weight-only kernels do.
- ``f_k`` = ``kept_channels(C, γ, K) / C``, the fraction of output channels a residual order k ≥ 2
  computes (paper §3.2; 1 for dense orders). An order that keeps no channel is not emitted and costs
  nothing.
- ``A · E`` (``A`` = 4 bytes, fp32): the layer's output, and each extra order's partial output that is
  written and summed into it (paid in full even by a sparse order, whose narrow output is scattered
  back to every channel). This term is what makes depthwise layers memory-bound on CPUs.
- ``A · I / BWq`` (``BWq`` = ``quantize_bandwidth_gbps``, 0 drops the term): quantizing the layer's
  input (``I`` = input elements per sample, fp32) to int8 — the QuantizeLinear / DequantizeLinear pair on
  the activation, paid only by layers whose input is quantized (``p = int8``), once per ensemble
  predictor (``n_p``: each predictor quantizes its own input, paper §3.3).
- ``S`` = ``sparse_overhead_us``: the gather / scatter a sparse order adds (``f_k < 1``).
- ``ρ`` = ``concat_factor`` for the concat form (one kernel over the concatenated orders + Split/Sum),
  which the pass emits for dense orders of ungrouped layers only; 1 for separate branches + Add.
- ``p``: ``int8`` when the layer's input is quantized (W≤8 A8 Q/DQ); a weight-only layer
  (``act_bits == 0``) computes in the profile's float precision, or ``int4`` for ≤ 4-bit weights where
  the profile runs int4 weight-only kernels; a layer absent from the plan runs unquantized in the
  profile's float precision (``fp32``, ``bf16`` on OpenVINO profiles with bf16, ``fp16`` on TensorRT
  profiles with fp16). A precision missing from the table falls back (int4 → int8 → fp32, fp8 → fp16 →
  bf16 → fp32).
- An ensemble (split K_1..K_M) is costed as its K orders, with no credit for running predictors at once.

Every term is linear in the coefficients except ρ, so ``rexdeploy profile calibrate`` fits them by
non-negative least squares on measured micro-benchmarks, then ρ on the concat points alone
(:mod:`rexdeploy.calibrate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rexdeploy.actorders import kept_terms
from rexdeploy.analyze import Layer
from rexdeploy.errors import PlanError, ProfileError
from rexdeploy.numerics import kept_channels
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import CostModel, Profile

FALLBACK: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "fp8": ("fp8", "fp16", "bf16", "fp32"),
    "int8": ("int8", "fp32"),
    "int4": ("int4", "int8", "fp32"),
}
MATRIX_ROWS = 8  # rows per sample from which a Gemm/MatMul is costed as a matrix product (cost_class)
FLOAT_WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class Terms:
    """The quantities the coefficients multiply: per-layer and per-branch counts, MACs and bytes moved."""

    layers: float = 0.0  # × layer_overhead_us
    branches: float = 0.0  # × branch_overhead_us
    macs: float = 0.0  # ÷ throughput_gmacs[op_class][precision]
    bytes: float = 0.0  # weight bytes, ÷ bandwidth_gbps
    act_bytes: float = 0.0  # activation bytes, ÷ activation_bandwidth_gbps
    quant_bytes: float = 0.0  # fp32 bytes of activations quantized to int8, ÷ quantize_bandwidth_gbps
    sparse_orders: float = 0.0  # × sparse_overhead_us


@dataclass(frozen=True)
class LayerTerms:
    """One layer's terms: its first order, its extra orders (scaled by ``concat_factor`` when ``concat``)."""

    op_class: str
    precision: str
    first: Terms
    extra: Terms
    concat: bool = False


def float_precision(profile: Profile) -> str:
    """The precision the profile's engine runs unquantized (float) layers in."""
    q = profile.quantization
    if profile.engine == "openvino" and q.bf16:
        return "bf16"
    if profile.engine == "tensorrt" and q.fp16:
        return "fp16"
    if profile.engine == "tensorrt" and q.bf16:
        return "bf16"
    return "fp32"


def needs_fp32(plan: Plan) -> bool:
    """True when the plan has parts whose numerics need f32: activation orders (the remainders
    ``x - DQ(Q(x))`` are ~1/256 of ``x`` and vanish in bf16 / fp16)."""
    return any(lp.act_bits == 8 and lp.act_order > 1 for lp in plan.layers.values())


def pins_single_nodes(profile: Profile) -> bool:
    """True when the profile's engine can keep single layers in f32 inside a reduced-precision engine
    (TensorRT layer precision constraints). OpenVINO's CPU plugin cannot keep an activation-order chain in f32
    inside a bf16 engine (measured: docs/precision.md), so such an engine is built f32 as a whole."""
    return profile.engine == "tensorrt"


def engine_float_precision(profile: Profile, plan: Plan) -> str:
    """The precision the plan's engine runs its float parts in: the plan's own (``Plan.float_precision``),
    else f32 when the plan needs f32 and the engine cannot pin single nodes, else the profile's."""
    if plan.float_precision:
        return plan.float_precision
    if needs_fp32(plan) and not pins_single_nodes(profile):
        return "fp32"
    return float_precision(profile)


def has_dynamic_activations(profile: Profile) -> bool:
    """True when the profile's engine can quantize weight-only layers' inputs at run time (OpenVINO CPU)."""
    return profile.engine == "openvino" and profile.device.split(".")[0] == "CPU"


def dynamic_input(profile: Profile, layer: Layer, lp: LayerPlan | None) -> bool:
    """True when the engine quantizes this layer's input at run time: a weight-only Gemm/MatMul layer of an engine
    running with dynamic activations (OpenVINO quantizes the inputs of compressed-weight FullyConnected layers)."""
    return (lp is not None and lp.act_bits == 0 and profile.quantization.dynamic_activations
            and layer.op_class in ("gemm", "matmul"))  # fmt: skip


def engine_profile(profile: Profile, plan: Plan) -> Profile:
    """``profile`` as the plan's engine runs: its float precision set to :func:`engine_float_precision`, dynamic
    activations as the plan says (None: the profile's)."""
    built = profile.with_float_precision(engine_float_precision(profile, plan)) or profile
    dynamic = built.quantization.dynamic_activations if plan.dynamic_activations is None else plan.dynamic_activations
    if dynamic == built.quantization.dynamic_activations:
        return built
    return dataclasses.replace(built, quantization=dataclasses.replace(built.quantization, dynamic_activations=dynamic))


def layer_precision(profile: Profile, *, bits: int | None, act_bits: int = 8) -> str:
    """The precision a layer computes in: ``bits=None`` is an unquantized layer (see module docstring)."""
    if bits is None:
        return float_precision(profile)
    if act_bits == 8:
        return "int8"
    if bits <= 4 and profile.quantization.int4_weight_only:
        return "int4"
    return float_precision(profile)


def weight_bytes(precision: str, *, quantized: bool) -> float:
    """Bytes per stored weight: the pass stores every quantized order as int8 (int4 weight-only: 0.5)."""
    if quantized:
        return 0.5 if precision == "int4" else 1.0
    return FLOAT_WEIGHT_BYTES.get(precision, 4.0)


def output_elements(layer: Layer) -> int:
    """Output elements per sample: ``C`` × output positions (``macs = W × positions`` for Conv, ``W`` for Gemm)."""
    w = layer.weight_count
    return layer.macs * layer.out_channels // w if w else 0


def input_elements(layer: Layer) -> int:
    """Input elements per sample: output positions × input channels (stride ignored)."""
    w = layer.weight_count
    if not w or len(layer.weight_shape) < 2:
        return 0
    return layer.macs // w * layer.weight_shape[1] * max(layer.group, 1)


def throughput(cost: CostModel, op_class: str, precision: str, profile_name: str = "") -> float:
    """``throughput_gmacs[op_class][precision]`` with the fallbacks of the module docstring."""
    table = cost.throughput_gmacs.get(op_class) or (
        cost.throughput_gmacs.get("pointwise", {}) if op_class == "matmul" else {}  # uncalibrated: as a 1×1 conv
    )
    for p in FALLBACK.get(precision, (precision,)):
        if p in table:
            return table[p]
    name = f" {profile_name!r}" if profile_name else ""
    raise ProfileError(
        f"profile{name} has no [cost.throughput_gmacs.{op_class}] rate for {precision} (nor a fallback); "
        f"add one or run `rexdeploy profile calibrate`"
    )


def layer_terms(
    layer: Layer,
    *,
    precision: str,
    bits: int | None = None,
    order: int = 1,
    gamma: float | None = None,
    form: str = "branches",
    activation_bytes: float = 4.0,
    predictors: int = 1,
    act_order: int = 1,
) -> LayerTerms:
    """The terms of one layer computing in ``precision`` with ``order`` orders (``bits=None``: unquantized);
    an int8 layer quantizes its input once per ensemble predictor, and once more per activation order
    (the remainder's Sub + Q/DQ), whose products ``R^k·x_j`` (j ≥ 2, :func:`rexdeploy.actorders.kept_terms`)
    are extra branches like weight orders."""
    if order < 1:
        raise PlanError(f"expansion order {order} not supported; use 1 to 16")
    quantized_input = bits is not None and precision == "int8"
    w_bytes = layer.weight_count * weight_bytes(precision, quantized=bits is not None and precision in ("int8", "int4"))
    out_bytes = activation_bytes * output_elements(layer)
    quant = activation_bytes * input_elements(layer) * predictors * act_order if quantized_input else 0.0
    first = Terms(layers=1.0, macs=float(layer.macs), bytes=w_bytes, act_bytes=out_bytes, quant_bytes=quant)
    c = layer.out_channels
    kept = kept_channels(c, gamma, order) / c if c and order > 1 else 1.0
    products = (
        kept_terms(bits, order, act_order)
        if quantized_input and bits is not None
        else [(1, k) for k in range(1, order + 1)]
    )
    # every product but (1, 1) is an extra branch; an order k ≥ 2 that keeps no channel is not emitted
    extra_ks = [k for j, k in products if (j, k) != (1, 1) and (k == 1 or kept > 0.0)]
    n_sparse = sum(1 for k in extra_ks if k > 1 and kept < 1.0)
    extra = Terms()
    if extra_ks:
        fraction = len(extra_ks) - n_sparse + n_sparse * kept
        extra = Terms(
            branches=float(len(extra_ks)),
            macs=fraction * layer.macs,
            bytes=fraction * w_bytes,
            act_bytes=len(extra_ks) * out_bytes,
            sparse_orders=float(n_sparse),
        )
    concat = form == "concat" and order > 1 and layer.group == 1 and (gamma is None or gamma >= order - 1)
    return LayerTerms(cost_class(layer), precision, first, extra, concat)


def cost_class(layer: Layer) -> str:
    """The op class whose rates a layer is costed with: a Gemm/MatMul over at least ``MATRIX_ROWS`` rows per
    sample (a transformer's tokens) is a matrix product, ``matmul`` (calibrated on token-row MatMuls; a profile
    without ``matmul`` rates uses its ``pointwise`` ones, a 1×1 convolution being a matrix product too); the
    ``gemm`` rates are batch-1 vector products."""
    if layer.op_class == "gemm" and layer.weight_count and layer.macs // layer.weight_count >= MATRIX_ROWS:
        return "matmul"
    return layer.op_class


def terms_us(cost: CostModel, op_class: str, precision: str, terms: Terms, profile_name: str = "") -> float:
    """µs of a set of terms under the coefficients of ``cost``."""
    us = cost.layer_overhead_us * terms.layers + cost.branch_overhead_us * terms.branches
    if terms.macs:
        us += terms.macs / (throughput(cost, op_class, precision, profile_name) * 1e3)
    if terms.bytes and cost.bandwidth_gbps > 0.0:
        us += terms.bytes / (cost.bandwidth_gbps * 1e3)
    if terms.act_bytes and cost.activation_bandwidth_gbps > 0.0:
        us += terms.act_bytes / (cost.activation_bandwidth_gbps * 1e3)
    if terms.quant_bytes and cost.quantize_bandwidth_gbps > 0.0:
        us += terms.quant_bytes / (cost.quantize_bandwidth_gbps * 1e3)
    us += cost.sparse_overhead_us * terms.sparse_orders
    return us


def layer_terms_us(cost: CostModel, lt: LayerTerms, profile_name: str = "") -> float:
    """µs of one layer's terms: first order + ρ × extra orders."""
    rho = cost.concat_factor if lt.concat else 1.0
    first = terms_us(cost, lt.op_class, lt.precision, lt.first, profile_name)
    return first + rho * terms_us(cost, lt.op_class, lt.precision, lt.extra, profile_name)


def predict_layer_us(
    profile: Profile,
    layer: Layer,
    *,
    bits: int | None = None,
    order: int = 1,
    gamma: float | None = None,
    act_bits: int = 8,
    form: str = "branches",
    precision: str | None = None,
    act_order: int = 1,
) -> float:
    """Predicted latency (µs) of one layer; ``bits=None`` is the unquantized layer, ``precision=None`` derives
    it from ``bits`` / ``act_bits`` (:func:`layer_precision`)."""
    p = precision or layer_precision(profile, bits=bits, act_bits=act_bits)
    lt = layer_terms(layer, precision=p, bits=bits, order=order, gamma=gamma, form=form, act_order=act_order)
    return layer_terms_us(profile.cost, lt, profile.name)


def plan_layer_terms(profile: Profile, layer: Layer, lp: LayerPlan | None) -> LayerTerms:
    """A layer's terms under its LayerPlan (``None``: not in the plan, so unquantized)."""
    if lp is None:
        return layer_terms(layer, precision=float_precision(profile))
    p = layer_precision(profile, bits=lp.bits, act_bits=lp.act_bits)
    return layer_terms(layer, precision=p, bits=lp.bits, order=lp.order, gamma=lp.gamma, form=lp.form,
                       predictors=lp.predictors, act_order=lp.act_order)  # fmt: skip


def predict_layers_us(
    profile: Profile, layers: Iterable[Layer], plan: Plan | Mapping[str, LayerPlan] | None = None
) -> dict[str, float]:
    """Predicted µs of every layer (by name) under ``plan``; layers the plan leaves out are unquantized."""
    table = plan.layers if isinstance(plan, Plan) else (plan or {})
    return {
        layer.name: layer_terms_us(profile.cost, plan_layer_terms(profile, layer, table.get(layer.name)), profile.name)
        for layer in layers
    }


def predict_model_ms(
    profile: Profile, layers: Iterable[Layer], plan: Plan | Mapping[str, LayerPlan] | None = None
) -> float:
    """Predicted latency (ms) of a network: ``model_overhead_us`` + its Conv/Gemm layers under ``plan``.

    ``plan=None`` (or an empty plan) predicts the unquantized engine. Other ops (activations, pooling,
    ...) are assumed fused into the layers or negligible.
    """
    per_layer = predict_layers_us(profile, layers, plan)
    return (profile.cost.model_overhead_us + sum(per_layer.values())) / 1000.0


__all__ = [
    "LayerTerms",
    "Terms",
    "float_precision",
    "input_elements",
    "layer_precision",
    "layer_terms",
    "layer_terms_us",
    "output_elements",
    "plan_layer_terms",
    "predict_layer_us",
    "predict_layers_us",
    "predict_model_ms",
    "terms_us",
    "throughput",
    "weight_bytes",
]
