"""``rexdeploy build``: plan → expand → build → time, closed on the measured latency.

With a budget and no explicit setting, the planner chooses the plan; the engine is built and timed;
when its measured median exceeds the budget the cost model is corrected by the measured/predicted
ratio and the planner runs again (bounded attempts). The FP32 engine (and, for ``budget_ratio``,
the plain int8 engine) are built and timed in the same run as baselines; an FP32 engine that fits
the budget and is faster than the REx engine is returned instead — it is exact.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from rexdeploy.analyze import Layer
from rexdeploy.api import (
    Progress,
    builder_for,
    default_plan,
    expand_model,
    measure_fidelity,
    quantizable_layers,
)
from rexdeploy.budget import format_ms
from rexdeploy.builders.base import Builder, Engine, TimingSettings
from rexdeploy.builders.cache import cached_build
from rexdeploy.errors import BudgetError
from rexdeploy.fileio import atomic_dir
from rexdeploy.graph import file_sha256, fold_batchnorm, load_model, save_model
from rexdeploy.hostcpu import host_profile_name, missing_flags
from rexdeploy.planner import PlanResult, plan_model
from rexdeploy.plans import Plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import load_calibration
from rexdeploy.report import Attempt, EngineResult, Report, write_pareto_png

MAX_ATTEMPTS = 3
log = logging.getLogger(__name__)


def _quiet(_: str) -> None:
    return None


def host_warnings(profile: Profile) -> list[str]:
    missing = missing_flags(profile.requires) if profile.engine == "openvino" else []
    if not missing:
        return []
    return [
        f"profile {profile.name!r} is for CPUs with {', '.join(profile.requires)}, which this CPU lacks "
        f"({', '.join(missing)}): its int8 kernels may overflow or run slower here; "
        f"--profile auto picks {host_profile_name()!r} for this host"
    ]


def engine_result(label: str, builder: Builder, engine: Engine, settings: TimingSettings, root: Path) -> EngineResult:
    timing = builder.time(engine, settings)
    summary = getattr(builder, "precision_summary", None)
    precisions: dict[str, dict[str, int]] = summary(engine) if callable(summary) else {}
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


@dataclass
class _Run:
    """What one build run holds while it works in its temporary directory."""

    model: onnx.ModelProto
    layers: list[Layer]
    profile: Profile
    builder: Builder
    timing: TimingSettings
    tmp: Path
    sha: str
    say: Progress
    model_name: str = "the model"
    use_cache: bool = True
    fp32_engine: Engine | None = None

    def engine_for(
        self, plan: Plan, name: str, calibration: object, ranges: dict[str, float] | None
    ) -> tuple[Engine, float]:
        """Expand ``plan``, save it as ``name``.onnx and build it; returns the engine and the expand seconds."""
        self.say(f"expanding {self.model_name} for {name} ...")
        expanded = expand_model(self.model, plan, profile=self.profile, calibration=calibration,  # type: ignore[arg-type]
                                model_sha256=self.sha, ranges=ranges)  # fmt: skip
        path = save_model(expanded.model, self.tmp / f"{name}.onnx")
        self.say(f"building {name} ({plan.summary()}) with {self.profile.engine} ...")
        return self.build(path, name), expanded.seconds

    def build(self, path: Path, name: str) -> Engine:
        engine, hit = cached_build(self.builder, path, self.profile, self.tmp / name, enabled=self.use_cache)
        if hit:
            self.say(f"{name}: engine cache hit, not rebuilt")
        return engine


def build(
    model_path: str | Path,
    profile: Profile | str,
    *,
    budget_ms: float | None = None,
    budget_ratio: float | None = None,
    out_dir: str | Path | None = None,
    plan: Plan | None = None,
    timing: TimingSettings | None = None,
    calibration_path: str | Path | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
    **overrides: object,
) -> Report:
    """Plan (or take ``plan`` / the flag ``overrides``), expand, build, time next to the baselines, report.

    ``budget_ratio`` sets the budget relative to the plain int8 engine (K = 1) measured in the same run.
    Engines are reused from the engine cache (:mod:`rexdeploy.builders.cache`) unless ``use_cache`` is off.
    Artifacts (expanded.onnx, plan.json, the engines, report.json, report.md, pareto.png) are written to
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
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded, model_path.name)
    flags = {k: v for k, v in overrides.items() if v is not None}
    if plan is None and flags:
        plan = default_plan(layers, profile, sha, **flags)
    use_planner = plan is None and (budget_ms is not None or budget_ratio is not None)
    if plan is None and not use_planner:
        plan = default_plan(layers, profile, sha)
    warnings = host_warnings(profile)
    for warning in warnings:
        say(f"warning: {warning}")
    out = Path(out_dir) if out_dir is not None else Path("rexdeploy-out") / model_path.stem
    with atomic_dir(out) as tmp:
        run = _Run(model, layers, profile, builder, timing, tmp, sha, say, model_path.name, use_cache)
        shutil.copyfile(model_path, tmp / "fp32.onnx")
        say(f"building the FP32 baseline with {profile.engine} ...")
        fp32_engine = run.build(tmp / "fp32.onnx", "fp32")
        run.fp32_engine = fp32_engine
        say(f"timing the FP32 baseline ({timing.duration_s:g} s) ...")
        baselines = {"fp32": engine_result("fp32", builder, fp32_engine, timing, tmp)}
        if budget_ratio is not None:
            int8_plan = default_plan(layers, profile, sha, order=1, act_bits=8)
            int8_engine, _ = run.engine_for(int8_plan, "int8", calibration, None)
            say(f"timing the plain int8 engine ({timing.duration_s:g} s) ...")
            baselines["int8"] = engine_result("int8", builder, int8_engine, timing, tmp)
            budget_ms = budget_ratio * baselines["int8"].timing.median_ms
            say(f"budget: {budget_ratio:g} x plain int8 = {format_ms(budget_ms)}")
        attempts: list[Attempt] = []
        planned: PlanResult | None = None
        if use_planner:
            assert budget_ms is not None
            plan, rex_engine, rex_result, expand_s, planned = _closed_loop(
                run, budget_ms, calibration, attempts, baselines
            )
        else:
            assert plan is not None
            rex_engine, expand_s = run.engine_for(plan, "rex", calibration, None)
            say(f"timing the REx engine ({timing.duration_s:g} s) ...")
            rex_result = engine_result("rex", builder, rex_engine, timing, tmp)
        final_onnx = tmp / f"{attempts[-1].name if attempts else 'rex'}.onnx"
        if plan.layers and final_onnx.exists():
            shutil.copyfile(final_onnx, tmp / "expanded.onnx")
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        say("measuring fidelity against FP32 on synthetic probes ...")
        fidelity = measure_fidelity(builder, fp32_engine, rex_engine, model)
        report = Report(
            model=str(model_path),
            model_sha256=sha,
            profile=profile.name,
            engine=profile.engine,
            device=profile.device,
            budget_ms=budget_ms,
            plan=plan,
            rex=rex_result,
            baselines=baselines,
            fidelity=fidelity,
            expand_seconds=expand_s,
            out_dir=str(out),
            warnings=tuple(warnings),
            attempts=tuple(attempts),
            front=tuple(c.to_dict() for c in planned.front) if planned else (),
        )
        if planned is not None:
            png = write_pareto_png(tmp / "pareto.png", report, planned)
            if png is None:
                report = report.with_warning(
                    "matplotlib is not installed: no pareto.png (pip install 'rexdeploy[report]')"
                )
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.md").write_text(report.to_markdown(), encoding="utf-8")
        if report.fits_budget is False:
            fastest = min(e.timing.median_ms for e in [rex_result, *baselines.values()])
            raise BudgetError(
                f"the REx engine ({plan.summary()}) measured {format_ms(rex_result.timing.median_ms)}, over the "
                f"{format_ms(budget_ms or 0.0)} budget (FP32 measured {format_ms(baselines['fp32'].timing.median_ms)}; "
                f"fastest seen {format_ms(fastest)}): relax --budget or lower --order"
            )
    return report


