"""Joins between int8 layers read Q/DQ'd inputs (rexdeploy.passes.residual): residual Adds and a classifier's
average pool. Pattern checks on inline graphs, numbers against the numpy reference, and the op sequence around
each join."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from models import mobilenet_v2_like, small_cnn
from onnx import TensorProto, helper, numpy_helper
from reference import (
    activation_scales,
    bias_correction_means,
    fold_batchnorm_reference,
    layer_input_ranges,
    rel_error,
    rex_weight_map,
    run_exact,
    run_reference,
)

from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.residual import quantized_joins
from rexdeploy.plans import LayerPlan, uniform_plan
from rexdeploy.probing import node_owners
from rexdeploy.profile import load_profile

PROFILE = load_profile("x86-avx512")  # OpenVINO: unsigned activations where the graph says ≥ 0


def _block(relu_after_add: bool = False, const_add: bool = False, fan_out: bool = False) -> onnx.ModelProto:
    """x → c1 (Conv) → r1 (Relu) → c2 (Conv, the block's last layer) → Add(r1, c2) [→ Relu] → c3 (Conv) → y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), f"w{i}") for i in (1, 2, 3)]
    inits.append(numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "one"))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["one" if const_add else "r1", "c2"], ["s"], name="add"),
    ]
    after = "s"
    if relu_after_add:
        nodes.append(helper.make_node("Relu", ["s"], ["rs"], name="relu_s"))
        after = "rs"
    nodes.append(helper.make_node("Conv", [after, "w3"], ["y"], name="conv3"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])]
    if fan_out:
        outputs.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 4, 5, 5]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              outputs, inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


ALL_INT8 = ({"x", "r1", "s"}, {"c1", "c2", "y"})


def test_add_between_int8_layers_is_found() -> None:
    assert quantized_joins(_block(), *ALL_INT8) == {"add": ("r1", "c2")}


def test_add_then_relu_into_an_int8_layer_is_found() -> None:
    assert quantized_joins(_block(relu_after_add=True), {"x", "r1", "rs"}, ALL_INT8[1]) == {"add": ("r1", "c2")}


@pytest.mark.parametrize(("why", "model", "int8_inputs", "int8_outputs"), [
    ("the block's last layer is float", _block(), {"x", "r1", "s"}, {"c1", "y"}),
    ("the skip branch is not quantized for an int8 layer", _block(), {"x", "s"}, {"c1", "c2", "y"}),
    ("the Add's output feeds a float layer", _block(), {"x", "r1"}, {"c1", "c2"}),
    ("one input is a constant", _block(const_add=True), *ALL_INT8),
    ("the last layer's output is also a model output", _block(fan_out=True), *ALL_INT8),
])  # fmt: skip
def test_add_left_alone(why: str, model: onnx.ModelProto, int8_inputs: set[str], int8_outputs: set[str]) -> None:
    assert quantized_joins(model, int8_inputs, int8_outputs) == {}, why


@pytest.fixture(scope="module")
def residual_net() -> onnx.ModelProto:
    return mobilenet_v2_like()


def test_w8a8_residual_net_matches_reference_with_quantized_joins(residual_net: onnx.ModelProto) -> None:
    """The graph computes the reference's simulation in which both inputs of each residual Add are fake-quantized
    (the skip branch with the scale its int8 reader uses, uint8 where it is a ReLU6 output), and the head's pool
    input too — to float32 rounding."""
    probe = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    folded = fold_batchnorm_reference(residual_net)
    ranges = layer_input_ranges(folded, probe, joins=True)
    # a head channel saturates the ReLU6 at every position of one probe, so max |flat| is 6.0, the pool input's
    # range: the two scales are equal and the pooled codes (quarter steps: 2×2 positions) fall exactly on
    # rounding ties of flat's quantizer, which float32 (the graph) and float64 (here) break differently
    ranges["flat"] *= 1.01
    expanded = expand_model(residual_net, profile=PROFILE, ranges=ranges, bits=8, order=1, act_bits=8)
    onnx.checker.check_model(expanded.model, full_check=True)
    adds = [n for n in folded.graph.node if n.op_type == "Add"]
    assert len(adds) == 3
    add_inputs = {t for n in adds for t in n.input}
    pool = next(n for n in folded.graph.node if n.op_type == "GlobalAveragePool")
    assert add_inputs | {pool.input[0]} <= set(expanded.activation_scales)
    nonnegative = {t for t in ranges if (t[0] == "r" and t[1:].isdigit()) or t == "flat"}  # Clip(0, 6) outputs, pooled
    assert nonnegative & add_inputs  # the first block's skip is the stem's ReLU6 output: uint8
    scales = activation_scales(
        {t: r for t, r in ranges.items() if t in expanded.activation_scales}, unsigned=nonnegative
    )
    want = run_reference(folded, {"x": probe}, weight_map=rex_weight_map(8, 1), act_scales=scales, unsigned=nonnegative,
                         input_means=bias_correction_means(residual_net))[0]  # fmt: skip
    got = run_exact(expanded.model, probe)
    assert rel_error(got, want) < 1e-5
    assert expanded.activation_scales == pytest.approx(scales, rel=1e-12)
    # the block outputs' quantization before the Adds is part of the error: without it the reference is elsewhere
    plain = run_reference(folded, {"x": probe}, weight_map=rex_weight_map(8, 1), unsigned=nonnegative,
                          act_scales={t: s for t, s in scales.items() if t not in {n.input[1] for n in adds}},
                          input_means=bias_correction_means(residual_net))[0]  # fmt: skip
    assert rel_error(got, plain) > 1e-4


