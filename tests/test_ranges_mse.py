"""Data-free range rules beyond mean ± n·std: which tensors are >= 0 by the graph (uint8 activations), the
partial moments and expected quantization error of Gaussian / Laplace channels against numeric integration and
simulated quantization, the MSE-optimal range against a brute-force search, and the channel gains."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import small_cnn
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.bnstats import (
    ChannelStats,
    bn_ranges,
    nonnegative_tensors,
    partial_moments,
    propagate_bn_stats,
    stats_range,
)
from rexdeploy.graph import fold_batchnorm
from rexdeploy.ranges import activation_ranges, input_channel_gains, run_with_taps


def _draw(family: str, mean: float, std: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if family == "gauss":
        return rng.normal(mean, std, n)
    return rng.laplace(mean, std / np.sqrt(2.0), n)


def _density(family: str, mean: float, std: float, x: np.ndarray) -> np.ndarray:
    if family == "gauss":
        return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2.0 * np.pi))
    b = std / np.sqrt(2.0)
    return np.exp(-np.abs(x - mean) / b) / (2.0 * b)


# --------------------------------------------------------------------------------------------------
# partial moments and the expected quantization error


@settings(max_examples=40, deadline=None)
@given(
    family=st.sampled_from(["gauss", "laplace"]),
    mean=st.floats(-3.0, 3.0),
    std=st.floats(0.1, 3.0),
    z=st.floats(-4.0, 6.0),
)
def test_partial_moments_match_numeric_integration(family: str, mean: float, std: float, z: float) -> None:
    t = mean + z * std
    x = np.linspace(t, mean + 40.0 * std, 400_001)
    f = _density(family, mean, std, x)
    want = [np.trapezoid(f * (x - t) ** p, x) for p in (0, 1, 2)]
    got = partial_moments(family, np.array(mean), np.array(std), np.array(t))  # type: ignore[arg-type]
    # A&S erfc (|error| < 1.5e-7) loses digits in the cancellation of the tail moments: 1 % far out
    np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-2, atol=1e-6 * std * std)


def test_partial_moments_of_an_infinite_threshold_are_zero() -> None:
    for family in ("gauss", "laplace"):
        got = partial_moments(family, np.zeros(2), np.ones(2), np.array([np.inf, np.inf]))  # type: ignore[arg-type]
        assert all(np.all(v == 0.0) for v in got)
    with pytest.raises(ValueError, match="clipping family"):
        partial_moments("cauchy", np.zeros(1), np.ones(1), np.zeros(1))  # type: ignore[arg-type]


def _quantize(x: np.ndarray, alpha: float, levels: int) -> np.ndarray:
    """ONNX Q/DQ with scale alpha / levels, zero-point 0: codes [0, 255] (uint8) or [-128, 127] (int8)."""
    step = alpha / levels
    lo, hi = (0, 255) if levels == 255 else (-128, 127)
    return np.clip(np.rint(x / step), lo, hi) * step


def _integrated_mse(family: str, mean: float, std: float, lo: float, hi: float, alpha: float, levels: int) -> float:
    """E[(Q(x) − x)²] for x = clip(g, lo, hi) by numeric integration of g's density against the real quantizer
    (its exact rounding grid, not Δ²/12), the point masses at lo / hi included. Independent of the closed forms."""
    step = alpha / levels
    a, b = max(lo, mean - 40.0 * std), min(hi, mean + 40.0 * std)
    n = int(min(4e6, max(2e5, 40.0 * (b - a) / min(step, std))))
    x = np.linspace(a, b, n)
    total = float(np.trapezoid(_density(family, mean, std, x) * (_quantize(x, alpha, levels) - x) ** 2, x))
    for edge, mass_below in ((lo, True), (hi, False)):
        if np.isfinite(edge):
            y = (
                np.linspace(mean - 40.0 * std, edge, 200_001)
                if mass_below
                else np.linspace(edge, mean + 40 * std, 200_001)
            )
            mass = float(np.trapezoid(_density(family, mean, std, y), y))
            total += mass * float((_quantize(np.array(edge), alpha, levels) - edge) ** 2)
    return total


@pytest.mark.parametrize("family", ["gauss", "laplace"])
@pytest.mark.parametrize(
    ("lo", "hi", "levels"), [(-np.inf, np.inf, 127), (0.0, np.inf, 255), (0.0, 6.0, 255), (-1.0, 2.0, 127)]
)
def test_quantization_mse_matches_numeric_integration(family: str, lo: float, hi: float, levels: int) -> None:
    """The model's expected error (Δ²/12 inside, the clipped tails in closed form, exact ReLU zeros) against
    integrating the real quantizer's error over each channel, rectified / clipped at (lo, hi), summed over 3
    channels with their gains; ranges from mostly clipping to mostly rounding."""
    means, stds, gains = np.array([0.5, -0.3, 1.0]), np.array([1.0, 0.4, 2.0]), np.array([1.0, 3.0, 0.5])
    stats = ChannelStats(means, stds, np.full(3, lo), np.full(3, hi))
    alphas = np.array([0.5, 1.5, 3.0, 6.0, 12.0])
    got = stats.quantization_mse(alphas, levels, family, gains)  # type: ignore[arg-type]
    for a, g in zip(alphas, got, strict=True):
        parts = [_integrated_mse(family, m, s, lo, hi, float(a), levels) for m, s in zip(means, stds, strict=True)]
        want = float(np.dot(gains, parts))
        # Δ²/12 for the values on the rounding grid (and at a ReLU6's 6) is the one approximation: a few %
        assert g == pytest.approx(want, rel=0.05), (a, g, want)


@pytest.mark.parametrize("family", ["gauss", "laplace"])
@pytest.mark.parametrize("rectified", [False, True])
def test_mse_range_is_the_brute_force_optimum(family: str, rectified: bool) -> None:
    """The chosen range's integrated error is within 3 % of the best of a brute-force scan of integrated
    errors, and well below that of a range 2x too narrow or too wide."""
    means, stds = np.array([0.2, -0.5, 0.0, 1.0]), np.array([0.5, 1.0, 2.0, 0.3])
    lo = 0.0 if rectified else -np.inf
    stats = ChannelStats(means, stds, np.full(4, lo), np.full(4, np.inf))
    levels = 255 if rectified else 127
    chosen = stats.mse_range(family)  # type: ignore[arg-type]

    def err(a: float) -> float:
        return sum(_integrated_mse(family, m, s, lo, np.inf, a, levels) for m, s in zip(means, stds, strict=True))

    best = min(err(a) for a in np.geomspace(2.0, 40.0, 60))
    assert err(chosen) <= 1.03 * best
    assert err(chosen) < 0.8 * min(err(chosen / 2.0), err(chosen * 2.0))


def test_laplace_tails_widen_the_range_and_gains_steer_it() -> None:
    one = ChannelStats.gaussian(np.zeros(1), np.ones(1))
    assert one.mse_range("laplace") > 1.5 * one.mse_range("gauss")  # the heavier tail costs more to clip
    assert one.clip(0.0, np.inf).mse_range("gauss", levels=255) > one.mse_range("gauss")  # finer steps on [0, α]
    # a wide channel and a narrow one: the range follows the channel whose error weighs more downstream
    two = ChannelStats.gaussian(np.zeros(2), np.array([1.0, 10.0]))
    wide, narrow = two.mse_range("gauss", np.array([1e-8, 1.0])), two.mse_range("gauss", np.array([1.0, 1e-8]))
    assert wide > 5.0 * narrow
    assert stats_range(two, "nstd", 4.0) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="clipping rule"):
        stats_range(two, "max")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# channel gains and the wiring


def test_input_channel_gains_match_numpy() -> None:
    folded, _ = fold_batchnorm(small_cnn())
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.name == "conv1")
    gains = input_channel_gains(folded)
    w1 = weights[conv.input[1]]  # (8, 3, 3, 3): input channel c gathers W[:, c]²
    np.testing.assert_allclose(gains["x"], (w1**2).sum(axis=(0, 2, 3)) / (w1**2).sum())
    dw = weights["dw_w"]  # depthwise (8, 1, 3, 3): channel c reads only its own filter
    np.testing.assert_allclose(gains["r1"], (dw**2).sum(axis=(1, 2, 3)) / (dw**2).sum())
    fc = weights["fc_w"]  # Gemm transB=1: (10, 16)
    np.testing.assert_allclose(gains["flat"], (fc**2).sum(axis=0) / (fc**2).sum())
    assert all(g.sum() == pytest.approx(1.0) for g in gains.values())


def test_patch_clipping_gains_match_numpy() -> None:
    """``clipping=True``: a kernel's gain for an error constant over its window, ``Σ_o (Σ_k W[o, c, k])²``, over the
    same ``Σ W²`` as the rounding-noise gains; equal to those for 1×1 kernels (the Gemm), far below them for a
    kernel whose weights cancel (an edge detector)."""
    folded, _ = fold_batchnorm(small_cnn())
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.name == "conv1")
    gains, patch = input_channel_gains(folded), input_channel_gains(folded, clipping=True)
    w1 = weights[conv.input[1]]
    np.testing.assert_allclose(patch["x"], (w1.sum(axis=(2, 3)) ** 2).sum(axis=0) / (w1**2).sum())
    dw = weights["dw_w"]
    np.testing.assert_allclose(patch["r1"], dw.sum(axis=(1, 2, 3)) ** 2 / (dw**2).sum())
    np.testing.assert_allclose(patch["flat"], gains["flat"])
    edge = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])  # Sobel: sums to 0
    model = small_cnn()  # depthwise filters alternately an edge detector and a box
    init = next(i for i in model.graph.initializer if i.name == "dw_w")
    init.CopyFrom(numpy_helper.from_array(np.stack([edge, np.ones((3, 3))] * 4)[:, None].astype(np.float32), "dw_w"))
    f, _ = fold_batchnorm(model)
    g, pc = input_channel_gains(f)["r1"], input_channel_gains(f, clipping=True)["r1"]
    np.testing.assert_allclose(pc[0::2], 0.0, atol=1e-12)  # a patch of clipped values: no edge, no output
    np.testing.assert_allclose(pc[1::2], 9.0 * g[1::2])  # a box filter passes it 9x its noise gain


@pytest.mark.parametrize("family", ["gauss", "laplace"])
def test_clip_gains_weigh_the_clipping_error_alone(family: str) -> None:
    """``quantization_mse(..., gains, clip_gains)`` = Σ gains·(rounding noise) + Σ clip_gains·(clipping error): the
    difference made by the clipping weights is the clipping error alone, checked against integrating
    (clip(x, −128Δ, α) − x)² over each channel's density."""
    means, stds = np.array([0.5, -0.3, 1.0]), np.array([1.0, 0.4, 2.0])
    gains, clip_gains = np.array([1.0, 3.0, 0.5]), np.array([0.2, 0.0, 2.0])
    stats = ChannelStats.gaussian(means, stds)
    alphas = np.array([0.5, 1.5, 3.0, 6.0])
    both = stats.quantization_mse(alphas, 127, family, gains, clip_gains)  # type: ignore[arg-type]
    none = stats.quantization_mse(alphas, 127, family, gains, np.zeros(3))  # type: ignore[arg-type]
    assert np.all(none <= both)
    np.testing.assert_allclose(stats.quantization_mse(alphas, 127, family, gains, gains), stats.quantization_mse(alphas, 127, family, gains))  # type: ignore[arg-type]  # fmt: skip
    for a, got in zip(alphas, both - none, strict=True):
        parts = []
        for m, sd in zip(means, stds, strict=True):
            x = np.linspace(m - 40.0 * sd, m + 40.0 * sd, 800_001)
            clipped = np.clip(x, -a * 128.0 / 127.0, a)
            parts.append(float(np.trapezoid(_density(family, m, sd, x) * (clipped - x) ** 2, x)))
        assert got == pytest.approx(float(np.dot(clip_gains, parts)), rel=0.02, abs=1e-9), a
    # where clipping is cheap (clip_gains ≪ gains) the optimum clips more: a narrower range
    cheap = stats.mse_range(family, gains, 127, gains * 0.05)  # type: ignore[arg-type]
    assert cheap < 0.8 * stats.mse_range(family, gains, 127)  # type: ignore[arg-type]


