"""Small helpers the rewrite passes share (:mod:`rexdeploy.passes.smooth`, :mod:`rexdeploy.passes.equalize`):
fresh names, a node input pointed at a new constant, and what a rewrite left unread removed."""

from __future__ import annotations

import numpy as np
import onnx

from rexdeploy.analyze import ConstantResolver
from rexdeploy.graph import add_initializer, drop_initializers


def unique_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def set_constant_input(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    index: int,
    value: np.ndarray,
    name: str,
    taken: set[str],
    replaced: set[str],
    consts: ConstantResolver,
) -> None:
    """Point ``node.input[index]`` at a new initializer holding ``value``, in the dtype of the tensor it replaces."""
    old = node.input[index]
    original = consts.value(old)
    array = np.asarray(value, dtype=original.dtype if original is not None else np.float32)
    new = unique_name(name, taken)
    add_initializer(model.graph.initializer, array, new)
    node.input[index] = new
    replaced.add(old)


def drop_unread(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove what the rewrite left unread: the replaced initializers, and the Constant / pass-through nodes that
    computed a replaced tensor (walked back from it)."""
    graph_inputs = {i.name for i in model.graph.input}
    pending = set(names)
    while pending:
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        unread = pending - read
        if not unread:
            return
        nodes = model.graph.node
        dead = [
            j
            for j, n in enumerate(nodes)
            if any(o in unread for o in n.output) and not any(o in read for o in n.output)
        ]
        upstream = {i for j in dead for i in nodes[j].input if i}
        for j in reversed(dead):
            del nodes[j]
        drop_initializers(model.graph, {i.name for i in model.graph.initializer} - unread)
        pending = upstream - graph_inputs


__all__ = ["drop_unread", "set_constant_input", "unique_name"]
