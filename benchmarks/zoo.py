"""Model zoo: rexdeploy's user paths on architectures its tests do not cover.

Eight small architectures written in plain torch (no torchvision), seeded random weights, BatchNorm running
statistics set by a few train-mode forward passes on random inputs (so BN is not the identity), exported with
``torch.onnx.export`` (opset 17; the ResNet also at opset 13) and cached under
``~/.cache/rexdeploy-bench/zoo/``. For each model the CLI (``.venv/bin/rexdeploy``) runs:

- ``inspect M``
- ``plan M --budget <0.7 x the FP32 onnxruntime latency> --estimate``
- ``expand M -o out.onnx`` (defaults) and ``expand M --bits 4 --order 3 --act-bits fp``
- ``build M --budget-ratio 1.2 --duration 0.3s --out DIR`` (profile auto: OpenVINO on this CPU)

and records exit status, time, the last stderr line (the error line on failure), the self-check of the build,
and the relative L2 error of each ``expanded.onnx`` against the FP32 model on a few random inputs
(onnxruntime, graph optimizations off). Writes ``benchmarks/results/zoo.{json,md}``.

    python benchmarks/zoo.py [--only NAME ...] [--skip-build]

Needs torch (``pip install -e '.[bench]'``); not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from harness import host_facts
from models import CACHE_DIR

if TYPE_CHECKING:
    import torch

ZOO_DIR = CACHE_DIR / "zoo"
RESULTS = Path(__file__).resolve().parent / "results"
CLI = str(Path(sys.executable).with_name("rexdeploy"))
TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------
# architectures


def _resnet18() -> torch.nn.Module:
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else None
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
            return nn.functional.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            self.layers = nn.Sequential(*[nn.Sequential(Basic(a, b, s), Basic(b, b, 1)) for a, b, s in widths])
            self.fc = nn.Linear(512, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet18()


def _efficientnet_b0() -> torch.nn.Module:
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c: int, s: int) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(c, s, 1)
            self.expand = nn.Conv2d(s, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(w))))

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
            super().__init__()
            mid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
            layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
            layers += [SE(mid, max(1, cin // 4)), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            return x + y if self.residual else y

    class EffNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
            cfg = [(32, 16, 3, 1, 1), (16, 24, 3, 2, 6), (24, 24, 3, 1, 6), (24, 40, 5, 2, 6), (40, 40, 5, 1, 6)]
            cfg += [(40, 80, 3, 2, 6), (80, 80, 3, 1, 6), (80, 112, 5, 1, 6), (112, 192, 5, 2, 6), (192, 320, 3, 1, 6)]
            self.blocks = nn.Sequential(*[MBConv(*c) for c in cfg])
            self.head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU())
            self.fc = nn.Linear(1280, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return EffNet()


def _mobilenet_v3_small() -> torch.nn.Module:
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c: int, s: int) -> None:
            super().__init__()
            self.fc1 = nn.Conv2d(c, s, 1)
            self.fc2 = nn.Conv2d(s, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(w))))

    class Block(nn.Module):
        def __init__(self, cin: int, k: int, mid: int, cout: int, se: bool, hs: bool, stride: int) -> None:
            super().__init__()
            act = nn.Hardswish if hs else nn.ReLU
            layers: list[nn.Module] = []
            if mid != cin:
                layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act()]
            layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), act()]
            if se:
                layers.append(SE(mid, max(8, mid // 4)))
            layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            return x + y if self.residual else y

    class MNV3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            cfg = [
                (16, 3, 16, 16, True, False, 2),
                (16, 3, 72, 24, False, False, 2),
                (24, 3, 88, 24, False, False, 1),
                (24, 5, 96, 40, True, True, 2),
                (40, 5, 240, 40, True, True, 1),
                (40, 5, 120, 48, True, True, 1),
                (48, 5, 288, 96, True, True, 2),
                (96, 5, 576, 96, True, True, 1),
            ]
            self.blocks = nn.Sequential(*[Block(*c) for c in cfg])
            self.last = nn.Sequential(nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish())
            self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, 1000))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.last(self.blocks(self.stem(x)))
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return MNV3()


def _convnext() -> torch.nn.Module:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
            self.norm = nn.LayerNorm(c, eps=1e-6)
            self.pw1 = nn.Linear(c, 4 * c)
            self.pw2 = nn.Linear(4 * c, c)
            self.gamma = nn.Parameter(torch.full((c,), 0.1))  # layer scale (1e-6 at init; trained nets ~0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.pw2(nn.functional.gelu(self.pw1(self.norm(y))))
            return x + (self.gamma * y).permute(0, 3, 1, 2)

    class ChannelsLN(nn.Module):  # LayerNorm over channels of an NCHW tensor via permute
        def __init__(self, c: int) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(c, eps=1e-6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dims = [48, 96, 192, 384]
            self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsLN(dims[0]))
            stages: list[nn.Module] = []
            for i, d in enumerate(dims):
                if i:
                    stages += [ChannelsLN(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
                stages += [Block(d) for _ in range(2 if i != 2 else 3)]
            self.stages = nn.Sequential(*stages)
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stages(self.stem(x))
            return self.head(self.norm(x.mean((2, 3))))

    return ConvNeXt()


def _densenet() -> torch.nn.Module:
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self, cin: int, growth: int) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, 4 * growth, 1, bias=False),
                nn.BatchNorm2d(4 * growth),
                nn.ReLU(),
                nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.f(x)], 1)

    class DenseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            growth, c = 16, 32
            layers: list[nn.Module] = [
                nn.Conv2d(3, c, 7, 2, 3, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            ]
            for i, n in enumerate([4, 6, 8]):
                for _ in range(n):
                    layers.append(Dense(c, growth))
                    c += growth
                if i < 2:  # transition
                    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                    c //= 2
            layers += [nn.BatchNorm2d(c), nn.ReLU()]
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(c, 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return DenseNet()


def _unet() -> torch.nn.Module:
    import torch
    from torch import nn

    def double(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = double(3, 16), double(16, 32), double(32, 64)
            self.mid = double(64, 128)
            self.up3 = nn.ConvTranspose2d(128, 64, 2, 2)  # learned upsampling
            self.d3 = double(128, 64)
            self.d2 = double(64 + 32, 32)  # Resize upsampling (bilinear)
            self.d1 = double(32 + 16, 16)  # Resize upsampling (nearest)
            self.out = nn.Conv2d(16, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s1 = self.e1(x)
            s2 = self.e2(nn.functional.max_pool2d(s1, 2))
            s3 = self.e3(nn.functional.max_pool2d(s2, 2))
            m = self.mid(nn.functional.max_pool2d(s3, 2))
            y = self.d3(torch.cat([self.up3(m), s3], 1))
            y = nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            y = self.d2(torch.cat([y, s2], 1))
            y = nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")
            y = self.d1(torch.cat([y, s1], 1))
            return self.out(y)  # per-pixel logits (N, 5, H, W)

    return UNet()


def _audio1d() -> torch.nn.Module:
    from torch import nn

    def block(cin: int, cout: int, k: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())

    class M5(nn.Module):  # M5-style raw-waveform classifier
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                block(1, 64, 80, 4),
                nn.MaxPool1d(4),
                block(64, 64, 3, 1),
                nn.MaxPool1d(4),
                block(64, 128, 3, 1),
                nn.MaxPool1d(4),
                block(128, 256, 3, 1),
                nn.MaxPool1d(4),
            )
            self.fc = nn.Linear(256, 35)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x).mean(-1))

    return M5()


class _BertInputs:
    vocab = 3000
    seq = 32


def _bert() -> torch.nn.Module:
    import torch
    from torch import nn

    dim, heads, depth, mlp = 128, 4, 2, 512

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln1 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, mlp)
            self.fc2 = nn.Linear(mlp, dim)
            self.ln2 = nn.LayerNorm(dim)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            n, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(n, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5 + bias, -1)
            y = (att @ v).transpose(1, 2).reshape(n, t, dim)
            x = self.ln1(x + self.proj(y))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))  # exact GELU: Erf in ONNX

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(_BertInputs.vocab, dim)
            self.pos = nn.Embedding(_BertInputs.seq, dim)
            self.ln = nn.LayerNorm(dim)
            self.layers = nn.ModuleList([Layer() for _ in range(depth)])
            self.pool = nn.Linear(dim, dim)
            self.cls = nn.Linear(dim, 2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.ln(self.tok(ids) + self.pos(pos)[None])
            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
            for layer in self.layers:
                x = layer(x, bias)
            return self.cls(torch.tanh(self.pool(x[:, 0])))

    return Bert()


def _image(size: int) -> Callable[[int, int], list[np.ndarray]]:
    return lambda n, seed: [np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)]


def _bert_inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, _BertInputs.vocab, (n, _BertInputs.seq), dtype=np.int64)
    lengths = rng.integers(_BertInputs.seq // 2, _BertInputs.seq + 1, n)
    mask = (np.arange(_BertInputs.seq)[None] < lengths[:, None]).astype(np.int64)
    return [ids, mask]


# name -> (module factory, input names, input maker(n, seed), opset, plan budget note)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], list[str], Callable[[int, int], list[np.ndarray]], int]] = {
    "resnet18_112": (_resnet18, ["input"], _image(112), 17),
    "resnet18_112_op13": (_resnet18, ["input"], _image(112), 13),
    "efficientnet_b0ish": (_efficientnet_b0, ["input"], _image(160), 17),
    "mobilenet_v3_small": (_mobilenet_v3_small, ["input"], _image(160), 17),
    "convnext_tiny": (_convnext, ["input"], _image(128), 17),
    "densenet_small": (_densenet, ["input"], _image(112), 17),
    "unet_seg": (_unet, ["input"], _image(96), 17),
    "audio_m5": (
        _audio1d,
        ["waveform"],
        lambda n, s: [np.random.default_rng(s).standard_normal((n, 1, 16000)).astype(np.float32) * 0.1],
        17,
    ),
    "bert_mask": (_bert, ["input_ids", "attention_mask"], _bert_inputs, 17),
}

KEEP_BN = {"resnet18_112_op13"}  # exported with BatchNormalization nodes kept (the others as users export: BN folded)


# export variants users produce, of the models above: base model, then torch.onnx.export options
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet_dynamic_hw": ("unet_seg", {"dynamic": {2: "height", 3: "width"}}),
    "bert_dynamic_seq": ("bert_mask", {"dynamic": {1: "sequence"}, "output_dynamic": {}}),
    "resnet18_initializers_as_inputs_op11": ("resnet18_112", {"opset": 11, "keep_initializers_as_inputs": True}),
    "resnet18_fp16": ("resnet18_112", {"half": True}),
    "mobilenet_v3_small_batch1": ("mobilenet_v3_small", {"static_batch": True}),  # torch.onnx.export's default
    "mobilenet_v3_small_dynamo": ("mobilenet_v3_small", {"dynamo": True}),  # external weights file, opset 18+
}


def spec(name: str) -> tuple[Callable[[], torch.nn.Module], list[str], Callable[[int, int], list[np.ndarray]], int]:
    if name in VARIANTS:
        base, options = VARIANTS[name]
        factory, input_names, make_inputs, opset = ZOO[base]
        return factory, input_names, make_inputs, int(options.get("opset", opset))
    return ZOO[name]


def export(name: str, force: bool = False) -> Path:
    """Export zoo model ``name`` (seeded weights, BN statistics from train-mode passes), cached."""
    import torch

    factory, input_names, make_inputs, opset = spec(name)
    options = VARIANTS[name][1] if name in VARIANTS else {}
    out = ZOO_DIR / f"{name}_opset{opset}.onnx"
    if out.exists() and not force:
        return out
    torch.manual_seed(0)
    model = factory()
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:  # running statistics from random inputs: BN is no identity
        for m in model.modules():  # cumulative average: the statistics of these inputs, not 1 - 0.9^4 of them
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        with torch.no_grad():
            for seed in range(8):
                model(*[torch.from_numpy(a) for a in make_inputs(8, 100 + seed)])
    model.eval()
    half = bool(options.get("half"))
    if half:
        model.half()
    dummy = tuple(_torch_input(a, half) for a in make_inputs(1, 0))
    output = "logits"
    dynamic: dict[str, dict[int, str]] | None = {n: {0: "batch", **options.get("dynamic", {})} for n in input_names}
    dynamic[output] = {0: "batch", **options.get("output_dynamic", options.get("dynamic", {}))}
    if options.get("static_batch"):
        dynamic = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    if options.get("dynamo"):  # torch's new exporter (needs onnxscript): opset 18+, weights in tmp.onnx.data
        torch.onnx.export(model, dummy, str(tmp), dynamo=True, input_names=input_names, output_names=[output])
    else:
        _export_torchscript(model, dummy, tmp, name, opset, input_names, output, dynamic, options)
    exported = onnx.load(str(tmp))
    onnx.checker.check_model(exported)
    xs = make_inputs(2, 1)
    with torch.no_grad():
        want = model(*[_torch_input(a, half) for a in xs]).float().numpy()
    got = run_ort(exported, input_names, xs)
    if not np.allclose(got, want, rtol=1e-2 if half else 1e-3, atol=1e-2 if half else 1e-3):
        raise RuntimeError(f"{name}: export differs from torch (max |diff| {np.max(np.abs(got - want)):.3g})")
    tmp.replace(out)
    return out


def _export_torchscript(
    model: torch.nn.Module,
    dummy: tuple[torch.Tensor, ...],
    tmp: Path,
    name: str,
    opset: int,
    input_names: list[str],
    output: str,
    dynamic: dict[str, dict[int, str]] | None,
    options: dict[str, Any],
) -> None:
    import torch

    torch.onnx.export(
        model,
        dummy,
        str(tmp),
        dynamo=False,
        opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE if name in KEEP_BN else torch.onnx.TrainingMode.EVAL,
        do_constant_folding=name not in KEEP_BN,
        input_names=input_names,
        output_names=[output],
        dynamic_axes=dynamic,
        keep_initializers_as_inputs=bool(options.get("keep_initializers_as_inputs", False)),
    )


def _torch_input(a: np.ndarray, half: bool) -> torch.Tensor:
    import torch

    t = torch.from_numpy(a)
    return t.half() if half and t.is_floating_point() else t


def run_ort(model: onnx.ModelProto | Path | str, names: list[str], xs: list[np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    xs = _as_model_types(sess, names, xs)
    outs = [sess.run(None, {n: x[i : i + 1] for n, x in zip(names, xs, strict=True)})[0] for i in range(len(xs[0]))]
    return np.concatenate(outs).astype(np.float32)


def _as_model_types(sess: ort.InferenceSession, names: list[str], xs: list[np.ndarray]) -> list[np.ndarray]:
    """Float inputs cast to float16 where the model takes float16 (the fp16 variant)."""
    half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
    return [x.astype(np.float16) if n in half else x for n, x in zip(names, xs, strict=True)]


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# ----------------------------------------------------------------------------------------------------------
# user paths


def _cli(args: list[str], log: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    took = time.monotonic() - t0
    log.write_text(f"$ rexdeploy {' '.join(args)}\nrc={rc} {took:.1f}s\n--- stdout\n{out}\n--- stderr\n{err}\n")
    err_lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    traceback = "Traceback (most recent call last)" in err or "internal error" in err.lower()
    return {
        "args": args,
        "rc": rc,
        "seconds": round(took, 1),
        "last_stderr": err_lines[-1][:300] if err_lines else "",
        "traceback": traceback,
        "stdout": out,
        "log": str(log),
    }


def _expanded_error(fp32: Path, expanded: Path, names: list[str], xs: list[np.ndarray]) -> float | str:
    if not expanded.exists():
        return "missing"
    try:
        return rel_err(run_ort(fp32, names, xs), run_ort(expanded, names, xs))
    except Exception as exc:
        return f"onnxruntime: {type(exc).__name__}: {str(exc)[:200]}"


def _fp32_ms(path: Path, names: list[str], xs: list[np.ndarray]) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: x[:1] for n, x in zip(names, _as_model_types(sess, names, xs), strict=True)}
    sess.run(None, feed)
    t = []
    for _ in range(10):
        t0 = time.perf_counter()
        sess.run(None, feed)
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e3)


def run_model(name: str, work: Path, skip_build: bool) -> dict[str, Any]:
    _, names, make_inputs, _ = spec(name)
    path = export(name)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    xs = make_inputs(4, 7)
    row: dict[str, Any] = {"model": name, "path": str(path), "commands": {}}
    fp_ms = _fp32_ms(path, names, xs)
    row["fp32_ort_ms"] = round(fp_ms, 3)
    cmds: dict[str, list[str]] = {
        "inspect": ["inspect", str(path)],
        "plan_1us": ["plan", str(path), "--budget", "1us", "--estimate"],
        "plan": ["plan", str(path), "--budget", "{front}", "--estimate"],
        "expand": ["expand", str(path), "-o", str(d / "default.onnx")],
        "expand_w8k1": ["expand", str(path), "-o", str(d / "w8k1.onnx"), "--bits", "8", "--order", "1"],
        "expand_w4k3": [
            "expand",
            str(path),
            "-o",
            str(d / "w4k3.onnx"),
            "--bits",
            "4",
            "--order",
            "3",
            "--act-bits",
            "fp",
        ],
    }
    if not skip_build:
        cmds["build"] = [
            "build",
            str(path),
            "--budget-ratio",
            "1.2",
            "--duration",
            "0.3s",
            "--out",
            str(d / "build"),
            "--json",
        ]
    fastest_ms: float | None = None
    for key, args in cmds.items():
        if "{front}" in args:  # 1.5 x the fastest plan's predicted latency: a budget inside the front
            budget = f"{1.5 * fastest_ms:.3f}ms" if fastest_ms else f"{fp_ms:.3f}ms"
            args = [budget if a == "{front}" else a for a in args]
        print(f"[zoo] {name}: {key} ...", file=sys.stderr, flush=True)
        res = _cli(args, d / f"{key}.log")
        stdout = res.pop("stdout")
        if key == "plan_1us":  # its error line names the fastest plan's predicted latency
            m = re.search(r"predicted at ([0-9.]+) ms", res["last_stderr"])
            fastest_ms = float(m.group(1)) if m else None
        if key.startswith("plan") and res["rc"] == 0:
            try:
                plan = json.loads(stdout)
                res["plan_summary"] = _plan_summary(plan)
            except json.JSONDecodeError:
                res["plan_summary"] = stdout.strip().splitlines()[-1][:200] if stdout.strip() else ""
        if key == "expand" and res["rc"] == 0:
            res["rel_err_vs_fp32"] = _expanded_error(path, d / "default.onnx", names, xs)
        if key == "expand_w8k1" and res["rc"] == 0:
            res["rel_err_vs_fp32"] = _expanded_error(path, d / "w8k1.onnx", names, xs)
        if key == "expand_w4k3" and res["rc"] == 0:
            res["rel_err_vs_fp32"] = _expanded_error(path, d / "w4k3.onnx", names, xs)
        if key == "build" and res["rc"] == 0:
            res.update(_build_summary(stdout))
            returned = d / "build" / "rex.onnx"  # the returned engine's ONNX (expanded.onnx: the last REx attempt)
            res["rel_err_vs_fp32"] = _expanded_error(path, returned, names, xs)
            if (d / "build" / "expanded.onnx").exists():
                res["expanded_rel_err_vs_fp32"] = _expanded_error(path, d / "build" / "expanded.onnx", names, xs)
        row["commands"][key] = res
        print(f"[zoo] {name} {key}: rc={res['rc']} {res['seconds']}s {res['last_stderr'][:160]}", file=sys.stderr)
    return row


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _plan_summary(plan: dict[str, Any]) -> str:
    layers = plan.get("layers") or {}
    settings = {json.dumps(v, sort_keys=True) for v in (layers.values() if isinstance(layers, dict) else layers)}
    return (
        f"{len(layers)} layers set ({len(settings)} distinct), {plan.get('float_precision') or 'default float'} engine; predicted "
        f"{plan.get('predicted_latency_ms', float('nan')):.3f} ms, error {plan.get('predicted_error', float('nan')):.2e}"
    )


def _build_summary(stdout: str) -> dict[str, Any]:
    try:
        rep = json.loads(stdout)
    except json.JSONDecodeError:
        return {"report": "unparsed"}
    sc = rep.get("self_check") or {}
    fid = rep.get("fidelity") or {}
    return {
        "choice": rep.get("plan_summary"),
        "budget_ms": rep.get("budget_ms"),
        "fits_budget": rep.get("fits_budget"),
        "self_check": {k: sc.get(k) for k in ("passed", "relative_error", "tolerance", "precision")},
        "fidelity": {k: fid.get(k) for k in ("relative_error", "top1_agreement", "source")},
        "warnings": rep.get("warnings"),
    }


FINDINGS = """\
## Findings (run of 2026-11-30; fixes in rexdeploy at commits 87833be, f4c4fdb, 37ba07c, 566a9ce, f0ec07d)

