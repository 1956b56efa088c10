"""LayerNorm smoothing (rexdeploy.passes.smooth): float-exact rewrite, refusals with reasons, Plan / CLI plumbing,
and the int8 error it is for — each against onnxruntime with graph optimizations off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.cli.main import main
from rexdeploy.errors import InputError, PlanError
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.passes.smooth import find_smoothable, layernorm_channel_max, smooth_layernorms, smoothing_scales
from rexdeploy.plans import Plan, load_plan, uniform_plan

HIDDEN, SEQ = 16, 5


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {"x": x})]


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _ln_params(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """γ, β with three outlier channels (|γ| 20-40×, |β| 10× the rest), as in trained transformers."""
    gamma = rng.uniform(0.5, 1.5, HIDDEN)
    beta = rng.normal(0, 0.1, HIDDEN)
    gamma[[2, 7, 11]] = [30.0, -20.0, 40.0]
    beta[[2, 7, 11]] = [1.0, -2.0, 0.5]
    return gamma, beta


def _model(
    nodes: list[onnx.NodeProto], inits: list[TensorProto], outputs: list[str], opset: int = 17
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "smooth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, HIDDEN])],
        [
            helper.make_tensor_value_info(o, TensorProto.INT64, [3])
            if o == "shape"
            else helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", SEQ, HIDDEN])
            for o in outputs
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def qkv_model(seed: int = 0, residual: bool = False) -> onnx.ModelProto:
    """LayerNormalization → Q, K, V MatMuls (+ bias Adds) and a Shape; ``residual``: the LN output is also added to
    V's output (a residual Add reader)."""
    rng = np.random.default_rng(seed)
    gamma, beta = _ln_params(rng)
    inits = [_init("gamma", gamma), _init("beta", beta)]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5)]
    for p in "qkv":
        inits += [_init(f"w{p}", rng.normal(0, 0.3, (HIDDEN, HIDDEN))), _init(f"b{p}", rng.normal(0, 0.1, HIDDEN))]
        nodes += [
            helper.make_node("MatMul", ["ln", f"w{p}"], [f"{p}0"], name=f"mm_{p}"),
            helper.make_node("Add", [f"{p}0", f"b{p}"], [p], name=f"add_{p}"),
        ]
    nodes.append(helper.make_node("Shape", ["ln"], ["shape"], name="shape"))
    outputs = ["q", "k", "v", "shape"]
    if residual:
        nodes.append(helper.make_node("Add", ["v", "ln"], ["res"], name="residual"))
        outputs.append("res")
    return _model(nodes, inits, outputs)


def decomposed_gemm_model(seed: int = 1) -> onnx.ModelProto:
    """The decomposed LayerNorm torch exports below opset 17, over a (N, HIDDEN) input, → Gemm(transB=1)."""
    rng = np.random.default_rng(seed)
    gamma, beta = _ln_params(rng)
    w = rng.normal(0, 0.3, (8, HIDDEN))  # (out, in): transB=1
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="rm1", axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="sub"),
        helper.make_node("Pow", ["centred", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="rm2", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Div", ["centred", "std"], ["xhat"], name="div"),
        helper.make_node("Mul", ["xhat", "gamma"], ["scaled"], name="mul_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["ln"], name="add_beta"),
        helper.make_node("Gemm", ["ln", "w", "b"], ["y"], name="gemm", transB=1),
    ]
    inits = [_init("two", np.array(2.0)), _init("eps", np.array(1e-5)), _init("gamma", gamma), _init("beta", beta),
             _init("w", w), _init("b", rng.normal(0, 0.1, 8))]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "decomposed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _init_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_shared_layernorm_three_matmuls_float_exact() -> None:
    model = qkv_model()
    result = smooth_layernorms(model, 0.5)
    assert result.modified and [s.layernorm for s in result.smoothed] == ["ln"]
    assert result.smoothed[0].readers == ("mm_q", "mm_k", "mm_v")  # the Shape reads no value: allowed
    assert result.refused == ()
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]  # no node added
    assert model.graph.node[0].input[1] == "gamma"  # the input model is left as it was
    x = _inputs((4, SEQ, HIDDEN))
    for got, want in zip(_run(out, x), _run(model, x), strict=True):
        if want.dtype.kind == "f":
            assert _rel(got, want) < 1e-5
        else:
            np.testing.assert_array_equal(got, want)
    # the LN output's channels were divided by s = x_max^α / w_max^(1-α) (Eq. 4), recomputed here from the model
    gamma, beta = _init_value(model, "gamma").astype(np.float64), _init_value(model, "beta").astype(np.float64)
    w_max = np.max(np.abs(np.concatenate([_init_value(model, f"w{p}") for p in "qkv"], axis=1)), axis=1)
    s = np.sqrt(np.abs(gamma) * 3.0 + np.abs(beta)) / np.sqrt(w_max)
    ln = out.graph.node[0]
    np.testing.assert_allclose(_init_value(out, ln.input[1]), gamma / s, rtol=1e-6)
    np.testing.assert_allclose(_init_value(out, ln.input[2]), beta / s, rtol=1e-6, atol=1e-7)
    assert {i.name for i in out.graph.initializer}.isdisjoint({"gamma", "beta", "wq", "wk", "wv"})  # unread: dropped


def test_smoothing_evens_the_layernorm_output_channels() -> None:
    """What it is for: after smoothing, the measured per-channel max of the LN output is far more even."""
    model = qkv_model()
    x = _inputs((64, SEQ, HIDDEN))
    taps = {}
    for name, m in (("before", model), ("after", smooth_layernorms(model, 0.5).model)):
        tapped = onnx.ModelProto()
        tapped.CopyFrom(m)
        tapped.graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, None))
        taps[name] = np.max(np.abs(_run(tapped, x)[-1]), axis=(0, 1))
    spread = {k: float(np.max(v) / np.median(v)) for k, v in taps.items()}
    assert spread["before"] > 10.0
    assert spread["after"] < spread["before"] / 3.0


