from __future__ import annotations

import json
from pathlib import Path

import pytest

from rexdeploy.errors import InputError, PlanError
from rexdeploy.plans import LayerPlan, Plan, load_plan, uniform_plan


def test_plan_json_round_trip_and_stable_hash(tmp_path: Path) -> None:
    plan = Plan(
        layers={"b": LayerPlan(bits=4, order=3, gamma=0.5, split=(2, 1)), "a": LayerPlan(act_bits=0)},
        profile="x86-avx512",
        model_sha256="abc",
        predicted_latency_ms=1.5,
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.hash == plan.hash
    # predictions do not change the hash; settings do
    assert plan.with_predictions(predicted_latency_ms=9.0).hash == plan.hash
    changed = Plan(layers={**plan.layers, "a": LayerPlan(act_bits=8)}, profile="x86-avx512", model_sha256="abc")
    assert changed.hash != plan.hash
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert load_plan(path) == plan


def test_uniform_plan_and_summary() -> None:
    plan = uniform_plan(["c1", "c2"], bits=4, order=3, gamma=0.5, split=(2, 1), act_bits=8)
    assert plan.summary() == "W4A8 K=3 gamma=0.5 ensemble=2,1 branches on 2 layers"
    assert plan.predictors == 2
    assert uniform_plan(["c"], bits=8, order=2, act_bits=0).summary() == "W8Afp K=2 branches on 1 layers"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "weight bits 9 not supported"),
        ({"bits": 1}, "weight bits 1 not supported"),
        ({"order": 0}, "expansion order 0"),
        ({"order": 3, "split": (1, 1)}, "summing to K=3"),
        ({"act_bits": 4}, "activation bits 4"),
        ({"form": "tree"}, "form 'tree' unknown"),
        ({"gamma": -0.1}, "gamma -0.1 must be >= 0"),
    ],
)
def test_bad_layer_plans(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        LayerPlan(**kwargs)  # type: ignore[arg-type]


def test_bad_plan_documents(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="'layers' table"):
        Plan.from_json("[]")
    with pytest.raises(PlanError, match="unknown key"):
        Plan.from_json(json.dumps({"layers": {"c": {"bitz": 4}}}))
    with pytest.raises(InputError, match="not found"):
        load_plan(tmp_path / "none.json")


def test_api_names_are_functions_even_after_submodule_imports() -> None:
    import importlib

    import rexdeploy

    importlib.import_module("rexdeploy.plans")
    importlib.import_module("rexdeploy.benchmark")
    assert callable(rexdeploy.plan) and callable(rexdeploy.bench) and callable(rexdeploy.build)
    assert rexdeploy.plan.__module__ == "rexdeploy.api"
