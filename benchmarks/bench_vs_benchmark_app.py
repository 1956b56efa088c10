"""Acceptance check of ``rexdeploy bench``: our OpenVINO median vs ``benchmark_app -hint latency``.

Run: ``python benchmarks/bench_vs_benchmark_app.py [--rounds 7] [--duration 3] [--max-load 1.0] [--same-inputs]``.

For four models — the shipped demo CNN, its REx-expanded Q/DQ form (``expand_model(..., order=2)`` for
this host's ``auto`` profile), a heavier generated CNN (6 conv 64→64 3x3 + ReLU on 56x56, FP32) and
its REx-expanded form — round after round, two separate processes time the *same file* one after the
other (the order alternating from round to round, so both share the machine's noise), like with like:

- a plain (FP32) model: the ``.onnx`` file itself — ``rexdeploy bench model.onnx`` (``--profile auto``: it
  builds and times with the engine's options, OpenVINO's default float precision for a plain model) against
  ``benchmark_app -m model.onnx`` with **no** ``-infer_precision`` (OpenVINO's default);
- a REx engine: the IR ``OpenVINOBuilder.build`` wrote (``model.xml`` beside ``runtime_options.json``) —
  ``rexdeploy bench model.xml`` (it compiles with the stored options) against ``benchmark_app -m model.xml
  -infer_precision <the stored INFERENCE_PRECISION_HINT>``;

both as ``rexdeploy bench FILE --duration 3s --warmup 200ms --json`` and ``benchmark_app -m FILE -d CPU -hint
latency -t 3 -shape ... [-infer_precision P] -report_type no_counters -report_folder ... -json_stats`` (its
"Median:" latency line, in µs/ms, is parsed from stdout: the JSON report rounds latencies to 0.01 ms). The
inference precision each tool really compiled with is recorded and compared (ours: the ``options`` of
``rexdeploy bench --json``; benchmark_app: the ``INFERENCE_PRECISION_HINT`` line of the compiled model's
properties it prints).

For context each round also times the IR in this process with a plain Python clock around
``start_async(); wait()`` — how ``OpenVINOBuilder.time`` measured before it switched to
``InferRequest.latency`` — to show the Python loop's overhead on small models.

The verdict per model: our median latency in our best round against benchmark_app's in its best round,
within ±10 % (the median over rounds and the median of the back-to-back ratios are reported too; see
the Markdown for why the best round). Writes ``benchmarks/results/bench_vs_benchmark_app.{json,md}`` with
the load average and, per measurement, the CPU other processes used (the machine may be shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rexdeploy_openvino import OpenVINOBuilder

from rexdeploy.api import expand_model
from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.timing import measure, random_inputs
from rexdeploy.demo import demo_model_path
from rexdeploy.graph import load_model, save_model
from rexdeploy.profile import Profile, load_profile

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.10
_MEDIAN_RE = re.compile(r"Median:\s*([0-9.]+)\s*(us|µs|ms)")
_UNIT_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0}
_OV_TYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}  # benchmark_app prints <Type: 'bfloat16'>


def _type_name(value: Any) -> str:
    """An OpenVINO element type as benchmark_app's ``-infer_precision`` spells it (``bf16``, ``f32``)."""
    return str(value.get_type_name() if hasattr(value, "get_type_name") else value)


def _precision_name(match: re.Match[str] | None) -> str | None:
    return None if match is None else (match.group(1) or match.group(2))