def _add_readers(model: onnx.ModelProto) -> list[list[str]]:
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [[producer[t] for t in n.input] for n in model.graph.node if n.name.startswith("add")]


def test_op_sequence_each_residual_add_reads_dequantized_inputs(residual_net: onnx.ModelProto) -> None:
    expanded = expand_model(residual_net, profile=PROFILE, bits=8, order=1, act_bits=8)
    assert _add_readers(expanded.model) == [["DequantizeLinear", "DequantizeLinear"]] * 3


def test_add_after_a_float_layer_keeps_float_inputs(residual_net: onnx.ModelProto) -> None:
    """A per-layer plan that leaves a block's last conv in float: that block's Add stays float (no fused kernel to
    gain, only error); the other blocks' Adds are still quantized."""
    folded, _ = fold_batchnorm(residual_net)
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    producer = {o: n.name for n in folded.graph.node for o in n.output}
    last_conv = producer[add.input[1]]
    base = uniform_plan([n.name for n in folded.graph.node if n.op_type in ("Conv", "Gemm")], bits=8, order=1, act_bits=8,
                        profile=PROFILE.name)  # fmt: skip
    layers = {k: v for k, v in base.layers.items() if k != last_conv}
    layers[last_conv] = LayerPlan(bits=8, order=1, act_bits=0)
    expanded = expand_model(residual_net, replace(base, layers=layers), profile=PROFILE)
    readers = _add_readers(expanded.model)
    assert readers[1:] == [["DequantizeLinear", "DequantizeLinear"]] * 2
    assert "DequantizeLinear" not in readers[0] and readers[0][1] == "Conv"


# --------------------------------------------------------------------------------------------------
# a classifier's pooled head: the average pool between the last int8 conv and the int8 Gemm


def _head(relu: bool = True, squeeze: bool = False, input_fan_out: bool = False,
          output_fan_out: bool = False) -> onnx.ModelProto:  # fmt: skip
    """x → conv1 (Conv) → c1 [→ relu1 → r1] → gap (GlobalAveragePool) → flatten (Flatten; or Squeeze of the
    spatial axes) → flat → fc (Gemm) → y; ``input_fan_out``: the pool's input is also read by an Identity (a
    second model output); ``output_fan_out``: ``flat`` is also a model output."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]  # fmt: skip
    pooled = "r1" if relu else "c1"
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1")]
    if relu:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("GlobalAveragePool", [pooled], ["g"], name="gap"))
    if squeeze:
        nodes.append(helper.make_node("Squeeze", ["g", "axes"], ["flat"], name="squeeze"))
    else:
        nodes.append(helper.make_node("Flatten", ["g"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc", transB=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    if input_fan_out:
        nodes.append(helper.make_node("Identity", [pooled], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 5, 5]))
    if output_fan_out:
        outputs.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 4]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              outputs, inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


HEAD_INT8 = ({"x", "flat"}, {"c1", "y"})


@pytest.mark.parametrize(("model", "pooled"), [(_head(), "r1"), (_head(relu=False), "c1"), (_head(squeeze=True), "r1")])
def test_pool_between_int8_layers_is_found(model: onnx.ModelProto, pooled: str) -> None:
    assert quantized_joins(model, *HEAD_INT8) == {"gap": (pooled,)}


@pytest.mark.parametrize(("why", "model", "int8_inputs", "int8_outputs"), [
    ("the pool's input is read by two nodes", _head(input_fan_out=True), *HEAD_INT8),
    ("the pool's output goes to a float layer", _head(), {"x"}, {"c1", "y"}),
    ("the pool's input comes from a float layer", _head(), {"x", "flat"}, {"y"}),
    ("the pool's input comes from a float layer (no Relu between)", _head(relu=False), {"x", "flat"}, {"y"}),
    ("the flattened pool output is also a model output", _head(output_fan_out=True), *HEAD_INT8),
])  # fmt: skip
def test_pool_left_alone(why: str, model: onnx.ModelProto, int8_inputs: set[str], int8_outputs: set[str]) -> None:
    assert quantized_joins(model, int8_inputs, int8_outputs) == {}, why


def _zero_points(model: onnx.ModelProto) -> dict[str, int]:
    """The zero-point element type of each QuantizeLinear, by the tensor it quantizes (one Q per tensor)."""
    inits = {i.name: i for i in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len({n.input[0] for n in qs}) == len(qs), "a tensor quantized twice"
    return {n.input[0]: inits[n.input[2]].data_type for n in qs}


@pytest.mark.parametrize(("profile", "zero_point"), [("x86-avx512", TensorProto.UINT8), ("h100", TensorProto.INT8)])
def test_op_sequence_the_head_pools_a_dequantized_input(profile: str, zero_point: int) -> None:
    """small_cnn's head: ReLU → Q → DQ → GlobalAveragePool → Flatten → Q → DQ → Gemm; the pool's Q/DQ is its own
    (its input has no other reader), uint8 where the engine runs uint8 (the ReLU output is ≥ 0), and is charged
    to fc (the layer it is there for) by the cost table's node ownership."""
    model = small_cnn(batchnorm=False)
    expanded = expand_model(model, profile=load_profile(profile), bits=8, order=1, act_bits=8).model
    onnx.checker.check_model(expanded, full_check=True)
    producer = {o: n for n in expanded.graph.node for o in n.output}
    chain, tensor = [], "y"
    while tensor in producer and len(chain) < 8:
        node = producer[tensor]
        chain.append(node.op_type)
        tensor = node.input[0]
    assert chain[::-1] == ["Relu", "QuantizeLinear", "DequantizeLinear", "GlobalAveragePool", "Flatten",
                           "QuantizeLinear", "DequantizeLinear", "Gemm"]  # fmt: skip
    zps = _zero_points(expanded)
    assert zps["r3"] == zps["flat"] == zero_point
    assert sum("r3" in n.input for n in expanded.graph.node) == 1  # the Q/DQ reads r3; the pool reads the DQ
    layers = quantizable_layers(fold_batchnorm(model)[0])
    owners = node_owners(expanded, layers)
    pool_qdq = [n.name for n in expanded.graph.node if n.op_type.endswith("Linear") and n.input[0] in ("r3", "r3_q")]
    assert len(pool_qdq) == 2 and {owners.get(n) for n in pool_qdq} == {"fc"}


