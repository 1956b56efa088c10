"""Activation residual orders (issue #9) on real networks, OpenVINO CPU, all rows in one run.

For the shipped digits CNN (real accuracy on all 1,797 digits) and torchvision's MobileNetV2 with its ImageNet
weights (top-1 agreement and relative logit error against FP32 on natural-image probes from scikit-image),
every row is built with OpenVINO on this host's profile and timed in interleaved rounds:

- FP32;
- plain int8 (W·A8, K = 1) and REx weights (K = 2), activation order J = 1 (the paper);
- activation order J = 2 on every layer input (K = 1 and K = 2);
- K = 2 with the most sensitive layer inputs kept in float (weight-only there) — the usual remedy, which an
  int8-only accelerator cannot use; sensitivity is measured data-free: each layer alone quantized, output
  error on synthetic probes;
- the planner's choice where a planner row is asked for (``--planner``): at the budget of the all-J = 2 plan,
  with float activations allowed, and on an int8-only variant of the profile (``float_activations = false``)
  with and without activation orders in its menu.

Fidelity is computed on the engines' own outputs. Writes ``benchmarks/results/activation_orders.{json,md}``.

    python benchmarks/bench_activation_orders.py [--quick] [--models digits,mobilenet_v2] [--planner]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from harness import engine_outputs, host_facts, time_interleaved
from models import accuracy, digits_model, export_mobilenet_v2, fidelity, natural_image_probes, run_onnx

from rexdeploy.actorders import RANGE_WIDEN
from rexdeploy.analyze import Layer
from rexdeploy.api import builder_for, expand_model, quantizable_layers
from rexdeploy.builders.base import Engine
from rexdeploy.graph import fold_batchnorm, load_model, save_model
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import activation_ranges, probe_batch, synthetic_inputs

RESULTS = Path(__file__).parent / "results"


def sensitive_inputs(model: onnx.ModelProto, layers: list[Layer], lp: LayerPlan, top: int, seed: int = 0) -> list[str]:
    """The ``top`` layers whose int8 input hurts most, data-free: each layer alone planned ``lp``, relative
    output error on seeded synthetic probes (onnxruntime, exact Q/DQ)."""
    folded, bn_stats = fold_batchnorm(model)
    ranges = activation_ranges(folded, bn_stats, [layer.input for layer in layers], method="auto",
                               batch=probe_batch(sum(layer.macs for layer in layers)))  # fmt: skip
    feeds = synthetic_inputs(folded, batch=4, seed=seed)
    ((_, x),) = feeds.items()
    ref = run_onnx(folded, x)
    errors = {}
    for layer in layers:
        plan = Plan(layers={layer.name: lp})
        out = run_onnx(expand_model(model, plan, ranges=ranges).model, x)
        errors[layer.name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return sorted(errors, key=lambda n: -errors[n])[:top]


def widening_sweep(model: onnx.ModelProto, layers: list[Layer], lp: LayerPlan, x: np.ndarray,
                   factors: list[float]) -> list[dict[str, Any]]:  # fmt: skip
    """Fidelity (onnxruntime, exact Q/DQ) of ``lp`` on every layer when the first activation range is the
    data-free range × each factor: the clipping-vs-rounding balance behind ``actorders.RANGE_WIDEN``."""
    folded, bn_stats = fold_batchnorm(model)
    ranges = activation_ranges(folded, bn_stats, [layer.input for layer in layers], method="auto",
                               batch=probe_batch(sum(layer.macs for layer in layers)))  # fmt: skip
    ref = run_onnx(folded, x)
    plan = uniform(layers, lp)
    default = RANGE_WIDEN[lp.act_order]  # the pass widens by this itself: hand it ranges × factor / default
    rows = []
    for f in factors:
        scaled = {t: r * f / default for t, r in ranges.items()}
        out = run_onnx(expand_model(model, plan, ranges=scaled).model, x)
        rows.append({"widen": f, **{k: v for k, v in fidelity(ref, out).items() if k != "probes"}})
        print(f"  widen x{f:g}: {rows[-1]}", flush=True)
    return rows


def uniform(layers: list[Layer], lp: LayerPlan, floats: Sequence[str] = ()) -> Plan:
    """``lp`` on every layer; the layers in ``floats`` keep their input float (weight-only, same K)."""
    weight_only = dataclasses.replace(lp, act_bits=0, act_order=1)
    return Plan(layers={layer.name: weight_only if layer.name in floats else lp for layer in layers})


def planner_plans(path: Path, profile: Profile, bits: int) -> tuple[float, dict[str, Plan]]:
    """The planner's choice at the predicted latency of W·A8 K=2 with act order 2 everywhere: float inputs
    allowed; int8-only (``float_activations = false``) with and without activation orders."""
    from rexdeploy.api import plan as make_plan

    explored = make_plan(path, profile, 1e9)
    budget_ms = next(c.predicted_latency_ms for c in explored.candidates
                     if c.label == f"uniform W{bits}A8 K=2 act order 2")  # fmt: skip
    int8_only = dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization,
                                                                               float_activations=False))  # fmt: skip
    out = {"planner (float inputs allowed)": make_plan(path, profile, budget_ms).plan,
           "planner, int8-only profile": make_plan(path, int8_only, budget_ms).plan}  # fmt: skip
    no_orders = dataclasses.replace(int8_only, quantization=dataclasses.replace(int8_only.quantization,
                                                                               max_act_order=1))  # fmt: skip
    out["planner, int8-only, no act orders"] = make_plan(path, no_orders, budget_ms).plan
    return budget_ms, out


def run_model(name: str, path: Path | onnx.ModelProto, x: np.ndarray, labels: np.ndarray | None, profile: Profile, top: int,
              args: argparse.Namespace, work: Path, sweep_x: np.ndarray, sweep_note: str) -> dict[str, Any]:  # fmt: skip
    model = path if isinstance(path, onnx.ModelProto) else load_model(path)
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    bits = max(profile.weight_bits("conv"))
    input_name = model.graph.input[0].name
    t0 = time.perf_counter()
    sensitive = sensitive_inputs(model, layers, LayerPlan(bits=bits, order=2), top)
    sens_s = time.perf_counter() - t0
    sweeps = {
        f"W{bits}A8 K=2, act order {j}": widening_sweep(model, layers, LayerPlan(bits=bits, order=2, act_order=j),
                                                       sweep_x, factors)
        for j, factors in ((2, args.widen), (1, [0.75, 1.0, 1.5]))
    }
    plans: dict[str, Plan | None] = {
        "FP32": None,
        f"W{bits}A8 K=1 (plain int8)": uniform(layers, LayerPlan(bits=bits, order=1)),
        f"W{bits}A8 K=2": uniform(layers, LayerPlan(bits=bits, order=2)),
        f"W{bits}A8 K=1, act order 2": uniform(layers, LayerPlan(bits=bits, order=1, act_order=2)),
        f"W{bits}A8 K=2, act order 2": uniform(layers, LayerPlan(bits=bits, order=2, act_order=2)),
    }
    plans[f"W{bits}A8 K=2, {top} most sensitive inputs float"] = uniform(layers, LayerPlan(bits=bits, order=2), sensitive)
    planner_budget = None
    if args.planner:
        model_path = work / f"{name}.onnx"
        save_model(model, model_path)
        t0 = time.perf_counter()
        planner_budget, chosen = planner_plans(model_path, profile, bits)
        plans.update(chosen)
        print(f"  planned in {time.perf_counter() - t0:.1f} s at {planner_budget:.3f} ms (predicted)", flush=True)
    builder = builder_for(profile)
    engines: dict[str, Engine] = {}
    rows: dict[str, dict[str, Any]] = {}
    ref_ort = run_onnx(model, x)
    for label, plan in plans.items():
        t0 = time.perf_counter()
        onnx_path = work / f"{name}_{len(engines)}.onnx"
        if plan is None:
            save_model(model, onnx_path)
        else:
            save_model(expand_model(model, plan).model, onnx_path)
        engine = builder.build(onnx_path, profile, work / f"{name}_{len(engines)}")
        engines[label] = engine
        rows[label] = {"build_s": round(time.perf_counter() - t0, 2),
                       "plan": plan.summary() if plan else "FP32"}  # fmt: skip
        print(f"  built {label} in {rows[label]['build_s']} s", flush=True)
    ref = engine_outputs(builder, engines["FP32"], x, input_name)
    for label, engine in engines.items():
        out = engine_outputs(builder, engine, x, input_name)
        rows[label]["fidelity"] = {k: v for k, v in fidelity(ref, out).items() if k != "probes"}
        if labels is not None:
            rows[label]["accuracy"] = accuracy(out, labels)
    timing = time_interleaved(builder, engines, rounds=args.rounds, round_s=args.round_s)
    fp32_ms = timing["FP32"]["median_ms"]
    for label in engines:
        rows[label].update(timing[label], ratio_to_fp32=timing[label]["median_ms"] / fp32_ms)
    return {
        "model": name,
        "probes": len(x),
        "layers": len(layers),
        "weight_bits": bits,
        "sensitive_inputs": sensitive,
        "sensitivity_seconds": round(sens_s, 2),
        "widening_sweeps": sweeps,
        "planner_budget_ms_predicted": planner_budget,
        "sweep_probes": len(sweep_x),
        "sweep_note": sweep_note,
        "fp32_engine_vs_onnxruntime_rel_l2": float(np.linalg.norm(ref - ref_ort) / np.linalg.norm(ref_ort)),
        "rows": rows,
        "act_order_layers": {label: sum(lp.act_order > 1 for lp in p.layers.values()) for label, p in plans.items()
                             if p is not None},
        "float_input_layers": {label: sum(lp.act_bits == 0 for lp in p.layers.values()) + len(layers) - len(p.layers)
                               for label, p in plans.items() if p is not None},
    }


def markdown(result: dict[str, Any]) -> str:
    h = result["host"]
    lines = [
        "# Activation residual orders (issue #9): OpenVINO CPU, one run",
        "",
        f"{h['date']} · {h['cpu']} · {h['cores']} cores · load {h['load_avg_1_5_15']} · profile "
        f"`{result['profile']}` · OpenVINO {h['versions']['openvino']}",
        "",
        "Command: `python benchmarks/bench_activation_orders.py" + (" --quick" if result["quick"] else "") + "`. "
        "Latency: median of interleaved round medians (p99: worst round); fidelity on the engines' own outputs "
        "against the FP32 engine.",
    ]
    for m in result["models"]:
        acc = "accuracy" in next(iter(m["rows"].values()))
        lines += [
            "",
            f"## {m['model']} ({m['layers']} layers, {m['probes']} inputs, weights {m['weight_bits']}-bit)",
            "",
            "| row | J≥2 / float-input layers | median ms | p99 ms | × FP32 | top-1 agree | rel. logit err |"
            + (" accuracy |" if acc else "") + " build s |",
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if acc else "") + "---:|",
        ]
        for label, r in m["rows"].items():
            f = r["fidelity"]
            mix = (f"{m['act_order_layers'][label]} / {m['float_input_layers'][label]}"
                   if label in m["act_order_layers"] else "—")  # fmt: skip
            lines.append(
                f"| {label} | {mix} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['ratio_to_fp32']:.2f} | "
                f"{100 * f['top1_agreement']:.1f} % | {f['rel_l2']:.4f} |"
                + (f" {100 * r['accuracy']:.2f} % |" if acc else "")
                + f" {r['build_s']:.1f} |"
            )
        lines += ["", f"First-range widening (onnxruntime, exact Q/DQ, {m['sweep_probes']} {m['sweep_note']}; "
                  "the default is ×" + ", ×".join(f"{RANGE_WIDEN[j]:g} for J = {j}" for j in (1, 2)) + "):", "",
                  "| plan | widening | top-1 agree | rel. logit err |", "|---|---:|---:|---:|"]  # fmt: skip
        for plan_label, sweep in m["widening_sweeps"].items():
            lines += [f"| {plan_label} | ×{r['widen']:g} | {100 * r['top1_agreement']:.1f} % | {r['rel_l2']:.4f} |"
                      for r in sweep]  # fmt: skip
        if m["planner_budget_ms_predicted"] is not None:
            lines += ["", f"Planner rows: budget = the cost model's prediction for K=2 with act order 2 on every "
                      f"layer ({m['planner_budget_ms_predicted']:.3f} ms predicted)."]  # fmt: skip
        lines += ["", f"Most sensitive inputs (data-free ablation, {m['sensitivity_seconds']} s): "
                  + ", ".join(f"`{n}`" for n in m["sensitive_inputs"])]  # fmt: skip
    lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Activation order J = 2: x ≈ DQ(Q(x; s)) + DQ(Q(x − DQ(Q(x; s)); s/254)); both terms run as int8 kernels "
    "(OpenVINO runtime precisions checked in tests/test_engine_rules.py). The first range is the data-free BN "
    "range widened ×4 for J = 2 (rexdeploy/actorders.py).",
    "- On this AVX2 host int8 kernels are no faster than FP32, so every quantized row is slower than FP32: the "
    "latency ratios show what each order costs, not a speed-up. Weights are capped at 7 bits here (8-bit weights "
    "overflow OpenVINO's AVX2 int8 kernels).",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few probes, short timing (smoke run)")
    ap.add_argument("--models", default="digits,mobilenet_v2")
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--planner", action="store_true", help="add the planner's rows (float / int8-only)")
    ap.add_argument("--out", default=str(RESULTS / "activation_orders"))
    args = ap.parse_args()
    args.rounds, args.round_s = (2, 0.2) if args.quick else (5, 0.6)
    args.widen = [1.0, 4.0] if args.quick else [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
    profile = load_profile(args.profile)
    result: dict[str, Any] = {"profile": profile.name, "quick": args.quick, "models": [], "notes": list(NOTES)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            if name == "digits":
                d = digits_model()
                n = 300 if args.quick else len(d.inputs)
                result["models"].append(run_model(name, d.model, d.inputs[:n], d.labels[:n], profile, 1, args, work,
                                                  d.inputs, "digits (all)"))  # fmt: skip
            elif name == "mobilenet_v2":
                x = natural_image_probes(24 if args.quick else 120)
                sweep_x = natural_image_probes(24 if args.quick else 120, seed=1)
                result["models"].append(run_model(name, export_mobilenet_v2(), x, None, profile, 10, args, work,
                                                  sweep_x, "natural-image crops of another seed than the table's"))  # fmt: skip
            else:
                raise SystemExit(f"unknown model {name!r}; use digits, mobilenet_v2")
    result["host"] = host_facts()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
