"""Loading, checking and saving ONNX models; BatchNormalization folding.

Everything here works on plain ``onnx.ModelProto`` and raises :class:`~rexdeploy.errors.ModelError`
subclasses whose message names the file or node and what to do.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import numpy_helper

from rexdeploy.errors import InputError, InternalError, ModelError, UnsupportedModelError
from rexdeploy.fileio import atomic_path

_PLAIN_TENSOR_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    }
)

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear need opset >= 13
TARGET_OPSET = 17
ALREADY_QUANTIZED = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("the model imports no default-domain (ai.onnx) opset; re-export it with a standard opset")


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read and check an FP32 ONNX model (structure and strict shape inference); upgrade opsets older than 13.

    Raises InputError for a missing or unreadable path and ModelError for anything that is not a usable
    ONNX model, each with one line naming the file and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file {path} not found")
    if not path.is_file():
        raise InputError(f"{path} is not a file; give the path of an .onnx model")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError (and others on some corruptions)
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); is the file truncated?"
        ) from None
    bad = _non_utf8_string(model)
    if bad is not None:
        raise ModelError(f"{path} is not a valid ONNX model: {bad} is not valid UTF-8; is the file corrupted?")
    if not model.graph.node:
        raise ModelError(f"{path} holds no graph nodes; is it an ONNX model file?")
    try:
        external = _uses_external_data(model)
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # a missing / short / escaping external file, a corrupted location entry
        raise ModelError(
            f"{path} keeps weights in external files that cannot be read ({_first_line(exc)}); "
            "keep them beside the model as exported"
        ) from None
    try:
        # the bytes just read (re-serializing a 100 MB model costs more than the check); the path when the
        # weights live in external files, which the checker then finds beside the model. full_check adds
        # strict shape inference: a model failing it cannot become a valid expanded model either.
        onnx.checker.check_model(str(path) if external else data, full_check=True)
    except UnicodeDecodeError:  # the checker's message quoted bytes that are not UTF-8
        raise ModelError(
            f"{path} is not a valid ONNX model: it holds a name or string that is not valid UTF-8"
        ) from None
    except Exception as exc:  # ValidationError, InferenceError, and whatever else a corrupted model provokes
        raise ModelError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from None
    quantized = [n for n in model.graph.node if n.op_type in ALREADY_QUANTIZED]
    if quantized:
        node = quantized[0]
        raise UnsupportedModelError(
            f"{path} is already quantized (node {node.name or node.output[0]!r} is {node.op_type}); "
            "give rexdeploy the FP32 model"
        )
    _check_float_type(model, path)
    try:
        version = opset_version(model)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if version < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            raise ModelError(
                f"{path} uses opset {version} and could not be upgraded to {TARGET_OPSET} ({_first_line(exc)}); "
                f"re-export it with opset >= {MIN_OPSET}"
            ) from None
    _drop_initializer_inputs(model)
    return model


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Unlist the initializers that old exporters (``keep_initializers_as_inputs``) also list as graph inputs.

    rexdeploy reads them as constant weights; left listed, an expansion that replaced a weight by its
    quantized orders kept the input entry without its initializer: a model that required the weights as
    inputs (onnxruntime: 'Required inputs ([...]) are missing')."""
    inits = {i.name for i in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if len(real) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(real)


_NOT_FP32: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def _check_float_type(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a float16 / bfloat16 / float64 model: the expansion quantizes float32 weights and activations (an
    fp16 model failed later as an internal error: Q/DQ of float16 needs opset 19, the probes fed float32)."""
    inits = {i.name for i in model.graph.initializer}
    tensors = [*(i for i in model.graph.input if i.name not in inits), *model.graph.output]
    tensors += [i for i in model.graph.initializer if i.data_type in _NOT_FP32 and len(i.dims) >= 2]  # weights
    for t in tensors:
        elem = int(t.type.tensor_type.elem_type if isinstance(t, onnx.ValueInfoProto) else t.data_type)
        if elem in _NOT_FP32:
            raise UnsupportedModelError(
                f"{path} is a {_NOT_FP32[elem]} model ({t.name!r} is {_NOT_FP32[elem]}); rexdeploy takes the FP32 "
                "model: export it in float32 (in torch: model.float() before torch.onnx.export)"
            )


def save_model(model: onnx.ModelProto, path: str | Path, check: bool = True) -> Path:
    """Check (full) and write a model atomically.

    A model that fails the check was emitted by rexdeploy from a model that passed :func:`load_model`:
    that is a bug, raised as :class:`~rexdeploy.errors.InternalError` (nothing is written).
    """
    path = Path(path)
    if _uses_external_data(model):  # onnx.save writes the external tensors beside the model
        if check:
            _check_emitted(model, path)
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
        return path
    data = model.SerializeToString()  # once, for both the checker and the file
    if check:
        _check_emitted(data, path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def copy_model(src: str | Path, model: onnx.ModelProto, dest: str | Path) -> Path:
    """``src`` copied to ``dest`` as an engine reads it: the file as it is, or — where its weights live in external
    files, which would not be beside ``dest`` — ``model`` (``src`` loaded by :func:`load_model`, its external
    data read in) written whole."""
    src, dest = Path(src), Path(dest)
    if _uses_external_data(onnx.load(str(src), load_external_data=False)):
        return save_model(model, dest, check=False)
    shutil.copyfile(src, dest)
    return dest


def _check_emitted(model: onnx.ModelProto | bytes, path: Path) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        what = "it holds a string that is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else _first_line(exc)
        raise InternalError(
            f"the model rexdeploy emitted for {path.name} fails the ONNX checker ({what}); "
            "this is a rexdeploy bug, please report it"
        ) from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most ``limit`` chars."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _non_utf8_string(message: Message, where: str = "model") -> str | None:
    """Where ``message`` (recursively) holds a string field that is not valid UTF-8, else None.

    The Python protobuf runtime hands such a proto2 ``string`` field back as ``bytes`` instead of failing
    to parse, and every later use of the name breaks. ``bytes`` fields (tensor data) are not read.
    """
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            value = getattr(message, field.name)
            if _is_repeated(field):
                for i, item in enumerate(value):
                    if not isinstance(item, str):
                        return f"{where}.{field.name}[{i}] {_short(item)}"
            elif not isinstance(value, str):
                return f"{where}.{field.name} {_short(value)}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_repeated(field):
                for i, item in enumerate(getattr(message, field.name)):
                    bad = _non_utf8_string(item, f"{where}.{field.name}[{i}]")
                    if bad is not None:
                        return bad
            elif message.HasField(field.name):
                bad = _non_utf8_string(getattr(message, field.name), f"{where}.{field.name}")
                if bad is not None:
                    return bad
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 deprecates ``label``
    if repeated is not None:
        return bool(repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer or attribute tensor (subgraphs included) keeps its data in an external file."""
    external = onnx.TensorProto.EXTERNAL
    stack = [model.graph]
    while stack:
        g = stack.pop()
        if any(t.data_location == external for t in g.initializer):
            return True
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == external:
                    return True
                if attr.type in (onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.GRAPH):
                    if any(t.data_location == external for t in attr.tensors):
                        return True
                    stack.extend(attr.graphs)
                    if attr.type == onnx.AttributeProto.GRAPH:
                        stack.append(attr.g)
    return False


def add_initializer(container: Any, value: np.ndarray, name: str) -> None:
    """Append ``numpy_helper.from_array(value, name)`` to a repeated TensorProto field, built in place.

    Appending a finished TensorProto copies it (its raw data included) into the container; for plain
    numeric dtypes this builds the element in the container instead: same fields, same bytes.
    """
    if value.dtype.kind not in "fiub" or value.dtype.itemsize == 0:
        container.append(numpy_helper.from_array(value, name))
        return
    dtype = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    if dtype not in _PLAIN_TENSOR_TYPES:
        container.append(numpy_helper.from_array(value, name))
        return
    tensor = container.add()
    tensor.dims.extend(value.shape)
    if name:
        tensor.name = name
    tensor.raw_data = numpy_helper.tobytes_little_endian(value)
    tensor.data_type = dtype


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Fold every ``Conv → BatchNormalization`` pair whose Conv output feeds only that BN.

    Returns the folded model and, per folded BN output tensor, the BN's (beta, |gamma|): the
    per-channel mean and standard deviation of that tensor under the statistics BN was trained
    for — the data-free activation statistics :mod:`rexdeploy.ranges` propagates.
    """
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    graph = model_out.graph
    inits = initializers(model_out)
    users = consumers(model_out)
    graph_outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    remove: list[int] = []
    for index, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in graph_outputs:
            continue
        if len(users.get(conv.output[0], [])) != 1 or conv.input[1] not in inits:
            continue
        names = bn.input[1:5]
        if not all(n in inits for n in names):
            continue
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if bias_name is not None and bias_name not in inits:
            continue
        try:
            scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in names)
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            w_raw = numpy_helper.to_array(inits[conv.input[1]])
            channels = w_raw.shape[0] if w_raw.ndim else -1
            if any(p.shape != (channels,) for p in (scale, beta, mean, var)):
                raise ValueError(f"its parameters do not all have the Conv's {channels} output channels")
            factor = scale / np.sqrt(var + eps)
            w_folded = np.multiply(w_raw, factor.reshape(-1, *([1] * (w_raw.ndim - 1))), dtype=np.float64)
            b = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros(channels)
            if b.shape != (channels,):
                raise ValueError(f"the Conv's bias does not have its {channels} output channels")
            b_folded = (b - mean) * factor + beta
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # inconsistent shapes / types of the weights
            raise ModelError(
                f"cannot fold BatchNormalization {bn.name or bn.output[0]!r} into Conv "
                f"{conv.name or conv.output[0]!r}: {_first_line(exc)}; is the model corrupted?"
            ) from None
        dtype = w_raw.dtype
        w_name = f"{conv.input[1]}_bnfolded"
        b_name = f"{conv.input[1]}_bnfolded_bias"
        add_initializer(graph.initializer, w_folded.astype(dtype), w_name)
        add_initializer(graph.initializer, b_folded.astype(dtype), b_name)
        x_name = conv.input[0]
        del conv.input[:]
        conv.input.extend([x_name, w_name, b_name])
        conv.output[0] = bn.output[0]
        stats[bn.output[0]] = (beta, np.abs(scale))
        remove.append(index)
    for index in reversed(remove):  # by position: NodeProto.remove() compares whole messages
        del graph.node[index]
    _drop_unused_initializers(model_out)
    return model_out, stats


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    drop_initializers(model.graph, used)


def drop_initializers(graph: onnx.GraphProto, keep: set[str] | frozenset[str]) -> None:
    """Delete, in place and in order, the initializers of ``graph`` whose names are not in ``keep``.

    By position: re-extending the field with the kept ones would copy every kept tensor's data.
    """
    unused = [i for i, init in enumerate(graph.initializer) if init.name not in keep]
    for i in reversed(unused):
        del graph.initializer[i]
