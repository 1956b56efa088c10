"""The Python API: what ``rexdeploy build`` / ``expand`` do, as functions with typed results.

Nothing here prints or exits; progress goes to an optional callback and errors are RexErrors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

# each helper lives with its stage; they are re-exported here as the Python API
from rexdeploy.analyze import quantizable_layers
from rexdeploy.builders.registry import builder_for
from rexdeploy.closedloop import Progress
from rexdeploy.fidelity import (
    Fidelity,
    compare_all,
    compared_outputs,
    fidelity_disagreement,
    measure_fidelity,
    measure_fidelity_on,
)
from rexdeploy.graph import file_sha256, fold_batchnorm, load_model
from rexdeploy.passes.pipeline import Expanded, expand_model
from rexdeploy.plans import Plan, default_plan
from rexdeploy.profile import Profile, load_profile
from rexdeploy.ranges import graph_inputs, load_calibration


def simulated_fidelity(model: onnx.ModelProto, plan: Plan, samples: dict[str, np.ndarray], *,
                       profile: Profile | None = None, ranges: dict[str, float] | None = None) -> Fidelity:  # fmt: skip
    """The plan's fidelity vs FP32 on the user's samples without building an engine: the expanded Q/DQ graph
    and the FP32 model run by onnxruntime with graph optimizations off (exact Q/DQ arithmetic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expanded = expand_model(model, plan, profile=profile, ranges=ranges).model if plan.layers else model

    def run(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return compared_outputs(session.run(None, samples), [o.name for o in session.get_outputs()])

    return compare_all(run(model), run(expanded))




if TYPE_CHECKING:
    from rexdeploy.planner import PlanResult

__all__ = [
    "Expanded",
    "builder_for",
    "default_plan",
    "expand_model",
    "fidelity_disagreement",
    "graph_inputs",
    "measure_fidelity",
    "measure_fidelity_on",
    "quantizable_layers",
    "simulated_fidelity",
]


def plan(
    model_path: str | Path,
    profile: Profile | str,
    budget_ms: float,
    *,
    calibration_path: str | Path | None = None,
    latency_scale: float = 1.0,
    measure: bool = True,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> PlanResult:
    """Run the planner alone (no build of the chosen plan): the chosen Plan and the explored Pareto front.

    With ``measure`` (the default) and the profile's engine installed here, the planner's latencies come
    from the model's measured cost table (cached, or probed now: a few probe engines built, timed and
    profiled per layer, :func:`rexdeploy.closedloop.cost_table_for`); otherwise — cross-planning for
    another device, or ``measure=False`` — from the profile's analytic cost model, and the result says
    its latencies are an estimate (``PlanResult.latency_source``)."""
    from rexdeploy.closedloop import cost_table_for
    from rexdeploy.planner import plan_model

    profile = load_profile(profile) if isinstance(profile, str) else profile
    model = load_model(model_path)
    calibration = load_calibration(str(calibration_path), model) if calibration_path else None
    folded, _ = fold_batchnorm(model)
    layers = quantizable_layers(folded, Path(model_path).name)
    table = cost_table_for(model_path, profile, use_cache=use_cache, progress=progress) if measure else None
    return plan_model(model, layers, profile, budget_ms, model_sha256=file_sha256(model_path),
                      calibration=calibration, latency_scale=latency_scale, cost_table=table)  # fmt: skip
