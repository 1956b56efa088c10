"""Weight-only REx layers on OpenVINO CPU: the form they run in, against float and NNCF's compressed weights.

Run: ``python benchmarks/bench_weight_only.py [--rounds 7] [--round-s 0.4]`` (needs torch, nncf).

Models:

* **BERT-style encoder** generated here with torch: 6 post-LN blocks (multi-head attention, 6 heads; GELU MLP
  1536), hidden 384, **random weights** (seed 0: fine for latency; the errors below are relative output errors
  of those random weights, not task accuracy), its input the token embeddings ``[1, T, 384]``; at T = 64 tokens
  (encoder inference, MatMuls of 64 rows: compute-bound) and T = 1 (one row, as in one decoding step: the weight
  bytes dominate).
* **digits ViT** (``models.export_digits_vit``: trained, dim 64, 17 tokens): a real transformer, tiny.

Engines (all OpenVINO 2026.4 CPU, ``PERFORMANCE_HINT=LATENCY``, batch 1):

* ``FP32``: ``INFERENCE_PRECISION_HINT=f32`` (the reference); ``OpenVINO default``: compiled with no config
  (bf16 on AVX-512 BF16 / AMX hosts);
* ``NNCF INT8_SYM`` / ``NNCF INT4_SYM g64``: ``nncf.compress_weights`` (data-free; INT4 ratio 1, group 64),
  compiled with no config — as a user runs them (dynamic activation quantization, group 32, on);
* rexdeploy weight-only plans (``act_bits=0`` on every MatMul: W8 K=1, W8 K=2, W4 K=2, and W8 K=2 in the
  ``concat`` form: one MatMul over the stacked orders + Split + Sum), compiled as rexdeploy
  compiles them (the plan's precision, ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0``), in each form:
  ``old`` (the IR as OpenVINO's ONNX frontend makes it: K compressed i8 branches + Add), ``branches i4``,
  ``grouped`` (one compressed kernel over the stacked orders), ``folded`` (one float MatMul on the summed
  orders) and ``builder`` (what ``OpenVINOBuilder.build`` now does: :func:`rexdeploy_openvino.compressed.
  compress_for_engine`), for an f32 engine and — on a bf16 host — a bf16 engine.

Timing: :func:`harness.time_interleaved` (rounds, rotating order); ratio = median over rounds of the engine's round
median / FP32's round median (same round); "best rounds" = the engine's fastest round median / FP32's fastest (less
sensitive to other jobs on a shared machine). Errors: relative L2 error of the output vs the FP32 engine and vs the
ONNX computed exactly (onnxruntime, graph optimizations off) on 4 seeded random inputs; the ViT also top-1
agreement with FP32 on its 360 held-out digits. Weights: the element types of the compiled model's
FullyConnected / MatMul weight inputs. Results: ``benchmarks/results/weight_only.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from harness import host_facts, time_interleaved
from models import export_digits_vit
from rexdeploy_openvino import OpenVINOBuilder, compiled_model
from rexdeploy_openvino._runtime import runtime_options
from rexdeploy_openvino.compressed import compress_weight_only, compressed_weight_layers

from rexdeploy.builders.base import Engine
from rexdeploy.hostcpu import cpu_flags
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import Parallel, Profile, Quantization

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, LAYERS, HEADS, FF = 384, 6, 6, 1536
PLANS = {"W8 K=1": (8, 1, "branches"), "W8 K=2": (8, 2, "branches"), "W4 K=2": (4, 2, "branches"),
         "W8 K=2 concat": (8, 2, "concat")}  # fmt: skip


def profile(bf16: bool) -> Profile:
    return Profile(
        name="bench-bf16" if bf16 else "bench-f32", engine="openvino", device="CPU", parallel=Parallel(cores=1),
        quantization=Quantization(bf16=bf16),
    )  # fmt: skip


def bert_style(tokens: int, path: Path) -> Path:
    """The random-weight encoder at ``tokens`` tokens (see the module docstring), exported once per run."""
    import torch

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.ln1, self.ln2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
            self.f1, self.f2 = torch.nn.Linear(HIDDEN, FF), torch.nn.Linear(FF, HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape

            def heads(y: torch.Tensor) -> torch.Tensor:
                return y.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5, -1) @ v
            x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, HIDDEN)))
            return self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))

    model = torch.nn.Sequential(*(Block() for _ in range(LAYERS))).eval()
    torch.onnx.export(model, (torch.randn(1, tokens, HIDDEN),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)  # fmt: skip
    return path


def exact(model: onnx.ModelProto, name: str, xs: np.ndarray) -> np.ndarray:
    """The ONNX computed as written (onnxruntime, graph optimizations off)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in xs])


def outputs(builder: OpenVINOBuilder, engine: Engine, name: str, xs: np.ndarray) -> np.ndarray:
    return np.concatenate([builder.run(engine, {name: x[None]})[0] for x in xs])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def weight_types(engine: Engine) -> dict[str, int]:
    return dict(Counter(compressed_weight_layers(compiled_model(engine)).values()))


