"""Per-layer times from the engines' own profilers (``Builder.layer_times``) and ``rexdeploy bench --layers``.

onnxruntime runs everywhere; OpenVINO where it imports; TensorRT's pure parts (profiler accumulation, layer
name → ONNX node mapping) everywhere and its real profile where ``tensorrt`` imports and a GPU is visible.
No assertion depends on how fast this CPU is: only presence, signs, run counts and sums.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from models import write_ort_profile
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_onnxruntime import OnnxRuntimeBuilder, session_options
from rexdeploy_onnxruntime.profiling import (
    KernelTotals,
    OnnxGraph,
    map_kernels,
    parse_profile,
    resolve_node,
    run_schedule,
)
from rexdeploy_tensorrt import TensorRTBuilder
from rexdeploy_tensorrt.layer_profile import (
    LayerTimeAccumulator,
    inspector_metadata,
    layer_times_from_totals,
    metadata_nodes,
    onnx_index,
    onnx_names_in,
    profile_schedule,
    resolve_layer,
)

from rexdeploy.benchmark import BenchResult, layer_table_lines
from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings
from rexdeploy.cli.main import main
from rexdeploy.errors import BuildError, EngineUnavailableError, InputError
from rexdeploy.profile import load_profile

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
FAST = TimingSettings(warmup_s=0.02, duration_s=0.1, runs=25)



def conv_relu_conv_gemm(named: bool = True) -> onnx.ModelProto:
    """x[1,8,16,16] → Conv(16, 3x3) → Relu → Conv(16, 3x3) → Reshape → Gemm(64), FP32; big enough that every
    Conv / Gemm takes ≥ 1 µs (OpenVINO's counters are whole µs) and small enough to run in a blink."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    inits = [
        weight("w1", (16, 8, 3, 3)),
        weight("b1", (16,)),
        weight("w2", (16, 16, 3, 3)),
        weight("b2", (16,)),
        weight("wg", (64, 16 * 16 * 16)),
        weight("bg", (64,)),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    if not named:
        for node in nodes:
            node.name = ""
    graph = helper.make_graph(
        nodes,
        "conv_relu_conv_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def compute_nodes(model: onnx.ModelProto) -> set[str]:
    """The Conv / Gemm nodes of ``model`` as engines report them (name, or first output when unnamed)."""
    return {n.name or n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def all_nodes(model: onnx.ModelProto) -> set[str]:
    return {n.name or n.output[0] for n in model.graph.node}


def check_layer_times(times: LayerTimes, model: onnx.ModelProto) -> None:
    """What holds for every engine on every CPU: the Conv / Gemm nodes are there, nothing is negative,
    names are the model's nodes, and nodes + unmapped add up to the total."""
    assert compute_nodes(model) <= set(times.nodes), times.nodes
    assert set(times.nodes) <= all_nodes(model), times.nodes
    assert all(v >= 0.0 for v in times.nodes.values()) and times.unmapped_us >= 0.0
    assert times.total_us > 0.0
    assert sum(times.nodes.values()) + times.unmapped_us == pytest.approx(times.total_us, rel=1e-6, abs=1e-6)
    assert LayerTimes.from_dict(json.loads(json.dumps(times.to_dict()))) == times


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("layers") / "conv_relu_conv_gemm.onnx"
    onnx.save(conv_relu_conv_gemm(), str(path))
    return path


@pytest.fixture(scope="module")
def ort_profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ort_profile(tmp_path_factory.mktemp("profiles"))


# ---------------------------------------------------------------------------------------------
# onnxruntime: the real profiler


def test_onnxruntime_layer_times_cover_every_conv_and_gemm(
    model_path: Path, ort_profile_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder = OnnxRuntimeBuilder()
    engine = builder.build(model_path, load_profile(str(ort_profile_path)), tmp_path / "engine")
    assert engine.options["intra_op_num_threads"] == "1"
    times = builder.layer_times(engine, FAST)
    assert times.runs == 25 and times.source.startswith("onnxruntime ")
    check_layer_times(times, onnx.load(str(model_path)))
    assert list(times.nodes.values()) == sorted(times.nodes.values(), reverse=True)
    assert os.listdir(scratch) == []  # the profile file, the optimized graph and their directory are gone
    assert sorted(p.name for p in (tmp_path / "engine").iterdir()) == [model_path.name]


def test_onnxruntime_layer_times_by_duration_and_unnamed_nodes(tmp_path: Path, ort_profile_path: Path) -> None:
    model = conv_relu_conv_gemm(named=False)
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    builder = OnnxRuntimeBuilder()
    engine = builder.build(path, load_profile(str(ort_profile_path)), tmp_path / "engine")
    times = builder.layer_times(engine, TimingSettings(warmup_s=0.01, duration_s=0.05, min_runs=7))
    assert times.runs >= 7
    assert compute_nodes(model) == {"c1", "c2", "y"}  # unnamed nodes are known by their first output
    check_layer_times(times, model)


def test_onnxruntime_session_options_round_trip(model_path: Path, ort_profile_path: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    engine = OnnxRuntimeBuilder().build(model_path, load_profile(str(ort_profile_path)), tmp_path / "e")
    made = session_options(ort, engine.options)
    live = engine.handle.get_session_options()
    assert made.graph_optimization_level == live.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert made.intra_op_num_threads == live.intra_op_num_threads == 1
    assert made.inter_op_num_threads == live.inter_op_num_threads == 1
    assert made.execution_mode == live.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_onnxruntime_layer_times_errors(model_path: Path, ort_profile_path: Path, tmp_path: Path) -> None:
    builder = OnnxRuntimeBuilder()
    engine = builder.build(model_path, load_profile(str(ort_profile_path)), tmp_path / "e")
    with pytest.raises(InputError, match=r"profile at most \d+ runs") as too_many:
        builder.layer_times(engine, TimingSettings(warmup_s=0.0, runs=10**7))
    with pytest.raises(BuildError, match="built in this process") as no_handle:
        builder.layer_times(dataclasses.replace(engine, handle=None), FAST)
    for exc in (too_many, no_handle):
        assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# onnxruntime: trace parsing and name mapping (pure)


def _graph() -> OnnxGraph:
    return OnnxGraph.from_proto(conv_relu_conv_gemm())


def _event(name: str, ts: float, dur: float, op: str = "Conv") -> dict[str, Any]:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def _run(ts: float) -> dict[str, Any]:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 50}


def test_parse_profile_skips_the_warm_up_and_sums_per_node() -> None:
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 900},
        _run(1000),
        _event("conv1", 1001, 500.0),  # warm-up: left out
        _run(2000),
        _event("conv1", 2001, 10.0),
        _event("fc", 2020, 4.0, "Gemm"),
        {"cat": "Node", "name": "conv1_fence_before", "ts": 2000, "dur": 99},  # not a kernel time
        _run(3000),
        _event("conv1", 3001, 14.0),
        _event("fc", 3020, 6.0, "Gemm"),
    ]
    totals = parse_profile(events, warmup_runs=1)
    assert totals.runs == 2
    assert totals.us == {"conv1": 24.0, "fc": 10.0}
    assert totals.ops == {"conv1": "Conv", "fc": "Gemm"}
    with pytest.raises(BuildError, match="none after the 3 warm-up runs"):
        parse_profile(events, warmup_runs=3)


@pytest.mark.parametrize(
    ("ort_name", "op_name", "expected"),
    [
        ("conv1", "FusedConv", "conv1"),  # kept its name through a fusion
        ("r1_nchwc", "Conv", "conv1"),  # NCHWc names the fused Conv+Relu after the Relu's output
        ("c2_nchwc_token_3", "Conv", "conv2"),
        ("fc/MatMulAddFusion", "Gemm", "fc"),  # anchor/FusionName
        ("relu1/duplicated", "Relu", "relu1"),
        ("ReorderOutput_token_5", "ReorderOutput", None),  # layout the engine added
        ("gemm_input_reshape", "Reshape", None),
    ],
)
def test_resolve_node_maps_onnxruntime_names(ort_name: str, op_name: str, expected: str | None) -> None:
    outputs = {"ReorderOutput_token_5": ("c2",), "gemm_input_reshape": ("f",)}
    assert resolve_node(ort_name, op_name, _graph(), outputs) == expected


def test_resolve_node_unnamed_and_generated_names() -> None:
    model = conv_relu_conv_gemm(named=False)
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(1, np.float32)))
    )
    graph = OnnxGraph.from_proto(model)
    # onnxruntime calls an unnamed node <OpType>_<index>, counting without Constant nodes
    assert resolve_node("Gemm_4", "Gemm", graph) == "y"
    assert resolve_node("Reshape_3", "Reshape", graph) == "f"
    assert resolve_node("Gemm_3", "Gemm", graph) is None  # index 3 is the Reshape: no guess
    # a node named from scratch is charged through its output in the optimized graph (fused Relu → Conv)
    assert resolve_node("Gelu", "Gelu", graph, {"Gelu": ("r1",)}) == "r1"
    assert resolve_node("Fused_9", "FusedConv", graph, {"Fused_9": ("r1",)}) == "c1"


