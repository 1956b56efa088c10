"""Ensembles (paper §3.3, Appendix E Eq. 31-35): the emitted graph (onnxruntime, optimizations off) against an
independent numpy simulation of the construction on a small deep net; its op structure (independent
predictors, the later orders outside each activation); U_ens and the Appendix-L check; the planner's hook."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import mobilenet_v2_like, small_cnn, transformer_block
from onnx import TensorProto, helper, numpy_helper
from reference import conv2d, rex_orders, run_exact

from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.errors import PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.ensemble import build_ensemble, float_predictors, predictor_models
from rexdeploy.passes.expand import expand
from rexdeploy.passes.pipeline import Expanded
from rexdeploy.planner.ensembles import (
    aux_streams_for,
    check_ensemble,
    ensemble_candidates,
    ensemble_latency_ms,
    own_order_count,
    parallel_capacity,
    predictor_orders,
)
from rexdeploy.plans import Plan, uniform_plan
from rexdeploy.profile import load_profile
from rexdeploy.ranges import probe_ranges

PROFILE = load_profile("x86-avx512")
Arr = np.ndarray


def deep_net(seed: int = 0) -> onnx.ModelProto:
    """x(N,4,6,6) → c0 3×3 → Relu → c1 3×3 → Clip(0,6) → c2 1×1 (linear) + skip from the Relu → c3 3×3 → Relu
    → c4 1×1 → Relu → GlobalAveragePool → Flatten → fc Gemm(5): five conv layers deep, a residual Add."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...]) -> Arr:
        return rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)

    weights = {"c0": he((8, 4, 3, 3)), "c1": he((8, 8, 3, 3)), "c2": he((8, 8, 1, 1)), "c3": he((8, 8, 3, 3)),
               "c4": he((8, 8, 1, 1)), "fc": he((5, 8))}  # fmt: skip
    inits = [numpy_helper.from_array(w, f"{n}_w") for n, w in weights.items()]
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, w.shape[0]).astype(np.float32), f"{n}_b")
              for n, w in weights.items()]  # fmt: skip
    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]

    def conv(name: str, x: str, pad: int) -> onnx.NodeProto:
        return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name, pads=[pad] * 4)

    nodes = [
        conv("c0", "x", 1), helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        conv("c1", "r0", 1), helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="clip1"),
        conv("c2", "r1", 0), helper.make_node("Add", ["c2", "r0"], ["s2"], name="skip"),
        conv("c3", "s2", 1), helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        conv("c4", "r3", 0), helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
        helper.make_node("GlobalAveragePool", ["r4"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "deep_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def simulate(model: onnx.ModelProto, x: Arr, bits: int, split: tuple[int, ...], form: str = "eq35",
             later_outside: bool = True, parts: bool = False,
             quant: Callable[[str, Arr], Arr] | None = None) -> Arr | list[Arr]:  # fmt: skip
    """The ensemble of ``deep_net`` written from Eq. 31 / 35 (or Algorithm 1) in float64 numpy, orders from
    :func:`reference.rex_orders`; the sum of the predictors, or each predictor's output (``parts``).
    ``quant(tensor, value)`` fake-quantizes each layer input (tensor names as the pass gives them: ``r1`` in
    predictor 1, ``r1__p2`` in predictor 2; the network input ``x`` is shared)."""
    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    k_total, k1 = sum(split), split[0]
    orders = {n: rex_orders(p[f"{n}_w"], bits, k_total) for n in ("c0", "c1", "c2", "c3", "c4", "fc")}
    ends = np.cumsum(split)
    groups = [list(range(e - s + 1, e + 1)) for e, s in zip(ends, split, strict=True)]
    outs = []
    for m, group in enumerate(groups):

        def w(name: str, ks: list[int]) -> Arr:
            return sum((orders[name][k - 1] for k in ks), np.zeros_like(p[f"{name}_w"]))

        def b(name: str, m: int = m) -> Arr | None:
            return p[f"{name}_b"] if m == 0 else None

        inside = groups[0] if form == "eq35" else group
        outside = list(range(k1 + 1, k_total + 1)) if form == "eq35" and (m == 0 or later_outside) else []
        linear = list(range(1, k_total + 1)) if form == "eq35" else group

        def q(tensor: str, value: Arr, m: int = m) -> Arr:
            if quant is None:
                return value
            return quant(tensor if m == 0 or tensor == "x" else f"{tensor}__p{m + 1}", value)

        def with_act(x: Arr, name: str, pad: int, act: Callable[[Arr], Arr], ins: list[int] = inside,
                     out: list[int] = outside) -> Arr:  # fmt: skip
            y = act(conv2d(x, w(name, ins), b(name), [1, 1], [pad] * 4, 1))
            return y + conv2d(x, w(name, out), None, [1, 1], [pad] * 4, 1) if out else y

        def relu(t: Arr) -> Arr:
            return np.maximum(t, 0.0)

        r0 = relu(conv2d(q("x", x), w("c0", group), b("c0"), [1, 1], [1] * 4, 1))  # reads the network input: Eq. 31
        r1 = with_act(q("r0", r0), "c1", 1, lambda t: np.clip(t, 0.0, 6.0))
        s2 = conv2d(q("r1", r1), w("c2", linear), b("c2"), [1, 1], [0] * 4, 1) + r0  # linear: all orders
        r3 = with_act(q("s2", s2), "c3", 1, relu)
        r4 = with_act(q("r3", r3), "c4", 0, relu)
        y = q("flat", r4.mean(axis=(2, 3))) @ w("fc", linear).T
        outs.append(y + p["fc_b"] if m == 0 else y)
    return outs if parts else sum(outs)


def simulate_difference(model: onnx.ModelProto, x: Arr, bits: int, split: tuple[int, ...], own: int | None = None,
                        parts: bool = False, quant: Callable[[str, Arr], Arr] | None = None) -> Arr | list[Arr]:  # fmt: skip
    """The difference form of ``deep_net``'s ensemble in float64 numpy: predictor 1 the dense K_1 expansion;
    predictor m >= 2 applies its cluster's orders to the sum of predictors 1..m and orders 1..n (``own``, else
    min(K_m, S_{m-1})) to its own input, and each σ as σ(A^{m-1} + a^m) − σ(A^{m-1}). ``quant(tensor, value)``
    fake-quantizes each layer input as the pass names it: ``r1`` (predictor 1), ``r1__c2`` (the sum of predictors
    1..2), ``r1__p2`` (predictor 2's own); the network input ``x`` is shared."""

    def q(tensor: str, value: Arr) -> Arr:
        return value if quant is None else quant(tensor, value)

    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    k_total = sum(split)
    orders = {n: rex_orders(p[f"{n}_w"], bits, k_total) for n in ("c0", "c1", "c2", "c3", "c4", "fc")}
    ends = np.cumsum(split)
    groups = [list(range(e - s + 1, e + 1)) for e, s in zip(ends, split, strict=True)]
    mine = [groups[0]] + [list(range(1, own_order_count(split, m, own) + 1)) for m in range(1, len(split))]

    def w(name: str, ks: list[int]) -> Arr:
        return sum((orders[name][k - 1] for k in ks), np.zeros_like(p[f"{name}_w"]))

    def layer(xs: list[Arr] | Arr, t: str, name: str, pad: int, cums: list[Arr] | None = None) -> list[Arr]:
        """Per predictor: its pre-activation part (bias in predictor 1); ``xs`` one array = the shared input ``t``;
        ``cums``: the sums over predictors 1..m as the graph computes them (σ of the summed input), if not sums."""
        out = []
        for m, group in enumerate(groups):
            bias = p[f"{name}_b"] if m == 0 else None
            if isinstance(xs, np.ndarray):  # the network input (Eq. 31)
                out.append(conv2d(q(t, xs), w(name, group), bias, [1, 1], [pad] * 4, 1))
                continue
            summed = cums[m] if cums is not None else sum(xs[: m + 1])  # predictors 1..m+1 (its own included)
            cum = q(t if m == 0 else f"{t}__c{m + 1}", summed)
            y = conv2d(cum, w(name, group), bias, [1, 1], [pad] * 4, 1)
            own_input = q(f"{t}__p{m + 1}", xs[m]) if m else None
            out.append(y if m == 0 else y + conv2d(own_input, w(name, mine[m]), None, [1, 1], [pad] * 4, 1))
        return out

    def act(pre: list[Arr], f: Callable[[Arr], Arr]) -> tuple[list[Arr], list[Arr]]:
        """(each predictor's part, σ of the input summed over predictors 1..m)."""
        outs, cums, cum = [], [], np.zeros_like(pre[0])
        for a in pre:
            cum = cum + a
            cums.append(f(cum))
            outs.append(cums[-1] - (cums[-2] if len(cums) > 1 else 0.0))
        return outs, cums

    def relu(t: Arr) -> Arr:
        return np.maximum(t, 0.0)

    r0, r0_cum = act(layer(x, "x", "c0", 1), relu)
    r1, r1_cum = act(layer(r0, "r0", "c1", 1, r0_cum), lambda t: np.clip(t, 0.0, 6.0))
    s2 = [a + b for a, b in zip(layer(r1, "r1", "c2", 0, r1_cum), r0, strict=True)]
    r3, r3_cum = act(layer(s2, "s2", "c3", 1), relu)
    r4, _ = act(layer(r3, "r3", "c4", 0, r3_cum), relu)
    flat = [t.mean(axis=(2, 3)) for t in r4]
    ys = []
    for m, group in enumerate(groups):
        cum = q("flat" if m == 0 else f"flat__c{m + 1}", sum(flat[: m + 1]))
        y = cum @ w("fc", group).T + (q(f"flat__p{m + 1}", flat[m]) @ w("fc", mine[m]).T if m else p["fc_b"])
        ys.append(y)
    return ys if parts else sum(ys)


def dense_reference(model: onnx.ModelProto, x: Arr, bits: int, order: int) -> Arr:
    """``deep_net`` with every weight replaced by its dense REx expansion at ``order`` (float64 numpy)."""
    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w = {n: sum(rex_orders(p[f"{n}_w"], bits, order)) for n in ("c0", "c1", "c2", "c3", "c4", "fc")}

    def c(t: Arr, n: str, pad: int) -> Arr:
        return conv2d(t, w[n], p[f"{n}_b"], [1, 1], [pad] * 4, 1)

    r0 = np.maximum(c(x, "c0", 1), 0)
    s2 = c(np.clip(c(r0, "c1", 1), 0, 6), "c2", 0) + r0
    r4 = np.maximum(c(np.maximum(c(s2, "c3", 1), 0), "c4", 0), 0)
    return r4.mean(axis=(2, 3)) @ w["fc"].T + p["fc_b"]


def expand_form(model: onnx.ModelProto, bits: int, split: tuple[int, ...], act_bits: int = 0,
                form: str = "eq35", **kw: object) -> Expanded:  # fmt: skip
    """``expand_model``'s ensemble path (fold, clone, ranges from the float predictors, expand) with an explicit
    ensemble form (``expand_model`` builds the default one)."""
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=bits, order=sum(split), split=split, act_bits=act_bits)
    ens = build_ensemble(folded, plan, layers, form=form, bn_stats=bn_stats, **kw)  # type: ignore[arg-type]
    taps = [str(next(n for n in ens.model.graph.node if n.name == name).input[j.layer.act_index])
            for name, j in ens.jobs.items() if act_bits == 8]  # fmt: skip
    ranges = probe_ranges(float_predictors(ens, folded), taps) if taps else {}
    result = expand(ens.model, ens.plan or plan, ranges, jobs=ens.jobs)
    return Expanded(result.model, ens.plan or plan, tuple(layers), result.activation_scales, 0.0, 0.0)


