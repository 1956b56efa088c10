"""The compiler pass as one call: fold BatchNorm, smooth LayerNorm outputs when the plan says so, find the layers,
make (or take) the Plan, equalize the int8 depthwise inputs' channels, derive the data-free activation ranges, and
run the expansion (or the ensemble clone + expansion)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from rexdeploy.actorders import unsigned_activations_for
from rexdeploy.analyze import Layer, quantizable_layers
from rexdeploy.bnstats import nonnegative_tensors
from rexdeploy.costmodel import engine_float_precision, engine_profile
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.attention import attention_sources
from rexdeploy.passes.ensemble import build_ensemble, float_predictors
from rexdeploy.passes.equalize import equalization_note, equalize_depthwise_inputs
from rexdeploy.passes.expand import expand
from rexdeploy.passes.residual import quantized_joins
from rexdeploy.passes.smooth import smooth_layernorms, smoothing_note
from rexdeploy.pins import pin_fp32, set_dynamic_activations, set_float_precision
from rexdeploy.plans import Plan, default_plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import activation_means, activation_ranges, probe_batch, probe_ranges, unsigned_layers


@dataclass(frozen=True)
class Expanded:
    """An expanded model in memory, with the plan it carries out and how long the pass took."""

    model: onnx.ModelProto
    plan: Plan
    layers: tuple[Layer, ...]
    activation_scales: dict[str, float]
    seconds: float
    numerics_seconds: float


def expand_model(
    model: onnx.ModelProto,
    plan: Plan | None = None,
    *,
    profile: Profile | None = None,
    calibration: np.ndarray | None = None,
    model_sha256: str = "",
    ranges: dict[str, float] | None = None,
    **overrides: object,
) -> Expanded:
    """Fold BN, find the layers, make (or take) the plan, derive activation ranges (unless given, e.g. by
    the planner, which derived them the same way), run the pass."""
    t0 = time.perf_counter()
    folded, bn_stats = fold_batchnorm(model)
    # LayerNorm smoothing (SmoothQuant Eq. 4, data-free) first: it changes weights and LayerNorm outputs, so the
    # layers are found and the activation ranges derived on the smoothed graph. A LayerNorm a residual Add reads
    # too (post-LN, BERT) is smoothed on a copy (clone): benchmarks/results/smoothing.md, no latency cost measured
    flag = overrides.pop("smooth_alpha", None)
    alpha = float(flag) if isinstance(flag, int | float) else (plan.smooth_alpha if plan is not None else None)
    note = ""
    if alpha is not None:
        smoothed = smooth_layernorms(folded, alpha, clone=True)
        folded, note = smoothed.model, smoothing_note(smoothed, alpha)
        if ranges is not None:  # ranges given by the caller were derived before smoothing: stale where it acted
            ranges = {k: v for k, v in ranges.items() if k not in smoothed.smoothed_tensors}
    layers = quantizable_layers(folded)
    profile = profile or load_profile("x86-avx512")
    if plan is None:
        plan = default_plan(layers, profile, model_sha256, **overrides)
    if alpha is not None:
        plan = replace(plan, smooth_alpha=alpha, notes=(*plan.notes, note))
    if plan.predictors > 1:  # paper §3.3: clone per predictor, each with its own activation ranges
        ensemble = build_ensemble(folded, plan, layers, bn_stats=bn_stats)  # Appendix-L check: refuses or warns
        plan = ensemble.plan or plan  # U_ens written in it
        taps = [_act_input(ensemble.model, n, j.layer) for n, j in ensemble.jobs.items() if j.plan.act_bits == 8]
        batch = probe_batch(sum(layer.macs for layer in layers), plan.predictors)
        ranges = probe_ranges(float_predictors(ensemble, folded), taps, calibration=calibration, batch=batch)
        result = expand(ensemble.model, plan, ranges, jobs=ensemble.jobs)
        mark_precisions(result.model, plan, profile)
        return Expanded(
            result.model,
            plan,
            tuple(layers),
            result.activation_scales,
            time.perf_counter() - t0,
            result.numerics_seconds,
        )
    by_name = {layer.name: layer for layer in layers}
    int8 = {n: lp for n, lp in plan.layers.items() if n in by_name and lp.act_bits == 8}
    # per-channel ranges for the depthwise inputs quantized at order 1: their channels equalized through the conv
    # that makes them (passes/equalize.py; same graph, other constants), unless the caller gave the input's range or
    # a calibration batch (its per-tensor ranges are the user's)
    unsigned = {by_name[n].input for n in unsigned_layers(folded, layers, plan.profile)}  # the expansion's rule
    equalize = [n for n, lp in int8.items() if lp.act_order == 1 and by_name[n].input not in (ranges or {})]
    equalize = equalize if calibration is None else []
    equalized = equalize_depthwise_inputs(folded, bn_stats, layers, equalize, unsigned=unsigned)
    if equalized.sites:
        folded, bn_stats = equalized.model, equalized.bn_stats
        layers = quantizable_layers(folded)
        by_name = {layer.name: layer for layer in layers}
        plan = replace(plan, notes=(*plan.notes, equalization_note(equalized)))
    act_inputs = [by_name[n].input for n in int8]
    found = quantized_joins(folded, {by_name[n].input for n, lp in int8.items() if lp.act_order == 1},
                            {by_name[n].output for n in int8})  # fmt: skip
    joins = [t for inputs in found.values() for t in inputs]  # residual Adds and pools quantized between int8 layers
    joins += list(attention_sources(folded, {by_name[n].output: n for n in int8}))  # attention between int8 layers
    act_inputs += joins
    # BN statistics where they reach, synthetic probes elsewhere; a user calibration batch overrides both
    missing = list(dict.fromkeys(t for t in act_inputs if ranges is None or t not in ranges))
    batch = probe_batch(sum(layer.macs for layer in layers))
    if joins and unsigned_activations_for(plan.profile):  # expand's rule for a join input: uint8 where it is >= 0
        unsigned |= set(joins) & nonnegative_tensors(folded)
    computed = {}
    if missing:
        computed = activation_ranges(folded, bn_stats, missing, method="auto", calibration=calibration, batch=batch,
                                     unsigned=unsigned)  # fmt: skip
    # data-free bias correction of every layer's weight error from its input's BN-propagated channel means
    means = activation_means(folded, bn_stats, [layer.input for layer in layers])
    result = expand(folded, plan, {**(ranges or {}), **computed}, input_means=means)
    mark_precisions(result.model, plan, profile)
    return Expanded(
        result.model, plan, tuple(layers), result.activation_scales, time.perf_counter() - t0, result.numerics_seconds
    )


_ACT_ORDER_NODE = re.compile(r"_a\d+_(x\d+_(Quantize|Dequantize)Linear|r\d+_Sub)$")
"""The nodes of an activation-order chain (:meth:`rexdeploy.passes.expand` ``activation_orders``): each order's
Q/DQ and the remainder ``Sub`` between them."""


def mark_precisions(model: onnx.ModelProto, plan: Plan, profile: Profile) -> onnx.ModelProto:
    """State in the model's metadata what the engine must run in (:mod:`rexdeploy.pins`): the plan's engine float
    precision, whether weight-only inputs are quantized at run time, and the activation-order chains pinned to
    FP32 (in place; returns the model)."""
    set_float_precision(model, engine_float_precision(profile, plan))
    set_dynamic_activations(model, engine_profile(profile, plan).quantization.dynamic_activations)
    return pin_fp32(model, [n.name for n in model.graph.node if _ACT_ORDER_NODE.search(n.name)])


def _act_input(model: onnx.ModelProto, node_name: str, layer: Layer) -> str:
    node = next(n for n in model.graph.node if n.name == node_name)
    return str(node.input[layer.act_index])


__all__ = ["Expanded", "expand_model", "mark_precisions"]
