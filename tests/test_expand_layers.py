"""Sparse orders and every layer kind (MatMul either side, Constant / Transpose weights, shared weights,
ConvTranspose), weight-only, against onnxruntime running the original graph with the REx weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import deconv_model, small_cnn, transformer_block
from reference import bias_correction_means, run_exact

from rexdeploy.analyze import ConstantResolver, find_layers
from rexdeploy.api import expand_model
from rexdeploy.graph import fold_batchnorm
from rexdeploy.numerics import expand_weight, reconstruct
from rexdeploy.plans import uniform_plan
from rexdeploy.profile import load_profile

PROFILE = load_profile("x86-avx512")


def with_rex_weights(
    model: onnx.ModelProto,
    bits: int,
    order: int,
    gammas: dict[str, float | None],
    means: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The original graph, each layer's weight input rewired to its float REx reconstruction
    (``gammas``: each layer's sparse budget, as the plan split it). ``means``: per-channel means of layer inputs;
    a Conv / Gemm reading one gets the bias correction ``b + Σ_{c,k} (W − Ŵ)[o,c,k]·mean_c``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = ConstantResolver(model)
    nodes = {n.name: n for n in out.graph.node}
    for layer in find_layers(model):
        w = consts.value(layer.weight).astype(np.float64)
        w_major = np.moveaxis(w, layer.weight_axis, 0)
        rec = reconstruct(expand_weight(w_major, bits, order, gammas[layer.name]), w_major.shape)
        name = f"{layer.name}_rex_weight"
        out.graph.initializer.append(
            onnx.numpy_helper.from_array(np.moveaxis(rec, 0, layer.weight_axis).astype(np.float32), name)
        )
        node = nodes[layer.name]
        node.input[layer.weight_index] = name
        if means is not None and layer.input in means and layer.op_type in ("Conv", "Gemm"):
            delta = (w_major - rec).reshape(w_major.shape[0], w_major.shape[1], -1).sum(axis=2)  # (O, I / group)
            mean = means[layer.input].reshape(layer.group, 1, -1)
            shift = (delta.reshape(layer.group, -1, delta.shape[1]) * mean).sum(axis=2).reshape(-1)
            bias = consts.value(layer.bias).astype(np.float64) if layer.bias else np.zeros(shift.size)
            out.graph.initializer.append(
                onnx.numpy_helper.from_array((bias + shift).astype(np.float32), f"{layer.name}_corrected_bias")
            )
            del node.input[2:]
            node.input.append(f"{layer.name}_corrected_bias")
    return out


CASES = [
    ("cnn", small_cnn, (12, 3, 8, 8)),
    ("transformer", transformer_block, (5, 6, 32)),
    ("deconv", deconv_model, (3, 4, 5, 5)),
]


@pytest.mark.parametrize(("kind", "make", "shape"), CASES)
@pytest.mark.parametrize(("bits", "order", "gamma", "form"), [
    (4, 2, None, "branches"),
    (4, 3, 0.5, "branches"),
    (4, 4, 1.0, "branches"),
    (3, 3, 0.5, "concat"),
    (8, 2, 0.25, "branches"),
])  # fmt: skip
def test_weight_only_expansion_equals_rex_weights(kind: str, make: object, shape: tuple[int, ...], bits: int,
                                                   order: int, gamma: float | None, form: str) -> None:  # fmt: skip
    model = make()  # type: ignore[operator]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    expanded = expand_model(model, profile=PROFILE, bits=bits, order=order, gamma=gamma, act_bits=0, form=form)
    onnx.checker.check_model(expanded.model, full_check=True)
    folded, _ = fold_batchnorm(model)
    gammas = {name: lp.gamma for name, lp in expanded.plan.layers.items()}
    if gamma is not None and len(gammas) > 1:  # the flag's budget is split linear+ over the layers (Eq. 30)
        assert len(set(gammas.values())) > 1
    got, want, fp32 = (
        run_exact(expanded.model, x),
        run_exact(with_rex_weights(folded, bits, order, gammas, bias_correction_means(model)), x),
        run_exact(model, x),
    )
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) > 1e-5  # it did quantize


def test_layer_discovery_of_every_kind() -> None:
    layers = {layer.name: layer for layer in find_layers(transformer_block())}
    assert set(layers) == {"mm_q", "mm_2", "mm_left", "mm_shared"}
    assert layers["mm_left"].weight_index == 0 and layers["mm_left"].out_axis == -2
    assert layers["mm_2"].weight == "w2"  # the Transpose output, folded from the Constant
    assert layers["mm_q"].weight == layers["mm_shared"].weight == "wq"  # shared
    deconv = find_layers(deconv_model())[0]
    assert (deconv.op_type, deconv.weight_axis, deconv.weight_shape) == ("ConvTranspose", 1, (6, 4, 3, 3))


def test_sparse_order_costs_scale_with_gamma() -> None:
    """The sparse orders are narrow layers: their weights hold gamma/(K-1) of the channels."""
    model = small_cnn(batchnorm=False)
    plan = uniform_plan(["conv1", "dwconv", "pwconv", "fc"], bits=4, order=3, gamma=0.5, act_bits=8)  # no linear+
    expanded = expand_model(model, plan)
    inits = {i.name: i for i in expanded.model.graph.initializer}
    assert list(inits["pwconv_w1_int8"].dims) == [16, 8, 1, 1]
    assert list(inits["pwconv_w2_int8"].dims) == [4, 8, 1, 1]  # 25 % of 16 channels per sparse order
    assert list(inits["pwconv_w3_int8"].dims) == [4, 8, 1, 1]
    ops = [n.op_type for n in expanded.model.graph.node]
    assert ops.count("Pad") == ops.count("Gather") - 2  # + the depthwise input gathers (2 orders)
    assert "Transpose" not in ops


def test_dead_weight_chain_is_removed() -> None:
    expanded = expand_model(transformer_block(), profile=PROFILE, bits=8, order=2, act_bits=8)
    ops = [n.op_type for n in expanded.model.graph.node]
    assert "Transpose" not in ops and "Constant" not in ops
    assert ops.count("MatMul") == 8


@pytest.mark.parametrize("order", [1, 2, 3])
def test_int4_blocked_weights(order: int) -> None:
    """int4 weight-only with per-(channel, block) scales on Gemm/MatMul: opset 21 blocked DequantizeLinear."""
    model = transformer_block(hidden=64)
    x = np.random.default_rng(4).standard_normal((3, 6, 64)).astype(np.float32)
    expanded = expand_model(model, profile=load_profile("h100"), block=64, order=order)
    onnx.checker.check_model(expanded.model, full_check=True)
    plan = expanded.plan.layers
    assert plan["mm_q"].block == 64 and plan["mm_left"].block == 0  # 6 inputs: not divisible, per-channel
    assert all(lp.bits == 4 and lp.act_bits == 0 for lp in plan.values())
    int4 = [i for i in expanded.model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 3 * order  # mm_q, mm_2, mm_shared (wq expanded once per node)
    dqs = [n for n in expanded.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int4")]
    assert {onnx.helper.get_attribute_value(a) for n in dqs for a in n.attribute if a.name == "block_size"} == {64}
    # reference: numpy per-block quantization of the out-major weight, rows = blocks
    consts = ConstantResolver(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    for layer in find_layers(model):
        w = np.moveaxis(consts.value(layer.weight).astype(np.float64), layer.weight_axis, 0)
        rows = w.reshape(-1, 64) if plan[layer.name].block else w
        rec = reconstruct(expand_weight(rows, 4, order), rows.shape).reshape(w.shape)
        name = f"{layer.name}_ref"
        out.graph.initializer.append(
            onnx.numpy_helper.from_array(np.moveaxis(rec, 0, layer.weight_axis).astype(np.float32), name)
        )
        nodes[layer.name].input[layer.weight_index] = name
    got, want = run_exact(expanded.model, x), run_exact(out, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6


def test_int4_blocks_need_a_profile_that_has_them() -> None:
    from rexdeploy.errors import PlanError

    with pytest.raises(PlanError, match="no int4 weight-only kernels"):
        expand_model(transformer_block(hidden=64), profile=load_profile("x86-avx512"), block=64)
    with pytest.raises(PlanError, match="block size 32 is not one profile 'h100' supports"):
        expand_model(transformer_block(hidden=64), profile=load_profile("h100"), block=32)