def test_map_kernels_averages_per_run_and_keeps_the_rest_unmapped() -> None:
    totals = KernelTotals({"r1_nchwc": 30.0, "conv2": 12.0, "fc": 6.0, "ReorderOutput": 3.0},
                          {"r1_nchwc": "Conv", "conv2": "Conv", "fc": "Gemm", "ReorderOutput": "ReorderOutput"},
                          runs=3)  # fmt: skip
    times = map_kernels(totals, _graph(), {"ReorderOutput": ("c2",)}, "test")
    assert times == LayerTimes({"conv1": 10.0, "conv2": 4.0, "fc": 2.0}, 1.0, 17.0, 3, "test")
    assert list(times.nodes) == ["conv1", "conv2", "fc"]


def test_run_schedule_counts_and_caps() -> None:
    ticks = iter(np.arange(0.0, 1000.0, 0.01))

    def clock() -> float:
        return float(next(ticks))

    calls: list[int] = []
    warm, runs = run_schedule(lambda: calls.append(1), TimingSettings(warmup_s=0.05, runs=7), 100, None, clock)
    assert runs == 7 and warm >= 1 and len(calls) == warm + runs
    warm, runs = run_schedule(lambda: None, TimingSettings(warmup_s=10.0, duration_s=100.0, min_runs=4), 3, 9, clock)
    assert warm == 3 and runs == 9  # warm-up and runs capped by the event budget
    warm, runs = run_schedule(lambda: None, TimingSettings(warmup_s=0.0, duration_s=100.0, min_runs=20), 3, 9, clock)
    assert warm == 1 and runs == 20  # min_runs wins over the cap


