"""The ensemble pass (paper §3.3, Appendix E, Eq. 31-35): M predictors summed at the output.

Three forms (``ENSEMBLE_FORMS``):

``difference`` (the default). The paper states the target (Appendix B, after Eq. 27): predictor 1 is the expansion
f^(K_1), predictor m the expansion of f^(S_m) − f^(S_{m-1}) (S_m = K_1 + .. + K_m). Eq. 35 reaches for it through
σ(x + ε) ≈ σ(x) + σ(ε), which on a ReLU network gates the correction ε with the later predictor's own masks —
they agree with predictor 1's on about half the units, so the later predictor adds nothing
(``benchmarks/study_ensemble_masks.py``). This form makes the statement exact: predictor 1 is the dense K_1
expansion (biases, bias correction); predictor m ≥ 2 applies its cluster's orders to the sum of the predictors
up to it and orders 1..min(K_m, S_{m-1}) (``own_orders``) to its own input, and each non-linear op φ (an
activation, a max pool, a Softmax, a product of two signals) as ``φ(A^{m-1} + a^m) − φ(A^{m-1})``, A^{m-1} being
the op's inputs summed over the predictors before it. The
predictors sum to the dense K expansion where K_m >= S_{m-1} ([2,2], [1,3]; MobileNetV2 int4 [2,2]: the dense
K=4's error, 0.000204) and near it otherwise (``benchmarks/results/ensembles.md``). Predictor m runs
K_m + min(K_m, S_{m-1}) orders per layer. The predictors are not independent: predictor m reads the earlier
predictors' tensors at every layer, so they run as one engine whose branches overlap only within a layer
(TensorRT auxiliary streams), never as one engine per predictor.

``eq35`` (Appendix E.2, Eq. 33-35; independent predictors). Every predictor is a clone of the network:

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
  (MobileNetV2 int4 [2,2], ``benchmarks/results/ensembles.md``): predictor 2 keeps an output but does not
  lower the error — under its own activation masks it is not the correction the dense expansion makes; and
  predictor 1's outside orders are exact only where σ passes its input. Kept for devices that run whole
  networks side by side (:func:`predictor_models`); the pass refuses a split the Appendix-L check finds
  invalid.

  A tensor all predictors have (a bias ``Add``, the network input added on a residual path) is added in
  predictor 1 only (all forms); in this form an op between the planned layers that is neither linear nor an
  activation with σ(0) = 0 (Softmax, a product of two signals) is refused, naming the node
  (:func:`rexdeploy.planner.ensembles.ensemble_layout`).

``algorithm1`` (Appendix E.2, Algorithm 1 read literally): predictor m holds only cluster m's orders in
every layer. On a deep network the later predictors' signal shrinks by the residual ratio per layer and
vanishes (MobileNetV2 int4 [2,2]: the ensemble's error equals its first predictor's); kept as a
measured reference (``benchmarks/bench_ensembles.py``), not offered by the planner.

The cloned region is every node upstream of (or at) a planned layer; the nodes after the last planned
layers (the network tail: e.g. a Softmax) run once, on the sum. A tensor that leaves the region must be
the output of a planned layer — the place where the predictors are summed; anything else (a ReLU output
read by the tail) is refused with the node named. In the ``eq35`` and ``algorithm1`` forms the predictors
share no tensor but the network input: engines may run them concurrently (OpenVINO streams, TensorRT auxiliary
streams), or :func:`predictor_models` splits them into one graph each, summed by the caller.

Each predictor gets its own activation ranges (the later ones carry small residual signals):
:func:`float_predictors` gives the float model whose probes measure them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
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
from rexdeploy.passes.expand import LayerJob, corrected_bias
from rexdeploy.planner.ensembles import (
    ACTIVATIONS,
    LINEAR_OPS,
    EnsembleCheck,
    Layout,
    annotate,
    check_ensemble,
    enforce,
    ensemble_layout,
    node_names,
    own_order_count,
)
from rexdeploy.plans import Plan
from rexdeploy.ranges import activation_means

ENSEMBLE_FORMS = ("difference", "eq35", "algorithm1")
OUTSIDE = "_out"  # tag suffix of a layer's outside-the-activation orders (Eq. 35)
CUMULATIVE = "_cum"  # tag suffix of a later predictor's orders applied to the predictors before it (difference form)
FORM_KEY = "rexdeploy.ensemble_form"  # model metadata: the form an ensemble graph was built in
# ops a later predictor of the difference form runs as φ(its inputs summed up to it) − φ(summed up to the one
# before): the activations and the max pools (which Eq. 35 treats as linear), besides every op outside
# LINEAR_OPS and every product of two predictor signals (:func:`_linear`)
DIFFERENCE_OPS = ACTIVATIONS | {"MaxPool", "GlobalMaxPool"}


@dataclass(frozen=True)
class Ensemble:
    model: onnx.ModelProto  # the cloned float graph (weights shared), to be expanded with ``jobs``
    jobs: dict[str, LayerJob]  # clone node name → what it holds
    predictors: int
    form: str = "difference"
    outputs: tuple[str, ...] = ()  # the tensors where the predictors are summed (one Sum each)
    plan: Plan | None = None  # the plan with U_ens written in it (Appendix L), for M > 1
    check: EnsembleCheck | None = None


def _suffix(m: int) -> str:
    return f"__p{m + 1}"


def _clone(node: onnx.NodeProto, name: str, m: int, rename: Callable[[str, int], str]) -> onnx.NodeProto:
    """Predictor ``m``'s copy of ``node`` (named ``name`` in predictor 1), its tensors renamed by ``rename``."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = name if m == 0 else name + _suffix(m)
    for k, t in enumerate(node.input):
        clone.input[k] = rename(t, m) if t else t
    for k, t in enumerate(node.output):
        clone.output[k] = rename(t, m)
    return clone


