"""Per-layer times from OpenVINO's own profiler (``PERF_COUNT``), mapped back to ONNX nodes.

The engine's IR is compiled once more with ``PERF_COUNT`` on (same device, hint and inference precision
as the timed engine: profiling counters slow every layer a little, so the timed engine never has them),
run for the settings' warm-up and duration, and every executed layer's ``real_time`` is averaged over the
profiled runs. An executed layer that fused several ONNX nodes (a Convolution with its bias Add, a
``Subgraph`` with an Add, a ReLU and the next layer's Q/DQ) is charged to the first ONNX node it names,
as :attr:`rexdeploy_openvino.precisions.ExecLayer.key` does — the node a user recognizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings
from rexdeploy.builders.timing import run_for, warm_up
from rexdeploy.errors import BuildError
from rexdeploy_openvino._runtime import import_openvino, one_line
from rexdeploy_openvino.precisions import load_onnx_index, read_execution_graph

if TYPE_CHECKING:
    import numpy as np


def profiled_layer_times(engine: Engine, arrays: list[np.ndarray], settings: TimingSettings) -> LayerTimes:
    """:class:`LayerTimes` of an OpenVINO engine: its IR compiled with ``PERF_COUNT`` and the engine's own
    compile options, run on ``arrays`` (one per input, in order)."""
    ov = import_openvino()
    ir = next((a for a in engine.artifacts if str(a).endswith(".xml")), None)
    if ir is None:
        raise BuildError(f"the OpenVINO engine of {engine.model_path.name} has no IR (.xml) to profile")
    config: dict[str, Any] = {**engine.options, "PERF_COUNT": True}
    try:
        compiled = ov.Core().compile_model(str(ir), engine.device, config)
        request = compiled.create_infer_request()
        for index, array in enumerate(arrays):
            request.set_input_tensor(index, ov.Tensor(array))
        exec_layers = {
            layer.name: layer for layer in read_execution_graph(compiled, load_onnx_index(engine.model_path))
        }
        totals: dict[str, float] = {}

        def profiled() -> None:
            request.infer()
            for info in request.get_profiling_info():  # µs resolution: a tiny layer reads 0 on most runs
                if str(info.status).endswith("EXECUTED"):
                    us = info.real_time.total_seconds() * 1e6
                    totals[info.node_name] = totals.get(info.node_name, 0.0) + us

        warm_up(request.infer, settings.warmup_s)
        runs = run_for(profiled, settings)
    except Exception as exc:
        raise BuildError(f"OpenVINO profiling of {engine.model_path.name} failed: {one_line(exc)}") from exc
    nodes: dict[str, float] = {}
    unmapped = 0.0
    for name, us in totals.items():
        layer = exec_layers.get(name)
        if layer is None or not layer.onnx_nodes:
            unmapped += us / runs
            continue
        nodes[layer.key] = nodes.get(layer.key, 0.0) + us / runs
    return LayerTimes(nodes, unmapped, sum(totals.values()) / runs, runs, f"OpenVINO {ov.get_version()} PERF_COUNT")
