"""Fit a profile's latency cost model on the device: ``rexdeploy profile calibrate NAME``.

Each micro-benchmark is a small ONNX graph of ``depth`` identical stacked layers (Conv/Gemm + Relu) of
one op class and size, so that per-layer cost dominates the fixed cost of an inference. Quantized
variants are made by :func:`rexdeploy.api.expand_model`, so they are exactly the Q/DQ forms the pass
emits (K = 1, K = 2 as branches + Add, K = 2 concatenated, sparse K = 2, weight-only), then built with
the profile's engine. One graph with no layer at all measures the per-inference overhead. All graphs
are built first, then timed in a few round-robin rounds; a point keeps the lowest of its round
medians, so that a burst of load from other processes on a shared machine spoils a round, not a point.

The coefficients of :mod:`rexdeploy.costmodel` are fitted in two steps: every coefficient but
``concat_factor`` by non-negative least squares on the relative error (each point's row divided by its
measured time), then ``concat_factor`` by least squares on the concat points with the others fixed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.analyze import Layer, find_layers
from rexdeploy.builders.base import Builder, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.builders.timing import Timing
from rexdeploy.costmodel import LayerTerms, float_precision, layer_terms, layer_terms_us
from rexdeploy.errors import BuildError, EngineUnavailableError, InputError, PlanError, RexError
from rexdeploy.graph import save_model
from rexdeploy.hostcpu import host_profile_name, missing_flags
from rexdeploy.profile import CostModel, Profile

Progress = Callable[[int, int, str], None]

SIZES = ("small", "medium", "large")
MAX_RATE = 1e6  # GMAC/s or GB/s written for a coefficient the fit drove to "free"
MIN_CONCAT_FACTOR = 0.05
BUILD_SHARE = 0.7  # building stops at this fraction of the time budget; the rest is for timing


@dataclass(frozen=True)
class Shape:
    """One micro-benchmark graph: ``depth`` stacked layers of ``op_class`` with ``channels`` in and out
    channels on a ``spatial`` × ``spatial`` map (Gemm: ``channels`` features, batch 1)."""

    op_class: str
    size: str
    channels: int
    spatial: int
    depth: int


@dataclass(frozen=True)
class Setting:
    """How the layers of a micro-benchmark are compiled. ``bits=None``: unquantized, in ``precision``."""

    name: str
    precision: str
    bits: int | None = None
    order: int = 1
    gamma: float | None = None
    act_bits: int = 8
    form: str = "branches"


FULL_SHAPES = (
    Shape("conv", "medium", 64, 28, 3),
    Shape("pointwise", "medium", 128, 28, 3),
    Shape("depthwise", "medium", 64, 56, 3),
    Shape("gemm", "medium", 1024, 0, 3),
    Shape("conv", "large", 128, 28, 2),
    Shape("pointwise", "large", 256, 28, 2),
    Shape("depthwise", "large", 144, 56, 2),
    Shape("gemm", "large", 2048, 0, 2),
    Shape("conv", "small", 32, 14, 6),
    Shape("pointwise", "small", 64, 14, 6),
    Shape("depthwise", "small", 32, 28, 6),
    Shape("gemm", "small", 256, 0, 6),
    Shape("matmul", "medium", 256, 64, 3),  # spatial = token rows per sample
    Shape("matmul", "small", 128, 32, 4),
)
QUICK_SHAPES = (Shape("conv", "small", 32, 14, 4), Shape("gemm", "small", 256, 0, 4))


@dataclass(frozen=True)
class CalibrationPoint:
    """One measured micro-benchmark. ``layer`` is None for the empty graph (per-inference overhead)."""

    label: str
    op_class: str
    size: str
    setting: str
    precision: str
    bits: int | None
    order: int
    gamma: float | None
    act_bits: int
    form: str
    depth: int
    layer: Layer | None
    measured_ms: float
    cov: float = 0.0
    runs: int = 0
    predicted_ms: float | None = None
    kernels: str = ""
    rounds_ms: tuple[float, ...] = ()  # the median of each timing round; measured_ms is the lowest

    @property
    def error(self) -> float | None:
        """Relative error of the prediction, (predicted - measured) / measured."""
        return None if self.predicted_ms is None else (self.predicted_ms - self.measured_ms) / self.measured_ms

    def terms(self) -> LayerTerms | None:
        if self.layer is None:
            return None
        return layer_terms(
            self.layer,
            precision=self.precision,
            bits=self.bits,
            order=self.order,
            gamma=self.gamma,
            form=self.form,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["layer"] = None if self.layer is None else self.layer.to_dict()
        out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CalibrationPoint:
        values = {k: v for k, v in raw.items() if k != "error"}
        values["rounds_ms"] = tuple(values.get("rounds_ms", ()))
        if values.get("layer") is not None:
            layer = dict(values["layer"])
            layer["weight_shape"] = tuple(layer["weight_shape"])
            values["layer"] = Layer(**layer)
        return cls(**values)


@dataclass(frozen=True)
class Fit:
    """The fitted coefficients and how well they reproduce the points they were fitted on."""

    cost: CostModel
    points: tuple[CalibrationPoint, ...]
    within_10: float
    within_20: float
    median_abs_error: float
    fitted: tuple[str, ...]  # which coefficients the points determined (the others kept their value)


@dataclass(frozen=True)
class CalibrationReport:
    profile: str
    engine: str
    engine_version: str
    device: str
    date: str
    grid: str
    wall_s: float
    build_s: float  # building every micro-benchmark (expansion pass + engine build)
    timing_s: float  # the timing rounds
    timing: TimingSettings
    rounds: int
    points: tuple[CalibrationPoint, ...]
    skipped: tuple[tuple[str, str], ...]
    previous: CostModel
    cost: CostModel
    within_10: float
    within_20: float
    median_abs_error: float
    fitted: tuple[str, ...]
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "device": self.device,
            "date": self.date,
            "grid": self.grid,
            "wall_s": self.wall_s,
            "build_s": self.build_s,
            "timing_s": self.timing_s,
            "timing": dataclasses.asdict(self.timing),
            "rounds": self.rounds,
            "fit": {
                "points": len(self.points),
                "within_10pct": self.within_10,
                "within_20pct": self.within_20,
                "median_abs_error": self.median_abs_error,
                "fitted": list(self.fitted),
            },
            "previous": dataclasses.asdict(self.previous),
            "cost": dataclasses.asdict(self.cost),
            "loadavg_start": list(self.loadavg_start),
            "loadavg_end": list(self.loadavg_end),
            "notes": list(self.notes),
            "skipped": [{"label": label, "reason": reason} for label, reason in self.skipped],
            "points": [p.to_dict() for p in self.points],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def quality_line(self) -> str:
        return (
            f"{len(self.points)} points, {self.within_10:.0%} within ±10 %, {self.within_20:.0%} within ±20 %, "
            f"median |error| {self.median_abs_error:.1%}"
        )

    def summary_lines(self) -> list[str]:
        c = self.cost
        lines = [
            f"calibrated {self.profile} ({self.engine} {self.engine_version}, {self.device}) in {self.wall_s:.0f} s "
            f"(building {self.build_s:.0f} s, timing {self.timing_s:.0f} s) [{self.grid} grid; load average "
            f"{self.loadavg_start[0]:.2f} → {self.loadavg_end[0]:.2f}]",
            f"fit: {self.quality_line()}",
            f"model_overhead_us = {c.model_overhead_us:g}, layer_overhead_us = {c.layer_overhead_us:g}, "
            f"branch_overhead_us = {c.branch_overhead_us:g}, bandwidth_gbps = {c.bandwidth_gbps:g}, "
            f"activation_bandwidth_gbps = {c.activation_bandwidth_gbps:g}, "
            f"quantize_bandwidth_gbps = {c.quantize_bandwidth_gbps:g}, sparse_overhead_us = {c.sparse_overhead_us:g}, "
            f"concat_factor = {c.concat_factor:g}",
        ]
        for op_class, rates in c.throughput_gmacs.items():
            lines.append(f"throughput_gmacs.{op_class}: " + ", ".join(f"{p} {v:g}" for p, v in rates.items()))
        if self.skipped:
            reasons = sorted({reason for _, reason in self.skipped})
            lines.append(f"skipped {len(self.skipped)} point(s): " + "; ".join(reasons))
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def to_markdown(self) -> str:
        c, prev = self.cost, self.previous
        out = [
            f"# Cost-model calibration: {self.profile}",
            "",
            f"{self.engine} {self.engine_version} on {self.device}, {self.date}; {self.grid} grid, "
            f"{len(self.points)} points measured in {self.wall_s:.0f} s (building {self.build_s:.0f} s, timing "
            f"{self.timing_s:.0f} s): {self.rounds} round-robin timing rounds "
            f"(warm-up {self.timing.warmup_s:g} s, {self.timing.duration_s:g} s each), a point's time is the lowest "
            f"of its round medians. Load average (1 min) "
            f"{self.loadavg_start[0]:.2f} at the start, {self.loadavg_end[0]:.2f} at the end.",
            "",
            f"**Fit quality**: {self.quality_line()}.",
            "",
            "| coefficient | before | fitted |",
            "|---|---|---|",
        ]
        for name in (*SCALARS, "concat_factor"):
            out.append(f"| {name} | {getattr(prev, name):g} | {getattr(c, name):g} |")
        for op_class, rates in c.throughput_gmacs.items():
            for p, v in rates.items():
                before = prev.throughput_gmacs.get(op_class, {}).get(p)
                out.append(f"| throughput_gmacs.{op_class}.{p} | {'' if before is None else f'{before:g}'} | {v:g} |")
        out += [
            "",
            "| point | depth | kernels | measured ms | CoV | predicted ms | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for pt in self.points:
            err = "" if pt.error is None else f"{pt.error:+.1%}"
            pred = "" if pt.predicted_ms is None else f"{pt.predicted_ms:.3f}"
            out.append(
                f"| {pt.label} | {pt.depth} | {pt.kernels} | {pt.measured_ms:.3f} | {pt.cov:.1%} | {pred} | {err} |"
            )
        if self.skipped:
            out += ["", "Skipped:", ""] + [f"- {label}: {reason}" for label, reason in self.skipped]
        if self.notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# the grid


def settings_for(profile: Profile, op_class: str, quick: bool = False) -> list[Setting]:
    """The compile settings measured for one op class of ``profile``, most needed first (a run short of
    time drops the last ones)."""
    q = profile.quantization
    bits = min(8, max(profile.weight_bits(op_class)))
    floats = [float_precision(profile)] if quick else _float_precisions(profile)
    out = [Setting(p, p) for p in floats]
    out += [
        Setting(f"W{bits}A8 K=1", "int8", bits, 1),
        Setting(f"W{bits}A8 K=2 branches", "int8", bits, 2),
    ]
    if op_class != "depthwise":  # the pass keeps grouped convs as branches
        out.append(Setting(f"W{bits}A8 K=2 concat", "int8", bits, 2, form="concat"))
    if quick:
        return out
    fp = float_precision(profile)
    out += [
        Setting(f"W{bits}A8 K=2 gamma=0.5", "int8", bits, 2, gamma=0.5),
        Setting(f"W{bits}A{fp} K=2 weight-only", fp, bits, 2, act_bits=0),
        Setting(f"W{bits}A8 K=2 gamma=0.25", "int8", bits, 2, gamma=0.25),  # dropped first when short of time
    ]
    if q.int4_weight_only and 4 in profile.weight_bits(op_class):
        out += [Setting(f"W4A{fp} K={k} int4 weight-only", "int4", 4, k, act_bits=0) for k in (1, 2)]
    return out


def _float_precisions(profile: Profile) -> list[str]:
    q = profile.quantization
    return ["fp32", *(["bf16"] if q.bf16 else []), *(["fp16"] if q.fp16 else [])]


def micro_model(shape: Shape, seed: int = 0) -> onnx.ModelProto:
    """``shape.depth`` identical stacked layers, each followed by Relu, with seeded random weights."""
    rng = np.random.default_rng(seed)
    c, hw = shape.channels, shape.spatial
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i in range(shape.depth):
        b = rng.normal(0.0, 0.1, c).astype(np.float32)
        if shape.op_class == "gemm":
            w = rng.normal(0.0, 1.0 / np.sqrt(c), (c, c)).astype(np.float32)
            node = helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"layer{i}", transB=1)
        elif shape.op_class == "matmul":  # (1, rows, c) @ (c, c) + b: a transformer's linear layer
            w = rng.normal(0.0, 1.0 / np.sqrt(c), (c, c)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
            node = helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"bias{i}")
        else:
            k, group = (1, 1) if shape.op_class == "pointwise" else (3, c if shape.op_class == "depthwise" else 1)
            w = rng.normal(0.0, 1.0 / np.sqrt(c // group * k * k), (c, c // group, k, k)).astype(np.float32)
            pad = k // 2
            node = helper.make_node(
                "Conv", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"layer{i}", pads=[pad] * 4, group=group
            )
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [node, helper.make_node("Relu", [f"y{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    dims = {"gemm": [1, c], "matmul": [1, hw, c]}.get(shape.op_class, [1, c, hw, hw])
    return _model(nodes, inits, dims, x)


def empty_model() -> onnx.ModelProto:
    """A graph with no Conv/Gemm (one Relu on 16 values): the per-inference overhead."""
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [], [1, 16], "y")


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], dims: list[int], out: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "rexdeploy_calibration",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, dims)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rexdeploy")
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------------------------------
# the fit


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares ``argmin ||a x - b||, x >= 0`` (Lawson & Hanson 1974, active set)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10.0 * np.finfo(np.float64).eps * max(a.shape) * max(1.0, float(np.abs(a).sum(axis=0).max(initial=0.0)))
    w = a.T @ (b - a @ x)
    for _ in range(max_iter or 3 * n + 10):
        if passive.all() or not np.any(w[~passive] > tol):
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0.0):
                x = z
                break
            neg = passive & (z <= 0.0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)
    return x


SCALARS = (
    "model_overhead_us",
    "layer_overhead_us",
    "branch_overhead_us",
    "bandwidth_gbps",
    "activation_bandwidth_gbps",
    "quantize_bandwidth_gbps",
    "sparse_overhead_us",
)


def _rate_columns(points: Sequence[CalibrationPoint]) -> list[tuple[str, str]]:
    """The (op class, precision) throughputs the points depend on, one design-matrix column each."""
    return sorted({(p.op_class, p.precision) for p in points if p.layer is not None})


def _row(point: CalibrationPoint, rates: list[tuple[str, str]], with_extra: bool) -> np.ndarray:
    """Design-matrix row: the point's µs is ``row @ [model, layer, branch overheads, 1/BW, 1/BWa, 1/BWq,
    sparse overhead, 1/T...]``."""
    row = np.zeros(len(SCALARS) + len(rates))
    row[0] = 1.0
    lt = point.terms()
    if lt is None:
        return row
    parts = [lt.first, lt.extra] if with_extra else [lt.first]
    for t in parts:
        row[1] += point.depth * t.layers
        row[2] += point.depth * t.branches
        row[3] += point.depth * t.bytes / 1e3
        row[4] += point.depth * t.act_bytes / 1e3
        row[5] += point.depth * t.quant_bytes / 1e3
        row[6] += point.depth * t.sparse_orders
        row[len(SCALARS) + rates.index((lt.op_class, lt.precision))] += point.depth * t.macs / 1e3
    return row


def _round(value: float, digits: int = 4) -> float:
    return 0.0 if value == 0.0 else float(f"{value:.{digits}g}")


def predict_point_ms(cost: CostModel, point: CalibrationPoint) -> float:
    """The cost model's prediction for one micro-benchmark graph."""
    lt = point.terms()
    layer_us = 0.0 if lt is None else point.depth * layer_terms_us(cost, lt)
    return (cost.model_overhead_us + layer_us) / 1e3


