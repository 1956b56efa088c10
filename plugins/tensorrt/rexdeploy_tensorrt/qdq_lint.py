"""Static lint of an ONNX model's Q/DQ nodes against TensorRT's explicit-quantization rules (pure).

Usable without TensorRT: it reads an ``onnx.ModelProto`` and returns findings (node, rule, what to
do). ``severity="error"`` marks what TensorRT rejects or cannot import; ``"warning"`` marks a graph
TensorRT builds, but not the way REx intends (a layer left in float, a weight range TensorRT does not
produce itself). The rules and where they come from:

* Q/DQ scale is a build-time constant, strictly positive (and finite); the zero-point is optional and
  all zeros ("only symmetric quantization is supported"); INT8 clamps to [-128, 127], INT4 to [-8, 7];
  the scale is a scalar (per-tensor), 1-D (per-channel along ``axis``) or, for block quantization, of
  the input's rank with one blocked dimension (the last or second to last) — IQuantizeLayer /
  IDequantizeLayer, TensorRT 10 API:
  https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_quantize_layer.html
  and the Quantize operator reference
  https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html
* Weights quantized per output channel, activations per tensor; INT4 is weight-only and needs block
  quantization; pre-quantized weights need a DequantizeLayer between the weights and the linear
  operator; quantize *all* inputs of weighted operations (Conv, Gemm/MatMul) so they fuse into
  integer kernels — "Explicit Quantization" and its Q/DQ placement recommendations:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html
* Weight range: TensorRT quantizes weights itself with ``s = max(|w_min|, |w_max|) / 127``, i.e. to
  [-127, 127], while QuantizeLayer clamps activations to [-128, 127] (TensorRT 8.6 Developer Guide,
  "Introduction to Quantization",
  https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/developer-guide/index.html#intro-quantization;
  older guides state it as "INT8 activations in [-128, 127], INT8 weights in [-127, 127]"). A
  pre-quantized int8 weight holding -128 is outside that symmetric range: warned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rexdeploy_tensorrt.settings import _constants

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_INT4 = (TensorProto.INT4, TensorProto.UINT4)
_INT8_LIKE = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)

# rule ids
SCALE_NOT_CONSTANT = "scale-not-constant"
SCALE_NOT_POSITIVE = "scale-not-positive"
ZERO_POINT_NOT_CONSTANT = "zero-point-not-constant"
ZERO_POINT_NONZERO = "zero-point-nonzero"
ZERO_POINT_DTYPE = "zero-point-dtype"
ZERO_POINT_MISSING = "zero-point-missing"
WEIGHT_INT8_RANGE = "weight-int8-range"
WEIGHT_AXIS = "weight-axis"
WEIGHT_SCALE_SIZE = "weight-scale-size"
ACTIVATION_PER_CHANNEL = "activation-per-channel"
INT4_NOT_BLOCKED = "int4-not-blocked"
INT4_BLOCK_AXIS = "int4-block-axis"
INT4_BLOCK_SIZE = "int4-block-size"
INT4_ACTIVATION = "int4-activation"
WEIGHT_NOT_QUANTIZED = "weight-not-quantized"
ACTIVATION_NOT_QUANTIZED = "activation-not-quantized"


@dataclass(frozen=True)
class Finding:
    """One broken rule: which node, which rule, and what to do about it."""

    node: str
    rule: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: [{self.rule}] {self.message}"


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


class _Graph:
    """Index of one graph: constants, producers, consumers, element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts = _constants(g)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.elem = {
            vi.name: vi.type.tensor_type.elem_type
            for vi in [*g.input, *g.output, *g.value_info]
            if vi.type.HasField("tensor_type")
        }
        self.elem.update({k: t.data_type for k, t in self.consts.items()})
        self.names = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(g.node)}

    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def const(self, tensor: str) -> np.ndarray | None:
        """The constant's values; None when not a constant or its external data is not loaded."""
        t = self.consts.get(tensor)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:  # external data that was not loaded with the model
            return None

    def is_weight(self, tensor: str) -> bool:
        """A constant, or the Q→DQ / DQ of a constant (float weights quantized in the graph)."""
        if tensor in self.consts:
            return True
        node = self.producer.get(tensor)
        if node is not None and node.op_type in QDQ_OPS:
            return self.is_weight(node.input[0])
        if node is not None and node.op_type in ("Identity", "Transpose", "Reshape"):
            return self.is_weight(node.input[0])
        return False

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        if tensor in self.consts:
            return tuple(int(d) for d in self.consts[tensor].dims)
        node = self.producer.get(tensor)
        if node is not None and node.op_type in QDQ_OPS:
            return self.shape(node.input[0])
        return None


