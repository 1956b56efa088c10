"""The user's own samples: model inputs to *measure* fidelity on, never to quantize with.

``--samples PATH`` takes a ``.npy`` (the model's single input, ``(N, ...)``), a ``.npz`` (one array per input
name) or a folder of images (PNG / JPEG / BMP / PPM, read with Pillow), preprocessed as the flags say:
resized to ``size`` × ``size``, scaled to [0, 1], normalised by ``mean`` / ``std`` per channel, laid out
``NCHW`` or ``NHWC``. The engine stays data-free: samples only feed the fidelity comparison against FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rexdeploy.errors import InputError
from rexdeploy.ranges import graph_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
MAX_SAMPLES = 1000


@dataclass(frozen=True)
class Preprocess:
    """How a folder of images becomes model inputs (``size`` None: the model input's own height/width)."""

    size: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"


def _float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--sample-{what} {text!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406") from None
    if what == "std" and any(v <= 0 for v in values):
        raise InputError(f"--sample-std {text!r} must be positive")
    return values


def preprocess_from_flags(size: int | None, mean: str | None, std: str | None, layout: str | None) -> Preprocess:
    """A :class:`Preprocess` from the CLI flags' text (``None``: the default)."""
    if size is not None and size < 1:
        raise InputError(f"--sample-size {size} must be a positive number of pixels")
    lay = (layout or "NCHW").upper()
    if lay not in ("NCHW", "NHWC"):
        raise InputError(f"--sample-layout {layout!r}: use NCHW or NHWC")
    return Preprocess(size, _float_list(mean, "mean") if mean else (0.0,), _float_list(std, "std") if std else (1.0,), lay)


def _input_dims(info: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in info.type.tensor_type.shape.dim]


def _check(name: str, array: np.ndarray, info: onnx.ValueInfoProto, source: str) -> np.ndarray:
    dims = _input_dims(info)
    if array.ndim == len(dims) - 1:  # one sample without its batch axis
        array = array[None]
    if array.ndim != len(dims) or any(d is not None and d != a for d, a in zip(dims[1:], array.shape[1:], strict=True)):
        want = "x".join("?" if d is None else str(d) for d in dims)
        raise InputError(
            f"samples for input {name!r} in {source} have shape {'x'.join(map(str, array.shape))}; the model takes "
            f"{want} (N samples first)"
        )
    if array.shape[0] == 0:
        raise InputError(f"{source} holds no sample for input {name!r}")
    return np.ascontiguousarray(array[:MAX_SAMPLES]).astype(np.float32, copy=False)


def _read_images(folder: Path, info: onnx.ValueInfoProto, pre: Preprocess) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading a folder of images needs Pillow: pip install pillow (or give a .npy / .npz)") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_SAMPLES]
    if not files:
        raise InputError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    dims = _input_dims(info)
    if len(dims) != 4:
        raise InputError(f"input {info.name!r} is not an image batch (rank {len(dims)}); give a .npy / .npz instead")
    channels = dims[1] if pre.layout == "NCHW" else dims[3]
    hw = (dims[2], dims[3]) if pre.layout == "NCHW" else (dims[1], dims[2])
    size = (pre.size, pre.size) if pre.size else hw
    if size[0] is None or size[1] is None:
        raise InputError(f"input {info.name!r} has a dynamic height/width: give --sample-size")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                mode = "L" if channels == 1 else "RGB"
                images.append(np.asarray(img.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float32))
        except OSError as exc:
            raise InputError(f"cannot read image {f.name}: {exc}") from None
    x: np.ndarray = np.stack(images).astype(np.float32) / np.float32(255.0)  # (N, H, W[, C])
    if x.ndim == 3:
        x = x[..., None]
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.asarray(x.transpose(0, 3, 1, 2) if pre.layout == "NCHW" else x, dtype=np.float32)


def load_samples(path: str | Path, model: onnx.ModelProto, pre: Preprocess | None = None) -> dict[str, np.ndarray]:
    """The samples as one float32 array per model input, samples first (at most ``MAX_SAMPLES``)."""
    path = Path(path)
    inputs = graph_inputs(model)
    if not path.exists():
        raise InputError(f"samples {path} not found")
    pre = pre or Preprocess()
    if path.is_dir():
        if len(inputs) != 1:
            raise InputError(f"a folder of images feeds one input; the model has {len(inputs)}: give a .npz")
        return {inputs[0].name: _check(inputs[0].name, _read_images(path, inputs[0], pre), inputs[0], path.name)}
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read samples {path.name}: {exc}; give a .npy, a .npz or a folder of images") from None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise InputError(f"{path.name} holds one array; the model has {len(inputs)} inputs: give a .npz by name")
        return {inputs[0].name: _check(inputs[0].name, loaded, inputs[0], path.name)}
    with loaded:
        names = {i.name for i in inputs}
        missing, unknown = sorted(names - set(loaded.files)), sorted(set(loaded.files) - names)
        if missing or unknown:
            raise InputError(f"{path.name} names inputs {sorted(loaded.files)}; the model takes {sorted(names)}")
        arrays = {i.name: _check(i.name, loaded[i.name], i, path.name) for i in inputs}
    counts = {a.shape[0] for a in arrays.values()}
    if len(counts) > 1:
        raise InputError(f"{path.name}: every input needs the same number of samples (got {sorted(counts)})")
    return arrays


__all__ = ["MAX_SAMPLES", "Preprocess", "load_samples", "preprocess_from_flags"]
