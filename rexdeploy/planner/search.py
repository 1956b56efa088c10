"""The planner's search: uniform candidates, then per-layer allocation by greedy error-per-µs.

Every layer gets a menu of options (float, or weight bits × K × γ × activation precision allowed by
the profile), each with a predicted latency (:mod:`rexdeploy.costmodel`) and a predicted error
(:mod:`rexdeploy.planner.fidelity`). Starting from the fastest option everywhere, the greedy step
takes the option change with the largest reduction of the squared network error per added µs — the
layer's own µs plus the transitions (int8 ↔ float reorders, :class:`CostTable`) it adds or removes —
(free improvements first) until nothing improves; every step is a point of the explored front. The
chosen plan is the most accurate point — uniform or per-layer — whose predicted latency fits the
budget. This goes beyond the paper's one global setting (§5.1 limitation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from rexdeploy.analyze import ConstantResolver, Layer, layer_weight, quantizable_layers
from rexdeploy.costmodel import (
    engine_float_precision,
    engine_profile,
    float_precision,
    has_dynamic_activations,
    pins_single_nodes,
)
from rexdeploy.errors import BudgetError, PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.equalize import equalize_depthwise_inputs
from rexdeploy.planner.costtable import CostTable, analytic_us
from rexdeploy.planner.ensembles import ensemble_candidates
from rexdeploy.planner.fidelity import ErrorModel, LayerOption
from rexdeploy.planner.sensitivity import measure_sensitivity
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.probes import NATURAL, applicable_families, family_inputs
from rexdeploy.profile import Profile
from rexdeploy.ranges import activation_ranges, probe_batch, stacked_probes, synthetic_probes, unsigned_layers

ORDERS = (1, 2, 3)
log = logging.getLogger(__name__)
GAMMAS = (None, 0.5)


@dataclass(frozen=True)
class Candidate:
    label: str
    plan: Plan
    predicted_latency_ms: float
    predicted_error: float

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "predicted_latency_ms": self.predicted_latency_ms,
            "predicted_error": self.predicted_error,
            "plan_summary": self.plan.summary() if self.plan.layers else "FP32 (no layer quantized)",
            "plan_hash": self.plan.hash,
        }


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan, every candidate explored, the Pareto front among them, and the planning time."""

    plan: Plan
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    front: tuple[Candidate, ...]
    budget_ms: float
    seconds: float
    ranges: dict[str, float] = field(default_factory=dict)
    latency_source: str = "estimate"
    fits: bool = True
    errors: ErrorModel | None = field(default=None, compare=False, repr=False)
    profile: Profile | None = field(default=None, compare=False, repr=False)

    def plan_error(self, plan: Plan) -> float:
        """The error model's predicted relative output error of any plan of this model, in the float precision
        its engine runs in (0 for the FP32 engine; a bf16 float layer is not exact)."""
        if self.errors is None:
            raise PlanError("this PlanResult carries no error model")
        if self.profile is None:
            return self.errors.network_error(self.errors.plan_errors(plan.layers))
        built = engine_profile(self.profile, plan)
        return self.errors.network_error(self.errors.plan_errors(plan.layers, engine_float_precision(self.profile, plan),
                                                                 built.quantization.dynamic_activations))  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        return {
            "budget_ms": self.budget_ms,
            "chosen": self.chosen.to_dict(),
            "plan": self.plan.to_dict(),
            "front": [c.to_dict() for c in self.front],
            "candidates": len(self.candidates),
            "seconds": self.seconds,
            "latency_source": self.latency_source,
            "fits": self.fits,
        }


def layer_options(profile: Profile, layer: Layer, model: ErrorModel, max_order: int = 3,
                  allow_float: bool = True, table: CostTable | None = None, n_layers: int = 1) -> list[LayerOption]:  # fmt: skip
    """The menu of one layer: float (unless ``allow_float`` is False), and every (bits, K, γ, activation)
    the profile allows; an int8 input may take 1..``max_act_order`` activation orders. Latencies come from
    the measured cost ``table`` when given (:meth:`CostTable.layer_us`), else from the analytic model."""

    def latency(lp: LayerPlan | None) -> float:
        if table is not None:
            return table.layer_us(profile, layer, lp, n_layers)
        return analytic_us(profile, layer, lp)

    precision, dynamic = float_precision(profile), profile.quantization.dynamic_activations
    options = [LayerOption(None, latency(None), model.layer_error(layer.name, None, precision))] if allow_float else []
    allowed = sorted(set(profile.weight_bits(layer.op_class)), reverse=True)
    bits_menu = [b for b in allowed if b in (allowed[0], 6, 4)]
    q = profile.quantization
    acts = [(8, j) for j in range(1, q.max_act_order + 1)] + ([(0, 1)] if q.float_activations else [])
    for bits in bits_menu:
        for order in (k for k in ORDERS if k <= max_order):
            for gamma in GAMMAS if order > 1 else (None,):
                for act, act_order in acts:
                    lp = LayerPlan(bits=bits, order=order, gamma=gamma, act_bits=act, form=profile.defaults.form,
                                   act_order=act_order)  # fmt: skip
                    options.append(LayerOption(lp, latency(lp), model.layer_error(layer.name, lp, precision, dynamic)))
    return options


