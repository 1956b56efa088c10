"""Synthetic probe families for the data-free fidelity estimate (no user data).

A quantized engine's fidelity against FP32 depends on the inputs it is measured on: i.i.d. Gaussian noise
alone was 2× too kind on a ResNet-style net (issue 15). The estimate therefore runs several families and
reports the worst (:func:`rexdeploy.fidelity.estimate_fidelity`); each family fills every model input:

* ``gaussian`` — float inputs i.i.d. N(0, 1) (the seeded probes of :func:`rexdeploy.ranges.synthetic_inputs`,
  sample i with seed ``seed + i``, as rexdeploy has always measured).
* ``bn-matched`` — for a float (N, C, H, W) input read by a Conv whose output feeds a BatchNormalization:
  Gaussian random fields ``x = μ + L z`` (z: C independent unit fields with amplitude spectrum ∝ 1/f^a,
  ``L Lᵀ = Σ``) whose per-channel mean μ, channel covariance Σ and spectral exponent a are fitted so that
  the Conv's output has, per channel, the mean and variance the BN was trained on (its running mean and
  variance): the first layer sees the statistics of the training data (:func:`fit_bn_matched`).
* ``natural-1/f`` — for image-shaped float inputs (rank 4, 1 or 3 channels, both spatial sides ≥ 8):
  natural-image-like pictures, a luminance field with random phase and power ∝ 1/f^2.4 (about 1/f²) plus
  weaker per-channel colour fields, random brightness and contrast, clipped to [0, 1] like pixels and
  normalised with the ImageNet mean / std (:func:`natural_images`).
* ``tokens`` — for integer inputs read by an embedding (a Gather from a constant table): token ids uniform
  in [0, vocabulary) (:func:`embedding_vocab`).

In every family the inputs a family does not cover are filled as in ``gaussian``: float N(0, 1), integer
ids of an embedding uniform in its vocabulary, other integers 0; an input whose name contains "mask" is 1.
Everything is deterministic for a given (model, family, count, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from rexdeploy.errors import InputError, ModelError
from rexdeploy.graph import constant_value
from rexdeploy.ranges import graph_inputs, input_shape, synthetic_inputs

GAUSSIAN = "gaussian"
BN_MATCHED = "bn-matched"
NATURAL = "natural-1/f"
TOKENS = "tokens"
FAMILIES: tuple[str, ...] = (GAUSSIAN, BN_MATCHED, NATURAL, TOKENS)
FAMILY_TEXT = {
    GAUSSIAN: "Gaussian N(0, 1) inputs",
    BN_MATCHED: "Gaussian fields matched to the first BatchNorm's statistics",
    NATURAL: "natural-image-like 1/f-spectrum images, ImageNet-normalised",
    TOKENS: "random token ids within the embedding's vocabulary",
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
# amplitude ∝ 1/f^1.2, power ∝ 1/f^2.4: photographs are near 1/f² and a downscaled (anti-aliased) crop, what
# ImageNet preprocessing feeds a model, is steeper; 1.2 brings MobileNetV2's first-layer variances within
# 0.6-1.6× of its BatchNorm's running variances (p10-p90; 0.5-3.9× at 1.0, mostly edge filters over-driven)
NATURAL_AMPLITUDE_EXPONENT = 1.2
NATURAL_BRIGHTNESS = (0.3, 0.6)  # per-image mean pixel value (pixels in [0, 1]), uniform
NATURAL_CONTRAST = (0.12, 0.28)  # per-image RMS contrast of the luminance field, uniform
NATURAL_COLOUR = 0.35  # std of each channel's own field relative to the shared luminance field
NATURAL_TINT = 0.05  # per-image, per-channel shift of the mean pixel value, uniform ±
MIN_IMAGE_SIDE = 8
BN_EXPONENTS = tuple(np.round(np.arange(0.0, 2.01, 0.125), 3))  # spectral exponents tried by fit_bn_matched
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_INTEGERS: dict[int, type[np.generic]] = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
_DTYPES: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    **_INTEGERS,
}
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


# ----------------------------------------------------------------------------------------------------------
# random fields and images


def spectral_field(shape: tuple[int, ...], rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Random fields over the last two axes with amplitude exactly ∝ 1/f^exponent (power ∝ 1/f^(2·exponent))
    and uniformly random phase, each plane standardised to mean 0, std 1. Float64.

    The half-plane spectrum irfft2 reads has its phases made odd (φ(−k) = −φ(k)) on the columns that are their
    own mirror (f_x = 0 and Nyquist), so the inverse transform keeps the amplitude: every plane has exactly the
    autocorrelation :func:`field_autocorrelation`."""
    h, w = shape[-2], shape[-1]
    half = w // 2 + 1
    amplitude = np.sqrt(_power_spectrum(h, w, exponent)[:, :half])
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(*shape[:-2], h, half))
    mirror_y = (-np.arange(h)) % h
    for col in {0, w // 2} if w % 2 == 0 else {0}:
        phase[..., :, col] -= phase[..., mirror_y, col]  # odd in f_y; uniform mod 2π; 0 where f = −f
    field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w))
    field -= field.mean(axis=(-2, -1), keepdims=True)
    std = field.std(axis=(-2, -1), keepdims=True)
    return field / np.where(std > 0, std, 1.0)