X = np.random.default_rng(3).standard_normal((6, 4, 6, 6)).astype(np.float32)


def rel(a: Arr, b: Arr) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(("bits", "split"), [(4, (2, 2)), (4, (3, 1)), (5, (2, 1, 1)), (8, (1, 1))])
def test_eq35_graph_equals_the_numpy_construction(bits: int, split: tuple[int, ...]) -> None:
    model = deep_net()
    expanded = expand_form(model, bits, split)
    onnx.checker.check_model(expanded.model, full_check=True)
    got = run_exact(expanded.model, X)
    assert rel(got, simulate(model, X.astype(np.float64), bits, split)) < 2e-6
    # not the Algorithm-1 clone, and not the dense K expansion either (the numbers tell the forms apart)
    assert rel(got, simulate(model, X.astype(np.float64), bits, split, form="algorithm1")) > 1e-4


@pytest.mark.parametrize(("bits", "split", "own", "exact"), [(4, (2, 2), None, True), (4, (3, 1), None, False),
                                                             (5, (2, 1, 1), None, False), (4, (3, 1), 3, True),
                                                             (4, (1, 3), None, True), (4, (2, 2), 1, False),
                                                             (2, (2, 2), None, True)])  # fmt: skip
def test_difference_graph_equals_the_numpy_construction(bits: int, split: tuple[int, ...], own: int | None,
                                                        exact: bool) -> None:  # fmt: skip
    """The default form: the emitted graph against its numpy construction, and against the dense K expansion
    computed independently — equal to it where every predictor's own orders reach S_{m-1}, between it and the
    first predictor alone otherwise; predictor 1 alone is the dense K_1."""
    model = deep_net()
    x = X.astype(np.float64)
    expanded = (expand_model(model, profile=PROFILE, bits=bits, order=sum(split), split=split, act_bits=0)
                if own is None else expand_form(model, bits, split, form="difference", own_orders=own))  # fmt: skip
    onnx.checker.check_model(expanded.model, full_check=True)
    got = run_exact(expanded.model, X)
    assert rel(got, simulate_difference(model, x, bits, split, own)) < 2e-6  # type: ignore[arg-type]
    dense_k, dense_k1 = dense_reference(model, x, bits, sum(split)), dense_reference(model, x, bits, split[0])
    if exact:
        assert rel(got, dense_k) < 2e-6
    else:  # own orders short of S_{m-1}: near the dense K, far from the first predictor alone
        assert 1e-5 < rel(got, dense_k) < 0.3 * rel(dense_k1, dense_k)
    first = simulate_difference(model, x, bits, split, own, parts=True)[0]  # type: ignore[index]
    assert rel(first, dense_k1) < 1e-12
    assert any("form difference" in note for note in expanded.plan.notes)


