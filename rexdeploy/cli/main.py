"""``rexdeploy`` entry point: parse, dispatch to one subcommand module, turn every failure into one line.

Exit status: 0 success; 1 an error (a :class:`RexError`, an OS error, or a bug: one ``rexdeploy: error:``
line on stderr, never a traceback unless ``--verbose``); 2 a usage error; 130 SIGINT (Ctrl-C); 143 SIGTERM
(129 SIGHUP). Stop signals unwind like Ctrl-C, so temporary files and folders are removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from rexdeploy import __version__
from rexdeploy.cli import (
    bench_cmd,
    build_cmd,
    common,
    expand_cmd,
    export_cmd,
    inspect_cmd,
    plan_cmd,
    profile_cmd,
    serve_cmd,
)
from rexdeploy.errors import InternalError, RexError
from rexdeploy.fileio import raise_or_defer

SUBCOMMANDS = (build_cmd, plan_cmd, expand_cmd, inspect_cmd, bench_cmd, profile_cmd, export_cmd, serve_cmd)


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


class Terminated(KeyboardInterrupt):
    """A stop signal other than SIGINT (SIGTERM, SIGHUP), raised where Ctrl-C's KeyboardInterrupt would be.

    A KeyboardInterrupt subclass, so that everything that cleans up on Ctrl-C cleans up on it too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    common.set_verbosity(args.quiet, args.verbose)
    with _stop_signals_raise(), warnings.catch_warnings():
        if not args.verbose:  # numpy's floating-point notes (NaN / inf weights) are not for the CLI's user
            warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return _run(args)
        except KeyboardInterrupt as exc:  # a stop that arrived while the outcome was being reported
            return _stopped(exc)


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; every way it can end becomes an exit status and at most one line on stderr."""
    try:
        return int(args.func(args))
    except InternalError as exc:
        print(f"rexdeploy: error: {_one_line(exc)} ({_model_note(args)})", file=sys.stderr)
        return 1
    except RexError as exc:
        print(f"rexdeploy: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return _stopped(exc)
    except MemoryError:
        print("rexdeploy: error: out of memory", file=sys.stderr)
        return 1
    except OSError as exc:  # a file system or device problem: the environment, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        print(f"rexdeploy: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line the user can report, the traceback only with --verbose
        if args.verbose:
            traceback.print_exc()
        print(
            f"rexdeploy: error: internal error ({type(exc).__name__}: {_one_line(exc, 200)}); this is a "
            f"rexdeploy bug, please report it with this line ({_model_note(args)})",
            file=sys.stderr,
        )
        return 1


def _stopped(exc: KeyboardInterrupt) -> int:
    if isinstance(exc, Terminated):
        print(f"rexdeploy: terminated by {exc.name}", file=sys.stderr)
        return 128 + exc.signum
    print("rexdeploy: interrupted", file=sys.stderr)
    return 130


def _one_line(exc: BaseException, limit: int = 0) -> str:
    """The exception's message on one line (its type name when it has none), cut at ``limit`` chars if > 0."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if limit <= 0 or len(text) <= limit else text[: limit - 3] + "..."


def _model_note(args: argparse.Namespace) -> str:
    """``rexdeploy <version>, model <name> sha256 <hex>`` for a bug report: enough to find the same model again."""
    from pathlib import Path

    note = f"rexdeploy {__version__}"
    model = getattr(args, "model", None)
    if not isinstance(model, str):
        return note
    try:
        from rexdeploy.graph import file_sha256

        return f"{note}, model {Path(model).name} sha256 {file_sha256(model)}"
    except Exception:  # unreadable: the name alone
        return f"{note}, model {Path(model).name}"


def _on_stop(owner: int, signum: int, frame: FrameType | None) -> None:
    if os.getpid() != owner:
        # a forked child inherited the handler (OpenVINO's telemetry sends from a forked process and terminates
        # it after a timeout): it dies as by default, no Terminated traceback on the user's stderr
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise_or_defer(KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum))


def _default_stops_in_child() -> None:
    """After a fork: the stop signals our handler catches act as by default again in the child, at once. The child's
    Python handler would run only when its main thread runs bytecode, and a child forked from a threaded process can
    deadlock on a lock held at fork time (OpenVINO's telemetry sender): it then ignored the SIGTERM its parent sent,
    and the parent waited for it forever at exit (a test run hung after its last test, 33 minutes)."""
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        handler = signal.getsignal(signum) if signum is not None else None
        if isinstance(handler, functools.partial) and handler.func is _on_stop:
            signal.signal(signum, signal.SIG_DFL)  # type: ignore[arg-type]
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, functools.partial) and handler.func is _on_stop:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_stops_in_child)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While the command runs, SIGINT, SIGTERM and SIGHUP raise (KeyboardInterrupt / :class:`Terminated`).

    Python already does so for SIGINT; this handler also defers the exception past the short steps that
    create, commit or remove temporary files (:func:`rexdeploy.fileio.interrupts_deferred`). A signal the
    caller ignores (``nohup``) or handles itself is left alone; the handlers are restored on return.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for name, default in (
        ("SIGINT", signal.default_int_handler),
        ("SIGTERM", signal.SIG_DFL),
        ("SIGHUP", signal.SIG_DFL),
    ):
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) is not default:
            continue
        previous[signum] = signal.signal(signum, functools.partial(_on_stop, os.getpid()))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
