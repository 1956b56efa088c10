"""Latency-model accuracy on whole networks: the cost model's prediction vs the OpenVINO CPU median, plan by plan.

Run: ``flock /tmp/rexdeploy-bench.lock python benchmarks/bench_latency_model.py [--rounds N] [--models ...]``.

Models (batch 1): the shipped demo CNN (``rexdeploy/demo/digits_cnn.onnx``), torchvision's ImageNet
MobileNetV2 (:func:`models.export_mobilenet_v2`), a generated ResNet-style CNN (seeded weights, 3 stages of
two basic blocks, 96×96) and a generated transformer-MLP stack (MatMul layers, sequence 64, hidden 192).
Each model gets ≥ 10 plans: FP32, uniform W{b}A8 K = 1..3, sparse γ (linear+), weight-only, int4-ish
weights, two ensembles, and per-layer plans chosen by the planner at three budgets. Every plan is expanded
with :func:`rexdeploy.api.expand_model`, built with the OpenVINO builder (``PERFORMANCE_HINT=LATENCY``) and
all engines of a model are timed interleaved (round-robin, rotated order), a plan's measured latency being
the median of its round medians. The prediction is :func:`rexdeploy.costmodel.predict_model_ms` with the
profile's coefficients (default: the host's, ``x86-avx2`` here). Results:
``benchmarks/results/latency_model.{json,md,png}``; the raw points let the whole-network terms be refitted
offline (``--refit``, see :func:`rexdeploy.calibrate.fit_network_terms`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.analyze import Layer
from rexdeploy.api import default_plan, expand_model, quantizable_layers
from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.calibrate import NetworkPoint, fit_network_terms
from rexdeploy.costmodel import layer_terms_us, plan_layer_terms, predict_model_ms
from rexdeploy.errors import RexError
from rexdeploy.graph import fold_batchnorm, save_model
from rexdeploy.hostcpu import cpu_flags, host_profile_name
from rexdeploy.planner.costtable import CostTable
from rexdeploy.plans import Plan
from rexdeploy.profile import CostModel, Profile, load_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# generated models


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)


def resnet_style(
    width: int = 32, size: int = 96, blocks: int = 2, classes: int = 100, seed: int = 0
) -> onnx.ModelProto:
    """A ResNet-style CNN: stem Conv 3×3 s2, 3 stages of ``blocks`` basic blocks (Conv 3×3 + Relu, Conv 3×3,
    residual Add, Relu; a 1×1 s2 shortcut when the stage downsamples), global average pool, Gemm."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(src: str, name: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        inits.append(_init(rng, f"{name}.w", (cout, cin, k, k), cin * k * k))
        inits.append(numpy_helper.from_array((0.05 * rng.standard_normal(cout)).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [name], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))  # fmt: skip
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("x", "stem", 3, width, 3, 2)
    cin = width
    for s, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            h = conv(x, f"s{s}b{b}.c1", cin, cout, 3, stride)
            h = conv(h, f"s{s}b{b}.c2", cout, cout, 3, 1, relu=False)
            short = x if stride == 1 and cin == cout else conv(x, f"s{s}b{b}.down", cin, cout, 1, stride, relu=False)
            nodes.append(helper.make_node("Add", [h, short], [f"s{s}b{b}.add"], name=f"s{s}b{b}.add"))
            nodes.append(helper.make_node("Relu", [f"s{s}b{b}.add"], [f"s{s}b{b}.out"], name=f"s{s}b{b}.out"))
            x, cin = f"s{s}b{b}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    inits.append(_init(rng, "fc.w", (classes, cin), cin))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_latency_model")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def transformer_mlp(
    layers: int = 3, seq: int = 64, hidden: int = 192, ffn: int = 768, seed: int = 0
) -> onnx.ModelProto:
    """``layers`` transformer-style blocks of MatMul layers on x (N, seq, hidden): a token projection
    (MatMul hidden→hidden, Relu) and a feed-forward pair (hidden→ffn, Relu, ffn→hidden), each with a
    residual Add."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"

    def mm(src: str, name: str, cin: int, cout: int, relu: bool) -> str:
        inits.append(_init(rng, f"{name}.w", (cin, cout), cin))
        nodes.append(helper.make_node("MatMul", [src, f"{name}.w"], [name], name=name))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    for i in range(layers):
        h = mm(x, f"l{i}.proj", hidden, hidden, relu=False)
        nodes.append(helper.make_node("Add", [h, x], [f"l{i}.res1"], name=f"l{i}.res1"))
        h = mm(f"l{i}.res1", f"l{i}.ffn1", hidden, ffn, relu=True)
        h = mm(h, f"l{i}.ffn2", ffn, hidden, relu=False)
        nodes.append(helper.make_node("Add", [h, f"l{i}.res1"], [f"l{i}.out"], name=f"l{i}.res2"))
        x = f"l{i}.out"
    graph = helper.make_graph(
        nodes,
        "transformer_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", seq, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_latency_model")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _digits() -> onnx.ModelProto:
    return onnx.load(str(ROOT / "rexdeploy" / "demo" / "digits_cnn.onnx"))


def _mobilenet() -> onnx.ModelProto:
    from models import export_mobilenet_v2

    return onnx.load(str(export_mobilenet_v2()))


MODELS: dict[str, tuple[str, Callable[[], onnx.ModelProto]]] = {
    "digits": ("rexdeploy demo CNN (8×8 digits)", _digits),
    "mobilenet_v2": ("torchvision MobileNetV2, ImageNet weights, 224×224", _mobilenet),
    "resnet_style": ("generated ResNet-style CNN, width 32, 96×96, 13 convs + Gemm", resnet_style),
    "transformer_mlp": ("generated transformer MLP, 3 blocks, MatMul 64×192 (ffn 768)", transformer_mlp),
}


# ----------------------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class Case:
    """One plan of one model; ``plan=None`` is the FP32 model itself."""

    label: str
    kind: str  # fp32 | uniform | sparse | weight-only | ensemble | per-layer
    plan: Plan | None
    ranges: dict[str, float] | None = None


def plan_cases(model: onnx.ModelProto, layers: list[Layer], profile: Profile, planner_budgets: int = 3,
               table: CostTable | None = None) -> list[Case]:  # fmt: skip
    """The plans measured on one model: uniform, sparse, weight-only, ensembles and planner per-layer plans."""
    bits = max(profile.weight_bits("conv"))
    low = min(b for b in profile.weight_bits("conv") if b >= 4)

    def uni(**kw: object) -> Plan:
        return default_plan(layers, profile, **kw)

    cases = [
        Case("FP32", "fp32", None),
        *(Case(f"W{bits}A8 K={k}", "uniform", uni(bits=bits, order=k, act_bits=8)) for k in (1, 2, 3)),
        Case(f"W{low}A8 K=2", "uniform", uni(bits=low, order=2, act_bits=8)),
        Case(f"W{bits}A8 K=2 γ=0.5 linear+", "sparse", uni(bits=bits, order=2, gamma=0.5, act_bits=8)),
        Case(f"W{bits}A8 K=3 γ=1 linear+", "sparse", uni(bits=bits, order=3, gamma=1.0, act_bits=8)),
        Case(f"W{bits}Afp K=2 weight-only", "weight-only", uni(bits=bits, order=2, act_bits=0)),
        Case(f"W{bits}A8 ensemble 1,1", "ensemble", uni(bits=bits, order=2, split=(1, 1), act_bits=8)),
        Case(f"W{low}A8 ensemble 2,1", "ensemble", uni(bits=low, order=3, split=(2, 1), act_bits=8)),
    ]
    if planner_budgets:
        from rexdeploy.planner import plan_model

        result = plan_model(model, layers, profile, float("inf"), cost_table=table)
        path = [c for c in result.candidates if c.label == "per-layer" and c.plan.layers]
        seen: set[str] = set()
        for idx in np.linspace(0, len(path) - 1, planner_budgets + 2)[1:-1].round().astype(int) if path else []:
            c = path[int(idx)]
            if c.plan.hash not in seen:
                seen.add(c.plan.hash)
                cases.append(Case(f"planner per-layer #{idx} ({len(c.plan.layers)} layers quantized)", "per-layer",
                                  c.plan, result.ranges))  # fmt: skip
    return cases


# ----------------------------------------------------------------------------------------------------------
# building and interleaved timing (shared with bench_planner.py)


def build_engine(model: onnx.ModelProto, case: Case, profile: Profile, work: Path) -> tuple[Engine, onnx.ModelProto]:
    """Expand (unless FP32) and build one case with the profile's builder; returns the engine and the ONNX."""
    onnx_model = (
        model if case.plan is None else expand_model(model, case.plan, profile=profile, ranges=case.ranges).model
    )
    work.mkdir(parents=True, exist_ok=True)
    path = save_model(onnx_model, work / "model.onnx", check=False)
    return get_builder(profile.engine).build(path, profile, work / "engine"), onnx_model


