"""Layer discovery: every Conv / ConvTranspose / Gemm / MatMul with a constant weight.

A weight is constant when it is an initializer, a Constant node's output, or reached from one of
those through Transpose / Reshape / Cast / Identity / Squeeze / Unsqueeze (folded here in numpy).
Shared weights give one Layer per consuming node. Each Layer records where its output channels
live: ``weight_axis`` in the weight as the node consumes it, ``out_axis`` in the node's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from rexdeploy.errors import UnsupportedModelError

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class Layer:
    """One quantizable layer. ``weight_shape`` is output-channel-major (axis 0 = output channels)."""

    name: str
    op_type: str
    op_class: str  # conv | pointwise | depthwise | gemm
    input: str  # the activation input
    output: str
    weight: str  # the tensor the node reads as its weight (may be produced by a folded chain)
    bias: str | None
    weight_shape: tuple[int, ...]
    group: int
    macs: int  # multiply-accumulates per sample (batch 1)
    weight_axis: int = 0  # output-channel axis of the weight as the node consumes it
    out_axis: int = 1  # output-channel axis of the node's output (negative: from the end)
    weight_index: int = 1  # which node input is the weight
    act_index: int = 0  # which node input is the activation

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def weight_count(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def weight_bytes_fp32(self) -> int:
        return 4 * self.weight_count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class ConstantResolver:
    """Values of constant tensors: initializers, Constant nodes, and pass-through chains of them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self._cache: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            self._cache[name] = self._resolve(name, depth=0)
        return self._cache[name]

    def is_constant(self, name: str) -> bool:
        return self.value(name) is not None

    def _resolve(self, name: str, depth: int) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
            return None
        if node.op_type not in _PASS_THROUGH:
            return None
        x = self._resolve(node.input[0], depth + 1)
        if x is None:
            return None
        if node.op_type == "Transpose":
            perm = _attr(node, "perm", None)
            return np.transpose(x, perm)
        if node.op_type == "Cast":
            to = int(_attr(node, "to", onnx.TensorProto.FLOAT))
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if node.op_type == "Identity":
            return x
        if node.op_type == "Reshape":
            shape = self._resolve(node.input[1], depth + 1)
            if shape is None:
                return None
            target = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape.tolist())]
            return x.reshape(target)
        axes_value = self._resolve(node.input[1], depth + 1) if len(node.input) > 1 and node.input[1] else None
        axes = axes_value.tolist() if axes_value is not None else _attr(node, "axes", None)
        if node.op_type == "Squeeze":
            return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
        return np.expand_dims(x, axis=tuple(axes))  # Unsqueeze


_LEAN_INIT_ELEMENTS = 1024  # initializers larger than this reach shape inference as typed inputs only


