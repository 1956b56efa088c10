"""``rexdeploy bench``: the JSON statistics, run counts, prebuilt engines, the CoV warning, one-line errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from models import write_ort_profile
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.benchmark import BenchResult, cov_warning, parse_duration
from rexdeploy.builders.timing import COV_WARN, timing_from_samples
from rexdeploy.cli.main import main
from rexdeploy.errors import InputError

FAST = ["--duration", "0.2s", "--warmup", "50ms"]
STAT_KEYS = ("median_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "cov")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None



def conv_relu() -> onnx.ModelProto:
    """x[1,3,16,16] → Conv(8, 3x3, pad 1) + bias → Relu, FP32."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def host_float_precision() -> str:
    """The precision OpenVINO runs float layers in under ``--profile auto`` here: bf16 when the host's profile
    asks for it (xeon-spr, on AMX CPUs) and the CPU has bf16, else f32 (the AVX2 / AVX-512 VNNI profiles pin f32)."""
    import openvino as ov

    from rexdeploy.profile import load_profile

    wants_bf16 = load_profile("auto").quantization.bf16
    return "bf16" if wants_bf16 and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "conv_relu.onnx"
    onnx.save(conv_relu(), str(path))
    return path


@pytest.fixture(scope="module")
def ort_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ort_profile(tmp_path_factory.mktemp("profiles"))


