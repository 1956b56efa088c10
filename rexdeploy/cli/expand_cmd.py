"""``rexdeploy expand MODEL.onnx (--plan plan.json | --bits B --order K ...) -o OUT.onnx``."""

from __future__ import annotations

import argparse
import json

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "expand",
        help="write the REx-expanded Q/DQ ONNX model",
        description="Carry out a plan (or a uniform setting from flags) on MODEL and write the engine-ready "
        "Q/DQ ONNX model. Flags not given take the profile's defaults.",
    )
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--plan", help="plan.json (from `rexdeploy plan` or a build's output)")
    p.add_argument(
        "--profile", default="auto", help="profile for defaults (default auto: the CPU profile of this host)"
    )
    p.add_argument("--bits", type=int, help="weight bits 2..8")
    p.add_argument("--order", type=int, help="expansion order K")
    p.add_argument("--gamma", type=float, help="sparse budget of orders >= 2 (e.g. 0.5)")
    p.add_argument("--ensemble", type=common.ensemble, help="orders per predictor, e.g. 2,1")
    p.add_argument("--act-bits", type=common.act_bits, help="8 or fp (weight-only)")
    p.add_argument(
        "--act-order", type=int, help="residual orders of each int8 layer input (1 default, 2 ~ FP32 fidelity at W8A8)"
    )
    p.add_argument("--form", choices=("branches", "concat"), help="dense expansion form")
    p.add_argument("--block", type=int, help="int4 weight-only with per-block scales on Gemm/MatMul (e.g. 64)")
    common.add_smooth_arg(p)
    p.add_argument("--calib", help="optional calibration batch (.npy)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.api import expand_model
    from rexdeploy.graph import file_sha256, load_model, save_model
    from rexdeploy.plans import load_plan
    from rexdeploy.profile import load_profile
    from rexdeploy.ranges import load_calibration

    common.require_suffix(args.output, ".onnx", "output")
    model = load_model(args.model)
    plan = load_plan(args.plan) if args.plan else None
    calibration = load_calibration(args.calib, model) if args.calib else None
    order = args.order
    if order is None and args.ensemble is not None:
        order = sum(args.ensemble)
    expanded = expand_model(
        model,
        plan,
        profile=load_profile(args.profile),
        calibration=calibration,
        model_sha256=file_sha256(args.model),
        bits=args.bits,
        order=order,
        gamma=args.gamma,
        split=args.ensemble,
        act_bits=args.act_bits,
        act_order=args.act_order,
        form=args.form,
        block=args.block,
        smooth_alpha=args.smooth,
    )
    save_model(expanded.model, args.output)
    summary = {
        "output": args.output,
        "plan": expanded.plan.summary(),
        "plan_hash": expanded.plan.hash,
        "layers": len(expanded.plan.layers),
        "seconds": round(expanded.seconds, 4),
        "numerics_seconds": round(expanded.numerics_seconds, 4),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        common.stderr(f"wrote {args.output}: {expanded.plan.summary()} in {expanded.seconds:.2f} s")
    return 0
