"""Shared measurement helpers for the benchmark scripts: interleaved engine timing, engine outputs, host facts.

Import from a script in this folder (``python benchmarks/bench_x.py`` puts ``benchmarks/`` on the path)::

    from harness import engine_outputs, host_facts, time_interleaved

- :func:`time_interleaved` — times several engines in rounds, rotating which goes first, so drift and other
  processes on the machine hit every row alike; reports the median of the round medians, the best round and
  the p99 over all runs.
- :func:`engine_outputs` — runs an engine on a batch of inputs one sample at a time (the engines are built
  for batch 1) and stacks the first output.
- :func:`host_facts` — CPU, core count, load average, package versions: what a result file records.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from rexdeploy.builders.base import Builder, Engine
from rexdeploy.builders.timing import time_rounds


def time_interleaved(
    builder: Builder,
    engines: Mapping[str, Engine],
    *,
    rounds: int = 5,
    round_s: float = 0.5,
    warmup_s: float = 0.2,
) -> dict[str, dict[str, Any]]:
    """Time every engine ``rounds`` times for ``round_s`` each, in a rotating order; per engine:
    ``median_ms`` (median of round medians), ``best_ms`` (fastest round median), ``p99_ms`` (worst round p99),
    ``round_medians_ms``, ``runs``."""
    rounds_of = time_rounds(builder, engines, rounds=rounds, round_s=round_s, warmup_s=warmup_s)
    return {
        n: {
            "median_ms": statistics.median(t.median_ms for t in ts),
            "best_ms": min(t.median_ms for t in ts),
            "p99_ms": max(t.p99_ms for t in ts),
            "round_medians_ms": [t.median_ms for t in ts],
            "runs": sum(t.runs for t in ts),
        }
        for n, ts in rounds_of.items()
    }


def engine_outputs(builder: Builder, engine: Engine, x: np.ndarray, input_name: str) -> np.ndarray:
    """The engine's first output on every sample of ``x`` (one at a time), stacked."""
    return np.concatenate([builder.run(engine, {input_name: x[i : i + 1]})[0] for i in range(len(x))])


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def host_facts() -> dict[str, Any]:
    """What every result file records about the machine and the run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("rexdeploy", "openvino", "onnxruntime", "onnx", "numpy", "torch")},
    }
