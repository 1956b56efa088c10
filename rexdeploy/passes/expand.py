"""The REx expansion pass: carry out a Plan on a (BN-folded) FP32 ONNX graph, in Q/DQ form.

Each quantized layer ``y = op(x, W, b)`` becomes (paper §3.1, Eq. 2-3)::

    x_dq  = DequantizeLinear(QuantizeLinear(x, s_x, 0), s_x, 0)          (if act_bits == 8)
    W_k   = DequantizeLinear(R^k int8, s^k per output channel, axis 0)    (k = 1..K)
    branches: y = op(x_dq, W_1, b) + op(x_dq, W_2) + ... + op(x_dq, W_K)
    concat:   y = Sum(Split(op(x_dq, DQ(concat_k R^k), concat(b, 0, ...)), K))   (paper §3.4)

This is the explicit-quantization form both engines fuse into integer kernels: symmetric scales,
zero-point 0, per-output-channel weight scales on axis 0, per-tensor activation scales
(TensorRT developer guide, "Explicit Quantization": Q/DQ placement and per-channel weight scales;
OpenVINO Low Precision Transformations: FakeQuantize/Q-DQ on activations and weights of
Convolution / MatMul). The first version keeps every Conv/Gemm in float unless the Plan names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rexdeploy.analyze import Layer, find_layers, layer_weight
from rexdeploy.errors import PlanError
from rexdeploy.numerics import ResidualOrder, expand_weight
from rexdeploy.plan import LayerPlan, Plan

ACT_QMAX = 127.0  # symmetric int8 activations: the range maps onto [-127, 127], zero-point 0


@dataclass(frozen=True)
class ExpandResult:
    model: onnx.ModelProto
    expanded_layers: int
    numerics_seconds: float
    graph_seconds: float
    activation_scales: dict[str, float] = field(default_factory=dict)


def activation_scale(max_abs: float) -> float:
    """Symmetric int8 scale for a tensor whose largest magnitude is ``max_abs``."""
    return float(max_abs) / ACT_QMAX if max_abs > 0.0 and np.isfinite(max_abs) else 1.0


class _Emitter:
    """Collects the new nodes and initializers of the expanded graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.act_dq: dict[str, str] = {}
        self.act_scales: dict[str, float] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def quantized_activation(self, tensor: str, scale: float) -> str:
        """One shared Q/DQ pair per activation tensor (engines want one scale per tensor)."""
        if tensor in self.act_dq:
            return self.act_dq[tensor]
        s = self.const(f"{tensor}_act_scale", np.array(scale, dtype=np.float32))
        zp = self.const(f"{tensor}_act_zp", np.array(0, dtype=np.int8))
        q, dq = f"{tensor}_q", f"{tensor}_dq"
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, s, zp], [q], name=f"{tensor}_QuantizeLinear"))
        self.nodes.append(helper.make_node("DequantizeLinear", [q, s, zp], [dq], name=f"{tensor}_DequantizeLinear"))
        self.act_dq[tensor] = dq
        self.act_scales[tensor] = scale
        return dq

    def dequantized_weight(self, base: str, values: np.ndarray, scale: np.ndarray) -> str:
        w = self.const(f"{base}_int8", values.astype(np.int8))
        s = self.const(f"{base}_scale", scale.astype(np.float32))
        zp = self.const(f"{base}_zp", np.zeros(scale.shape, dtype=np.int8))
        out = f"{base}_dq"
        self.nodes.append(
            helper.make_node("DequantizeLinear", [w, s, zp], [out], name=f"{base}_DequantizeLinear", axis=0)
        )
        return out


