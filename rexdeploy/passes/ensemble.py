"""The ensemble pass (paper §3.3, Appendix E, Eq. 31-35): M predictors summed at the output.

Two forms (``ENSEMBLE_FORMS``):

``eq35`` (the default; Appendix E.2, Eq. 33-35). Every predictor is a clone of the network:

* a layer that reads the network input (its input is the same in every predictor: Eq. 31) holds, in
  predictor m, the orders of cluster m (``K_1 + .. + K_{m-1} + 1 .. K_1 + .. + K_m``), inside its
  activation, the bias in predictor 1 only;
* any deeper layer, in *every* predictor, applies the first K_1 orders inside the activation that
  follows it and the remaining orders K_1 + 1 .. K outside it, on the predictor's *own* input
  (Eq. 35: ``g_l = σ(Σ_{k≤K_1} R^k g_{l-1} + b) + Σ_{k>K_1} R^k g_{l-1}``, and the same without bias for
  the later predictors). A layer whose output is not read by an elementwise activation alone is linear
  there: inside and outside are the same sum, so it holds all K orders (bias in predictor 1).

  The later predictors start from the residual orders of the first layer and carry that signal
  through the depth with the full weights, instead of losing ~1/(2^(b-1)-1) of it per layer. Measured
  (MobileNetV2 int4 [2,2], ``benchmarks/results/ensembles.md``): predictor 2 keeps an output (0.5 % of
  predictor 1's) but does not lower the error — under its own activation masks it is not the correction
  the dense expansion makes; the ensemble's gain over K_1 (error 0.25×) comes from predictor 1's outside
  orders, which also make predictor 1 as costly as the dense K expansion.

  A tensor all predictors have (a bias ``Add``, the network input added on a residual path) is added in
  predictor 1 only; an op between the planned layers that is neither linear nor an activation with
  σ(0) = 0 (Softmax, a product of two signals) is refused, naming the node
  (:func:`rexdeploy.planner.ensembles.ensemble_layout`).

``algorithm1`` (Appendix E.2, Algorithm 1 read literally): predictor m holds only cluster m's orders in
every layer. On a deep network the later predictors' signal shrinks by the residual ratio per layer and
vanishes (MobileNetV2 int4 [2,2]: the ensemble's error equals its first predictor's); kept as a
measured reference (``benchmarks/bench_ensembles.py``), not offered by the planner.

The cloned region is every node upstream of (or at) a planned layer; the nodes after the last planned
layers (the network tail: e.g. a Softmax) run once, on the sum. A tensor that leaves the region must be
the output of a planned layer — the place where the predictors are summed; anything else (a ReLU output
read by the tail) is refused with the node named. The predictors share no tensor but the network input:
engines may run them concurrently (OpenVINO streams, TensorRT auxiliary streams), or
:func:`predictor_models` splits them into one graph each, summed by the caller.

Each predictor gets its own activation ranges (the later ones carry small residual signals):
:func:`float_predictors` gives the float model whose probes measure them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

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
    expand_weight,
    reconstruct,
)
from rexdeploy.passes.expand import LayerJob
from rexdeploy.planner.ensembles import EnsembleCheck, annotate, check_ensemble, enforce, ensemble_layout, node_names
from rexdeploy.plans import Plan

ENSEMBLE_FORMS = ("eq35", "algorithm1")
OUTSIDE = "_out"  # tag suffix of a layer's outside-the-activation orders (Eq. 35)


@dataclass(frozen=True)
class Ensemble:
    model: onnx.ModelProto  # the cloned float graph (weights shared), to be expanded with ``jobs``
    jobs: dict[str, LayerJob]  # clone node name → what it holds
    predictors: int
    form: str = "eq35"
    outputs: tuple[str, ...] = ()  # the tensors where the predictors are summed (one Sum each)
    plan: Plan | None = None  # the plan with U_ens written in it (Appendix L), for M > 1
    check: EnsembleCheck | None = None


def _suffix(m: int) -> str:
    return f"__p{m + 1}"


def _check_plan(plan: Plan, layers: list[Layer], form: str) -> tuple[dict[str, Layer], int]:
    if form not in ENSEMBLE_FORMS:
        raise PlanError(f"ensemble form {form!r} unknown; use one of {', '.join(ENSEMBLE_FORMS)}")
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(plan.layers) - set(by_name))
    if unknown:
        raise PlanError(
            f"the plan names layer(s) {', '.join(unknown[:5])} that are not quantizable nodes of this model"
        )
    counts = {lp.predictors for lp in plan.layers.values()}
    if len(counts) != 1:
        raise PlanError(f"every layer of an ensemble plan needs the same number of predictors; got {sorted(counts)}")
    splits = {lp.split for lp in plan.layers.values()}
    if form == "eq35" and len(splits) != 1 and counts != {1}:
        raise PlanError(
            f"an Eq. 35 ensemble needs one split K_1..K_M on every layer; got {sorted(splits)}: make the plan uniform"
        )
    for name, lp in plan.layers.items():
        try:
            check_ensemble_validity(lp.bits, lp.split)  # one rule for the pass and the numerics
        except PlanError as exc:
            raise PlanError(f"layer {name!r}: {exc}") from None
    return by_name, counts.pop()


def build_ensemble(model: onnx.ModelProto, plan: Plan, layers: list[Layer], *, form: str = "eq35",
                   later_outside: bool = True,
                   bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   check: bool = True) -> Ensemble:  # fmt: skip
    """Clone ``model`` (BN-folded) into ``plan``'s predictors; the expand pass then emits each clone's orders.

    ``later_outside=False`` leaves out the outside orders of the predictors m >= 2 (residual orders applied
    to a residual signal: second-order small), so that they cost K_1 orders per layer instead of K.
    With M > 1 and ``check``, the Appendix-L check (:func:`rexdeploy.planner.ensembles.check_ensemble`, with
    ``bn_stats`` from :func:`rexdeploy.graph.fold_batchnorm` when given) refuses an invalid split, warns on a
    doubtful one, and writes U_ens in ``Ensemble.plan``."""
    by_name, m_count = _check_plan(plan, layers, form)
    graph = model.graph
    names = node_names(model)
    layout = ensemble_layout(model, set(plan.layers), layers)
    verdict: EnsembleCheck | None = None
    if m_count > 1 and check:
        verdict = check_ensemble(model, plan, layers, bn_stats, layout)
        enforce(verdict)
    region, crossing_set = layout.region, set(layout.crossing)
    produced = {t for i in region for t in graph.node[i].output}

    def rename(t: str, m: int) -> str:
        if t not in produced:
            return t  # graph inputs and initializers are shared by all predictors
        if m == 0 and t not in crossing_set:
            return t
        return t + _suffix(m)

    # per planned node: (inside orders by predictor, outside orders, activation node index)
    split_of: dict[int, tuple[list[tuple[int, ...]], tuple[int, ...], int | None]] = {}
    for i, (kind, act) in layout.roles.items():
        lp = plan.layers[names[i]]
        groups = [tuple(g) for g in ensemble_groups(lp.order, lp.split)]
        all_orders = tuple(range(1, lp.order + 1))
        if form == "algorithm1" or kind == "first" or m_count == 1:  # Algorithm 1 / Eq. 31
            split_of[i] = (groups, (), None)
        elif kind == "linear":  # inside = outside
            split_of[i] = ([all_orders] * m_count, (), None)
        else:  # Eq. 35
            split_of[i] = ([groups[0]] * m_count, all_orders[len(groups[0]) :], act)
    outside_of_act = {act: i for i, (_, outside, act) in split_of.items() if act is not None and outside}

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
            tag = "" if m == 0 else _suffix(m)
            after: list[onnx.NodeProto] = []
            if m > 0 and i in layout.shared_terms:  # a bias or the network input: added in predictor 1 only
                k = layout.shared_terms[i]
                op = "Neg" if node.op_type == "Sub" and k == 1 else "Identity"
                clone = helper.make_node(op, [clone.input[k]], [clone.output[0]], name=clone.name)
            if i in split_of:
                inside, outside, _ = split_of[i]
                lp, layer = plan.layers[names[i]], by_name[names[i]]
                jobs[clone.name] = LayerJob(layer, lp, inside[m], bias=m == 0, tag=tag, shared_orders=shared)
                if outside and (m == 0 or later_outside):  # Eq. 35: the later orders, added after the activation
                    out_node = onnx.NodeProto()
                    out_node.CopyFrom(clone)
                    out_node.name = f"{names[i]}{_suffix(m)}{OUTSIDE}"
                    del out_node.output[:]
                    out_node.output.append(f"{node.output[0]}{_suffix(m)}{OUTSIDE}")
                    after.append(out_node)
                    jobs[out_node.name] = LayerJob(layer, lp, outside, bias=False, tag=_suffix(m) + OUTSIDE,
                                                   shared_orders=shared)  # fmt: skip
            if i in outside_of_act and (m == 0 or later_outside):
                layer_node = graph.node[outside_of_act[i]]
                target = clone.output[0]
                clone.output[0] = f"{node.output[0]}{_suffix(m)}_inside"
                after.append(
                    helper.make_node(
                        "Add",
                        [clone.output[0], f"{layer_node.output[0]}{_suffix(m)}{OUTSIDE}"],
                        [target],
                        name=f"{names[i]}{_suffix(m)}{OUTSIDE}_add",
                    )
                )
            new_nodes += [clone, *after]
    for t in layout.crossing:
        new_nodes.append(
            helper.make_node("Sum", [t + _suffix(m) for m in range(m_count)], [t], name=f"{t}__ensemble_sum")
        )
    new_nodes.extend(n for i, n in enumerate(graph.node) if i not in region)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(_topological(new_nodes, out.graph))
    del out.graph.value_info[:]
    annotated = annotate(plan, verdict) if verdict is not None else plan
    if m_count > 1:
        note = f"ensemble: {m_count} predictors, form {form}" + (
            "" if later_outside else ", later predictors inside only"
        )
        annotated = replace(annotated, notes=(*annotated.notes, note))
    return Ensemble(out, jobs, m_count, form, layout.crossing, annotated,
                    verdict)  # fmt: skip


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every tensor is produced before it is read (the outside orders of a
    layer are emitted right after it, before the activation whose output they are added to)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(t in ready for t in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # inputs produced by no node (e.g. outer-scope names): keep the order
            ordered.extend(rest)
            break
        pending = rest
    return ordered


def float_predictors(ensemble: Ensemble, source: onnx.ModelProto) -> onnx.ModelProto:
    """The ensemble graph with each predictor's layers in float: a clone's weight = the float sum of the
    orders it holds, bias only in predictor 1. Running it gives each predictor's own activation statistics
    (and is the ensemble's weight-only float reference).

    ``source`` is the model the ensemble was built from. The residual orders computed here are kept
    for the expansion pass (``LayerJob.shared_orders``), which then does not compute them again."""
    out = onnx.ModelProto()
    out.CopyFrom(ensemble.model)
    consts = ConstantResolver(source)
    nodes = {n.name: n for n in out.graph.node}
    cache: dict[tuple[str, int, int, float | None], tuple[list[ResidualOrder], tuple[int, ...]]] = {}
    names = {i.name for i in out.graph.initializer}
    for name, job in ensemble.jobs.items():
        layer, lp = job.layer, job.plan
        key = (layer.weight, lp.bits, lp.order, lp.gamma)
        if key not in cache:
            w = layer_weight(source, layer, consts)
            t0 = time.perf_counter()
            orders = expand_weight(w, lp.bits, lp.order, lp.gamma)
            if job.shared_orders is not None and not lp.block:  # the expand pass takes these orders as they are
                job.shared_orders.setdefault(key, (orders, time.perf_counter() - t0))
            cache[key] = (orders, w.shape)
        orders, shape = cache[key]
        w_name = f"{layer.weight}__float_o{'_'.join(map(str, job.orders))}"
        if w_name not in names:
            value = reconstruct([orders[k - 1] for k in job.orders], shape)
            add_initializer(out.graph.initializer, np.moveaxis(value, 0, layer.weight_axis).astype(np.float32), w_name)
            names.add(w_name)
        node = nodes[name]
        node.input[layer.weight_index] = w_name
        if not job.bias and len(node.input) > 2:
            del node.input[2:]
    # the source weights the float ones replaced: dead weight for the probing session to load
    g = out.graph
    drop_initializers(g, {i for n in g.node for i in n.input} | {v.name for v in (*g.input, *g.output)})
    return out


def predictor_models(model: onnx.ModelProto, predictors: int) -> list[onnx.ModelProto]:
    """One graph per predictor, cut from ``model`` (the expanded — or float — graph of an ensemble of
    ``predictors``):
    predictor m keeps the nodes it owns plus the nodes that produce what they read (Q/DQ, weight
    DequantizeLinear), and outputs its part of each summed tensor. The caller sums the M outputs (one
    engine per predictor, e.g. a Triton ensemble); a network tail after the sum is not included, so this
    needs the predictors to be summed at the graph outputs."""
    graph = model.graph
    sums = {n.output[0]: n for n in graph.node if n.op_type == "Sum" and n.name.endswith("__ensemble_sum")}
    outputs = [o.name for o in graph.output]
    if sorted(sums) != sorted(outputs):
        raise PlanError(
            "predictor_models needs the predictors summed at the graph outputs; this graph has a tail after the "
            "sum (run it as one engine, whose branches are independent)"
        )
    producers = {t: n for n in graph.node for t in n.output}
    models = []
    for m in range(predictors):
        wanted = [sums[o].input[m] for o in outputs]
        keep: list[onnx.NodeProto] = []
        seen: set[str] = set()
        stack = list(wanted)
        while stack:
            t = stack.pop()
            n = producers.get(t)
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            keep.append(n)
            stack.extend(x for x in n.input if x)
        order = {id(n): k for k, n in enumerate(graph.node)}
        keep.sort(key=lambda n: order[id(n)])
        sub = onnx.ModelProto()
        sub.CopyFrom(model)
        del sub.graph.node[:]
        sub.graph.node.extend(keep)
        del sub.graph.output[:]
        for name, orig in zip(wanted, graph.output, strict=True):
            info = onnx.ValueInfoProto()
            info.CopyFrom(orig)
            info.name = name
            sub.graph.output.append(info)
        del sub.graph.value_info[:]
        drop_initializers(sub.graph, {i for n in sub.graph.node for i in n.input})
        models.append(sub)
    return models
