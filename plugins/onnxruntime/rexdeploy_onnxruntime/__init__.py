"""rexdeploy builder plugin for ONNX Runtime: the CPU reference and fallback engine.

ONNX Runtime is a core dependency of rexdeploy, so this engine is always there: it runs any model the
other engines are compared with, and it is what ``build`` falls back to on a machine with neither
TensorRT nor OpenVINO. ``onnxruntime`` is still imported lazily, inside the methods.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings, check_inputs, live_handle
from rexdeploy.builders.registry import unavailable_error
from rexdeploy.builders.timing import Timing, measure, random_inputs
from rexdeploy.errors import BuildError, InputError

if TYPE_CHECKING:
    from rexdeploy.profile import Profile

__all__ = ["OnnxRuntimeBuilder"]

NAME = "onnxruntime"

# ONNX Runtime's NodeArg.type strings → numpy dtypes.
_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise unavailable_error(NAME, "") from exc
    return onnxruntime


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:399] + "…"


def _external_files(model: Path) -> list[str]:
    """Relative paths of the external-data files the model's initializers point to."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        raise BuildError(f"cannot read {model.name} as ONNX: {_one_line(exc)}") from exc
    files: set[str] = set()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)


def _static_shapes(model: Path, session: Any) -> dict[str, tuple[int, ...]]:
    """Input shapes with a symbolic leading (batch) dimension fixed to 1; other symbolic dims fail."""
    shapes: dict[str, tuple[int, ...]] = {}
    for arg in session.get_inputs():
        dims: list[int] = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim >= 0:
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
            else:
                raise BuildError(
                    f"input {arg.name!r} of {model.name} has dynamic dimension {axis} ({arg.shape}); "
                    "only the batch dimension may be dynamic: export it with static shapes"
                )
        shapes[arg.name] = tuple(dims)
    return shapes


def _session(engine: Engine) -> Any:
    return live_handle(engine, NAME, "OnnxRuntimeBuilder")


def _options(cores: int) -> dict[str, str]:
    """The session options :meth:`OnnxRuntimeBuilder.build` uses, as ``Engine.options`` records them."""
    return {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "intra_op_num_threads": str(cores),
        "inter_op_num_threads": "1",
        "execution_mode": "ORT_SEQUENTIAL",
    }


def session_options(ort: Any, options: dict[str, str]) -> Any:
    """An ``onnxruntime.SessionOptions`` from ``Engine.options`` (missing keys: the builder's defaults)."""
    merged = {**_options(0), **options}
    made = ort.SessionOptions()
    made.graph_optimization_level = getattr(ort.GraphOptimizationLevel, merged["graph_optimization_level"])
    made.intra_op_num_threads = int(merged["intra_op_num_threads"])
    made.inter_op_num_threads = int(merged["inter_op_num_threads"])
    made.execution_mode = getattr(ort.ExecutionMode, merged["execution_mode"])
    return made


DYNAMIC_QUANT_TRANSFORMER = "QDQSelectorActionTransformer"
"""ONNX Runtime's Q/DQ fusion pass. Besides fusing W8A8 Q/DQ pairs into integer kernels it turns a weight-only
layer (DequantizeLinear on the weight, float activation) into a dynamically quantized MatMul: int8 activations
the plan never chose (a weight-only K=2 transformer layer: 3.2e-5 → 8.8e-3 relative error)."""


def has_weight_only_layers(model: Path) -> bool:
    """True when a MatMul / Gemm / Conv of ``model`` has a dequantized constant weight and a float activation."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return False
    consts = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                           for o in n.output}  # fmt: skip
    dq_outputs = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output}
    weight_dq = {out for out, n in dq_outputs.items() if n.input and n.input[0] in consts}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        inputs = list(node.input[:2])
        if any(i in weight_dq for i in inputs) and any(i not in dq_outputs and i not in consts for i in inputs):
            return True
    return False


def session_kwargs(options: dict[str, str]) -> dict[str, Any]:
    """The ``InferenceSession`` arguments beyond ``SessionOptions`` that ``Engine.options`` records."""
    disabled = [o for o in options.get("disabled_optimizers", "").split(",") if o]
    return {"disabled_optimizers": disabled} if disabled else {}


def _input_arrays(engine: Engine, session: Any, seed: int) -> dict[str, np.ndarray]:
    """The seeded random inputs :meth:`OnnxRuntimeBuilder.time` runs on, in the session's input dtypes."""
    dtypes = {arg.name: np.dtype(_DTYPES.get(arg.type, "float32")) for arg in session.get_inputs()}
    return random_inputs(engine.inputs, dtypes, seed)


