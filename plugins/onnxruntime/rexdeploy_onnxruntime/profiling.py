"""Per-node times from onnxruntime's own profiler, mapped back to the ONNX nodes of the built model.

A second session is opened on the engine's model with the builder's session options plus
``enable_profiling`` (the profile file and the optimized graph go to a temporary directory, removed
afterwards), run on the inputs :meth:`OnnxRuntimeBuilder.time` uses, and its chrome-trace JSON is read:
every ``"cat": "Node"`` event named ``<node>_kernel_time`` holds one kernel's ``dur`` in µs. The warm-up
runs are told apart by the ``model_run`` session events and left out; the rest is averaged per run.
onnxruntime records every run (it cannot start profiling after a warm-up) and drops events past one
million, so a profile keeps about :data:`EVENT_BUDGET` kernel events: the warm-up stops at a fifth of
them, a duration-bound profile stops at the budget once ``min_runs`` are in, and ``settings.runs``
beyond onnxruntime's limit is an InputError naming the most it can take.

Graph optimizations rename what they fuse; an onnxruntime node name is mapped back to an ONNX node by
(in order): the name itself; the name without the suffixes onnxruntime appends (``_token_N``,
``_nchwc``, ``/duplicated``), as a node or as a tensor whose producer is meant (the NCHWc transformer
names a fused Conv after its output); the name cut at each ``/`` (``conv/MatMulAddFusion`` → ``conv``,
``ln/LayerNormFusion/`` → ``ln``); ``<OpType>_<index>``, onnxruntime's name for an unnamed node; and,
for a node named from scratch (``Gelu``, ``Attention``), the producer of its output in the optimized
graph. When the kernel is a Conv / Gemm / MatMul kind (``FusedConv``, ``QLinearConv``, ``QGemm`` ...)
but the node found is not, the nearest such node upstream (≤ 3 producers back) is charged: a fused
Conv+ReLU named after the ReLU's output is the Conv's time. Layout nodes onnxruntime adds (NCHWc
reorders, the reshapes around a MatMul+Add → Gemm) are ``unmapped_us``. Unnamed ONNX nodes are known
by their first output, as every engine reports them.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings
from rexdeploy.errors import BuildError, InputError

# Node events one profiling session keeps: the profile JSON takes ~0.5-0.7 kB per event, and onnxruntime
# drops every event past ORT_EVENT_LIMIT (its profiler's global cap).
EVENT_BUDGET = 50_000
ORT_EVENT_LIMIT = 1_000_000
_SESSION_EVENTS_PER_RUN = 2  # model_run + SequentialExecutor::Execute
_KERNEL_SUFFIX = "_kernel_time"
_ORT_SUFFIX = re.compile(r"(?:_token_\d+|_nchwc|/duplicated)$")
_UNNAMED = re.compile(r"^(?P<op>[A-Za-z][A-Za-z0-9]*)_(?P<index>\d+)$")
_COMPUTE_FAMILIES: tuple[tuple[str, frozenset[str]], ...] = (
    ("Conv", frozenset({"Conv", "ConvTranspose", "ConvInteger"})),
    ("Gemm", frozenset({"Gemm", "MatMul", "MatMulInteger"})),
    ("MatMul", frozenset({"Gemm", "MatMul", "MatMulInteger"})),
)
_LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                         "Identity", "Flatten"})  # fmt: skip
_WALK_BACK = 3


@dataclass(frozen=True)
class OnnxGraph:
    """What mapping onnxruntime's node names needs from the ONNX model: node ident (its name, or its first
    output when unnamed) → op type, tensor → producing node, node → input tensors, and the idents in
    graph order without Constant nodes (onnxruntime's index of a node as it loads the model)."""

    op_types: dict[str, str]
    producers: dict[str, str]
    inputs: dict[str, tuple[str, ...]]
    order: tuple[str, ...]
    unnamed: frozenset[str]

    @classmethod
    def from_proto(cls, proto: Any) -> OnnxGraph:
        op_types: dict[str, str] = {}
        producers: dict[str, str] = {}
        inputs: dict[str, tuple[str, ...]] = {}
        order: list[str] = []
        unnamed: set[str] = set()
        for node in proto.graph.node:
            ident = node.name or (node.output[0] if node.output else "")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                order.append(ident)  # onnxruntime turns Constant nodes into initializers: they get no index
            if not ident:
                continue
            if not node.name:
                unnamed.add(ident)
            op_types.setdefault(ident, node.op_type)
            inputs.setdefault(ident, tuple(node.input))
            producers.update({out: ident for out in node.output if out})
        return cls(op_types, producers, inputs, tuple(order), frozenset(unnamed))


@dataclass(frozen=True)
class KernelTotals:
    """Summed kernel µs per onnxruntime node over ``runs`` profiled runs, with each node's kernel op."""

    us: dict[str, float]
    ops: dict[str, str]
    runs: int


def parse_profile(events: Sequence[Mapping[str, Any]], warmup_runs: int) -> KernelTotals:
    """Sum the ``<node>_kernel_time`` events of the runs after the first ``warmup_runs`` (runs are the
    ``model_run`` session events, in time order). BuildError when no profiled run is in the trace."""
    starts = np.sort(np.array([float(e.get("ts", 0)) for e in events
                               if e.get("cat") == "Session" and e.get("name") == "model_run"], dtype=np.float64))  # fmt: skip
    runs = int(starts.size) - warmup_runs
    if runs < 1:
        raise BuildError(
            f"onnxruntime's profile holds {starts.size} runs, none after the {warmup_runs} warm-up runs; "
            "profile with a shorter warm-up or more runs"
        )
    first = starts[warmup_runs]
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)
               and float(e.get("ts", 0)) >= first]  # fmt: skip
    if not kernels:
        return KernelTotals({}, {}, runs)
    names = np.array([str(e["name"])[: -len(_KERNEL_SUFFIX)] for e in kernels], dtype=object)
    durs = np.array([float(e.get("dur", 0.0)) for e in kernels], dtype=np.float64)
    unique, inverse = np.unique(names, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=durs, minlength=unique.size)
    ops = {str(e["name"])[: -len(_KERNEL_SUFFIX)]: str((e.get("args") or {}).get("op_name", "")) for e in kernels}
    return KernelTotals({str(n): float(s) for n, s in zip(unique, sums, strict=True)}, ops, runs)