def _cumulative(t: str, m: int) -> str:
    """The name of ``t`` summed over predictors 1..m+1 (difference form; m >= 1)."""
    return f"{t}__c{m + 1}"


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
        if form == "difference":
            break  # no σ(x + ε) ≈ σ(x) + σ(ε) to keep valid: the Appendix-L check judges its own-order truncation
        try:
            check_ensemble_validity(lp.bits, lp.split)  # one rule for the pass and the numerics
        except PlanError as exc:
            raise PlanError(f"layer {name!r}: {exc}") from None
    return by_name, counts.pop()


def build_ensemble(model: onnx.ModelProto, plan: Plan, layers: list[Layer], *, form: str = "difference",
                   later_outside: bool = True, own_orders: int | None = None,
                   bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   check: bool = True, bias_correction: bool = True) -> Ensemble:  # fmt: skip
    """Clone ``model`` (BN-folded) into ``plan``'s predictors; the expand pass then emits each clone's orders.

    ``own_orders`` (difference form): how many orders (1..n) a later predictor m applies to its own input; None:
    min(K_m, S_{m-1}) (:func:`own_order_count`), where S_{m-1} would make the sum the dense K exactly.
    ``later_outside=False`` (Eq. 35 form) leaves out the outside orders of the predictors m >= 2 (residual orders
    applied to a residual signal: second-order small), so that they cost K_1 orders per layer instead of K.
    With M > 1 and ``check``, the Appendix-L check (:func:`rexdeploy.planner.ensembles.check_ensemble`, with
    ``bn_stats`` from :func:`rexdeploy.graph.fold_batchnorm` when given) refuses an invalid split, warns on a
    doubtful one, and writes U_ens in ``Ensemble.plan``. With ``bn_stats`` and ``bias_correction``, the data-free
    bias correction the expansion pass gives a dense plan (from the layer inputs' BN-propagated means) goes to the
    predictors (:func:`_correct_biases`): their sum carries the dense K's."""
    by_name, m_count = _check_plan(plan, layers, form)
    means = (activation_means(model, bn_stats, [by_name[n].input for n in plan.layers])
             if bn_stats and bias_correction and m_count > 1 else {})  # fmt: skip
    graph = model.graph
    names = node_names(model)
    layout = ensemble_layout(model, set(plan.layers), layers, exact=form == "difference" and m_count > 1)
    verdict: EnsembleCheck | None = None
    if m_count > 1 and check:
        verdict = check_ensemble(model, plan, layers, bn_stats, layout, form=form, own_orders=own_orders)
        enforce(verdict)
    region, crossing_set = layout.region, set(layout.crossing)
    produced = {t for i in region for t in graph.node[i].output}

    def rename(t: str, m: int) -> str:
        if t not in produced:
            return t  # graph inputs and initializers are shared by all predictors
        if m == 0 and t not in crossing_set:
            return t
        return t + _suffix(m)

    if form == "difference" and m_count > 1:
        nodes, made = _difference_nodes(model, plan, layout, by_name, m_count, own_orders, rename)
        return _finish(model, plan, layout, nodes, made, m_count, form, verdict, means,
                       "" if own_orders is None else f", own orders 1..{own_orders}")  # fmt: skip
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
            clone = _clone(node, names[i], m, rename)
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
    return _finish(model, plan, layout, new_nodes, jobs, m_count, form, verdict, means,
                   "" if later_outside else ", later predictors inside only")  # fmt: skip


