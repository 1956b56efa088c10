"""Export a build directory as an NVIDIA Triton Inference Server model repository (scale-out serving).

``export_triton(build_dir, repo)`` writes ``repo/<name>/config.pbtxt`` and ``repo/<name>/1/<engine file>``:

* OpenVINO IR (``model.xml`` / ``model.bin``) → ``backend: "openvino"``, ``KIND_CPU`` instances and the backend
  parameters the Triton OpenVINO backend reads (``PERFORMANCE_HINT``, ``NUM_STREAMS``, ``ENABLE_BATCH_PADDING``);
* TensorRT plan (``engine.plan``) → ``backend: "tensorrt"`` / ``platform: "tensorrt_plan"``, ``KIND_GPU``;
* ONNX Runtime (the ``.onnx`` itself) → ``backend: "onnxruntime"`` / ``platform: "onnxruntime_onnx"``, ``KIND_CPU``;
* ``backend="python"`` (OpenVINO engines): ``backend: "python"``, ``KIND_CPU``, the IR with its
  ``runtime_options.json`` and ``1/model.py`` (``rexdeploy/triton_python/model.py``), which compiles the IR with
  the options the engine was measured with (Triton's OpenVINO backend cannot set the inference precision).
  Config parameters tell it where its packages are (Triton's Python stub ignores ``PYTHONPATH``):
  ``REXDEPLOY_SITE_PACKAGES``, and the Python version (``REXDEPLOY_PYTHON``) its stub must run.

Inputs and outputs (names, ``TYPE_*`` data types, dims) come from the ONNX the engine was built from
(``expanded.onnx`` or ``fp32.onnx``). A dynamic first axis on every input and output is the batch axis: it becomes
``max_batch_size`` and is left out of ``dims``. REx ensembles are already one engine (the predictors run
concurrently inside it), so no Triton ensemble model is written.

The config is checked by parsing it against Triton's ``ModelConfig`` protobuf schema when ``tritonclient`` is
installed (``pip install 'rexdeploy[triton]'``); without it the export still succeeds and says the check was skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from rexdeploy.errors import InputError
from rexdeploy.fileio import atomic_dir

WHICH = ("rex", "fp32")
ENGINE_BACKENDS = ("openvino", "tensorrt", "onnxruntime")
PYTHON_BACKEND = "python"
MODEL_PY = Path(__file__).resolve().parent / "triton_python" / "model.py"
DEFAULT_OPENVINO_MAX_BATCH = 1  # the IR is built and timed at batch 1 (latency hint); --max-batch raises it
DEFAULT_TENSORRT_MAX_BATCH = 8  # the TensorRT builder's default optimization-profile max batch

# ONNX TensorProto element type → Triton model_config.proto DataType
_DATA_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton sees it (dims without the batch axis when batching)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class TritonConfig:
    """The content of one ``config.pbtxt``."""

    name: str
    backend: str
    platform: str | None
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_count: int
    instance_kind: str  # KIND_CPU / KIND_GPU
    parameters: dict[str, str] = field(default_factory=dict)
    dynamic_batching: bool = False

    def to_pbtxt(self) -> str:
        """Protobuf text format of Triton's ``ModelConfig`` message."""
        lines = [f"name: {_quote(self.name)}", f"backend: {_quote(self.backend)}"]
        if self.platform:
            lines.append(f"platform: {_quote(self.platform)}")
        lines.append(f"max_batch_size: {self.max_batch_size}")
        for key, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                dims = ", ".join(str(d) for d in spec.dims)
                lines += [
                    f"{key} {{",
                    f"  name: {_quote(spec.name)}",
                    f"  data_type: {spec.data_type}",
                    f"  dims: [ {dims} ]",
                    "}",
                ]
        lines += ["instance_group {", f"  count: {self.instance_count}", f"  kind: {self.instance_kind}", "}"]
        if self.dynamic_batching:
            lines.append("dynamic_batching {}")
        for key, value in self.parameters.items():
            lines.append(f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} }} }}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TritonExport:
    """What :func:`export_triton` wrote."""

    repository: Path
    model_dir: Path
    config: TritonConfig
    files: tuple[str, ...]  # paths relative to ``model_dir``
    validated: bool  # parsed against Triton's ModelConfig schema (False: tritonclient not installed)
    notes: tuple[str, ...] = ()


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string


