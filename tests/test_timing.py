"""Timing statistics against an independent percentile computation, and the timing loop's contract."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from rexdeploy.builders.base import TimingSettings
from rexdeploy.builders.timing import COV_WARN, Timing, measure, random_inputs, timing_from_samples


def _percentile(samples: list[float], q: float) -> float:
    """Linear-interpolation percentile written out by hand (numpy's default 'linear' method)."""
    s = sorted(samples)
    rank = q / 100.0 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def test_statistics_match_an_independent_computation() -> None:
    rng = np.random.default_rng(7)
    samples = list(rng.gamma(4.0, 0.5, size=257))
    t = timing_from_samples(samples, warmup_runs=3, warmup_s=0.1, duration_s=1.5, batch=4)
    mean = sum(samples) / len(samples)
    std = math.sqrt(sum((x - mean) ** 2 for x in samples) / (len(samples) - 1))
    assert t.runs == 257
    assert t.median_ms == pytest.approx(_percentile(samples, 50))
    assert t.p90_ms == pytest.approx(_percentile(samples, 90))
    assert t.p95_ms == pytest.approx(_percentile(samples, 95))
    assert t.p99_ms == pytest.approx(_percentile(samples, 99))
    assert t.min_ms == min(samples) and t.max_ms == max(samples)
    assert t.mean_ms == pytest.approx(mean)
    assert t.std_ms == pytest.approx(std)
    assert t.cov == pytest.approx(std / mean)
    assert t.throughput_fps == pytest.approx(4 * 1000.0 / mean)
    assert (t.warmup_runs, t.warmup_s, t.duration_s, t.batch) == (3, 0.1, 1.5, 4)


def test_even_count_median_interpolates() -> None:
    t = timing_from_samples([4.0, 1.0, 3.0, 2.0], warmup_runs=0, warmup_s=0.0, duration_s=0.0)
    assert t.median_ms == 2.5
    assert t.p90_ms == pytest.approx(3.7)


def test_single_sample_has_zero_spread() -> None:
    t = timing_from_samples([2.0], warmup_runs=1, warmup_s=0.0, duration_s=0.0)
    assert (t.runs, t.std_ms, t.cov, t.median_ms, t.p99_ms) == (1, 0.0, 0.0, 2.0, 2.0)
    assert t.throughput_fps == 500.0


def test_cov_warning_flag() -> None:
    steady = timing_from_samples([1.0, 1.01, 0.99, 1.0], warmup_runs=0, warmup_s=0.0, duration_s=0.0)
    assert steady.cov < COV_WARN and not steady.noisy
    jittery = timing_from_samples([1.0, 1.5, 0.7, 1.2], warmup_runs=0, warmup_s=0.0, duration_s=0.0)
    assert jittery.cov > COV_WARN and jittery.noisy


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]]])
def test_no_samples_is_an_error(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        timing_from_samples(bad, warmup_runs=0, warmup_s=0.0, duration_s=0.0)


def test_measure_with_runs_gives_exactly_that_many_samples() -> None:
    calls = [0]

    def infer() -> None:
        calls[0] += 1

    t = measure(infer, TimingSettings(warmup_s=0.01, duration_s=10.0, runs=37, min_runs=100))
    assert t.runs == 37
    assert calls[0] == t.warmup_runs + 37
    assert t.warmup_runs >= 1


def test_measure_respects_duration_and_min_runs() -> None:
    t = measure(lambda: None, TimingSettings(warmup_s=0.02, duration_s=0.1, min_runs=5))
    assert t.duration_s >= 0.1
    assert t.runs >= 5
    assert t.min_ms <= t.median_ms <= t.p99_ms <= t.max_ms

    # A slow call: the duration passes after a few runs, min_runs still holds.
    slow = measure(lambda: time.sleep(0.01), TimingSettings(warmup_s=0.0, duration_s=0.02, min_runs=6))
    assert slow.runs == 6
    assert slow.min_ms >= 9.0
    assert slow.warmup_runs == 1


def test_measure_reports_the_batch() -> None:
    t = measure(lambda: time.sleep(0.001), TimingSettings(warmup_s=0.0, runs=5, batch=8))
    assert t.batch == 8
    assert t.throughput_fps == pytest.approx(8 * 1000.0 / t.mean_ms)


def test_json_round_trip() -> None:
    t = timing_from_samples([1.0, 2.0, 3.5], warmup_runs=2, warmup_s=0.2, duration_s=3.0, h2d_ms=0.25)
    back = Timing.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    assert back.h2d_ms == 0.25 and back.d2h_ms is None


def test_random_inputs_are_seeded_and_typed() -> None:
    shapes = {"x": (2, 3), "ids": (4,), "mask": (2, 2), "img": (1, 5)}
    dtypes = {
        "x": np.dtype("float32"),
        "ids": np.dtype("int64"),
        "mask": np.dtype("bool"),
        "img": np.dtype("uint8"),
    }
    a = random_inputs(shapes, dtypes, seed=3)
    b = random_inputs(shapes, dtypes, seed=3)
    c = random_inputs(shapes, dtypes, seed=4)
    assert list(a) == list(shapes)
    for name in shapes:
        assert a[name].shape == shapes[name] and a[name].dtype == dtypes[name]
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["x"], c["x"])
    assert set(np.unique(a["ids"])) <= {0, 1}
    with pytest.raises(ValueError, match="cannot make random data"):
        random_inputs({"s": (1,)}, {"s": np.dtype("U4")})