def _finish(model: onnx.ModelProto, plan: Plan, layout: Layout, new_nodes: list[onnx.NodeProto],
            jobs: dict[str, LayerJob], m_count: int, form: str, verdict: EnsembleCheck | None,
            means: Mapping[str, np.ndarray], detail: str) -> Ensemble:  # fmt: skip
    """The ensemble graph: the predictors' nodes, one Sum per crossing tensor, the tail after it; predictor 1's
    biases corrected for the dense K weight error where ``means`` has the layer's input mean."""
    graph = model.graph
    for t in layout.crossing:
        new_nodes.append(
            helper.make_node("Sum", [t + _suffix(m) for m in range(m_count)], [t], name=f"{t}__ensemble_sum")
        )
    new_nodes.extend(n for i, n in enumerate(graph.node) if i not in layout.region)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(_topological(new_nodes, out.graph))
    del out.graph.value_info[:]
    corrected = 0
    if means:
        jobs, corrected = _correct_biases(out, {n.name: n for n in out.graph.node}, jobs, means, form)
    annotated = annotate(plan, verdict) if verdict is not None else plan
    if corrected:
        detail += f", data-free bias correction on {corrected} layers"
    if m_count > 1:
        onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, FORM_KEY: form})
        note = f"ensemble: {m_count} predictors, form {form}{detail}"
        annotated = replace(annotated, notes=(*annotated.notes, note))
    return Ensemble(out, jobs, m_count, form, layout.crossing, annotated,
                    verdict)  # fmt: skip


def _correct_biases(model: onnx.ModelProto, nodes: Mapping[str, onnx.NodeProto], jobs: dict[str, LayerJob],
                    means: Mapping[str, np.ndarray], form: str) -> tuple[dict[str, LayerJob], int]:  # fmt: skip
    """``jobs`` with the data-free bias correction (:func:`rexdeploy.passes.expand.corrected_bias`; new initializers
    added to ``model``), and how many layers were corrected. Eq. 35 / Algorithm 1: predictor 1's bias corrected for
    the dense K weights. Difference form: predictor 1's for the dense K_1 weights (alone, it is the corrected dense
    K_1 expansion), and predictor m's cluster job adds ``shift(S_m) − shift(S_{m-1})``, so predictors 1..m sum to
    the corrected dense S_m. The orders computed here go to the jobs' shared cache (the expansion pass reuses them)."""
    consts = ConstantResolver(model)
    out = dict(jobs)
    count = 0
    for name, job in jobs.items():
        layer, lp = job.layer, job.plan
        mean = means.get(layer.input)
        if mean is None or layer.op_type not in ("Conv", "Gemm") or lp.block:
            continue
        if form == "difference" and job.tag.endswith(CUMULATIVE):
            m = int(job.tag.removeprefix("__p").removesuffix(CUMULATIVE)) - 1
        elif job.bias:
            m = 0
        else:
            continue
        w = layer_weight(model, layer, consts)
        key = (layer.weight, lp.bits, lp.order, lp.gamma)
        if job.shared_orders is not None and key in job.shared_orders:
            orders = job.shared_orders[key][0]
        else:
            t0 = time.perf_counter()
            orders = expand_weight(w, lp.bits, lp.order, lp.gamma)
            if job.shared_orders is not None:
                job.shared_orders[key] = (orders, time.perf_counter() - t0)
        bias = consts.value(layer.bias) if layer.bias else None
        if form != "difference":
            value = corrected_bias(nodes[name], layer, w, orders, mean, bias)
        else:
            ends = np.cumsum([len(g) for g in ensemble_groups(lp.order, lp.split)])
            upto = corrected_bias(nodes[name], layer, w, orders[: ends[m]], mean, bias if m == 0 else None)
            before = corrected_bias(nodes[name], layer, w, orders[: ends[m - 1]], mean, None) if m else 0.0
            value = None if upto is None or before is None else (upto - before).astype(np.float32)
        if value is None:
            continue
        bias_name = f"{layer.name}{job.tag}__bias_corrected"
        add_initializer(model.graph.initializer, value, bias_name)
        out[name] = replace(job, layer=replace(layer, bias=bias_name), bias=True)
        count += m == 0
    return out, count


