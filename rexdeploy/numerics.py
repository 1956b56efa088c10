"""REx numerics: quantization, residual expansion, sparse budgets, ensembles and error bounds.

Everything here is plain, vectorized numpy on weight tensors whose axis 0 is the output channel
(Conv ``(C_out, C_in/g, kh, kw)``, Gemm/MatMul stored as ``(C_out, C_in)``). Paper references are to
Yvinec et al., "REx: Data-Free Residual Quantization Error Expansion", NeurIPS 2023.

Quantizer (paper Eq. 1, symmetric, zero-point 0, per output channel)::

    qmax = 2^(b-1) - 1                s_c = max|W_c| / qmax   (s_c = 1 for an all-zero channel)
    Q(W)_c = clip(rint(W_c / s_c), -qmax, qmax)   (int8)      Q^-1(R)_c = s_c * R_c   (float64)

``rint`` rounds half to even (as ONNX QuantizeLinear / TensorRT do); every bound below only needs
``|rint(x) - x| <= 1/2``, which holds for any round-to-nearest.

Residual expansion of order K (Eq. 2-3): ``R^1 = Q(W)``, ``R^k = Q(W - sum_{j<k} Q^-1(R^j))`` with its
own per-channel scale. Sparse expansion (Eq. 12): orders k >= 2 keep only the output channels with
the largest L1 norm of the current residual. See :func:`keep_fraction` for the budget γ.

Float policy: all arithmetic on residuals is float64 (a float32 / float16 weight is upcast inside the
ufuncs, never copied as a whole), so the reconstruction reaches ~1e-16 relative error, far below any
int8 step. Results are deterministic (ties in the channel ranking go to the lowest channel index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rexdeploy.errors import ModelError, PlanError

__all__ = [
    "MAX_BITS",
    "MAX_ORDER",
    "MIN_BITS",
    "ResidualOrder",
    "bound_u",
    "bound_u_ens",
    "check_ensemble_validity",
    "dequantize",
    "ensemble_groups",
    "ensemble_weights",
    "expand_weight",
    "expansion_bound",
    "keep_fraction",
    "kept_channels",
    "layer_gammas",
    "lemma_a1_bound",
    "linear_plus_split",
    "min_first_cluster",
    "network_bound",
    "order_spectral_norms",
    "qmax",
    "quantize",
    "reconstruct",
    "weight_error",
]

MIN_BITS = 2  # ternary {-1, 0, 1}
MAX_BITS = 8  # int8 storage
MAX_ORDER = 64  # far past float64 exactness (int8 reaches it at K ~ 6, ternary at K ~ 50)

_TINY = np.finfo(np.float64).tiny  # below this a scale is subnormal and rint(w / s) may overshoot qmax


# --------------------------------------------------------------------------------------------------
# validation


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _check_bits(bits: object) -> int:
    if not _is_int(bits) or not MIN_BITS <= int(bits) <= MAX_BITS:  # type: ignore[call-overload]
        raise PlanError(
            f"weight bits {bits!r} not supported; use an integer from {MIN_BITS} (ternary {{-1, 0, 1}}) "
            f"to {MAX_BITS} (int8)"
        )
    return int(bits)  # type: ignore[call-overload]


def _check_order(order: object, name: str = "expansion order K") -> int:
    if not _is_int(order) or not 1 <= int(order) <= MAX_ORDER:  # type: ignore[call-overload]
        raise PlanError(f"{name} {order!r} not supported; use an integer from 1 to {MAX_ORDER}")
    return int(order)  # type: ignore[call-overload]


def _check_gamma(gamma: object) -> float | None:
    if gamma is None:
        return None
    if isinstance(gamma, bool | np.bool_) or not isinstance(gamma, int | float | np.integer | np.floating):
        raise PlanError(f"sparsity budget gamma {gamma!r} must be a number >= 0 or None (dense)")
    g = float(gamma)
    if not math.isfinite(g) or g < 0.0:
        raise PlanError(
            f"sparsity budget gamma {gamma!r} must be a finite number >= 0 (extra compute of the orders "
            "k >= 2 relative to one dense order, e.g. 0.5 for +50 %), or None for a dense expansion"
        )
    return g


def _as_2d(w: np.ndarray) -> np.ndarray:
    """``w`` as a ``(C_out, n)`` float array (a view when possible; ints become float64)."""
    a = np.asarray(w)
    if a.ndim < 1:
        raise ModelError(f"a weight needs an output-channel axis 0; got a {a.ndim}-d array")
    if a.dtype.kind not in "fiu":
        raise ModelError(f"weight dtype {a.dtype} is not a real number type")
    if a.dtype.kind in "iu":
        a = a.astype(np.float64)
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


# --------------------------------------------------------------------------------------------------
# the quantizer (Eq. 1)


def qmax(bits: int) -> int:
    """Largest quantized magnitude ``2^(b-1) - 1`` (1 = ternary, 7 = int4, 127 = int8); bits in 2..8."""
    return (1 << (_check_bits(bits) - 1)) - 1


def _channel_amax(w2: np.ndarray) -> np.ndarray:
    """max |w_c| per row, float64, without an |w| temporary; raises ModelError on NaN / inf."""
    if w2.shape[1] == 0:
        return np.zeros(w2.shape[0], dtype=np.float64)
    amax = np.maximum(w2.max(axis=1), -w2.min(axis=1)).astype(np.float64)
    if not np.isfinite(amax).all():
        bad = np.flatnonzero(~np.isfinite(amax))
        raise ModelError(f"weight holds NaN or inf in output channel(s) {bad[:5].tolist()}; REx needs finite weights")
    return amax


def _scale_from_amax(amax: np.ndarray, qm: int) -> np.ndarray:
    scale = amax / float(qm)
    scale[~(scale > 0.0)] = 1.0  # all-zero channel (or amax/qmax underflowing to 0): scale 1, q = 0
    return scale


def _quantize_rows(r: np.ndarray, qm: int, dequant: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize the rows of ``r`` (C, n): ``(q int8, scale float64 (C,), Q^-1(q) float64 or None)``."""
    scale = _scale_from_amax(_channel_amax(r), qm)
    t = np.empty(r.shape, dtype=np.float64)
    np.divide(r, scale[:, None], out=t)  # float32 input is upcast inside the ufunc loop
    np.rint(t, out=t)
    # For a normal float64 scale, |w / s| <= qmax (1 + 3 ulp) < qmax + 1/2, so rint never leaves
    # [-qmax, qmax] and the clip is a no-op; only subnormal scales lose enough precision to overshoot.
    tiny = scale < _TINY
    if tiny.any():
        t[tiny] = np.clip(t[tiny], -qm, qm)
    q = t.astype(np.int8)
    if not dequant:
        return q, scale, None
    np.multiply(t, scale[:, None], out=t)
    return q, scale, t


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization (paper Eq. 1), zero-point 0.

    Returns ``(q, scale)``: ``q`` int8 of ``w.shape`` with ``|q| <= qmax(bits)``; ``scale`` float64
    ``(C_out,)`` with ``scale_c = max|w_c| / qmax`` (1.0 for an all-zero channel, never 0 or NaN).
    Rounding is half to even (``np.rint``). Raises PlanError for bits outside 2..8 and ModelError for
    non-finite weights.
    """
    qm = qmax(bits)
    w2 = _as_2d(w)
    q, scale, _ = _quantize_rows(w2, qm, dequant=False)
    return q.reshape(np.shape(w)), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``Q^-1``: ``scale_c * q_c`` in float64, ``scale`` (C,) broadcast over axis 0 of ``q``."""
    qa = np.asarray(q)
    s = np.asarray(scale, dtype=np.float64)
    return qa.astype(np.float64) * s.reshape(s.shape[0], *([1] * (qa.ndim - 1)))