Fixed (each with a regression test in tests/test_zoo_regressions.py that failed before):
- A dynamic non-batch input dimension (UNet with dynamic height / width) was probed at size 1: `plan` and
  `expand` ended in 'internal error' (onnxruntime Concat shape mismatch); a dynamic sequence axis (BERT) was
  silently probed on a single token. Now one line naming the input and axis and how to fix the size
  (`onnxruntime.tools.make_dynamic_shape_fixed`); weight-only expansion (no probes) still works.
- A float16 export ended as 'the model rexdeploy emitted fails the ONNX checker ... rexdeploy bug' (expand)
  or an onnxruntime type error reported as internal error (plan): refused at load with what to do.
- `keep_initializers_as_inputs=True` exports (old exporters, opset 11 here): the expanded model still listed
  the replaced weights as graph inputs, so it could not run on the real input alone; they are unlisted at load.
- The data-free activation ranges probed every integer input with 0 (every token id 0, every attention mask
  0): BERT-style W8A8 K=1 rel. error 0.052 -> 0.018 on random token ids once ids are drawn in the vocabulary
  and masks set to 1.
- The audio_m5 build (exit 0) printed two Python tracebacks: OpenVINO's telemetry sends from a forked process
  and SIGTERMs it after a timeout (no network here); the child had inherited the CLI's stop-signal handler and
  raised Terminated. Forked children now die as by default (rebuilt: exit 0, no traceback).
