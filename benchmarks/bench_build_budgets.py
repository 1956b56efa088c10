"""``rexdeploy build --budget-ratio r`` end to end on real models: does it succeed, first time, on this host?

Run: ``python benchmarks/bench_build_budgets.py [--models ...] [--ratios 1.0 1.2 1.5 2.0]``.

For each model (those of ``bench_latency_model.py``: the demo CNN, torchvision MobileNetV2, a ResNet-style
CNN, a transformer-MLP stack) and each ratio r, :func:`rexdeploy.closedloop.build` runs as the CLI does
(budget = r × the plain int8 engine measured in the same run). The first build of a model starts from an
empty cache (engines and cost table), so it probes; later ratios reuse the model's cost table. Recorded:
success (exit 0), whether the first attempt met the budget, the engine returned and why, the wall time of
the build and of its planning, and whether the table was probed or cached. Results:
``benchmarks/results/build_budgets.{json,md}``, with the host's CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency_model import MODELS, machine_info, wait_for_quiet

from rexdeploy.builders.base import TimingSettings
from rexdeploy.closedloop import build
from rexdeploy.errors import RexError
from rexdeploy.graph import save_model
from rexdeploy.hostcpu import host_profile_name
from rexdeploy.profile import load_profile

RESULTS = Path(__file__).resolve().parent / "results"


def run_model(key: str, ratios: list[float], profile_name: str, work: Path, duration_s: float,
              wait_load: float) -> list[dict[str, Any]]:  # fmt: skip
    model = MODELS[key][1]()
    path = save_model(model, work / f"{key}.onnx", check=False)
    rows = []
    for r in ratios:
        wait_for_quiet(wait_load)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"model": key, "ratio": r, "load_before": os.getloadavg()[0]}
        try:
            report = build(path, load_profile(profile_name), budget_ratio=r, out_dir=work / f"{key}-{r:g}",
                           timing=TimingSettings(warmup_s=0.2, duration_s=duration_s))  # fmt: skip
        except RexError as exc:
            row.update(ok=False, error=str(exc), wall_s=time.perf_counter() - t0)
            rows.append(row)
            print(f"{key} r={r:g}: FAILED {exc}", flush=True)
            continue
        lm = report.latency_model
        first = report.attempts[0] if report.attempts else None
        row.update(
            ok=True,
            wall_s=time.perf_counter() - t0,
            budget_ms=report.budget_ms,
            measured_ms=report.rex.timing.median_ms,
            fits=report.fits_budget,
            fp32_ms=report.baselines["fp32"].timing.median_ms,
            int8_ms=report.baselines["int8"].timing.median_ms,
            attempts=[a.to_dict() for a in report.attempts],
            # no attempt: an engine measured in the run (a baseline or probe) fit and was at least as accurate as
            # anything the planner predicted, so nothing was built — the first answer met the budget
            first_attempt_within=first is None or first.measured_ms <= (report.budget_ms or 0.0),
            first_attempt_error=(first.predicted_ms / first.measured_ms - 1.0) if first else None,
            chosen=report.plan_text,
            choice=report.choice,
            cached=lm.get("cached"),
            probe_s=lm.get("probe_seconds"),
            planning_s=lm.get("planning_s"),
            rel_error=report.fidelity.relative_error,
        )
        rows.append(row)
        how = (f"first attempt {'within' if row['first_attempt_within'] else 'OVER'} (pred {first.predicted_ms:.3f} ms)"
               if first else "no build needed")  # fmt: skip
        print(f"{key} r={r:g}: {report.plan_text}: {row['measured_ms']:.3f} ms / budget {row['budget_ms']:.3f} ms, "
              f"{how}, wall {row['wall_s']:.1f} s, planning {row['planning_s'] or 0:.1f} s, "
              f"{'cached' if row['cached'] else 'probed'}", flush=True)  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# `rexdeploy build --budget-ratio r` on real models",
        "",
        f"`{result['command']}` — profile `{result['profile']}`, OpenVINO {m['openvino']}, host {m['cpu']} "
        f"({m['cpu_count']} cores; flags: {m.get('flags', '?')}), {m['date']}. Budget = r × the plain int8 engine "
        f"measured in the same run; timing {result['duration_s']:g} s per engine. The first build of each model "
        "probes (empty cache); later ones reuse its cost table.",
        "",
        f"Succeeded: **{result['summary']['succeeded']}/{result['summary']['runs']}**; first attempt within budget "
        "(or no attempt needed: an engine measured in the run fit and was at least as accurate): "
        f"**{result['summary']['first_within']}/{result['summary']['runs']}**.",
        "",
        "| model | r | budget | returned | measured | first attempt pred / meas | wall s | planning s | table |",
        "|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for row in result["rows"]:
        if not row["ok"]:
            lines.append(f"| {row['model']} | {row['ratio']:g} | | FAILED: {row['error']} | | | {row['wall_s']:.1f} | | |")
            continue
        a = row["attempts"][0] if row["attempts"] else None
        first = f"{a['predicted_ms']:.3f} / {a['measured_ms']:.3f} ms" if a else "none built (a measured engine sufficed)"
        lines.append(f"| {row['model']} | {row['ratio']:g} | {row['budget_ms']:.3f} ms | {row['chosen']} | "
                     f"{row['measured_ms']:.3f} ms | {first} | {row['wall_s']:.1f} | {row['planning_s'] or 0:.1f} | "
                     f"{'cached' if row['cached'] else 'probed'} |")  # fmt: skip
    if result.get("conclusion"):
        lines += ["", result["conclusion"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratios", nargs="*", type=float, default=[1.0, 1.2, 1.5, 2.0])
    parser.add_argument("--profile", default=None, help="default: the host's (--profile auto)")
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--wait-load", type=float, default=2.5)
    parser.add_argument("--name", default="build_budgets")
    parser.add_argument("--conclusion", default="")
    args = parser.parse_args()
    profile = args.profile or host_profile_name()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rexdeploy-budgets-") as tmp:
        os.environ["REXDEPLOY_CACHE"] = str(Path(tmp) / "cache")  # start from an empty cache
        for key in args.models:
            rows += run_model(key, args.ratios, profile, Path(tmp), args.duration_s, args.wait_load)
    result = {
        "command": "python benchmarks/bench_build_budgets.py " + " ".join(sys.argv[1:]),
        "profile": profile,
        "duration_s": args.duration_s,
        "rows": rows,
        "summary": {"runs": len(rows), "succeeded": sum(r["ok"] for r in rows),
                    "first_within": sum(bool(r.get("first_attempt_within")) for r in rows)},
        "machine": machine_info(),
        "conclusion": args.conclusion,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
