"""Attention between int8 layers: quantize the inputs of its activation × activation MatMuls where they are made.

Pattern: ``MatMul(a, b)`` whose inputs are both activations (neither a constant nor a DequantizeLinear of one, even
through shape ops), each reaching its *source* through shape ops — ``Reshape``, ``Transpose``, ``Squeeze``,
``Unsqueeze``, and ``Mul`` / ``Div`` by a constant (the 1/√d scale of the scores) — where a source is

* an int8 layer's output, or that output plus a constant (the bias ``Add`` after a MatMul layer): the query, key
  and value projections, or
* a ``Softmax`` output (the attention probabilities, ≥ 0),

at least one source of the MatMul being an int8 layer's; and every path from a source through those shape ops
ends at such a MatMul (nothing else reads the quantized tensor).

Rewrite (:func:`rexdeploy.passes.expand.expand`): one Q/DQ pair right after each source — int8, uint8 for a
Softmax output where the engine runs uint8 — which all its readers read. OpenVINO then fuses the requantization
into the projection's int8 FullyConnected, runs the Reshape / Transpose on int8 data and the MatMul as an int8
kernel: NNCF's FakeQuantize placement for transformers. The BERT-style encoder of benchmarks/bench_smoothing.py
(6 layers, hidden 384, 64 tokens; AMD EPYC, AVX-512 VNNI + BF16, OpenVINO 2026.4, one interleaved diagnostic run of
11 rounds): uniform W8A8 K=1 went from 1.006× to 0.994× NNCF's int8 IR (quartiles 1.00–1.01, 0.99–1.01), its
Reshape layers from 24 bf16 to 18 i8 + 6 bf16, worst embedding cosine 0.999813 → 0.999810. The same Q/DQ placed at
the MatMul inputs instead (after the Reshape / Transpose) bought nothing (1.020× → 1.039×, within noise).

Ranges are data-free like every other activation's (the probes: token ids for a text model).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from rexdeploy.analyze import ConstantResolver
from rexdeploy.graph import consumers

SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")
SCALE_OPS = ("Mul", "Div")


def attention_sources(model: onnx.ModelProto, int8_outputs: Mapping[str, str]) -> dict[str, str]:
    """The tensors to quantize where they are made → the int8 layer that made them ("" for a Softmax output): the
    sources of the activation × activation MatMuls between int8 layers (module docstring).

    ``int8_outputs``: output tensor → name of each int8 layer (act_bits 8)."""
    consts = ConstantResolver(model)  # initializers, Constant nodes, and Identity / Transpose / ... chains of them
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}

    def data_input(node: onnx.NodeProto) -> str | None:
        """The input a shape / scale op passes on (None: not such an op, or a scale by a non-constant)."""
        if node.op_type in SHAPE_OPS:
            return str(node.input[0])
        if node.op_type == "Div" and len(node.input) == 2 and consts.is_constant(node.input[1]):
            return str(node.input[0])
        if node.op_type == "Mul" and len(node.input) == 2:
            others = [t for t in node.input if not consts.is_constant(t)]
            return str(others[0]) if len(others) == 1 else None
        return None

    def source(tensor: str) -> str:
        while tensor in producers and (nxt := data_input(producers[tensor])) is not None:
            tensor = nxt
        return tensor

    def weight_like(tensor: str) -> bool:
        node = producers.get(tensor)
        return consts.is_constant(tensor) or (node is not None and node.op_type == "DequantizeLinear"
                                              and consts.is_constant(node.input[0]))  # fmt: skip

    def made_by(tensor: str) -> str | None:
        """The int8 layer a source comes from ("" for a Softmax output), None if it is no source."""
        if tensor in int8_outputs:
            return int8_outputs[tensor]
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "Softmax":
            return ""
        if node.op_type == "Add" and len(node.input) == 2:
            made = [t for t in node.input if t in int8_outputs and len(readers.get(t, [])) == 1]
            if len(made) == 1 and any(consts.is_constant(t) for t in node.input):
                return int8_outputs[made[0]]
        return None

    matmuls: dict[str, tuple[str, str]] = {}  # MatMul name → its two sources
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        sources = (source(node.input[0]), source(node.input[1]))
        if any(weight_like(t) or weight_like(s) for t, s in zip(node.input, sources, strict=True)):
            continue
        makers = [made_by(s) for s in sources]
        if all(m is not None for m in makers) and any(makers):
            matmuls[node.name or f"MatMul_{index}"] = sources

    def reaches_only(tensor: str, allowed: set[str]) -> bool:
        """Every reader path of ``tensor`` through shape / scale ops ends at a MatMul of ``allowed``."""
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            if t in graph_outputs or t in seen:
                return False
            seen.add(t)
            for reader in readers.get(t, []):
                if reader.op_type == "MatMul" and reader.name in allowed:
                    continue
                if data_input(reader) != t:
                    return False
                stack.append(str(reader.output[0]))
        return True

    while True:  # a source read elsewhere too drops its MatMuls, which may leave another source read elsewhere
        allowed = set(matmuls)
        bad = {s for pair in matmuls.values() for s in pair if not reaches_only(s, allowed)}
        if not bad:
            break
        matmuls = {name: pair for name, pair in matmuls.items() if not set(pair) & bad}
    return {s: made_by(s) or "" for pair in matmuls.values() for s in pair}


__all__ = ["SCALE_OPS", "SHAPE_OPS", "attention_sources"]
