"""Engine self-check: a built engine against onnxruntime's exact Q/DQ arithmetic on the very ONNX it was built from.

The expanded ONNX is the contract: onnxruntime with graph optimizations off computes every QuantizeLinear /
DequantizeLinear and float op as written. An engine may fuse, reorder and run float parts in its own precision,
but its outputs must stay within what the plan allows. A larger disagreement is an engine miscompilation (seen:
8-bit weights on an AVX2 CPU without VNNI overflow the u8×s8 int16 pairs, 18 % off), and the build does not
return that engine.

The tolerance is the plan's predicted error vs FP32 (the engine may differ from the exact arithmetic by no more
than the quantization the plan accepts), plus what the engine's float precision costs (bf16 / fp16 engines round
every float tensor: :data:`REDUCED_FLOAT_ALLOWANCE`), never below :data:`FLOOR` (f32 summation order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from rexdeploy.fidelity import compare_all, output_names, stacked_outputs

if TYPE_CHECKING:
    from rexdeploy.builders.base import Builder, Engine

FLOOR = 2e-2
"""Relative L2 disagreement an f32 engine may show against the exact arithmetic (summation order, fused
requantization, an int8 code one step off where the engine rounds a value at a tie differently): measured 8.3e-4
for an f32 W8A8 K=1 engine of a MobileNetV2-like net on an AVX-512 host, 1.0e-4 with activation orders, 5.05e-3
for a ResNet-style net with the x86-avx2 profile (7-bit weights) there; a miscompilation is far above it (8-bit
weights on an AVX2 CPU without VNNI: 0.18)."""
REDUCED_FLOAT_ALLOWANCE = {"bf16": 0.02, "fp16": 0.005}
"""What a reduced-precision engine may add: its float parts rounded to 8 (bf16) / 11 (fp16) significant bits
(measured on an AVX-512 BF16 host, MobileNetV2-like net: the bf16 float engine 3.3e-3 and a bf16 W8A8 K=1 engine
8.2e-3 from the exact arithmetic; an act-order engine compiled bf16 3.8e-2, which must fail)."""
PROBES = 8
REFERENCE = "onnxruntime, graph optimizations off (exact Q/DQ arithmetic)"


@dataclass(frozen=True)
class SelfCheck:
    """The engine's outputs against the reference on ``probes`` synthetic inputs."""

    relative_error: float
    cosine: float
    tolerance: float
    probes: int
    passed: bool
    precision: str
    reference: str = REFERENCE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.text}

    @property
    def text(self) -> str:
        verdict = "agrees" if self.passed else "DISAGREES"
        return (f"engine ({self.precision}) {verdict} with {self.reference}: relative error "
                f"{self.relative_error:.2e} (tolerance {self.tolerance:.2e}, {self.probes} probes)")  # fmt: skip


def tolerance(predicted_error: float, precision: str, float_noise: float = 0.0) -> float:
    """How far the engine may be from the exact arithmetic of its ONNX (module docstring); ``float_noise``: the
    measured error of this device's reduced-precision float engine of the model (deep nets round more often
    than :data:`REDUCED_FLOAT_ALLOWANCE` assumes; twice it is allowed)."""
    reduced = max(REDUCED_FLOAT_ALLOWANCE[precision], 2.0 * float_noise) if precision in REDUCED_FLOAT_ALLOWANCE else 0.0
    return max(FLOOR, predicted_error) + reduced


def probe_feeds(model: onnx.ModelProto, probes: int = PROBES, seed: int = 7) -> dict[str, np.ndarray]:
    """Seeded synthetic probes of the model's inputs (:func:`rexdeploy.ranges.synthetic_probes`: all ``probes`` of
    them for a batch-1 export too), batch axis first."""
    from rexdeploy.ranges import synthetic_probes

    return synthetic_probes(model, probes, seed=seed)


def reference_outputs(onnx_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The compared outputs (:func:`~rexdeploy.fidelity.compared_outputs`: every float one) of ``onnx_path`` on
    ``feeds``, one probe at a time, by onnxruntime with graph optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return stacked_outputs(lambda f: session.run(None, f), feeds, names)


def engine_outputs(builder: Builder, engine: Engine, feeds: Mapping[str, np.ndarray],
                   names: Sequence[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """The engine's compared outputs (every float one; ``names``: the model's output names) on ``feeds``, one probe
    at a time (engines are built for batch 1)."""
    return stacked_outputs(lambda f: builder.run(engine, f), feeds, names)


def self_check(builder: Builder, engine: Engine, onnx_path: Path, predicted_error: float, precision: str,
               probes: int = PROBES, float_noise: float = 0.0) -> SelfCheck:  # fmt: skip
    """Compare ``engine`` with the exact arithmetic of ``onnx_path`` (the ONNX it was built from); see
    :func:`tolerance` for ``float_noise``."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    feeds = probe_feeds(model, probes)
    measured = compare_all(reference_outputs(onnx_path, feeds), engine_outputs(builder, engine, feeds, output_names(model)))
    tol = tolerance(predicted_error, precision, float_noise)
    return SelfCheck(measured.relative_error, measured.cosine, tol, measured.probes,
                     bool(np.isfinite(measured.relative_error) and measured.relative_error <= tol), precision)  # fmt: skip


__all__ = ["FLOOR", "REDUCED_FLOAT_ALLOWANCE", "SelfCheck", "engine_outputs", "probe_feeds", "reference_outputs",
           "self_check", "tolerance"]  # fmt: skip
