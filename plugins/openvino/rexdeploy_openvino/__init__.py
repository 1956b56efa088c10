"""rexdeploy builder plugin for OpenVINO (Intel / x86 CPUs, Intel GPUs).

Importing this package does not import ``openvino``; every function imports it when called and
raises a one-line :class:`~rexdeploy.errors.EngineUnavailableError` naming ``pip install
'rexdeploy[openvino]'`` when it is missing.

- :class:`OpenVINOBuilder` — the Builder (``build`` / ``time`` / ``run``).
- :func:`time_throughput` — throughput mode (``AsyncInferQueue``, ``PERFORMANCE_HINT=THROUGHPUT``).
- :func:`compress_weight_only`, :func:`compressed_weight_layers` — weight-only layers as compressed (or folded)
  kernels, which the builder applies; which layers' weights stayed integer.
- :func:`runtime_precision_summary`, :func:`kernel_precisions`, :func:`kernel_layers`,
  :func:`execution_layers` — which precision each layer really ran in (did int8 kernels run?).
"""

from __future__ import annotations

from rexdeploy_openvino.builder import OpenVINOBuilder, compiled_model, engine_batch
from rexdeploy_openvino.compressed import compress_weight_only, compressed_weight_layers
from rexdeploy_openvino.precisions import (
    KERNEL_LAYER_TYPES,
    ExecLayer,
    execution_layers,
    kernel_layers,
    kernel_precisions,
    runtime_precision_summary,
)
from rexdeploy_openvino.throughput import ThroughputResult, time_throughput

__all__ = [
    "KERNEL_LAYER_TYPES",
    "ExecLayer",
    "OpenVINOBuilder",
    "ThroughputResult",
    "compiled_model",
    "compress_weight_only",
    "compressed_weight_layers",
    "engine_batch",
    "execution_layers",
    "kernel_layers",
    "kernel_precisions",
    "runtime_precision_summary",
    "time_throughput",
]