def _plan_of(layers: Sequence[Layer], picks: Sequence[LayerOption], base: Plan) -> Plan:
    return Plan(
        layers={layer.name: o.plan for layer, o in zip(layers, picks, strict=True) if o.plan is not None},
        profile=base.profile,
        model_sha256=base.model_sha256,
        float_precision=base.float_precision,
        dynamic_activations=base.dynamic_activations,
    )


def _evaluate(label: str, layers: Sequence[Layer], picks: Sequence[LayerOption], model: ErrorModel,
              overhead_ms: float, scale: float, base: Plan, table: CostTable | None = None) -> Candidate:  # fmt: skip
    error = model.network_error({layer.name: o.error for layer, o in zip(layers, picks, strict=True)})
    plan = _plan_of(layers, picks, base)
    us = sum(o.latency_us for o in picks)
    if table is not None and table.transition_us:  # a pairwise term (the greedy step prices it too: _Transitions)
        us += table.transition_us * table.transitions(plan.layers)
    latency = (overhead_ms + us / 1000.0) * scale
    plan = plan.with_predictions(predicted_latency_ms=latency, predicted_error=error)
    return Candidate(label, plan, latency, error)


class _Transitions:
    """The greedy step's view of the transition term (:meth:`CostTable.transitions`): per layer, its neighbours
    along the producer → consumer edges and the thousands of elements each edge carries, so that a step is priced
    with the transitions it adds or removes (``tau`` µs per thousand elements), not only with its own layer's µs.
    Without it the greedy scatters float layers among int8 ones, and every scattered layer pays two reorders."""

    def __init__(self, layers: Sequence[Layer], menus: list[list[LayerOption]], table: CostTable | None) -> None:
        self.tau = table.transition_us if table is not None else 0.0
        index = {layer.name: i for i, layer in enumerate(layers)}
        self.neighbours: list[list[tuple[int, float]]] = [[] for _ in layers]
        if table is not None and self.tau > 0.0:
            for consumer, feeders in table.producers.items():
                for feeder in feeders:
                    if consumer in index and feeder in index:
                        w = table.edge_elements.get(consumer, 1.0)
                        self.neighbours[index[consumer]].append((index[feeder], w))
                        self.neighbours[index[feeder]].append((index[consumer], w))
        self.quantized = [np.array([o.plan is not None and o.plan.act_bits == 8 for o in m]) for m in menus]

    def added_us(self, li: int, current: list[int]) -> np.ndarray:
        """µs of transitions each option of layer ``li`` adds (negative: removes) given the other layers' picks."""
        q = self.quantized[li]
        if not self.neighbours[li]:
            return np.zeros(len(q))
        now = bool(q[current[li]])
        delta = np.zeros(len(q))
        for nb, w in self.neighbours[li]:
            other = bool(self.quantized[nb][current[nb]])
            delta += w * ((q != other).astype(float) - float(now != other))
        return self.tau * delta


