"""``rexdeploy inspect MODEL.onnx``: quantizable layers, FLOPs, bytes, REx weight error per bit-width and K."""

from __future__ import annotations

import argparse
import json


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="list quantizable layers, FLOPs, weight bytes and the REx weight error per bits and K",
        description="Fold BatchNorm, find every Conv/ConvTranspose/Gemm/MatMul with a constant weight, and show "
        "its size and the relative weight error REx leaves at each bit-width and order; nodes that stay float "
        "are listed with the reason.",
    )
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--bits", type=_int_list, default=(8, 4, 2), help="bit-widths to evaluate (default 8,4,2)")
    p.add_argument("--orders", type=_int_list, default=(1, 2, 3), help="orders K to evaluate (default 1,2,3)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.graph import load_model
    from rexdeploy.inspect import inspect_model
    from rexdeploy.plans import LayerPlan

    for b in args.bits:
        LayerPlan(bits=b)  # validates: PlanError with the allowed range
    for k in args.orders:
        LayerPlan(order=k)
    report = inspect_model(load_model(args.model), args.bits, args.orders)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.table()))
    return 0
