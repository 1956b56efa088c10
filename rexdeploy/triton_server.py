"""Run the Triton Inference Server that ships in the ``nvidia-pytriton`` wheel (Python backend only).

``pip install --no-deps nvidia-pytriton`` puts a ``tritonserver`` binary (``pytriton/tritonserver/bin``), the
Python backend and one Python-backend stub per Python version into site-packages; the shared libraries sit in
``nvidia_pytriton.libs``. (``--no-deps``: the wheel's Python requirements, numpy < 2 among them, are for PyTriton's
own Python API, which rexdeploy does not use; the server binary needs none of them.)

:class:`TritonServer` lays out a backend directory holding the stub for the running Python, starts the server on
loopback ports with a model repository (``rexdeploy export triton --backend python``), waits until it is ready,
and on exit stops it (SIGTERM, then SIGKILL after a grace period) together with its stub processes, which run in
its own process group. Every wait is bounded: the start by ``start_timeout`` (then a :class:`ServerError` carrying the
end of the server log), the stop by ``stop_timeout`` plus a few seconds after SIGKILL. The Python backend's
shared-memory regions (``/dev/shm``) get a prefix of their own per server and are removed on stop, also after a
SIGKILL (which leaves them behind).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rexdeploy.errors import EngineUnavailableError, InputError, RexError

INSTALL_HINT = "pip install --no-deps nvidia-pytriton"


SHM_DIR = Path("/dev/shm")


_LOADING = re.compile(r'"loading: (.+):\d+"')
_LOADED = re.compile(r"\"successfully loaded '(.+?)'")
# what the server logs as errors on every host without a CUDA driver (it carries on on the CPU)
_CPU_HOST_NOTES = ("CudaDriverHelper has not been initialized", "CUDA driver")


class ServerError(RexError):
    """The Triton server did not start, did not load the repository, or did not stop.

    ``log_tail``: the last lines of the server log when it was raised ("" when there was none)."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled server's pieces are."""

    binary: Path
    backend: Path  # pytriton/tritonserver/backends/python: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # the triton_python_backend_stub built for the running Python
    libs: Path  # nvidia_pytriton.libs (older wheels: tritonserver/external_libs)


def find_install() -> TritonInstall:
    """The ``nvidia-pytriton`` server of this environment; EngineUnavailableError when it is missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailableError(f"the Triton server is not installed: {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libs = next(
        (p for p in (package.parent / "nvidia_pytriton.libs", root / "external_libs") if p.is_dir()),
        package.parent / "nvidia_pytriton.libs",
    )
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=libs,
    )
    for path in (install.binary, install.backend / "libtriton_python.so", install.libs):
        if not path.exists():
            raise EngineUnavailableError(f"{path} is missing from the nvidia-pytriton install: {INSTALL_HINT}")
    if not install.stub.is_file():
        raise EngineUnavailableError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} ({install.stub.parent.parent} lists "
            f"{', '.join(sorted(p.name for p in install.stub.parent.parent.iterdir()))}): run rexdeploy on one of those"
        )
    return install


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _library_path(install: TritonInstall) -> str:
    """``LD_LIBRARY_PATH`` for the server and the stub: the running Python's libpython (so the stub embeds the
    same interpreter as the one that exported the model, where it has a shared one), then the wheel's libraries."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    entries = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / f"libpython{version}.so.1.0").is_file():
        entries.append(str(libdir))
    entries.append(str(install.libs))
    if os.environ.get("LD_LIBRARY_PATH"):
        entries.append(os.environ["LD_LIBRARY_PATH"])
    return os.pathsep.join(entries)


