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
from rexdeploy_tensorrt.engine_info import layer_precisions
from rexdeploy_tensorrt.qdq_lint import Finding, lint_qdq
from rexdeploy_tensorrt.settings import ShapeRange, TrtBuildSettings, select_settings

__all__ = [
    "Finding",
    "ShapeRange",
    "TensorRTBuilder",
    "TrtBuildSettings",
    "engine_from_plan",
    "layer_precisions",
    "lint_qdq",
    "select_settings",
    "trtexec_command",
]
