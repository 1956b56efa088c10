"""Calibrate a profile's latency cost model on this machine and keep the raw points and the fit.

Run: ``python benchmarks/bench_calibration.py [--profile auto] [--wait-load 1.0] [--write-profile]``.
Runs :func:`rexdeploy.calibrate.calibrate` (the same grid as ``rexdeploy profile calibrate``) and writes
``benchmarks/results/calibration_<profile>.{json,md}``: every micro-benchmark measured vs predicted,
the fitted coefficients, the fit quality, the wall time and the load average around the run.
``--wait-load X`` first waits (up to 30 min) until the 1-minute load average is below X, because
this 2-core machine is shared and other jobs inflate every time. ``--write-profile`` writes the
fitted ``[cost]`` into the shipped ``rexdeploy/profiles/<profile>.toml``, keeping its other lines
and comments, with a comment giving the date and the fit quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rexdeploy.calibrate import CalibrationReport, calibrate
from rexdeploy.fileio import write_text_atomic
from rexdeploy.profile import CostModel, Profile, load_profile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cost_section(cost: CostModel, report: CalibrationReport) -> str:
    """The ``[cost]`` tables as TOML, headed by a comment on when and how well they were fitted."""
    doc = Profile(name="x", engine="openvino", device="CPU", cost=cost).to_toml()
    body = doc[doc.index("[cost]") :]
    version = report.engine_version.split("-")[0]
    comment = (
        f"# Calibrated on this machine by `rexdeploy profile calibrate` on {report.date} ({report.engine} "
        f"{version}, {report.wall_s:.0f} s,\n# load average {report.loadavg_start[0]:.2f} → "
        f"{report.loadavg_end[0]:.2f}): {report.quality_line()}.\n"
        f"# Raw points: benchmarks/results/calibration_{report.profile}.md\n"
    )
    return comment + body


def replace_cost(text: str, section: str) -> str:
    """``text`` with everything from its ``[cost]`` line on replaced by ``section`` ([cost] comes last)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "[cost]")
    while start > 0 and lines[start - 1].startswith(("# Calibrated on this machine", "# load average", "# Raw points")):
        start -= 1  # the comment a previous run wrote
    return "".join(lines[:start]) + section


def wait_for_load(limit: float, timeout_s: float = 1800.0) -> None:
    t0 = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - t0 < timeout_s:
        time.sleep(10.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--budget", type=float, default=150.0, help="time budget in seconds (default 150)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--write-profile", action="store_true", help="update the shipped profile's [cost]")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    if args.wait_load is not None:
        wait_for_load(args.wait_load)

    def progress(done: int, total: int, label: str) -> None:
        print(f"\r[{done}/{total}] {label:<60}", end="", file=sys.stderr, flush=True)

    fitted, report = calibrate(profile, progress=progress, budget_s=args.budget)
    print(file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"calibration_{profile.name}.json", report.to_json() + "\n")
    write_text_atomic(RESULTS / f"calibration_{profile.name}.md", report.to_markdown())
    if args.write_profile:
        path = ROOT / "rexdeploy" / "profiles" / f"{profile.name}.toml"
        write_text_atomic(path, replace_cost(path.read_text(encoding="utf-8"), cost_section(fitted.cost, report)))
        if load_profile(path) != fitted:
            raise SystemExit(f"{path} does not load back as the fitted profile")
    print("\n".join(report.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