def _linear(node: onnx.NodeProto, mine: list[int]) -> bool:
    """Whether ``node`` is linear in its predictor-dependent inputs (positions ``mine``): then each predictor runs
    it on its own signal; else the difference form runs it on the sums."""
    op = node.op_type
    if op in DIFFERENCE_OPS or op not in LINEAR_OPS:
        return False
    if op in ("Mul", "MatMul") and len(mine) > 1:
        return False
    return not (op == "Div" and mine != [0])


def _difference_nodes(model: onnx.ModelProto, plan: Plan, layout: Layout, by_name: dict[str, Layer], m_count: int,
                      own_orders: int | None,
                      rename: Callable[[str, int], str]) -> tuple[list[onnx.NodeProto], dict[str, LayerJob]]:  # fmt: skip
    """The difference form's nodes and jobs (module docstring). Predictor 1 is the dense expansion at K_1;
    predictor m >= 2, with S_m = K_1 + .. + K_m and X^{m-1} the sum of the predictors before it:

    * a planned layer: ``ε^m = W_{cluster m} X^m + W^{(n)} x^m`` (no bias), X^m = X^{m-1} + x^m its input summed
      over predictors 1..m, n = :func:`own_order_count`; a layer that reads a shared tensor (the network input:
      Eq. 31) has no own input: ``ε^m = W_{cluster m} x``;
    * a non-linear op σ (:data:`DIFFERENCE_OPS`): ``σ(A^{m-1} + a^m) − σ(A^{m-1})``, with A^{m-1} the sum of the
      op's inputs in the predictors before it, whose σ they computed already;
    * a linear op: the same op on its own signal (a shared term — bias, network input — in predictor 1 only).

    With n = S_{m-1}, ``A^m = W^{(S_{m-1})} X^{m-1} + b + ε^m = W^{(S_m)} X^m + b``: predictors 1..m sum to the dense
    expansion at S_m exactly (no σ(x+ε) ≈ σ(x) + σ(ε) anywhere); with n < S_{m-1} they are off by
    ``W_{n+1..S_{m-1}} x^m``, ~ρ^n of a signal ~ρ^{S_{m-1}}: the size of the dense S_m's own error."""
    graph = model.graph
    names = node_names(model)
    dependent: set[str] = set()  # tensors that differ between predictors
    for i, node in enumerate(graph.node):
        if i in layout.region and (i in layout.roles or any(t in dependent for t in node.input)):
            dependent.update(node.output)
    new_nodes: list[onnx.NodeProto] = []
    jobs: dict[str, LayerJob] = {}
    shared: dict[tuple[str, int, int, float | None], tuple[list[ResidualOrder], float]] = {}
    summed: set[str] = set()  # cumulative tensors emitted so far

    def cumulative(t: str, m: int) -> str:
        """``t`` summed over predictors 1..m+1: emitted once (an Add) unless a difference node made it."""
        if m == 0:
            return rename(t, 0)
        name = _cumulative(t, m)
        if name not in summed:
            summed.add(name)
            # Sum, not Add: a sum of predictors, not a residual block (quantized_joins would give each part its own
            # Q/DQ and quantize the sum twice)
            new_nodes.append(helper.make_node("Sum", [cumulative(t, m - 1), rename(t, m)], [name], name=name))
        return name

    for i, node in enumerate(graph.node):
        if i not in layout.region:
            continue
        for m in range(m_count):
            clone = _clone(node, names[i], m, rename)
            if m > 0 and i in layout.shared_terms:  # a bias or the network input: added in predictor 1 only
                k = layout.shared_terms[i]
                op = "Neg" if node.op_type == "Sub" and k == 1 else "Identity"
                new_nodes.append(helper.make_node(op, [clone.input[k]], [clone.output[0]], name=clone.name))
                continue
            if i in layout.roles:
                lp, layer = plan.layers[names[i]], by_name[names[i]]
                groups = [tuple(g) for g in ensemble_groups(lp.order, lp.split)]
                if m == 0:
                    jobs[clone.name] = LayerJob(layer, lp, groups[0], bias=True, shared_orders=shared)
                    new_nodes.append(clone)
                    continue
                x = node.input[layer.act_index]
                own = x in dependent
                target = clone.output[0]
                cum = onnx.NodeProto()
                cum.CopyFrom(clone)
                cum.name = f"{names[i]}{_suffix(m)}{CUMULATIVE}"
                cum.input[layer.act_index] = cumulative(x, m) if own else x
                cum.output[0] = f"{node.output[0]}{_suffix(m)}{CUMULATIVE}" if own else target
                jobs[cum.name] = LayerJob(layer, lp, groups[m], bias=False, tag=_suffix(m) + CUMULATIVE,
                                          shared_orders=shared)  # fmt: skip
                new_nodes.append(cum)
                if own:
                    n_own = own_order_count([len(g) for g in groups], m, own_orders)
                    clone.output[0] = f"{node.output[0]}{_suffix(m)}_own"
                    jobs[clone.name] = LayerJob(layer, lp, tuple(range(1, n_own + 1)), bias=False,
                                                tag=_suffix(m), shared_orders=shared)  # fmt: skip
                    new_nodes += [clone, helper.make_node("Add", [clone.output[0], cum.output[0]], [target],
                                                          name=f"{names[i]}{_suffix(m)}_add")]  # fmt: skip
                continue
            mine = [k for k, t in enumerate(node.input) if t in dependent]
            if m > 0 and mine and not _linear(node, mine):  # φ(sum up to m) − φ(sum up to m−1): exact for any φ
                if len(node.output) != 1:
                    raise PlanError(
                        f"node {names[i]!r} ({node.op_type}) lies between the planned layers with "
                        f"{len(node.output)} outputs; the difference form runs a non-linear op between them only "
                        "with one output: plan this model without an ensemble"
                    )
                y = node.output[0]
                for k in mine:
                    clone.input[k] = cumulative(node.input[k], m)
                clone.output[0] = _cumulative(y, m)
                summed.add(clone.output[0])
                new_nodes += [clone, helper.make_node("Sub", [clone.output[0], cumulative(y, m - 1)], [rename(y, m)],
                                                      name=f"{names[i]}{_suffix(m)}_difference")]  # fmt: skip
                continue
            new_nodes.append(clone)
    return new_nodes, jobs


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
        elif job.bias and layer.bias and layer.op_type in ("Conv", "Gemm"):  # the bias the expansion emits
            del node.input[2:]  # (bias-corrected, or predictor m's share of the correction in the difference form)
            node.input.append(layer.bias)
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
    form = {p.key: p.value for p in model.metadata_props}.get(FORM_KEY)
    if form == "difference":
        raise PlanError(
            "predictor_models cannot cut a difference-form ensemble: its later predictors read the earlier ones' "
            "tensors at every layer (run it as one engine), or build it with form='eq35' for independent predictors"
        )
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
