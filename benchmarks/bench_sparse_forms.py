"""Emission forms of REx orders on OpenVINO CPU: which is fastest, and does a sparse order cost its γ share?

Run: ``python benchmarks/bench_sparse_forms.py [--rounds N] [--forms ...] [--no-write]``.

Three small networks (batch 1, seeded random weights, built with ``onnx.helper``):

- ``conv3x3``: 6 Conv 3×3, 128 → 128 channels, 56×56, bias + ReLU (the stack of shared/MEASURED.md);
- ``conv1x1``: 6 Conv 1×1, 256 → 256 channels, 56×56, bias + ReLU;
- ``depthwise``: 3 MobileNetV2 inverted-residual blocks at 56×56 (1×1 24 → 144, ReLU6, depthwise 3×3,
  ReLU6, 1×1 144 → 24, residual Add) — depthwise-heavy.

Each is expanded W8A8-style with the host's profile (``x86-avx2`` on a CPU without AVX-512 VNNI: 7-bit
weights, int8 activations; ``x86-avx512``: 8-bit) in every form: FP32 (the model itself), K = 1, K = 2
dense as branches + Add, K = 2 dense as one concatenated kernel + Split/Sum, and K = 2 with a sparse second
order (budget γ ∈ {0.125, 0.25, 0.5}: the order keeps γ of the output channels) in each ``sparse_form``
of :func:`rexdeploy.passes.expand.expand`. Every engine is built with the OpenVINO builder
(``PERFORMANCE_HINT=LATENCY``) and all engines of a network are timed interleaved — round-robin, a short
timing per engine per round — so that the machine's noise is shared; a form's latency is the median of its
per-round medians. The runtime precision of every Convolution (OpenVINO's execution graph) says whether the
int8 kernels ran. Results: ``benchmarks/results/sparse_forms.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_openvino import kernel_layers

from rexdeploy.analyze import find_layers
from rexdeploy.builders.base import TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.graph import fold_batchnorm, save_model
from rexdeploy.hostcpu import host_profile_name
from rexdeploy.passes.expand import SPARSE_FORMS, expand
from rexdeploy.plans import uniform_plan
from rexdeploy.profile import load_profile
from rexdeploy.ranges import probe_ranges

RESULTS = Path(__file__).resolve().parent / "results"
GAMMAS = (0.125, 0.25, 0.5, 0.75)
INT8 = ("u8", "i8")


# ----------------------------------------------------------------------------------------------------------
# the networks


def _w(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], c_in: int, c_out: int,
           hw: int) -> onnx.ModelProto:  # fmt: skip
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c_in, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c_out, hw, hw])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_sparse_forms")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_stack(layers: int, channels: int, kernel: int, hw: int, seed: int = 0) -> onnx.ModelProto:
    """``layers`` × (Conv kernel×kernel, channels → channels, same padding, bias) + ReLU."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    pad = kernel // 2
    for i in range(layers):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits += [
            numpy_helper.from_array(_w(rng, (channels, channels, kernel, kernel), channels * kernel * kernel), w),
            numpy_helper.from_array((0.1 * rng.standard_normal(channels)).astype(np.float32), b),
        ]
        y = "y" if i == layers - 1 else f"relu{i}"
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", kernel_shape=[kernel, kernel],
                                      pads=[pad] * 4))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [y], name=f"relu{i}"))
        x = y
    return _model(f"conv{kernel}x{kernel}_stack", nodes, inits, channels, channels, hw)


