"""``rexdeploy build``: probe → plan → expand → build → time, closed on the measured latency.

With a budget and no explicit setting, the planner plans on latencies measured on this device for this
model: probe engines are built, timed and profiled per layer (:mod:`rexdeploy.probing`; cached per
model / profile / engine version / host), and the planner composes its candidates from that cost table
(:mod:`rexdeploy.planner.costtable`). Without a per-layer profiler the profile's analytic cost model
answers instead, labelled as an estimate. The chosen plan is built and timed; a miss profiles the built
engine and updates the table with what its layers really cost (the analytic path scales its model by
the measured/predicted ratio), and the planner runs again (bounded attempts).

Every engine measured in the run — the FP32 baseline, the plain int8 baseline, the probes, each attempt
— is a candidate: the engine returned is the most accurate one (lowest predicted error; FP32 is exact)
whose *measured* median fits the budget. The build fails only when none fits after the fastest
candidate the planner knows was built and measured too.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from rexdeploy.analyze import Layer, quantizable_layers
from rexdeploy.benchmark import IR_SUFFIXES, ONNX_SUFFIXES, PLAN_SUFFIXES
from rexdeploy.budget import format_ms
from rexdeploy.builders.base import Builder, Engine, TimingSettings
from rexdeploy.builders.cache import cached_build
from rexdeploy.builders.registry import builder_for
from rexdeploy.builders.timing import interleaved_rounds
from rexdeploy.costmodel import engine_float_precision, engine_profile, float_precision
from rexdeploy.errors import BudgetError, BuildError, InputError
from rexdeploy.fidelity import (
    Fidelity,
    Outputs,
    fidelity_disagreement,
    measure_fidelity,
    measure_fidelity_on,
    output_names,
)
from rexdeploy.fileio import atomic_dir
from rexdeploy.graph import copy_model, file_sha256, fold_batchnorm, load_model, save_model
from rexdeploy.hostcpu import host_profile_name, missing_flags
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.planner import PlanResult, plan_model
from rexdeploy.planner.costtable import CostTable
from rexdeploy.planner.search import prepare
from rexdeploy.plans import Plan, default_plan
from rexdeploy.probing import (
    BUILD_CHECK,
    PROBE_TIMING,
    PROFILE_TIMING,
    Measured,
    Probe,
    layer_producers,
    node_owners,
    probe_cost_table,
    save_cached,
    split_layer_times,
)
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import bn_input_scale, graph_inputs, input_shape, load_calibration
from rexdeploy.report import Attempt, EngineResult, Report, write_pareto_png
from rexdeploy.runtime_threads import THREAD_MAX_MS, ThreadChoice, choose_threads
from rexdeploy.samples import Preprocess, load_samples
from rexdeploy.selfcheck import FLOOR as SELF_CHECK_FLOOR
from rexdeploy.selfcheck import SelfCheck, self_check

Progress = Callable[[str], None]
"""A progress callback: one line of text at a time (the CLI prints it on stderr; the library never prints)."""
MAX_ATTEMPTS = 3
PLANNING_MARGIN = 0.04  # plan for 4 % under the budget: timing noise on a quiet CPU is ~2-5 % (then measure)
NEAR_MISS = 0.10  # an engine this much over the budget, more accurate than what fits, is timed once more
DRIFT_TOLERANCE = 0.15  # a miss while the FP32 baseline runs more than this much off its first timing: the machine's
PAIRED_ROUNDS = 5  # a relative budget: the reference and the engines near the budget timed in this many rounds
PAIRED_ROUND_S = 0.3  # seconds per engine per round
PAIRED_MAX = 6  # the most accurate engines near the budget timed in the rounds (and the fastest engine)
PAIRED_WINDOW = 1.5  # "near": at most this much over the budget in their first timing (the drift seen: up to 1.5x)
TIE_MARGIN = 0.05  # how much faster than a reference that is itself a candidate an engine must run to be taken over it
log = logging.getLogger(__name__)


def _quiet(_: str) -> None:
    return None


RELATIVE_TO = {"int8": "plain int8", "fp32": "FP32", "default": "the default float engine"}
"""What ``budget_ratio`` may be relative to by name (each engine measured in the same run); else the path of an engine
the user would otherwise run (:func:`reference_engine`)."""
REFERENCE = "reference"
"""The baselines' key of the user's own engine (``--relative-to PATH``)."""


def reference_path(relative_to: str) -> Path | None:
    """The engine file ``relative_to`` names (None for ``int8`` / ``fp32`` / ``default``); BudgetError for anything
    else, saying what is accepted."""
    if relative_to in RELATIVE_TO:
        return None
    path = Path(relative_to)
    if path.suffix.lower() not in (*ONNX_SUFFIXES, *IR_SUFFIXES, *PLAN_SUFFIXES):
        raise BudgetError(
            f"--relative-to {relative_to!r}: use one of {', '.join(RELATIVE_TO)}, or the path of the engine you would "
            "otherwise run (an OpenVINO IR .xml, an ONNX model, a TensorRT .plan), e.g. --relative-to nncf_int8.xml"
        )
    if not path.is_file():
        raise InputError(f"--relative-to {relative_to}: no such engine file; give the path of an existing engine")
    return path


def reference_engine(run: _Run, path: Path) -> Measured:
    """The engine the user would otherwise run (``--relative-to PATH``), loaded the way they run it and timed: an
    OpenVINO IR with the runtime options rexdeploy wrote beside it, else bare (``core.compile_model(ir)``, e.g. an
    NNCF IR); an ONNX model built with the device's default float precision (what loading it gives); a TensorRT
    plan deserialized. It is never a candidate: only the budget and the report's comparison use it."""
    suffix = path.suffix.lower()
    run.say(f"loading your engine {path.name} (the budget's reference) ...")
    if suffix in ONNX_SUFFIXES:
        loaded = run.loaded_profile or run.profile
        default = default_float_precision(run.builder, loaded)
        engine = run.build(path, REFERENCE, profile=loaded.with_float_precision(default) or loaded)
    else:
        wants = "openvino" if suffix in IR_SUFFIXES else "tensorrt"
        load = getattr(run.builder, "load_as_user", None) or getattr(run.builder, "load", None)
        if run.builder.name != wants or not callable(load):
            raise InputError(
                f"--relative-to {path.name} is a {wants} engine, but profile {run.profile.name!r} builds with "
                f"{run.profile.engine}: give an engine of the same runtime, or its ONNX model"
            )
        engine = load(path, run.profile)
    want = {i.name: input_shape(i, 1) for i in graph_inputs(run.model)}
    if dict(engine.inputs) != want:
        shown = ", ".join(f"{k} {list(v)}" for k, v in engine.inputs.items())
        raise InputError(
            f"--relative-to {path.name}: its inputs ({shown}) are not the model's "
            f"({', '.join(f'{k} {list(v)}' for k, v in want.items())}): give an engine of the same model"
        )
    empty = Plan(layers={}, profile=run.profile.name, model_sha256=run.sha, notes=(f"your engine {path.name}",))
    run.say(f"timing your engine {path.name} ({run.timing.duration_s:g} s) ...")
    return Measured(f"your engine {path.name}", empty, engine, path, run.builder.time(engine, run.timing))


