"""Load test: a rexdeploy engine served by a real Triton server vs the same engine in-process.

Run (timed runs never overlap: take the shared lock)::

    flock /tmp/rexdeploy-bench.lock python benchmarks/bench_triton_load.py [--models digits,resnet_bn] [--profile auto]
        [--seconds 2] [--max-requests 3000] [--rounds 2]

Needs ``pip install --no-deps nvidia-pytriton`` (the ``tritonserver`` binary and its Python backend) and
``pip install 'rexdeploy[triton,openvino]'`` (tritonclient[http,grpc]); ``resnet_bn`` (the ResNet-style net of
bench_activation_ranges.py) also torch (``.[bench]``). Everything listens on 127.0.0.1 only.

1. ``rexdeploy build MODEL --profile auto --order 2`` for each model (one fixed plan: no budget search).
2. ``rexdeploy export triton --backend python`` twice per model into one repository: ``<model>`` with ``max_batch_size`` 1
   (dynamic batching off) and ``<model>_b8`` with ``max_batch_size`` 8 and ``dynamic_batching {}`` (on); one
   model instance each. The server (:class:`rexdeploy.triton_server.TritonServer`) loads both.
3. Cells: {in-process, triton off, triton on} x concurrency {1, 2, 4, 8}. A cell is ``concurrency`` client threads
   sending single-sample requests back to back (gRPC, one client per thread; in-process: one OpenVINO infer request
   per thread on the engine compiled as the build ran it, ``OpenVINOBuilder.load``). Each cell runs for
   ``--seconds / --rounds`` in each of ``--rounds`` rounds, the cells' order rotated per round (other processes'
   load hits every cell alike), stopping early at ``--max-requests / --rounds`` requests. Also one HTTP cell
   (batching off, concurrency 1).
4. Per cell: p50 / p99 latency of the requests (client side: send to response decoded), throughput (requests per
   second of the cell's wall time), failed requests, Triton's executions per batch size; the server's memory
   (resident set of tritonserver and its Python stubs) after loading and after the load. Server outputs are
   checked equal to the in-process engine's before timing.

Results: ``benchmarks/results/triton_load.{json,md}``, with the CPU model, its flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_models import host_flags
from harness import host_facts

from rexdeploy.triton import export_triton
from rexdeploy.triton_server import TritonServer

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parents[1] / "rexdeploy" / "demo" / "digits_cnn.onnx"
CONCURRENCY = (1, 2, 4, 8)
MAX_BATCH = 8


def model_path(name: str) -> Path:
    if name == "digits":
        return DEMO
    if name == "resnet_bn":
        from bench_activation_ranges import export_resnet_bn

        return export_resnet_bn()
    raise SystemExit(f"unknown --model {name!r}: digits or resnet_bn")


def build(model: Path, out: Path, profile: str) -> Path:
    cmd = [sys.executable, "-m", "rexdeploy.cli.main", "-q", "build", str(model), "--profile", profile,
           "--order", "2", "--out", str(out), "--duration", "0.2s", "--warmup", "0.1s"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def rss_kib(pids: list[int]) -> dict[str, int]:
    """VmRSS (KiB) of each process, by ``name:pid`` (a Python stub: ``stub <model>:pid``, from its model.py path)."""
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = fields.get("Name", "?").strip()
        if name.startswith("triton_python") and len(argv) > 1:
            name = f"stub {Path(argv[1].decode(errors='replace')).parent.parent.name}"
        found[f"{name}:{pid}"] = int(fields.get("VmRSS", "0 kB").split()[0])
    return found


class Cell:
    """One row: a way of running requests at a concurrency; latencies and failures accumulate over rounds."""

    def __init__(self, model: str, name: str, concurrency: int, make_worker: Callable[[], Callable[[], None]]) -> None:
        self.model, self.name, self.concurrency, self.make_worker = model, name, concurrency, make_worker
        self.latencies: list[float] = []
        self.failed = 0
        self.wall = 0.0
        self.errors: list[str] = []

    def run(self, seconds: float, max_requests: int) -> None:
        workers = [self.make_worker() for _ in range(self.concurrency)]
        budget = [max_requests]
        lock = threading.Lock()
        barrier = threading.Barrier(self.concurrency + 1)
        results: list[list[float]] = [[] for _ in workers]
        failures = [0] * len(workers)
        deadline = [0.0]

        def loop(k: int) -> None:
            call = workers[k]
            barrier.wait()
            while time.perf_counter() < deadline[0]:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                start = time.perf_counter()
                try:
                    call()
                except Exception as exc:
                    failures[k] += 1
                    if len(self.errors) < 3:
                        self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                results[k].append(time.perf_counter() - start)

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(workers))]
        for t in threads:
            t.start()
        deadline[0] = time.perf_counter() + seconds
        start = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        self.wall += time.perf_counter() - start
        for r in results:
            self.latencies += r
        self.failed += sum(failures)

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.latencies) * 1e3
        return {
            "model": self.model,
            "cell": self.name,
            "concurrency": self.concurrency,
            "requests": len(self.latencies),
            "failed": self.failed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "mean_ms": float(ms.mean()) if len(ms) else None,
            "throughput_rps": len(self.latencies) / self.wall if self.wall else None,
            "errors": self.errors,
        }


def batch_counts(client: Any, model: str) -> dict[int, int]:
    rows = client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("batch_stats", [])
    return {int(r["batch_size"]): int(r["compute_infer"]["count"]) for r in rows}


class Served:
    """One model: its build, the in-process engine, a probe input and the expected output."""

    def __init__(self, name: str, build_dir: Path, repo: Path) -> None:
        from rexdeploy_openvino import OpenVINOBuilder
        from rexdeploy_openvino.builder import compiled_model

        from rexdeploy.profile import load_profile

        self.name, self.build_dir = name, build_dir
        report = json.loads((build_dir / "report.json").read_text(encoding="utf-8"))
        self.profile = str(report.get("profile", "x86-avx2"))
        export_triton(build_dir, repo, backend="python", name=name)
        export_triton(build_dir, repo, backend="python", name=f"{name}_b8", max_batch=MAX_BATCH)
        builder = OpenVINOBuilder()
        self.engine = builder.load(build_dir / "rex" / "model.xml", load_profile(self.profile))
        (self.input_name, shape), *_ = self.engine.inputs.items()
        self.x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        self.expected = builder.run(self.engine, {self.input_name: self.x})[0]
        self.compiled = compiled_model(self.engine)
        self.output_name = self.compiled.outputs[0].get_any_name()
        self.plan = str(report.get("plan_summary", ""))
        self.max_diff: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet_bn", help="digits (the demo CNN), resnet_bn (default: both)")
    parser.add_argument("--profile", default="auto", help="rexdeploy build --profile (default auto)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per cell, over all rounds (default 2)")
    parser.add_argument("--max-requests", type=int, default=3000, help="requests per cell, at most (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, cells rotated in each (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_load")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-triton.") as tmp:
        repo = Path(tmp) / "models"
        served = []
        for name in args.models.split(","):
            build_dir = build(model_path(name), Path(tmp) / f"build-{name}", args.profile)
            served.append(Served(name, build_dir, repo))
        build_seconds = time.perf_counter() - started

        with TritonServer(repo, log_path=Path(tmp) / "server.log", start_timeout=300) as server:
            memory_loaded = rss_kib(server.pids())

            def grpc_worker(m: Served, model: str) -> Callable[[], Callable[[], None]]:
                def make() -> Callable[[], None]:
                    client = grpcclient.InferenceServerClient(server.grpc_url)
                    tensor = grpcclient.InferInput(m.input_name, list(m.x.shape), "FP32")
                    tensor.set_data_from_numpy(m.x)
                    return lambda: client.infer(model, [tensor]).as_numpy(m.output_name)

                return make

            def http_worker(m: Served) -> Callable[[], Callable[[], None]]:
                def make() -> Callable[[], None]:
                    client = httpclient.InferenceServerClient(server.http_url)
                    tensor = httpclient.InferInput(m.input_name, list(m.x.shape), "FP32")
                    tensor.set_data_from_numpy(m.x)
                    return lambda: client.infer(m.name, [tensor]).as_numpy(m.output_name)

                return make

            def local_worker(m: Served) -> Callable[[], Callable[[], None]]:
                def make() -> Callable[[], None]:
                    request = m.compiled.create_infer_request()

                    def call() -> None:  # as model.py does: set the input, infer, copy the output out
                        request.infer({m.input_name: m.x})
                        request.get_tensor(m.output_name).data.copy()

                    return call

                return make

            models = [model for m in served for model in (m.name, f"{m.name}_b8")]
            with grpcclient.InferenceServerClient(server.grpc_url) as check:
                for m in served:
                    for model in (m.name, f"{m.name}_b8"):
                        tensor = grpcclient.InferInput(m.input_name, list(m.x.shape), "FP32")
                        tensor.set_data_from_numpy(m.x)
                        got = check.infer(model, [tensor]).as_numpy(m.output_name)
                        m.max_diff[model] = float(np.abs(got - m.expected).max())
                        print(f"{model}: largest difference from the in-process engine: {m.max_diff[model]}")
                before = {model: batch_counts(check, model) for model in models}

            cells = []
            for m in served:
                for c in CONCURRENCY:
                    cells += [
                        Cell(m.name, "in-process", c, local_worker(m)),
                        Cell(m.name, "triton gRPC, batching off", c, grpc_worker(m, m.name)),
                        Cell(m.name, "triton gRPC, dynamic batching", c, grpc_worker(m, f"{m.name}_b8")),
                    ]
                cells.append(Cell(m.name, "triton HTTP, batching off", 1, http_worker(m)))
            per_round = args.seconds / args.rounds
            for r in range(args.rounds):
                shift = r * len(cells) // args.rounds
                for cell in cells[shift:] + cells[:shift]:
                    cell.run(per_round, args.max_requests // args.rounds)
                print(f"round {r + 1}/{args.rounds} done", flush=True)

            with grpcclient.InferenceServerClient(server.grpc_url) as check:
                after = {model: batch_counts(check, model) for model in models}
            memory_after = rss_kib(server.pids())
        left = server.pids()

    rows = [cell.summary() for cell in cells]
    executions = {m: {b: after[m].get(b, 0) - before[m].get(b, 0) for b in sorted(after[m])} for m in after}
    doc = {
        "benchmark": "triton_load",
        "host": {**host_facts(), "flags": host_flags()},
        "models": {
            m.name: {
                "profile": m.profile,
                "plan": m.plan,
                "input_shape": list(m.x.shape),
                "engine_options": m.engine.options,
                "server_vs_engine_max_abs_diff": m.max_diff,
            }
            for m in served
        },
        "settings": {
            "seconds_per_cell": args.seconds,
            "rounds": args.rounds,
            "max_requests_per_cell": args.max_requests,
            "max_batch_size_batched": MAX_BATCH,
            "instances": 1,
            "listen": "127.0.0.1",
        },
        "rows": rows,
        "executions_per_batch_size": executions,
        "server_memory_kib": {"after_load": memory_loaded, "after_requests": memory_after},
        "processes_left_after_stop": left,
        "build_seconds": round(build_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    host, s = doc["host"], doc["settings"]
    lines = [
        "# Triton load test: rexdeploy engines on the Python backend vs in-process",
        "",
        f"Host: {host['cpu']}, {host['cores']} cores ({host['flags']}), load average {host['load_avg_1_5_15']} at the "
        f"end, {host['date']}. OpenVINO {host['versions'].get('openvino')}.",
        f"One sample per request; {s['seconds_per_cell']} s per cell over {s['rounds']} rotated rounds (at most "
        f"{s['max_requests_per_cell']} requests); one model instance; batched models: max_batch_size "
        f"{s['max_batch_size_batched']}, dynamic_batching {{}}; clients are threads of one Python process, the "
        f"server listens on {s['listen']}. Latency is the client's (request sent to output decoded).",
    ]
    for name, info in doc["models"].items():
        local = {r["concurrency"]: r for r in doc["rows"] if r["model"] == name and r["cell"] == "in-process"}
        lines += [
            "",
            f"## {name}: input {info['input_shape']}, profile {info['profile']}, {info['plan']}",
            "",
            f"Engine options (runtime_options.json, also what model.py compiles with): {info['engine_options']}. "
            f"Server output vs the in-process engine's, largest difference: {info['server_vs_engine_max_abs_diff']}.",
            "",
            "| cell | concurrency | requests | failed | p50 ms | p99 ms | throughput req/s | p50 vs in-process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in doc["rows"] if r["model"] == name):
            base = local.get(r["concurrency"])
            ratio = (
                f"{r['p50_ms'] / base['p50_ms']:.1f}x"
                if base and r["p50_ms"] and base["p50_ms"] and r["cell"] != "in-process"
                else ""
            )
            p50 = f"{r['p50_ms']:.3f}" if r["p50_ms"] is not None else "-"
            p99 = f"{r['p99_ms']:.3f}" if r["p99_ms"] is not None else "-"
            rps = f"{r['throughput_rps']:.0f}" if r["throughput_rps"] else "-"
            lines.append(
                f"| {r['cell']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {p50} | {p99} | {rps} "
                f"| {ratio} |"
            )
        batched = doc["executions_per_batch_size"].get(f"{name}_b8", {})
        lines += ["", f"Executions per batch size of {name}_b8 during the load: {batched}."]
    mem = doc["server_memory_kib"]
    total_before, total_after = sum(mem["after_load"].values()), sum(mem["after_requests"].values())
    lines += [
        "",
        f"Server memory (resident set, tritonserver + one Python stub per model): {total_before / 1024:.1f} MiB after "
        f"loading, {total_after / 1024:.1f} MiB after the requests "
        f"({', '.join(f'{k} {v / 1024:.1f}' for k, v in mem['after_requests'].items())} MiB).",
        f"Processes left after the server stopped: {len(doc['processes_left_after_stop'])}. "
        f"Failed requests in all: {sum(r['failed'] for r in doc['rows'])}. Builds {doc['build_seconds']} s, wall "
        f"time {doc['wall_seconds']} s.",
        "",
        "Noisy: measured on a 2-core machine shared with other engineers' benchmarks (see the load average), and the "
        "client threads share those cores with the server; compare cells within this run, not across runs.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