def fit_cost_model(points: Sequence[CalibrationPoint], base: CostModel) -> Fit:
    """Fit the coefficients of :mod:`rexdeploy.costmodel` to measured points (see the module docstring).

    Coefficients no point depends on keep ``base``'s values; a coefficient the fit drives to zero
    becomes a zero overhead, or a rate of 10⁶ (GMAC/s, GB/s: effectively free).
    """
    if not points:
        raise RexError("no calibration point was measured; nothing to fit")
    rates = _rate_columns(points)
    linear = [p for p in points if (t := p.terms()) is None or not t.concat]
    concat = [p for p in points if (t := p.terms()) is not None and t.concat]
    a = np.stack([_row(p, rates, with_extra=True) for p in linear])
    y = np.array([p.measured_ms * 1e3 for p in linear])
    used = np.any(a != 0.0, axis=0)
    weighted = a[:, used] / y[:, None]  # relative error: row i divided by its measured time
    scale = np.linalg.norm(weighted, axis=0)
    x = np.zeros(a.shape[1])
    x[used] = nnls(weighted / scale, np.ones(len(linear))) / scale
    fitted: list[str] = []
    values: dict[str, Any] = {}
    for col, name in enumerate(SCALARS[:3]):
        if used[col]:
            values[name] = _round(x[col])
            fitted.append(name)
    for col, name in ((3, "bandwidth_gbps"), (4, "activation_bandwidth_gbps"), (5, "quantize_bandwidth_gbps")):
        if used[col]:
            values[name] = _round(1.0 / x[col]) if x[col] > 1.0 / MAX_RATE else 0.0
            fitted.append(name)
    if used[6]:
        values["sparse_overhead_us"] = _round(x[6])
        fitted.append("sparse_overhead_us")
    table = {op: dict(rates) for op, rates in base.throughput_gmacs.items()}
    for col, (op_class, precision) in enumerate(rates, start=len(SCALARS)):
        if used[col]:
            table.setdefault(op_class, {})[precision] = _round(min(MAX_RATE, 1.0 / x[col]) if x[col] > 0 else MAX_RATE)
            fitted.append(f"throughput_gmacs.{op_class}.{precision}")
    values["throughput_gmacs"] = {op: dict(sorted(rates.items())) for op, rates in sorted(table.items())}
    cost = dataclasses.replace(base, calibrated=True, **values)
    if concat:
        cost = dataclasses.replace(cost, concat_factor=_fit_concat(cost, concat))
        fitted.append("concat_factor")
    predicted = tuple(dataclasses.replace(p, predicted_ms=predict_point_ms(cost, p)) for p in points)
    errors = np.abs(np.array([p.error or 0.0 for p in predicted]))
    return Fit(
        cost=cost,
        points=predicted,
        within_10=float(np.mean(errors <= 0.10)),
        within_20=float(np.mean(errors <= 0.20)),
        median_abs_error=float(np.median(errors)),
        fitted=tuple(fitted),
    )


