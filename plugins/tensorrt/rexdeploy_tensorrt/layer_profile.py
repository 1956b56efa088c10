"""Per-layer times from TensorRT's ``IProfiler``, mapped back to the ONNX nodes of the built model.

Runtime (TensorRT 10 Python API, imported by the caller and passed in): one execution context with the
I/O buffers and seeded inputs :func:`rexdeploy_tensorrt.timing.time_engine` uses is warmed up for
``settings.warmup_s`` without a profiler; then a ``trt.IProfiler`` subclass is attached
(``IExecutionContext.profiler``) with ``enqueue_emits_profile = False``, and every profiled run is
``execute_async_v3`` → stream sync → ``report_to_profiler()``, which calls ``report_layer_time(layer_name,
ms)`` once per engine layer for that run. Never in a CUDA graph (TensorRT cannot profile inside one).
The engine inspector's JSON (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``)
of that context gives each layer's ``Metadata``, which — for engines built with
``ProfilingVerbosity.DETAILED``, as :func:`rexdeploy_tensorrt.builder.build_plan` does — lists the ONNX
nodes the layer was made from (``[ONNX Layer: name]`` entries separated by ``\\x1e`` / ``\\x1f``).

Pure part (unit-tested anywhere): :class:`LayerTimeAccumulator` (the profiler's state),
:func:`metadata_nodes`, :func:`inspector_metadata`, :func:`onnx_names_in` (ONNX node names in a layer
*name*: fused layers join them with ``" + "``, pointwise fusions read ``PWN(a, PWN(b, c))``, Myelin
regions ``{ForeignNode[first...last]}``, and names may carry ``[...]`` tags or ``_myl0_3`` /
``_clone_1`` / ``_quantize_scale_node`` suffixes), :func:`resolve_layer` and :func:`layer_times_from_totals`.
A layer is charged to the first ONNX node it names (its metadata first, else its name) that the model
has; reformat copies, constants and unnamed layers TensorRT adds are ``unmapped_us``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rexdeploy.builders.base import LayerTimes, TimingSettings
from rexdeploy.builders.timing import run_for, warm_up
from rexdeploy.errors import BuildError

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\x1e\x1f]+)\]")
_FOREIGN = re.compile(r"\{ForeignNode\[([^\]]*)\]\}")
_PWN = re.compile(r"PWN\(([^()]*)\)")
_TAGS = re.compile(r"^(?:\[[^\]]*\]\s*)+|(?:\s*\[[^\]]*\])+$")
_SUFFIX = re.compile(r"(?:_myl\d+_\d+|_clone_\d+|_(?:de)?quantize_scale_node)+$")
_ENGINE_ADDED = ("Reformatting CopyNode", "(Unnamed Layer", "__myl_", "[HostToDevice", "[DeviceToHost",
                 "[DeviceToShapeHost", "[trainStation")  # fmt: skip


@dataclass
class LayerTimeAccumulator:
    """What the profiler has reported: summed ms per layer name over ``runs`` completed runs."""

    totals_ms: dict[str, float] = field(default_factory=dict)
    runs: int = 0

    def report(self, layer_name: str, ms: float) -> None:
        """``IProfiler.report_layer_time``: add one layer's time of the current run."""
        self.totals_ms[layer_name] = self.totals_ms.get(layer_name, 0.0) + float(ms)

    def end_run(self) -> None:
        """One profiled run's reports are in."""
        self.runs += 1


def metadata_nodes(metadata: str) -> list[str]:
    """The ONNX node names of a layer's inspector ``Metadata`` (``[ONNX Layer: a]\\x1f[ONNX Layer: b]``)."""
    return [m.strip() for m in _ONNX_LAYER.findall(metadata or "")]


def inspector_metadata(engine_information: str) -> dict[str, list[str]]:
    """Layer name → ONNX node names, from the inspector's JSON (``{"Layers": [...]}``); layers given by
    name only (verbosity below DETAILED) or without ONNX metadata are left out; not JSON → {}."""
    try:
        doc = json.loads(engine_information)
    except (json.JSONDecodeError, TypeError):
        return {}
    layers = doc.get("Layers", []) if isinstance(doc, Mapping) else []
    out: dict[str, list[str]] = {}
    for layer in layers:
        if isinstance(layer, Mapping) and (nodes := metadata_nodes(str(layer.get("Metadata", "")))):
            out[str(layer.get("Name", ""))] = nodes
    return out


