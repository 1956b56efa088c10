"""Residual expansion of activations: the numerics of ``LayerPlan.act_order`` (beyond the paper).

REx expands the *weights* (``W ≈ Σ_k R^k``, paper Eq. 2-3). At W8A8 the error of a data-free plan comes
mostly from the int8 *input* of each layer, so the same idea is applied to it. With the first scale
``s_1 = max|x| / 127`` (the data-free range) and ``Q``/``DQ`` symmetric int8 (zero-point 0) — or, for a tensor
≥ 0 on an engine that runs it, ``s_1 = max|x| / 255`` and a uint8 ``x_1`` (the remainders stay int8)::

    x_1 = DQ(Q(x; s_1))            r_1 = x - x_1
    x_j = DQ(Q(r_{j-1}; s_j))      r_j = r_{j-1} - x_j         s_j = s_{j-1} / 254    (j = 2..J)

Inside the range, rounding to nearest leaves ``|r_{j-1}| ≤ s_{j-1} / 2``, so ``s_j = s_{j-1} / (2·127)``
uses every int8 code of the next order, and ``|x - Σ_j x_j| ≤ s_J / 2`` — each order shrinks the
activation error by ρ_a = 1/254 (the issue's ``s / (2^(b-1) - 1)`` would leave the top bit unused).

A layer then computes ``W·x ≈ Σ_j Σ_k R^k·x_j``: every (j, k) is an integer kernel on int8 inputs.
**Bound of a term** (per multiply-accumulate, relative to ``max|x|·max|W_c|``): ``|x_j| ≤ max|x|·ρ_a^(j-1)``
and ``|R^k| ≤ max|W_c|·ρ_w^(k-1)`` with ``ρ_w = 1 / (2·qmax(b))`` (Lemma A.1's step), so

    |R^k·x_j| ≤ ρ_a^(j-1) · ρ_w^(k-1)

while the expansion truncated at (J, K) already leaves ``max(ρ_a^J, ρ_w^K)`` (the larger of the
activation remainder ``s_J / 2`` and the weight remainder ``s^K / 2``). A *cross term* (j ≥ 2 and k ≥ 2)
whose bound is below that truncation adds less than the error already left (both behave like
independent rounding noise, so dropping a term of bound ``β`` grows the error by at most
``√(1 + (β / truncation)²)``), and :func:`kept_terms` drops it. A term *equal* to the truncation is kept:
with 8-bit weights ρ_w = ρ_a = 1/254, and on MobileNetV2 W8 K = 2, J = 2 dropping (2,2) raised the
relative logit error from 0.0041 to 0.0057 (≈ √2, as predicted). With 7-bit weights (ρ_w = 1/126)
K = 2, J = 2 drops (2,2): its bound 1/(254·126) is half the weight truncation 1/126². The terms
(1, k) are the paper's expansion and (j, 1) the activation expansion: both are always kept.

**Clipping.** A value beyond the first range, ``|x| > 127·s_1``, leaves ``r_1`` larger than ``s_1/2``; the
second order saturates at ``127·s_2 = s_1/2``, so that value keeps its clipping error whatever J is. With
J ≥ 2 the rounding error is 254× smaller, so the balance between clipping and rounding moves towards a
wider first range: :func:`first_range` widens the data-free range by ``RANGE_WIDEN[J]``. Measured on
MobileNetV2 (W8, K = 2, J = 2, BN-statistics ranges at 4σ, 120 natural-image probes, onnxruntime):
relative logit error 0.068 / 0.024 / 0.018 / 0.0084 / 0.0057 / 0.0061 / 0.0076 for widening ×1 / 1.5 /
2 / 3 / 4 / 6 / 8 (top-1 agreement 94 % at ×1, 100 % from ×2). ×4 is the default; the J = 1 range is
left as it is (widening it by 1.5 raised W8A8's error from 0.227 to 0.299).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from rexdeploy.errors import PlanError
from rexdeploy.numerics import qmax

ACT_QMAX = 127  # symmetric int8 activations, zero-point 0
ACT_UQMAX = 255  # uint8 activations of a non-negative tensor, zero-point 0 (bnstats.nonnegative_tensors)
ACT_STEP = 2 * ACT_QMAX  # s_j / s_{j+1}: the remainder of order j spans [-s_j/2, s_j/2]
# first-range widening per activation order (index J): J = 1 keeps the data-free range as it is
RANGE_WIDEN: dict[int, float] = {1: 1.0, 2: 4.0, 3: 4.0}

__all__ = [
    "ACT_STEP",
    "ACT_UQMAX",
    "RANGE_WIDEN",
    "UNSIGNED_ACTIVATION_ENGINES",
    "activation_order_scales",
    "activation_scale",
    "emits_unsigned",
    "expand_activation",
    "first_range",
    "kept_terms",
    "term_bound",
    "unsigned_activations_for",
]


def activation_scale(max_abs: float, unsigned: bool = False) -> float:
    """Symmetric int8 scale for a tensor whose largest magnitude is ``max_abs`` (1 for 0 / non-finite);
    ``unsigned``: the uint8 scale (zero-point 0) of a tensor known to be ≥ 0, ``max_abs / 255``."""
    if not (max_abs > 0.0 and np.isfinite(max_abs)):
        return 1.0
    return float(max_abs) / (ACT_UQMAX if unsigned else ACT_QMAX)


def first_range(max_abs: float, act_order: int) -> float:
    """The first order's max |x| for a layer with ``act_order`` orders: the data-free range, widened for J ≥ 2."""
    if act_order not in RANGE_WIDEN:
        raise PlanError(f"activation order {act_order} not supported; use 1 to {max(RANGE_WIDEN)}")
    return float(max_abs) * RANGE_WIDEN[act_order]