def _fit_concat(cost: CostModel, points: Sequence[CalibrationPoint]) -> float:
    """ρ minimising the relative error of ``overhead + depth (first + ρ extra)`` on the concat points."""
    base = dataclasses.replace(cost, concat_factor=1.0)
    y = np.array([p.measured_ms * 1e3 for p in points])
    first = np.array([predict_point_ms(base, dataclasses.replace(p, order=1)) * 1e3 for p in points])
    full = np.array([predict_point_ms(base, p) * 1e3 for p in points])
    extra = full - first
    w = 1.0 / y**2
    rho = float(np.sum(w * extra * (y - first)) / np.sum(w * extra**2)) if np.any(extra > 0) else 1.0
    return _round(max(MIN_CONCAT_FACTOR, rho))


# --------------------------------------------------------------------------------------------------
# whole networks


@dataclass(frozen=True)
class NetworkPoint:
    """A whole network measured under one plan: its layers' terms (:func:`rexdeploy.costmodel.plan_layer_terms`)
    and the measured median."""

    model: str
    label: str
    terms: tuple[LayerTerms, ...]
    measured_ms: float


def coefficient_vector(cost: CostModel, rates: Sequence[tuple[str, str]]) -> np.ndarray:
    """``cost`` in the design-matrix layout of :func:`network_row` (overheads in µs, 1/rates; 0 for a rate
    of 0, which drops its term)."""

    def inv(rate: float) -> float:
        return 1.0 / rate if rate > 0.0 else 0.0

    head = [
        cost.model_overhead_us,
        cost.layer_overhead_us,
        cost.branch_overhead_us,
        inv(cost.bandwidth_gbps),
        inv(cost.activation_bandwidth_gbps),
        inv(cost.quantize_bandwidth_gbps),
        cost.sparse_overhead_us,
    ]
    tail = [inv(cost.throughput_gmacs.get(op, {}).get(p, 0.0)) for op, p in rates]
    return np.array(head + tail)


