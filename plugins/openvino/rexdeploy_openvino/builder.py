"""The OpenVINO builder: ONNX → IR (``model.xml`` / ``model.bin``) → compiled model, timed; or an IR
written earlier, compiled as it is (:meth:`OpenVINOBuilder.load`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings, check_inputs, live_handle
from rexdeploy.builders.timing import Timing, measure, random_inputs, timing_from_samples
from rexdeploy.errors import BuildError, InputError
from rexdeploy_openvino._runtime import (
    IR_RUNTIME_OPTIONS,
    NAME,
    OV_PRECISION,
    PIP_EXTRA,
    RUNTIME_OPTIONS_FILE,
    THREADS_OPTION,
    check_device,
    import_openvino,
    inference_precision,
    model_dynamic,
    model_precision,
    one_line,
    onnx_metadata,
    read_static_model,
    runtime_options,
)
from rexdeploy_openvino.compressed import compress_for_engine
from rexdeploy_openvino.precisions import (
    layer_precision_map,
    read_execution_graph,
    runtime_precision_summary,
)
from rexdeploy_openvino.profiling import profiled_layer_times

if TYPE_CHECKING:
    from rexdeploy.profile import Profile
    from rexdeploy_openvino.throughput import ThroughputResult

IR_NAME = "model"


def compiled_model(engine: Engine) -> Any:
    """The live ``openvino.CompiledModel`` of an engine built in this process."""
    return live_handle(engine, NAME, "OpenVINOBuilder")


def engine_batch(engine: Engine) -> int:
    """The batch an engine was built for: the leading dimension of its first input (1 for scalars)."""
    first = next(iter(engine.inputs.values()), ())
    return int(first[0]) if first else 1


def _input_arrays(engine: Engine, compiled: Any, seed: int) -> list[np.ndarray]:
    """Seeded random inputs in the compiled model's input order and dtypes."""
    names = list(engine.inputs)
    dtypes = {n: np.dtype(p.get_element_type().to_dtype()) for n, p in zip(names, compiled.inputs, strict=True)}
    return list(random_inputs(engine.inputs, dtypes, seed).values())


def _compile(core: Any, source: Any, name: str, device: str, options: dict[str, str]) -> Any:
    """``core.compile_model`` with the engine's runtime options; one-line BuildError on failure."""
    try:
        return core.compile_model(source, device, dict(options))
    except Exception as exc:
        raise BuildError(f"OpenVINO cannot compile {name} for {device}: {one_line(exc)}") from exc


