"""The Python API: what ``rexdeploy build`` / ``expand`` do, as functions with typed results.

Nothing here prints or exits; progress goes to an optional callback and errors are RexErrors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from rexdeploy.analyze import Layer, find_layers
from rexdeploy.builders.base import Builder, Engine
from rexdeploy.builders.registry import get_builder
from rexdeploy.errors import EngineUnavailableError, PlanError, UnsupportedModelError
from rexdeploy.fidelity import Fidelity, compare_outputs
from rexdeploy.graph import file_sha256, fold_batchnorm, load_model
from rexdeploy.numerics import layer_gammas
from rexdeploy.passes.ensemble import build_ensemble, float_predictors
from rexdeploy.passes.expand import expand
from rexdeploy.plans import Plan, uniform_plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import (
    activation_ranges,
    graph_inputs,
    load_calibration,
    probe_batch,
    probe_ranges,
    synthetic_inputs,
)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class Expanded:
    """An expanded model in memory, with the plan it carries out and how long the pass took."""

    model: onnx.ModelProto
    plan: Plan
    layers: tuple[Layer, ...]
    activation_scales: dict[str, float]
    seconds: float
    numerics_seconds: float


def quantizable_layers(model: onnx.ModelProto, source: str = "the model") -> list[Layer]:
    layers = find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{source} has no Conv or Gemm node with a constant weight: there is nothing for REx to quantize"
        )
    return layers


def default_plan(layers: list[Layer], profile: Profile, model_sha256: str = "", **overrides: object) -> Plan:
    """The uniform plan of the profile's [defaults], with flag overrides (bits, order, act_bits, form, ...)."""
    d = profile.defaults
    settings: dict[str, object] = {"bits": d.bits, "order": d.order, "act_bits": d.act_bits, "form": d.form}
    if overrides.get("block"):  # int4 weight-only unless told otherwise
        settings.update(bits=4, act_bits=0)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    bits = int(settings["bits"])  # type: ignore[call-overload]
    for layer in layers:
        allowed = profile.weight_bits(layer.op_class)
        if bits > max(allowed):
            raise PlanError(
                f"{bits}-bit weights exceed what profile {profile.name!r} runs on {layer.op_class} layers "
                f"(at most {max(allowed)} bits, e.g. layer {layer.name!r}); use --bits {max(allowed)} or lower"
            )
    plan = uniform_plan(
        [layer.name for layer in layers],
        profile=profile.name,
        model_sha256=model_sha256,
        **settings,  # type: ignore[arg-type]
    )
    first = plan.layers[layers[0].name]
    if first.block:
        return _int4_blocks(plan, layers, profile, first.block)
    gamma = first.gamma
    if gamma is None or len(layers) < 2 or first.predictors > 1:
        return plan  # ensembles keep a uniform γ: linear+ can leave a layer 0 channels, killing a predictor
    # paper Eq. 30 (linear+): later layers get more of the budget, sum |W_l| γ_l = γ sum |W_l|
    gammas = layer_gammas(gamma, [layer.weight_count for layer in layers], first.order)
    layer_plans = {
        layer.name: replace(plan.layers[layer.name], gamma=g) for layer, g in zip(layers, gammas, strict=True)
    }
    return replace(plan, layers=layer_plans, notes=(*plan.notes, f"gamma={gamma:g} split linear+ over layers (Eq. 30)"))


def _int4_blocks(plan: Plan, layers: list[Layer], profile: Profile, block: int) -> Plan:
    """Blocked int4 weights where the engine has them (Gemm/MatMul whose input size the block divides);
    the other layers keep per-channel int4 weights, weight-only."""
    if not profile.quantization.int4_weight_only:
        raise PlanError(
            f"profile {profile.name!r} has no int4 weight-only kernels (int4_weight_only = false); drop --block"
        )
    if block not in profile.quantization.int4_block_sizes:
        sizes = ", ".join(map(str, profile.quantization.int4_block_sizes))
        raise PlanError(f"int4 block size {block} is not one profile {profile.name!r} supports ({sizes})")
    layer_plans = {
        layer.name: replace(plan.layers[layer.name], block=block)
        if layer.op_type in ("Gemm", "MatMul") and layer.weight_shape[1] % block == 0
        else replace(plan.layers[layer.name], block=0)
        for layer in layers
    }
    return replace(plan, layers=layer_plans)


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
    layers = quantizable_layers(folded)
    if plan is None:
        plan = default_plan(layers, profile or load_profile("x86-avx512"), model_sha256, **overrides)
    if plan.predictors > 1:  # paper §3.3: clone per predictor, each with its own activation ranges
        ensemble = build_ensemble(folded, plan, layers)
        taps = [_act_input(ensemble.model, n, j.layer) for n, j in ensemble.jobs.items() if j.plan.act_bits == 8]
        batch = probe_batch(sum(layer.macs for layer in layers), plan.predictors)
        ranges = probe_ranges(float_predictors(ensemble, folded), taps, calibration=calibration, batch=batch)
        result = expand(ensemble.model, plan, ranges, jobs=ensemble.jobs)
        return Expanded(
            result.model,
            plan,
            tuple(layers),
            result.activation_scales,
            time.perf_counter() - t0,
            result.numerics_seconds,
        )
    by_name = {layer.name: layer for layer in layers}
    act_inputs = [by_name[n].input for n, lp in plan.layers.items() if n in by_name and lp.act_bits == 8]
    # BN statistics where they reach, synthetic probes elsewhere; a user calibration batch overrides both
    missing = [t for t in act_inputs if ranges is None or t not in ranges]
    batch = probe_batch(sum(layer.macs for layer in layers))
    computed = (
        activation_ranges(folded, bn_stats, missing, method="auto", calibration=calibration, batch=batch)
        if missing
        else {}
    )
    result = expand(folded, plan, {**(ranges or {}), **computed})
    return Expanded(
        result.model, plan, tuple(layers), result.activation_scales, time.perf_counter() - t0, result.numerics_seconds
    )