def network_row(point: NetworkPoint, rates: Sequence[tuple[str, str]], concat_factor: float = 1.0) -> np.ndarray:
    """Design-matrix row of a network: its predicted µs is ``row @ coefficient_vector(cost, rates)``."""
    row = np.zeros(len(SCALARS) + len(rates))
    row[0] = 1.0
    for lt in point.terms:
        for t, w in ((lt.first, 1.0), (lt.extra, concat_factor if lt.concat else 1.0)):
            row[1] += w * t.layers
            row[2] += w * t.branches
            row[3] += w * t.bytes / 1e3
            row[4] += w * t.act_bytes / 1e3
            row[5] += w * t.quant_bytes / 1e3
            row[6] += w * t.sparse_orders
            row[len(SCALARS) + list(rates).index((lt.op_class, lt.precision))] += w * t.macs / 1e3
    return row


def _precision_rates(cost: CostModel, points: Sequence[NetworkPoint]) -> list[tuple[str, str]]:
    """The (op class, table precision) columns the points use, after the fallbacks of the cost model."""
    from rexdeploy.costmodel import FALLBACK

    out = set()
    for pt in points:
        for lt in pt.terms:
            table = cost.throughput_gmacs.get(lt.op_class, {})
            p = next((q for q in FALLBACK.get(lt.precision, (lt.precision,)) if q in table), lt.precision)
            out.add((lt.op_class, p))
    return sorted(out)