def validate_config(text: str) -> bool:
    """Parse ``text`` as Triton's ``ModelConfig``; False when tritonclient is not installed, InputError if invalid."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return False
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(f"the generated config.pbtxt is not a valid Triton ModelConfig: {exc}") from exc
    return True


def _specs(values: Any, batching: bool) -> tuple[TensorSpec, ...]:
    specs = []
    for vi in values:
        tensor = vi.type.tensor_type
        data_type = _DATA_TYPES.get(tensor.elem_type)
        if data_type is None:
            name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise InputError(f"tensor {vi.name!r} has ONNX type {name}, which Triton has no data type for")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        specs.append(TensorSpec(vi.name, data_type, tuple(dims[1:] if batching else dims)))
    return tuple(specs)


def _batch_axis_dynamic(model: onnx.ModelProto) -> bool:
    """True when every graph input and output has a dynamic first axis (the batch axis)."""
    initializers = {t.name for t in model.graph.initializer}
    values = [vi for vi in model.graph.input if vi.name not in initializers] + list(model.graph.output)
    for vi in values:
        dims = vi.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return True


def _engine_files(build_dir: Path, which: str) -> tuple[str, list[Path], Path]:
    """(engine kind, engine artifact paths, ONNX it was built from) for ``which`` in ``build_dir``."""
    report_path = build_dir / "report.json"
    report: dict[str, Any] = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{report_path} is not readable JSON ({exc}): rebuild with rexdeploy build") from exc
    fp32_plan = not report.get("plan", {}).get("layers", {"?": 1})  # the loop may return the exact FP32 engine
    if which == "rex" and not fp32_plan:
        artifacts = report.get("rex", {}).get("artifacts") or ["rex/"]
        onnx_path = build_dir / "expanded.onnx"
    else:
        artifacts = report.get("baselines", {}).get("fp32", {}).get("artifacts") or ["fp32/"]
        onnx_path = build_dir / "fp32.onnx"
    engine_dir = (build_dir / artifacts[0]).parent if not artifacts[0].endswith("/") else build_dir / artifacts[0]
    candidates = [build_dir / a for a in artifacts if not a.endswith("/")] or sorted(engine_dir.glob("*"))
    files = [p for p in candidates if p.is_file()]
    names = {p.name: p for p in files}
    if "model.xml" in names and "model.bin" in names:
        return "openvino", [names["model.xml"], names["model.bin"]], onnx_path
    plans = [p for p in files if p.suffix in (".plan", ".engine", ".trt")]
    if plans:
        return "tensorrt", plans[:1], onnx_path
    onnx_files = [p for p in files if p.suffix == ".onnx"]
    if onnx_files and report.get("engine") == "onnxruntime":
        return "onnxruntime", onnx_files[:1], onnx_path
    raise InputError(
        f"no {which} engine in {build_dir} (looked for model.xml + model.bin or engine.plan in {engine_dir}): "
        "give the output directory of a finished rexdeploy build"
    )


def export_triton(
    build_dir: str | Path,
    repository: str | Path,
    *,
    name: str | None = None,
    max_batch: int | None = None,
    instances: int = 1,
    which: str = "rex",
    backend: str | None = None,
) -> TritonExport:
    """Write ``repository/<name>/config.pbtxt`` + ``repository/<name>/1/<engine>`` from a ``rexdeploy build`` output.

    ``which`` picks the REx engine (``rex``) or the FP32 baseline (``fp32``). ``max_batch`` is Triton's
    ``max_batch_size`` (only for models with a dynamic batch axis; default: 1 for OpenVINO, the engine's
    optimization-profile maximum for TensorRT). ``instances`` is the instance-group count (for OpenVINO also
    ``NUM_STREAMS``). Other models already in ``repository`` are left alone; ``<name>`` is replaced atomically.
    ``backend``: None (or the engine's own name) for the engine's Triton backend; ``"python"`` for a
    Python-backend model serving an OpenVINO engine with its runtime options (``rexdeploy serve`` runs it).
    """
    build_dir = Path(build_dir)
    if which not in WHICH:
        raise InputError(f"unknown engine {which!r}: use one of {', '.join(WHICH)}")
    if not build_dir.is_dir():
        raise InputError(f"build directory {build_dir} not found: run rexdeploy build MODEL.onnx --out DIR first")
    if instances < 1:
        raise InputError(f"--instances {instances} must be at least 1")
    if max_batch is not None and max_batch < 0:
        raise InputError(f"--max-batch {max_batch} must be 0 (no batching) or more")
    kind, engine_files, onnx_path = _engine_files(build_dir, which)
    python = _python_backend(backend, kind)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path} not found: the build directory is incomplete, rebuild it with rexdeploy build")
    report_model = _report_field(build_dir, "model")
    model_name = name or (Path(report_model).stem if report_model else build_dir.name) + (
        "_fp32" if which == "fp32" else ""
    )
    model_name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name) if name is None else model_name
    if not _NAME.match(model_name):
        raise InputError(f"model name {model_name!r} is not a valid Triton model directory name: use [A-Za-z0-9_.-]")

    model = onnx.load(str(onnx_path), load_external_data=False)
    dynamic = _batch_axis_dynamic(model)
    notes: list[str] = []
    if not dynamic and max_batch:
        raise InputError(
            f"{onnx_path.name} has a fixed batch axis, so Triton cannot batch it: leave out --max-batch "
            "(max_batch_size 0) or export the model with a dynamic first axis"
        )
    if dynamic:
        default = DEFAULT_OPENVINO_MAX_BATCH if kind == "openvino" else _trt_max_batch(engine_files[0])
        batch = default if max_batch is None else max_batch
        if kind == "tensorrt" and batch > _trt_max_batch(engine_files[0]):
            raise InputError(
                f"--max-batch {batch} exceeds the TensorRT engine's optimization profile "
                f"(max batch {_trt_max_batch(engine_files[0])}): rebuild with a larger max batch or lower --max-batch"
            )
    else:
        batch = 0
    batching = batch > 0
    initializers = {t.name for t in model.graph.initializer}
    inputs = _specs([vi for vi in model.graph.input if vi.name not in initializers], batching)
    outputs = _specs(model.graph.output, batching)

    parameters: dict[str, str] = {}
    if python:
        parameters = python_parameters(_report_field(build_dir, "device") or "CPU")
        notes.append(
            f"model.py imports numpy and openvino from {parameters['REXDEPLOY_SITE_PACKAGES']} and needs Triton's "
            f"Python {parameters['REXDEPLOY_PYTHON']} stub (rexdeploy serve starts the server with it)"
        )
    elif kind == "openvino":
        # Triton OpenVINO backend parameters (triton-inference-server/openvino_backend README)
        parameters["PERFORMANCE_HINT"] = "LATENCY" if instances == 1 else "THROUGHPUT"
        parameters["NUM_STREAMS"] = str(instances)
        threads = _stored_threads(engine_files[0].with_name("runtime_options.json"))
        if threads and instances == 1:  # the build measured fewer threads faster (rexdeploy.runtime_threads)
            parameters["INFERENCE_NUM_THREADS"] = threads
        elif threads:
            notes.append(f"the engine was measured on {threads} inference thread(s) per request; with {instances} "
                         "instances (THROUGHPUT) OpenVINO shares its threads among the streams itself")  # fmt: skip
        if batch > 1:  # the backend compiles the IR at max_batch_size: pad smaller batches instead of failing
            parameters["ENABLE_BATCH_PADDING"] = "YES"
            notes.append(
                f"OpenVINO compiles the model at batch {batch}; smaller batches are padded (ENABLE_BATCH_PADDING)"
            )
    backend_name, platform, filename, instance_kind = {
        "openvino": ("openvino", None, "model.xml", "KIND_CPU"),
        "tensorrt": ("tensorrt", "tensorrt_plan", "model.plan", "KIND_GPU"),
        "onnxruntime": ("onnxruntime", "onnxruntime_onnx", "model.onnx", "KIND_CPU"),
    }[kind]
    if python:
        backend_name = PYTHON_BACKEND
    if kind == "tensorrt":
        version = _report_engine_field(build_dir, which, "backend_version")
        notes.append(
            f"a TensorRT plan runs only with the TensorRT version that built it ({version or 'see report.json'}) "
            "on the same GPU model: pick the tritonserver container that ships it"
        )
    config = TritonConfig(
        name=model_name,
        backend=backend_name,
        platform=platform,
        max_batch_size=batch,
        inputs=inputs,
        outputs=outputs,
        instance_count=instances,
        instance_kind=instance_kind,
        parameters=parameters,
        dynamic_batching=batch > 1,
    )
    text = config.to_pbtxt()
    validated = validate_config(text)
    if not validated:
        notes.append("config.pbtxt not validated: pip install 'rexdeploy[triton]' to check it against Triton's schema")

    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise InputError(f"{repository} exists and is not a directory: give a model repository directory")
    target_names = [filename] if kind != "openvino" else ["model.xml", "model.bin"]
    if kind == "openvino":
        stored = engine_files[0].with_name("runtime_options.json")
        if stored.is_file():  # the options the engine was measured with travel beside the IR
            engine_files = [*engine_files, stored]
            target_names.append(stored.name)
            if not python:
                notes += _openvino_option_notes(stored)
        elif python:
            notes.append("no runtime_options.json beside the IR: model.py compiles it with OpenVINO's defaults")
    if python:
        if not MODEL_PY.is_file():
            raise InputError(
                f"{MODEL_PY} is missing from this rexdeploy install (a package built without "
                "rexdeploy.triton_python): install rexdeploy from its source tree (pip install -e .)"
            )
        engine_files = [MODEL_PY, *engine_files]
        target_names.insert(0, "model.py")
    with atomic_dir(repository / model_name) as tmp:
        (tmp / "1").mkdir()
        for source, target in zip(engine_files, target_names, strict=True):
            shutil.copyfile(source, tmp / "1" / target)
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
    files = ("config.pbtxt", *(f"1/{t}" for t in target_names))
    return TritonExport(repository, repository / model_name, config, files, validated, tuple(notes))


def _python_backend(backend: str | None, kind: str) -> bool:
    """True for the Python-backend model; InputError for a backend that cannot serve this engine."""
    if backend in (None, "", kind):
        return False
    if backend != PYTHON_BACKEND:
        choices = ", ".join((kind, PYTHON_BACKEND) if kind == "openvino" else (kind,))
        raise InputError(f"--backend {backend!r} cannot serve this build's {kind} engine: use {choices}")
    if kind != "openvino":
        raise InputError(
            f"--backend python serves OpenVINO engines; this build's engine is {kind}: leave out --backend "
            f"(Triton's {kind} backend serves it)"
        )
    return True


def package_dirs() -> list[str]:
    """The directories numpy and openvino import from here (where the exported model.py will look for them),
    falling back to this interpreter's site-packages for a package that is not installed."""
    dirs: list[str] = []
    missing = False
    for package in ("numpy", "openvino"):
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        parent = str(Path(locations[0]).parent) if locations else ""
        missing = missing or not parent
        if parent and parent not in dirs:
            dirs.append(parent)
    if missing:
        import site

        dirs += [d for d in site.getsitepackages() if d not in dirs]
    return dirs


def python_parameters(device: str = "CPU") -> dict[str, str]:
    """The config parameters the exported model.py reads: package directories, Python version, device."""
    return {
        "REXDEPLOY_SITE_PACKAGES": os.pathsep.join(package_dirs()),
        "REXDEPLOY_PYTHON": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "REXDEPLOY_DEVICE": device,
    }


def _stored_threads(stored: Path) -> str:
    """The ``INFERENCE_NUM_THREADS`` the engine was measured with ('' where its runtime options leave it to
    OpenVINO, or there are none)."""
    try:
        options = json.loads(stored.read_text(encoding="utf-8")).get("options", {})
    except (OSError, ValueError, AttributeError):
        return ""
    return str(options.get("INFERENCE_NUM_THREADS", "")) if isinstance(options, dict) else ""


def _openvino_option_notes(stored: Path) -> list[str]:
    """What Triton's OpenVINO backend will not reproduce of the engine's runtime options."""
    try:
        options = json.loads(stored.read_text(encoding="utf-8")).get("options", {})
    except (OSError, ValueError, AttributeError):
        return [f"{stored} is not readable: the engine's runtime options are unknown"]
    precision = options.get("INFERENCE_PRECISION_HINT", "")
    if precision != "f32":
        return []
    return [
        "the engine was measured with INFERENCE_PRECISION_HINT=f32, which Triton's OpenVINO backend cannot set: on "
        "a CPU whose OpenVINO default is bf16 (AVX-512 BF16, AMX) it serves the IR in bf16, and an engine with "
        "activation orders loses its fidelity there; serve it on an f32 CPU, or load 1/model.xml with the options "
        "in 1/runtime_options.json (DYNAMIC_QUANTIZATION_GROUP_SIZE travels inside the IR)"
    ]


def _report_field(build_dir: Path, key: str) -> str:
    try:
        return str(json.loads((build_dir / "report.json").read_text(encoding="utf-8")).get(key, ""))
    except (OSError, ValueError):
        return ""


def _report_engine_field(build_dir: Path, which: str, key: str) -> str:
    try:
        report = json.loads((build_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    entry = report.get("rex", {}) if which == "rex" else report.get("baselines", {}).get("fp32", {})
    return str(entry.get(key, ""))


def _trt_max_batch(plan: Path) -> int:
    """The max batch of the engine's optimization profile (``engine.json`` beside the plan), else the default."""
    meta = plan.with_name("engine.json")
    try:
        shapes = json.loads(meta.read_text(encoding="utf-8")).get("settings", {}).get("shapes", [])
        maxima = [int(s["max"][0]) for s in shapes if s.get("max")]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return DEFAULT_TENSORRT_MAX_BATCH
    return min(maxima) if maxima else DEFAULT_TENSORRT_MAX_BATCH