def load_ir(builder: OpenVINOBuilder, ov_model: Any, folder: Path, prof: Profile, options: dict[str, str]) -> Engine:
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)
    return builder.load(folder / "model.xml", prof, options)


def engines_for(
    onnx_path: Path, work: Path, precisions: list[str]
) -> tuple[dict[str, Engine], dict[str, onnx.ModelProto]]:
    """Every engine of one model; the ONNX each rexdeploy engine computes (for the exact reference)."""
    import nncf
    import openvino as ov

    builder = OpenVINOBuilder()
    core = ov.Core()
    base = onnx.load(str(onnx_path))
    engines: dict[str, Engine] = {"FP32": builder.build(onnx_path, profile(False), work / "fp32")}
    engines["OpenVINO default"] = builder.load(work / "fp32" / "model.xml", profile(False), {})
    for label, mode, extra in (
        ("NNCF INT8_SYM", nncf.CompressWeightsMode.INT8_SYM, {}),
        (
            "NNCF INT4_SYM g64",
            nncf.CompressWeightsMode.INT4_SYM,
            {
                "ratio": 1.0,
                "group_size": 64,
                "advanced_parameters": nncf.AdvancedCompressionParameters(
                    group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST
                ),
            },
        ),
    ):
        compressed = nncf.compress_weights(ov.convert_model(str(onnx_path)), mode=mode, **extra)
        engines[label] = load_ir(builder, compressed, work / label.replace(" ", "_"), profile(False), {})
    graphs: dict[str, onnx.ModelProto] = {}
    for precision in precisions:
        prof = profile(precision == "bf16")
        options = runtime_options(core, "CPU", precision)
        for plan_name, (bits, order, plan_form) in PLANS.items():
            lp = LayerPlan(bits=bits, order=order, act_bits=0, form=plan_form)
            layers = {
                n.name: lp for n in base.graph.node if n.op_type in ("MatMul", "Gemm") and _constant_weight(base, n)
            }
            model = expand_model(base, Plan(layers=layers), profile=prof).model
            path = work / f"{plan_name.replace(' ', '_').replace('=', '')}_{precision}.onnx"
            onnx.save(model, str(path))
            forms = (
                ["old", "builder"]
                + (["branches i4"] if bits == 4 else [])
                + (["grouped", "folded"] if order > 1 and plan_form == "branches" else [])
            )
            for form in forms:
                label = f"rexdeploy {plan_name} {precision} {form}"
                graphs[label] = model
                if form == "builder":
                    engines[label] = builder.build(path, prof, work / label.replace(" ", "_"))
                    continue
                ov_model = ov.convert_model(str(path))
                if form != "old":
                    compress_weight_only(ov_model, "branches" if form == "branches i4" else form)
                engines[label] = load_ir(builder, ov_model, work / label.replace(" ", "_"), prof, options)
    return engines, graphs