def _closed_loop(
    run: _Run, budget_ms: float, calibration: object, attempts: list[Attempt], baselines: dict[str, EngineResult]
) -> tuple[Plan, Engine, EngineResult, float, PlanResult]:
    """Plan, build, time; re-plan with the measured/predicted correction until the budget is met."""
    scale = 1.0
    fp32 = baselines["fp32"]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        result = plan_model(run.model, run.layers, run.profile, budget_ms, model_sha256=run.sha,
                            calibration=calibration, latency_scale=scale)  # type: ignore[arg-type]  # fmt: skip
        plan = result.plan
        run.say(f"plan (attempt {attempt}): {result.chosen.label}: predicted {format_ms(result.chosen.predicted_latency_ms)}, "
                f"error {result.chosen.predicted_error:.2e} ({len(result.candidates)} candidates, {result.seconds:.2f} s)")  # fmt: skip
        if not plan.layers:  # FP32 fits: the exact engine is the answer
            attempts.append(
                Attempt(attempt, "fp32", "FP32", result.chosen.predicted_latency_ms, fp32.timing.median_ms, scale)
            )
            assert run.fp32_engine is not None
            return plan, run.fp32_engine, fp32, 0.0, result
        name = "rex" if attempt == 1 else f"rex_attempt{attempt}"
        engine, expand_s = run.engine_for(plan, name, calibration, result.ranges)
        run.say(f"timing the REx engine ({run.timing.duration_s:g} s) ...")
        measured = engine_result("rex", run.builder, engine, run.timing, run.tmp)
        attempts.append(
            Attempt(attempt, name, plan.summary(), result.chosen.predicted_latency_ms, measured.timing.median_ms, scale)
        )
        float_ok = run.profile.quantization.float_activations  # an int8-only device cannot run the FP32 engine
        if float_ok and fp32.timing.median_ms <= budget_ms and fp32.timing.median_ms < measured.timing.median_ms:
            run.say("the FP32 engine fits the budget and is faster: returning it (exact)")
            fp32_plan = Plan(layers={}, profile=run.profile.name, model_sha256=run.sha,
                             notes=("FP32 measured faster than the REx engine and within budget",))  # fmt: skip
            assert run.fp32_engine is not None
            return fp32_plan, run.fp32_engine, fp32, 0.0, result
        if measured.timing.median_ms <= budget_ms or attempt == MAX_ATTEMPTS:
            return plan, engine, measured, expand_s, result
        scale *= measured.timing.median_ms / max(result.chosen.predicted_latency_ms, 1e-9)
        log.debug("attempt %d: predicted %.4f ms, measured %.4f ms, new scale %.3f", attempt,
                  result.chosen.predicted_latency_ms, measured.timing.median_ms, scale)  # fmt: skip
        run.say(f"measured {format_ms(measured.timing.median_ms)} > budget: correcting the cost model by x{scale:.2f}")
    raise AssertionError("unreachable")  # pragma: no cover
