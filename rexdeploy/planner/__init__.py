"""The planner: pick per-layer REx settings that fit a latency budget with the least predicted error.

``sensitivity`` (gains of each layer's error at the output) → ``fidelity`` (the error model) →
``search`` (uniform candidates + per-layer greedy allocation against the cost model).
"""

from __future__ import annotations

from rexdeploy.planner.search import Candidate, PlanResult, pareto_front, plan_model

__all__ = ["Candidate", "PlanResult", "pareto_front", "plan_model"]
