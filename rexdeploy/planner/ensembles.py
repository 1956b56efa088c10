"""Ensembles in the planner: where each layer's orders go (paper Eq. 31-35), the error bound U_ens
(Theorem B.3, Eq. 20), the data-free validity check of Appendix L, and the ensemble candidates the
planner offers when the device has parallel capacity.

Appendix L: an ensemble is valid when its bound is small against the expected logit norm
``E||f^(K)||``, which BatchNorm statistics give without data (the last layer's input statistics,
propagated from the last BN: :mod:`rexdeploy.bnstats`). Two terms are compared with it:

* ``u_ens``: Eq. 20 as :func:`rexdeploy.numerics.bound_u_ens` reads it (a product over the layers of
  the later clusters' residual norms, over ``2^(L-1)``). It is the paper's bound; on deep networks at
  int4 and up it vanishes (MobileNetV2 int4 [1,3]: 4e-31) and misses the error the construction makes.
* ``u_ens_eq35``: the gap Eq. 35 itself opens, estimated data-free. A layer whose later orders run
  outside its activation is exact where the activation passes its input (``σ' = 1``) and off by
  ``R_out x`` where it does not (a ReLU below 0, a ReLU6 below 0 or above 6); a layer that reads the
  network input gives its later orders to the later predictors inside their own activation (Eq. 31), off
  on about half the units. With ``ρ_l = ||Σ_{k>K_1} Q^-1(R^k_l)||_F / ||W_l||_F`` and ``p_l`` the share of
  units off (from the BN statistics of the layer's output; 1/2 where none reach)::

      u_ens_eq35 = E||f^(K)|| · sqrt(Σ_l p_l ρ_l²)

  Measured on MobileNetV2 int4 (24 natural images, relative logit error): [3,1] 0.0016 predicted /
  0.0043 measured, [2,2] 0.024 / 0.059, [1,3] 0.36 / 1.03 — it ranks splits right and is low by ~2.5×
  (the layers' gains to the output are not in it).

For the difference form (the pass's default) the second term is its own-order truncation instead: predictor m's
own input is ~ρ_l(S_{m-1}) of the signal and misses the orders n+1..S_{m-1} of it (n its own orders,
:func:`own_order_count`): ``E||f^(K)|| · sqrt(Σ_l Σ_m ρ_l(S_{m-1})² ||W_{n+1..S_{m-1}}||² / ||W||²)`` — 0 where
n = S_{m-1} ([2,2], [1,3]), where the ensemble sums to its dense K.

Verdict on ``r = max(u_ens, u_ens_eq35) / E||f^(K)||``: ``valid`` below :data:`DOUBTFUL_RATIO`,
``doubtful`` (a warning) below :data:`INVALID_RATIO`, ``invalid`` (refused) above. Without a BN statistic
at the last layer ``E||f^(K)||`` is unknown: the Eq. 35 term is still a ratio and is judged alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from rexdeploy.analyze import ConstantResolver, Layer, clip_bounds, layer_weight
from rexdeploy.bnstats import ChannelStats, norm_cdf, propagate_bn_stats
from rexdeploy.errors import PlanError
from rexdeploy.numerics import ResidualOrder, bound_u_ens, expand_weight, reconstruct
from rexdeploy.plans import Plan
from rexdeploy.profile import Profile

log = logging.getLogger(__name__)

# elementwise activations σ of Eq. 35: the residual orders of the layer before one go outside it
ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
     "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu"}
)  # fmt: skip
# the activations among them with σ(0) = 0: a later predictor's small signal stays small through them
ZERO_PRESERVING = ACTIVATIONS - {"Sigmoid", "HardSigmoid", "Softplus"}
# ops the predictors may run on their own signal and be summed after: linear in a predictor-dependent input
# (with every other input the same in all predictors), or a pooling that, like σ, the sum approximates
LINEAR_OPS = frozenset(
    {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice",
     "Gather", "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceSum", "Pad", "Resize", "Sum", "Add", "Sub",
     "Neg", "Mul", "Div", "MaxPool", "GlobalMaxPool", "DepthToSpace", "SpaceToDepth", "Upsample", "Tile", "Expand"}
)  # fmt: skip
DOUBTFUL_RATIO = 0.05  # r above this: the ensemble is a visibly worse approximation of its dense K (warning)
INVALID_RATIO = 0.15  # r above this: the ensemble no longer approximates its dense K (refused)
UNKNOWN_OFF_SHARE = 0.5  # p_l where no BN statistic reaches (Lemma B.4: P(ReLU inactive) ≈ 1/2)


@dataclass(frozen=True)
class Layout:
    """Where an ensemble's predictors run and meet, by node index of the (BN-folded) graph.

    ``region``: the cloned nodes (upstream of a planned layer); ``crossing``: the tensors where the
    predictors are summed; ``roles``: per planned node, ``("first", None)`` (reads the network input:
    Eq. 31), ``("activation", j)`` (node j, an elementwise activation, alone reads its output: Eq. 35) or
    ``("linear", None)`` (anything else: inside and outside the activation are the same sum). ``shared_terms``:
    the Add / Sub nodes that add a tensor every predictor has (a bias, the network input on a residual
    path) to a predictor's signal, with the position of the predictor's input: like biases, the shared term
    is added in predictor 1 only."""

    region: frozenset[int]
    crossing: tuple[str, ...]
    roles: dict[int, tuple[str, int | None]]
    shared_terms: dict[int, int]


def node_names(model: onnx.ModelProto) -> list[str]:
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]


def ensemble_layout(model: onnx.ModelProto, planned: Sequence[str] | set[str], layers: Sequence[Layer],
                    exact: bool = False) -> Layout:  # fmt: skip
    """The :class:`Layout` of an ensemble over the ``planned`` layers of ``model`` (BN-folded); refuses
    a float layer inside the predictors and a sum anywhere but at a planned layer's output, and — unless ``exact``
    (the difference form, which runs any op as φ(sum up to m) − φ(sum up to m−1)) — an op the predictors cannot be
    summed across (a product of two signals, an activation with σ(0) ≠ 0)."""
    planned = set(planned)
    by_name = {layer.name: layer for layer in layers}
    graph = model.graph
    names = node_names(model)
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for t in n.input:
            readers.setdefault(t, []).append(i)
    region: set[int] = set()
    stack = [i for i, name in enumerate(names) if name in planned]
    while stack:
        i = stack.pop()
        if i in region:
            continue
        region.add(i)
        stack.extend(producers[t] for t in graph.node[i].input if t in producers)
    float_layers = [names[i] for i in sorted(region) if names[i] in by_name and names[i] not in planned]
    if float_layers:
        raise PlanError(
            f"an ensemble needs every quantizable layer upstream of the planned ones in the plan; "
            f"{float_layers[0]!r} is not (a float layer cannot be split across predictors)"
        )
    produced = {t for i in region for t in graph.node[i].output}
    tail_inputs = {t for i, n in enumerate(graph.node) if i not in region for t in n.input}
    crossing = sorted((tail_inputs | {o.name for o in graph.output}) & produced)
    for t in crossing:
        if names[producers[t]] not in planned:
            raise PlanError(
                f"tensor {t!r} leaves the ensemble's predictors through node {names[producers[t]]!r}, which is not "
                "a planned layer; the predictors can only be summed at the output of a quantized layer"
            )
    # tensors that differ between predictors: downstream of a planned layer (graph.node is topologically sorted)
    dependent: set[str] = set()
    for i, node in enumerate(graph.node):
        if i in region and (names[i] in planned or any(t in dependent for t in node.input)):
            dependent.update(node.output)
    shared_terms: dict[int, int] = {}
    for i in sorted(region):
        node = graph.node[i]
        mine = [k for k, t in enumerate(node.input) if t in dependent]
        if names[i] in planned or not mine:
            continue
        op = node.op_type
        if exact and not (op in ("Add", "Sub") and len(mine) == 1 and len(node.input) == 2):
            continue
        if op in ("Add", "Sub") and len(mine) == 1 and len(node.input) == 2:
            shared_terms[i] = mine[0]
            continue
        if op in ("Mul", "Div", "MatMul") and (len(mine) > 1 or (op == "Div" and mine != [0])):
            raise PlanError(
                f"node {names[i]!r} ({op}) multiplies two predictor signals: an ensemble's predictors cannot be "
                "summed across it; plan this model without an ensemble"
            )
        if op == "Clip" and not _clip_keeps_zero(node, ConstantResolver(model)):
            op = "Sigmoid"  # a clip that moves 0 is refused below, like σ(0) != 0
        if op not in LINEAR_OPS and op not in ZERO_PRESERVING:
            raise PlanError(
                f"node {names[i]!r} ({op}) lies between the planned layers and is neither linear nor an elementwise "
                "activation with σ(0) = 0: an ensemble's predictors cannot be summed across it (paper Eq. 31-35 "
                "assume Conv/Gemm layers, such activations and linear ops); plan this model without an ensemble"
            )
    roles: dict[int, tuple[str, int | None]] = {}
    for i in sorted(region):
        if names[i] not in planned:
            continue
        node, layer = graph.node[i], by_name[names[i]]
        if node.input[layer.act_index] not in dependent:
            roles[i] = ("first", None)
            continue
        users = readers.get(node.output[0], [])
        act = users[0] if len(users) == 1 and node.output[0] not in crossing else None
        act_node = graph.node[act] if act is not None and act in region else None
        if act_node is not None and act_node.op_type in ACTIVATIONS and act_node.input[0] == node.output[0]:
            roles[i] = ("activation", act)
            continue
        roles[i] = ("linear", None)
    return Layout(frozenset(region), tuple(crossing), roles, shared_terms)


def _clip_keeps_zero(node: onnx.NodeProto, consts: ConstantResolver) -> bool:
    lo, hi = clip_bounds(node, consts)
    return lo <= 0.0 <= hi


@dataclass(frozen=True)
class EnsembleCheck:
    """Appendix L's verdict on one ensemble split (see the module docstring)."""

    split: tuple[int, ...]
    u_ens: float
    u_ens_eq35: float | None  # absolute when logit_norm is known
    eq35_ratio: float  # u_ens_eq35 / E||f^(K)||: data-free even without BN statistics
    logit_norm: float | None
    verdict: str  # "valid" | "doubtful" | "invalid"
    form: str = "eq35"  # difference: eq35_ratio holds its own-order truncation instead of the Eq. 35 gap

    @property
    def ratio(self) -> float:
        """max(U_ens, U_ens Eq. 35) / E||f^(K)|| (the Eq. 35 ratio alone when the logit norm is unknown)."""
        if self.logit_norm is None or self.logit_norm <= 0.0:
            return self.eq35_ratio
        return max(self.u_ens / self.logit_norm, self.eq35_ratio)

    def message(self) -> str:
        split = ",".join(map(str, self.split))
        norm = "unknown (no BatchNorm statistic reaches the last layer)" if self.logit_norm is None else (
            f"{self.logit_norm:.3g}")  # fmt: skip
        return (
            f"ensemble {split} ({self.form}): U_ens (Eq. 20) {self.u_ens:.3g}, "
            f"{'own-order truncation' if self.form == 'difference' else 'Eq. 35 gap'} {self.eq35_ratio:.3g} of the logits, "
            f"expected logit norm {norm}: ratio {self.ratio:.3g} -> {self.verdict}"
        )


