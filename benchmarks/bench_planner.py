"""The planner on real models: per-layer plan vs the best uniform plan at equal or lower measured latency,
rank correlation of predicted vs measured error, planning time and determinism.

Run: ``flock /tmp/rexdeploy-bench.lock python benchmarks/bench_planner.py [--rounds N] [--probes N]``.

(a) On the demo digits CNN (real accuracy on all 1,797 digits, relative logit error vs FP32) and on ImageNet
MobileNetV2 (top-1 agreement and relative logit error vs FP32 on natural-image probes from
:func:`models.natural_image_probes`): for each uniform quantized candidate U the planner explored (W{b}A8
K = 1..3), the budget is U's predicted latency and the per-layer plan is the planner's most accurate
per-layer candidate predicted to fit it. The planner runs twice: with its full menu (a layer may stay float)
and with ``allow_float=False`` (every layer quantized). Every engine (FP32, each U, each per-layer plan) is
built with OpenVINO and all are timed interleaved in one run; errors are measured on the OpenVINO engines.
(b) Spearman rank correlation between the planner's predicted error and the error measured with onnxruntime
on the expanded ONNX (exact Q/DQ arithmetic), over the uniform candidates and a subsample of the greedy path.
(c) Planning time of MobileNetV2 (no engine build) and the plan hash of two identical runs.
Results: ``benchmarks/results/planner.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency_model import Case, build_engine, interleaved_timing, machine_info, wait_for_quiet
from models import accuracy, digits_model, export_mobilenet_v2, fidelity, natural_image_probes, run_onnx

from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.builders.base import Engine
from rexdeploy.builders.registry import get_builder
from rexdeploy.graph import fold_batchnorm
from rexdeploy.hostcpu import host_profile_name
from rexdeploy.planner import Candidate, PlanResult, plan_model
from rexdeploy.profile import Profile, load_profile

RESULTS = Path(__file__).resolve().parent / "results"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's ρ (average ranks for ties)."""

    def ranks(v: list[float]) -> np.ndarray:
        x = np.asarray(v, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # ties: average rank
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def engine_logits(engine: Engine, profile: Profile, x: np.ndarray) -> np.ndarray:
    builder = get_builder(profile.engine)
    name = next(iter(engine.inputs))
    return np.concatenate([builder.run(engine, {name: x[i : i + 1]})[0] for i in range(len(x))])


def best_per_layer(candidates: tuple[Candidate, ...], budget_ms: float) -> Candidate | None:
    fitting = [
        c for c in candidates if c.label == "per-layer" and c.plan.layers and c.predicted_latency_ms <= budget_ms
    ]
    return min(fitting, key=lambda c: (c.predicted_error, c.predicted_latency_ms)) if fitting else None


def measure_model(key: str, model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray | None, profile: Profile,
                  args: argparse.Namespace, tmp: Path) -> dict[str, Any]:  # fmt: skip
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    ref = run_onnx(model, x)
    table = None
    if args.latency == "measured":  # the product's path: the model's cost table measured on this device
        from rexdeploy.closedloop import cost_table_for
        from rexdeploy.graph import save_model

        (tmp / key).mkdir(parents=True, exist_ok=True)
        table = cost_table_for(save_model(model, tmp / key / "source.onnx", check=False), profile, use_cache=False)
    runs: dict[str, PlanResult] = {}
    for menu, allow in (("full", True), ("quantized-only", False)):
        t0 = time.perf_counter()
        runs[menu] = plan_model(model, layers, profile, float("inf"), allow_float=allow, cost_table=table)
        print(f"  planner ({menu}): {len(runs[menu].candidates)} candidates in {time.perf_counter() - t0:.1f} s")
    uniform = [c for c in runs["full"].candidates if c.label.startswith("uniform") and c.label.endswith(
        tuple(f"K={k}" for k in args.orders))]  # fmt: skip
    bits = max(int(c.label.split("W")[1].split("A")[0]) for c in uniform)
    uniform = [c for c in uniform if c.label.startswith(f"uniform W{bits}A8")]
    cases: dict[str, Case] = {"FP32": Case("FP32", "fp32", None)}
    pairs = []
    for u in uniform:
        cases[u.label] = Case(u.label, "uniform", u.plan, runs["full"].ranges)
        row: dict[str, Any] = {"uniform": u.label, "budget_ms": u.predicted_latency_ms}
        for menu, result in runs.items():
            c = best_per_layer(result.candidates, u.predicted_latency_ms)
            if c is None:
                continue
            label = f"per-layer ({menu}) @ {u.label[8:]}"
            cases[label] = Case(label, "per-layer", c.plan, result.ranges)
            row[menu] = label
        pairs.append(row)
    engines: dict[str, Engine] = {}
    rows: dict[str, dict[str, Any]] = {}
    for i, (label, case) in enumerate(cases.items()):
        engine, _ = build_engine(model, case, profile, tmp / key / f"{i:02d}")
        engines[label] = engine
        logits = engine_logits(engine, profile, x)
        fid = fidelity(ref, logits)
        if labels is not None:
            fid["accuracy"] = accuracy(logits, labels)
        plan = case.plan
        rows[label] = {
            "summary": "FP32" if plan is None else plan.summary(),
            "plan_hash": None if plan is None else plan.hash,
            "predicted_ms": 0.0 if plan is None else plan.predicted_latency_ms,
            "predicted_error": 0.0 if plan is None else plan.predicted_error,
            "quantized_layers": 0 if plan is None else len(plan.layers),
            "float_act_layers": 0 if plan is None else sum(lp.act_bits == 0 for lp in plan.layers.values()),
            "orders": {} if plan is None else _histogram([lp.order for lp in plan.layers.values()]),
            "fidelity": fid,
        }
    rows["FP32"]["predicted_ms"] = runs["full"].candidates[0].predicted_latency_ms
    waited = wait_for_quiet(args.wait_load)
    samples, load = interleaved_timing(engines, profile, args.rounds, args.per_round_s)
    for label, values in samples.items():
        rows[label]["measured_ms"] = float(np.median(values))
        rows[label]["round_medians_ms"] = values
    engines.clear()
    for row in pairs:
        u = rows[row["uniform"]]
        for menu in runs:
            if menu in row:
                p = rows[row[menu]]
                row[f"{menu}_beats"] = bool(p["measured_ms"] <= u["measured_ms"] * 1.0 and
                                            p["fidelity"]["rel_l2"] < u["fidelity"]["rel_l2"])  # fmt: skip
    # (b) rank correlation over explored candidates, errors measured with onnxruntime on the expanded ONNX
    explored = _explored(runs, args.spearman_points)
    pred, meas = [], []
    t0 = time.perf_counter()
    for c, ranges in explored:
        q = expand_model(model, c.plan, profile=profile, ranges=ranges).model
        pred.append(c.predicted_error)
        meas.append(_rel(ref[: args.rank_probes], run_onnx(q, x[: args.rank_probes])))
    rank = {
        "points": len(pred),
        "spearman": spearman(pred, meas),
        "predicted": pred,
        "measured": meas,
        "labels": [c.label for c, _ in explored],
        "probes": int(min(len(x), args.rank_probes)),
        "seconds": time.perf_counter() - t0,
    }
    return {
        "layers": len(layers),
        "engines": rows,
        "pairs": pairs,
        "rank": rank,
        "loadavg_1min": load,
        "waited_s": waited,
        "planning_s": {menu: r.seconds for menu, r in runs.items()},
    }


def _rel(ref: np.ndarray, q: np.ndarray) -> float:
    return float(np.linalg.norm(q.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))


def _histogram(values: list[int]) -> dict[str, int]:
    return {str(v): values.count(v) for v in sorted(set(values))}


def _explored(runs: dict[str, PlanResult], n: int) -> list[tuple[Candidate, dict[str, float]]]:
    """Uniform candidates of the full run, and ``n`` evenly spaced greedy-path points of each run."""
    out: list[tuple[Candidate, dict[str, float]]] = []
    seen: set[str] = set()
    for result in runs.values():
        uni = [c for c in result.candidates if c.label.startswith("uniform")]
        path = [c for c in result.candidates if c.label == "per-layer" and c.plan.layers]
        picks = [path[int(i)] for i in np.linspace(0, len(path) - 1, min(n, len(path))).round()] if path else []
        for c in [*uni, *picks]:
            if c.plan.hash not in seen:
                seen.add(c.plan.hash)
                out.append((c, result.ranges))
    return out


def planning_check(profile: Profile, budget_fraction: float = 0.5) -> dict[str, Any]:
    """(c) plan MobileNetV2 twice at one budget: seconds and plan hashes."""
    model = onnx.load(str(export_mobilenet_v2()))
    layers = quantizable_layers(fold_batchnorm(model)[0])
    first = plan_model(model, layers, profile, float("inf"), allow_float=False)
    lat = sorted(c.predicted_latency_ms for c in first.candidates)
    budget = lat[0] + budget_fraction * (lat[-1] - lat[0])
    out: dict[str, Any] = {"budget_ms": budget, "runs": []}
    for _ in range(2):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = plan_model(model, layers, profile, budget, allow_float=False)
        out["runs"].append({"seconds": time.perf_counter() - t0, "hash": r.plan.hash, "chosen": r.chosen.label,
                            "loadavg_1min": load})  # fmt: skip
    out["same_hash"] = out["runs"][0]["hash"] == out["runs"][1]["hash"]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Planner: per-layer vs uniform, rank correlation, planning time",
        "",
        f"`{result['command']}` — profile `{result['profile']}`, OpenVINO {result['machine']['openvino']} "
        f"`PERFORMANCE_HINT=LATENCY`, batch 1; all engines of a model timed interleaved ({result['rounds']} rounds × "
        f"{result['per_round_s']:g} s), measured = median of round medians. Errors measured on the OpenVINO engines. "
        f"Host {result['machine']['cpu']} (flags: {result['machine'].get('flags', '?')}); planner latencies: "
        + ("the model's measured cost table." if result.get("latency_source") == "measured"
           else "the profile's analytic cost model."),
        "",
    ]
    for key, net in result["models"].items():
        lines += [
            f"## {key} ({net['layers']} layers; {net['fidelity_set']})",
            "",
            "| engine | predicted ms | measured ms | predicted err | rel. logit err | top-1 agr. | accuracy | "
            "quantized / float-act layers |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in net["engines"].items():
            f = r["fidelity"]
            acc = f"{f['accuracy']:.2%}" if "accuracy" in f else ""
            lines.append(
                f"| {label} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | {r['predicted_error']:.3g} | "
                f"{f['rel_l2']:.3g} | {f['top1_agreement']:.1%} | {acc} | {r['quantized_layers']} / "
                f"{r['float_act_layers']} |"
            )
        lines += ["", "Per-layer vs uniform at the uniform plan's predicted latency as budget:", ""]
        for pair in net["pairs"]:
            u = net["engines"][pair["uniform"]]
            for menu in ("full", "quantized-only"):
                if menu not in pair:
                    continue
                p = net["engines"][pair[menu]]
                verdict = "beats" if pair[f"{menu}_beats"] else "does NOT beat"
                lines.append(
                    f"- {pair[menu]} {verdict} {pair['uniform']}: error {p['fidelity']['rel_l2']:.3g} vs "
                    f"{u['fidelity']['rel_l2']:.3g}, measured {p['measured_ms']:.3f} vs {u['measured_ms']:.3f} ms"
                )
        rank = net["rank"]
        lines += [
            "",
            f"Rank correlation (Spearman) of predicted vs measured (onnxruntime, {rank['probes']} probes) relative "
            f"logit error over {rank['points']} explored candidates: **{rank['spearman']:.3f}**.",
            f"Planning: {', '.join(f'{m} {s:.1f} s' for m, s in net['planning_s'].items())}; load average over the "
            f"timing rounds {'/'.join(f'{v:.1f}' for v in net['loadavg_1min'])}.",
            "",
        ]
    pc = result.get("planning_check")
    if pc:
        lines += [
            "## Planning time and determinism (MobileNetV2, no engine build)",
            "",
            f"Budget {pc['budget_ms']:.3f} ms: "
            + "; ".join(
                f"{r['seconds']:.1f} s (load {r['loadavg_1min']:.1f}) → {r['chosen']} {r['hash'][:12]}"
                for r in pc["runs"]
            )
            + f". Same hash: **{pc['same_hash']}**.",
            "",
        ]
    if result.get("conclusion"):
        lines += ["## Conclusion", "", result["conclusion"], ""]
    m = result["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, onnxruntime {m['onnxruntime']}; load "
        f"average before {'/'.join(f'{v:.1f}' for v in result['loadavg_before'])}, after "
        f"{'/'.join(f'{v:.1f}' for v in result['loadavg_after'])} (shared machine); {m['date']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="*", default=["digits", "mobilenet_v2"], choices=["digits", "mobilenet_v2"])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--orders", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--probes", type=int, default=120, help="natural-image probes for MobileNetV2")
    parser.add_argument("--rank-probes", type=int, default=48, help="inputs for the rank correlation")
    parser.add_argument("--spearman-points", type=int, default=10, help="greedy-path points per planner run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round-s", type=float, default=0.25)
    parser.add_argument("--wait-load", type=float, default=2.5)
    parser.add_argument("--skip-planning-check", action="store_true")
    parser.add_argument("--latency", choices=("measured", "analytic"), default="measured",
                        help="plan on the model's measured cost table (the product's path; default) or the "
                        "profile's analytic cost model")
    parser.add_argument("--name", default="planner")
    parser.add_argument("--conclusion", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    profile = load_profile(args.profile or host_profile_name())
    load_before = os.getloadavg()
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rexdeploy-planner-") as tmp:
        for key in args.models:
            t0 = time.perf_counter()
            print(f"## {key}")
            if key == "digits":
                d = digits_model()
                models[key] = measure_model(key, d.model, d.inputs, d.labels, profile, args, Path(tmp))
                models[key]["fidelity_set"] = f"all {len(d.inputs)} digits with labels"
            else:
                model = onnx.load(str(export_mobilenet_v2()))
                x = natural_image_probes(args.probes)
                models[key] = measure_model(key, model, x, None, profile, args, Path(tmp))
                models[key]["fidelity_set"] = f"{len(x)} natural-image probes"
            net = models[key]
            for label, r in net["engines"].items():
                f = r["fidelity"]
                print(f"  {label:44s} pred {r['predicted_ms']:7.3f} meas {r['measured_ms']:7.3f} ms  err "
                      f"{f['rel_l2']:.3g} (pred {r['predicted_error']:.3g})  top1 {f['top1_agreement']:.1%}"
                      + (f"  acc {f['accuracy']:.2%}" if "accuracy" in f else ""))  # fmt: skip
            print(
                f"  spearman {net['rank']['spearman']:.3f} over {net['rank']['points']} ({time.perf_counter() - t0:.0f} s)"
            )
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_planner.py " + " ".join(sys.argv[1:]),
        "profile": profile.name,
        "latency_source": args.latency,
        "rounds": args.rounds,
        "per_round_s": args.per_round_s,
        "models": models,
        "conclusion": args.conclusion,
    }
    if not args.skip_planning_check:
        result["planning_check"] = planning_check(profile)
        print("planning:", result["planning_check"])
    result["loadavg_before"] = list(load_before)
    result["loadavg_after"] = list(os.getloadavg())
    result["machine"] = machine_info()
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
