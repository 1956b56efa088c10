"""The planner: deterministic, fits the budget, per-layer never worse than uniform, FP32 when it fits,
a clear error when nothing fits, and a fidelity model that ranks plans like the measured error."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import small_cnn

from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.cli.main import main
from rexdeploy.errors import BudgetError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.planner import plan_model
from rexdeploy.plans import load_plan
from rexdeploy.profile import Profile, load_profile


def _int8_friendly_profile() -> Profile:
    """x86-avx512 with slow float kernels, so quantized plans are faster than FP32 on this tiny model
    and the search has a real trade-off to make."""
    base = load_profile("x86-avx512")
    table = {c: {**p, "fp32": 1.0} for c, p in base.cost.throughput_gmacs.items()}
    cost = replace(base.cost, throughput_gmacs=table, layer_overhead_us=0.5, branch_overhead_us=0.5)
    return replace(base, cost=cost)


PROFILE = _int8_friendly_profile()


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture(scope="module")
def layers(model: onnx.ModelProto) -> list:  # type: ignore[type-arg]
    return quantizable_layers(fold_batchnorm(model)[0])


def _span(model: onnx.ModelProto, layers: list) -> tuple[float, float]:  # type: ignore[type-arg]
    result = plan_model(model, layers, PROFILE, 1e9)
    lat = [c.predicted_latency_ms for c in result.candidates]
    return min(lat), max(lat)


def test_deterministic(model: onnx.ModelProto, layers: list) -> None:  # type: ignore[type-arg]
    lo, hi = _span(model, layers)
    budget = (lo + hi) / 2
    a, b = plan_model(model, layers, PROFILE, budget), plan_model(model, layers, PROFILE, budget)
    assert a.plan.hash == b.plan.hash
    assert a.plan.to_json() == b.plan.to_json()


def test_fp32_when_it_fits(model: onnx.ModelProto, layers: list) -> None:  # type: ignore[type-arg]
    result = plan_model(model, layers, load_profile("x86-avx512"), 1e9)
    assert result.chosen.label == "FP32" and result.plan.layers == {} and result.chosen.predicted_error == 0.0


def test_nothing_fits(model: onnx.ModelProto, layers: list) -> None:  # type: ignore[type-arg]
    lo, _ = _span(model, layers)
    with pytest.raises(BudgetError, match=r"no plan is predicted to fit.*the fastest.*relax --budget"):
        plan_model(model, layers, PROFILE, lo * 0.5)


def test_fits_budget_and_beats_uniform(model: onnx.ModelProto, layers: list) -> None:  # type: ignore[type-arg]
    lo, hi = _span(model, layers)
    for frac in (0.05, 0.3, 0.6):
        budget = lo + frac * (hi - lo)
        result = plan_model(model, layers, PROFILE, budget)
        assert result.chosen.predicted_latency_ms <= budget
        uniform = [c for c in result.candidates if c.label.startswith("uniform") and c.predicted_latency_ms <= budget]
        assert all(result.chosen.predicted_error <= c.predicted_error for c in uniform)
        front = result.front
        assert all(a.predicted_latency_ms <= b.predicted_latency_ms for a, b in itertools.pairwise(front))
        assert all(a.predicted_error > b.predicted_error for a, b in itertools.pairwise(front))


def _measured_error(model: onnx.ModelProto, plan: object, x: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expanded = expand_model(model, plan)  # type: ignore[arg-type]
    got = ort.InferenceSession(expanded.model.SerializeToString(), opts).run(None, {"x": x})[0]
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_fidelity_model_ranks_plans_like_the_measured_error() -> None:
    # no BatchNorm: this random network's BN statistics would not describe its N(0, 1) probe inputs (a
    # trained network's do), and the ranges would then come from a mismatched distribution
    model = small_cnn(batchnorm=False)
    layers = quantizable_layers(model)
    result = plan_model(model, layers, PROFILE, 1e9)
    quantized = [c for c in result.candidates if c.plan.layers]
    step = max(1, len(quantized) // 12)
    sample = quantized[::step]
    x = np.random.default_rng(11).standard_normal((32, 3, 8, 8)).astype(np.float32)
    predicted = [c.predicted_error for c in sample]
    measured = [_measured_error(model, c.plan, x) for c in sample]
    assert len(sample) >= 8
    assert _spearman(predicted, measured) > 0.8, list(zip(predicted, measured, strict=True))


def test_plan_cli_writes_a_plan_expand_can_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: onnx.ModelProto, layers: list
) -> None:  # type: ignore[type-arg]
    lo, hi = _span(model, layers)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    profile_path = tmp_path / "fast-int8.toml"
    profile_path.write_text(PROFILE.to_toml())
    budget = f"{(lo + 0.3 * (hi - lo)) * 1000:.3f}us"
    assert (
        main(["plan", str(path), "--profile", str(profile_path), "--budget", budget, "-o", str(tmp_path / "p.json"),
              "--estimate"])
        == 0
    )
    err = capsys.readouterr().err
    assert "<- chosen" in err and "predicted latency" in err
    assert "latencies: an estimate (the profile's analytic cost model)" in err
    plan = load_plan(tmp_path / "p.json")
    assert plan.layers and plan.predicted_latency_ms is not None
    assert main(["expand", str(path), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "x.onnx")]) == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "x.onnx")), full_check=True)
    capsys.readouterr()
    assert main(["plan", str(path), "--profile", str(profile_path), "--budget", "1ns"]) == 1
    assert "malformed budget '1ns'" in capsys.readouterr().err
    assert main(["plan", str(path), "--profile", str(profile_path), "--budget", "1us", "--estimate"]) == 1
    assert "no plan is predicted to fit" in capsys.readouterr().err
    assert json.loads(plan.to_json())["layers"]


def test_a_batch_one_export_is_probed_on_every_probe_not_one() -> None:
    """torch.onnx.export without dynamic_axes fixes the batch at 1: the sensitivity probes run one at a time, all
    of them (the fixed dimension once made them a single probe), and agree with the same net's dynamic export."""
    from rexdeploy.planner.search import prepare

    dynamic = small_cnn(seed=2)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(dynamic)
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    layers = quantizable_layers(fold_batchnorm(fixed)[0])
    one = prepare(fixed, layers, probes=1).errors.sensitivity
    four = prepare(fixed, layers, probes=4).errors.sensitivity
    name = layers[0].name  # its input is the model input: every probe's values are sampled
    assert four.input_abs[name].size == 4 * one.input_abs[name].size
    ref = prepare(dynamic, quantizable_layers(fold_batchnorm(dynamic)[0]), probes=4).errors.sensitivity
    assert all(np.isfinite(g) and g > 0 for g in four.gains.values())
    for layer in layers:  # different draws of the same family: same order of magnitude
        assert 0.5 < four.gains[layer.name] / ref.gains[layer.name] < 2.0, layer.name
    from rexdeploy.selfcheck import PROBES, probe_feeds

    feeds = probe_feeds(fixed)  # the build's self-check: all its probes too, distinct
    x = next(iter(feeds.values()))
    assert x.shape[0] == PROBES > 1 and not np.allclose(x[0], x[1])
