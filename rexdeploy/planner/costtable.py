"""The measured cost table: what each layer of *this* model costs on *this* device, per option.

Probe engines of the model (the float engine, uniform int8 K=1, K=2 dense and sparse, activation order 2,
weight-only; :mod:`rexdeploy.probing`) are built and timed, and the engine's own profiler says how the
measured median splits over the layers (:class:`rexdeploy.builders.base.LayerTimes`, scaled so that the
layers and the rest add up to the unprofiled median). Each probe gives every layer one measured point
``(option, analytic µs, measured µs)``; the rest — pooling, residual Adds, reorders, I/O — is a fixed
overhead that grows with the share of layers whose input is quantized.

A candidate's latency is ``rest(q) + Σ_l table[l, option_l]``:

- an option that was probed is read from the table;
- one that was not (K=3 from K=1/K=2, a sparse K=3, act order 2 at K=1, an ensemble) is interpolated
  *in the analytic model's space*: the line through the two probed points of the same kind nearest to
  it (same activation order and sparsity first, the kind's K=1 point next) maps its analytic µs to
  measured µs, so every probed point is reproduced exactly and the analytic model only shapes the
  in-between; with one point the analytic model is scaled by its ratio; a kind never probed is the
  analytic µs scaled by the layer's median measured/analytic ratio. A sparse option with activation
  orders ≥ 2 (no probe has both) is composed: its sparse cost at one activation order plus what the
  activation orders add to the dense option, never less than either. An expansion never costs less than
  its kind's K=1.
- ``rest(q)`` is the least-squares line through the observed (quantized share, rest µs) points, which
  keeps the search additive per layer (:meth:`CostTable.layer_us` adds the slope per quantized layer).
- a **transition** — a layer whose input is quantized fed by one whose input is not, or the reverse — makes
  the engine convert layouts and precisions between them (OpenVINO's CPU plugin inserts Reorders: int8
  kernels run channels-last, float kernels blocked). Uniform probes never show one; a probe that alternates
  int8 and float layers measures ``transition_us``, and every candidate pays it per transition.

A built candidate that misses its prediction is profiled too and its per-layer times replace the table's
entries for the options it used (:meth:`CostTable.observe`): a miss updates the table, not a global scale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rexdeploy.analyze import Layer
from rexdeploy.costmodel import dynamic_input, float_precision, layer_precision, predict_layer_us
from rexdeploy.errors import PlanError
from rexdeploy.numerics import kept_channels
from rexdeploy.plans import LayerPlan
from rexdeploy.profile import Profile

SCHEMA = 1


@dataclass(frozen=True)
class OptionKey:
    """What decides a layer option's latency: its kind (``float``, ``int8`` — int8 input —, ``wo-<precision>``
    — weight-only —), the number of weight orders, the fraction of channels the orders ≥ 2 keep, the
    activation orders and the ensemble predictors. Weight bits do not matter to the engine (every order is
    stored as int8), except through the precision of int4 weight-only kernels (``wo-int4``)."""

    kind: str
    order: int = 1
    kept: float = 1.0
    act_order: int = 1
    predictors: int = 1

    @property
    def text(self) -> str:
        return f"{self.kind}:k{self.order}:f{self.kept:.3f}:j{self.act_order}:p{self.predictors}"

    @property
    def sparse(self) -> bool:
        return self.kept < 1.0

    @classmethod
    def parse(cls, text: str) -> OptionKey:
        try:
            kind, k, f, j, p = text.split(":")
            return cls(kind, int(k[1:]), float(f[1:]), int(j[1:]), int(p[1:]))
        except ValueError as exc:
            raise PlanError(f"cost table option {text!r} is malformed; delete the cached table") from exc


def option_key(profile: Profile, layer: Layer, lp: LayerPlan | None) -> OptionKey:
    """The latency key of ``lp`` (``None``: the layer stays float) on ``layer``."""
    if lp is None:
        return OptionKey(f"float-{float_precision(profile)}")
    precision = layer_precision(profile, bits=lp.bits, act_bits=lp.act_bits)
    kind = "int8" if lp.act_bits == 8 else f"wo-{precision}" + ("-dyn" if dynamic_input(profile, layer, lp) else "")
    c = layer.out_channels
    kept = kept_channels(c, lp.gamma, lp.order) / c if lp.order > 1 and c else 1.0
    return OptionKey(kind, lp.order, round(kept, 3), lp.act_order if lp.act_bits == 8 else 1, lp.predictors)


def analytic_us(profile: Profile, layer: Layer, lp: LayerPlan | None) -> float:
    """The profile's analytic cost model for one layer option (the prior)."""
    if lp is None:
        return predict_layer_us(profile, layer)
    act_bits = 8 if dynamic_input(profile, layer, lp) else lp.act_bits  # int8 kernels on runtime-quantized inputs
    return predict_layer_us(profile, layer, bits=lp.bits, order=lp.order, gamma=lp.gamma, act_bits=act_bits,
                            form=lp.form, act_order=lp.act_order)  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One measured layer option: the analytic prediction and the measured µs."""

    analytic_us: float
    measured_us: float


@dataclass(frozen=True)
class ProbeRecord:
    """One probe engine: its label, the unprofiled median, the profiler's total, its rest and build time."""

    label: str
    plan_summary: str
    median_ms: float
    profiled_total_us: float
    rest_us: float
    quantized_share: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CostTable:
    """Per layer × option measured µs, the rest's observed points, and where the numbers come from."""

    layers: dict[str, dict[str, Point]]
    rest_points: tuple[tuple[float, float], ...]
    probes: tuple[ProbeRecord, ...] = ()
    engine: str = ""
    host: str = ""
    key: str = ""
    seconds: float = 0.0
    cached: bool = False
    observations: int = 0
    producers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layer → the layers feeding it
    edge_elements: dict[str, float] = field(default_factory=dict)  # layer → its input, thousands of elements
    transition_us: float = 0.0  # per transition edge, per thousand elements converted (per edge without sizes)
    _slope_cache: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    # -- the rest: a line in the quantized share q ------------------------------------------------
    def rest_line(self) -> tuple[float, float]:
        """(rest at q = 0, slope per unit of q) in µs: least squares over the observed points."""
        if not self.rest_points:
            return 0.0, 0.0
        q = np.array([p[0] for p in self.rest_points])
        r = np.array([p[1] for p in self.rest_points])
        if np.ptp(q) < 1e-9:
            return float(max(r.mean(), 0.0)), 0.0
        slope, intercept = np.polyfit(q, r, 1)
        return float(intercept), float(slope)

    def rest_us(self, quantized_share: float) -> float:
        base, slope = self.rest_line()
        return max(base + slope * quantized_share, 0.0)

    # -- per-layer estimates ----------------------------------------------------------------------
    def layer_us(self, profile: Profile, layer: Layer, lp: LayerPlan | None, n_layers: int) -> float:
        """The layer option's measured or interpolated µs, plus its share of the rest's slope when its input
        is quantized (so that Σ layer_us + rest(0) is the candidate's latency)."""
        us = self.estimate_us(profile, layer, lp)[0]
        if lp is not None and lp.act_bits == 8 and n_layers:
            us += self.rest_line()[1] / n_layers
        return us

    def estimate_us(self, profile: Profile, layer: Layer, lp: LayerPlan | None) -> tuple[float, str]:
        """(µs, how: ``measured`` / ``interpolated`` / ``composed`` / ``scaled``) of one layer option (module
        docstring)."""
        key = option_key(profile, layer, lp)
        entries = self.layers.get(layer.name, {})
        if key.text in entries:
            return entries[key.text].measured_us, "measured"
        a = analytic_us(profile, layer, lp)
        same_kind = {OptionKey.parse(t): p for t, p in entries.items() if OptionKey.parse(t).kind == key.kind}
        anchors = [p for k, p in same_kind.items() if k.act_order == key.act_order and k.sparse == key.sparse]
        if not anchors and lp is not None and key.sparse and key.act_order > 1:
            return self._composed_us(profile, layer, lp), "composed"
        first = next((p for k, p in same_kind.items() if k.order == 1 and k.act_order == 1 and k.predictors == 1), None)
        if len(anchors) < 2 and first is not None and first not in anchors:
            anchors.append(first)
        floor = first.measured_us if first is not None and key.order >= 1 and key.kind != "float" else 0.0
        if len(anchors) >= 2:
            near = sorted(anchors, key=lambda p: abs(p.analytic_us - a))
            p0 = near[0]
            p1 = next((p for p in near[1:] if abs(p.analytic_us - p0.analytic_us) > 1e-9), None)
            if p1 is not None:
                slope = (p1.measured_us - p0.measured_us) / (p1.analytic_us - p0.analytic_us)
                est = p0.measured_us + slope * (a - p0.analytic_us)
                if slope > 0.0:
                    return max(est, floor), "interpolated"
        if anchors:
            near1 = min(anchors, key=lambda p: abs(p.analytic_us - a))
            return max(a * near1.measured_us / max(near1.analytic_us, 1e-9), floor), "interpolated"
        return a * self.layer_ratio(layer.name), "scaled"

    def _composed_us(self, profile: Profile, layer: Layer, lp: LayerPlan) -> float:
        """A sparse option with activation orders when no probe had both: the sparse cost at one activation
        order plus what the activation orders add to the dense option, and never less than either alone (on
        OpenVINO CPU a sparse order measured slower than a dense one: the pessimistic side is the safe one)."""
        sparse_j1 = self.estimate_us(profile, layer, replace(lp, act_order=1))[0]
        dense = self.estimate_us(profile, layer, replace(lp, gamma=None))[0]
        dense_j1 = self.estimate_us(profile, layer, replace(lp, gamma=None, act_order=1))[0]
        return max(sparse_j1 + dense - dense_j1, sparse_j1, dense)

    def layer_ratio(self, name: str) -> float:
        """Median measured/analytic ratio of a layer's points (all layers' when it has none; 1 when empty)."""
        if name not in self._slope_cache:
            pts = list(self.layers.get(name, {}).values()) or [p for e in self.layers.values() for p in e.values()]
            ratios = [p.measured_us / p.analytic_us for p in pts if p.analytic_us > 0]
            self._slope_cache[name] = float(np.median(ratios)) if ratios else 1.0
        return self._slope_cache[name]

    def transitions(self, plan_layers: Mapping[str, LayerPlan]) -> float:
        """The transitions of a plan: layer-to-layer edges between a quantized and a float input, each
        weighted by the thousands of elements its consumer reads (a reorder's cost grows with the tensor)."""
        return count_transitions(self.producers, plan_layers, self.edge_elements)

    def predict_ms(self, profile: Profile, layers: list[Layer], plan_layers: Mapping[str, LayerPlan],
                   with_transitions: bool = True) -> float:  # fmt: skip
        """A whole plan's predicted latency (ms): rest at its quantized share + every layer + transitions."""
        total = self.rest_us(quantized_share(layers, plan_layers))
        total += sum(self.estimate_us(profile, layer, plan_layers.get(layer.name))[0] for layer in layers)
        if with_transitions:
            total += self.transition_us * self.transitions(plan_layers)
        return total / 1000.0

    # -- updating ---------------------------------------------------------------------------------
    def observe(self, profile: Profile, layers: list[Layer], plan_layers: Mapping[str, LayerPlan],
                layer_us: Mapping[str, float], rest_us: float) -> CostTable:  # fmt: skip
        """A new table that has learned from one measured engine: the options ``plan_layers`` gave each layer
        take the µs measured in that engine. Its rest: an all-float or all-int8 engine without transitions
        re-anchors the rest line at its end; a mixed engine's rest above the line is what its transitions
        cost (the transition term moves halfway to it), or, without transitions, is spread over its layers."""
        share = quantized_share(layers, plan_layers)
        n_tr = self.transitions(plan_layers)
        measured = {k: float(v) for k, v in layer_us.items()}
        rest_points, tau = self.rest_points, self.transition_us
        end = not plan_layers or (n_tr == 0 and share > 1.0 - 1e-9)  # the float engine, or every layer int8
        if end:  # a newer point at the same end replaces the older one
            rest_points = (*(p for p in self.rest_points if abs(p[0] - share) > 1e-9), (share, float(rest_us)))
        else:
            excess = rest_us - self.rest_us(share)
            total = sum(measured.values())
            if n_tr:
                observed = excess / n_tr
                tau = max(observed if tau == 0.0 else 0.5 * (tau + observed), 0.0)
            elif total > 0:
                measured = {k: max(v * (1.0 + excess / total), 0.0) for k, v in measured.items()}
        table = {name: dict(entries) for name, entries in self.layers.items()}
        for layer in layers:
            if layer.name in measured:
                lp = plan_layers.get(layer.name)
                point = Point(analytic_us(profile, layer, lp), measured[layer.name])
                table.setdefault(layer.name, {})[option_key(profile, layer, lp).text] = point
        return replace(self, layers=table, rest_points=rest_points, transition_us=tau,
                       observations=self.observations + 1, _slope_cache={})  # fmt: skip

    def scaled(self, factor: float) -> CostTable:
        """Every measured µs (layers, rest, transitions) times ``factor``: the same device running slower or faster
        than when the table was measured (another load, another clock)."""
        if not (factor > 0.0 and math.isfinite(factor)):
            raise PlanError(f"cost table scale {factor!r} must be a positive number")
        layers = {name: {k: Point(p.analytic_us, p.measured_us * factor) for k, p in entries.items()}
                  for name, entries in self.layers.items()}  # fmt: skip
        rest = tuple((q, r * factor) for q, r in self.rest_points)
        return replace(self, layers=layers, rest_points=rest, transition_us=self.transition_us * factor,
                       _slope_cache={})  # fmt: skip

    def speed_ratio(self, layers: list[Layer], measured: Sequence[tuple[Profile, Mapping[str, LayerPlan], float]]) -> float:
        """How much slower (> 1) or faster the device runs now than the table says: the median, over engines
        measured now (their profile variant, plan layers and median ms), of measured / predicted. 1 without any."""
        ratios = [ms / p for prof, plan_layers, ms in measured if (p := self.predict_ms(prof, layers, plan_layers)) > 0]
        return float(np.median(ratios)) if ratios else 1.0

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "key": self.key,
            "engine": self.engine,
            "host": self.host,
            "seconds": self.seconds,
            "observations": self.observations,
            "rest_points": [list(p) for p in self.rest_points],
            "transition_us": self.transition_us,
            "producers": {k: list(v) for k, v in self.producers.items()},
            "edge_elements": dict(self.edge_elements),
            "probes": [p.to_dict() for p in self.probes],
            "layers": {
                name: {k: [p.analytic_us, p.measured_us] for k, p in entries.items()}
                for name, entries in self.layers.items()
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CostTable:
        if raw.get("schema") != SCHEMA:
            raise PlanError(f"cost table schema {raw.get('schema')!r} is not {SCHEMA}; delete the cached table")
        layers = {
            str(name): {str(k): Point(float(v[0]), float(v[1])) for k, v in entries.items()}
            for name, entries in raw["layers"].items()
        }
        for entries in layers.values():
            for text, p in entries.items():
                OptionKey.parse(text)
                if not (math.isfinite(p.measured_us) and math.isfinite(p.analytic_us)):
                    raise PlanError(f"cost table entry {text!r} is not finite; delete the cached table")
        return cls(
            layers=layers,
            rest_points=tuple((float(q), float(r)) for q, r in raw["rest_points"]),
            probes=tuple(ProbeRecord(**p) for p in raw.get("probes", [])),
            engine=str(raw.get("engine", "")),
            host=str(raw.get("host", "")),
            key=str(raw.get("key", "")),
            seconds=float(raw.get("seconds", 0.0)),
            observations=int(raw.get("observations", 0)),
            producers={str(k): tuple(str(x) for x in v) for k, v in raw.get("producers", {}).items()},
            edge_elements={str(k): float(v) for k, v in raw.get("edge_elements", {}).items()},
            transition_us=float(raw.get("transition_us", 0.0)),
        )


def is_quantized(lp: LayerPlan | None) -> bool:
    return lp is not None and lp.act_bits == 8


def count_transitions(producers: Mapping[str, tuple[str, ...]], plan_layers: Mapping[str, LayerPlan],
                      weights: Mapping[str, float] | None = None) -> float:  # fmt: skip
    """Edges (producer layer → layer) whose two ends differ in whether their input is quantized, each weighted
    by ``weights[layer]`` (1 when not given)."""
    w = weights or {}
    return sum(
        w.get(name, 1.0)
        for name, feeders in producers.items()
        for feeder in feeders
        if is_quantized(plan_layers.get(name)) != is_quantized(plan_layers.get(feeder))
    )


def quantized_share(layers: list[Layer], plan_layers: Mapping[str, LayerPlan]) -> float:
    """Fraction of the layers whose input is quantized (int8) under the plan."""
    if not layers:
        return 0.0
    return sum(1 for layer in layers if (lp := plan_layers.get(layer.name)) is not None and lp.act_bits == 8) / len(
        layers
    )


__all__ = ["CostTable", "OptionKey", "Point", "ProbeRecord", "analytic_us", "count_transitions", "option_key",
           "quantized_share"]
