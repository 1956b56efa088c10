"""rexdeploy builder plugin for NVIDIA TensorRT.

Importing this package never imports ``tensorrt`` (nor any CUDA binding): the settings selection,
the ``trtexec`` command line and the Q/DQ lint are pure and work on any machine, so a plan can be made
on a laptop and built on the target. ``TensorRTBuilder.build`` / ``time`` / ``layer_times`` / ``run``
import TensorRT inside the call and raise ``EngineUnavailableError`` naming
``pip install 'rexdeploy[tensorrt]'`` where it is missing.
"""

from __future__ import annotations

from rexdeploy_tensorrt.builder import TensorRTBuilder, engine_from_plan
from rexdeploy_tensorrt.command import trtexec_command
from rexdeploy_tensorrt.cuda_device import check_cuda_stack, cuda_mismatch
from rexdeploy_tensorrt.engine_info import layer_precisions, precision_summary
from rexdeploy_tensorrt.precision_pins import LayerPin, NetLayer, layers_to_pin
from rexdeploy_tensorrt.qdq_lint import Finding, lint_qdq
from rexdeploy_tensorrt.settings import (
    ShapeRange,
    TrtBuildSettings,
    default_float_precision,
    float_precision,
    select_settings,
)

__all__ = [
    "Finding",
    "LayerPin",
    "NetLayer",
    "ShapeRange",
    "TensorRTBuilder",
    "TrtBuildSettings",
    "check_cuda_stack",
    "cuda_mismatch",
    "default_float_precision",
    "engine_from_plan",
    "float_precision",
    "layer_precisions",
    "layers_to_pin",
    "lint_qdq",
    "precision_summary",
    "select_settings",
    "trtexec_command",
]
