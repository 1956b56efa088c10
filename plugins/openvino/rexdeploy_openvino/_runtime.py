"""Shared OpenVINO plumbing: the lazy import, model loading to static shapes, compile settings, errors.

Nothing here imports ``openvino`` at module import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexdeploy.builders.registry import unavailable_error
from rexdeploy.errors import BuildError, InputError
from rexdeploy_openvino.precisions import onnx_node_index, read_onnx

if TYPE_CHECKING:
    from rexdeploy.profile import Profile

NAME = "openvino"
PIP_EXTRA = "openvino"
META_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")
_NOISE = re.compile(r"^Exception from \S+$")
_CHECK = re.compile(r"^Check '(.*)' failed at \S+$")


def import_openvino() -> Any:
    """``import openvino``, or the one-line EngineUnavailableError that names the pip extra."""
    try:
        import openvino
    except ImportError as exc:
        raise unavailable_error(NAME, PIP_EXTRA) from exc
    return openvino


def one_line(exc: BaseException, limit: int = 400) -> str:
    """OpenVINO's multi-line exception text (``Exception from src/...`` frames) as one readable line; a failed
    internal check keeps what it checked (``Check 'x' failed at src/...`` → ``check failed: x``)."""
    kept = []
    for raw in str(exc).splitlines():
        line = raw.strip().rstrip(":").strip()
        check = _CHECK.match(line)
        if check:
            kept.append(f"check failed: {check.group(1)}")
        elif line and not _NOISE.match(line):
            kept.append(line)
    text = "; ".join(kept) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def inference_precision(profile: Profile | None) -> str:
    """The profile's float precision as OpenVINO names it: ``bf16`` when the profile runs float layers in
    bf16, else ``f32``.

    OpenVINO's CPU plugin otherwise picks bf16 (or f16) for *float* layers on CPUs that have it, which would
    silently turn an FP32 baseline into a bf16 one; the FP32 reference is built with an fp32 profile variant.
    Integer kernels coming from Q/DQ pairs are not affected by this hint.
    """
    return "bf16" if profile is not None and profile.quantization.bf16 else "f32"


OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
"""rexdeploy's float precision names → OpenVINO's element-type names."""

RUNTIME_OPTIONS_FILE = "runtime_options.json"
"""Written beside every IR ``build`` writes: the compile properties the engine was measured with."""

THREADS_OPTION = "INFERENCE_NUM_THREADS"
IR_RUNTIME_OPTIONS = ("DYNAMIC_QUANTIZATION_GROUP_SIZE",)
"""The properties OpenVINO's CPU plugin reads back from an IR's ``rt_info`` ``runtime_options`` (2026.4: it ignores
``INFERENCE_PRECISION_HINT`` there), so a bare ``core.compile_model(ir)`` honours them."""


def model_precision(model_metadata: dict[str, str], profile: Profile | None) -> str:
    """The OpenVINO inference precision an engine of this model must run in: what the model's metadata states
    (:mod:`rexdeploy.pins`: the plan's engine float precision; f32 when it pins nodes to FP32), else the
    profile's."""
    from rexdeploy.pins import FLOAT_PRECISION_KEY, FP32_NODES_KEY

    stated = model_metadata.get(FLOAT_PRECISION_KEY, "")
    if model_metadata.get(FP32_NODES_KEY, "[]") not in ("", "[]"):
        return "f32"  # the CPU plugin cannot keep single nodes in f32 inside a bf16 engine (docs/precision.md)
    return OV_PRECISION.get(stated, inference_precision(profile))


DYNAMIC_GROUP = 32
"""Values per runtime-computed int8 scale when a plan asks for dynamic activations (OpenVINO's CPU default)."""


def model_dynamic(model_metadata: dict[str, str], profile: Profile | None) -> bool:
    """Whether the engine quantizes weight-only layers' inputs at run time: the model's metadata (the plan's choice,
    :mod:`rexdeploy.pins`), else the profile's ``dynamic_activations``."""
    from rexdeploy.pins import DYNAMIC_ACTIVATIONS_KEY

    stated = model_metadata.get(DYNAMIC_ACTIVATIONS_KEY)
    if stated is not None:
        return stated == "true"
    return bool(profile is not None and profile.quantization.dynamic_activations)


def runtime_options(core: Any, device: str, precision: str, mode: str = "LATENCY",
                    dynamic: bool = False, threads: int = 0) -> dict[str, str]:  # fmt: skip
    """The compile properties of an engine: the performance hint, the inference precision, and — where the
    device has it — ``DYNAMIC_QUANTIZATION_GROUP_SIZE``: 0 unless the plan chose dynamic activations, so that
    the activations of compressed-weight (weight-only) MatMuls are not quantized behind the plan's back
    (OpenVINO's CPU default, 32, adds ~100× the planned error to a weight-only K=2 layer; docs/precision.md);
    ``INFERENCE_NUM_THREADS`` where ``threads`` > 0 (the profile's ``[parallel] threads``, which ``rexdeploy build``
    sets when fewer threads measure faster; 0: the hint's own, every core for ``LATENCY``)."""
    options = {"PERFORMANCE_HINT": mode, "INFERENCE_PRECISION_HINT": precision}
    try:
        supported = {str(p) for p in core.get_property(device, "SUPPORTED_PROPERTIES")}
    except Exception:
        supported = set()
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in supported:
        options["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(DYNAMIC_GROUP if dynamic else 0)
    if threads > 0:
        if THREADS_OPTION not in supported:
            raise BuildError(
                f"OpenVINO device {device} has no {THREADS_OPTION} property: remove [parallel] threads = {threads} "
                "from the profile"
            )
        options[THREADS_OPTION] = str(threads)
    return options


def onnx_metadata(model: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file ({} for an IR or a file that does not parse)."""
    proto = read_onnx(model)
    return {} if proto is None else {p.key: p.value for p in proto.metadata_props}


def check_device(core: Any, device: str) -> None:
    """Fail with one line when ``device`` is not one OpenVINO sees here (meta devices are not checked)."""
    if ":" in device or device.split(".")[0] in META_DEVICES:
        return
    available = list(core.available_devices)
    bases = {d.split(".")[0] for d in available}
    if device not in available and device not in bases:
        seen = ", ".join(available) or "none"
        raise BuildError(
            f"OpenVINO device {device!r} is not available here (available: {seen}); "
            "use a profile whose device is one of them"
        )


def read_static_model(core: Any, model: Path, fix_batch: bool = True) -> tuple[Any, dict[str, tuple[int, ...]],
                                                                             dict[str, str]]:  # fmt: skip
    """Read an ONNX model (``openvino.convert_model``) or an IR ``.xml`` and fix its input shapes.

    A dynamic leading (batch) dimension becomes 1; any other dynamic dimension is an error, since a
    timed engine needs one shape. Returns the reshaped ``openvino.Model``, the input shapes, and the
    ONNX node index of :func:`~rexdeploy_openvino.precisions.onnx_node_index` ({} for an IR).
    ``fix_batch=False`` leaves the model as it is (a dynamic batch stays dynamic, as a bare
    ``core.compile_model`` compiles it) and returns the batch-1 shapes it is timed and run at.
    """
    ov = import_openvino()
    if not model.is_file():
        raise InputError(f"model file {model} not found")
    nodes: dict[str, str] = {}
    if model.suffix != ".xml":
        # Parse with onnx first: a clear error for a file that is not ONNX (convert_model would try
        # every other frontend on it), and the node names to map the execution graph back to.
        import onnx

        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception as exc:
            raise BuildError(f"cannot read {model.name} as ONNX: {one_line(exc)}") from exc
        nodes = onnx_node_index(proto)
        del proto
    try:
        ov_model = core.read_model(str(model)) if model.suffix == ".xml" else ov.convert_model(str(model))
    except Exception as exc:
        raise BuildError(f"OpenVINO cannot read {model.name}: {one_line(exc)}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    new_shapes: dict[int, Any] = {}
    for position, port in enumerate(ov_model.inputs):
        name = port.get_any_name() if port.get_names() else f"input_{position}"
        pshape = port.get_partial_shape()
        if pshape.rank.is_dynamic:
            raise BuildError(f"input {name!r} of {model.name} has an unknown rank; export it with static shapes")
        dims: list[int] = []
        for axis, dim in enumerate(pshape):
            if dim.is_static:
                dims.append(dim.get_length())
            elif axis == 0:
                dims.append(1)
            else:
                raise BuildError(
                    f"input {name!r} of {model.name} has dynamic dimension {axis} ({pshape}); "
                    "only the batch dimension may be dynamic: export it with static shapes"
                )
        shapes[name] = tuple(dims)
        if pshape.is_dynamic:
            new_shapes[position] = ov.PartialShape(dims)
    if new_shapes and fix_batch:
        try:
            ov_model.reshape(new_shapes)
        except Exception as exc:
            raise BuildError(f"OpenVINO cannot fix the batch of {model.name} to 1: {one_line(exc)}") from exc
    return ov_model, shapes, nodes
