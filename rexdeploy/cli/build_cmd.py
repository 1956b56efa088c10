"""``rexdeploy build MODEL.onnx --profile NAME --budget 5ms``: expand, build, time vs FP32, report."""

from __future__ import annotations

import argparse

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        help="plan for a budget, expand, build and time a model; compare with FP32",
        description="Expand MODEL with REx, build it with the profile's engine, time it next to the FP32 "
        "engine built in the same run, and write expanded.onnx, the engines, plan.json and report.{json,md}.",
    )
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument(
        "--profile",
        default="auto",
        help="shipped profile name or .toml path (default auto: the CPU profile of this host)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", help="latency budget, e.g. 5ms, 800us, 0.005s (the planner fits it)")
    budget.add_argument(
        "--budget-ratio", type=float, help="budget relative to the plain int8 engine measured in the same run, e.g. 1.2"
    )
    p.add_argument(
        "--relative-to",
        metavar="{int8,fp32,default,ENGINE}",
        help="what --budget-ratio is relative to, timed in the same run: the plain int8 engine (default), FP32, "
        "the runtime's default float engine (bf16 on AVX-512 BF16 / AMX CPUs), or the engine you would otherwise "
        "run (an OpenVINO IR .xml such as NNCF's int8 IR, loaded as you load it; an ONNX model; a TensorRT .plan), "
        "timed in interleaved rounds beside the candidates and compared on the same probes / --samples; e.g. "
        "--budget-ratio 1 --relative-to default: at most as slow as just loading the model",
    )
    p.add_argument("--out", help="output directory (default rexdeploy-out/<model name>)")
    p.add_argument("--calib", help="optional calibration batch (.npy, N x input shape); never required")
    common.add_sample_args(p)
    p.add_argument("--bits", type=int, help="weight bits 2..8 (default: the profile's)")
    p.add_argument("--order", type=int, help="expansion order K (default: the profile's)")
    p.add_argument("--act-bits", type=common.act_bits, help="8 or fp (weight-only)")
    p.add_argument(
        "--act-order", type=int, help="residual orders of each int8 layer input (1 default, 2 ~ FP32 fidelity at W8A8)"
    )
    p.add_argument("--form", choices=("branches", "concat"), help="dense expansion form")
    p.add_argument("--block", type=int, help="int4 weight-only with per-block scales on Gemm/MatMul (e.g. 64)")
    common.add_smooth_arg(p)
    p.add_argument(
        "--threads",
        type=common.threads,
        default=0,
        metavar="{auto,N}",
        help="inference threads per request of every engine: auto (default) times the FP32 engine on the runtime's "
        "default threads and on fewer and keeps the fastest (at least 5%% faster); N fixes it (written to the "
        "engine's runtime options), e.g. 1 when other work shares the CPU",
    )
    p.add_argument("--duration", type=common.duration, default=3.0, help="timed duration per engine (default 3s)")
    p.add_argument("--warmup", type=common.duration, default=0.2, help="warm-up per engine (default 200ms)")
    p.add_argument("--no-cache", action="store_true", help="rebuild engines even if the engine cache holds them")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.budget import parse_budget
    from rexdeploy.builders.base import TimingSettings
    from rexdeploy.closedloop import build

    budget = parse_budget(args.budget) if args.budget is not None else None
    if args.budget_ratio is not None and not args.budget_ratio > 0:
        from rexdeploy.errors import BudgetError

        raise BudgetError(f"--budget-ratio {args.budget_ratio} must be a positive number, e.g. 1.2")
    if args.relative_to is not None and args.budget_ratio is None:
        from rexdeploy.errors import BudgetError

        raise BudgetError("--relative-to sets what --budget-ratio is relative to: give --budget-ratio too, e.g. 1.0")
    report = build(
        args.model,
        args.profile,
        budget_ms=budget,
        budget_ratio=args.budget_ratio,
        relative_to=args.relative_to or "int8",
        use_cache=not args.no_cache,
        out_dir=args.out,
        timing=TimingSettings(warmup_s=args.warmup, duration_s=args.duration),
        calibration_path=args.calib,
        progress=common.progress,
        samples=args.samples,
        preprocess=common.sample_preprocess(args),
        bits=args.bits,
        order=args.order,
        act_bits=args.act_bits,
        act_order=args.act_order,
        form=args.form,
        block=args.block,
        smooth_alpha=args.smooth,
        threads=args.threads,
    )
    if args.json:
        print(report.to_json())
    else:
        for line in report.summary_lines():
            common.stderr(line)
    return 0