def inverted_residuals(blocks: int, channels: int, expanded: int, hw: int, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 blocks: 1×1 expand + ReLU6, depthwise 3×3 + ReLU6, 1×1 project, residual Add."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, dtype=np.float32), "six"),
    ]
    x = "x"

    def conv(name: str, src: str, shape: tuple[int, ...], fan_in: int, group: int = 1, k: int = 1) -> str:
        inits.append(numpy_helper.from_array(_w(rng, shape, fan_in), f"{name}.weight"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(shape[0])).astype(np.float32), f"{name}.bias"))
        nodes.append(
            helper.make_node(
                "Conv",
                [src, f"{name}.weight", f"{name}.bias"],
                [name],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        return name

    def relu6(src: str) -> str:
        nodes.append(helper.make_node("Clip", [src, "zero", "six"], [f"{src}_relu6"], name=f"{src}_relu6"))
        return f"{src}_relu6"

    for i in range(blocks):
        h = relu6(conv(f"b{i}.expand", x, (expanded, channels, 1, 1), channels))
        h = relu6(conv(f"b{i}.dw", h, (expanded, 1, 3, 3), 9, group=expanded, k=3))
        h = conv(f"b{i}.project", h, (channels, expanded, 1, 1), expanded)
        y = "y" if i == blocks - 1 else f"b{i}_out"
        nodes.append(helper.make_node("Add", [h, x], [y], name=f"b{i}.add"))
        x = y
    return _model("inverted_residuals", nodes, inits, channels, channels, hw)


NETWORKS: dict[str, tuple[str, Callable[[], onnx.ModelProto]]] = {
    "conv3x3": ("6 × Conv 3×3 128→128, 56×56", lambda: conv_stack(6, 128, 3, 56)),
    "conv1x1": ("6 × Conv 1×1 256→256, 56×56", lambda: conv_stack(6, 256, 1, 56)),
    "depthwise": ("3 × MobileNetV2 block 24→144→24 (depthwise 3×3), 56×56", lambda: inverted_residuals(3, 24, 144, 56)),
}


# ----------------------------------------------------------------------------------------------------------
# the forms


@dataclass(frozen=True)
class Form:
    name: str
    order: int = 1  # 0: the FP32 model itself
    gamma: float | None = None
    form: str = "branches"
    sparse_form: str = "gather"


def all_forms(sparse_forms: tuple[str, ...]) -> list[Form]:
    forms = [
        Form("fp32", order=0),
        Form("K=1"),
        Form("K=2 branches", order=2),
        Form("K=2 concat", order=2, form="concat"),
    ]
    for sf in sparse_forms:
        forms += [Form(f"K=2 γ={g:g} {sf}", order=2, gamma=g, sparse_form=sf) for g in GAMMAS]
    return forms


def expanded_model(folded: onnx.ModelProto, ranges: dict[str, float], form: Form, bits: int) -> onnx.ModelProto:
    layers = find_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=bits, order=form.order, gamma=form.gamma,
                        act_bits=8, form=form.form)  # fmt: skip
    return expand(folded, plan, ranges, sparse_form=form.sparse_form).model


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


# ----------------------------------------------------------------------------------------------------------
# measurement


def measure_network(
    key: str, forms: list[Form], profile_name: str, bits: int, rounds: int, per_round_s: float, tmp: Path
) -> dict[str, Any]:
    label, make = NETWORKS[key]
    profile = load_profile(profile_name)
    builder = get_builder("openvino")
    source = make()
    folded, _ = fold_batchnorm(source)
    taps = list(dict.fromkeys(layer.input for layer in find_layers(folded)))
    ranges = probe_ranges(folded, taps, batch=4)
    x = np.random.default_rng(1).standard_normal((1, *[d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]])).astype(np.float32)  # fmt: skip
    reference = run_ort(source, x)
    engines: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    onnx_outputs: dict[str, np.ndarray] = {}
    for form in forms:
        model = source if form.order == 0 else expanded_model(folded, ranges, form, bits)
        path = save_model(model, tmp / key / f"{len(engines):02d}.onnx")
        engine = builder.build(path, profile, tmp / key / f"{len(engines):02d}")
        engines[form.name] = engine
        onnx_outputs[form.name] = run_ort(model, x)
        ov_out = builder.run(engine, {next(iter(engine.inputs)): x})[0]
        summary = builder.precision_summary(engine)  # type: ignore[attr-defined]
        # the layers that compute REx orders (or the FP32 model's); the one-hot scatters are float by design
        kernels = kernel_layers(engine).values()
        scatter = [k for k in kernels if any(n.endswith("_scatter") for n in k.onnx_nodes)]
        rex = [k for k in kernels if k not in scatter]
        rows[form.name] = {
            "form": form.__dict__,
            "nodes": len(model.graph.node),
            "ops": _ops(model),
            "weight_bytes": sum(len(t.raw_data) for t in model.graph.initializer),
            "build_s": engine.build_seconds,
            "precisions": summary,
            "conv_int8": sum(k.runtime_precision in INT8 for k in rex),
            "conv_f32": sum(k.runtime_precision not in INT8 for k in rex),
            "scatter_kernels": {
                p: sum(k.runtime_precision == p for k in scatter) for p in {k.runtime_precision for k in scatter}
            },
            "onnx_vs_fp32_rel_l2": _rel(onnx_outputs[form.name], reference),
            "openvino_vs_onnx_rel_l2": _rel(ov_out, onnx_outputs[form.name]),
            "executed_layers": len(engine.layer_precisions),
        }
    # the sparse forms compute the same numbers: each against the gather form of the same γ
    for form in forms:
        if form.gamma is not None and form.sparse_form != "gather":
            twin = f"K=2 γ={form.gamma:g} gather"
            if twin in onnx_outputs:
                rows[form.name]["vs_gather_max_abs"] = float(
                    np.max(np.abs(onnx_outputs[form.name] - onnx_outputs[twin]))
                )
    # interleaved timing: every round times every engine once, in a rotated order
    samples: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    settings = TimingSettings(warmup_s=0.1, duration_s=per_round_s, min_runs=3)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(builder.time(engines[name], settings).median_ms)
        load.append(os.getloadavg()[0])

    def ratio(name: str, base: str) -> float:
        """Median over rounds of the per-round latency ratio: both were timed in the same round."""
        return statistics.median(a / b for a, b in zip(samples[name], samples[base], strict=True))

    dense_k2 = ratio("K=2 branches", "K=1")
    for name, values in samples.items():
        ms = statistics.median(values)
        row = rows[name]
        row["median_ms"] = ms
        row["min_ms"] = min(values)
        row["round_medians_ms"] = values
        row["spread"] = (max(values) - min(values)) / ms if ms > 0 else 0.0
        row["vs_int8_k1"] = ratio(name, "K=1")
        row["vs_fp32"] = ratio(name, "fp32")
        # the extra cost of order 2 as a share of a dense order 2's extra cost (ideal: γ)
        if dense_k2 > 1.0 and name not in ("fp32", "K=1"):
            row["extra_share_of_dense_order"] = (row["vs_int8_k1"] - 1.0) / (dense_k2 - 1.0)
    engines.clear()
    return {"label": label, "forms": rows, "loadavg_1min": load}


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(sorted(ops.items()))


