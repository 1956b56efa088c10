"""--samples: the user's own inputs, to measure fidelity on (never to quantize)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rexdeploy.api import fidelity_disagreement
from rexdeploy.cli.main import main
from rexdeploy.demo import demo_model_path
from rexdeploy.errors import InputError
from rexdeploy.fidelity import Fidelity, compare_outputs
from rexdeploy.samples import Preprocess, load_samples, preprocess_from_flags

DEMO = onnx.load(str(demo_model_path()))


def _digits(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("sklearn")
    from rexdeploy.demo import load_digits_inputs

    x, y = load_digits_inputs()
    return x[:n], y[:n]


def test_npy_npz_and_single_sample_shapes(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = load_samples(tmp_path / "x.npy", DEMO)
    assert list(got) == ["input"] and np.array_equal(got["input"], x)
    np.save(tmp_path / "one.npy", x[0])  # one sample without its batch axis
    assert load_samples(tmp_path / "one.npy", DEMO)["input"].shape == (1, 1, 8, 8)
    np.savez(tmp_path / "x.npz", input=x)
    assert np.array_equal(load_samples(tmp_path / "x.npz", DEMO)["input"], x)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: np.save(d / "s.npy", np.zeros((3, 1, 9, 8), np.float32)), "have shape 3x1x9x8; the model takes ?x1x8x8"),
        (lambda d: np.savez(d / "s.npz", image=np.zeros((3, 1, 8, 8), np.float32)), "names inputs ['image']"),
        (lambda d: (d / "s.npy").write_bytes(b"not numpy"), "cannot read samples s.npy"),
        (lambda d: np.save(d / "s.npy", np.zeros((0, 1, 8, 8), np.float32)), "holds no sample"),
    ],
)
def test_bad_samples_say_what_is_wrong(tmp_path: Path, make, needle: str) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=re.escape(needle)):
        load_samples(path, DEMO)


def test_a_folder_of_images_is_resized_scaled_and_normalised(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    for i, p in enumerate(pixels):
        image.fromarray(p, mode="L").save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    pre = preprocess_from_flags(8, "0.5", "0.25", "NCHW")
    x = load_samples(tmp_path, DEMO, pre)["input"]
    assert x.shape == (3, 1, 8, 8) and x.dtype == np.float32
    # independent: Pillow's own bilinear resize, then (v/255 - 0.5) / 0.25
    first = np.asarray(image.fromarray(pixels[0], mode="L").resize((8, 8), image.Resampling.BILINEAR), np.float32)
    assert np.allclose(x[0, 0], (first / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_preprocess_flags_are_checked() -> None:
    with pytest.raises(InputError, match="--sample-mean 'a,b'"):
        preprocess_from_flags(None, "a,b", None, None)
    with pytest.raises(InputError, match="--sample-std"):
        preprocess_from_flags(None, None, "0,1", None)
    with pytest.raises(InputError, match="--sample-layout 'NWCH'"):
        preprocess_from_flags(None, None, None, "NWCH")
    assert preprocess_from_flags(None, None, None, None) == Preprocess()


def test_disagreement_between_estimate_and_samples() -> None:
    def f(rel: float, top1: float | None) -> Fidelity:
        return Fidelity(probes=10, relative_error=rel, cosine=1.0, max_abs_error=0.0, top1_agreement=top1)

    assert fidelity_disagreement(f(0.02, 1.0), f(0.03, 0.95)) is None
    warning = fidelity_disagreement(f(0.02, 1.0), f(0.21, 0.49))
    assert warning is not None and "trust the samples" in warning and "49.0%" in warning
    assert fidelity_disagreement(f(0.01, None), f(0.05, None)) is not None  # 5x the error
    assert fidelity_disagreement(f(1e-9, None), f(1e-8, None)) is None  # both exact for all purposes


@pytest.mark.openvino
def test_build_measures_fidelity_on_the_samples_beside_the_estimate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    x, _ = _digits(40)
    np.save(tmp_path / "digits.npy", x)
    out = tmp_path / "out"
    # the host's own profile: 8-bit weights overflow the int16 pairs of an AVX2-only CPU (x86-avx2 caps them at 7)
    code = main(["build", str(demo_model_path()), "--profile", "auto", "--order", "1",
                 "--samples", str(tmp_path / "digits.npy"), "--out", str(out), "--duration", "0.1s", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    samples = report["fidelity"]["samples"]
    assert report["fidelity"]["source"] == "synthetic probes (an estimate)"
    assert samples["probes"] == 40
    # independent reference: onnxruntime on the expanded Q/DQ graph vs on the FP32 model, same samples
    ref = ort.InferenceSession(str(demo_model_path()), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(out / "expanded.onnx"), providers=["CPUExecutionProvider"])
    simulated = compare_outputs(ref.run(None, {"input": x})[0], q.run(None, {"input": x})[0])
    assert samples["top1_agreement"] == pytest.approx(simulated.top1_agreement, abs=0.05)
    assert samples["relative_error"] == pytest.approx(simulated.relative_error, rel=0.5)
    assert "your samples" in (out / "report.md").read_text()


def test_build_with_bad_samples_fails_in_one_line_and_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "out"
    code = main(["build", str(demo_model_path()), "--profile", "x86-avx512", "--bits", "8", "--order", "1",
                 "--samples", str(tmp_path / "bad.npy"), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "have shape 2x3x8x8" in err[0]
    assert not out.exists()


def test_plan_reports_the_plans_fidelity_on_the_samples(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    x, _ = _digits(60)
    np.save(tmp_path / "digits.npy", x)
    plan_path = tmp_path / "p.json"
    from rexdeploy.api import plan

    fp32 = next(c for c in plan(demo_model_path(), "x86-avx512", 1e3, measure=False).candidates if c.label == "FP32")
    budget = f"{fp32.predicted_latency_ms * 990:.3f}us"  # just under the (analytic) FP32 engine: a quantized plan
    args = ["plan", str(demo_model_path()), "--profile", "x86-avx512", "--budget", budget, "--estimate",
            "--samples", str(tmp_path / "digits.npy"), "-o", str(plan_path)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("fidelity on your 60 samples"))
    assert json.loads(plan_path.read_text())["layers"]
    # independent: replay the plan with `rexdeploy expand`, run both graphs with onnxruntime (no optimizations)
    assert main(["expand", str(demo_model_path()), "--plan", str(plan_path), "-o", str(tmp_path / "x.onnx")]) == 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(demo_model_path()), options, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(tmp_path / "x.onnx"), options, providers=["CPUExecutionProvider"])
    expected = compare_outputs(ref.run(None, {"input": x})[0], q.run(None, {"input": x})[0])
    assert f"rel. error {expected.relative_error:.2e}" in line
