"""Fidelity of a quantized engine against the FP32 one on the same inputs: the data-free estimate (the worst
of several synthetic probe families, :mod:`rexdeploy.probes`) or the user's own samples."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from rexdeploy.builders.base import Builder, Engine

Outputs = Mapping[str, np.ndarray]  # output name → that output of every probe, stacked (batch axis first)
RunFn = Callable[[Mapping[str, np.ndarray]], "Outputs | np.ndarray"]  # feeds (batch axis first) → compared outputs


@dataclass(frozen=True)
class Fidelity:
    """Relative L2 error and cosine of the outputs, and top-1 agreement when the output is (N, classes).

    A comparison on given inputs (e.g. the user's samples) leaves the family fields empty. One probe family
    of the data-free estimate names itself in ``family``. The estimate (:func:`estimate_fidelity`) holds every
    family's figures in ``families`` and the worst of each figure: ``family`` names the family whose top-1
    agreement it reports, ``error_family`` the family whose relative error (and max abs error) it reports."""

    probes: int
    relative_error: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None
    family: str = ""
    error_family: str = ""
    families: tuple[Fidelity, ...] = ()
    error_output: str = ""

    def figures(self) -> dict[str, Any]:
        """The measured figures only (no family fields)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _FAMILY_FIELDS}

    @property
    def top1_probes(self) -> int:
        """How many probes the top-1 agreement was counted on (the estimate: its top-1 family's)."""
        return next((f.probes for f in self.families if f.family == self.family), self.probes)

    @property
    def top1_ci95(self) -> tuple[float, float] | None:
        """The 95 % (Wilson score) interval of the top-1 agreement over :attr:`top1_probes` inputs: how far from the
        figure the agreement on many more inputs of the same kind may lie (64 probes at 86 %: 75–93 %)."""
        if self.top1_agreement is None or self.top1_probes < 1:
            return None
        return wilson_interval(self.top1_agreement, self.top1_probes)

    def to_dict(self) -> dict[str, Any]:
        out = self.figures()
        if self.top1_ci95 is not None:
            out["top1_ci95"] = list(self.top1_ci95)
        if self.family or self.families:
            out.update(family=self.family, error_family=self.error_family)
            out["families"] = {f.family: f.figures() for f in self.families}
        if self.error_output:
            out["error_output"] = self.error_output
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Fidelity:
        base = {f.name: doc[f.name] for f in fields(cls) if f.name not in _FAMILY_FIELDS}
        families = tuple(cls(**figures, family=name) for name, figures in (doc.get("families") or {}).items())
        return cls(**base, family=str(doc.get("family", "")), error_family=str(doc.get("error_family", "")),
                   families=families, error_output=str(doc.get("error_output", "")))  # fmt: skip


_FAMILY_FIELDS = ("family", "error_family", "families", "error_output")


