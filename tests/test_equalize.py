"""Depthwise-input equalization (rexdeploy.passes.equalize): the rewrite against the float graph (exact through a
ReLU, each channel clipped at its own range through a ReLU6), the per-channel ranges against the single-channel
rule, the int8 error it buys, and where it must not act."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.analyze import quantizable_layers
from rexdeploy.bnstats import ChannelStats
from rexdeploy.graph import fold_batchnorm
from rexdeploy.passes import equalize as eq
from rexdeploy.passes.pipeline import expand_model
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.profile import load_profile
from tests.reference import conv2d, rel_error, run_exact

CHANNELS = 8


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def dw_model(act: str = "relu6", seed: int = 0, twice: bool = False, batchnorm: bool = True) -> onnx.ModelProto:
    """x(N,4,8,8) → Conv1x1(8) + BN → Relu / Clip(0, 6) / Clip(-1, 6) → depthwise Conv3x3 → y. The BN's
    running statistics are those of the conv output for x ~ N(0, 1) (mean 0, variance ||w_c||²), so its γ and β
    are the true per-channel std and mean of the BN output; γ spreads over two decades. ``twice``: the
    activation's output is a graph output too."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (CHANNELS, 4, 1, 1))
    inits = [
        _init("w", w),
        _init("dw_w", rng.normal(0, 0.4, (CHANNELS, 1, 3, 3))),
        _init("dw_b", rng.normal(0, 0.1, CHANNELS)),
        _init("zero", np.array(0.0)),
        _init("minus", np.array(-1.0)),
        _init("six", np.array(6.0)),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    out = "c"
    if batchnorm:
        inits += [
            _init("bn_s", np.geomspace(0.02, 2.0, CHANNELS)[rng.permutation(CHANNELS)]),
            _init("bn_b", rng.uniform(0.0, 1.0, CHANNELS)),
            _init("bn_m", np.zeros(CHANNELS)),
            _init("bn_v", (w**2).sum(axis=(1, 2, 3))),
        ]
        nodes.append(helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], name="bn"))
        out = "n"
    if act == "relu":
        nodes.append(helper.make_node("Relu", [out], ["r"], name="act"))
    else:
        lo = "minus" if act == "clip-1" else "zero"
        nodes.append(helper.make_node("Clip", [out, lo, "six"], ["r"], name="act"))
    nodes.append(helper.make_node("Conv", ["r", "dw_w", "dw_b"], ["y"], name="dw", group=CHANNELS, pads=[1] * 4))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 8, 8])]
    if twice:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", CHANNELS, 8, 8]))
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              outputs, inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _equalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, eq.Equalized, dict]:
    folded, stats = fold_batchnorm(model)
    return folded, eq.equalize_depthwise_inputs(folded, stats, quantizable_layers(folded), unsigned={"r"}), stats


def _x(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 4, 8, 8)).astype(np.float32)


def test_relu_rewrite_is_float_exact() -> None:
    folded, result, stats = _equalized(dw_model("relu"))
    assert [s.layer for s in result.sites] == ["dw"] and result.refused == ()
    site = result.sites[0]
    assert site.spread > 20.0 and site.min_scale == pytest.approx(1.0) and site.max_scale > 20.0
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in folded.graph.node]
    x = _x()
    assert rel_error(run_exact(result.model, x), run_exact(folded, x)) < 1e-5
    # the scaled tensor's statistics are scaled with it; the input's are the model's
    r = eq.channel_ranges(stats["n"], np.inf, 255)
    s = r.max() / r
    np.testing.assert_allclose(result.bn_stats["n"][0], stats["n"][0] * s)
    np.testing.assert_allclose(result.bn_stats["n"][1], stats["n"][1] * s)
    assert len(result.model.graph.initializer) == len(folded.graph.initializer)  # the originals dropped


