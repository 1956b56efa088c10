"""Data-free activation ranges.

Synthetic probes: the FP32 model is run by onnxruntime on seeded standard-normal inputs (the
distribution of normalised images/features) and each requested tensor's largest magnitude is
recorded; the symmetric int8 scale of a tensor is then ``max|x| / 127``. No user data is needed;
a user calibration array, when given, replaces the synthetic probes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from rexdeploy.errors import InputError, ModelError

_NP_TYPES: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (initializers listed as inputs by old exporters excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(info: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    """A concrete shape for an input: symbolic / unknown dims become ``batch`` (first) or 1."""
    dims = info.type.tensor_type.shape.dim
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else 1)
        for i, d in enumerate(dims)
    )


def synthetic_inputs(model: onnx.ModelProto, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float inputs (integers: zeros) of the model's input shapes."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for info in graph_inputs(model):
        elem = info.type.tensor_type.elem_type
        dtype = _NP_TYPES.get(int(elem))
        if dtype is None:
            raise ModelError(f"input {info.name!r} has an element type rexdeploy cannot synthesize ({elem})")
        shape = input_shape(info, batch)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[info.name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_with_taps(model: onnx.ModelProto, feeds: dict[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
    """Run the model with onnxruntime and return the values of the tensors named in ``taps``."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    existing = {o.name for o in tapped.graph.output}
    for name in taps:
        if name not in existing:
            tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = session.run(list(taps), feeds)
    return dict(zip(taps, values, strict=True))


def probe_ranges(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    *,
    batch: int = 16,
    seed: int = 0,
    calibration: np.ndarray | None = None,
) -> dict[str, float]:
    """Largest magnitude of each tensor over synthetic probes (or the user's calibration batch)."""
    if not tensors:
        return {}
    if calibration is not None:
        inputs = graph_inputs(model)
        if len(inputs) != 1:
            raise InputError("a calibration .npy can only be used with a single-input model")
        feeds = {inputs[0].name: calibration}
    else:
        feeds = synthetic_inputs(model, batch=batch, seed=seed)
    values = run_with_taps(model, feeds, list(dict.fromkeys(tensors)))
    return {name: float(np.max(np.abs(v))) if v.size else 0.0 for name, v in values.items()}


def load_calibration(path: str, model: onnx.ModelProto) -> np.ndarray:
    """Read a user calibration ``.npy`` batch and check it against the model's single input."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"calibration file {path} not found") from None
    except Exception as exc:
        raise InputError(f"calibration file {path} is not a readable .npy array ({exc})") from None
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise InputError("a calibration .npy can only be used with a single-input model")
    expected = input_shape(inputs[0], array.shape[0] if array.ndim else 1)
    if array.ndim != len(expected) or tuple(array.shape[1:]) != tuple(expected[1:]):
        raise InputError(
            f"calibration array shape {array.shape} does not match the model input {inputs[0].name!r} "
            f"(N, {', '.join(map(str, expected[1:]))})"
        )
    return array.astype(np.float32)
