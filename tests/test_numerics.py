"""Property tests of rexdeploy.numerics (quantizer, residual expansion, budgets, ensembles, bounds)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import rex_orders

from rexdeploy.errors import ModelError, PlanError
from rexdeploy.numerics import (
    ResidualOrder,
    bound_u,
    bound_u_ens,
    check_ensemble_validity,
    dequantize,
    ensemble_groups,
    ensemble_weights,
    expand_weight,
    expansion_bound,
    keep_fraction,
    kept_channels,
    layer_gammas,
    lemma_a1_bound,
    linear_plus_split,
    min_first_cluster,
    network_bound,
    order_spectral_norms,
    qmax,
    quantize,
    reconstruct,
    weight_error,
)

EPS = np.finfo(np.float64).eps
FAST = settings(max_examples=40, deadline=None)
BITS = st.integers(2, 8)


def gaussian_weight(seed: int, c: int, n: int, zero_channels: bool = True) -> np.ndarray:
    """Random (c, n) float32 weight with per-channel magnitudes over 4 decades, some channels all zero."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, n)) * 10.0 ** rng.uniform(-3, 1, size=(c, 1))
    if zero_channels and c > 2:
        w[rng.integers(0, c, size=c // 4)] = 0.0
    return w.astype(np.float32)


def float_tol(w: np.ndarray, k: int) -> np.ndarray:
    """Rounding slack of a K-order float64 reconstruction, per channel (broadcastable)."""
    w2 = np.abs(np.asarray(w, dtype=np.float64)).reshape(w.shape[0], -1)
    return (8 * (k + 1) * EPS * w2.max(axis=1)).reshape(w.shape[0], *([1] * (w.ndim - 1)))


weights_st = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
)


# ---------------------------------------------------------------------------------------------- qmax / quantize


def test_qmax_values_and_bad_bits() -> None:
    assert [qmax(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]
    for bad in (1, 9, 0, -3, 2.0, True, "8"):
        with pytest.raises(PlanError, match=r"use an integer from 2 .* to 8"):
            qmax(bad)  # type: ignore[arg-type]
    w = np.ones((2, 3))
    for bad_bits in (1, 9):
        with pytest.raises(PlanError, match="weight bits"):
            quantize(w, bad_bits)
        with pytest.raises(PlanError, match="weight bits"):
            expand_weight(w, bad_bits, 2)


@FAST
@given(w=weights_st, bits=BITS)
def test_quantize_matches_definition(w: np.ndarray, bits: int) -> None:
    qm = qmax(bits)
    q, scale = quantize(w, bits)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float64 and scale.shape == (w.shape[0],)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    w2 = w.reshape(w.shape[0], -1)
    amax = np.abs(w2).max(axis=1)
    nz = amax > 0
    np.testing.assert_array_equal(scale[nz], amax[nz] / qm)
    np.testing.assert_array_equal(scale[~nz], 1.0)
    ref = np.clip(np.rint(w2 / scale[:, None]), -qm, qm)  # brute force: the documented definition
    np.testing.assert_array_equal(q.reshape(ref.shape), ref)
    assert np.abs(q).max(initial=0) <= qm
    # the channel maximum lands on ±qmax; an all-zero channel quantizes to 0
    np.testing.assert_array_equal(np.abs(q.reshape(ref.shape)).max(axis=1)[nz], qm)
    assert not q.reshape(ref.shape)[~nz].any()
    # Q^-1(Q(w)) is within half a step
    err = np.abs(dequantize(q, scale) - w).reshape(ref.shape)
    assert np.all(err <= scale[:, None] / 2 * (1 + 4 * EPS))


def test_value_ranges_and_zero_channels() -> None:
    w = gaussian_weight(3, 32, 50)
    w[5] = 0.0
    for bits, lo, hi in ((2, -1, 1), (4, -7, 7), (8, -127, 127)):
        for o in expand_weight(w, bits, 5):
            assert o.values.dtype == np.int8
            assert lo <= o.values.min() and o.values.max() <= hi
            assert np.all(np.isfinite(o.scale)) and np.all(o.scale > 0)
    assert set(np.unique(quantize(w, 2)[0])) <= {-1, 0, 1}
    zero = np.zeros((4, 3, 3, 3), dtype=np.float32)
    orders = expand_weight(zero, 4, 3, 0.5)
    assert all(np.all(o.scale == 1.0) and not o.values.any() for o in orders)
    rec = reconstruct(orders, zero.shape)
    assert np.all(rec == 0.0)
    err = weight_error(zero, orders)
    assert err == {"max_abs": 0.0, "mean_abs": 0.0, "l2": 0.0, "rel_l2": 0.0}


def test_non_finite_weights_rejected() -> None:
    w = np.ones((3, 4))
    w[1, 2] = np.nan
    with pytest.raises(ModelError, match="NaN or inf"):
        quantize(w, 8)
    w[1, 2] = np.inf
    with pytest.raises(ModelError, match=r"channel\(s\) \[1\]"):
        expand_weight(w, 4, 2)


# ---------------------------------------------------------------------------------------------- expansion


@FAST
@given(seed=st.integers(0, 2**31), bits=BITS, c=st.integers(1, 24), n=st.integers(1, 80))
def test_lemma_a1_holds_at_every_order(seed: int, bits: int, c: int, n: int) -> None:
    w = gaussian_weight(seed, c, n)
    qm = qmax(bits)
    k_max = 6 if bits >= 5 else 10  # stay above the float64 floor of the bound
    full = expand_weight(w, bits, k_max)
    for k in range(1, k_max + 1):
        prefix = expand_weight(w, bits, k)
        for a, b in zip(prefix, full[:k], strict=True):  # an order-k expansion is a prefix of order K
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.scale, b.scale)
        err = np.abs(w.astype(np.float64) - reconstruct(prefix, w.shape))
        tol = float_tol(w, k)
        assert np.all(err <= lemma_a1_bound(w, bits, k) + tol)  # Eq. 6
        assert np.all(err <= lemma_a1_bound(w, bits, k, tight=True) + tol)  # (1/(2 qmax))^(K-1)
        # Eq. 6 by hand: (1/qmax)^(K-1) · s_c / 2 with the order-1 scale s_c = max|w_c| / qmax. The two
        # functions compute the power differently (np.power on counts vs **), which may differ by an ulp
        want = (1.0 / qm) ** (k - 1) * np.abs(w.astype(np.float64)).max(axis=1, keepdims=True) / qm / 2.0
        np.testing.assert_allclose(lemma_a1_bound(w, bits, k), want, rtol=1e-13, atol=0.0)
        np.testing.assert_allclose(expansion_bound(w, bits, prefix), want, rtol=1e-13, atol=0.0)


@FAST
@given(
    seed=st.integers(0, 2**31),
    bits=BITS,
    order=st.integers(1, 5),
    c=st.integers(1, 24),
    n=st.integers(1, 40),
    gamma=st.sampled_from([None, 0.0, 0.3, 1.0, 2.5]),
)
def test_expansion_matches_its_definition(
    seed: int, bits: int, order: int, c: int, n: int, gamma: float | None
) -> None:
    """Every order Q^-1(R^k), dense or sparse, equals tests/reference.py's plain-numpy reading of REX_METHOD.md."""
    w = gaussian_weight(seed, c, n)
    got = expand_weight(w, bits, order, gamma)
    want = rex_orders(w, bits, order, gamma)
    assert [o.order for o in got] == list(range(1, order + 1))
    tol = 1e-12 * max(float(np.abs(w).max()), 1e-30)
    for o, ref in zip(got, want, strict=True):
        np.testing.assert_allclose(o.dense(c), ref, rtol=0.0, atol=tol)
        # the channels an order holds are the ones the definition quantizes (a kept all-zero residual included)
        assert o.n_channels == (c if o.order == 1 or gamma is None else kept_channels(c, gamma, order))
        assert set(np.flatnonzero(np.abs(ref).sum(axis=1))) <= set(o.channels.tolist())
    np.testing.assert_allclose(reconstruct(got, w.shape), np.sum(want, axis=0), rtol=0.0, atol=tol)


@FAST
@given(seed=st.integers(0, 2**31), bits=BITS, gamma=st.sampled_from([None, 0.0, 0.3, 1.0, 2.5]))
def test_error_never_increases_with_order(seed: int, bits: int, gamma: float | None) -> None:
    w = gaussian_weight(seed, 16, 40)
    k_max = 5
    orders = expand_weight(w, bits, k_max, gamma)
    w64 = w.astype(np.float64)
    prev = np.abs(w64 - reconstruct(orders[:1], w.shape))
    prev_stats = weight_error(w, orders[:1])
    for k in range(2, k_max + 1):
        cur = np.abs(w64 - reconstruct(orders[:k], w.shape))
        assert np.all(cur <= prev + float_tol(w, k))  # element-wise, hence max and L2 too
        stats = weight_error(w, orders[:k])
        assert stats["max_abs"] <= prev_stats["max_abs"] * (1 + 1e-12)
        assert stats["l2"] <= prev_stats["l2"] * (1 + 1e-12)
        prev, prev_stats = cur, stats
    # sparse bound (the channel-count form of Lemma A.3) holds as well
    err = np.abs(w64 - reconstruct(orders, w.shape))
    assert np.all(err <= expansion_bound(w, bits, orders) + float_tol(w, k_max))
    assert np.all(err <= expansion_bound(w, bits, orders, tight=True) + float_tol(w, k_max))


@FAST
@given(seed=st.integers(0, 2**31), bits=st.integers(3, 8))
def test_error_shrinks_by_about_qmax_per_order(seed: int, bits: int) -> None:
    qm = qmax(bits)
    w = gaussian_weight(seed, 12, 256, zero_channels=False)
    k_max = 4
    orders = expand_weight(w, bits, k_max)
    w64 = w.astype(np.float64)
    errs = [np.abs(w64 - reconstruct(orders[:k], w.shape)) for k in range(1, k_max + 1)]
    for k in range(1, k_max):
        # per channel, the worst error shrinks by at least 2 qmax (Lemma A.1, sharp form) ...
        slack = float_tol(w, k + 1).ravel()  # rounding of w - ŵ, absolute
        assert np.all(errs[k].max(axis=1) <= errs[k - 1].max(axis=1) / (2 * qm) + slack)
        # ... and on gaussian weights the L2 error by roughly that much: between qmax and 4 qmax
        ratio = np.linalg.norm(errs[k - 1]) / np.linalg.norm(errs[k])
        assert qm <= ratio <= 4 * qm, (k, ratio)


def test_near_exact_reconstruction_at_large_order() -> None:
    w = gaussian_weight(7, 64, 288, zero_channels=False)
    assert weight_error(w, expand_weight(w, 8, 1))["rel_l2"] > 1e-3
    # int8 shrinks ~254x per order: K=4 ~ 4e-10 (paper Table 4's regime), K=6 reaches float64 precision
    assert weight_error(w, expand_weight(w, 8, 4))["rel_l2"] < 1e-9
    assert weight_error(w, expand_weight(w, 8, 6))["rel_l2"] < 1e-13
    # ternary only halves the error per order: far from exact at K=6, exact-ish near K=50
    assert weight_error(w, expand_weight(w, 2, 6))["rel_l2"] > 1e-3
    assert weight_error(w, expand_weight(w, 2, 50))["rel_l2"] < 1e-13


# ---------------------------------------------------------------------------------------------- sparse


def test_keep_fraction_and_kept_channels() -> None:
    assert keep_fraction(1, 0.5, 4) == 1.0
    assert keep_fraction(2, None, 4) == 1.0
    assert keep_fraction(3, 0.5, 4) == pytest.approx(0.5 / 3)
    assert keep_fraction(2, 7.0, 4) == 1.0  # γ >= K-1: dense
    assert kept_channels(64, 0.5, 4) == 11  # round(64/6 = 10.67)
    assert kept_channels(64, 0.0, 4) == 0
    assert kept_channels(64, 1e-9, 4) == 1  # at least one when the fraction is > 0
    assert kept_channels(64, 3.0, 4) == 64
    assert kept_channels(64, 0.5, 1) == 64
    with pytest.raises(PlanError, match=">= 0"):
        keep_fraction(2, -0.1, 3)
    with pytest.raises(PlanError, match="beyond the expansion order"):
        keep_fraction(4, 0.5, 3)
    with pytest.raises(PlanError, match="expansion order K"):
        expand_weight(np.ones((2, 2)), 4, 0)
    with pytest.raises(PlanError, match="gamma"):
        expand_weight(np.ones((2, 2)), 4, 2, float("nan"))


@FAST
@given(seed=st.integers(0, 2**31), bits=BITS, k=st.integers(2, 5), c=st.integers(1, 40))
def test_full_keep_fraction_equals_dense_exactly(seed: int, bits: int, k: int, c: int) -> None:
    w = gaussian_weight(seed, c, 9).reshape(c, 1, 3, 3)
    dense = expand_weight(w, bits, k)
    # γ >= K-1, and a γ whose rounded channel count is already C, are the dense expansion bit for bit
    for gamma in (float(k - 1), k + 3.5, (k - 1) * (1 - 0.49 / c)):
        assert kept_channels(c, gamma, k) == c
        sparse = expand_weight(w, bits, k, gamma)
        for a, b in zip(dense, sparse, strict=True):
            assert a.order == b.order
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.scale, b.scale)
            np.testing.assert_array_equal(a.channels, b.channels)