- A batch-1 export (torch.onnx.export without dynamic_axes, the default) had its data-free ranges probed on one
  sample instead of 16 (MobileNetV3-like at 96 px, W8A8 K=1: 0.245 vs 0.171 for the same weights with a
  dynamic batch; 0.192 after), and `--calib` with N > 1 samples ended in 'internal error' (onnxruntime invalid
  dimensions). Probes and calibration samples now run one at a time (mobilenet_v3_small_batch1 row).
- A model whose first output is an integer (an ArgMax label before the logits) had the fidelity estimate and
  the build's self-check compare the labels (a bf16 engine read 'relative error 0.00e+00'), never the logits:
  both now compare the first floating-point output.

Not fixed (by design or out of scope):
- `build` on a model whose weights live in an external file (torch.onnx.export(dynamo=True), the default of
  recent torch; mobilenet_v3_small_dynamo row, exported with onnxscript 0.7.2 installed outside the venv) exits 1
  with 'OpenVINO cannot read fp32.onnx: ... externally stored data' (onnxruntime builder: 'cannot copy
  m.onnx.data (needed by fp32.onnx)'): rexdeploy/closedloop.py (lines 222 and 349) copies the model with
  shutil.copyfile(model_path, tmp / "fp32.onnx") without its .onnx.data file. inspect / plan / expand work.
  Fix there: copy the external files beside fp32.onnx too, or save the loaded model (graph.save_model).
- audio_m5 takes waveforms of RMS 0.1; the data-free ranges assume N(0, 1) inputs: W8A8 K=1 rel. error 0.146
  on its own input scale vs 0.010 on unit-variance inputs (same engine). The fidelity estimate probes N(0, 1)
  too, so it does not see it; `--calib` (ranges) and `--samples` (fidelity) are the remedy: with `--calib` of
  16 waveforms of that scale, W8A8 K=1 0.146 -> 0.015.
- Batch-1 exports elsewhere (files not in this task): the build's self-check (`selfcheck.probe_feeds`) runs
  on 1 probe instead of 8 and the planner's sensitivity feeds (`planner/search.py`, synthetic_inputs with
  batch=probes) on 1; the self-check and the fidelity estimate compare one output (the first float one): a
  second float output, e.g. a detector's boxes after its scores, is never checked.