def test_difference_op_structure() -> None:
    """Predictor 1 holds orders 1-2 of every layer; predictor 2 orders 3-4 on the sum of both predictors' inputs
    and orders 1-2 on its own (the input layer: orders 3-4 on the network input only), and every activation as
    σ(a + ε) − σ(a) reading predictor 1's pre-activation — so the predictors are not independent (one engine)."""
    expanded = expand_model(deep_net(), profile=PROFILE, bits=4, order=4, split=(2, 2), act_bits=0)
    g = expanded.model.graph
    ops = [n.op_type for n in g.node]
    assert ops.count("Conv") == (2 + 2) + 4 * (2 + 2 + 2) and ops.count("Gemm") == 2 + 2 + 2
    assert ops.count("Relu") == 2 * 3 and ops.count("Clip") == 2
    assert len([n for n in g.node if n.op_type == "Sum" and n.name.endswith("__ensemble_sum")]) == 1
    diffs = [n for n in g.node if n.name.endswith("_difference")]
    assert len(diffs) == 4 and all(n.op_type == "Sub" for n in diffs)
    by_out = {t: n for n in g.node for t in n.output}
    for sub in diffs:  # σ(a^1 + ε^2) − σ(a^1): the minuend's activation reads predictor 1's pre-activation
        act = by_out[sub.input[0]]
        add = by_out[act.input[0]]
        assert (
            act.op_type in ("Relu", "Clip")
            and add.op_type in ("Add", "Sum")
            and sub.input[1] in {n.output[0] for n in g.node if n.op_type == act.op_type and "__p" not in n.output[0]}
        )
    (total,) = (n for n in g.node if n.name.endswith("__ensemble_sum"))
    p1, p2 = (_ancestors(expanded.model, t) for t in total.input)
    assert {n for n in p1 - p2 if not n.startswith("fc")} == set()  # predictor 2 reads predictor 1 at every layer
    assert {p.key: p.value for p in expanded.model.metadata_props}["rexdeploy.ensemble_form"] == "difference"


