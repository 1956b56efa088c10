"""Cost-model calibration: the fit (exact on synthetic points), the measuring loop (fake engine), the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from rexdeploy import calibrate as cal
from rexdeploy.analyze import find_layers
from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.timing import Timing, timing_from_samples
from rexdeploy.calibrate import (
    FULL_SHAPES,
    CalibrationPoint,
    Shape,
    calibrate,
    calibrated_toml,
    fit_cost_model,
    micro_model,
    nnls,
    predict_point_ms,
    settings_for,
)
from rexdeploy.cli.main import main
from rexdeploy.errors import EngineUnavailableError, InputError, ProfileError
from rexdeploy.profile import CostModel, Profile, load_profile, profile_from_dict

TRUE = CostModel(
    layer_overhead_us=12.5,
    branch_overhead_us=7.25,
    bandwidth_gbps=18.0,
    throughput_gmacs={
        "conv": {"fp32": 41.0, "int8": 55.5},
        "pointwise": {"fp32": 33.0, "int8": 47.0},
        "depthwise": {"fp32": 4.5, "int8": 3.25},
        "gemm": {"fp32": 9.5, "int8": 14.0},
        "matmul": {"fp32": 27.5, "int8": 16.5},
    },
    calibrated=True,
    model_overhead_us=21.0,
    concat_factor=1.375,
    activation_bandwidth_gbps=6.5,
)
PROFILE = Profile(name="synthetic", engine="openvino", device="CPU", cost=CostModel())


def synthetic_points(
    profile: Profile, cost: CostModel, shapes: tuple[Shape, ...] = FULL_SHAPES
) -> list[CalibrationPoint]:
    """The full grid's points with 'measured' times computed exactly from ``cost`` (no engine)."""
    empty = CalibrationPoint("empty", "", "", "overhead", "fp32", None, 1, None, 8, "branches", 0, None, 0.0)
    points = [empty]
    small = [dataclasses.replace(s, channels=min(s.channels, 64)) for s in shapes]  # layers only, cheap weights
    for shape in small:
        layer = find_layers(micro_model(shape))[0]
        for s in settings_for(profile, shape.op_class):
            label = f"{shape.op_class}/{shape.size} {s.name}"
            settings = (s.name, s.precision, s.bits, s.order, s.gamma, s.act_bits, s.form)
            points.append(CalibrationPoint(label, shape.op_class, shape.size, *settings, shape.depth, layer, 0.0))
    return [dataclasses.replace(p, measured_ms=predict_point_ms(cost, p)) for p in points]


def test_nnls_matches_least_squares_and_the_kkt_conditions() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 5))
    x_true = np.array([1.0, 2.0, 0.5, 3.0, 0.25])
    assert np.allclose(nnls(a, a @ x_true), x_true)  # a non-negative exact solution is found exactly
    for seed in range(20):
        r = np.random.default_rng(seed)
        a, b = r.normal(size=(12, 4)), r.normal(size=12)
        x = nnls(a, b)
        grad = a.T @ (a @ x - b)
        assert np.all(x >= 0.0)
        assert np.allclose(grad[x > 0], 0.0, atol=1e-9)  # KKT: zero gradient on the free set
        assert np.all(grad[x == 0] >= -1e-9)  # and no descent direction into x > 0
        best = min(  # brute force over the active sets
            (np.linalg.norm(a[:, list(s)] @ np.linalg.lstsq(a[:, list(s)], b, rcond=None)[0] - b), s)
            for n in range(5)
            for s in itertools.combinations(range(4), n)
            if not s or np.all(np.linalg.lstsq(a[:, list(s)], b, rcond=None)[0] > 0)
        )
        assert np.linalg.norm(a @ x - b) == pytest.approx(best[0], abs=1e-9)


def test_fit_recovers_known_coefficients_exactly() -> None:
    points = synthetic_points(PROFILE, TRUE)
    fit = fit_cost_model(points, PROFILE.cost)
    assert fit.cost == TRUE  # every coefficient has <= 4 significant digits: the fit rounds onto them
    assert fit.within_10 == fit.within_20 == 1.0
    assert fit.median_abs_error < 1e-9
    assert "concat_factor" in fit.fitted and "throughput_gmacs.depthwise.int8" in fit.fitted
    assert all(p.predicted_ms == pytest.approx(p.measured_ms) for p in fit.points)