def _power_spectrum(h: int, w: int, exponent: float) -> np.ndarray:
    """|f|^(−2·exponent) over the full h × w frequency plane, 0 at f = 0."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.sqrt(fy * fy + fx * fx)
    radius[0, 0] = 1.0
    power = radius ** (-2.0 * exponent)
    power[0, 0] = 0.0
    return power


def field_autocorrelation(h: int, w: int, exponent: float) -> np.ndarray:
    """The circular autocorrelation of :func:`spectral_field` planes of size h × w, shape (h, w), 1 at lag 0:
    the inverse transform of the power spectrum (Wiener–Khinchin)."""
    acf = np.real(np.fft.ifft2(_power_spectrum(h, w, exponent)))
    return acf / acf[0, 0] if acf[0, 0] > 0 else acf


def radial_power_slope(images: np.ndarray, f_lo: float = 0.02, f_hi: float = 0.3) -> float:
    """Slope of log power vs log spatial frequency of images (..., H, W), averaged over images and radial
    bins in [f_lo, f_hi] cycles / pixel (natural images: about -2)."""
    h, w = images.shape[-2:]
    planes = images.reshape(-1, h, w)
    planes = planes - planes.mean(axis=(-2, -1), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(planes)) ** 2, axis=0)
    radius = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    edges = np.geomspace(f_lo, f_hi, 13)
    which = np.digitize(radius, edges)
    centres, values = [], []
    for b in range(1, len(edges)):
        sel = which == b
        if sel.any():
            centres.append(np.sqrt(edges[b - 1] * edges[b]))
            values.append(power[sel].mean())
    slope = np.polyfit(np.log(centres), np.log(values), 1)[0]
    return float(slope)


def image_layout(shape: tuple[int, ...]) -> str | None:
    """``"NCHW"`` / ``"NHWC"`` for a rank-4 image-shaped input (1 or 3 channels, spatial sides ≥ 8), else None."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3) and min(shape[2:]) >= MIN_IMAGE_SIDE:
        return "NCHW"
    if shape[3] in (1, 3) and min(shape[1:3]) >= MIN_IMAGE_SIDE:
        return "NHWC"
    return None


def _normalisation(channels: int) -> tuple[np.ndarray, np.ndarray]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return np.full(channels, IMAGENET_MEAN.mean()), np.full(channels, IMAGENET_STD.mean())


