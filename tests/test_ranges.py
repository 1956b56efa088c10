"""Data-free activation ranges: erf, clipped-Gaussian moments, BN-statistics propagation against Monte
Carlo, the probe fallback, the calibration override, determinism and the expand_model wiring."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from models import small_cnn
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.actorders import activation_scale
from rexdeploy.api import expand_model, quantizable_layers
from rexdeploy.bnstats import (
    bn_ranges,
    clipped_normal_moments,
    erf,
    norm_cdf,
    propagate_bn_stats,
)
from rexdeploy.errors import InputError, ModelError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes.equalize import equalize_depthwise_inputs
from rexdeploy.profile import load_profile
from rexdeploy.ranges import (
    DEFAULT_PERCENTILE,
    DEFAULT_PROBE,
    IMAGE_INPUT_RANGE,
    activation_ranges,
    input_channel_gains,
    probe_ranges,
    run_with_taps,
    smooth_field,
    synthetic_inputs,
)

C = 4  # channels per BN branch
H = W = 4


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    """1e6 standard-normal draws for 5 channels, shared by the moment checks."""
    return np.random.default_rng(0).standard_normal((1_000_000, 5))


def test_erf_matches_math_erf_on_a_grid() -> None:
    grid = np.linspace(-6.0, 6.0, 24001)
    want = np.array([math.erf(v) for v in grid])
    assert np.max(np.abs(erf(grid) - want)) < 1.5e-7
    assert erf(0.0) == 0.0
    # Φ through erfc keeps the tails: ~1 % relative accuracy even at 8 σ, where 1 - erf would give 0
    z = np.array([-8.0, -5.0, -3.0, 3.0])
    tail = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])
    np.testing.assert_allclose(norm_cdf(z), tail, rtol=0.02)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.0, np.inf), (0.0, 6.0), (-1.0, 2.0), (-np.inf, np.inf), (-np.inf, 0.5)],
    ids=["relu", "relu6", "clip", "none", "min"],
)
def test_clipped_moments_match_sampling(samples: np.ndarray, lo: float, hi: float) -> None:
    mean = np.array([-1.5, 0.0, 0.7, 3.0, 5.5])
    std = np.array([1.0, 2.0, 0.3, 2.5, 1.2])
    x = np.clip(samples * std + mean, lo, hi)
    got_mean, got_std = clipped_normal_moments(mean, std, np.full(5, lo), np.full(5, hi))
    # ~1 % of the Gaussian's scale (the sampling error itself is 0.1 %)
    np.testing.assert_allclose(got_mean, x.mean(axis=0), atol=0.01 * std.min(), rtol=0.01)
    np.testing.assert_allclose(got_std, x.std(axis=0), atol=0.01 * std.min(), rtol=0.01)


def test_add_of_clipped_channels_matches_sampling() -> None:
    """Clip(p, 0, 6) + q and Relu(p) - 2·q for independent Gaussian p, q (given as statistics of graph
    inputs), against 1e6 samples of the same arithmetic."""
    mean_p, std_p = np.array([0.5, -1.0, 4.0]), np.array([1.0, 2.0, 3.0])
    mean_q, std_q = np.array([2.0, 0.0, -1.0]), np.array([0.5, 1.5, 1.0])
    nodes = [
        helper.make_node("Clip", ["p", "zero", "six"], ["p6"]),
        helper.make_node("Add", ["p6", "q"], ["s"]),
        helper.make_node("Relu", ["p"], ["pr"]),
        helper.make_node("Mul", ["q", "two"], ["q2"]),
        helper.make_node("Sub", ["pr", "q2"], ["d"]),
    ]
    graph = helper.make_graph(
        nodes,
        "moments",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "pq"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "sd"],
        [_const("zero", 0.0), _const("six", 6.0), _const("two", 2.0)],
    )
    known = propagate_bn_stats(helper.make_model(graph), {"p": (mean_p, std_p), "q": (mean_q, std_q)})
    rng = np.random.default_rng(1)
    gp = rng.standard_normal((1_000_000, 3)) * std_p + mean_p
    gq = rng.standard_normal((1_000_000, 3)) * std_q + mean_q
    sampled = {"s": np.clip(gp, 0.0, 6.0) + gq, "d": np.maximum(gp, 0.0) - 2.0 * gq}
    for name, v in sampled.items():
        mean, std = known[name].moments()
        np.testing.assert_allclose(mean, v.mean(axis=0), rtol=0.01, atol=0.01, err_msg=name)
        np.testing.assert_allclose(std, v.std(axis=0), rtol=0.01, err_msg=name)


def _const(name: str, value: np.ndarray | float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _branch_model(with_ops: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x (N, 2C, H, W) → two 1×1 Convs that pick channel halves (A: 0..C-1, B: C..2C-1, identity weights)
    → BN_a / BN_b; then Relu(a), Clip(b, 0, 6), Add and Sub of independent branches, Concat, Mul by 0.5,
    GlobalAveragePool + Flatten, a Conv without BN (statistics carried through its weights) + Relu, and a
    MatMul of two activations (statistics unknown). Feeding x ~ N(running_mean, running_var) per channel makes
    both BN outputs exactly N(beta, gamma²)."""
    rng = np.random.default_rng(seed)
    eye = np.eye(2 * C, dtype=np.float32).reshape(2 * C, 2 * C, 1, 1)
    inits = [
        _const("wa", eye[:C]),
        _const("wb", eye[C:]),
        _const("w_tail", rng.normal(0, 0.5, (C, C, 1, 1))),
        _const("zero", 0.0),
        _const("six", 6.0),
        _const("half", 0.5),
    ]
    for tag in "ab":
        inits += [
            _const(f"g_{tag}", rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)),
            _const(f"b_{tag}", rng.normal(0.5, 1.0, C)),
            _const(f"m_{tag}", rng.normal(0.0, 1.0, C)),
            _const(f"v_{tag}", rng.uniform(0.5, 3.0, C)),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="conv_a"),
        helper.make_node("BatchNormalization", ["ca", "g_a", "b_a", "m_a", "v_a"], ["p"], name="bn_a"),
        helper.make_node("Conv", ["x", "wb"], ["cb"], name="conv_b"),
        helper.make_node("BatchNormalization", ["cb", "g_b", "b_b", "m_b", "v_b"], ["q"], name="bn_b"),
    ]
    outputs = {"p": [C], "q": [C]}
    if with_ops:
        nodes += [
            helper.make_node("Relu", ["p"], ["relu"], name="relu"),
            helper.make_node("Clip", ["q", "zero", "six"], ["relu6"], name="relu6"),
            helper.make_node("Add", ["relu", "relu6"], ["sum"], name="add"),
            helper.make_node("Sub", ["p", "relu6"], ["diff"], name="sub"),
            helper.make_node("Concat", ["relu", "q"], ["cat"], name="concat", axis=1),
            helper.make_node("Mul", ["cat", "half"], ["scaled"], name="mul"),
            helper.make_node("GlobalAveragePool", ["relu6"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
            helper.make_node("Conv", ["relu", "w_tail"], ["tail"], name="conv_tail"),
            helper.make_node("Relu", ["tail"], ["tail_relu"], name="relu_tail"),
            helper.make_node("MatMul", ["relu", "relu"], ["mm"], name="matmul"),  # H = W: (N, C, H, W)
            helper.make_node("Relu", ["mm"], ["mm_relu"], name="relu_mm"),
        ]
        outputs = {"sum": [C], "diff": [C], "scaled": [2 * C], "flat": [], "tail_relu": [C], "mm_relu": [C]}
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2 * C, H, W])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", C] if not ch else ["N", *ch, H, W])
            for o, ch in outputs.items()
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _bn_true_inputs(model: onnx.ModelProto, n: int, seed: int = 0) -> np.ndarray:
    """x whose channels have exactly the BN running mean / variance: then BN outputs are N(beta, gamma²)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    mean = np.concatenate([inits["m_a"], inits["m_b"]]).reshape(1, -1, 1, 1)
    var = np.concatenate([inits["v_a"], inits["v_b"]]).reshape(1, -1, 1, 1)
    z = np.random.default_rng(seed).standard_normal((n, 2 * C, H, W))
    return (z * np.sqrt(var) + mean).astype(np.float32)


def test_propagation_matches_monte_carlo_of_the_graph() -> None:
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    assert set(stats) == {"p", "q"}
    # with i.i.d. spatial positions a global average divides the std by sqrt(H·W); the moments only (no tail rule)
    known = propagate_bn_stats(folded, stats, pool_std_factor=1.0 / math.sqrt(H * W), rectified_tails=False)
    taps = ["p", "q", "relu", "relu6", "sum", "diff", "cat", "scaled", "flat", "tail", "tail_relu"]
    values = run_with_taps(model, {"x": _bn_true_inputs(model, 8000)}, taps)
    for name in taps[:-1]:
        v = values[name].astype(np.float64)
        axes = (0, 2, 3) if v.ndim == 4 else (0,)
        mean, std = known[name].moments()
        scale = float(np.max(std))
        np.testing.assert_allclose(mean, v.mean(axis=axes), atol=0.02 * scale, err_msg=name)
        np.testing.assert_allclose(std, v.std(axis=axes), rtol=0.02, atol=0.01 * scale, err_msg=name)
    # tail_relu: the Conv sums 4 rectified channels, whose sum is not Gaussian (its upper tail is thinner than
    # the model's): the range is an over-estimate, not a wild one
    observed = float(np.percentile(values["tail_relu"], 99.99))
    assert observed <= known["tail_relu"].max_abs(4.0) <= 2.0 * observed
    assert "mm" not in known and "mm_relu" not in known  # a MatMul of two activations: unknown


def test_sum_with_a_relu_output_keeps_its_upper_tail() -> None:
    """sum = Relu(p) + Clip(q, 0, 6): a Gaussian of the exact moments (previous test) puts the upper tail far too
    low where Relu(p) is mostly zeros (a rectified Gaussian's std is ~0.6 of its Gaussian's, its tail the
    Gaussian's). With the tail rule (default) the sum is clip(N(μ_T, σ_T²), lo, inf) — the unclipped operands'
    Gaussian, clipped where its mean is the exact one: its quantiles meet the Monte Carlo 99.9th / 99.99th
    percentiles of every channel within 6 %, its mean the exact one, its std the true one within 10 %; the moments
    alone miss a tail by a third."""
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    tails, moments = propagate_bn_stats(folded, stats), propagate_bn_stats(folded, stats, rectified_tails=False)
    v = run_with_taps(model, {"x": _bn_true_inputs(model, 8000)}, ["sum"])["sum"].astype(np.float64)
    per_channel = v.transpose(1, 0, 2, 3).reshape(C, -1)
    mean_t, std_t = tails["sum"].moments()
    mean_m, std_m = moments["sum"].moments()
    np.testing.assert_allclose(mean_t, mean_m, atol=1e-6 * float(np.max(std_m)))
    np.testing.assert_allclose(std_t, per_channel.std(axis=1), rtol=0.10)
    assert np.all(tails["sum"].lo < mean_t)
    worst_moments = 0.0
    for q, z in ((99.9, 3.0902), (99.99, 3.7190)):  # Φ⁻¹(0.999), Φ⁻¹(0.9999): above the clip, the Gaussian's
        observed = np.percentile(per_channel, q, axis=1)
        np.testing.assert_allclose(tails["sum"].mean + z * tails["sum"].std, observed, rtol=0.06, err_msg=str(q))
        worst_moments = max(worst_moments, float(np.max(np.abs(mean_m + z * std_m - observed) / observed)))
    assert worst_moments > 0.25  # the rule before: a channel's tail a third too low
    # a Sub mirrors the other operand's tail: no tail rule there; a sum of unclipped operands is unchanged
    assert tails["diff"].std == pytest.approx(moments["diff"].std)
    stats_ab = {"a": (np.array([0.5]), np.array([1.0])), "b": (np.array([-0.2]), np.array([2.0]))}
    add = helper.make_graph([helper.make_node("Add", ["a", "b"], ["s"])], "add", [], [])
    plain = propagate_bn_stats(helper.make_model(add), stats_ab)["s"]
    assert plain.std == pytest.approx([np.sqrt(5.0)]) and plain.mean == pytest.approx([0.3])
    assert np.isneginf(plain.lo).all() and np.isposinf(plain.hi).all()


def test_bn_range_is_the_clipped_tail_quantile() -> None:
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    x = _bn_true_inputs(model, 8000, seed=3)
    values = run_with_taps(model, {"x": x}, ["relu", "relu6", "q"])
    for n_std in (2.0, 3.0):
        ranges = bn_ranges(folded, stats, ["relu", "relu6", "q", "x"], n_std, clip="nstd")
        assert "x" not in ranges  # the graph input has no statistics
        quantile = 100.0 * 0.5 * (1.0 + math.erf(n_std / math.sqrt(2.0)))  # P(g < mean + n·std)
        for name in ("relu", "relu6"):  # one-sided: the rectified upper tail
            per_channel = np.percentile(values[name].transpose(1, 0, 2, 3).reshape(C, -1), quantile, axis=1)
            assert ranges[name] == pytest.approx(float(np.max(per_channel)), rel=0.03)
        assert ranges["relu6"] <= 6.0
        q = values["q"].transpose(1, 0, 2, 3).reshape(C, -1)
        two_sided = np.maximum(np.percentile(q, quantile, axis=1), -np.percentile(q, 100.0 - quantile, axis=1))
        assert ranges["q"] == pytest.approx(float(np.max(two_sided)), rel=0.03)


def test_auto_falls_back_to_probes_where_stats_are_unknown() -> None:
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    tensors = ["x", "relu", "scaled", "mm_relu"]
    auto = activation_ranges(folded, stats, tensors, method="auto", n_std=3.0, clip="nstd")
    probes = probe_ranges(folded, tensors, probe=DEFAULT_PROBE, percentile=DEFAULT_PERCENTILE)
    bn = bn_ranges(folded, stats, tensors, 3.0, clip="nstd")
    assert set(bn) == {"relu", "scaled"}
    assert list(auto) == tensors
    for name in tensors:
        assert auto[name] == (bn[name] if name in bn else probes[name])
    assert activation_ranges(folded, stats, tensors, method="probe") == probes
    with pytest.raises(ModelError, match="mm_relu"):
        activation_ranges(folded, stats, tensors, method="bn")
    with pytest.raises(InputError, match="method"):
        activation_ranges(folded, stats, tensors, method="magic")  # type: ignore[arg-type]


def test_calibration_overrides_bn_and_probes() -> None:
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    tensors = ["x", "relu", "scaled", "mm_relu"]
    calibration = _bn_true_inputs(model, 40, seed=5) * 3.0
    want = {k: float(np.max(np.abs(v))) for k, v in run_with_taps(folded, {"x": calibration}, tensors).items()}
    for method in ("auto", "bn", "probe"):
        got = activation_ranges(folded, stats, tensors, method=method, calibration=calibration)  # type: ignore[arg-type]
        assert got == pytest.approx(want, rel=1e-6)
    assert activation_ranges(folded, stats, tensors)["relu"] != pytest.approx(want["relu"], rel=1e-3)


def test_ranges_are_deterministic() -> None:
    model = _branch_model()
    folded, stats = fold_batchnorm(model)
    tensors = ["x", "relu", "diff", "mm_relu"]
    for probe in ("noise", "smooth"):
        first = activation_ranges(folded, stats, tensors, probe=probe, percentile=99.9)  # type: ignore[arg-type]
        assert activation_ranges(folded, stats, tensors, probe=probe, percentile=99.9) == first  # type: ignore[arg-type]


def test_percentile_and_smooth_probes() -> None:
    model = small_cnn()
    taps = ["x", "r1", "r2", "flat"]
    full = probe_ranges(model, taps)
    clipped = probe_ranges(model, taps, percentile=99.0)
    assert all(0.0 < clipped[k] < full[k] for k in taps)
    smooth = synthetic_inputs(model, batch=4, seed=2, kind="smooth")["x"]
    assert smooth.shape == (4, 3, 8, 8) and smooth.dtype == np.float32
    np.testing.assert_allclose(smooth.std(axis=(2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(smooth.mean(axis=(2, 3)), 0.0, atol=1e-6)
    # a 1/f field is spatially correlated: neighbours agree far more than in white noise
    field = smooth_field((64, 32, 32), np.random.default_rng(0))
    corr = np.mean(field[:, :, 1:] * field[:, :, :-1])
    assert corr > 0.5
    with pytest.raises(InputError, match="probe"):
        synthetic_inputs(model, kind="plasma")  # type: ignore[arg-type]


def test_expand_model_uses_bn_ranges_and_calibration() -> None:
    model = small_cnn()
    profile = load_profile("x86-avx512")
    expanded = expand_model(model, profile=profile, bits=8, order=1, act_bits=8)
    plain, plain_stats = fold_batchnorm(model)
    # r1, the depthwise conv's input, is equalized per channel first (passes/equalize.py): its range is the
    # rewritten graph's
    equalized = equalize_depthwise_inputs(plain, plain_stats, quantizable_layers(plain), unsigned={"r1"})
    assert [site.tensor for site in equalized.sites] == ["r1"]
    folded, stats = equalized.model, equalized.bn_stats
    # ReLU outputs (pooled or not; r3 is the head pool's input, quantized between the int8 pwconv and fc): uint8 on
    # an OpenVINO profile, scale range / 255
    unsigned = {"r1", "r2", "r3", "flat"}
    want = activation_ranges(folded, stats, ["x", "r1", "r2", "flat", "r3"], unsigned=unsigned)  # on 255 levels
    scales = {k: activation_scale(v, k in unsigned) for k, v in want.items()}
    assert expanded.activation_scales == pytest.approx(scales)
    # r1 (BN → Relu) comes from the BN statistics, not from the probes
    clip_gains = input_channel_gains(folded, clipping=True)
    assert (
        want["r1"] == bn_ranges(folded, stats, ["r1"], gains=input_channel_gains(folded), clip_gains=clip_gains)["r1"]
    )
    assert want["x"] == IMAGE_INPUT_RANGE  # an image-shaped input without statistics: standardised pixels
    calibration = np.random.default_rng(9).standard_normal((8, 3, 8, 8)).astype(np.float32) * 4.0
    calibrated = expand_model(model, profile=profile, bits=8, order=1, act_bits=8, calibration=calibration)
    cal = probe_ranges(plain, ["x", "r1", "r2", "flat", "r3"], calibration=calibration)  # the user's: no equalization
    assert calibrated.activation_scales == pytest.approx(
        {k: activation_scale(v, k in unsigned) for k, v in cal.items()}
    )


def test_op_rules_identity_pooling_and_unknowns() -> None:
    """MaxPool / Reshape keep the statistics, a spatial ReduceMean pools them, a channel ReduceMean and a
    Concat on another axis are unknown, a Sigmoid stays in (0, 1), an unfolded BN gives its own (beta, |gamma|)."""
    nodes = [
        helper.make_node("Relu", ["p"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2]),
        helper.make_node("ReduceMean", ["r", "hw"], ["rm"], keepdims=1),
        helper.make_node("ReduceMean", ["r", "ch"], ["rc"], keepdims=1),
        helper.make_node("Concat", ["r", "r"], ["cat2"], axis=2),
        helper.make_node("Sigmoid", ["r"], ["sig"]),
        helper.make_node("BatchNormalization", ["sig", "g", "b", "m", "v"], ["bn"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "hw"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ch"),
        _const("g", [-2.0, 1.0]),
        _const("b", [0.5, -3.0]),
        _const("m", [0.0, 0.0]),
        _const("v", [1.0, 1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "ops",
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("mp", "rm", "rc", "cat2", "bn")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    known = propagate_bn_stats(model, {"p": (np.array([1.0, -1.0]), np.array([1.0, 2.0]))}, pool_std_factor=0.5)
    assert known["mp"] is known["r"]
    mean, std = known["r"].moments()
    np.testing.assert_allclose(known["rm"].mean, mean)
    np.testing.assert_allclose(known["rm"].std, 0.5 * std)
    assert not {"rc", "cat2"} & set(known)
    assert np.all(known["sig"].lo >= 0.0) and np.all(known["sig"].hi <= 1.0)  # a Sigmoid: inside (0, 1)
    np.testing.assert_allclose(known["bn"].mean, [0.5, -3.0])
    np.testing.assert_allclose(known["bn"].std, [2.0, 1.0])
    assert bn_ranges(model, {}, ["bn"], 2.0, clip="nstd") == {"bn": pytest.approx(5.0)}


def test_probe_batch_scales_with_network_size() -> None:
    from rexdeploy.ranges import probe_batch

    assert probe_batch(5e6) == 16  # small networks keep 16 probes
    assert probe_batch(4.1e9) == 3 and probe_batch(4.1e9, predictors=2) == 2  # ResNet-50-sized: 2-3
    assert probe_batch(1e12) == 2  # never fewer than 2


def _conv1d_net(input_std: float, seed: int = 0, length: int = 256) -> onnx.ModelProto:
    """x (N, 1, L) → Conv1d(1→8, k=9) → BatchNorm trained on a white input of std ``input_std`` → Relu → mean → Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 1, 9)).astype(np.float32) * 0.3
    var = (input_std**2 * np.square(w).reshape(8, -1).sum(axis=1)).astype(np.float32)  # BN's running variance
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w, "w"), (np.ones(8, np.float32), "g"), (np.zeros(8, np.float32), "b"), (np.zeros(8, np.float32), "m"),
        (var, "v"), (rng.standard_normal((4, 8)).astype(np.float32), "fc")]]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[4, 4]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["p"], name="pool", axes=[2], keepdims=0),
        helper.make_node("Gemm", ["p", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, length])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_model_input_far_from_unit_scale_takes_its_first_batchnorms_scale() -> None:
    """A waveform of RMS 0.1 probed as N(0, 1) got a range ~10x too wide (an audio net erred 0.146 at W8A8 K=1 vs
    0.015 with --calib); the first BatchNorm was trained for its scale, and gives it, data-free."""
    import onnxruntime as ort

    from rexdeploy.ranges import bn_input_scale

    quiet, unit = _conv1d_net(0.1), _conv1d_net(1.0)
    fq, sq = fold_batchnorm(quiet)
    fu, su = fold_batchnorm(unit)
    assert bn_input_scale(fq, sq, "x") == pytest.approx(0.1, rel=1e-3)  # (BN epsilon 1e-5 aside)
    assert bn_input_scale(fu, su, "x") == pytest.approx(1.0, rel=1e-3)
    plain = activation_ranges(fu, su, ["x"])["x"]  # within 2x of N(0, 1): the probes' range, untouched
    assert plain == pytest.approx(probe_ranges(fu, ["x"], percentile=99.99)["x"])
    assert activation_ranges(fq, sq, ["x"])["x"] == pytest.approx(bn_input_scale(fq, sq, "x") * plain, rel=1e-6)
    # what it buys: W8A8 K=1 on real inputs of that scale, vs the same net ranged as if the input were N(0, 1)
    x = (0.1 * np.random.default_rng(3).standard_normal((32, 1, 256))).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return np.asarray(ort.InferenceSession(m.SerializeToString(), opts).run(None, {"x": x})[0])

    want = run(quiet)
    profile = load_profile("x86-avx512")
    scaled = run(expand_model(quiet, profile=profile, bits=8, order=1, act_bits=8).model)
    unit_ranged = run(expand_model(quiet, profile=profile, bits=8, order=1, act_bits=8, ranges={"x": plain}).model)
    err = [float(np.linalg.norm(o - want) / np.linalg.norm(want)) for o in (scaled, unit_ranged)]
    assert err[0] < 0.6 * err[1], err  # 0.0095 vs 0.019 here (the pooled output averages the input rounding)


