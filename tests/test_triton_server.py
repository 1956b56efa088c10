"""A real Triton server (the one in the ``nvidia-pytriton`` wheel) serves ``rexdeploy export triton --backend python``.

Skipped unless ``pip install --no-deps nvidia-pytriton`` and ``tritonclient[http,grpc]`` are installed (CI installs
both: README, .ci/run). The server listens on loopback ports picked by the OS and is stopped, stubs and shared memory
included, before the tests that started it return.

Nothing here waits without a bound: the server start (``START_TIMEOUT``), every client call (``CALL_TIMEOUT``), the
stop (SIGTERM, then SIGKILL of the process group). Should something hang anyway, a watchdog fails the test after
``WATCHDOG_S`` seconds: it writes every thread's stack, the kernel stacks of the server processes and the end of the
server logs to stderr, then kills the servers this test process started (so the blocked call returns and the test
fails); pytest-timeout (``HARD_TIMEOUT_S``, thread method) ends the run if even that does not unblock it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rexdeploy.cli.main import main
from rexdeploy.triton import export_triton

WATCHDOG_S = 90.0  # a test (with the module's build + server start on its first test) takes 2 to 30 s
HARD_TIMEOUT_S = 120
START_TIMEOUT = 60.0  # ~4 s here, idle or loaded
CALL_TIMEOUT = 30.0  # one client call (a few ms here)

pytestmark = [pytest.mark.triton, pytest.mark.timeout(HARD_TIMEOUT_S)]

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
    pytest.skip(f"no Triton server here: {exc} (a checkout: pip install --no-deps -r requirements-triton-server.txt)",
                allow_module_level=True)  # fmt: skip


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
    srv = TritonServer(repo, log_path=log, start_timeout=START_TIMEOUT)
    _LOGS.append(log)
    with srv:
        yield srv
    assert srv.process is not None and srv.process.returncode is not None
    assert srv.pids() == [], "server or stub processes left running"
    assert srv.shm_regions() == [], "shared-memory regions left in /dev/shm"
    for port in (srv.http_port, srv.grpc_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


_LOGS: list[Path] = []  # server logs of this module, for the watchdog's report


@pytest.fixture(autouse=True)
def watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs past ``WATCHDOG_S`` with a report of where it stands, and unblock it by killing the
    Triton servers this process started (pytest-timeout's own thread method would end the whole run, leaving
    them running: they are in process groups of their own)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        _report_hang(request.node.nodeid)
        _kill_our_servers()

    timer = threading.Timer(WATCHDOG_S, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired.is_set():
        pytest.fail(f"{request.node.nodeid} hung for {WATCHDOG_S:.0f} s: its servers were killed (report on stderr)")


def _report_hang(nodeid: str) -> None:
    out = sys.__stderr__ or sys.stderr
    out.write(f"\n==== watchdog: {nodeid} still running after {WATCHDOG_S:.0f} s; Python stacks:\n")
    out.flush()
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(file=out, all_threads=True)
    for pid in _descendants(os.getpid()):
        out.write(f"==== pid {pid} {_read(f'/proc/{pid}/cmdline').replace(chr(0), ' ')[:200]}\n")
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            out.write(f"  task {task.name} {_read(task / 'comm').strip()} wchan={_read(task / 'wchan').strip()}\n")
            out.write("".join(f"    {line}\n" for line in _read(task / "stack").splitlines()[:12]))
    for log in _LOGS:
        text = _read(log).splitlines()[-30:]
        out.write(f"==== {log} (last {len(text)} lines)\n" + "".join(f"  {line}\n" for line in text))
    out.flush()


def _kill_our_servers() -> None:
    _kill_tree(os.getpid())


def _kill_tree(root: int) -> None:
    """SIGKILL every process ``root`` started: a process group of its own as a whole (tritonserver and its stubs),
    one in ours (``rexdeploy serve``) alone."""
    own = os.getpgrp()
    for pid in _descendants(root):
        with contextlib.suppress(OSError):
            pgid = os.getpgid(pid)
            if pgid == own:
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(pgid, signal.SIGKILL)


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({exc.strerror})"


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def http_infer(client: Any, model: str, x: np.ndarray) -> np.ndarray:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.asarray(client.infer(model, [tensor]).as_numpy("logits"))  # bounded by the client's network_timeout


def grpc_infer(client: Any, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.asarray(client.infer(model, [tensor], client_timeout=CALL_TIMEOUT).as_numpy("logits"))


def http_client(url: str, concurrency: int = 1) -> Any:
    """An HTTP client whose every call ends within ``CALL_TIMEOUT`` (connect 10 s)."""
    return httpclient.InferenceServerClient(
        url, concurrency=concurrency, connection_timeout=10.0, network_timeout=CALL_TIMEOUT
    )


def test_http_and_grpc_outputs_equal_the_engine(server: TritonServer, engine_outputs: Any, build: Path) -> None:
    x = inputs(6)
    expected = engine_outputs(x)
    with http_client(server.http_url) as http:
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
    with http_client(server.http_url, concurrency=8) as http:
        before = _batches(http.get_inference_statistics("digits_b8"))

        pending = []
        for i in range(len(x)):  # 16 requests in flight on 8 connections: the dynamic batcher gathers them
            tensor = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(x[i : i + 1])
            pending.append(http.async_infer("digits_b8", [tensor]))
        got = np.concatenate([p.get_result(timeout=CALL_TIMEOUT).as_numpy("logits") for p in pending])
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
            grpc.infer("digits", [tensor], client_timeout=CALL_TIMEOUT)
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
    srv = TritonServer(repo, log_path=tmp_path / "log.txt", start_timeout=START_TIMEOUT)
    _LOGS.append(tmp_path / "log.txt")
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
    assert "rexdeploy model wrong_python:" in info.value.log_tail  # the error carries the end of the log
    assert srv.pids() == []
    assert srv.shm_regions() == []


def test_a_server_that_is_not_ready_in_time_is_stopped_with_the_end_of_its_log(build: Path, tmp_path: Path) -> None:
    """The start waits ``start_timeout`` at most; the error names the model still loading and quotes the log."""
    repo = tmp_path / "models"
    result = export_triton(build, repo, backend="python", name="slow")
    model_py = result.model_dir / "1" / "model.py"
    model_py.write_text(  # a model whose initialize takes far longer than the start may wait
        model_py.read_text(encoding="utf-8").replace(
            "    def initialize(self, args: dict[str, str]) -> None:\n",
            "    def initialize(self, args: dict[str, str]) -> None:\n        import time\n\n        time.sleep(600)\n",
        ),
        encoding="utf-8",
    )
    srv = TritonServer(repo, log_path=tmp_path / "log.txt", start_timeout=6.0, stop_timeout=5.0)
    _LOGS.append(tmp_path / "log.txt")
    began = time.monotonic()
    with pytest.raises(ServerError) as info:
        srv.start()
    took = time.monotonic() - began
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("tritonserver was not ready after 6 s (models not ready: slow LOADING)"), message
    assert "the log ends: " in message and "slow" in info.value.log_tail
    assert took < 6.0 + 5.0 + 15.0, f"start + stop took {took:.0f} s"  # the start's bound, then SIGTERM, SIGKILL
    assert srv.pids() == [], "server or stub processes left running"
    assert srv.shm_regions() == [], "shared-memory regions left in /dev/shm"


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
    lines: queue.Queue[str | None] = queue.Queue()  # stderr, read by a thread: every wait below has a deadline
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    err: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT + 30  # the export, then the server's own bounded start
        while not (err and err[-1].startswith("serving ")):  # the "serving" line comes once the server is ready
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            err.append(line)
        assert err and err[-1].startswith("serving 'digits'"), "".join(err)
        assert f"HTTP http://127.0.0.1:{http_port}/v2/models/digits/infer, gRPC 127.0.0.1:{grpc_port}" in err[-1]
        server_pid = next(pid for pid in _children(proc.pid))  # tritonserver: its own process group
        x = inputs(1, seed=3)
        with http_client(f"127.0.0.1:{http_port}") as http:
            np.testing.assert_array_equal(http_infer(http, "digits", x), engine_outputs(x))
        proc.send_signal(stop)
        proc.wait(timeout=60)  # TritonServer.stop: SIGTERM, 15 s, SIGKILL
        reader.join(timeout=10)
    except queue.Empty:
        pytest.fail(f"rexdeploy serve printed no 'serving' line in {START_TIMEOUT + 30:.0f} s: {''.join(err)}")
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.kill()
            proc.wait(timeout=10)
    err.extend(_drain(lines))
    assert proc.returncode == (130 if stop == signal.SIGINT else 128 + stop)
    assert "".join(err).strip().splitlines()[-1] in ("rexdeploy: interrupted", f"rexdeploy: terminated by {stop.name}")
    assert _group(server_pid) == [], "tritonserver or its stubs still running"
    assert list(scratch.iterdir()) == [], "temporary files left behind"
    assert list(Path("/dev/shm").glob(f"rexdeploy_triton_{proc.pid}_*")) == [], "shared memory left in /dev/shm"


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(lines: queue.Queue[str | None]) -> list[str]:
    """The lines already read (up to the end marker)."""
    out = []
    with contextlib.suppress(queue.Empty):
        while (line := lines.get_nowait()) is not None:
            out.append(line)
    return out


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


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found
