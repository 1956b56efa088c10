"""``rexdeploy profile list | show NAME | calibrate NAME [-o my.toml]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

from rexdeploy.cli import common
from rexdeploy.profile import list_profiles, load_profile


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="list, show or calibrate hardware profiles")
    psub = p.add_subparsers(dest="profile_command", metavar="ACTION")
    psub.required = True
    lst = psub.add_parser("list", help="list the shipped profiles")
    lst.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    lst.set_defaults(func=run_list)
    show = psub.add_parser("show", help="print a profile (shipped name or .toml path) as TOML")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=run_show)
    cal = psub.add_parser(
        "calibrate",
        help="fit a profile's latency cost model by micro-benchmarks on this device",
        description="Time small stacked Conv/Gemm graphs (FP32, int8 Q/DQ K=1, K=2 branches / concat / sparse, "
        "weight-only) with the profile's engine on this device, fit the [cost] coefficients, and write the "
        "calibrated profile as TOML.",
    )
    cal.add_argument("name", help="shipped profile name, auto (this host's CPU profile) or a .toml path")
    cal.add_argument("-o", "--output", help="calibrated profile to write (default NAME-calibrated.toml here)")
    cal.add_argument("--quick", action="store_true", help="a tiny grid (seconds; for tests, not for planning)")
    cal.add_argument(
        "--time-budget",
        type=common.duration,
        default=150.0,
        help="stop measuring after this long and fit what was measured (default 150s)",
    )
    cal.add_argument("--json", action="store_true", help="print the calibration report as one JSON document")
    cal.set_defaults(func=run_calibrate)


def run_list(args: argparse.Namespace) -> int:
    profiles = [load_profile(name) for name in list_profiles()]
    if args.json:
        print(
            json.dumps(
                [
                    {"name": p.name, "engine": p.engine, "device": p.device, "description": p.description}
                    for p in profiles
                ],
                indent=2,
            )
        )
        return 0
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        print(f"{p.name:<{width}}  {p.engine:<11}  {p.description}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    print(
        json.dumps(profile.to_dict(), indent=2) if args.json else profile.to_toml(), end="" if not args.json else "\n"
    )
    return 0


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int, str], None]]:
    """A progress callback drawing on stderr: a rich bar when rich is installed, else a ``\\r`` counter."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        width = [0]

        def counter(done: int, total: int, label: str) -> None:
            line = f"[{done}/{total}] {label}"
            sys.stderr.write("\r" + line.ljust(width[0]))
            sys.stderr.flush()
            width[0] = max(width[0], len(line))

        try:
            yield counter
        finally:
            if width[0]:
                sys.stderr.write("\n")
        return
    bar = Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        yield update


def run_calibrate(args: argparse.Namespace) -> int:
    from rexdeploy.calibrate import calibrate, calibrated_toml
    from rexdeploy.errors import ProfileError
    from rexdeploy.fileio import write_text_atomic
    from rexdeploy.profile import profile_from_dict

    profile = load_profile(args.name)
    out = Path(args.output) if args.output else Path(f"{profile.name}-calibrated.toml")
    with progress_bar() as progress:
        fitted, report = calibrate(profile, progress=progress, budget_s=args.time_budget, quick=args.quick)
    text = calibrated_toml(fitted, report)
    if profile_from_dict(tomllib.loads(text), str(out)) != fitted:  # pragma: no cover - a writer bug
        raise ProfileError(f"the calibrated profile does not read back equal from TOML; {out} not written")
    write_text_atomic(out, text)
    if args.json:
        print(json.dumps(report.to_dict() | {"output": str(out)}, indent=2))
    else:
        for line in report.summary_lines():
            common.stderr(line)
        common.stderr(f"wrote {out}")
    return 0
