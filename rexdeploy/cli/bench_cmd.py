"""``rexdeploy bench MODEL.onnx|ENGINE --profile NAME [--duration 3s] [--layers]``: build if needed, then time
(and with ``--layers`` profile every ONNX node)."""

from __future__ import annotations

import argparse

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="time a model or a built engine (median, percentiles, CoV, throughput)",
        description="Time MODEL.onnx (built first with the profile's engine) or an engine built earlier "
        "(OpenVINO IR .xml, TensorRT .plan): warm up by time, then run for a duration or a number of runs, "
        "and report median, mean, p90, p95, p99, min, max, std, CoV (warning above 5 %%) and throughput.",
    )
    p.add_argument("model", metavar="MODEL.onnx|ENGINE", help="ONNX model, OpenVINO IR .xml or TensorRT .plan")
    p.add_argument(
        "--profile",
        help="shipped profile name or .toml path (default auto: this host's CPU profile; a .plan needs none)",
    )
    p.add_argument("--duration", default="3s", help="timed duration, e.g. 3s or 500ms (default 3s)")
    p.add_argument("--warmup", default="200ms", help="warm-up duration (default 200ms)")
    p.add_argument("--runs", help="time exactly N runs instead of a duration")
    p.add_argument("--throughput", action="store_true", help="also measure OpenVINO THROUGHPUT-mode fps")
    p.add_argument(
        "--layers",
        action="store_true",
        help="then profile every ONNX node with the engine's own profiler (same warm-up and duration/runs) and "
        "print the per-layer table, trtexec --dumpProfile style (JSON: a 'layers' object)",
    )
    p.add_argument("--out", help="build an ONNX model into DIR and keep the engine (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    p.set_defaults(func=run)


def _runs(text: str | None) -> int | None:
    from rexdeploy.errors import InputError

    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(f"invalid --runs {text!r}: give a whole number of runs ≥ 1, e.g. --runs 100")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.benchmark import bench, parse_duration
    from rexdeploy.builders.base import TimingSettings

    settings = TimingSettings(
        warmup_s=parse_duration(args.warmup, "--warmup"),
        duration_s=parse_duration(args.duration, "--duration"),
        runs=_runs(args.runs),
    )
    result = bench(
        args.model,
        args.profile,
        settings,
        out_dir=args.out,
        throughput=args.throughput,
        layers=args.layers,
        progress=common.progress,
    )
    if args.json:
        print(result.to_json())
    else:
        for line in result.summary_lines():
            common.stderr(line)
    return 0
