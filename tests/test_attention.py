"""Attention between int8 layers (rexdeploy.passes.attention): the activation × activation MatMuls' inputs are
quantized where they are made — after the query / key / value projections' bias Add and after the Softmax — found
through Reshape / Transpose / the 1/√d scale, left alone where a source is float or read elsewhere too; the emitted
graph checked op by op and against a numpy reference written from the definitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import fake_quant_int8, fake_quant_uint8, rel_error, rex_orders

from rexdeploy.api import default_plan, expand_model, quantizable_layers
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.attention import attention_sources
from rexdeploy.profile import load_profile

S, H, HEADS = 8, 16, 2
D = H // HEADS


def attention_block(seed: int = 0, v_read_elsewhere: bool = False) -> onnx.ModelProto:
    """x(1, S, H) → q / k / v projections (MatMul + bias Add; q and k share one bias through Identity nodes, as torch
    exports equal initializers) → heads (Reshape, Transpose) → softmax(q·kᵀ · 1/√d) · v → merge → output
    projection. ``v_read_elsewhere``: the value projection's output is also a model output."""
    rng = np.random.default_rng(seed)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    inits = [init(f"w{p}", rng.normal(0, 0.3, (H, H)).astype(np.float32)) for p in "qkvo"]
    inits += [init("b_shared", rng.normal(0, 0.1, H).astype(np.float32)), init("bv", rng.normal(0, 0.1, H).astype(np.float32)),
              init("heads", np.array([1, S, HEADS, D], np.int64)), init("merged", np.array([1, S, H], np.int64)),
              init("inv_sqrt_d", np.array(1.0 / np.sqrt(D), np.float32))]  # fmt: skip
    nodes = [helper.make_node("Identity", ["b_shared"], ["bq"], name="id_q"),
             helper.make_node("Identity", ["b_shared"], ["bk"], name="id_k")]  # fmt: skip
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}_mm"], name=f"mm_{p}"),
                  helper.make_node("Add", [f"{p}_mm", f"b{p}"], [f"{p}_proj"], name=f"add_{p}"),
                  helper.make_node("Reshape", [f"{p}_proj", "heads"], [f"{p}_4d"], name=f"reshape_{p}")]  # fmt: skip
    nodes += [
        helper.make_node("Transpose", ["q_4d"], ["q_h"], name="t_q", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_4d"], ["k_t"], name="t_k", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_4d"], ["v_h"], name="t_v", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_h", "k_t"], ["scores"], name="scores"),
        helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v_h"], ["ctx"], name="context"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="t_ctx", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merged"], ["ctx_m"], name="merge"),
        helper.make_node("MatMul", ["ctx_m", "wo"], ["y"], name="mm_o"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, H])]
    if v_read_elsewhere:
        outputs.append(helper.make_tensor_value_info("v_proj", TensorProto.FLOAT, [1, S, H]))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, H])],
                              outputs, inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _int8_outputs(model: onnx.ModelProto, float_layers: tuple[str, ...] = ()) -> dict[str, str]:
    layers = quantizable_layers(fold_batchnorm(model)[0])
    return {layer.output: layer.name for layer in layers if layer.name not in float_layers}


def test_the_sources_are_the_projections_after_their_bias_and_the_softmax() -> None:
    model = attention_block()
    assert {layer.name for layer in quantizable_layers(model)} == {"mm_q", "mm_k", "mm_v", "mm_o"}
    assert attention_sources(model, _int8_outputs(model)) == {"q_proj": "mm_q", "k_proj": "mm_k", "v_proj": "mm_v",
                                                              "p": ""}  # fmt: skip


def test_a_float_or_shared_source_leaves_its_matmul_alone() -> None:
    model = attention_block()
    # the query projection float: the scores MatMul stays float; the context MatMul (softmax · int8 value) does not
    assert attention_sources(model, _int8_outputs(model, ("mm_q",))) == {"p": "", "v_proj": "mm_v"}
    # both of the context MatMul's sources float: only the scores MatMul
    assert attention_sources(model, _int8_outputs(model, ("mm_v",))) == {"q_proj": "mm_q", "k_proj": "mm_k"}
    # the value projection is read elsewhere too (a model output): quantizing it there would change that output
    shared = attention_block(v_read_elsewhere=True)
    assert attention_sources(shared, _int8_outputs(shared)) == {"q_proj": "mm_q", "k_proj": "mm_k"}
    # no int8 layer at all: nothing (a Softmax alone is no reason)
    assert attention_sources(model, {}) == {}