def _probes(name: str) -> list[str]:
    """``name``, then without onnxruntime's suffixes, then cut at each ``/`` (longest first)."""
    probes: list[str] = []
    probe = name
    while probe and probe not in probes:
        probes.append(probe)
        stripped = _ORT_SUFFIX.sub("", probe)
        probe = stripped if stripped != probe else (probe.rsplit("/", 1)[0] if "/" in probe else "")
    return probes


def _family(op_name: str) -> frozenset[str] | None:
    return next((ops for key, ops in _COMPUTE_FAMILIES if key in op_name), None)


def _upstream_compute(graph: OnnxGraph, start: str, family: frozenset[str]) -> str | None:
    """The nearest node of ``family`` at most ``_WALK_BACK`` producers upstream of ``start``."""
    frontier, seen = [start], {start}
    for _ in range(_WALK_BACK):
        upstream = [p for node in frontier for t in graph.inputs.get(node, ()) if (p := graph.producers.get(t))]
        frontier = [p for p in dict.fromkeys(upstream) if p not in seen]
        seen.update(frontier)
        found = next((p for p in frontier if graph.op_types.get(p) in family), None)
        if found is not None:
            return found
    return None


def resolve_node(
    ort_name: str, op_name: str, graph: OnnxGraph, outputs: Mapping[str, tuple[str, ...]] | None = None
) -> str | None:
    """The ONNX node (ident) an onnxruntime node's kernel time belongs to, or None (see the module doc).
    ``outputs`` are the optimized graph's node outputs, by onnxruntime node name."""
    found: str | None = None
    for probe in _probes(ort_name):
        found = probe if probe in graph.op_types else graph.producers.get(probe)
        if found is not None:
            break
    unnamed = _UNNAMED.match(ort_name)
    if found is None and unnamed is not None:
        index = int(unnamed["index"])
        ident = graph.order[index] if index < len(graph.order) else ""
        if ident in graph.unnamed and graph.op_types.get(ident) == unnamed["op"]:
            found = ident
    if found is None and op_name not in _LAYOUT_OPS and outputs is not None:
        found = next((graph.producers[t] for t in outputs.get(ort_name, ()) if t in graph.producers), None)
    family = _family(op_name)
    if found is not None and family is not None and graph.op_types.get(found) not in family:
        found = _upstream_compute(graph, found, family) or found
    return found


def map_kernels(totals: KernelTotals, graph: OnnxGraph, outputs: Mapping[str, tuple[str, ...]] | None,
                source: str) -> LayerTimes:  # fmt: skip
    """:class:`LayerTimes` (µs per run, nodes by decreasing time) from summed kernel times."""
    nodes: dict[str, float] = {}
    unmapped = 0.0
    for name, us in totals.us.items():
        node = resolve_node(name, totals.ops.get(name, ""), graph, outputs)
        if node is None:
            unmapped += us
        else:
            nodes[node] = nodes.get(node, 0.0) + us
    runs = totals.runs
    ordered = dict(sorted(((k, v / runs) for k, v in nodes.items()), key=lambda kv: -kv[1]))
    return LayerTimes(ordered, unmapped / runs, sum(totals.us.values()) / runs, runs, source)