def test_activation_ranges_use_the_clipping_rule() -> None:
    folded, stats = fold_batchnorm(small_cnn())
    gains, clip_gains = input_channel_gains(folded), input_channel_gains(folded, clipping=True)
    for clip in ("nstd", "mse-gauss", "mse-laplace"):
        got = activation_ranges(folded, stats, ["r1"], method="bn", clip=clip)  # type: ignore[arg-type]
        want = bn_ranges(folded, stats, ["r1"], clip=clip, gains=gains, clip_gains=clip_gains)  # type: ignore[arg-type]
        assert got == want
        energy = activation_ranges(folded, stats, ["r1"], method="bn", clip=clip, patch_clipping=False)  # type: ignore[arg-type]
        assert energy == bn_ranges(folded, stats, ["r1"], clip=clip, gains=gains)  # type: ignore[arg-type]
    mse = activation_ranges(folded, stats, ["r1"], method="bn", clip="mse-laplace")["r1"]
    assert mse != activation_ranges(folded, stats, ["r1"], method="bn", clip="nstd")["r1"]


# --------------------------------------------------------------------------------------------------
# tensors >= 0 by the graph


def _const(name: str, values: list[float]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.float32), name)


def test_nonnegative_tensors_by_the_graph_hold_on_random_inputs() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Clip", ["x", "zero", "six"], ["relu6"]),
        helper.make_node("Clip", ["x", "neg", "six"], ["clip_neg"]),
        helper.make_node("Clip", ["relu", "neg", "six"], ["clip_of_relu"]),
        helper.make_node("MaxPool", ["relu6"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Resize", ["pool", "", "scales"], ["pool_up"], mode="nearest"),
        helper.make_node("Add", ["relu", "pool_up"], ["add"]),
        helper.make_node("Add", ["relu", "x"], ["add_signed"]),
        helper.make_node("Concat", ["relu", "relu6"], ["cat"], axis=1),
        helper.make_node("Concat", ["relu", "x"], ["cat_signed"], axis=1),
        helper.make_node("Mul", ["relu", "half"], ["scaled"]),
        helper.make_node("Mul", ["relu", "minus"], ["flipped"]),
        helper.make_node("Sigmoid", ["x"], ["sig"]),
        helper.make_node("Neg", ["relu"], ["neg_relu"]),
    ]
    inits = [
        _const("zero", [0.0]),
        _const("six", [6.0]),
        _const("neg", [-1.0]),
        _const("half", [0.5]),
        _const("minus", [-1.0]),
        _const("scales", [1.0, 1.0, 2.0, 2.0]),
    ]
    for init in inits[:4]:
        init.dims[:] = []  # scalar Clip bounds
    outputs = ["relu", "relu6", "clip_neg", "clip_of_relu", "pool", "flat", "add", "add_signed", "cat", "cat_signed",
               "scaled", "flipped", "sig", "neg_relu"]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "signs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    got = nonnegative_tensors(model)
    assert got & set(outputs) == {"relu", "relu6", "clip_of_relu", "pool", "flat", "add", "cat", "scaled", "sig"}
    x = np.random.default_rng(3).standard_normal((8, 2, 4, 4)).astype(np.float32) * 3.0
    values = run_with_taps(model, {"x": x}, outputs)
    for name in outputs:  # every tensor claimed >= 0 is; every other one here takes negative values
        assert (float(values[name].min()) >= 0.0) == (name in got), name


# --------------------------------------------------------------------------------------------------
# statistics carried through more ops (activations, gates, layers without BatchNorm)


def test_statistics_through_activations_gates_and_plain_layers_match_monte_carlo() -> None:
    """Channels of two independent inputs x, z drawn i.i.d. from their Gaussians; every propagated mean / std
    against the values onnxruntime computes on 256 x 4 x 8 x 8 draws, and every propagated bound holds (the
    Transpose before the MatMul moves the channel axis: not carried)."""
    rng = np.random.default_rng(4)
    c = 4
    w3 = rng.normal(0.0, 0.3, (6, c, 3, 3))
    wg = rng.normal(0.0, 0.5, (5, c))
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["sig"]),
        helper.make_node("Tanh", ["x"], ["tanh"]),
        helper.make_node("HardSwish", ["x"], ["hswish"]),
        helper.make_node("HardSigmoid", ["x"], ["hsig"], alpha=0.25, beta=0.4),
        helper.make_node("LeakyRelu", ["x"], ["leaky"], alpha=0.1),
        helper.make_node("Mul", ["x", "sig"], ["silu"]),
        helper.make_node("Relu", ["z"], ["zr"]),
        helper.make_node("Mul", ["sig", "zr"], ["gated"]),  # a gate in (0, 1): zr's statistics as a bound
        helper.make_node("Conv", ["x", "w3", "b3"], ["conv"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["conv_relu"]),
        helper.make_node("Transpose", ["zr"], ["zt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["zt", "wg"], ["mm"]),  # channels last: (N, H, W, 5)
    ]
    inits = [
        numpy_helper.from_array(w3.astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0.0, 0.2, 6).astype(np.float32), "b3"),
        numpy_helper.from_array(wg.T.astype(np.float32), "wg"),
    ]
    checked = ["sig", "tanh", "hswish", "hsig", "leaky", "silu", "conv", "conv_relu"]
    graph = helper.make_graph(
        nodes,
        "more_ops",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, 8, 8]) for n in ("x", "z")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [*checked, "gated", "mm"]],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    mean_x, std_x = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5, 3.0])
    mean_z, std_z = np.array([0.5, -0.5, 1.0, 0.0]), np.array([1.0, 1.0, 2.0, 0.3])
    known = propagate_bn_stats(model, {"x": (mean_x, std_x), "z": (mean_z, std_z)})
    assert "mm" not in known  # the Transpose moves the channel axis: not carried
    feeds = {
        n: (m[None, :, None, None] + s[None, :, None, None] * rng.standard_normal((256, c, 8, 8))).astype(np.float32)
        for n, m, s in (("x", mean_x, std_x), ("z", mean_z, std_z))
    }
    values = run_with_taps(model, feeds, [*checked, "gated"])
    for name in checked:
        v = values[name].transpose(1, 0, 2, 3).reshape(values[name].shape[1], -1).astype(np.float64)
        mean, std = known[name].moments()
        np.testing.assert_allclose(mean, v.mean(axis=1), atol=0.03 * v.std(axis=1).max() + 1e-3, err_msg=name)
        np.testing.assert_allclose(std, v.std(axis=1), rtol=0.05, atol=1e-3, err_msg=name)
        assert np.all(v.min(axis=1) >= known[name].lo - 1e-6) and np.all(v.max(axis=1) <= known[name].hi + 1e-6)
    # the gated product keeps zr's statistics as a bound: its range covers what the product takes
    assert known["gated"].mean is known["zr"].mean
    assert float(values["gated"].max()) <= known["gated"].max_abs(6.0)


