"""Throughput mode: many infer requests in flight (``PERFORMANCE_HINT=THROUGHPUT``), like benchmark_app.

Latency mode (:meth:`OpenVINOBuilder.time`) answers "how long does one input take"; throughput mode
answers "how many inputs per second can this device sustain", with as many streams and requests as
OpenVINO finds optimal (or ``requests``). The model is compiled afresh for it, apart from the engine.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexdeploy.builders.base import Engine, TimingSettings
from rexdeploy.builders.timing import Timing, random_inputs, timing_from_samples
from rexdeploy.errors import BuildError, InputError
from rexdeploy_openvino._runtime import (
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

if TYPE_CHECKING:
    from rexdeploy.profile import Profile


@dataclass(frozen=True)
class ThroughputResult:
    """Sustained throughput with ``requests`` infer requests over ``streams`` streams.

    ``timing`` holds the per-request latency statistics (each request's own inference time, as
    OpenVINO measures it, without queueing); its ``throughput_fps`` is the measured ``fps``.
    """

    fps: float
    requests: int
    streams: int
    timing: Timing

    def to_dict(self) -> dict[str, Any]:
        return {
            "fps": self.fps,
            "requests": self.requests,
            "streams": self.streams,
            "timing": self.timing.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ThroughputResult:
        return cls(
            fps=float(raw["fps"]),
            requests=int(raw["requests"]),
            streams=int(raw["streams"]),
            timing=Timing.from_dict(raw["timing"]),
        )


def _source(engine_or_model: Engine | Path | str, profile: Profile | None) -> tuple[Path, str, dict[str, str]]:
    """(model file to compile, device, compile options in THROUGHPUT mode) for an engine or a model path: an
    engine keeps the options it was built with (its precision, dynamic quantization); a model file gets the
    options :meth:`OpenVINOBuilder.build` would give it."""
    if isinstance(engine_or_model, Engine):
        engine = engine_or_model
        if engine.backend != "openvino":
            raise BuildError(f"time_throughput needs an OpenVINO engine, got a {engine.backend} engine")
        ir = next((p for p in engine.artifacts if p.suffix == ".xml"), engine.model_path)
        options = dict(engine.options) or {"INFERENCE_PRECISION_HINT": inference_precision(profile)}
        return (
            ir,
            profile.device if profile is not None else engine.device,
            {**options, "PERFORMANCE_HINT": "THROUGHPUT"},
        )
    if profile is None:
        raise InputError("time_throughput on a model file needs a profile (it names the device)")
    ov = import_openvino()
    model = Path(engine_or_model)
    meta = onnx_metadata(model)
    options = runtime_options(ov.Core(), profile.device, model_precision(meta, profile), mode="THROUGHPUT",
                              dynamic=model_dynamic(meta, profile))  # fmt: skip
    return model, profile.device, options


def time_throughput(
    engine_or_model: Engine | Path | str,
    profile: Profile | None,
    settings: TimingSettings,
    requests: int | None = None,
) -> ThroughputResult:
    """Measure throughput with an ``AsyncInferQueue`` compiled with ``PERFORMANCE_HINT=THROUGHPUT``.

    ``engine_or_model`` is an OpenVINO engine (its IR is recompiled; ``profile`` may be None, the
    engine's device and precision are kept) or an ONNX / IR file (``profile`` names the device).
    ``requests`` defaults to OpenVINO's ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``. Warm-up by time, then
    ``settings.runs`` requests or ``settings.duration_s`` seconds (at least ``min_runs`` requests);
    every request has the same seeded random inputs, set once.
    """
    ov = import_openvino()
    import openvino.properties as props

    model, device, options = _source(engine_or_model, profile)
    core = ov.Core()
    check_device(core, device)
    ov_model, shapes, _ = read_static_model(core, model)
    try:
        compiled = core.compile_model(ov_model, device, options)
        n_requests = requests or int(compiled.get_property(props.optimal_number_of_infer_requests))
        streams = int(compiled.get_property(props.num_streams))
    except Exception as exc:
        raise BuildError(f"OpenVINO cannot compile {model.name} for {device} (throughput): {one_line(exc)}") from exc
    if n_requests < 1:
        raise InputError(f"requests must be ≥ 1, got {n_requests}")
    dtypes = {n: p.get_element_type().to_dtype() for n, p in zip(shapes, compiled.inputs, strict=True)}
    arrays = list(random_inputs(shapes, dtypes, settings.seed).values())
    first = next(iter(shapes.values()), ())
    batch = int(first[0]) if first else 1

    latencies: list[float] = []
    recording = [False]

    def on_done(request: Any, _userdata: Any) -> None:
        if recording[0]:
            latencies.append(float(request.latency))

    try:
        queue = ov.AsyncInferQueue(compiled, n_requests)
        for slot in range(len(queue)):
            for index, array in enumerate(arrays):
                queue[slot].set_input_tensor(index, ov.Tensor(array))
        queue.set_callback(on_done)

        clock = time.perf_counter
        warmup_runs = 0
        start = clock()
        while warmup_runs < n_requests or clock() - start < settings.warmup_s:
            queue.start_async()
            warmup_runs += 1
        queue.wait_all()

        recording[0] = True
        started = 0
        t_begin = clock()
        while True:
            queue.start_async()
            started += 1
            if settings.runs is not None:
                if started >= settings.runs:
                    break
            elif clock() - t_begin >= settings.duration_s and started >= settings.min_runs:
                break
        queue.wait_all()
        elapsed = clock() - t_begin
    except Exception as exc:
        raise BuildError(f"OpenVINO inference failed while timing throughput: {one_line(exc)}") from exc

    fps = batch * len(latencies) / elapsed if elapsed > 0 else 0.0
    timing = timing_from_samples(
        latencies, warmup_runs=warmup_runs, warmup_s=settings.warmup_s, duration_s=elapsed, batch=batch
    )
    return ThroughputResult(
        fps=fps,
        requests=n_requests,
        streams=streams,
        timing=dataclasses.replace(timing, throughput_fps=fps),
    )
