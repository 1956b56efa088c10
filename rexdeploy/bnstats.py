"""BatchNorm statistics propagated through the graph: data-free per-channel activation statistics.

A BatchNormalization layer was trained to emit, per channel c, values with mean ``beta_c`` and standard
deviation ``|gamma_c|`` (its input is normalised by the running mean / variance, then scaled and
shifted). :func:`rexdeploy.graph.fold_batchnorm` returns these pairs for every folded BN output. This
module models each such channel as a Gaussian and carries the model forward, node by node, in numpy:

* a tensor's channel c is ``clip(g_c, lo_c, hi_c)`` with ``g_c ~ N(mean_c, std_c²)`` (:class:`ChannelStats`);
  ``lo``/``hi`` are ±inf until an activation clips;
* ``Relu`` / ``Clip`` (ReLU6) only tighten ``lo``/``hi`` — the Gaussian underneath is kept, so the range of
  a rectified tensor is the clipped upper tail ``min(hi, mean + n·std)``, not a Gaussian fitted to it;
* ``Add`` / ``Sum`` / ``Sub`` of two known tensors: the moments of each (rectified / clipped Gaussian moments,
  closed form with erf) are combined, means add, variances add (the inputs are assumed independent);
  the result is again an unclipped Gaussian — except a sum with an operand clipped below only (a ReLU output, as
  in a ResNet block's ``relu(bn(conv(x)) + x)``), whose upper tail is that of the unclipped operands' sum: there
  the result is that sum's Gaussian, clipped below where its mean is the exact one (:func:`_combine`);
* ``Add`` / ``Sub`` / ``Mul`` / ``Div`` by a scalar constant: an affine map of the channel;
* ``Identity``, ``Dropout``, ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Resize``: identity (the
  element values, hence the range, are unchanged; the channel axis is assumed to survive, as in the usual
  ``(N, C, 1, 1) → (N, C)`` flatten);
* ``MaxPool`` / ``AveragePool``: identity, as a bound (a max or a mean over a window never leaves the input's
  range);
* ``GlobalAveragePool`` / ``ReduceMean``: the mean of the (clipped) channel is kept and its standard deviation
  is multiplied by ``pool_std_factor`` (assumption: a global average removes the within-image spread and keeps
  the between-image one; default 0.6, the ratio measured on MobileNetV2 and the demo CNN; 1 is a bound);
* ``Concat`` on axis 1: the channels are concatenated;
* a ``BatchNormalization`` that was not folded: its (beta, |gamma|) directly (a ``LayerNormalization``'s
  (beta, |gamma|) were tried the same way and measured worse than probes on the digits ViT: not used);
* ``Conv`` / ``Gemm`` / ``MatMul`` with a constant weight and no BN after it: the weights map the channel
  means and variances (inputs independent), interval arithmetic maps the bounds;
* elementwise activations (``Sigmoid``, ``Tanh``, ``Erf``, ``Softplus``, ``HardSigmoid``, ``HardSwish``,
  ``LeakyRelu``, ``Gelu``, and SiLU written ``Mul(x, Sigmoid(x))``): the moments of ``f(clip(g))`` by
  Gauss–Hermite quadrature, the bounds f takes; ``Mul`` of a tensor by a gate in [0, 1] (a Sigmoid):
  the tensor's statistics, as a bound;
* anything else (MatMul of two activations, Mul of two other tensors, Softmax, Transpose, ...): unknown.

Which tensors are ≥ 0 whatever the input (:func:`nonnegative_tensors`: uint8 activations) is read from the
graph alone. How a range follows from a tensor's statistics: :func:`stats_range` — a fixed ``mean ± n·std``
or the MSE-optimal range of Gaussian / Laplace channels (:meth:`ChannelStats.mse_range`).

erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), vectorized; rexdeploy does not depend on scipy.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

_SQRT2 = float(np.sqrt(2.0))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_Z_LIMIT = 40.0  # standardised bounds beyond ±40 σ are treated as infinite (Φ(-40) underflows)
_MIN_STD = 1e-12
# n in mean ± n·std: measured on MobileNetV2 W8A8 (benchmarks/results/activation_ranges.md), the relative logit
# error is flat for n = 3.5..4 and worse below 3 (clipping) and above 5 (resolution); 4 clips less of the heavy
# tails real activations have beyond the Gaussian model
DEFAULT_N_STD = 4.0
# how a tensor's range follows from its statistics (stats_range): a fixed mean ± n·std, or the MSE-optimal range
ClipRule = Literal["nstd", "mse-gauss", "mse-laplace"]
CLIP_RULES: tuple[str, ...] = ("nstd", "mse-gauss", "mse-laplace")
# measured (benchmarks/results/activation_ranges.md): the Laplace MSE range, channels weighted by the weights that
# read them, beats mean + 4·std on MobileNetV2 and on a ResNet-style net with BatchNorm, at K = 1 and K = 2
DEFAULT_CLIP: ClipRule = "mse-laplace"
# std of a global average over the std of its input, per channel: measured 0.54 (MobileNetV2, 7×7, natural
# images) and 0.58 (demo digits CNN, 4×4); the averaging removes the within-image spread, not the between-image one
DEFAULT_POOL_STD_FACTOR = 0.6

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1 t + a2 t² + a3 t³ + a4 t⁴ + a5 t⁵) e^{-x²}, t = 1 / (1 + p x), x ≥ 0
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erfc_nonneg(x: np.ndarray) -> np.ndarray:
    """erfc(x) for x ≥ 0 by A&S 7.1.26 (the form keeps the small tail values accurate)."""
    t = 1.0 / (1.0 + _AS_P * x)
    a1, a2, a3, a4, a5 = _AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    return poly * np.exp(-x * x)


def erf(x: np.ndarray | float) -> np.ndarray:
    """Vectorized error function, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * (1.0 - _erfc_nonneg(np.abs(x)))


def norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF Φ(z), via erfc so that both tails stay accurate."""
    z = np.asarray(z, dtype=np.float64)
    tail = 0.5 * _erfc_nonneg(np.abs(z) / _SQRT2)  # = Φ(-|z|)
    return np.where(z < 0, tail, 1.0 - tail)


def norm_pdf(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return _INV_SQRT_2PI * np.exp(-0.5 * z * z)


def clipped_normal_moments(
    mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``clip(g, lo, hi)``, ``g ~ N(mean, std²)``, elementwise (lo ≤ hi).

    With α = (lo − μ)/σ, β = (hi − μ)/σ and Z clipped to [α, β] (φ, Φ the standard normal pdf / cdf):
    E[Zc] = αΦ(α) + β(1 − Φ(β)) + φ(α) − φ(β);
    E[Zc²] = α²Φ(α) + β²(1 − Φ(β)) + Φ(β) − Φ(α) + αφ(α) − βφ(β);
    then E[x] = μ + σ E[Zc] and Var[x] = σ² (E[Zc²] − E[Zc]²). ``lo = 0, hi = inf`` is the rectified
    Gaussian of a ReLU, ``lo = 0, hi = 6`` ReLU6.
    """
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.maximum(np.asarray(std, dtype=np.float64), _MIN_STD)
    alpha = np.clip((np.asarray(lo, dtype=np.float64) - mu) / sigma, -_Z_LIMIT, _Z_LIMIT)
    beta = np.clip((np.asarray(hi, dtype=np.float64) - mu) / sigma, -_Z_LIMIT, _Z_LIMIT)
    cdf_a, cdf_b = norm_cdf(alpha), norm_cdf(beta)
    pdf_a, pdf_b = norm_pdf(alpha), norm_pdf(beta)
    upper_tail = 1.0 - cdf_b
    m1 = alpha * cdf_a + beta * upper_tail + pdf_a - pdf_b
    m2 = alpha**2 * cdf_a + beta**2 * upper_tail + (cdf_b - cdf_a) + alpha * pdf_a - beta * pdf_b
    var = np.maximum(m2 - m1 * m1, 0.0)
    return mu + sigma * m1, sigma * np.sqrt(var)


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of a tensor: channel c is ``clip(g_c, lo_c, hi_c)``, ``g_c ~ N(mean_c, std_c²)``."""

    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def gaussian(cls, mean: np.ndarray, std: np.ndarray) -> ChannelStats:
        m = np.asarray(mean, dtype=np.float64).reshape(-1)
        s = np.abs(np.asarray(std, dtype=np.float64).reshape(-1))
        if m.shape != s.shape:
            raise ValueError(f"mean and std shapes differ: {m.shape} vs {s.shape}")
        return cls(m, s, np.full_like(m, -np.inf), np.full_like(m, np.inf))

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each (clipped) channel."""
        return clipped_normal_moments(self.mean, self.std, self.lo, self.hi)

    def clip(self, lo: float, hi: float) -> ChannelStats:
        """Statistics of ``clip(x, lo, hi)``: clip(clip(g, a, b), c, d) = clip(g, clip(a, c, d), clip(b, c, d))."""
        return ChannelStats(self.mean, self.std, np.clip(self.lo, lo, hi), np.clip(self.hi, lo, hi))

    def affine(self, scale: float, shift: float) -> ChannelStats:
        """Statistics of ``scale · x + shift``."""
        lo, hi = self.lo * scale + shift, self.hi * scale + shift
        if scale < 0:
            lo, hi = hi, lo
        lo = np.where(np.isnan(lo), -np.inf, lo)  # 0 · inf
        hi = np.where(np.isnan(hi), np.inf, hi)
        return ChannelStats(self.mean * scale + shift, self.std * abs(scale), lo, hi)

    def pooled(self, std_factor: float) -> ChannelStats:
        """Statistics of a spatial average: the clipped mean kept, the std times ``std_factor``."""
        mean, std = self.moments()
        return ChannelStats.gaussian(mean, std * std_factor)

    def quantization_mse(
        self,
        alphas: np.ndarray,
        levels: int,
        family: ClipFamily = "gauss",
        gains: np.ndarray | None = None,
        clip_gains: np.ndarray | None = None,
    ) -> np.ndarray:
        """Expected squared error of quantizing the tensor with range ``α`` (each of ``alphas``): uniform steps
        ``Δ = α / levels`` on ``[0, α]`` (``levels = 255``, uint8, the tensor ≥ 0) or ``[−128Δ, α]`` (127, int8), summed
        over channels, each channel weighted by ``gains`` (default 1). Per channel: the rounding noise ``Δ²/12``
        of the values inside (a ReLU's exact zeros round exactly), plus the clipping error of each tail beyond
        ``±α`` under the channel's distribution (``family``: a Gaussian or a Laplace of the channel's mean and
        std), rectified / clipped at the channel's ``lo`` / ``hi``. ``clip_gains`` (default: ``gains``) weighs
        the clipping error apart from the rounding noise: the rounding noise is independent from element to
        element, the clipping error is not (values beyond α come in patches), so a reading layer passes them with
        different gains (:func:`rexdeploy.ranges.input_channel_gains`)."""
        noise, clipped = self._mse_terms(np.asarray(alphas, dtype=np.float64).reshape(-1, 1), levels, family)
        w = np.ones(self.channels) if gains is None else np.asarray(gains, dtype=np.float64).reshape(-1)
        wc = w if clip_gains is None else np.asarray(clip_gains, dtype=np.float64).reshape(-1)
        return np.asarray(noise @ w + clipped @ wc)

    def _mse_terms(self, a: np.ndarray, levels: int, family: ClipFamily) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (columns) and per range (rows of ``a``, shape (G, 1) or (G, channels)): the rounding noise
        and the clipping error of :meth:`quantization_mse`, unweighted."""
        mu, sigma, lo, hi = self.mean[None], self.std[None], self.lo[None], self.hi[None]
        upper = _upper_clip_mse(family, mu, sigma, a, hi)
        # the mirrored lower tail, −g beyond the lowest code: −128·Δ for int8 (0 for uint8: there lo ≥ 0)
        lower = _upper_clip_mse(family, -mu, sigma, a * (levels + 1) / levels, -lo)
        p_exact_zero = np.where(lo == 0.0, 1.0 - partial_moments(family, mu, sigma, lo)[0], 0.0)
        step = a / levels
        return step * step / 12.0 * (1.0 - p_exact_zero), upper + lower

    def channel_mse_ranges(self, family: ClipFamily = "gauss", levels: int | None = None) -> np.ndarray:
        """Each channel's own MSE-optimal range (what :meth:`mse_range` gives the channel alone), all channels at
        once: per channel a geometric grid from ``|mean| + std`` to ``|mean| + 16·std`` (capped by its clip
        bounds). 0 for a channel that is identically 0. ``levels`` as in :meth:`mse_range`."""
        if self.mean.size == 0:
            return np.zeros(0)
        if levels is None:
            levels = 255 if bool(np.all(self.lo >= 0.0)) else 127
        bound = np.maximum(np.abs(self.lo), np.abs(self.hi))
        top = np.minimum(np.abs(self.mean) + 16.0 * self.std, bound)
        bottom = np.clip(np.minimum(np.abs(self.mean) + self.std, bound), top * 1e-3, top)
        alive = top > 0.0
        grid = np.geomspace(np.where(alive, bottom, 1.0), np.where(alive, top, 1.0), _MSE_GRID)  # (G, channels)
        noise, clipped = self._mse_terms(grid, levels, family)
        best = grid[np.argmin(noise + clipped, axis=0), np.arange(self.channels)]
        return np.where(alive, best, 0.0)

    def mse_range(
        self,
        family: ClipFamily = "gauss",
        gains: np.ndarray | None = None,
        levels: int | None = None,
        clip_gains: np.ndarray | None = None,
    ) -> float:
        """The range ``α`` minimizing :meth:`quantization_mse` over a geometric grid, from the smallest channel's
        ``|mean| + std`` to the largest channel's ``|mean| + 16·std`` (capped by the channels' clip bounds).
        ``levels``: 255 when every channel is ≥ 0 (uint8), else 127, unless given."""
        if self.mean.size == 0:
            return 0.0
        if levels is None:
            levels = 255 if bool(np.all(self.lo >= 0.0)) else 127
        bound = np.maximum(np.abs(self.lo), np.abs(self.hi))
        top = float(np.max(np.minimum(np.abs(self.mean) + 16.0 * self.std, bound)))
        bottom = float(np.min(np.minimum(np.abs(self.mean) + self.std, bound)))
        if not top > 0.0:
            return 0.0
        bottom = min(max(bottom, top * 1e-3), top)
        alphas = np.geomspace(bottom, top, _MSE_GRID)
        return float(alphas[int(np.argmin(self.quantization_mse(alphas, levels, family, gains, clip_gains)))])

    def max_abs(self, n_std: float) -> float:
        """The tensor's range: the largest |value| over channels of ``clip(mean ± n_std·std, lo, hi)``."""
        if self.mean.size == 0:
            return 0.0
        upper = np.clip(self.mean + n_std * self.std, self.lo, self.hi)
        lower = np.clip(self.mean - n_std * self.std, self.lo, self.hi)
        return float(np.max(np.maximum(np.abs(upper), np.abs(lower))))


