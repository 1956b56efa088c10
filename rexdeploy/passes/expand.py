"""The REx expansion pass: carry out a Plan on a (BN-folded) FP32 ONNX graph, in Q/DQ form.

Each quantized layer ``y = op(x, W, b)`` becomes (paper §3.1, Eq. 2-3)::

    x_dq = DequantizeLinear(QuantizeLinear(x, s_x, 0), s_x, 0)          (if act_bits == 8)
    W_k  = DequantizeLinear(R^k int8, s^k per output channel, axis)      (k = 1..K)
    branches: y = op(x_dq, W_1, b) + op(x_dq, W_2) + ... + op(x_dq, W_K)
    concat:   y = Sum(Split(op(x_dq, DQ(concat_k R^k), concat(b, 0, ...)), K))   (paper §3.4)

A sparse order k (paper §3.2, Eq. 12) holds only its selected output channels S_k: it runs as a
narrower layer ``op(x_dq, W_k[S_k])`` whose output is scattered into the full channel axis by a
Pad (one zero channel) + Gather and added — its cost scales with |S_k|, not with the layer. A
depthwise layer also gathers its input channels S_k. ``sparse_form="onehot"`` scatters the narrow
output with a constant one-hot 1×1 Conv (MatMul for Gemm/MatMul) instead of Pad + Gather;
``sparse_form="dense"`` keeps the full width with zero rows (no saving; the reference form);
``sparse_form="auto"`` picks per layer: narrow (gather) where the saved compute outweighs the scatter
(group-1 layers with a fan-in of at least ``AUTO_MIN_FAN_IN``, orders keeping at most ``AUTO_NARROW_MAX``
of the channels), dense elsewhere — depthwise layers included.

Ensembles (paper §3.3, Algorithm 1) are built by :mod:`rexdeploy.passes.ensemble` before this pass:
it clones the network per predictor and tells this pass which orders each clone holds.

Engine rules (cited where they apply): symmetric scales, zero-point 0 (int8), per-output-channel
weight scales on the weight's output axis, per-tensor activation scales, one Q/DQ pair per
activation tensor; on OpenVINO / onnxruntime profiles a layer input that is ≥ 0 by the graph (a ReLU /
ReLU6 output) is uint8 with zero-point 0 instead (``unsigned_activations``: u8 × i8 is those engines'
x86 kernel) — TensorRT developer guide, "Explicit Quantization" / "Q/DQ Layer-Placement
Recommendations" (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
work-quantized-types.html); OpenVINO Low Precision Transformations fuse DequantizeLinear on weights
+ Q/DQ on activations of Convolution / MatMul into int8 kernels
(https://docs.openvino.ai/2024/documentation/openvino-extensibility/openvino-plugin-library/
advanced-guides/low-precision-transformations.html).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rexdeploy.actorders import (
    activation_order_scales,
    activation_scale,
    emits_unsigned,
    first_range,
    kept_terms,
    unsigned_activations_for,
)
from rexdeploy.analyze import ConstantResolver, Layer, find_layers, layer_weight
from rexdeploy.bnstats import nonnegative_tensors
from rexdeploy.errors import PlanError
from rexdeploy.graph import add_initializer, drop_initializers
from rexdeploy.numerics import ResidualOrder, ensemble_groups, expand_weight
from rexdeploy.passes.attention import attention_sources
from rexdeploy.passes.residual import POOLS, pooled_reader, quantized_joins
from rexdeploy.plans import LayerPlan, Plan

SPARSE_FORMS = ("gather", "dense", "onehot", "auto")
# sparse_form="auto": a sparse order runs narrow (Pad + Gather) only on a group-1 layer with at least
# AUTO_MIN_FAN_IN multiply-accumulates per output value that keeps at most AUTO_NARROW_MAX of its output
# channels; otherwise dense (zero rows). The scatter costs memory traffic per output value, the narrow layer
# saves compute per output value: measured on OpenVINO CPU (benchmarks/results/sparse_forms.md), narrow costs
# ≈ 0.05 + γ (3×3, 128 channels, fan-in 1152) and ≈ 0.2 + γ (1×1, 256 channels, fan-in 256) of a dense order,
# so it wins up to 3/4 of the channels there, and loses at every γ on depthwise layers and on the small 1×1
# convs of MobileNetV2 blocks (fan-in 24 / 144).
AUTO_NARROW_MAX = 0.75
AUTO_MIN_FAN_IN = 256
BLOCKED_DQ_OPSET = 21


@dataclass(frozen=True)
class ExpandResult:
    model: onnx.ModelProto
    expanded_layers: int
    numerics_seconds: float
    graph_seconds: float
    activation_scales: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerJob:
    """What to emit for one node: its layer, its plan, which orders (1-based) and whether it carries the bias."""

    layer: Layer
    plan: LayerPlan
    orders: tuple[int, ...]
    bias: bool
    tag: str = ""  # suffix for the names of this node's new tensors (predictor clones)
    # (weight, bits, order, gamma) → (orders, seconds) already computed by the ensemble pass
    # (float_predictors) for the same weights; one dict shared by all jobs of an ensemble
    shared_orders: dict[tuple[str, int, int, float | None], tuple[list[ResidualOrder], float]] | None = field(
        default=None, compare=False, repr=False
    )


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_").strip("_") or "t"


class _Emitter:
    """Collects the new nodes and initializers of the expanded graph."""

    def __init__(self, sparse_form: str, inits: Any = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        # the output graph's initializer field when given: tensors are built in place, not copied in later
        self.inits: Any = [] if inits is None else inits
        self.act_dq: dict[str, str] = {}
        self.act_orders: dict[tuple[str, int], list[str]] = {}
        self.act_scales: dict[str, float] = {}
        self.names: set[str] = set()
        self.outputs: dict[str, str] = {}  # weight DQ outputs by base name
        self.sparse_form = sparse_form

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer, once per name: a layer's activation orders share its weights and index tensors."""
        if name in self.names:
            return name
        self.names.add(name)
        if isinstance(self.inits, list):
            self.inits.append(numpy_helper.from_array(value, name))
        else:
            add_initializer(self.inits, value, name)
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))

    def quantized_activation(self, tensor: str, scale: float, unsigned: bool = False, owner: str = "") -> str:
        """One shared Q/DQ pair per activation tensor (engines want one scale per tensor); ``unsigned``:
        uint8 with zero-point 0 (the tensor is ≥ 0), else int8 with zero-point 0. ``owner``: a layer name the
        Q/DQ nodes' names start with (``<owner>_<tensor>_QuantizeLinear``), which makes them that layer's in
        :func:`rexdeploy.probing.node_owners` (a pooled input's Q/DQ: there because the layer after the pool is
        int8)."""
        if tensor in self.act_dq:
            return self.act_dq[tensor]
        base = _safe(tensor)
        s = self.const(f"{base}_act_scale", np.array(scale, dtype=np.float32))
        zp = self.const(f"{base}_act_zp", np.array(0, dtype=np.uint8 if unsigned else np.int8))
        q, dq = f"{base}_q", f"{base}_dq"
        named = f"{owner}_{base}" if owner else base
        self.node("QuantizeLinear", [tensor, s, zp], [q], f"{named}_QuantizeLinear")
        self.node("DequantizeLinear", [q, s, zp], [dq], f"{named}_DequantizeLinear")
        self.act_dq[tensor] = dq
        self.act_scales[tensor] = scale
        return dq

    def activation_orders(self, tensor: str, scale: float, act_order: int, unsigned: bool = False) -> list[str]:
        """``x_1 … x_J`` of :mod:`rexdeploy.actorders`: a Q/DQ of ``tensor``, then of each remainder
        (``Sub`` of the previous order's DQ), scale / 254 per order. One chain per (tensor, J).
        ``unsigned``: ``x_1`` is uint8 (the tensor is ≥ 0); the remainders have either sign: int8."""
        if act_order == 1:
            return [self.quantized_activation(tensor, scale, unsigned)]
        key = (tensor, act_order)
        if key in self.act_orders:
            return self.act_orders[key]
        base = f"{_safe(tensor)}_a{act_order}"
        zp_signed = self.const(f"{base}_zp", np.array(0, dtype=np.int8))
        zp_first = self.const(f"{base}_uzp", np.array(0, dtype=np.uint8)) if unsigned else zp_signed
        outs: list[str] = []
        current = tensor
        for j, s_j in enumerate(activation_order_scales(scale, act_order), start=1):
            zp = zp_first if j == 1 else zp_signed
            s = self.const(f"{base}_x{j}_scale", np.array(s_j, dtype=np.float32))
            q, dq = f"{base}_x{j}_q", f"{base}_x{j}"
            self.node("QuantizeLinear", [current, s, zp], [q], f"{base}_x{j}_QuantizeLinear")
            self.node("DequantizeLinear", [q, s, zp], [dq], f"{base}_x{j}_DequantizeLinear")
            outs.append(dq)
            if j < act_order:
                rest = f"{base}_r{j}"
                self.node("Sub", [current, dq], [rest], f"{base}_r{j}_Sub")
                current = rest
        self.act_orders[key] = outs
        self.act_scales.setdefault(tensor, scale)
        return outs

    def dequantized_int4_blocks(
        self, base: str, values: np.ndarray, scale: np.ndarray, layer: Layer, block: int
    ) -> str:
        """int4 weight with one scale per (output channel, block of inputs): a blocked DequantizeLinear
        (ONNX opset 21 ``block_size``; TensorRT INT4 weight-only block quantization of Gemm/MatMul)."""
        n, k_in = layer.weight_shape
        q = np.moveaxis(values.reshape(n, k_in), 0, layer.weight_axis)
        s = np.moveaxis(scale.reshape(n, k_in // block), 0, layer.weight_axis).astype(np.float32)
        out = f"{base}_dq"
        if self.outputs.get(base) == out:
            return out
        w = f"{base}_int4"
        self.names.add(w)
        self.inits.append(
            helper.make_tensor(w, onnx.TensorProto.INT4, list(q.shape), q.astype(np.int8).ravel().tolist())
        )
        sc = self.const(f"{base}_scale", np.ascontiguousarray(s))
        self.node("DequantizeLinear", [w, sc], [out], f"{base}_DequantizeLinear", axis=1 - layer.weight_axis,
                  block_size=block)  # fmt: skip
        self.outputs[base] = out
        return out

    def dequantized_weight(self, base: str, values: np.ndarray, scale: np.ndarray, axis: int) -> str:
        """int8 initializer in the layout the node consumes + per-channel DequantizeLinear on ``axis``."""
        w = self.const(f"{base}_int8", np.ascontiguousarray(np.moveaxis(values, 0, axis)).astype(np.int8))
        s = self.const(f"{base}_scale", scale.astype(np.float32))
        zp = self.const(f"{base}_zp", np.zeros(scale.shape, dtype=np.int8))
        out = f"{base}_dq"
        if self.outputs.get(base) == out:
            return out
        self.node("DequantizeLinear", [w, s, zp], [out], f"{base}_DequantizeLinear", axis=axis)
        self.outputs[base] = out
        return out


def _layer_node(node: onnx.NodeProto, layer: Layer, x: str, w: str, bias: str | None, output: str, name: str,
                group: int | None = None) -> onnx.NodeProto:  # fmt: skip
    inputs = ["", ""]
    inputs[layer.act_index], inputs[layer.weight_index] = x, w
    if bias:
        inputs.append(bias)
    new = helper.make_node(node.op_type, inputs, [output], name=name)
    for attr in node.attribute:
        if attr.name == "group" and group is not None:
            new.attribute.append(helper.make_attribute("group", group))
        else:
            new.attribute.append(attr)
    return new


def _output_rank(layer: Layer) -> int:
    return len(layer.weight_shape) if layer.op_type in ("Conv", "ConvTranspose") else 2


def _emit_sparse_order(
    em: _Emitter, node: onnx.NodeProto, layer: Layer, o: ResidualOrder, x: str, base: str, out: str, suffix: str = ""
) -> None:
    """A narrow layer over the selected channels, scattered back into the full channel axis."""
    c = layer.out_channels
    w = em.dequantized_weight(base, o.values, o.scale, layer.weight_axis)
    narrow = f"{out}_narrow"
    group = None
    if layer.op_class == "depthwise":  # channel c reads input channel c: gather those inputs too
        idx = em.const(f"{base}_in_idx", o.channels.astype(np.int64))
        gathered = f"{out}_in"
        em.node("Gather", [x, idx], [gathered], f"{base}_gather_in{suffix}", axis=1)
        x, group = gathered, len(o.channels)
    em.nodes.append(_layer_node(node, layer, x, w, None, narrow, f"{base}_narrow{suffix}", group=group))
    if em.sparse_form == "onehot":
        _emit_onehot_scatter(em, layer, o, narrow, base, out, suffix)
        return
    axis = layer.out_axis
    rank = _output_rank(layer) if axis >= 0 else None  # MatMul outputs: any rank, channel axis from the end
    # Pad one zero channel at the end of the channel axis, then Gather: channel j of the result is
    # narrow channel position(j) if j is selected, else the zero channel.
    position = np.full(c, len(o.channels), dtype=np.int64)
    position[o.channels] = np.arange(len(o.channels), dtype=np.int64)
    if rank is None:  # channel axis counted from the end (MatMul): pad via a zero slice + Concat
        zero = f"{out}_zero"
        sl = em.const(f"{base}_zslice", np.array([0], dtype=np.int64))
        sl_end = em.const(f"{base}_zslice_end", np.array([1], dtype=np.int64))
        ax = em.const(f"{base}_zslice_axis", np.array([axis], dtype=np.int64))
        part = f"{out}_first"
        em.node("Slice", [narrow, sl, sl_end, ax], [part], f"{base}_slice0{suffix}")
        zc = em.const(f"{base}_zero_c", np.array(0.0, dtype=np.float32))
        em.node("Mul", [part, zc], [zero], f"{base}_zero{suffix}")
        padded = f"{out}_padded"
        em.node("Concat", [narrow, zero], [padded], f"{base}_pad{suffix}", axis=axis)
    else:
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[rank + axis] = 1
        padded = f"{out}_padded"
        em.node("Pad", [narrow, em.const(f"{base}_pads", pads)], [padded], f"{base}_pad{suffix}")
    em.node("Gather", [padded, em.const(f"{base}_scatter_idx", position)], [out], f"{base}_scatter{suffix}", axis=axis)


def _runs_narrow(sparse_form: str, layer: Layer, o: ResidualOrder) -> bool:
    """Whether a sparse order is emitted as a narrow layer (else: full width with zero rows)."""
    if sparse_form in ("gather", "onehot"):
        return layer.group == 1 or layer.op_class == "depthwise"
    if sparse_form == "auto":
        fan_in = math.prod(layer.weight_shape[1:])
        return layer.group == 1 and fan_in >= AUTO_MIN_FAN_IN and o.n_channels <= AUTO_NARROW_MAX * layer.out_channels
    return False


def _emit_onehot_scatter(
    em: _Emitter, layer: Layer, o: ResidualOrder, narrow: str, base: str, out: str, suffix: str = ""
) -> None:
    """``sparse_form="onehot"``: the narrow output is put back into the full channel axis by a constant
    one-hot matrix E (C × |S_k|, E[S_k[j], j] = 1) — a 1×1 Conv for conv layers, a MatMul for Gemm/MatMul —
    so the scatter stays a (float) convolution the engine can fuse the following Add into. Exact in
    float: every output channel is 1·x or a sum of zeros."""
    c, k = layer.out_channels, o.n_channels
    onehot = np.zeros((c, k), dtype=np.float32)
    onehot[o.channels, np.arange(k)] = 1.0
    if layer.op_type in ("Conv", "ConvTranspose"):  # output (N, C, spatial...): a 1×1 Conv
        spatial = _output_rank(layer) - 2
        e = em.const(f"{base}_onehot", onehot.reshape(c, k, *([1] * spatial)))
        em.node("Conv", [narrow, e], [out], f"{base}_scatter{suffix}", kernel_shape=[1] * spatial)
    elif layer.out_axis == -2:  # y = W @ x: channels on the second-to-last axis
        em.node("MatMul", [em.const(f"{base}_onehot", onehot), narrow], [out], f"{base}_scatter{suffix}")
    else:  # Gemm (N, C) and y = x @ W: channels last
        e = em.const(f"{base}_onehot", np.ascontiguousarray(onehot.T))
        em.node("MatMul", [narrow, e], [out], f"{base}_scatter{suffix}")


def _full_width(o: ResidualOrder, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sparse order as full-width values with zero rows (scale 1) on the channels it skips."""
    if o.n_channels == channels:
        return o.values, o.scale
    values = np.zeros((channels, *o.values.shape[1:]), dtype=np.int8)
    values[o.channels] = o.values
    scale = np.ones(channels, dtype=np.float64)
    scale[o.channels] = o.scale
    return values, scale


def _emit_layer(em: _Emitter, node: onnx.NodeProto, job: LayerJob, orders: list[ResidualOrder], x_scale: float | None,
                bias_value: np.ndarray | None, unsigned: bool = False, bias_name: str | None = None) -> None:  # fmt: skip
    """Emit one node's terms ``R^k·x_j`` (:func:`rexdeploy.actorders.kept_terms`; J = 1 without act_order)
    and sum them into the node's output. ``unsigned``: the input's first order is uint8. ``bias_name``: the bias
    tensor the first term adds (default: the layer's own; a bias-corrected one, :func:`corrected_bias`)."""
    layer, lp = job.layer, job.plan
    bias_name = bias_name or layer.bias
    tensor = node.input[layer.act_index]
    xs = [tensor] if x_scale is None else em.activation_orders(tensor, x_scale, lp.act_order, unsigned)
    mine = [orders[k - 1] for k in job.orders if orders[k - 1].n_channels > 0]  # γ_l = 0 leaves orders empty
    if not mine:
        raise PlanError(
            f"layer {layer.name!r}: predictor {job.tag.removeprefix('__p') or 1} holds no channel of its orders "
            f"{list(job.orders)} (gamma too small); raise gamma or use fewer predictors"
        )
    terms = set(kept_terms(lp.bits, lp.order, len(xs)))
    per_input = [[o for o in mine if (j, o.order) in terms] for j in range(1, len(xs) + 1)]
    out = node.output[0]
    sole = out if sum(1 for chosen in per_input if chosen) == 1 else None
    outputs: list[str] = []
    for j, (x, chosen) in enumerate(zip(xs, per_input, strict=True), start=1):
        suffix = "" if j == 1 else f"_a{j}"
        bias = bias_name if job.bias and j == 1 else None
        outputs += _emit_terms(em, node, job, chosen, x, bias, bias_value, sole, suffix)
    if len(outputs) > 1:
        acc = outputs[0]
        for k, y in enumerate(outputs[1:], start=2):
            target = out if k == len(outputs) else f"{out}_acc{k}{job.tag}"
            em.node("Add", [acc, y], [target], f"{layer.name}_add{k}{job.tag}")
            acc = target
    elif outputs[0] != out:
        em.node("Identity", [outputs[0]], [out], f"{layer.name}_out{job.tag}")


def _emit_terms(em: _Emitter, node: onnx.NodeProto, job: LayerJob, mine: list[ResidualOrder], x: str,
                bias: str | None, bias_value: np.ndarray | None, sole: str | None, suffix: str) -> list[str]:  # fmt: skip
    """The weight orders ``mine`` applied to one (activation-order) input ``x``; returns the partial outputs.
    ``sole``: the node's output name when these are the layer's only terms (a single term or a concat
    writes it directly). ``suffix`` tells apart the node and tensor names of activation orders ≥ 2
    (initializers are shared: same names)."""
    layer, lp = job.layer, job.plan
    single_out = sole if len(mine) == 1 else None
    base = _safe(layer.name) + job.tag
    out = node.output[0]
    sparse = [o for o in mine if o.n_channels < layer.out_channels and _runs_narrow(em.sparse_form, layer, o)]
    full = [o for o in mine if o not in sparse]
    outputs: list[str] = []
    concat_ok = bias is None or (bias_value is not None and bias_value.ndim == 1)
    if lp.block:  # int4 blocks: each order one blocked-DQ branch (numerics ran per block row)
        for o in full:
            y = single_out or f"{out}_order{o.order}{job.tag}{suffix}"
            w = em.dequantized_int4_blocks(f"{base}_w{o.order}", o.values, o.scale, layer, lp.block)
            em.nodes.append(_layer_node(node, layer, x, w, bias, y, f"{layer.name}_order{o.order}{job.tag}{suffix}"))
            bias = None
            outputs.append(y)
    elif lp.form == "concat" and len(full) > 1 and layer.group == 1 and concat_ok:
        cat_orders = [ResidualOrder(o.order, *_full_width(o, layer.out_channels)[:2], np.arange(layer.out_channels))
                      for o in full]  # fmt: skip
        outputs.append(
            _emit_concat(em, node, layer, cat_orders, x, bias, bias_value, base, sole if not sparse else None, suffix)
        )
        bias = None
    else:
        for o in full:
            y = single_out or f"{out}_order{o.order}{job.tag}{suffix}"
            values, scale = _full_width(o, layer.out_channels)
            w = em.dequantized_weight(f"{base}_w{o.order}", values, scale, layer.weight_axis)
            em.nodes.append(_layer_node(node, layer, x, w, bias, y, f"{layer.name}_order{o.order}{job.tag}{suffix}"))
            bias = None
            outputs.append(y)
    for o in sparse:
        y = single_out or f"{out}_order{o.order}{job.tag}{suffix}"
        _emit_sparse_order(em, node, layer, o, x, f"{base}_w{o.order}", y, suffix)
        outputs.append(y)
    if bias is not None:  # pragma: no cover - order 1 is always dense and carries the bias
        raise PlanError(f"layer {layer.name!r}: its bias has no dense order to ride on")
    return outputs


def _emit_concat(em: _Emitter, node: onnx.NodeProto, layer: Layer, orders: list[ResidualOrder], x: str,
                 bias: str | None, bias_value: np.ndarray | None, base: str, out: str | None,
                 suffix: str = "") -> str:  # fmt: skip
    """One kernel over the concatenated orders (paper §3.4), then Split + Sum. Returns the sum's name."""
    k = len(orders)
    values = np.concatenate([o.values for o in orders], axis=0)
    scale = np.concatenate([o.scale for o in orders], axis=0)
    base = f"{base}_o{'_'.join(str(o.order) for o in orders)}"  # activation orders ≥ 2 may concatenate fewer
    w = em.dequantized_weight(f"{base}_wcat", values, scale, layer.weight_axis)
    b = None
    if bias is not None and bias_value is not None:
        cat_bias = np.concatenate([bias_value, np.zeros(bias_value.size * (k - 1), dtype=bias_value.dtype)])
        b = em.const(f"{base}_bcat", cat_bias)
    cat = f"{layer.output}{base}_concat{suffix}"
    em.nodes.append(_layer_node(node, layer, x, w, b, cat, f"{base}_concat{suffix}"))
    parts = [f"{cat}_part{i + 1}" for i in range(k)]
    sizes = em.const(f"{base}_split_sizes", np.full(k, layer.out_channels, dtype=np.int64))
    em.node("Split", [cat, sizes], parts, f"{base}_split{suffix}", axis=layer.out_axis)
    target = out if out is not None else f"{cat}_sum"
    em.node("Sum", parts, [target], f"{base}_reduce{suffix}")
    return target


def expand(
    model: onnx.ModelProto,
    plan: Plan,
    activation_ranges: dict[str, float] | None = None,
    *,
    jobs: dict[str, LayerJob] | None = None,
    sparse_form: str = "gather",
    unsigned_activations: bool | None = None,
    input_means: Mapping[str, np.ndarray] | None = None,
) -> ExpandResult:
    """Return the expanded Q/DQ model that carries out ``plan`` on ``model`` (already BN-folded).

    ``activation_ranges`` maps each int8-quantized layer's activation input tensor to its data-free
    max |x|. ``jobs`` (from the ensemble pass) maps node names to the orders each node holds; by
    default every planned layer holds all its orders and its bias. ``unsigned_activations``: a layer
    input that is ≥ 0 by the graph (:func:`rexdeploy.bnstats.nonnegative_tensors`: ReLU / ReLU6 outputs,
    pooled or concatenated) is quantized to uint8 (zero-point 0, scale ``max / 255``: twice the
    resolution of int8 on the same range) — what OpenVINO's CPU plugin and onnxruntime run natively
    (u8 × i8 kernels); TensorRT wants int8 only. ``None``: as the plan's profile's engine allows
    (:func:`unsigned_activations_for`). ``input_means``: the per-channel mean of layer input tensors (data-free:
    :func:`rexdeploy.ranges.activation_means`); a Conv / Gemm layer whose input has one gets the bias correction
    of :func:`corrected_bias` (not with ensembles: there the orders are split across predictors).
    """
    if sparse_form not in SPARSE_FORMS:
        raise PlanError(f"sparse form {sparse_form!r} unknown; use one of {', '.join(SPARSE_FORMS)}")
    t0 = time.perf_counter()
    if jobs is None:
        layers = {layer.name: layer for layer in find_layers(model)}
        unknown = sorted(set(plan.layers) - set(layers))
        if unknown:
            raise PlanError(
                f"the plan names layer(s) {', '.join(unknown[:5])} that are not quantizable Conv/Gemm/MatMul nodes "
                "of this model; was it made for another model?"
            )
        if plan.predictors > 1:
            raise PlanError("an ensemble plan must go through rexdeploy.passes.ensemble (expand_model does this)")
        jobs = {
            name: LayerJob(layers[name], lp, tuple(range(1, lp.order + 1)), True) for name, lp in plan.layers.items()
        }
    ranges = activation_ranges or {}
    if any(j.plan.block for j in jobs.values()):
        model = _upgrade_opset(model, BLOCKED_DQ_OPSET)
    consts = ConstantResolver(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the new initializers go straight into it; its nodes are replaced below
    em = _Emitter(sparse_form, out.graph.initializer)
    if unsigned_activations is None:
        unsigned_activations = unsigned_activations_for(plan.profile)
    nonnegative = nonnegative_tensors(model) if unsigned_activations else set()
    cache: dict[tuple[str, int, int, float | None, int], list[ResidualOrder]] = {}
    t_numerics = 0.0
    nodes = {n.name or f"{n.op_type}_{i}": n for i, n in enumerate(model.graph.node)}
    int8_jobs = [(nodes[n], j) for n, j in jobs.items() if n in nodes and j.plan.act_bits == 8]
    int8_inputs = {str(n.input[j.layer.act_index]): j for n, j in int8_jobs if j.plan.act_order == 1}
    joins = quantized_joins(model, int8_inputs, {t for n, _ in int8_jobs for t in n.output})
    # attention between int8 layers: its MatMuls' inputs quantized where they are made (passes/attention.py)
    sources = {t: owner for t, owner in attention_sources(model, {str(t): j.layer.name for n, j in int8_jobs
                                                                   for t in n.output}).items() if t in ranges}  # fmt: skip
    rerouted: dict[str, str] = {}  # a source → its DQ, which its readers read

    def quantize_sources(made: onnx.NodeProto) -> None:
        for tensor in made.output:
            if tensor in sources:
                unsigned = tensor in nonnegative  # a Softmax output, where the engine runs uint8
                scale = activation_scale(ranges[tensor], unsigned)
                rerouted[tensor] = em.quantized_activation(tensor, scale, unsigned, sources[tensor])

    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        job = jobs.get(name)
        if job is None:
            if any(t in rerouted for t in node.input):
                node = _reading(node, rerouted)
            if name in joins and all(t in ranges for t in joins[name]):  # residual Add or pool between int8 layers
                reached = pooled_reader(model, node.output[0], int8_inputs) if node.op_type in POOLS else None
                owner = int8_inputs[reached].layer.name if reached is not None else ""
                node = _quantized_join(em, node, ranges, int8_inputs, nonnegative, owner)
            em.nodes.append(node)
            quantize_sources(node)
            continue
        lp, layer = job.plan, job.layer
        x_scale: float | None = None
        unsigned = emits_unsigned(node.op_type, node.input[layer.act_index], nonnegative)
        if lp.act_bits == 8:
            tensor = node.input[layer.act_index]
            if tensor not in ranges:
                raise PlanError(f"layer {name!r}: no activation range for its input {tensor!r}")
            x_scale = activation_scale(first_range(ranges[tensor], lp.act_order), unsigned)
        key = (layer.weight, lp.bits, lp.order, lp.gamma, lp.block)
        shared = job.shared_orders.get(key[:4]) if job.shared_orders is not None and not lp.block else None
        if key not in cache and shared is not None:  # same weight, same expansion: computed once
            cache[key] = shared[0]
            t_numerics += shared[1]
        if key not in cache:
            tn = time.perf_counter()
            w = layer_weight(model, layer, consts)
            if lp.block:
                if layer.op_type not in ("Gemm", "MatMul") or w.shape[1] % lp.block:
                    raise PlanError(
                        f"layer {name!r}: int4 blocks of {lp.block} need a Gemm/MatMul whose input size divides "
                        f"by the block (weight {w.shape[0]}x{w.shape[1]})"
                    )
                w = w.reshape(-1, lp.block)  # one row per (output channel, block): per-row scales = per-block
            cache[key] = expand_weight(w, lp.bits, lp.order, lp.gamma)
            t_numerics += time.perf_counter() - tn
        bias_value = consts.value(layer.bias) if layer.bias else None
        bias_name = layer.bias
        mean = (input_means or {}).get(node.input[layer.act_index])
        if mean is not None and job.bias and len(job.orders) == lp.order and layer.op_type in ("Conv", "Gemm"):
            w = layer_weight(model, layer, consts)
            corrected = corrected_bias(node, layer, w, cache[key], mean, bias_value)
            if corrected is not None:
                bias_value = corrected
                bias_name = em.const(f"{_safe(layer.name)}{job.tag}_bias_corrected", corrected)
        _emit_layer(em, node, job, cache[key], x_scale, bias_value, unsigned, bias_name)
        quantize_sources(node)
    del out.graph.node[:]
    out.graph.node.extend(em.nodes)
    _drop_dead_nodes(out)
    del out.graph.value_info[:]
    out.producer_name = "rexdeploy"
    t_graph = time.perf_counter() - t0 - t_numerics
    return ExpandResult(out, len(jobs), t_numerics, t_graph, dict(em.act_scales))


def _reading(node: onnx.NodeProto, rerouted: Mapping[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` whose inputs read the rerouted tensors (a quantized attention source's DQ)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [rerouted.get(t, t) for t in node.input]
    return copy


def _quantized_join(em: _Emitter, node: onnx.NodeProto, ranges: Mapping[str, float], int8_inputs: Mapping[str, LayerJob],
                    nonnegative: Collection[str], owner: str = "") -> onnx.NodeProto:  # fmt: skip
    """``node`` (a residual Add or an average pool, :func:`rexdeploy.passes.residual.quantized_joins`) reading
    Q/DQ'd inputs: the Q/DQ pair an int8 layer shares for the same tensor (same scale and type as that layer gives
    it), else a new one, its nodes named after ``owner`` (a pool's: the int8 layer its output reaches)."""
    inputs = []
    for tensor in node.input:
        reader = int8_inputs.get(tensor)
        unsigned = emits_unsigned(reader.layer.op_type if reader else node.op_type, tensor, nonnegative)
        inputs.append(em.quantized_activation(tensor, activation_scale(ranges[tensor], unsigned), unsigned, owner))
    quantized = onnx.NodeProto()
    quantized.CopyFrom(node)
    quantized.input[:] = inputs
    return quantized


def corrected_bias(node: onnx.NodeProto, layer: Layer, w: np.ndarray, orders: Sequence[ResidualOrder], mean: np.ndarray,
                   bias: np.ndarray | None) -> np.ndarray | None:  # fmt: skip
    """Data-free bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2): the REx weight
    ``Ŵ = Σ_k Q^-1(R^k)`` misses ``ΔW = W − Ŵ``, which shifts output channel o by ``Σ_{c,k} ΔW[o,c,k]·E[x_c]`` on
    average; adding that to the bias removes the shift. ``E[x_c]`` is the layer input's per-channel mean (e.g. from
    the propagated BatchNorm statistics); a padded border, which reads zeros, is over-corrected (an approximation).
    ``w`` is the float weight, output-channel-major. Returns the new bias (float32, one per output channel), or
    None where the mean does not fit the layer's input channels."""
    out_channels, per_group = w.shape[0], w.shape[1]
    group = max(layer.group, 1)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    if mean.size != per_group * group or out_channels % group:
        return None
    delta = w - sum(o.dense(out_channels) for o in orders)
    summed = delta.reshape(group, out_channels // group, per_group, -1).sum(axis=3)  # (group, O/g, I/g)
    shift = (summed * mean.reshape(group, 1, per_group)).sum(axis=2).reshape(-1)
    if layer.op_type == "Gemm":  # y = alpha·A·B + beta·C: the weight's shift is alpha·ΔW·E[x], the bias counts beta×
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        beta = float(attrs.get("beta", 1.0))
        if beta == 0.0:
            return None
        shift = shift * float(attrs.get("alpha", 1.0)) / beta
    base = np.zeros(out_channels) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if base.size not in (1, out_channels):
        return None
    return (base + shift).astype(np.float32)


def _upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Blocked DequantizeLinear (``block_size``) and the int4 type need opset 21 / IR 10."""
    from rexdeploy.graph import opset_version

    if opset_version(model) >= version:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, version)
    except Exception as exc:
        raise PlanError(f"int4 blocks need opset {version}, and this model could not be upgraded ({exc})") from None
    upgraded.ir_version = max(upgraded.ir_version, 10)
    return upgraded


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads (e.g. a Transpose that only fed a replaced weight)."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [k for k, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            break
        for k in reversed(dead):  # by position: NodeProto.remove() compares whole messages
            del graph.node[k]
    drop_initializers(graph, {i for n in graph.node for i in n.input})


def order_groups(lp: LayerPlan) -> list[tuple[int, ...]]:
    """The orders each predictor of ``lp`` holds (Algorithm 1)."""
    return [tuple(g) for g in ensemble_groups(lp.order, lp.split)]
