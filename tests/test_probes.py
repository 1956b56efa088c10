"""rexdeploy.probes: the statistics of each synthetic probe family, held to independent measurements
(numpy FFTs, onnxruntime running the model's first Conv), and determinism by seed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rexdeploy import probes
from rexdeploy.errors import InputError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def _power_slope(images: np.ndarray) -> float:
    """Least-squares slope of log mean power vs log radial frequency over 0.02–0.3 cycles/pixel, written
    out here with numpy (independent of probes.radial_power_slope)."""
    h, w = images.shape[-2:]
    planes = images.reshape(-1, h, w) - images.reshape(-1, h, w).mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(planes)) ** 2).mean(axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    sel = (f >= 0.02) & (f <= 0.3)
    return float(np.polyfit(np.log(f[sel]), np.log(power[sel]), 1)[0])


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.5])
def test_spectral_field_power_slope_and_autocorrelation(exponent: float) -> None:
    rng = np.random.default_rng(0)
    field = probes.spectral_field((4, 2, 64, 64), rng, exponent)
    assert field.shape == (4, 2, 64, 64)
    np.testing.assert_allclose(field.mean(axis=(-2, -1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(field.std(axis=(-2, -1)), 1.0, rtol=1e-12)
    assert _power_slope(field) == pytest.approx(-2.0 * exponent, abs=0.1)
    assert probes.radial_power_slope(field) == pytest.approx(-2.0 * exponent, abs=0.1)
    # fixed amplitude: every plane's circular autocorrelation is the predicted one, exactly
    acf = probes.field_autocorrelation(64, 64, exponent)
    for dy, dx in [(0, 1), (1, 0), (2, 3), (5, 0)]:
        measured = np.mean(field * np.roll(field, (dy, dx), axis=(-2, -1)), axis=(-2, -1))
        np.testing.assert_allclose(measured, acf[dy, dx], atol=1e-9)


def test_natural_images_statistics_and_layouts() -> None:
    x = probes.natural_images((16, 3, 96, 96), np.random.default_rng(3))
    pixels = x * IMAGENET_STD + IMAGENET_MEAN  # undo the ImageNet normalisation
    assert pixels.min() >= -1e-9 and pixels.max() <= 1 + 1e-9  # clipped like pixels
    per_image = pixels.mean(axis=(1, 2, 3))
    lo, hi = probes.NATURAL_BRIGHTNESS
    assert np.all((per_image > lo - 0.1) & (per_image < hi + 0.1))
    assert _power_slope(pixels) == pytest.approx(-2.0 * probes.NATURAL_AMPLITUDE_EXPONENT, abs=0.25)
    # channels share the luminance field: strongly correlated, not identical
    corr = np.corrcoef(pixels[:, 0].ravel(), pixels[:, 2].ravel())[0, 1]
    assert 0.7 < corr < 0.99
    nhwc = probes.natural_images((16, 96, 96, 3), np.random.default_rng(3), layout="NHWC")
    np.testing.assert_allclose(nhwc, x.transpose(0, 2, 3, 1))
    gray = probes.natural_images((2, 1, 32, 32), np.random.default_rng(0))
    assert gray.shape == (2, 1, 32, 32) and np.isfinite(gray).all()
    with pytest.raises(InputError, match="layout"):
        probes.natural_images((1, 3, 32, 32), np.random.default_rng(0), layout="CHWN")


def _conv_bn_model(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, size: int
) -> onnx.ModelProto:
    out, cin = weight.shape[:2]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             [(weight, "w"), (bias, "b"), (np.ones(out), "g"), (np.zeros(out), "beta"), (mean, "m"), (var, "v")]]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["conv", "g", "beta", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The Conv's output, by onnxruntime (graph optimizations off) with the Conv output as the graph output."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    del tapped.graph.output[:]
    tapped.graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x.astype(np.float32)})[0], dtype=np.float64)


def test_bn_matched_first_layer_statistics_match_the_batchnorm() -> None:
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((16, 3, 3, 3)) * 0.3
    bias = 0.1 * rng.standard_normal(16)
    # running statistics of a distribution the family can represent: colour-correlated 1/f^0.75 fields
    size = 48
    true_cov = np.array([[1.0, 0.8, 0.6], [0.8, 1.2, 0.7], [0.6, 0.7, 0.9]])
    true_mean = np.array([0.2, -0.1, 0.3])
    true = probes.BnMatch("x", true_mean, true_cov, 0.75, 0.0, 0.0)
    source = probes.bn_matched_fields(true, (64, 3, size, size), rng)
    measured = _conv_output(_conv_bn_model(weight, bias, np.zeros(16), np.ones(16), size), source)
    bn_mean, bn_var = measured.mean(axis=(0, 2, 3)), measured.var(axis=(0, 2, 3))
    model = _conv_bn_model(weight, bias, bn_mean, bn_var, size)

    assert probes.applicable_families(model) == (probes.GAUSSIAN, probes.BN_MATCHED, probes.NATURAL)
    x = probes.family_inputs(model, probes.BN_MATCHED, 64, seed=2)["x"]
    y = _conv_output(model, x)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), bn_var, rtol=0.15)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), bn_mean, atol=0.1 * np.sqrt(bn_var).max())
    # the Gaussian family misses them by far (what the BN-matched family is for)
    g = _conv_output(model, probes.family_inputs(model, probes.GAUSSIAN, 16, seed=2)["x"])
    assert np.max(np.abs(g.var(axis=(0, 2, 3)) / bn_var - 1.0)) > 0.5

    found = probes.first_batchnorm(model, "x")
    assert found is not None
    match = probes.fit_bn_matched(*found[:4], (size, size), found[4])
    assert match.variance_miss < 0.1 and match.mean_miss < 0.1
    assert abs(match.exponent - 0.75) <= 0.25
    assert np.all(np.linalg.eigvalsh(match.covariance) >= -1e-12)


def _token_model(vocab: int = 50) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocab, 8)).astype(np.float32), "emb")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["emb", "ids32"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["y"]),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 12]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, axes])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_token_ids_within_the_vocabulary() -> None:
    model = _token_model(vocab=50)
    assert probes.embedding_vocab(model) == {"ids": 50}
    assert probes.applicable_families(model) == (probes.TOKENS,)
    feeds = probes.family_inputs(model, probes.TOKENS, 200, seed=4)
    ids = feeds["ids"]
    assert ids.dtype == np.int64 and ids.shape == (200, 12)
    assert ids.min() == 0 and ids.max() == 49  # 2,400 draws cover all 50 ids
    counts = np.bincount(ids.ravel(), minlength=50)
    assert counts.min() > 20 and counts.max() < 80  # uniform: 48 expected per id
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((200, 12), np.int64))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, feeds)[0]).all()  # valid ids: the model runs


def test_families_are_deterministic_by_seed_and_gaussian_keeps_the_old_probes() -> None:
    from rexdeploy.demo import demo_model_path
    from rexdeploy.ranges import synthetic_inputs

    model = onnx.load(str(demo_model_path()))
    families = probes.applicable_families(model)
    assert families == (probes.GAUSSIAN, probes.BN_MATCHED, probes.NATURAL)
    for family in families:
        a = probes.family_inputs(model, family, 8, seed=3)["input"]
        b = probes.family_inputs(model, family, 8, seed=3)["input"]
        c = probes.family_inputs(model, family, 8, seed=4)["input"]
        assert a.dtype == np.float32 and a.shape == (8, 1, 8, 8)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    old = np.concatenate([synthetic_inputs(model, batch=1, seed=3 + i)["input"] for i in range(8)])
    np.testing.assert_array_equal(probes.family_inputs(model, probes.GAUSSIAN, 8, seed=3)["input"], old)
    with pytest.raises(InputError, match="unknown probe family"):
        probes.family_inputs(model, "plasma", 4)


def test_image_layout() -> None:
    assert probes.image_layout((1, 3, 224, 224)) == "NCHW"
    assert probes.image_layout((1, 224, 224, 3)) == "NHWC"
    assert probes.image_layout((1, 1, 8, 8)) == "NCHW"
    assert probes.image_layout((1, 3, 4, 4)) is None  # too small to be an image
    assert probes.image_layout((1, 64, 384)) is None