def _patch_model(shape: list[int | str], elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x (shape) → Reshape to (N, -1, 4) → Transpose → MatMul by a constant: a ViT-style patch embedding, whose
    quantized input holds the image's values rearranged; and a Relu of x (not a view: its values change)."""
    rng = np.random.default_rng(0)
    count = int(np.prod([d for d in shape[1:] if isinstance(d, int)]))
    inits = [numpy_helper.from_array(np.array([0, -1, 4], np.int64), "shape"),
             _const("w", rng.standard_normal((count // 4, 3)))]  # fmt: skip
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["patches"]),
        helper.make_node("Transpose", ["patches"], ["cols"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["cols", "w"], ["y"]),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    graph = helper.make_graph(nodes, "patches", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("r", elem, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_image_input_is_ranged_as_standardised_pixels() -> None:
    """An image-shaped input without statistics gets IMAGE_INPUT_RANGE (bounded pixels: ImageNet-normalised
    photographs span −2.1 … 2.6, where N(0, 1) probes' 99.99th percentile says 3.9), and so do the tensors that
    only rearrange its values (a ViT's patches); a Relu of it, a non-image input and ``image_input_range=None``
    keep the probes' percentile."""
    from rexdeploy.ranges import image_input, input_views

    model = _patch_model(["N", 3, 8, 8])
    assert input_views(model) == {"patches": "x", "cols": "x"}
    got = activation_ranges(model, {}, ["x", "cols", "r"])
    probed = probe_ranges(model, ["x", "cols", "r"], percentile=DEFAULT_PERCENTILE)
    assert got["x"] == got["cols"] == IMAGE_INPUT_RANGE
    assert got["r"] == probed["r"] and probed["x"] > 3.5  # N(0, 1): 3.9 at the 99.99th percentile
    assert activation_ranges(model, {}, ["x", "cols"], image_input_range=None) == pytest.approx(
        {"x": probed["x"], "cols": probed["cols"]}
    )
    flat = _patch_model(["N", 64])  # not an image: the probes' range
    assert activation_ranges(flat, {}, ["x"])["x"] == pytest.approx(probe_ranges(flat, ["x"], percentile=99.99)["x"])
    # the shapes taken as images: rank 4, 1-4 channels first or last, both spatial sides fixed and >= 8
    for shape, want in [(["N", 3, 224, 224], True), ([1, 224, 224, 3], True), (["N", 1, 8, 8], True),
                        (["N", 16, 8, 8], False), (["N", 3, 4, 4], False), (["N", 1, 256], False),
                        (["N", 3, "H", "W"], False)]:  # fmt: skip
        info = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
        assert image_input(info) is want, shape
    assert not image_input(helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3, 8, 8]))


def test_image_input_rule_leaves_a_rescaled_input_alone() -> None:
    """An input whose first BatchNorm says it is far from unit scale (0–255 pixels, a quiet waveform) keeps the
    rescaled probes' range: the standardised-pixel prior holds only where the N(0, 1) scale does."""
    from rexdeploy.ranges import bn_input_scale

    model = _conv2d_net(0.1)  # an image-shaped input (N, 1, 8, 8) of std 0.1
    folded, stats = fold_batchnorm(model)
    scale = bn_input_scale(folded, stats, "x")
    assert scale is not None and scale < 0.5
    plain = probe_ranges(folded, ["x"], percentile=99.99)["x"]
    assert activation_ranges(folded, stats, ["x"])["x"] == pytest.approx(scale * plain, rel=1e-6)
    unit_folded, unit_stats = fold_batchnorm(_conv2d_net(1.0))
    assert activation_ranges(unit_folded, unit_stats, ["x"])["x"] == IMAGE_INPUT_RANGE


def _conv2d_net(input_std: float, seed: int = 0) -> onnx.ModelProto:
    """x (N, 1, 8, 8) → Conv 3×3 (8) → BatchNorm trained on a white input of std ``input_std`` → Relu → pool → Gemm."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3
    var = (input_std**2 * np.square(w).reshape(8, -1).sum(axis=1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w, "w"), (np.ones(8, np.float32), "g"), (np.zeros(8, np.float32), "b"), (np.zeros(8, np.float32), "m"),
        (var, "v"), (rng.standard_normal((4, 8)).astype(np.float32), "fc")]]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "conv2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