def _bench_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    code = main(["bench", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc: dict[str, Any] = json.loads(captured.out)  # exactly one JSON document on stdout
    assert "Traceback" not in captured.err
    return doc


def _check_statistics(timing: dict[str, Any]) -> None:
    for key in (*STAT_KEYS, "runs", "throughput_fps", "warmup_runs", "duration_s", "batch"):
        assert key in timing, key
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"] <= timing["p95_ms"]
    assert timing["p95_ms"] <= timing["p99_ms"] <= timing["max_ms"]
    assert timing["min_ms"] <= timing["mean_ms"] <= timing["max_ms"]
    assert timing["cov"] == pytest.approx(timing["std_ms"] / timing["mean_ms"])
    assert timing["throughput_fps"] == pytest.approx(1000.0 / timing["mean_ms"])
    assert timing["warmup_runs"] >= 1 and timing["batch"] == 1


@pytest.mark.parametrize(
    "engine",
    [
        "onnxruntime",
        pytest.param(
            "openvino",
            marks=[pytest.mark.openvino, pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")],
        ),
    ],
)
def test_bench_onnx_json(capsys: pytest.CaptureFixture[str], model_path: Path, ort_profile: Path, engine: str) -> None:
    profile = str(ort_profile) if engine == "onnxruntime" else "auto"
    doc = _bench_json(capsys, [str(model_path), "--profile", profile, *FAST])
    assert list(doc) == [
        "model",
        "source",
        "profile",
        "engine",
        "timing",
        "precisions",
        "throughput",
        "warnings",
        "layers",
    ]
    assert doc["source"] == "onnx" and doc["model"] == str(model_path)
    assert doc["engine"]["backend"] == engine and doc["engine"]["inputs"] == {"x": [1, 3, 16, 16]}
    assert doc["engine"]["artifacts"] == []  # built in a temporary directory, not kept
    timing = doc["timing"]
    _check_statistics(timing)
    assert timing["runs"] >= 10
    assert timing["duration_s"] >= 0.2
    assert timing["warmup_s"] == pytest.approx(0.05)
    assert doc["throughput"] is None
    assert any("CoV" in w for w in doc["warnings"]) == (timing["cov"] > COV_WARN)
    if engine == "openvino":
        assert doc["precisions"]["Convolution"] == {host_float_precision(): 1}
    assert BenchResult.from_dict(doc).to_dict() == doc  # JSON round trip


@pytest.mark.openvino
@pytest.mark.parametrize("bf16", [False, True])
def test_bench_runs_float_layers_in_the_profile_precision(
    capsys: pytest.CaptureFixture[str], model_path: Path, tmp_path: Path, bf16: bool
) -> None:
    """A profile with bf16 = false pins f32 on every CPU (also on AMX / AVX-512 BF16 ones, where OpenVINO
    would pick bf16 by itself); bf16 = true runs bf16 where the CPU has it and f32 elsewhere."""
    ov = pytest.importorskip("openvino")
    import dataclasses

    from rexdeploy.profile import load_profile

    base = load_profile("x86-avx2")  # needs only AVX2: every CI host
    profile = dataclasses.replace(base, name=f"test-bf16-{bf16}".lower(),
                                  quantization=dataclasses.replace(base.quantization, bf16=bf16))  # fmt: skip
    path = tmp_path / "profile.toml"
    path.write_text(profile.to_toml(), encoding="utf-8")
    doc = _bench_json(capsys, [str(model_path), "--profile", str(path), "--runs", "12", "--warmup", "10ms"])
    cpu_has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert doc["precisions"]["Convolution"] == {"bf16" if bf16 and cpu_has_bf16 else "f32": 1}


@pytest.mark.openvino
def test_bench_saved_ir_runs_and_throughput(
    capsys: pytest.CaptureFixture[str], model_path: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "engine"
    built = _bench_json(capsys, [str(model_path), "--out", str(out), "--runs", "25", "--warmup", "20ms"])
    assert built["timing"]["runs"] == 25
    xml = out / "model.xml"
    options = out / "runtime_options.json"
    assert built["engine"]["artifacts"] == [str(xml), str(out / "model.bin"), str(options)]
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.xml", "runtime_options.json"]

    doc = _bench_json(capsys, [str(xml), "--runs", "25", "--warmup", "20ms", "--throughput"])
    assert doc["source"] == "openvino-ir" and doc["engine"]["backend"] == "openvino"
    assert doc["engine"]["artifacts"] == [str(xml), str(out / "model.bin")]
    assert doc["engine"]["options"] == built["engine"]["options"]  # the stored runtime options, not the profile's
    assert doc["engine"]["inputs"] == {"x": [1, 3, 16, 16]}
    assert built["precisions"]["Convolution"] == doc["precisions"]["Convolution"] == {host_float_precision(): 1}
    _check_statistics(doc["timing"])
    assert doc["timing"]["runs"] == 25
    tp = doc["throughput"]
    assert tp["fps"] > 0 and tp["requests"] >= 1 and tp["streams"] >= 1
    assert tp["timing"]["runs"] == 25


@pytest.mark.openvino
def test_bench_human_table_on_stderr(capsys: pytest.CaptureFixture[str], model_path: Path) -> None:
    pytest.importorskip("openvino")
    assert main(["bench", str(model_path), "--runs", "12", "--warmup", "10ms"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    for label in ("median", "mean", "p90", "p95", "p99", "min", "max", "std", "CoV", "throughput"):
        assert any(line.strip().startswith(label) for line in captured.err.splitlines()), label
    assert "12 runs" in captured.err


def test_cov_warning_threshold() -> None:
    steady = timing_from_samples([1.0, 1.01, 0.99, 1.0, 1.02, 0.98], warmup_runs=1, warmup_s=0.1, duration_s=1.0)
    noisy = timing_from_samples([1.0, 1.5, 0.7, 1.2, 2.0, 0.9], warmup_runs=1, warmup_s=0.1, duration_s=1.0)
    assert steady.cov < COV_WARN < noisy.cov
    assert cov_warning(steady) is None
    message = cov_warning(noisy)
    assert message is not None and f"CoV {noisy.cov:.1%}" in message and "--duration" in message
    assert "\n" not in message
    # exactly at the threshold: no warning (the rule is CoV > 5 %)
    at = dataclasses.replace(steady, cov=COV_WARN)
    assert cov_warning(at) is None

    def result(timing: Any) -> BenchResult:
        warning = cov_warning(timing)
        return BenchResult(
            model="m.onnx",
            source="onnx",
            profile="p",
            backend="openvino",
            device="CPU",
            backend_version="",
            build_seconds=0.1,
            artifacts=(),
            inputs={"x": (1, 3)},
            timing=timing,
            warnings=(warning,) if warning else (),
        )

    assert not any(line.startswith("warning") for line in result(steady).summary_lines())
    assert [line for line in result(noisy).summary_lines() if line.startswith("warning")] == [f"warning     {message}"]
    assert result(noisy).noisy and not result(steady).noisy


@pytest.mark.parametrize(
    ("text", "seconds"), [("3s", 3.0), ("200ms", 0.2), ("800us", 8e-4), ("1.5", 1.5), ("0", 0.0), (" 2 s ", 2.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3q", "fast", "-1s", "1e999s", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InputError, match="invalid duration"):
        parse_duration(text)


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("rexdeploy: error: ")]
    assert len(errors) == 1 and captured.err.strip().splitlines()[-1] == errors[0], captured.err
    assert needle in errors[0], errors[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_plan_without_tensorrt_names_the_pip_extra(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not a real plan")
    _one_line_error(capsys, main(["bench", str(plan), "--json"]), "pip install 'rexdeploy[tensorrt]'")


@pytest.mark.parametrize(
    ("target", "extra", "needle"),
    [
        ("missing.onnx", [], "not found"),
        ("missing.xml", [], "not found"),
        ("model.txt", [], "unknown extension '.txt'"),
        ("model", [], "unknown extension '(none)'"),
        ("good", ["--duration", "3q"], "invalid --duration '3q'"),
        ("good", ["--warmup", "soon"], "invalid --warmup 'soon'"),
        ("good", ["--duration", "0s"], "must be > 0"),
        ("good", ["--runs", "0"], "invalid --runs '0'"),
        ("good", ["--runs", "many"], "invalid --runs 'many'"),
        ("good", ["--profile", "nope"], "unknown profile 'nope'"),
        ("ir", ["--profile", "a100"], "profile 'a100' is for tensorrt"),
        ("ir", ["--out", "kept"], "is already built"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    model_path: Path,
    target: str,
    extra: list[str],
    needle: str,
) -> None:
    if target == "good":
        path = model_path
    elif target == "ir":
        path = tmp_path / "model.xml"
        path.write_text("<net/>")
    else:
        path = tmp_path / target
        if not target.startswith("missing"):
            path.write_text("x")
    _one_line_error(capsys, main(["bench", str(path), *extra]), needle)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_onnx_with_a_tensorrt_profile_names_the_pip_extra(capsys: pytest.CaptureFixture[str], model_path: Path) -> None:
    code = main(["bench", str(model_path), "--profile", "a100"])
    _one_line_error(capsys, code, "pip install 'rexdeploy[tensorrt]'")
