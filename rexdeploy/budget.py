"""Latency budgets: ``5ms``, ``800us``, ``0.005s`` → milliseconds."""

from __future__ import annotations

import math
import re

from rexdeploy.errors import BudgetError

_UNITS_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|µs)\s*$")


def parse_budget(text: str) -> float:
    """Parse a latency budget with its unit and return it in milliseconds.

    >>> parse_budget("5ms"), parse_budget("800us"), parse_budget("0.005s")
    (5.0, 0.8, 5.0)
    """
    match = _BUDGET_RE.match(text)
    if match is None:
        raise BudgetError(f"malformed budget {text!r}: give a positive number with a unit, e.g. 5ms, 800us or 0.005s")
    value = float(match.group(1)) * _UNITS_TO_MS[match.group(2)]
    if not math.isfinite(value) or value <= 0.0:
        raise BudgetError(f"budget {text!r} must be a positive, finite latency, e.g. 5ms")
    return value


def format_ms(ms: float) -> str:
    """Human form of a latency in milliseconds (``0.412 ms``, ``12.3 ms``, ``85 us``)."""
    if ms < 0.1:
        return f"{ms * 1000.0:.0f} us"
    if ms < 10.0:
        return f"{ms:.3f} ms"
    return f"{ms:.1f} ms"