def reference_sparse(
    w: np.ndarray, orders: list[ResidualOrder], n_keep: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Brute force: at every order k >= 2 rank the channels of the current residual by L1 norm.
    Returns the channels each order k >= 2 must keep and the residual it must quantize."""
    c = w.shape[0]
    r = np.asarray(w, dtype=np.float64).reshape(c, -1).copy()
    chosen, residuals = [], []
    for o in orders:
        if o.order >= 2:
            l1 = np.abs(r).sum(axis=1)
            ranked = sorted(range(c), key=lambda i: (-l1[i], i))  # ties: lowest channel first
            chosen.append(np.array(sorted(ranked[:n_keep]), dtype=np.int64))
            residuals.append(r.copy())
        r -= o.dense(c).reshape(c, -1)
    return chosen, residuals


@FAST
@given(
    seed=st.integers(0, 2**31),
    bits=BITS,
    k=st.integers(2, 6),
    c=st.integers(2, 48),
    gamma=st.floats(0.05, 2.0),
    duplicate=st.booleans(),
)
def test_sparse_selects_top_l1_channels(seed: int, bits: int, k: int, c: int, gamma: float, duplicate: bool) -> None:
    w = gaussian_weight(seed, c, 12)
    if duplicate:  # exact ties in the ranking
        w[c // 2 :] = w[: c - c // 2]
    orders = expand_weight(w, bits, k, gamma)
    n_keep = kept_channels(c, gamma, k)
    assert orders[0].n_channels == c
    for o in orders[1:]:
        assert o.n_channels == n_keep
        assert o.values.shape == (n_keep, 12) and o.scale.shape == (n_keep,)
        assert o.channels.dtype == np.int64 and np.all(np.diff(o.channels) > 0)
    chosen, residuals = reference_sparse(w, orders, n_keep)
    for o, want, resid in zip(orders[1:], chosen, residuals, strict=True):
        np.testing.assert_array_equal(o.channels, want)
        # and the kept order is the quantized residual of those channels (Eq. 3 restricted, Eq. 12)
        q, s = quantize(resid[want], bits)
        np.testing.assert_array_equal(o.values, q)
        np.testing.assert_array_equal(o.scale, s)
    # the ranking is what the reconstruction implies, up to rounding (a check independent of the above)
    w64 = w.astype(np.float64)
    for i, o in enumerate(orders[1:], start=1):
        l1 = np.abs(w64 - reconstruct(orders[:i], w.shape)).sum(axis=1)
        rest = np.setdiff1d(np.arange(c), o.channels)
        if rest.size and o.n_channels:
            assert l1[o.channels].min() >= l1[rest].max() - 1e-9 * np.abs(w64).sum(axis=1).max()


def test_sparse_later_orders_revisit_skipped_channels() -> None:
    w = np.zeros((4, 8))
    w[0] = np.linspace(-1, 1, 8) * 1.001
    w[1] = np.linspace(-1, 1, 8) * 0.5 + 0.013  # off-grid: large residual
    w[2] = np.linspace(-1, 1, 8) * 0.3 + 0.007
    w[3] = np.linspace(-1, 1, 8) * 0.1 + 0.002
    orders = expand_weight(w, 3, 4, gamma=0.75)  # one channel (of 4) per order
    picked = [int(o.channels[0]) for o in orders[1:]]
    assert all(o.n_channels == 1 for o in orders[1:])
    assert len(set(picked)) > 1  # a later order picked a channel an earlier one skipped


# ---------------------------------------------------------------------------------------------- budgets


@FAST
@given(
    sizes=st.lists(st.integers(1, 10**6), min_size=1, max_size=40),
    gamma=st.floats(0.0, 1.0),
)
def test_linear_plus_split_properties(sizes: list[int], gamma: float) -> None:
    g = linear_plus_split(gamma, sizes)
    s = np.asarray(sizes, dtype=np.float64)
    assert g.shape == (len(sizes),) and g.dtype == np.float64
    assert np.all(g >= 0.0) and np.all(g <= 1.0)
    assert np.all(np.diff(g) >= -1e-12)  # linear ascending
    np.testing.assert_allclose((s * g).sum(), gamma * s.sum(), rtol=1e-9, atol=1e-9)  # budget kept
    n = len(sizes)
    if n > 1 and 0.0 < gamma < 1.0:
        d = n - np.arange(1, n + 1)
        a = (1 - gamma) * s.sum() / (d * s).sum()  # Eq. 30's slope, from the budget constraint
        if 1 - a * d[0] >= 0:  # clipping does not bite: exactly the linear law with γ^L = 1
            np.testing.assert_allclose(g, 1 - a * d, rtol=1e-12, atol=1e-12)
            assert g[-1] == pytest.approx(1.0)


def test_linear_plus_split_degenerate_cases() -> None:
    np.testing.assert_array_equal(linear_plus_split(0.3, [100]), [0.3])  # L = 1
    np.testing.assert_array_equal(linear_plus_split(1.0, [1, 2, 3]), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(linear_plus_split(0.0, [1, 2, 3]), [0.0, 0.0, 0.0])
    # sizes (1, 2), γ = 1/2: the budget 1.5 goes to the last layer (the printed slope would spend 2)
    np.testing.assert_allclose(linear_plus_split(0.5, [1, 2]), [0.0, 0.75])
    # a budget smaller than the last layer: only the last layer, partially
    np.testing.assert_allclose(linear_plus_split(0.01, [100, 100, 100]), [0.0, 0.0, 0.03])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(PlanError, match=r"\[0, 1\]|>= 0"):
            linear_plus_split(bad, [1, 2])
    with pytest.raises(PlanError, match="positive integers"):
        linear_plus_split(0.5, [3, 0])
    with pytest.raises(PlanError, match="at least one layer"):
        linear_plus_split(0.5, [])


def test_layer_gammas_conserve_total_budget() -> None:
    sizes = [1728, 36864, 73728, 147456, 294912, 589824, 1179648, 512000]
    for gamma, k in ((0.5, 4), (1.0, 3), (0.2, 2)):
        g = np.asarray(layer_gammas(gamma, sizes, k))
        assert np.all(g >= 0) and np.all(g <= k - 1) and np.all(np.diff(g) >= 0)
        np.testing.assert_allclose((g * sizes).sum(), gamma * sum(sizes), rtol=1e-12)
    assert layer_gammas(0.5, sizes, 1) == [0.0] * len(sizes)


# ---------------------------------------------------------------------------------------------- ensembles


def test_ensemble_groups_and_errors() -> None:
    assert ensemble_groups(4, [1, 3]) == [[1], [2, 3, 4]]
    assert ensemble_groups(6, [2, 2, 2]) == [[1, 2], [3, 4], [5, 6]]
    assert ensemble_groups(3, (3,)) == [[1, 2, 3]]
    with pytest.raises(PlanError, match="sums to 3, not to the expansion order K=4"):
        ensemble_groups(4, [1, 2])
    for bad in ([], [0, 4], [2, -1, 3], [1.5, 2.5]):
        with pytest.raises(PlanError, match="positive integers"):
            ensemble_groups(4, bad)  # type: ignore[arg-type]


def test_check_ensemble_validity() -> None:
    assert [min_first_cluster(b) for b in range(2, 9)] == [4, 2, 1, 1, 1, 1, 1]
    check_ensemble_validity(2, [6])  # one predictor: always fine
    check_ensemble_validity(2, [4, 2])
    check_ensemble_validity(4, [1, 3])
    check_ensemble_validity(8, [1, 1])
    with pytest.raises(PlanError, match=r"ternary .* K_1 >= 4 .* got K_1 = 1"):
        check_ensemble_validity(2, [1, 3])
    with pytest.raises(PlanError, match=r"int3 .* K_1 >= 2"):
        check_ensemble_validity(3, [1, 2])
    with pytest.raises(PlanError, match="weight bits"):
        check_ensemble_validity(9, [1, 1])
    with pytest.raises(PlanError, match="positive integers"):
        check_ensemble_validity(4, [0, 2])


@FAST
@given(
    seed=st.integers(0, 2**31),
    bits=BITS,
    split=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    gamma=st.sampled_from([None, 0.5, 1.5]),
)
def test_ensemble_weights_sum_to_expansion(seed: int, bits: int, split: list[int], gamma: float | None) -> None:
    w = gaussian_weight(seed, 10, 18).reshape(10, 2, 3, 3)
    k = sum(split)
    orders = expand_weight(w, bits, k, gamma)
    parts = ensemble_weights(orders, split, w.shape)
    assert len(parts) == len(split) and all(p.shape == w.shape and p.dtype == np.float64 for p in parts)
    total = reconstruct(orders, w.shape)
    np.testing.assert_allclose(sum(parts), total, rtol=0, atol=16 * EPS * float(np.abs(w).max()))
    # predictor m holds exactly its group's orders
    for p, group in zip(parts, ensemble_groups(k, split), strict=True):
        np.testing.assert_array_equal(p, reconstruct([orders[i - 1] for i in group], w.shape))
    with pytest.raises(PlanError):
        ensemble_weights(orders, [*split, 1], w.shape)


# ---------------------------------------------------------------------------------------------- bounds


def test_bound_u_formula() -> None:
    s, u = [2.0, 0.5, 3.0], [0.1, 0.2, 0.01]
    a = np.multiply(s, u)
    want = (a[0] + 1) * (a[0] + a[1] + 1) * (a[0] + a[1] + a[2] + 1) - 1
    assert bound_u(s, u) == pytest.approx(want, rel=1e-14)
    assert bound_u([1.0] * 3, [1e-12] * 3) == pytest.approx(6e-12, rel=1e-9)  # no cancellation
    assert bound_u([], []) == 0.0
    with pytest.raises(PlanError, match="one u per layer"):
        bound_u([1.0, 2.0], [0.1])


def mlp_weights(seed: int, dims: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]) * 1.5 for i in range(len(dims) - 1)]


def mlp(ws: list[np.ndarray], bs: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """x: (n, d_in) rows; ReLU between the layers, none after the last."""
    h = x
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        h = h @ w.T + b
        if i < len(ws) - 1:
            h = np.maximum(h, 0.0)
    return h


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    bits=BITS,
    k=st.integers(1, 4),
    gamma=st.sampled_from([None, 0.5]),
    with_bias=st.booleans(),
    dims=st.lists(st.integers(3, 20), min_size=4, max_size=4),
)
def test_network_bound_dominates_measured_error(
    seed: int, bits: int, k: int, gamma: float | None, with_bias: bool, dims: list[int]
) -> None:
    ws = mlp_weights(seed, dims)
    rng = np.random.default_rng(seed + 1)
    bs = [rng.standard_normal((w.shape[0],)) * (0.3 if with_bias else 0.0) for w in ws]
    wq = [reconstruct(expand_weight(w, bits, k, gamma), w.shape) for w in ws]
    x = rng.standard_normal((1024, dims[0]))
    x = np.concatenate([x, np.linalg.svd(ws[0])[2][:4]])  # plus W_1's top input directions
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    measured = float(np.abs(mlp(ws, bs, x) - mlp(wq, bs, x)).max())
    bias_norms = [float(np.linalg.norm(b)) for b in bs] if with_bias else None
    u = network_bound(ws, bits, k, gamma, bias_norms=bias_norms)
    u_tight = network_bound(ws, bits, k, gamma, bias_norms=bias_norms, tight=True)
    assert measured <= u_tight * (1 + 1e-9) + 1e-15
    assert u_tight <= u * (1 + 1e-12)
    # more orders -> smaller bound (Eq. 6 shrinks by qmax per order; ternary only in the sharp form)
    if gamma is None:
        assert network_bound(ws, bits, k + 1, bias_norms=bias_norms, tight=True) < u_tight
        if bits >= 3:
            assert network_bound(ws, bits, k + 1, bias_norms=bias_norms) < u
    else:  # sparse: one more order at the same per-order fraction γ/(K-1) never hurts
        per_order = gamma / max(k - 1, 1)
        g_k, g_next = per_order * (k - 1) if k > 1 else 0.0, per_order * k
        u_k = network_bound(ws, bits, k, g_k, bias_norms=bias_norms, tight=True)
        assert network_bound(ws, bits, k + 1, g_next, bias_norms=bias_norms, tight=True) <= u_k


def test_bound_u_ens() -> None:
    ws = mlp_weights(5, [16, 24, 24, 10])
    norms = np.stack([order_spectral_norms(expand_weight(w, 4, 4)) for w in ws])
    assert np.all(np.diff(norms, axis=1) < 0)  # later orders are smaller
    assert bound_u_ens(norms, [4]) == 0.0  # one predictor: nothing approximated
    assert bound_u_ens(norms[:1], [1, 3]) == 0.0  # linear model: the ensemble is exact
    u13, u22, u31 = (bound_u_ens(norms, s) for s in ([1, 3], [2, 2], [3, 1]))
    assert u13 > u22 > u31 > 0.0  # a larger first predictor approximates better
    want = norms[-1].sum() / 4 * np.prod(norms[:-1, 2:].sum(axis=1))
    assert u22 == pytest.approx(want, rel=1e-12)
    base = network_bound(ws, 4, 4)
    assert network_bound(ws, 4, 4, split=[2, 2]) == pytest.approx(base + u22, rel=1e-9)
    with pytest.raises(PlanError, match="sums to"):
        bound_u_ens(norms, [1, 2])


def test_resnet_like_conv_shapes() -> None:
    w = gaussian_weight(11, 64, 32 * 9, zero_channels=False).reshape(64, 32, 3, 3)
    orders = expand_weight(w, 4, 4, 0.5)
    assert orders[0].values.shape == w.shape
    assert [o.n_channels for o in orders] == [64, 11, 11, 11]
    assert all(o.values.shape[1:] == (32, 3, 3) for o in orders)
    dense_sum = sum(o.dense(64) for o in orders)
    np.testing.assert_allclose(dense_sum, reconstruct(orders, w.shape), rtol=0, atol=1e-15)
    assert lemma_a1_bound(w, 4, 2).shape == (64, 1, 1, 1)
    with pytest.raises(PlanError, match="beyond out_channels"):
        orders[1].dense(int(orders[1].channels[-1]))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), bits=st.integers(3, 8), gain=st.sampled_from([1e-2, 10.0, 300.0]))
def test_network_bound_scales_with_the_network_gain(seed: int, bits: int, gain: float) -> None:
    # The output error of a bias-free ReLU net is positively homogeneous in each layer's weight, so a
    # valid bound must follow the network's gain; gains >> 1 are where Eq. 15 read literally fails.
    ws = mlp_weights(seed, [12, 16, 16, 8])
    scaled = [w * gain for w in ws]
    u1, ug = network_bound(ws, bits, 2), network_bound(scaled, bits, 2)
    assert ug == pytest.approx(u1 * gain**3, rel=1e-6)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    zeros = [np.zeros(w.shape[0]) for w in ws]
    wq = [reconstruct(expand_weight(w, bits, 2), w.shape) for w in scaled]
    assert float(np.abs(mlp(scaled, zeros, x) - mlp(wq, zeros, x)).max()) <= ug
