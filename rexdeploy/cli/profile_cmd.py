"""``rexdeploy profile list | show NAME``."""

from __future__ import annotations

import argparse
import json

from rexdeploy.profile import list_profiles, load_profile


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="list or show hardware profiles")
    psub = p.add_subparsers(dest="profile_command", metavar="ACTION")
    psub.required = True
    lst = psub.add_parser("list", help="list the shipped profiles")
    lst.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    lst.set_defaults(func=run_list)
    show = psub.add_parser("show", help="print a profile (shipped name or .toml path) as TOML")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=run_show)


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