def input_scale_warnings(folded: onnx.ModelProto, bn_stats: dict[str, tuple[np.ndarray, np.ndarray]],
                         layers: list[Layer], plan: Plan) -> list[str]:  # fmt: skip
    """A warning per float model input that an int8 layer of ``plan`` quantizes directly while nothing data-free says
    its scale: not image-shaped (images are taken as ImageNet-normalised pixels) and no BatchNorm after its first
    Conv (:func:`rexdeploy.ranges.bn_input_scale`; exports that fold BN into the Conv lose it). Its int8 range then
    assumes values of unit scale (N(0, 1)), which the fidelity estimate assumes too, so neither can see a waveform
    of RMS 0.1 (W8A8 K=1 error 0.146 where --calib gives 0.015, zoo audio net)."""
    from rexdeploy.probes import image_layout

    quantized = {
        layer.input for layer in layers if (lp := plan.layers.get(layer.name)) is not None and lp.act_bits == 8
    }
    out = []
    for info in graph_inputs(folded):
        if info.name not in quantized or info.type.tensor_type.elem_type not in _FLOAT_TYPES:
            continue
        if image_layout(input_shape(info, 1)) is not None or bn_input_scale(folded, bn_stats, info.name) is not None:
            continue
        out.append(f"the int8 range of model input {info.name!r} assumes values of unit scale (N(0, 1)): no BatchNorm "
                   "statistics say otherwise, and the fidelity estimate probes that scale too; if your inputs are "
                   "scaled differently (e.g. audio of RMS 0.1), rebuild with --calib FILE.npy (ranges from your "
                   "inputs) or check with --samples")  # fmt: skip
    return out


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def host_warnings(profile: Profile) -> list[str]:
    """What the profile gets wrong about this CPU: flags it needs and the CPU lacks (int8 kernels may overflow or
    run slower), or an f32 profile on a CPU whose OpenVINO default is bf16 (its float layers could run 2× faster)."""
    if profile.engine != "openvino":
        return []
    missing = missing_flags(profile.requires)
    if missing:
        return [
            f"profile {profile.name!r} is for CPUs with {', '.join(profile.requires)}, which this CPU lacks "
            f"({', '.join(missing)}): its int8 kernels may overflow or run slower here; "
            f"--profile auto picks {host_profile_name()!r} for this host"
        ]
    auto = host_profile_name()
    if float_precision(profile) == "fp32" and auto != profile.name and load_profile(auto).quantization.bf16:
        return [
            f"profile {profile.name!r} runs float layers in f32, but OpenVINO's default on this CPU is bf16 "
            f"(measured as the 'bf16 (default)' baseline); --profile auto ({auto!r}) lets the planner use bf16 layers"
        ]
    return []


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
    calibration: object = None
    fp32_engine: Engine | None = None
    measured: list[Measured] = field(default_factory=list)  # every engine measured in this run
    checks: dict[int, SelfCheck] = field(default_factory=dict)  # engine id → its self-check
    fp32_outputs: dict[str, Outputs] = field(default_factory=dict)  # the FP32 engine on the probes, by digest
    estimates: dict[int, Fidelity] = field(default_factory=dict)  # id(engine.handle) → its fidelity estimate
    settled_reference: Measured | None = None  # a relative budget's reference as the interleaved rounds timed it
    round_ratios: dict[int, list[float]] = field(default_factory=dict)  # engine id → its per-round ratios to it
    ties: set[int] = field(default_factory=set)  # engines that fit but were not taken over the reference: a tie
    loaded_profile: Profile | None = None  # the profile as given: how a user's own load of the model runs it
    threads: ThreadChoice | None = None  # the inference threads measured on the FP32 engine (runtime_threads)

    def estimate(self, engine: Engine) -> Fidelity:
        """The data-free fidelity estimate of ``engine`` against the FP32 engine (each engine estimated once)."""
        if id(engine.handle) not in self.estimates:
            assert isinstance(self.fp32_engine, Engine)
            self.estimates[id(engine.handle)] = measure_fidelity(self.builder, self.fp32_engine, engine, self.model,
                                                                 reference_outputs=self.fp32_outputs)  # fmt: skip
        return self.estimates[id(engine.handle)]

    def attempts_dir(self) -> Path:
        """``attempts/`` of the build folder: the closed loop's engines (the returned one is copied to ``rex/``)."""
        folder = self.tmp / "attempts"
        folder.mkdir(exist_ok=True)
        return folder

    def engine_for(
        self, plan: Plan, name: str, ranges: dict[str, float] | None, where: Path | None = None
    ) -> tuple[Engine, float, Path]:
        """Expand ``plan``, save it as ``name``.onnx and build it (in ``where``, default the run's folder);
        returns the engine, the expand seconds and the ONNX path."""
        where = where or self.tmp
        self.say(f"expanding {self.model_name} for {name} ...")
        expanded = expand_model(self.model, plan, profile=self.profile, calibration=self.calibration,  # type: ignore[arg-type]
                                model_sha256=self.sha, ranges=ranges)  # fmt: skip
        path = save_model(expanded.model, where / f"{name}.onnx")
        self.say(f"building {name} ({plan.summary()}) with {self.profile.engine} ...")
        return self.build(path, name, where), expanded.seconds, path

    def build(self, path: Path, name: str, where: Path | None = None, profile: Profile | None = None) -> Engine:
        """Build ``path`` as ``name`` (``profile``: a float-precision variant of the run's, for the baselines)."""
        engine, hit = cached_build(self.builder, path, profile or self.profile, (where or self.tmp) / name,
                                   enabled=self.use_cache)  # fmt: skip
        if hit:
            self.say(f"{name}: engine cache hit, not rebuilt")
        return engine

    def measure(self, label: str, plan: Plan, engine: Engine, path: Path, timing: TimingSettings,
                what: str = "") -> Measured:  # fmt: skip
        """Time an engine of this run and keep it as a candidate (``what``: how progress names it)."""
        self.say(f"timing {what or label} ({timing.duration_s:g} s) ...")
        m = Measured(label, plan, engine, path, self.builder.time(engine, timing))
        self.measured.append(m)
        return m

    def measured_plan(self, plan: Plan) -> Measured | None:
        """The engine of this run that carries out ``plan`` (same layer settings, same engine float precision and
        dynamic activations)."""
        want = engine_profile(self.profile, plan)
        return next((m for m in self.measured if m.plan.layers == plan.layers
                     and engine_profile(self.profile, m.plan) == want), None)  # fmt: skip