# --------------------------------------------------------------------------------------------------
# residual expansion (Eq. 2-3) and its sparse form (Eq. 12)


@dataclass(frozen=True, eq=False)
class ResidualOrder:
    """Order ``k`` (1-based) of an expansion: ``values`` int8 ``(len(channels), *w.shape[1:])``,
    ``scale`` float64 ``(len(channels),)``, ``channels`` sorted int64 indices into axis 0 of ``w``
    (all of them for a dense order). Its contribution is ``Q^-1`` of ``values`` on those channels."""

    order: int
    values: np.ndarray
    scale: np.ndarray
    channels: np.ndarray

    @property
    def n_channels(self) -> int:
        """How many output channels this order computes."""
        return int(self.channels.shape[0])

    def dense(self, out_channels: int) -> np.ndarray:
        """Full-shape float64 ``Q^-1(R^k)`` with zeros on the channels this order skips."""
        if self.n_channels and int(self.channels[-1]) >= out_channels:
            raise PlanError(
                f"order {self.order} holds channel {int(self.channels[-1])}, beyond out_channels={out_channels}"
            )
        out = np.zeros((out_channels, *self.values.shape[1:]), dtype=np.float64)
        out[self.channels] = dequantize(self.values, self.scale)
        return out


def keep_fraction(order: int, gamma: float | None, total_order: int) -> float:
    """Fraction of the output channels residual order ``order`` of a ``total_order``-order expansion keeps.

    γ (``gamma``) is the *total* extra compute of the orders 2..K, in units of one dense order
    (paper §3.2: "given a target budget γ of overhead computations, we only expand the γ/(K-1) most
    important neurons"); this is also ``LayerPlan.gamma``: 0.5 = +50 % compute over plain
    quantization. Each order k >= 2 keeps ``min(1, γ / (K - 1))`` of the channels, so γ >= K-1 is the
    dense expansion. Order 1 is always dense (1.0); ``gamma=None`` means dense (1.0) everywhere.
    (Appendix C / Algorithm 1 instead write the per-order fraction as γ and the budget as
    β = (K - 1) γ: their γ is this function's return value.) See :func:`kept_channels` for the count.
    """
    k_total = _check_order(total_order)
    k = _check_order(order, "residual order k")
    if k > k_total:
        raise PlanError(f"residual order k={k} is beyond the expansion order K={k_total}; use 1..{k_total}")
    g = _check_gamma(gamma)
    if k == 1 or g is None:
        return 1.0
    return min(1.0, g / (k_total - 1))


