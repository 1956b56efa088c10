"""Which TensorRT build settings a Profile and a Q/DQ ONNX model call for (pure: no TensorRT import).

The choices, each with the TensorRT 10.x documentation it follows:

* **Strongly vs weakly typed network.** TensorRT's guidance is "use explicit quantization with Strong
  Typing; precision-control build flags are not required and should not be specified"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html).
  A strongly typed network takes every tensor type from the ONNX, so it is chosen when the model is
  *fully typed*: ONNX type inference gives every tensor an element type, **and** the float precision the
  profile wants is already written in the graph (float16 / bfloat16 tensors present, or the float
  precision is fp32). rexdeploy's passes emit float32 graphs with int8 Q/DQ; for a profile whose float
  precision is fp16 or bf16 such a graph falls back to a *weakly typed* network with precision flags
  (exactly one of ``FP16``/``BF16``, plus ``INT8`` for the Q/DQ layers, TensorRT 10 ``BuilderFlag``s),
  which lets TensorRT run the layers left in float in that precision. Weak typing is deprecated since
  TensorRT 10.12 and removed in 11
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html);
  cast the graph to float16 (or pass ``typing="strong"``) for a strongly typed build.
* **The float precision follows the profile** (:func:`float_precision`, the cost model's
  :func:`rexdeploy.costmodel.float_precision`): ``fp16`` when ``[quantization] fp16``, else ``bf16`` when
  ``bf16``, else ``fp32``. Only that one reduced-precision flag is set, so the engine's float layers run
  in the precision the planner and the fidelity model assume; a profile with neither flag builds a true
  FP32 engine (the FP32 reference: no FP16/BF16 flag, strongly typed for a float32 graph). **TF32 is
  always off** (``BuilderFlag.TF32`` cleared, trtexec ``--noTF32``): TensorRT enables it by default and
  it rounds FP32 convolution / matrix inputs to a 10-bit mantissa, so an "fp32" layer would not be.
* **FP32 pins** (:mod:`rexdeploy.pins`): ONNX nodes the expansion pass lists under
  ``rexdeploy.fp32_nodes`` run in FP32 inside a reduced-precision engine: weakly typed, their layers get
  ``precision = float32`` and float32 output types with ``OBEY_PRECISION_CONSTRAINTS``
  (:mod:`rexdeploy_tensorrt.precision_pins`); strongly typed, the graph's own types must already be
  float32 there (checked).
* **INT8** comes from explicit quantization only (Q/DQ in the graph): no calibrator is ever used.
* **FP8** only when the profile allows it and the GPU is SM 8.9 or newer (Ada, Hopper); **BF16** needs
  SM 8.0+. ``compute_capability=None`` (planning on a machine without the target GPU) trusts the profile.
* **INT4** weight-only only when ``profile.quantization.int4_weight_only``; ``BuilderFlag.INT4`` and
  trtexec ``--int4`` exist from TensorRT 10.1 (:func:`check_tensorrt_version`).
* **Auxiliary streams** (``IBuilderConfig.max_aux_streams``, trtexec ``--maxAuxStreams``, TensorRT 8.6+:
  the 10.1 floor covers it). A REx ensemble of M predictors (:mod:`rexdeploy.passes.ensemble`: M independent
  branches meeting at ``<tensor>__ensemble_sum`` nodes) gets ``M - 1`` auxiliary streams, at most the
  profile's ``[parallel] aux_streams`` (:func:`aux_streams_for_predictors`, the rule of
  :func:`rexdeploy.planner.ensembles.aux_streams_for`), so its predictors can run at once ("Within-Inference
  Multi-Streaming"). Any other model gets **0**, not TensorRT's default: unset, TensorRT picks a count by
  its own heuristics (``include/NvInfer.h``, ``setMaxAuxStreams``), and may then overlap a dense
  expansion's order branches — which the cost model prices one after the other, which holds extra
  activation memory (blocks on different streams are not reused), and which would make the engine's
  stream count depend on TensorRT's version rather than on the plan. ``max_aux_streams=N`` overrides
  (``-1``: leave it to TensorRT's heuristics; nothing is set and trtexec gets no ``--maxAuxStreams``).
* One optimization profile: a dynamic batch dimension becomes min 1 / opt 1 / max ``max_batch``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from rexdeploy import costmodel
from rexdeploy.errors import BuildError, ModelError
from rexdeploy.pins import FP32_NODES_KEY, fp32_nodes
from rexdeploy.profile import Profile

FP8_MIN_CC = (8, 9)
INT4_MIN_TRT = (10, 1)  # BuilderFlag.INT4 and trtexec --int4 appeared in TensorRT 10.1
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
BF16_MIN_CC = (8, 0)
TYPINGS = ("auto", "strong", "weak")
OPT_LEVELS = range(0, 6)  # builder_optimization_level: 0..5, TensorRT's default is 3
HEURISTIC_AUX_STREAMS = -1  # max_aux_streams left unset: TensorRT's own heuristics choose (its default)
# the Sum nodes where rexdeploy.passes.ensemble adds up the predictors (one input per predictor)
ENSEMBLE_SUM_SUFFIX = "__ensemble_sum"

_REDUCED_FLOATS: set[int] = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_QUANT_TYPE_NAMES: dict[int, str] = {
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.FLOAT8E4M3FN: "fp8",
    TensorProto.FLOAT8E4M3FNUZ: "fp8e4m3fnuz",
    TensorProto.FLOAT8E5M2: "fp8e5m2",
    TensorProto.FLOAT8E5M2FNUZ: "fp8e5m2fnuz",
}


@dataclass(frozen=True)
class ShapeRange:
    """The optimization-profile shapes of one network input (min / opt / max, batch first)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return not (self.min == self.opt == self.max)