def _greedy(layers: Sequence[Layer], menus: list[list[LayerOption]], model: ErrorModel, overhead_ms: float,
            scale: float, base: Plan, table: CostTable | None = None) -> list[Candidate]:  # fmt: skip
    gains2 = np.array([model.sensitivity.gains[layer.name] ** 2 for layer in layers])
    lat = [np.array([o.latency_us for o in m]) for m in menus]
    err2 = [np.array([o.error**2 for o in m]) for m in menus]
    transitions = _Transitions(layers, menus, table)
    # start: the fastest option of each layer (ties: the more accurate)
    current = [int(np.lexsort((e, t))[0]) for t, e in zip(lat, err2, strict=True)]
    path = [
        _evaluate(
            "per-layer",
            layers,
            [m[i] for m, i in zip(menus, current, strict=True)],
            model,
            overhead_ms,
            scale,
            base,
            table,
        )
    ]
    for _ in range(20 * len(layers)):
        best: tuple[float, float, int, int] | None = None  # (ratio, benefit, layer, option)
        for li, (t, e) in enumerate(zip(lat, err2, strict=True)):
            benefit = gains2[li] * (e[current[li]] - e)
            ok = benefit > 1e-18 * max(1.0, float(gains2[li]))
            if not ok.any():
                continue
            cost = t - t[current[li]] + transitions.added_us(li, current)
            ratio = np.where(cost <= 0, np.inf, benefit / np.maximum(cost, 1e-12))
            ratio = np.where(ok, ratio, -np.inf)
            oi = int(np.lexsort((-benefit, -ratio))[0])
            key = (float(ratio[oi]), float(benefit[oi]), li, oi)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            break
        current[best[2]] = best[3]
        picks = [m[i] for m, i in zip(menus, current, strict=True)]
        path.append(_evaluate("per-layer", layers, picks, model, overhead_ms, scale, base, table))
    return path


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both predicted latency and predicted error, by latency."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.predicted_latency_ms, c.predicted_error)):
        if not front or c.predicted_error < front[-1].predicted_error:
            front.append(c)
    return front


@dataclass(frozen=True)
class Prepared:
    """What planning one model needs before any budget: the error model and the activation ranges (those the
    expansion is handed: the depthwise inputs it equalizes itself left out)."""

    errors: ErrorModel
    ranges: dict[str, float]
    seconds: float


def precision_passes(profile: Profile) -> list[tuple[Profile, str, bool | None]]:
    """The engines the search plans for, each as (profile variant, ``Plan.float_precision``,
    ``Plan.dynamic_activations``).

    One pass in the profile's float precision, unless the engine cannot keep an activation-order chain in f32
    inside a reduced-precision engine (OpenVINO on a bf16 CPU, :func:`rexdeploy.costmodel.pins_single_nodes`):
    then the reduced-precision engine is searched without activation orders, and the f32 engine with them. Where
    the engine can quantize weight-only layers' inputs at run time (OpenVINO CPU) and the profile leaves that off,
    one more pass plans an engine that does (data-free runtime ranges; no activation orders). Each candidate is
    priced and its error modelled as the engine it will be."""
    q = profile.quantization
    reduced = float_precision(profile)
    if reduced == "fp32" or q.max_act_order <= 1 or pins_single_nodes(profile):
        passes: list[tuple[Profile, str, bool | None]] = [(profile, "", None)]
    else:
        fp32 = profile.with_float_precision("fp32")
        no_orders = replace(profile, quantization=replace(q, max_act_order=1))
        passes = [(no_orders, "", None)]
        if fp32 is not None:
            passes.append((fp32, "fp32", None))
    if has_dynamic_activations(profile) and q.float_activations and not q.dynamic_activations:
        first = passes[0][0]
        dynamic = replace(first, quantization=replace(first.quantization, max_act_order=1, dynamic_activations=True))
        passes.append((dynamic, "", True))
    return passes


def _runtime_quantized(plan: Plan, layers: list[Layer]) -> bool:
    """True when the plan has a weight-only Gemm/MatMul layer (what dynamic activations change)."""
    kinds = {layer.name: layer.op_class for layer in layers}
    return any(lp.act_bits == 0 and kinds.get(n) in ("gemm", "matmul") for n, lp in plan.layers.items())


def _candidates(layers: list[Layer], profile: Profile, errors: ErrorModel, base: Plan, allow_float: bool,
                latency_scale: float, cost_table: CostTable | None) -> list[Candidate]:  # fmt: skip
    """The uniform candidates and the greedy per-layer front for one engine float precision."""
    t0 = time.perf_counter()
    menus = [layer_options(profile, layer, errors, allow_float=allow_float, table=cost_table, n_layers=len(layers))
             for layer in layers]  # fmt: skip
    log.debug("planner: %d layer options in %.2f s", sum(len(m) for m in menus), time.perf_counter() - t0)
    overhead_ms = (cost_table.rest_line()[0] if cost_table is not None else profile.cost.model_overhead_us) / 1000.0
    fp = f" ({base.float_precision} engine)" if base.float_precision else ""
    fp += " (dynamic activations)" if base.dynamic_activations else ""
    float_label = "FP32" if float_precision(profile) == "fp32" else f"float ({float_precision(profile)})"
    candidates = (
        [_evaluate(float_label, layers, [m[0] for m in menus], errors, overhead_ms, latency_scale, base, cost_table)]
        if allow_float
        else []
    )
    for bits in sorted({b for m in menus for o in m if o.plan for b in [o.plan.bits]}, reverse=True):
        for order, act_order in ((k, j) for j in range(1, profile.quantization.max_act_order + 1) for k in ORDERS):
            picks = []
            for menu in menus:
                fit = [
                    o
                    for o in menu
                    if o.plan
                    and o.plan.order == order
                    and o.plan.gamma is None
                    and o.plan.act_bits == 8
                    and o.plan.act_order == act_order
                ]
                same = [o for o in fit if o.plan and o.plan.bits == bits]
                picks.append(same[0] if same else max(fit, key=lambda o: o.plan.bits if o.plan else 0))
            label = f"uniform W{bits}A8 K={order}" + (f" act order {act_order}" if act_order > 1 else "") + fp
            candidates.append(_evaluate(label, layers, picks, errors, overhead_ms, latency_scale, base, cost_table))
    candidates += _greedy(layers, menus, errors, overhead_ms, latency_scale, base, cost_table)
    return candidates


