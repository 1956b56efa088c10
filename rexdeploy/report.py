"""The build report: chosen plan, measured latencies next to the baselines, fidelity. JSON + Markdown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rexdeploy.budget import format_ms
from rexdeploy.builders.timing import Timing
from rexdeploy.fidelity import Fidelity
from rexdeploy.plan import Plan


@dataclass(frozen=True)
class EngineResult:
    """One engine built and timed in the run (the REx engine or a baseline)."""

    label: str
    timing: Timing
    build_seconds: float
    artifacts: tuple[str, ...]  # paths relative to the output directory
    backend_version: str = ""
    precisions: dict[str, dict[str, int]] = field(default_factory=dict)  # layer type → precision → count

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "timing": self.timing.to_dict(),
            "build_seconds": self.build_seconds,
            "artifacts": list(self.artifacts),
            "backend_version": self.backend_version,
            "precisions": self.precisions,
        }


@dataclass(frozen=True)
class Report:
    model: str
    model_sha256: str
    profile: str
    engine: str
    device: str
    budget_ms: float | None
    plan: Plan
    rex: EngineResult
    baselines: dict[str, EngineResult]
    fidelity: Fidelity
    expand_seconds: float
    out_dir: str
    warnings: tuple[str, ...] = ()

    @property
    def fits_budget(self) -> bool | None:
        return None if self.budget_ms is None else self.rex.timing.median_ms <= self.budget_ms

    def ratio_to(self, baseline: str) -> float | None:
        base = self.baselines.get(baseline)
        return None if base is None else self.rex.timing.median_ms / base.timing.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "profile": self.profile,
            "engine": self.engine,
            "device": self.device,
            "budget_ms": self.budget_ms,
            "fits_budget": self.fits_budget,
            "plan_summary": self.plan.summary(),
            "plan_hash": self.plan.hash,
            "plan": self.plan.to_dict(),
            "rex": self.rex.to_dict(),
            "baselines": {k: v.to_dict() for k, v in self.baselines.items()},
            "ratios": {f"rex_vs_{k}": self.ratio_to(k) for k in self.baselines},
            "fidelity": self.fidelity.to_dict(),
            "expand_seconds": self.expand_seconds,
            "out_dir": self.out_dir,
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary_lines(self) -> list[str]:
        """A short human summary (the CLI prints it on stderr)."""
        t = self.rex.timing
        lines = [f"model    {self.model}  ({self.profile}: {self.engine} on {self.device})"]
        lines.append(f"plan     {self.plan.summary()}  [{self.plan.hash[:12]}]")
        lines.append(
            f"REx      median {format_ms(t.median_ms)}  p99 {format_ms(t.p99_ms)}  ({t.runs} runs, CoV {t.cov:.1%})"
        )
        for name, base in self.baselines.items():
            ratio = self.ratio_to(name)
            lines.append(
                f"{name:<8} median {format_ms(base.timing.median_ms)}  p99 {format_ms(base.timing.p99_ms)}"
                f"  → REx/{name} = {ratio:.2f}x"
            )
        f = self.fidelity
        top1 = f"  top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
        lines.append(f"fidelity rel. error {f.relative_error:.2e}  cosine {f.cosine:.6f}{top1}  ({f.probes} probes)")
        if self.budget_ms is not None:
            verdict = "within" if self.fits_budget else "OVER"
            lines.append(f"budget   {format_ms(self.budget_ms)}: {verdict} budget")
        noisy = [n for n, e in [("REx", self.rex), *self.baselines.items()] if e.timing.noisy]
        if noisy:
            lines.append(f"warning  timing CoV above 5 % for {', '.join(noisy)}: the machine is noisy")
        lines += [f"warning  {w}" for w in self.warnings]
        lines.append(f"out      {self.out_dir}")
        return lines

    def to_markdown(self) -> str:
        rows = [("REx", self.rex), *self.baselines.items()]
        out = [
            f"# rexdeploy build report: {self.model}",
            "",
            f"- profile: `{self.profile}` ({self.engine} on {self.device})",
            f"- plan: {self.plan.summary()} (hash `{self.plan.hash[:12]}`)",
            f"- budget: {format_ms(self.budget_ms) if self.budget_ms else 'none'}"
            + ("" if self.fits_budget is None else f" — {'met' if self.fits_budget else 'missed'}"),
            f"- expansion pass: {self.expand_seconds:.3f} s",
            "",
            "| engine | median | mean | p90 | p99 | CoV | runs | ratio to FP32 | build s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fp32 = self.baselines.get("fp32")
        for name, e in rows:
            t = e.timing
            ratio = f"{t.median_ms / fp32.timing.median_ms:.2f}" if fp32 else "-"
            out.append(
                f"| {name} | {format_ms(t.median_ms)} | {format_ms(t.mean_ms)} | {format_ms(t.p90_ms)} | "
                f"{format_ms(t.p99_ms)} | {t.cov:.1%} | {t.runs} | {ratio} | {e.build_seconds:.2f} |"
            )
        f = self.fidelity
        out += [
            "",
            f"Fidelity vs FP32 on {f.probes} synthetic probes: relative error {f.relative_error:.3e}, "
            f"cosine {f.cosine:.6f}, max abs error {f.max_abs_error:.3e}"
            + (f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else "")
            + ".",
        ]
        if self.rex.precisions:
            out += ["", "Runtime precisions of the REx engine (layer type: precision × count):", ""]
            for layer_type, per in sorted(self.rex.precisions.items()):
                out.append(f"- {layer_type}: " + ", ".join(f"{p} × {n}" for p, n in sorted(per.items())))
        return "\n".join(out) + "\n"