def conv6(channels: int = 64, size: int = 56, layers: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[1,C,S,S] → (Conv CxC 3x3 pad 1 + bias → Relu) x ``layers``, FP32, He-normal weights."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev = "x"
    std = np.sqrt(2.0 / (channels * 9))
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) * std).astype(np.float32)
        b = (rng.standard_normal(channels) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "conv6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_models(work: Path, profile: Profile) -> dict[str, Path]:
    """The four ONNX models of the comparison, written into ``work``."""
    demo = work / "demo_fp32.onnx"
    shutil.copyfile(demo_model_path(), demo)
    heavy = work / "conv6_fp32.onnx"
    onnx.save(conv6(), str(heavy))

    def rex(src: Path, name: str) -> Path:
        return save_model(expand_model(load_model(src), profile=profile, order=2).model, work / f"{name}.onnx")

    return {
        "demo FP32": demo,
        "demo REx K=2": rex(demo, "demo_rex"),
        "conv6 FP32": heavy,
        "conv6 REx K=2": rex(heavy, "conv6_rex"),
    }


def host_flags() -> str:
    """The CPU flags that decide OpenVINO's kernels and default precision here."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return " ".join(f for f in wanted if f in flags) or "flags unknown"


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_load(max_load: float | None, timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) until the 1-minute load average is below ``max_load``; return it."""
    deadline = time.monotonic() + timeout_s
    while max_load is not None and load1() > max_load and time.monotonic() < deadline:
        time.sleep(5.0)
    return load1()


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, CPU-busy seconds of the whole machine, CPU seconds of this process and its waited children)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return time.monotonic(), busy, own


def foreign_cores(before: tuple[float, float, float]) -> float:
    """CPU cores other processes kept busy on average since ``before`` (the machine's noise)."""
    after = _cpu_snapshot()
    wall = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else 0.0


def run_ours(xml: Path, duration: float, warmup: float) -> dict[str, Any]:
    """``rexdeploy bench FILE --json`` in its own process (an ONNX file is built first, with ``--profile auto``)."""
    cmd = [sys.executable, "-m", "rexdeploy", "bench", str(xml), "--duration", f"{duration}s"]
    cmd += ["--warmup", f"{warmup * 1000:g}ms", "--json"]
    before = _cpu_snapshot()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    other = foreign_cores(before)
    if proc.returncode != 0:
        raise SystemExit(f"rexdeploy bench failed on {xml}: {proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    t = doc["timing"]
    return {
        "median_ms": t["median_ms"],
        "mean_ms": t["mean_ms"],
        "cov": t["cov"],
        "runs": t["runs"],
        "inference_precision": doc["engine"]["options"].get("INFERENCE_PRECISION_HINT"),
        "precisions": doc["precisions"],
        "foreign_cores": round(other, 2),
    }


def benchmark_app_exe() -> str | None:
    """``benchmark_app`` on PATH, else the one installed beside this Python (a virtual environment not activated)."""
    found = shutil.which("benchmark_app")
    beside = Path(sys.executable).parent / "benchmark_app"
    return found or (str(beside) if beside.is_file() else None)


def benchmark_app_cmd(
    xml: Path,
    shapes: dict[str, tuple[int, ...]],
    duration: float,
    report: Path,
    inputs: dict[str, Path] | None,
    infer_precision: str | None,
) -> list[str]:
    """benchmark_app on ``xml`` (an IR or an ONNX file); ``infer_precision`` None: OpenVINO's default."""
    shape = ",".join(f"{name}[{','.join(map(str, dims))}]" for name, dims in shapes.items())
    cmd = [
        *[benchmark_app_exe() or "benchmark_app", "-m", str(xml), "-d", "CPU", "-hint", "latency"],
        *["-t", f"{duration:g}", "-shape", shape],
        *(["-infer_precision", infer_precision] if infer_precision else []),
        *["-report_type", "no_counters", "-report_folder", str(report), "-json_stats"],
    ]
    if inputs:
        cmd += ["-i", ",".join(f"{name}:{path}" for name, path in inputs.items())]
    return cmd


def run_benchmark_app(cmd: list[str], report: Path) -> dict[str, Any]:
    report.mkdir(parents=True, exist_ok=True)
    before = _cpu_snapshot()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    other = foreign_cores(before)
    text = proc.stdout + proc.stderr
    match = _MEDIAN_RE.search(text)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"benchmark_app failed ({proc.returncode}): {text[-2000:]}")
    stats = json.loads((report / "benchmark_report.json").read_text())
    setup, results = stats["configuration_setup"], stats["execution_results"]
    streams = re.search(r"NUM_STREAMS:\s*(\d+)", text)
    threads = re.search(r"INFERENCE_NUM_THREADS:\s*(\d+)", text)
    precision = re.search(r"INFERENCE_PRECISION_HINT:\s*(?:<Type:\s*'([^']+)'>|(\S+))", text)
    return {
        "median_ms": float(match.group(1)) * _UNIT_MS[match.group(2)],
        "mean_ms": float(results["avg latency"]),  # rounded to 0.01 ms by benchmark_app
        "runs": int(results["total number of iterations"]),
        "api": setup["API"],
        "nireq": int(setup["number of parallel infer requests"]),
        "streams": int(streams.group(1)) if streams else None,
        "threads": int(threads.group(1)) if threads else None,
        "inference_only": bool(setup.get("inference_only", False)),
        "inference_precision": _OV_TYPE.get(name, name) if (name := _precision_name(precision)) else None,
        "foreign_cores": round(other, 2),
    }