def _resolved(cost: CostModel, point: NetworkPoint) -> NetworkPoint:
    """The point with each layer's precision replaced by the table entry it falls back to."""
    from rexdeploy.costmodel import FALLBACK

    terms = []
    for lt in point.terms:
        table = cost.throughput_gmacs.get(lt.op_class, {})
        p = next((q for q in FALLBACK.get(lt.precision, (lt.precision,)) if q in table), lt.precision)
        terms.append(dataclasses.replace(lt, precision=p))
    return dataclasses.replace(point, terms=tuple(terms))


def fit_network_terms(points: Sequence[NetworkPoint], base: CostModel, names: Sequence[str]) -> CostModel:
    """Refit the coefficients ``names`` (scalar names of ``SCALARS`` or ``throughput_gmacs.<class>.<precision>``)
    on whole-network measurements, the others fixed at ``base``: non-negative least squares on the relative
    error, as :func:`fit_cost_model` does on micro-benchmarks. Evaluate the result on networks or plans not
    in ``points`` (hold-out)."""
    if not points:
        raise RexError("no network point was measured; nothing to fit")
    resolved = [_resolved(base, p) for p in points]
    rates = _precision_rates(base, points)
    columns = [*SCALARS, *(f"throughput_gmacs.{op}.{p}" for op, p in rates)]
    unknown = sorted(set(names) - set(columns))
    if unknown:
        raise RexError(f"cannot fit {unknown} on these networks; the points determine {columns}")
    a = np.stack([network_row(p, rates, base.concat_factor) for p in resolved])
    y = np.array([p.measured_ms * 1e3 for p in points])
    x = coefficient_vector(base, rates)
    free = np.array([c in names for c in columns])
    fixed = a[:, ~free] @ x[~free]
    weighted = a[:, free] / y[:, None]
    scale = np.linalg.norm(weighted, axis=0)
    scale[scale == 0.0] = 1.0
    x[free] = nnls(weighted / scale, 1.0 - fixed / y) / scale
    values: dict[str, Any] = {}
    table = {op: dict(r) for op, r in base.throughput_gmacs.items()}
    for col, name in enumerate(columns):
        if not free[col]:
            continue
        if name.startswith("throughput_gmacs."):
            _, op, p = name.split(".")
            table.setdefault(op, {})[p] = _round(min(MAX_RATE, 1.0 / x[col]) if x[col] > 0 else MAX_RATE)
        elif name.endswith("_gbps"):
            values[name] = _round(1.0 / x[col]) if x[col] > 1.0 / MAX_RATE else 0.0
        else:
            values[name] = _round(x[col])
    return dataclasses.replace(base, throughput_gmacs=table, **values)