@pytest.mark.parametrize("float_layer", ["pwconv", "fc"])
def test_pool_next_to_a_float_layer_keeps_a_float_input(float_layer: str) -> None:
    """A per-layer plan that leaves the last conv (the pool's input comes from a float layer) or the Gemm (the
    pool's output goes to a float layer) in float: no Q/DQ on the pool's input."""
    model = small_cnn()
    names = ["conv1", "dwconv", "pwconv", "fc"]
    base = uniform_plan(names, bits=8, order=1, act_bits=8, profile=PROFILE.name)
    layers = {**base.layers, float_layer: LayerPlan(bits=8, order=1, act_bits=0)}
    expanded = expand_model(model, replace(base, layers=layers), profile=PROFILE).model
    assert "r3" not in _zero_points(expanded)
    assert next(n for n in expanded.graph.node if n.op_type == "GlobalAveragePool").input[0] == "r3"


def test_w8a8_pooled_head_matches_reference(probe: np.ndarray) -> None:
    """onnxruntime (graph optimizations off) computes the reference's simulation in which the pool's input is
    fake-quantized (uint8: a ReLU output) with the scale of its range — to float32 rounding; the reference that
    leaves the pool's input in float is far off (the test sees the pool's Q/DQ)."""
    model = small_cnn()
    folded = fold_batchnorm_reference(model)
    ranges = layer_input_ranges(folded, probe, joins=True)
    assert set(ranges) == {"x", "r1", "r2", "r3", "flat"}
    expanded = expand_model(model, profile=PROFILE, ranges=ranges, bits=8, order=1, act_bits=8)
    onnx.checker.check_model(expanded.model, full_check=True)
    unsigned = {"r1", "r2", "r3", "flat"}  # ReLU outputs and the pooled ReLU output
    scales = activation_scales(ranges, unsigned=unsigned)
    assert expanded.activation_scales == pytest.approx(scales, rel=1e-12)
    means = bias_correction_means(model)
    got = run_exact(expanded.model, probe)
    want = run_reference(folded, {"x": probe}, weight_map=rex_weight_map(8, 1), act_scales=scales, unsigned=unsigned,
                         input_means=means)[0]  # fmt: skip
    plain = run_reference(folded, {"x": probe}, weight_map=rex_weight_map(8, 1), unsigned=unsigned, input_means=means,
                          act_scales={t: s for t, s in scales.items() if t != "r3"})[0]  # fmt: skip
    assert rel_error(got, want) < 1e-5
    assert rel_error(got, plain) > 100 * rel_error(got, want)
