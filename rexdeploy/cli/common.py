"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from rexdeploy.errors import InputError

if TYPE_CHECKING:
    from rexdeploy.samples import Preprocess


class _Verbosity:
    """The CLI's --quiet / --verbose (CLI state only; the library takes a progress callback)."""

    quiet = False


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is then: ``main`` may run several times in one process (a script,
    the tests), each time under another stderr; a handler holding the first one wrote to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("rexdeploy: %(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ / setStream: always the current stderr
        pass


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """--quiet drops progress lines; --verbose adds the library's DEBUG logs (``logging`` 'rexdeploy')."""
    _Verbosity.quiet = quiet
    logger = logging.getLogger("rexdeploy")
    if verbose and not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def stderr(line: str) -> None:
    """A result line for people (summaries, tables): always printed, on stderr."""
    print(line, file=sys.stderr, flush=True)


def progress(line: str) -> None:
    """A progress line: on stderr unless --quiet."""
    if not _Verbosity.quiet:
        print(line, file=sys.stderr, flush=True)


def act_bits(text: str) -> int:
    """``8`` → 8, ``fp`` / ``float`` → 0 (weight-only)."""
    if text in ("fp", "float", "fp32"):
        return 0
    if text == "8":
        return 8
    raise argparse.ArgumentTypeError(f"invalid activation bits {text!r}: use 8 or fp")


def ensemble(text: str) -> tuple[int, ...]:
    try:
        split = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid ensemble split {text!r}: use orders per predictor, e.g. 2,1"
        ) from None
    if not split or any(k < 1 for k in split):
        raise argparse.ArgumentTypeError(f"invalid ensemble split {text!r}: each predictor needs >= 1 order")
    return split


def threads(text: str) -> int:
    """``auto`` → 0 (measured by the build), ``N`` ≥ 1 → N inference threads per request."""
    if text == "auto":
        return 0
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid --threads {text!r}: use auto or a whole number of threads >= 1, e.g. 1")


def duration(text: str) -> float:
    """``3s`` / ``500ms`` / ``2`` → seconds."""
    from rexdeploy.budget import parse_budget

    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_budget(text) / 1000.0
    except Exception:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 3s or 500ms") from None


def require_suffix(path: str, suffix: str, what: str) -> None:
    if not path.endswith(suffix):
        raise InputError(f"{what} {path!r} should end in {suffix}")


def smooth_alpha(text: str) -> float:
    """``--smooth ALPHA``: a SmoothQuant strength in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid smoothing strength {text!r}: use a number in [0, 1], e.g. 0.5")
    return value


def add_smooth_arg(p: argparse.ArgumentParser) -> None:
    """``--smooth ALPHA``: data-free LayerNorm smoothing before the expansion (rexdeploy.passes.smooth)."""
    p.add_argument("--smooth", type=smooth_alpha, metavar="ALPHA", help="transformers: move activation outliers of "
                   "LayerNorm outputs into the next MatMul weights (data-free SmoothQuant, strength ALPHA in [0, 1], "
                   "e.g. 0.5); off by default")  # fmt: skip


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """``--samples`` and the preprocessing flags of a folder of images (rexdeploy.samples)."""
    p.add_argument("--samples", help="your own model inputs to MEASURE fidelity on (never to quantize): .npy (one "
                   "input), .npz (by input name) or a folder of images")  # fmt: skip
    p.add_argument("--sample-size", type=int, help="images: resize to SIZE x SIZE (default: the model input's)")
    p.add_argument("--sample-mean", help="images: per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406")
    p.add_argument("--sample-std", help="images: per-channel std, e.g. 0.229,0.224,0.225")
    p.add_argument("--sample-layout", choices=("NCHW", "NHWC"), help="images: the model's layout (default NCHW)")


def sample_preprocess(args: argparse.Namespace) -> Preprocess:
    from rexdeploy.samples import preprocess_from_flags

    return preprocess_from_flags(args.sample_size, args.sample_mean, args.sample_std, args.sample_layout)
