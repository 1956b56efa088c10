"""A real Triton server (the one in the ``nvidia-pytriton`` wheel) serves ``rexdeploy export triton --backend python``.

Skipped unless ``pip install --no-deps nvidia-pytriton`` and ``tritonclient[http,grpc]`` are installed. The server
listens on loopback ports picked by the OS and is stopped, stubs included, before each test returns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rexdeploy.cli.main import main
from rexdeploy.triton import export_triton

pytestmark = pytest.mark.triton

DEMO = Path(__file__).resolve().parents[1] / "rexdeploy" / "demo" / "digits_cnn.onnx"

try:  # tritonclient raises RuntimeError (not ImportError) when installed without its http / grpc support
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"pip install 'tritonclient[http,grpc]' ({exc})", allow_module_level=True)
pytest.importorskip("openvino")

from rexdeploy.triton_server import ServerError, TritonServer, find_install  # noqa: E402

try:
    find_install()  # looks for the files only: pytriton's own Python modules need numpy < 2 and are not imported
except Exception as exc:  # not installed, or no stub for this Python
    pytest.skip(f"no Triton server here: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "digits"
    rc = main([
        "-q", "build", str(DEMO), "--profile", "x86-avx2", "--order", "2", "--out", str(out),
        "--duration", "0.05s", "--warmup", "0.02s", "--no-cache",
    ])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def engine_outputs(build: Path) -> Any:
    """The engine as rexdeploy loads it (the options it was measured with), run one sample at a time."""
    from rexdeploy_openvino import OpenVINOBuilder

    from rexdeploy.profile import load_profile

    builder = OpenVINOBuilder()
    engine = builder.load(build / "rex" / "model.xml", load_profile("x86-avx2"))

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([builder.run(engine, {"input": x[i : i + 1]})[0] for i in range(len(x))])

    return run


@pytest.fixture(scope="module")
def server(build: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("models")
    export_triton(build, repo, backend="python", name="digits")  # max_batch_size 1: batching off
    export_triton(build, repo, backend="python", name="digits_b8", max_batch=8)  # dynamic batching on
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    srv = TritonServer(repo, log_path=log, start_timeout=120)
    with srv:
        yield srv
    assert srv.process is not None and srv.process.returncode is not None
    assert srv.pids() == [], "server or stub processes left running"
    for port in (srv.http_port, srv.grpc_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def http_infer(client: Any, model: str, x: np.ndarray) -> np.ndarray:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.asarray(client.infer(model, [tensor]).as_numpy("logits"))


def grpc_infer(client: Any, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.asarray(client.infer(model, [tensor]).as_numpy("logits"))


def test_http_and_grpc_outputs_equal_the_engine(server: TritonServer, engine_outputs: Any, build: Path) -> None:
    x = inputs(6)
    expected = engine_outputs(x)
    with httpclient.InferenceServerClient(server.http_url) as http:
        assert http.is_model_ready("digits")
        got_http = np.concatenate([http_infer(http, "digits", x[i : i + 1]) for i in range(len(x))])
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        got_grpc = np.concatenate([grpc_infer(grpc, "digits", x[i : i + 1]) for i in range(len(x))])
    # same IR, same compile options, same batch of 1: the same numbers
    np.testing.assert_array_equal(got_http, expected)
    np.testing.assert_array_equal(got_grpc, expected)
    # and the engine is the model: onnxruntime, graph optimizations off, on the ONNX it was built from
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(build / "expanded.onnx"), options, providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input": x})[0]
    assert np.linalg.norm(got_http - reference) <= 5e-3 * np.linalg.norm(reference)


def test_dynamic_batching_gathers_requests_and_keeps_the_numbers(server: TritonServer, engine_outputs: Any) -> None:
    x = inputs(16, seed=1)
    expected = engine_outputs(x)
    with httpclient.InferenceServerClient(server.http_url, concurrency=8) as http:
        before = _batches(http.get_inference_statistics("digits_b8"))

        pending = []
        for i in range(len(x)):  # 16 requests in flight on 8 connections: the dynamic batcher gathers them
            tensor = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(x[i : i + 1])
            pending.append(http.async_infer("digits_b8", [tensor]))
        got = np.concatenate([p.get_result().as_numpy("logits") for p in pending])
        whole = http_infer(http, "digits_b8", x[:5])  # one request of 5 samples
        after = _batches(http.get_inference_statistics("digits_b8"))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    np.testing.assert_allclose(whole, expected[:5], rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    executed = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in executed.items()) == len(x) + 5
    assert executed.get(5, 0) >= 1


def _batches(stats: dict[str, Any]) -> dict[int, int]:
    """Executions per batch size (Triton's ``batch_stats``)."""
    rows = stats["model_stats"][0].get("batch_stats", [])
    return {int(r["batch_size"]): int(r["compute_infer"]["count"]) for r in rows}


def test_a_wrong_request_is_refused_and_the_server_keeps_serving(server: TritonServer, engine_outputs: Any) -> None:
    x = inputs(1, seed=2)
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        tensor = grpcclient.InferInput("input", [1, 1, 8, 9], "FP32")  # Triton checks dims against the config
        tensor.set_data_from_numpy(np.zeros((1, 1, 8, 9), np.float32))
        with pytest.raises(Exception, match="input"):
            grpc.infer("digits", [tensor])
        np.testing.assert_array_equal(grpc_infer(grpc, "digits", x), engine_outputs(x))


def test_a_model_that_cannot_load_stops_the_server_with_one_line(build: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    result = export_triton(build, repo, backend="python", name="wrong_python")
    config = result.model_dir / "config.pbtxt"
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            '"REXDEPLOY_PYTHON" value { string_value: "3.', '"REXDEPLOY_PYTHON" value { string_value: "2.'
        ),
        encoding="utf-8",
    )
    srv = TritonServer(repo, log_path=tmp_path / "log.txt", start_timeout=60)
    with pytest.raises(ServerError) as info:
        srv.start()
    message = str(info.value)
    assert "\n" not in message
    assert "rexdeploy model wrong_python: exported for Python 2." in message
    assert "but Triton's stub runs Python 3." in message
    log = (tmp_path / "log.txt").read_text(encoding="utf-8")
    ours = [line for line in log.splitlines() if "rexdeploy model wrong_python:" in line]
    logged = [line for line in ours if " model.py:" in line.split("]", 1)[0]]  # model.py's own log line
    assert len(logged) == 1 and logged[0].startswith("E")  # (Triton's own lines repeat it, with a traceback)
    assert srv.pids() == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly(build: Path, tmp_path: Path, engine_outputs: Any, stop: signal.Signals) -> None:
    """``rexdeploy serve`` answers on the ports it was given and leaves nothing behind on Ctrl-C / SIGTERM."""
    from rexdeploy.triton_server import free_port

    http_port, grpc_port = free_port(), free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [sys.executable, "-m", "rexdeploy.cli.main", "serve", str(build), "--name", "digits",
            "--http-port", str(http_port), "--grpc-port", str(grpc_port)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # the "serving" line comes once the server is ready
            lines.append(line)
            if line.startswith("serving ") or proc.poll() is not None:
                break
        assert lines and lines[-1].startswith("serving 'digits'"), "".join(lines)
        assert f"HTTP http://127.0.0.1:{http_port}/v2/models/digits/infer, gRPC 127.0.0.1:{grpc_port}" in lines[-1]
        server_pid = next(pid for pid in _children(proc.pid))  # tritonserver: its own process group
        x = inputs(1, seed=3)
        with httpclient.InferenceServerClient(f"127.0.0.1:{http_port}") as http:
            np.testing.assert_array_equal(http_infer(http, "digits", x), engine_outputs(x))
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if stop == signal.SIGINT else 128 + stop)
    assert err.strip().splitlines()[-1] in ("rexdeploy: interrupted", f"rexdeploy: terminated by {stop.name}")
    assert _group(server_pid) == [], "tritonserver or its stubs still running"
    assert list(scratch.iterdir()) == [], "temporary files left behind"


def _procs(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat field ``field`` (after the command name: 1 = parent, 2 = process group)
    equals ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    return _procs(1, pid)


def _group(pgid: int) -> list[int]:
    return _procs(2, pgid)