def natural_images(shape: tuple[int, ...], rng: np.random.Generator, layout: str = "NCHW") -> np.ndarray:
    """Natural-image-like inputs of ``shape`` (``layout`` NCHW or NHWC), float64, ImageNet-normalised.

    Pixel value of channel c: ``clip(b + t_c + k · (L + colour · E_c) / s, 0, 1)`` with L a shared
    luminance field and E_c a channel's own field (both :func:`spectral_field`, amplitude ∝ 1/f^1.2), s the
    std of the sum, brightness b, tint t_c and contrast k drawn per image; then ``(pixel − mean) / std``
    with the ImageNet mean / std (their channel averages for a grayscale input)."""
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"image layout {layout!r} unknown; use NCHW or NHWC")
    n, c, h, w = shape if layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
    lum = spectral_field((n, 1, h, w), rng, NATURAL_AMPLITUDE_EXPONENT)
    own = spectral_field((n, c, h, w), rng, NATURAL_AMPLITUDE_EXPONENT) if c > 1 else np.zeros((n, c, h, w))
    field = (lum + NATURAL_COLOUR * own) / np.sqrt(1.0 + (NATURAL_COLOUR**2 if c > 1 else 0.0))
    bright = rng.uniform(*NATURAL_BRIGHTNESS, size=(n, 1, 1, 1))
    tint = rng.uniform(-NATURAL_TINT, NATURAL_TINT, size=(n, c, 1, 1)) if c > 1 else 0.0
    contrast = rng.uniform(*NATURAL_CONTRAST, size=(n, 1, 1, 1))
    pixels = np.clip(bright + tint + contrast * field, 0.0, 1.0)
    mean, std = _normalisation(c)
    out = (pixels - mean.reshape(1, c, 1, 1)) / std.reshape(1, c, 1, 1)
    return out if layout == "NCHW" else out.transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------
# BatchNorm-matched Gaussian fields