def _act_input(model: onnx.ModelProto, node_name: str, layer: Layer) -> str:
    node = next(n for n in model.graph.node if n.name == node_name)
    return str(node.input[layer.act_index])


def builder_for(profile: Profile) -> Builder:
    builder = get_builder(profile.engine)
    if not builder.available():
        extra = f"pip install 'rexdeploy[{builder.pip_extra}]'" if builder.pip_extra else "pip install rexdeploy"
        raise EngineUnavailableError(
            f"the {profile.engine} engine of profile {profile.name!r} is not installed here: {extra} "
            "(or run `rexdeploy expand` here and build on the target)"
        )
    return builder


def measure_fidelity(
    builder: Builder, reference: Engine, candidate: Engine, model: onnx.ModelProto, probes: int = 32, seed: int = 1
) -> Fidelity:
    """Run both engines on the same seeded synthetic probes (batch 1 each) and compare the first outputs."""
    ref_out, cand_out = [], []
    for i in range(probes):
        feeds = synthetic_inputs(model, batch=1, seed=seed + i)
        ref_out.append(builder.run(reference, feeds)[0])
        cand_out.append(builder.run(candidate, feeds)[0])
    return compare_outputs(np.concatenate(ref_out), np.concatenate(cand_out))


def measure_fidelity_on(builder: Builder, reference: Engine, candidate: Engine, samples: dict[str, np.ndarray]) -> Fidelity:
    """Both engines on the user's samples (one at a time: engines are built for batch 1), first outputs
    compared (:func:`rexdeploy.samples.load_samples` makes ``samples``)."""
    n = next(iter(samples.values())).shape[0]
    ref_out, cand_out = [], []
    for i in range(n):
        feeds = {name: array[i : i + 1] for name, array in samples.items()}
        ref_out.append(builder.run(reference, feeds)[0])
        cand_out.append(builder.run(candidate, feeds)[0])
    return compare_outputs(np.concatenate(ref_out), np.concatenate(cand_out))


def simulated_fidelity(model: onnx.ModelProto, plan: Plan, samples: dict[str, np.ndarray], *,
                       profile: Profile | None = None, ranges: dict[str, float] | None = None) -> Fidelity:  # fmt: skip
    """The plan's fidelity vs FP32 on the user's samples without building an engine: the expanded Q/DQ graph
    and the FP32 model run by onnxruntime with graph optimizations off (exact Q/DQ arithmetic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expanded = expand_model(model, plan, profile=profile, ranges=ranges).model if plan.layers else model

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, samples)[0])

    return compare_outputs(run(model), run(expanded))


def fidelity_disagreement(estimate: Fidelity, samples: Fidelity) -> str | None:
    """A warning when the synthetic estimate and the samples disagree (top-1 agreement 10 points apart, or
    relative errors a factor 2 apart), else None."""
    far = False
    if estimate.top1_agreement is not None and samples.top1_agreement is not None:
        far = abs(estimate.top1_agreement - samples.top1_agreement) > 0.10
    lo, hi = sorted((estimate.relative_error, samples.relative_error))
    far = far or (hi > 1e-6 and hi > 2.0 * lo)
    if not far:
        return None

    def text(f: Fidelity) -> str:
        top1 = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
        return f"rel. error {f.relative_error:.2e}{top1}"

    return (f"fidelity on your {samples.probes} samples ({text(samples)}) differs from the synthetic-probe estimate "
            f"({text(estimate)}): trust the samples")  # fmt: skip


if TYPE_CHECKING:
    from rexdeploy.planner import PlanResult

__all__ = [
    "Expanded",
    "builder_for",
    "default_plan",
    "expand_model",
    "fidelity_disagreement",
    "graph_inputs",
    "measure_fidelity",
    "measure_fidelity_on",
    "quantizable_layers",
    "simulated_fidelity",
]


def plan(
    model_path: str | Path,
    profile: Profile | str,
    budget_ms: float,
    *,
    calibration_path: str | Path | None = None,
    latency_scale: float = 1.0,
    measure: bool = True,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> PlanResult:
    """Run the planner alone (no build of the chosen plan): the chosen Plan and the explored Pareto front.

    With ``measure`` (the default) and the profile's engine installed here, the planner's latencies come
    from the model's measured cost table (cached, or probed now: a few probe engines built, timed and
    profiled per layer, :func:`rexdeploy.closedloop.cost_table_for`); otherwise — cross-planning for
    another device, or ``measure=False`` — from the profile's analytic cost model, and the result says
    its latencies are an estimate (``PlanResult.latency_source``)."""
    from rexdeploy.closedloop import cost_table_for
    from rexdeploy.planner import plan_model

    profile = load_profile(profile) if isinstance(profile, str) else profile
    model = load_model(model_path)
    calibration = load_calibration(str(calibration_path), model) if calibration_path else None
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded, Path(model_path).name)
    table = cost_table_for(model_path, profile, use_cache=use_cache, progress=progress) if measure else None
    return plan_model(model, layers, profile, budget_ms, model_sha256=file_sha256(model_path),
                      calibration=calibration, latency_scale=latency_scale, cost_table=table)  # fmt: skip
