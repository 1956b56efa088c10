"""Deploy an ONNX model on an edge device with rexdeploy's Python API: a script to copy and adapt.

    python examples/edge_deploy.py                         # the demo model, the CPU profile of this host
    python examples/edge_deploy.py model.onnx --profile orin --budget-ms 5 --out deploy/

On a machine with the profile's engine it plans for the budget, builds and times the REx engine next to the
FP32 engine and prints both. Where the engine is not installed (planning on a laptop for a Jetson, say) it plans,
writes the engine-ready ONNX and plan.json, and prints what to install and run on the target. Exit status 0 on
success, 1 on any rexdeploy error (the message says what to do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

import rexdeploy
from rexdeploy.api import (
    plan as plan_model,  # `rexdeploy.plans` is shadowed by the rexdeploy.plans module once imported
)

DEMO_MODEL = Path(rexdeploy.__file__).parent / "demo" / "digits_cnn.onnx"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("model", nargs="?", default=str(DEMO_MODEL), help="FP32 ONNX model (default: the bundled demo)")
    p.add_argument("--profile", default="auto", help="profile name or .toml (default auto: this host's CPU)")
    p.add_argument("--budget-ms", type=float, default=2.0, help="latency budget in milliseconds (default 2)")
    p.add_argument("--out", default="edge-deploy-out", help="output directory (default edge-deploy-out)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds to time each engine (default 1)")
    return p.parse_args(argv)


def build_here(args: argparse.Namespace, profile: rexdeploy.Profile) -> None:
    timing = rexdeploy.TimingSettings(warmup_s=min(0.2, args.duration), duration_s=args.duration)
    report = rexdeploy.build(args.model, profile, budget_ms=args.budget_ms, out_dir=args.out, timing=timing)
    rex, fp32 = report.rex.timing, report.baselines["fp32"].timing
    print(f"profile  {profile.name} ({profile.engine} on {profile.device})")
    print(f"plan     {report.plan_text}")
    print(
        f"latency  REx {rex.median_ms:.4f} ms vs FP32 {fp32.median_ms:.4f} ms (median; REx/FP32 = {report.ratio_to('fp32'):.2f}x)"
    )
    print(f"budget   {args.budget_ms:g} ms: {'met' if report.fits_budget else 'NOT met'}")
    print(f"fidelity relative error {report.fidelity.relative_error:.2e}, cosine {report.fidelity.cosine:.6f}")
    print(f"out      {report.out_dir}")


def plan_for_target(args: argparse.Namespace, profile: rexdeploy.Profile, why: rexdeploy.RexError) -> None:
    """The engine is missing here: plan and expand now, build on the target."""
    print(f"engine   {profile.engine} not installed here: {why}")
    result = plan_model(args.model, profile, args.budget_ms)
    plan = result.plan
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.layers:
        model = rexdeploy.load_model(args.model)
        expanded = rexdeploy.expand_model(model, plan, profile=profile, model_sha256=plan.model_sha256)
        onnx.save(expanded.model, str(out / "expanded.onnx"))
    else:  # the FP32 model already fits: it is exact
        onnx.save(rexdeploy.load_model(args.model), str(out / "expanded.onnx"))
    (out / "plan.json").write_text(plan.to_json() + "\n", encoding="utf-8")
    summary = plan.summary() if plan.layers else "FP32 (fits the budget as is)"
    print(f"profile  {profile.name} ({profile.engine} on {profile.device})")
    print(f"plan     {summary}: predicted {result.chosen.predicted_latency_ms:.4f} ms")
    print(f"wrote    {out / 'expanded.onnx'} and {out / 'plan.json'}")
    print(f"on the target: pip install 'rexdeploy[{profile.engine}]'")
    print(f"          then: rexdeploy bench {out / 'expanded.onnx'} --profile {profile.name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = rexdeploy.load_profile(args.profile)
        try:
            build_here(args, profile)
        except rexdeploy.EngineUnavailableError as exc:
            plan_for_target(args, profile, exc)
    except rexdeploy.RexError as exc:
        print(f"edge_deploy: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
