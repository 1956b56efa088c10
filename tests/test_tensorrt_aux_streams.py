"""TensorRT auxiliary streams for REx ensembles: the settings (an ensemble's predictors - 1, capped by the
profile's ``[parallel] aux_streams``; 0 for any other model), the trtexec ``--maxAuxStreams`` flag, what
``engine.json`` records, and one real build (skipped where ``tensorrt`` does not import or no GPU is seen)
that checks ``ICudaEngine.num_aux_streams`` and the ensemble engine's numbers against onnxruntime."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from models import small_cnn
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_tensorrt import (
    TensorRTBuilder,
    TrtBuildSettings,
    engine_from_plan,
    lint_qdq,
    select_settings,
    trtexec_command,
)
from rexdeploy_tensorrt.settings import ensemble_predictors

from rexdeploy.api import expand_model
from rexdeploy.builders.base import TimingSettings
from rexdeploy.errors import BuildError
from rexdeploy.planner.ensembles import aux_streams_for
from rexdeploy.profile import Profile, load_profile

CC = {"a100": (8, 0), "h100": (9, 0), "orin": (8, 7)}


def _with_aux(profile: Profile, aux_streams: int) -> Profile:
    return replace(profile, parallel=replace(profile.parallel, aux_streams=aux_streams))


def _ensemble(profile: Profile, split: tuple[int, ...], bits: int = 8) -> tuple[onnx.ModelProto, int]:
    """A weight-only REx ensemble of the small CNN as the pass emits it, with the planner's aux stream count."""
    expanded = expand_model(small_cnn(), profile=profile, bits=bits, order=sum(split), split=split, act_bits=0)
    return expanded.model, aux_streams_for(expanded.plan, profile)


def _argv(settings: TrtBuildSettings) -> list[str]:
    return shlex.split(trtexec_command("m.onnx", settings))


@pytest.mark.parametrize("name", ["a100", "h100", "orin"])
def test_an_ensemble_gets_one_aux_stream_per_further_predictor(name: str) -> None:
    profile = load_profile(name)
    for split, predictors in (((1, 1), 2), ((1, 1, 1), 3)):
        model, planned = _ensemble(profile, split)
        assert ensemble_predictors(model) == predictors
        s = select_settings(profile, model, CC[name])
        assert s.predictors == predictors
        # the planner's rule for the same plan, and the number itself: M - 1 within the profile's cap
        assert s.max_aux_streams == planned == min(predictors - 1, profile.parallel.aux_streams)
        assert [a for a in _argv(s) if a.startswith("--maxAuxStreams")] == [f"--maxAuxStreams={predictors - 1}"]


def test_the_profile_caps_the_aux_streams() -> None:
    model, _ = _ensemble(load_profile("a100"), (1, 1, 1))  # three predictors want two auxiliary streams
    for cap, want in ((0, 0), (1, 1), (2, 2), (7, 2)):
        profile = _with_aux(load_profile("a100"), cap)
        s = select_settings(profile, model, (8, 0))
        assert s.predictors == 3 and s.max_aux_streams == want
        assert f"--maxAuxStreams={want}" in _argv(s)


def test_a_model_that_is_not_an_ensemble_gets_no_aux_streams() -> None:
    profile = load_profile("a100")
    dense = expand_model(small_cnn(), profile=profile, bits=8, order=2, act_bits=0).model
    # the dense expansion has parallel order branches (Sum nodes), but it is one predictor
    assert any(n.op_type == "Sum" for n in dense.graph.node) and ensemble_predictors(dense) == 1
    s = select_settings(profile, dense, (8, 0))
    assert (s.predictors, s.max_aux_streams, s.sets_aux_streams) == (1, 0, True)
    assert "--maxAuxStreams=0" in _argv(s)


def test_an_explicit_count_or_tensorrts_heuristics_override() -> None:
    profile = load_profile("orin")
    model, _ = _ensemble(profile, (1, 1))
    three = select_settings(profile, model, (8, 7), max_aux_streams=3)
    assert three.max_aux_streams == 3 and "--maxAuxStreams=3" in _argv(three)
    heuristic = select_settings(profile, model, (8, 7), max_aux_streams=-1)
    assert heuristic.max_aux_streams == -1 and not heuristic.sets_aux_streams
    assert not any(a.startswith("--maxAuxStreams") for a in _argv(heuristic))  # trtexec's default: heuristics
    builder = TensorRTBuilder(max_aux_streams=-1)
    assert builder.settings_for(model, profile, (8, 7), "out").max_aux_streams == -1
    with pytest.raises(BuildError, match=r"max_aux_streams must be >= 0, or -1 .* got -2"):
        select_settings(profile, model, (8, 7), max_aux_streams=-2)


def test_settings_keep_the_predictor_count_through_json() -> None:
    model, _ = _ensemble(load_profile("h100"), (1, 1, 1))
    s = select_settings(load_profile("h100"), model, (9, 0))
    again = TrtBuildSettings.from_json(s.to_json())
    assert again == s and again.predictors == 3 and again.max_aux_streams == 2
    raw = s.to_dict()
    del raw["predictors"]  # an engine.json written before the field: a single predictor
    assert TrtBuildSettings.from_dict(raw).predictors == 1


