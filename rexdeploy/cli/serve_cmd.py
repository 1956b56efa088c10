"""``rexdeploy serve BUILD_DIR``: the engine of a build behind a local Triton server (HTTP + gRPC) until stopped.

Exports a Python-backend model (``rexdeploy export triton --backend python``) into a temporary repository (or
``--repository DIR``), starts the ``tritonserver`` of the ``nvidia-pytriton`` wheel on it
(:class:`rexdeploy.triton_server.TritonServer`) and waits. Ctrl-C or SIGTERM stops the server and its stubs and
removes the temporary repository (exit 130 / 143, as every command); a server that dies is an error (exit 1).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a built engine on a local Triton server (HTTP and gRPC) until Ctrl-C",
        description="Serve the engine of a rexdeploy build directory with the Triton Inference Server bundled in "
        "the nvidia-pytriton wheel (pip install --no-deps nvidia-pytriton; Python backend, OpenVINO engines), "
        "loaded with the runtime options it was measured with. Stops cleanly on Ctrl-C or SIGTERM.",
    )
    p.add_argument("build_dir", metavar="BUILD_DIR", help="rexdeploy build --out directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: a free one)")
    p.add_argument("--name", help="model name (default: the model file's stem)")
    p.add_argument("--max-batch", type=int, help="max_batch_size; above 1 Triton's dynamic batcher gathers requests")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--which", default="rex", help="which engine of the build: rex (default) or fp32")
    p.add_argument("--repository", help="write the model repository here and keep it (default: a temporary one)")
    p.add_argument("--log", help="write the server log to this file (default: kept only while serving)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rexdeploy.errors import InputError
    from rexdeploy.triton import export_triton
    from rexdeploy.triton_server import ServerError, TritonServer, find_install

    find_install()  # before exporting: say first that the server is missing
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port <= 65535:
            raise InputError(f"{flag} {port} is not a TCP port: use 0..65535 (0: a free one)")
    with tempfile.TemporaryDirectory(prefix="rexdeploy-serve.") as tmp:
        repository = Path(args.repository) if args.repository else Path(tmp) / "models"
        result = export_triton(
            args.build_dir,
            repository,
            name=args.name,
            max_batch=args.max_batch,
            instances=args.instances,
            which=args.which,
            backend="python",
        )
        name = result.config.name
        server = TritonServer(
            repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, log_path=args.log
        )
        common.progress(f"starting tritonserver ({server.install.binary}) on {repository}")
        try:
            server.start()
            common.stderr(
                f"serving {name!r} (max_batch_size {result.config.max_batch_size}): HTTP http://{server.http_url}"
                f"/v2/models/{name}/infer, gRPC {server.grpc_url}; Ctrl-C to stop"
            )
            code = server.wait()  # until the server dies, or a stop signal raises here
            error = server.last_error() or "no error logged"
        finally:
            server.stop()
        raise ServerError(f"tritonserver exited with status {code} while serving: {error}")