def test_residual_reader_is_refused_with_its_reason() -> None:
    model = qkv_model(residual=True)
    result = smooth_layernorms(model, 0.5)
    assert not result.modified and result.model is model and result.smoothed == ()
    (name, reason), = result.refused  # fmt: skip
    assert name == "ln"
    assert "Add 'residual'" in reason and "not a MatMul/Gemm with a constant weight" in reason


def test_graph_output_and_activation_matmul_are_refused() -> None:
    model = qkv_model()
    model.graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, ["N", SEQ, HIDDEN]))
    (match,) = find_smoothable(model)
    assert not match.ok and "is a graph output" in match.reason
    model = qkv_model()
    model.graph.node.append(helper.make_node("MatMul", ["ln", "q"], ["att"], name="mm_act"))
    (match,) = find_smoothable(model)
    assert not match.ok and "MatMul 'mm_act' whose other operand is not a constant 2-D weight" in match.reason


def test_decomposed_layernorm_into_gemm_trans_b() -> None:
    model = decomposed_gemm_model()
    result = smooth_layernorms(model, 0.7)
    assert [(s.layernorm, s.readers) for s in result.smoothed] == [("add_beta", ("gemm",))]
    x = _inputs((32, HIDDEN))
    assert _rel(_run(result.model, x)[0], _run(model, x)[0]) < 1e-5
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    w, w0 = _init_value(result.model, gemm.input[1]), _init_value(model, "w")
    s = w[0] / w0[0]  # transB=1: the LN channels run along the weight's columns
    np.testing.assert_allclose(w / w0, np.broadcast_to(s, w.shape), rtol=1e-5)


