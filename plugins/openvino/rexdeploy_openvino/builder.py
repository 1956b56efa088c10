"""The OpenVINO builder: ONNX → IR (``model.xml`` / ``model.bin``) → compiled model, timed."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.timing import Timing, measure, random_inputs
from rexdeploy.errors import BuildError, InputError
from rexdeploy_openvino._runtime import (
    NAME,
    PIP_EXTRA,
    check_device,
    compile_config,
    import_openvino,
    inference_precision,
    one_line,
    read_static_model,
)
from rexdeploy_openvino.precisions import (
    layer_precision_map,
    read_execution_graph,
    runtime_precision_summary,
)

if TYPE_CHECKING:
    from rexdeploy.profile import Profile
    from rexdeploy_openvino.throughput import ThroughputResult

IR_NAME = "model"


def compiled_model(engine: Engine) -> Any:
    """The live ``openvino.CompiledModel`` of an engine built in this process."""
    if engine.backend != NAME or engine.handle is None:
        raise BuildError(
            f"this needs an OpenVINO engine built in this process (got a {engine.backend} engine"
            f"{'' if engine.handle is not None else ' without a live handle'}); "
            "build it with OpenVINOBuilder().build(...)"
        )
    return engine.handle


def engine_batch(engine: Engine) -> int:
    """The batch an engine was built for: the leading dimension of its first input (1 for scalars)."""
    first = next(iter(engine.inputs.values()), ())
    return int(first[0]) if first else 1


def _input_arrays(engine: Engine, compiled: Any, seed: int) -> list[np.ndarray]:
    """Seeded random inputs in the compiled model's input order and dtypes."""
    names = list(engine.inputs)
    dtypes = {
        n: np.dtype(p.get_element_type().to_dtype()) for n, p in zip(names, compiled.inputs, strict=True)
    }
    return list(random_inputs(engine.inputs, dtypes, seed).values())


class OpenVINOBuilder:
    """Builds ONNX (usually Q/DQ) models with OpenVINO for a profile's device (``CPU``, ``GPU``, ...).

    ``build`` converts the model with ``openvino.convert_model``, fixes a dynamic batch to 1, saves the
    IR uncompressed (``compress_to_fp16=False``: weights stay as they are, so int8 stays int8 and FP32
    stays FP32), and compiles the saved IR with ``PERFORMANCE_HINT=LATENCY`` and
    ``INFERENCE_PRECISION_HINT`` f32 (bf16 when the profile supports bf16; see
    :func:`rexdeploy_openvino._runtime.inference_precision`). The engine's ``layer_precisions``
    come from the execution graph: which precision each ONNX node really ran in.
    """

    name = NAME
    pip_extra = PIP_EXTRA

    def available(self) -> bool:
        try:
            import openvino  # noqa: F401
        except Exception:
            return False
        return True

    def version(self) -> str:
        return str(import_openvino().get_version())

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        ov = import_openvino()
        model, out_dir = Path(model), Path(out_dir)
        start = _time.perf_counter()
        core = ov.Core()
        check_device(core, profile.device)
        ov_model, shapes, index = read_static_model(core, model)
        precision = inference_precision(profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".openvino-ir.", suffix=".tmp", dir=out_dir))
        try:
            staged = staging / f"{IR_NAME}.xml"
            try:
                ov.save_model(ov_model, str(staged), compress_to_fp16=False)
            except Exception as exc:
                raise BuildError(f"OpenVINO cannot save the IR of {model.name}: {one_line(exc)}") from exc
            try:
                compiled = core.compile_model(
                    str(staged), profile.device, compile_config(ov, "LATENCY", precision)
                )
            except Exception as exc:
                raise BuildError(
                    f"OpenVINO cannot compile {model.name} for {profile.device}: {one_line(exc)}"
                ) from exc
            artifacts = (out_dir / f"{IR_NAME}.xml", out_dir / f"{IR_NAME}.bin")
            os.replace(staged, artifacts[0])
            os.replace(staged.with_suffix(".bin"), artifacts[1])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        build_seconds = _time.perf_counter() - start
        layers = read_execution_graph(compiled, index)
        return Engine(
            backend=NAME,
            device=profile.device,
            model_path=model,
            artifacts=artifacts,
            inputs=shapes,
            build_seconds=build_seconds,
            backend_version=str(ov.get_version()),
            layer_precisions=layer_precision_map(layers),
            handle=compiled,
        )

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        """Latency of one synchronous infer request on fixed seeded random inputs (set once, as
        benchmark_app does). ``Timing.batch`` is the engine's batch, fixed when it was built."""
        ov = import_openvino()
        compiled = compiled_model(engine)
        try:
            request = compiled.create_infer_request()
            for index, array in enumerate(_input_arrays(engine, compiled, settings.seed)):
                request.set_input_tensor(index, ov.Tensor(array))

            def infer() -> None:
                request.start_async()
                request.wait()

            return measure(infer, dataclasses.replace(settings, batch=engine_batch(engine)))
        except Exception as exc:
            raise BuildError(f"OpenVINO inference failed while timing: {one_line(exc)}") from exc

    def precision_summary(self, engine: Engine) -> dict[str, dict[str, int]]:
        """Execution-layer type → runtime precision → count; see
        :func:`rexdeploy_openvino.precisions.runtime_precision_summary`."""
        return runtime_precision_summary(engine)

    def time_throughput(
        self, engine: Engine, settings: TimingSettings, requests: int | None = None
    ) -> ThroughputResult:
        """See :func:`rexdeploy_openvino.throughput.time_throughput`."""
        from rexdeploy_openvino.throughput import time_throughput

        return time_throughput(engine, None, settings, requests)

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = compiled_model(engine)
        missing = sorted(set(engine.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(engine.inputs))
        if missing or unknown:
            raise InputError(
                f"inputs do not match the engine: missing {missing or 'none'}, unknown {unknown or 'none'}; "
                f"expected {sorted(engine.inputs)}"
            )
        try:
            request = compiled.create_infer_request()
            request.infer({name: np.asarray(inputs[name]) for name in engine.inputs})
            return [
                np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(compiled.outputs))
            ]
        except Exception as exc:
            raise BuildError(f"OpenVINO inference failed: {one_line(exc)}") from exc
