"""``rexdeploy export triton``: the model repository layout and the config.pbtxt fields, parsed back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from rexdeploy.cli.main import main
from rexdeploy.errors import InputError
from rexdeploy.triton import export_triton

DEMO = Path(__file__).resolve().parents[1] / "rexdeploy" / "demo" / "digits_cnn.onnx"

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'rexdeploy[triton]'")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def openvino_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("build") / "digits"
    rc = main([
        "build", str(DEMO), "--profile", "x86-avx2", "--order", "2", "--out", str(out),
        "--duration", "0.05s", "--warmup", "0.02s", "--no-cache",
    ])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture()
def tensorrt_build(tmp_path: Path) -> Path:
    """A build directory as the TensorRT builder leaves it (the plan bytes are opaque to the export)."""
    out = tmp_path / "trt-build"
    (out / "rex").mkdir(parents=True)
    shutil.copyfile(DEMO, out / "expanded.onnx")
    shutil.copyfile(DEMO, out / "fp32.onnx")
    (out / "rex" / "engine.plan").write_bytes(b"serialized-engine")
    shapes = [{"name": "input", "min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [16, 1, 8, 8]}]
    (out / "rex" / "engine.json").write_text(json.dumps({"settings": {"shapes": shapes}}), encoding="utf-8")
    report = {
        "model": str(DEMO),
        "engine": "tensorrt",
        "plan": {"layers": {"/conv1/Conv": {}}},
        "rex": {"artifacts": ["rex/engine.plan", "rex/engine.json"], "backend_version": "10.9.0"},
        "baselines": {"fp32": {"artifacts": ["fp32/engine.plan"]}},
    }
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return out


def test_openvino_repository_layout_and_config(openvino_build: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert main(["export", "triton", str(repo), "--from", str(openvino_build)]) == 0
    model_dir = repo / "digits_cnn"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()) == [
        "1/model.bin",
        "1/model.xml",
        "1/runtime_options.json",
        "config.pbtxt",
    ]
    assert (model_dir / "1" / "model.xml").read_bytes() == (openvino_build / "rex" / "model.xml").read_bytes()
    config = parse(model_dir / "config.pbtxt")
    assert config.name == "digits_cnn"
    assert config.backend == "openvino"
    assert config.platform == ""
    assert config.max_batch_size == 1  # the demo has a dynamic batch axis: dims leave it out
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input", "TYPE_FP32", [1, 8, 8])
    ]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("logits", "TYPE_FP32", [10])
    ]
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 1
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    params = {k: v.string_value for k, v in config.parameters.items()}
    # the inference threads the build measured fastest on this host travel as the backend's parameter (none where
    # the build kept OpenVINO's default)
    stored = json.loads((openvino_build / "rex" / "runtime_options.json").read_text())["options"]
    threads = {"INFERENCE_NUM_THREADS": stored["INFERENCE_NUM_THREADS"]} if "INFERENCE_NUM_THREADS" in stored else {}
    assert params == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **threads}
    assert not config.HasField("dynamic_batching")


def test_openvino_fp32_batched_throughput(
    openvino_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    argv = ["export", "triton", str(repo), "--from", str(openvino_build), "--which", "fp32", "--name", "digits-fp32",
            "--max-batch", "8", "--instances", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["validated"] is True
    assert doc["files"] == ["config.pbtxt", "1/model.xml", "1/model.bin", "1/runtime_options.json"]
    model_dir = repo / "digits-fp32"
    assert (model_dir / "1" / "model.bin").read_bytes() == (openvino_build / "fp32" / "model.bin").read_bytes()
    config = parse(model_dir / "config.pbtxt")
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 3
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "3", "ENABLE_BATCH_PADDING": "YES"}


def test_python_backend_model(openvino_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    import numpy

    from rexdeploy.triton import MODEL_PY

    repo = tmp_path / "models"
    argv = ["export", "triton", str(repo), "--from", str(openvino_build), "--backend", "python", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["validated"] is True
    assert doc["backend"] == "python"
    assert doc["files"] == [
        "config.pbtxt", "1/model.py", "1/model.xml", "1/model.bin", "1/runtime_options.json",
    ]  # fmt: skip
    model_dir = repo / "digits_cnn"
    assert (model_dir / "1" / "model.py").read_bytes() == MODEL_PY.read_bytes()
    for name in ("model.xml", "model.bin", "runtime_options.json"):
        assert (model_dir / "1" / name).read_bytes() == (openvino_build / "rex" / name).read_bytes()
    config = parse(model_dir / "config.pbtxt")
    assert (config.backend, config.platform, config.max_batch_size) == ("python", "", 1)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not config.HasField("dynamic_batching")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["REXDEPLOY_PYTHON"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert params["REXDEPLOY_DEVICE"] == "CPU"
    assert str(Path(numpy.__file__).parents[1]) in params["REXDEPLOY_SITE_PACKAGES"].split(os.pathsep)

    batched = export_triton(openvino_build, repo, name="digits_b4", backend="python", max_batch=4, instances=2)
    config = parse(batched.model_dir / "config.pbtxt")
    assert (config.max_batch_size, config.instance_group[0].count) == (4, 2)
    assert config.HasField("dynamic_batching")
    assert "ENABLE_BATCH_PADDING" not in config.parameters  # model.py compiles the IR at batches 1, 2, 4


def test_python_backend_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.py's own functions (it runs inside Triton's stub; tests/test_triton_server.py runs it there)."""
    import importlib.util
    import sys

    from rexdeploy.triton import MODEL_PY

    spec = importlib.util.spec_from_file_location("rexdeploy_triton_model", MODEL_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recorded, from_env = tmp_path / "recorded", tmp_path / "from_env"
    recorded.mkdir()
    from_env.mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", str(from_env))
    params = {"REXDEPLOY_SITE_PACKAGES": os.pathsep.join([str(recorded), str(tmp_path / "missing")])}
    assert module.add_site_packages(params) == [str(recorded), str(from_env)]
    assert sys.path[-2:] == [str(recorded), str(from_env)]
    assert module.read_options(tmp_path) == {}
    assert [module._batch_sizes(n) for n in (0, 1, 2, 6, 8)] == [[0], [0], [1, 2], [1, 2, 4], [1, 2, 4, 8]]
    (tmp_path / "runtime_options.json").write_text(json.dumps({"options": {"INFERENCE_PRECISION_HINT": "f32"}}))
    assert module.read_options(tmp_path) == {"INFERENCE_PRECISION_HINT": "f32"}
    (tmp_path / "runtime_options.json").write_text("[]")
    with pytest.raises(module.ModelSetupError, match="is not a rexdeploy runtime options file"):
        module.read_options(tmp_path)


def test_python_backend_refused_for_tensorrt(tensorrt_build: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--backend python serves OpenVINO engines; this build's engine is tensorrt"):
        export_triton(tensorrt_build, tmp_path / "models", backend="python")
    with pytest.raises(InputError, match="--backend 'openvino' cannot serve this build's tensorrt engine"):
        export_triton(tensorrt_build, tmp_path / "models", backend="openvino")
    assert export_triton(tensorrt_build, tmp_path / "models", backend="tensorrt").config.backend == "tensorrt"


def test_export_keeps_other_models_and_replaces_its_own(openvino_build: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n', encoding="utf-8")
    (repo / "digits_cnn").mkdir()
    (repo / "digits_cnn" / "stale.txt").write_text("old", encoding="utf-8")
    export_triton(openvino_build, repo)
    assert (repo / "other" / "config.pbtxt").is_file()
    assert not (repo / "digits_cnn" / "stale.txt").exists()
    assert (repo / "digits_cnn" / "config.pbtxt").is_file()
    assert [p.name for p in repo.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_tensorrt_plan_config(tensorrt_build: Path, tmp_path: Path) -> None:
    result = export_triton(tensorrt_build, tmp_path / "models", instances=2)
    assert result.validated
    assert result.files == ("config.pbtxt", "1/model.plan")
    assert (result.model_dir / "1" / "model.plan").read_bytes() == b"serialized-engine"
    config = parse(result.model_dir / "config.pbtxt")
    assert (config.backend, config.platform) == ("tensorrt", "tensorrt_plan")
    assert config.max_batch_size == 16  # the engine's optimization-profile max batch (engine.json)
    assert list(config.input[0].dims) == [1, 8, 8]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2
    assert dict(config.parameters) == {}
    assert any("10.9.0" in n for n in result.notes)


def test_tensorrt_max_batch_over_profile_is_refused(tensorrt_build: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"exceeds the TensorRT engine's optimization profile \(max batch 16\)"):
        export_triton(tensorrt_build, tmp_path / "models", max_batch=32)
    assert not (tmp_path / "models" / "digits_cnn").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "{missing}"], "build directory {missing} not found"),
        (["--from", "{build}", "--which", "int8"], "unknown engine 'int8': use one of rex, fp32"),
        (["--from", "{empty}"], "no rex engine in {empty}"),
        (["--from", "{build}", "--which", "fp32"], "no fp32 engine in {build}"),
        (["--from", "{build}", "--name", "../up"], "is not a valid Triton model directory name"),
    ],
)
def test_errors_are_one_line_exit_1(
    tensorrt_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    paths = {"missing": tmp_path / "missing", "build": tensorrt_build, "empty": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    argv = [a.format(**paths) for a in argv]
    assert main(["export", "triton", str(tmp_path / "models"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rexdeploy: error: ")
    assert message.format(**paths) in err
    assert err.count("\n") == 1
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_validation_skipped_without_tritonclient(
    tensorrt_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    result = export_triton(tensorrt_build, tmp_path / "models")
    assert result.validated is False
    assert any("rexdeploy[triton]" in n for n in result.notes)
    assert (result.model_dir / "config.pbtxt").is_file()


def test_serve_without_the_server_is_one_line(
    openvino_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if nvidia-pytriton were not installed (CI installs it)
    assert main(["serve", str(openvino_build), "--repository", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert err == "rexdeploy: error: the Triton server is not installed: pip install --no-deps nvidia-pytriton\n"
    assert not (tmp_path / "models").exists()  # nothing exported before the check


def test_python_backend_without_its_template_is_one_error(
    openvino_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rexdeploy.triton

    monkeypatch.setattr(rexdeploy.triton, "MODEL_PY", tmp_path / "absent" / "model.py")
    with pytest.raises(InputError, match=r"missing from this rexdeploy install .*pip install -e \.\)$"):
        export_triton(openvino_build, tmp_path / "models", backend="python")
    assert not (tmp_path / "models" / "digits_cnn").exists()
