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


# expanded graphs on the builder's engine (graph optimizations on) against the numpy reference

NODES = ["conv1", "dwconv", "pwconv", "fc"]
REX_CASES = [  # (bits, order, act_bits, act_order, form, gamma)
    (8, 2, 8, 1, "branches", None),
    (4, 3, 8, 1, "branches", None),
    (4, 3, 8, 1, "concat", None),
    (5, 3, 0, 1, "branches", None),  # weight-only
    (8, 3, 8, 1, "branches", 0.5),  # sparse orders 2 and 3
    (8, 2, 8, 2, "branches", None),  # activation orders
    (8, 1, 8, 1, "branches", None),  # one order: fused into onnxruntime's integer kernels
]
# Measured (16 probes, AVX-512 VNNI): per-probe median ~8e-8 everywhere; max 2e-7 for the unfused forms, 9e-5 with
# activation orders (flipped codes of x_2) and 1e-2 for the fused single order (QLinearConv rounds the bias to
# int32 and requantizes in one step, which flips a code now and then); one order short of the expansion: >= 4e-4.


@pytest.mark.parametrize(("bits", "order", "act_bits", "act_order", "form", "gamma"), REX_CASES)
def test_expanded_graph_on_the_builder_matches_the_reference(
    tmp_path: Path, bits: int, order: int, act_bits: int, act_order: int, form: str, gamma: float | None
) -> None:
    from models import small_cnn
    from reference import (
        activation_scales,
        assert_engine_agrees,
        bias_correction_means,
        fold_batchnorm_reference,
        layer_input_ranges,
        rel_error,
        rex_order_weights,
        run_reference,
    )

    from rexdeploy.api import expand_model
    from rexdeploy.plans import uniform_plan

    model = small_cnn()
    probes = np.random.default_rng(11).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    folded = fold_batchnorm_reference(model)
    # with one activation order the head's pool (between the int8 pwconv and fc) reads a Q/DQ'd input: its range too
    ranges = layer_input_ranges(folded, probes.reshape(16, 3, 8, 8), joins=act_order == 1)
    plan = uniform_plan(NODES, bits=bits, order=order, gamma=gamma, act_bits=act_bits, act_order=act_order, form=form)
    path = tmp_path / "rex.onnx"
    onnx.save(expand_model(model, plan, ranges=ranges).model, str(path))
    builder = OnnxRuntimeBuilder()
    engine = builder.build(path, PROFILE, tmp_path / "engine")
    got = [builder.run(engine, {"x": x})[0] for x in probes]
    scales = activation_scales(ranges, act_order) if act_bits == 8 else None
    means = bias_correction_means(model)

    def reference(k: int) -> list[np.ndarray]:  # the expansion to order k
        weights = rex_order_weights(bits, k, gamma)
        # every product R^k·x_j: with 8-bit weights none is dropped (the cross term (2, 2) = 1/254² is kept)
        terms = {(j, kk) for j in range(1, act_order + 1) for kk in range(1, k + 1)}
        return [run_reference(folded, {"x": x}, order_weights=weights, act_scales=scales, terms=terms,
                              act_order=act_order, input_means=means)[0] for x in probes]  # fmt: skip

    want = reference(order)
    errors = assert_engine_agrees(got, want, act_order)
    if order > 1:  # not fused into integer kernels: float32 rounding only (+ a few flipped codes of x_2)
        assert rel_error(np.concatenate(got), np.concatenate(want)) < (1e-5 if act_order == 1 else 5e-5)
        # the engine computes the expansion to its last order: the one-order-short reference is far off
        short = reference(order - 1)
        assert rel_error(np.concatenate(got), np.concatenate(short)) > 30 * max(float(np.median(errors)), 1e-7)


def test_cli_expand_output_on_the_builder_matches_the_reference(tmp_path: Path) -> None:
    """`rexdeploy expand --calib` (ranges = max |x| over the calibration batch) → OnnxRuntimeBuilder → reference."""
    from models import small_cnn
    from reference import (
        activation_scales,
        bias_correction_means,
        fold_batchnorm_reference,
        layer_input_ranges,
        rel_error,
        rex_weight_map,
        run_reference,
    )

    from rexdeploy.cli.main import main

    model_path, calib, out = tmp_path / "cnn.onnx", tmp_path / "calib.npy", tmp_path / "cnn.rex.onnx"
    onnx.save(small_cnn(), str(model_path))
    probes = np.random.default_rng(12).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.save(calib, probes)
    args = ["expand", str(model_path), "-o", str(out), "--profile", "x86-avx512", "--bits", "4", "--order", "3",
            "--act-bits", "8", "--calib", str(calib)]  # fmt: skip
    assert main(args) == 0
    builder = OnnxRuntimeBuilder()
    engine = builder.build(out, PROFILE, tmp_path / "engine")
    got = np.concatenate([builder.run(engine, {"x": x[None]})[0] for x in probes])
    folded = fold_batchnorm_reference(small_cnn())
    # ReLU outputs (r3: the head pool's input, a join between int8 layers): uint8 (zero-point 0) on the
    # OpenVINO-engine profile x86-avx512
    unsigned = {"r1", "r2", "r3", "flat"}
    scales = activation_scales(layer_input_ranges(folded, probes, joins=True), unsigned=unsigned)
    want = run_reference(folded, {"x": probes}, weight_map=rex_weight_map(4, 3), act_scales=scales,
                         unsigned=unsigned, input_means=bias_correction_means(small_cnn()))[0]  # fmt: skip
    assert rel_error(got, want) < 1e-5
    fp32 = run_reference(folded, {"x": probes})[0]
    assert rel_error(want, fp32) > 1e-3  # the quantization the engine reproduces is real