class OnnxRuntimeBuilder:
    """Runs the ONNX model itself with ONNX Runtime's CPU execution provider.

    ``build`` copies the model (and its external-data files) into ``out_dir`` and opens an
    ``InferenceSession`` on the copy with every graph optimization (``ORT_ENABLE_ALL``, which also
    fuses Q/DQ pairs into QLinear* integer kernels; for a model with weight-only layers without the Q/DQ fusion
    pass, :data:`DYNAMIC_QUANT_TRANSFORMER`, which would quantize their activations dynamically) and
    ``profile.parallel.threads`` (else ``cores``) intra-op threads (0: ONNX Runtime's default). The profile's device is not used: this engine always runs on the CPU.
    """

    name = NAME
    pip_extra = ""

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except Exception:
            return False
        return True

    def version(self) -> str:
        return str(_import_ort().__version__)

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        ort = _import_ort()
        model, out_dir = Path(model), Path(out_dir)
        if not model.is_file():
            raise InputError(f"model file {model} not found")
        start = _time.perf_counter()
        files = [model.name, *_external_files(model)]
        out_dir.mkdir(parents=True, exist_ok=True)
        recorded = _options(profile.parallel.threads or profile.parallel.cores)
        if has_weight_only_layers(model):  # keep the plan's float activations: no dynamic int8 behind its back
            recorded["disabled_optimizers"] = DYNAMIC_QUANT_TRANSFORMER
        options = session_options(ort, recorded)
        staging = Path(tempfile.mkdtemp(prefix=".onnxruntime.", suffix=".tmp", dir=out_dir))
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(model.parent / rel, staging / rel)
                except OSError as exc:
                    raise BuildError(f"cannot copy {rel} (needed by {model.name}): {exc.strerror}") from exc
            try:
                session = ort.InferenceSession(
                    str(staging / model.name), sess_options=options, providers=["CPUExecutionProvider"],
                    **session_kwargs(recorded),
                )
            except Exception as exc:
                raise BuildError(f"onnxruntime cannot load {model.name}: {_one_line(exc)}") from exc
            shapes = _static_shapes(model, session)
            artifacts = tuple(out_dir / rel for rel in files)
            for rel, target in zip(files, artifacts, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Engine(
            backend=NAME,
            device="CPU",
            model_path=model,
            artifacts=artifacts,
            inputs=shapes,
            build_seconds=_time.perf_counter() - start,
            backend_version=str(ort.__version__),
            options=recorded,
            handle=session,
        )

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        """Latency of ``run_with_iobinding`` on fixed seeded random inputs bound once (no per-run
        copies). ``Timing.batch`` is the engine's batch, fixed when it was built."""
        session = _session(engine)
        arrays = _input_arrays(engine, session, settings.seed)
        first = next(iter(engine.inputs.values()), ())
        batch = int(first[0]) if first else 1
        try:
            binding = session.io_binding()
            for name, array in arrays.items():
                binding.bind_cpu_input(name, array)
            for out in session.get_outputs():
                binding.bind_output(out.name, "cpu")

            def infer() -> None:
                session.run_with_iobinding(binding)

            return measure(infer, dataclasses.replace(settings, batch=batch))
        except Exception as exc:
            raise BuildError(f"onnxruntime inference failed while timing: {_one_line(exc)}") from exc

    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        """Per-ONNX-node µs from onnxruntime's own profiler: a second session on the engine's model with the
        same session options and profiling on, run on the inputs :meth:`time` uses; see
        :func:`rexdeploy_onnxruntime.profiling.profiled_layer_times`."""
        from rexdeploy_onnxruntime.profiling import profiled_layer_times

        ort = _import_ort()
        session = _session(engine)
        arrays = _input_arrays(engine, session, settings.seed)
        options = session_options(ort, engine.options)
        return profiled_layer_times(ort, engine, options, arrays, settings, _one_line)

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = _session(engine)
        check_inputs(engine, inputs)
        try:
            outputs = session.run(None, {name: np.asarray(inputs[name]) for name in engine.inputs})
        except Exception as exc:
            raise BuildError(f"onnxruntime inference failed: {_one_line(exc)}") from exc
        return [np.asarray(o) for o in outputs]