def _probe_feeds(folded: onnx.ModelProto, probes: int, seed: int) -> dict[str, np.ndarray]:
    """The sensitivity probes: natural-image-like 1/f fields where the model reads images (white noise hides what a
    layer's error costs there), Gaussian otherwise; ``probes`` of them even for a batch-1 export (drawn one by
    one: its fixed batch dimension once made them one probe)."""
    if NATURAL not in applicable_families(folded):
        return synthetic_probes(folded, probes, seed=seed)
    return stacked_probes(folded, probes, seed + 1, lambda n, s: family_inputs(folded, NATURAL, n, seed=s))


def prepare(model: onnx.ModelProto, layers: list[Layer], *, calibration: np.ndarray | None = None, probes: int = 4,
            seed: int = 0, profile: Profile | None = None) -> Prepared:  # fmt: skip
    """Sensitivity (the gains of each layer's error at the output), data-free activation ranges and the
    per-layer weights: the budget-independent half of :func:`plan_model`. ``profile``: whose engine the plans
    are for (inputs ≥ 0 are emitted as uint8 where the engine runs it: half the rounding step).

    The probes are natural-image-like 1/f fields (:mod:`rexdeploy.probes`) where the model reads an image, else
    Gaussian: white noise passes a first layer's filters whole and hides what rounding its input costs
    (MobileNetV2, W8A8 on the first conv alone, relative output error: 0.005 on Gaussian probes, 0.025 on 1/f
    fields, 0.070 on natural photographs; AMD EPYC, onnxruntime exact arithmetic)."""
    t0 = time.perf_counter()
    folded, bn_stats = fold_batchnorm(model)
    # every depthwise input as the expansion emits it at activation order 1: channels equalized (passes/equalize.py;
    # not with a user calibration batch: its per-tensor ranges are the user's)
    unsigned = unsigned_layers(folded, layers, profile.name) if profile is not None else frozenset()
    by_name = {layer.name: layer for layer in layers}
    equalized = equalize_depthwise_inputs(folded, bn_stats, layers, () if calibration is not None else None,
                                          unsigned={by_name[n].input for n in unsigned})  # fmt: skip
    if equalized.sites:  # the same layers, reading the new weight initializers
        folded, bn_stats = equalized.model, equalized.bn_stats
        found = {layer.name: layer for layer in quantizable_layers(folded)}
        layers = [found[layer.name] for layer in layers]
    feeds = _probe_feeds(folded, probes, seed)
    if calibration is not None:
        name = next(iter(feeds))
        feeds = {name: calibration[: max(probes, 1)]}
    sensitivity = measure_sensitivity(folded, layers, feeds, seed=seed)
    batch = probe_batch(sum(layer.macs for layer in layers))  # the same probes expand_model would use
    # the layers whose input the expansion emits as uint8 (its rule, above): priced at half the step, ranged on 255
    # levels
    ranges = activation_ranges(folded, bn_stats, [layer.input for layer in layers], method="auto",
                               calibration=calibration, batch=batch,
                               unsigned={by_name[n].input for n in unsigned} if profile is not None else None)  # fmt: skip
    consts = ConstantResolver(folded)
    weights = {layer.name: layer_weight(folded, layer, consts) for layer in layers}
    errors = ErrorModel(layers, weights, sensitivity, ranges, unsigned)
    log.debug("planner: sensitivity and ranges of %d layers in %.2f s", len(layers), time.perf_counter() - t0)
    # the ranges handed on to the expansion: not those of the equalized inputs (it equalizes the ones it quantizes
    # at order 1 and ranges them itself; a given range would keep an input as it is)
    handed = {k: v for k, v in ranges.items() if k not in equalized.tensors}
    return Prepared(errors, handed, time.perf_counter() - t0)


