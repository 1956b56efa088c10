"""Running and timing a TensorRT engine on its GPU (imports TensorRT and CUDA inside functions only).

CUDA binding: ``cuda-python``'s runtime module, ``cuda.bindings.runtime`` (``cuda-python`` ≥ 12.6.1;
the older ``from cuda import cudart`` layout is used when that is what is installed). It is what
TensorRT's own Python samples use (``samples/python/common_runtime.py``: ``cudaMalloc``,
``cudaMallocHost``, ``cudaMemcpyAsync``, ``context.set_tensor_address`` + ``execute_async_v3``), it
needs no deep-learning framework, and every call returns ``(err, value)`` so each is checked here.

Timing follows trtexec's conventions (DESIGN.md "Timing"): warm up by time, then a fixed number of
runs or a duration; every run is bracketed by CUDA events on the inference stream, so a sample is
GPU time for the engine alone ("GPU Compute Time"); inputs stay on the device between runs. Host→device
and device→host copies of all I/O tensors (pinned host memory) are timed apart, also with events, and
reported as their medians in ``Timing.h2d_ms`` / ``d2h_ms``. With ``use_cuda_graph`` the enqueue is
captured once into a CUDA graph (after one plain ``execute_async_v3``, as TensorRT's "CUDA Graphs"
section asks) and each run launches the graph.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rexdeploy.builders.base import TimingSettings
from rexdeploy.builders.timing import Timing, run_for, timing_from_samples, warm_up
from rexdeploy.errors import BuildError, EngineUnavailableError, InputError

COPY_SAMPLES = 20  # copies timed for the h2d / d2h medians


def timed_loop(
    run_ms: Callable[[], float],
    settings: TimingSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], int, float]:
    """Warm up for ``settings.warmup_s`` (at least one run), then collect ``run_ms()`` samples: exactly
    ``settings.runs`` when given, else until ``duration_s`` has passed and ``min_runs`` are in.
    Returns (samples in ms, warm-up runs, measured seconds)."""
    warmup_runs = warm_up(run_ms, settings.warmup_s, clock)
    samples: list[float] = []
    begin = clock()
    run_for(lambda: samples.append(float(run_ms())), settings, clock)
    return samples, warmup_runs, clock() - begin


def load_cudart() -> Any:
    """cuda-python's runtime API module."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6.1
        except ImportError:
            raise EngineUnavailableError(
                "running a TensorRT engine needs cuda-python; run pip install 'rexdeploy[tensorrt]'"
            ) from None
    return cudart