def run_python_clock(xml: Path, profile: Profile, duration: float, warmup: float, seed: int = 0) -> float:
    """Median of a Python clock around ``start_async(); wait()`` (how ``OpenVINOBuilder.time`` measured
    before it used ``InferRequest.latency``), in ms, on the same seeded inputs."""
    import openvino as ov

    engine = OpenVINOBuilder().load(xml, profile)
    request = engine.handle.create_infer_request()
    for index, array in enumerate(seeded_inputs(engine, seed).values()):
        request.set_input_tensor(index, ov.Tensor(array))

    def infer() -> None:
        request.start_async()
        request.wait()

    return measure(infer, TimingSettings(warmup_s=warmup, duration_s=duration)).median_ms


def seeded_inputs(engine: Engine, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs ``rexdeploy bench`` times with (seed 0), in the compiled model's dtypes."""
    dtypes = {
        name: np.dtype(port.get_element_type().to_dtype())
        for name, port in zip(engine.inputs, engine.handle.inputs, strict=True)
    }
    return random_inputs(engine.inputs, dtypes, seed)


def cov_of(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def compare(label: str, engine: Engine, source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both tools on ``source``: the ONNX file of a plain model (benchmark_app with OpenVINO's default precision),
    or the IR of a built engine (benchmark_app with the precision stored in its ``runtime_options.json``)."""
    profile = load_profile("auto")
    xml = engine.artifacts[0]
    plain = source.suffix == ".onnx"
    infer_precision = None if plain else engine.options.get("INFERENCE_PRECISION_HINT")
    report = xml.parent / "benchmark_app_report"
    inputs: dict[str, Path] | None = None
    if args.same_inputs:
        inputs = {}
        for name, array in seeded_inputs(engine).items():
            inputs[name] = xml.parent / f"input_{len(inputs)}.npy"
            np.save(inputs[name], array)
    cmd = benchmark_app_cmd(source, dict(engine.inputs), args.duration, report, inputs, infer_precision)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {
            "round": r + 1,
            "load1_before": round(wait_for_load(args.max_load, args.load_timeout), 2),
        }
        order = ("ours", "benchmark_app") if r % 2 == 0 else ("benchmark_app", "ours")
        for who in order:
            row[who] = run_ours(source, args.duration, args.warmup) if who == "ours" else run_benchmark_app(cmd, report)
        row["python_clock_median_ms"] = run_python_clock(xml, profile, 1.0, args.warmup)
        row["ratio"] = row["ours"]["median_ms"] / row["benchmark_app"]["median_ms"]
        rounds.append(row)
        print(
            f"{label:<14} round {r + 1}: ours ({row['ours']['inference_precision']}) "
            f"{row['ours']['median_ms'] * 1000:9.1f} us  benchmark_app ({row['benchmark_app']['inference_precision']}) "
            f"{row['benchmark_app']['median_ms'] * 1000:9.1f} us  ratio {row['ratio']:.3f}  "
            f"(python clock {row['python_clock_median_ms'] * 1000:.1f} us; other processes "
            f"{row['ours']['foreign_cores']:.2f} / {row['benchmark_app']['foreign_cores']:.2f} cores)",
            file=sys.stderr,
            flush=True,
        )
    ours = [row["ours"]["median_ms"] for row in rounds]
    theirs = [row["benchmark_app"]["median_ms"] for row in rounds]
    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    paired = statistics.median(row["ratio"] for row in rounds)
    clock = min(row["python_clock_median_ms"] for row in rounds)
    best = min(*ours, *theirs)
    ours_prec = sorted({str(row["ours"]["inference_precision"]) for row in rounds})
    theirs_prec = sorted({str(row["benchmark_app"]["inference_precision"]) for row in rounds})
    return {
        "model": label,
        "file": source.name,
        "benchmark_app_infer_precision": infer_precision or "(none: OpenVINO's default)",
        "inference_precision_ours": ours_prec,
        "inference_precision_benchmark_app": theirs_prec,
        "same_precision": ours_prec == theirs_prec and len(ours_prec) == 1,
        "inputs": {k: list(v) for k, v in engine.inputs.items()},
        "precisions": OpenVINOBuilder().precision_summary(engine),
        "benchmark_app_command": " ".join(cmd),
        "rounds": rounds,
        "ours_median_ms": ours_med,
        "benchmark_app_median_ms": theirs_med,
        "ratio_of_medians": ours_med / theirs_med,
        "paired_ratio_median": paired,
        "ours_best_ms": min(ours),
        "benchmark_app_best_ms": min(theirs),
        "ratio_of_best_rounds": min(ours) / min(theirs),
        "within_10pct": abs(min(ours) / min(theirs) - 1.0) <= TOLERANCE,
        "within_10pct_paired": abs(paired - 1.0) <= TOLERANCE,
        "fast_rounds": {
            "ours": sum(v <= (1.0 + TOLERANCE) * best for v in ours),
            "benchmark_app": sum(v <= (1.0 + TOLERANCE) * best for v in theirs),
        },
        "ours_within_run_cov_median": statistics.median(row["ours"]["cov"] for row in rounds),
        "ours_round_to_round_cov": cov_of(ours),
        "benchmark_app_round_to_round_cov": cov_of(theirs),
        "foreign_cores_median": statistics.median(
            row[who]["foreign_cores"] for row in rounds for who in ("ours", "benchmark_app")
        ),
        "python_clock_best_ms": clock,
        "python_clock_ratio": clock / min(theirs),
    }


def _us(ms: float) -> str:
    return f"{ms * 1000:.1f} us" if ms < 1.0 else f"{ms:.2f} ms"


def markdown(doc: dict[str, Any]) -> str:
    st = doc["settings"]
    inputs = "our seeded inputs (`-i name:file.npy`)" if st["same_inputs"] else "its own random fill"
    out = [
        "# `rexdeploy bench` vs `benchmark_app -hint latency` (OpenVINO CPU, same file)",
        "",
        f"`{doc.get('command', 'python benchmarks/bench_vs_benchmark_app.py')}` — like with like on the same file: "
        "a plain FP32 model is timed as its `.onnx` file by `rexdeploy bench model.onnx` (`--profile auto`: "
        "built and timed with the engine's options — OpenVINO's default float precision for a plain model) and by "
        "`benchmark_app -m model.onnx` with **no** `-infer_precision`; a REx engine is timed as the IR `build` "
        "wrote, by `rexdeploy bench model.xml` (its stored `runtime_options.json`) and by `benchmark_app -m "
        "model.xml -infer_precision <the stored precision>`. Each of "
        f"{st['rounds']} rounds runs `rexdeploy bench FILE --duration {st['duration_s']:g}s --json` and "
        f"`benchmark_app -m FILE -d CPU -hint latency -t {st['duration_s']:g} -shape ... [-infer_precision P] "
        f"-report_type no_counters ...` (fed {inputs}) as separate processes, one right after the other, the "
        "order alternating from round to round. Each tool's figure per round is its median latency. "
        "*Best round*: the lowest of those over the rounds, per tool — the acceptance figure (ours / "
        "benchmark_app within ±10 %): on the small models a run of either tool lands at one of two latency "
        "levels (see below), so a median over a handful of runs depends on where each landed, and other work "
        "on the shared machine slows some rounds; the best round compares the two tools undisturbed, in the "
        "same mode. *Median of rounds* and "
        "*paired ratio* (median over rounds of ours / benchmark_app measured back to back) are given too.",
        "",
        "| model | file | precision ours / b_app (`-infer_precision`) | ours, best round | benchmark_app, best round "
        "| ratio | within ±10 % "
        "| ours / b_app, median of rounds | paired ratio | paired within ±10 % | rounds within 10 % of the best, "
        "ours / b_app "
        "| our in-run CoV | round-to-round CoV ours / b_app | other processes (cores) | Python-clock loop / b_app |",
        "|---|---|---|---:|---:|---:|:---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for m in doc["models"]:
        n = len(m["rounds"])
        out.append(
            f"| {m['model']} | `{m['file']}` | {'/'.join(m['inference_precision_ours'])} / "
            f"{'/'.join(m['inference_precision_benchmark_app'])} (`{m['benchmark_app_infer_precision']}`) "
            f"| {_us(m['ours_best_ms'])} | {_us(m['benchmark_app_best_ms'])} "
            f"| {m['ratio_of_best_rounds']:.3f} | {'yes' if m['within_10pct'] else 'NO'} "
            f"| {_us(m['ours_median_ms'])} / {_us(m['benchmark_app_median_ms'])} = {m['ratio_of_medians']:.3f} "
            f"| {m['paired_ratio_median']:.3f} | {'yes' if m.get('within_10pct_paired') else 'NO'} "
            f"| {m['fast_rounds']['ours']}/{n} / {m['fast_rounds']['benchmark_app']}/{n} "
            f"| {m['ours_within_run_cov_median']:.1%} "
            f"| {m['ours_round_to_round_cov']:.1%} / {m['benchmark_app_round_to_round_cov']:.1%} "
            f"| {m['foreign_cores_median']:.2f} | {m['python_clock_ratio']:.2f} |"
        )
    first = doc["models"][0]["rounds"][0]["benchmark_app"]
    load = doc["load"]
    out += [
        "",
        f"**All within ±10 % by best round: {'yes' if doc['all_within_10pct'] else 'no'}; by paired ratio: "
        f"{'yes' if all(m.get('within_10pct_paired') for m in doc['models']) else 'no'}. Both tools ran the same "
        f"inference precision on every model: {'yes' if doc.get('all_same_precision') else 'NO'}.**",
        *(["", doc["note"]] if doc.get("note") else []),
        "",
        f"benchmark_app ran with the `{first['api']}` API, {first['nireq']} infer request(s), "
        f"{first['streams']} stream(s), {first['threads']} inference thread(s), inference-only "
        f"{'yes' if first['inference_only'] else 'no'} (inputs set once) — as `rexdeploy bench` does: one "
        "synchronous request, inputs set once, `PERFORMANCE_HINT=LATENCY`, and the inference precision in the "
        "table's third column (each tool's compiled model reports it).",
        "",
        "Which verdict to read: the best round compares each tool undisturbed, which works when some rounds of "
        "both tools run on a quiet machine (on a quiet host the small demo models also switch between two "
        "latency levels 20-35 % apart from one run to the next, in both tools alike, so medians over a handful "
        "of runs depend on where each landed); when other processes keep the machine busy throughout, a single "
        "round that happened to run while the others paused decides the best round, and the paired ratio "
        "(each round's two runs back to back, median over rounds) is the robust figure. *Rounds within 10 % of "
        "the best* counts, per tool, the rounds near the best seen.",
        "",
        "Both tools time each inference with the runtime's own clock (`InferRequest.latency`). The last column "
        "is what a Python clock around `start_async(); wait()` gives on the same IR — how "
        "`OpenVINOBuilder.time` measured before this comparison: the Python loop adds a roughly fixed "
        "10-30 us per call, a large share of the demo model's ~60-150 us latency.",
        "",
        f"Machine load: 1-min load average {load['min']:.2f}-{load['max']:.2f} (median {load['median']:.2f}; "
        f"{load['start']:.2f} at the start, {load['end']:.2f} at the end; it includes this benchmark's own "
        f"2-thread runs) on {doc['host']['cpus']} CPUs. *Other processes* is the CPU time that processes other "
        "than this benchmark used during each measurement, in cores (median over the measurements): the "
        "machine is shared, so absolute latencies and CoVs are noisy; the back-to-back pairing shares that "
        "noise between the two tools.",
        "",
        f"Machine: {doc['host']['cpu']} ({doc['host'].get('flags', '')}), {doc['host']['cpus']} CPUs, OpenVINO "
        f"{doc['host']['openvino']}, default inference precision {doc['host'].get('default_precision', '?')}, "
        f"profile `{doc['host']['profile']}`, Python {doc['host']['python']}; {doc['date']}.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per model (default 7)")
    parser.add_argument("--duration", type=int, default=3, help="whole seconds each tool times (default 3)")
    parser.add_argument("--warmup", type=float, default=0.2, help="our warm-up in seconds (default 0.2)")
    parser.add_argument("--max-load", type=float, help="wait before each round until the 1-min load is below this")
    parser.add_argument("--load-timeout", type=float, default=120.0, help="longest wait for --max-load (s)")
    parser.add_argument(
        "--same-inputs",
        action="store_true",
        help="feed benchmark_app our seeded inputs (-i name:file.npy) instead of its own random fill",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", type=Path, help="only re-write the Markdown from this JSON (with --note)")
    parser.add_argument("--note", default="", help="a note printed under the verdict")
    args = parser.parse_args()
    if args.render is not None:
        doc = json.loads(args.render.read_text(encoding="utf-8"))
        doc["note"] = args.note or doc.get("note", "")
        (args.out / "bench_vs_benchmark_app.md").write_text(markdown(doc), encoding="utf-8")
        if args.note:
            (args.out / "bench_vs_benchmark_app.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return
    if benchmark_app_exe() is None:
        raise SystemExit("benchmark_app is not on PATH: pip install 'rexdeploy[openvino]'")
    import openvino as ov

    profile = load_profile("auto")
    start_load = load1()
    with tempfile.TemporaryDirectory(prefix="bench-vs-benchmark-app.") as tmp:
        work = Path(tmp)
        models = make_models(work, profile)
        results = []
        for label, onnx_path in models.items():
            # the IR is built once (shapes, the stored options, the Python-clock loop); each tool then compiles the
            # compared file in its own process: the ONNX file of a plain model, the built IR of a REx engine
            engine = OpenVINOBuilder().build(onnx_path, profile, work / onnx_path.stem)
            source = onnx_path if label.endswith("FP32") else engine.artifacts[0]
            results.append(compare(label, engine, source, args))
            del engine
    loads = [r["load1_before"] for m in results for r in m["rounds"]]
    doc = {
        "command": "python benchmarks/bench_vs_benchmark_app.py" + " ".join(["", *sys.argv[1:]]),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "same_inputs": args.same_inputs,
        },
        "tolerance": TOLERANCE,
        "models": results,
        "all_within_10pct": all(m["within_10pct"] for m in results),
        "all_same_precision": all(m["same_precision"] for m in results),
        "load": {
            "start": start_load,
            "end": load1(),
            "min": min(loads),
            "median": statistics.median(loads),
            "max": max(loads),
        },
        "host": {
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if "model name" in ln
                ),
                platform.processor(),
            ),
            "cpus": os.cpu_count(),
            "openvino": ov.get_version(),
            "profile": profile.name,
            "flags": host_flags(),
            "default_precision": _type_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "python": platform.python_version(),
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vs_benchmark_app.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (args.out / "bench_vs_benchmark_app.md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))


if __name__ == "__main__":
    main()