# ---------------------------------------------------------------------------------------------
# OpenVINO's PERF_COUNT on the same model


@pytest.mark.openvino
def test_openvino_layer_times_cover_every_conv_and_gemm(model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from rexdeploy_openvino import OpenVINOBuilder

    builder = OpenVINOBuilder()
    engine = builder.build(model_path, load_profile("auto"), tmp_path / "ov")
    times = builder.layer_times(engine, FAST)
    assert times.runs == 25 and "PERF_COUNT" in times.source
    check_layer_times(times, onnx.load(str(model_path)))


# ---------------------------------------------------------------------------------------------
# TensorRT: the pure parts


@pytest.mark.parametrize(
    ("layer", "names"),
    [
        ("/conv1/Conv", ["/conv1/Conv"]),
        ("/conv1/Conv + /relu/Relu", ["/conv1/Conv", "/relu/Relu"]),
        ("PWN(PWN(/act/Sigmoid, /act/Mul), /res/Add)", ["/act/Sigmoid", "/act/Mul", "/res/Add"]),
        ("/conv/Conv + PWN(/act/Sigmoid, /act/Mul)", ["/conv/Conv", "/act/Sigmoid", "/act/Mul"]),
        ("{ForeignNode[/attn/MatMul.../attn/Add_3]}", ["/attn/MatMul", "/attn/Add_3"]),
        ("/fc/Gemm_myl0_3", ["/fc/Gemm_myl0_3", "/fc/Gemm"]),
        ("x_QuantizeLinear_clone_1 + /conv/Conv", ["x_QuantizeLinear_clone_1", "x_QuantizeLinear", "/conv/Conv"]),
        ("q_x_quantize_scale_node", ["q_x_quantize_scale_node", "q_x"]),
        ("/conv/Conv [Convolution]", ["/conv/Conv"]),
        ("[ONNX] /conv/Conv", ["/conv/Conv"]),
        ("Reformatting CopyNode for Input Tensor 0 to /conv/Conv", []),
        ("(Unnamed Layer* 12) [Shuffle]", []),
        ("__myl_MulAdd_myl0_0", []),
        ("[trainStation1]", []),
        ("", []),
    ],
)
def test_onnx_names_in_tensorrt_layer_names(layer: str, names: list[str]) -> None:
    assert onnx_names_in(layer) == names


def test_inspector_metadata_lists_the_onnx_nodes() -> None:
    assert metadata_nodes("[ONNX Layer: /a/Conv]\x1f[ONNX Layer: /a/Relu]\x1e[ONNX Layer: b]") == [
        "/a/Conv",
        "/a/Relu",
        "b",
    ]
    assert metadata_nodes("") == []
    doc = {
        "Layers": [
            {
                "Name": "/a/Conv + /a/Relu",
                "LayerType": "CaskConvolution",
                "Metadata": "[ONNX Layer: /a/Conv]\x1f[ONNX Layer: /a/Relu]",
            },
            {"Name": "Reformatting CopyNode for Input Tensor 0 to /a/Conv", "Metadata": ""},
            "a layer given by name only",
        ],
        "Bindings": ["x", "y"],
    }
    assert inspector_metadata(json.dumps(doc)) == {"/a/Conv + /a/Relu": ["/a/Conv", "/a/Relu"]}
    assert inspector_metadata("not json") == {} and inspector_metadata("[1, 2]") == {}


def test_resolve_layer_prefers_metadata_then_name_and_needs_a_known_node() -> None:
    index = onnx_index(conv_relu_conv_gemm())
    assert index["c1"] == "conv1" and index["conv1"] == "conv1"
    assert resolve_layer("conv1 + relu1", [], index) == "conv1"
    assert resolve_layer("__myl_Fused_myl0_1", ["flatten", "fc"], index) == "flatten"  # first ONNX node named
    assert resolve_layer("fc_myl0_4", [], index) == "fc"
    assert resolve_layer("c2 copy", ["not-in-the-model"], index) is None
    assert resolve_layer("PWN(relu1)", [], {}) == "relu1"  # the model is not here: names as given


def test_accumulated_profile_to_layer_times() -> None:
    sink = LayerTimeAccumulator()
    per_run = {"conv1 + relu1": 0.010, "conv2": 0.004, "Reformatting CopyNode for Input Tensor 0 to fc": 0.001,
               "{ForeignNode[flatten...fc]}": 0.002}  # fmt: skip
    for _ in range(4):
        for name, ms in per_run.items():
            sink.report(name, ms)
        sink.end_run()
    assert sink.runs == 4 and sink.totals_ms["conv2"] == pytest.approx(0.016)
    metadata = {"{ForeignNode[flatten...fc]}": ["fc", "flatten"]}
    times = layer_times_from_totals(
        sink.totals_ms, sink.runs, metadata, onnx_index(conv_relu_conv_gemm()), "TensorRT x"
    )
    assert times.runs == 4 and times.source == "TensorRT x"
    assert times.nodes == pytest.approx({"conv1": 10.0, "conv2": 4.0, "fc": 2.0})
    assert list(times.nodes) == ["conv1", "conv2", "fc"]
    assert times.unmapped_us == pytest.approx(1.0) and times.total_us == pytest.approx(17.0)
    with pytest.raises(BuildError, match="no run"):
        layer_times_from_totals({}, 0, {}, {}, "TensorRT x")


def test_profile_schedule_attaches_the_profiler_after_the_warm_up() -> None:
    ticks = iter(np.arange(0.0, 1000.0, 0.01))
    log: list[str] = []
    settings = TimingSettings(warmup_s=0.05, runs=6)
    warm, runs = profile_schedule(lambda: log.append("plain"), lambda: log.append("profiled"),
                                  lambda: log.append("attach"), settings, lambda: float(next(ticks)))  # fmt: skip
    assert runs == 6 and warm >= 1
    assert log == ["plain"] * warm + ["attach"] + ["profiled"] * 6
    warm, runs = profile_schedule(lambda: None, lambda: None, lambda: None,
                                  TimingSettings(warmup_s=0.0, duration_s=0.2, min_runs=3), lambda: float(next(ticks)))  # fmt: skip
    assert warm == 1 and runs >= 3


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour where TensorRT is not installed")
def test_tensorrt_layer_times_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not a plan")
    engine = Engine("tensorrt", "cuda:0", tmp_path / "m.onnx", (plan,), {"x": (1, 8, 16, 16)}, 0.0)
    with pytest.raises(EngineUnavailableError, match=r"pip install 'rexdeploy\[tensorrt\]'") as exc:
        TensorRTBuilder().layer_times(engine, FAST)
    assert "\n" not in str(exc.value)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_layer_times_on_a_built_engine(model_path: Path, tmp_path: Path, cuda_gpu: Any) -> None:
    trt = pytest.importorskip("tensorrt")
    gpu = cuda_gpu
    strong_only = int(str(trt.__version__).split(".")[0]) >= 11
    builder = TensorRTBuilder(max_batch=1, typing="strong" if strong_only else "auto")
    profile = load_profile("h100" if gpu.compute_capability >= (8, 9) else "a100")
    engine = builder.build(model_path, profile, tmp_path / "trt")
    times = builder.layer_times(engine, FAST)
    assert times.runs == 25 and times.source.startswith("TensorRT ")
    model = onnx.load(str(model_path))
    assert "conv1" in times.nodes, times.nodes  # the first node: whatever TensorRT fuses it into names it first
    assert set(times.nodes) <= all_nodes(model)
    assert all(v >= 0.0 for v in times.nodes.values()) and times.unmapped_us >= 0.0 and times.total_us > 0.0
    assert sum(times.nodes.values()) + times.unmapped_us == pytest.approx(times.total_us, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# rexdeploy bench --layers


_ROW = re.compile(r"^\s+(\d+\.\d+)\s+(\d+\.\d)\s+(\d+\.\d)\s+(\S.*)$")


def test_layer_table_lines_sorted_with_cumulative_share() -> None:
    times = LayerTimes({"b": 1.0, "a": 5.0, "c": 2.0}, 2.0, 10.0, 8, "test profiler")
    lines = layer_table_lines(times, median_ms=0.008)
    assert lines[0].startswith("layers      test profiler: 8 profiled runs")
    rows = [m.groups() for line in lines[2:-1] if (m := _ROW.match(line))]
    assert [r[3] for r in rows][:3] == ["a", "c", "b"] and rows[3][3].startswith("(unmapped")
    assert [float(r[1]) for r in rows] == [50.0, 20.0, 10.0, 20.0]
    assert [float(r[2]) for r in rows] == [50.0, 70.0, 80.0, 100.0]
    assert "total (profiler) vs timed median 8.00 us: +25.0 %" in lines[-1]
    empty = layer_table_lines(LayerTimes({}, 0.0, 0.0, 1, "x"), median_ms=0.0)
    assert "n/a" in empty[-1] and len(empty) == 4


def test_bench_layers_prints_the_table(
    capsys: pytest.CaptureFixture[str], model_path: Path, ort_profile_path: Path
) -> None:
    code = main(
        ["bench", str(model_path), "--profile", str(ort_profile_path), "--runs", "20", "--warmup", "10ms", "--layers"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert any(line.startswith("profiling layers with onnxruntime's profiler") for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("layers      onnxruntime"))
    assert "20 profiled runs" in lines[start]
    rows = [m.groups() for line in lines[start + 2 :] if (m := _ROW.match(line))]
    names = [r[3] for r in rows]
    assert {"conv1", "conv2", "fc"} <= set(names) and names[-1].startswith("(unmapped")
    node_us = [float(r[0]) for r in rows[:-1]]
    assert node_us == sorted(node_us, reverse=True)
    assert float(rows[-1][2]) == pytest.approx(100.0, abs=0.1)
    assert any("total (profiler) vs timed median" in line for line in lines[start:])


def test_bench_layers_json(capsys: pytest.CaptureFixture[str], model_path: Path, ort_profile_path: Path) -> None:
    argv = ["bench", str(model_path), "--profile", str(ort_profile_path), "--runs", "15", "--warmup", "10ms", "--json"]
    assert main([*argv, "--layers"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    layers = doc["layers"]
    assert set(layers) == {"nodes", "unmapped_us", "total_us", "runs", "source"}
    assert layers["runs"] == 15 and {"conv1", "conv2", "fc"} <= set(layers["nodes"])
    assert BenchResult.from_dict(doc).to_dict() == doc  # JSON round trip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["layers"] is None


class _NoProfiler:
    """An onnxruntime builder without ``layer_times`` (a third-party plugin written before it existed)."""

    name = "onnxruntime"
    pip_extra = ""

    def __init__(self) -> None:
        self._inner = OnnxRuntimeBuilder()

    def __getattr__(self, attr: str) -> Any:
        if attr == "layer_times":
            raise AttributeError(attr)
        return getattr(self._inner, attr)


class _NotImplemented(_NoProfiler):
    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        raise NotImplementedError("this engine has no profiler")


@pytest.mark.parametrize(("fake", "message"), [(_NoProfiler, "has none"), (_NotImplemented, "cannot profile layers")])
def test_bench_layers_one_line_error_when_the_builder_cannot_profile(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    ort_profile_path: Path,
    fake: type,
    message: str,
) -> None:
    import rexdeploy.benchmark as benchmark

    monkeypatch.setattr(benchmark, "get_builder", lambda name: fake())
    code = main(
        ["bench", str(model_path), "--profile", str(ort_profile_path), "--runs", "5", "--warmup", "1ms", "--layers"]
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("rexdeploy: error:")]
    assert len(errors) == 1 and message in errors[0] and "--layers" in errors[0]
