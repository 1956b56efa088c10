"""The pass's speed-ups change nothing: same tensors, same shapes, same bytes on disk, same expanded model.

(Timing lives in ``benchmarks/bench_expand_speed.py``; these tests pin the equivalences the speed-ups rely on.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from models import small_cnn
from onnx import TensorProto, helper, numpy_helper

import rexdeploy.passes.expand as expand_module
from rexdeploy.analyze import _shape_of, _value_infos, find_layers
from rexdeploy.graph import add_initializer, drop_initializers, fold_batchnorm, load_model, save_model
from rexdeploy.passes.ensemble import build_ensemble, float_predictors
from rexdeploy.passes.expand import LayerJob, expand
from rexdeploy.plans import uniform_plan
from rexdeploy.ranges import probe_ranges


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(-5, 5, dtype=np.int8),
        np.arange(7, dtype=np.int64),
        np.array(2.5, dtype=np.float32),
        np.array(0, dtype=np.int8),
        np.ones((2, 0, 3), dtype=np.float64),
        np.array([True, False]),
        np.arange(6, dtype=np.float16),
    ],
)
def test_add_initializer_equals_from_array(value: np.ndarray) -> None:
    graph = onnx.GraphProto()
    add_initializer(graph.initializer, value, "t")
    assert graph.initializer[0].SerializeToString() == numpy_helper.from_array(value, "t").SerializeToString()


def test_drop_initializers_keeps_order() -> None:
    graph = onnx.GraphProto()
    for name in "abcde":
        add_initializer(graph.initializer, np.zeros(2, dtype=np.float32), name)
    drop_initializers(graph, {"a", "c", "e"})
    assert [i.name for i in graph.initializer] == ["a", "c", "e"]


def _reshape_model() -> onnx.ModelProto:
    """A big weight (shape inference sees only its type) and a small Reshape shape (whose value it needs)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
            helper.make_node("MatMul", ["r", "m"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w"),  # 4608 elements
            numpy_helper.from_array(np.array([-1, 512], dtype=np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32), "m"),  # 5120 elements
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_lean_shape_inference_gives_the_full_models_shapes() -> None:
    model = _reshape_model()
    full = onnx.shape_inference.infer_shapes(model).graph
    want = {v.name: v for v in [*full.value_info, *full.input, *full.output]}
    got = _value_infos(model)
    assert set(got) == set(want)
    assert {k: _shape_of(got, k) for k in got} == {k: _shape_of(want, k) for k in want}
    assert _shape_of(got, "y") == (1, 10)  # through the Reshape, whose shape input stayed a value


def test_save_model_writes_what_onnx_save_writes(tmp_path: Path) -> None:
    folded, _ = fold_batchnorm(small_cnn())
    onnx.save(folded, str(tmp_path / "reference.onnx"))
    save_model(folded, tmp_path / "ours.onnx")
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    loaded = load_model(tmp_path / "ours.onnx")
    assert loaded.SerializeToString() == onnx.load(str(tmp_path / "reference.onnx")).SerializeToString()


def test_ensemble_expansion_reuses_the_float_predictors_orders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The orders float_predictors computed are handed to the expand pass (not recomputed), and the
    expanded model is the same as with orders computed afresh; with jobs given, no shape inference runs."""
    folded, _ = fold_batchnorm(small_cnn())
    layers = find_layers(folded)
    plan = uniform_plan([layer.name for layer in layers], bits=4, order=4, gamma=0.5, split=(2, 2), act_bits=8)
    ensemble = build_ensemble(folded, plan, layers)
    probe_model = float_predictors(ensemble, folded)
    assert {i.name for i in probe_model.graph.initializer}.isdisjoint({layer.weight for layer in layers})
    by_node = {n.name: n for n in ensemble.model.graph.node}
    ranges = probe_ranges(probe_model, [by_node[n].input[j.layer.act_index] for n, j in ensemble.jobs.items()])
    fresh = {name: LayerJob(job.layer, job.plan, job.orders, job.bias, job.tag) for name, job in ensemble.jobs.items()}
    want = expand(ensemble.model, plan, ranges, jobs=fresh)

    def no_recompute(*args: object, **kwargs: object) -> object:
        raise AssertionError("recomputed")

    monkeypatch.setattr(expand_module, "expand_weight", no_recompute)
    monkeypatch.setattr(expand_module, "find_layers", no_recompute)
    got = expand(ensemble.model, plan, ranges, jobs=ensemble.jobs)
    assert got.model.SerializeToString(deterministic=True) == want.model.SerializeToString(deterministic=True)
    assert got.numerics_seconds > 0.0  # the shared orders' time is still counted as numerics
