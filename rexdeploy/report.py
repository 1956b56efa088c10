"""The build report: chosen plan, measured latencies next to the baselines, fidelity. JSON + Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rexdeploy.budget import format_ms
from rexdeploy.builders.timing import Timing
from rexdeploy.fidelity import Fidelity, top1_text
from rexdeploy.plans import Plan


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
class Attempt:
    """One round of the closed loop: what was built, predicted and measured."""

    attempt: int
    name: str  # the engine's folder / onnx name in the output directory
    plan_summary: str
    predicted_ms: float
    measured_ms: float
    latency_scale: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    attempts: tuple[Attempt, ...] = ()
    front: tuple[dict[str, Any], ...] = ()  # the planner's explored Pareto front (predicted)
    choice: str = ""  # why this engine was returned
    fidelity_samples: Fidelity | None = None  # on the user's --samples (measured), beside the synthetic estimate
    latency_model: dict[str, Any] = field(default_factory=dict)  # where the planner's latencies came from
    self_check: dict[str, Any] = field(default_factory=dict)  # the returned engine vs onnxruntime on its ONNX
    bare_load: dict[str, Any] = field(default_factory=dict)  # the IR compiled with no options, where that differs
    reference_fidelity: Fidelity | None = None  # the user's own engine (--relative-to PATH) on the same probes
    reference_fidelity_samples: Fidelity | None = None  # ... and on the user's --samples
    threads: dict[str, Any] = field(default_factory=dict)  # the inference threads measured and kept (runtime_threads)

    def with_warning(self, warning: str) -> Report:
        return replace(self, warnings=(*self.warnings, warning))

    @property
    def plan_text(self) -> str:
        if self.plan.layers:
            return self.plan.summary()
        floats = [n for n in self.plan.notes if n.startswith("float engine in")]
        return floats[0] if floats else "FP32 (no layer quantized: the exact engine fits)"

    @property
    def fits_budget(self) -> bool | None:
        return None if self.budget_ms is None else self.rex.timing.median_ms <= self.budget_ms

    def ratio_to(self, baseline: str) -> float | None:
        base = self.baselines.get(baseline)
        return None if base is None else self.rex.timing.median_ms / base.timing.median_ms

    @property
    def fastest_float(self) -> str | None:
        """The fastest float baseline (FP32, or the device's default float precision where it is faster): what a
        user who does not quantize would run; REx is quoted against it."""
        floats = [k for k in self.baselines if k not in ("int8", "reference")]
        return min(floats, key=lambda k: self.baselines[k].timing.median_ms) if floats else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "profile": self.profile,
            "engine": self.engine,
            "device": self.device,
            "budget_ms": self.budget_ms,
            "fits_budget": self.fits_budget,
            "plan_summary": self.plan_text,
            "plan_hash": self.plan.hash,
            "plan": self.plan.to_dict(),
            "rex": self.rex.to_dict(),
            "baselines": {k: v.to_dict() for k, v in self.baselines.items()},
            "ratios": {f"rex_vs_{k}": self.ratio_to(k) for k in self.baselines}
            | ({"rex_vs_fastest_float": self.ratio_to(self.fastest_float)} if self.fastest_float else {}),
            "fastest_float": self.fastest_float,
            "fidelity": self.fidelity_dict(),
            "expand_seconds": self.expand_seconds,
            "out_dir": self.out_dir,
            "warnings": list(self.warnings),
            "attempts": [a.to_dict() for a in self.attempts],
            "pareto_front": list(self.front),
            "choice": self.choice,
            "latency_model": self.latency_model,
            "self_check": self.self_check,
            "bare_load": self.bare_load,
            "reference": self.reference_dict(),
            "threads": self.threads,
        }

    def reference_dict(self) -> dict[str, Any] | None:
        """``reference`` in report.json: the user's own engine the budget was relative to (``--relative-to PATH``),
        its label and fidelity vs FP32 on the same synthetic probes as the REx engine (``estimate``) and on the
        user's samples (``samples``); None without one."""
        base = self.baselines.get("reference")
        if base is None:
            return None
        return {
            "label": base.label,
            "median_ms": base.timing.median_ms,
            "rex_vs_reference": self.ratio_to("reference"),
            "fidelity": {
                "estimate": self.reference_fidelity.to_dict() if self.reference_fidelity else None,
                "samples": self.reference_fidelity_samples.to_dict() if self.reference_fidelity_samples else None,
            },
        }

    def reference_lines(self) -> list[str]:
        """REx beside the user's own engine, in the same run: latency ratio and fidelity on the same inputs."""
        base = self.baselines.get("reference")
        if base is None:
            return []
        lines = [f"vs {base.label}: REx runs {self.ratio_to('reference'):.2f}x its latency (same interleaved rounds)"]
        for what, mine, theirs in (("the probes (estimate)", self.fidelity, self.reference_fidelity),
                                   ("your samples", self.fidelity_samples, self.reference_fidelity_samples)):  # fmt: skip
            if mine is None or theirs is None:
                continue
            top1 = (f", top-1 agreement {mine.top1_agreement:.1%} vs {theirs.top1_agreement:.1%}"
                    if mine.top1_agreement is not None and theirs.top1_agreement is not None else "")  # fmt: skip
            lines.append(f"on {what}: rel. error vs FP32 {mine.relative_error:.2e} (REx) vs {theirs.relative_error:.2e} "
                         f"(yours){top1}")  # fmt: skip
        return lines

    def fidelity_dict(self) -> dict[str, Any]:
        """``fidelity`` in report.json: ``estimate`` (the data-free estimate: the worst figure over the probe
        families, ``family`` / ``error_family`` naming where the top-1 / the error comes from, and
        ``families``), ``samples`` (measured on the user's --samples, or None), and the estimate's figures
        at the top level as well (for scripts written before the families)."""
        f = self.fidelity
        return {
            **f.figures(),
            "source": "synthetic probes (an estimate)",
            "estimate": f.to_dict(),
            "samples": self.fidelity_samples.to_dict() if self.fidelity_samples else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary_lines(self) -> list[str]:
        """A short human summary (the CLI prints it on stderr)."""
        t = self.rex.timing
        lines = [f"model    {self.model}  ({self.profile}: {self.engine} on {self.device})"]
        if self.latency_model:
            lines.append(f"latency  {self.latency_model.get('summary', '')}")
        if self.threads:
            lines.append(f"threads  {self.threads['summary']}")
        lines.append(f"plan     {self.plan_text}  [{self.plan.hash[:12]}]")
        for a in self.attempts:
            lines.append(
                f"attempt  {a.attempt}: {a.plan_summary}: predicted {format_ms(a.predicted_ms)}, "
                f"measured {format_ms(a.measured_ms)}"
            )
        lines.append(
            f"REx      median {format_ms(t.median_ms)}  p99 {format_ms(t.p99_ms)}  ({t.runs} runs, CoV {t.cov:.1%})"
        )
        for name, base in self.baselines.items():
            ratio = self.ratio_to(name)
            fastest = "  (the fastest float engine)" if name == self.fastest_float and len(self.baselines) > 1 else ""
            lines.append(
                f"{name:<8} median {format_ms(base.timing.median_ms)}  p99 {format_ms(base.timing.p99_ms)}"
                f"  → REx/{name} = {ratio:.2f}x{fastest}"
            )
        lines += _estimate_console(self.fidelity)
        if self.fidelity_samples is not None:
            fs = self.fidelity_samples
            top1s = f"  {top1_text(fs)}" if fs.top1_agreement is not None else ""
            of = f", worst output {fs.error_output}" if fs.error_output else ""
            lines.append(f"samples  rel. error {fs.relative_error:.2e}  cosine {fs.cosine:.6f}{top1s}  ({fs.probes} of "
                         f"your samples: measured{of})")  # fmt: skip
        lines += [f"yours    {line}" for line in self.reference_lines()]
        if self.budget_ms is not None:
            verdict = "within" if self.fits_budget else "OVER"
            lines.append(f"budget   {format_ms(self.budget_ms)}: {verdict} budget")
        engines = self.latency_model.get("engines") or []
        if engines:
            lines.append(f"engines  measured in this run ({len(engines)}), fastest first:")
            for e in engines:
                mark = "  <- returned" if e["returned"] else ("" if e["allowed"] else "  (not allowed by the profile)")
                fits = "tie " if e.get("tie") else "fits" if e["fits"] else "over" if e.get("compared", True) else " -- "
                lines.append(f"         {format_ms(e['median_ms']):>9}  {fits}  error {e['predicted_error']:.2e}  "
                             f"{e['label']}: {e['plan']}{mark}")  # fmt: skip
        if self.choice:
            lines.append(f"chosen   {self.choice}")
        if self.self_check:
            lines.append(f"check    {self.self_check['text']}")
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
            f"- plan: {self.plan_text} (hash `{self.plan.hash[:12]}`)",
            f"- budget: {format_ms(self.budget_ms) if self.budget_ms else 'none'}"
            + ("" if self.fits_budget is None else f" — {'met' if self.fits_budget else 'missed'}"),
            f"- expansion pass: {self.expand_seconds:.3f} s",
            *([f"- chosen: {self.choice}"] if self.choice else []),
            *([f"- self-check: {self.self_check['text']}"] if self.self_check else []),
            *([f"- loaded with no options: {self.bare_load['text']}"] if self.bare_load.get("text") else []),
            *([f"- planner latencies: {self.latency_model.get('summary', '')}"] if self.latency_model else []),
            *([f"- inference threads: {self.threads['summary']}"] if self.threads else []),
            "",
            f"| engine | median | mean | p90 | p99 | CoV | runs | ratio to {self.fastest_float or 'FP32'} | build s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        ref = self.baselines.get(self.fastest_float or "fp32")
        for name, e in rows:
            t = e.timing
            ratio = f"{t.median_ms / ref.timing.median_ms:.2f}" if ref else "-"
            out.append(
                f"| {name} | {format_ms(t.median_ms)} | {format_ms(t.mean_ms)} | {format_ms(t.p90_ms)} | "
                f"{format_ms(t.p99_ms)} | {t.cov:.1%} | {t.runs} | {ratio} | {e.build_seconds:.2f} |"
            )
        engines = self.latency_model.get("engines") or []
        if engines:
            out += [
                "",
                "Every engine measured in this run (the build returns the most accurate one that fits):",
                "",
                "| engine | plan | median | fits | predicted error | |",
                "|---|---|---|---|---|---|",
            ]
            out += [
                f"| {e['label']} | {e['plan']} | {format_ms(e['median_ms'])} | {'yes' if e['fits'] else 'no'} | "
                f"{e['predicted_error']:.2e} | {'**returned**' if e['returned'] else ''} |"
                for e in engines
            ]
        out += ["", *_estimate_markdown(self.fidelity)]
        if self.fidelity_samples is not None:
            fs = self.fidelity_samples
            out += [
                "",
                f"Fidelity vs FP32 on {fs.probes} of your samples (measured): relative error "
                f"{fs.relative_error:.3e}, cosine {fs.cosine:.6f}, max abs error {fs.max_abs_error:.3e}"
                + (f", {top1_text(fs)}" if fs.top1_agreement is not None else "")
                + ".",
            ]
        if self.reference_lines():
            out += ["", *[f"- {line}" for line in self.reference_lines()]]
        if self.rex.precisions:
            out += ["", "Runtime precisions of the REx engine (layer type: precision × count):", ""]
            for layer_type, per in sorted(self.rex.precisions.items()):
                out.append(f"- {layer_type}: " + ", ".join(f"{p} × {n}" for p, n in sorted(per.items())))
        return "\n".join(out) + "\n"


def _families_text(f: Fidelity) -> str:
    """Where the estimate's figures come from, e.g. ``top-1 from natural-1/f, error from gaussian``."""
    of = f" (output {f.error_output})" if f.error_output else ""
    if not f.family:
        return "synthetic probes" + of
    if f.top1_agreement is None or f.family == f.error_family:
        return f"worst probe family {f.error_family or f.family}{of}"
    return f"top-1 from {f.family}, error from {f.error_family}{of}"


def _bound_only(estimate: Fidelity, family: Fidelity) -> str:
    """A note on the Gaussian family where a structured family gives the top-1 estimate."""
    if family.family == "gaussian" and estimate.family not in ("", "gaussian"):
        return " (bounds the error only: noise has no class, its top-1 is not counted)"
    return ""


def _probes_text(f: Fidelity) -> str:
    """``64 synthetic probes per family``, or per family where the counts differ (``64 bn-matched, 32 gaussian``)."""
    counts = {fam.family: fam.probes for fam in f.families} or {"": f.probes}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} synthetic probes per family"
    return "synthetic probes: " + ", ".join(f"{n} {name}" for name, n in counts.items())


def _estimate_console(f: Fidelity) -> list[str]:
    """The console lines of the data-free estimate: the worst figures, then each family's."""
    top1 = f"  {top1_text(f)}" if f.top1_agreement is not None else ""
    lines = [f"estimate rel. error {f.relative_error:.2e}  cosine {f.cosine:.6f}{top1}  (data-free estimate, "
             f"{_probes_text(f)}; {_families_text(f)})"]  # fmt: skip
    for fam in f.families:
        t = f"  top-1 {fam.top1_agreement:.1%}" if fam.top1_agreement is not None else ""
        lines.append(f"         estimate on {fam.family}: rel. error {fam.relative_error:.2e}{t}{_bound_only(f, fam)}")
    return lines


def _estimate_markdown(f: Fidelity) -> list[str]:
    """The Markdown of the data-free estimate: a sentence with the worst figures, a table of the families."""
    top1 = f", {top1_text(f)}" if f.top1_agreement is not None else ""
    out = [f"Fidelity vs FP32, **data-free estimate** ({_probes_text(f)}, no data; "
           f"{_families_text(f)}): relative error {f.relative_error:.3e}, cosine {f.cosine:.6f}, max abs error "
           f"{f.max_abs_error:.3e}{top1}. Real inputs can fare better or worse (docs/report.md, how far the estimate "
           "was from natural images): measure on your own with `--samples`."]  # fmt: skip
    if f.families:
        from rexdeploy.probes import FAMILY_TEXT

        out += ["", "| probe family (estimate) | probes | top-1 agreement | relative error | cosine |"]
        out.append("|---|---|---|---|---|")
        for fam in f.families:
            t = f"{fam.top1_agreement:.1%}" if fam.top1_agreement is not None else "-"
            out.append(f"| {fam.family}: {FAMILY_TEXT.get(fam.family, '')}{_bound_only(f, fam)} | {fam.probes} | {t} | "
                       f"{fam.relative_error:.3e} | {fam.cosine:.6f} |")  # fmt: skip
    return out


def write_pareto_png(path: Path, report: Report, planned: Any) -> Path | None:
    """Pareto plot: the planner's candidates and front (predicted), the measured chosen plan and baselines.
    Returns None when matplotlib is not installed (it is the ``report`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    cands = planned.candidates
    ax.scatter([c.predicted_latency_ms for c in cands], [max(c.predicted_error, 1e-7) for c in cands],
               s=10, c="0.7", label="candidates (predicted)")  # fmt: skip
    front = planned.front
    ax.plot([c.predicted_latency_ms for c in front], [max(c.predicted_error, 1e-7) for c in front],
            "-o", ms=3, color="tab:blue", label="Pareto front (predicted)")  # fmt: skip
    chosen = planned.chosen
    ax.scatter([report.rex.timing.median_ms], [max(chosen.predicted_error, 1e-7)], marker="*", s=160,
               color="tab:red", zorder=5, label="chosen plan (measured latency)")  # fmt: skip
    for name, base in report.baselines.items():
        ax.axvline(base.timing.median_ms, ls=":", color="tab:green" if name == "fp32" else "tab:orange",
                   label=f"{name} engine (measured)")  # fmt: skip
    if report.budget_ms is not None:
        ax.axvline(report.budget_ms, ls="--", color="black", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("relative output error (predicted)")
    ax.set_title(f"{Path(report.model).name} on {report.profile}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