def _copy_layer_node(node: onnx.NodeProto, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
    new = helper.make_node(node.op_type, inputs, [output], name=name)
    for attr in node.attribute:
        if node.op_type == "Gemm" and attr.name == "transB":
            continue
        new.attribute.append(attr)
    if node.op_type == "Gemm":
        new.attribute.append(helper.make_attribute("transB", 1))  # weights are emitted (N, K)
    return new


def _emit_layer(
    em: _Emitter,
    node: onnx.NodeProto,
    layer: Layer,
    lp: LayerPlan,
    orders: list[ResidualOrder],
    x_scale: float | None,
) -> None:
    x = node.input[0] if x_scale is None else em.quantized_activation(node.input[0], x_scale)
    bias = [layer.bias] if layer.bias else []
    out = node.output[0]
    base = layer.name.replace("/", "_").strip("_") or layer.output
    if lp.form == "concat" and len(orders) > 1 and layer.group == 1:  # grouped convs stay branches
        _emit_concat(em, node, layer, orders, x, base)
        return
    branch_outputs: list[str] = []
    for o in orders:
        if len(o.channels) != layer.out_channels:
            raise PlanError(
                f"layer {layer.name!r}: sparse orders (gamma) are not emitted by this pass version; use a dense plan"
            )
        w = em.dequantized_weight(f"{base}_w{o.order}", o.values, o.scale)
        y = out if len(orders) == 1 else f"{out}_order{o.order}"
        inputs = [x, w, *(bias if o.order == 1 else [])]
        em.nodes.append(_copy_layer_node(node, inputs, y, f"{layer.name}_order{o.order}"))
        branch_outputs.append(y)
    acc = branch_outputs[0]
    for k, y in enumerate(branch_outputs[1:], start=2):
        target = out if k == len(branch_outputs) else f"{out}_sum{k}"
        em.nodes.append(helper.make_node("Add", [acc, y], [target], name=f"{layer.name}_add{k}"))
        acc = target


def _emit_concat(
    em: _Emitter, node: onnx.NodeProto, layer: Layer, orders: list[ResidualOrder], x: str, base: str
) -> None:
    if any(len(o.channels) != layer.out_channels for o in orders):
        raise PlanError(f"layer {layer.name!r}: the concat form needs dense orders (no gamma)")
    k = len(orders)
    values = np.concatenate([o.values for o in orders], axis=0)
    scale = np.concatenate([o.scale for o in orders], axis=0)
    w = em.dequantized_weight(f"{base}_wcat", values, scale)
    inputs = [x, w]
    if layer.bias:
        b = numpy_helper.to_array(next(i for i in em.model.graph.initializer if i.name == layer.bias))
        if b.ndim != 1:
            raise PlanError(f"layer {layer.name!r}: the concat form needs a 1-D bias; use branches")
        inputs.append(em.const(f"{base}_bcat", np.concatenate([b, np.zeros(b.size * (k - 1), dtype=b.dtype)])))
    cat = f"{layer.output}_concat"
    em.nodes.append(_copy_layer_node(node, inputs, cat, f"{layer.name}_concat"))
    parts = [f"{layer.output}_part{i + 1}" for i in range(k)]
    sizes = em.const(f"{base}_split_sizes", np.full(k, layer.out_channels, dtype=np.int64))
    em.nodes.append(helper.make_node("Split", [cat, sizes], parts, name=f"{layer.name}_split", axis=1))
    em.nodes.append(helper.make_node("Sum", parts, [layer.output], name=f"{layer.name}_reduce"))


def expand(
    model: onnx.ModelProto,
    plan: Plan,
    activation_ranges: dict[str, float] | None = None,
) -> ExpandResult:
    """Return the expanded Q/DQ model that carries out ``plan`` on ``model`` (already BN-folded).

    ``activation_ranges`` maps each quantized layer's input tensor to its data-free max |x|;
    layers with ``act_bits == 8`` need one.
    """
    layers = {layer.name: layer for layer in find_layers(model)}
    unknown = sorted(set(plan.layers) - set(layers))
    if unknown:
        raise PlanError(
            f"the plan names layer(s) {', '.join(unknown[:5])} that are not quantizable Conv/Gemm nodes of this model; "
            "was it made for another model?"
        )
    ranges = activation_ranges or {}
    t_numerics = 0.0
    t0 = time.perf_counter()
    em = _Emitter(model)
    by_node: dict[str, tuple[Layer, LayerPlan]] = {name: (layers[name], lp) for name, lp in plan.layers.items()}
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name not in by_node:
            em.nodes.append(node)
            continue
        layer, lp = by_node[name]
        if lp.predictors > 1:
            raise PlanError(
                f"layer {name!r}: ensembles of predictors are emitted by the network-level ensemble pass, "
                "not per layer; use one predictor here"
            )
        x_scale: float | None = None
        if lp.act_bits == 8:
            if layer.input not in ranges:
                raise PlanError(f"layer {name!r}: no activation range for its input {layer.input!r}")
            x_scale = activation_scale(ranges[layer.input])
        tn = time.perf_counter()
        orders = expand_weight(layer_weight(model, layer), lp.bits, lp.order, lp.gamma)
        t_numerics += time.perf_counter() - tn
        _emit_layer(em, node, layer, lp, orders, x_scale)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replaced_weights = {layers[name].weight for name in plan.layers}
    del out.graph.node[:]
    out.graph.node.extend(em.nodes)
    used = {i for n in em.nodes for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used or i.name not in replaced_weights]
    keep = [i for i in keep if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*keep, *em.inits])
    del out.graph.value_info[:]
    out.producer_name = "rexdeploy"
    t_graph = time.perf_counter() - t0 - t_numerics
    return ExpandResult(out, len(plan.layers), t_numerics, t_graph, dict(em.act_scales))