@pytest.mark.parametrize("profile_name, softmax_type", [("x86-avx512", TensorProto.UINT8), ("h100", TensorProto.INT8)])
def test_expand_quantizes_each_source_once_where_it_is_made(profile_name: str, softmax_type: int) -> None:
    model = attention_block()
    profile = load_profile(profile_name)
    layers = quantizable_layers(model)
    out = expand_model(model, default_plan(layers, profile, bits=8, order=1, act_bits=8), profile=profile).model
    onnx.checker.check_model(out, full_check=True)
    nodes = list(out.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    for source, reader in (("q_proj", "reshape_q"), ("k_proj", "reshape_k"), ("v_proj", "reshape_v"), ("p", "context")):
        made = next(i for i, n in enumerate(nodes) if source in n.output)
        q, dq = nodes[made + 1], nodes[made + 2]  # right after the node that makes it
        assert (q.op_type, q.input[0], dq.op_type, dq.input[0]) == ("QuantizeLinear", source, "DequantizeLinear", q.output[0])
        readers = [n for n in nodes if source in n.input]
        assert readers == [q]  # only its Q/DQ reads it: every reader now reads the DQ
        assert dq.output[0] in next(n for n in nodes if n.name == reader).input
        zero_point = onnx.helper.np_dtype_to_tensor_dtype(inits[q.input[2]].dtype)
        assert zero_point == (softmax_type if source == "p" else TensorProto.INT8)
    # owners: each projection's Q/DQ is named after its layer (the cost table charges it there)
    assert next(n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == "q_proj").name.startswith("mm_q_")
    # the scores / context MatMuls themselves are not expanded: no weight, no orders
    assert sum(n.op_type == "MatMul" for n in nodes) == 6


def test_the_expanded_block_computes_the_fake_quantized_attention() -> None:
    """onnxruntime (graph optimizations off) on the expanded block against numpy, written from the definitions:
    per-channel int8 weights (one order), int8 activations at the expansion's scales, uint8 for the Softmax."""
    model = attention_block(seed=3)
    profile = load_profile("x86-avx512")
    layers = quantizable_layers(model)
    expanded = expand_model(model, default_plan(layers, profile, bits=8, order=1, act_bits=8), profile=profile)
    scales = expanded.activation_scales
    assert {"x", "q_proj", "k_proj", "v_proj", "p", "ctx_m"} <= set(scales)
    x = np.random.default_rng(7).normal(0, 1, (1, S, H)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(expanded.model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]  # fmt: skip

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    wq = {p: rex_orders(w[f"w{p}"].T, 8, 1)[0].T for p in "qkvo"}  # per output channel: axis 0 of Wᵀ
    bias = {"q": w["b_shared"], "k": w["b_shared"], "v": w["bv"]}

    def reference(sources_quantized: bool) -> np.ndarray:
        def fq(v: np.ndarray, tensor: str, unsigned: bool = False) -> np.ndarray:
            if not sources_quantized:
                return v
            return (fake_quant_uint8 if unsigned else fake_quant_int8)(v, scales[tensor]).astype(np.float64)

        xq = fake_quant_int8(x, scales["x"]).astype(np.float64)
        proj = {p: fq(xq @ wq[p] + bias[p], f"{p}_proj") for p in "qkv"}
        heads = {p: proj[p].reshape(1, S, HEADS, D).transpose(0, 2, 1, 3) for p in "qkv"}
        scores = heads["q"] @ heads["k"].transpose(0, 1, 3, 2) / np.sqrt(D)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probabilities = fq(e / e.sum(axis=-1, keepdims=True), "p", unsigned=True)
        ctx = (probabilities @ heads["v"]).transpose(0, 2, 1, 3).reshape(1, S, H)
        return np.asarray(fake_quant_int8(ctx, scales["ctx_m"]), dtype=np.float64) @ wq["o"]

    error = rel_error(got, reference(sources_quantized=True))
    assert error < 1e-5
    assert rel_error(got, reference(sources_quantized=False)) > 100 * max(error, 1e-7)  # the Q/DQ are there


@pytest.mark.openvino
def test_openvino_compiles_and_runs_the_quantized_attention(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin takes the int8 / uint8 inputs of the activation × activation MatMuls (its rule against
    a uint8 input holds for MatMul *layers*: rexdeploy.actorders.emits_unsigned) and agrees with onnxruntime."""
    pytest.importorskip("openvino")
    from rexdeploy_openvino import OpenVINOBuilder

    from rexdeploy.hostcpu import host_profile_name

    host = load_profile(host_profile_name())  # this CPU's rules (7-bit weights on AVX2-only hosts)
    profile = host.with_float_precision("fp32") or host  # float parts f32: the comparison is not bf16's rounding
    model = attention_block(seed=5)
    expanded = expand_model(model, default_plan(quantizable_layers(model), profile, bits=8, order=1, act_bits=8),
                            profile=profile)  # fmt: skip
    path = tmp_path / "attention.onnx"
    onnx.save(expanded.model, str(path))
    builder = OpenVINOBuilder()
    engine = builder.build(path, profile, tmp_path / "engine")
    x = np.random.default_rng(11).normal(0, 1, (1, S, H)).astype(np.float32)
    got = builder.run(engine, {"x": x})[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(expanded.model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]  # fmt: skip
    assert rel_error(got, want) < 5e-3  # 1e-7 on AVX-512 VNNI + BF16: integer kernels may round their own way
