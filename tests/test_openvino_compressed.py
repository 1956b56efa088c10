"""Weight-only REx layers on OpenVINO run compressed (or folded) and stay exact to the ONNX.

The reference is onnxruntime with graph optimizations off on the very ONNX the builder compiled (its
``DequantizeLinear`` weights computed as written). The weight element types are read from the compiled model's
execution graph. Shapes keep the CPU plugin's compressed-weight conditions on every x86 host CI may get (AVX2
and up; input/output channels multiples of 32 and > 32, as its AMX bf16 path wants)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.passes.pipeline import expand_model
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import Parallel, Profile, Quantization

pytestmark = pytest.mark.openvino
ov = pytest.importorskip("openvino")

from rexdeploy_openvino import OpenVINOBuilder, compiled_model  # noqa: E402  (after the importorskip)
from rexdeploy_openvino.compressed import (  # noqa: E402
    compress_weight_only,
    compressed_weight_layers,
    weight_only_groups,
)

HIDDEN, FF = 128, 256
F32 = Profile(name="test-cpu", engine="openvino", device="CPU", parallel=Parallel(cores=1))


def mlp(rows: int) -> onnx.ModelProto:
    """x [1, rows, 128] → MatMul 128×256 + b → Relu → MatMul 256×128 + b (+ x): a transformer MLP."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((HIDDEN, FF)) / np.sqrt(HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(FF) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((FF, HIDDEN)) / np.sqrt(FF)).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
        helper.make_node("Add", ["ob", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_mlp(rows: int) -> onnx.ModelProto:
    """The same MLP as two ``Gemm`` nodes (``transB=1``, bias inside: the expansion puts it on order 1)."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array((rng.standard_normal((FF, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(FF) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, FF)) / np.sqrt(FF)).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weight_only(
    rows: int, bits: int, order: int, profile: Profile = F32, gemm: bool = False, form: str = "branches"
) -> onnx.ModelProto:
    lp = LayerPlan(bits=bits, order=order, act_bits=0, form=form)
    source = gemm_mlp(rows) if gemm else mlp(rows)
    return expand_model(source, Plan(layers={"fc1": lp, "fc2": lp}), profile=profile).model


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convert(model: onnx.ModelProto) -> object:
    return ov.convert_model(io.BytesIO(model.SerializeToString()))


def build(model: onnx.ModelProto, tmp_path: Path, profile: Profile = F32) -> tuple[OpenVINOBuilder, object]:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    builder = OpenVINOBuilder()
    return builder, builder.build(path, profile, tmp_path / "engine")


def ir_forms(tmp_path: Path) -> dict[str, object]:
    """What the builder's rewrite recorded in the saved IR (``rt_info`` ``rexdeploy/weight_only``)."""
    model = ov.Core().read_model(str(tmp_path / "engine" / "model.xml"))
    return json.loads(str(model.get_rt_info(["rexdeploy", "weight_only"]).astype(str)))


@pytest.mark.parametrize(
    ("rows", "bits", "order", "form", "weights", "gemm"),
    [
        (1, 8, 1, "single", "i8", False),
        (1, 8, 2, "grouped", "i8", False),  # few rows, f32: the K orders stay compressed, one kernel
        (1, 4, 2, "grouped", "i4", False),  # int4 orders stored as int4
        (16, 4, 1, "single", "i4", False),
        (16, 8, 2, "folded", "f32", False),  # many rows: one float MatMul on the summed orders
        (1, 8, 2, "grouped", "i8", True),  # Gemm: its bias rides on the first order
        (16, 4, 2, "folded", "f32", True),
    ],
)
def test_weight_only_engine_is_exact_and_compressed(
    tmp_path: Path, rows: int, bits: int, order: int, form: str, weights: str, gemm: bool
) -> None:
    model = weight_only(rows, bits, order, gemm=gemm)
    builder, engine = build(model, tmp_path)
    shape = (rows, HIDDEN) if gemm else (1, rows, HIDDEN)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = builder.run(engine, {"x": x})[0]
    assert rel(out, reference(model, x)) < 1e-5  # f32 arithmetic on the ONNX's own weights
    assert ir_forms(tmp_path)["forms"] == {form: 2}
    kinds = set(compressed_weight_layers(compiled_model(engine)).values())
    assert kinds == {weights}, kinds


@pytest.mark.parametrize(("rows", "form", "weights"), [(1, "grouped", "i8"), (16, "folded", "f32")])
def test_concat_form_is_rewritten_too(tmp_path: Path, rows: int, form: str, weights: str) -> None:
    """``LayerPlan.form = "concat"`` (one MatMul over the stacked orders, Split, Sum) becomes the same kernels."""
    model = weight_only(rows, 8, 2, form="concat")
    assert any(n.op_type == "Split" for n in model.graph.node)
    builder, engine = build(model, tmp_path)
    x = np.random.default_rng(6).standard_normal((1, rows, HIDDEN)).astype(np.float32)
    assert rel(builder.run(engine, {"x": x})[0], reference(model, x)) < 1e-5
    assert ir_forms(tmp_path)["forms"] == {form: 2}
    assert set(compressed_weight_layers(compiled_model(engine)).values()) == {weights}


def test_rewrite_forms_agree_with_the_frontend_form() -> None:
    """Every form of a K=2 W8 layer gives the numbers the untouched (branch) IR gives, in f32."""
    model = weight_only(8, 8, 2)
    core = ov.Core()
    x = np.random.default_rng(2).standard_normal((1, 8, HIDDEN)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    expected = reference(model, x)
    for form in ("branches", "grouped", "folded"):
        ov_model = convert(model)
        summary = compress_weight_only(ov_model, form)
        assert summary.forms == {form: 2}
        out = core.compile_model(ov_model, "CPU", config)({0: x})[0]
        assert rel(out, expected) < 1e-5, form


def test_grouped_form_quantizes_activations_like_the_branches() -> None:
    """With dynamic activation quantization (Plan.dynamic_activations) the grouped kernel rounds the input as the
    K compressed branches do: the same numbers, not the float ones."""
    model = weight_only(4, 8, 2)
    core = ov.Core()
    x = np.random.default_rng(3).standard_normal((1, 4, HIDDEN)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"}
    outs = {}
    for form in ("branches", "grouped"):
        ov_model = convert(model)
        compress_weight_only(ov_model, form)
        compiled = core.compile_model(ov_model, "CPU", config)
        assert set(compressed_weight_layers(compiled).values()) == {"i8"}
        outs[form] = compiled({0: x})[0]
    exact = reference(model, x)
    assert rel(outs["grouped"], outs["branches"]) < 1e-5
    # where the host's kernels quantize the input at all, both engines carry that rounding
    if rel(outs["branches"], exact) > 1e-5:
        assert rel(outs["grouped"], exact) > 1e-5


def test_w8a8_layers_are_left_alone() -> None:
    """Layers with a quantized input are int8 kernels (Low Precision Transformations): no group is taken."""
    lp = LayerPlan(bits=8, order=2, act_bits=8)
    model = expand_model(mlp(4), Plan(layers={"fc1": lp, "fc2": lp}), profile=F32).model
    assert weight_only_groups(convert(model)) == []
    assert len(weight_only_groups(convert(weight_only(4, 8, 2)))) == 2


def _host_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.skipif(not _host_has_bf16(), reason="bf16 engines need AVX-512 BF16 or AMX")
def test_bf16_engine_folds_orders_within_bf16_error(tmp_path: Path) -> None:
    """A bf16 engine rounds decompressed weights to bf16 anyway: K orders become one bf16 MatMul, whose error
    against the ONNX is bf16 rounding, no larger than the branch form's."""
    profile = Profile(
        name="test-cpu-bf16", engine="openvino", device="CPU", parallel=Parallel(cores=1),
        quantization=Quantization(bf16=True),
    )  # fmt: skip
    model = weight_only(16, 8, 2, profile)
    builder, engine = build(model, tmp_path, profile)
    x = np.random.default_rng(4).standard_normal((1, 16, HIDDEN)).astype(np.float32)
    exact = reference(model, x)
    folded = rel(builder.run(engine, {"x": x})[0], exact)
    assert ir_forms(tmp_path)["forms"] == {"folded": 2}
    branches_model = convert(model)
    config = {"INFERENCE_PRECISION_HINT": "bf16", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    branches = rel(ov.Core().compile_model(branches_model, "CPU", config)({0: x})[0], exact)
    assert 1e-5 < folded < 2e-2
    assert folded <= 1.5 * branches