def _scale_checks(g: _Graph, node: onnx.NodeProto) -> list[Finding]:
    name, out = g.name(node), list[Finding]()
    scale_name = node.input[1] if len(node.input) > 1 else ""
    scale = g.const(scale_name) if scale_name else None
    if scale_name not in g.consts:
        out.append(
            Finding(
                name,
                SCALE_NOT_CONSTANT,
                f"scale {scale_name!r} is computed at run time; TensorRT needs a build-time constant scale: "
                "store it as an initializer (or fold the Constant/Shape chain)",
            )
        )
    elif scale is not None:
        s = scale.astype(np.float64)
        bad = ~np.isfinite(s) | (s <= 0)
        if bad.any():
            out.append(
                Finding(
                    name,
                    SCALE_NOT_POSITIVE,
                    f"{int(bad.sum())} of {s.size} scale value(s) are zero, negative or not finite (e.g. "
                    f"{float(s.flat[int(np.argmax(bad))])}); TensorRT needs strictly positive finite scales: "
                    "recompute them from max|x| / 127 (use a tiny floor for all-zero channels)",
                )
            )
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if not zp_name:
        if node.op_type == "QuantizeLinear" and _attr(node, "output_dtype", 0) == 0:
            out.append(
                Finding(
                    name,
                    ZERO_POINT_MISSING,
                    "no zero-point: ONNX then quantizes to uint8 [0, 255] (onnxruntime does) while TensorRT "
                    "uses int8; add an int8 zero-point initializer of 0",
                    severity="warning",
                )
            )
        return out
    zp = g.const(zp_name)
    if zp_name not in g.consts:
        out.append(
            Finding(
                name,
                ZERO_POINT_NOT_CONSTANT,
                f"zero-point {zp_name!r} is computed at run time; make it an int8 initializer of zeros",
            )
        )
        return out
    dtype = g.consts[zp_name].data_type
    if dtype not in _INT8_LIKE:
        out.append(
            Finding(
                name,
                ZERO_POINT_DTYPE,
                f"zero-point has type {TensorProto.DataType.Name(dtype).lower()}; TensorRT quantizes to "
                "signed int8 (int4 weight-only, float8e4m3fn): use an int8 zero-point of 0",
            )
        )
    if zp is None:
        return out
    values = np.asarray(zp).astype(np.float64).ravel()
    nonzero = values[values != 0]
    if nonzero.size:
        out.append(
            Finding(
                name,
                ZERO_POINT_NONZERO,
                f"zero-point holds {nonzero.size} non-zero value(s) (e.g. {nonzero[0]:g}); TensorRT supports "
                "symmetric quantization only: re-quantize with zero-point 0 and scale max|x| / 127",
            )
        )
    return out