def interleaved_timing(engines: dict[str, Engine], profile: Profile, rounds: int, per_round_s: float
                       ) -> tuple[dict[str, list[float]], list[float]]:  # fmt: skip
    """Round-robin timing, order rotated every round: each engine's list of round medians, and the
    1-min load average after each round (the first value is taken before the first round)."""
    builder = get_builder(profile.engine)
    names = list(engines)
    samples: dict[str, list[float]] = {n: [] for n in names}
    settings = TimingSettings(warmup_s=0.05, duration_s=per_round_s, min_runs=5)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(builder.time(engines[name], settings).median_ms)
        load.append(os.getloadavg()[0])
    return samples, load


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def accuracy_stats(predicted: list[float], measured: list[float]) -> dict[str, float]:
    err = np.array(predicted) / np.array(measured) - 1.0
    return {
        "n": int(err.size),
        "within_10": float(np.mean(np.abs(err) <= 0.10)),
        "within_20": float(np.mean(np.abs(err) <= 0.20)),
        "median_abs_error": float(np.median(np.abs(err))),
        "max_abs_error": float(np.max(np.abs(err))),
        "mean_error": float(np.mean(err)),
    }


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import openvino

    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), platform.machine())
    except OSError:
        cpu = platform.machine()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "openvino": str(openvino.get_version()),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "flags": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
                          if f in cpu_flags()),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def wait_for_quiet(max_load: float, max_wait_s: float = 90.0) -> float:
    """Wait (at most ``max_wait_s``) until the 1-min load average is below ``max_load``; seconds waited."""
    t0 = time.perf_counter()
    while max_load > 0 and os.getloadavg()[0] > max_load and time.perf_counter() - t0 < max_wait_s:
        time.sleep(5.0)
    return time.perf_counter() - t0


