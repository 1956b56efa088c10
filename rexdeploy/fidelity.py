"""Fidelity of a quantized engine against the FP32 one on the same probe inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    """Relative L2 error and cosine of the outputs, and top-1 agreement when the output is (N, classes)."""

    probes: int
    relative_error: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Compare stacked first outputs of shape (probes, ...)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {cand.shape}")
    diff = cand - ref
    ref_norm = float(np.linalg.norm(ref))
    rel = float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    # clipped: rounding may put identical outputs a hair above 1; a zero output (a dead engine) against a
    # non-zero one has no direction in common (0), two zero outputs agree (1)
    cosine = float(np.clip(np.sum(ref * cand) / denom, -1.0, 1.0)) if denom > 0 else float(not diff.any())
    top1: float | None = None
    flat_ref = ref.reshape(ref.shape[0], -1)
    if flat_ref.shape[1] > 1 and ref.ndim in (2, 3):
        flat_cand = cand.reshape(cand.shape[0], -1)
        top1 = float(np.mean(np.argmax(flat_ref, axis=1) == np.argmax(flat_cand, axis=1)))
    return Fidelity(
        probes=int(ref.shape[0]),
        relative_error=rel,
        cosine=cosine,
        max_abs_error=float(np.max(np.abs(diff))) if diff.size else 0.0,
        top1_agreement=top1,
    )