class TritonServer:
    """The bundled ``tritonserver`` on ``repository``, as a context manager::

        with TritonServer("models/") as server:
            client = tritonclient.http.InferenceServerClient(server.http_url)

    Ports: 0 picks free ones. ``host`` is where HTTP and gRPC listen (loopback by default; metrics are off).
    ``log_path``: the server log (default: a file in the server's scratch directory, removed on exit;
    :meth:`log_tail` reads it). ``start_timeout`` bounds the wait for every model to be ready.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        log_path: str | Path | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        verbose: int = 0,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise InputError(f"model repository {self.repository} not found: export one with rexdeploy export triton")
        self.install = find_install()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.verbose = verbose
        self._log_given = Path(log_path) if log_path is not None else None
        # the Python backend names its shared-memory regions <prefix><uuid>: ours alone start with this one
        self.shm_prefix = f"rexdeploy_triton_{os.getpid()}_{uuid.uuid4().hex[:12]}_"
        self._scratch: Path | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backend_dir: Path) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 5)}",
            f"--log-verbose={self.verbose}",
        ]

    def start(self) -> TritonServer:
        """Start the server and wait until it is ready; ServerError (with the log's last error) if it is not."""
        self._scratch = Path(tempfile.mkdtemp(prefix="rexdeploy-triton."))
        try:
            backend_dir = self._scratch / "backends"
            python_dir = backend_dir / "python"
            python_dir.mkdir(parents=True)
            for item in self.install.backend.iterdir():
                if item.is_file():
                    shutil.copyfile(item, python_dir / item.name)
            stub = python_dir / "triton_python_backend_stub"
            shutil.copyfile(self.install.stub, stub)
            stub.chmod(0o755)
            self.log_path = self._log_given or self._scratch / "tritonserver.log"
            env = {**os.environ, "LD_LIBRARY_PATH": _library_path(self.install)}
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(backend_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: the stubs are stopped with it, not by a Ctrl-C
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the readiness endpoint (every model loaded) until ``start_timeout``; ServerError otherwise."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with status {code} while starting: {self.last_error() or 'no error logged'}",
                    self.log_tail(),
                )
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                with urllib.request.urlopen(url, timeout=min(2.0, max(left, 0.1))) as response:
                    if response.status == 200 and self._listening():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(min(0.1, max(left, 0.0)))
        states = self.model_states()
        waiting = ", ".join(f"{name} {state}" for name, state in states.items() if state != "READY")
        tail = self.log_tail(8)
        where = f" (log: {self._log_given})" if self._log_given is not None else ""
        raise ServerError(
            f"tritonserver was not ready after {self.start_timeout:.0f} s"
            + (f" (models not ready: {waiting})" if waiting else "")
            + f"{where}: {self.last_error() or 'no error logged'}; the log ends: "
            + (" | ".join(line.strip() for line in tail.splitlines() if line.strip()) or "(empty)")
            + "; raise start_timeout if the host is slow, or read the log",
            self.log_tail(),
        )

    def _listening(self) -> bool:
        """Whether this server's log says it opened both endpoints: a "ready" answer could come from another server
        that bound the port between :func:`free_port` and this server's start (this one then fails to bind)."""
        started = [line for line in self._log_lines() if '"Started ' in line]
        return all(
            any(service in line and line.rstrip().endswith(f':{port}"') for line in started)
            for service, port in (("HTTPService", self.http_port), ("GRPCInferenceService", self.grpc_port))
        )

    def model_states(self) -> dict[str, str]:
        """Each model of the repository and its state (READY, LOADING, UNAVAILABLE): as the server reports it, or,
        while its endpoints are not up yet (they open once the first load is over), as its log tells."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2.0) as response:
                rows = json.loads(response.read().decode("utf-8"))
            return {str(r.get("name")): str(r.get("state", "")) for r in rows if isinstance(r, dict)}
        except (urllib.error.URLError, OSError, ValueError):
            pass
        states: dict[str, str] = {}
        for line in self._log_lines():
            if (found := _LOADING.search(line)) is not None:
                states[found.group(1)] = "LOADING"
            elif (found := _LOADED.search(line)) is not None:
                states[found.group(1)] = "READY"
        return states

    def _log_lines(self) -> list[str]:
        if self.log_path is None or not self.log_path.is_file():
            return []
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._log_lines()[-lines:])

    def last_error(self) -> str:
        """The last error line of the server log (a model's load failure comes first), on one line. The error a
        CPU-only host always logs (no CUDA driver) is not one."""
        lines = [line for line in self._log_lines() if not any(note in line for note in _CPU_HOST_NOTES)]
        ours = [line for line in lines if "rexdeploy model " in line and line.startswith("E")]
        errors = ours or [line for line in lines if line.startswith("E")] or [line for line in lines if "rror" in line]
        if not errors:
            return ""
        text = errors[-1]
        text = text.split("] ", 1)[-1].strip().strip('"')
        return text.split("\\n", 1)[0]

    def pids(self) -> list[int]:
        """The processes of the server's process group (the server and its stubs) still running."""
        if self.process is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z":  # pgid, state
                found.append(int(entry.name))
        return sorted(found)

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        if self.process is None:
            raise ServerError("tritonserver is not running: start() it first")
        return self.process.wait()

    def shm_regions(self) -> list[Path]:
        """The Python backend's shared-memory regions of this server still in ``/dev/shm``."""
        if not SHM_DIR.is_dir():
            return []
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def stop(self) -> None:
        """SIGTERM the server (it unloads the models and ends the stubs), SIGKILL the group after ``stop_timeout``
        or at once when a second stop signal (KeyboardInterrupt) arrives meanwhile; then remove what a killed
        server leaves behind (shared-memory regions, the scratch directory). Bounded: ``stop_timeout`` + ~10 s."""
        process = self.process
        try:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group()
            deadline = time.monotonic() + 5.0
            while self.pids() and time.monotonic() < deadline:  # the stubs end shortly after the server
                time.sleep(0.05)
            if self.pids():
                self._kill_group()
        except BaseException:
            self._kill_group()
            raise
        finally:
            for region in self.shm_regions():  # left by a killed server or stub
                with contextlib.suppress(OSError):
                    region.unlink()
            if self._scratch is not None:  # the backend copy (and the log, unless log_path was given)
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None

    def _kill_group(self) -> None:
        """SIGKILL the server's process group and wait (up to 5 s) until it is gone."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        deadline = time.monotonic() + 5.0
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