def test_smoothing_scales_is_eq4() -> None:
    x_max, w_max = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0])
    np.testing.assert_allclose(smoothing_scales(x_max, w_max, 0.5), [2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(x_max[:2], w_max[:2], 1.0), [4.0, 1.0])
    np.testing.assert_allclose(layernorm_channel_max(np.array([-2.0]), np.array([-1.0]), 3.0), [7.0])
    with pytest.raises(PlanError, match=r"alpha 1.5 must be in \[0, 1\]"):
        smoothing_scales(x_max, w_max, 1.5)


def test_plan_field_round_trip_and_hash() -> None:
    plain = uniform_plan(["mm_q"], bits=8, order=2)
    smooth = Plan(layers=plain.layers, smooth_alpha=0.5)
    assert "smooth_alpha" not in plain.to_dict()  # plans without smoothing keep their JSON and hash
    again = Plan.from_json(smooth.to_json())
    assert again == smooth and again.smooth_alpha == 0.5
    assert again.hash == smooth.hash != plain.hash != Plan(layers=plain.layers, smooth_alpha=0.3).hash
    assert "LayerNorm smoothing alpha=0.5" in smooth.summary()
    with pytest.raises(PlanError, match=r"alpha -0\.1 must be in"):
        Plan(layers=plain.layers, smooth_alpha=-0.1)


def test_expansion_with_smoothing_lowers_the_w8a8_error() -> None:
    """Carried out by the pipeline before the activation ranges: W8A8 K=2 error vs FP32 (onnxruntime, exact Q/DQ)
    drops on LayerNorm outputs with outlier channels, and the plan records it."""
    model = qkv_model()
    x = _inputs((16, SEQ, HIDDEN), seed=5)
    want = np.concatenate([o.ravel() for o in _run(model, x)[:3]])
    errors = {}
    for alpha in (None, 0.5):
        expanded = expand_model(model, bits=8, order=2, act_bits=8, smooth_alpha=alpha)
        assert expanded.plan.smooth_alpha == alpha
        got = np.concatenate([o.ravel() for o in _run(expanded.model, x)[:3]])
        errors[alpha] = _rel(got, want)
    assert any("1 smoothed" in n for n in expand_model(model, bits=8, order=2, smooth_alpha=0.5).plan.notes)
    assert errors[0.5] < errors[None] / 2, errors


def test_expansion_smooths_a_post_ln_layernorm_on_a_copy() -> None:
    """The pipeline smooths a LayerNorm the residual Add reads too on a copy: same error gain, residual exact."""
    model = qkv_model(residual=True)
    x = _inputs((16, SEQ, HIDDEN), seed=5)
    want = _run(model, x)
    errors = {}
    for alpha in (None, 0.5):
        expanded = expand_model(model, bits=8, order=2, act_bits=8, smooth_alpha=alpha)
        got = _run(expanded.model, x)
        errors[alpha] = _rel(
            np.concatenate([o.ravel() for o in got[:3]]), np.concatenate([o.ravel() for o in want[:3]])
        )
    ops = [n.op_type for n in expanded.model.graph.node]
    assert ops.count("LayerNormalization") == 2
    assert errors[0.5] < errors[None] / 2, errors


def test_cli_expand_smooth_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "qkv.onnx", tmp_path / "out.onnx"
    onnx.save(qkv_model(), str(src))
    plan_path = tmp_path / "plan.json"
    assert main(["expand", str(src), "-o", str(out), "--bits", "8", "--order", "2", "--smooth", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "LayerNorm smoothing alpha=0.5" in summary["plan"]
    args = ["plan", str(src), "--estimate", "--budget", "1ms", "--smooth", "0.3", "-o", str(plan_path)]
    assert main(args) == 0
    planned = load_plan(plan_path)
    assert planned.smooth_alpha == 0.3 and "predictions are for the unsmoothed model" in planned.notes[-1]
    assert main(["expand", str(src), "--plan", str(plan_path), "-o", str(out), "--json"]) == 0
    assert "LayerNorm smoothing alpha=0.3" in json.loads(capsys.readouterr().out)["plan"]
    with pytest.raises(SystemExit) as exit_info:
        main(["expand", str(src), "-o", str(out), "--smooth", "2"])
    assert exit_info.value.code == 2
    assert "invalid smoothing strength '2'" in capsys.readouterr().err


def test_clone_smooths_a_layernorm_the_residual_also_reads() -> None:
    """Post-LN transformers: with ``clone`` the MatMuls read a smoothed copy, the residual Add the original."""
    model = qkv_model(residual=True)
    result = smooth_layernorms(model, 0.5, clone=True)
    (site,) = result.smoothed
    assert site.cloned and site.readers == ("mm_q", "mm_k", "mm_v") and result.refused == ()
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("LayerNormalization") == 2 and len(ops) == len(model.graph.node) + 1
    readers = {n.name: list(n.input) for n in out.graph.node}
    assert "ln" in readers["residual"] and readers["mm_q"][0] == site.output != "ln"
    assert readers["shape"] == ["ln"]
    x = _inputs((4, SEQ, HIDDEN))
    for got, want in zip(_run(out, x), _run(model, x), strict=True):
        assert _rel(got.astype(np.float64), want.astype(np.float64)) < 1e-5


def test_clone_decomposed_layernorm_that_is_a_graph_output() -> None:
    model = decomposed_gemm_model()
    model.graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, ["N", HIDDEN]))
    assert "is a graph output" in smooth_layernorms(model, 0.5).refused[0][1]
    result = smooth_layernorms(model, 0.5, clone=True)
    assert [s.cloned for s in result.smoothed] == [True]
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Mul") == 2 and ops.count("Add") == 3  # γ Mul and β Add copied; the eps Add not
    x = _inputs((32, HIDDEN))
    for got, want in zip(_run(result.model, x), _run(model, x), strict=True):
        assert _rel(got, want) < 1e-5


def test_channel_max_from_elsewhere_replaces_the_gamma_beta_estimate() -> None:
    model = qkv_model()
    x_max = np.linspace(1.0, 4.0, HIDDEN)
    result = smooth_layernorms(model, 1.0, channel_max={"ln": x_max})  # α = 1: s = x_max exactly (Eq. 4)
    ln = result.model.graph.node[0]
    np.testing.assert_allclose(_init_value(result.model, ln.input[1]), _init_value(model, "gamma") / x_max, rtol=1e-6)
    with pytest.raises(InputError, match="has 3 values; its LayerNorm has 16 channels"):
        smooth_layernorms(model, 0.5, channel_max={"ln": np.ones(3)})


def test_decomposed_layernorm_without_beta_before_a_residual_add_is_refused_once() -> None:
    """A Mul-only tail (no β) read by a residual Add: one refusal, under the Mul, naming the Add."""
    model = decomposed_gemm_model()
    graph = model.graph
    add_beta = next(n for n in graph.node if n.name == "add_beta")
    add_beta.input[:] = ["scaled", "x"]  # the β Add becomes a residual Add of the input
    add_beta.name = "residual"
    graph.node.append(helper.make_node("MatMul", ["scaled", "w_mm"], ["y2"], name="mm"))
    graph.initializer.append(_init("w_mm", np.ones((HIDDEN, 4))))
    graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4]))
    matches = find_smoothable(model)
    assert [(m.name, m.ok) for m in matches] == [("mul_gamma", False)]
    assert "Add 'residual'" in matches[0].reason
    assert [s.readers for s in smooth_layernorms(model, 0.5, clone=True).smoothed] == [("mm",)]