# --------------------------------------------------------------------------------------------------
# measuring


def _builder(profile: Profile) -> Builder:
    builder = get_builder(profile.engine)
    if not builder.available():
        extra = f"pip install 'rexdeploy[{builder.pip_extra}]'" if builder.pip_extra else "pip install rexdeploy"
        raise EngineUnavailableError(
            f"the {profile.engine} engine of profile {profile.name!r} is not installed here: {extra} "
            "(calibrate on the device the profile describes)"
        )
    return builder


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _kernels(builder: Builder, engine: Any) -> str:
    """The runtime precisions of the engine's Conv/MatMul kernels, e.g. ``Convolution u8×3``."""
    summary = getattr(builder, "precision_summary", None)
    if not callable(summary):
        return ""
    try:
        table = summary(engine)
    except RexError:
        return ""
    kinds = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")
    return ", ".join(f"{kind} {p}×{n}" for kind in kinds for p, n in table.get(kind, {}).items())


@dataclass
class _Built:
    """A built micro-benchmark waiting to be timed (mutable: the rounds append their timings)."""

    index: int
    label: str
    shape: Shape | None
    setting: Setting
    layer: Layer | None
    engine: Any
    kernels: str
    timings: list[Timing] = field(default_factory=list)


def calibrate(
    profile: Profile,
    *,
    progress: Progress | None = None,
    budget_s: float = 150.0,
    quick: bool = False,
    rounds: int | None = None,
    timing: TimingSettings | None = None,
) -> tuple[Profile, CalibrationReport]:
    """Measure micro-benchmarks with ``profile``'s engine here and fit its cost model.

    Every grid point is built first; then all of them are timed in ``rounds`` round-robin passes
    (5; quick: 2) and each point keeps the lowest of its round medians, so that a burst of load from
    other processes spoils one round of a point, not the point. Building stops at 70 % of
    ``budget_s`` and further rounds are dropped when they would overrun it; points left out are
    listed in the report with the reason. Returns the profile with the fitted ``[cost]``
    (``calibrated = true``) and the report (every point measured vs predicted). ``quick`` measures a
    tiny grid (tests).
    """
    builder = _builder(profile)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rounds = rounds or (2 if quick else 5)
    timing = timing or (
        TimingSettings(warmup_s=0.03, duration_s=0.08, min_runs=3)
        if quick
        else TimingSettings(warmup_s=0.02, duration_s=0.08, min_runs=4)
    )
    notes: list[str] = []
    if profile.engine == "openvino":
        missing = missing_flags(profile.requires)
        if missing:
            notes.append(
                f"this CPU lacks {', '.join(missing)} that profile {profile.name!r} is for: the fitted coefficients "
                f"describe this host; `--profile auto` is {host_profile_name()!r} here"
            )
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    per_shape = [settings_for(profile, shape.op_class, quick) for shape in shapes]
    jobs: list[tuple[Shape | None, Setting | None]] = [(None, None)]
    for rank in range(max(len(s) for s in per_shape)):  # every shape's first setting, then the second, ...
        jobs += [(shape, s[rank]) for shape, s in zip(shapes, per_shape, strict=True) if rank < len(s)]
    total = len(jobs) * (1 + rounds)
    say = progress or (lambda done, total, label: None)
    skipped: list[tuple[str, str]] = []
    built: list[_Built] = []
    with tempfile.TemporaryDirectory(prefix="rexdeploy-calibrate-") as tmp:
        build_s: list[float] = []
        for index, (job_shape, setting) in enumerate(jobs):
            label = "empty graph (per-inference overhead)"
            if job_shape is not None and setting is not None:
                label = f"{job_shape.op_class}/{job_shape.size} {setting.name}"
            say(index, total, f"building {label}")
            estimate = float(np.mean(build_s)) if build_s else 1.0
            if time.perf_counter() - t_start + estimate > BUILD_SHARE * budget_s:
                skipped.append((label, f"time budget of {budget_s:g} s reached"))
                continue
            t0 = time.perf_counter()
            try:
                item = _build(builder, profile, index, job_shape, setting, label, Path(tmp) / f"p{index}")
            except PlanError as exc:
                skipped.append((label, f"the expansion pass cannot emit it: {_first_line(exc)}"))
                continue
            except BuildError as exc:
                if job_shape is None:  # the engine cannot run even an empty graph: nothing will work
                    raise
                skipped.append((label, f"the {profile.engine} engine failed on it: {_first_line(exc)}"))
                continue
            if item is None:
                precision = setting.precision if setting else ""
                skipped.append((label, f"the {profile.engine} builder cannot run float layers in {precision}"))
                continue
            built.append(item)
            build_s.append(time.perf_counter() - t0)
        t_built = time.perf_counter()
        round_s = 0.0
        for r in range(rounds):
            t_round = time.perf_counter()
            if r and time.perf_counter() - t_start + round_s > budget_s:
                notes.append(f"timed {r} of {rounds} rounds within the {budget_s:g} s time budget")
                break
            for item in built:
                say(len(jobs) * (1 + r) + item.index, total, f"timing {item.label} (round {r + 1}/{rounds})")
                if r == 0 and time.perf_counter() - t_start > budget_s:
                    break
                item.timings.append(builder.time(item.engine, timing))
            round_s = time.perf_counter() - t_round
        t_timed = time.perf_counter()
        for item in built:
            item.engine = None  # release the compiled model before its files go
    say(total, total, "fitting")
    points = [_point(item) for item in built if item.timings]
    skipped += [(item.label, f"time budget of {budget_s:g} s reached") for item in built if not item.timings]
    if not points:
        raise InputError(
            f"no calibration point could be measured within the {budget_s:g} s time budget; raise --time-budget"
        )
    fit = fit_cost_model(points, profile.cost)
    unmeasured = sorted(
        f"{op}.{p}"
        for op, rates in fit.cost.throughput_gmacs.items()
        for p in rates
        if f"throughput_gmacs.{op}.{p}" not in fit.fitted
    )
    if unmeasured:
        notes.append(f"not measured, kept from the profile: throughput_gmacs {', '.join(unmeasured)}")
    report = CalibrationReport(
        profile=profile.name,
        engine=profile.engine,
        engine_version=builder.version(),
        device=profile.device,
        date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        grid="quick" if quick else "full",
        wall_s=time.perf_counter() - t_start,
        build_s=t_built - t_start,
        timing_s=t_timed - t_built,
        timing=timing,
        rounds=rounds,
        points=fit.points,
        skipped=tuple(skipped),
        previous=profile.cost,
        cost=fit.cost,
        within_10=fit.within_10,
        within_20=fit.within_20,
        median_abs_error=fit.median_abs_error,
        fitted=fit.fitted,
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        notes=tuple(notes),
    )
    return dataclasses.replace(profile, cost=fit.cost), report