ClipFamily = Literal["gauss", "laplace"]
CLIP_FAMILIES: tuple[str, ...] = ("gauss", "laplace")
_MSE_GRID = 160  # candidate ranges per tensor, geometric between the smallest and largest channel tail


def partial_moments(
    family: ClipFamily, mean: np.ndarray, std: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``P(g > t)``, ``E[(g − t)·1{g > t}]`` and ``E[(g − t)²·1{g > t}]`` for ``g`` Gaussian or Laplace with
    the given mean and standard deviation, elementwise (broadcast), closed form; ``t = inf`` gives zeros.

    Gaussian, z = (t − μ)/σ, Q = 1 − Φ(z): ``Q``, ``σ(φ(z) − zQ)``, ``σ²((1 + z²)Q − zφ(z))``.
    Laplace, b = σ/√2, d = t − μ: for d ≥ 0 ``P = e^(−d/b)/2``, ``bP``, ``2b²P`` (the excess over t is
    exponential); for d < 0, with ``p = e^(d/b)/2`` the mass below t: ``1 − p``, ``−d + bp``, ``2b² + d² − 2b²p``.
    """
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.maximum(np.asarray(std, dtype=np.float64), _MIN_STD)
    t = np.asarray(t, dtype=np.float64)
    finite = np.isfinite(t)
    t_f = np.where(finite, t, 0.0)
    if family == "gauss":
        z = np.clip((t_f - mu) / sigma, -_Z_LIMIT, _Z_LIMIT)
        q, pdf = 1.0 - norm_cdf(z), norm_pdf(z)
        p, m1, m2 = q, sigma * (pdf - z * q), sigma**2 * ((1.0 + z * z) * q - z * pdf)
    elif family == "laplace":
        b = sigma / _SQRT2
        d = t_f - mu
        tail = 0.5 * np.exp(-np.abs(d) / b)
        above = d >= 0
        p = np.where(above, tail, 1.0 - tail)
        m1 = np.where(above, b * tail, -d + b * tail)
        m2 = np.where(above, 2.0 * b * b * tail, 2.0 * b * b + d * d - 2.0 * b * b * tail)
    else:
        raise ValueError(f"unknown clipping family {family!r}; use one of {', '.join(CLIP_FAMILIES)}")
    return tuple(np.where(finite, np.maximum(v, 0.0), 0.0) for v in (p, m1, m2))  # type: ignore[return-value]


def _upper_clip_mse(family: ClipFamily, mu: np.ndarray, sigma: np.ndarray, alpha: np.ndarray,
                    hi: np.ndarray) -> np.ndarray:  # fmt: skip
    """``E[(min(g, hi) − α)²·1{g > α}]`` (0 where α ≥ hi): the error of values clipped at α, for ``g`` of the
    family; = SPM(α) − SPM(hi) − 2(hi − α)·FPM(hi) with the partial moments of :func:`partial_moments`."""
    _, _, spm_a = partial_moments(family, mu, sigma, alpha)
    _, fpm_h, spm_h = partial_moments(family, mu, sigma, hi)
    gap = np.where(np.isfinite(hi), hi - alpha, 0.0)
    return np.where(alpha >= hi, 0.0, np.maximum(spm_a - spm_h - 2.0 * gap * fpm_h, 0.0))


def _combine(a: ChannelStats, b: ChannelStats, sign: float, rectified_tails: bool = True) -> ChannelStats | None:
    """``a + sign·b`` for independent channels (one of them may have a single channel, broadcast): a Gaussian with
    the exact mean and variance of the sum (the moments of the clipped operands).

    ``rectified_tails`` (``Add`` / ``Sum``): where an operand is clipped below only (a ReLU output), its values above
    the clip are its Gaussian's, so the sum's upper tail is that of the *unclipped* operands' sum
    ``N(μ_T, σ_T²)``, wider than a Gaussian of the sum's moments (a rectified N(0, σ²) has std 0.58σ). The sum is
    then ``clip(N(μ_T, σ_T²), lo, inf)`` with ``lo`` set so that its mean is the exact one: the upper tail of the
    unclipped sum, the mean of the true one (``tests/test_ranges.py``: the Monte Carlo 99.9th / 99.99th percentiles
    within 6 %, the std within 10 %). Without it a ResNet block's output ``relu(bn(conv(x)) + x)`` was ranged at 6.4
    where natural images reach 8.0 at the 99.99th percentile (one-off check, 64 crops); the ResNet-style net's W8A8
    K = 1 error 0.045 → 0.027 (benchmarks/results/activation_ranges.md, rules 6 → 7)."""
    if a.channels != b.channels and 1 not in (a.channels, b.channels):
        return None
    (ma, sa), (mb, sb) = a.moments(), b.moments()
    mean, std = ma + sign * mb, np.sqrt(sa * sa + sb * sb)
    if not rectified_tails or sign < 0:  # a Sub mirrors b: its lower clip becomes an upper one
        return ChannelStats.gaussian(mean, std)
    ua, ub = np.isposinf(a.hi), np.isposinf(b.hi)  # no upper clip: above its lower clip an operand is its Gaussian
    tail_mean = np.where(ua, a.mean, ma) + np.where(ub, b.mean, mb)
    ta, tb = np.where(ua, a.std, sa), np.where(ub, b.std, sb)
    tail_std = np.maximum(np.sqrt(ta * ta + tb * tb), _MIN_STD)
    # clip(N(μ_T, σ_T²), lo, inf) has mean μ_T + σ_T·(αΦ(α) + φ(α)), α = (lo − μ_T)/σ_T: solve for α (bisection;
    # αΦ(α) + φ(α) rises from 0 at α → −inf), where the lower clips raised the mean above μ_T
    excess = (mean - tail_mean) / tail_std
    below, above = np.full_like(excess, -_Z_LIMIT), np.maximum(excess, 0.0) + 1.0
    for _ in range(64):
        mid = 0.5 * (below + above)
        low = mid * norm_cdf(mid) + norm_pdf(mid) < excess
        below, above = np.where(low, mid, below), np.where(low, above, mid)
    alpha = 0.5 * (below + above)
    fit = excess > 1e-9
    lo = np.where(fit & (alpha > 1.0 - _Z_LIMIT), tail_mean + alpha * tail_std, -np.inf)
    hi = np.full_like(lo, np.inf)
    return ChannelStats(np.where(fit, tail_mean, mean), np.where(fit, tail_std, std), lo, hi)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class _Constants:
    """Name → value of a graph's initializers and Constant-node outputs, converted on demand."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._protos: dict[str, onnx.TensorProto] = {init.name: init for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self._protos[node.output[0]] = value

    def get(self, name: str) -> np.ndarray | None:
        proto = self._protos.get(name) if name else None
        return None if proto is None else numpy_helper.to_array(proto)

    def scalar(self, name: str) -> float | None:
        value = self.get(name)
        return None if value is None or value.size != 1 else float(value.reshape(()))


def _clip_bounds(consts: _Constants, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(min, max) of a Clip node: inputs 1 and 2 (opset ≥ 11, optional) or attributes (older)."""
    if len(node.input) > 1:
        lo_name = node.input[1]
        hi_name = node.input[2] if len(node.input) > 2 else ""
        lo = consts.scalar(lo_name) if lo_name else -np.inf
        hi = consts.scalar(hi_name) if hi_name else np.inf
        if lo is None or hi is None:
            return None
        return lo, hi
    lo_attr = _attr(node, "min", -np.inf)
    hi_attr = _attr(node, "max", np.inf)
    return float(lo_attr), float(hi_attr)


_IDENTITY_OPS = frozenset(
    {
        "Identity",
        "Dropout",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Upsample",
        "MaxPool",
        "AveragePool",
    }
)
_POOL_OPS = frozenset({"GlobalAveragePool", "ReduceMean"})


def _bn_node_stats(consts: _Constants, node: onnx.NodeProto) -> ChannelStats | None:
    gamma = consts.get(node.input[1]) if len(node.input) > 2 else None
    beta = consts.get(node.input[2]) if len(node.input) > 2 else None
    if gamma is None or beta is None or gamma.size != beta.size:
        return None
    return ChannelStats.gaussian(beta, np.abs(gamma))


_QUAD_NODES, _QUAD_WEIGHTS = np.polynomial.hermite_e.hermegauss(64)  # ∫ f(z) φ(z) dz ≈ Σ w_i f(z_i) / √(2π)
_QUAD_WEIGHTS = _QUAD_WEIGHTS / np.sqrt(2.0 * np.pi)
_BIG = 1e30  # ±inf stands in as ±1e30 where an activation function is evaluated at a channel's bounds


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))  # = 1 / (1 + e^−x), without overflow


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.asarray(x * 0.5 * (1.0 + erf(x / _SQRT2)))


def _hard_sigmoid(alpha: float, beta: float) -> Any:
    return lambda x: np.clip(alpha * x + beta, 0.0, 1.0)


# elementwise activations: f, and the x where f has an interior minimum (None: f is monotone non-decreasing)
_ELEMENTWISE: dict[str, tuple[Any, float | None]] = {
    "Sigmoid": (_sigmoid, None),
    "Tanh": (np.tanh, None),
    "Erf": (erf, None),
    "Softplus": (lambda x: np.logaddexp(0.0, x), None),
    "HardSwish": (lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0), -1.5),
    "Gelu": (_gelu, -0.7517915),  # exact GELU (opset 20); the tanh approximation is within 1e-3
    "SiLU": (lambda x: x * _sigmoid(x), -1.2784645),  # Mul(x, Sigmoid(x)), matched in _node_stats
}


def _elementwise(stats: ChannelStats, f: Any, dip: float | None) -> ChannelStats:
    """Statistics of ``f(x)`` for an elementwise activation: the mean and std of ``f(clip(g, lo, hi))`` by
    Gauss–Hermite quadrature over the channel's Gaussian, kept as a Gaussian of those moments, clipped to
    the range f takes on ``[lo, hi]`` (its values at the bounds, and its interior minimum ``f(dip)``)."""
    g = stats.mean[None] + stats.std[None] * _QUAD_NODES[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = f(np.clip(g, stats.lo[None], stats.hi[None]))
        mean = _QUAD_WEIGHTS @ y
        var = np.maximum(_QUAD_WEIGHTS @ (y * y) - mean * mean, 0.0)
        ends = [np.asarray(f(np.clip(b, -_BIG, _BIG)), dtype=np.float64) for b in (stats.lo, stats.hi)]
    lo, hi = np.minimum(*ends), np.maximum(*ends)
    if dip is not None:
        inside = (stats.lo < dip) & (stats.hi > dip)
        lo = np.where(inside, np.minimum(lo, float(f(np.array(dip)))), lo)
    lo = np.where(lo <= -_BIG / 10, -np.inf, lo)
    hi = np.where(hi >= _BIG / 10, np.inf, hi)
    return _fit_clipped(mean, np.sqrt(var), lo, hi)


def _fit_clipped(mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray, steps: int = 40) -> ChannelStats:
    """A clipped Gaussian ``clip(g, lo, hi)`` whose mean and std are ``mean`` / ``std``: the Gaussian's parameters
    by fixed-point steps (shift by the mean's miss, scale by the std's ratio); where the bounds cannot hold the
    std (a near two-point distribution), the widest Gaussian tried."""
    mu, sigma = mean.copy(), np.maximum(std, _MIN_STD)
    with np.errstate(invalid="ignore"):
        width = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
    cap = np.maximum(1e3 * np.maximum(width, std), _MIN_STD)
    reach = 1e3 * (std + np.abs(mean) + 1.0)  # a mean on a bound would drive μ away without end: stop it
    for _ in range(steps):
        m, sd = clipped_normal_moments(mu, sigma, lo, hi)
        mu = np.clip(mu + (mean - m), mean - reach, mean + reach)
        sigma = np.minimum(sigma * std / np.maximum(sd, _MIN_STD), cap)
    return ChannelStats(mu, sigma, lo, hi)


def _gated(a: ChannelStats, b: ChannelStats) -> ChannelStats | None:
    """``a · b`` where ``b`` lies in [0, 1] (a Sigmoid / HardSigmoid gate, as in squeeze-and-excitation blocks):
    ``|a·b| ≤ |a|`` elementwise, so ``a``'s statistics stand as a bound (as for a max-pool); the gate is computed
    from the same input, so the product's moments are not those of independent factors. Else unknown."""
    if b.channels not in (a.channels, 1) or not (bool(np.all(b.lo >= 0.0)) and bool(np.all(b.hi <= 1.0))):
        return None
    return ChannelStats(a.mean, a.std, np.minimum(a.lo, 0.0), np.maximum(a.hi, 0.0))


def _linear(consts: _Constants, node: onnx.NodeProto, x: ChannelStats) -> ChannelStats | None:
    """A Conv / Gemm / MatMul with a constant weight and no BatchNorm after it: per output channel o,
    ``mean_o = Σ_{c,k} W[o,c,k]·E[x_c] + b_o`` and ``var_o = Σ_{c,k} W[o,c,k]²·Var[x_c]`` (inputs independent;
    spatially correlated inputs make the true variance larger for k > 1: an estimate, not a bound)."""
    op = node.op_type
    w = consts.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim < 2:
        return None
    w = w.astype(np.float64)
    bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    scale = 1.0
    if op == "Conv":
        group = int(_attr(node, "group", 1))
        out, per_group = w.shape[0], w.shape[1]
        if per_group * group != x.channels or out % group:
            return None
        w2 = w.reshape(group, out // group, per_group, -1)
        sums, squares = w2.sum(axis=3), np.square(w2).sum(axis=3)  # (group, O/g, I/g)
        pos, neg = np.maximum(w2, 0.0).sum(axis=3), np.minimum(w2, 0.0).sum(axis=3)
    elif op in ("Gemm", "MatMul"):
        if op == "Gemm":
            w = w.T if int(_attr(node, "transB", 0)) else w  # → (I, O)
            scale = float(_attr(node, "alpha", 1.0))
            bias = None if bias is None else bias * float(_attr(node, "beta", 1.0))
        if w.ndim != 2 or w.shape[0] != x.channels:
            return None
        sums, squares = (scale * w.T)[None], np.square(scale * w.T)[None]  # (1, O, I)
        pos, neg = np.maximum(sums, 0.0), np.minimum(sums, 0.0)
        group, per_group = 1, x.channels
    else:
        return None
    mean, std = x.moments()
    m, v = mean.reshape(group, 1, per_group), np.square(std).reshape(group, 1, per_group)
    out_mean = (sums * m).sum(axis=2).reshape(-1)
    out_std = np.sqrt((squares * v).sum(axis=2).reshape(-1))
    # interval bounds: Σ positive weights × input bound + Σ negative weights × the other bound (0 · inf = 0)
    lo_in, hi_in = x.lo.reshape(group, 1, per_group), x.hi.reshape(group, 1, per_group)

    def times(w: np.ndarray, bound: np.ndarray) -> np.ndarray:
        return np.where(w == 0.0, 0.0, w * np.where(np.isfinite(bound), bound, np.sign(bound) * np.inf))

    with np.errstate(invalid="ignore"):
        lo = (times(pos, lo_in) + times(neg, hi_in)).sum(axis=2).reshape(-1)
        hi = (times(pos, hi_in) + times(neg, lo_in)).sum(axis=2).reshape(-1)
    lo, hi = np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi)
    if bias is not None:
        if bias.size not in (1, out_mean.size):
            return None
        b = bias.astype(np.float64).reshape(-1)
        out_mean, lo, hi = out_mean + b, lo + b, hi + b
    if not (np.isfinite(lo).any() or np.isfinite(hi).any()):
        return ChannelStats.gaussian(out_mean, out_std)
    return _fit_clipped(out_mean, out_std, lo, hi)


def _node_stats(
    consts: _Constants,
    node: onnx.NodeProto,
    known: Mapping[str, ChannelStats],
    pool_std_factor: float,
    producers: Mapping[str, onnx.NodeProto] | None = None,
    rectified_tails: bool = True,
) -> ChannelStats | None:
    """The statistics of ``node.output[0]`` from those of its inputs, or None where they are unknown."""
    op = node.op_type
    first = known.get(node.input[0]) if node.input else None
    if op == "BatchNormalization":
        return _bn_node_stats(consts, node)
    if op in ("Conv", "Gemm", "MatMul"):
        return None if first is None else _linear(consts, node, first)
    if op in ("Add", "Sub", "Sum", "Concat"):
        ins = [known.get(name) for name in node.input]
        if op == "Concat":
            if int(_attr(node, "axis", 1)) != 1 or any(s is None for s in ins):
                return None
            parts = [s for s in ins if s is not None]
            return ChannelStats(*(np.concatenate([getattr(s, f) for s in parts]) for f in ("mean", "std", "lo", "hi")))
        if all(s is not None for s in ins):
            acc = ins[0]
            for other in ins[1:]:
                if acc is None or other is None:
                    return None
                acc = _combine(acc, other, -1.0 if op == "Sub" else 1.0, rectified_tails)
            return acc
        if op == "Sum" or len(ins) != 2:
            return None
        # one known tensor and a scalar constant
        if ins[0] is not None:
            c = consts.scalar(node.input[1])
            return None if c is None else ins[0].affine(1.0, c if op == "Add" else -c)
        if ins[1] is not None:
            c = consts.scalar(node.input[0])
            return None if c is None else ins[1].affine(1.0 if op == "Add" else -1.0, c)
        return None
    if op in ("Mul", "Div") and len(node.input) == 2:
        second = known.get(node.input[1])
        if op == "Mul" and first is not None and second is not None:
            silu = _silu_source(node, producers)
            if silu is not None and silu in known:
                return _elementwise(known[silu], *_ELEMENTWISE["SiLU"])
            return _gated(first, second) or _gated(second, first)
        if first is not None:
            c = consts.scalar(node.input[1])
            if c is None or (op == "Div" and c == 0.0):
                return None
            return first.affine(c if op == "Mul" else 1.0 / c, 0.0)
        c = consts.scalar(node.input[0])
        if op == "Mul" and second is not None and c is not None:
            return second.affine(c, 0.0)
        return None
    if first is None:
        return None
    if op == "Relu":
        return first.clip(0.0, np.inf)
    if op in _ELEMENTWISE:
        return _elementwise(first, *_ELEMENTWISE[op])
    if op == "HardSigmoid":
        return _elementwise(
            first, _hard_sigmoid(float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))), None
        )
    if op == "LeakyRelu":
        alpha = float(_attr(node, "alpha", 0.01))
        return _elementwise(first, lambda x: np.where(x >= 0, x, alpha * x), None) if alpha >= 0 else None
    if op == "Clip":
        bounds = _clip_bounds(consts, node)
        return None if bounds is None else first.clip(*bounds)
    if op in _IDENTITY_OPS:
        return first
    if op in _POOL_OPS and (op != "ReduceMean" or _spatial_reduction(consts, node)):
        return first.pooled(pool_std_factor)
    return None