def wilson_interval(fraction: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``fraction`` observed on ``n`` trials (``z`` = 1.96: 95 %);
    unlike ``p ± z·sqrt(p(1 − p)/n)`` it stays within [0, 1] and is not empty at 100 %."""
    denom = 1.0 + z * z / n
    centre = (fraction + z * z / (2 * n)) / denom
    half = z * np.sqrt(fraction * (1.0 - fraction) / n + z * z / (4 * n * n)) / denom
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def top1_text(f: Fidelity) -> str:
    """``top-1 agreement 85.9 % (95 % CI 75–93 %)``, or "" without a top-1 figure."""
    if f.top1_agreement is None:
        return ""
    ci = f.top1_ci95
    interval = f" (95 % CI {ci[0]:.0%}–{ci[1]:.0%})" if ci is not None else ""
    return f"top-1 agreement {f.top1_agreement:.1%}{interval}"


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Compare one output, stacked: shape (probes, ...)."""
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


def compare_all(reference: Outputs | np.ndarray, candidate: Outputs | np.ndarray) -> Fidelity:
    """Compare every output of ``reference`` with the same-named one of ``candidate`` (:func:`compare_outputs`
    each): the worst relative error, cosine and max abs error over them, the top-1 agreement of the first output
    that has classes; ``error_output`` names the output of the worst relative error (several outputs only)."""
    ref, cand = _as_outputs(reference), _as_outputs(candidate)
    if list(ref) != list(cand):
        raise ValueError(f"compared outputs differ: {list(ref)} vs {list(cand)}")
    each = {name: compare_outputs(ref[name], cand[name]) for name in ref}
    if len(each) == 1:
        return next(iter(each.values()))
    worst = max(each, key=lambda name: each[name].relative_error)
    return replace(
        each[worst],
        cosine=min(f.cosine for f in each.values()),
        max_abs_error=max(f.max_abs_error for f in each.values()),
        top1_agreement=next((f.top1_agreement for f in each.values() if f.top1_agreement is not None), None),
        error_output=worst,
    )


def _as_outputs(outputs: Outputs | np.ndarray) -> Outputs:
    return {"output": outputs} if isinstance(outputs, np.ndarray) else outputs


# probes per family: 64 keeps the binomial standard error of a top-1 agreement near 80 % at 5 points (7 at 32;
# benchmarks/results/fidelity_estimate.md); the Gaussian family, where it only bounds the error (a structured
# family applies), runs 32: a relative error over 32 probes is already steady
PROBES_PER_FAMILY = 64
GAUSSIAN_BOUND_PROBES = 32


def estimate_fidelity(
    model: onnx.ModelProto,
    run_reference: RunFn,
    run_candidate: RunFn,
    probes: int = PROBES_PER_FAMILY,
    seed: int = 1,
) -> Fidelity:
    """The data-free fidelity estimate: both runs on ``probes`` seeded inputs of every probe family that
    applies to the model (:func:`rexdeploy.probes.applicable_families`; the Gaussian family at most
    :data:`GAUSSIAN_BOUND_PROBES` when another applies), every float output compared per family
    (:func:`compare_all`), and the worst of each figure over the families (every family's own figures in
    ``families``).

    The relative error, max abs error and cosine are the worst over all families. The top-1 agreement is
    the lowest over the structured families (BN-matched, natural-like images, tokens) where one applies and
    over the Gaussian family only when none does: N(0, 1) pixels are no image, and a classifier's own top-1
    on them is degenerate both ways (100 % agreement on a ResNet-style net that kept 49 % of natural images,
    issue 15; 12–25 % on MobileNetV2 against 79–90 %, benchmarks/results/fidelity_estimate.md)."""
    from rexdeploy.probes import GAUSSIAN, applicable_families, family_inputs

    families = applicable_families(model)
    per_family = []
    for family in families:
        count = min(probes, GAUSSIAN_BOUND_PROBES) if family == GAUSSIAN and len(families) > 1 else probes
        feeds = family_inputs(model, family, count, seed)
        measured = compare_all(run_reference(feeds), run_candidate(feeds))
        per_family.append(replace(measured, family=family))
    error_worst = max(per_family, key=lambda f: f.relative_error)
    structured = [f for f in per_family if f.family != GAUSSIAN] or per_family
    with_top1 = [f for f in structured if f.top1_agreement is not None]
    top1_worst = min(with_top1, key=lambda f: (f.top1_agreement, -f.relative_error)) if with_top1 else error_worst
    return Fidelity(
        probes=probes,
        relative_error=error_worst.relative_error,
        cosine=min(f.cosine for f in per_family),
        max_abs_error=max(f.max_abs_error for f in per_family),
        top1_agreement=top1_worst.top1_agreement,
        family=top1_worst.family,
        error_family=error_worst.family,
        families=tuple(per_family),
        error_output=error_worst.error_output,
    )


def compared_outputs(outputs: Sequence[np.ndarray], names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The outputs fidelity is measured on, by name (``names``: the model's output names, in order; else
    ``output N``): every floating-point one (a model whose first output is an integer ArgMax label has its logits
    compared; a detector its scores and its boxes), else the first."""
    named = {(names[i] if i < len(names) else f"output {i}"): np.asarray(o) for i, o in enumerate(outputs)}
    floats = {k: v for k, v in named.items() if np.issubdtype(v.dtype, np.floating)}
    return floats or dict([next(iter(named.items()))])


def stacked_outputs(run_one: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], feeds: Mapping[str, np.ndarray],
                    names: Sequence[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """``run_one`` on each probe of ``feeds`` in turn (engines are built for batch 1), the compared outputs
    (:func:`compared_outputs`) of all probes stacked."""
    n = next(iter(feeds.values())).shape[0]
    runs = [compared_outputs(run_one({k: v[i : i + 1] for k, v in feeds.items()}), names) for i in range(n)]
    return {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def measure_fidelity(
    builder: Builder,
    reference: Engine,
    candidate: Engine,
    model: onnx.ModelProto,
    probes: int = PROBES_PER_FAMILY,
    seed: int = 1,
    reference_outputs: dict[str, Outputs] | None = None,
) -> Fidelity:
    """The data-free estimate (:func:`estimate_fidelity`) of two engines: each runs the probes one at a time
    (engines are built for batch 1); ``probes`` per family (the Gaussian family: at most 32 where another
    family applies). ``reference_outputs``: a dict the reference engine's outputs are kept in, by a digest of
    the probes, so that a build estimating several engines against the same FP32 engine runs it once."""

    names = output_names(model)

    def runner(engine: Engine, keep: dict[str, Outputs] | None = None) -> RunFn:
        def run(feeds: Mapping[str, np.ndarray]) -> Outputs:
            key = _digest(feeds) if keep is not None else ""
            if keep is not None and key in keep:
                return keep[key]
            out = stacked_outputs(lambda f: builder.run(engine, f), feeds, names)
            if keep is not None:
                keep[key] = out
            return out

        return run

    return estimate_fidelity(model, runner(reference, reference_outputs), runner(candidate), probes, seed)


def _digest(feeds: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        h.update(f"{name}:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def measure_fidelity_on(
    builder: Builder, reference: Engine, candidate: Engine, samples: dict[str, np.ndarray], names: Sequence[str] = ()
) -> Fidelity:
    """Both engines on the user's samples (one at a time: engines are built for batch 1), every float output
    compared (:func:`compare_all`; ``names``: the model's output names; :func:`rexdeploy.samples.load_samples`
    makes ``samples``)."""
    return compare_all(stacked_outputs(lambda f: builder.run(reference, f), samples, names),
                       stacked_outputs(lambda f: builder.run(candidate, f), samples, names))  # fmt: skip


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

    family = f", probe families {estimate.family} / {estimate.error_family}" if estimate.family else ""
    return (f"fidelity on your {samples.probes} samples ({text(samples)}) differs from the data-free estimate "
            f"({text(estimate)}{family}): trust the samples")  # fmt: skip
