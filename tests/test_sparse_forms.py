"""The sparse emission forms compute the same numbers: ``onehot`` and ``dense`` against ``gather``
(onnxruntime with graph optimizations off), on every layer kind, with their op sequences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import deconv_model, small_cnn, transformer_block

from rexdeploy.analyze import find_layers
from rexdeploy.errors import PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.expand import SPARSE_FORMS, expand
from rexdeploy.plans import LayerPlan, Plan, uniform_plan
from rexdeploy.ranges import probe_ranges


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _plan(model: onnx.ModelProto, bits: int, order: int, gamma: float, act_bits: int) -> Plan:
    return uniform_plan([layer.name for layer in find_layers(model)], bits=bits, order=order, gamma=gamma,
                        act_bits=act_bits)  # fmt: skip


CASES: list[tuple[str, Callable[[], onnx.ModelProto], tuple[int, ...]]] = [
    ("cnn", small_cnn, (12, 3, 8, 8)),  # Conv, depthwise Conv, pointwise Conv, Gemm (transB=1)
    ("cnn_gemm_plain", lambda: small_cnn(trans_b=False), (12, 3, 8, 8)),  # Gemm, transB=0
    ("transformer", transformer_block, (5, 6, 32)),  # MatMul with the weight right (x @ W) and left (W @ x)
    ("deconv", deconv_model, (3, 4, 5, 5)),  # ConvTranspose
]


@pytest.mark.parametrize(("kind", "make", "shape"), CASES)
@pytest.mark.parametrize(("bits", "order", "gamma", "act_bits"), [(4, 3, 0.5, 8), (4, 3, 0.5, 0), (8, 2, 0.25, 8)])
def test_sparse_forms_equal_gather(kind: str, make: Callable[[], onnx.ModelProto], shape: tuple[int, ...], bits: int,
                                   order: int, gamma: float, act_bits: int) -> None:  # fmt: skip
    folded, _ = fold_batchnorm(make())
    plan = _plan(folded, bits, order, gamma, act_bits)
    ranges = probe_ranges(folded, [layer.input for layer in find_layers(folded)])
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    models = {form: expand(folded, plan, ranges, sparse_form=form).model for form in SPARSE_FORMS}
    outputs = {}
    for form, model in models.items():
        onnx.checker.check_model(model, full_check=True)
        outputs[form] = _run(model, x)
    scale = float(np.max(np.abs(outputs["gather"])))
    for form in SPARSE_FORMS:
        np.testing.assert_allclose(outputs[form], outputs["gather"], rtol=0, atol=1e-5 * scale, err_msg=form)
    ops = {form: [n.op_type for n in m.graph.node] for form, m in models.items()}
    assert "Pad" not in ops["onehot"] and "Pad" not in ops["dense"]
    input_gathers = [n for n in models["gather"].graph.node if n.op_type == "Gather" and n.name.endswith("_gather_in")]
    assert ops["onehot"].count("Gather") == len(input_gathers)  # depthwise input channels only
    scatters = [n for n in models["onehot"].graph.node if n.name.endswith("_scatter")]
    assert scatters and all(n.op_type in ("Conv", "MatMul") for n in scatters)


def test_onehot_scatter_is_narrow_and_one_hot() -> None:
    """The sparse order's layer is as narrow as in the gather form; the scatter matrix is one-hot."""
    folded, _ = fold_batchnorm(small_cnn(batchnorm=False))
    plan = _plan(folded, 4, 3, 0.5, 8)
    ranges = probe_ranges(folded, [layer.input for layer in find_layers(folded)])
    model = expand(folded, plan, ranges, sparse_form="onehot").model
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["pwconv_w2_int8"].shape == (4, 8, 1, 1)  # 25 % of 16 channels per sparse order
    e = inits["pwconv_w2_onehot"]
    assert e.shape == (16, 4, 1, 1)
    e2 = e.reshape(16, 4)
    assert set(np.unique(e2)) == {0.0, 1.0} and (e2.sum(axis=0) == 1).all() and (e2.sum(axis=1) <= 1).all()
    fc = inits["fc_w2_onehot"]  # Gemm (transB=1): narrow (N, k) @ E^T (k, C)
    assert fc.shape == (inits["fc_w2_int8"].shape[0], 10)


def test_unknown_sparse_form_is_refused() -> None:
    folded, _ = fold_batchnorm(small_cnn())
    plan = Plan(layers={"conv1": LayerPlan(bits=8, order=2, gamma=0.5)})
    with pytest.raises(PlanError, match="sparse form"):
        expand(folded, plan, {"x": 1.0}, sparse_form="scatter")


def _wide_conv_model() -> onnx.ModelProto:
    """x(N,32,6,6) → Conv 3×3 32→16 (fan-in 288) → Relu → depthwise Conv 3×3 (fan-in 9)."""
    rng = np.random.default_rng(2)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="wide", pads=[1, 1, 1, 1]),
            onnx.helper.make_node("Relu", ["c"], ["r"], name="relu"),
            onnx.helper.make_node("Conv", ["r", "dw"], ["y"], name="dw", pads=[1, 1, 1, 1], group=16),
        ],
        "wide",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 6, 6])],
        [
            onnx.numpy_helper.from_array(rng.normal(0, 0.1, (16, 32, 3, 3)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.normal(0, 0.3, (16, 1, 3, 3)).astype(np.float32), "dw"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("gamma", "narrow"), [(0.25, True), (0.75, True), (0.875, False)])
def test_auto_runs_narrow_only_where_it_pays(gamma: float, narrow: bool) -> None:
    """auto: the wide conv's sparse order is narrow up to 3/4 of its channels; the depthwise one never."""
    model = _wide_conv_model()
    plan = _plan(model, 8, 2, gamma, 8)
    ranges = probe_ranges(model, ["x", "r"])
    expanded = expand(model, plan, ranges, sparse_form="auto").model
    dims = {i.name: list(i.dims) for i in expanded.graph.initializer}
    kept = round(gamma * 16)
    assert dims["wide_w2_int8"] == ([kept, 32, 3, 3] if narrow else [16, 32, 3, 3])
    assert dims["dw_w2_int8"] == [16, 1, 3, 3]  # depthwise: dense (zero rows)
    assert [n.op_type for n in expanded.graph.node].count("Pad") == int(narrow)
    x = np.random.default_rng(4).standard_normal((2, 32, 6, 6)).astype(np.float32)
    want = _run(expand(model, plan, ranges, sparse_form="gather").model, x)
    np.testing.assert_allclose(_run(expanded, x), want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))))
