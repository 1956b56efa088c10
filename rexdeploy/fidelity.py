"""Fidelity of a quantized engine against the FP32 one on the same probe inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from rexdeploy.builders.base import Builder, Engine


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


def measure_fidelity(
    builder: Builder, reference: Engine, candidate: Engine, model: onnx.ModelProto, probes: int = 32, seed: int = 1
) -> Fidelity:
    """Run both engines on the same seeded synthetic probes (batch 1 each) and compare the first outputs."""
    from rexdeploy.ranges import synthetic_inputs

    ref_out, cand_out = [], []
    for i in range(probes):
        feeds = synthetic_inputs(model, batch=1, seed=seed + i)
        ref_out.append(builder.run(reference, feeds)[0])
        cand_out.append(builder.run(candidate, feeds)[0])
    return compare_outputs(np.concatenate(ref_out), np.concatenate(cand_out))


def measure_fidelity_on(builder: Builder, reference: Engine, candidate: Engine, samples: dict[str, np.ndarray]) -> Fidelity:
    """Both engines on the user's samples (one at a time: engines are built for batch 1), first outputs
    compared (:func:`rexdeploy.samples.load_samples` makes ``samples``)."""
    n = next(iter(samples.values())).shape[0]
    ref_out, cand_out = [], []
    for i in range(n):
        feeds = {name: array[i : i + 1] for name, array in samples.items()}
        ref_out.append(builder.run(reference, feeds)[0])
        cand_out.append(builder.run(candidate, feeds)[0])
    return compare_outputs(np.concatenate(ref_out), np.concatenate(cand_out))


def fidelity_disagreement(estimate: Fidelity, samples: Fidelity) -> str | None:
    """A warning when the synthetic estimate and the samples disagree (top-1 agreement 10 points apart, or
    relative errors a factor 2 apart), else None."""
    far = False
    if estimate.top1_agreement is not None and samples.top1_agreement is not None:
        far = abs(estimate.top1_agreement - samples.top1_agreement) > 0.10
    lo, hi = sorted((estimate.relative_error, samples.relative_error))
    far = far or (hi > 1e-6 and hi > 2.0 * lo)
    if not far:
        return None

    def text(f: Fidelity) -> str:
        top1 = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
        return f"rel. error {f.relative_error:.2e}{top1}"

    return (f"fidelity on your {samples.probes} samples ({text(samples)}) differs from the synthetic-probe estimate "
            f"({text(estimate)}): trust the samples")  # fmt: skip