def test_fit_is_robust_to_small_noise_and_reports_quality() -> None:
    rng = np.random.default_rng(1)
    points = [
        dataclasses.replace(p, measured_ms=p.measured_ms * float(rng.uniform(0.97, 1.03)))
        for p in synthetic_points(PROFILE, TRUE)
    ]
    fit = fit_cost_model(points, PROFILE.cost)
    assert fit.within_10 == 1.0
    assert fit.cost.throughput_gmacs["conv"]["int8"] == pytest.approx(55.5, rel=0.1)
    assert fit.cost.concat_factor == pytest.approx(1.375, rel=0.1)


def test_coefficients_without_points_keep_their_values() -> None:
    base = dataclasses.replace(TRUE, calibrated=False, concat_factor=2.0)
    convs = [p for p in synthetic_points(PROFILE, TRUE) if p.op_class in ("", "conv") and p.form != "concat"]
    fit = fit_cost_model(convs, base)
    assert fit.cost.calibrated
    assert fit.cost.concat_factor == 2.0  # no concat point
    assert fit.cost.throughput_gmacs["gemm"] == TRUE.throughput_gmacs["gemm"]
    assert fit.cost.throughput_gmacs["conv"] == TRUE.throughput_gmacs["conv"]
    assert "throughput_gmacs.gemm.fp32" not in fit.fitted


def test_calibration_point_round_trips_through_json() -> None:
    point = synthetic_points(PROFILE, TRUE)[5]
    raw = json.loads(json.dumps(point.to_dict()))
    assert CalibrationPoint.from_dict(raw) == point


def test_settings_follow_the_profile() -> None:
    avx2 = load_profile("x86-avx2")
    names = [s.name for s in settings_for(avx2, "conv")]
    assert names[:4] == ["fp32", "W7A8 K=1", "W7A8 K=2 branches", "W7A8 K=2 concat"]
    assert not any("concat" in s.name for s in settings_for(avx2, "depthwise"))
    spr = [s.name for s in settings_for(load_profile("xeon-spr"), "gemm")]
    assert "bf16" in spr and any("int4" in name for name in spr)


# -------------------------------------------------------------------------------------------------
# the measuring loop, with a fake engine


class FakeBuilder:
    """Times a model as 20 µs + 30 µs per Conv/Gemm node; fails on sparse (narrow) layers."""

    name = "openvino"
    pip_extra = "openvino"

    def __init__(self, available: bool = True) -> None:
        self._available = available
        self.built = 0
        self.delay_s = 0.0

    def available(self) -> bool:
        return self._available

    def version(self) -> str:
        return "fake 1.0"

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        from rexdeploy.errors import BuildError

        graph = onnx.load(str(model))
        if any("narrow" in n.name for n in graph.graph.node):
            raise BuildError("fake engine: cannot run narrow layers\nsecond line")
        self.built += 1
        return Engine("fake", "CPU", model, (), {}, 0.0, handle=graph)

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        layers = sum(n.op_type in ("Conv", "Gemm") for n in engine.handle.graph.node)
        ms = 0.02 + 0.03 * layers
        time.sleep(self.delay_s)
        return timing_from_samples([ms] * 5, warmup_runs=1, warmup_s=0.0, duration_s=0.0)

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError


def test_calibrate_loop_with_a_fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBuilder()
    monkeypatch.setattr(cal, "get_builder", lambda engine: fake)
    calls: list[tuple[int, int, str]] = []
    shipped = load_profile("x86-avx2")
    profile = dataclasses.replace(shipped, cost=dataclasses.replace(shipped.cost, calibrated=False))
    fitted, report = calibrate(profile, quick=True, progress=lambda d, t, label: calls.append((d, t, label)))
    assert fitted.cost.calibrated and not profile.cost.calibrated
    assert fitted.quantization == profile.quantization and fitted.name == profile.name
    assert report.points[0].layer is None and report.points[0].depth == 0
    assert len(report.points) == 1 + 2 * 4 == fake.built  # empty graph + 2 shapes × (fp32, K=1, K=2, concat)
    assert all(p.predicted_ms is not None for p in report.points)
    assert calls[0][0] == 0 and calls[-1] == (calls[-1][1], calls[-1][1], "fitting")
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert report.engine_version == "fake 1.0" and report.grid == "quick"
    loaded = profile_from_dict(__import__("tomllib").loads(calibrated_toml(fitted, report)))
    assert loaded == fitted
    assert "Cost-model calibration: x86-avx2" in report.to_markdown()
    assert json.loads(report.to_json())["fit"]["points"] == len(report.points)