def test_ensemble_predictors_counts_only_the_ensemble_sums() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="a"),
        helper.make_node("Relu", ["x"], ["b"], name="b"),
        helper.make_node("Neg", ["x"], ["c"], name="c"),
        helper.make_node("Sum", ["a", "b", "c", "x"], ["s"], name="plain_sum"),  # an order sum: not predictors
        helper.make_node("Sum", ["s", "a", "b"], ["y"], name="y__ensemble_sum"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert ensemble_predictors(model) == 3
    del model.graph.node[-1]
    assert ensemble_predictors(model) == 1


def test_engine_json_reports_the_aux_streams_tensorrt_used(tmp_path: Path) -> None:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"a plan built elsewhere")
    model, _ = _ensemble(load_profile("a100"), (1, 1))
    settings = select_settings(load_profile("a100"), model, (8, 0))
    meta = {"settings": settings.to_dict(), "aux_streams": {"max": 1, "predictors": 2, "used": 1}}
    (tmp_path / "engine.json").write_text(json.dumps(meta))
    engine = engine_from_plan(plan)
    assert engine.options["max_aux_streams"] == "1" and engine.options["aux_streams"] == "1"
    assert TensorRTBuilder().aux_streams(engine) == 1  # from engine.json: no TensorRT needed
    meta["aux_streams"]["used"] = None  # a binding without num_aux_streams
    (tmp_path / "engine.json").write_text(json.dumps(meta))
    assert "aux_streams" not in engine_from_plan(plan).options


# ---------------------------------------------------------------------------------------------
# the real thing (unrun in this project so far: no GPU with TensorRT here)


def branchy_qdq(branches: int, depth: int = 3, ch: int = 32, hw: int = 28, seed: int = 0) -> onnx.ModelProto:
    """``branches`` independent int8 Q/DQ conv stacks on one input, summed at ``y__ensemble_sum``: the shape
    of a REx ensemble (signed int8 activations and weights, zero-point 0, as TensorRT wants them)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s_act"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    nodes = []
    outs = []
    for b in range(branches):
        t = "x"
        for d in range(depth):
            cin = 3 if d == 0 else ch
            w = (rng.standard_normal((ch, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
            w_scale = (np.abs(w).max(axis=(1, 2, 3)) / 127.0).astype(np.float32)
            w_q = np.clip(np.rint(w / w_scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
            p = f"b{b}_{d}"
            inits += [
                numpy_helper.from_array(w_q, f"{p}_wq"),
                numpy_helper.from_array(w_scale, f"{p}_ws"),
                numpy_helper.from_array(np.zeros(ch, np.int8), f"{p}_wzp"),
                numpy_helper.from_array((rng.standard_normal(ch) * 0.1).astype(np.float32), f"{p}_b"),
            ]
            nodes += [
                helper.make_node("QuantizeLinear", [t, "s_act", "zp"], [f"{p}_xq"], name=f"{p}_q"),
                helper.make_node("DequantizeLinear", [f"{p}_xq", "s_act", "zp"], [f"{p}_xdq"], name=f"{p}_dq"),
                helper.make_node(
                    "DequantizeLinear", [f"{p}_wq", f"{p}_ws", f"{p}_wzp"], [f"{p}_w"], name=f"{p}_wdq", axis=0
                ),
                helper.make_node(
                    "Conv", [f"{p}_xdq", f"{p}_w", f"{p}_b"], [f"{p}_c"], name=f"{p}_conv", pads=[1, 1, 1, 1]
                ),
                helper.make_node("Relu", [f"{p}_c"], [f"{p}_r"], name=f"{p}_relu"),
            ]
            t = f"{p}_r"
        outs.append(t)
    nodes.append(helper.make_node("Sum", outs, ["y"], name="y__ensemble_sum"))
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ch, hw, hw])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_the_gpu_test_model_is_a_clean_strongly_typed_three_predictor_build() -> None:
    model = branchy_qdq(3)
    onnx.checker.check_model(model, full_check=True)
    assert lint_qdq(model) == []
    base = load_profile("a100")
    fp32 = replace(base, quantization=replace(base.quantization, fp16=False, bf16=False, fp8=False))
    s = select_settings(fp32, model, (8, 0))
    assert s.strongly_typed and s.builder_flags() == () and (s.predictors, s.max_aux_streams) == (3, 2)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_an_ensemble_engine_runs_on_at_most_its_aux_streams(tmp_path: Path, cuda_gpu: Any) -> None:
    trt = pytest.importorskip("tensorrt")
    ort = pytest.importorskip("onnxruntime")
    gpu = cuda_gpu
    base = load_profile("h100" if gpu.compute_capability >= (8, 9) else "a100")
    # the FP32 variant: strongly typed, TF32 off, so the int8 convs are the only rounding against onnxruntime
    profile = replace(base, quantization=replace(base.quantization, fp16=False, bf16=False, fp8=False))
    x = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)
    used = {}
    for branches in (1, 3):
        model = branchy_qdq(branches)
        path = tmp_path / f"b{branches}.onnx"
        onnx.save(model, path)
        engine = TensorRTBuilder().build(path, profile, tmp_path / f"e{branches}")
        meta = json.loads((tmp_path / f"e{branches}" / "engine.json").read_text())
        want = min(branches - 1, profile.parallel.aux_streams)
        assert meta["aux_streams"]["max"] == want and meta["aux_streams"]["predictors"] == branches
        n = engine.handle.num_aux_streams
        assert meta["aux_streams"]["used"] == n == TensorRTBuilder().aux_streams(engine)
        assert 0 <= n <= want and engine.options["aux_streams"] == str(n)
        used[branches] = n
        (y,) = TensorRTBuilder().run(engine, {"x": x})
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        (ref,) = sess.run(None, {"x": x})
        # int8 activations: an element whose rounding flips moves the next conv by at most one step
        assert np.abs(y - ref).mean() <= 0.02 * np.abs(ref).mean(), (branches, trt.__version__)
        timing = TensorRTBuilder(use_cuda_graph=True).time(
            engine, TimingSettings(warmup_s=0.05, duration_s=0.2, min_runs=10)
        )
        assert timing.runs >= 10 and timing.median_ms > 0  # a CUDA graph captured across the aux streams
    assert used[1] == 0
