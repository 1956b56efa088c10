"""Layer discovery: the Conv / Gemm nodes with constant weights, their shapes, FLOPs and bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from rexdeploy.errors import UnsupportedModelError

QUANTIZABLE_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class Layer:
    """One quantizable layer. ``weight_shape`` is output-channel-major (axis 0 = output channels)."""

    name: str
    op_type: str
    op_class: str  # conv | pointwise | depthwise | gemm
    input: str
    output: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    group: int
    macs: int  # multiply-accumulates per sample (batch 1)
    weight_transposed: bool = False  # Gemm with transB = 0: the stored weight is (K, N)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def weight_count(self) -> int:
        return int(np.prod(self.weight_shape))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _shape_of(value_info: dict[str, onnx.ValueInfoProto], name: str) -> tuple[int, ...] | None:
    info = value_info.get(name)
    if info is None or not info.type.HasField("tensor_type"):
        return None
    dims = info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)  # unknown (batch) → 1


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every Conv and Gemm whose weight is an initializer, in graph order, with its MACs per sample."""
    inits = {init.name: init for init in model.graph.initializer}
    infos = _value_infos(model)
    layers: list[Layer] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.name or f"{node.op_type}_{index}"
        w_shape = tuple(int(d) for d in inits[node.input[1]].dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "Conv":
            group = int(_attr(node, "group", 1))
            out_shape = _shape_of(infos, node.output[0])
            spatial = int(np.prod(out_shape[2:])) if out_shape and len(out_shape) > 2 else 1
            macs = int(np.prod(w_shape)) * spatial
            kernel = w_shape[2:]
            if group > 1 and group == w_shape[0] and w_shape[1] == 1:
                op_class = "depthwise"
            elif all(k == 1 for k in kernel):
                op_class = "pointwise"
            else:
                op_class = "conv"
            layers.append(
                Layer(name, "Conv", op_class, node.input[0], node.output[0], node.input[1], bias, w_shape, group, macs)
            )
        else:
            if int(_attr(node, "transA", 0)):
                raise UnsupportedModelError(
                    f"Gemm node {name!r} uses transA=1, which rexdeploy does not quantize yet; "
                    "re-export the model without transposed Gemm inputs"
                )
            trans_b = bool(_attr(node, "transB", 0))
            out_major = w_shape if trans_b else (w_shape[1], w_shape[0])
            layers.append(
                Layer(
                    name,
                    "Gemm",
                    "gemm",
                    node.input[0],
                    node.output[0],
                    node.input[1],
                    bias,
                    out_major,
                    1,
                    int(np.prod(w_shape)),
                    weight_transposed=not trans_b,
                )
            )
    return layers


def layer_weight(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The layer's weight as float64, output-channel-major (Gemm weights transposed if needed)."""
    init = next(i for i in model.graph.initializer if i.name == layer.weight)
    w = numpy_helper.to_array(init).astype(np.float64)
    return w.T if layer.weight_transposed else w