def _silu_source(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto] | None) -> str | None:
    """``x`` when ``node`` is ``Mul(x, Sigmoid(x))`` (or ``Mul(Sigmoid(x), x)``): SiLU / Swish, one elementwise
    function of x (its two factors are not independent)."""
    if producers is None:
        return None
    for a, b in ((0, 1), (1, 0)):
        gate = producers.get(node.input[b])
        if gate is not None and gate.op_type == "Sigmoid" and gate.input[0] == node.input[a]:
            return str(node.input[a])
    return None


def _spatial_reduction(consts: _Constants, node: onnx.NodeProto) -> bool:
    """Whether a ReduceMean averages only spatial axes (all ≥ 2): attribute ``axes`` or input 1 (opset 18)."""
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = consts.get(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return bool(axes) and all(int(a) >= 2 for a in axes)


# ops whose output is non-negative whatever their input; ops that keep their input's sign (an output
# element is an input element, a max / mean / sum of input elements, or a product with non-negative ones)
_NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Exp", "Abs", "HardSigmoid", "Softplus"})
_SIGN_KEEPING_OPS = (
    _IDENTITY_OPS
    | _POOL_OPS
    | frozenset({"GlobalMaxPool", "ReduceMax", "ReduceMin", "Transpose", "Slice", "Gather", "Split", "Tile", "Expand"})
)
_ALL_INPUTS_OPS = frozenset({"Concat", "Add", "Sum", "Mul", "Max", "Min"})


def nonnegative_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors that are ≥ 0 for every input, by the graph alone (no statistics, no data): outputs of
    ``Relu`` / ``Sigmoid`` / ``Softmax`` / ``Clip`` with a lower bound ≥ 0 / ..., and what ops that keep the
    sign (pooling, reshapes, ``Concat`` / ``Add`` / ``Mul`` / ``Max`` of non-negative tensors or constants)
    make of them. Such a tensor can be quantized to uint8 with zero-point 0: all 256 codes cover [0, max]."""
    consts = _Constants(model)
    known: set[str] = set()

    def nonneg(name: str) -> bool:
        if name in known:
            return True
        value = consts.get(name)
        return value is not None and value.size > 0 and bool(np.all(value >= 0))

    for node in model.graph.node:
        op = node.op_type
        data = [name for name in node.input if name]
        if op in _NONNEGATIVE_OPS:
            ok = True
        elif op == "Clip":
            bounds = _clip_bounds(consts, node)
            ok = bounds is not None and (bounds[0] >= 0.0 or (bool(data) and data[0] in known and bounds[1] >= 0.0))
        elif op in _SIGN_KEEPING_OPS:
            ok = bool(data) and data[0] in known  # the other inputs are shapes / indices / pads
        elif op == "Pad":
            pad_value = consts.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
            mode = _attr(node, "mode", b"constant")
            ok = bool(data) and data[0] in known and (mode not in (b"constant", "constant") or (pad_value or 0.0) >= 0)
        elif op in _ALL_INPUTS_OPS:
            ok = bool(data) and all(nonneg(name) for name in data) and any(name in known for name in data)
        else:
            ok = False
        if ok:
            known.update(out for out in node.output if out)
    return known


def propagate_bn_stats(
    model: onnx.ModelProto,
    bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    pool_std_factor: float = DEFAULT_POOL_STD_FACTOR,
    rectified_tails: bool = True,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of every tensor reachable from a BN output, in one pass over the
    (topologically ordered) nodes. ``bn_stats`` maps a (folded) BN output tensor to its (beta, |gamma|).
    ``rectified_tails``: a sum with a ReLU output keeps the unclipped operands' upper tail (:func:`_combine`);
    False: the moments only (the rule before)."""
    known: dict[str, ChannelStats] = {name: ChannelStats.gaussian(m, s) for name, (m, s) in bn_stats.items()}
    consts = _Constants(model)
    producers = {out: node for node in model.graph.node for out in node.output if out}
    for node in model.graph.node:
        if not node.output or node.output[0] in known:
            continue
        stats = _node_stats(consts, node, known, pool_std_factor, producers, rectified_tails)
        if stats is not None:
            known[node.output[0]] = stats
    return known


def stats_range(
    stats: ChannelStats,
    clip: ClipRule = DEFAULT_CLIP,
    n_std: float = DEFAULT_N_STD,
    gains: np.ndarray | None = None,
    levels: int | None = None,
    clip_gains: np.ndarray | None = None,
) -> float:
    """A tensor's quantization range from its channel statistics by ``clip``: ``"nstd"`` the largest over
    channels of ``clip(mean ± n_std·std, lo, hi)``; ``"mse-gauss"`` / ``"mse-laplace"`` the MSE-optimal range
    (:meth:`ChannelStats.mse_range`) with each channel a Gaussian / a Laplace of its mean and std, the
    channels' rounding noise weighted by ``gains`` and their clipping error by ``clip_gains`` (default ``gains``;
    each ignored unless one per channel), on ``levels`` positive codes (None: 255 for a tensor ≥ 0, else 127)."""
    if clip == "nstd":
        return stats.max_abs(n_std)
    if clip in ("mse-gauss", "mse-laplace"):
        weights = gains if gains is not None and np.size(gains) == stats.channels else None
        clip_weights = clip_gains if clip_gains is not None and np.size(clip_gains) == stats.channels else None
        if weights is None:
            clip_weights = None  # both or neither: a clipping weight alone would not be on the noise's scale
        return stats.mse_range("gauss" if clip == "mse-gauss" else "laplace", weights, levels, clip_weights)
    raise ValueError(f"unknown clipping rule {clip!r}; use one of {', '.join(CLIP_RULES)}")


def bn_ranges(
    model: onnx.ModelProto,
    bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tensors: Iterable[str],
    n_std: float = DEFAULT_N_STD,
    *,
    pool_std_factor: float = DEFAULT_POOL_STD_FACTOR,
    clip: ClipRule = DEFAULT_CLIP,
    gains: Mapping[str, np.ndarray] | None = None,
    unsigned: Collection[str] | None = None,
    clip_gains: Mapping[str, np.ndarray] | None = None,
    rectified_tails: bool = True,
) -> dict[str, float]:
    """The range (max |x| kept) of each tensor in ``tensors`` whose statistics are known, by
    :func:`stats_range` (``clip``, ``n_std``, the tensor's channel ``gains`` and ``clip_gains`` when given).
    ``unsigned``: the tensors emitted as uint8 (255 levels); the others get 127 (None: 255 wherever the tensor is
    ≥ 0). Tensors with unknown statistics are left out of the result. ``rectified_tails``: see
    :func:`propagate_bn_stats`."""
    known = propagate_bn_stats(model, bn_stats, pool_std_factor=pool_std_factor, rectified_tails=rectified_tails)
    gains = gains or {}
    clip_gains = clip_gains or {}

    def levels(name: str) -> int | None:
        return None if unsigned is None else (255 if name in unsigned else 127)

    return {
        name: stats_range(known[name], clip, n_std, gains.get(name), levels(name), clip_gains.get(name))
        for name in dict.fromkeys(tensors)
        if name in known
    }
