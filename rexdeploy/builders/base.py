"""The Builder protocol every engine plugin implements, and the records that cross its boundary.

A builder compiles an (expanded, Q/DQ) ONNX model into an engine for one backend and times it.
Plugins live in ``plugins/<engine>/`` and are found through the ``rexdeploy.builders`` entry points
(see :mod:`rexdeploy.builders.registry`); they import their engine lazily, inside the methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from rexdeploy.builders.timing import Timing
    from rexdeploy.profile import Profile


@dataclass(frozen=True)
class TimingSettings:
    """How to time an engine: warm-up by time, then a duration or a fixed number of runs."""

    warmup_s: float = 0.2
    duration_s: float = 3.0
    runs: int | None = None
    min_runs: int = 10
    batch: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Engine:
    """A compiled engine: where its files are, what it was built from, and a live handle to run it.

    ``options`` are the runtime options the engine was compiled and timed with (OpenVINO compile
    properties, TensorRT builder flags), so a profile run or a reload reproduces them.
    ``handle`` is the backend's in-process object (an OpenVINO ``CompiledModel``, a TensorRT
    ``ICudaEngine``, an onnxruntime session); it is excluded from :meth:`to_dict`.
    """

    backend: str
    device: str
    model_path: Path
    artifacts: tuple[Path, ...]
    inputs: dict[str, tuple[int, ...]]
    build_seconds: float
    backend_version: str = ""
    layer_precisions: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    handle: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "handle"}
        out["model_path"] = str(self.model_path)
        out["artifacts"] = [str(p) for p in self.artifacts]
        out["inputs"] = {k: list(v) for k, v in self.inputs.items()}
        return out


@dataclass(frozen=True)
class LayerTimes:
    """Per-node times read from an engine's own profiler (OpenVINO ``PERF_COUNT``, onnxruntime's profiler,
    TensorRT ``IProfiler``), averaged over ``runs`` profiled inferences.

    ``nodes`` maps each *ONNX node* of the built model to the µs attributed to it (an engine layer that
    fused several ONNX nodes is charged to the first one it names); ``unmapped_us`` is what ran under no
    ONNX node name (reorders, input/output copies the engine added), and ``total_us`` the sum of
    everything the profiler reported — under profiling, usually a little above an unprofiled run's median.
    """

    nodes: dict[str, float]
    unmapped_us: float
    total_us: float
    runs: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": dict(self.nodes), "unmapped_us": self.unmapped_us, "total_us": self.total_us,
                "runs": self.runs, "source": self.source}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LayerTimes:
        return cls({str(k): float(v) for k, v in raw["nodes"].items()}, float(raw["unmapped_us"]),
                   float(raw["total_us"]), int(raw["runs"]), str(raw["source"]))  # fmt: skip


@runtime_checkable
class Builder(Protocol):
    """What an engine plugin provides. ``name`` is the profile's ``engine`` value."""

    name: str
    pip_extra: str

    def available(self) -> bool:
        """True when the engine imports and can run here (never raises)."""
        ...

    def version(self) -> str:
        """The engine's version string (raises EngineUnavailableError when not installed)."""
        ...

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        """Compile ``model`` for ``profile`` and write the engine's files into ``out_dir``."""
        ...

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        """Measure the engine's latency; never builds."""
        ...

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference and return the outputs in the model's output order."""
        ...

    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        """Per-ONNX-node µs from the engine's own profiler (warm-up, then ``settings.runs`` or
        ``settings.duration_s`` of profiled runs); never builds."""
        ...


def check_inputs(engine: Engine, inputs: dict[str, np.ndarray]) -> None:
    """InputError unless ``inputs`` names exactly the engine's inputs (every builder's ``run`` calls it)."""
    from rexdeploy.errors import InputError

    missing = sorted(set(engine.inputs) - set(inputs))
    unknown = sorted(set(inputs) - set(engine.inputs))
    if missing or unknown:
        raise InputError(
            f"inputs do not match the engine: missing {missing or 'none'}, unknown {unknown or 'none'}; "
            f"expected {sorted(engine.inputs)}"
        )


def live_handle(engine: Engine, backend: str, builder_class: str) -> Any:
    """The in-process handle of an engine this backend built; BuildError naming what to do otherwise."""
    from rexdeploy.errors import BuildError

    if engine.backend != backend or engine.handle is None:
        raise BuildError(
            f"this needs an {backend} engine built in this process (got a {engine.backend} engine"
            f"{'' if engine.handle is not None else ' without a live handle'}); "
            f"build it with {builder_class}().build(...)"
        )
    return engine.handle