def onnx_names_in(layer_name: str) -> list[str]:
    """The ONNX node names a TensorRT layer name is made of, in order: each name as written and, after it,
    without TensorRT's suffixes (``_myl0_3``, ``_clone_1``, ``_quantize_scale_node``). Reformat copies,
    I/O copies, Myelin kernels and unnamed layers TensorRT adds name none."""
    name = layer_name.strip()
    if not name or name.startswith(_ENGINE_ADDED):
        return []
    text = _FOREIGN.sub(lambda m: " + ".join(m.group(1).split("...")), name)
    while (unwrapped := _PWN.sub(lambda m: " + ".join(m.group(1).split(", ")), text)) != text:
        text = unwrapped
    names: list[str] = []
    for part in text.split(" + "):
        plain = _TAGS.sub("", part).strip()
        if not plain or plain.startswith(_ENGINE_ADDED):
            continue
        names.extend(n for n in (plain, _SUFFIX.sub("", plain)) if n and n not in names)
    return names


def onnx_index(proto: Any) -> dict[str, str]:
    """Names TensorRT may give a layer → the ONNX node (its name, or its first output when unnamed): every
    node's ident, and each output tensor (unnamed nodes and some parser layers are named after them)."""
    index: dict[str, str] = {}
    for node in proto.graph.node:
        ident = node.name or (node.output[0] if node.output else "")
        if ident:
            index.update({out: ident for out in node.output if out and out not in index})
            index[ident] = ident
    return index


def resolve_layer(layer_name: str, metadata: Sequence[str], index: Mapping[str, str]) -> str | None:
    """The ONNX node a layer's time is charged to: the first name in its metadata, then in its name, that
    ``index`` knows; with an empty ``index`` (the model is not at hand) the first name as it is."""
    candidates = [*metadata, *onnx_names_in(layer_name)]
    if not index:
        return candidates[0] if candidates else None
    return next((index[c] for c in candidates if c in index), None)


def layer_times_from_totals(
    totals_ms: Mapping[str, float],
    runs: int,
    metadata: Mapping[str, Sequence[str]],
    index: Mapping[str, str],
    source: str,
) -> LayerTimes:
    """:class:`LayerTimes` (µs per run, nodes by decreasing time) from the profiler's summed ms per layer."""
    if runs < 1:
        raise BuildError("TensorRT's profiler reported no run; profile at least one run (settings.runs ≥ 1)")
    nodes: dict[str, float] = {}
    unmapped = 0.0
    for layer, ms in totals_ms.items():
        us = ms * 1000.0 / runs
        node = resolve_layer(layer, metadata.get(layer, ()), index)
        if node is None:
            unmapped += us
        else:
            nodes[node] = nodes.get(node, 0.0) + us
    ordered = dict(sorted(nodes.items(), key=lambda kv: -kv[1]))
    return LayerTimes(ordered, unmapped, sum(totals_ms.values()) * 1000.0 / runs, runs, source)


def profile_schedule(
    plain: Callable[[], None],
    profiled: Callable[[], None],
    attach: Callable[[], None],
    settings: TimingSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, int]:
    """Warm up with ``plain`` runs for ``settings.warmup_s`` (at least one), ``attach`` the profiler, then
    ``profiled`` runs: exactly ``settings.runs``, else for ``duration_s`` and at least ``min_runs``.
    Returns (warm-up runs, profiled runs)."""
    warmup = warm_up(plain, settings.warmup_s, clock)
    attach()
    runs = run_for(profiled, settings, clock)
    return warmup, runs


def make_profiler(trt: Any, sink: LayerTimeAccumulator) -> Any:
    """A ``trt.IProfiler`` that reports into ``sink``."""

    class _Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            sink.report(str(layer_name), float(ms))

    return _Profiler()


def profile_engine(
    trt: Any, engine: Any, device_index: int, settings: TimingSettings
) -> tuple[LayerTimeAccumulator, str]:
    """Profile ``engine`` (an ``ICudaEngine``) at batch ``settings.batch``; returns the accumulated layer
    times and the inspector's JSON for the profiled context."""
    from rexdeploy_tensorrt.timing import EngineSession, _random_fill

    sink = LayerTimeAccumulator()
    with EngineSession(trt, engine, device_index) as session:
        session.allocate(session.default_shapes(settings.batch))
        _random_fill(session.host, session.inputs, settings.seed)
        session.h2d()
        session.sync()
        context = session.context
        profiler = make_profiler(trt, sink)

        def plain() -> None:
            session.enqueue()
            session.sync()

        def attach() -> None:
            context.profiler = profiler
            context.enqueue_emits_profile = False

        def profiled() -> None:
            plain()
            if context.report_to_profiler() is False:
                raise BuildError("TensorRT's report_to_profiler failed; rebuild the engine with this TensorRT")
            sink.end_run()

        profile_schedule(plain, profiled, attach, settings)
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        information = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        del inspector
    return sink, information