- EfficientNet-like (SiLU, sigmoid SE): W8A8 rel. error 0.17 at K=1 and K=2 (weights-only W8 K=1: 0.041,
  W8A8 K=2 act-order 2: 0.0022): activation quantization dominates; the closed loop returned a float engine.
"""


def _fmt(v: Any) -> str:
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def write(rows: list[dict[str, Any]]) -> None:
    facts = host_facts()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    facts["cpu_flags"] = [
        f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zoo.json").write_text(json.dumps({"host": facts, "models": rows}, indent=1, default=str) + "\n")
    lines = [
        "# Model zoo: rexdeploy's user paths on untested architectures",
        "",
        f"Host: {facts['cpu']} ({', '.join(facts['cpu_flags'])}), {facts['cores']} cores shared with other work "
        f"(load {facts['load_avg_1_5_15']}); {facts['date']}. Times are wall seconds of the CLI on a loaded host.",
        "Written by `benchmarks/zoo.py` (seeded random weights, BN running statistics = the cumulative average over 8 train-mode batches of the inputs below).",
        "rel err: ‖expanded − FP32‖/‖FP32‖ over 4 random inputs, onnxruntime with graph optimizations off.",
        "",
        "| model | command | rc | s | result / last stderr line | rel err vs FP32 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key, res in row.get("commands", {}).items():
            what = res.get("plan_summary") or res["last_stderr"]
            if key == "build" and res["rc"] == 0:
                sc, fid = res.get("self_check") or {}, res.get("fidelity") or {}
                what = (
                    f"{res.get('choice')}; self-check passed={sc.get('passed')} rel {_fmt(sc.get('relative_error'))}; "
                    f"fidelity rel {_fmt(fid.get('relative_error'))} top1 {fid.get('top1_agreement')}"
                )
            err = res.get("rel_err_vs_fp32", "")
            err_s = f"{err:.2e}" if isinstance(err, float) else str(err)
            what = what.replace("|", "\\|")
            lines.append(f"| {row['model']} | {key} | {res['rc']} | {res['seconds']} | {what} | {err_s} |")
        if "error" in row:
            lines.append(f"| {row['model']} | export | - | - | {row['error']} | |")
    results = [res for row in rows for res in row.get("commands", {}).values()]
    lines += [
        "",
        f"{len(results)} commands: {sum(r['rc'] == 0 for r in results)} exit 0, {sum(r['rc'] == 1 for r in results)} "
        f"exit 1, {sum(r['rc'] not in (0, 1) for r in results)} other (timeout / crash); "
        f"{sum(bool(r['traceback']) for r in results)} printed a traceback or 'internal error'.",
        "plan_1us is the planner's error path on purpose (a 1 µs budget); plan then uses 1.5 × the fastest plan's "
        "predicted latency from that error line. build: rel err is the returned engine's ONNX (rex.onnx) vs FP32.",
        "",
        FINDINGS,
    ]
    (RESULTS / "zoo.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--work", default=str(ZOO_DIR / "runs"))
    ap.add_argument("--merge", action="store_true", help="keep the other models' rows of results/zoo.json")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)  # initializers-as-inputs warnings, one per weight
    names = args.only or [*ZOO, *VARIANTS]
    if args.export_only:
        for n in names:
            print(n, export(n, force=True))
        return
    kept: list[dict[str, Any]] = []
    if args.merge and (RESULTS / "zoo.json").exists():
        kept = [r for r in json.loads((RESULTS / "zoo.json").read_text())["models"] if r["model"] not in names]
    rows = kept
    for n in names:
        try:
            rows.append(run_model(n, Path(args.work), args.skip_build))
        except Exception as exc:
            rows.append({"model": n, "error": f"{type(exc).__name__}: {exc}"})
        write(rows)
    os.sync()


if __name__ == "__main__":
    main()
