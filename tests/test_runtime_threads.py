"""Inference threads chosen by measurement (rexdeploy.runtime_threads): the decision on scripted round timings, the
profile setting, the closed loop with a scripted builder whose latency depends on its threads (nothing here depends
on the CPU that runs it), and the OpenVINO option on a real engine."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import onnx
import pytest
from models import small_cnn
from test_measured_planning import FAST, PROFILE, ScriptedBuilder

from rexdeploy import closedloop
from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.timing import Timing, timing_from_samples
from rexdeploy.errors import ProfileError
from rexdeploy.profile import Profile, load_profile, profile_from_dict
from rexdeploy.runtime_threads import THREAD_GAIN, THREAD_MAX_MS, ThreadChoice, pick_threads


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(seed=3), str(path))
    return path


# ------------------------------------------------------------------------------------------------ the decision


@pytest.mark.parametrize(
    ("rounds", "kept"),
    [
        ({0: [1.0] * 5, 1: [0.35, 0.36, 0.34, 0.35, 0.37]}, 1),  # clearly faster: kept
        ({0: [1.0] * 5, 1: [0.97, 0.98, 0.96, 0.99, 0.97]}, 0),  # a tie: the runtime's default stays
        ({0: [1.0] * 5, 1: [0.90, 0.92, 1.01, 1.02, 0.93]}, 0),  # faster at the median, over 1 in two rounds of 5
        ({0: [1.0] * 5, 1: [1.75, 1.70, 1.80, 1.72, 1.77]}, 0),  # slower (MobileNetV2's int8 engine on 1 thread)
        ({0: [2.0] * 5, 1: [1.2] * 5, 4: [0.8] * 5}, 4),  # the fastest of those clear of the default
        ({0: [1.0, 2.0, 1.0, 2.0, 1.0], 1: [0.5, 1.0, 0.5, 1.0, 0.5]}, 1),  # ratios per round: the host's drift cancels
    ],
)
def test_fewer_threads_are_kept_only_when_clearly_faster(rounds: dict[int, list[float]], kept: int) -> None:
    threads, ratios, upper = pick_threads(rounds)
    assert threads == kept
    assert set(ratios) == set(upper) == set(rounds) - {0}
    if kept:
        assert ratios[kept] <= 1 - THREAD_GAIN and upper[kept] < 1


def test_the_choice_says_what_was_measured() -> None:
    kept = ThreadChoice(1, 2, 0.143, {1: 0.35}, {1: 0.36})
    assert kept.changed
    assert kept.summary().startswith("1 thread per request: the FP32 engine ran 0.35x the runtime's default (2 threads)")
    raw = kept.to_dict()
    assert raw["threads"] == 1 and raw["default_threads"] == 2 and raw["ratios"] == {"1": 0.35}
    assert json.loads(json.dumps(raw)) == raw
    stayed = ThreadChoice(0, 2, 1.9, {1: 1.75}, {1: 1.8})
    assert not stayed.changed
    assert stayed.summary() == ("the runtime's default (2 threads) kept: the FP32 engine ran 1.75x on 1 thread in 5 "
                                "interleaved rounds (fewer threads are kept from 0.95x down)")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the profile


def test_profile_threads_round_trip_and_bad_values() -> None:
    base = load_profile("x86-avx512")
    assert base.parallel.threads == 0
    one = base.with_threads(1)
    assert one.parallel.threads == 1 and one.with_threads(1) is one and base.with_threads(0) is base
    raw = tomllib.loads(one.to_toml())
    assert profile_from_dict(raw) == one
    assert raw["parallel"]["threads"] == 1
    with pytest.raises(ProfileError, match=r"\[parallel\]\.threads: expected a non-negative integer, got -1"):
        profile_from_dict({**raw, "parallel": {**raw["parallel"], "threads": -1}}, "p.toml")
    with pytest.raises(ProfileError, match="inference threads must be >= 0"):
        base.with_threads(-2)


# ------------------------------------------------------------------------------------------------ the closed loop


class ThreadedBuilder(ScriptedBuilder):
    """A scripted device with 2 threads by default whose engines run ``one_thread`` × as long on 1 thread."""

    def __init__(self, one_thread: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.one_thread = one_thread
        self.profiles: list[tuple[str, int]] = []

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        engine = super().build(model, profile, out_dir)
        self.profiles.append((Path(model).stem, profile.parallel.threads))
        threads = profile.parallel.threads
        return dataclasses.replace(engine, options={**engine.options, **({"threads": str(threads)} if threads else {})})

    def thread_choices(self, engine: Engine) -> tuple[int, list[int]]:
        return (2, []) if "threads" in engine.options else (2, [1])

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        timing = super().time(engine, settings)
        if engine.options.get("threads") != "1":
            return timing
        samples = [timing.median_ms * self.one_thread] * 3
        return timing_from_samples(samples, warmup_runs=0, warmup_s=0.0, duration_s=0.0)


def _build(monkeypatch: pytest.MonkeyPatch, builder: ScriptedBuilder, path: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(closedloop, "builder_for", lambda profile: builder)
    return closedloop.build(path, PROFILE, out_dir=out, timing=FAST, **kw)  # type: ignore[arg-type]


def _fp32_ms(builder: ScriptedBuilder, path: Path) -> float:
    return (builder.overhead_us + sum(builder._node_us(onnx.load(str(path))).values())) / 1000


def test_a_build_runs_every_engine_on_the_threads_measured_faster(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ThreadedBuilder(0.4)
    said: list[str] = []
    fp32_ms = _fp32_ms(builder, cnn_path)
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "t1", budget_ms=fp32_ms * 0.3, progress=said.append)
    assert report.threads["threads"] == 1 and report.threads["default_threads"] == 2
    assert report.threads["ratios"] == {"1": pytest.approx(0.4)}
    assert [m for m in said if m.startswith("threads: 1 thread per request")]
    # the FP32 baseline is the engine on 1 thread; after the rounds every engine of the build was built on 1 thread
    assert report.baselines["fp32"].timing.median_ms == pytest.approx(0.4 * fp32_ms)
    first_tuned = builder.profiles.index(("fp32", 1))
    assert builder.profiles[:first_tuned] == [("fp32", 0)]
    assert all(threads == 1 for _, threads in builder.profiles[first_tuned:]), builder.profiles
    assert report.rex.timing.median_ms <= report.budget_ms  # type: ignore[operator]
    assert any(line.startswith("threads  1 thread per request") for line in report.summary_lines())
    assert "- inference threads: 1 thread per request" in report.to_markdown()
    assert json.loads((tmp_path / "t1" / "report.json").read_text())["threads"]["threads"] == 1
    # the slower FP32 engine on the default threads is not a candidate
    assert [e["label"] for e in report.latency_model["engines"]].count("FP32") == 1


def test_a_tie_keeps_the_runtimes_default_threads(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    builder = ThreadedBuilder(0.98)
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "tie", budget_ms=_fp32_ms(builder, cnn_path) * 0.8)
    assert report.threads["threads"] == 0 and report.threads["summary"].startswith("the runtime's default (2 threads)")
    assert [p for p in builder.profiles if p[1]] == [("fp32", 1)]  # only the FP32 engine tried on 1 thread


def test_a_slow_fp32_engine_is_not_tried_on_fewer_threads(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    builder = ThreadedBuilder(0.4, overhead_us=1000.0 * THREAD_MAX_MS)  # FP32 over THREAD_MAX_MS
    said: list[str] = []
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "slow", budget_ms=2 * THREAD_MAX_MS, progress=said.append)
    assert report.threads == {} and {threads for _, threads in builder.profiles} == {0}
    assert [m for m in said if m.startswith("threads: the runtime's default kept, fewer not tried")]


def test_threads_fixed_by_the_profile_are_not_tried(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    builder = ThreadedBuilder(0.4)
    monkeypatch.setattr(closedloop, "builder_for", lambda profile: builder)
    fixed = PROFILE.with_threads(2)
    report = closedloop.build(cnn_path, fixed, out_dir=tmp_path / "fixed", timing=FAST,
                              budget_ms=_fp32_ms(builder, cnn_path) * 0.9)  # fmt: skip
    assert report.threads == {}
    assert {threads for _, threads in builder.profiles} == {2}


def test_a_budget_relative_to_the_default_float_is_relative_to_it_as_loaded(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    """--relative-to default: the model as a user loads it, on the runtime's default threads; the build's own bf16
    engine on 1 thread is a candidate beside it, the engine as loaded is not."""
    builder = ThreadedBuilder(0.4, default_float="bf16")
    fp32_ms = _fp32_ms(builder, cnn_path)
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "rel", budget_ratio=1.0, relative_to="default")
    ref = report.baselines["reference"]
    assert ref.label == "bf16 (default), as loaded (2 threads)"
    assert ref.timing.median_ms == pytest.approx(0.6 * fp32_ms)
    assert report.budget_ms == pytest.approx(0.6 * fp32_ms)
    assert report.baselines["bf16 (default)"].timing.median_ms == pytest.approx(0.4 * 0.6 * fp32_ms)
    labels = [e["label"] for e in report.latency_model["engines"]]
    assert "bf16 (default)" in labels and not [x for x in labels if "as loaded" in x]
    assert report.fits_budget
    # what is returned runs 1 thread, at least as accurate as the default float engine: FP32 on 1 thread (exact)
    assert report.rex.timing.median_ms == pytest.approx(0.4 * fp32_ms)
    assert not report.plan.layers and report.plan.float_precision == "fp32"
    # budgets relative to FP32 likewise; relative to int8 the plain int8 engine is the build's own (1 thread)
    to_fp32 = _build(monkeypatch, ThreadedBuilder(0.4), cnn_path, tmp_path / "f32", budget_ratio=0.5, relative_to="fp32")
    assert to_fp32.baselines["reference"].label == "FP32, as loaded (2 threads)"
    assert to_fp32.budget_ms == pytest.approx(0.5 * fp32_ms)
    to_int8 = _build(monkeypatch, ThreadedBuilder(0.4), cnn_path, tmp_path / "i8", budget_ratio=1.0, relative_to="int8")
    assert "reference" not in to_int8.baselines
    assert to_int8.baselines["int8"].timing.median_ms < 0.5 * fp32_ms


# ------------------------------------------------------------------------------------------------ OpenVINO


@pytest.mark.openvino
def test_openvino_engines_carry_the_threads_and_offer_fewer(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from rexdeploy.builders.registry import get_builder
    from rexdeploy.demo import demo_model_path

    builder = get_builder("openvino")
    profile = load_profile("x86-avx2")
    default = builder.build(demo_model_path(), profile, tmp_path / "default")
    threads, offered = builder.thread_choices(default)  # type: ignore[attr-defined]
    assert threads >= 1  # whatever this host has: 1 where it has one core
    assert offered == ([] if threads == 1 else sorted({1, threads // 2} - {threads}))
    one = builder.build(demo_model_path(), profile.with_threads(1), tmp_path / "one")
    assert one.options["INFERENCE_NUM_THREADS"] == "1"
    from rexdeploy_openvino.builder import compiled_model

    assert int(compiled_model(one).get_property("INFERENCE_NUM_THREADS")) == 1
    assert builder.thread_choices(one) == (1, [])  # type: ignore[attr-defined]  # fixed: nothing more to try
    stored = json.loads((tmp_path / "one" / "runtime_options.json").read_text())
    assert stored["options"]["INFERENCE_NUM_THREADS"] == "1"
    assert "INFERENCE_NUM_THREADS=1 (the profile's [parallel] threads" in stored["note"]
    again = builder.load(tmp_path / "one" / "model.xml", profile)  # type: ignore[attr-defined]
    assert int(compiled_model(again).get_property("INFERENCE_NUM_THREADS")) == 1
    assert "INFERENCE_NUM_THREADS" not in default.options


# ------------------------------------------------------------------------------------------------ the CLI


def test_threads_flag_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    from rexdeploy.cli.main import main
    from rexdeploy.demo import demo_model_path

    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["build", str(demo_model_path()), "--threads", bad])
        assert exc.value.code == 2  # a usage error
        assert "use auto or a whole number of threads >= 1" in capsys.readouterr().err


@pytest.mark.openvino
def test_threads_flag_fixes_every_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--threads 1: nothing measured, every engine (and the returned one's runtime options) runs 1 thread."""
    pytest.importorskip("openvino")
    from rexdeploy.cli.main import main
    from rexdeploy.demo import demo_model_path

    out = tmp_path / "t1"
    args = ["build", str(demo_model_path()), "--profile", "x86-avx2", "--order", "1", "--threads", "1",
            "--out", str(out), "--duration", "0.2s", "--warmup", "50ms", "--json"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["threads"] == {} and "fewer inference threads" not in captured.err
    for folder in ("rex", "fp32"):
        stored = json.loads((out / folder / "runtime_options.json").read_text())
        assert stored["options"]["INFERENCE_NUM_THREADS"] == "1", folder
