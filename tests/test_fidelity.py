"""rexdeploy.fidelity: compare_outputs against values worked out by hand; the data-free estimate over the probe
families against each family recomputed independently."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexdeploy.fidelity import Fidelity, compare_outputs


def test_hand_computed_logits() -> None:
    # 2 probes x 3 classes
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=np.float32)
    cand = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], dtype=np.float32)
    fid = compare_outputs(ref, cand)
    # diff = [[-2, 1, 0], [0, 0, 1]]: ‖diff‖² = 6, ‖ref‖² = 9 + 1 + 1 + 4 = 15
    assert fid.relative_error == pytest.approx(math.sqrt(6 / 15), rel=1e-12)
    # ref·cand = 3 + 2 + 1 + 6 = 12, ‖cand‖² = 1 + 4 + 1 + 9 = 15: cosine 12 / √(15·15) = 0.8
    assert fid.cosine == pytest.approx(0.8, rel=1e-12)
    assert fid.max_abs_error == 2.0
    # argmax: ref (0, 2), cand (1, 2) → one probe of two agrees
    assert fid.top1_agreement == 0.5
    assert fid.probes == 2


def test_identical_scaled_and_negated() -> None:
    ref = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    same = compare_outputs(ref, ref.copy())
    assert (same.relative_error, same.max_abs_error, same.top1_agreement) == (0.0, 0.0, 1.0)
    assert same.cosine == pytest.approx(1.0, abs=1e-12)
    # twice the reference: cosine ignores the scale, the relative error is 1, the argmax is kept
    double = compare_outputs(ref, 2 * ref)
    assert double.cosine == pytest.approx(1.0, abs=1e-12)
    assert double.relative_error == pytest.approx(1.0, rel=1e-12)
    assert double.max_abs_error == pytest.approx(float(np.abs(ref).max()), rel=1e-7)
    assert double.top1_agreement == 1.0
    negated = compare_outputs(ref, -ref)
    assert negated.cosine == pytest.approx(-1.0, abs=1e-12)
    assert negated.relative_error == pytest.approx(2.0, rel=1e-12)


def test_computed_in_float64() -> None:
    """A float32 candidate off by one float32 ulp of a large logit: float64 sums resolve it."""
    ref = np.full((4, 16), 1000.0, dtype=np.float32)
    ref[:, 0] = 1001.0
    cand = ref.copy()
    cand[0, 3] = np.nextafter(np.float32(1000.0), np.float32(2000.0))  # + 6.1e-5
    fid = compare_outputs(ref, cand)
    step = float(cand[0, 3]) - 1000.0
    assert fid.max_abs_error == step
    assert fid.relative_error == pytest.approx(step / float(np.linalg.norm(ref.astype(np.float64))), rel=1e-9)
    assert fid.top1_agreement == 1.0


@pytest.mark.parametrize(
    ("shape", "top1"),
    [
        ((5, 7), True),  # (probes, classes)
        ((5, 2, 3), True),  # (probes, tokens, classes): argmax over the flattened rest
        ((5, 1), False),  # one output value: no class to agree on
        ((5, 3, 4, 4), False),  # an image-like output is not a classifier's
        ((5,), False),
    ],
)
def test_top1_only_for_classifier_outputs(shape: tuple[int, ...], top1: bool) -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(shape)
    cand = ref + 0.01 * rng.standard_normal(shape)
    fid = compare_outputs(ref, cand)
    if top1:
        flat_r, flat_c = ref.reshape(shape[0], -1), cand.reshape(shape[0], -1)
        want = float(np.mean(flat_r.argmax(axis=1) == flat_c.argmax(axis=1)))
        assert fid.top1_agreement == want
    else:
        assert fid.top1_agreement is None
    assert fid.probes == 5


def test_one_probe_disagreeing() -> None:
    ref = np.eye(4)
    cand = np.eye(4)
    cand[2] = [0.0, 0.0, 0.4, 0.6]  # probe 2 now votes for class 3
    fid = compare_outputs(ref, cand)
    assert fid.top1_agreement == 0.75
    # diff only in row 2: (0, 0, -0.6, 0.6); ‖ref‖ = 2
    assert fid.relative_error == pytest.approx(math.sqrt(0.72) / 2, rel=1e-12)
    assert fid.max_abs_error == pytest.approx(0.6, rel=1e-12)
    # ref·cand = 3 + 0.4; ‖cand‖² = 3 + 0.16 + 0.36
    assert fid.cosine == pytest.approx(3.4 / (2 * math.sqrt(3.52)), rel=1e-12)


def test_zero_outputs() -> None:
    zeros = np.zeros((3, 4))
    ones = np.ones((3, 4))
    both = compare_outputs(zeros, zeros)
    assert (both.relative_error, both.cosine, both.max_abs_error) == (0.0, 1.0, 0.0)
    # a zero reference: the relative error falls back to the absolute L2 distance, √12
    from_zero = compare_outputs(zeros, ones)
    assert from_zero.relative_error == pytest.approx(math.sqrt(12.0), rel=1e-12)
    assert from_zero.max_abs_error == 1.0
    # an engine that outputs only zeros does not agree with a non-zero reference in direction
    dead = compare_outputs(ones, zeros)
    assert dead.relative_error == 1.0
    assert dead.cosine == 0.0
    assert from_zero.cosine == 0.0


def test_shape_mismatch_and_json() -> None:
    with pytest.raises(ValueError, match=r"output shapes differ: \(2, 3\) vs \(3, 2\)"):
        compare_outputs(np.zeros((2, 3)), np.zeros((3, 2)))
    fid = compare_outputs(np.eye(3), np.eye(3))
    doc = fid.to_dict()
    ci95 = doc.pop("top1_ci95")  # derived from the figures (below): not a field
    assert doc == {"probes": 3, "relative_error": 0.0, "cosine": 1.0, "max_abs_error": 0.0, "top1_agreement": 1.0}
    assert ci95 == pytest.approx([0.4385, 1.0], abs=1e-4)  # 3 of 3 agree: Wilson's 95 % interval
    assert Fidelity(**doc) == fid
    assert Fidelity.from_dict(doc) == fid


def test_estimate_reports_every_family_and_the_worst_of_each_figure() -> None:
    import onnx

    from rexdeploy.demo import demo_model_path
    from rexdeploy.fidelity import estimate_fidelity
    from rexdeploy.probes import GAUSSIAN, family_inputs

    model = onnx.load(str(demo_model_path()))
    head = np.random.default_rng(0).standard_normal((64, 10))

    def reference(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return feeds["input"].reshape(-1, 64).astype(np.float64) @ head

    def candidate(feeds: Mapping[str, np.ndarray]) -> np.ndarray:  # inputs rounded to steps of 0.5
        return np.round(2.0 * feeds["input"].reshape(-1, 64).astype(np.float64)) / 2.0 @ head

    est = estimate_fidelity(model, reference, candidate, probes=24, seed=5)
    assert [f.family for f in est.families] == ["gaussian", "bn-matched", "natural-1/f"]
    for f in est.families:  # each family's figures, recomputed from its probes
        feeds = family_inputs(model, f.family, 24, seed=5)
        assert f == replace(compare_outputs(reference(feeds), candidate(feeds)), family=f.family)
    assert est.probes == 24
    assert est.relative_error == max(f.relative_error for f in est.families)
    assert est.error_family == max(est.families, key=lambda f: f.relative_error).family
    assert est.max_abs_error == max(f.max_abs_error for f in est.families)
    assert est.cosine == min(f.cosine for f in est.families)
    structured = [f for f in est.families if f.family != GAUSSIAN]
    assert est.top1_agreement == min(f.top1_agreement for f in structured if f.top1_agreement is not None)
    assert est.family in {f.family for f in structured if f.top1_agreement == est.top1_agreement}
    doc = est.to_dict()
    assert set(doc["families"]) == {"gaussian", "bn-matched", "natural-1/f"}
    assert doc["family"] == est.family and doc["error_family"] == est.error_family
    assert Fidelity.from_dict(json.loads(json.dumps(doc))) == est
    # the Gaussian family only bounds the error where a structured family applies: at most 32 probes
    more = estimate_fidelity(model, reference, candidate, probes=40, seed=5)
    assert {f.family: f.probes for f in more.families} == {"gaussian": 32, "bn-matched": 40, "natural-1/f": 40}


def test_measure_fidelity_runs_the_engines_on_the_estimate_probes(tmp_path: Path) -> None:
    """The builder path (engines, batch 1) gives what estimate_fidelity gives with onnxruntime sessions."""
    import onnx
    import onnxruntime as ort
    from models import small_cnn
    from rexdeploy_onnxruntime import OnnxRuntimeBuilder

    from rexdeploy.api import expand_model
    from rexdeploy.fidelity import estimate_fidelity, measure_fidelity
    from rexdeploy.profile import Parallel, Profile

    model = small_cnn(batchnorm=True)
    expanded = expand_model(model, bits=8, order=1, act_bits=8).model
    paths = {name: tmp_path / f"{name}.onnx" for name in ("fp32", "q")}
    onnx.save(model, str(paths["fp32"]))
    onnx.save(expanded, str(paths["q"]))
    builder = OnnxRuntimeBuilder()
    profile = Profile(name="test-cpu", engine="onnxruntime", device="CPU", parallel=Parallel(cores=1))
    engines = {name: builder.build(path, profile, tmp_path / name) for name, path in paths.items()}
    got = measure_fidelity(builder, engines["fp32"], engines["q"], model, probes=8)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(m: onnx.ModelProto) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return lambda feeds: np.asarray(session.run(None, dict(feeds))[0])

    want = estimate_fidelity(model, run(model), run(expanded), probes=8)
    assert [f.family for f in got.families] == [f.family for f in want.families]
    assert got.relative_error > 1e-4  # W8A8: not exact
    for g, w in zip(got.families, want.families, strict=True):
        # the engine fuses Q/DQ into integer kernels that requantize in one step (a code flips now and then:
        # ~2e-3 of the output on this model); with uint8 ReLU outputs the quantization error itself is ~0.012-0.02,
        # so on 8 probes the two errors differ by up to ~10 %
        assert g.relative_error == pytest.approx(w.relative_error, rel=0.15)
        assert g.top1_agreement == pytest.approx(w.top1_agreement, abs=1 / 8)
    # the reference's outputs kept by probe digest: a second estimate against the same engine runs only the candidate
    calls: list[str] = []

    class Counting(OnnxRuntimeBuilder):
        def run(self, engine, inputs):  # type: ignore[no-untyped-def]
            calls.append(engine.artifacts[0].parent.name if engine.artifacts else "?")
            return super().run(engine, inputs)

    counting, kept = Counting(), {}  # type: ignore[var-annotated]
    first = measure_fidelity(counting, engines["fp32"], engines["q"], model, probes=8, reference_outputs=kept)
    per_engine = len(calls) // 2
    second = measure_fidelity(counting, engines["fp32"], engines["q"], model, probes=8, reference_outputs=kept)
    assert len(calls) == 3 * per_engine and len(kept) == len(first.families)
    assert second == first


def test_every_float_output_is_compared_and_the_worst_named() -> None:
    """A detector's scores and boxes: the boxes' error is the larger, so it is the one reported (and named); the
    cosine is the lower of the two, the top-1 agreement the scores' (the first output with classes)."""
    from rexdeploy.fidelity import compare_all, compared_outputs

    scores = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    boxes = np.array([[[0.0, 0.0, 4.0, 4.0]], [[1.0, 1.0, 2.0, 3.0]]])
    labels = np.array([0, 2], dtype=np.int64)
    ref = compared_outputs([labels, scores, boxes], ["labels", "scores", "boxes"])
    assert list(ref) == ["scores", "boxes"]  # the integer labels are not compared
    cand = {"scores": scores + np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]), "boxes": boxes * 1.5}
    got = compare_all(ref, cand)
    each = {k: compare_outputs(ref[k], cand[k]) for k in ref}
    assert each["boxes"].relative_error == pytest.approx(0.5) and each["scores"].relative_error < 0.5
    assert got.relative_error == each["boxes"].relative_error and got.error_output == "boxes"
    assert got.cosine == min(f.cosine for f in each.values())
    assert got.max_abs_error == max(f.max_abs_error for f in each.values())
    assert got.top1_agreement == each["scores"].top1_agreement == 1.0
    assert Fidelity.from_dict(json.loads(json.dumps(got.to_dict()))) == got
    # one output: exactly compare_outputs, no output named
    assert compare_all({"scores": scores}, {"scores": cand["scores"]}) == each["scores"]
    with pytest.raises(ValueError, match="compared outputs differ"):
        compare_all(ref, {"scores": cand["scores"]})