def order_norms(orders: Sequence[ResidualOrder], shape: tuple[int, ...], spectral: bool = True) -> np.ndarray:
    """``||Q^-1(R^k)||_2`` of each order, from the largest eigenvalue of the smaller Gram matrix (as
    :func:`rexdeploy.numerics.order_spectral_norms`, ~20x faster than an SVD on MobileNetV2's 1x1 convs);
    ``spectral=False``: the Frobenius norms, an upper bound of them at a fraction of the cost."""
    out = np.zeros(len(orders), dtype=np.float64)
    for i, o in enumerate(orders):
        m = o.dense(shape[0]).reshape(shape[0], -1)
        if not spectral:
            out[i] = float(np.linalg.norm(m))
            continue
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        out[i] = math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0)) if gram.size else 0.0
    return out


def _off_share(stats: ChannelStats | None, act: onnx.NodeProto, consts: ConstantResolver) -> float:
    """Share of units where the activation ``act`` does not pass its input (σ' ≠ 1), from Gaussian BN
    statistics of its input: below 0 for ReLU-like ops, below ``min`` or above ``max`` for Clip."""
    if stats is None or act.op_type not in ("Relu", "Clip"):
        return UNKNOWN_OFF_SHARE
    std = np.maximum(stats.std, 1e-12)
    lo, hi = clip_bounds(act, consts) if act.op_type == "Clip" else (0.0, math.inf)
    below = norm_cdf((lo - stats.mean) / std) if math.isfinite(lo) else 0.0
    above = 1.0 - norm_cdf((hi - stats.mean) / std) if math.isfinite(hi) else 0.0
    return float(np.mean(below + above))


