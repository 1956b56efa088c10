"""rexdeploy: data-free residual quantization error expansion (REx) as an ONNX compiler pass.

Python API (no printing, no exits; errors are :class:`RexError` subclasses)::

    import rexdeploy
    profile = rexdeploy.load_profile("x86-avx512")
    report = rexdeploy.build("model.onnx", profile, budget_ms=5.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rexdeploy.errors import (
    BudgetError,
    BuildError,
    EngineUnavailableError,
    InputError,
    ModelError,
    PlanError,
    ProfileError,
    RexError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "load_profile": ("rexdeploy.profile", "load_profile"),
    "Profile": ("rexdeploy.profile", "Profile"),
    "load_model": ("rexdeploy.graph", "load_model"),
    "expand_model": ("rexdeploy.api", "expand_model"),
    "expand": ("rexdeploy.api", "expand_model"),
    "build": ("rexdeploy.closedloop", "build"),
    "plan": ("rexdeploy.api", "plan"),
    "bench": ("rexdeploy.benchmark", "bench"),
    "Plan": ("rexdeploy.plans", "Plan"),
    "LayerPlan": ("rexdeploy.plans", "LayerPlan"),
    "Timing": ("rexdeploy.builders.timing", "Timing"),
    "TimingSettings": ("rexdeploy.builders.base", "TimingSettings"),
    "Report": ("rexdeploy.report", "Report"),
}

if TYPE_CHECKING:
    from rexdeploy.api import expand_model, plan
    from rexdeploy.benchmark import bench
    from rexdeploy.builders.base import TimingSettings
    from rexdeploy.builders.timing import Timing
    from rexdeploy.closedloop import build
    from rexdeploy.graph import load_model
    from rexdeploy.plans import LayerPlan, Plan
    from rexdeploy.profile import Profile, load_profile
    from rexdeploy.report import Report


def __getattr__(name: str) -> Any:
    """Import the API lazily so ``rexdeploy --help`` stays fast."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rexdeploy' has no attribute {name!r}")


__all__ = [
    "BudgetError",
    "BuildError",
    "EngineUnavailableError",
    "InputError",
    "LayerPlan",
    "ModelError",
    "Plan",
    "PlanError",
    "Profile",
    "ProfileError",
    "Report",
    "RexError",
    "Timing",
    "TimingSettings",
    "UnsupportedModelError",
    "__version__",
    "bench",
    "build",
    "expand_model",
    "load_model",
    "load_profile",
    "plan",
]
