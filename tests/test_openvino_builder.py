"""The OpenVINO builder: numbers against onnxruntime, int8 kernels really running, timing, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_onnxruntime import OnnxRuntimeBuilder

from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.errors import BuildError, InputError
from rexdeploy.profile import Parallel, Profile, Quantization

pytestmark = pytest.mark.openvino
ov = pytest.importorskip("openvino")

from models import conv_relu_gemm  # noqa: E402
from rexdeploy_openvino import (  # noqa: E402  (after the importorskip on purpose)
    OpenVINOBuilder,
    ThroughputResult,
    execution_layers,
    kernel_layers,
    kernel_precisions,
    runtime_precision_summary,
    time_throughput,
)

FAST = TimingSettings(warmup_s=0.05, duration_s=0.2)
CPU = Profile(name="test-cpu", engine="openvino", device="CPU", parallel=Parallel(cores=1))


def qdq_conv(channels: int = 16, out_channels: int = 32) -> onnx.ModelProto:
    """x → QuantizeLinear(int8, zp 0) → DequantizeLinear → Conv(3x3) whose weight is
    DequantizeLinear(int8 initializer, per-channel scale, axis 0) → Relu.

    Weights stay within ±63 (7 bits): on CPUs without VNNI, OpenVINO's int8 convolution adds u8×s8
    products pairwise in int16 (vpmaddubsw), which saturates for signed (shifted) activations and
    full-range 8-bit weights; 7-bit weights make the integer result exact on every x86 CPU.
    """
    rng = np.random.default_rng(0)
    w_q = rng.integers(-63, 64, size=(out_channels, channels, 3, 3)).astype(np.int8)
    w_scale = (rng.random(out_channels) * 0.01 + 0.002).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(out_channels, np.int8), "w_zero"),
        numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32) * 0.1, "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dequant", axis=0),
        helper.make_node("Conv", ["x_dq", "w", "bias"], ["c"], name="qconv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Engine]:
    root = tmp_path_factory.mktemp("fp32")
    model = _save(conv_relu_gemm(), root / "src" / "net.onnx")
    return model, OpenVINOBuilder().build(model, CPU, root / "engine")


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Engine]:
    root = tmp_path_factory.mktemp("int8")
    model = _save(qdq_conv(), root / "src" / "qdq.onnx")
    return model, OpenVINOBuilder().build(model, CPU, root / "engine")


def test_registered_and_available() -> None:
    builder = get_builder("openvino")
    assert isinstance(builder, OpenVINOBuilder)
    assert builder.available()
    assert builder.version() == ov.get_version()


def test_build_writes_an_uncompressed_static_ir(fp32: tuple[Path, Engine]) -> None:
    model, engine = fp32
    out = engine.artifacts[0].parent
    assert engine.backend == "openvino" and engine.device == "CPU"
    assert engine.model_path == model
    assert [p.name for p in engine.artifacts] == ["model.xml", "model.bin", "runtime_options.json"]
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.xml", "runtime_options.json"]  # no staging
    assert engine.inputs == {"x": (1, 3, 8, 8)}  # dynamic batch → 1
    assert engine.build_seconds > 0
    assert engine.backend_version == ov.get_version()
    ir = ov.Core().read_model(str(engine.artifacts[0]))
    assert list(ir.inputs[0].get_partial_shape().to_shape()) == [1, 3, 8, 8]
    # FP32 weights stay FP32 in the IR (compress_to_fp16=False): 4*3*3*3 + 4 + 5*256 + 5 floats at least.
    assert engine.artifacts[1].stat().st_size >= 4 * (108 + 4 + 1280 + 5)


def test_compiled_with_latency_hint_and_f32(fp32: tuple[Path, Engine]) -> None:
    import openvino.properties.hint as hint

    compiled = fp32[1].handle
    assert compiled.get_property(hint.performance_mode) in (hint.PerformanceMode.LATENCY, "LATENCY")
    assert compiled.get_property(hint.inference_precision) == ov.Type.f32


def test_fp32_output_matches_onnxruntime(fp32: tuple[Path, Engine], tmp_path: Path) -> None:
    model, engine = fp32
    reference = OnnxRuntimeBuilder().build(model, CPU, tmp_path / "ort")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (got,) = OpenVINOBuilder().run(engine, {"x": x})
    (want,) = OnnxRuntimeBuilder().run(reference, {"x": x})
    assert got.shape == want.shape == (1, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fp32_layers_run_in_f32(fp32: tuple[Path, Engine]) -> None:
    engine = fp32[1]
    kernels = kernel_precisions(engine)
    assert kernels["conv"] == "f32"
    assert kernels["fc"] == "f32"
    assert engine.layer_precisions["conv"] == "f32"
    assert engine.layer_precisions["relu"] == "f32"  # fused into the conv


def test_qdq_conv_runs_as_an_int8_kernel(int8: tuple[Path, Engine]) -> None:
    engine = int8[1]
    # The feature: the execution graph says the convolution ran in integer precision.
    precisions = kernel_precisions(engine)
    assert list(precisions) == ["qconv"]
    assert precisions["qconv"] in ("u8", "i8")
    layer = kernel_layers(engine)["qconv"]
    assert layer.layer_type == "Convolution"
    assert layer.primitive_type.endswith("_I8"), layer.primitive_type
    assert "relu" in layer.onnx_nodes  # the Relu is fused into the int8 conv
    assert engine.layer_precisions["qconv"] in ("u8", "i8")
    summary = runtime_precision_summary(engine)
    assert OpenVINOBuilder().precision_summary(engine) == summary
    assert sum(n for p, n in summary["Convolution"].items() if p in ("u8", "i8")) == 1
    assert "f32" not in summary["Convolution"]
    assert all(layer.layer_type for layer in execution_layers(engine))


def test_qdq_output_matches_onnxruntime(int8: tuple[Path, Engine], tmp_path: Path) -> None:
    model, engine = int8
    reference = OnnxRuntimeBuilder().build(model, CPU, tmp_path / "ort")
    x = np.random.default_rng(2).standard_normal((1, 16, 16, 16)).astype(np.float32)
    (got,) = OpenVINOBuilder().run(engine, {"x": x})
    (want,) = OnnxRuntimeBuilder().run(reference, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_time_fields_are_sane(int8: tuple[Path, Engine]) -> None:
    t = OpenVINOBuilder().time(int8[1], FAST)
    assert t.runs >= FAST.min_runs
    assert 0 < t.min_ms <= t.median_ms <= t.p90_ms <= t.p95_ms <= t.p99_ms <= t.max_ms
    assert t.duration_s >= FAST.duration_s
    assert t.warmup_runs >= 1 and t.batch == 1
    assert OpenVINOBuilder().time(int8[1], TimingSettings(warmup_s=0.01, runs=9)).runs == 9


def test_throughput_mode(int8: tuple[Path, Engine]) -> None:
    result = OpenVINOBuilder().time_throughput(int8[1], FAST, requests=3)
    assert isinstance(result, ThroughputResult)
    assert result.requests == 3 and result.streams >= 1
    assert result.fps > 0 and result.timing.throughput_fps == result.fps
    t = result.timing
    assert t.runs >= FAST.min_runs
    assert 0 < t.min_ms <= t.median_ms <= t.p99_ms <= t.max_ms
    assert ThroughputResult.from_dict(result.to_dict()) == result


def test_throughput_from_a_model_file(fp32: tuple[Path, Engine]) -> None:
    result = time_throughput(fp32[0], CPU, TimingSettings(warmup_s=0.01, runs=20))
    assert result.timing.runs == 20
    assert result.requests >= 1
    with pytest.raises(InputError, match="needs a profile"):
        time_throughput(fp32[0], None, FAST)


def test_bf16_profile_sets_the_precision_hint(tmp_path: Path) -> None:
    import openvino.properties.hint as hint
    from rexdeploy_openvino._runtime import inference_precision

    profile = dataclasses.replace(CPU, quantization=Quantization(bf16=True))
    assert inference_precision(profile) == "bf16" and inference_precision(CPU) == "f32"
    model = _save(conv_relu_gemm(), tmp_path / "net.onnx")
    engine = OpenVINOBuilder().build(model, profile, tmp_path / "out")
    # A CPU without bf16 support runs f32 whatever the hint says.
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    expected = ov.Type.bf16 if has_bf16 else ov.Type.f32
    assert engine.handle.get_property(hint.inference_precision) == expected


def test_run_rejects_wrong_inputs(fp32: tuple[Path, Engine]) -> None:
    engine = fp32[1]
    with pytest.raises(InputError, match=r"missing \['x'\]"):
        OpenVINOBuilder().run(engine, {})
    with pytest.raises(BuildError, match="OpenVINO inference failed") as info:
        OpenVINOBuilder().run(engine, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    assert "\n" not in str(info.value) and "Exception from" not in str(info.value)


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        OpenVINOBuilder().build(tmp_path / "missing.onnx", CPU, tmp_path / "out")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(BuildError, match=r"cannot read bad\.onnx as ONNX") as info:
        OpenVINOBuilder().build(bad, CPU, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_unknown_device_is_one_line(tmp_path: Path) -> None:
    model = _save(conv_relu_gemm(), tmp_path / "net.onnx")
    with pytest.raises(BuildError, match=r"OpenVINO device 'NPU7' is not available here \(available: .*CPU"):
        OpenVINOBuilder().build(model, dataclasses.replace(CPU, device="NPU7"), tmp_path / "out")


def test_dynamic_non_batch_dimension_is_refused(tmp_path: Path) -> None:
    model = _save(conv_relu_gemm(width="W"), tmp_path / "dyn.onnx")
    with pytest.raises(BuildError, match="dynamic dimension 3"):
        OpenVINOBuilder().build(model, CPU, tmp_path / "out")


def test_engine_without_handle_is_refused(fp32: tuple[Path, Engine]) -> None:
    with pytest.raises(BuildError, match="without a live handle"):
        OpenVINOBuilder().time(dataclasses.replace(fp32[1], handle=None), FAST)
    with pytest.raises(BuildError, match="without a live handle"):
        runtime_precision_summary(dataclasses.replace(fp32[1], handle=None))


def test_qdq_matmul_runs_as_an_int8_fully_connected(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(rng.integers(-63, 64, size=(64, 32)).astype(np.int8), "w_q"),
        numpy_helper.from_array((rng.random(32) * 0.01 + 0.002).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(32, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dequant", axis=1),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="qmatmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = _save(model, tmp_path / "mm.onnx")
    engine = OpenVINOBuilder().build(path, CPU, tmp_path / "out")
    layer = kernel_layers(engine)["qmatmul"]
    assert layer.layer_type == "FullyConnected"
    assert layer.runtime_precision in ("u8", "i8")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    reference = OnnxRuntimeBuilder().build(path, CPU, tmp_path / "ort")
    np.testing.assert_allclose(
        OpenVINOBuilder().run(engine, {"x": x})[0],
        OnnxRuntimeBuilder().run(reference, {"x": x})[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_engine_options_travel_with_the_ir(tmp_path: Path) -> None:
    """runtime_options.json beside the IR holds what the engine was compiled with; ``load`` reads it back, the
    IR itself carries DYNAMIC_QUANTIZATION_GROUP_SIZE (a bare compile_model honours it), and ``options={}``
    compiles the IR bare, recording what OpenVINO chose (its default precision on this host)."""
    import json

    model = _save(conv_relu_gemm(), tmp_path / "net.onnx")
    builder = OpenVINOBuilder()
    engine = builder.build(model, CPU, tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "runtime_options.json").read_text())
    assert stored["options"] == engine.options
    assert engine.options["INFERENCE_PRECISION_HINT"] == "f32" and engine.options["PERFORMANCE_HINT"] == "LATENCY"
    assert engine.options.get("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0") == "0"
    bf16 = dataclasses.replace(CPU, quantization=Quantization(bf16=True))
    reloaded = builder.load(engine.artifacts[0], bf16)  # the stored options win over the profile's precision
    assert reloaded.options == engine.options
    core = ov.Core()
    bare = builder.load(engine.artifacts[0], CPU, options={})
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    assert bare.options["INFERENCE_PRECISION_HINT"] == default.get_type_name()
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in engine.options:
        assert core.compile_model(str(engine.artifacts[0]), "CPU").get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    assert ("bare compile_model" in stored["note"]) == (default.get_type_name() != "f32")


def test_model_metadata_sets_the_engine_precision(tmp_path: Path) -> None:
    """The plan's engine float precision, stated in the ONNX metadata, decides the inference precision; FP32
    pins force f32 (OpenVINO cannot keep single nodes f32 inside a bf16 engine)."""
    from rexdeploy_openvino._runtime import model_precision

    from rexdeploy.pins import pin_fp32, set_float_precision

    bf16 = dataclasses.replace(CPU, quantization=Quantization(bf16=True))
    assert model_precision({}, bf16) == "bf16" and model_precision({}, CPU) == "f32"
    proto = conv_relu_gemm()
    set_float_precision(proto, "fp32")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert model_precision(meta, bf16) == "f32"
    set_float_precision(proto, "bf16")
    assert model_precision({p.key: p.value for p in proto.metadata_props}, CPU) == "bf16"
    pin_fp32(proto, [proto.graph.node[0].name or "n0"])
    assert model_precision({p.key: p.value for p in proto.metadata_props}, bf16) == "f32"
    engine = OpenVINOBuilder().build(_save(proto, tmp_path / "pinned.onnx"), bf16, tmp_path / "out")
    assert engine.options["INFERENCE_PRECISION_HINT"] == "f32"