def _logit_norm(model: onnx.ModelProto, layer: Layer, stats: ChannelStats | None, w: np.ndarray,
                consts: ConstantResolver) -> float | None:  # fmt: skip
    """``E||y||`` of the last layer ``y = W x + b`` per output position, from the per-channel statistics of
    its input (the last BN's, propagated): ``sqrt(||W μ + b||² + Σ_o Σ_c W_oc² σ_c²)``."""
    if stats is None:
        return None
    mean, std = stats.moments()
    w2 = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    if w2.shape[1] % mean.size:
        return None
    reps = w2.shape[1] // mean.size  # a conv's kernel positions per input channel
    mu = np.repeat(mean, reps)
    var = np.repeat(std**2, reps)
    b = np.asarray(consts.value(layer.bias), dtype=np.float64).ravel() if layer.bias else 0.0
    return float(math.sqrt(float(np.sum((w2 @ mu + b) ** 2)) + float(np.sum((w2**2) @ var))))


def check_ensemble(model: onnx.ModelProto, plan: Plan, layers: Sequence[Layer],
                   bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   layout: Layout | None = None, memo: dict[tuple[Any, ...], Any] | None = None,
                   spectral: bool = True, form: str = "difference",
                   own_orders: int | None = None) -> EnsembleCheck:  # fmt: skip
    """Appendix L's check of ``plan``'s ensemble on ``model`` (BN-folded; ``bn_stats`` from
    :func:`rexdeploy.graph.fold_batchnorm`). The plan's layers must share one split and one K. ``memo``: a
    dict kept across calls on the same model (the planner checks several splits), for the per-layer orders.
    ``spectral=False`` (the planner) puts Frobenius norms in Eq. 20: an upper bound of U_ens, so a split it
    passes passes with the spectral norms too; the pass computes the exact value when it builds the plan."""
    memo = {} if memo is None else memo
    settings = {(lp.split, lp.bits, lp.order, lp.gamma) for lp in plan.layers.values()}
    splits = {s[0] for s in settings}
    if len(splits) != 1:
        raise PlanError(f"an ensemble needs one split K_1..K_M on every layer; got {sorted(splits)}")
    split = splits.pop()
    layout = layout or ensemble_layout(model, set(plan.layers), layers, exact=form == "difference")
    names = node_names(model)
    consts = ConstantResolver(model)
    if ("stats",) not in memo:
        memo[("stats",)] = propagate_bn_stats(model, bn_stats) if bn_stats else {}
    stats = memo[("stats",)]
    by_name = {layer.name: layer for layer in layers}
    index = {n: i for i, n in enumerate(names)}
    ordered = [by_name[n] for n in names if n in plan.layers]
    k1 = split[0]
    norms = []
    terms = []
    for layer in ordered:
        lp = plan.layers[layer.name]
        key = (layer.weight, lp.bits, lp.order, lp.gamma, spectral)
        if key not in memo:
            w = layer_weight(model, layer, consts)
            orders = expand_weight(w, lp.bits, lp.order, lp.gamma)
            w_sq = max(float(np.sum(np.asarray(w, dtype=np.float64) ** 2)), 1e-300)
            memo[key] = (orders, w.shape, order_norms(orders, w.shape, spectral), w_sq)
        orders, shape, layer_norms, w_sq = memo[key]
        norms.append(layer_norms)
        kind, act = layout.roles.get(index[layer.name], ("linear", None))
        if form == "difference":  # no gap; a later predictor's own input loses its orders beyond ``own``
            if kind != "first" and len(split) > 1:
                terms.append(_truncation(orders, shape, w_sq, split, own_orders))
            continue
        if kind == "linear" or len(split) == 1:
            continue
        rho2 = float(np.sum(reconstruct(orders[k1:], shape) ** 2)) / w_sq
        if kind == "first":
            p = UNKNOWN_OFF_SHARE
        else:
            assert act is not None
            p = _off_share(stats.get(layer.output), model.graph.node[act], consts)
        terms.append(p * rho2)
    if len({len(n) for n in norms}) != 1:
        raise PlanError("an ensemble needs the same expansion order K on every layer")
    u_ens = bound_u_ens(np.asarray(norms), split) if len(split) > 1 else 0.0
    eq35 = math.sqrt(sum(terms))
    last = ordered[-1]
    logit = _logit_norm(model, last, stats.get(last.input), layer_weight(model, last, consts), consts)
    check = EnsembleCheck(tuple(split), float(u_ens), None if logit is None else eq35 * logit, eq35, logit, "valid",
                          form)  # fmt: skip
    verdict = "invalid" if check.ratio >= INVALID_RATIO else "doubtful" if check.ratio >= DOUBTFUL_RATIO else "valid"
    return replace(check, verdict=verdict)