def plan_model(
    model: onnx.ModelProto,
    layers: list[Layer],
    profile: Profile,
    budget_ms: float,
    *,
    model_sha256: str = "",
    calibration: np.ndarray | None = None,
    latency_scale: float = 1.0,
    probes: int = 4,
    seed: int = 0,
    allow_float: bool = True,
    cost_table: CostTable | None = None,
    fastest_if_none_fits: bool = False,
    prepared: Prepared | None = None,
) -> PlanResult:
    """Choose the most accurate plan whose predicted latency fits ``budget_ms``.

    ``model`` is the FP32 model (BN not yet folded), ``layers`` its quantizable layers after folding.
    ``latency_scale`` multiplies every prediction (the closed loop's correction from a measurement).
    ``allow_float=False`` quantizes every layer (no float layer, no FP32 candidate).
    ``cost_table``: latencies measured on the device for this model (:mod:`rexdeploy.planner.costtable`);
    without it the profile's analytic cost model answers and the result's ``latency_source`` is
    ``"estimate"``. Raises BudgetError naming the fastest predicted latency when nothing fits, unless
    ``fastest_if_none_fits`` (the closed loop: it builds and measures the fastest candidate) — then the
    fastest candidate is returned with ``fits=False``. ``prepared`` (:func:`prepare`) skips the sensitivity
    and range analysis when the same model is planned again (the closed loop re-plans after a miss).
    """
    t0 = time.perf_counter()
    allow_float = allow_float and profile.quantization.float_activations  # int8-only devices: no float layer
    if prepared is None:
        prepared = prepare(model, layers, calibration=calibration, probes=probes, seed=seed, profile=profile)
    errors, ranges = prepared.errors, prepared.ranges
    base = Plan(layers={}, profile=profile.name, model_sha256=model_sha256)
    candidates: list[Candidate] = []
    for variant, float_field, dynamic in precision_passes(profile):
        found = _candidates(layers, variant, errors, replace(base, float_precision=float_field,
                                                             dynamic_activations=dynamic),
                            allow_float, latency_scale, cost_table)  # fmt: skip
        candidates += [c for c in found if not dynamic or _runtime_quantized(c.plan, layers)]
    # Eq. 35 ensembles of the uniform candidates, where [parallel] has room for them and Appendix L allows them
    overhead_ms = (cost_table.rest_line()[0] if cost_table is not None else profile.cost.model_overhead_us) / 1000.0
    uniform = [
        (c.label, c.plan, c.predicted_latency_ms, c.predicted_error)
        for c in candidates
        if c.label.startswith("uniform")
    ]
    candidates += [
        Candidate(*c) for c in ensemble_candidates(model, layers, profile, uniform, overhead_ms * latency_scale)
    ]
    fitting = [c for c in candidates if c.predicted_latency_ms <= budget_ms]
    source = "measured" if cost_table is not None else "estimate"
    if not fitting and fastest_if_none_fits:
        fastest = min(candidates, key=lambda c: (c.predicted_latency_ms, c.predicted_error))
        notes = (f"planner: nothing predicted to fit {budget_ms:.3f} ms; fastest candidate {fastest.label}",)
        return PlanResult(fastest.plan.with_predictions(notes=notes), fastest, tuple(candidates),
                          tuple(pareto_front(candidates)), budget_ms, time.perf_counter() - t0, dict(ranges),
                          source, False, errors, profile)  # fmt: skip
    if not fitting:
        fastest = min(candidates, key=lambda c: c.predicted_latency_ms)
        raise BudgetError(
            f"no plan is predicted to fit the {budget_ms:.3f} ms budget on {profile.name}: the fastest, "
            f"{fastest.label} ({fastest.plan.summary() if fastest.plan.layers else 'no layer quantized'}), is predicted at "
            f"{fastest.predicted_latency_ms:.3f} ms; relax --budget or pick a faster profile"
        )
    chosen = min(fitting, key=lambda c: (c.predicted_error, c.predicted_latency_ms, c.label))
    front = pareto_front(candidates)
    how = "latency measured on the device (cost table)" if cost_table is not None else "latency an analytic estimate"
    notes = (f"planner: {chosen.label}, {len(candidates)} candidates, {how}, latency scale {latency_scale:.3f}",)
    plan = chosen.plan.with_predictions(notes=notes)
    return PlanResult(plan, chosen, tuple(candidates), tuple(front), budget_ms, time.perf_counter() - t0, dict(ranges),
                      source, True, errors, profile)  # fmt: skip


__all__ = ["Candidate", "PlanResult", "Prepared", "pareto_front", "plan_model", "precision_passes", "prepare"]