@pytest.mark.parametrize("split", [(1, 1), (2, 2)])
def test_difference_w8a8_graph_equals_the_numpy_construction(split: tuple[int, ...]) -> None:
    """Activations int8: predictor 2's own signal (a difference of activations) gets its own, smaller scale; the
    emitted graph against the numpy construction with the graph's activation scales."""
    model = deep_net()
    expanded = expand_model(model, profile=PROFILE, bits=8, order=sum(split), split=split, act_bits=8)
    onnx.checker.check_model(expanded.model, full_check=True)
    want = simulate_difference(model, X.astype(np.float64), 8, split, quant=graph_fake_quant(expanded.model))
    # numpy sums the predictors in float64, the graph in float32: now and then an int8 code of a summed input
    # rounds the other way (one such flip moves the output by ~1e-5; predictor 2 is ~6e-3 of it)
    assert rel(run_exact(expanded.model, X), want) < 5e-5  # type: ignore[arg-type]
    scales = expanded.activation_scales
    assert scales["r3__p2"] < scales["r3"] / 4
    if split != (1, 1):
        return
    fp32 = run_exact(model, X)
    got = run_exact(expanded.model, X)
    k1 = run_exact(expand_model(model, profile=PROFILE, bits=8, order=1, act_bits=8).model, X)
    assert rel(got, fp32) < rel(k1, fp32)


def test_difference_later_predictor_ranges_on_a_batchnorm_model() -> None:
    """With BN statistics the predictors carry bias corrections (predictor 2 its share, no bias of its own): the
    float model whose probes give the activation ranges must use the same biases — with predictor 1's bias copied
    into predictor 2 its ranges came out 1.6-1.9x predictor 1's instead of a fraction of them."""
    model = mobilenet_v2_like()
    expanded = expand_model(model, profile=PROFILE, bits=8, order=2, split=(1, 1), act_bits=8)
    scales = expanded.activation_scales
    later = {t: scales[t] / scales[t.removesuffix("__p2")] for t in scales if t.endswith("__p2")}
    assert later and max(later.values()) < 0.5
    assert any("data-free bias correction" in note for note in expanded.plan.notes)


def graph_fake_quant(model: onnx.ModelProto) -> Callable[[str, Arr], Arr]:
    """Q/DQ of a tensor as the emitted graph declares it (its QuantizeLinear's scale and zero-point type),
    computed in numpy: round half to even, saturate to the int8 (or uint8) range."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    spec = {n.input[0]: (float(inits[n.input[1]]), inits[n.input[2]].dtype) for n in model.graph.node
            if n.op_type == "QuantizeLinear"}  # fmt: skip

    def fq(tensor: str, value: Arr) -> Arr:
        scale, dtype = spec[tensor]
        lo, hi = (0, 255) if dtype == np.uint8 else (-128, 127)
        return np.clip(np.rint(value.astype(np.float32) / np.float32(scale)), lo, hi) * np.float32(scale)

    return fq


@pytest.mark.parametrize("split", [(2, 2), (1, 1)])
def test_eq35_w8a8_graph_equals_the_numpy_construction(split: tuple[int, ...]) -> None:
    """Activations int8 (each predictor with its own ranges): the emitted Q/DQ graph against the numpy
    construction with the graph's activation scales."""
    model = deep_net()
    expanded = expand_form(model, 8, split, act_bits=8)
    onnx.checker.check_model(expanded.model, full_check=True)
    fq = graph_fake_quant(expanded.model)
    want = simulate(model, X.astype(np.float64), 8, split, quant=fq)
    assert rel(run_exact(expanded.model, X), want) < 1e-5  # type: ignore[arg-type]
    # the later predictor has its own, smaller activation ranges
    scales = expanded.activation_scales
    assert scales["r3__p2"] < scales["r3"] / 4