def _build(
    builder: Builder,
    profile: Profile,
    index: int,
    shape: Shape | None,
    setting: Setting | None,
    label: str,
    work: Path,
) -> _Built | None:
    """Make the micro-benchmark graph (expanded by the pass when quantized) and build it; None when the
    engine cannot run float layers in the setting's precision."""
    from rexdeploy.api import expand_model

    build_profile: Profile | None = profile
    layer: Layer | None = None
    if shape is None or setting is None:
        model = empty_model()
        setting = Setting("overhead", float_precision(profile))
    else:
        model = micro_model(shape)
        layer = find_layers(model)[0]
        if setting.bits is None:
            build_profile = profile.with_float_precision(setting.precision)
        else:
            model = expand_model(
                model,
                profile=profile,
                bits=setting.bits,
                order=setting.order,
                gamma=setting.gamma,
                act_bits=setting.act_bits,
                form=setting.form,
            ).model
    if build_profile is None:
        return None
    path = save_model(model, work / "model.onnx", check=False)
    engine = builder.build(path, build_profile, work / "engine")
    return _Built(index, label, shape, setting, layer, engine, _kernels(builder, engine))


def _point(item: _Built) -> CalibrationPoint:
    """The point of a built micro-benchmark: the lowest of its round medians."""
    best = min(item.timings, key=lambda t: t.median_ms)
    shape, s = item.shape, item.setting
    return CalibrationPoint(
        label=item.label,
        op_class="" if shape is None else shape.op_class,
        size="" if shape is None else shape.size,
        setting=s.name,
        precision=s.precision,
        bits=s.bits,
        order=s.order,
        gamma=s.gamma,
        act_bits=s.act_bits,
        form=s.form,
        depth=0 if shape is None else shape.depth,
        layer=item.layer,
        measured_ms=best.median_ms,
        cov=best.cov,
        runs=sum(t.runs for t in item.timings),
        kernels=item.kernels,
        rounds_ms=tuple(t.median_ms for t in item.timings),
    )


def calibrated_toml(profile: Profile, report: CalibrationReport) -> str:
    """The fitted profile as TOML, headed by a comment saying when and how well it was fitted."""
    header = [
        f"# Cost model calibrated by `rexdeploy profile calibrate` on {report.date}",
        f"# ({report.engine} {report.engine_version}, {report.grid} grid, {report.wall_s:.0f} s, "
        f"load average {report.loadavg_start[0]:.2f}): {report.quality_line()}.",
    ]
    return "\n".join(header) + "\n" + profile.to_toml()


__all__ = [
    "FULL_SHAPES",
    "QUICK_SHAPES",
    "CalibrationPoint",
    "CalibrationReport",
    "Fit",
    "NetworkPoint",
    "Progress",
    "Setting",
    "Shape",
    "calibrate",
    "calibrated_toml",
    "coefficient_vector",
    "empty_model",
    "fit_cost_model",
    "fit_network_terms",
    "micro_model",
    "network_row",
    "nnls",
    "predict_point_ms",
    "settings_for",
]