def _weight_channel_axis(g: _Graph, dq_out: str) -> list[tuple[onnx.NodeProto, int]]:
    """(consumer, output-channel axis of the weight) for each weighted op using ``dq_out`` as its weight."""
    found = []
    for consumer in g.consumers.get(dq_out, []):
        if len(consumer.input) < 2 or consumer.input[1] != dq_out:
            continue
        if consumer.op_type == "Conv":
            found.append((consumer, 0))  # W is [Cout, Cin/group, kh, kw]
        elif consumer.op_type == "Gemm":
            found.append((consumer, 0 if _attr(consumer, "transB", 0) else 1))  # B is [N, K] or [K, N]
        elif consumer.op_type == "MatMul":
            found.append((consumer, -1))  # B is [..., K, N]
    return found


def _axis_checks(g: _Graph, node: onnx.NodeProto, int4_block_sizes: Sequence[int] | None) -> list[Finding]:
    name, out = g.name(node), list[Finding]()
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return out
    x = node.input[0]
    is_weight = g.is_weight(x)
    x_type = g.elem.get(x) if node.op_type == "DequantizeLinear" else None
    zp_type = g.consts[node.input[2]].data_type if len(node.input) > 2 and node.input[2] in g.consts else None
    int4 = x_type in _INT4 or zp_type in _INT4 or _attr(node, "output_dtype", 0) in _INT4
    block_size = _attr(node, "block_size", 0)
    shape = g.shape(x)
    rank = len(shape) if shape is not None else None
    axis = _attr(node, "axis", 1)
    if rank:
        axis = axis % rank

    if int4:
        if not is_weight:
            out.append(
                Finding(
                    name,
                    INT4_ACTIVATION,
                    "INT4 is weight-only in TensorRT; quantize this activation to int8 instead",
                )
            )
            return out
        blocked = block_size > 0 and scale.ndim >= 2 and (rank is None or scale.ndim == rank)
        if not blocked:
            out.append(
                Finding(
                    name,
                    INT4_NOT_BLOCKED,
                    "INT4 weights need block quantization: DequantizeLinear (opset 21) with a scale of the "
                    "weight's rank, an `axis` on the blocked dimension and `block_size` (e.g. 128)",
                )
            )
            return out
        if rank is not None and axis not in (rank - 1, rank - 2):
            out.append(
                Finding(
                    name,
                    INT4_BLOCK_AXIS,
                    f"block axis {axis} of a rank-{rank} weight; TensorRT blocks only the last or second to "
                    "last dimension: transpose the weight or change `axis`",
                )
            )
        if int4_block_sizes and block_size not in int4_block_sizes:
            out.append(
                Finding(
                    name,
                    INT4_BLOCK_SIZE,
                    f"block_size {block_size} is not one the profile supports "
                    f"({', '.join(map(str, int4_block_sizes))}); re-quantize with one of them",
                )
            )
        return out

    per_channel = scale.size > 1
    if not is_weight:
        if per_channel:
            out.append(
                Finding(
                    name,
                    ACTIVATION_PER_CHANNEL,
                    f"activation {x!r} has a per-channel scale ({scale.size} values); TensorRT quantizes "
                    "activations per tensor: use one scale (max|x| / 127 over the tensor)",
                )
            )
        return out
    if not per_channel:
        return out
    dq_out = node.output[0] if node.op_type == "DequantizeLinear" else None
    if dq_out is None:  # a Q on a float weight: check its DQ instead
        return out
    for consumer, ch_axis in _weight_channel_axis(g, dq_out):
        if rank is None:
            continue
        expected = ch_axis % rank
        cname = f"{consumer.op_type} {g.name(consumer)!r}"
        if axis != expected:
            out.append(
                Finding(
                    name,
                    WEIGHT_AXIS,
                    f"per-channel weight scale on axis {axis} but {cname} has its output channels on axis "
                    f"{expected}; quantize the weight per output channel (axis={expected})",
                )
            )
        elif shape is not None and scale.size != shape[axis]:
            out.append(
                Finding(
                    name,
                    WEIGHT_SCALE_SIZE,
                    f"{scale.size} scale values for {shape[axis]} output channels of {cname}; give one scale "
                    "per output channel",
                )
            )
    if node.op_type == "DequantizeLinear" and x_type == TensorProto.INT8:
        w = g.const(x)
        if w is not None and np.any(w == -128):
            out.append(
                Finding(
                    name,
                    WEIGHT_INT8_RANGE,
                    f"{int(np.sum(w == -128))} weight value(s) are -128; TensorRT's symmetric weight range "
                    "is [-127, 127]: clip the quantized weights to [-127, 127]",
                    severity="warning",
                )
            )
    return out