@pytest.mark.parametrize(("form", "later_outside"), [("algorithm1", True), ("eq35", False)])
def test_other_forms_equal_the_numpy_construction(form: str, later_outside: bool) -> None:
    folded, _ = fold_batchnorm(deep_net())
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=4, order=4, split=(2, 2), act_bits=0)
    ensemble = build_ensemble(folded, plan, layers, form=form, later_outside=later_outside)
    emitted = expand(ensemble.model, plan, {}, jobs=ensemble.jobs).model
    onnx.checker.check_model(emitted, full_check=True)
    want = simulate(folded, X.astype(np.float64), 4, (2, 2), form=form, later_outside=later_outside)
    assert rel(run_exact(emitted, X), want) < 2e-6  # type: ignore[arg-type]
    assert rel(run_exact(float_predictors(ensemble, folded), X), want) < 2e-6  # type: ignore[arg-type]


def _ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    producers = {t: n for n in model.graph.node for t in n.output}
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        n = producers.get(stack.pop())
        if n is not None and n.name not in seen:
            seen.add(n.name)
            stack.extend(n.input)
    return seen


def test_eq35_op_structure() -> None:
    expanded = expand_form(deep_net(), 4, (2, 2))
    g = expanded.model.graph
    ops = [n.op_type for n in g.node]
    # c0 (the input layer): 2 orders per predictor; c1, c3, c4: 2 inside + 2 outside each; c2, fc: all 4
    assert ops.count("Conv") == 2 * (2 + 3 * 4 + 4) and ops.count("Gemm") == 2 * 4
    assert ops.count("Sum") == 1 and ops.count("Relu") == 2 * 3 and ops.count("Clip") == 2
    by_out = {t: n for n in g.node for t in n.output}
    readers = {t: [n for n in g.node if t in n.input] for t in {t for n in g.node for t in n.output}}
    for act in (n for n in g.node if n.op_type in ("Relu", "Clip") and not n.input[0].startswith("c0")):
        # σ(inside orders) + outside orders: the activation's output goes to an Add with the outside sum
        (add,) = readers[act.output[0]]
        assert add.op_type == "Add" and add.name.endswith("_out_add")
        outside = add.input[1]
        inside_convs = {n.input[0] for n in g.node if n.op_type == "Conv" and n.name in _ancestors(expanded.model, act.input[0])
                        and by_out.get(n.input[0]) is not None and n.name.split("_order")[0] in act.input[0]}  # fmt: skip
        outside_convs = [n for n in g.node if n.op_type == "Conv" and n.name in _ancestors(expanded.model, outside)]
        assert len(outside_convs) >= 2 and {n.input[0] for n in outside_convs[-2:]} <= inside_convs | {
            n.input[0] for n in outside_convs
        }
    # the predictors share no node: an engine may run them side by side
    (total,) = (n for n in g.node if n.op_type == "Sum")
    p1, p2 = (_ancestors(expanded.model, t) for t in total.input)
    assert p1 and p2 and not p1 & p2
    assert expanded.plan.u_ens is not None and any("form eq35" in note for note in expanded.plan.notes)


def test_later_predictor_carries_signal_through_the_depth() -> None:
    """Algorithm 1's predictor 2 holds only residual weights in every layer: its output shrinks by ~1/7 per
    int4 layer. Eq. 35's predictor 2 applies the full weights to its own input and keeps its signal."""
    model = deep_net()
    x = X.astype(np.float64)
    ratio = {}
    for form in ("eq35", "algorithm1"):
        p1, p2 = simulate(model, x, 4, (2, 2), form=form, parts=True)
        ratio[form] = float(np.linalg.norm(p2) / np.linalg.norm(p1))
    assert ratio["eq35"] > 30 * ratio["algorithm1"]
    # how much of that signal is useful is a property of the network: measured on MobileNetV2 in
    # benchmarks/bench_ensembles.py