def measure_model(key: str, profile: Profile, rounds: int, per_round_s: float, planner_budgets: int,
                  tmp: Path, wait_load: float = 0.0, latency: str = "analytic") -> dict[str, Any]:  # fmt: skip
    label, make = MODELS[key]
    model = make()
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    table = None
    probe_s = 0.0
    if latency == "measured":  # the product's path: probe engines of this model, per-layer profiler, cost table
        from rexdeploy.closedloop import cost_table_for

        (tmp / key).mkdir(parents=True, exist_ok=True)
        source = save_model(model, tmp / key / "source.onnx", check=False)
        wait_for_quiet(wait_load)
        t0 = time.perf_counter()
        table = cost_table_for(source, profile, use_cache=False)
        probe_s = time.perf_counter() - t0
        if table is None:
            raise SystemExit(f"{profile.engine} has no per-layer profiler here: use --latency analytic")
    t0 = time.perf_counter()
    cases = plan_cases(model, layers, profile, planner_budgets, table)
    plan_s = time.perf_counter() - t0
    engines: dict[str, Engine] = {}
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    for i, case in enumerate(cases):
        try:
            engine, onnx_model = build_engine(model, case, profile, tmp / key / f"{i:02d}")
        except RexError as exc:  # e.g. an ensemble whose predictors cannot be summed on this graph
            skipped[case.label] = str(exc)
            continue
        engines[case.label] = engine
        rows[case.label] = {
            "kind": case.kind,
            "summary": "FP32" if case.plan is None else case.plan.summary(),
            "plan_hash": None if case.plan is None else case.plan.hash,
            "plan": None if case.plan is None else case.plan.to_dict()["layers"],
            "predicted_ms": predict_model_ms(profile, layers, case.plan) if table is None
            else table.predict_ms(profile, layers, case.plan.layers if case.plan else {}),
            "ops": op_counts(onnx_model),
            "build_s": engine.build_seconds,
        }
    build_s = time.perf_counter() - t0
    waited = wait_for_quiet(wait_load)
    samples, load = interleaved_timing(engines, profile, rounds, per_round_s)
    for name, values in samples.items():
        rows[name]["measured_ms"] = statistics.median(values)
        rows[name]["min_ms"] = min(values)
        rows[name]["round_medians_ms"] = values
        rows[name]["error"] = rows[name]["predicted_ms"] / rows[name]["measured_ms"] - 1.0
    engines.clear()
    stats = accuracy_stats([r["predicted_ms"] for r in rows.values()], [r["measured_ms"] for r in rows.values()])
    return {
        "label": label,
        "layers": len(layers),
        "layer_table": [layer.to_dict() for layer in layers],
        "plans": rows,
        "stats": stats,
        "skipped": skipped,
        "waited_s": waited,
        "planning_s": plan_s,
        "probe_s": probe_s,
        "latency_source": latency,
        "build_s": build_s,
        "loadavg_1min": load,
    }