def _truncation(orders: Sequence[ResidualOrder], shape: tuple[int, ...], w_sq: float, split: Sequence[int],
                own_orders: int | None) -> float:  # fmt: skip
    """The difference form's squared error term of one layer: predictor m's own input is ~ρ(S_{m-1}) of the
    signal (the residual the predictors before it leave, ``ρ(n)² = ||W − Σ_{k≤n} Q^-1(R^k)||² / ||W||²``), and
    the orders n+1..S_{m-1} it does not apply to it (n = :func:`own_order_count`) miss that much of it."""

    def part2(lo: int, hi: int) -> float:  # ||Σ_{lo<k≤hi} Q^-1(R^k)||² / ||W||²
        return float(np.sum(reconstruct(orders[lo:hi], shape) ** 2)) / w_sq if lo < hi else 0.0

    ends = [int(e) for e in np.cumsum(split)]
    return sum(part2(ends[m - 1], len(orders)) * part2(own_order_count(split, m, own_orders), ends[m - 1])
               for m in range(1, len(split)))  # fmt: skip


def enforce(check: EnsembleCheck) -> None:
    """Refuse an invalid split (PlanError saying what to do), warn on a doubtful one."""
    if check.verdict == "invalid":
        k = sum(check.split)
        raise PlanError(
            f"{check.message()} (Appendix L: above {INVALID_RATIO:g} the ensemble does not approximate its dense "
            f"expansion); give the first predictor more orders (e.g. --ensemble {k - 1},1) or use no ensemble"
        )
    if check.verdict == "doubtful":
        log.warning("%s: the ensemble is a visibly worse approximation than its dense expansion", check.message())