def activation_order_scales(first_scale: float, act_order: int) -> list[float]:
    """``[s_1, s_1/254, s_1/254², …]``: the scale of each activation order (float32-exact values)."""
    if act_order < 1:
        raise PlanError(f"activation order {act_order} must be >= 1")
    return [float(np.float32(first_scale / ACT_STEP**j)) for j in range(act_order)]


def _qdq(x: np.ndarray, scale: float, unsigned: bool = False) -> np.ndarray:
    """ONNX QuantizeLinear + DequantizeLinear (int8 or uint8, zero-point 0) in float32, as onnxruntime computes it."""
    s = np.float32(scale)
    lo, hi = (0, ACT_UQMAX) if unsigned else (-128, 127)
    q = np.clip(np.rint(x.astype(np.float32) / s), lo, hi)
    return (q * s).astype(np.float32)


def expand_activation(x: np.ndarray, scales: Sequence[float], unsigned: bool = False) -> list[np.ndarray]:
    """The activation orders ``x_1 … x_J`` of ``x`` (float32), each an int8 value times its scale; ``unsigned``:
    ``x ≥ 0`` and ``x_1`` is uint8 (the remainders, of either sign, stay int8)."""
    out: list[np.ndarray] = []
    r = np.asarray(x, dtype=np.float32)
    for j, s in enumerate(scales):
        xj = _qdq(r, s, unsigned and j == 0)
        out.append(xj)
        r = (r - xj).astype(np.float32)
    return out


def term_bound(j: int, k: int, bits: int) -> float:
    """Bound of the term R^k·x_j per MAC, relative to max|x|·max|W_c|: ``ρ_a^(j-1)·ρ_w^(k-1)``."""
    rho_a = 1.0 / ACT_STEP
    rho_w = 1.0 / (2 * qmax(bits))
    return float(rho_a ** (j - 1) * rho_w ** (k - 1))


def kept_terms(bits: int, order: int, act_order: int) -> list[tuple[int, int]]:
    """The (activation order j, weight order k) products a layer computes, in emission order (by j, then k).

    All (1, k) and (j, 1); a cross term (j ≥ 2, k ≥ 2) only when its bound reaches the truncation error
    ``max(ρ_a^J, ρ_w^K)`` the expansion leaves anyway.
    """
    truncation = max(term_bound(act_order + 1, 1, bits), term_bound(1, order + 1, bits))
    return [
        (j, k)
        for j in range(1, act_order + 1)
        for k in range(1, order + 1)
        if j == 1 or k == 1 or term_bound(j, k, bits) >= truncation
    ]


UNSIGNED_ACTIVATION_ENGINES = ("openvino", "onnxruntime")


def emits_unsigned(op_type: str, tensor: str, nonnegative: Collection[str]) -> bool:
    """Whether a layer input is emitted as uint8 (given the engine runs uint8 activations): the tensor is ≥ 0 by
    the graph (:func:`rexdeploy.bnstats.nonnegative_tensors`) and the layer is not a MatMul — OpenVINO 2026.4's CPU
    plugin refuses a u8 input of a MatMul layer ("check failed: any_of(scale.size(), OC, 1U)",
    tests/test_engine_compiles.py), so MatMul inputs stay int8."""
    return tensor in nonnegative and op_type != "MatMul"


def unsigned_activations_for(profile_name: str) -> bool:
    """Whether the engine of the profile named ``profile_name`` runs uint8 activations: OpenVINO's CPU plugin
    and onnxruntime do (u8 × i8 integer kernels are their x86 norm); TensorRT quantizes to int8 only. A
    profile that does not load by name (a plan made without one, a custom file) gets int8, which every
    engine runs."""
    if not profile_name:
        return False
    from rexdeploy.errors import ProfileError
    from rexdeploy.profile import load_profile

    try:
        return load_profile(profile_name).engine in UNSIGNED_ACTIVATION_ENGINES
    except ProfileError:
        return False
