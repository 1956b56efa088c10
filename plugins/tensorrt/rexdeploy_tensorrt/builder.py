"""The TensorRT builder plugin: Q/DQ ONNX → serialized TensorRT engine, and its timing.

Build steps (TensorRT 10.x Python API, as in Polygraphy's ``backend/trt/loader.py`` / ``config.py``):
the installed TensorRT / cuda-python checked against the driver's CUDA major
(:func:`rexdeploy_tensorrt.cuda_device.check_cuda_stack`) → ``trt.Builder`` → ``create_network``
(``STRONGLY_TYPED`` flag or none, per :mod:`.settings`) → ``trt.OnnxParser.parse_from_file`` (parser
errors → one-line :class:`BuildError`) → FP32 pins on the parsed layers
(:mod:`rexdeploy_tensorrt.precision_pins`) → ``IBuilderConfig`` (the one float-precision flag and the
Q/DQ flags for weakly typed networks, ``OBEY_PRECISION_CONSTRAINTS`` with pins, ``TF32`` cleared,
``WORKSPACE`` memory-pool limit,
``max_aux_streams`` (an ensemble's predictors - 1, capped by the profile; 0 otherwise: :mod:`.settings`),
``builder_optimization_level``, ``profiling_verbosity = DETAILED``, an
optimization profile for a dynamic batch, the timing cache loaded from and saved to
``timing.cache``) → ``build_serialized_network`` → ``engine.plan`` + ``engine.json`` written
atomically → per-layer precisions and their summary by layer type from the engine inspector
(``get_engine_information(LayerInformationFormat.JSON)``), and the auxiliary streams the engine
actually uses (``ICudaEngine.num_aux_streams``, at most ``max_aux_streams``; each execution context
creates its own unless given some with ``IExecutionContext.set_aux_streams``, which rexdeploy does not
call). Every Builder, OnnxParser and Runtime gets
the one process-wide logger (:mod:`rexdeploy_tensorrt.trt_logger`); each build collects what it logs, so
a :class:`BuildError` quotes TensorRT's own errors.
Python API reference: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from rexdeploy.builders.base import Engine, LayerTimes, TimingSettings
from rexdeploy.errors import BuildError, EngineUnavailableError, InputError
from rexdeploy.fileio import atomic_path, write_text_atomic
from rexdeploy_tensorrt.cuda_device import check_cuda_stack, cuda_stack_problem, device_count, device_info
from rexdeploy_tensorrt.engine_info import layer_precisions, precision_summary
from rexdeploy_tensorrt.precision_pins import LayerPin, apply_pins, unmatched_pins
from rexdeploy_tensorrt.qdq_lint import errors, lint_qdq
from rexdeploy_tensorrt.settings import (
    ShapeRange,
    TrtBuildSettings,
    check_tensorrt_version,
    default_float_precision,
    device_index,
    load_onnx,
    select_settings,
)
from rexdeploy_tensorrt.trt_logger import SINK, process_logger

if TYPE_CHECKING:
    from rexdeploy.builders.timing import Timing
    from rexdeploy.profile import Profile

PIP_HINT = "pip install 'rexdeploy[tensorrt]'"
PLAN_NAME = "engine.plan"
META_NAME = "engine.json"
CACHE_NAME = "timing.cache"

# Runtimes that deserialized a live Engine.handle: TensorRT wants an IRuntime to outlive the engines it
# made, so the few created by build() are kept for the life of the process.
_RUNTIMES: list[Any] = []


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`EngineUnavailableError` naming the pip extra."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, a stub wheel failing at import, libraries built for a newer CUDA
        problem = cuda_stack_problem()
        if problem:
            raise EngineUnavailableError(problem) from None
        if importlib.util.find_spec("tensorrt") is not None:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise EngineUnavailableError(
                f"TensorRT is installed but does not import ({type(exc).__name__}: {detail}); reinstall it with "
                f"{PIP_HINT} (CUDA 12 drivers: 'rexdeploy[tensorrt-cu12]')"
            ) from None
        raise EngineUnavailableError(
            f"TensorRT is not installed here; run {PIP_HINT} on the machine with the target GPU (or build "
            "there with the trtexec command rexdeploy writes)"
        ) from None
    return tensorrt


def tensorrt_for_gpu() -> Any:
    """:func:`import_tensorrt`, after checking that the installed TensorRT and cuda-python fit the driver's
    CUDA major (one-line :class:`EngineUnavailableError` naming the pins otherwise)."""
    trt = import_tensorrt()
    check_cuda_stack()
    return trt


def _parser_error(err: Any) -> str:
    desc = str(err.desc()).strip().splitlines()[0] if hasattr(err, "desc") else str(err)
    where = ""
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)
        if callable(fn):
            value = str(fn())
            if value:
                where += f"{value} "
    return f"{where.strip()}: {desc}" if where else desc


def build_plan(
    trt: Any, model: Path, settings: TrtBuildSettings, timing_cache: Path, onnx_nodes: Collection[str] = ()
) -> tuple[bytes, bytes, list[LayerPin]]:
    """Parse ``model`` and build a serialized engine; returns (plan bytes, timing-cache bytes, the layers
    constrained to FP32). ``onnx_nodes`` are the model's node names (to tell a pinned node's further
    layers ``<node>_<n>`` from another node's). Every error TensorRT logs during the build is in the
    :class:`BuildError` (the process logger's messages, collected for this build)."""
    logger = process_logger(trt)
    with SINK.collect() as log:
        builder = trt.Builder(logger)
        flags = 0
        if settings.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            found = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            first = found[0] if found else (log.summary() or "no detail")
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            raise BuildError(
                f"TensorRT's ONNX parser rejected {model.name}: {first}{more}; check the op and opset against "
                "TensorRT's ONNX operator support"
            )
        pinned = apply_pins(trt, network, settings.pinned_nodes, onnx_nodes) if settings.pins_apply else []

        config = builder.create_builder_config()
        for flag in settings.builder_flags():
            member = getattr(trt.BuilderFlag, flag, None)
            if member is None:
                raise BuildError(
                    f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (weakly typed builds need TensorRT "
                    "10, INT4 10.1); install tensorrt>=10.1,<11 or build strongly typed (typing='strong')"
                )
            config.set_flag(member)
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None and not settings.tf32:
            config.clear_flag(tf32)  # on by default: FP32 conv/matmul inputs rounded to a 10-bit mantissa
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        if settings.sets_aux_streams:  # else TensorRT's heuristics choose (-1: its default, never set)
            config.max_aux_streams = settings.max_aux_streams
        config.builder_optimization_level = settings.builder_optimization_level
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, settings.profiling_verbosity.upper())
        if settings.dynamic:
            profile = builder.create_optimization_profile()
            for s in settings.shapes:
                profile.set_shape(s.name, s.min, s.opt, s.max)
            config.add_optimization_profile(profile)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            # a cache from another GPU / TensorRT version is rejected: start from an empty one
            config.set_timing_cache(config.create_timing_cache(b""), False)

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(
                f"TensorRT could not build {model.name}: {log.summary() or 'no error logged'}; run "
                "qdq_lint on the model and check the layer is supported in the chosen precision"
                + (" (FP32 pins are obeyed: a pinned layer needs an FP32 implementation)" if pinned else "")
            )
        return bytes(plan), bytes(config.get_timing_cache().serialize()), pinned


def engine_information(trt: Any, engine: Any, settings: TrtBuildSettings | _Shapes) -> str:
    """The engine inspector's JSON, with the opt shapes set so formats resolve."""
    context = engine.create_execution_context()
    inspector = engine.create_engine_inspector()
    if context is not None:
        for s in settings.shapes:
            if s.dynamic or any(int(d) < 0 for d in engine.get_tensor_shape(s.name)):
                context.set_input_shape(s.name, s.opt)
        try:
            inspector.execution_context = context
        except AttributeError:  # TensorRT 8.x named it `context`
            inspector.context = context
    info = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    del inspector, context
    return info


def _with_weights(path: Path, proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its external weights loaded (so the lint sees the quantized values)."""
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        return proto
    full = onnx.ModelProto()
    full.CopyFrom(proto)
    onnx.load_external_data_for_model(full, str(path.parent))
    return full


def _onnx_index(model: Path) -> dict[str, str]:
    """:func:`rexdeploy_tensorrt.layer_profile.onnx_index` of the engine's ONNX model; {} when it is not
    here (a plan built elsewhere): layer names are then reported as TensorRT's metadata gives them."""
    from rexdeploy_tensorrt.layer_profile import onnx_index

    if model.suffix != ".onnx" or not model.is_file():
        return {}
    try:
        return onnx_index(onnx.load(str(model), load_external_data=False))
    except Exception:
        return {}


def _read_meta(engine: Engine) -> dict[str, Any]:
    for path in engine.artifacts:
        if Path(path).name == META_NAME and Path(path).is_file():
            loaded: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
            return loaded
    return {}


def pin_record(pin: LayerPin) -> dict[str, Any]:
    """How ``engine.json`` lists one layer constrained to FP32."""
    return {"layer": pin.name, "node": pin.node, "precision": pin.precision, "outputs": list(pin.outputs)}


def engine_options(settings: TrtBuildSettings, aux_streams_used: int | None = None) -> dict[str, str]:
    """What the engine was built with, as :attr:`Engine.options` records it (the float precision, the
    typing, the builder flags set and cleared, the FP32 pins, the auxiliary streams allowed: ``-1`` where
    TensorRT's heuristics chose) and, when known, the auxiliary streams the built engine uses."""
    options = {
        "float_precision": settings.float_precision,
        "typing": "strong" if settings.strongly_typed else "weak",
        "builder_flags": ",".join(settings.builder_flags()),
        "tf32": "on" if settings.tf32 else "off",
        "fp32_pins": str(len(settings.fp32_pins)),
        "max_aux_streams": str(settings.max_aux_streams),
    }
    if aux_streams_used is not None:
        options["aux_streams"] = str(aux_streams_used)
    return options


def aux_streams_used(engine: Any) -> int | None:
    """``ICudaEngine.num_aux_streams`` (TensorRT 8.6+): the auxiliary streams the engine runs layers on, at
    most the ``max_aux_streams`` it was built with (fewer where TensorRT finds too little parallelism or no
    gain); None where the binding lacks it."""
    value = getattr(engine, "num_aux_streams", None)
    return None if value is None else int(value)


def _stored_aux_streams(meta: Mapping[str, Any]) -> int | None:
    """The ``aux_streams.used`` count an ``engine.json`` records, or None."""
    record = meta.get("aux_streams")
    used = record.get("used") if isinstance(record, Mapping) else None
    return int(used) if isinstance(used, int) else None


@dataclass(frozen=True)
class _Shapes:
    shapes: tuple[ShapeRange, ...]


def _opt_shapes(engine: Engine) -> _Shapes:
    """Opt shapes from an Engine record (for the inspector of a plan without ``engine.json``)."""
    return _Shapes(tuple(ShapeRange(name, shape, shape, shape) for name, shape in engine.inputs.items()))


def _plan_path(engine: Engine) -> Path:
    for path in engine.artifacts:
        if Path(path).suffix in (".plan", ".engine", ".trt"):
            return Path(path)
    raise InputError("the Engine lists no .plan file; rebuild it with TensorRTBuilder.build")


def engine_from_plan(plan: str | Path, device: str = "cuda:0") -> Engine:
    """An :class:`Engine` record for an existing plan file (and its ``engine.json`` beside it, if any);
    the plan is deserialized only when it is timed or run."""
    plan = Path(plan)
    if not plan.is_file():
        raise InputError(f"engine plan {plan} not found; give the path of a TensorRT .plan file")
    meta_path = plan.with_name(META_NAME)
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    settings = meta.get("settings", {})
    try:
        options = engine_options(TrtBuildSettings.from_dict(settings), _stored_aux_streams(meta)) if settings else {}
    except (TypeError, KeyError, ValueError):  # an engine.json from another writer: no options known
        options = {}
    return Engine(
        backend="tensorrt",
        device=str(settings.get("device", device)),
        model_path=Path(meta.get("model", "")),
        artifacts=(plan, meta_path) if meta_path.is_file() else (plan,),
        inputs={s["name"]: tuple(s["opt"]) for s in settings.get("shapes", [])},
        build_seconds=float(meta.get("build_seconds", 0.0)),
        backend_version=str(meta.get("tensorrt_version", "")),
        layer_precisions=dict(meta.get("layer_precisions", {})),
        options=options,
    )


class TensorRTBuilder:
    """Builds explicit-quantization (Q/DQ) ONNX models into TensorRT engines and times them.

    The options are those of :func:`select_settings`; the defaults suit ``rexdeploy build``
    (``max_aux_streams=None``: an ensemble's predictors - 1, capped by the profile; 0 for other models).
    ``timing_cache`` defaults to ``<out_dir>/timing.cache``.
    """

    name = "tensorrt"
    pip_extra = "tensorrt"

    def __init__(
        self,
        *,
        typing: str = "auto",
        max_batch: int = 8,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        builder_optimization_level: int = 3,
        workspace_mib: int | None = None,
        timing_cache: str | Path | None = None,
        use_cuda_graph: bool = False,
        max_aux_streams: int | None = None,
    ) -> None:
        self.typing = typing
        self.max_batch = max_batch
        self.input_shapes = dict(input_shapes) if input_shapes else None
        self.builder_optimization_level = builder_optimization_level
        self.workspace_mib = workspace_mib
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.use_cuda_graph = use_cuda_graph
        self.max_aux_streams = max_aux_streams

    def available(self) -> bool:
        """True when ``tensorrt`` imports and a CUDA GPU is visible (never raises)."""
        try:
            import_tensorrt()
        except Exception:
            return False
        return device_count() > 0

    def version(self) -> str:
        return str(import_tensorrt().__version__)

    def settings_for(
        self,
        model: onnx.ModelProto | str | Path,
        profile: Profile,
        compute_capability: tuple[int, int] | None,
        out_dir: str | Path,
    ) -> TrtBuildSettings:
        """The settings :meth:`build` would use (pure; usable to write a trtexec command anywhere)."""
        cache = self.timing_cache or Path(out_dir) / CACHE_NAME
        return select_settings(
            profile,
            model,
            compute_capability,
            typing=self.typing,
            max_batch=self.max_batch,
            input_shapes=self.input_shapes,
            builder_optimization_level=self.builder_optimization_level,
            workspace_mib=self.workspace_mib,
            timing_cache=cache,
            use_cuda_graph=self.use_cuda_graph,
            max_aux_streams=self.max_aux_streams,
        )

    def build(self, model: Path, profile: Profile, out_dir: Path) -> Engine:
        """Compile ``model`` for ``profile``; writes ``engine.plan``, ``engine.json`` and
        ``timing.cache`` into ``out_dir``. The float layers run in the profile's float precision
        (:func:`rexdeploy_tensorrt.settings.float_precision`: a profile with neither fp16 nor bf16 gives a
        true FP32 engine, TF32 off); the nodes the model pins to FP32 are constrained to FP32."""
        trt = tensorrt_for_gpu()
        model, out_dir = Path(model), Path(out_dir)
        index = device_index(profile.device)
        gpu = device_info(index)
        if gpu is None:
            raise EngineUnavailableError(
                f"no CUDA GPU is visible as {profile.device} here; TensorRT builds on the target GPU: run "
                "the build there (rexdeploy_tensorrt.trtexec_command gives the trtexec line)"
            )
        proto = load_onnx(model)
        settings = self.settings_for(proto, profile, gpu.compute_capability, out_dir)
        findings = lint_qdq(_with_weights(model, proto), int4_block_sizes=profile.quantization.int4_block_sizes)
        hard = errors(findings)
        if hard:
            raise BuildError(
                f"{model.name}: {len(hard)} Q/DQ problem(s) TensorRT rejects; first: {hard[0].node}: {hard[0].message}"
            )
        check_tensorrt_version(str(trt.__version__), settings)
        if index != 0:
            from rexdeploy_tensorrt.timing import _Cuda

            _Cuda().call("cudaSetDevice", index)

        cache_path = Path(settings.timing_cache) if settings.timing_cache else out_dir / CACHE_NAME
        start = time.perf_counter()
        nodes = {n.name for n in proto.graph.node if n.name}
        plan, cache, pinned = build_plan(trt, model, settings, cache_path, nodes)
        build_seconds = time.perf_counter() - start

        out_dir.mkdir(parents=True, exist_ok=True)
        plan_path, meta_path = out_dir / PLAN_NAME, out_dir / META_NAME
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(plan)
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(cache)

        with SINK.collect() as log:
            runtime = trt.Runtime(process_logger(trt))
            _RUNTIMES.append(runtime)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BuildError(
                    f"TensorRT could not load the engine it just built from {model.name}: "
                    f"{log.summary() or 'no error logged'}; rebuild it"
                )
            information = engine_information(trt, engine, settings)
            aux_used = aux_streams_used(engine)
        precisions = layer_precisions(information)
        summary = precision_summary(information)
        pins = {
            "nodes": list(settings.pinned_nodes),
            "applied": settings.pins_apply,
            "layers": [pin_record(p) for p in pinned],
            "unmatched": unmatched_pins(settings.pinned_nodes, pinned) if settings.pins_apply else [],
        }
        meta = {
            "model": str(model),
            "plan": PLAN_NAME,
            "tensorrt_version": str(trt.__version__),
            "device_name": gpu.name,
            "compute_capability": list(gpu.compute_capability),
            "build_seconds": build_seconds,
            "settings": settings.to_dict(),
            "float_precision": settings.float_precision,
            "layer_precisions": precisions,
            "precision_summary": summary,
            "fp32_pins": pins,
            "aux_streams": {"max": settings.max_aux_streams, "predictors": settings.predictors, "used": aux_used},
            "lint_warnings": [str(f) for f in findings],
        }
        write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True))
        return Engine(
            backend=self.name,
            device=profile.device,
            model_path=model,
            artifacts=(plan_path, meta_path, cache_path),
            inputs={s.name: s.opt for s in settings.shapes},
            build_seconds=build_seconds,
            backend_version=str(trt.__version__),
            layer_precisions=precisions,
            options=engine_options(settings, aux_used),
            handle=engine,
        )

    def default_float_precision(self, profile: Profile) -> str:
        """TensorRT's default float on ``profile``'s GPU, built beside the FP32 reference: ``fp16`` when the
        profile allows fp16, ``bf16`` when only bf16, else ``fp32`` (pure: no TensorRT import). A profile
        variant with only that flag builds it; one with neither builds the FP32 reference."""
        return default_float_precision(profile)

    def precision_summary(self, engine: Engine) -> dict[str, dict[str, int]]:
        """Engine layer type → precision → count, from the engine inspector (stored in ``engine.json`` at
        build time; read from the plan for an engine without it); see
        :func:`rexdeploy_tensorrt.engine_info.precision_summary`."""
        meta = _read_meta(engine)
        stored = meta.get("precision_summary")
        if isinstance(stored, dict):
            return {str(k): {str(p): int(n) for p, n in v.items()} for k, v in stored.items()}
        trt = tensorrt_for_gpu()
        runtime, cuda_engine = self._engine(trt, engine)
        settings = TrtBuildSettings.from_dict(meta["settings"]) if "settings" in meta else None
        shapes = settings if settings is not None else _opt_shapes(engine)
        information = engine_information(trt, cuda_engine, shapes)
        del runtime
        return precision_summary(information)

    def aux_streams(self, engine: Engine) -> int | None:
        """The auxiliary streams ``engine`` runs layers on (``ICudaEngine.num_aux_streams``): stored in
        ``engine.json`` at build time, else read from the live handle or the deserialized plan; None where the
        TensorRT binding does not expose it."""
        stored = _stored_aux_streams(_read_meta(engine))
        if stored is not None:
            return stored
        trt = tensorrt_for_gpu()
        runtime, cuda_engine = self._engine(trt, engine)
        used = aux_streams_used(cuda_engine)
        del runtime
        return used

    def load(self, plan: Path, profile: Profile) -> Engine:
        """An already-built engine (``engine.plan`` with its ``engine.json``): no rebuild."""
        return engine_from_plan(plan, profile.device)

    def _engine(self, trt: Any, engine: Engine) -> tuple[Any, Any]:
        """(runtime or None, ICudaEngine): the live handle, else the plan deserialized."""
        if engine.handle is not None and hasattr(engine.handle, "create_execution_context"):
            return None, engine.handle
        with SINK.collect() as log:
            runtime = trt.Runtime(process_logger(trt))
            loaded = runtime.deserialize_cuda_engine(_plan_path(engine).read_bytes())
        if loaded is None:
            raise BuildError(
                f"TensorRT {trt.__version__} cannot load {_plan_path(engine)} ({log.summary() or 'no error logged'}); "
                "a plan runs only with the TensorRT version and GPU that built it: rebuild it here"
            )
        return runtime, loaded

    def time(self, engine: Engine, settings: TimingSettings) -> Timing:
        """Latency of ``engine`` (GPU compute with CUDA events; host↔device copies reported apart)."""
        from rexdeploy_tensorrt.timing import time_engine

        trt = tensorrt_for_gpu()
        meta = _read_meta(engine)
        use_graph = self.use_cuda_graph or bool(meta.get("settings", {}).get("use_cuda_graph", False))
        runtime, cuda_engine = self._engine(trt, engine)
        timing = time_engine(trt, cuda_engine, device_index(engine.device), settings, use_graph)
        del runtime
        return timing

    def layer_times(self, engine: Engine, settings: TimingSettings) -> LayerTimes:
        """Per-ONNX-node µs from TensorRT's ``IProfiler`` (warm-up unprofiled, then ``settings.runs`` or
        ``duration_s`` of profiled runs, never in a CUDA graph), mapped to the ONNX nodes of the engine's
        model through the inspector's layer metadata; see :mod:`rexdeploy_tensorrt.layer_profile`."""
        from rexdeploy_tensorrt.layer_profile import inspector_metadata, layer_times_from_totals, profile_engine

        trt = tensorrt_for_gpu()
        runtime, cuda_engine = self._engine(trt, engine)
        sink, information = profile_engine(trt, cuda_engine, device_index(engine.device), settings)
        del runtime
        return layer_times_from_totals(
            sink.totals_ms,
            sink.runs,
            inspector_metadata(information),
            _onnx_index(engine.model_path),
            f"TensorRT {trt.__version__} IProfiler",
        )

    def run(self, engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One inference; outputs in the engine's (= the ONNX model's) output order."""
        from rexdeploy_tensorrt.timing import run_engine

        trt = tensorrt_for_gpu()
        runtime, cuda_engine = self._engine(trt, engine)
        outputs = run_engine(trt, cuda_engine, device_index(engine.device), inputs)
        del runtime
        return outputs