def test_relu6_rewrite_clips_each_channel_at_its_own_range() -> None:
    """Clip(0, 6) on s_c·x is channel c clipped at 6 / s_c = r_c: the reference computes that in numpy."""
    folded, result, stats = _equalized(dw_model("relu6"))
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.name == "conv")
    x = _x()
    u = conv2d(x, inits[conv.input[1]], inits[conv.input[2]], [1, 1], [0] * 4, 1)
    r = eq.channel_ranges(stats["n"], 6.0, 255)
    assert np.all(r > 0.0) and np.all(r <= 6.0)
    clipped = np.clip(u, 0.0, r.reshape(1, -1, 1, 1))
    want = conv2d(clipped, inits["dw_w"], inits["dw_b"], [1, 1], [1] * 4, CHANNELS)
    assert rel_error(run_exact(result.model, x), want) < 1e-5
    np.testing.assert_allclose(result.sites[0].max_scale, 6.0 / r.min(), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-3.0, 3.0), st.floats(0.01, 3.0)), min_size=1, max_size=6),
    st.sampled_from([(0.0, 6.0), (0.0, np.inf), (-np.inf, np.inf)]),
    st.sampled_from(["gauss", "laplace"]),
)
def test_channel_ranges_are_each_channels_own_mse_range(channels: list, bounds: tuple, family: str) -> None:
    mean, std = (np.array(v) for v in zip(*channels, strict=True))
    stats = ChannelStats.gaussian(mean, std).clip(*bounds)
    levels = 255 if bounds[0] >= 0.0 else 127
    got = stats.channel_mse_ranges(family, levels)  # type: ignore[arg-type]
    for c in range(stats.channels):
        one = ChannelStats(stats.mean[c : c + 1], stats.std[c : c + 1], stats.lo[c : c + 1], stats.hi[c : c + 1])
        assert got[c] == pytest.approx(one.mse_range(family, levels=levels), rel=1e-9)  # type: ignore[arg-type]


def test_scales_stretch_each_channel_to_the_bound() -> None:
    np.testing.assert_allclose(eq.equalization_scales(np.array([6.0, 3.0, 0.5]), 6.0), [1.0, 2.0, 12.0])
    np.testing.assert_allclose(eq.equalization_scales(np.array([2.0, 1.0]), np.inf), [1.0, 2.0])
    # a dead channel keeps its scale; a nearly dead one is stretched at most MAX_SCALE
    np.testing.assert_allclose(eq.equalization_scales(np.array([6.0, 0.0, 1e-9]), 6.0), [1.0, 1.0, eq.MAX_SCALE])


def _dw_only(act_order: int = 1, order: int = 1) -> Plan:
    return Plan(layers={"dw": LayerPlan(bits=8, order=order, act_bits=8, act_order=act_order)}, profile="x86-avx512")


