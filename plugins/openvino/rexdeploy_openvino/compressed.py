"""Weight-only REx layers as OpenVINO compressed-weight layers: the IR rewrite the builder applies.

A weight-only layer of the expanded ONNX (``LayerPlan.act_bits == 0``) is, per residual order k, a
``DequantizeLinear`` of a constant int8 tensor (per-output-channel scale, zero-point 0) feeding a
``MatMul`` / ``Gemm``; K orders are K such branches summed by ``Add``. OpenVINO's ONNX frontend turns each
branch into ``Constant(i8) → Convert → Multiply(scale) → MatMul``, the decompression pattern the CPU plugin
already keeps compressed (a ``FullyConnected`` whose weight input is ``i8``: see
:func:`compressed_weight_layers`). What it does not do on its own (OpenVINO 2026.4, measured in
``benchmarks/bench_weight_only.py``):

- store int4 orders as int4: a ``bits ≤ 4`` order is an int8 tensor whose values fit ``[-8, 7]``; it stays
  ``i8`` (twice the weight bytes). :func:`compress_weight_only` retypes such a constant to ``i4`` — the same
  integers, so exact;
- run K orders as one kernel: K compressed ``FullyConnected`` layers + ``Add`` read the input K times and
  pay K kernels. The rewrite offers two exact alternatives for a group of K dense branches sharing one
  input ``x`` (``y = Σ_k x · (s_k ⊙ q_k)``):

  ``grouped``  one compressed ``FullyConnected`` over the orders stacked along the reduction axis:
               ``[x, …, x] · [s_1 ⊙ q_1; …; s_K ⊙ q_K]`` — the weight ``[N, K·C_in]`` with one scale per
               (output channel, group of ``GROUP`` inputs): NNCF's group-wise decompression subgraph
               (``Constant [N, G, g] → Convert → Multiply(scale [N, G, 1]) → Reshape → MatMul``);
  ``folded``   one float ``MatMul`` on ``W = Σ_k s_k ⊙ q_k`` computed here in float64 and stored f32
               (not compressed: the engine's float precision; exact to f32 rounding of ``W``);
  ``branches`` leave the K compressed branches as they are.

``Conv`` layers have no compressed-weight kernel on the CPU plugin (a DQ'd Conv weight is folded to a
float constant at compile time, measured); they are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rexdeploy.errors import InputError

K_FORMS = ("branches", "grouped", "folded")
"""How a group of K ≥ 2 dense weight-only orders is run (see the module docstring); ``auto``: :func:`choose_form`."""

GROUPED_MAX_ROWS = 2
"""``auto`` keeps K ≥ 2 orders compressed (``grouped``) in an f32 engine only up to this many rows (tokens × batch)
per MatMul: there the weight bytes dominate (K int8 orders read 2 bytes per weight against f32's 4); beyond it the K
times larger multiply count does, and the float ``folded`` weight is faster. Measured on a BERT-style encoder (hidden
384, W8 K=2, f32, ratio to FP32, AMD EPYC AVX-512, shared machine): 1 row grouped faster in each of 8 runs, 2 rows
1.05 / 0.98, 4 rows folded faster in each of 4 runs, 64 rows 1.96-2.14 / 1.03 (docs/precision.md, "Compressed
weight-only layers"; ``benchmarks/results/weight_only.md``)."""

GROUP = 128
"""Inputs per scale of the ``grouped`` form: the order's own per-channel scale repeated every ``GROUP`` inputs.
OpenVINO 2026.4 CPU miscomputes a group-wise compressed FullyConnected with large groups (measured: groups of
768 / 1536 inputs over 3072+ inputs give a relative error of 0.24-0.31 at 64 rows; groups of 64-512 are exact),
so the per-order scale is repeated at this granularity instead of once per order."""

INT4_RANGE = (-8, 7)


@dataclass(frozen=True)
class WeightOnlyGroup:
    """K ≥ 1 weight-only MatMul branches summed into one output (K = 1: a single compressed MatMul)."""

    root: Any  # the node whose output is the sum (the last Add; the MatMul itself when K = 1)
    x: Any  # the shared input (an ``openvino.Output``)
    matmuls: tuple[Any, ...]
    values: tuple[np.ndarray, ...]  # int8, [N, C_in] each (output channels first)
    scales: tuple[np.ndarray, ...]  # float32, [N] each
    biases: tuple[Any, ...] = ()  # constant terms of the sum (``openvino.Output``s): a Gemm's bias

    @property
    def orders(self) -> int:
        return len(self.values)

    @property
    def concat(self) -> bool:
        """The ``concat`` form (``LayerPlan.form``): one MatMul over the stacked orders, split and summed."""
        return len(self.matmuls) < len(self.values)

    @property
    def int4(self) -> bool:
        lo, hi = INT4_RANGE
        return all(int(v.min(initial=0)) >= lo and int(v.max(initial=0)) <= hi for v in self.values)


@dataclass
class RewriteSummary:
    """What :func:`compress_weight_only` did: groups by form, orders stored as int4."""

    forms: dict[str, int] = field(default_factory=dict)
    int4_orders: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"forms": dict(self.forms), "int4_orders": self.int4_orders}


def _const(node: Any) -> np.ndarray | None:
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def _decompression(out: Any, ov: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``Multiply(Convert(Constant i8), Constant scale)`` (an optional all-zero ``Subtract`` between) →
    (int8 values as the MatMul reads them, per-output-channel scale as given), else None."""
    mul = out.get_node()
    if mul.get_type_name() != "Multiply":
        return None
    a, b = mul.input_value(0).get_node(), mul.input_value(1).get_node()
    if a.get_type_name() == "Constant":
        a, b = b, a
    scale = _const(b)
    if scale is None:
        return None
    if a.get_type_name() == "Subtract":
        zp = _const(a.input_value(1).get_node())
        if zp is None or np.any(zp != 0):
            return None
        a = a.input_value(0).get_node()
    if a.get_type_name() != "Convert":
        return None
    src = a.input_value(0).get_node()
    if src.get_type_name() != "Constant" or src.get_element_type() != ov.Type.i8:
        return None
    return np.asarray(src.get_data()), scale.astype(np.float32)


def _branch(mm: Any, ov: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A MatMul whose weight (input 1) is a per-output-channel int8 decompression → ([N, C_in] int8, [N])."""
    if mm.get_type_name() != "MatMul" or mm.get_attributes().get("transpose_a"):
        return None
    found = _decompression(mm.input_value(1), ov)
    if found is None:
        return None
    q, s = found
    if q.ndim != 2:
        return None
    q = q if mm.get_attributes().get("transpose_b") else q.T  # → [N, C_in]
    n = q.shape[0]
    if s.size == 1:
        s = np.full(n, float(s.reshape(())), dtype=np.float32)
    elif s.size == n and (s.ndim == 1 or s.shape[-1 if not mm.get_attributes().get("transpose_b") else 0] == n):
        s = s.reshape(n)
    else:  # group-wise or another layout: not a rexdeploy per-channel order
        return None
    return np.ascontiguousarray(q), s


_DQ_STEPS = frozenset({"Convert", "Subtract", "Multiply"})


def _quantized_input(x: Any) -> bool:
    """Whether ``x`` is a dequantized activation (a W8A8 layer's input: the frontend's FakeQuantize, or a
    Convert / Subtract / Multiply chain from one or from an integer tensor): such layers are int8 kernels (Low
    Precision Transformations need their weight DequantizeLinear as it is) and are left alone."""
    node = x.get_node()
    for _ in range(4):
        kind = node.get_type_name()
        if kind == "FakeQuantize" or not node.get_output_element_type(0).is_real():
            return True
        if kind not in _DQ_STEPS or node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False


def _same_output(a: Any, b: Any) -> bool:
    return bool(a.get_node().get_instance_id() == b.get_node().get_instance_id() and a.get_index() == b.get_index())


_SPLITS = ("Split", "VariadicSplit")


def _concat_group(add: Any, ports: list[Any], biases: list[Any], ov: Any) -> WeightOnlyGroup | None:
    """The ``concat`` form: every output of one Split of a weight-only MatMul's last axis, summed by the tree."""
    split = ports[0].get_node()
    if split.get_type_name() not in _SPLITS or any(
        p.get_node().get_instance_id() != split.get_instance_id() for p in ports
    ):
        return None
    if sorted(p.get_index() for p in ports) != list(range(split.get_output_size())):
        return None
    mm = split.input_value(0).get_node()
    axis = _const(split.input_value(1).get_node())
    rank = split.input_value(0).get_partial_shape().rank
    if axis is None or rank.is_dynamic or int(axis.reshape(())) not in (-1, rank.get_length() - 1):
        return None
    if len(mm.output(0).get_target_inputs()) != 1 or _quantized_input(mm.input_value(0)):
        return None
    found = _branch(mm, ov)
    if found is None:
        return None
    q, s = found
    k = split.get_output_size()
    if q.shape[0] % k or any(split.get_output_partial_shape(i)[-1].get_length() != q.shape[0] // k for i in range(k)):
        return None
    return WeightOnlyGroup(add, mm.input_value(0), (mm,), tuple(np.split(q, k)), tuple(np.split(s, k)), tuple(biases))


def _add_leaves(add: Any) -> tuple[list[Any], list[Any]] | None:
    """The MatMul leaves of an Add tree (inner Adds consumed only by the tree) and its constant terms (a Gemm's
    bias, which rides on the first order), else None."""
    leaves: list[Any] = []
    biases: list[Any] = []
    for i in range(2):
        port = add.input_value(i)
        node = port.get_node()
        if node.get_type_name() == "Add" and len(node.output(0).get_target_inputs()) == 1:
            inner = _add_leaves(node)
            if inner is None:
                return None
            leaves += inner[0]
            biases += inner[1]
        elif node.get_type_name() in ("MatMul", *_SPLITS) and len(port.get_target_inputs()) == 1:
            leaves.append(port)
        elif node.get_type_name() == "Constant":
            biases.append(port)
        else:
            return None
    return leaves, biases


def _tree_nodes(add: Any) -> list[Any]:
    """The Add nodes of the tree rooted at ``add``."""
    out, stack = [], [add]
    while stack:
        node = stack.pop()
        out.append(node)
        stack += [
            node.input_value(i).get_node() for i in range(2) if node.input_value(i).get_node().get_type_name() == "Add"
        ]
    return out


def weight_only_groups(model: Any) -> list[WeightOnlyGroup]:
    """Every weight-only MatMul of ``model`` (an ``openvino.Model`` from ``convert_model``) with an int8
    decompressed weight, grouped into the K-order sums it belongs to (largest Add trees first)."""
    from rexdeploy_openvino._runtime import import_openvino

    ov = import_openvino()
    ops = list(model.get_ordered_ops())
    taken: set[int] = set()
    groups: list[WeightOnlyGroup] = []
    for add in reversed(ops):
        if add.get_type_name() != "Add" or add.get_instance_id() in taken:
            continue
        tree = _add_leaves(add)
        if tree is None or len(tree[0]) < 2:
            continue
        ports, biases = tree
        if any(p.get_node().get_type_name() != "MatMul" for p in ports):
            concat = _concat_group(add, ports, biases, ov)
            if concat is not None:
                groups.append(concat)
                taken.update(n.get_instance_id() for n in _tree_nodes(add))
                taken.add(concat.matmuls[0].get_instance_id())
            continue
        leaves = [p.get_node() for p in ports]
        x = leaves[0].input_value(0)
        if _quantized_input(x):
            continue
        branches = [_branch(mm, ov) for mm in leaves]
        if any(b is None for b in branches) or not all(_same_output(mm.input_value(0), x) for mm in leaves):
            continue
        found = [b for b in branches if b is not None]
        if len({q.shape for q, _ in found}) != 1:  # sparse (narrow) orders: not a dense group
            continue
        groups.append(
            WeightOnlyGroup(
                add, x, tuple(leaves), tuple(q for q, _ in found), tuple(s for _, s in found), tuple(biases)
            )
        )
        taken.update(n.get_instance_id() for n in _tree_nodes(add))
        taken.update(mm.get_instance_id() for mm in leaves)
    for mm in ops:
        if (
            mm.get_type_name() == "MatMul"
            and mm.get_instance_id() not in taken
            and not _quantized_input(mm.input_value(0))
        ):
            single = _branch(mm, ov)
            if single is not None:
                groups.append(WeightOnlyGroup(mm, mm.input_value(0), (mm,), (single[0],), (single[1],)))
    return groups


def _group_size(c_in: int) -> int:
    """The largest divisor of ``c_in`` up to :data:`GROUP`."""
    for g in range(min(GROUP, c_in), 0, -1):
        if c_in % g == 0:
            return g
    return 1  # pragma: no cover - 1 divides everything


def _replace(group: WeightOnlyGroup, new: Any) -> None:
    """Put ``new`` (a node) in place of the group's sum, under the first order's MatMul name (the execution
    graph then maps the layer back to that ONNX node) and the sum's tensor names."""
    import openvino.opset13 as opset

    old = group.root.output(0)
    names = set(old.get_names())
    new.set_friendly_name(group.matmuls[0].get_friendly_name())
    for bias in group.biases:
        new = opset.add(new, bias)
    old.replace(new.output(0))
    if names:
        new.output(0).get_tensor().set_names(names)


def _grouped(group: WeightOnlyGroup, ov: Any, opset: Any) -> Any:
    n, c_in = group.values[0].shape
    g = _group_size(c_in)
    per = c_in // g
    q = np.concatenate(group.values, axis=1).reshape(n, group.orders * per, g)
    s = np.concatenate([np.repeat(s.reshape(n, 1), per, axis=1) for s in group.scales], axis=1)
    etype = ov.Type.i4 if group.int4 else ov.Type.i8
    weight = opset.convert(opset.constant(q, dtype=etype), ov.Type.f32)
    weight = opset.multiply(weight, opset.constant(s.reshape(n, group.orders * per, 1).astype(np.float32)))
    weight = opset.reshape(weight, opset.constant(np.array([n, group.orders * c_in], dtype=np.int64)), False)
    x = group.x if group.orders == 1 else opset.concat([group.x] * group.orders, -1)
    return opset.matmul(x, weight, False, True)


def _folded(group: WeightOnlyGroup, opset: Any) -> Any:
    w = np.zeros(group.values[0].shape, dtype=np.float64)
    for q, s in zip(group.values, group.scales, strict=True):
        w += q.astype(np.float64) * s.astype(np.float64).reshape(-1, 1)
    return opset.matmul(group.x, opset.constant(np.ascontiguousarray(w.astype(np.float32))), False, True)


def _retype_int4(group: WeightOnlyGroup, ov: Any, opset: Any) -> int:
    """Each branch's int8 weight → the same values as an ``i4`` constant (each MatMul keeps its own kernel)."""
    for mm, q, s in zip(group.matmuls, group.values, group.scales, strict=True):
        weight = opset.convert(opset.constant(q, dtype=ov.Type.i4), ov.Type.f32)
        weight = opset.multiply(weight, opset.constant(s.reshape(-1, 1)))
        new = opset.matmul(mm.input_value(0), weight, False, True)
        names = set(mm.output(0).get_names())
        new.set_friendly_name(mm.get_friendly_name())
        mm.output(0).replace(new.output(0))
        if names:
            new.output(0).get_tensor().set_names(names)
    return group.orders


def _rows(x: Any) -> int | None:
    """Rows of the MatMul input (every dimension but the last), None when not static."""
    shape = x.get_partial_shape()
    if shape.is_dynamic or shape.rank.get_length() < 1:
        return None
    dims = [d.get_length() for d in shape]
    return int(np.prod(dims[:-1], dtype=np.int64))


def choose_form(precision: str, dynamic: bool, rows: int | None) -> str:
    """The form ``auto`` gives a group of K ≥ 2 orders: ``grouped`` (compressed) where the engine quantizes
    weight-only inputs at run time (``dynamic``: the compressed kernels then run int8) or computes in f32 on at most
    :data:`GROUPED_MAX_ROWS` rows; ``folded`` otherwise — in a bf16 / f16 engine the decompressed weights are rounded
    to the float precision anyway (the folded weight is as exact) and a bf16 weight is as small as two int8 ones."""
    if dynamic:
        return "grouped"
    if precision == "f32" and rows is not None and rows <= GROUPED_MAX_ROWS:
        return "grouped"
    return "folded"


def compress_weight_only(model: Any, form: str = "auto", int4: bool = True, *, precision: str = "f32",
                         dynamic: bool = False) -> RewriteSummary:  # fmt: skip
    """Rewrite ``model`` (an ``openvino.Model``, in place) so its weight-only layers run compressed.

    ``form``: what a group of K ≥ 2 dense orders becomes (:data:`K_FORMS`, or ``auto``: :func:`choose_form` per
    group from the engine's ``precision`` (OpenVINO's name: ``f32``, ``bf16``, ``f16``), ``dynamic`` activations and
    the group's rows); ``int4``: store orders whose
    values fit int4 as ``i4`` (branches keep one kernel each; ``grouped`` stacks them in one ``i4`` weight).
    Single-order (K = 1) int8 layers are left as the frontend made them (already compressed), except for the
    int4 retyping. Returns what was done, per form.
    """
    from rexdeploy_openvino._runtime import import_openvino

    if form not in (*K_FORMS, "auto"):
        raise InputError(f"weight-only form {form!r} unknown; use one of {', '.join(K_FORMS)} or auto")
    ov = import_openvino()
    import openvino.opset13 as opset

    summary = RewriteSummary()
    for group in weight_only_groups(model):
        kind = "single"
        if group.orders > 1:
            kind = choose_form(precision, dynamic, _rows(group.x)) if form == "auto" else form
        if kind == "folded":
            _replace(group, _folded(group, opset))
        elif kind == "grouped":
            _replace(group, _grouped(group, ov, opset))
            summary.int4_orders += group.orders if group.int4 else 0
        elif int4 and group.int4 and not group.concat:
            summary.int4_orders += _retype_int4(group, ov, opset)
        summary.forms[kind] = summary.forms.get(kind, 0) + 1
    model.validate_nodes_and_infer_types()
    return summary


def compressed_weight_layers(compiled: Any) -> dict[str, str]:
    """FullyConnected / MatMul / Convolution layers of a compiled model → how their weights are held: the
    integer element type of the weight input where it stays compressed (``i8``, ``u8``, ``i4``, ``u4``), else the
    layer's runtime precision (``f32``, ``bf16``: float weights; the weight input itself reads ``f32`` there even
    in a bf16 engine)."""
    out: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = str(info["layerType"].astype(str)) if "layerType" in info else ""
        if layer_type in ("FullyConnected", "MatMul", "Convolution") and op.get_input_size() > 1:
            weight = op.input(1).get_element_type()
            runtime = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else ""
            out[op.get_friendly_name()] = weight.get_type_name() if weight.is_integral() else (runtime or "f32")
    return out


def compress_for_engine(model: Any, options: dict[str, str]) -> RewriteSummary:
    """:func:`compress_weight_only` with ``auto`` forms for an engine compiled with ``options`` (its
    ``INFERENCE_PRECISION_HINT`` and ``DYNAMIC_QUANTIZATION_GROUP_SIZE``); what it did is stored in the model's
    ``rt_info`` (``rexdeploy`` / ``weight_only``, JSON) so the saved IR says so."""
    import json

    precision = options.get("INFERENCE_PRECISION_HINT", "f32")
    dynamic = options.get("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0") not in ("", "0")
    summary = compress_weight_only(model, "auto", precision=precision, dynamic=dynamic)
    if summary.forms:
        model.set_rt_info(json.dumps(summary.to_dict(), sort_keys=True), ["rexdeploy", "weight_only"])
    return summary
