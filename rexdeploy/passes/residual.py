"""Joins between int8 layers: residual Adds and average pools whose inputs get a Q/DQ pair, so the engine runs them
in int8 instead of converting to float and back.

Residual Adds. Pattern: ``y = Add(a, b)`` (both inputs computed, not constants) whose output — directly, or
through one ``Relu`` / ``Clip`` that reads only it — is the activation input of an int8 layer (so ``y`` is quantized
anyway), and whose inputs are each either

* the activation input of an int8 layer (already one Q/DQ pair: the skip branch of a residual block), or
* the output of an int8 layer read by this Add alone (the block's last conv).

Rewrite (:func:`rexdeploy.passes.expand.expand`): a Q/DQ pair on each input, the skip branch's shared with its
int8 consumer. OpenVINO's low-precision transformations then fuse the Add as the "sum" post-op of the int8 conv
and keep the whole block in u8 / i8 — NNCF places its FakeQuantize ops the same way; without them the Add ran as a
bf16 / f32 Subgraph with a reorder on each side (MobileNetV2, AVX-512 BF16 host: 28 bf16 layers of 171, 3.5 %
slower than NNCF's int8 IR; with them 2 bf16 layers, within 1.5 % — benchmarks/results/anchors.md). TensorRT's
Q/DQ placement recommendations ask for the same ("quantize the residual input of an element-wise add"), and
onnxruntime runs the Q/DQ Add as ``QLinearAdd``.

Pooled heads. Pattern: a ``GlobalAveragePool`` / ``AveragePool`` whose input is the output of an int8 layer, or a
``Relu`` / ``Clip`` of one (each read by the next alone), and whose output — directly, or through ``Flatten`` /
``Reshape`` / ``Squeeze`` nodes each read by the next alone, no model output on the way — is the activation input of
an int8 layer: a classifier's head. Rewrite: a Q/DQ pair on the pool's input (uint8 where the graph makes it ≥ 0, as
a ReLU6 output is), named after the layer the pool feeds (the cost table charges it to that layer), so the pool runs
on integers; NNCF quantizes the pool's input the same way. Measured on MobileNetV2, uniform W8A8 K=1, profile
x86-avx512-bf16, OpenVINO (AMD EPYC, AVX-512 VNNI + BF16, 2 cores shared, load average 3-4.6): executed layers bf16
/ f32 / u8 3 / 53 / 125 before, 2 / 53 / 126 with it — the GlobalAveragePool went from bf16 to u8; the two bf16
layers left are the Flatten and the Gemm input's dequantization. Top-1 agreement with FP32 on 120 natural crops
unchanged (83.3 % OpenVINO and onnxruntime, both ways), median relative logit error 0.1140 → 0.1141 (OpenVINO),
0.1142 → 0.1140 (onnxruntime). Latency: no difference this host could resolve — per-round ratio with / without the
Q/DQ, interleaved, 1.014 (quartiles 0.995-1.054, 40 rounds) and 0.977 (0.835-1.203, 60 rounds); OpenVINO's profiler
gives the pool 20.9 µs with, 20.7 without, of ~3.4 ms (one-off scripts against the expansion of commit 2911459). A
ResNet head (Add → Relu → pool) is not matched: the Add's output is not an int8 layer's.

A join whose inputs come from a float layer is left alone: a Q/DQ there buys no integer kernel, only error.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

from rexdeploy.graph import consumers

_THROUGH = ("Relu", "Clip")
"""Ops between a join and the quantized tensor that the engine fuses into the int8 layer with it."""
POOLS = ("GlobalAveragePool", "AveragePool")
"""Pools that run on integers when their input is quantized (an average of u8 / i8 codes: one scale)."""
RESHAPES = ("Flatten", "Reshape", "Squeeze")
"""Ops between a pool and the int8 layer that reads its output which move no values (a classifier's Flatten)."""


def quantized_joins(
    model: onnx.ModelProto, int8_inputs: Collection[str], int8_outputs: Collection[str]
) -> dict[str, tuple[str, ...]]:
    """The joins between int8 layers to quantize (by node name) → their input tensors, each needing an activation
    range: residual Adds → both inputs, average pools → their input (module docstring).

    ``int8_inputs``: activation inputs of the int8 layers that quantize them with one shared Q/DQ pair (act_bits 8,
    one activation order); ``int8_outputs``: outputs of int8 layers (act_bits 8)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers = consumers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def sole_reader(tensor: str) -> onnx.NodeProto | None:
        nodes = readers.get(tensor, [])
        return nodes[0] if len(nodes) == 1 and tensor not in graph_outputs else None

    def quantized_after(tensor: str) -> bool:
        if tensor in int8_inputs:
            return True
        nxt = sole_reader(tensor)
        return nxt is not None and nxt.op_type in _THROUGH and nxt.output[0] in int8_inputs

    def int8_made(tensor: str, node: onnx.NodeProto) -> bool:
        """``tensor`` is read by ``node`` alone and is an int8 layer's output, or a Relu / Clip (read by ``node``
        alone) of an int8 layer's output read by the Relu / Clip alone."""
        if sole_reader(tensor) is not node:
            return False
        if tensor in int8_outputs:
            return True
        src = producers.get(tensor)
        return src is not None and src.op_type in _THROUGH and src.input[0] in int8_outputs and sole_reader(
            src.input[0]) is src  # fmt: skip

    found: dict[str, tuple[str, ...]] = {}
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type in POOLS:
            if int8_made(node.input[0], node) and pooled_reader(model, node.output[0], int8_inputs) is not None:
                found[name] = (node.input[0],)
            continue
        if node.op_type != "Add" or len(node.input) != 2 or any(t in constants or not t for t in node.input):
            continue
        if not quantized_after(node.output[0]):
            continue
        if all(t in int8_inputs or (t in int8_outputs and sole_reader(t) is node) for t in node.input):
            found[name] = tuple(node.input)
    return found


def pooled_reader(model: onnx.ModelProto, tensor: str, int8_inputs: Collection[str]) -> str | None:
    """The int8 activation input that a pool's output ``tensor`` is, or reaches through ``Flatten`` / ``Reshape``
    / ``Squeeze`` nodes each reading the previous tensor alone; None if it reaches none, or a model output is on
    the way (the model would return the pool of a quantized input)."""
    readers = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    seen: set[str] = set()
    while tensor not in graph_outputs and tensor not in seen:
        if tensor in int8_inputs:
            return tensor
        nodes = readers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type not in RESHAPES:
            return None
        seen.add(tensor)
        tensor = nodes[0].output[0]
    return None


__all__ = ["POOLS", "RESHAPES", "pooled_reader", "quantized_joins"]
