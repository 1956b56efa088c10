from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    """Seeded N(0, 1) inputs for the small CNN of tests/models.py (16 × 3 × 8 × 8)."""
    return np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)


@pytest.fixture(autouse=True)
def _isolated_engine_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own empty engine cache (never the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("engine-cache")
    monkeypatch.setenv("REXDEPLOY_CACHE", str(root))
    yield root
