"""``rexdeploy`` entry point: parse, dispatch to one subcommand module, turn RexErrors into exit 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rexdeploy import __version__
from rexdeploy.cli import bench_cmd, build_cmd, common, expand_cmd, export_cmd, inspect_cmd, plan_cmd, profile_cmd
from rexdeploy.errors import RexError

SUBCOMMANDS = (build_cmd, plan_cmd, expand_cmd, inspect_cmd, bench_cmd, profile_cmd, export_cmd)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexdeploy",
        description="Deploy trained networks as fast quantized engines without training data "
        "(REx: data-free residual quantization error expansion).",
    )
    parser.add_argument("--version", action="version", version=f"rexdeploy {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (results still print)")
    noise.add_argument("-v", "--verbose", action="store_true", help="also print the library's debug log on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    common.set_verbosity(args.quiet, args.verbose)
    try:
        return int(args.func(args))
    except RexError as exc:
        print(f"rexdeploy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rexdeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