def run_schedule(
    run: Callable[[], object],
    settings: TimingSettings,
    max_warmup_runs: int,
    max_runs: int | None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, int]:
    """Warm up for ``settings.warmup_s`` (1 to ``max_warmup_runs`` runs), then run exactly
    ``settings.runs`` times, or for ``duration_s`` with at least ``min_runs`` (stopping early at
    ``max_runs`` once ``min_runs`` are in). Returns (warm-up runs, profiled runs)."""
    warmup = 0
    start = clock()
    while True:
        run()
        warmup += 1
        if clock() - start >= settings.warmup_s or warmup >= max_warmup_runs:
            break
    runs = 0
    start = clock()
    while True:
        run()
        runs += 1
        if settings.runs is not None:
            if runs >= settings.runs:
                break
        elif runs >= settings.min_runs and (clock() - start >= settings.duration_s
                                            or (max_runs is not None and runs >= max_runs)):  # fmt: skip
            break
    return warmup, runs


def _optimized_outputs(path: Path) -> dict[str, tuple[str, ...]]:
    """Node name → output tensors of the optimized graph onnxruntime wrote (empty when unreadable)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    return {node.name: tuple(node.output) for node in proto.graph.node if node.name}


def _optimized_node_count(path: Path, fallback: int) -> int:
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:
        return fallback


def profiled_layer_times(
    ort: Any,
    engine: Engine,
    options: Any,
    arrays: Mapping[str, np.ndarray],
    settings: TimingSettings,
    one_line: Callable[[BaseException], str],
) -> LayerTimes:
    """:class:`LayerTimes` of an onnxruntime engine: its model opened again with ``options`` (the
    builder's SessionOptions) and profiling on, run with ``arrays`` bound as :meth:`time` binds them."""
    import onnx

    model = Path(engine.artifacts[0]) if engine.artifacts else engine.model_path
    if not model.is_file():
        raise BuildError(
            f"the model file of this onnxruntime engine ({model}) is gone; rebuild the engine to profile it"
        )
    try:
        graph = OnnxGraph.from_proto(onnx.load(str(model), load_external_data=False))
    except Exception as exc:
        raise BuildError(f"cannot read {model.name} as ONNX to profile it: {one_line(exc)}") from exc
    work = Path(tempfile.mkdtemp(prefix="rexdeploy-ort-profile."))
    try:
        optimized = work / "optimized.onnx"
        options.enable_profiling = True
        options.profile_file_prefix = str(work / "profile")
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
        options.log_severity_level = 3  # the build session already said what there is to say
        try:
            from rexdeploy_onnxruntime import session_kwargs

            session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"],
                                           **session_kwargs(engine.options))  # fmt: skip
        except Exception as exc:
            raise BuildError(f"onnxruntime cannot open {model.name} with profiling on: {one_line(exc)}") from exc
        per_run = _optimized_node_count(optimized, len(graph.order)) + _SESSION_EVENTS_PER_RUN
        max_runs = max(1, EVENT_BUDGET // per_run)
        max_warmup = max(1, max_runs // 5)
        if settings.runs is not None and (settings.runs + max_warmup) * per_run > ORT_EVENT_LIMIT:
            most = max(1, ORT_EVENT_LIMIT // per_run - max_warmup)
            raise InputError(
                f"{settings.runs} profiled runs of {per_run - _SESSION_EVENTS_PER_RUN} nodes exceed onnxruntime's "
                f"profiler limit of {ORT_EVENT_LIMIT:,} events; profile at most {most} runs"
            )
        try:
            binding = session.io_binding()
            for name, array in arrays.items():
                binding.bind_cpu_input(name, array)
            for out in session.get_outputs():
                binding.bind_output(out.name, "cpu")
            warmup, _ = run_schedule(lambda: session.run_with_iobinding(binding), settings, max_warmup, max_runs)
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text(encoding="utf-8"))
        except Exception as exc:
            raise BuildError(f"onnxruntime inference failed while profiling: {one_line(exc)}") from exc
        totals = parse_profile(events, warmup)
        source = f"onnxruntime {ort.__version__} profiler"
        return map_kernels(totals, graph, _optimized_outputs(optimized), source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
