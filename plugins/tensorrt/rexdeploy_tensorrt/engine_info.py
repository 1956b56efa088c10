"""Per-layer precisions, and their summary by layer type, from TensorRT's engine inspector JSON (pure).

``IEngineInspector.get_engine_information(trt.LayerInformationFormat.JSON)`` returns
``{"Layers": [...], "Bindings": [...]}``; with ``ProfilingVerbosity.DETAILED`` each layer is a dict
with ``Name``, ``LayerType``, ``Inputs``/``Outputs`` (each with ``"Format/Datatype"``, e.g.
"Thirty-two wide channel vectorized row major Int8 format", "Row major linear FP16 format") and,
for layers with weights, ``"Weights": {"Type": "Int8", ...}``. With ``LAYER_NAMES_ONLY`` a layer
is just its name, and formats read "N/A due to dynamic shapes" unless the inspector is given an
execution context whose input shapes are set (``inspector.execution_context = context``). See
"Engine Inspector", https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/engine-tools.html
and https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/EngineInspector.html
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Order matters: "bfloat16" contains "float16" and "float"; "int8"/"int4" before "int".
_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("int8", "int8"),
    ("int4", "int4"),
    ("fp8", "fp8"),
    ("e4m3", "fp8"),
    ("fp4", "fp4"),
    ("bf16", "bf16"),
    ("bfloat16", "bf16"),
    ("fp16", "fp16"),
    ("half", "fp16"),
    ("float16", "fp16"),
    ("fp32", "fp32"),
    ("float", "fp32"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("bool", "bool"),
)


def precision_of(format_datatype: str) -> str:
    """Map a ``Format/Datatype`` / ``Weights.Type`` text to int8, fp16, fp32, bf16, fp8, ... or "unknown"."""
    text = format_datatype.lower()
    for key, name in _KEYWORDS:
        if key in text:
            return name
    return "unknown"


def _layer_precision(layer: Mapping[str, Any]) -> str:
    weights = layer.get("Weights")
    if isinstance(weights, Mapping) and isinstance(weights.get("Type"), str):
        p = precision_of(weights["Type"])
        if p != "unknown":
            return p
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or ():
            if isinstance(tensor, Mapping):
                p = precision_of(str(tensor.get("Format/Datatype", "")))
                if p != "unknown":
                    return p
    return "unknown"


def layer_precisions(engine_information: str) -> dict[str, str]:
    """``{layer name: precision}`` from the inspector's JSON. Layers given by name only (verbosity
    below DETAILED) map to "unknown"; a document that is not inspector JSON gives an empty dict."""
    try:
        doc = json.loads(engine_information)
    except json.JSONDecodeError:
        return {}
    layers = doc.get("Layers", []) if isinstance(doc, Mapping) else []
    out: dict[str, str] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            out[layer] = "unknown"
        elif isinstance(layer, Mapping):
            out[str(layer.get("Name", f"layer{i}"))] = _layer_precision(layer)
    return out


def precision_summary(engine_information: str) -> dict[str, dict[str, int]]:
    """Engine layer type → precision → how many layers, from the inspector's JSON, e.g.
    ``{"CaskConvolution": {"int8": 12}, "PointWiseV2": {"fp16": 3, "fp32": 1}, "Reformat": {"fp16": 2}}``
    — the TensorRT counterpart of OpenVINO's ``runtime_precision_summary``. A layer's type is its
    ``LayerType`` ("unknown" for layers given by name only, below ``ProfilingVerbosity.DETAILED``) and its
    precision is :func:`layer_precisions`'s (weights type first, else its first typed input / output);
    not inspector JSON → {}."""
    try:
        doc = json.loads(engine_information)
    except (json.JSONDecodeError, TypeError):
        return {}
    layers = doc.get("Layers", []) if isinstance(doc, Mapping) else []
    summary: dict[str, dict[str, int]] = {}
    for layer in layers:
        if isinstance(layer, str):
            kind, precision = "unknown", "unknown"
        elif isinstance(layer, Mapping):
            kind, precision = str(layer.get("LayerType") or "unknown"), _layer_precision(layer)
        else:
            continue
        per_kind = summary.setdefault(kind, {})
        per_kind[precision] = per_kind.get(precision, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(summary.items())}