def test_int8_depthwise_input_error_falls(monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A8 on the depthwise layer alone (K=2: the weights near exact, the input's rounding is the error), inputs
    drawn as BN saw them: per-channel ranges cut the error, most in the narrowest channel (the wide ones set the
    per-tensor step either way)."""
    model, x = dw_model("relu6"), _x(64)
    profile = load_profile("x86-avx512")
    ref = run_exact(model, x)
    expanded = expand_model(model, _dw_only(order=2), profile=profile)
    onnx.checker.check_model(expanded.model, full_check=True)
    assert any("depthwise inputs equalized: 1" in n for n in expanded.plan.notes)
    got = run_exact(expanded.model, x)
    monkeypatch.setattr(eq, "MIN_SPREAD", np.inf)  # nothing qualifies: the pass leaves the graph as it is
    plain = expand_model(model, _dw_only(order=2), profile=profile)
    assert not any("equalized" in n for n in plain.plan.notes)
    base = run_exact(plain.model, x)
    assert rel_error(got, ref) < 0.7 * rel_error(base, ref), (rel_error(got, ref), rel_error(base, ref))

    def per_channel(y: np.ndarray) -> np.ndarray:
        return np.linalg.norm((y - ref).swapaxes(0, 1).reshape(CHANNELS, -1), axis=1) / np.linalg.norm(
            ref.swapaxes(0, 1).reshape(CHANNELS, -1), axis=1
        )

    assert per_channel(got).max() < 0.2 * per_channel(base).max(), (per_channel(got), per_channel(base))
    assert [n.op_type for n in expanded.model.graph.node] == [n.op_type for n in plain.model.graph.node]


def test_not_equalized_at_order_two_or_with_a_given_range_or_calibration() -> None:
    profile = load_profile("x86-avx512")
    model = dw_model("relu6")
    assert not any("equalized" in n for n in expand_model(model, _dw_only(2), profile=profile).plan.notes)
    calibrated = expand_model(model, _dw_only(), profile=profile, calibration=_x(8))  # the user's ranges
    assert not any("equalized" in n for n in calibrated.plan.notes)
    given_range = expand_model(model, _dw_only(), profile=profile, ranges={"r": 6.0})
    assert not any("equalized" in n for n in given_range.plan.notes)
    assert given_range.activation_scales  # the given range was used: 6 / 255 (uint8) on the unscaled tensor
    assert min(given_range.activation_scales.values()) == pytest.approx(6.0 / 255.0, rel=1e-6)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (dw_model("relu6", twice=True), "read elsewhere too"),
        (dw_model("clip-1"), "clips to [-1, 6], not [0, b]"),
        (dw_model("relu", batchnorm=False), "no BatchNorm statistics"),
    ],
)
def test_refusals_say_why(model: onnx.ModelProto, reason: str) -> None:
    _, result, _ = _equalized(model)
    assert result.sites == ()
    assert result.model is not None and len(result.refused) == 1
    assert result.refused[0][0] == "dw" and reason in result.refused[0][1]


def test_planner_hands_on_no_range_of_an_equalized_input() -> None:
    from rexdeploy.planner.search import prepare

    model = dw_model("relu6")
    layers = quantizable_layers(fold_batchnorm(model)[0])
    prepared = prepare(model, layers, profile=load_profile("x86-avx512"))
    assert "r" not in prepared.ranges and "x" in prepared.ranges
    assert prepared.errors.ranges["r"] > 0.0  # the error model prices the equalized input


def dw_chain_model(seed: int = 0) -> onnx.ModelProto:
    """x → Conv1x1(8) + BN → Relu → depthwise + BN → Relu → depthwise → y: the first depthwise conv both reads an
    equalized input and makes the next one's."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (CHANNELS, 4, 1, 1))

    def bn(name: str, var: np.ndarray) -> list[onnx.TensorProto]:
        return [_init(f"{name}_s", np.geomspace(0.02, 2.0, CHANNELS)[rng.permutation(CHANNELS)]),
                _init(f"{name}_b", rng.uniform(0.0, 1.0, CHANNELS)), _init(f"{name}_m", np.zeros(CHANNELS)),
                _init(f"{name}_v", var)]  # fmt: skip

    inits = [_init("w", w), _init("dw1_w", rng.normal(0, 0.4, (CHANNELS, 1, 3, 3))),
             _init("dw2_w", rng.normal(0, 0.4, (CHANNELS, 1, 3, 3))), *bn("bn1", (w**2).sum(axis=(1, 2, 3))),
             *bn("bn2", np.ones(CHANNELS))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="act1"),
        helper.make_node("Conv", ["r1", "dw1_w"], ["d1"], name="dw1", group=CHANNELS, pads=[1] * 4),
        helper.make_node("BatchNormalization", ["d1", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="act2"),
        helper.make_node("Conv", ["r2", "dw2_w"], ["y"], name="dw2", group=CHANNELS, pads=[1] * 4),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 8, 8])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_chain_of_depthwise_convs_keeps_both_scalings() -> None:
    """dw1's filters are divided by its input's scales and multiplied by its output's: both rewrites kept, the graph
    still float-exact through the ReLUs."""
    folded, result, stats = _equalized(dw_chain_model())
    assert sorted(site.layer for site in result.sites) == ["dw1", "dw2"]
    onnx.checker.check_model(result.model, full_check=True)
    x = _x()
    assert rel_error(run_exact(result.model, x), run_exact(folded, x)) < 1e-5
    s1, s2 = (eq.equalization_scales(eq.channel_ranges(stats[t], np.inf, 127), np.inf) for t in ("n1", "n2"))
    dw1 = next(n for n in result.model.graph.node if n.name == "dw1")
    got = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == dw1.input[1]))
    want = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == next(
        n for n in folded.graph.node if n.name == "dw1").input[1]))  # fmt: skip
    np.testing.assert_allclose(got, want / s1.reshape(-1, 1, 1, 1) * s2.reshape(-1, 1, 1, 1), rtol=1e-5)
