"""Measured planning, the latency side: probe engines of *this* model → a :class:`CostTable`.

``build`` (and ``plan`` where the engine is installed) builds a few uniform probe plans of the model
(:func:`probe_plans`), times each one unprofiled, reads every ONNX node's time from the engine's own
profiler (``Builder.layer_times``), charges each node to the quantizable layer it belongs to
(:func:`node_owners`), and scales the per-layer times so that layers + rest add up to the measured
median. The table is cached on disk, keyed by the model's sha256, the profile, the engine and its
version, and the host CPU (model name and flags): a second build plans without probing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from rexdeploy.analyze import Layer
from rexdeploy.builders.base import Builder, Engine, LayerTimes, TimingSettings
from rexdeploy.builders.cache import cache_root, engine_format
from rexdeploy.builders.timing import Timing, combine_rounds, time_rounds
from rexdeploy.costmodel import engine_profile, has_dynamic_activations, input_elements
from rexdeploy.errors import PlanError, RexError
from rexdeploy.fileio import write_text_atomic
from rexdeploy.hostcpu import host_id
from rexdeploy.planner.costtable import CostTable, Point, ProbeRecord, analytic_us, option_key, quantized_share
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import Profile

log = logging.getLogger(__name__)

PROBE_TIMING = TimingSettings(warmup_s=0.2, duration_s=1.0, min_runs=10)  # per probe, over PROBE_ROUNDS rounds
PROBE_ROUNDS = 5
BUILD_CHECK = TimingSettings(warmup_s=0.0, duration_s=0.0, runs=3)  # a probe runs: timed later, interleaved
PROFILE_TIMING = TimingSettings(warmup_s=0.1, duration_s=0.5, min_runs=10)
_PLUMBING = frozenset({"QuantizeLinear", "DequantizeLinear", "Sub", "Identity", "Gather", "Concat", "Pad", "Slice",
                       "Mul", "Split", "Sum", "Add", "Reshape", "Transpose"})  # fmt: skip


@dataclass(frozen=True)
class Probe:
    """A uniform probe plan (no layer: the float engine) and the label progress and the report use."""

    label: str
    plan: Plan


@dataclass(frozen=True)
class Measured:
    """One engine measured in this run: its plan, engine, ONNX file, timing and (when profiled) layer times."""

    label: str
    plan: Plan
    engine: Engine
    onnx_path: Path
    timing: Timing
    layer_times: LayerTimes | None = None
    error: float | None = None  # measured relative output error vs FP32 (a float engine that is not exact)


def probe_plans(layers: list[Layer], profile: Profile, model_sha256: str = "") -> list[Probe]:
    """The probes the planner's menu needs, beyond the float engine: uniform int8 K=1, K=2 dense, K=2 at
    γ = 0.5 (sparse), activation order 2 (when the profile offers it), weight-only K=1 (when float
    activations are allowed; and with dynamic activations where the engine has them and the model has
    Gemm/MatMul layers). Each layer takes the highest weight bits its class allows."""

    def uniform(order: int, gamma: float | None = None, act_bits: int = 8, act_order: int = 1) -> Plan:
        lps = {
            layer.name: LayerPlan(bits=max(profile.weight_bits(layer.op_class)), order=order, gamma=gamma,
                                  act_bits=act_bits, form=profile.defaults.form, act_order=act_order)
            for layer in layers
        }
        return Plan(layers=lps, profile=profile.name, model_sha256=model_sha256)

    q = profile.quantization
    probes = [Probe("int8 K=1", uniform(1)), Probe("int8 K=2", uniform(2)), Probe("int8 K=2 g=0.5", uniform(2, 0.5))]
    if q.max_act_order >= 2:
        probes.append(Probe("int8 K=2 act order 2", uniform(2, act_order=2)))
    if q.float_activations:
        probes.append(Probe("weight-only K=1", uniform(1, act_bits=0)))
        if has_dynamic_activations(profile) and not q.dynamic_activations and any(
            layer.op_class in ("gemm", "matmul") for layer in layers
        ):  # the planner's dynamic-activation engine: weight-only Gemm/MatMul layers on runtime-quantized inputs
            dynamic = dataclasses.replace(uniform(1, act_bits=0), dynamic_activations=True)
            probes.append(Probe("weight-only K=1 dynamic", dynamic))
        if len(layers) >= 2:  # every other layer int8: the transitions between int8 and float layers
            k1 = uniform(1)
            alternate = {layer.name: k1.layers[layer.name] for layer in layers[::2]}
            probes.append(Probe("int8 K=1 alternate", Plan(layers=alternate, profile=profile.name,
                                                                model_sha256=model_sha256)))  # fmt: skip
    return probes


def layer_producers(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, tuple[str, ...]]:
    """Each quantizable layer → the quantizable layers whose outputs reach its input through other ops
    (activations, pooling, residual Adds, reshapes); ``model`` is the BN-folded model the layers came from."""
    by_output = {layer.output: layer.name for layer in layers}
    producer = {o: node for node in model.graph.node for o in node.output}
    memo: dict[str, frozenset[str]] = {}

    def feeders(tensor: str) -> frozenset[str]:
        stack: list[str] = [tensor]
        seen: set[str] = set()
        found: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in memo:
                found |= memo[t]
            elif t in by_output:
                found.add(by_output[t])
            elif t in producer:
                stack.extend(i for i in producer[t].input if i)
        memo[tensor] = frozenset(found)
        return memo[tensor]

    return {layer.name: tuple(sorted(feeders(layer.input))) for layer in layers}


def node_owners(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, str]:
    """ONNX node (its name, or its first output when unnamed — the names engines report) → the quantizable
    layer it belongs to. A node is a layer's when it produces the layer's output, or its name is the layer's
    name or starts with it followed by ``_`` (the pass names orders, sums and weights so; the longest name
    wins); a Q/DQ / Sub / Gather ... node whose every consumer belongs to one layer belongs to it too (the
    activation quantization of the layer's input)."""
    by_output = {layer.output: layer.name for layer in layers}
    names = sorted((layer.name for layer in layers), key=len, reverse=True)
    owners: dict[str, str] = {}
    idents: list[str] = []
    for node in model.graph.node:
        ident = node.name or (node.output[0] if node.output else "")
        idents.append(ident)
        owner = next((by_output[o] for o in node.output if o in by_output), None)
        if owner is None and node.name:
            owner = next((n for n in names if node.name == n or node.name.startswith(n + "_")), None)
        if owner is not None:
            owners[ident] = owner
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    for i in reversed(range(len(model.graph.node))):  # consumers come later in a topologically sorted graph
        node = model.graph.node[i]
        if idents[i] in owners or node.op_type not in _PLUMBING:
            continue
        readers = {owners.get(idents[j]) for o in node.output for j in consumers.get(o, [])}
        if len(readers) == 1 and None not in readers:
            owners[idents[i]] = readers.pop()  # type: ignore[assignment]
    return owners


def split_layer_times(
    times: LayerTimes, owners: Mapping[str, str], median_ms: float
) -> tuple[dict[str, float], float]:
    """Per-layer µs and the rest, scaled so that they add up to the unprofiled ``median_ms``."""
    per_layer: dict[str, float] = {}
    rest = times.unmapped_us
    for node, us in times.nodes.items():
        owner = owners.get(node)
        if owner is None:
            rest += us
        else:
            per_layer[owner] = per_layer.get(owner, 0.0) + us
    total = sum(per_layer.values()) + rest
    scale = median_ms * 1000.0 / total if total > 0 else 1.0
    return {k: v * scale for k, v in per_layer.items()}, rest * scale


def table_key(model_sha256: str, profile: Profile, builder: Builder) -> str:
    parts = [model_sha256, profile.to_toml(), builder.name, builder.version(), engine_format(builder), host_id(),
             "costtable-6"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def table_path(key: str) -> Path:
    return cache_root() / "costtables" / f"{key}.json"


def load_cached(key: str) -> CostTable | None:
    path = table_path(key)
    if not path.is_file():
        return None
    try:
        table = CostTable.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, RexError) as exc:
        log.debug("cost table %s unreadable (%s): probing again", path, exc)
        return None
    return table if table.key == key else None


def save_cached(table: CostTable) -> None:
    try:
        path = table_path(table.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, table.to_json())
    except OSError as exc:  # a read-only cache is not an error: the next build probes again
        log.debug("cannot cache the cost table: %s", exc)


def _is_uniform(plan: Plan, layers: list[Layer]) -> bool:
    """Every layer float, or every layer the same setting."""
    lps = {plan.layers.get(layer.name) for layer in layers}
    return len(lps) == 1


def _is_reference(plan: Plan, layers: list[Layer]) -> bool:
    """The float engine, or uniform int8 K=1 (one activation order, dense) on every layer."""
    lps = [plan.layers.get(layer.name) for layer in layers]
    if all(lp is None for lp in lps):
        return True
    return all(lp is not None and lp.act_bits == 8 and lp.order == 1 and lp.act_order == 1 and lp.predictors == 1
               for lp in lps)  # fmt: skip


def table_from_measurements(
    measured: list[Measured],
    layers: list[Layer],
    profile: Profile,
    owners_of: Callable[[Measured], Mapping[str, str]],
    producers: Mapping[str, tuple[str, ...]] | None = None,
) -> CostTable:
    """Assemble the cost table from profiled engines (each a uniform plan, or the float engine; a mixed plan —
    the alternating probe — measures the transition term instead: what its median exceeds the table's
    prediction by, per transition, averaged over such probes and never negative).

    The rest line is fitted on the reference engines — the float engine (quantized share 0) and uniform int8
    K=1 (share 1) — when both are there, else on every engine. What another probe's rest differs from the
    line (the remainder Subs of activation orders, a sparse order's scatter the profiler did not name) is
    spread over its layers in proportion to their times, so every probe's own plan is predicted at exactly
    its measured median."""
    split = []
    mixed = [m for m in measured if not _is_uniform(m.plan, layers)]
    for m in measured:
        if m in mixed:
            continue
        if m.layer_times is None:
            raise PlanError(f"probe {m.label!r} has no layer times")
        per_layer, rest = split_layer_times(m.layer_times, owners_of(m), m.timing.median_ms)
        split.append((m, per_layer, rest, quantized_share(layers, m.plan.layers)))
    refs = [(share, rest) for m, _, rest, share in split if _is_reference(m.plan, layers)]
    if len({share for share, _ in refs}) < 2:
        refs = [(share, rest) for _, _, rest, share in split]
    line = CostTable(layers={}, rest_points=tuple(refs))
    table: dict[str, dict[str, Point]] = {}
    records: list[ProbeRecord] = []
    for m, per_layer, rest, share in split:
        excess = rest - line.rest_us(share)
        total = sum(per_layer.values())
        built = engine_profile(profile, m.plan)  # the float precision this engine ran in
        for layer in layers:
            if layer.name in per_layer:
                lp = m.plan.layers.get(layer.name)
                us = per_layer[layer.name] * (1.0 + excess / total if total > 0 else 1.0)
                key = option_key(built, layer, lp).text
                table.setdefault(layer.name, {})[key] = Point(analytic_us(built, layer, lp), max(us, 0.0))
        summary = m.plan.summary() if m.plan.layers else "float"
        assert m.layer_times is not None
        records.append(ProbeRecord(m.label, summary, m.timing.median_ms, m.layer_times.total_us, rest, share,
                                   m.engine.build_seconds))  # fmt: skip
    edges = {layer.name: input_elements(layer) / 1000.0 for layer in layers}
    result = CostTable(layers=table, rest_points=tuple(refs), probes=tuple(records), producers=dict(producers or {}),
                       edge_elements=edges)  # fmt: skip
    per_transition = []
    for m in mixed:
        n = result.transitions(m.plan.layers)
        if n:
            predicted_us = result.predict_ms(engine_profile(profile, m.plan), layers, m.plan.layers,
                                             with_transitions=False) * 1000.0  # fmt: skip
            per_transition.append((m.timing.median_ms * 1000.0 - predicted_us) / n)
        records.append(ProbeRecord(m.label, m.plan.summary(), m.timing.median_ms, 0.0, 0.0,
                                   quantized_share(layers, m.plan.layers), m.engine.build_seconds))  # fmt: skip
    tau = max(float(np.mean(per_transition)), 0.0) if per_transition else 0.0
    return replace(result, probes=tuple(records), transition_us=tau)


def probe_cost_table(
    builder: Builder,
    layers: list[Layer],
    profile: Profile,
    model_sha256: str,
    make: Callable[[Probe], Measured],
    *,
    producers: Mapping[str, tuple[str, ...]] | None = None,
    float_engines: Sequence[Measured],
    reuse: Mapping[str, Measured] | None = None,
    use_cache: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[CostTable, list[Measured]]:
    """The model's cost table on this device: cached, or probed now. ``make`` expands and builds one probe
    (``reuse``: probes already built, by label, e.g. the plain int8 baseline); ``float_engines`` are the float
    baselines (FP32, and the device's default float precision where it differs: each fills its own ``float-<p>``
    entries). The probes and the float engines are then timed in interleaved rounds (:data:`PROBE_ROUNDS`) and
    profiled. Returns the table and the engines measured now, float ones first (empty on a cache hit)."""
    key = table_key(model_sha256, profile, builder)
    if use_cache:
        cached = load_cached(key)
        if cached is not None:
            say(f"cost table: cached ({len(cached.probes)} probe engines measured earlier on this host)")
            return replace(cached, cached=True), []
    t0 = time.perf_counter()
    probes = probe_plans(layers, profile, model_sha256)
    floats = len(float_engines)
    say(f"probing: {len(probes)} probe engines + {floats} float engine{'s' if floats > 1 else ''}, each timed and "
        "profiled per layer ...")  # fmt: skip
    measured: list[Measured] = []
    for i, probe in enumerate(probes, start=1):
        say(f"probe {i}/{len(probes)}: {probe.label}")
        measured.append((reuse or {}).get(probe.label) or make(probe))
    # all probes and the float engine timed in interleaved rounds: a drift of the machine hits each alike
    engines = [*float_engines, *measured]
    say(f"timing the {len(engines)} engines in {PROBE_ROUNDS} interleaved rounds ...")
    rounds = time_rounds(builder, {str(i): m.engine for i, m in enumerate(engines)}, rounds=PROBE_ROUNDS,
                         round_s=PROBE_TIMING.duration_s / PROBE_ROUNDS, warmup_s=PROBE_TIMING.warmup_s)  # fmt: skip
    engines = [replace(m, timing=combine_rounds(rounds[str(i)])) for i, m in enumerate(engines)]
    for m in engines:
        say(f"  {m.label}: {m.timing.median_ms:.3f} ms")
    measured = engines[floats:]
    uniform = [m for m in engines if _is_uniform(m.plan, layers)]
    profiled = [with_layer_times(builder, m) for m in uniform] + [m for m in measured if m not in uniform]
    def owners_of(m: Measured) -> Mapping[str, str]:
        return node_owners(onnx.load(str(m.onnx_path), load_external_data=False), layers)

    table = table_from_measurements(profiled, layers, profile, owners_of, producers)
    table = replace(table, key=key, engine=f"{builder.name} {builder.version()}", host=host_id(),
                    seconds=time.perf_counter() - t0)  # fmt: skip
    if use_cache:
        save_cached(table)
    say(f"probing done in {table.seconds:.1f} s: {sum(len(e) for e in table.layers.values())} measured layer options")
    return table, profiled


def with_layer_times(builder: Builder, m: Measured) -> Measured:
    """``m`` with the engine's per-node times read from its profiler (already there: unchanged)."""
    if m.layer_times is not None:
        return m
    times = builder.layer_times(m.engine, PROFILE_TIMING)
    return replace(m, layer_times=times)


__all__ = [
    "PROBE_TIMING",
    "PROFILE_TIMING",
    "Measured",
    "Probe",
    "load_cached",
    "node_owners",
    "probe_cost_table",
    "probe_plans",
    "split_layer_times",
    "table_from_measurements",
    "table_key",
]