def test_one_graph_per_predictor_sums_to_the_ensemble() -> None:
    expanded = expand_form(deep_net(), 4, (2, 1), act_bits=8)
    parts = predictor_models(expanded.model, 2)
    assert len(parts) == 2
    for part in parts:
        onnx.checker.check_model(part, full_check=True)
    assert rel(sum(run_exact(p, X) for p in parts), run_exact(expanded.model, X)) < 1e-6
    folded, _ = fold_batchnorm(small_cnn())
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers[:-1]], bits=4, order=2, split=(1, 1), act_bits=0)
    ensemble = build_ensemble(folded, plan, layers, form="eq35")  # summed before the float Gemm: a tail after it
    with pytest.raises(PlanError, match="tail after the sum"):
        predictor_models(expand(ensemble.model, plan, {}, jobs=ensemble.jobs).model, 2)
    difference = expand_model(deep_net(), profile=PROFILE, bits=4, order=3, split=(2, 1), act_bits=0).model
    with pytest.raises(PlanError, match="cannot cut a difference-form ensemble"):
        predictor_models(difference, 2)


def test_activation_quantized_ensemble_keeps_its_own_ranges() -> None:
    expanded = expand_model(small_cnn(batchnorm=False), profile=PROFILE, bits=4, order=3, split=(2, 1), act_bits=8)
    onnx.checker.check_model(expanded.model, full_check=True)
    scales = expanded.activation_scales
    assert scales["r1__p2"] < scales["r1"] / 4  # predictor 2 starts from the first layer's residual orders
    fp32 = run_exact(small_cnn(batchnorm=False), X[:, :3, :, :].repeat(2, axis=2).repeat(2, axis=3)[:, :, :8, :8])
    got = run_exact(expanded.model, X[:, :3, :, :].repeat(2, axis=2).repeat(2, axis=3)[:, :, :8, :8])
    assert rel(got, fp32) < 0.1


def test_shared_terms_go_to_the_first_predictor_and_bilinear_ops_are_refused() -> None:
    """transformer_block adds the network input x back after two MatMuls (a residual): like a bias, x is
    added in predictor 1 only — the old clone added it in every predictor. Softmax between planned layers
    cannot be split across predictors: refused, naming the node."""
    model = transformer_block()
    x = np.random.default_rng(5).standard_normal((4, 6, 32)).astype(np.float32)
    fp32 = run_exact(model, x)
    k3 = rel(run_exact(expand_model(model, profile=PROFILE, bits=4, order=3, act_bits=0).model, x), fp32)
    ens = expand_form(model, 4, (2, 1)).model
    onnx.checker.check_model(ens, full_check=True)
    assert [n.op_type for n in ens.graph.node if n.name == "residual__p2"] == ["Identity"]
    k2 = rel(run_exact(expand_model(model, profile=PROFILE, bits=4, order=2, act_bits=0).model, x), fp32)
    assert k3 < rel(run_exact(ens, x), fp32) < k2  # Eq. 35: between its dense K and its first predictor alone
    difference = expand_model(model, profile=PROFILE, bits=4, order=3, split=(1, 2), act_bits=0).model
    assert [n.op_type for n in difference.graph.node if n.name == "residual__p2"] == ["Identity"]
    dense3 = run_exact(expand_model(model, profile=PROFILE, bits=4, order=3, act_bits=0).model, x)
    assert rel(run_exact(difference, x), dense3) < 1e-5  # the difference form sums to its dense K (K_2 >= K_1)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), n) for n in ("a", "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"], name="mm1"), helper.make_node("Softmax", ["h"], ["p"], name="sm"),
         helper.make_node("MatMul", ["p", "b"], ["y"], name="mm2")],
        "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits,
    )  # fmt: skip
    softmax = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PlanError, match=r"node 'sm' \(Softmax\) lies between the planned layers"):
        expand_form(softmax, 4, (1, 1))
    # the difference form runs the Softmax as softmax(sum up to m) − softmax(sum before): its dense K, exactly
    xs = rng.standard_normal((2, 8)).astype(np.float32)
    difference = expand_model(softmax, profile=PROFILE, bits=4, order=2, split=(1, 1), act_bits=0).model
    onnx.checker.check_model(difference, full_check=True)
    dense = run_exact(expand_model(softmax, profile=PROFILE, bits=4, order=2, act_bits=0).model, xs)
    assert rel(run_exact(difference, xs), dense) < 1e-6
    assert rel(dense, run_exact(expand_model(softmax, profile=PROFILE, bits=4, order=1, act_bits=0).model, xs)) > 1e-3


def test_difference_form_runs_products_and_nonzero_activations_exactly() -> None:
    """A gate built from two predictor signals (h · sigmoid(h), a Sigmoid with σ(0) ≠ 0) and a max pool between the
    layers: the Eq. 35 form refuses them; the difference form runs them on the sums and equals the dense K."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), n) for n in ("a", "b", "c")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"], name="mm1"), helper.make_node("Sigmoid", ["h"], ["s"], name="sg"),
         helper.make_node("Mul", ["h", "s"], ["g"], name="gate"), helper.make_node("MatMul", ["g", "b"], ["u"], name="mm2"),
         helper.make_node("Unsqueeze", ["u", "ax"], ["u3"], name="unsq"),
         helper.make_node("MaxPool", ["u3"], ["p"], name="pool", kernel_shape=[2]),
         helper.make_node("Squeeze", ["p", "ax"], ["q"], name="sq"), helper.make_node("MatMul", ["q", "c"], ["y"], name="mm3")],
        "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])],
        [*inits[:2], numpy_helper.from_array(rng.normal(0, 0.4, (7, 8)).astype(np.float32), "c"),
         numpy_helper.from_array(np.array([0], np.int64), "ax")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    xs = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(PlanError, match=r"node 'sg' \(Sigmoid\) lies between the planned layers"):
        expand_form(model, 4, (2, 2))
    difference = expand_model(model, profile=PROFILE, bits=4, order=4, split=(2, 2), act_bits=0).model
    onnx.checker.check_model(difference, full_check=True)
    # sigmoid(sum) feeds the product's sum directly: its own difference is read by nobody and dropped
    assert {n.name for n in difference.graph.node if n.name.endswith("_difference")} == {
        "gate__p2_difference", "pool__p2_difference"}  # fmt: skip
    assert [list(n.input) for n in difference.graph.node if n.name == "sg__p2"] == [["h__c2"]]
    dense = run_exact(expand_model(model, profile=PROFILE, bits=4, order=4, act_bits=0).model, xs)
    assert rel(run_exact(difference, xs), dense) < 1e-6
    k2 = run_exact(expand_model(model, profile=PROFILE, bits=4, order=2, act_bits=0).model, xs)
    assert rel(k2, dense) > 1e-3


# --------------------------------------------------------------------------------------------------
# U_ens and Appendix L


def test_appendix_l_check_ranks_splits_and_writes_u_ens_in_the_plan() -> None:
    model = mobilenet_v2_like()
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    names = [layer.name for layer in layers]
    checks = {s: check_ensemble(folded, uniform_plan(names, bits=4, order=4, split=s, act_bits=0), layers, bn_stats,
                                form="eq35") for s in ((3, 1), (2, 2), (1, 3))}  # fmt: skip
    assert checks[(3, 1)].ratio < checks[(2, 2)].ratio < checks[(1, 3)].ratio
    assert checks[(1, 3)].verdict == "invalid" and checks[(3, 1)].verdict == "valid"
    assert checks[(2, 2)].logit_norm is not None and checks[(2, 2)].logit_norm > 0  # the last BN's statistics reach
    # measured: the Eq. 35 estimate ranks as the real gap between the ensemble and its dense K does
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    dense = run_exact(expand_model(model, profile=PROFILE, bits=4, order=4, act_bits=0).model, x)
    gaps = {s: rel(run_exact(expand_form(model, 4, s).model, x), dense) for s in ((3, 1), (2, 2))}
    assert gaps[(3, 1)] < gaps[(2, 2)]
    # the difference form has no Eq. 35 gap: every split sums to the dense K=4 expansion
    for s in ((2, 2), (1, 3)):
        difference = check_ensemble(folded, uniform_plan(names, bits=4, order=4, split=s, act_bits=0), layers,
                                    bn_stats)  # fmt: skip
        assert difference.verdict == "valid" and difference.eq35_ratio == 0.0
        ensemble = expand_model(model, profile=PROFILE, bits=4, order=4, split=s, act_bits=0).model
        assert rel(run_exact(ensemble, x), dense) < 1e-5  # the dense K=4's bias correction (BN means) included
        # predictor 1 alone: the dense K_1 expansion with its own bias correction
        first = onnx.ModelProto()
        first.CopyFrom(ensemble)
        for node in first.graph.node:
            if node.name.endswith("__ensemble_sum"):
                node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        dense_k1 = run_exact(expand_model(model, profile=PROFILE, bits=4, order=s[0], act_bits=0).model, x)
        assert rel(run_exact(first, x), dense_k1) < 1e-5
    expanded = expand_model(model, profile=PROFILE, bits=4, order=4, split=(3, 1), act_bits=0)
    plan = expanded.plan
    assert plan.u_ens == pytest.approx(checks[(3, 1)].u_ens) and plan.logit_norm == pytest.approx(
        checks[(3, 1)].logit_norm
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash
    assert "u_ens" in json.loads(plan.to_json()) and "u_ens" not in json.loads(
        uniform_plan(names, bits=4, order=2).to_json()
    )


def test_invalid_split_is_refused_and_a_doubtful_one_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = mobilenet_v2_like()
    with pytest.raises(PlanError, match=r"ensemble 1,3 \(eq35\): .* -> invalid \(Appendix L.*--ensemble 3,1"):
        expand_form(model, 4, (1, 3))
    folded, bn_stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    names = [layer.name for layer in layers]
    doubtful = [(b, s) for b, s in ((4, (2, 2)), (3, (2, 2)), (5, (1, 1)))
                if check_ensemble(folded, uniform_plan(names, bits=b, order=sum(s), split=s, act_bits=0), layers,
                                  bn_stats, form="eq35").verdict == "doubtful"]  # fmt: skip
    assert doubtful, "no doubtful split on this model: pick another"
    bits, s = doubtful[0]
    with caplog.at_level(logging.WARNING, logger="rexdeploy.planner.ensembles"):
        expand_form(model, bits, s)
    assert any("-> doubtful" in r.message for r in caplog.records)


def test_ensemble_errors() -> None:
    with pytest.raises(PlanError, match=r"not valid for ternary weights: .* K_1 >= 4 orders"):
        expand_form(small_cnn(), 2, (2, 2))
    with pytest.raises(PlanError, match=r"not valid for int3 weights: .* K_1 >= 2 orders"):
        expand_form(small_cnn(), 3, (1, 2))
    folded, _ = fold_batchnorm(small_cnn())
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=4, order=2, split=(1, 1), act_bits=0)
    with pytest.raises(PlanError, match="ensemble form 'x' unknown"):
        build_ensemble(folded, plan, layers, form="x")


def test_single_ternary_predictor_is_valid() -> None:
    folded, _ = fold_batchnorm(small_cnn())
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=2, order=2, act_bits=0)
    assert build_ensemble(folded, plan, layers).predictors == 1


# --------------------------------------------------------------------------------------------------
# the planner's hook


def test_parallel_capacity_and_lanes() -> None:
    assert parallel_capacity(load_profile("x86-avx512")) == 1
    assert parallel_capacity(load_profile("a100")) == 5  # main stream + 4 auxiliary streams
    assert ensemble_latency_ms([3.0, 1.0], 0.5, 2) == pytest.approx(3.5)  # side by side: the slower one
    assert ensemble_latency_ms([3.0, 1.0], 0.5, 1) == pytest.approx(4.5)  # one lane: one after the other
    names = ["a", "b"]
    assert aux_streams_for(uniform_plan(names, bits=8, order=3, split=(2, 1)), load_profile("a100")) == 1
    assert aux_streams_for(uniform_plan(names, bits=8, order=3, split=(1, 1, 1)), load_profile("orin")) == 2
    assert aux_streams_for(uniform_plan(names, bits=8, order=3, split=(1, 1, 1)), load_profile("x86-avx512")) == 0
    assert aux_streams_for(uniform_plan(names, bits=8, order=3), load_profile("a100")) == 0


def test_planner_offers_ensembles_only_with_parallel_capacity() -> None:
    model = mobilenet_v2_like()
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    names = [layer.name for layer in layers]
    dense = uniform_plan(names, bits=8, order=3, act_bits=8)
    uniform = [
        ("uniform W8A8 K=3", dense, 2.0, 0.01),
        ("uniform W8A8 K=1", uniform_plan(names, bits=8, order=1), 1.0, 0.1),
    ]
    assert ensemble_candidates(model, layers, load_profile("x86-avx512"), uniform, 0.2) == []
    offers = ensemble_candidates(model, layers, load_profile("a100"), uniform, 0.2)
    assert offers, "int8 K=3 splits pass Appendix L on this model"
    for label, plan, latency, error in offers:
        assert label.startswith("ensemble ") and plan.predictors == 2 and plan.u_ens is not None
        split = plan.layers[names[0]].split
        # difference form: predictor 2 runs K_2 + min(K_2, K_1) orders per layer, beside predictor 1's K_1
        assert predictor_orders(split) == [split[0], split[1] + min(split)]
        slowest = max(predictor_orders(split))
        assert latency == pytest.approx((2.0 - 0.2) * slowest / 3 + 0.2) and error >= 0.01
        assert plan.predicted_latency_ms == latency and plan.predicted_error == error


def test_plan_model_lists_ensembles_only_on_profiles_with_parallel_capacity() -> None:
    from rexdeploy.planner.search import plan_model

    model = mobilenet_v2_like()
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    labels = {
        p: [c.label for c in plan_model(model, layers, load_profile(p), 1e3).candidates] for p in ("x86-avx512", "a100")
    }
    assert not any(label.startswith("ensemble") for label in labels["x86-avx512"])
    ensembles = [label for label in labels["a100"] if label.startswith("ensemble")]
    assert ensembles and all(" of uniform " in label for label in ensembles)


@pytest.mark.openvino
def test_one_openvino_engine_per_predictor_run_side_by_side_sums_to_the_graph(tmp_path: Path) -> None:
    """The parallel form on a real engine: each predictor compiled on its own (one thread, unpinned), started as
    async requests, the outputs summed by the caller — against the whole graph run exactly by onnxruntime."""
    ov = pytest.importorskip("openvino")
    expanded = expand_form(deep_net(), 4, (2, 2))
    core = ov.Core()
    requests = []
    for i, part in enumerate(predictor_models(expanded.model, 2)):
        path = tmp_path / f"p{i}.onnx"
        onnx.save(part, str(path))
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False}
        requests.append(core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request())
    for r in requests:
        r.start_async({0: X})
    for r in requests:
        r.wait()
    got = sum(np.asarray(r.get_output_tensor(0).data, dtype=np.float64) for r in requests)
    assert rel(got, run_exact(expanded.model, X)) < 1e-5  # type: ignore[arg-type]