def test_simulated_fidelity_sees_a_second_output_quantized_harder() -> None:
    """Two heads on one input: only the second ("boxes") is quantized (2-bit weights): the fidelity on samples is
    that head's error, computed independently with numpy, and names it; the first head is exact."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from reference import rex_orders

    from rexdeploy.api import simulated_fidelity
    from rexdeploy.plans import LayerPlan, Plan
    from rexdeploy.profile import load_profile

    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(10, 16)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["scores"], name="head_scores", transB=1),
         helper.make_node("Gemm", ["x", "w2"], ["boxes"], name="head_boxes", transB=1)],
        "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    profile = load_profile("x86-avx512")
    plan = Plan(layers={"head_boxes": LayerPlan(bits=2, order=1, act_bits=0)}, profile=profile.name)
    got = simulated_fidelity(model, plan, {"x": x}, profile=profile)
    boxes = x.astype(np.float64) @ w2.T.astype(np.float64)
    want = compare_outputs(boxes, x.astype(np.float64) @ rex_orders(w2.astype(np.float64), 2, 1)[0].T)
    assert got.error_output == "boxes"
    assert got.relative_error == pytest.approx(want.relative_error, rel=1e-5)
    assert got.relative_error > 0.1
    assert got.top1_agreement == 1.0  # the scores head is not quantized


def test_wilson_interval_matches_the_closed_form_and_brackets_the_figure() -> None:
    from rexdeploy.fidelity import wilson_interval

    # 55 of 64 (85.9 %): Wilson's 95 % interval, by hand: centre (p + z²/2n)/(1 + z²/n), half-width
    # z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n) with z = 1.96
    p, n, z = 55 / 64, 64, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(p, n) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(p, n) == pytest.approx((0.7538, 0.9242), abs=1e-4)
    lo, hi = wilson_interval(1.0, 64)  # all agree: not an empty interval at 100 %
    assert hi == 1.0 and 0.9 < lo < 1.0
    # more probes, a narrower interval around the same figure
    assert np.diff(wilson_interval(0.8, 256)) < np.diff(wilson_interval(0.8, 64)) < np.diff(wilson_interval(0.8, 16))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(min_value=0, max_value=500), n=st.integers(min_value=1, max_value=500))
def test_wilson_interval_is_a_valid_interval_containing_the_observed_fraction(k: int, n: int) -> None:
    from rexdeploy.fidelity import wilson_interval

    k = min(k, n)
    lo, hi = wilson_interval(k / n, n)
    assert 0.0 <= lo <= k / n + 1e-12 and k / n - 1e-12 <= hi <= 1.0


def test_the_estimates_top1_interval_counts_its_top1_familys_probes() -> None:
    fam = Fidelity(64, 0.1, 0.99, 1.0, 55 / 64, family="bn-matched")
    other = Fidelity(32, 0.2, 0.98, 2.0, None, family="gaussian")
    est = Fidelity(96, 0.2, 0.98, 2.0, 55 / 64, family="bn-matched", error_family="gaussian", families=(fam, other))
    assert est.top1_probes == 64 and est.top1_ci95 == fam.top1_ci95
    doc = json.loads(json.dumps(est.to_dict()))
    assert doc["top1_ci95"] == pytest.approx([0.7538, 0.9242], abs=1e-4)
    assert Fidelity.from_dict(doc) == est  # the interval is derived, not stored
    assert Fidelity(10, 0.1, 0.9, 1.0, None).top1_ci95 is None
    from rexdeploy.fidelity import top1_text

    assert top1_text(est) == "top-1 agreement 85.9% (95 % CI 75%–92%)"