def _without_big_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are typed graph inputs instead (same name, type, shape).

    Shape inference only needs a weight's shape; the values it reads (Reshape shapes, Slice starts, Pad
    pads, ...) are small and stay. Serializing the weights for the C++ inference was most of its cost
    on a 100 MB model.
    """
    lean = onnx.ModelProto()
    lean.CopyFrom(model)
    g = lean.graph
    declared = {i.name for i in g.input}
    big = [i for i, t in enumerate(g.initializer) if int(np.prod(t.dims, dtype=np.int64)) > _LEAN_INIT_ELEMENTS]
    for i in big:
        t = g.initializer[i]
        if t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for i in reversed(big):
        del g.initializer[i]
    return lean


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_big_initializers(model))
    except Exception:
        inferred = model
    g = inferred.graph
    inputs = {i.name for i in model.graph.input}
    return {v.name: v for v in [*g.value_info, *(i for i in g.input if i.name in inputs), *g.output]}


def _shape_of(infos: dict[str, onnx.ValueInfoProto], name: str) -> tuple[int, ...] | None:
    info = infos.get(name)
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    dims = info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)  # unknown (batch) → 1


def _conv_class(w_shape: tuple[int, ...], group: int) -> str:
    if group > 1 and group == w_shape[0] and w_shape[1] == 1:
        return "depthwise"
    return "pointwise" if all(k == 1 for k in w_shape[2:]) else "conv"


class _Skip(Exception):
    """A quantizable op that stays float, with the reason."""


def _layer_for(node: onnx.NodeProto, name: str, consts: ConstantResolver, infos: dict[str, Any]) -> Layer | None:
    op = node.op_type
    out_shape = _shape_of(infos, node.output[0])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if op in ("Conv", "ConvTranspose"):
        if len(node.input) < 2:
            return None
        w = consts.value(node.input[1])
        if w is None:
            return None
        group = int(_attr(node, "group", 1))
        spatial = int(np.prod(out_shape[2:])) if out_shape and len(out_shape) > 2 else 1
        if op == "Conv":
            return Layer(name, op, _conv_class(w.shape, group), node.input[0], node.output[0], node.input[1], bias,
                         tuple(w.shape), group, int(w.size) * spatial)  # fmt: skip
        if group != 1:
            raise _Skip(f"ConvTranspose with group={group} (only group=1 is quantized)")
        in_shape = _shape_of(infos, node.input[0])
        in_spatial = int(np.prod(in_shape[2:])) if in_shape and len(in_shape) > 2 else 1
        out_major = (w.shape[1], w.shape[0], *w.shape[2:])
        return Layer(name, op, "conv", node.input[0], node.output[0], node.input[1], bias, out_major, 1,
                     int(w.size) * in_spatial, weight_axis=1)  # fmt: skip
    if op == "Gemm":
        w = consts.value(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.ndim != 2:
            return None
        if int(_attr(node, "transA", 0)):
            raise _Skip("Gemm with transA=1")
        axis = 0 if int(_attr(node, "transB", 0)) else 1
        out_major = (w.shape[axis], w.shape[1 - axis])
        return Layer(name, op, "gemm", node.input[0], node.output[0], node.input[1], bias, out_major, 1,
                     int(w.size), weight_axis=axis)  # fmt: skip
    if op == "MatMul":
        right, left = consts.value(node.input[1]), consts.value(node.input[0])
        if right is not None and left is None and right.ndim == 2:  # y = x @ W, W (K, N): channels last
            rows = int(np.prod(out_shape[:-1])) if out_shape else 1
            return Layer(name, op, "gemm", node.input[0], node.output[0], node.input[1], None,
                         (right.shape[1], right.shape[0]), 1, int(right.size) * rows, weight_axis=1, out_axis=-1)  # fmt: skip
        if left is not None and right is None and left.ndim == 2:  # y = W @ x, W (M, K): channels at -2
            cols = int(out_shape[-1]) if out_shape else 1
            return Layer(name, op, "gemm", node.input[1], node.output[0], node.input[0], None,
                         tuple(left.shape), 1, int(left.size) * cols, weight_axis=0, out_axis=-2,
                         weight_index=0, act_index=1)  # fmt: skip
        if right is not None and left is not None:
            raise _Skip("MatMul of two constants (fold it before quantizing)")
        const = right if right is not None else left
        if const is not None:
            raise _Skip(f"MatMul with a {const.ndim}-D constant weight (only 2-D weights are quantized)")
        return None
    return None


@dataclass(frozen=True)
class Skipped:
    """A Conv / Gemm / MatMul node that stays float, and why."""

    name: str
    op_type: str
    reason: str


def discover(model: onnx.ModelProto) -> tuple[list[Layer], list[Skipped]]:
    """The quantizable layers in graph order, and the Conv/Gemm/MatMul nodes that stay float (with why)."""
    consts = ConstantResolver(model)
    infos = _value_infos(model)
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        try:
            layer = _layer_for(node, name, consts, infos)
        except _Skip as why:
            skipped.append(Skipped(name, node.op_type, str(why)))
            continue
        if layer is None:
            skipped.append(Skipped(name, node.op_type, "no constant weight (both inputs are activations)"))
        else:
            layers.append(layer)
    return layers, skipped


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every quantizable node with a constant weight, in graph order, with its MACs per sample."""
    return discover(model)[0]


def layer_weight(model: onnx.ModelProto, layer: Layer, consts: ConstantResolver | None = None) -> np.ndarray:
    """The layer's weight as float64, output-channel-major."""
    value = (consts or ConstantResolver(model)).value(layer.weight)
    if value is None:  # pragma: no cover - find_layers only returns layers with constant weights
        raise UnsupportedModelError(f"layer {layer.name!r}: its weight {layer.weight!r} is not constant")
    return np.moveaxis(value.astype(np.float64), layer.weight_axis, 0)


def quantizable_layers(model: onnx.ModelProto, source: str = "the model") -> list[Layer]:
    layers = find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{source} has no Conv or Gemm node with a constant weight: there is nothing for REx to quantize"
        )
    return layers


def clip_bounds(node: onnx.NodeProto, consts: ConstantResolver) -> tuple[float, float]:
    """A Clip's (min, max): inputs 1 and 2 (opset >= 11) or attributes; ±inf where absent or not constant."""

    def bound(k: int, attr: str, default: float) -> float:
        if len(node.input) > k and node.input[k]:
            try:
                return float(np.asarray(consts.value(node.input[k])).reshape(-1)[0])
            except Exception:
                return default
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return float(attrs.get(attr, default))

    return bound(1, "min", -np.inf), bound(2, "max", np.inf)
