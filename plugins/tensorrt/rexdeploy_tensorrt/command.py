"""The ``trtexec`` command line equivalent to a :class:`TrtBuildSettings` (pure).

Users cross-build: plan and expand on a laptop, then build and time on the target (a Jetson, a
server) with the TensorRT that ships there. Every flag below is named as in the trtexec reference,
https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html
(TensorRT 10.x: ``--stronglyTyped``, ``--fp16``/``--bf16``/``--int8``/``--fp8``/``--int4``,
``--maxAuxStreams=N``, ``--builderOptimizationLevel=N``, ``--memPoolSize=workspace:<MiB>``,
``--timingCacheFile=<file>``, ``--minShapes``/``--optShapes``/``--maxShapes=<name:AxBxC,...>``,
``--profilingVerbosity=detailed``, ``--useCudaGraph``, ``--noDataTransfers``, ``--warmUp=<ms>``,
``--duration=<s>``, ``--iterations=N``, ``--shapes=<spec>``, ``--useSpinWait``, ``--skipInference``).
TensorRT 11 drops the precision flags and makes ``--stronglyTyped`` the default
(https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rexdeploy.builders.base import TimingSettings
from rexdeploy_tensorrt.settings import ShapeRange, TrtBuildSettings


def _name(name: str) -> str:
    # trtexec splits shape specs on ',' and ':'; names holding them are wrapped in single quotes.
    return f"'{name}'" if (":" in name or "," in name) else name


def _shape_spec(shapes: tuple[ShapeRange, ...], pick: str, batch: int | None = None) -> str:
    parts = []
    for s in shapes:
        dims = list(getattr(s, pick))
        if batch is not None and s.dynamic:
            dims[0] = batch
        parts.append(f"{_name(s.name)}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def trtexec_command(
    onnx_path: str | Path,
    settings: TrtBuildSettings,
    *,
    engine_path: str | Path | None = None,
    timing: TimingSettings | None = None,
) -> str:
    """The exact ``trtexec`` command that builds (and, with ``timing``, times) the engine of ``settings``.

    Without ``timing`` the command only builds (``--skipInference``). With it, trtexec times compute
    only (``--noDataTransfers``), like :meth:`TensorRTBuilder.time`'s median; rexdeploy times the
    host↔device copies apart. The engine goes next to the ONNX (``<stem>.plan``) unless ``engine_path``
    is given, and the timing cache next to the engine unless the settings name one.
    """
    onnx_path = Path(onnx_path)
    engine = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".plan")
    cache = settings.timing_cache or str(engine.parent / "timing.cache")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    if settings.strongly_typed:
        args.append("--stronglyTyped")
    else:
        args += [f"--{flag.lower()}" for flag in settings.builder_flags()]
    args.append(f"--maxAuxStreams={settings.max_aux_streams}")
    args.append(f"--builderOptimizationLevel={settings.builder_optimization_level}")
    if settings.workspace_bytes is not None:
        args.append(f"--memPoolSize=workspace:{max(1, math.ceil(settings.workspace_bytes / (1 << 20)))}")
    args.append(f"--timingCacheFile={cache}")
    if settings.dynamic:
        for flag, pick in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            args.append(f"{flag}={_shape_spec(settings.shapes, pick)}")
    args.append(f"--profilingVerbosity={settings.profiling_verbosity}")
    if timing is None:
        args.append("--skipInference")
    else:
        if settings.dynamic:
            args.append(f"--shapes={_shape_spec(settings.shapes, 'opt', batch=timing.batch)}")
        args.append(f"--warmUp={max(0, round(timing.warmup_s * 1000))}")
        if timing.runs is not None:
            args += [f"--iterations={timing.runs}", "--duration=0"]
        else:
            args += [f"--iterations={timing.min_runs}", f"--duration={max(1, math.ceil(timing.duration_s))}"]
        args += ["--noDataTransfers", "--useSpinWait"]
        if settings.use_cuda_graph:
            args.append("--useCudaGraph")
    return shlex.join(args)
