from __future__ import annotations

import pytest

from rexdeploy.budget import format_ms, parse_budget
from rexdeploy.errors import BudgetError


@pytest.mark.parametrize(
    ("text", "ms"), [("5ms", 5.0), ("800us", 0.8), ("0.005s", 5.0), ("20 ms", 20.0), ("1e-3s", 1.0), ("250µs", 0.25)]
)
def test_budget_forms(text: str, ms: float) -> None:
    assert parse_budget(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["5", "-1ms", "fast", "", "ms", "5 min", "0ms", "nanms"])
def test_malformed_budgets(text: str) -> None:
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(text)


def test_format_ms() -> None:
    assert format_ms(0.05) == "50 us"
    assert format_ms(1.23456) == "1.235 ms"
    assert format_ms(12.34) == "12.3 ms"
