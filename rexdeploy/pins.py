"""Precision pins: the ONNX nodes of an emitted model whose numerics need FP32 inside the engine.

An engine may run float layers in a reduced precision (OpenVINO's CPU default on AVX-512 BF16 / AMX
hosts is bf16; TensorRT builds with FP16 / BF16 flags). Some float computations of a REx expansion
cannot: an activation-order remainder ``x - DQ(Q(x))`` is ~1/256 of ``x`` and vanishes in bf16's 8-bit
mantissa, and so does the sum of a high order into the first. The expansion pass names those nodes in
the model's ``metadata_props`` under :data:`FP32_NODES_KEY` (a JSON list of node names); each builder
pins them in its own way (OpenVINO: a graph form its CPU plugin keeps in f32; TensorRT: per-layer
precision constraints) and its precision report shows what really ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import onnx

FP32_NODES_KEY = "rexdeploy.fp32_nodes"
FLOAT_PRECISION_KEY = "rexdeploy.float_precision"
DYNAMIC_ACTIVATIONS_KEY = "rexdeploy.dynamic_activations"
"""``true`` when the engine must quantize weight-only layers' inputs at run time (the plan chose it), else ``false``."""
"""The precision the engine must run the model's float parts in (``fp32``, ``bf16``, ``fp16``), chosen with the
plan (:func:`rexdeploy.costmodel.engine_float_precision`)."""


def fp32_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """The node names pinned to FP32 in ``model`` (``()`` when none are)."""
    for prop in model.metadata_props:
        if prop.key == FP32_NODES_KEY:
            try:
                names = json.loads(prop.value)
            except json.JSONDecodeError:
                return ()
            return tuple(str(n) for n in names) if isinstance(names, list) else ()
    return ()


def pin_fp32(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Add ``names`` to the FP32 pins of ``model`` (in place; returns it). Names are kept sorted and unique."""
    merged = sorted(set(fp32_nodes(model)) | {str(n) for n in names})
    kept = [p for p in model.metadata_props if p.key != FP32_NODES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if merged:
        model.metadata_props.add(key=FP32_NODES_KEY, value=json.dumps(merged))
    return model


def float_precision_of(model: onnx.ModelProto) -> str:
    """The engine float precision the model asks for (``""``: none stated — the profile's)."""
    return next((p.value for p in model.metadata_props if p.key == FLOAT_PRECISION_KEY), "")


def set_float_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """State the engine float precision ``model`` must run in (in place; returns it)."""
    return _set(model, FLOAT_PRECISION_KEY, precision)


def set_dynamic_activations(model: onnx.ModelProto, on: bool) -> onnx.ModelProto:
    """State whether the engine must quantize weight-only layers' inputs at run time (in place; returns it)."""
    return _set(model, DYNAMIC_ACTIVATIONS_KEY, "true" if on else "false")


def dynamic_activations_of(model: onnx.ModelProto) -> bool | None:
    """What the model states about dynamic activations (None: nothing — the profile's setting)."""
    value = next((p.value for p in model.metadata_props if p.key == DYNAMIC_ACTIVATIONS_KEY), None)
    return None if value is None else value == "true"


def _set(model: onnx.ModelProto, key: str, value: str) -> onnx.ModelProto:
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=value)
    return model