@dataclass(frozen=True)
class TrtBuildSettings:
    """Everything the TensorRT builder is told, chosen once and stored next to the engine.

    ``float_precision`` is the one precision the float layers run in ("fp32", "fp16" or "bf16");
    ``fp16``/``bf16`` say whether that is fp16 / bf16 (at most one is true); ``fp8``/``int4`` say which
    quantized types the profile and GPU allow; ``int8`` says the model holds int8 Q/DQ. ``tf32`` is
    always False (TF32 cleared: an fp32 layer is fp32). ``fp32_pins`` are the (ONNX node, op type)
    pairs pinned to FP32 (:mod:`rexdeploy.pins`). In a strongly typed network the precisions come from
    the graph, so :meth:`builder_flags` is empty; in a weakly typed one it lists the flags.
    ``max_aux_streams`` is what the builder config gets (:data:`HEURISTIC_AUX_STREAMS`: not set);
    ``predictors`` is the model's ensemble predictor count it was chosen from (1: not an ensemble).
    """

    profile_name: str
    device: str
    strongly_typed: bool
    typing_reason: str
    fp16: bool
    bf16: bool
    int8: bool
    fp8: bool
    int4: bool
    max_aux_streams: int
    shapes: tuple[ShapeRange, ...] = ()
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: str | None = None
    use_cuda_graph: bool = False
    profiling_verbosity: str = "detailed"
    compute_capability: tuple[int, int] | None = None
    quantized_types: tuple[str, ...] = field(default=())
    float_precision: str = "fp32"
    tf32: bool = False
    fp32_pins: tuple[tuple[str, str], ...] = ()
    predictors: int = 1

    @property
    def sets_aux_streams(self) -> bool:
        """True when the builder sets ``max_aux_streams`` (and trtexec gets ``--maxAuxStreams``); False leaves
        TensorRT's heuristics to choose."""
        return self.max_aux_streams != HEURISTIC_AUX_STREAMS

    @property
    def pinned_nodes(self) -> tuple[str, ...]:
        """The ONNX node names pinned to FP32."""
        return tuple(name for name, _ in self.fp32_pins)

    def builder_flags(self) -> tuple[str, ...]:
        """Names of the ``trt.BuilderFlag`` members to set (weakly typed networks only). FP16 or BF16
        (the float precision; never both) lets TensorRT run float layers in it; INT8/FP8/INT4 enable
        the Q/DQ types the model holds (FP8/INT4 only appear through explicit quantization, so they are
        set only when present); OBEY_PRECISION_CONSTRAINTS when FP32 pins constrain layers of a
        reduced-precision engine. ``TF32`` is cleared, never set (see :attr:`tf32`)."""
        if self.strongly_typed:
            return ()
        qtypes = set(self.quantized_types)
        wanted = (
            ("FP16", self.fp16),
            ("BF16", self.bf16),
            ("INT8", self.int8),
            ("FP8", self.fp8 and "fp8" in qtypes),
            ("INT4", self.int4 and "int4" in qtypes),
            ("OBEY_PRECISION_CONSTRAINTS", bool(self.fp32_pins) and self.float_precision != "fp32"),
        )
        return tuple(name for name, on in wanted if on)

    @property
    def pins_apply(self) -> bool:
        """True when the builder must constrain the pinned layers (weakly typed, reduced float precision);
        in an fp32 engine every float layer is already FP32, and strongly typed ones take the graph's types."""
        return bool(self.fp32_pins) and not self.strongly_typed and self.float_precision != "fp32"

    @property
    def dynamic(self) -> bool:
        """True when any input has a dynamic dimension (an optimization profile is needed)."""
        return any(s.dynamic for s in self.shapes)

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["shapes"] = [
            {"name": s.name, "min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for s in self.shapes
        ]
        raw["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        raw["quantized_types"] = list(self.quantized_types)
        raw["fp32_pins"] = [list(p) for p in self.fp32_pins]
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrtBuildSettings:
        values = dict(raw)
        values["shapes"] = tuple(
            ShapeRange(s["name"], tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for s in raw.get("shapes", ())
        )
        cc = raw.get("compute_capability")
        values["compute_capability"] = (int(cc[0]), int(cc[1])) if cc else None
        values["quantized_types"] = tuple(raw.get("quantized_types", ()))
        values["fp32_pins"] = tuple((str(p[0]), str(p[1])) for p in raw.get("fp32_pins", ()))
        if "float_precision" not in raw:  # engine.json written before the field: both flags meant "fp16 first"
            values["float_precision"] = "fp16" if raw.get("fp16") else "bf16" if raw.get("bf16") else "fp32"
        values.setdefault("tf32", True)  # ... and left TensorRT's default TF32 on
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrtBuildSettings:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ModelTypes:
    """What :func:`select_settings` needs to know about a model's types."""

    untyped: tuple[str, ...]  # tensors ONNX type inference leaves without an element type
    reduced_float: bool  # float16 / bfloat16 tensors present
    quantized_types: tuple[str, ...]  # element types carried by Q/DQ pairs ("int8", "int4", "fp8", ...)
    reduced_nodes: tuple[str, ...] = ()  # nodes with a float16 / bfloat16 output


def load_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The model itself, or the file read without its external weights (only types and shapes are used)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} not found; give the path of an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / ValueError / OSError
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None


def _constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    consts[node.output[0]] = attr.t
    return consts


def _q_output_type(node: onnx.NodeProto, elem: Mapping[str, int]) -> int | None:
    """Element type of a QuantizeLinear output / DequantizeLinear input, or None when unknown."""
    if len(node.input) > 2 and node.input[2] and node.input[2] in elem:
        return elem[node.input[2]]
    for attr in node.attribute:
        if attr.name == "output_dtype" and attr.i:
            return int(attr.i)
    if node.op_type == "DequantizeLinear" and node.input[0] in elem:
        return elem[node.input[0]]
    if node.op_type == "QuantizeLinear":
        return TensorProto.UINT8  # ONNX default when neither zero-point nor output_dtype is given
    return None


def model_types(model: onnx.ModelProto) -> ModelTypes:
    """Run ONNX type inference and report untyped tensors, reduced floats and Q/DQ element types."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is best effort; fall back to the declared value_info
        inferred = model
    graph = inferred.graph
    elem: dict[str, int] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            elem[vi.name] = vi.type.tensor_type.elem_type
    for name, tensor in _constants(graph).items():
        elem[name] = tensor.data_type
    untyped = sorted({o for n in graph.node for o in n.output if o and o not in elem})
    untyped += [vi.name for vi in graph.input if vi.name not in elem and vi.name not in untyped]
    reduced = any(t in _REDUCED_FLOATS for t in elem.values()) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i in _REDUCED_FLOATS for a in n.attribute) for n in graph.node
    )
    reduced_nodes = tuple(n.name for n in graph.node if any(elem.get(o) in _REDUCED_FLOATS for o in n.output))
    qtypes: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            t = _q_output_type(node, elem)
            if t is not None:
                qtypes.add(_QUANT_TYPE_NAMES.get(t, TensorProto.DataType.Name(t).lower()))
    return ModelTypes(
        untyped=tuple(untyped),
        reduced_float=reduced,
        quantized_types=tuple(sorted(qtypes)),
        reduced_nodes=reduced_nodes,
    )


def ensemble_predictors(model: onnx.ModelProto) -> int:
    """How many predictors ``model`` sums (the inputs of its ``<tensor>__ensemble_sum`` nodes, written by
    :func:`rexdeploy.passes.ensemble.build_ensemble`); 1 for a model that is not an ensemble."""
    counts = [
        len([t for t in n.input if t])
        for n in model.graph.node
        if n.op_type == "Sum" and n.name.endswith(ENSEMBLE_SUM_SUFFIX)
    ]
    return max(counts, default=1)


def aux_streams_for_predictors(profile: Profile, predictors: int) -> int:
    """``max_aux_streams`` for an engine running ``predictors`` ensemble predictors on ``profile``: one
    auxiliary stream per predictor beyond the first, at most the profile's ``[parallel] aux_streams``; 0 for a
    single predictor (the rule of :func:`rexdeploy.planner.ensembles.aux_streams_for`, from a predictor count
    read off the graph: the builder sees the ONNX, not the plan)."""
    return min(max(profile.parallel.aux_streams, 0), max(predictors - 1, 0))


def float_precision(profile: Profile) -> str:
    """The one precision a TensorRT engine of ``profile`` runs its float layers in: the cost model's
    (:func:`rexdeploy.costmodel.float_precision`: ``fp16`` when the profile allows fp16), else ``bf16``
    when the profile allows bf16 (a bf16-only profile), else ``fp32``."""
    chosen = costmodel.float_precision(profile)
    if chosen == "fp32" and profile.quantization.bf16:
        return "bf16"
    return chosen if chosen in FLOAT_PRECISIONS else "fp32"


def default_float_precision(profile: Profile) -> str:
    """TensorRT's "default float" on ``profile``'s GPU — what a user who builds the model with the reduced
    precision the GPU offers gets: ``fp16`` when the profile allows fp16, ``bf16`` when only bf16, else
    ``fp32``. The FP32 reference is a separate engine built with neither flag."""
    q = profile.quantization
    return "fp16" if q.fp16 else "bf16" if q.bf16 else "fp32"


def parse_version(version: str) -> tuple[int, int]:
    """``"10.13.0.35"`` → (10, 13); unparsable parts read 0."""
    parts = [*str(version).split("."), "0", "0"][:2]
    out = []
    for part in parts:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return out[0], out[1]


def check_tensorrt_version(version: str, settings: TrtBuildSettings) -> None:
    """Raise :class:`BuildError` when TensorRT ``version`` cannot build ``settings``: TensorRT 11+ builds
    strongly typed networks only; int4 weights need ``BuilderFlag.INT4`` / ``--int4``, which appeared in 10.1."""
    have = parse_version(version)
    if have[0] >= 11 and not settings.strongly_typed:
        raise BuildError(
            f"TensorRT {version} builds strongly typed networks only, but the settings are "
            f"{settings.typing_reason}; install tensorrt>=10.1,<11 or build with typing='strong'"
        )
    if "int4" in settings.quantized_types and have < INT4_MIN_TRT:
        raise BuildError(
            f"the model holds int4 weights, which need TensorRT 10.1 or newer (BuilderFlag.INT4, trtexec "
            f"--int4), but this is TensorRT {version}: pip install 'tensorrt>=10.1,<11' (or re-plan with int8 weights)"
        )


def _pins(model: onnx.ModelProto, types: ModelTypes, strongly_typed: bool) -> tuple[tuple[str, str], ...]:
    """The (node, op type) pairs the model pins to FP32; every pin must name a node of the graph, and in a
    strongly typed build (types from the graph) no pinned node may compute in float16 / bfloat16."""
    names = fp32_nodes(model)
    if not names:
        return ()
    ops = {n.name: n.op_type for n in model.graph.node if n.name}
    missing = [n for n in names if n not in ops]
    if missing:
        raise BuildError(
            f"the model's {FP32_NODES_KEY} metadata pins {len(missing)} node(s) the graph does not have (e.g. "
            f"{', '.join(missing[:3])}); a pass renamed or removed them after the expansion: re-run the expansion "
            "so the pins name the emitted nodes"
        )
    if strongly_typed:
        reduced = [n for n in names if n in set(types.reduced_nodes)]
        if reduced:
            raise BuildError(
                f"{len(reduced)} node(s) pinned to FP32 compute in float16/bfloat16 in the graph (e.g. "
                f"{', '.join(reduced[:3])}) and a strongly typed build takes its types from the graph: keep "
                "those nodes float32 in the ONNX (Cast around them) or build weakly typed (typing='weak', TensorRT 10)"
            )
    return tuple((n, ops[n]) for n in names)


def device_index(device: str) -> int:
    """``"cuda"`` → 0, ``"cuda:1"`` → 1; anything else is not a TensorRT device."""
    if device == "cuda":
        return 0
    head, _, idx = device.partition(":")
    if head != "cuda" or not idx.isdigit():
        raise BuildError(f"device {device!r} is not a CUDA device; set the profile's device to 'cuda' or 'cuda:N'")
    return int(idx)


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def input_shape_ranges(
    model: onnx.ModelProto, max_batch: int, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[ShapeRange, ...]:
    """min/opt/max per graph input: a dynamic batch (axis 0) → 1 / 1 / ``max_batch``; other dynamic
    dimensions must be fixed by ``input_shapes`` (a full shape whose axis 0 is ignored when dynamic)."""
    init = {t.name for t in model.graph.initializer}
    given = dict(input_shapes or {})
    ranges = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = _dims(vi)
        if vi.name in given:
            fixed = [int(d) for d in given.pop(vi.name)]
            if len(fixed) != len(dims):
                raise BuildError(
                    f"input_shapes[{vi.name!r}] has rank {len(fixed)} but the input has rank {len(dims)}; "
                    "give the full shape"
                )
            dims = [d if d is not None else f for d, f in zip(dims, fixed, strict=True)]
            if dims and _dims(vi)[0] is None:
                dims[0] = None  # the batch stays dynamic
        missing = [i for i, d in enumerate(dims) if d is None and i != 0]
        if missing:
            raise BuildError(
                f"input {vi.name!r} has dynamic dimension(s) {missing} besides the batch; export the ONNX "
                f"with static shapes or pass input_shapes={{{vi.name!r}: (N, ...)}}"
            )
        if dims and dims[0] is None:
            rest = tuple(int(d) for d in dims[1:] if d is not None)
            ranges.append(ShapeRange(vi.name, (1, *rest), (1, *rest), (max_batch, *rest)))
        else:
            static = tuple(int(d) for d in dims if d is not None)
            ranges.append(ShapeRange(vi.name, static, static, static))
    if given:
        raise BuildError(
            f"input_shapes names unknown input(s) {sorted(given)}; the model's inputs are {[r.name for r in ranges]}"
        )
    return tuple(ranges)


def _check_capability(profile: Profile, cc: tuple[int, int] | None) -> None:
    if cc is None:
        return
    sm = f"SM {cc[0]}.{cc[1]}"
    if profile.quantization.fp8 and cc < FP8_MIN_CC:
        raise BuildError(
            f"profile {profile.name!r} enables fp8 but the GPU is {sm}; FP8 needs SM 8.9 or newer (Ada, "
            "Hopper): set [quantization] fp8 = false in the profile or build on such a GPU"
        )
    if float_precision(profile) == "bf16" and cc < BF16_MIN_CC:
        raise BuildError(
            f"profile {profile.name!r} runs float layers in bf16 but the GPU is {sm}; BF16 needs SM 8.0 or "
            "newer (Ampere+): set [quantization] bf16 = false (fp16 = true) in the profile or build on such a GPU"
        )


def _check_quantized_types(profile: Profile, qtypes: Sequence[str]) -> None:
    unsigned = [t for t in qtypes if t in ("uint8", "uint4")]
    if unsigned:
        raise BuildError(
            f"the model quantizes to {', '.join(unsigned)} but TensorRT supports signed, symmetric "
            "quantization only: give every QuantizeLinear/DequantizeLinear an int8 zero-point of 0"
        )
    if "fp8" in qtypes and not profile.quantization.fp8:
        raise BuildError(
            f"the model holds FP8 Q/DQ but profile {profile.name!r} does not allow fp8; use an FP8 profile "
            "(e.g. h100) or re-quantize to int8"
        )
    if "int4" in qtypes and not profile.quantization.int4_weight_only:
        raise BuildError(
            f"the model holds INT4 weights but profile {profile.name!r} does not allow int4 weight-only "
            "quantization; set [quantization] int4_weight_only = true or re-quantize to int8"
        )
    other = [t for t in qtypes if t not in ("int8", "int4", "fp8", "uint8", "uint4")]
    if other:
        raise BuildError(f"the model quantizes to {', '.join(other)}, which TensorRT does not support; use int8")


def select_settings(
    profile: Profile,
    model: onnx.ModelProto | str | Path,
    compute_capability: tuple[int, int] | None,
    *,
    typing: str = "auto",
    max_batch: int = 8,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    builder_optimization_level: int = 3,
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
    use_cuda_graph: bool = False,
    max_aux_streams: int | None = None,
) -> TrtBuildSettings:
    """Choose the TensorRT build settings for ``model`` on ``profile`` (see the module docstring).

    ``compute_capability`` is the target GPU's (major, minor), or None when unknown (cross-planning).
    ``max_aux_streams``: None chooses from the model's ensemble predictors and the profile
    (:func:`aux_streams_for_predictors`); N >= 0 sets N; -1 leaves TensorRT's heuristics to choose.
    Raises :class:`BuildError` for combinations that cannot be built, saying what is needed.
    """
    if profile.engine != "tensorrt":
        raise BuildError(
            f"profile {profile.name!r} targets {profile.engine}, not TensorRT; use a TensorRT profile (a100, "
            "h100, orin)"
        )
    if typing not in TYPINGS:
        raise BuildError(f"typing {typing!r} unknown; use one of {', '.join(TYPINGS)}")
    if max_batch < 1:
        raise BuildError(f"max_batch must be ≥ 1, got {max_batch}")
    if builder_optimization_level not in OPT_LEVELS:
        raise BuildError(
            f"builder_optimization_level must be 0..5 (TensorRT's default is 3), got {builder_optimization_level}"
        )
    if max_aux_streams is not None and max_aux_streams < HEURISTIC_AUX_STREAMS:
        raise BuildError(
            f"max_aux_streams must be >= 0, or -1 for TensorRT's own heuristics (None: from the ensemble and the "
            f"profile), got {max_aux_streams}"
        )
    if workspace_mib is not None and workspace_mib <= 0:
        raise BuildError(f"workspace_mib must be > 0 (or None for TensorRT's default), got {workspace_mib}")
    device_index(profile.device)
    _check_capability(profile, compute_capability)

    proto = load_onnx(model)
    types = model_types(proto)
    _check_quantized_types(profile, types.quantized_types)
    q = profile.quantization
    precision = float_precision(profile)
    fp16, bf16 = precision == "fp16", precision == "bf16"
    fp8 = q.fp8  # capability already checked
    wants_reduced = precision != "fp32"
    fully_typed = not types.untyped
    if typing == "strong" and not fully_typed:
        raise BuildError(
            f"typing='strong' needs a fully typed ONNX but {len(types.untyped)} tensor(s) have no inferred "
            f"type (e.g. {', '.join(types.untyped[:3])}); run onnx shape inference / fix the graph, or use "
            "typing='auto'"
        )
    if typing == "strong" or (typing == "auto" and fully_typed and (types.reduced_float or not wants_reduced)):
        strong = True
        reason = (
            "strongly typed: the ONNX fixes every tensor type"
            + (" (float16/bfloat16 already in the graph)" if types.reduced_float else "")
            + "; precisions come from the graph and its Q/DQ, no precision flags"
        )
    elif typing == "weak":
        strong = False
        reason = "weakly typed with precision flags: asked for by typing='weak' (TensorRT 10 only)"
    elif not fully_typed:
        strong = False
        reason = (
            f"weakly typed with precision flags: {len(types.untyped)} tensor(s) have no inferred type (e.g. "
            f"{', '.join(types.untyped[:3])}) (TensorRT 10 only)"
        )
    else:
        strong = False
        reason = (
            "weakly typed with precision flags: the ONNX is float32 outside its Q/DQ and the profile's float "
            f"precision is {precision}, so TensorRT may run the float layers in {precision} (TensorRT 10 only; "
            "cast the graph to float16 for a strongly typed build)"
        )
    pins = _pins(proto, types, strong)
    predictors = ensemble_predictors(proto)
    aux = aux_streams_for_predictors(profile, predictors) if max_aux_streams is None else max_aux_streams
    return TrtBuildSettings(
        profile_name=profile.name,
        device=profile.device,
        strongly_typed=strong,
        typing_reason=reason,
        fp16=fp16,
        bf16=bf16,
        int8="int8" in types.quantized_types,
        fp8=fp8,
        int4=q.int4_weight_only,
        max_aux_streams=aux,
        shapes=input_shape_ranges(proto, max_batch, input_shapes),
        builder_optimization_level=builder_optimization_level,
        workspace_bytes=workspace_mib * (1 << 20) if workspace_mib is not None else None,
        timing_cache=str(timing_cache) if timing_cache is not None else None,
        use_cuda_graph=use_cuda_graph,
        compute_capability=compute_capability,
        quantized_types=types.quantized_types,
        float_precision=precision,
        tf32=False,
        fp32_pins=pins,
        predictors=predictors,
    )