def kept_channels(out_channels: int, gamma: float | None, total_order: int) -> int:
    """Number of channels each sparse order k >= 2 of a layer with ``out_channels`` channels keeps.

    ``round(keep_fraction * C)`` (half up), at least 1 when the fraction is > 0, at most C; 0 for γ = 0.
    """
    c = int(out_channels)
    if c < 0:
        raise PlanError(f"out_channels {out_channels} must be >= 0")
    k_total = _check_order(total_order)
    frac = keep_fraction(2, gamma, k_total) if k_total >= 2 else 1.0
    if frac >= 1.0:
        return c
    if frac <= 0.0 or c == 0:
        return 0
    return min(c, max(1, math.floor(frac * c + 0.5)))


def _top_channels(l1: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the ``n`` largest entries of ``l1``; ties go to the lowest index (O(C))."""
    c = l1.shape[0]
    if n >= c:
        return np.arange(c, dtype=np.int64)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    v = np.partition(l1, c - n)[c - n]  # the n-th largest value
    above = np.flatnonzero(l1 > v)
    ties = np.flatnonzero(l1 == v)[: n - above.shape[0]]
    return np.sort(np.concatenate((above, ties))).astype(np.int64)


def _row_l1(r: np.ndarray) -> np.ndarray:
    return np.abs(r).sum(axis=1)


def expand_weight(w: np.ndarray, bits: int, order: int, gamma: float | None = None) -> list[ResidualOrder]:
    """Residual expansion of ``w`` to order K = ``order`` in ``bits`` bits (paper Eq. 2-3, Eq. 12).

    ``R^1 = Q(W)`` (dense); ``R^k = Q(W - sum_{j<k} Q^-1(R^j))`` with its own per-channel scale. With a
    budget γ (see :func:`keep_fraction`) every order k >= 2 quantizes only the
    :func:`kept_channels` output channels whose *current* float residual ``W - sum_{j<k} Q^-1(R^j)``
    has the largest L1 norm (Eq. 12's importance N^(k); the float residual is used, not its quantized
    image, so that the ranking needs no quantization of the skipped channels); the others contribute
    0 at that order and keep their residual, so a later order may pick them (paper §3.2). Ties go to
    the lowest channel index. ``gamma=None``, or any γ >= K-1, gives the dense expansion exactly.

    The weight may be float16/32/64 (never copied whole; the math is float64). Cost: one quantization
    of the full tensor for order 1, plus ``kept_channels/C`` of one for every sparse order.
    """
    qm = qmax(bits)
    k_total = _check_order(order)
    _check_gamma(gamma)
    shape = tuple(np.shape(w))
    w2 = _as_2d(w)
    c = w2.shape[0]
    tail = shape[1:]
    q, scale, deq = _quantize_rows(w2, qm, dequant=k_total > 1)
    orders = [ResidualOrder(1, q.reshape(shape), scale, np.arange(c, dtype=np.int64))]
    if k_total == 1:
        return orders
    assert deq is not None
    r = np.subtract(w2, deq, out=deq)  # the float64 residual W - Q^-1(R^1), in place of deq
    n_keep = kept_channels(c, gamma, k_total)
    if n_keep >= c:  # dense orders
        for k in range(2, k_total + 1):
            last = k == k_total
            q, scale, deq = _quantize_rows(r, qm, dequant=not last)
            orders.append(ResidualOrder(k, q.reshape(shape), scale, np.arange(c, dtype=np.int64)))
            if deq is not None:
                np.subtract(r, deq, out=r)
        return orders
    l1 = _row_l1(r)  # importance of each channel's residual, updated only where it changes
    for k in range(2, k_total + 1):
        last = k == k_total
        sel = _top_channels(l1, n_keep)
        sub = r[sel]
        q, scale, deq = _quantize_rows(sub, qm, dequant=not last)
        orders.append(ResidualOrder(k, q.reshape((sel.shape[0], *tail)), scale, sel))
        if deq is not None and sel.shape[0]:
            np.subtract(sub, deq, out=sub)
            r[sel] = sub
            l1[sel] = _row_l1(sub)
    return orders


def reconstruct(orders: Sequence[ResidualOrder], shape: tuple[int, ...]) -> np.ndarray:
    """``sum_k Q^-1(R^k)`` as a float64 array of ``shape`` (the weight the expanded layer computes)."""
    out = np.zeros(shape, dtype=np.float64)
    if not shape:
        raise ModelError("reconstruct needs a shape with an output-channel axis 0")
    c = shape[0]
    out2 = out.reshape(c, math.prod(shape[1:]))
    for o in orders:
        n = o.n_channels
        if n == 0:
            continue
        if int(o.channels[-1]) >= c:
            raise PlanError(f"order {o.order} holds channel {int(o.channels[-1])}, beyond shape {shape}")
        contrib = o.values.reshape(n, out2.shape[1]) * o.scale[:, None]
        if n == c:  # channels are sorted and unique: this is every channel
            out2 += contrib
        else:
            out2[o.channels] += contrib
    return out


def weight_error(w: np.ndarray, orders: Sequence[ResidualOrder]) -> dict[str, float]:
    """Error of the expansion against ``w``: ``max_abs``, ``mean_abs``, ``l2`` = ||w - ŵ||_F and
    ``rel_l2`` = ||w - ŵ||_F / ||w||_F (0 for an all-zero w reconstructed exactly)."""
    wa = np.asarray(w, dtype=np.float64)
    err = wa - reconstruct(orders, wa.shape)
    # sum of squares, not np.linalg.norm: its BLAS dot is ~50x slower on 2 busy cores (threads contend)
    l2 = math.sqrt(float(np.square(err).sum()))
    norm = math.sqrt(float(np.square(wa).sum()))
    rel = l2 / norm if norm > 0.0 else (0.0 if l2 == 0.0 else math.inf)
    return {
        "max_abs": float(np.abs(err).max()) if err.size else 0.0,
        "mean_abs": float(np.abs(err).mean()) if err.size else 0.0,
        "l2": l2,
        "rel_l2": rel,
    }


# --------------------------------------------------------------------------------------------------
# per-weight bounds (Lemma A.1 / Eq. 6, and the sparse case that Lemma A.3 / Eq. 13 addresses)


def _rate(bits: int, tight: bool) -> float:
    qm = qmax(bits)
    return 1.0 / (2 * qm) if tight else 1.0 / qm


def lemma_a1_bound(w: np.ndarray, bits: int, order: int, *, tight: bool = False) -> np.ndarray:
    """Per-weight bound of Lemma A.1 (Eq. 6) for the dense expansion of order K:
    ``|w - sum_{k<=K} Q^-1(R^k)| <= (1/qmax)^(K-1) * λ_c / 2``.

    Returned per output channel with shape ``(C, 1, ..., 1)`` (broadcastable against ``w``).

    Interpretation: λ_c is the *order-1* scale ``max|w_c| / qmax`` (the proof's λ, Eq. 8-10, and
    REX_METHOD's s). Read literally with the order-K scale λ^(K) the right-hand side would be too
    small: the error after order K is only bounded by λ^(K)/2. The bound needs no symmetry
    assumption: rounding leaves ``|r| <= λ^(k)/2`` and the next scale is ``max|r|/qmax``, hence
    ``λ^(k+1) <= λ^(k) / (2 qmax)``. ``tight=True`` returns that sharper, equally rigorous rate
    ``(1/(2 qmax))^(K-1) λ_c / 2``; it matters for ternary (qmax = 1), where Eq. 6 does not shrink
    with K at all while the error halves per order. For an all-zero channel the bound is 0.
    """
    k_total = _check_order(order)
    rate = _rate(bits, tight)
    w2 = _as_2d(w)
    lam = _channel_amax(w2) / qmax(bits)
    bound = rate ** (k_total - 1) * lam / 2.0
    return bound.reshape(w2.shape[0], *([1] * (np.ndim(w) - 1)))


def expansion_bound(w: np.ndarray, bits: int, orders: Sequence[ResidualOrder], *, tight: bool = False) -> np.ndarray:
    """Per-weight error bound of a possibly sparse expansion ``orders`` of ``w`` (shape ``(C, 1, ..)``).

    A channel quantized by n_c of the orders (order 1 always, then the sparse orders that picked it)
    is within ``(1/qmax)^(n_c - 1) λ_c / 2`` (``1/(2 qmax)`` with ``tight``), λ_c the order-1 scale:
    Lemma A.1 applied to the orders that touched the channel, since a skipped order leaves its
    residual unchanged. For a dense expansion this is :func:`lemma_a1_bound`. Lemma A.3 (Eq. 13)
    states the sparse case with the norm of the pruned residual; this per-channel form is what its
    proof argues (a skipped channel keeps the bound of its previous order) and is computable from
    the expansion alone.
    """
    rate = _rate(bits, tight)
    w2 = _as_2d(w)
    c = w2.shape[0]
    if not orders or orders[0].n_channels != c:
        raise PlanError("expansion_bound needs the orders of this weight, starting with the dense order 1")
    counts = np.zeros(c, dtype=np.int64)
    for o in orders:
        counts[o.channels] += 1
    lam = _channel_amax(w2) / qmax(bits)
    bound = np.power(rate, counts - 1) * lam / 2.0
    return bound.reshape(c, *([1] * (np.ndim(w) - 1)))


# --------------------------------------------------------------------------------------------------
# budget split across layers (Appendix D, Eq. 30)


def _check_sizes(sizes: Sequence[int]) -> np.ndarray:
    s = np.asarray(list(sizes), dtype=np.float64)
    if s.ndim != 1 or s.shape[0] == 0:
        raise PlanError("linear+ needs the sizes |W_l| of at least one layer")
    if not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s != np.floor(s)):
        raise PlanError(f"layer sizes must be positive integers (parameter counts |W_l|); got {list(sizes)[:8]}")
    return s


def linear_plus_split(gamma: float, sizes: Sequence[int]) -> np.ndarray:
    """Per-layer fractions γ^l of the linear ascending ("linear+") split, paper Appendix D, Eq. 30.

    ``gamma`` here is a *fraction* in [0, 1] of the network's weights (Eq. 30's γ, as in Table 6's
    ``R^(2)_50%``): with REx's total budget γ_tot over K orders (:func:`keep_fraction` semantics) pass
    the per-order fraction ``γ_tot / (K - 1)`` (capped at 1) and multiply the result by K - 1 to get
    each layer's γ_tot; :func:`layer_gammas` does both. Returns float64 ``(L,)``, layer l = 1..L with
    ``|W_l| = sizes[l-1]``, non-decreasing in l, in [0, 1], and always conserving the budget:
    ``sum_l |W_l| γ^l = γ sum_l |W_l|``.

    Eq. 30: ``γ^l = clip_0^1(a l + γ^1)`` with ``γ^1 = 1 - a L``, i.e. ``γ^l = clip(1 - a (L - l))``,
    the last layer fully kept. The printed ``a = (1-γ) Σ|W_l| / (Σ l|W_l| - Σ|W_l|)`` does not meet
    the budget constraint it is derived from unless ``Σ l|W_l| - Σ|W_l| = Σ (L - l)|W_l|`` (e.g. sizes
    (1, 2), γ = 0.5: printed a = 1/2 spends 2/3, not 1/2), so ``a`` solves that constraint instead:
    ``a = (1-γ) Σ|W_l| / Σ (L-l)|W_l|`` when no layer clips at 0, and in general the unique root of
    the piecewise-linear ``Σ |W_l| max(0, 1 - a (L - l)) = γ Σ|W_l|``.

    Degenerate cases: L = 1 -> ``[γ]`` (the slope is undefined); γ = 1 -> all ones; γ = 0 -> all
    zeros; a budget too small to keep even the last layer whole (γ Σ|W| < |W_L|) -> zeros except
    ``γ^L = γ Σ|W| / |W_L|``. γ outside [0, 1] raises PlanError.
    """
    g = _check_gamma(gamma)
    if g is None or g > 1.0:
        raise PlanError(
            f"linear+ takes a fraction gamma in [0, 1] (Eq. 30); got {gamma!r}. For a total budget γ over "
            "K orders pass min(1, γ/(K-1)), or use layer_gammas()"
        )
    s = _check_sizes(sizes)
    n_layers = s.shape[0]
    if n_layers == 1 or g == 1.0 or g == 0.0:
        return np.full(n_layers, g, dtype=np.float64)
    total = float(s.sum())
    target = g * total
    d = (n_layers - np.arange(1, n_layers + 1)).astype(np.float64)  # L - l: L-1 .. 0
    if target <= s[-1]:
        out = np.zeros(n_layers, dtype=np.float64)
        out[-1] = target / s[-1]
        return out
    # f(a) = sum_l |W_l| max(0, 1 - a d_l) is continuous, strictly decreasing on [0, 1] and linear
    # between the breakpoints a = 1/d; evaluate it there and interpolate (exact on each segment).
    a_pts = np.concatenate(([0.0], 1.0 / d[d > 0]))  # 0 < 1/(L-1) < ... < 1/1
    f_pts = (np.maximum(0.0, 1.0 - a_pts[:, None] * d[None, :]) * s[None, :]).sum(axis=1)
    a = float(np.interp(target, f_pts[::-1], a_pts[::-1]))
    closed = (total - target) / float((d * s).sum())
    if 1.0 - closed * d[0] >= 0.0:  # no clipping: the closed form, exact to rounding
        a = closed
    return np.clip(1.0 - a * d, 0.0, 1.0)


def layer_gammas(gamma: float, sizes: Sequence[int], total_order: int) -> list[float]:
    """Per-layer budgets γ_l (``expand_weight`` / ``LayerPlan.gamma`` semantics) of a network-wide
    budget γ split linear+ (Eq. 30) over layers of sizes ``|W_l|``, for K = ``total_order`` orders.

    The per-order fraction ``min(1, γ/(K-1))`` is split with :func:`linear_plus_split` and scaled
    back by K - 1, so ``Σ |W_l| γ_l = min(γ, K-1) Σ |W_l|``. For K = 1 there is no order to spend a
    budget on and every γ_l is 0.0.
    """
    k_total = _check_order(total_order)
    s = _check_sizes(sizes)
    g = _check_gamma(gamma)
    if g is None:
        raise PlanError("layer_gammas needs a numeric budget gamma; None means dense everywhere")
    if k_total == 1:
        return [0.0] * s.shape[0]
    frac = keep_fraction(2, g, k_total)
    return [float(x) * (k_total - 1) for x in linear_plus_split(frac, sizes)]


# --------------------------------------------------------------------------------------------------
# ensembles (§3.3, Appendix E, Algorithm 1)


def _check_split(split: Sequence[int]) -> list[int]:
    parts = list(split)
    if not parts or not all(_is_int(k) and int(k) >= 1 for k in parts):
        raise PlanError(
            f"ensemble split {parts!r} must be a non-empty list of positive integers K_1..K_M "
            "(the number of orders per predictor)"
        )
    return [int(k) for k in parts]


def ensemble_groups(order: int, split: Sequence[int]) -> list[list[int]]:
    """The orders each predictor holds: predictor m gets ``sum(split[:m])+1 .. sum(split[:m+1])``
    (Algorithm 1; 1-based orders). ``split`` must be positive and sum to K = ``order``."""
    k_total = _check_order(order)
    parts = _check_split(split)
    if sum(parts) != k_total:
        raise PlanError(
            f"ensemble split {','.join(map(str, parts))} sums to {sum(parts)}, not to the expansion "
            f"order K={k_total}; the predictors must share the K orders, e.g. {k_total} or 1,{k_total - 1}"
            if k_total > 1
            else f"ensemble split {','.join(map(str, parts))} must sum to K=1: use 1"
        )
    ends = np.cumsum(parts)
    return [list(range(int(e) - p + 1, int(e) + 1)) for e, p in zip(ends, parts, strict=True)]


def min_first_cluster(bits: int) -> int:
    """Smallest K_1 this module accepts for an ensemble of M > 1 predictors at ``bits`` bits.

    The paper (Appendix B after Cor. B.5, and §3.3) only says: K_1 = 1 works from 4 bits up, ternary
    needs K_1 from 3 to 6 depending on the network. We make that a rule: the first predictor must be
    at least as close to W as one int4 order, i.e. its error rate ``(1/(2 qmax))^K_1`` (Lemma A.1,
    sharp form) must reach int4's ``1/14``. That gives ternary 4, int3 2, int4..int8 1.
    """
    qm = qmax(bits)
    ref = 2 * qmax(4)
    k = 1
    while (2 * qm) ** k < ref:
        k += 1
    return k


def check_ensemble_validity(bits: int, split: Sequence[int]) -> None:
    """Raise PlanError if an ensemble ``split`` (K_1..K_M) is not valid at ``bits`` bits.

    One predictor is always valid. With M > 1 the first predictor needs K_1 >= min_first_cluster(bits)
    orders (ternary 4, int3 2, int4 and up 1), so that the later predictors only carry small residual
    signals and ``σ(x + ε) ≈ σ(x) + σ(ε)`` (Eq. 5) holds.
    """
    b = _check_bits(bits)
    parts = _check_split(split)
    if len(parts) == 1:
        return
    need = min_first_cluster(b)
    if parts[0] < need:
        name = "ternary" if b == 2 else f"int{b}"
        raise PlanError(
            f"ensemble split {','.join(map(str, parts))} is not valid for {name} weights: with M = "
            f"{len(parts)} > 1 predictors the first one must hold K_1 >= {need} orders (paper §3.3 / App. B: "
            f"K_1 = 1 suffices from int4 up, ternary needs K_1 >= 4), got K_1 = {parts[0]}; use e.g. "
            f"{need},{max(1, sum(parts) - need)} or a single predictor"
        )


def ensemble_weights(orders: Sequence[ResidualOrder], split: Sequence[int], shape: tuple[int, ...]) -> list[np.ndarray]:
    """Float64 weight of each predictor: the dense sum of the orders of its group
    (:func:`ensemble_groups`). Their sum is :func:`reconstruct` of all orders (to rounding)."""
    k_total = len(orders)
    if [o.order for o in orders] != list(range(1, k_total + 1)):
        raise PlanError("ensemble_weights needs the orders 1..K of one expansion, in order")
    groups = ensemble_groups(k_total, split)
    return [reconstruct(orders[g[0] - 1 : g[-1]], shape) for g in groups]


# --------------------------------------------------------------------------------------------------
# network bounds (Eq. 4 / Theorem B.1 Eq. 15, Theorem B.2 Eq. 19, Theorem B.3 Eq. 20)


def bound_u(spectral_norms: Sequence[float] | np.ndarray, u: Sequence[float] | np.ndarray) -> float:
    """Eq. 4 / Eq. 15 as printed: ``U_res = prod_l (sum_{i<=l} s_i u_i + 1) - 1``.

    ``s_i`` is layer i's spectral norm and ``u_i`` its error term, 1 <= i <= L. Computed as
    ``expm1(sum log1p(cumsum(s u)))`` so that tiny errors (int8, K = 4: ~1e-7) keep full precision.
    What to pass for the bound to be rigorous: see :func:`network_bound`.
    """
    s = np.asarray(spectral_norms, dtype=np.float64).ravel()
    uu = np.asarray(u, dtype=np.float64).ravel()
    if s.shape != uu.shape:
        raise PlanError(f"bound_u needs one u per layer: {s.shape[0]} spectral norms, {uu.shape[0]} u terms")
    a = s * uu
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise PlanError("bound_u needs finite, non-negative spectral norms and error terms")
    return float(np.expm1(np.log1p(np.cumsum(a)).sum()))


def bound_u_ens(order_norms: Sequence[Sequence[float]] | np.ndarray, split: Sequence[int]) -> float:
    """Eq. 20 (Theorem B.3): approximate *expected* output gap between an expanded network and its
    ensemble of M predictors K_1..K_M = ``split``.

    ``order_norms[l][k-1]`` is ``||Q^-1(R_l^(k))||_2`` (spectral norm of order k of layer l, see
    :func:`order_spectral_norms`), layers l = 1..L in order. We compute

        U_ens = (sum_{k=1}^{K} ||R_L^(k)||) / 2^(L-1)
                * sum_{m=2}^{M} prod_{l=1}^{L-1} sum_{k in G_m} ||R_l^(k)||

    Interpretation of the printed formula: (i) its leading ``1 +`` inside the bracket would make
    U_ens non-zero for a single predictor and independent of the split; the two-layer case it
    generalizes (Cor. B.5, Eq. 24) and Eq. 28 have no such term, so we drop it (M = 1 -> 0); (ii) the
    product's ``R_L`` is read as ``R_l`` (layer l, as in Eq. 28); (iii) the last layer sums all K
    orders as in Eq. 24 / Eq. 28 (Eq. 20 writes K_1; the two differ by the small higher orders, ours is
    the larger); (iv) the activation scales λ_h̃ are 1: weights are dequantized and the bound is on
    float activations. A linear network (L = 1) is split exactly: 0. The 1/2 per layer is the
    paper's P(ReLU inactive) ≈ 1/2 (symmetric pre-activations): an estimate, not a worst case.
    """
    n = np.asarray(order_norms, dtype=np.float64)
    if n.ndim != 2 or n.shape[0] == 0:
        raise PlanError("bound_u_ens needs order_norms as L rows of K spectral norms (one per order)")
    n_layers, k_total = n.shape
    groups = ensemble_groups(k_total, split)
    if len(groups) == 1 or n_layers == 1:
        return 0.0
    starts = np.asarray([g[0] - 1 for g in groups])
    per_group = np.add.reduceat(n, starts, axis=1)  # (L, M): sum over each predictor's orders
    lead = float(n[-1].sum()) / 2.0 ** (n_layers - 1)
    return lead * float(np.prod(per_group[:-1, 1:], axis=0).sum())


def order_spectral_norms(orders: Sequence[ResidualOrder]) -> np.ndarray:
    """``||Q^-1(R^k)||_2`` for each order (channels an order skips are zero rows: no effect)."""
    out = np.zeros(len(orders), dtype=np.float64)
    for i, o in enumerate(orders):
        if o.n_channels:
            m = o.values.reshape(o.n_channels, -1) * o.scale[:, None]
            out[i] = float(np.linalg.norm(m, 2)) if m.shape[1] else 0.0
    return out


def _spectral(w: np.ndarray) -> float:
    m = np.asarray(w, dtype=np.float64)
    m = m.reshape(m.shape[0], -1)
    return float(np.linalg.norm(m, 2)) if m.size else 0.0


def network_bound(
    weights: Sequence[np.ndarray],
    bits: int,
    order: int,
    gamma: float | Sequence[float | None] | None = None,
    split: Sequence[int] | None = None,
    *,
    bias_norms: Sequence[float] | None = None,
    tight: bool = False,
) -> float:
    """Bound on ``max_{||x||_2 = 1} ||F(x) - F^(K)(x)||_inf`` for a sequential network
    ``F(x) = W_L σ(... σ(W_1 x + b_1) ...) + b_L`` expanded at ``bits`` / K = ``order`` / ``gamma``
    (one γ or one per layer), σ 1-Lipschitz with σ(0) = 0 (ReLU, as in Theorem B.1). Conv weights are
    reshaped to (C_out, -1), i.e. treated as the per-patch matrix (the operator norm of a strided conv
    over a whole feature map can be larger by up to sqrt(kh kw)); a loop over layers.

    Interpretation of Eq. 15 (U = prod_l (sum_{i<=l} s_i u_i + 1) - 1, s_i the spectral norm, u_i the
    Eq. 6 per-weight bound): taken literally the product mixes a per-weight bound with a matrix norm
    and omits the network's own gain, so it is not a bound in general (two layers with s = 3 break
    it). We use it in the form its proof (Eq. 16-18) supports: with ``e_l`` an upper bound on the
    spectral norm of layer l's weight error and ``ε_l = e_l / s_l``,

        U = (prod_l s_l) * bound_u(1, ε) = (prod_l s_l) * (prod_l (1 + sum_{i<=l} ε_i) - 1),

    i.e. Eq. 15 on the network rescaled to unit spectral norms. It dominates the exact recursion
    ``δ_l <= (s_l + e_l) δ_{l-1} + e_l prod_{i<l} s_i`` (so it is rigorous) and keeps the paper's
    shape. ``e_l = sqrt(n_in * sum_c β_c^2)``, the Frobenius norm of the per-weight bound β_c
    (:func:`lemma_a1_bound`, Eq. 6, or :func:`expansion_bound` when sparse, Eq. 13), a data-free
    a-priori bound; ``tight=True`` uses the sharper rate 1/(2 qmax). With ``bias_norms`` (||b_l||_2;
    REx keeps biases in float) the exact recursion with ``||h_l|| <= s_l ||h_{l-1}|| + ||b_l||`` is
    returned instead. With an ensemble ``split`` (M > 1) :func:`bound_u_ens` (Eq. 20, an estimate
    of the expected extra gap, not a worst case) is added.
    """
    k_total = _check_order(order)
    b = _check_bits(bits)
    n_layers = len(weights)
    if n_layers == 0:
        return 0.0
    if gamma is None or isinstance(gamma, int | float | np.integer | np.floating):
        gammas: list[float | None] = [None if gamma is None else float(gamma)] * n_layers
    else:
        gammas = [None if g is None else float(g) for g in gamma]
        if len(gammas) != n_layers:
            raise PlanError(f"network_bound got {len(gammas)} per-layer gammas for {n_layers} layers")
    parts = _check_split(split) if split is not None else [k_total]
    ensemble_groups(k_total, parts)
    s = np.zeros(n_layers, dtype=np.float64)
    e = np.zeros(n_layers, dtype=np.float64)
    norms = np.zeros((n_layers, k_total), dtype=np.float64)
    for i, (w, g) in enumerate(zip(weights, gammas, strict=True)):
        w2 = _as_2d(w)
        s[i] = _spectral(w2)
        need_orders = len(parts) > 1 or kept_channels(w2.shape[0], g, k_total) < w2.shape[0]
        orders = expand_weight(w2, b, k_total, g) if need_orders else []
        beta = expansion_bound(w2, b, orders, tight=tight) if orders else lemma_a1_bound(w2, b, k_total, tight=tight)
        e[i] = math.sqrt(w2.shape[1] * float(np.square(beta).sum()))
        if len(parts) > 1:
            norms[i] = order_spectral_norms(orders)
    if bias_norms is None:
        if np.any(s == 0.0):
            u_res = 0.0  # a zero layer quantizes exactly to zero: both networks are 0 after it
        else:
            gain = float(np.exp(np.log(s).sum()))
            u_res = gain * bound_u(np.ones(n_layers), e / s)
    else:
        bn = np.asarray(list(bias_norms), dtype=np.float64)
        if bn.shape != (n_layers,) or np.any(bn < 0) or not np.all(np.isfinite(bn)):
            raise PlanError(f"bias_norms needs one finite ||b_l|| >= 0 per layer ({n_layers})")
        delta, h = 0.0, 1.0
        for i in range(n_layers):
            delta = (s[i] + e[i]) * delta + e[i] * h
            h = s[i] * h + bn[i]
        u_res = delta
    if len(parts) > 1:
        u_res += bound_u_ens(norms, parts)
    return float(u_res)
