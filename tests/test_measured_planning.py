"""Measured planning: the cost table, node ownership, probing, and the closed loop that never gives up on a
fitting engine — tested with recorded tables and a scripted builder (deterministic latencies from the graph
it is given), so that nothing here depends on the CPU that runs it. The real engine path is tested with
budgets derived from engines measured in the same test (tests/test_cli.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import mobilenet_v2_like, small_cnn

from rexdeploy import closedloop
from rexdeploy.api import default_plan, expand_model, quantizable_layers
from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings
from rexdeploy.builders.timing import Timing, timing_from_samples
from rexdeploy.costmodel import input_elements
from rexdeploy.errors import BudgetError, PlanError
from rexdeploy.graph import fold_batchnorm
from rexdeploy.planner import plan_model
from rexdeploy.planner.costtable import CostTable, OptionKey, Point, analytic_us, option_key
from rexdeploy.plans import LayerPlan, Plan
from rexdeploy.probing import (
    Probe,
    layer_producers,
    node_owners,
    probe_plans,
    split_layer_times,
    table_from_measurements,
)
from rexdeploy.profile import Profile, load_profile

PROFILE = load_profile("x86-avx512")
FAST = TimingSettings(warmup_s=0.0, duration_s=0.0, runs=3, min_runs=1)


# ---------------------------------------------------------------------------------------------------
# A scripted builder: latency is a deterministic function of the graph it builds; outputs are real
# (onnxruntime), so fidelity is measured for real.
# ---------------------------------------------------------------------------------------------------
class ScriptedBuilder:
    """Each Conv/Gemm node costs ``conv_us`` (float input) or ``int8_us`` (input from a DequantizeLinear);
    each QuantizeLinear ``q_us``; every other node ``other_us``; plus ``overhead_us``. ``mixed_penalty_us`` is
    added per float layer feeding a quantized one (a reorder the uniform probes never show), ``slow`` scales
    everything (a device slower than it was probed on)."""

    name = "scripted"
    pip_extra = ""

    def __init__(self, conv_us: float = 10.0, int8_us: float = 4.0, q_us: float = 1.0, other_us: float = 0.5,
                 overhead_us: float = 20.0, mixed_penalty_us: float = 0.0, slow: float = 1.0,
                 default_float: str = "fp32", hiccup: dict[str, float] | None = None,
                 drift: float = 0.0, slow_first_bf16: float = 1.0) -> None:  # fmt: skip
        self.conv_us, self.int8_us, self.q_us, self.other_us = conv_us, int8_us, q_us, other_us
        self.default_float = default_float
        self.hiccup = hiccup or {}  # engine (ONNX stem) → a slowdown no profiler of another engine foresaw
        self.drift, self.timed = drift, 0  # each timing call runs ``drift`` slower than the one before
        self.slow_first_bf16, self.bf16_timed = slow_first_bf16, 0  # the first timing of a bf16 engine: a hiccup
        self.overhead_us, self.mixed_penalty_us, self.slow = overhead_us, mixed_penalty_us, slow
        self.built: list[str] = []
        self.profiled = 0

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return "1.0"

    def _node_us(self, model: onnx.ModelProto) -> dict[str, float]:
        producers = {o: n for n in model.graph.node for o in n.output}
        weights = {i.name for i in model.graph.initializer}

        def quantized(node: onnx.NodeProto) -> bool:
            src = producers.get(node.input[0])
            return src is not None and src.op_type == "DequantizeLinear"

        out: dict[str, float] = {}
        for node in model.graph.node:
            ident = node.name or node.output[0]
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                out[ident] = self.int8_us if quantized(node) else self.conv_us
            elif node.op_type == "QuantizeLinear":
                out[ident] = self.q_us
            elif not (node.op_type == "DequantizeLinear" and node.input[0] in weights):  # weight DQ: folded
                out[ident] = self.other_us
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        floats = [n for n in convs if not quantized(n)]
        if self.mixed_penalty_us and floats and len(floats) < len(convs):
            out[floats[0].name or floats[0].output[0]] += self.mixed_penalty_us
        return {k: v * self.slow for k, v in out.items()}

    def default_float_precision(self, profile: Profile) -> str:
        return self.default_float

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifact = out_dir / "engine.onnx"
        artifact.write_bytes(Path(model).read_bytes())
        self.built.append(Path(model).stem)
        proto = onnx.load(str(model))
        shapes = {i.name: tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim) for i in proto.graph.input}
        bf16 = "bf16" if profile.quantization.bf16 else "f32"  # a bf16 engine: float layers 40 % faster, outputs rounded
        factor = str(self.hiccup.get(Path(model).stem, 1.0))
        return Engine("scripted", "CPU", Path(model), (artifact,), shapes, 0.01, "1.0",
                      options={"INFERENCE_PRECISION_HINT": bf16, "factor": factor}, handle=proto)  # fmt: skip

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        total_ms = (self.overhead_us * self.slow + sum(self._node_us(engine.handle).values())) / 1000.0
        if engine.options["INFERENCE_PRECISION_HINT"] == "bf16":
            total_ms *= 0.6 * (self.slow_first_bf16 if self.bf16_timed == 0 else 1.0)
            self.bf16_timed += 1
        total_ms *= float(engine.options["factor"]) * (1.0 + self.drift * self.timed)
        self.timed += 1
        return timing_from_samples([total_ms] * 3, warmup_runs=0, warmup_s=0.0, duration_s=0.0)

    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        self.profiled += 1
        factor = float(engine.options["factor"])
        nodes = {k: v * factor for k, v in self._node_us(engine.handle).items()}
        inflate = 1.3  # a profiler's counters inflate every node a little
        overhead = self.overhead_us * self.slow * factor
        return LayerTimes({k: v * inflate for k, v in nodes.items()}, overhead * inflate,
                          (sum(nodes.values()) + overhead) * inflate, 5, "scripted")  # fmt: skip

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        sess = ort.InferenceSession(engine.handle.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = [np.asarray(o, dtype=np.float32) for o in sess.run(None, inputs)]
        if engine.options["INFERENCE_PRECISION_HINT"] == "bf16":  # keep the top 16 bits: bf16's precision
            outputs = [(o.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for o in outputs]
        return outputs


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(seed=3), str(path))
    return path


def _build(monkeypatch: pytest.MonkeyPatch, builder: ScriptedBuilder, path: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(closedloop, "builder_for", lambda profile: builder)
    return closedloop.build(path, PROFILE, out_dir=out, timing=FAST, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The cost table
# ---------------------------------------------------------------------------------------------------
def _layers(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    folded, _ = fold_batchnorm(model)
    return quantizable_layers(folded)


def test_option_key_ignores_bits_but_not_the_engine_relevant_settings() -> None:
    layer = _layers(small_cnn())[0]
    k8 = option_key(PROFILE, layer, LayerPlan(bits=8, order=2))
    assert k8 == option_key(PROFILE, layer, LayerPlan(bits=4, order=2))  # every order is stored as int8
    assert k8 != option_key(PROFILE, layer, LayerPlan(bits=8, order=2, act_order=2))
    assert k8 != option_key(PROFILE, layer, LayerPlan(bits=8, order=2, gamma=0.5))
    assert option_key(PROFILE, layer, LayerPlan(bits=8, order=1, act_bits=0)).kind == "wo-fp32"
    assert option_key(PROFILE, layer, None).kind == "float-fp32"
    assert OptionKey.parse(k8.text) == k8


def test_table_reproduces_probed_points_and_interpolates_in_analytic_space() -> None:
    layer = _layers(small_cnn())[1]
    k1, k2, k3 = (LayerPlan(bits=8, order=k) for k in (1, 2, 3))
    a1, a2, a3 = (analytic_us(PROFILE, layer, lp) for lp in (k1, k2, k3))
    table = CostTable(
        layers={layer.name: {option_key(PROFILE, layer, k1).text: Point(a1, 5.0),
                             option_key(PROFILE, layer, k2).text: Point(a2, 11.0)}},
        rest_points=((0.0, 7.0), (1.0, 9.0)),
    )
    assert table.estimate_us(PROFILE, layer, k1) == (5.0, "measured")
    assert table.estimate_us(PROFILE, layer, k2) == (11.0, "measured")
    us, how = table.estimate_us(PROFILE, layer, k3)
    assert how == "interpolated"
    assert us == pytest.approx(11.0 + (11.0 - 5.0) * (a3 - a2) / (a2 - a1))  # the line through K=1 and K=2
    # a kind never probed: the analytic model scaled by the layer's median measured/analytic ratio
    wo = LayerPlan(bits=8, order=1, act_bits=0)
    ratio = float(np.median([5.0 / a1, 11.0 / a2]))
    assert table.estimate_us(PROFILE, layer, wo) == (pytest.approx(analytic_us(PROFILE, layer, wo) * ratio), "scaled")
    # rest: the line through the observed points; a quantized layer carries the slope / n_layers
    assert table.rest_line() == pytest.approx((7.0, 2.0))
    assert table.layer_us(PROFILE, layer, k1, n_layers=4) == pytest.approx(5.0 + 2.0 / 4)
    assert table.layer_us(PROFILE, layer, wo, n_layers=4) == pytest.approx(analytic_us(PROFILE, layer, wo) * ratio)


def test_sparse_with_activation_orders_is_composed_from_the_probes_that_exist() -> None:
    layer = _layers(small_cnn())[1]
    plans = {"k1": LayerPlan(bits=8, order=1), "dense": LayerPlan(bits=8, order=2),
             "sparse": LayerPlan(bits=8, order=2, gamma=0.5), "dense_j2": LayerPlan(bits=8, order=2, act_order=2)}  # fmt: skip
    measured = {"k1": 5.0, "dense": 9.0, "sparse": 12.0, "dense_j2": 20.0}
    table = CostTable(layers={layer.name: {option_key(PROFILE, layer, lp).text: Point(analytic_us(PROFILE, layer, lp),
                                                                                      measured[n])
                                           for n, lp in plans.items()}}, rest_points=())  # fmt: skip
    us, how = table.estimate_us(PROFILE, layer, LayerPlan(bits=8, order=2, gamma=0.5, act_order=2))
    assert how == "composed"
    assert us == pytest.approx(12.0 + 20.0 - 9.0)  # sparse at one activation order + what act order 2 adds


def test_an_expansion_never_costs_less_than_its_first_order() -> None:
    layer = _layers(small_cnn())[1]
    k1, k2 = LayerPlan(bits=8, order=1), LayerPlan(bits=8, order=2)
    table = CostTable(
        layers={layer.name: {option_key(PROFILE, layer, k1).text: Point(analytic_us(PROFILE, layer, k1), 9.0),
                             option_key(PROFILE, layer, k2).text: Point(analytic_us(PROFILE, layer, k2), 8.0)}},
        rest_points=(),
    )
    k3 = LayerPlan(bits=8, order=3)
    assert table.estimate_us(PROFILE, layer, k3)[0] >= 9.0


def test_observe_learns_layers_rest_ends_and_transitions() -> None:
    model = small_cnn()
    layers = _layers(model)
    producers = layer_producers(fold_batchnorm(model)[0], layers)
    k1 = LayerPlan(bits=8, order=1)
    table = CostTable(layers={}, rest_points=((0.0, 10.0), (1.0, 14.0)), producers=producers)
    # an all-int8 engine re-anchors the rest line's end at share 1
    uniform = {layer.name: k1 for layer in layers}
    new = table.observe(PROFILE, layers, uniform, {layer.name: 3.0 for layer in layers}, rest_us=20.0)
    assert new.estimate_us(PROFILE, layers[0], k1) == (3.0, "measured")
    assert dict(new.rest_points) == {0.0: 10.0, 1.0: 20.0} and new.observations == 1 and table.observations == 0
    # a mixed engine: what its rest exceeds the line by is what its transitions cost
    mixed = {layers[0].name: k1}
    n = table.transitions(mixed)
    assert n >= 1
    share = 1 / len(layers)
    line = 10.0 + 4.0 * share
    learned = table.observe(PROFILE, layers, mixed, {layers[0].name: 3.0, layers[1].name: 8.0}, rest_us=line + 6.0 * n)
    assert learned.transition_us == pytest.approx(6.0) and learned.rest_points == table.rest_points
    assert learned.estimate_us(PROFILE, layers[1], None) == (8.0, "measured")
    again = learned.observe(PROFILE, layers, mixed, {layers[0].name: 3.0}, rest_us=line + 2.0 * n)
    assert again.transition_us == pytest.approx(4.0)  # halfway to the newer observation
    # a mixed engine without transitions (float and weight-only layers): the excess is spread over its layers
    wo = {layers[0].name: LayerPlan(bits=8, order=1, act_bits=0)}
    assert table.transitions(wo) == 0
    spread = table.observe(PROFILE, layers, wo, {layers[0].name: 4.0, layers[1].name: 4.0}, rest_us=10.0 + 8.0)
    assert spread.estimate_us(PROFILE, layers[1], None) == (pytest.approx(8.0), "measured")
    assert spread.transition_us == 0.0


def test_a_table_scales_as_a_whole_to_the_speed_measured_now() -> None:
    model = small_cnn(seed=6)
    layers = _layers(model)
    k1, k2 = LayerPlan(8, 1), LayerPlan(8, 2)
    table = CostTable(
        layers={layer.name: {option_key(PROFILE, layer, k1).text: Point(analytic_us(PROFILE, layer, k1), 5.0),
                             option_key(PROFILE, layer, k2).text: Point(analytic_us(PROFILE, layer, k2), 9.0)}
                for layer in layers},
        rest_points=((0.0, 7.0), (1.0, 9.0)), producers={}, transition_us=0.5,
    )  # fmt: skip
    uniform = {layer.name: k1 for layer in layers}
    both = {layer.name: k2 for layer in layers}
    before_k1, before_k2 = table.predict_ms(PROFILE, layers, uniform), table.predict_ms(PROFILE, layers, both)
    # two engines measured now, 1.2x and 1.4x their prediction: the median ratio (1.3) rescales every entry
    ratio = table.speed_ratio(layers, [(PROFILE, uniform, 1.2 * before_k1), (PROFILE, {}, 1.4 * table.predict_ms(PROFILE, layers, {}))])
    assert ratio == pytest.approx(1.3)
    assert table.speed_ratio(layers, []) == 1.0
    scaled = table.scaled(ratio)
    assert scaled.predict_ms(PROFILE, layers, both) == pytest.approx(1.3 * before_k2)  # an option never re-measured
    assert scaled.transition_us == pytest.approx(0.65)
    assert np.allclose(scaled.rest_points, ((0.0, 7.0 * 1.3), (1.0, 9.0 * 1.3)))
    with pytest.raises(PlanError, match="positive"):
        table.scaled(float("nan"))


def test_cost_table_json_round_trip_and_rejects_a_damaged_file() -> None:
    layer = _layers(small_cnn())[0]
    key = option_key(PROFILE, layer, LayerPlan(bits=8, order=1)).text
    table = CostTable(layers={layer.name: {key: Point(1.5, 2.5)}}, rest_points=((0.0, 1.0),), key="abc")
    back = CostTable.from_dict(json.loads(table.to_json()))
    assert back.layers == table.layers and back.rest_points == table.rest_points and back.key == "abc"
    raw = json.loads(table.to_json())
    raw["schema"] = 99
    with pytest.raises(Exception, match="schema"):
        CostTable.from_dict(raw)


# ---------------------------------------------------------------------------------------------------
# Node ownership and the split of profiled times
# ---------------------------------------------------------------------------------------------------
def test_node_owners_charges_orders_sums_and_input_quantization_to_their_layer() -> None:
    model = small_cnn(seed=1)
    layers = _layers(model)
    plan = default_plan(layers, PROFILE, order=2, act_order=2)
    expanded = expand_model(model, plan, profile=PROFILE).model
    owners = node_owners(expanded, layers)
    names = {layer.name for layer in layers}
    for node in expanded.graph.node:
        ident = node.name or node.output[0]
        if node.op_type in ("Conv", "Gemm", "QuantizeLinear", "Sub") or node.name.endswith(tuple(f"_add{k}" for k in range(2, 6))):
            assert owners.get(ident) in names, (ident, node.op_type)
    # an activation Q/DQ chain belongs to the layer that reads it
    first = layers[0]
    q_nodes = [n for n in expanded.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == first.input]
    assert q_nodes and all(owners[n.name] == first.name for n in q_nodes)
    # model ops outside any layer stay unowned (they are the rest)
    relus = [n for n in expanded.graph.node if n.op_type == "Relu"]
    assert relus and all((n.name or n.output[0]) not in owners for n in relus)


def test_split_layer_times_scales_layers_and_rest_to_the_measured_median() -> None:
    times = LayerTimes({"a_order1": 30.0, "a_add2": 10.0, "relu": 20.0}, unmapped_us=20.0, total_us=80.0, runs=4,
                       source="test")  # fmt: skip
    per_layer, rest = split_layer_times(times, {"a_order1": "a", "a_add2": "a"}, median_ms=0.04)
    assert per_layer == {"a": pytest.approx(20.0)}
    assert rest == pytest.approx(20.0)


def test_probe_plans_follow_the_profile_menu() -> None:
    layers = _layers(mobilenet_v2_like())
    labels = [p.label for p in probe_plans(layers, PROFILE)]
    # the model has a Gemm and the OpenVINO CPU engine can quantize its input at run time: a dynamic probe too
    assert labels == ["int8 K=1", "int8 K=2", "int8 K=2 g=0.5", "int8 K=2 act order 2", "weight-only K=1",
                      "weight-only K=1 dynamic", "int8 K=1 alternate"]
    dynamic = probe_plans(layers, PROFILE)[5].plan
    assert dynamic.dynamic_activations is True and all(lp.act_bits == 0 for lp in dynamic.layers.values())
    no_gemm = [layer for layer in layers if layer.op_class not in ("gemm", "matmul")]
    assert "weight-only K=1 dynamic" not in [p.label for p in probe_plans(no_gemm, PROFILE)]
    alternate = probe_plans(layers, PROFILE)[-1].plan
    assert sorted(alternate.layers) == sorted(layer.name for layer in layers[::2])
    int8_only = dataclasses.replace(PROFILE, quantization=dataclasses.replace(
        PROFILE.quantization, float_activations=False, max_act_order=1))  # fmt: skip
    assert [p.label for p in probe_plans(layers, int8_only)] == ["int8 K=1", "int8 K=2", "int8 K=2 g=0.5"]
    for probe in probe_plans(layers, PROFILE)[:-1]:  # uniform, each layer at the highest bits its class allows
        for layer in layers:
            assert probe.plan.layers[layer.name].bits == max(PROFILE.weight_bits(layer.op_class))


def _scripted_table(model: onnx.ModelProto, builder: ScriptedBuilder, work: Path) -> tuple[CostTable, list]:  # type: ignore[type-arg]
    layers = _layers(model)
    measured = []
    for probe in [Probe("float", Plan(layers={})), *probe_plans(layers, PROFILE)]:
        path = work / f"{len(measured)}.onnx"
        onnx.save(expand_model(model, probe.plan, profile=PROFILE).model if probe.plan.layers else model, str(path))
        engine = builder.build(path, PROFILE, work / path.stem)
        timing = builder.time(engine, FAST)
        measured.append(closedloop.Measured(probe.label, probe.plan, engine, path, timing,
                                            builder.layer_times(engine, FAST)))  # fmt: skip
    producers = layer_producers(fold_batchnorm(model)[0], layers)
    table = table_from_measurements(measured, layers, PROFILE,
                                    lambda m: node_owners(onnx.load(str(m.onnx_path)), layers), producers)  # fmt: skip
    return table, measured


def test_table_from_scripted_probes_predicts_each_probe_exactly(tmp_path: Path) -> None:
    model = small_cnn(seed=2)
    layers = _layers(model)
    table, measured = _scripted_table(model, ScriptedBuilder(), tmp_path)
    assert len(measured) == 1 + len(probe_plans(layers, PROFILE)) == 8  # the float engine and 7 probes
    for m in measured:  # every probe's own plan is predicted at its measured median
        assert table.predict_ms(PROFILE, layers, m.plan.layers) == pytest.approx(m.timing.median_ms, rel=1e-9)
    # the rest line runs through the float engine (share 0) and uniform int8 K=1 (share 1)
    assert [p[0] for p in table.rest_points] == [0.0, 1.0]
    assert table.transition_us == pytest.approx(0.0, abs=1e-9)  # this scripted device has no transition cost


def test_the_alternating_probe_measures_the_transition_cost(tmp_path: Path) -> None:
    model = small_cnn(seed=2)
    layers = _layers(model)
    table, measured = _scripted_table(model, ScriptedBuilder(mixed_penalty_us=40.0), tmp_path)
    alternate = measured[-1]
    n = table.transitions(alternate.plan.layers)  # thousands of elements converted at the transitions
    expected = sum(input_elements(layer) / 1000.0 for layer in layers
                   if any((layer.name in alternate.plan.layers) != (f in alternate.plan.layers)
                          for f in table.producers[layer.name]))  # fmt: skip
    assert n == pytest.approx(expected) and n > 0
    assert table.transition_us * n == pytest.approx(40.0)  # the scripted reorder penalty, recovered
    assert table.predict_ms(PROFILE, layers, alternate.plan.layers) == pytest.approx(alternate.timing.median_ms)
    assert table.transitions({}) == 0 and table.transitions(measured[1].plan.layers) == 0  # uniform plans: none


def test_layer_producers_follow_the_graph_through_other_ops() -> None:
    model = mobilenet_v2_like()
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    producers = layer_producers(folded, layers)
    assert producers[layers[0].name] == ()  # the stem reads the graph input
    assert producers[layers[1].name] == (layers[0].name,)  # through the ReLU6 (Clip)
    gemm = layers[-1]
    assert producers[gemm.name] == (layers[-2].name,)  # through GlobalAveragePool and Flatten
    # a residual Add: the layer after it is fed by both branches
    assert any(len(v) == 2 for v in producers.values())


# ---------------------------------------------------------------------------------------------------
# The closed loop, with the scripted builder
# ---------------------------------------------------------------------------------------------------
def test_build_returns_fp32_when_it_fits_and_probes_once_then_reads_the_cache(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ScriptedBuilder()
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "a", budget_ms=10.0)
    assert not report.plan.layers and report.fits_budget
    assert report.latency_model["source"] == "measured" and report.latency_model["cached"] is False
    assert "exact" in report.choice
    n_probes = len(report.latency_model["probes"])  # type: ignore[arg-type]
    assert n_probes == 8  # the float engine + the seven probes (small_cnn has a Gemm: the dynamic probe too)
    built = len(builder.built)
    report2 = _build(monkeypatch, builder, cnn_path, tmp_path / "b", budget_ms=10.0)
    assert report2.latency_model["cached"] is True
    # no probe, the table came from the cache: only the FP32 baseline, and the plain int8 engine that re-anchors the
    # table's int8 end (its float end re-anchors on the FP32 engine)
    assert builder.built[built:] == ["fp32", "int8"]


def test_budget_ratio_is_relative_to_the_plain_int8_engine_measured_in_the_run(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ScriptedBuilder()
    # 1.15 × the int8 engine (46 us: its pooled head's Q/DQ included) keeps the alternating probe (53.5 us) just
    # outside the budget, so the planner's plan is built and timed
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "r", budget_ratio=1.15)
    int8 = report.baselines["int8"].timing.median_ms
    assert report.budget_ms == pytest.approx(1.15 * int8)
    assert report.fits_budget and report.rex.timing.median_ms <= report.budget_ms
    assert report.rex.timing.median_ms < report.baselines["fp32"].timing.median_ms  # FP32 does not fit here
    assert report.plan.layers
    # the plan is the most accurate engine measured within budget: the planner's own choice fits
    assert report.attempts[0].measured_ms <= report.budget_ms


def test_a_miss_updates_the_table_and_the_loop_replans(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    # the planner's first engine runs 60 % slower than its layers' probed costs say: the first attempt misses
    builder = ScriptedBuilder(hiccup={"rex_attempt1": 1.6})
    model = onnx.load(str(cnn_path))
    layers = _layers(model)
    fp32_ms = (builder.overhead_us + sum(builder._node_us(model).values())) / 1000
    progress: list[str] = []
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "m", budget_ms=fp32_ms * 0.97, progress=progress.append)
    assert report.fits_budget
    assert report.rex.timing.median_ms <= report.budget_ms  # type: ignore[operator]
    first = report.attempts[0]
    assert first.measured_ms > report.budget_ms  # the first plan missed (timed twice) ...
    assert report.latency_model["observations"] >= 1
    assert builder.profiled == 7 + report.latency_model["observations"]  # ... was profiled: 7 uniform probes + misses
    assert report.latency_model["observations"] == len([a for a in report.attempts if a.measured_ms > report.budget_ms])
    assert len({a.plan_summary + str(a.predicted_ms) for a in report.attempts}) == len(report.attempts)
    # then the planner ran again, and either built a new plan or found a measured engine at least as accurate
    assert len(report.attempts) >= 2 or "nothing to build" in " ".join(progress)
    assert len(layers) >= 3
    # what is returned: the most accurate engine measured in the run that fits (here no planned engine did)
    engines = report.latency_model["engines"]
    returned = [e for e in engines if e["returned"]]  # type: ignore[union-attr]
    assert len(returned) == 1 and returned[0]["fits"]
    assert returned[0]["predicted_error"] == min(e["predicted_error"] for e in engines if e["fits"])  # type: ignore[union-attr]
    # the misses were saved with the table: the next build starts from what was learned
    again = _build(monkeypatch, ScriptedBuilder(), cnn_path, tmp_path / "m2", budget_ms=fp32_ms * 0.97)
    assert again.latency_model["cached"] is True and again.latency_model["observations"] >= 1


def test_a_miss_while_the_machine_slowed_rescales_the_table_instead_of_teaching_it(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    """The machine slows to 1.5x as planning starts (after the baselines and probes were timed): the first planned
    engine misses because of the machine; learning that per layer would teach the table this minute's load. The FP32
    baseline, timed again, shows the slowdown: the table is rescaled as a whole instead, no layer observation made."""
    builder = ScriptedBuilder()
    model = onnx.load(str(cnn_path))
    fp32_ms = (builder.overhead_us + sum(builder._node_us(model).values())) / 1000
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if message.startswith("plan (attempt 1)"):
            builder.slow = 1.5

    # 1.5x slower, nothing new may fit (BudgetError): an acceptable end, what matters is what was learned
    with contextlib.suppress(BudgetError):
        _build(monkeypatch, builder, cnn_path, tmp_path / "slowed", budget_ms=fp32_ms * 0.97, use_cache=False,
               progress=progress)  # fmt: skip
    rescaled = [m for m in said if "the cost table is rescaled, not taught this engine" in m]
    assert rescaled and "now takes 1.50x its first timing" in rescaled[0]
    assert not [m for m in said if m.endswith("learning from this engine")]
    # a steady machine: the same miss is learned per layer (test_a_miss_updates_the_table_and_the_loop_replans)
    steady = _build(monkeypatch, ScriptedBuilder(hiccup={"rex_attempt1": 1.6}), cnn_path, tmp_path / "steady",
                    budget_ms=fp32_ms * 0.97, use_cache=False)  # fmt: skip
    assert "drift_rescales" not in steady.latency_model and steady.latency_model["observations"] >= 1


def test_budget_ratio_one_always_fits_the_plain_int8_engine_it_was_set_from(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    # a machine that gets slower by the minute: every engine timed after the plain int8 baseline (the probes'
    # interleaved rounds re-time it too) measures slower than the budget that baseline set
    builder = ScriptedBuilder(drift=0.01)
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "d", budget_ratio=1.0)
    assert report.fits_budget and report.rex.timing.median_ms <= report.budget_ms  # type: ignore[operator]
    assert report.budget_ms == pytest.approx(report.baselines["int8"].timing.median_ms)


def test_a_cached_table_is_reanchored_on_the_baselines_measured_now(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ScriptedBuilder()
    _build(monkeypatch, builder, cnn_path, tmp_path / "warm", budget_ratio=1.0)  # probes and caches the table
    # the device is now 30 % slower than when it was probed: a stale table would predict every plan 30 % fast
    builder.slow = 1.3
    built = len(builder.built)
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "slow", budget_ratio=1.0)
    assert report.latency_model["cached"] is True
    assert report.latency_model["reanchor_scale"] == pytest.approx(1.3, rel=0.02)  # the whole table, not just baselines
    assert report.fits_budget
    # budget = 1.0 x plain int8: only that engine fits, and the re-anchored table knows it — no plan is built
    # on the stale (30 % too fast) figures; the plain int8 engine of this run is returned
    assert report.choice.startswith("int8 K=1")
    assert builder.built[built:] == ["fp32", "int8"]


def test_the_default_float_engine_is_a_measured_baseline_and_a_candidate(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ScriptedBuilder(default_float="bf16")
    fp32_ms = (builder.overhead_us + sum(builder._node_us(onnx.load(str(cnn_path))).values())) / 1000
    # between the bf16 engine (0.6 x FP32) and FP32: FP32 does not fit, bf16 does
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "bf", budget_ms=fp32_ms * 0.8)
    assert set(report.baselines) == {"fp32", "bf16 (default)"}
    # the returned engine is always at rex/ (a copy of the bf16 engine here)
    assert report.rex.artifacts == ("rex/engine.onnx",) and (tmp_path / "bf" / "rex" / "engine.onnx").is_file()
    bf16 = report.baselines["bf16 (default)"].timing.median_ms
    assert bf16 == pytest.approx(0.6 * fp32_ms)
    engines = {e["label"]: e for e in report.latency_model["engines"]}  # type: ignore[union-attr]
    err = engines["bf16 (default)"]["predicted_error"]
    assert 0.0 < err < 1e-2  # measured against FP32 on the probes: bf16 keeps ~3 significant digits
    fitting = [e for e in engines.values() if e["fits"]]
    # the bf16 engine's error (~3e-3) is below every quantized plan that fits here: it is returned, and says so
    assert min(fitting, key=lambda e: e["predicted_error"])["label"] == "bf16 (default)"
    assert engines["bf16 (default)"]["returned"] and not report.plan.layers
    assert "bf16 (default) float engine" in report.choice and "measured error" in report.choice
    assert report.plan_text.startswith("float engine in bf16")
    # no default float engine where the runtime's default is the profile's own precision
    plain = _build(monkeypatch, ScriptedBuilder(), cnn_path, tmp_path / "f32", budget_ms=fp32_ms * 0.8)
    assert set(plain.baselines) == {"fp32"}


def test_a_more_accurate_engine_just_over_the_budget_is_timed_again_before_it_is_passed_over(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    # the bf16 engine runs at 0.6 x FP32, but its first timing hiccups to 0.84 x: 5 % over a 0.8 x budget
    builder = ScriptedBuilder(default_float="bf16", slow_first_bf16=1.4)
    fp32_ms = (builder.overhead_us + sum(builder._node_us(onnx.load(str(cnn_path))).values())) / 1000
    said: list[str] = []
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "near", budget_ms=fp32_ms * 0.8, progress=said.append)
    # timed again: more accurate than every quantized plan that fit
    assert [m for m in said if "just over" in m and m.startswith("the bf16 (default) float engine")]
    assert not report.plan.layers and report.plan_text.startswith("float engine in bf16")
    assert report.rex.timing.median_ms == pytest.approx(0.6 * fp32_ms)
    assert report.baselines["bf16 (default)"].timing.median_ms == pytest.approx(0.6 * fp32_ms)  # the new timing
    # far over the budget (not a near miss): not timed again
    said.clear()
    far = ScriptedBuilder(default_float="bf16", slow_first_bf16=2.0)
    _build(monkeypatch, far, cnn_path, tmp_path / "far", budget_ms=fp32_ms * 0.8, use_cache=False, progress=said.append)
    assert not [m for m in said if "just over" in m and m.startswith("the bf16 (default) float engine")]


def test_a_relative_budget_is_settled_in_interleaved_rounds(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """--budget-ratio 1 --relative-to default, where the default (bf16) engine's first timing hiccups to 2x: the
    sequential budget (2 x its real latency) would let slower engines through; the rounds time it again beside the
    engines near that budget, the budget becomes its real latency, and what is returned fits that."""
    builder = ScriptedBuilder(default_float="bf16", slow_first_bf16=2.0)
    fp32_ms = (builder.overhead_us + sum(builder._node_us(onnx.load(str(cnn_path))).values())) / 1000
    said: list[str] = []
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "rel", budget_ratio=1.0, relative_to="default",
                    progress=said.append)  # fmt: skip
    from rexdeploy.budget import format_ms

    first = f"budget: 1 x the default float engine (bf16 (default)) = {format_ms(1.2 * fp32_ms)}"
    assert first in said  # the hiccup: twice its real latency
    assert [m for m in said if "interleaved rounds" in m]
    assert report.budget_ms == pytest.approx(0.6 * fp32_ms)  # settled: the bf16 engine's real latency
    assert report.baselines["bf16 (default)"].timing.median_ms == pytest.approx(0.6 * fp32_ms)
    assert report.rex.timing.median_ms <= report.budget_ms * (1 + 1e-9)
    # every engine measured over 0.6 x FP32 was left out of the choice: none is returned
    slower = [e for e in report.latency_model["engines"] if e["median_ms"] > report.budget_ms * (1 + 1e-9)]
    assert slower and not any(e["returned"] for e in slower)


def test_nothing_fits_only_after_the_fastest_candidate_was_measured(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    builder = ScriptedBuilder()
    out = tmp_path / "none"
    with pytest.raises(BudgetError, match=r"no engine fits the .* budget.*fastest measured.*runs in"):
        _build(monkeypatch, builder, cnn_path, out, budget_ms=0.001)
    assert not out.exists()
    assert not list(tmp_path.glob(".none*"))  # no temporary folder left behind


def test_int8_only_profile_never_returns_a_float_engine(monkeypatch: pytest.MonkeyPatch, cnn_path: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    profile = dataclasses.replace(PROFILE, name="int8-only", quantization=dataclasses.replace(
        PROFILE.quantization, float_activations=False))  # fmt: skip
    builder = ScriptedBuilder()
    monkeypatch.setattr(closedloop, "builder_for", lambda p: builder)
    report = closedloop.build(cnn_path, profile, out_dir=tmp_path / "i8", timing=FAST, budget_ms=10.0)
    assert report.plan.layers and all(lp.act_bits == 8 for lp in report.plan.layers.values())


def test_planner_with_a_table_labels_its_latency_measured_and_without_an_estimate() -> None:
    model = small_cnn(seed=4)
    layers = _layers(model)
    estimate = plan_model(model, layers, PROFILE, 1e3)
    assert estimate.latency_source == "estimate" and "analytic estimate" in estimate.plan.notes[0]
    table = CostTable(layers={}, rest_points=((0.0, 50.0),))
    measured = plan_model(model, layers, PROFILE, 1e3, cost_table=table)
    assert measured.latency_source == "measured" and "measured on the device" in measured.plan.notes[0]
    fp32 = next(c for c in measured.candidates if c.label == "FP32")
    # an empty table: each layer is the analytic model (ratio 1) and the rest is the table's
    expected = 50.0 + sum(analytic_us(PROFILE, layer, None) for layer in layers)
    assert fp32.predicted_latency_ms == pytest.approx(expected / 1000.0)


def test_plan_error_of_any_plan() -> None:
    model = small_cnn(seed=5)
    layers = _layers(model)
    result = plan_model(model, layers, PROFILE, 1e3)
    k1 = default_plan(layers, PROFILE, order=1)
    k2 = default_plan(layers, PROFILE, order=2)
    assert result.plan_error(Plan(layers={})) == 0.0
    assert 0.0 < result.plan_error(k2) <= result.plan_error(k1)


# ---------------------------------------------------------------------------------------------------
# The greedy step prices transitions
# ---------------------------------------------------------------------------------------------------
def _gemm_chain(seed: int = 0, width: int = 16) -> onnx.ModelProto:
    """X → Gemm → Relu → Gemm → Relu → Gemm: three layers in a chain."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(3):
        w = onnx.numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 4, f"w{i}")
        inits.append(w)
        nodes.append(onnx.helper.make_node("Gemm", [x, f"w{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
        x = f"g{i}"
        if i < 2:
            nodes.append(onnx.helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, width])], inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_the_greedy_step_pays_for_the_transitions_it_adds_and_is_paid_for_those_it_removes() -> None:
    from rexdeploy.planner.fidelity import LayerOption
    from rexdeploy.planner.search import _greedy, _Transitions, prepare

    model = _gemm_chain()
    layers = _layers(model)
    a, b, c = (layer.name for layer in layers)
    prepared = prepare(model, layers, profile=PROFILE)
    gains = prepared.errors.sensitivity.gains
    # int8 4 µs, float 10 µs everywhere; the int8 error at the output (gain × ε): A 0.9, B 1.0, C 0.1
    target = {a: 0.9, b: 1.0, c: 0.1}
    menus = [[LayerOption(LayerPlan(8, 1), 4.0, target[layer.name] / gains[layer.name]),
              LayerOption(None, 10.0, 0.0)] for layer in layers]  # fmt: skip
    table = CostTable(layers={}, rest_points=((0.0, 0.0),), producers={b: (a,), c: (b,)},
                      edge_elements={b: 1.0, c: 1.0}, transition_us=10.0)  # fmt: skip
    t = _Transitions(layers, menus, table)
    assert t.added_us(0, [0, 0, 0]).tolist() == [0.0, 10.0]  # A to float: one new edge A→B
    assert t.added_us(1, [0, 0, 0]).tolist() == [0.0, 20.0]  # B to float: two
    assert t.added_us(1, [1, 0, 0]).tolist() == [0.0, 0.0]  # A float: B to float trades A→B for B→C
    assert t.added_us(2, [1, 1, 0]).tolist() == [0.0, -10.0]  # A, B float: C to float removes B→C
    base = Plan(layers={}, profile=PROFILE.name)
    path = _greedy(layers, menus, prepared.errors, 0.0, 1.0, base, table)
    floats = [sorted(n for n in (a, b, c) if n not in cand.plan.layers) for cand in path]
    # B alone would pay two reorders (38 µs for error² 0.82); A first pays one (28 µs for 0.81), then B is cheap
    assert floats[:4] == [[], [a], [a, b], [a, b, c]]
    assert [cand.predicted_latency_ms * 1000 for cand in path[:4]] == pytest.approx([12.0, 28.0, 34.0, 30.0])
    blind = _greedy(layers, menus, prepared.errors, 0.0, 1.0, base, dataclasses.replace(table, producers={}))
    assert sorted(n for n in (a, b, c) if n not in blind[1].plan.layers) == [b]  # without the term: B first


def test_the_error_model_follows_the_default_float_engine_measured_error(
    monkeypatch: pytest.MonkeyPatch, cnn_path: Path, tmp_path: Path
) -> None:
    """A plan running most layers in bf16 must not be predicted more accurate than the bf16 engine itself: the
    model's float rounding terms are scaled to the default float engine's error measured in the run."""
    from rexdeploy.planner.search import prepare

    builder = ScriptedBuilder(default_float="bf16")
    fp32_ms = (builder.overhead_us + sum(builder._node_us(onnx.load(str(cnn_path))).values())) / 1000
    said: list[str] = []
    report = _build(monkeypatch, builder, cnn_path, tmp_path / "cal", budget_ms=fp32_ms * 0.8, progress=said.append)
    measured = report.latency_model["engines"]  # type: ignore[index]
    bf16_error = next(e["predicted_error"] for e in measured if e["label"] == "bf16 (default)")  # type: ignore[index]
    model = onnx.load(str(cnn_path))
    errors = prepare(model, _layers(model), profile=PROFILE).errors
    predicted = errors.network_error(errors.plan_errors({}, "bf16"))
    scale = report.latency_model["float_error_scale"]
    assert scale == pytest.approx(min(max(bf16_error / predicted, 0.25), 8.0), rel=1e-6)
    assert any(line.startswith("error model: bf16 rounding scaled by") for line in said)
    assert errors.calibrate_float("bf16", bf16_error) == pytest.approx(scale)
    assert errors.network_error(errors.plan_errors({}, "bf16")) == pytest.approx(min(bf16_error, predicted * 8.0))
    assert errors.calibrate_float("bf16", float("nan")) == 1.0  # nothing measured: unchanged


def test_a_model_with_external_weights_builds_and_its_copy_is_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torch.onnx.export(dynamo=True) writes weights to a .onnx.data file beside the model: the build's copy of the
    FP32 model (what the engines are built from) must carry them, not point at a file that is not beside it."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "cnn.onnx"
    onnx.save(small_cnn(seed=3), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="cnn.onnx.data", size_threshold=0)  # fmt: skip
    assert (src / "cnn.onnx.data").is_file()
    builder = ScriptedBuilder()
    report = _build(monkeypatch, builder, path, tmp_path / "out", budget_ms=10.0)
    assert report.fits_budget
    copy = onnx.load(str(tmp_path / "out" / "fp32.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in copy.graph.initializer)
    assert not (tmp_path / "out" / "cnn.onnx.data").exists()