# ----------------------------------------------------------------------------------------------------------
# report


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# REx emission forms on OpenVINO CPU",
        "",
        f"`python benchmarks/bench_sparse_forms.py` — profile `{result['profile']}` ({result['bits']}-bit weights, "
        "int8 activations, per-channel symmetric), batch 1, OpenVINO "
        f"{result['openvino']} `PERFORMANCE_HINT=LATENCY`, f32 inference precision. All engines of a network are "
        f"timed interleaved: {result['rounds']} rounds, each timing every engine for {result['per_round_s']:g} s "
        "(the runtime's own latency per inference), in a rotated order; latency = median of the per-round medians, "
        "ratios = median over rounds of the ratio of two engines' medians in the same round.",
        "",
        "Columns: *vs K=1* and *vs FP32* are latency ratios; *extra share* = (latency − K=1) / (K=2 branches − K=1), "
        "the cost of the second order as a share of a dense second order's (a sparse order should cost ≈ γ); "
        "*int8 convs* = Convolution layers of OpenVINO's execution graph that ran in u8/i8, of all; "
        "*spread* = (max − min) / median of the per-round medians.",
        "",
    ]
    for key, net in result["networks"].items():
        lines += [
            f"## {key}: {net['label']}",
            "",
            "| form | ms | vs K=1 | vs FP32 | extra share | int8 convs | spread | ONNX nodes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in net["forms"].items():
            extra = row.get("extra_share_of_dense_order")
            lines.append(
                f"| {name} | {row['median_ms']:.3f} | {row['vs_int8_k1']:.2f} | {row['vs_fp32']:.2f} | "
                f"{'' if extra is None else f'{extra:.2f}'} | {row['conv_int8']}/{row['conv_int8'] + row['conv_f32']} | "
                f"{row['spread']:.0%} | {row['nodes']} |"
            )
        fallbacks = [n for n, r in net["forms"].items() if r["form"]["order"] > 0 and r["conv_f32"] > 0]
        scatters = {n: r["scatter_kernels"] for n, r in net["forms"].items() if r.get("scatter_kernels")}
        if scatters:
            lines += [
                "",
                "One-hot scatter kernels (float by design, not counted above): "
                + "; ".join(f"{n}: {', '.join(f'{c} {p}' for p, c in k.items())}" for n, k in scatters.items())
                + ".",
            ]
        lines += [
            "",
            "Convolutions that fell back to f32: "
            + (", ".join(f"{n} ({net['forms'][n]['conv_f32']})" for n in fallbacks) if fallbacks else "none")
            + f". 1-min load average over the rounds: {'/'.join(f'{x:.1f}' for x in net['loadavg_1min'])}.",
            "",
        ]
    if result.get("conclusion"):
        lines += ["## Conclusion", "", result["conclusion"], ""]
    m = result["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, onnxruntime {m['onnxruntime']}; "
        f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in m['loadavg_before'])}, after "
        f"{'/'.join(f'{x:.1f}' for x in m['loadavg_after'])} (other agents share these 2 cores); {m['date']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--sparse-forms", nargs="*", default=list(SPARSE_FORMS), choices=list(SPARSE_FORMS))
    parser.add_argument("--profile", default=None, help="default: the host's (rexdeploy --profile auto)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--per-round-s", type=float, default=0.4)
    parser.add_argument("--conclusion", default="", help="text for the report's conclusion section")
    parser.add_argument("--render", type=Path, help="only re-render this results JSON (with --conclusion)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["conclusion"] = args.conclusion or result.get("conclusion", "")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sparse_forms.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "sparse_forms.md").write_text(markdown(result))
        return

    import openvino

    profile_name = args.profile or host_profile_name()
    bits = max(load_profile(profile_name).weight_bits("conv"))
    forms = all_forms(tuple(args.sparse_forms))
    load_before = os.getloadavg()
    networks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rexdeploy-sparse-") as tmp:
        for key in args.networks:
            t0 = time.perf_counter()
            networks[key] = measure_network(key, forms, profile_name, bits, args.rounds, args.per_round_s, Path(tmp))
            print(f"## {key}: {networks[key]['label']} ({time.perf_counter() - t0:.0f} s)")
            for name, row in networks[key]["forms"].items():
                extra = row.get("extra_share_of_dense_order")
                print(f"  {name:22s} {row['median_ms']:7.3f} ms  vs K=1 {row['vs_int8_k1']:5.2f}  vs FP32 "
                      f"{row['vs_fp32']:5.2f}  extra {'' if extra is None else f'{extra:5.2f}':>5s}  "
                      f"int8 convs {row['conv_int8']}/{row['conv_int8'] + row['conv_f32']}  "
                      f"spread {row['spread']:.0%}  ov/onnx {row['openvino_vs_onnx_rel_l2']:.1e}"
                      + (f"  vs gather {row['vs_gather_max_abs']:.1e}" if "vs_gather_max_abs" in row else ""))  # fmt: skip
    machine = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    result = {
        "profile": profile_name,
        "bits": bits,
        "openvino": str(openvino.get_version()),
        "rounds": args.rounds,
        "per_round_s": args.per_round_s,
        "networks": networks,
        "conclusion": args.conclusion,
        "machine": machine,
    }
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sparse_forms.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "sparse_forms.md").write_text(markdown(result))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.machine()


if __name__ == "__main__":
    main()