def stored_options(ir: Path) -> dict[str, str] | None:
    """The runtime options written beside an IR by :meth:`OpenVINOBuilder.build` (None when there are none)."""
    path = ir.parent / RUNTIME_OPTIONS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        options = raw["options"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a rexdeploy runtime options file ({exc}); rebuild the engine") from exc
    return {str(k): str(v) for k, v in options.items()}


def _write_options(path: Path, options: dict[str, str], default_precision: str) -> None:
    """``runtime_options.json``: the options, and what a bare ``compile_model`` of the IR would differ in."""
    bare_differs = options.get("INFERENCE_PRECISION_HINT", "") not in ("", default_precision)
    note = (
        f"Compile model.xml with these properties: core.compile_model('model.xml', device, options). "
        f"{', '.join(IR_RUNTIME_OPTIONS)} travels inside the IR too (rt_info runtime_options); "
        "INFERENCE_PRECISION_HINT does not: OpenVINO ignores it there."
        + (
            f" A bare compile_model on this host runs {default_precision}, not "
            f"{options['INFERENCE_PRECISION_HINT']}: the engine's fidelity and latency need these options."
            if bare_differs
            else ""
        )
        + (
            f" {THREADS_OPTION}={options[THREADS_OPTION]} (the profile's [parallel] threads, which rexdeploy build "
            "sets where it measured fewer threads faster) is not read from the IR either: a bare compile_model runs "
            "OpenVINO's default threads."
            if THREADS_OPTION in options
            else ""
        )
    )
    doc = {"format": 1, "options": options, "default_precision_here": default_precision, "note": note}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _chosen_options(compiled: Any) -> dict[str, str]:
    """The precision and dynamic quantization OpenVINO chose for a model compiled without options."""
    options: dict[str, str] = {}
    for key in ("INFERENCE_PRECISION_HINT", *IR_RUNTIME_OPTIONS):
        try:
            value = compiled.get_property(key)
        except Exception:
            continue
        options[key] = str(value.get_type_name() if hasattr(value, "get_type_name") else value)
    return options


def _device_default_precision(core: Any, device: str) -> str:
    """The inference precision OpenVINO picks on ``device`` when nothing pins it (``f32``, ``bf16``, ``f16``)."""
    try:
        hint = core.get_property(device, "INFERENCE_PRECISION_HINT")
        return str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
    except Exception:
        return "f32"


def _engine(
    ov: Any,
    compiled: Any,
    model: Path,
    artifacts: tuple[Path, ...],
    shapes: dict[str, tuple[int, ...]],
    index: dict[str, str],
    device: str,
    build_seconds: float,
    options: dict[str, str],
) -> Engine:
    """The Engine record of a compiled model, with the runtime precision of every layer."""
    return Engine(
        backend=NAME,
        device=device,
        model_path=model,
        artifacts=artifacts,
        inputs=shapes,
        build_seconds=build_seconds,
        backend_version=str(ov.get_version()),
        layer_precisions=layer_precision_map(read_execution_graph(compiled, index)),
        options=dict(options),
        handle=compiled,
    )


class OpenVINOBuilder:
    """Builds ONNX (usually Q/DQ) models with OpenVINO for a profile's device (``CPU``, ``GPU``, ...).

    ``build`` converts the model with ``openvino.convert_model``, fixes a dynamic batch to 1, saves the
    IR uncompressed (``compress_to_fp16=False``: weights stay as they are, so int8 stays int8 and FP32
    stays FP32), and compiles the saved IR with ``PERFORMANCE_HINT=LATENCY`` and
    ``INFERENCE_PRECISION_HINT`` f32 (bf16 when the profile supports bf16; see
    :func:`rexdeploy_openvino._runtime.inference_precision`). Weight-only layers are rewritten first
    (:func:`rexdeploy_openvino.compressed.compress_for_engine`: int4 orders stored int4, K orders as one
    compressed or folded kernel; exact to the ONNX). The engine's ``layer_precisions``
    come from the execution graph: which precision each ONNX node really ran in. ``load`` compiles an
    IR written earlier (by ``build`` or by OpenVINO's tools) in place, with the same settings.
    """

    name = NAME
    pip_extra = PIP_EXTRA
    # what this plugin makes of a model beyond the engine's version (weight-only layers rewritten since
    # compressed.py): part of the engine cache and cost table keys, so neither serves an engine of an older form
    engine_format = "weight-only-compressed-1"

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
        meta = onnx_metadata(model)
        options = runtime_options(core, profile.device, model_precision(meta, profile),
                                  dynamic=model_dynamic(meta, profile), threads=profile.parallel.threads)  # fmt: skip
        if model.suffix != ".xml":  # weight-only layers in their fastest exact compressed/folded form
            compress_for_engine(ov_model, options)
        for key in IR_RUNTIME_OPTIONS:  # what the CPU plugin honours from the IR itself
            if key in options:
                ov_model.set_rt_info(options[key], ["runtime_options", key])
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".openvino-ir.", suffix=".tmp", dir=out_dir))
        try:
            staged = staging / f"{IR_NAME}.xml"
            try:
                ov.save_model(ov_model, str(staged), compress_to_fp16=False)
            except Exception as exc:
                raise BuildError(f"OpenVINO cannot save the IR of {model.name}: {one_line(exc)}") from exc
            _write_options(staging / RUNTIME_OPTIONS_FILE, options, _device_default_precision(core, profile.device))
            compiled = _compile(core, str(staged), model.name, profile.device, options)
            artifacts = (out_dir / f"{IR_NAME}.xml", out_dir / f"{IR_NAME}.bin", out_dir / RUNTIME_OPTIONS_FILE)
            os.replace(staged.with_suffix(".bin"), artifacts[1])
            os.replace(staging / RUNTIME_OPTIONS_FILE, artifacts[2])
            os.replace(staged, artifacts[0])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        build_seconds = _time.perf_counter() - start
        return _engine(ov, compiled, model, artifacts, shapes, index, profile.device, build_seconds, options)

    def load(self, ir: Path, profile: Profile, options: dict[str, str] | None = None, as_is: bool = False) -> Engine:
        """Compile an already-built OpenVINO IR (``model.xml`` with its ``.bin`` beside it) in place for
        the profile's device; nothing is written.

        ``options``: the compile properties; None reads the ``runtime_options.json`` :meth:`build` wrote beside
        the IR (the options the engine was measured with), else — an IR from elsewhere — the profile's
        (its float precision); ``{}`` compiles it bare, as a user's ``core.compile_model(ir)`` does.
        A dynamic batch is fixed to 1 as in :meth:`build`, unless ``as_is``: then the IR is compiled with the
        shapes it has (a dynamic batch stays dynamic, as a bare ``core.compile_model(ir)`` does) and timed and
        run at batch 1. ``Engine.build_seconds`` is the time spent
        reading and compiling the IR; ``Engine.artifacts`` are the given ``.xml`` and ``.bin``.
        """
        ov = import_openvino()
        ir = Path(ir)
        if ir.suffix != ".xml":
            raise InputError(f"{ir} is not an OpenVINO IR: give the .xml file of model.xml / model.bin")
        if ir.is_file() and not ir.with_suffix(".bin").is_file():
            raise InputError(f"the weights of {ir.name} ({ir.with_suffix('.bin').name}) are missing beside it")
        start = _time.perf_counter()
        core = ov.Core()
        check_device(core, profile.device)
        ov_model, shapes, index = read_static_model(core, ir, fix_batch=not as_is)
        if options is None:
            options = stored_options(ir) or runtime_options(core, profile.device, inference_precision(profile),
                                                            dynamic=profile.quantization.dynamic_activations,
                                                            threads=profile.parallel.threads)  # fmt: skip
        compiled = _compile(core, ov_model, ir.name, profile.device, options)
        if not options:  # bare: record what OpenVINO chose, so a profile run or a reload reproduces it
            options = _chosen_options(compiled)
        build_seconds = _time.perf_counter() - start
        artifacts = (ir, ir.with_suffix(".bin"))
        return _engine(ov, compiled, ir, artifacts, shapes, index, profile.device, build_seconds, options)

    def load_as_user(self, ir: Path, profile: Profile) -> Engine:
        """An IR compiled the way its user runs it: with the ``runtime_options.json`` rexdeploy wrote beside it,
        else bare and as it is (``core.compile_model(ir)``: an IR from elsewhere, e.g. NNCF's, in OpenVINO's
        defaults, a dynamic batch left dynamic: on MobileNetV2 NNCF's int8 IR ran 1.05x its batch-1 reshape
        on an AMD EPYC (avx512_bf16), the BERT-style encoder's 0.99x)."""
        if stored_options(Path(ir)) is not None:
            return self.load(ir, profile, options=None)
        return self.load(ir, profile, options={}, as_is=True)

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        """Latency of one synchronous infer request on fixed seeded random inputs, set once.

        As benchmark_app (``-hint latency``, sync API) does, each sample is the runtime's own measure
        of the inference (``InferRequest.latency``), not a Python clock around the call: the Python
        loop costs ~10-30 µs per call, which is most of a small model's latency and is not paid by a
        C++ deployment. The loop (warm-up by time, then a duration or ``runs``) is
        :func:`rexdeploy.builders.timing.measure`'s; ``Timing.duration_s`` is its wall time.
        ``Timing.batch`` is the engine's batch, fixed when it was built.
        """
        ov = import_openvino()
        compiled = compiled_model(engine)
        try:
            request = compiled.create_infer_request()
            arrays = _input_arrays(engine, compiled, settings.seed)
            engine_ms: list[float] = []
            if any(port.get_partial_shape().is_dynamic for port in compiled.inputs):
                # a model compiled as it is (a dynamic batch): each call hands the inputs over (the binding copies
                # them before the inference that InferRequest.latency measures). On OpenVINO 2026.4, a request of
                # such a model given set_input_tensor, once destroyed, made a later convert_model and inference
                # abort the process (tests/test_relative_engine.py)
                feeds = dict(enumerate(arrays))

                def infer() -> None:
                    request.infer(feeds)
                    engine_ms.append(float(request.latency))
            else:
                for index, array in enumerate(arrays):
                    request.set_input_tensor(index, ov.Tensor(array))

                def infer() -> None:
                    request.infer()
                    engine_ms.append(float(request.latency))

            settings = dataclasses.replace(settings, batch=engine_batch(engine))
            loop = measure(infer, settings)
        except Exception as exc:
            raise BuildError(f"OpenVINO inference failed while timing: {one_line(exc)}") from exc
        return timing_from_samples(
            engine_ms[loop.warmup_runs :],
            warmup_runs=loop.warmup_runs,
            warmup_s=loop.warmup_s,
            duration_s=loop.duration_s,
            batch=loop.batch,
        )

    def thread_choices(self, engine: Engine) -> tuple[int, list[int]]:
        """The engine's inference threads and the counts worth timing beside them (``rexdeploy build`` keeps the
        fastest; :mod:`rexdeploy.runtime_threads`): on a CPU compiled for latency with n > 1 threads, 1 and, from
        4 threads up, n // 2. A small model's nodes take a few µs each, and waking the other threads for every node
        can cost more than they save (the digits ViT on a 2-core AMD EPYC, avx512_bf16: 50 µs on 1 thread, 143 µs on 2). No counts
        on a GPU, for the throughput hint, or where the engine's threads are already fixed."""
        try:
            threads = int(compiled_model(engine).get_property(THREADS_OPTION))
        except Exception:
            return 0, []
        fixed = THREADS_OPTION in engine.options
        latency = engine.options.get("PERFORMANCE_HINT", "LATENCY") == "LATENCY"
        if engine.device.split(".")[0] != "CPU" or not latency or fixed or threads <= 1:
            return threads, []
        return threads, sorted({1, threads // 2} - {threads})

    def default_float_precision(self, profile: Profile) -> str:
        """The precision OpenVINO runs float layers in on the profile's device when nothing pins it —
        what a user who just loads the model gets: ``bf16`` on CPUs with AVX-512 BF16 or AMX, ``fp32``
        elsewhere (``fp16`` on GPUs)."""
        ov = import_openvino()
        try:
            hint = ov.Core().get_property(profile.device, "INFERENCE_PRECISION_HINT")
            name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        except Exception:
            return "fp32"
        return {v: k for k, v in OV_PRECISION.items()}.get(str(name), "fp32")

    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        """Per-ONNX-node µs from OpenVINO's ``PERF_COUNT`` profiler, on the inputs :meth:`time` uses; see
        :func:`rexdeploy_openvino.profiling.profiled_layer_times`."""
        compiled = compiled_model(engine)
        return profiled_layer_times(engine, _input_arrays(engine, compiled, settings.seed), settings)

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
        check_inputs(engine, inputs)
        try:
            request = compiled.create_infer_request()
            request.infer({name: np.asarray(inputs[name]) for name in engine.inputs})
            return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(compiled.outputs))]
        except Exception as exc:
            raise BuildError(f"OpenVINO inference failed: {one_line(exc)}") from exc
