"""``rexdeploy plan MODEL.onnx --profile P --budget 5ms [-o plan.json]``: the planner alone, no build."""

from __future__ import annotations

import argparse
import json

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="choose per-layer REx settings for a latency budget (no engine build)",
        description="Predict latency and error (data-free fidelity model) of uniform and per-layer plans, and pick "
        "the most accurate one that fits the budget. Latencies are measured on this device when the profile's "
        "engine is installed here (a few probe engines of the model, built, timed and profiled per layer; "
        "cached per model / profile / engine / host), else the profile's analytic cost model gives an "
        "estimate. The Plan goes to -o (or stdout as JSON); the explored Pareto front is printed on stderr.",
    )
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--profile", default="auto", help="shipped profile name or .toml path (default auto)")
    p.add_argument("--budget", required=True, help="latency budget, e.g. 5ms, 800us, 0.005s")
    p.add_argument("-o", "--output", help="write the plan JSON here (default: print it on stdout)")
    p.add_argument("--calib", help="optional calibration batch (.npy); never required")
    p.add_argument("--estimate", action="store_true",
                   help="plan on the profile's analytic cost model only: build no probe engine")
    p.add_argument("--no-cache", action="store_true", help="probe again even if a cost table of this model is cached")
    common.add_smooth_arg(p)
    common.add_sample_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.api import plan
    from rexdeploy.budget import format_ms, parse_budget
    from rexdeploy.fileio import write_text_atomic

    if args.output:
        common.require_suffix(args.output, ".json", "output")
    budget = parse_budget(args.budget)
    result = plan(args.model, args.profile, budget, calibration_path=args.calib, measure=not args.estimate,
                  use_cache=not args.no_cache, progress=common.progress)  # fmt: skip
    source = ("measured on this device (cost table)" if result.latency_source == "measured"
              else "an estimate (the profile's analytic cost model)")  # fmt: skip
    common.stderr(f"latencies: {source}")
    common.stderr(f"{'predicted latency':>18}  {'predicted error':>15}  candidate")
    for c in result.front:
        mark = "  <- chosen" if c.plan.hash == result.chosen.plan.hash else ""
        summary = c.plan.summary() if c.plan.layers else f"no layer quantized ({c.label})"
        common.stderr(
            f"{format_ms(c.predicted_latency_ms):>18}  {c.predicted_error:>15.3e}  {c.label}: {summary}{mark}"
        )
    common.stderr(
        f"budget {format_ms(budget)}: chose {result.chosen.label} ({len(result.candidates)} candidates, "
        f"{result.seconds:.2f} s)"
    )
    chosen = result.plan
    if args.smooth is not None:  # the planner priced the unsmoothed model: the plan says so
        from dataclasses import replace

        note = f"smooth_alpha={args.smooth:g} set after planning: the predictions are for the unsmoothed model"
        chosen = replace(chosen, smooth_alpha=args.smooth, notes=(*chosen.notes, note))
        common.stderr(f"LayerNorm smoothing alpha={args.smooth:g} added to the plan ({note.split(': ')[1]})")
    if args.samples:
        from rexdeploy.api import simulated_fidelity
        from rexdeploy.graph import load_model
        from rexdeploy.profile import load_profile
        from rexdeploy.samples import load_samples

        model = load_model(args.model)
        samples = load_samples(args.samples, model, common.sample_preprocess(args))
        f = simulated_fidelity(model, chosen, samples, profile=load_profile(args.profile), ranges=result.ranges)
        top1 = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
        common.stderr(f"fidelity on your {f.probes} samples (onnxruntime, exact Q/DQ arithmetic): rel. error "
                      f"{f.relative_error:.2e}, cosine {f.cosine:.6f}{top1}; predicted error {result.chosen.predicted_error:.2e}")  # fmt: skip
    if args.output:
        write_text_atomic(args.output, chosen.to_json() + "\n")
        common.stderr(f"wrote {args.output}")
    else:
        print(json.dumps(chosen.to_dict(), indent=2, sort_keys=True))
    return 0