def markdown(result: dict[str, Any]) -> str:
    measured = result.get("latency_source") == "measured"
    how = ("the model's **measured cost table** (probe engines of this model built, timed and profiled per layer "
           "by OpenVINO's PERF_COUNT; `CostTable.predict_ms`)" if measured
           else f"`predict_model_ms` with the profile's coefficients{result.get('coefficients_note', '')}")  # fmt: skip
    lines = [
        "# Latency model vs measured latency on whole networks (OpenVINO CPU)",
        "",
        f"`{result['command']}` — profile `{result['profile']}`, OpenVINO {result['machine']['openvino']} "
        f"`PERFORMANCE_HINT=LATENCY`, batch 1, host {result['machine']['cpu']} (flags: "
        f"{result['machine'].get('flags', '?')}). Measured = median of {result['rounds']} interleaved round medians "
        f"({result['per_round_s']:g} s per engine per round); predicted = {how}.",
        "",
        "| model | plans | within ±10 % | within ±20 % | median \\|error\\| | max \\|error\\| | mean error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, net in result["models"].items():
        s = net["stats"]
        lines.append(f"| {key} | {s['n']} | {s['within_10']:.0%} | {s['within_20']:.0%} | {s['median_abs_error']:.1%} "
                     f"| {s['max_abs_error']:.1%} | {s['mean_error']:+.1%} |")  # fmt: skip
    s = result["stats"]
    lines.append(f"| **all** | {s['n']} | {s['within_10']:.0%} | {s['within_20']:.0%} | {s['median_abs_error']:.1%} "
                 f"| {s['max_abs_error']:.1%} | {s['mean_error']:+.1%} |")  # fmt: skip
    rf = result.get("refit")
    if rf:
        lines += [
            "",
            f"**Refit on whole networks** (`--refit`, coefficients {', '.join(f'`{n}`' for n in rf['names'])}; every "
            "other coefficient from the micro-benchmark calibration). *Held-out*: each model predicted with "
            "coefficients fitted on the other models only. *Anchored*: the same, × the measured/predicted ratio of "
            "the model's own FP32 engine (FP32 itself not scored).",
            "",
            "| model | held-out ±10 % | ±20 % | median \\|error\\| | anchored ±10 % | ±20 % | median \\|error\\| | "
            "FP32 scale |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, m in rf["models"].items():
            h, a = m["held_out"], m["held_out_anchored"]
            lines.append(f"| {key} | {h['within_10']:.0%} | {h['within_20']:.0%} | {h['median_abs_error']:.1%} | "
                         f"{a['within_10']:.0%} | {a['within_20']:.0%} | {a['median_abs_error']:.1%} | "
                         f"{m['anchor_scale']:.2f} |")  # fmt: skip
        h = rf["held_out"]
        c = rf["all_models_cost"]
        lines += [
            "",
            f"All models held out in turn: {h['within_10']:.0%} within ±10 %, {h['within_20']:.0%} within ±20 %, "
            f"median |error| {h['median_abs_error']:.1%}. Fitted on all models: "
            + ", ".join(f"`{n}` = {c[n]:g}" for n in rf["names"] if n in c)
            + ".",
        ]
    for key, net in result["models"].items():
        lines += [
            "",
            f"## {key}: {net['label']} ({net['layers']} quantizable layers)",
            "",
            "| plan | kind | predicted ms | measured ms | error | spread |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, row in net["plans"].items():
            values = row["round_medians_ms"]
            spread = (max(values) - min(values)) / row["measured_ms"]
            lines.append(f"| {name} | {row['kind']} | {row['predicted_ms']:.3f} | {row['measured_ms']:.3f} | "
                         f"{row['error']:+.1%} | {spread:.0%} |")  # fmt: skip
        lines.append("")
        lines.append(
            f"Load average (1 min) over the rounds: {'/'.join(f'{x:.1f}' for x in net['loadavg_1min'])}; planning "
            f"{net['planning_s']:.1f} s, building {net['build_s']:.0f} s."
        )
    if result.get("conclusion"):
        lines += ["", "## Conclusion", "", result["conclusion"]]
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, onnxruntime {m['onnxruntime']}, numpy "
        f"{m['numpy']}; load average before {'/'.join(f'{x:.1f}' for x in result['loadavg_before'])}, after "
        f"{'/'.join(f'{x:.1f}' for x in result['loadavg_after'])} (other agents share these 2 cores); {m['date']}.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    lo, hi = np.inf, 0.0
    for key, net in result["models"].items():
        p = np.array([r["predicted_ms"] for r in net["plans"].values()])
        m = np.array([r["measured_ms"] for r in net["plans"].values()])
        ax.scatter(m, p, label=key, s=18)
        lo, hi = min(lo, p.min(), m.min()), max(hi, p.max(), m.max())
    xs = np.geomspace(lo * 0.8, hi * 1.25, 50)
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="gray", alpha=0.2, label="±10 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured median (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(f"Cost model vs OpenVINO CPU ({result['profile']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def network_points(result: dict[str, Any], profile: Profile) -> dict[str, list[NetworkPoint]]:
    """The measured plans of a results JSON as :class:`NetworkPoint`s (layer terms under ``profile``), per model."""
    out: dict[str, list[NetworkPoint]] = {}
    for key, net in result["models"].items():
        layers = [_layer(raw) for raw in net["layer_table"]]
        pts = []
        for label, row in net["plans"].items():
            table = {} if row["plan"] is None else Plan.from_dict({"layers": row["plan"]}).layers
            terms = tuple(plan_layer_terms(profile, layer, table.get(layer.name)) for layer in layers)
            pts.append(NetworkPoint(key, label, terms, row["measured_ms"]))
        out[key] = pts
    return out


def _layer(raw: dict[str, Any]) -> Layer:
    return Layer(**{**raw, "weight_shape": tuple(raw["weight_shape"])})


def _predict(cost: CostModel, point: NetworkPoint) -> float:
    return (cost.model_overhead_us + sum(layer_terms_us(cost, lt) for lt in point.terms)) / 1e3


def refit(result: dict[str, Any], profile: Profile, names: list[str]) -> dict[str, Any]:
    """Leave-one-model-out: refit ``names`` on the other models' plans, predict the held-out model's; then the
    anchored variant (× measured/predicted FP32 of the same model, FP32 itself not scored); then the fit on all."""
    points = network_points(result, profile)
    report: dict[str, Any] = {"names": names, "models": {}}
    for key, pts in points.items():
        train = [p for k, v in points.items() if k != key for p in v]
        cost = fit_network_terms(train, profile.cost, names)
        pred = [_predict(cost, p) for p in pts]
        meas = [p.measured_ms for p in pts]
        fp32 = next(i for i, p in enumerate(pts) if p.label == "FP32")
        scale = meas[fp32] / pred[fp32]
        rest = [i for i in range(len(pts)) if i != fp32]
        report["models"][key] = {
            "held_out": accuracy_stats(pred, meas),
            "held_out_anchored": accuracy_stats([pred[i] * scale for i in rest], [meas[i] for i in rest]),
            "predicted_ms": dict(zip([p.label for p in pts], pred, strict=True)),
            "anchor_scale": scale,
            "cost": dataclasses.asdict(cost),
        }
    everything = [p for v in points.values() for p in v]
    final = fit_network_terms(everything, profile.cost, names)
    report["all_models_cost"] = dataclasses.asdict(final)
    report["all_models_in_sample"] = accuracy_stats([_predict(final, p) for p in everything],
                                                    [p.measured_ms for p in everything])  # fmt: skip
    held = [(pred, p.measured_ms) for key, pts in points.items()
            for pred, p in zip(report["models"][key]["predicted_ms"].values(), pts, strict=True)]  # fmt: skip
    report["held_out"] = accuracy_stats([a for a, _ in held], [b for _, b in held])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--profile", default=None, help="default: the host's (--profile auto)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round-s", type=float, default=0.25)
    parser.add_argument("--planner-budgets", type=int, default=3)
    parser.add_argument("--name", default="latency_model", help="results file stem")
    parser.add_argument("--wait-load", type=float, default=2.5, help="wait (≤ 90 s) for a 1-min load below this")
    parser.add_argument("--conclusion", default="")
    parser.add_argument("--latency", choices=("measured", "analytic"), default="measured",
                        help="predict with the measured cost table of each model (the product's path; default) or "
                        "the profile's analytic cost model")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--refit", type=Path, help="refit --fit coefficients on this results JSON (no timing)")
    parser.add_argument("--fit", nargs="*", default=["model_overhead_us", "quantize_bandwidth_gbps",
                                                     "sparse_overhead_us"])  # fmt: skip
    args = parser.parse_args()
    profile = load_profile(args.profile or host_profile_name())
    if args.refit is not None:
        result = json.loads(args.refit.read_text())
        report = refit(result, profile, args.fit)
        for key, m in report["models"].items():
            h, a = m["held_out"], m["held_out_anchored"]
            print(f"{key:16s} held-out: {h['within_10']:.0%} ±10 %, {h['within_20']:.0%} ±20 %, median "
                  f"{h['median_abs_error']:.1%} | anchored on FP32: {a['within_10']:.0%} ±10 %, {a['within_20']:.0%} "
                  f"±20 %, median {a['median_abs_error']:.1%} (scale {m['anchor_scale']:.2f})")  # fmt: skip
        print("all-model fit:", {k: v for k, v in report["all_models_cost"].items()})
        print("in-sample:", report["all_models_in_sample"], "held-out:", report["held_out"])
        if not args.no_write:
            result["refit"] = report
            result["conclusion"] = args.conclusion or result.get("conclusion", "")
            args.refit.write_text(json.dumps(result, indent=2) + "\n")
            args.refit.with_suffix(".md").write_text(markdown(result))
        return
    load_before = os.getloadavg()
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rexdeploy-latmodel-") as tmp:
        for key in args.models:
            t0 = time.perf_counter()
            models[key] = measure_model(
                key, profile, args.rounds, args.per_round_s, args.planner_budgets, Path(tmp), args.wait_load,
                args.latency,
            )
            s = models[key]["stats"]
            print(f"## {key} ({time.perf_counter() - t0:.0f} s): {s['within_10']:.0%} within ±10 %, "
                  f"{s['within_20']:.0%} within ±20 %, median |error| {s['median_abs_error']:.1%}")  # fmt: skip
            for name, row in models[key]["plans"].items():
                print(f"  {name:48s} pred {row['predicted_ms']:8.3f}  meas {row['measured_ms']:8.3f}  "
                      f"err {row['error']:+6.1%}")  # fmt: skip
    rows = [r for net in models.values() for r in net["plans"].values()]
    result = {
        "command": "python benchmarks/bench_latency_model.py " + " ".join(sys.argv[1:]),
        "profile": profile.name,
        "latency_source": args.latency,
        "cost": dataclasses.asdict(profile.cost),
        "rounds": args.rounds,
        "per_round_s": args.per_round_s,
        "models": models,
        "stats": accuracy_stats([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]),
        "conclusion": args.conclusion,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "machine": machine_info(),
    }
    s = result["stats"]
    print(
        f"all: {s['within_10']:.0%} within ±10 %, {s['within_20']:.0%} within ±20 %, median {s['median_abs_error']:.1%}"
    )
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