def test_engine_failures_on_one_point_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBuilder()
    monkeypatch.setattr(cal, "get_builder", lambda engine: fake)
    monkeypatch.setattr(cal, "FULL_SHAPES", (Shape("conv", "small", 8, 6, 2),))
    _, report = calibrate(load_profile("x86-avx2"))
    labels = [p.label for p in report.points]
    assert "conv/small W7A8 K=2 branches" in labels and "conv/small fp32" in labels
    for label, reason in report.skipped:  # sparse orders: emitted by the pass, refused by the fake engine
        assert "gamma" in label
        assert "fake engine: cannot run narrow layers" in reason or "cannot emit" in reason
        assert "\n" not in reason


def test_time_budget_stops_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cal, "get_builder", lambda engine: FakeBuilder())
    with pytest.raises(InputError, match="within the 0 s time budget; raise --time-budget"):
        calibrate(load_profile("x86-avx2"), budget_s=0.0)
    slow = FakeBuilder()
    slow.delay_s = 0.5
    monkeypatch.setattr(cal, "get_builder", lambda engine: slow)
    _, report = calibrate(load_profile("x86-avx2"), budget_s=2.5, quick=True)  # 9 points, 0.5 s a timing
    assert 1 <= len(report.points) <= 6
    assert all(len(p.rounds_ms) == 1 for p in report.points)
    assert "timed 1 of 2 rounds within the 2.5 s time budget" in report.notes
    assert report.skipped and all("time budget of 2.5 s reached" in reason for _, reason in report.skipped)
    assert len(report.points) + len(report.skipped) == 9


def test_engine_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cal, "get_builder", lambda engine: FakeBuilder(available=False))
    with pytest.raises(EngineUnavailableError, match=r"pip install 'rexdeploy\[openvino\]'"):
        calibrate(load_profile("x86-avx2"))


def test_profile_rejects_a_non_positive_concat_factor() -> None:
    raw = __import__("tomllib").loads(load_profile("x86-avx2").to_toml())
    raw["cost"]["concat_factor"] = 0.0
    with pytest.raises(ProfileError, match=r"concat_factor: must be > 0"):
        profile_from_dict(raw, "my.toml")


# -------------------------------------------------------------------------------------------------
# the CLI


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("rexdeploy: error: ") and needle in lines[-1], captured.err
    assert sum(line.startswith("rexdeploy: error: ") for line in lines) == 1
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_unknown_profile(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "x.toml"
    _one_line_error(capsys, main(["profile", "calibrate", "nope", "-o", str(out)]), "unknown profile 'nope'")
    assert not out.exists()


def test_cli_engine_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cal, "get_builder", lambda engine: FakeBuilder(available=False))
    out = tmp_path / "x.toml"
    code = main(["profile", "calibrate", "x86-avx2", "--quick", "-o", str(out)])
    _one_line_error(capsys, code, "the openvino engine of profile 'x86-avx2' is not installed here")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_with_a_fake_engine_writes_a_loadable_profile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cal, "get_builder", lambda engine: FakeBuilder())
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "calibrate", "x86-avx2", "--quick"]) == 0
    captured = capsys.readouterr()
    assert "fit: 9 points" in captured.err and "wrote x86-avx2-calibrated.toml" in captured.err
    assert captured.out == ""
    assert load_profile(tmp_path / "x86-avx2-calibrated.toml").cost.calibrated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x86-avx2-calibrated.toml"]  # no temp file left


@pytest.mark.openvino
@pytest.mark.slow
def test_cli_quick_calibration_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "my.toml"
    t0 = time.perf_counter()
    assert main(["profile", "calibrate", "auto", "--quick", "--json", "-o", str(out)]) == 0
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    profile = load_profile(out)
    assert profile.cost.calibrated and profile.name == load_profile("auto").name
    assert doc["output"] == str(out) and doc["grid"] == "quick" and doc["fit"]["points"] == len(doc["points"]) == 9
    assert all(p["measured_ms"] > 0 for p in doc["points"])
    assert any("u8" in p["kernels"] or "i8" in p["kernels"] for p in doc["points"])  # int8 kernels really ran
    assert out.read_text().startswith("# Cost model calibrated by `rexdeploy profile calibrate`")
    assert seconds < 30.0
