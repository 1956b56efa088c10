"""Residual Adds between int8 layers: quantize their inputs so the engine fuses the Add into the int8 layer.

Pattern: ``y = Add(a, b)`` (both inputs computed, not constants) whose output — directly, or through one
``Relu`` / ``Clip`` that reads only it — is the activation input of an int8 layer (so ``y`` is quantized anyway),
and whose inputs are each either

* the activation input of an int8 layer (already one Q/DQ pair: the skip branch of a residual block), or
* the output of an int8 layer read by this Add alone (the block's last conv).

Rewrite (:func:`rexdeploy.passes.expand.expand`): a Q/DQ pair on each input, the skip branch's shared with its
int8 consumer. OpenVINO's low-precision transformations then fuse the Add as the "sum" post-op of the int8 conv
and keep the whole block in u8 / i8 — NNCF places its FakeQuantize ops the same way; without them the Add ran as a
bf16 / f32 Subgraph with a reorder on each side (MobileNetV2, AVX-512 BF16 host: 28 bf16 layers of 171, 3.5 %
slower than NNCF's int8 IR; with them 2 bf16 layers, within 1.5 % — benchmarks/results/anchors.md). TensorRT's
Q/DQ placement recommendations ask for the same ("quantize the residual input of an element-wise add"), and
onnxruntime runs the Q/DQ Add as ``QLinearAdd``.

An Add whose inputs come from a float layer is left alone: a Q/DQ there buys no fused kernel, only error.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

from rexdeploy.graph import consumers

_THROUGH = ("Relu", "Clip")
"""Ops between a residual Add and the quantized tensor that the engine fuses into the int8 layer with the Add."""


def quantized_adds(
    model: onnx.ModelProto, int8_inputs: Collection[str], int8_outputs: Collection[str]
) -> dict[str, tuple[str, ...]]:
    """The residual Adds to quantize → their input tensors (each needs an activation range).

    ``int8_inputs``: activation inputs of the int8 layers that quantize them with one shared Q/DQ pair (act_bits 8,
    one activation order); ``int8_outputs``: outputs of int8 layers (act_bits 8)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}

    def sole_reader(tensor: str) -> onnx.NodeProto | None:
        nodes = readers.get(tensor, [])
        return nodes[0] if len(nodes) == 1 and tensor not in graph_outputs else None

    def quantized_after(tensor: str) -> bool:
        if tensor in int8_inputs:
            return True
        nxt = sole_reader(tensor)
        return nxt is not None and nxt.op_type in _THROUGH and nxt.output[0] in int8_inputs

    found: dict[str, tuple[str, ...]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Add" or len(node.input) != 2 or any(t in constants or not t for t in node.input):
            continue
        if not quantized_after(node.output[0]):
            continue
        if all(t in int8_inputs or (t in int8_outputs and sole_reader(t) is node) for t in node.input):
            found[node.name or f"{node.op_type}_{index}"] = tuple(node.input)
    return found


__all__ = ["quantized_adds"]