def annotate(plan: Plan, check: EnsembleCheck) -> Plan:
    """``plan`` with U_ens, the Eq. 35 gap and the expected logit norm written in it."""
    return replace(plan, u_ens=check.u_ens, u_ens_eq35=check.u_ens_eq35, logit_norm=check.logit_norm,
                   notes=(*plan.notes, check.message()))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the planner's hook


def parallel_capacity(profile: Profile) -> int:
    """How many predictors the device runs at once: OpenVINO streams, or TensorRT's main stream plus its
    auxiliary streams (profile ``[parallel]``)."""
    return max(1, profile.parallel.streams, 1 + profile.parallel.aux_streams)


def aux_streams_for(plan: Plan, profile: Profile) -> int:
    """TensorRT ``max_aux_streams`` for an engine of ``plan``: one auxiliary stream per predictor beyond the
    first, at most what the profile's ``[parallel] aux_streams`` allows; 0 without an ensemble (TensorRT may
    still use streams for other independent branches when the profile's value is passed instead)."""
    return min(max(profile.parallel.aux_streams, 0), max(plan.predictors - 1, 0))


def ensemble_latency_ms(predictor_ms: Sequence[float], overhead_ms: float, capacity: int) -> float:
    """Predicted latency of M predictors: the slowest one when the device runs them all at once, else
    they queue on ``capacity`` lanes (longest first)."""
    lanes = [0.0] * max(1, capacity)
    for t in sorted(predictor_ms, reverse=True):
        lanes[lanes.index(min(lanes))] += t
    return overhead_ms + max(lanes)


