"""Data-free LayerNorm smoothing (SmoothQuant with γ, β as the channel-range estimate) at W8A8: does it help?

Run: ``python benchmarks/bench_smoothing.py [--sentences 64] [--no-write]`` (needs ``pip install -e '.[bench]'``).

Every variant is rexdeploy's expansion (``expand_model``: weights per-channel int8 with K residual orders, every
MatMul/Gemm input per-tensor symmetric int8 from data-free ranges, profile x86-avx512) with the LayerNorm
smoothing of :mod:`rexdeploy.passes.smooth` off or at α ∈ {0.3, 0.5, 0.7}, run with onnxruntime (graph
optimizations off: the Q/DQ graph computed exactly; no latency is measured — smoothing adds no node, the
engine graph has the same ops) against the FP32 model. Models:

* **digits ViT** — :func:`models.export_digits_vit`: a pre-LN ViT (2 blocks, width 64) trained here on 80 % of
  scikit-learn's digits; evaluated on the 20 % held out (never trained on, no part in any choice): relative L2
  error of the logits, top-1 agreement with FP32, accuracy against the labels.
* **BERT-style encoder** — written here (6 layers, hidden 384, 6 heads, FFN 1536, GELU, 64 tokens, vocabulary
  8192, word + position embeddings → LayerNorm), BERT's own initialisation (weights N(0, 0.02), biases 0,
  LayerNorm γ = 1, β = 0), seeded; no pretrained BERT is installable here. Two block layouts: **post-LN** as
  BERT (``LN(x + sublayer(x))``) and **pre-LN** (``x + sublayer(LN(x))``, final LN). Each with and without
  **outlier channels**: a random init has none, while trained BERTs carry a few hidden dimensions with
  large LayerNorm γ and β in every layer (Kovaleva et al. 2021, "BERT Busters"; Bondarenko et al. 2021) —
  the case SmoothQuant is for. They are put in on purpose: in every LayerNorm, dimensions 17 and 211 get
  γ = 10 and β = ±3 (the others γ = 1, β = 0), so those channels of a LayerNorm output reach ~±33 where the
  rest stay within ~±4. Evaluated on 64-word windows of real English (this repository's README and docs,
  words hashed to ids): cosine of mean-pooled embeddings vs FP32 (mean and worst) and relative L2 error of
  the hidden states.

Activation ranges: ``default`` is what ``expand_model`` derives today (synthetic probes; for an integer
token-id input these are all-zero ids, :func:`rexdeploy.ranges.synthetic_inputs`); ``tokens`` replaces them by
the same rule (99.99th percentile of |x|) over 16 random-token probes (:func:`rexdeploy.probes.family_inputs`,
family ``tokens``) — still data-free — to show how much of the encoder's error that choice carries.
Results: ``benchmarks/results/smoothing.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from harness import host_facts
from models import CACHE_DIR, accuracy, export_digits_vit, fidelity, run_onnx

from rexdeploy.analyze import quantizable_layers
from rexdeploy.hostcpu import cpu_flags
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.passes.smooth import find_smoothable, smooth_layernorms
from rexdeploy.probes import GAUSSIAN, TOKENS, family_inputs
from rexdeploy.ranges import DEFAULT_PERCENTILE, run_with_taps

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)
ORDERS = (1, 2)
ENCODER = {"vocab": 8192, "hidden": 384, "layers": 6, "heads": 6, "ffn": 1536, "seq": 64, "seed": 0}
OUTLIER_DIMS = (17, 211)
OUTLIER_GAMMA, OUTLIER_BETA = 10.0, 3.0
TOKEN_PROBES = 16


# ----------------------------------------------------------------------------------------------------------
# the BERT-style encoder


def _encoder_module(pre_ln: bool, outliers: bool) -> Any:
    import torch
    from torch import nn

    cfg = ENCODER
    d, heads, seq = int(cfg["hidden"]), int(cfg["heads"]), int(cfg["seq"])

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.reshape(b, t, heads, d // heads).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
            return self.out((att @ v).transpose(1, 2).reshape(b, t, d))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.ln1, self.ln2 = Attention(), nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
            self.ffn = nn.Sequential(nn.Linear(d, int(cfg["ffn"])), nn.GELU(), nn.Linear(int(cfg["ffn"]), d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if pre_ln:
                x = x + self.attn(self.ln1(x))
                return x + self.ffn(self.ln2(x))
            x = self.ln1(x + self.attn(x))  # BERT: post-LN
            return self.ln2(x + self.ffn(x))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.positions = nn.Embedding(int(cfg["vocab"]), d), nn.Embedding(seq, d)
            self.ln = nn.LayerNorm(d, eps=1e-12)
            self.layers = nn.Sequential(*[Layer() for _ in range(int(cfg["layers"]))])
            self.final = nn.LayerNorm(d, eps=1e-12) if pre_ln else nn.Identity()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.ln(self.words(ids) + self.positions.weight[: ids.shape[1]])
            return self.final(self.layers(x))

    torch.manual_seed(int(cfg["seed"]))
    model = Encoder()
    with torch.no_grad():
        for module in model.modules():  # BERT's initialisation (modeling_bert.BertPreTrainedModel._init_weights)
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear):
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
                if outliers:
                    dims = list(OUTLIER_DIMS)
                    module.weight[dims] = OUTLIER_GAMMA
                    module.bias[dims] = torch.tensor([OUTLIER_BETA, -OUTLIER_BETA])
    return model.eval()


def export_encoder(pre_ln: bool, outliers: bool) -> Path:
    """The encoder as ONNX (opset 17, dynamic batch; input ``input_ids`` (batch, 64) int64, output ``hidden``),
    cached under ``~/.cache/rexdeploy-bench/``."""
    import torch

    key = json.dumps({**ENCODER, "pre_ln": pre_ln, "outliers": outliers, "dims": OUTLIER_DIMS, "torch": torch.__version__,
                      "gamma": OUTLIER_GAMMA, "beta": OUTLIER_BETA})  # fmt: skip
    out = CACHE_DIR / f"bert_style_{hashlib.sha256(key.encode()).hexdigest()[:12]}_opset17.onnx"
    if out.exists():
        return out
    model = _encoder_module(pre_ln, outliers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    ids = torch.zeros(1, int(ENCODER["seq"]), dtype=torch.int64)
    torch.onnx.export(model, (ids,), str(tmp), dynamo=False, opset_version=17, do_constant_folding=True,
                      input_names=["input_ids"], output_names=["hidden"],
                      dynamic_axes={"input_ids": {0: "batch"}, "hidden": {0: "batch"}})  # fmt: skip
    exported = onnx.load(str(tmp))
    onnx.checker.check_model(exported)
    probe = sentences(4)
    with torch.no_grad():
        want = model(torch.from_numpy(probe)).numpy()
    got = run_onnx(exported, probe)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"exported encoder differs from torch (max |diff| {np.max(np.abs(got - want)):.3g})")
    tmp.replace(out)
    return out


def sentences(n: int) -> np.ndarray:
    """``n`` windows of 64 consecutive words of real English (README.md and docs/*.md of this repository, markup
    stripped), each word's id its crc32 modulo the vocabulary: (n, 64) int64."""
    text = " ".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", text)
    seq, vocab = int(ENCODER["seq"]), int(ENCODER["vocab"])
    ids = np.array([zlib.crc32(w.lower().encode()) % vocab for w in words], dtype=np.int64)
    step = max(1, (len(ids) - seq) // n)
    return np.stack([ids[i * step : i * step + seq] for i in range(n)])


# ----------------------------------------------------------------------------------------------------------
# variants


def quantized(
    model: onnx.ModelProto,
    order: int,
    alpha: float | None,
    ranges: str,
    act_bits: int = 8,
    clone: bool = False,
    channel_max: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """W8A{8|fp} K=order, smoothing at ``alpha`` (None: off; ``clone``: LayerNorms other nodes read too are smoothed
    on a copy; ``channel_max``: per-channel ranges from probes instead of γ, β); ``ranges``: ``default``
    (expand_model's own) or ``tokens`` (99.99th percentile over random-token probes, on the smoothed model)."""
    if ranges == "default" and not clone and channel_max is None:  # the product path: expand_model carries it out
        return expand_model(model, bits=8, order=order, act_bits=act_bits, smooth_alpha=alpha).model
    smoothed = (
        smooth_layernorms(model, alpha, clone=clone, channel_max=channel_max).model if alpha is not None else model
    )
    if ranges == "default":
        return expand_model(smoothed, bits=8, order=order, act_bits=act_bits).model
    taps = [layer.input for layer in quantizable_layers(smoothed)]
    ids = next(iter(family_inputs(smoothed, TOKENS, TOKEN_PROBES, seed=1).values()))
    probe = _ranges_over(smoothed, taps, ids)
    return expand_model(smoothed, bits=8, order=order, act_bits=act_bits, ranges=probe).model


def _ranges_over(model: onnx.ModelProto, taps: list[str], ids: np.ndarray) -> dict[str, float]:
    """The 99.99th percentile of |x| of each tap over ``ids`` (``probe_ranges`` takes a calibration batch's max)."""
    name = model.graph.input[0].name
    values = run_with_taps(model, {name: ids}, taps)
    return {t: float(np.percentile(np.abs(values[t]), DEFAULT_PERCENTILE)) for t in taps}


def probe_channel_max(model: onnx.ModelProto, family: str, clone: bool) -> dict[str, np.ndarray]:
    """Max |x_j| per channel of every smoothable LayerNorm output over 16 synthetic probes of ``family`` (data-free:
    what the activation ranges are probed with, kept per channel)."""
    tails = [m.tail.output for m in find_smoothable(model, clone=clone) if m.ok and m.tail is not None]
    values = run_with_taps(model, family_inputs(model, family, TOKEN_PROBES, seed=1), tails)
    return {t: np.max(np.abs(v.reshape(-1, v.shape[-1])), axis=0) for t, v in values.items()}


def channel_spread(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, float]:
    """Measured on ``x``: largest channel max |x_c| over the median channel max, per tensor (last axis = channels)."""
    values = run_with_taps(model, {model.graph.input[0].name: x}, tensors)
    out = {}
    for t in tensors:
        peak = np.max(np.abs(values[t].reshape(-1, values[t].shape[-1])), axis=0)
        out[t] = float(np.max(peak) / np.median(peak))
    return out


def sites(model: onnx.ModelProto, x: np.ndarray, alpha: float = 0.5, clone: bool = False) -> dict[str, Any]:
    """What the pass does on ``model``: smoothed / refused LayerNorms, estimated and measured channel spread."""
    result = smooth_layernorms(model, alpha, clone=clone)
    tails = {m.name: m.tail.output for m in find_smoothable(model, clone=True) if m.tail is not None}
    originals = [tails[s.layernorm] for s in result.smoothed]
    before = channel_spread(model, originals, x) if originals else {}
    after = channel_spread(result.model, [s.output for s in result.smoothed], x) if originals else {}
    return {
        "layernorms": len(find_smoothable(model)),
        "clone": clone,
        "smoothed": [
            {
                "layernorm": s.layernorm,
                "readers": list(s.readers),
                "s_min": s.scale_min,
                "s_max": s.scale_max,
                "cloned": s.cloned,
                "spread_estimated_before": s.spread_before,
                "spread_estimated_after": s.spread_after,
                "spread_measured_before": before[o],
                "spread_measured_after": after[s.output],
            }
            for s, o in zip(result.smoothed, originals, strict=True)
        ],
        "refused": [{"layernorm": n, "reason": r} for n, r in result.refused],
    }


def rows_for(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, ranges: list[str], smoothable: bool,
             metric: Any, clone: bool = False, family: str = GAUSSIAN) -> list[dict[str, Any]]:  # fmt: skip
    """W8A8 K = 1, 2 × smoothing off / each α (``clone``: on copies of shared LayerNorms) × range source; the same
    with the channel ranges from ``family`` probes instead of γ, β; and the weights-only rows (activations float)
    that show the weight error alone."""
    rows = []
    if smoothable:
        probed = probe_channel_max(model, family, clone)
        for order in ORDERS:
            for alpha in ALPHAS[1:]:
                q = quantized(model, order, alpha, "default", clone=clone, channel_max=probed)
                rows.append({"ranges": "default", "order": order, "alpha": alpha, "act": "int8", "clone": clone,
                             "estimate": f"probes ({family})", **metric(run_onnx(q, x, 16), ref)})  # fmt: skip
                print(f"  probe estimate K={order} alpha={alpha}: {_brief(rows[-1])}", flush=True)
    for source in ranges:
        for order in ORDERS:
            for alpha in ALPHAS if smoothable else (None,):
                t0 = time.perf_counter()
                q = quantized(model, order, alpha, source, clone=clone and alpha is not None)
                rows.append({"ranges": source, "order": order, "alpha": alpha, "act": "int8",
                             "clone": clone and alpha is not None, "estimate": "γ, β" if alpha is not None else "-",
                             **metric(run_onnx(q, x, 16), ref),
                             "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
                print(f"  {source} K={order} alpha={alpha}: {_brief(rows[-1])}", flush=True)
    for alpha in (None, 0.5) if smoothable else (None,):  # the weight error alone (activations float)
        q = quantized(model, 1, alpha, "default", act_bits=0, clone=clone and alpha is not None)
        rows.append({"ranges": "-", "order": 1, "alpha": alpha, "act": "float", "clone": clone and alpha is not None,
                     "estimate": "γ, β" if alpha is not None else "-", **metric(run_onnx(q, x, 16), ref)})  # fmt: skip
        print(f"  weights only K=1 alpha={alpha}: {_brief(rows[-1])}", flush=True)
    return rows


def _brief(row: dict[str, Any]) -> str:
    keys = ("rel_l2", "top1_agreement", "accuracy", "cosine_mean", "cosine_worst", "rel_l2_rest", "cosine_worst_rest")
    return ", ".join(f"{k} {row[k]:.4g}" for k in keys if k in row)


def encoder_metric(q: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Cosine of mean-pooled embeddings (mean / worst over sentences) and relative L2 of the hidden states; the
    same over the hidden dimensions other than ``OUTLIER_DIMS`` (``*_rest``): where outlier dimensions exist they
    dominate both norms, and the figures over the rest say whether the other features survive."""
    rest = np.setdiff1d(np.arange(ref.shape[-1]), OUTLIER_DIMS)
    out: dict[str, float] = {}
    for suffix, dims in (("", slice(None)), ("_rest", rest)):
        r, c = ref[..., dims].astype(np.float64), q[..., dims].astype(np.float64)
        a, b = r.mean(axis=1), c.mean(axis=1)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out |= {f"rel_l2{suffix}": float(np.linalg.norm(c - r) / np.linalg.norm(r)),
                f"cosine_mean{suffix}": float(np.mean(cos)), f"cosine_worst{suffix}": float(np.min(cos))}  # fmt: skip
    return out


def vit_section() -> dict[str, Any]:
    vit = export_digits_vit()
    model = onnx.load(str(vit.path))
    x, labels = vit.inputs[vit.test_index], vit.labels[vit.test_index]
    ref = run_onnx(model, x)

    def metric(q: np.ndarray, r: np.ndarray) -> dict[str, Any]:
        f = fidelity(r, q)
        return {"rel_l2": f["rel_l2"], "top1_agreement": f["top1_agreement"], "accuracy": accuracy(q, labels)}

    print("digits ViT", flush=True)
    return {
        "description": "pre-LN ViT (2 blocks, width 64, 4 heads, MLP 128) trained here on 80 % of the digits; "
        f"{len(x)} held-out digits",
        "samples": len(x),
        "fp32_accuracy": accuracy(ref, labels),
        "sites": sites(model, x),
        "rows": rows_for(model, x, ref, ["default"], True, metric),
    }


def encoder_section(pre_ln: bool, outliers: bool, n: int) -> dict[str, Any]:
    model = onnx.load(str(export_encoder(pre_ln, outliers)))
    x = sentences(n)
    ref = run_onnx(model, x, 16)
    layout = "pre-LN" if pre_ln else "post-LN (BERT)"
    print(f"encoder {layout}, outliers {outliers}", flush=True)
    info = sites(model, x)
    clone = not info["smoothed"]  # post-LN: every LayerNorm also feeds a residual Add; smooth copies instead
    if clone:
        info = {**sites(model, x, clone=True), "refused_without_clone": info["refused"]}
    return {
        "description": f"BERT-style encoder, {layout}, BERT init"
        + (", outlier LayerNorm channels" if outliers else ""),
        "pre_ln": pre_ln,
        "outliers": outliers,
        "samples": len(x),
        "sites": info,
        "rows": rows_for(model, x, ref, ["default", "tokens"], bool(info["smoothed"]), encoder_metric, clone, TOKENS),
    }


def latency_section(n: int = 16, rounds: int = 5, round_s: float = 0.5) -> dict[str, Any]:
    """OpenVINO (this host's profile), batch 1, interleaved rounds: what the smoothed copies cost on the post-LN
    encoder (13 more LayerNorms), and that in-place smoothing costs nothing on the pre-LN one; the relative error
    of each engine's hidden states vs FP32 (onnxruntime) on ``n`` sentences."""
    import tempfile

    from harness import engine_outputs, time_interleaved

    from rexdeploy.api import builder_for
    from rexdeploy.closedloop import fp32_profile
    from rexdeploy.graph import save_model
    from rexdeploy.profile import load_profile

    profile = load_profile("auto")
    builder = builder_for(profile)
    x = sentences(n)
    cases = {
        "post_ln_outliers": export_encoder(False, True),
        "pre_ln_outliers": export_encoder(True, True),
    }
    out: dict[str, Any] = {"profile": profile.name, "engine": profile.engine, "rounds": rounds, "round_s": round_s}
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in cases.items():
            model = onnx.load(str(path))
            clone = key.startswith("post")
            variants = {
                "FP32": model,
                "default float": model,
                "W8A8 K=1": quantized(model, 1, None, "default"),
                "W8A8 K=1, α = 0.7": quantized(model, 1, 0.7, "default", clone=clone),
            }
            engines, ref = {}, run_onnx(model, x, 16)
            rows: dict[str, Any] = {}
            for label, m in variants.items():
                onnx_path = Path(tmp) / f"{key}_{len(engines)}.onnx"
                save_model(m, onnx_path)
                engines[label] = builder.build(onnx_path, fp32_profile(profile) if label == "FP32" else profile,
                                               Path(tmp) / f"{key}_{len(engines)}")  # fmt: skip
                got = engine_outputs(builder, engines[label], x, "input_ids")
                rows[label] = {"rel_l2_vs_fp32": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                               "layernorms": sum(nd.op_type == "LayerNormalization" for nd in m.graph.node)}  # fmt: skip
            timing = time_interleaved(builder, engines, rounds=rounds, round_s=round_s)
            for label in engines:
                rows[label].update(
                    timing[label], ratio_to_fp32=timing[label]["median_ms"] / timing["FP32"]["median_ms"]
                )
                print(
                    f"  {key} {label}: {rows[label]['ratio_to_fp32']:.3f}x FP32, rel {rows[label]['rel_l2_vs_fp32']:.3g}"
                )
            out[key] = {"clone": clone, "rows": rows}
    return out


# ----------------------------------------------------------------------------------------------------------
# report


def _alpha(a: float | None, clone: bool = False) -> str:
    return "off" if a is None else f"α = {a:g}" + (" (on a copy)" if clone else "")


def _table(section: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    head = "| activations | ranges | smoothing | channel ranges | " + " | ".join(
        f"K = {k}: {c}" for k in ORDERS for _, c in columns) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (4 + len(ORDERS) * len(columns))]
    keyed = {(r["act"], r["ranges"], r["alpha"], r["estimate"], r["order"]): r for r in section["rows"]}
    clone = bool(section["sites"].get("clone"))
    groups = sorted(dict.fromkeys((r["act"], r["ranges"], r["alpha"], r["estimate"]) for r in section["rows"]),
                    key=lambda g: (g[0] != "int8", g[1], g[3].startswith("probes"), g[2] or 0.0))  # fmt: skip
    for act, source, alpha, estimate in groups:
        cells = []
        for k in ORDERS:
            row = keyed.get((act, source, alpha, estimate, k))
            cells += [_fmt(key, row[key]) if row else "—" for key, _ in columns]
        lines.append(f"| {'int8' if act == 'int8' else 'float (weights only)'} | {source} | {_alpha(alpha, clone)} | "
                     f"{estimate} | " + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _fmt(key: str, v: float) -> str:
    if key in ("top1_agreement", "accuracy"):
        return f"{v:.1%}"
    if key.startswith("cosine"):
        return f"{v:.6f}"
    return f"{v:.3g}"


def _sites(section: dict[str, Any]) -> list[str]:
    info = section["sites"]
    lines = [f"LayerNorms: {info['layernorms']}; smoothed {len(info['smoothed'])}, refused {len(info['refused'])}."]
    if info.get("refused_without_clone"):
        first = info["refused_without_clone"][0]
        lines[-1] = (f"LayerNorms: {info['layernorms']}; the pass refuses all {len(info['refused_without_clone'])} "
                     f"(e.g. `{first['layernorm']}`: {first['reason']}). With `clone=True` (the MatMul/Gemm readers "
                     f"read a smoothed copy of the LayerNorm, the residual Add the original): smoothed "
                     f"{len(info['smoothed'])}, refused {len(info['refused'])}.")  # fmt: skip
    if info["refused"]:
        first = info["refused"][0]
        lines[-1] += f" Refused, e.g. `{first['layernorm']}`: {first['reason']}."
    if info["smoothed"]:
        lines += ["", "Channel spread of each smoothed LayerNorm output (largest channel max / median channel max) at "
                  "α = 0.5, estimated from γ, β and measured on the evaluation inputs:", "",
                  "| LayerNorm | readers | s min..max | estimated before → after | measured before → after |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for s in info["smoothed"]:
            lines.append(f"| `{s['layernorm']}` | {len(s['readers'])} | {s['s_min']:.3g}..{s['s_max']:.3g} | "
                         f"{s['spread_estimated_before']:.2f} → {s['spread_estimated_after']:.2f} | "
                         f"{s['spread_measured_before']:.2f} → {s['spread_measured_after']:.2f} |")  # fmt: skip
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    host = result["host"]
    flags = ", ".join(result["cpu_flags"]) or "none of avx2 / avx512_vnni / avx512_bf16 / amx"
    out = [
        "# Data-free LayerNorm smoothing at W8A8",
        "",
        f"`python benchmarks/bench_smoothing.py` — {host['date']}, {host['cpu']} ({host['cores']} cores; flags: "
        f"{flags}), onnxruntime {host['versions']['onnxruntime']} with graph optimizations off (the Q/DQ graphs "
        "computed exactly; latency: the OpenVINO section at the end). Repeated runs moved a figure by up to 10 % "
        "(post-LN encoder with outliers, K = 1, off: 0.00238–0.00262); smaller differences are noise. "
        f"{result['seconds']:.0f} s.",
        "",
        "W8A8: weights per output channel int8 with K residual orders, every MatMul/Gemm input per-tensor "
        "symmetric int8 from data-free ranges (profile x86-avx512). Smoothing: `rexdeploy.passes.smooth` at the "
        "given α (`--smooth α`): each LayerNorm whose output MatMul/Gemm layers read gets γ/s, β/s, and those "
        "weights' input rows ×s, s_j = (|γ_j|·3 + |β_j|)^α / max|W_j|^(1−α) (SmoothQuant Eq. 4, no data); where "
        "other nodes read it too (post-LN: the residual Add) the MatMul/Gemm readers get a smoothed copy "
        "(`clone`, what `expand_model` does). Channel ranges `probes`: max|X_j| per channel over 16 synthetic "
        "probes (Gaussian for the ViT, random token ids for the encoder) instead of γ, β. Ranges `default`: "
        "`expand_model`'s activation ranges (for the encoder's token-id input its probes are all-zero ids); "
        "`tokens`: the same rule over 16 random-token probes.",
        "",
        "## Digits ViT (trained weights, real held-out digits)",
        "",
        result["vit"]["description"] + f"; FP32 accuracy {result['vit']['fp32_accuracy']:.1%}.",
        "",
        *_sites(result["vit"]),
        "",
        *_table(result["vit"], [("rel_l2", "rel. error"), ("top1_agreement", "top-1 agr."), ("accuracy", "accuracy")]),
    ]
    for key, section in result["encoders"].items():
        out += ["", f"## {section['description']} (`{key}`)", "", f"{section['samples']} windows of 64 words. ",
                *_sites(section), "",
                *_table(section, [("rel_l2", "rel. error"), ("cosine_mean", "cosine mean"), ("cosine_worst", "worst")]),
                "", f"The same over the {ENCODER['hidden'] - len(OUTLIER_DIMS)} hidden dimensions other than "
                f"{', '.join(map(str, OUTLIER_DIMS))} (the outlier dimensions, where present, dominate the norms "
                "above):", "",
                *_table(section, [("rel_l2_rest", "rel. error"), ("cosine_mean_rest", "cosine mean"),
                                  ("cosine_worst_rest", "worst")])]  # fmt: skip
    if "latency" in result:
        out += ["", *_latency(result["latency"])]
    return "\n".join(out) + "\n"


def _latency(lat: dict[str, Any]) -> list[str]:
    host = lat.get("host", {})
    lines = ["## Latency (OpenVINO, batch 1)", "",
             f"Profile `{lat['profile']}`, engine {lat['engine']}"
             + (f" {host['versions']['openvino']}, {host['date']}, load {host['load_avg_1_5_15']}" if host else "")
             + f"; {lat['rounds']} interleaved rounds of {lat['round_s']} s, median of the round medians, as a ratio "
             "to the FP32 engine (f32 inference precision) timed in the same rounds; `default float` is the float "
             "model with the engine's default precision (bf16 on a host with AVX-512 BF16), and the W8A8 engines "
             "run their float parts in it too. The machine is shared: compare within a model. Relative error: the "
             "engine's hidden states vs FP32 (onnxruntime) on 16 sentences.", "",
             "| encoder | engine | LayerNorms | × FP32 | rel. error |", "|---|---|---|---|---|"]  # fmt: skip
    for key in ("post_ln_outliers", "pre_ln_outliers"):
        for label, row in lat[key]["rows"].items():
            copy = " (smoothed copies)" if lat[key]["clone"] and "α" in label else ""
            lines.append(f"| `{key}` | {label}{copy} | {row['layernorms']} | {row['ratio_to_fp32']:.2f} | "
                         f"{row['rel_l2_vs_fp32']:.3g} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the .md from the existing .json")
    parser.add_argument("--latency-only", action="store_true", help="redo the OpenVINO latency section of the .json")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (0.5 s each)")
    args = parser.parse_args()
    if args.markdown_only or args.latency_only:
        saved = json.loads((RESULTS / "smoothing.json").read_text(encoding="utf-8"))
        if args.latency_only:
            saved["latency"] = latency_section(rounds=args.rounds)
            saved["latency"]["host"] = host_facts()
            (RESULTS / "smoothing.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "smoothing.md").write_text(to_markdown(saved), encoding="utf-8")
        return
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "smoothing",
        "host": host_facts(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"}),
        "alphas": list(ALPHAS),
        "encoder": {
            **ENCODER,
            "outlier_dims": list(OUTLIER_DIMS),
            "outlier_gamma": OUTLIER_GAMMA,
            "outlier_beta": OUTLIER_BETA,
        },
        "vit": vit_section(),
        "encoders": {},
    }
    for pre_ln in (False, True):
        for outliers in (False, True):
            key = f"{'pre' if pre_ln else 'post'}_ln{'_outliers' if outliers else ''}"
            result["encoders"][key] = encoder_section(pre_ln, outliers, args.sentences)
    print("latency (OpenVINO)", flush=True)
    result["latency"] = latency_section(rounds=args.rounds)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.no_write:
        json.dump(result, sys.stdout, indent=2)
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "smoothing.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "smoothing.md").write_text(to_markdown(result), encoding="utf-8")
    print(f"wrote {RESULTS / 'smoothing.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
