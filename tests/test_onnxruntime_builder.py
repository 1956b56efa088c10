"""The ONNX Runtime builder: copy + session, numbers against the ONNX reference evaluator, timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from models import conv_relu_gemm
from onnx.reference import ReferenceEvaluator
from rexdeploy_onnxruntime import OnnxRuntimeBuilder

from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.registry import get_builder
from rexdeploy.errors import BuildError, InputError
from rexdeploy.profile import Parallel, Profile

FAST = TimingSettings(warmup_s=0.05, duration_s=0.2)
PROFILE = Profile(name="test-cpu", engine="onnxruntime", device="CPU", parallel=Parallel(cores=1))


@pytest.fixture
def fp32_model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "net.onnx"
    path.parent.mkdir()
    onnx.save(conv_relu_gemm(), str(path))
    return path


@pytest.fixture
def built(fp32_model: Path, tmp_path: Path) -> Engine:
    return OnnxRuntimeBuilder().build(fp32_model, PROFILE, tmp_path / "engine")


def test_registered_and_available() -> None:
    builder = get_builder("onnxruntime")
    assert isinstance(builder, OnnxRuntimeBuilder)
    assert builder.available()
    import onnxruntime

    assert builder.version() == onnxruntime.__version__


def test_build_copies_the_model_and_fixes_the_batch(built: Engine, fp32_model: Path, tmp_path: Path) -> None:
    assert built.backend == "onnxruntime" and built.device == "CPU"
    assert built.model_path == fp32_model
    assert built.artifacts == (tmp_path / "engine" / "net.onnx",)
    assert built.artifacts[0].read_bytes() == fp32_model.read_bytes()
    assert built.inputs == {"x": (1, 3, 8, 8)}
    assert built.build_seconds > 0
    assert built.handle is not None
    assert [p.name for p in (tmp_path / "engine").iterdir()] == ["net.onnx"]  # no staging left behind
    assert "handle" not in built.to_dict()


def test_session_settings(built: Engine) -> None:
    import onnxruntime as ort

    session = built.handle
    assert session.get_providers() == ["CPUExecutionProvider"]
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1


def test_run_matches_the_onnx_reference(built: Engine, fp32_model: Path) -> None:
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (got,) = OnnxRuntimeBuilder().run(built, {"x": x})
    (want,) = ReferenceEvaluator(str(fp32_model)).run(None, {"x": x})
    assert got.shape == (1, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_run_rejects_wrong_inputs(built: Engine) -> None:
    builder = OnnxRuntimeBuilder()
    with pytest.raises(InputError, match=r"missing \['x'\], unknown \['z'\]"):
        builder.run(built, {"z": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(BuildError, match="onnxruntime inference failed"):
        builder.run(built, {"x": np.zeros((1, 3, 9, 9), np.float32)})


def test_time_fields_are_sane(built: Engine) -> None:
    t = OnnxRuntimeBuilder().time(built, FAST)
    assert t.runs >= FAST.min_runs
    assert 0 < t.min_ms <= t.median_ms <= t.p90_ms <= t.p95_ms <= t.p99_ms <= t.max_ms
    assert t.duration_s >= FAST.duration_s
    assert t.warmup_runs >= 1 and t.batch == 1
    assert t.throughput_fps == pytest.approx(1000.0 / t.mean_ms)


def test_time_with_fixed_runs(built: Engine) -> None:
    t = OnnxRuntimeBuilder().time(built, TimingSettings(warmup_s=0.01, runs=7))
    assert t.runs == 7


def test_static_batch_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "b2.onnx"
    onnx.save(conv_relu_gemm(batch=2), str(path))
    engine = OnnxRuntimeBuilder().build(path, PROFILE, tmp_path / "out")
    assert engine.inputs == {"x": (2, 3, 8, 8)}
    assert OnnxRuntimeBuilder().time(engine, TimingSettings(warmup_s=0.01, runs=5)).batch == 2


def test_dynamic_non_batch_dimension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_relu_gemm(width="W"), str(path))
    with pytest.raises(BuildError, match="dynamic dimension 3"):
        OnnxRuntimeBuilder().build(path, PROFILE, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_external_data_is_copied(tmp_path: Path) -> None:
    src = tmp_path / "src" / "ext.onnx"
    src.parent.mkdir()
    onnx.save(conv_relu_gemm(), str(src), save_as_external_data=True, location="ext.weights", size_threshold=0)
    engine = OnnxRuntimeBuilder().build(src, PROFILE, tmp_path / "out")
    assert sorted(p.name for p in engine.artifacts) == ["ext.onnx", "ext.weights"]
    assert all(p.is_file() for p in engine.artifacts)
    x = np.ones((1, 3, 8, 8), np.float32)
    (want,) = ReferenceEvaluator(str(src)).run(None, {"x": x})
    np.testing.assert_allclose(OnnxRuntimeBuilder().run(engine, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        OnnxRuntimeBuilder().build(tmp_path / "missing.onnx", PROFILE, tmp_path / "out")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(BuildError, match=r"bad\.onnx") as info:
        OnnxRuntimeBuilder().build(bad, PROFILE, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_engine_without_handle_is_refused(built: Engine) -> None:
    from dataclasses import replace

    with pytest.raises(BuildError, match="without a live handle"):
        OnnxRuntimeBuilder().time(replace(built, handle=None), FAST)
