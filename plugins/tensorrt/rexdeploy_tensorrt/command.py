"""The ``trtexec`` command line equivalent to a :class:`TrtBuildSettings` (pure).

Users cross-build: plan and expand on a laptop, then build and time on the target (a Jetson, a
server) with the TensorRT that ships there. Every flag below is named as in the trtexec reference,
https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html
(TensorRT 10.x: ``--stronglyTyped``, ``--fp16``/``--bf16``/``--int8``/``--fp8``/``--int4``,
``--maxAuxStreams=N``, ``--builderOptimizationLevel=N``, ``--memPoolSize=workspace:<MiB>``,
``--timingCacheFile=<file>``, ``--minShapes``/``--optShapes``/``--maxShapes=<name:AxBxC,...>``,
``--profilingVerbosity=detailed``, ``--useCudaGraph``, ``--noDataTransfers``, ``--warmUp=<ms>``,
``--duration=<s>``, ``--iterations=N``, ``--shapes=<spec>``, ``--useSpinWait``, ``--skipInference``,
``--noTF32``, ``--precisionConstraints=obey``, ``--layerPrecisions=<name:fp32,...>``,
``--layerOutputTypes=<name:fp32,...>``). ``--int4`` exists from TensorRT 10.1.

Names in shape and layer specs, as trtexec parses them (``samples/common/sampleOptions.cpp``,
``getShapesBuild`` / ``getLayerPrecisions`` → ``splitNameAndValue``, TensorRT 10.0-10.16): the list is
split on every ``,`` first (no escape exists), then a name is either wrapped in single quotes
(``'in:0':1x3``, exactly two quotes) or taken as everything before the last ``:``; layer names may hold
one ``*`` wildcard. So a name with ``:`` is quoted; a name with ``,`` or ``'`` (or, in a layer spec,
``*``) cannot be written and :func:`trtexec_command` refuses it, naming the tensor or node.
TensorRT 11 drops the precision flags and makes ``--stronglyTyped`` the default
(https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rexdeploy.builders.base import TimingSettings
from rexdeploy.errors import BuildError
from rexdeploy_tensorrt.settings import INT4_MIN_TRT, ShapeRange, TrtBuildSettings, parse_version


def spec_name(name: str, what: str = "input", wildcard: bool = False) -> str:
    """``name`` as trtexec reads it in a ``name:value`` list: quoted when it holds ``:``; refused (with
    what to do) when it holds ``,`` or ``'``, or ``*`` where trtexec reads a wildcard (layer specs)."""
    bad = [c for c in (",", "'", *(("*",) if wildcard else ())) if c in name]
    if bad:
        raise BuildError(
            f"{what} name {name!r} holds {' and '.join(repr(c) for c in bad)}, which trtexec cannot parse in a "
            "name:value list (it splits on every ',', quotes with \"'\", and reads '*' in layer names as a "
            "wildcard); rename it in the ONNX, or build with rexdeploy's TensorRTBuilder (Python API, no such limit)"
        )
    return f"'{name}'" if ":" in name else name


def _shape_spec(shapes: tuple[ShapeRange, ...], pick: str, batch: int | None = None) -> str:
    parts = []
    for s in shapes:
        dims = list(getattr(s, pick))
        if batch is not None and s.dynamic:
            dims[0] = batch
        parts.append(f"{spec_name(s.name)}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def _pin_specs(settings: TrtBuildSettings) -> list[str]:
    """``--precisionConstraints=obey --layerPrecisions=... --layerOutputTypes=...`` for the FP32 pins.
    trtexec names layers as the ONNX parser does, so this reaches each pinned node's first layer (named
    after the node); the further layers a node may make (``<node>_<n>``) are pinned by the Python builder
    only. DequantizeLinear pins set the output type only (a DQ layer's precision is its int8 input)."""
    if not settings.pins_apply:
        return []
    precision = [
        spec_name(n, "node", wildcard=True) + ":fp32" for n, op in settings.fp32_pins if op != "DequantizeLinear"
    ]
    outputs = [spec_name(n, "node", wildcard=True) + ":fp32" for n, op in settings.fp32_pins if op != "QuantizeLinear"]
    args = ["--precisionConstraints=obey"]
    if precision:
        args.append(f"--layerPrecisions={','.join(precision)}")
    if outputs:
        args.append(f"--layerOutputTypes={','.join(outputs)}")
    return args


def trtexec_command(
    onnx_path: str | Path,
    settings: TrtBuildSettings,
    *,
    engine_path: str | Path | None = None,
    timing: TimingSettings | None = None,
    tensorrt_version: str | None = None,
) -> str:
    """The exact ``trtexec`` command that builds (and, with ``timing``, times) the engine of ``settings``.

    Without ``timing`` the command only builds (``--skipInference``). With it, trtexec times compute
    only (``--noDataTransfers``), like :meth:`TensorRTBuilder.time`'s median; rexdeploy times the
    host↔device copies apart. The engine goes next to the ONNX (``<stem>.plan``) unless ``engine_path``
    is given, and the timing cache next to the engine unless the settings name one. Given the target's
    ``tensorrt_version``, a command its trtexec cannot run (``--int4`` before 10.1) is refused. TF32 is
    always off (``--noTF32``: an fp32 layer is fp32); FP32 pins add precision constraints (``_pin_specs``).
    ``--maxAuxStreams=N`` carries the settings' auxiliary streams (an ensemble's predictors - 1, capped by the
    profile; 0 otherwise), and is left out when the settings leave them to TensorRT's heuristics (-1).
    """
    onnx_path = Path(onnx_path)
    engine = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".plan")
    cache = settings.timing_cache or str(engine.parent / "timing.cache")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    flags = settings.builder_flags()
    if tensorrt_version is not None and "INT4" in flags and parse_version(tensorrt_version) < INT4_MIN_TRT:
        raise BuildError(
            f"the engine holds int4 weights but trtexec --int4 needs TensorRT 10.1 or newer (target has "
            f"{tensorrt_version}): install TensorRT >= 10.1 on the target, or re-plan with int8 weights"
        )
    if settings.strongly_typed:
        args.append("--stronglyTyped")
    else:
        args += [f"--{flag.lower()}" for flag in flags if flag != "OBEY_PRECISION_CONSTRAINTS"]
        args += _pin_specs(settings)
    if not settings.tf32:
        args.append("--noTF32")
    if settings.sets_aux_streams:  # else trtexec's default: TensorRT's heuristics
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