def build(
    model_path: str | Path,
    profile: Profile | str,
    *,
    budget_ms: float | None = None,
    budget_ratio: float | None = None,
    relative_to: str = "int8",
    out_dir: str | Path | None = None,
    plan: Plan | None = None,
    timing: TimingSettings | None = None,
    calibration_path: str | Path | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
    samples: str | Path | None = None,
    preprocess: Preprocess | None = None,
    threads: int = 0,
    **overrides: object,
) -> Report:
    """Plan (or take ``plan`` / the flag ``overrides``), expand, build, time next to the baselines, report.

    ``budget_ratio`` sets the budget relative to an engine measured in the same run, ``relative_to``: ``int8`` the
    plain int8 engine (K = 1), ``fp32`` the FP32 engine, ``default`` the runtime's default float engine (what a user
    gets by just loading the model: bf16 on AVX-512 BF16 / AMX CPUs, else the FP32 engine).
    ``samples`` (``.npy`` / ``.npz`` / a folder of images, preprocessed by ``preprocess``) are the user's own
    inputs: the returned engine's fidelity against FP32 is measured on them beside the synthetic estimate —
    they never touch quantization. ``threads``: the inference threads of every engine; 0 (default) measures
    whether fewer than the runtime's default are faster (:mod:`rexdeploy.runtime_threads`), unless the profile
    fixes them.
    Engines are reused from the engine cache (:mod:`rexdeploy.builders.cache`), and the model's measured
    cost table from its cache, unless ``use_cache`` is off.
    Artifacts (expanded.onnx, plan.json, the engines, report.json, report.md, pareto.png) are written to
    ``out_dir`` (default ``rexdeploy-out/<model stem>``) only when everything succeeded.
    """
    say = progress or _quiet
    ref_path = reference_path(relative_to)
    profile = load_profile(profile) if isinstance(profile, str) else profile
    if threads:  # fixed by the caller (--threads N): nothing measured, every engine runs it
        profile = profile.with_threads(threads)
    model_path = Path(model_path)
    timing = timing or TimingSettings()
    model = load_model(model_path)
    sha = file_sha256(model_path)
    calibration = load_calibration(str(calibration_path), model) if calibration_path else None
    user_samples = load_samples(samples, model, preprocess) if samples is not None else None
    builder = builder_for(profile)
    folded, bn_stats = fold_batchnorm(model)
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
        run = _Run(model, layers, profile, builder, timing, tmp, sha, say, model_path.name, use_cache, calibration,
                   loaded_profile=profile)  # fmt: skip
        copy_model(model_path, model, tmp / "fp32.onnx")
        say(f"building the FP32 baseline with {profile.engine} ...")
        fp32_engine = run.fp32_engine = run.build(tmp / "fp32.onnx", "fp32", profile=fp32_profile(profile))
        empty = Plan(layers={}, profile=profile.name, model_sha256=sha, float_precision="fp32")
        fp32 = run.measure("FP32", empty, fp32_engine, tmp / "fp32.onnx", timing, "the FP32 baseline")
        as_loaded = fp32
        fp32 = _tune_threads(run, fp32)  # from here on run.profile carries the inference threads kept
        baseline_runs = {"fp32": fp32}
        default = _default_float(run, fp32)
        if default is not None:
            baseline_runs[default.label] = default
        if budget_ratio is not None and relative_to == "int8":
            baseline_runs["int8"] = _plain_int8(run)
        if budget_ratio is not None and ref_path is not None:
            baseline_runs[REFERENCE] = reference_engine(run, ref_path)
        elif budget_ratio is not None and relative_to != "int8" and fp32 is not as_loaded:
            # the budget is relative to the model as a user loads it: on the runtime's default threads
            baseline_runs[REFERENCE] = _as_loaded(run, as_loaded, relative_to == "default")
        baselines = {key: engine_result(_label(key, m), m, tmp, builder) for key, m in baseline_runs.items()}
        ref_key = ""
        if budget_ratio is not None:
            named = {"int8": "int8", "fp32": "fp32", "default": default.label if default is not None else "fp32"}
            ref_key = REFERENCE if REFERENCE in baseline_runs else named[relative_to]
            budget_ms = budget_ratio * baselines[ref_key].timing.median_ms
            named_as = baseline_runs[ref_key].label if ref_key == REFERENCE and not ref_path else ref_key
            say(f"budget: {budget_ratio:g} x {baseline_runs[ref_key].label if ref_path else RELATIVE_TO[relative_to]} "
                f"({named_as}) = {format_ms(budget_ms)}")  # fmt: skip
        attempts: list[Attempt] = []
        planned: PlanResult | None = None
        latency_model: dict[str, object] = {}
        choice = ""
        if use_planner:
            assert budget_ms is not None
            with tempfile.TemporaryDirectory(prefix=".rexdeploy-probes.") as probe_dir:
                relative = (baseline_runs[ref_key], budget_ratio) if budget_ratio is not None else None
                chosen, planned, latency_model, choice = _closed_loop(run, budget_ms, attempts, Path(probe_dir),
                                                                      relative)  # fmt: skip
                if relative is not None and run.settled_reference is not None:  # the budget as the rounds set it,
                    budget_ms = float(latency_model.get("budget_ms", budget_ms))  # type: ignore[arg-type]
                    settled = run.settled_reference
                    baselines[ref_key] = engine_result(_label(ref_key, settled), settled, tmp, builder)
                for key, base in list(baselines.items()):  # a baseline timed again: its new timing where it is
                    # faster (a near miss: noise only adds time), or always after the interleaved rounds, whose
                    # timings are the comparable ones (the returned engine may be a baseline: one engine, one time)
                    again = next((m for m in run.measured if m.engine is baseline_runs[key].engine), None)
                    if again is not None and (again.timing.median_ms < base.timing.median_ms or relative is not None):
                        baselines[key] = engine_result(_label(key, again), again, tmp, builder)
                check = run.checks[id(chosen.engine)]
                if chosen.engine.artifacts and Path(chosen.engine.artifacts[0]).parent != tmp / "rex":
                    chosen = _adopt(chosen, tmp)  # the returned engine is always at rex/, whichever it is
            plan, rex_engine, expand_s = chosen.plan, chosen.engine, 0.0
            rex_result = engine_result("rex", chosen, tmp, builder)
            final_onnx = chosen.onnx_path
            returned = chosen
        else:
            assert plan is not None
            rex_engine, expand_s, final_onnx = run.engine_for(plan, "rex", None)
            rex_m = run.measure("REx", plan, rex_engine, final_onnx, timing, "the REx engine")
            rex_result = engine_result("rex", rex_m, tmp, builder)
            check = _check(run, rex_m, plan.predicted_error or 0.0)
            if not check.passed:
                raise BuildError(f"the REx engine ({plan.summary()}) {check.text}: {profile_hint(profile)}")
            returned = rex_m
        if calibration is None and user_samples is None:
            for warning in input_scale_warnings(folded, bn_stats, layers, plan):
                warnings = [*warnings, warning]
                say(f"warning: {warning}")
        bare = _bare_load(run, returned, check)
        if bare.get("warning"):
            warnings = [*warnings, str(bare["warning"])]
            say(f"warning: {bare['warning']}")
        if plan.layers and final_onnx.exists() and final_onnx != tmp / "expanded.onnx":
            shutil.copyfile(final_onnx, tmp / "expanded.onnx")
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        say("measuring fidelity against FP32 on synthetic probes (an estimate) ...")
        fidelity = run.estimate(rex_engine)
        fidelity_samples = None
        if user_samples is not None:
            n = next(iter(user_samples.values())).shape[0]
            say(f"measuring fidelity against FP32 on your {n} samples ...")
            fidelity_samples = measure_fidelity_on(builder, fp32_engine, rex_engine, user_samples, output_names(model))
            disagreement = fidelity_disagreement(fidelity, fidelity_samples)
            if disagreement:
                warnings = [*warnings, disagreement]
        ref_fidelity = ref_samples = None
        if REFERENCE in baseline_runs:  # the user's own engine on the same inputs: the comparison they decide on
            yours = baseline_runs[REFERENCE]
            say(f"measuring {yours.label} against FP32 on the same synthetic probes ...")
            ref_fidelity = run.estimate(yours.engine)
            if user_samples is not None:
                ref_samples = measure_fidelity_on(builder, fp32_engine, yours.engine, user_samples, output_names(model))
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
            fidelity_samples=fidelity_samples,
            expand_seconds=expand_s,
            out_dir=str(out),
            warnings=tuple(warnings),
            attempts=tuple(attempts),
            front=tuple(c.to_dict() for c in planned.front) if planned else (),
            choice=choice,
            latency_model=latency_model,
            self_check=check.to_dict(),
            bare_load=bare,
            reference_fidelity=ref_fidelity,
            reference_fidelity_samples=ref_samples,
            threads=run.threads.to_dict() if run.threads is not None else {},
        )
        if planned is not None:
            png = write_pareto_png(tmp / "pareto.png", report, planned)
            if png is None:
                report = report.with_warning(
                    "matplotlib is not installed: no pareto.png (pip install 'rexdeploy[report]')"
                )
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.md").write_text(report.to_markdown(), encoding="utf-8")
        if report.fits_budget is False and not use_planner:
            fastest = min(e.timing.median_ms for e in [rex_result, *baselines.values()])
            raise BudgetError(
                f"the REx engine ({plan.summary()}) measured {format_ms(rex_result.timing.median_ms)}, over the "
                f"{format_ms(budget_ms or 0.0)} budget (FP32 measured {format_ms(baselines['fp32'].timing.median_ms)}; "
                f"fastest seen {format_ms(fastest)}): relax --budget or lower --order"
            )
    return report