@dataclass(frozen=True)
class BnMatch:
    """Input statistics fitted to the first BatchNorm: per-channel mean, channel covariance, the fields'
    spectral (amplitude) exponent, and how far the Conv output's variances miss the BN's (relative RMS)."""

    input: str
    mean: np.ndarray  # (C,)
    covariance: np.ndarray  # (C, C), positive semi-definite
    exponent: float
    variance_miss: float
    mean_miss: float  # RMS of (predicted − running mean) / running std


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def first_batchnorm(
    model: onnx.ModelProto, input_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]] | None:
    """(Conv weight (O, C, kh, kw), Conv bias (O,), BN running mean (O,), BN running var (O,), dilations) of
    the first ``input → Conv → BatchNormalization`` pair (groups 1, constant weights), or None."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for conv in users.get(input_name, []):
        if conv.op_type != "Conv" or conv.input[0] != input_name or int(_attr(conv, "group", 1)) != 1:
            continue
        after = users.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type != "BatchNormalization" or len(after[0].input) < 5:
            continue
        weight = constant_value(model, conv.input[1])
        bias = constant_value(model, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        bn_mean, bn_var = (constant_value(model, n) for n in after[0].input[3:5])
        if weight is None or weight.ndim != 4 or bn_mean is None or bn_var is None:
            continue
        out = weight.shape[0]
        bias = np.zeros(out) if bias is None else bias
        if bn_mean.shape != (out,) or bn_var.shape != (out,) or bias.shape != (out,):
            continue
        dil = tuple(int(d) for d in _attr(conv, "dilations", [1, 1]))
        return (weight.astype(np.float64), bias.astype(np.float64), bn_mean.astype(np.float64),
                bn_var.astype(np.float64), (dil[0], dil[1]))  # fmt: skip
    return None


def _kernel_correlation(acf: np.ndarray, kh: int, kw: int, dilations: tuple[int, int]) -> np.ndarray:
    """R[u, u'] = ρ(offset_u − offset_u') over the kernel taps (kh·kw × kh·kw)."""
    dy = (np.arange(kh) * dilations[0]).repeat(kw)
    dx = np.tile(np.arange(kw) * dilations[1], kh)
    h, w = acf.shape
    return acf[(dy[:, None] - dy[None, :]) % h, (dx[:, None] - dx[None, :]) % w]


def fit_bn_matched(
    weight: np.ndarray,
    bias: np.ndarray,
    bn_mean: np.ndarray,
    bn_var: np.ndarray,
    size: tuple[int, int],
    dilations: tuple[int, int] = (1, 1),
    input_name: str = "",
) -> BnMatch:
    """Fit x = μ + L z (z: unit fields with amplitude ∝ 1/f^a) so that ``Conv(x)`` has per output channel o
    the BN's running mean and variance.

    E[y_o] = b_o + Σ_c μ_c S_oc (S_oc: the sum of the kernel of o over input channel c): least squares in μ.
    Var[y_o] = Σ_{c,d} Σ_cd w_ocᵀ R_a w_od (R_a: the fields' autocorrelation between kernel taps): linear in
    Σ, least squares relative to each variance for every exponent a of :data:`BN_EXPONENTS`, Σ projected
    onto the positive semi-definite matrices; the a whose variances miss least wins."""
    o, c, kh, kw = weight.shape
    flat = weight.reshape(o, c, kh * kw)
    sums = flat.sum(axis=2)  # (O, C)
    mu, *_ = np.linalg.lstsq(sums, bn_mean - bias, rcond=None)
    std = np.sqrt(np.maximum(bn_var, 1e-12))
    mean_miss = float(np.sqrt(np.mean(((sums @ mu + bias - bn_mean) / std) ** 2)))
    pairs = [(i, j) for i in range(c) for j in range(i, c)]
    best: tuple[float, float, np.ndarray] | None = None
    for exponent in BN_EXPONENTS:
        r = _kernel_correlation(field_autocorrelation(size[0], size[1], float(exponent)), kh, kw, dilations)
        k = np.einsum("ocu,uv,odv->ocd", flat, r, flat)  # K_o[c, d] = w_ocᵀ R w_od
        design = np.stack([k[:, i, j] * (1.0 if i == j else 2.0) for i, j in pairs], axis=1) / bn_var[:, None]
        theta, *_ = np.linalg.lstsq(design, np.ones(o), rcond=None)
        cov = np.zeros((c, c))
        for (i, j), t in zip(pairs, theta, strict=True):
            cov[i, j] = cov[j, i] = t
        vals, vecs = np.linalg.eigh(cov)
        cov = (vecs * np.maximum(vals, 0.0)) @ vecs.T
        predicted = np.einsum("ocd,cd->o", k, cov)
        miss = float(np.sqrt(np.mean((predicted / bn_var - 1.0) ** 2)))
        if best is None or miss < best[0]:
            best = (miss, float(exponent), cov)
    assert best is not None
    return BnMatch(input_name, mu, best[2], best[1], best[0], mean_miss)


def bn_matched_fields(match: BnMatch, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """(N, C, H, W) samples of the fitted statistics: μ + L z with L L^T = Σ (eigen square root)."""
    n, c, h, w = shape
    vals, vecs = np.linalg.eigh(match.covariance)
    root = vecs * np.sqrt(np.maximum(vals, 0.0))
    z = spectral_field((n, c, h, w), rng, match.exponent)
    return np.einsum("cd,ndhw->nchw", root, z) + match.mean.reshape(1, c, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# token ids


def embedding_vocab(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index an embedding table (a Gather whose data is a constant, reached through
    Cast / Reshape / Unsqueeze / Squeeze / Flatten / Identity), with the table's size along the gathered axis."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    vocab: dict[str, int] = {}
    for info in graph_inputs(model):
        if info.type.tensor_type.elem_type not in _INTEGERS:
            continue
        frontier, seen = [info.name], set()
        while frontier and info.name not in vocab:
            tensor = frontier.pop()
            seen.add(tensor)
            for node in users.get(tensor, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                    table = constant_value(model, node.input[0])
                    if table is not None and table.ndim >= 1:
                        axis = int(_attr(node, "axis", 0))
                        vocab[info.name] = int(table.shape[axis % table.ndim])
                        break
                elif node.op_type in _PASS_THROUGH and node.input[0] == tensor and node.output[0] not in seen:
                    frontier.append(node.output[0])
    return vocab


# ----------------------------------------------------------------------------------------------------------
# the families


def _float_inputs(model: onnx.ModelProto, count: int) -> dict[str, tuple[int, ...]]:
    return {i.name: input_shape(i, count) for i in graph_inputs(model) if i.type.tensor_type.elem_type in _FLOATS}


def applicable_families(model: onnx.ModelProto) -> tuple[str, ...]:
    """The families that probe something of this model: ``gaussian`` when it has a float input,
    ``bn-matched`` when one is read by Conv → BatchNormalization, ``natural-1/f`` when one is image-shaped,
    ``tokens`` when an integer input indexes an embedding. Never empty (``gaussian`` at least)."""
    floats = _float_inputs(model, 1)
    out = []
    if floats:
        out.append(GAUSSIAN)
    if any(image_layout(s) == "NCHW" and first_batchnorm(model, n) is not None for n, s in floats.items()):
        out.append(BN_MATCHED)
    if any(image_layout(s) is not None for s in floats.values()):
        out.append(NATURAL)
    if embedding_vocab(model):
        out.append(TOKENS)
    return tuple(out) or (GAUSSIAN,)


def _family_seed(seed: int, family: str) -> np.random.Generator:
    return np.random.default_rng([seed, FAMILIES.index(family)])


def family_inputs(model: onnx.ModelProto, family: str, count: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``count`` probes (batch axis first) of one family for every model input, each in its own dtype."""
    if family not in FAMILIES:
        raise InputError(f"unknown probe family {family!r}; use one of {', '.join(FAMILIES)}")
    if count < 1:
        raise InputError(f"probe count {count} must be >= 1")
    feeds: dict[str, np.ndarray] = {}
    if family == GAUSSIAN:  # sample i with seed + i: the probes rexdeploy has always measured on
        base = [synthetic_inputs(model, batch=1, seed=seed + i) for i in range(count)]
        feeds = {name: np.concatenate([b[name] for b in base]) for name in base[0]}
    rng = _family_seed(seed, family)
    vocab = embedding_vocab(model)
    for info in graph_inputs(model):
        name, elem = info.name, info.type.tensor_type.elem_type
        dtype = _DTYPES.get(int(elem))
        if dtype is None:
            raise ModelError(f"input {name!r} has an element type rexdeploy cannot synthesize ({elem})")
        shape = input_shape(info, count)
        layout = image_layout(shape) if elem in _FLOATS else None
        found = first_batchnorm(model, name) if family == BN_MATCHED and layout == "NCHW" else None
        if "mask" in name.lower():
            feeds[name] = np.ones(shape, dtype=dtype)
        elif name in vocab:
            token_rng = rng if family == TOKENS else np.random.default_rng([seed, len(FAMILIES), 0])
            feeds[name] = token_rng.integers(0, vocab[name], size=shape).astype(dtype)
        elif name in feeds:
            continue  # the Gaussian family's own probes
        elif family == NATURAL and layout is not None:
            feeds[name] = natural_images(shape, rng, layout).astype(dtype)
        elif found is not None:
            weight, bias, bn_mean, bn_var, dilations = found
            if weight.shape[1] != shape[1]:
                raise ModelError(f"input {name!r} has {shape[1]} channels but its first Conv reads {weight.shape[1]}")
            match = fit_bn_matched(weight, bias, bn_mean, bn_var, (shape[2], shape[3]), dilations, name)
            feeds[name] = bn_matched_fields(match, shape, rng).astype(dtype)
        elif elem in _FLOATS:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds
