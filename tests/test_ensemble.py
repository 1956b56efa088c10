"""Ensembles (paper §3.3): M predictors, biases only in predictor 1, outputs summed — checked against
M separate onnxruntime runs of the original graph with each predictor's float weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import small_cnn, transformer_block
from reference import run_exact

from rexdeploy.analyze import ConstantResolver, find_layers
from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.errors import PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.numerics import ensemble_weights, expand_weight
from rexdeploy.plans import uniform_plan
from rexdeploy.profile import load_profile

PROFILE = load_profile("x86-avx512")


def predictor_model(
    model: onnx.ModelProto, m: int, bits: int, split: tuple[int, ...], gamma: float | None
) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = ConstantResolver(model)
    nodes = {n.name: n for n in out.graph.node}
    for layer in find_layers(model):
        w = np.moveaxis(consts.value(layer.weight).astype(np.float64), layer.weight_axis, 0)
        wm = ensemble_weights(expand_weight(w, bits, sum(split), gamma), split, w.shape)[m]
        name = f"{layer.name}_p{m}"
        out.graph.initializer.append(
            onnx.numpy_helper.from_array(np.moveaxis(wm, 0, layer.weight_axis).astype(np.float32), name)
        )
        node = nodes[layer.name]
        node.input[layer.weight_index] = name
        if m > 0 and len(node.input) > 2:
            del node.input[2:]
    return out


@pytest.mark.parametrize(("make", "shape"), [(small_cnn, (6, 3, 8, 8)), (transformer_block, (4, 6, 32))])
@pytest.mark.parametrize(
    ("bits", "split", "gamma"), [(4, (2, 2), None), (4, (1, 1), None), (5, (2, 1, 1), None), (4, (1, 2), 0.5)]
)
def test_weight_only_ensemble_is_the_sum_of_its_predictors(make: object, shape: tuple[int, ...], bits: int,
                                                            split: tuple[int, ...], gamma: float | None) -> None:  # fmt: skip
    model = make()  # type: ignore[operator]
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    expanded = expand_model(model, profile=PROFILE, bits=bits, order=sum(split), split=split, gamma=gamma, act_bits=0)
    onnx.checker.check_model(expanded.model, full_check=True)
    folded, _ = fold_batchnorm(model)
    want = sum(run_exact(predictor_model(folded, m, bits, split, gamma), x) for m in range(len(split)))
    got = run_exact(expanded.model, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6


def test_ensemble_graph_shape() -> None:
    expanded = expand_model(small_cnn(batchnorm=False), profile=PROFILE, bits=4, order=3, split=(2, 1), act_bits=8)
    ops = [n.op_type for n in expanded.model.graph.node]
    assert ops.count("Sum") == 1  # the predictors meet once, at the last layer's output
    assert ops.count("Relu") == 2 * 3 and ops.count("GlobalAveragePool") == 2
    assert ops.count("Conv") == 3 * 3  # 2 orders in predictor 1, 1 in predictor 2
    # predictor 2 has its own activation scales, smaller than predictor 1's (it carries the residual)
    scales = expanded.activation_scales
    assert scales["r1__p2"] < scales["r1"] / 4


def test_ensemble_error_falls_with_first_cluster() -> None:
    model = small_cnn()
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    fp32 = run_exact(model, x)

    def err(**kw: object) -> float:
        out = run_exact(expand_model(model, profile=PROFILE, bits=4, act_bits=0, **kw).model, x)  # type: ignore[arg-type]
        return float(np.linalg.norm(out - fp32) / np.linalg.norm(fp32))

    k1, k4 = err(order=1), err(order=4)
    ens13, ens22, ens31 = err(order=4, split=(1, 3)), err(order=4, split=(2, 2)), err(order=4, split=(3, 1))
    # the ensemble is an approximation of the K = 4 expansion that improves as predictor 1 grows (§3.3)
    assert k4 < ens31 < ens22 < ens13
    assert ens22 < k1 / 5


def test_ensemble_errors() -> None:
    with pytest.raises(PlanError, match=r"not valid for ternary weights: .* K_1 >= 4 orders"):
        expand_model(small_cnn(), profile=PROFILE, bits=2, order=4, split=(2, 2))
    with pytest.raises(PlanError, match=r"not valid for int3 weights: .* K_1 >= 2 orders"):
        expand_model(small_cnn(), profile=PROFILE, bits=3, order=3, split=(1, 2))


def test_single_ternary_predictor_is_valid() -> None:
    from rexdeploy.passes.ensemble import build_ensemble

    folded, _ = fold_batchnorm(small_cnn())
    layers = quantizable_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=2, order=2, act_bits=0)
    assert build_ensemble(folded, plan, layers).predictors == 1