def cost_table_for(
    model_path: str | Path,
    profile: Profile,
    *,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> CostTable | None:
    """The measured cost table of a model on this device, for planning without a build (``rexdeploy plan``):
    cached, or probed now in a temporary folder (the float engine and the probes, timed briefly and
    profiled). None when the profile's engine is not installed here or has no per-layer profiler — the
    planner then answers with the analytic model, labelled as an estimate."""
    from rexdeploy.builders.registry import get_builder

    builder = get_builder(profile.engine)
    if not builder.available() or not callable(getattr(builder, "layer_times", None)):
        return None
    say = progress or _quiet
    model_path = Path(model_path)
    model = load_model(model_path)
    layers = quantizable_layers(fold_batchnorm(model)[0], model_path.name)
    with tempfile.TemporaryDirectory(prefix=".rexdeploy-probes.") as work:
        tmp = Path(work)
        run = _Run(model, layers, profile, builder, PROBE_TIMING, tmp, file_sha256(model_path), say, model_path.name,
                   use_cache)  # fmt: skip
        copy_model(model_path, model, tmp / "fp32.onnx")
        empty = Plan(layers={}, profile=profile.name, model_sha256=run.sha, float_precision="fp32")
        if use_cache:
            from rexdeploy.probing import load_cached, table_key

            cached = load_cached(table_key(run.sha, profile, builder))
            if cached is not None:
                say(f"cost table: cached ({len(cached.probes)} probe engines measured earlier on this host)")
                return dataclasses.replace(cached, cached=True)
        say(f"building the float engine with {profile.engine} ...")
        fp32 = run.measure("FP32", empty, run.build(tmp / "fp32.onnx", "fp32", profile=fp32_profile(profile)),
                           tmp / "fp32.onnx", PROBE_TIMING, "the float engine")  # fmt: skip
        _default_float(run, fp32, measure_error=False)
        return _cost_table(run, tmp)[0]


def engine_result(label: str, m: Measured, root: Path, builder: Builder) -> EngineResult:
    """The report's record of an engine measured in this run."""
    summary = getattr(builder, "precision_summary", None)
    precisions: dict[str, dict[str, int]] = summary(m.engine) if callable(summary) else {}
    return EngineResult(
        label=label,
        timing=m.timing,
        build_seconds=m.engine.build_seconds,
        artifacts=tuple(
            str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in m.engine.artifacts
        ),
        backend_version=m.engine.backend_version,
        precisions=precisions,
    )


def _label(key: str, m: Measured) -> str:
    """A baseline's label in the report: its key (``fp32``, ``int8``, ``bf16 (default)``); the user's own engine's
    says which file it is."""
    return m.label if key == REFERENCE else key


def _adopt(m: Measured, tmp: Path) -> Measured:
    """Copy the returned engine (an attempt, a baseline, or a probe built outside the output folder) to the
    stable path ``rex/`` (its ONNX to ``rex.onnx``), where scripts and ``rexdeploy export`` find it."""
    src = Path(m.engine.artifacts[0]).parent
    dest = tmp / "rex"
    shutil.copytree(src, dest, dirs_exist_ok=True)
    onnx_path = tmp / "rex.onnx"
    shutil.copyfile(m.onnx_path, onnx_path)
    artifacts = tuple(dest / Path(a).name for a in m.engine.artifacts)
    engine = Engine(**{**m.engine.__dict__, "artifacts": artifacts})
    return Measured(m.label, m.plan, engine, onnx_path, m.timing, m.layer_times)


def _closed_loop(
    run: _Run,
    budget_ms: float,
    attempts: list[Attempt],
    probe_dir: Path,
    relative: tuple[Measured, float] | None = None,
) -> tuple[Measured, PlanResult, dict[str, object], str]:
    """Probe (or read the cached cost table), plan, build, time; on a miss learn from the engine and re-plan.
    ``relative``: the budget is this ratio × that engine's latency (``--budget-ratio``), settled at the end in
    interleaved rounds (:func:`_paired_rounds`; its ``budget_ms`` in the latency-model record). Returns the engine
    chosen among every engine measured, the last planning result, the latency-model record for the report and why
    the engine was chosen."""
    table, latency_model = _cost_table(run, probe_dir)
    float_ok = run.profile.quantization.float_activations  # an int8-only device cannot run the FP32 engine
    scale = 1.0
    drifts: list[float] = []  # the machine's speed changes the table was rescaled by, one per miss it explained
    result: PlanResult | None = None
    run.say("planner: sensitivity and data-free activation ranges ...")
    prepared = prepare(run.model, run.layers, calibration=run.calibration, profile=run.profile)  # type: ignore[arg-type]
    planning_s = prepared.seconds
    measured_float = next((m for m in run.measured if not m.plan.layers and m.error is not None
                           and m.plan.float_precision not in ("", "fp32")), None)  # fmt: skip
    if measured_float is not None:  # the default float engine's error, measured: the model's float terms follow it
        float_scale = prepared.errors.calibrate_float(measured_float.plan.float_precision, measured_float.error or 0.0)
        latency_model["float_error_scale"] = float_scale
        run.say(f"error model: {measured_float.plan.float_precision} rounding scaled by {float_scale:.2f} to the "
                f"{measured_float.label} engine's measured error ({measured_float.error:.2e})")  # fmt: skip
    for attempt in range(1, MAX_ATTEMPTS + 1):
        target = budget_ms * (1.0 - PLANNING_MARGIN)
        result = plan_model(run.model, run.layers, run.profile, target, model_sha256=run.sha,
                            calibration=run.calibration, latency_scale=scale, cost_table=table,  # type: ignore[arg-type]
                            fastest_if_none_fits=True, prepared=prepared)  # fmt: skip
        chosen = result.chosen
        planning_s += result.seconds
        verdict = (
            ""
            if result.fits
            else f" (nothing predicted to fit {format_ms(target)} (budget - {PLANNING_MARGIN:.0%}): the fastest)"
        )
        run.say(f"plan (attempt {attempt}): {chosen.label}: predicted {format_ms(chosen.predicted_latency_ms)}, "
                f"error {chosen.predicted_error:.2e}{verdict} ({len(result.candidates)} candidates, {result.seconds:.2f} s)")  # fmt: skip
        settled = _best_fitting(run, result, budget_ms, float_ok)
        if settled is not None and _error(result, settled) <= chosen.predicted_error:
            run.say(f"{_describe(settled)} measured {format_ms(settled.timing.median_ms)} in this run, within budget "
                    f"and at least as accurate as the plan: nothing to build")  # fmt: skip
            break
        m = run.measured_plan(result.plan)
        name = f"rex_attempt{attempt}"
        if m is None:
            engine, _, path = run.engine_for(result.plan, name, result.ranges, where=run.attempts_dir())
            m = run.measure(result.chosen.label, result.plan, engine, path, run.timing, f"the REx engine ({name})")
        attempts.append(Attempt(attempt, name if m.onnx_path.stem == name else m.onnx_path.stem,
                                _plan_text(run, result.plan),
                                chosen.predicted_latency_ms, m.timing.median_ms, scale))  # fmt: skip
        if m.onnx_path.stem != name:  # measured before (a baseline or probe): nothing new to learn from it
            break
        if m.timing.median_ms > budget_ms:  # a miss: time it again before believing it (noise only adds time)
            run.say(f"measured {format_ms(m.timing.median_ms)} > budget {format_ms(budget_ms)}: timing it again ...")
            again = run.builder.time(m.engine, run.timing)
            if again.median_ms < m.timing.median_ms:
                m = dataclasses.replace(m, timing=again)
                run.measured[-1] = m
                attempts[-1] = dataclasses.replace(attempts[-1], measured_ms=again.median_ms)
        if m.timing.median_ms <= budget_ms:
            break
        drift = _machine_drift(run) if table is not None else 1.0
        if table is not None and abs(drift - 1.0) > DRIFT_TOLERANCE:
            # the machine itself changed speed since the baselines were timed: the miss is (partly) the machine's,
            # and learning it per layer would teach the table the load of this minute; rescale it as a whole
            run.say(f"measured {format_ms(m.timing.median_ms)} > budget {format_ms(budget_ms)}, but the FP32 baseline "
                    f"now takes {drift:.2f}x its first timing (load or clock changed): the cost table is rescaled, not "
                    "taught this engine")  # fmt: skip
            table = table.scaled(drift)
            drifts.append(drift)
        elif table is not None:
            run.say(
                f"measured {format_ms(m.timing.median_ms)} > budget {format_ms(budget_ms)}: learning from this engine"
            )
            table = _learn(run, table, m)
            if run.use_cache:
                save_cached(table)  # the next build of this model starts from what this miss taught
        else:
            run.say(
                f"measured {format_ms(m.timing.median_ms)} > budget {format_ms(budget_ms)}: learning from this engine"
            )
            scale *= m.timing.median_ms / max(chosen.predicted_latency_ms, 1e-9)
            log.debug("attempt %d: new latency scale %.3f", attempt, scale)
    assert result is not None
    latency_model["planning_s"] = planning_s
    latency_model["planning_margin"] = PLANNING_MARGIN
    if table is not None:
        latency_model["observations"] = table.observations
    if drifts:
        latency_model["drift_rescales"] = drifts

    def error(m: Measured) -> float:
        return _error(result, m)

    if relative is not None and not any(m.timing.median_ms <= budget_ms for m in _allowed(run, float_ok)):
        # nothing fits yet: build the fastest candidates now, so that the rounds time them beside the reference (a
        # fallback timed once after the rounds met a slow minute: 2.93 ms for an engine the rounds put at 2.45)
        _fallbacks(run, result, budget_ms, attempts)
    allowed = _estimate_contenders(run, _allowed(run, float_ok), budget_ms)
    if relative is not None:
        budget_ms, allowed = _paired_rounds(run, allowed, budget_ms, *relative, error)
        allowed = _estimate_contenders(run, allowed, budget_ms)  # what the rounds brought within reach: measured too
        latency_model["budget_ms"] = budget_ms
    else:
        _retime_near_misses(run, allowed, budget_ms, error)
    fitting = [m for m in allowed if m.timing.median_ms <= budget_ms] or _fallbacks(run, result, budget_ms, attempts)
    if relative is not None:
        fitting = _clear_of_the_reference(run, fitting, relative[0], relative[1])
    if not fitting:
        fastest = min(allowed or run.measured, key=lambda m: m.timing.median_ms)
        raise BudgetError(
            f"no engine fits the {format_ms(budget_ms)} budget on {run.profile.name}: the fastest measured, "
            f"{_describe(fastest)}, runs in {format_ms(fastest.timing.median_ms)} "
            f"({len(run.measured)} engines measured in this run); "
            + ("relax --budget or pick a faster profile" if relative is None else _relative_advice(fastest, budget_ms, *relative))
        )  # fmt: skip
    best = _first_sound(run, sorted(fitting, key=lambda m: (error(m), m.timing.median_ms)), error)
    by_profile = {
        id(m.engine) for m in _allowed(run, float_ok)
    }  # what the profile allows (not: what was in the rounds)
    # with a relative budget only the engines the rounds timed have comparable timings: the others are not said to fit
    compared = {id(m.engine) for m in [*allowed, *fitting]} if relative is not None else {id(m.engine) for m in run.measured}
    latency_model["engines"] = [
        {"label": m.label, "plan": _plan_text(run, m.plan), "median_ms": m.timing.median_ms,
         "predicted_error": error(m), "error_source": _error_source(m),
         "fits": m.timing.median_ms <= budget_ms and id(m.engine) in compared, "compared": id(m.engine) in compared, "tie": id(m.engine) in run.ties,
         "allowed": id(m.engine) in by_profile,
         "returned": m is best, "self_check": run.checks[id(m.engine)].to_dict() if id(m.engine) in run.checks else None}
        for m in sorted(run.measured, key=lambda m: m.timing.median_ms)
    ]  # fmt: skip
    why = (
        f"{_describe(best)}: measured {format_ms(best.timing.median_ms)} within the {format_ms(budget_ms)} budget, "
        + (
            "exact (no layer quantized)"
            if not best.plan.layers and best.error is None
            else f"measured error {best.error:.2e} vs FP32 on the probes"
            if best.error is not None
            else f"predicted error {error(best):.2e}"
        )
        + f"; the most accurate of the {len(fitting)} of {len(allowed)} engines measured in this run that fit"
    )
    run.say(f"chosen: {why}")
    return best, result, latency_model, why


def _bare_load(run: _Run, m: Measured, check: SelfCheck) -> dict[str, object]:
    """Where a bare load of the returned engine (``core.compile_model(ir)``, no options: what users do) runs
    another precision than the engine was measured in, that bare engine against the exact arithmetic of its ONNX,
    and a warning when it loses what the engine keeps. {} where the builder cannot load an engine bare."""
    load = getattr(run.builder, "load", None)
    ir = next((Path(a) for a in m.engine.artifacts if str(a).endswith(".xml")), None)
    if ir is None or not callable(load) or "options" not in inspect.signature(load).parameters:
        return {}
    precision = m.engine.options.get("INFERENCE_PRECISION_HINT", "")
    bare = load(ir, run.profile, options={})
    bare_precision = bare.options.get("INFERENCE_PRECISION_HINT", "")
    if bare_precision == precision:
        return {"precision": bare_precision, "same_as_engine": True}
    run.say(f"checking the engine loaded with no options (OpenVINO's default here: {bare_precision}) ...")
    measured = self_check(run.builder, bare, m.onnx_path, check.tolerance, bare_precision)
    out: dict[str, object] = {"precision": bare_precision, "engine_precision": precision, "same_as_engine": False,
                              "relative_error": measured.relative_error, "engine_relative_error": check.relative_error}  # fmt: skip
    out["text"] = (f"{bare_precision} (the engine: {precision}); {measured.relative_error:.2e} from the engine's ONNX "
                   f"(the engine as measured: {check.relative_error:.2e})")  # fmt: skip
    if measured.relative_error > max(4.0 * check.relative_error, SELF_CHECK_FLOOR):  # loses what the engine keeps
        out["warning"] = (
            f"loaded with no options (core.compile_model('{ir.parent.name}/{ir.name}')) this engine runs "
            f"{bare_precision} on this CPU and is {measured.relative_error:.1e} off its ONNX (as measured: "
            f"{check.relative_error:.1e}): load it with the options in {ir.parent.name}/runtime_options.json "
            "(rexdeploy's loader, examples/edge_deploy.py and the Triton export read them)"
        )
    return out


def _check(run: _Run, m: Measured, predicted_error: float) -> SelfCheck:
    """Self-check an engine of this run against the exact arithmetic of its ONNX (kept on the run)."""
    if id(m.engine) not in run.checks:
        run.say(f"self-check: {_describe(m)} against onnxruntime on its ONNX ...")
        precision = engine_float_precision(run.profile, m.plan)
        noise = max((f.error or 0.0 for f in run.measured if not f.plan.layers and f.error is not None
                     and engine_float_precision(run.profile, f.plan) == precision), default=0.0)  # fmt: skip
        run.checks[id(m.engine)] = self_check(run.builder, m.engine, m.onnx_path, predicted_error, precision,
                                              float_noise=noise)  # fmt: skip
    return run.checks[id(m.engine)]


def _machine_drift(run: _Run) -> float:
    """How much slower (> 1) the machine runs now than when the FP32 baseline was first timed: that engine timed
    again briefly, now / then (1 without it)."""
    fp32 = next((m for m in run.measured if not m.plan.layers and m.plan.float_precision == "fp32"), None)
    if fp32 is None or fp32.timing.median_ms <= 0.0:
        return 1.0
    settings = dataclasses.replace(run.timing, duration_s=PAIRED_ROUND_S, warmup_s=min(run.timing.warmup_s, 0.1))
    return run.builder.time(fp32.engine, settings).median_ms / fp32.timing.median_ms


def _estimate_contenders(run: _Run, allowed: list[Measured], budget_ms: float) -> list[Measured]:
    """Measure the fidelity estimate of every quantized engine within :data:`NEAR_MISS` of the budget, so that the
    choice among them and the float engines (whose errors are measured) compares measured errors on the same probes,
    not the error model's prediction (which misses what it does not model: clipping interplay, the quantized
    residual Adds, the engine's own rounding). Returns ``allowed`` with those errors set (the run's records too)."""
    out = []
    for m in allowed:
        if m.plan.layers and m.error is None and m.timing.median_ms <= budget_ms * (1.0 + NEAR_MISS):
            run.say(f"fidelity estimate of {_describe(m)} on the probes ...")
            estimated = dataclasses.replace(m, error=run.estimate(m.engine).relative_error)
            run.measured[run.measured.index(m)] = estimated
            m = estimated
        out.append(m)
    return out


def _paired_rounds(run: _Run, allowed: list[Measured], budget_ms: float, reference: Measured, ratio: float,
                   error: Callable[[Measured], float]) -> tuple[float, list[Measured]]:  # fmt: skip
    """A budget relative to ``reference`` (``ratio`` × its latency), settled where the machine's speed drifts: the
    reference, the :data:`PAIRED_MAX` most accurate engines at most :data:`PAIRED_WINDOW` × the budget in their first
    timing and the fastest engine are timed again in :data:`PAIRED_ROUNDS` interleaved rounds (each round times each
    once, in a rotated order); each keeps the timing of its median round,
    and the budget becomes ``ratio`` × the reference's. Sequential timings a minute apart differed by up to 1.5x on
    a shared host, which decided whether an engine fit; rounds put every engine under the same conditions. Where the
    settled budget is so much higher than the first that an engine left out of the rounds could now fit and be more
    accurate than what does, the rounds run once more around the settled budget (a lucky first timing of the
    reference must not exclude the engines its real latency allows).
    Returns the budget and the engines of ``allowed`` the rounds timed, with their new timings (the run's records
    too)."""
    others = [m for m in allowed if m.engine is not reference.engine]
    ref = next((m for m in run.measured if m.engine is reference.engine), reference)
    timed: dict[int, Measured] = {}
    for _ in range(2):
        near = [m for m in others if m.timing.median_ms <= budget_ms * PAIRED_WINDOW]
        near = sorted(near, key=lambda m: (error(m), m.timing.median_ms))[:PAIRED_MAX]
        fastest = min(others, key=lambda m: m.timing.median_ms, default=None)
        if fastest is not None and all(m is not fastest for m in near):  # whatever the drift, the fastest is timed
            near.append(fastest)
        run.say(f"budget {ratio:g} x {reference.label}: timing it and {len(near)} engine(s) near "
                f"{format_ms(budget_ms)} in {PAIRED_ROUNDS} interleaved rounds ...")  # fmt: skip
        settled, per_round = _rounds(run, [ref, *near])
        ref = settled[0]
        run.round_ratios = {id(m.engine): sorted((per_round[i] / per_round[0]).tolist()) for i, m in enumerate(settled)}
        timed = {id(m.engine): m for m in settled}  # the reference too: a baseline of the run competes
        others = [timed.get(id(m.engine), m) for m in others]
        budget_ms = ratio * ref.timing.median_ms
        run.say(f"budget settled at {format_ms(budget_ms)} ({ratio:g} x {reference.label} "
                f"{format_ms(ref.timing.median_ms)} in the rounds)")  # fmt: skip
        competing = [m for m in timed.values() if any(a.engine is m.engine for a in allowed)]  # not the user's own
        best = min((error(m) for m in competing if m.timing.median_ms <= budget_ms), default=float("inf"))
        if not [m for m in others if id(m.engine) not in timed and m.timing.median_ms <= budget_ms * PAIRED_WINDOW
                and error(m) < best]:  # fmt: skip
            break
    run.settled_reference = ref
    # only what the rounds timed competes now: an engine left out was less accurate, or over the budget before
    return budget_ms, [timed[id(m.engine)] for m in allowed if id(m.engine) in timed]


def _relative_advice(fastest: Measured, budget_ms: float, reference: Measured, ratio: float) -> str:
    """What to do when nothing fits a relative budget: the ratio that would admit the fastest engine, and whether it
    missed by so little that it is a tie with the reference (:data:`TIE_MARGIN`) that a rerun may turn over."""
    over = fastest.timing.median_ms / (budget_ms / ratio)  # to the reference as the rounds timed it
    advice = f"it ran {over:.2f}x {reference.label} in the rounds: --budget-ratio {math.ceil(over * 100) / 100:.2f} admits it"
    if over <= ratio * (1.0 + TIE_MARGIN):
        advice += f" (within {TIE_MARGIN:.0%} of the budget: a tie within the host's timing noise, a rerun may fit)"
    return advice


def _clear_of_the_reference(run: _Run, fitting: list[Measured], reference: Measured, ratio: float) -> list[Measured]:
    """When the reference of a relative budget is itself a candidate that fits (``--relative-to default``) and the
    budget is within :data:`TIE_MARGIN` of it (``ratio`` ≤ 1.05: "no slower than the reference"), another
    engine is taken over it only if it is clear of the budget: its median per-round ratio at most ``ratio`` ×
    (1 − :data:`TIE_MARGIN`), and within ``ratio`` in at least three rounds in four (upper quartile). Closer, it is
    a tie that the next run may turn over: the digits ViT's FP32 engine ran 0.96x its bf16 default float engine in
    a build's rounds and 1.05x (1.01–1.07) it in rounds a minute later; the digits CNN's 1.0x, then 1.02x. The
    reference itself always fits the budget it sets (at ratio ≥ 1)."""
    if ratio > 1.0 + TIE_MARGIN or not any(m.engine is reference.engine for m in fitting):
        return fitting  # a budget well above the reference: an engine near it is no tie with the reference
    kept = []
    for m in fitting:
        ratios = run.round_ratios.get(id(m.engine), [])
        if m.engine is not reference.engine and ratios:
            median, upper = float(np.median(ratios)), float(np.quantile(ratios, 0.75))
            if median > ratio * (1.0 - TIE_MARGIN) or upper > ratio:
                run.say(f"{_describe(m)} fits the budget but ran {median:.2f}x {reference.label} in the rounds "
                        f"(upper quartile {upper:.2f}x): not clear of it by the {TIE_MARGIN:.0%} that engines' timings "
                        "move between runs on a shared host, so not taken over it")  # fmt: skip
                run.ties.add(id(m.engine))
                continue
        kept.append(m)
    return kept


def _rounds(run: _Run, engines: list[Measured]) -> tuple[list[Measured], np.ndarray]:
    """``engines`` timed in :data:`PAIRED_ROUNDS` interleaved rounds (each round times each once, in a rotated order),
    each with the timing of its median round (the run's records updated; the user's own engine is not one), and
    the median latency of each engine (rows) in each round (columns)."""
    settings = dataclasses.replace(run.timing, duration_s=PAIRED_ROUND_S, warmup_s=min(run.timing.warmup_s, 0.1))
    rounds = interleaved_rounds(run.builder, [m.engine for m in engines], settings, PAIRED_ROUNDS)
    out = []
    for m, timings in zip(engines, rounds, strict=True):
        settled = dataclasses.replace(m, timing=sorted(timings, key=lambda t: t.median_ms)[len(timings) // 2])
        index = next((i for i, old in enumerate(run.measured) if old.engine is m.engine), None)
        if index is not None:  # the user's own engine (--relative-to PATH) is not one of the run's candidates
            run.measured[index] = settled
        out.append(settled)
    return out, np.array([[t.median_ms for t in timings] for timings in rounds])


def _retime_near_misses(
    run: _Run, allowed: list[Measured], budget_ms: float, error: Callable[[Measured], float]
) -> None:
    """Time once more every engine measured at most :data:`NEAR_MISS` over the budget that is more accurate than
    the best engine within it (a baseline timed once, such as the default float engine, included): noise only
    adds time, so a near miss may be the machine's, not the engine's. The faster timing is kept (``allowed`` and
    the run's records are updated in place)."""
    fitting = [m for m in allowed if m.timing.median_ms <= budget_ms]
    best = min((error(m) for m in fitting), default=float("inf"))
    for i, m in enumerate(allowed):
        if not budget_ms < m.timing.median_ms <= budget_ms * (1.0 + NEAR_MISS) or error(m) >= best:
            continue
        run.say(f"{_describe(m)} measured {format_ms(m.timing.median_ms)}, just over the {format_ms(budget_ms)} "
                "budget and more accurate than what fits: timing it again ...")  # fmt: skip
        again = run.builder.time(m.engine, run.timing)
        if again.median_ms < m.timing.median_ms:
            retimed = dataclasses.replace(m, timing=again)
            allowed[i] = retimed
            run.measured[run.measured.index(m)] = retimed


def _first_sound(run: _Run, ranked: list[Measured], error: Callable[[Measured], float]) -> Measured:
    """The first engine of ``ranked`` whose outputs agree with the exact arithmetic of its ONNX; an engine that
    disagrees beyond its predicted error is a miscompilation and is not returned."""
    for m in ranked:
        check = _check(run, m, error(m))
        if check.passed:
            return m
        run.say(f"warning: {_describe(m)}: {check.text}: an engine miscompilation, not returned")
    raise BuildError(
        f"every engine that fits the budget disagrees with onnxruntime on its own ONNX ({len(ranked)} checked): "
        f"{profile_hint(run.profile)}"
    )


def profile_hint(profile: Profile) -> str:
    """What to try when the engine miscompiles on this host."""
    return (f"the {profile.engine} engine miscompiles this model on this host with profile {profile.name!r}; "
            f"try --profile auto ({host_profile_name()}) or report it with the model")  # fmt: skip


def _error(result: PlanResult, m: Measured) -> float:
    """A measured engine's error vs FP32: measured (a default-float engine), else the error model's."""
    if m.error is not None:
        return m.error
    return result.plan_error(m.plan)


def _error_source(m: Measured) -> str:
    """How an engine's error in the report was obtained."""
    if m.error is not None:
        return "measured on the probes"
    return "exact" if not m.plan.layers else "error model"


def _allowed(run: _Run, float_ok: bool) -> list[Measured]:
    """The engines of this run the profile may return (an int8-only device: every layer int8)."""
    return [m for m in run.measured if float_ok or (m.plan.layers and len(m.plan.layers) == len(run.layers) and all(
        lp.act_bits == 8 for lp in m.plan.layers.values()))]  # fmt: skip


def _best_fitting(run: _Run, result: PlanResult, budget_ms: float, float_ok: bool) -> Measured | None:
    """The most accurate engine measured so far within the budget, if any."""
    fitting = [m for m in _allowed(run, float_ok) if m.timing.median_ms <= budget_ms]
    return min(fitting, key=lambda m: (_error(result, m), m.timing.median_ms)) if fitting else None


def _fallbacks(run: _Run, result: PlanResult, budget_ms: float, attempts: list[Attempt]) -> list[Measured]:
    """Nothing measured fits: build and time the fastest candidate the planner knows, then plain int8 (usually
    the fastest engine), until one fits; returns it ([] when none does)."""
    fallbacks = [min(result.candidates, key=lambda c: c.predicted_latency_ms).plan]
    fallbacks += [c.plan for c in result.candidates if re.fullmatch(r"uniform W\d+A8 K=1", c.label)][:1]
    for i, fallback in enumerate(fallbacks):
        if run.measured_plan(fallback) is not None:
            continue
        name = f"rex_fastest{i + 1}"
        summary = _plan_text(run, fallback)
        run.say(f"nothing measured fits: building {summary} ...")
        engine, _, path = run.engine_for(fallback, name, result.ranges, where=run.attempts_dir())
        m = run.measure("fastest candidate", fallback, engine, path, run.timing, "a fast candidate")
        attempts.append(Attempt(len(attempts) + 1, name, summary, fallback.predicted_latency_ms or 0.0,
                                m.timing.median_ms, 1.0))  # fmt: skip
        if m.timing.median_ms <= budget_ms:
            return [m]
    return []


def _learn(run: _Run, table: CostTable, m: Measured) -> CostTable:
    """``table`` updated with what each layer of the measured engine ``m`` cost (its profiler, scaled to its
    median)."""
    times = m.layer_times or run.builder.layer_times(m.engine, PROFILE_TIMING)
    owners = node_owners(onnx.load(str(m.onnx_path), load_external_data=False), run.layers)
    per_layer, rest = split_layer_times(times, owners, m.timing.median_ms)
    return table.observe(engine_profile(run.profile, m.plan), run.layers, m.plan.layers, per_layer, rest)


def fp32_profile(profile: Profile) -> Profile:
    """The run's profile with its engine's float layers in f32: the FP32 reference."""
    return profile.with_float_precision("fp32") or profile


def default_float_precision(builder: Builder, profile: Profile) -> str:
    """The float precision a user of this device gets without rexdeploy: the profile's own when it is reduced
    (bf16 / fp16), else the engine's default on this device (OpenVINO on an AVX-512 BF16 CPU: bf16)."""
    own = float_precision(profile)
    if own != "fp32":
        return own
    query = getattr(builder, "default_float_precision", None)
    return str(query(profile)) if callable(query) else "fp32"


def _tune_threads(run: _Run, fp32: Measured) -> Measured:
    """The inference threads of the run's engines, measured (:mod:`rexdeploy.runtime_threads`): the FP32 engine
    on the runtime's default threads and on each count the builder offers, in interleaved rounds. Where fewer
    threads are clearly faster, ``run.profile`` runs them from here on and the FP32 engine on them replaces
    ``fp32`` (returned) among the candidates. Nothing is tried where the profile fixes the threads itself."""
    if run.profile.parallel.threads or not callable(getattr(run.builder, "thread_choices", None)):
        return fp32
    if fp32.timing.median_ms > THREAD_MAX_MS:
        run.say(f"threads: the runtime's default kept, fewer not tried: the FP32 engine takes "
                f"{format_ms(fp32.timing.median_ms)} (> {THREAD_MAX_MS:g} ms: its nodes' work dominates)")  # fmt: skip
        return fp32
    fp32_built = fp32_profile(run.profile)

    def variant(threads: int) -> Engine:
        run.say(f"building the FP32 engine on {threads} inference thread{'s' * (threads > 1)} ...")
        return run.build(fp32.onnx_path, f"fp32_{threads}threads", run.attempts_dir(), fp32_built.with_threads(threads))

    run.say("timing the FP32 engine on fewer inference threads (interleaved rounds) ...")
    made = choose_threads(run.builder, fp32.engine, variant, run.timing)
    if made is None:
        return fp32
    choice, variants = made
    run.threads = choice
    run.say(f"threads: {choice.summary()}")
    if not choice.changed:
        return fp32
    run.profile = run.profile.with_threads(choice.threads)
    tuned = run.measure("FP32", fp32.plan, variants[choice.threads], fp32.onnx_path, run.timing,
                        f"the FP32 baseline ({choice.threads} threads)")  # fmt: skip
    run.measured.remove(fp32)  # the same engine, slower: not a candidate
    return tuned


def _as_loaded(run: _Run, fp32: Measured, default: bool) -> Measured:
    """The budget's reference for ``--relative-to fp32`` / ``default`` once the run's threads differ from the
    runtime's: the model as a user loads it (FP32, or the device's default float precision) on the runtime's
    default threads. Like a user's own engine, never a candidate."""
    loaded = run.loaded_profile or run.profile
    made = _default_float(run, fp32, profile=loaded, candidate=False) if default else None
    m = made or fp32
    threads = run.threads.default_threads if run.threads is not None else 0
    label = f"{m.label}, as loaded ({threads} threads)" if threads else f"{m.label}, as loaded"
    return dataclasses.replace(m, label=label)


def _default_float(run: _Run, fp32: Measured, measure_error: bool = True, profile: Profile | None = None,
                   candidate: bool = True) -> Measured | None:  # fmt: skip
    """The engine a user gets by just loading the model: the device's default float precision (OpenVINO on a
    CPU with AVX-512 BF16 or AMX: bf16; TensorRT: fp16), built and timed beside FP32 when it is not f32, with
    its error vs FP32 measured on the synthetic probes (bf16 is not exact). ``profile``: the run's unless given
    (the profile as loaded, for a reference); ``candidate``: kept among the run's engines."""
    base = profile or run.profile
    if not base.quantization.float_activations:
        return None
    default = default_float_precision(run.builder, base)
    variant = base.with_float_precision(default)
    if default == "fp32" or variant is None:
        return None
    label = f"{default} (default)"
    run.say(f"building the {base.engine} default float engine ({default}) ...")
    engine = run.build(fp32.onnx_path, default if candidate else f"{default}_as_loaded", profile=variant)
    plan = dataclasses.replace(fp32.plan, float_precision=default,
                               notes=(f"float engine in {default} (the runtime's default float precision)",))  # fmt: skip
    m = run.measure(label, plan, engine, fp32.onnx_path, run.timing if measure_error else PROBE_TIMING,
                    f"the default float engine ({default})")  # fmt: skip
    if measure_error:
        err = run.estimate(engine).relative_error
        m = dataclasses.replace(m, error=err)
        run.measured[-1] = m
    if not candidate:
        run.measured.remove(m)
    return m


def _plan_text(run: _Run, plan: Plan) -> str:
    """A plan in one line; a float plan as the precision its engine runs in."""
    return plan.summary() if plan.layers else f"no layer quantized ({engine_float_precision(run.profile, plan)})"


def _describe(m: Measured) -> str:
    if m.error is not None and not m.plan.layers:
        return f"the {m.label} float engine"
    if not m.plan.layers:
        return "the FP32 engine"
    return f"{m.label} ({m.plan.summary()})"


def _plain_int8(run: _Run, why: str = "") -> Measured:
    """The plain int8 engine (every layer W8A8 K=1), built and timed as a candidate of the run."""
    plan = default_plan(run.layers, run.profile, run.sha, order=1, act_bits=8)
    engine, _, path = run.engine_for(plan, "int8", None)
    return run.measure("int8 K=1", plan, engine, path, run.timing, f"the plain int8 engine{why}")


def _cost_table(run: _Run, probe_dir: Path) -> tuple[CostTable | None, dict[str, object]]:
    """The measured cost table of this model on this device (probed now or cached), or None — the analytic
    model then answers — when the builder has no per-layer profiler."""
    if not callable(getattr(run.builder, "layer_times", None)):
        run.say(
            f"{run.profile.engine} has no per-layer profiler here: planning on the analytic cost model (an estimate)"
        )
        return None, {
            "source": "estimate",
            "summary": f"analytic cost model of profile {run.profile.name} (an estimate)",
        }
    floats = [m for m in run.measured if not m.plan.layers]  # FP32 and the default float engine
    reuse = {m.label: m for m in run.measured if m.label == "int8 K=1"}

    def make(probe: Probe) -> Measured:
        name = "probe_" + "".join(c if c.isalnum() else "_" for c in probe.label.lower())
        engine, _, path = run.engine_for(probe.plan, name, None, where=probe_dir)
        return run.measure(probe.label, probe.plan, engine, path, BUILD_CHECK, f"probe {probe.label} (a first run)")

    producers = layer_producers(fold_batchnorm(run.model)[0], run.layers)
    table, probed = probe_cost_table(run.builder, run.layers, run.profile, run.sha, make, producers=producers,
                                     float_engines=floats,
                                     reuse=reuse, use_cache=run.use_cache,
                                     say=run.say)  # fmt: skip
    baselines = {id(m.engine) for m in [*reuse.values(), *floats]}
    for m in probed:  # the probes' interleaved timings and layer times on the run's records
        for i, old in enumerate(run.measured):
            if old.engine is m.engine:  # a baseline keeps the timing the budget was set from
                run.measured[i] = dataclasses.replace(m, timing=old.timing) if id(m.engine) in baselines else m
    reanchor = 1.0
    if table.cached:  # re-anchor a table measured earlier on the baselines measured now (the machine drifts):
        # first every entry by how much slower or faster the device runs now, then the baselines' own layers
        if not reuse:  # the int8 end too: a table re-anchored on its float end alone predicted the plain int8 engine
            reuse = {"int8 K=1": _plain_int8(run, " (re-anchors the cached table)")}  # at 2.98 ms where it ran 2.45 (BERT-style encoder, bf16 host)
        anchors = [m for m in run.measured if m.label == "int8 K=1" or not m.plan.layers]
        reanchor = table.speed_ratio(run.layers, [(engine_profile(run.profile, m.plan), m.plan.layers,
                                                   m.timing.median_ms) for m in anchors])  # fmt: skip
        table = table.scaled(reanchor)
        for m in anchors:
            table = _learn(run, table, m)
        if abs(reanchor - 1.0) > 0.1:
            run.say(
                f"cost table: the baselines measured now take {reanchor:.2f}x what the cached table predicts "
                "(load or clock changed): every entry rescaled"
            )
    n = len(table.probes)
    how = "cached" if table.cached else f"probed now in {table.seconds:.1f} s"
    summary = (f"measured on this device: cost table of {n} engines of this model ({how}; {table.engine}; "
               f"{table.host})")  # fmt: skip
    return table, {"source": "measured", "cached": table.cached, "probe_seconds": 0.0 if table.cached else table.seconds,
                   "reanchor_scale": reanchor,
                   "probes": [p.to_dict() for p in table.probes], "host": table.host, "engine": table.engine,
                   "summary": summary}  # fmt: skip