def _native(handle: Any) -> int:
    """The integer address of a cuda-python object (stream), as TensorRT's ``execute_async_v3`` takes it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(handle)
    return int(get_cuda_native_handle(handle))


class _Cuda:
    """Checked calls into the CUDA runtime: ``call("cudaMalloc", n)`` returns the value or raises."""

    def __init__(self) -> None:
        self.rt = load_cudart()

    def call(self, fn: str, *args: Any) -> Any:
        result = getattr(self.rt, fn)(*args)
        err = result[0]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise BuildError(f"CUDA {fn} failed with {name}; check the GPU and driver (nvidia-smi) and free GPU memory")
        rest = result[1:]
        return rest[0] if len(rest) == 1 else None


def _dtype(trt: Any, trt_dtype: Any, name: str) -> np.dtype[Any]:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError:
        raise BuildError(
            f"I/O tensor {name!r} has TensorRT type {trt_dtype}, which numpy cannot hold; keep the model's "
            "inputs and outputs float32/float16/int"
        ) from None


class EngineSession:
    """One execution context of an engine with device + pinned host buffers for its I/O tensors."""

    def __init__(self, trt: Any, engine: Any, device_index: int) -> None:
        self.trt = trt
        self.engine = engine
        self.cuda = _Cuda()
        self.cuda.call("cudaSetDevice", device_index)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BuildError("TensorRT could not create an execution context (GPU memory?); free GPU memory and retry")
        self.stream = self.cuda.call("cudaStreamCreate")
        self.start = self.cuda.call("cudaEventCreate")
        self.end = self.cuda.call("cudaEventCreate")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.device: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self.graph: Any = None
        self.graph_exec: Any = None

    # -- shapes and buffers -------------------------------------------------------------------
    def default_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Each input at its optimization-profile opt shape (static inputs as built), batch ``batch``."""
        shapes = {}
        for name in self.inputs:
            built = tuple(self.engine.get_tensor_shape(name))
            if all(d >= 0 for d in built):
                if built and built[0] != batch:
                    raise InputError(
                        f"input {name!r} is built for batch {built[0]}, not {batch}; time it with "
                        f"TimingSettings(batch={built[0]}) or rebuild with a dynamic batch"
                    )
                shapes[name] = built
                continue
            lo, opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            dims = list(opt)
            if built and built[0] < 0:
                if not lo[0] <= batch <= hi[0]:
                    raise InputError(
                        f"batch {batch} is outside the engine's range {lo[0]}..{hi[0]} for input {name!r}; "
                        "rebuild with a larger max_batch or time a smaller batch"
                    )
                dims[0] = batch
            shapes[name] = tuple(dims)
        return shapes

    def allocate(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Set input shapes, then allocate and bind every I/O tensor (device + pinned host)."""
        self.free_buffers()
        for name in self.inputs:
            if self.engine.is_shape_inference_io(name):
                raise BuildError(f"input {name!r} is a shape tensor; rexdeploy engines take data inputs only")
            if not self.context.set_input_shape(name, tuple(int(d) for d in shapes[name])):
                raise InputError(f"shape {tuple(shapes[name])} is not valid for input {name!r} of this engine")
        for name in self.inputs + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BuildError(
                    f"tensor {name!r} has a data-dependent shape {shape}; rexdeploy cannot time such engines"
                )
            dtype = _dtype(self.trt, self.engine.get_tensor_dtype(name), name)
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            self.device[name] = int(self.cuda.call("cudaMalloc", nbytes))
            self.pinned[name] = int(self.cuda.call("cudaMallocHost", nbytes))
            raw = np.ctypeslib.as_array(ctypes.cast(self.pinned[name], ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
            count = int(np.prod(shape, dtype=np.int64))
            self.host[name] = raw[: count * dtype.itemsize].view(dtype).reshape(shape)
            if not self.context.set_tensor_address(name, self.device[name]):
                raise BuildError(f"TensorRT refused the device address of tensor {name!r}")

    def free_buffers(self) -> None:
        for ptr in self.device.values():
            self.cuda.rt.cudaFree(ptr)
        for ptr in self.pinned.values():
            self.cuda.rt.cudaFreeHost(ptr)
        self.device, self.pinned, self.host = {}, {}, {}

    # -- work on the stream ---------------------------------------------------------------------
    def _copy(self, names: Sequence[str], to_device: bool) -> None:
        kind = (
            self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            if to_device
            else self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        )
        for name in names:
            nbytes = self.host[name].nbytes
            if nbytes == 0:
                continue
            dst, src = (self.device[name], self.pinned[name]) if to_device else (self.pinned[name], self.device[name])
            self.cuda.call("cudaMemcpyAsync", dst, src, nbytes, kind, self.stream)

    def h2d(self) -> None:
        self._copy(self.inputs, to_device=True)

    def d2h(self) -> None:
        self._copy(self.outputs, to_device=False)

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(_native(self.stream)):
            raise BuildError("TensorRT execute_async_v3 failed; run with the same TensorRT that built the engine")

    def capture_graph(self) -> None:
        """Capture one enqueue into a CUDA graph (after a plain enqueue has set up the context)."""
        rt = self.cuda.rt
        self.enqueue()
        self.sync()
        self.cuda.call("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
        try:
            self.enqueue()
        finally:
            err, graph = rt.cudaStreamEndCapture(self.stream)
        if err != rt.cudaError_t.cudaSuccess or graph is None:
            raise BuildError("this engine cannot be captured in a CUDA graph; build with use_cuda_graph=False")
        self.graph = graph
        self.graph_exec = self.cuda.call("cudaGraphInstantiate", graph, 0)

    def launch_graph(self) -> None:
        self.cuda.call("cudaGraphLaunch", self.graph_exec, self.stream)

    def sync(self) -> None:
        self.cuda.call("cudaStreamSynchronize", self.stream)

    def time_ms(self, work: Callable[[], None]) -> float:
        """GPU milliseconds ``work`` takes on the stream, between two CUDA events."""
        self.cuda.call("cudaEventRecord", self.start, self.stream)
        work()
        self.cuda.call("cudaEventRecord", self.end, self.stream)
        self.cuda.call("cudaEventSynchronize", self.end)
        return float(self.cuda.call("cudaEventElapsedTime", self.start, self.end))

    def close(self) -> None:
        rt = self.cuda.rt
        if self.graph_exec is not None:
            rt.cudaGraphExecDestroy(self.graph_exec)
        if self.graph is not None:
            rt.cudaGraphDestroy(self.graph)
        self.free_buffers()
        rt.cudaEventDestroy(self.start)
        rt.cudaEventDestroy(self.end)
        rt.cudaStreamDestroy(self.stream)
        self.context = None

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _random_fill(host: Mapping[str, np.ndarray], names: Sequence[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        arr = host[name]
        if np.issubdtype(arr.dtype, np.floating):
            arr[...] = rng.standard_normal(arr.shape).astype(arr.dtype)
        elif arr.dtype == np.bool_:
            arr[...] = rng.random(arr.shape) > 0.5
        else:
            arr[...] = rng.integers(0, 8, size=arr.shape).astype(arr.dtype)


def time_engine(trt: Any, engine: Any, device_index: int, settings: TimingSettings, use_cuda_graph: bool) -> Timing:
    """Latency statistics of ``engine`` at batch ``settings.batch`` (compute only; copies apart)."""
    with EngineSession(trt, engine, device_index) as session:
        session.allocate(session.default_shapes(settings.batch))
        _random_fill(session.host, session.inputs, settings.seed)
        session.h2d()
        session.sync()
        if use_cuda_graph:
            session.capture_graph()
            launch = session.launch_graph
        else:
            launch = session.enqueue
        samples, warmup_runs, seconds = timed_loop(lambda: session.time_ms(launch), settings)
        h2d = [session.time_ms(session.h2d) for _ in range(COPY_SAMPLES)] if session.inputs else [0.0]
        d2h = [session.time_ms(session.d2h) for _ in range(COPY_SAMPLES)] if session.outputs else [0.0]
    return timing_from_samples(
        samples,
        warmup_runs=warmup_runs,
        warmup_s=settings.warmup_s,
        duration_s=seconds,
        batch=settings.batch,
        h2d_ms=float(np.median(h2d)),
        d2h_ms=float(np.median(d2h)),
    )


def run_engine(trt: Any, engine: Any, device_index: int, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """One inference: copy ``inputs`` in, run, copy the outputs back (engine output order)."""
    with EngineSession(trt, engine, device_index) as session:
        missing = sorted(set(session.inputs) - set(inputs))
        extra = sorted(set(inputs) - set(session.inputs))
        if missing or extra:
            raise InputError(
                f"engine inputs are {session.inputs}; missing {missing}, unknown {extra}: pass one array per input"
            )
        session.allocate({name: np.shape(inputs[name]) for name in session.inputs})
        for name in session.inputs:
            session.host[name][...] = np.asarray(inputs[name]).astype(session.host[name].dtype, copy=False)
        session.h2d()
        session.enqueue()
        session.d2h()
        session.sync()
        return [session.host[name].copy() for name in session.outputs]