def _int4_dequantized(g: _Graph, tensor: str) -> bool:
    dq = g.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    zp = dq.input[2] if len(dq.input) > 2 else ""
    return g.elem.get(dq.input[0]) in _INT4 or (zp in g.consts and g.consts[zp].data_type in _INT4)


def _placement_checks(g: _Graph, node: onnx.NodeProto) -> list[Finding]:
    """A weighted op with any quantized input should have all its data inputs quantized (Q→DQ on the
    activation, DQ on the weight), or TensorRT cannot fuse it into an integer kernel. INT4 weights
    are weight-only by design: their activation stays float."""
    data = [i for i in node.input[:2] if i]
    from_dq = {i: (p := g.producer.get(i)) is not None and p.op_type == "DequantizeLinear" for i in data}
    if not any(from_dq.values()):
        return []
    weight_only = len(data) > 1 and _int4_dequantized(g, data[1])
    out = []
    name = g.name(node)
    for idx, tensor in enumerate(data):
        role = "weight" if (idx == 1 and g.is_weight(tensor)) else "activation"
        if not from_dq[tensor] and role == "weight":
            out.append(
                Finding(
                    name,
                    WEIGHT_NOT_QUANTIZED,
                    f"input {tensor!r} (weight) has no DequantizeLinear while the other input is quantized; "
                    "TensorRT then runs this layer in float: add an int8 DequantizeLinear on the weight "
                    "(per output channel, zero-point 0)",
                    severity="warning",
                )
            )
        elif not from_dq[tensor] and not weight_only:
            out.append(
                Finding(
                    name,
                    ACTIVATION_NOT_QUANTIZED,
                    f"input {tensor!r} (activation) has no QuantizeLinear→DequantizeLinear pair while the "
                    "weight is quantized; TensorRT then runs this layer in float (unless weight-only "
                    "quantization is meant): insert Q→DQ (per-tensor, int8, zero-point 0) on it",
                    severity="warning",
                )
            )
        elif from_dq[tensor] and role == "activation":
            dq = g.producer[tensor]
            src = g.producer.get(dq.input[0])
            int8_input = g.elem.get(dq.input[0]) == TensorProto.INT8 and src is None
            if (src is None or src.op_type != "QuantizeLinear") and not int8_input:
                out.append(
                    Finding(
                        name,
                        ACTIVATION_NOT_QUANTIZED,
                        f"activation {tensor!r} is dequantized but not produced by a QuantizeLinear; feed it "
                        "through a Q→DQ pair",
                        severity="warning",
                    )
                )
    return out


def lint_qdq(model: onnx.ModelProto, *, int4_block_sizes: Sequence[int] | None = None) -> list[Finding]:
    """Check every QuantizeLinear / DequantizeLinear and every Conv / Gemm / MatMul of ``model``
    against TensorRT's explicit-quantization rules; an empty list means the graph is clean.

    ``int4_block_sizes`` (e.g. ``profile.quantization.int4_block_sizes``) also checks INT4 block sizes.
    """
    g = _Graph(model)
    findings: list[Finding] = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            findings += _scale_checks(g, node)
            findings += _axis_checks(g, node, int4_block_sizes)
        elif node.op_type in WEIGHTED_OPS:
            findings += _placement_checks(g, node)
    return findings


def errors(findings: Sequence[Finding]) -> list[Finding]:
    """The findings TensorRT would reject (severity "error")."""
    return [f for f in findings if f.severity == "error"]
