"""The data-free fidelity model: the relative output error a plan is predicted to cause.

Each quantized layer l adds a relative error ε_l to its output, from two independent sources:

- weights: the relative L2 error of the REx reconstruction (paper Eq. 2-3, sparse Eq. 12) —
  ``||W - Ŵ|| / ||W||``, which bounds ``||(W - Ŵ)x|| / ||Wx||`` on average over directions;
- activations (int8 Q/DQ on the input): uniform rounding noise of step ``s = range/127`` has RMS
  ``s/√12``; relative to the input's RMS it passes through the layer with the same relative size.

The network error is ``E = sqrt(Σ_l g_l² ε_l²)`` with the measured gains g_l
(:mod:`rexdeploy.planner.sensitivity`). The a-priori bound U (Eq. 4 / 15, :func:`network_bound`)
is reported beside it: rigorous but loose, it cannot rank plans by itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rexdeploy.analyze import Layer
from rexdeploy.numerics import expand_weight, weight_error
from rexdeploy.passes.expand import activation_scale
from rexdeploy.plan import LayerPlan
from rexdeploy.planner.sensitivity import Sensitivity


@dataclass(frozen=True)
class LayerOption:
    """A setting the search may give one layer (None: the layer stays float)."""

    plan: LayerPlan | None
    latency_us: float
    error: float  # ε_l, relative output error of the layer

    @property
    def label(self) -> str:
        if self.plan is None:
            return "float"
        lp = self.plan
        gamma = "" if lp.gamma is None else f"g{lp.gamma:g}"
        return f"W{lp.bits}A{lp.act_bits or 'fp'}K{lp.order}{gamma}"


class ErrorModel:
    """Per-layer errors ε_l(option), cached; combines them with the gains."""

    def __init__(self, layers: list[Layer], weights: Mapping[str, np.ndarray], sensitivity: Sensitivity,
                 ranges: Mapping[str, float]) -> None:  # fmt: skip
        self.layers = {layer.name: layer for layer in layers}
        self.weights = weights
        self.sensitivity = sensitivity
        self.ranges = ranges
        self._weight_cache: dict[tuple[str, int, int, float | None], float] = {}

    def weight_error(self, name: str, lp: LayerPlan) -> float:
        key = (name, lp.bits, lp.order, lp.gamma)
        if key not in self._weight_cache:
            w = self.weights[name]
            self._weight_cache[key] = weight_error(w, expand_weight(w, lp.bits, lp.order, lp.gamma))["rel_l2"]
        return self._weight_cache[key]

    def activation_error(self, name: str, lp: LayerPlan) -> float:
        if lp.act_bits == 0:
            return 0.0
        layer = self.layers[name]
        rms = self.sensitivity.input_rms[name]
        step = activation_scale(self.ranges.get(layer.input, 0.0))
        return (step / math.sqrt(12.0)) / rms if rms > 0 else 0.0

    def layer_error(self, name: str, lp: LayerPlan | None) -> float:
        if lp is None:
            return 0.0
        return math.hypot(self.weight_error(name, lp), self.activation_error(name, lp))

    def network_error(self, errors: Mapping[str, float]) -> float:
        gains = self.sensitivity.gains
        return math.sqrt(sum((gains[n] * e) ** 2 for n, e in errors.items()))