def splits_for(order: int, bits: int) -> list[tuple[int, int]]:
    """The two-predictor splits (K_1, K - K_1) of K = ``order`` the planner tries."""
    from rexdeploy.numerics import min_first_cluster

    return [(k1, order - k1) for k1 in range(max(1, min_first_cluster(bits)), order) if order - k1 >= 1]


def own_order_count(split: Sequence[int], m: int, own_orders: int | None = None) -> int:
    """How many orders (1..n) predictor m (0-based, m >= 1) of a difference-form ensemble applies to its own input:
    ``own_orders`` when given, else min(K_m, S_{m-1}) — S_{m-1} makes the sum exact, and K_m leaves an error
    ~ρ^{K_m} of a signal ~ρ^{S_{m-1}}, the dense S_m's own size; never more than S_{m-1}."""
    return min(sum(split[:m]), own_orders if own_orders is not None else split[m])


def predictor_orders(split: Sequence[int], own_orders: int | None = None) -> list[int]:
    """Orders per layer each predictor of a difference-form ensemble runs: K_1 for predictor 1; K_m (on the sum of
    predictors 1..m) + :func:`own_order_count` (on its own input) for predictor m."""
    return [int(split[0])] + [int(split[m]) + own_order_count(split, m, own_orders) for m in range(1, len(split))]


# the Eq. 35 gap measured on MobileNetV2 int4 over its data-free estimate (see the module docstring): the planner
# predicts an ensemble's error as hypot(dense error, EQ35_GAIN · estimate)
EQ35_GAIN = 2.5


@dataclass(frozen=True)
class Offer:
    """An ensemble candidate: the plan (U_ens written in it) and the check that allowed it."""

    plan: Plan
    check: EnsembleCheck


def ensemble_offers(model: onnx.ModelProto, layers: Sequence[Layer], profile: Profile, dense: Plan,
                    bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                    memo: dict[tuple[Any, ...], Any] | None = None) -> list[Offer]:  # fmt: skip
    """Two-predictor ensembles of a uniform dense plan ``dense`` (order K >= 2 on every quantized layer of
    ``model``, BN-folded), offered only where the profile has parallel capacity for two predictors and the
    Appendix-L check finds the split valid (not doubtful)."""
    if parallel_capacity(profile) < 2 or not dense.layers or len(dense.layers) != len(layers):
        return []
    settings = {(lp.bits, lp.order, lp.gamma, lp.predictors, lp.act_order) for lp in dense.layers.values()}
    if len(settings) != 1:
        return []
    bits, order, gamma, predictors, act_order = settings.pop()
    if order < 2 or predictors != 1 or gamma is not None or act_order != 1:
        return []
    try:
        layout = ensemble_layout(model, set(dense.layers), layers, exact=True)  # the difference form
    except PlanError:
        return []  # a sum at a node that is not a planned layer: no ensemble of this model
    offers = []
    for split in splits_for(order, bits):
        plan = replace(dense, layers={n: replace(lp, split=split) for n, lp in dense.layers.items()})
        check = check_ensemble(model, plan, layers, bn_stats, layout, memo, spectral=False)
        if check.verdict == "valid":
            offers.append(Offer(annotate(plan, check), check))
    return offers


