"""Latency statistics the way trtexec / benchmark_app report them, and the timing loop."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rexdeploy.builders.base import Builder, Engine, TimingSettings

COV_WARN = 0.05  # warn when the coefficient of variation exceeds 5 %


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one engine, in milliseconds (batch ``batch``)."""

    runs: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cov: float
    throughput_fps: float
    warmup_runs: int
    warmup_s: float
    duration_s: float
    batch: int = 1
    h2d_ms: float | None = None
    d2h_ms: float | None = None

    @property
    def noisy(self) -> bool:
        """True when the coefficient of variation is above 5 % (the timing is not trustworthy)."""
        return self.cov > COV_WARN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Timing:
        return cls(**raw)


def timing_from_samples(
    samples_ms: np.ndarray | list[float],
    *,
    warmup_runs: int,
    warmup_s: float,
    duration_s: float,
    batch: int = 1,
    h2d_ms: float | None = None,
    d2h_ms: float | None = None,
) -> Timing:
    """Summarize per-run latencies (ms). Percentiles use linear interpolation, like numpy's default."""
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("timing needs at least one sample")
    mean = float(s.mean())
    std = float(s.std(ddof=1)) if s.size > 1 else 0.0
    p90, p95, p99, median = (float(v) for v in np.percentile(s, [90, 95, 99, 50]))
    return Timing(
        runs=int(s.size),
        median_ms=median,
        mean_ms=mean,
        p90_ms=p90,
        p95_ms=p95,
        p99_ms=p99,
        min_ms=float(s.min()),
        max_ms=float(s.max()),
        std_ms=std,
        cov=std / mean if mean > 0 else 0.0,
        throughput_fps=batch * 1000.0 / mean if mean > 0 else 0.0,
        warmup_runs=warmup_runs,
        warmup_s=warmup_s,
        duration_s=duration_s,
        batch=batch,
        h2d_ms=h2d_ms,
        d2h_ms=d2h_ms,
    )


def warm_up(call: Callable[[], object], seconds: float, clock: Callable[[], float] = time.perf_counter) -> int:
    """Call ``call`` for ``seconds`` (at least once); returns how many calls."""
    calls = 0
    start = clock()
    while True:
        call()
        calls += 1
        if clock() - start >= seconds:
            return calls


def run_for(call: Callable[[], object], settings: TimingSettings, clock: Callable[[], float] = time.perf_counter) -> int:
    """Call ``call`` exactly ``settings.runs`` times when given, else until ``settings.duration_s`` has passed and
    ``settings.min_runs`` calls are in; returns how many calls."""
    calls = 0
    start = clock()
    while True:
        call()
        calls += 1
        if settings.runs is not None:
            if calls >= settings.runs:
                return calls
        elif clock() - start >= settings.duration_s and calls >= settings.min_runs:
            return calls


def measure(infer: Callable[[], object], settings: TimingSettings) -> Timing:
    """Time a synchronous ``infer`` callable: warm up for ``warmup_s``, then run for ``duration_s``
    (at least ``min_runs`` runs) or exactly ``runs`` runs when given."""
    clock = time.perf_counter
    warmup_runs = warm_up(infer, settings.warmup_s, clock)
    samples: list[float] = []

    def timed() -> None:
        t0 = clock()
        infer()
        samples.append((clock() - t0) * 1000.0)

    t_begin = clock()
    run_for(timed, settings, clock)
    return timing_from_samples(
        samples,
        warmup_runs=warmup_runs,
        warmup_s=settings.warmup_s,
        duration_s=clock() - t_begin,
        batch=settings.batch,
    )


def interleaved_rounds(builder: Builder, engines: Sequence[Engine], settings: TimingSettings,
                       rounds: int) -> list[list[Timing]]:  # fmt: skip
    """Each engine timed once per round for ``rounds`` rounds, round r starting at engine r (a rotated order), so
    that every engine meets the machine's drift alike. Returns each engine's timings, one per round."""
    out: list[list[Timing]] = [[] for _ in engines]
    for r in range(rounds):
        for i in [(r + k) % len(engines) for k in range(len(engines))]:
            out[i].append(builder.time(engines[i], settings))
    return out


def random_inputs(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype[Any]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Fixed random inputs to time an engine with, one array per input, seeded and in each input's dtype.

    Floats are standard normal; integers are 0 or 1 (safe as indices into any non-empty axis);
    booleans are fair coin flips. The same seed gives the same arrays on every backend.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        dtype = np.dtype(dtypes[name])
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[name] = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            out[name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            raise ValueError(f"cannot make random data for input {name!r} of dtype {dtype}")
    return out


def time_rounds(
    builder: Builder, engines: Mapping[str, Engine], *, rounds: int = 5, round_s: float = 0.2, warmup_s: float = 0.1
) -> dict[str, list[Timing]]:
    """Time every engine ``rounds`` times for ``round_s`` each, rotating which goes first, after one warm-up
    pass each: a machine's slow drifts (frequency, neighbours) then hit every engine alike. Per engine, the
    Timing of each round."""
    names = list(engines)
    out: dict[str, list[Timing]] = {n: [] for n in names}
    for n in names:
        builder.time(engines[n], TimingSettings(warmup_s=warmup_s, duration_s=0.02, min_runs=3))
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            out[n].append(builder.time(engines[n], TimingSettings(warmup_s=0.02, duration_s=round_s, min_runs=3)))
    return out


def combine_rounds(timings: list[Timing]) -> Timing:
    """One Timing from interleaved rounds: the round whose median is the median of the round medians, with
    runs and duration summed over all rounds."""
    ordered = sorted(timings, key=lambda t: t.median_ms)
    middle = ordered[(len(ordered) - 1) // 2]
    median = float(np.median([t.median_ms for t in timings]))
    return dataclasses.replace(middle, median_ms=median, runs=sum(t.runs for t in timings),
                               duration_s=sum(t.duration_s for t in timings))  # fmt: skip
