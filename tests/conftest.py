from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# CI runs every property test on the same examples (derandomize: examples derived from the test itself,
# no example database), so a red build is reproducible and a green one does not depend on a lucky draw.
# Locally hypothesis keeps exploring random examples. HYPOTHESIS_PROFILE=ci selects CI's behaviour anywhere.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") else "dev")
)


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


@pytest.fixture
def cuda_gpu() -> Any:
    """The first CUDA GPU (``rexdeploy_tensorrt.cuda_device.device_info``) for the real TensorRT engine tests; skips
    where TensorRT does not import or no GPU is visible."""
    pytest.importorskip("tensorrt")
    from rexdeploy_tensorrt.cuda_device import device_info

    gpu = device_info(0)
    if gpu is None:
        pytest.skip("no CUDA GPU visible")
    return gpu
