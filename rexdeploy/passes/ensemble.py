"""The ensemble pass (paper §3.3, Algorithm 1): M predictors, each a clone of the network whose
layer l holds the orders of cluster m; biases only in predictor 1; outputs summed.

The cloned region is every node upstream of (or at) a planned layer; the nodes after the last
planned layers (the network tail: e.g. a Softmax) run once, on the sum. A tensor that leaves the
region must be the output of a planned layer — the place where the paper's construction sums the
predictors; anything else (a ReLU output read by the tail) is refused with the node named.

Each predictor gets its own activation ranges (predictors m >= 2 carry small residual signals):
:func:`float_predictors` gives the float model whose probes measure them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rexdeploy.analyze import ConstantResolver, Layer, layer_weight
from rexdeploy.errors import PlanError
from rexdeploy.graph import add_initializer, drop_initializers
from rexdeploy.numerics import (
    ResidualOrder,
    check_ensemble_validity,
    ensemble_groups,
    ensemble_weights,
    expand_weight,
)
from rexdeploy.passes.expand import LayerJob
from rexdeploy.plans import Plan


@dataclass(frozen=True)
class Ensemble:
    model: onnx.ModelProto  # the cloned float graph (weights shared), to be expanded with ``jobs``
    jobs: dict[str, LayerJob]  # clone node name → what it holds
    predictors: int


def _suffix(m: int) -> str:
    return f"__p{m + 1}"


def build_ensemble(model: onnx.ModelProto, plan: Plan, layers: list[Layer]) -> Ensemble:
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(plan.layers) - set(by_name))
    if unknown:
        raise PlanError(
            f"the plan names layer(s) {', '.join(unknown[:5])} that are not quantizable nodes of this model"
        )
    counts = {lp.predictors for lp in plan.layers.values()}
    if len(counts) != 1:
        raise PlanError(f"every layer of an ensemble plan needs the same number of predictors; got {sorted(counts)}")
    m_count = counts.pop()
    for name, lp in plan.layers.items():
        try:
            check_ensemble_validity(lp.bits, lp.split)  # one rule for the pass and the numerics
        except PlanError as exc:
            raise PlanError(f"layer {name!r}: {exc}") from None
    graph = model.graph
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(graph.node)]
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output}
    # the region: every node upstream of a planned layer
    region: set[int] = set()
    stack = [i for i, name in enumerate(names) if name in plan.layers]
    while stack:
        i = stack.pop()
        if i in region:
            continue
        region.add(i)
        stack.extend(producers[t] for t in graph.node[i].input if t in producers)
    float_layers = [names[i] for i in region if names[i] in by_name and names[i] not in plan.layers]
    if float_layers:
        raise PlanError(
            f"an ensemble needs every quantizable layer upstream of the planned ones in the plan; "
            f"{float_layers[0]!r} is not (a float layer cannot be split across predictors)"
        )
    produced = {t for i in region for t in graph.node[i].output}
    tail_inputs = {t for i, n in enumerate(graph.node) if i not in region for t in n.input}
    crossing = sorted((tail_inputs | {o.name for o in graph.output}) & produced)
    for t in crossing:
        node_name = names[producers[t]]
        if node_name not in plan.layers:
            raise PlanError(
                f"tensor {t!r} leaves the ensemble's predictors through node {node_name!r}, which is not a planned "
                "layer; the predictors can only be summed at the output of a quantized layer"
            )
    crossing_set = set(crossing)

    def rename(t: str, m: int) -> str:
        if t not in produced:
            return t  # graph inputs and initializers are shared by all predictors
        if m == 0 and t not in crossing_set:
            return t
        return t + _suffix(m)

    new_nodes: list[onnx.NodeProto] = []
    jobs: dict[str, LayerJob] = {}
    shared: dict[tuple[str, int, int, float | None], tuple[list[ResidualOrder], float]] = {}
    for i, node in enumerate(graph.node):
        if i not in region:
            continue
        for m in range(m_count):
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = names[i] if m == 0 else names[i] + _suffix(m)
            for k, t in enumerate(node.input):
                clone.input[k] = rename(t, m) if t else t
            for k, t in enumerate(node.output):
                clone.output[k] = rename(t, m)
            new_nodes.append(clone)
            if names[i] in plan.layers:
                lp = plan.layers[names[i]]
                groups = ensemble_groups(lp.order, lp.split)
                tag = "" if m == 0 else _suffix(m)
                jobs[clone.name] = LayerJob(
                    by_name[names[i]], lp, tuple(groups[m]), bias=m == 0, tag=tag, shared_orders=shared
                )
    for t in crossing:
        new_nodes.append(
            helper.make_node("Sum", [t + _suffix(m) for m in range(m_count)], [t], name=f"{t}__ensemble_sum")
        )
    new_nodes.extend(n for i, n in enumerate(graph.node) if i not in region)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    del out.graph.value_info[:]
    return Ensemble(out, jobs, m_count)


def float_predictors(ensemble: Ensemble, source: onnx.ModelProto) -> onnx.ModelProto:
    """The ensemble graph with each predictor's layers in float: weight = the float sum of its orders,
    bias only in predictor 1. Running it gives each predictor's own activation statistics.

    ``source`` is the model the ensemble was built from. The residual orders computed here are kept
    for the expansion pass (``LayerJob.shared_orders``), which then does not compute them again."""
    out = onnx.ModelProto()
    out.CopyFrom(ensemble.model)
    consts = ConstantResolver(source)
    nodes = {n.name: n for n in out.graph.node}
    cache: dict[tuple[str, int, int, float | None, tuple[int, ...]], list[np.ndarray]] = {}
    names = {i.name for i in out.graph.initializer}
    for name, job in ensemble.jobs.items():
        layer, lp = job.layer, job.plan
        key = (layer.weight, lp.bits, lp.order, lp.gamma, lp.split)
        if key not in cache:
            w = layer_weight(source, layer, consts)
            t0 = time.perf_counter()
            orders = expand_weight(w, lp.bits, lp.order, lp.gamma)
            if job.shared_orders is not None and not lp.block:  # the expand pass takes these orders as they are
                job.shared_orders.setdefault(key[:4], (orders, time.perf_counter() - t0))
            cache[key] = ensemble_weights(orders, lp.split, w.shape)
        m = 0 if not job.tag else int(job.tag.removeprefix("__p")) - 1
        w_name = f"{layer.weight}__float{job.tag or '__p1'}"
        if w_name not in names:
            value = np.moveaxis(cache[key][m], 0, layer.weight_axis).astype(np.float32)
            add_initializer(out.graph.initializer, value, w_name)
            names.add(w_name)
        node = nodes[name]
        node.input[layer.weight_index] = w_name
        if not job.bias and len(node.input) > 2:
            del node.input[2:]
    # the source weights the float ones replaced: dead weight for the probing session to load
    g = out.graph
    drop_initializers(g, {i for n in g.node for i in n.input} | {v.name for v in (*g.input, *g.output)})
    return out