def _constant_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """A MatMul with a constant weight (not attention's activation × activation products)."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return len(node.input) > 1 and (node.input[1] in inits or node.input[1] in consts)


def measure_model(name: str, onnx_path: Path, input_name: str, xs: np.ndarray, precisions: list[str],
                  rounds: int, round_s: float, agreement: Callable[[np.ndarray, np.ndarray], float] | None = None,
                  ) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        engines, graphs = engines_for(onnx_path, Path(tmp), precisions)
        builder = OpenVINOBuilder()
        ref = outputs(builder, engines["FP32"], input_name, xs)
        load_before = os.getloadavg()
        timed = time_interleaved(builder, engines, rounds=rounds, round_s=round_s)
        load_after = os.getloadavg()
        fp32_rounds = timed["FP32"]["round_medians_ms"]
        rows: dict[str, Any] = {}
        for label, engine in engines.items():
            out = outputs(builder, engine, input_name, xs)
            t = timed[label]
            row: dict[str, Any] = {
                "median_ms": round(t["median_ms"], 4),
                "best_ms": round(t["best_ms"], 4),
                "best_ratio_vs_fp32": round(t["best_ms"] / timed["FP32"]["best_ms"], 3),
                "ratio_vs_fp32": round(
                    statistics.median(a / b for a, b in zip(t["round_medians_ms"], fp32_rounds, strict=True)), 3
                ),
                "rel_error_vs_fp32": rel(out, ref),
                "weights": weight_types(engine),
                "options": dict(engine.options),
            }
            if label in graphs:
                row["rel_error_vs_onnx"] = rel(out, exact(graphs[label], input_name, xs))
            if agreement is not None:
                row["top1_agreement"] = agreement(out, ref)
            rows[label] = row
            print(f"{name:22s} {label:40s} {row['ratio_vs_fp32']:6.3f}x  err {row['rel_error_vs_fp32']:.2e}  "
                  f"{row.get('rel_error_vs_onnx', float('nan')):.2e}  {row['weights']}", flush=True)  # fmt: skip
    return {"rows": rows, "load_avg_during": [round(v, 2) for v in (*load_before, *load_after)][::3]}


def conv_probe() -> dict[str, str]:
    """Whether a Conv whose weight is DequantizeLinear(int8) stays compressed: its compiled weight type."""
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (64, 32, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(rng.uniform(1e-3, 1e-2, 64).astype(np.float32), "s"),
        numpy_helper.from_array(np.zeros(64, np.int8), "z"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=0),
             helper.make_node("Conv", ["x", "wd"], ["y"], pads=[1, 1, 1, 1])]  # fmt: skip
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = ov.convert_model(
        io.BytesIO(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    )
    out = {}
    for precision in ("f32", "bf16"):
        compiled = ov.Core().compile_model(model.clone(), "CPU", {"INFERENCE_PRECISION_HINT": precision})
        out[precision] = ",".join(sorted(set(compressed_weight_layers(compiled).values())))
    return out


def to_markdown(result: dict[str, Any]) -> str:
    host = result["host"]
    lines = [
        "# Weight-only layers on OpenVINO CPU: compressed, grouped, folded",
        "",
        f"Host: {host['cpu']}, {host['cores']} cores, flags {', '.join(result['cpu_flags'])}; OpenVINO "
        f"{host['versions'].get('openvino')}; {host['date']}. Other jobs shared the 2 cores (load average during each "
        "model's timing in its section): latencies are noisy; ratios are taken per round against FP32 timed in the same "
        f"round ({result['rounds']} rounds × {result['round_s']} s, rotating order), median over rounds.",
        "",
        "Weight types: the element type of each FullyConnected / MatMul weight as the compiled model holds it "
        "(i8 / i4: compressed). Errors: relative L2 output error vs the FP32 engine and vs the ONNX computed exactly "
        "(onnxruntime, graph optimizations off). The BERT-style encoder has random weights (latency; its errors are "
        "relative output errors, not task accuracy).",
        "",
        f"A Conv whose weight is DequantizeLinear(int8) compiles with weights "
        f"{' / '.join(f'{v} ({k} engine)' for k, v in result['conv_weights'].items())}: the CPU plugin has no compressed-weight convolution, so weight-only Conv layers (MobileNetV2) run "
        "float and are not measured here.",
    ]
    for model, data in result["models"].items():
        lines += ["", f"## {model}", "", f"Load average (1 min) before / after timing: {data['load_avg_during']}", ""]
        agree = any("top1_agreement" in r for r in data["rows"].values())
        head = (
            "| engine | × FP32 (median of rounds) | × FP32 (best rounds) | ms | rel. error vs FP32 | vs ONNX exact | weights |"
            + (" top-1 vs FP32 |" if agree else "")
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for label, r in data["rows"].items():
            onnx_err = f"{r['rel_error_vs_onnx']:.1e}" if "rel_error_vs_onnx" in r else ""
            weights = ", ".join(f"{k} ×{v}" for k, v in sorted(r["weights"].items()))
            cell = f" {100 * r['top1_agreement']:.1f} % |" if agree else ""
            lines.append(f"| {label} | {r['ratio_vs_fp32']:.2f} | {r['best_ratio_vs_fp32']:.2f} | {r['median_ms']:.3f} | {r['rel_error_vs_fp32']:.1e} | "
                         f"{onnx_err} | {weights} |{cell}")  # fmt: skip
    lines += ["", result.get("notes", ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-s", type=float, default=0.4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.markdown_only:
        saved = json.loads((RESULTS / "weight_only.json").read_text(encoding="utf-8"))
        (RESULTS / "weight_only.md").write_text(to_markdown(saved), encoding="utf-8")
        return
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"})
    precisions = ["f32", "bf16"] if ({"avx512_bf16", "amx_bf16"} & set(flags)) else ["f32"]
    result: dict[str, Any] = {"host": host_facts(), "cpu_flags": flags, "rounds": args.rounds, "round_s": args.round_s,
                              "conv_weights": conv_probe(), "models": {}}  # fmt: skip
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            path = bert_style(tokens, Path(tmp) / f"bert_{tokens}.onnx")
            xs = rng.standard_normal((4, tokens, HIDDEN)).astype(np.float32)
            name = f"BERT-style encoder, {tokens} token{'s' if tokens > 1 else ''}"
            result["models"][name] = measure_model(name, path, "x", xs, precisions, args.rounds, args.round_s)
    if not args.no_vit:
        vit = export_digits_vit()
        xs = vit.inputs[vit.test_index].astype(np.float32)

        def top1(out: np.ndarray, ref: np.ndarray) -> float:
            return float(np.mean(out.argmax(-1) == ref.argmax(-1)))

        result["models"]["digits ViT (dim 64, 17 tokens)"] = measure_model(
            "digits ViT", vit.path, "input", xs, precisions, args.rounds, args.round_s, top1
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(to_markdown(result))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "weight_only.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "weight_only.md").write_text(to_markdown(result), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
