from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_engine_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own empty engine cache (never the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("engine-cache")
    monkeypatch.setenv("REXDEPLOY_CACHE", str(root))
    yield root