def test_the_range_rule_counts_the_levels_the_engine_is_given() -> None:
    """A ReLU output emitted as int8 (a TensorRT engine, a MatMul input) has 127 positive codes, not 255: its MSE
    range is narrower than the uint8 one, and the expansion's scale follows the emitted type."""
    from rexdeploy.actorders import activation_scale
    from rexdeploy.api import expand_model, quantizable_layers
    from rexdeploy.plans import default_plan
    from rexdeploy.profile import load_profile
    from rexdeploy.ranges import unsigned_layers

    model = small_cnn()  # r2: the depthwise conv's ReLU output, read by the pointwise conv (r1, the depthwise conv's
    # input, is equalized per channel: passes/equalize.py, tests/test_equalize.py)
    folded, stats = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    as_u8 = activation_ranges(folded, stats, ["r2"], method="bn", unsigned={"r2"})["r2"]
    as_i8 = activation_ranges(folded, stats, ["r2"], method="bn", unsigned=set())["r2"]
    assert as_u8 == activation_ranges(folded, stats, ["r2"], method="bn")["r2"]  # None: 255 where ≥ 0
    assert as_i8 < 0.95 * as_u8  # twice the step: clipping more of the tail pays for a finer one
    readers = {layer.name for layer in layers if layer.input == "r2"}
    assert readers and readers <= unsigned_layers(folded, layers, "x86-avx512")
    assert unsigned_layers(folded, layers, "a100") == frozenset()  # TensorRT quantizes to int8 only
    for profile, want in (("a100", activation_scale(as_i8)), ("x86-avx512", activation_scale(as_u8, unsigned=True))):
        p = load_profile(profile)
        expanded = expand_model(model, default_plan(layers, p, order=1), profile=p)
        assert expanded.activation_scales["r2"] == pytest.approx(want, rel=1e-6), profile