def ensemble_candidates(model: onnx.ModelProto, layers: Sequence[Layer], profile: Profile,
                        uniform: Sequence[tuple[str, Plan, float, float]],
                        overhead_ms: float) -> list[tuple[str, Plan, float, float]]:  # fmt: skip
    """The planner's hook: (label, plan, predicted latency ms, predicted error) of the ensembles (the pass's
    default, difference form) of the ``uniform`` dense candidates (label, plan, latency, error), where the device
    runs two predictors at once (profile ``[parallel]``) and Appendix L finds the split valid. ``model`` is the
    FP32 model (BN not folded). Error: the dense K's, with the check's own-order truncation added
    (``hypot(error, EQ35_GAIN · ratio)``; 0 where K_2 >= K_1, where the ensemble is its dense K). Cost, at the
    dense K's time per order: predictor 1 runs K_1 orders, predictor 2 K_2 + min(K_2, K_1)
    (:func:`predictor_orders`), side by side on :func:`ensemble_latency_ms`'s lanes — so [2,1] (2 and 2 orders) is
    predicted faster than its dense K=3. That assumes the engine overlaps the predictors' convolutions layer by
    layer for free (TensorRT auxiliary streams): never measured; on one OpenVINO CPU request the predictors run one
    after the other (``benchmarks/results/ensembles.md``), and the profile's ``[parallel]`` keeps the hook off
    there."""
    from rexdeploy.graph import fold_batchnorm

    capacity = parallel_capacity(profile)
    dense = [u for u in uniform if u[1].layers and u[1].predictors == 1]
    if capacity < 2 or not dense:
        return []
    folded, bn_stats = fold_batchnorm(model)
    memo: dict[tuple[Any, ...], Any] = {}
    offers_of: dict[tuple[Any, ...], list[Offer]] = {}  # candidates that differ only in act_order / engine precision
    out = []
    for label, plan, latency_ms, error in dense:
        sig = tuple(sorted((n, lp.bits, lp.order, lp.gamma, lp.act_order) for n, lp in plan.layers.items()))
        if sig not in offers_of:
            offers_of[sig] = ensemble_offers(folded, layers, profile, plan, bn_stats, memo)
        for found in offers_of[sig]:  # the same check, on this candidate's own plan (its act bits, engine precision)
            split_plan = replace(
                plan, layers={n: replace(lp, split=found.check.split) for n, lp in plan.layers.items()}
            )
            offer = Offer(annotate(split_plan, found.check), found.check)
            per_order = (latency_ms - overhead_ms) / sum(offer.check.split)
            predictor_ms = [per_order * n for n in predictor_orders(offer.check.split)]
            lat = ensemble_latency_ms(predictor_ms, overhead_ms, capacity)
            err = math.hypot(error, EQ35_GAIN * offer.check.eq35_ratio)
            split = ",".join(map(str, offer.check.split))
            out.append((f"ensemble {split} of {label}", offer.plan.with_predictions(predicted_latency_ms=lat,
                        predicted_error=err), lat, err))  # fmt: skip
    return out


__all__ = [
    "ACTIVATIONS",
    "EnsembleCheck",
    "Layout",
    "Offer",
    "annotate",
    "aux_streams_for",
    "check_ensemble",
    "enforce",
    "ensemble_candidates",
    "ensemble_latency_ms",
    "ensemble_layout",
    "ensemble_offers",
    "own_order_count",
    "parallel_capacity",
    "predictor_orders",
]
