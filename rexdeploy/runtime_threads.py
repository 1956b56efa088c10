"""Inference threads chosen by measurement.

A runtime compiled for latency runs each request on every core (OpenVINO's ``LATENCY`` hint). On a small model
that is not the fastest: each node takes a few µs, and waking the other threads for every node can cost more
than they save. On a 2-core AMD EPYC (avx512_bf16) the digits ViT ran 143 µs on 2 threads and 50 µs on 1, the
digits CNN 31 µs and 14 µs; MobileNetV2's int8 engine, whose nodes are larger, ran 1.4-1.75x *slower* on 1 thread.
Which is faster depends on the model and the host, so ``rexdeploy build`` measures it: the FP32 engine on the
runtime's default threads and on each count the builder offers (``Builder.thread_choices``), timed in
interleaved rounds, and keeps a count only when it is clearly faster (:data:`THREAD_GAIN`); every engine of
the build then runs it (the profile's ``[parallel] threads``, written to the engine's runtime options).

This module holds the decision and the rounds; :mod:`rexdeploy.closedloop` applies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rexdeploy.builders.base import Builder, Engine, TimingSettings
from rexdeploy.builders.timing import interleaved_rounds

THREAD_GAIN = 0.05  # fewer threads are kept only when their median per-round ratio is at least this much under 1
THREAD_ROUNDS = 5  # interleaved rounds (each times every variant once, in a rotated order)
THREAD_ROUND_S = 0.2  # seconds per variant per round
THREAD_MAX_MS = 20.0  # an FP32 engine slower than this is not tried on fewer threads: its nodes' work dominates the
# per-node thread wake-ups (µs each), and its rounds would cost seconds of build time for nothing
DEFAULT = 0  # the key of the runtime's default threads in the rounds


@dataclass(frozen=True)
class ThreadChoice:
    """What the rounds measured and what was kept.

    ``threads``: the count every engine of the build runs (0: the runtime's default kept); ``default_threads``: the
    runtime's own count; ``ratios`` / ``upper``: per tried count, the median and upper quartile of its per-round
    latency ratio to the default; ``default_ms``: the default's median round latency.
    """

    threads: int
    default_threads: int
    default_ms: float
    ratios: dict[int, float] = field(default_factory=dict)
    upper: dict[int, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.threads > 0

    def summary(self) -> str:
        tried = ", ".join(f"{r:.2f}x on {n} thread{'s' * (n > 1)}" for n, r in sorted(self.ratios.items()))
        default = f"the runtime's default ({self.default_threads} threads)"
        if self.changed:
            return (f"{self.threads} thread{'s' * (self.threads > 1)} per request: the FP32 engine ran "
                    f"{self.ratios[self.threads]:.2f}x {default} in {THREAD_ROUNDS} interleaved rounds "
                    f"({tried}); every engine of this build runs it")  # fmt: skip
        return (f"{default} kept: the FP32 engine ran {tried} in {THREAD_ROUNDS} interleaved rounds (fewer threads "
                f"are kept from {1 - THREAD_GAIN:.2f}x down)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "default_threads": self.default_threads,
            "default_ms": self.default_ms,
            "ratios": {str(k): v for k, v in sorted(self.ratios.items())},
            "upper_quartiles": {str(k): v for k, v in sorted(self.upper.items())},
            "gain_needed": THREAD_GAIN,
            "summary": self.summary(),
        }


def pick_threads(rounds: Mapping[int, Sequence[float]]) -> tuple[int, dict[int, float], dict[int, float]]:
    """The thread count to keep from per-round latencies (``rounds[DEFAULT]``: the runtime's default threads; the
    other keys: thread counts tried), with every count's median and upper-quartile per-round ratio to the default.
    A count is kept only when its median ratio is at most ``1 - THREAD_GAIN`` and its upper quartile under 1: a
    tie keeps the runtime's default (what a user gets anyway). Returns 0 for the default."""
    base = np.asarray(rounds[DEFAULT], dtype=np.float64)
    ratios: dict[int, float] = {}
    upper: dict[int, float] = {}
    for threads, ms in rounds.items():
        if threads == DEFAULT:
            continue
        r = np.asarray(ms, dtype=np.float64) / base
        ratios[threads], upper[threads] = float(np.median(r)), float(np.percentile(r, 75))
    clear = [n for n in ratios if ratios[n] <= 1.0 - THREAD_GAIN and upper[n] < 1.0]
    return (min(clear, key=lambda n: ratios[n]) if clear else DEFAULT), ratios, upper


def rounds(builder: Builder, engines: Mapping[int, Engine], timing: TimingSettings,
           n_rounds: int = THREAD_ROUNDS) -> dict[int, list[float]]:  # fmt: skip
    """Each engine's median latency (ms) in ``n_rounds`` interleaved rounds of ``timing`` (rotated order)."""
    timed = interleaved_rounds(builder, list(engines.values()), timing, n_rounds)
    return {key: [t.median_ms for t in timings] for key, timings in zip(engines, timed, strict=True)}


def choose_threads(builder: Builder, engine: Engine, variant: Callable[[int], Engine],
                   timing: TimingSettings) -> tuple[ThreadChoice, dict[int, Engine]] | None:  # fmt: skip
    """Time ``engine`` (the runtime's default threads) beside ``variant(n)`` for each count the builder offers
    (``Builder.thread_choices(engine)``: the engine's own count and the counts worth trying), in interleaved rounds
    of :data:`THREAD_ROUND_S` each; returns the choice and the variants built, None where there is nothing to try
    (the builder has no such setting, or one core)."""
    choices = getattr(builder, "thread_choices", None)
    if not callable(choices):
        return None
    default_threads, offered = choices(engine)
    counts = [int(n) for n in offered]
    if not counts:
        return None
    variants = {n: variant(n) for n in counts}
    settings = dataclasses.replace(timing, duration_s=THREAD_ROUND_S, warmup_s=min(timing.warmup_s, 0.1), runs=None,
                                   min_runs=min(timing.min_runs, 5))  # fmt: skip
    measured = rounds(builder, {DEFAULT: engine, **variants}, settings)
    threads, ratios, upper = pick_threads(measured)
    return ThreadChoice(threads, int(default_threads), float(np.median(measured[DEFAULT])), ratios, upper), variants


__all__ = ["THREAD_GAIN", "THREAD_MAX_MS", "ThreadChoice", "choose_threads", "pick_threads", "rounds"]
