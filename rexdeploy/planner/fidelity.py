"""The data-free fidelity model: the relative output error a plan is predicted to cause.

Each quantized layer l adds a relative error ε_l to its output y = Wx, from two independent,
noise-like sources (each output channel sums its own row of W against the input):

- weights: the REx reconstruction error ΔW = W - Ŵ (paper Eq. 2-3, sparse Eq. 12) adds
  ``E||ΔW x||² ≈ ||ΔW||_F² · rms(x)² · P`` over P output positions;
- activations (int8 Q/DQ on the input): rounding noise of step ``s = range/127`` (RMS ``s/√12``), plus
  what the range clips off (mean square of ``(|x| - range)_+`` on the probes), adds
  ``||W||_F² · (s²/12 + clip) · P``; with J activation orders (:mod:`rexdeploy.actorders`) the step is
  ``s_1/254^(J-1)`` over the widened first range, the clip starts ``s_1/2`` further out, and each cross
  term the pass drops adds ``||R^k||² · s_{j-1}²/12``;

relative to ``||y||² = C_out · rms(y)² · P``::

    ε_l = sqrt(||ΔW||_F² rms(x)² + ||W||_F² s²/12) / (sqrt(C_out) · rms(y))

with rms(x), rms(y) measured on the FP32 probes. (Scaling by ||ΔW||/||W|| alone misses how much
smaller ||Wx|| is than ||W||·||x|| when the input is structured: a ×4 under-estimate on small CNNs.)

A layer the engine computes in a reduced float precision (a float or weight-only layer of a bf16 / fp16 engine)
adds the rounding of its input, weights and output: relative RMS δ per rounding (bf16: 8-bit significand,
δ = 2⁻⁸/√3; fp16: 2⁻¹¹/√3), so ``ε_float = δ · sqrt(1 + 2 (||W||_F rms(x) / (sqrt(C_out) rms(y)))²)``.

The network error is ``E = sqrt(Σ_l g_l² ε_l²)`` with the measured gains g_l
(:mod:`rexdeploy.planner.sensitivity`). The a-priori bound U (Eq. 4 / 15, :func:`network_bound`)
is reported beside it: rigorous but loose, it cannot rank plans by itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from rexdeploy.actorders import ACT_STEP, activation_scale, first_range, kept_terms
from rexdeploy.analyze import Layer
from rexdeploy.numerics import expand_weight, weight_error
from rexdeploy.planner.sensitivity import Sensitivity
from rexdeploy.plans import LayerPlan

DYNAMIC_PEAK = 2.2
"""Runtime-computed (dynamic) int8 activations take one scale per group of 32 input values, ``max|x_group| / 127``;
the expected peak of a group is 2.2 × rms(x) for Gaussian values, so the rounding noise RMS is
``2.2 rms(x) / (127 √12)``. Checked on a transformer block (hidden 384, 64 tokens, OpenVINO 2026.4 CPU,
``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 32, AVX-512 BF16 host): weight-only K=1 predicted 1.64e-2 / measured 1.61e-2,
K=2 9.8e-3 / 8.3e-3 (without dynamic activations: 1.35e-2 / 1.37e-2 and 5.3e-5 / 5.4e-5)."""

FLOAT_ROUNDING = {"fp32": 0.0, "bf16": 2.0**-8 / math.sqrt(3.0), "fp16": 2.0**-11 / math.sqrt(3.0)}
"""Relative RMS rounding error δ of one value stored in each float precision (round to nearest)."""


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
        act_order = f"J{lp.act_order}" if lp.act_order > 1 else ""
        return f"W{lp.bits}A{lp.act_bits or 'fp'}K{lp.order}{gamma}{act_order}"


class ErrorModel:
    """Per-layer errors ε_l(option), cached; combines them with the gains."""

    def __init__(self, layers: list[Layer], weights: Mapping[str, np.ndarray], sensitivity: Sensitivity,
                 ranges: Mapping[str, float], unsigned_inputs: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.layers = {layer.name: layer for layer in layers}
        self.weights = weights
        self.sensitivity = sensitivity
        self.ranges = ranges
        self.unsigned_inputs = unsigned_inputs  # layers whose int8 input is emitted as uint8 (twice the codes)
        # the float rounding terms' calibration: the engine's own float error measured / what this model predicts
        # for it (:meth:`calibrate_float`); 1 until an engine was measured
        self.float_scale = 1.0
        self._weight_cache: dict[tuple[str, int, int, float | None], float] = {}
        self._norms = {name: float(np.linalg.norm(w)) for name, w in weights.items()}

    def weight_error(self, name: str, lp: LayerPlan) -> float:
        """Relative L2 error ||ΔW||_F / ||W||_F of the layer's REx weight."""
        key = (name, lp.bits, lp.order, lp.gamma)
        if key not in self._weight_cache:
            w = self.weights[name]
            self._weight_cache[key] = weight_error(w, expand_weight(w, lp.bits, lp.order, lp.gamma))["rel_l2"]
        return self._weight_cache[key]

    def activation_noise(self, name: str, lp: LayerPlan) -> float:
        """RMS error of int8 Q/DQ on the layer input: rounding (s/√12; a uint8 input of a tensor ≥ 0 has half the
        step) and what the range clips off the probes (0 for a float input)."""
        if lp.act_bits == 0:
            return 0.0
        first = first_range(self.ranges.get(self.layers[name].input, 0.0), lp.act_order)
        s1 = activation_scale(first, name in self.unsigned_inputs)
        step = s1 / ACT_STEP ** (lp.act_order - 1)
        # the orders j ≥ 2 absorb up to 127·s_2 = s_1/2 beyond the first range (then they saturate too)
        reach = first + (s1 / 2.0 if lp.act_order > 1 else 0.0)
        return math.sqrt(step * step / 12.0 + self.sensitivity.clip_ms(name, reach))

    def dropped_terms_error(self, name: str, lp: LayerPlan) -> float:
        """RMS (per unit of ||W||) of the cross terms R^k·x_j that :func:`kept_terms` leaves out: x_j is the
        remainder of order j-1 (uniform in ±s_{j-1}/2: RMS s_{j-1}/√12), ||R^k|| the weight error of K = k-1."""
        if lp.act_bits == 0 or lp.act_order == 1:
            return 0.0
        kept = set(kept_terms(lp.bits, lp.order, lp.act_order))
        s1 = activation_scale(first_range(self.ranges.get(self.layers[name].input, 0.0), lp.act_order))
        total = 0.0
        for j in range(2, lp.act_order + 1):
            for k in range(2, lp.order + 1):
                if (j, k) not in kept:
                    r_k = self.weight_error(name, replace(lp, order=k - 1, gamma=None, split=(k - 1,)))
                    total += (r_k * s1 / ACT_STEP ** (j - 2) / math.sqrt(12.0)) ** 2
        return math.sqrt(total)

    def _gain_ratio(self, name: str) -> float:
        """``||W||_F rms(x) / (sqrt(C_out) rms(y))``: how much larger the layer's terms are than its output."""
        denom = math.sqrt(self.layers[name].out_channels) * self.sensitivity.output_rms[name]
        return self._norms[name] * self.sensitivity.input_rms[name] / denom if denom > 0 else 0.0

    def float_error(self, name: str, precision: str) -> float:
        """ε of a layer computed in the float ``precision`` (0 in fp32): its input, weights and output rounded
        (times :attr:`float_scale`)."""
        delta = FLOAT_ROUNDING.get(precision, 0.0)
        return self.float_scale * delta * math.sqrt(1.0 + 2.0 * self._gain_ratio(name) ** 2) if delta else 0.0

    def calibrate_float(self, precision: str, measured: float) -> float:
        """Scale the float rounding terms so that the all-float engine in ``precision`` is predicted at its
        ``measured`` error (the default float engine, measured against FP32 on the probes): a plan that runs most
        of the network in bf16 must not be predicted more accurate than the bf16 engine itself. Returns the scale
        (clamped to [1/4, 8]; unchanged without a prediction to scale)."""
        self.float_scale = 1.0
        predicted = self.network_error(self.plan_errors({}, precision))
        if predicted > 0.0 and measured > 0.0 and math.isfinite(measured):
            self.float_scale = min(max(measured / predicted, 0.25), 8.0)
        return self.float_scale

    def dynamic_error(self, name: str) -> float:
        """ε a weight-only layer's input adds when the engine quantizes it at run time (:data:`DYNAMIC_PEAK`)."""
        noise = DYNAMIC_PEAK / (127.0 * math.sqrt(12.0))
        return noise * self._gain_ratio(name)

    def layer_error(self, name: str, lp: LayerPlan | None, precision: str = "fp32", dynamic: bool = False) -> float:
        """ε_l: the relative error the option adds to the layer's output (module docstring), in an engine whose
        float parts run in ``precision`` (a float layer, and a weight-only layer's float input, are rounded);
        ``dynamic``: the engine quantizes weight-only Gemm/MatMul inputs at run time."""
        if lp is None:
            return self.float_error(name, precision)
        w_norm = self._norms[name]
        rms_x, rms_y = self.sensitivity.input_rms[name], self.sensitivity.output_rms[name]
        weight_term = self.weight_error(name, lp) * w_norm * rms_x
        act_term = w_norm * math.hypot(self.activation_noise(name, lp), self.dropped_terms_error(name, lp))
        denom = math.sqrt(self.layers[name].out_channels) * rms_y
        error = math.hypot(weight_term, act_term) / denom if denom > 0 else 0.0
        if lp.act_bits != 0:
            return error
        runtime = self.dynamic_error(name) if dynamic and self.layers[name].op_class in ("gemm", "matmul") else 0.0
        return math.hypot(error, self.float_error(name, precision), runtime)

    def plan_errors(self, plan_layers: Mapping[str, LayerPlan], precision: str = "fp32",
                    dynamic: bool = False) -> dict[str, float]:  # fmt: skip
        """ε_l of every layer (float ones too: 0 in fp32) under a plan's layer settings."""
        return {name: self.layer_error(name, plan_layers.get(name), precision, dynamic) for name in self.layers}

    def network_error(self, errors: Mapping[str, float]) -> float:
        gains = self.sensitivity.gains
        return math.sqrt(sum((gains[n] * e) ** 2 for n, e in errors.items()))
