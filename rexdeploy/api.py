"""The Python API: what ``rexdeploy build`` / ``expand`` do, as functions with typed results.

Nothing here prints or exits; progress goes to an optional callback and errors are RexErrors.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from rexdeploy.analyze import Layer, find_layers
from rexdeploy.budget import format_ms
from rexdeploy.builders.base import Builder, Engine, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.errors import BudgetError, EngineUnavailableError, PlanError, UnsupportedModelError
from rexdeploy.fidelity import Fidelity, compare_outputs
from rexdeploy.fileio import atomic_dir
from rexdeploy.graph import file_sha256, fold_batchnorm, load_model, save_model
from rexdeploy.hostcpu import host_profile_name, missing_flags
from rexdeploy.numerics import layer_gammas
from rexdeploy.passes.ensemble import build_ensemble, float_predictors
from rexdeploy.passes.expand import expand
from rexdeploy.plan import Plan, uniform_plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import activation_ranges, graph_inputs, load_calibration, probe_ranges, synthetic_inputs
from rexdeploy.report import EngineResult, Report

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
    **overrides: object,
) -> Expanded:
    """Fold BN, find the layers, make (or take) the plan, derive activation ranges, run the pass."""
    t0 = time.perf_counter()
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    if plan is None:
        plan = default_plan(layers, profile or load_profile("x86-avx512"), model_sha256, **overrides)
    if plan.predictors > 1:  # paper §3.3: clone per predictor, each with its own activation ranges
        ensemble = build_ensemble(folded, plan, layers)
        taps = [_act_input(ensemble.model, n, j.layer) for n, j in ensemble.jobs.items() if j.plan.act_bits == 8]
        ranges = probe_ranges(float_predictors(ensemble, folded), taps, calibration=calibration)
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
    ranges = activation_ranges(folded, bn_stats, act_inputs, method="auto", calibration=calibration)
    result = expand(folded, plan, ranges)
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


def _engine_result(
    label: str, builder: Builder, engine: Engine, timing_settings: TimingSettings, root: Path
) -> EngineResult:
    timing = builder.time(engine, timing_settings)
    precisions: dict[str, dict[str, int]] = {}
    summary = getattr(builder, "precision_summary", None)
    if callable(summary):
        precisions = summary(engine)
    return EngineResult(
        label=label,
        timing=timing,
        build_seconds=engine.build_seconds,
        artifacts=tuple(
            str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in engine.artifacts
        ),
        backend_version=engine.backend_version,
        precisions=precisions,
    )


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


def _host_warnings(profile: Profile) -> list[str]:
    missing = missing_flags(profile.requires) if profile.engine == "openvino" else []
    if not missing:
        return []
    return [
        f"profile {profile.name!r} is for CPUs with {', '.join(profile.requires)}, which this CPU lacks "
        f"({', '.join(missing)}): its int8 kernels may overflow or run slower here; "
        f"--profile auto picks {host_profile_name()!r} for this host"
    ]


def build(
    model_path: str | Path,
    profile: Profile | str,
    *,
    budget_ms: float | None = None,
    out_dir: str | Path | None = None,
    plan: Plan | None = None,
    timing: TimingSettings | None = None,
    calibration_path: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: object,
) -> Report:
    """Expand ``model_path`` for ``profile``, build it and the FP32 baseline, time both, compare them.

    Artifacts (expanded.onnx, plan.json, the engines, report.json, report.md) are written to
    ``out_dir`` (default ``rexdeploy-out/<model stem>``) only when everything succeeded.
    """
    say = progress or _quiet
    profile = load_profile(profile) if isinstance(profile, str) else profile
    model_path = Path(model_path)
    timing = timing or TimingSettings()
    model = load_model(model_path)
    sha = file_sha256(model_path)
    calibration = load_calibration(str(calibration_path), model) if calibration_path else None
    builder = builder_for(profile)
    say(f"expanding {model_path.name} ...")
    expanded = expand_model(model, plan, profile=profile, calibration=calibration, model_sha256=sha, **overrides)
    say(f"expanded {len(expanded.plan.layers)} layers in {expanded.seconds:.2f} s: {expanded.plan.summary()}")
    warnings = _host_warnings(profile)
    for warning in warnings:
        say(f"warning: {warning}")
    out = Path(out_dir) if out_dir is not None else Path("rexdeploy-out") / model_path.stem
    with atomic_dir(out) as tmp:
        rex_onnx = save_model(expanded.model, tmp / "expanded.onnx")
        (tmp / "plan.json").write_text(expanded.plan.to_json(), encoding="utf-8")
        fp32_onnx = tmp / "fp32.onnx"
        shutil.copyfile(model_path, fp32_onnx)
        say(f"building the REx engine with {profile.engine} ...")
        rex_engine = builder.build(rex_onnx, profile, tmp / "rex")
        say(f"building the FP32 baseline with {profile.engine} ...")
        fp32_engine = builder.build(fp32_onnx, profile, tmp / "fp32")
        say(f"timing the REx engine ({timing.duration_s:g} s) ...")
        rex_result = _engine_result("rex", builder, rex_engine, timing, tmp)
        say(f"timing the FP32 baseline ({timing.duration_s:g} s) ...")
        fp32_result = _engine_result("fp32", builder, fp32_engine, timing, tmp)
        say("measuring fidelity against FP32 on synthetic probes ...")
        fidelity = measure_fidelity(builder, fp32_engine, rex_engine, model)
        report = Report(
            model=str(model_path),
            model_sha256=sha,
            profile=profile.name,
            engine=profile.engine,
            device=profile.device,
            budget_ms=budget_ms,
            plan=expanded.plan,
            rex=rex_result,
            baselines={"fp32": fp32_result},
            fidelity=fidelity,
            expand_seconds=expanded.seconds,
            out_dir=str(out),
            warnings=tuple(warnings),
        )
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.md").write_text(report.to_markdown(), encoding="utf-8")
        del rex_engine, fp32_engine
        if report.fits_budget is False:
            fastest = min(rex_result.timing.median_ms, fp32_result.timing.median_ms)
            raise BudgetError(
                f"the REx engine ({expanded.plan.summary()}) measured {format_ms(rex_result.timing.median_ms)}, "
                f"over the {format_ms(budget_ms or 0.0)} budget (FP32 measured {format_ms(fp32_result.timing.median_ms)}; "
                f"fastest seen {format_ms(fastest)}): relax --budget or lower --order"
            )
    return report


__all__ = ["Expanded", "build", "builder_for", "default_plan", "expand_model", "graph_inputs", "quantizable_layers"]
