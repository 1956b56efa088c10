"""Hardware profiles: what an engine on a device supports, and how fast it runs each op class.

A profile is a TOML file (shipped ones live in ``rexdeploy/profiles/``) loaded into the frozen
:class:`Profile`. Unknown keys and bad values are rejected with the sorted list of what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rexdeploy.errors import ProfileError
from rexdeploy.plans import MAX_ACT_ORDER

ENGINES = ("openvino", "tensorrt", "onnxruntime")
OP_CLASSES = ("conv", "pointwise", "depthwise", "gemm", "matmul")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
FORMS = ("branches", "concat")


@dataclass(frozen=True)
class Quantization:
    """Which bit-widths the engine runs, per op class."""

    conv_weight_bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    depthwise_weight_bits: tuple[int, ...] = (8,)
    gemm_weight_bits: tuple[int, ...] = (8, 4)
    activation_bits: tuple[int, ...] = (8,)
    int4_weight_only: bool = False
    int4_block_sizes: tuple[int, ...] = (64, 128)
    float_activations: bool = True
    max_act_order: int = 2  # the most activation residual orders the planner may give a layer (1: none)
    fp16: bool = False
    bf16: bool = False
    fp8: bool = False
    # the engine quantizes the float inputs of weight-only Gemm/MatMul layers at run time, per group of 32 values
    # (OpenVINO CPU DYNAMIC_QUANTIZATION_GROUP_SIZE); off: they stay float. The planner may turn it on per plan.
    dynamic_activations: bool = False


@dataclass(frozen=True)
class Parallel:
    """How much the engine runs at once: OpenVINO streams / cores, TensorRT auxiliary streams.

    ``threads``: the inference threads of one request (OpenVINO ``INFERENCE_NUM_THREADS``, onnxruntime's intra-op
    threads); 0 leaves it to the runtime (OpenVINO's latency hint: every core). ``rexdeploy build`` sets it when
    fewer threads measure faster on the model (:mod:`rexdeploy.runtime_threads`).
    """

    streams: int = 1
    aux_streams: int = 0
    cores: int = 1
    threads: int = 0


@dataclass(frozen=True)
class Defaults:
    """The uniform REx setting ``rexdeploy build`` uses when no plan is given."""

    bits: int = 8
    order: int = 2
    act_bits: int = 8
    form: str = "branches"


@dataclass(frozen=True)
class CostModel:
    """Latency model coefficients (fitted by ``rexdeploy profile calibrate``; the formula is in
    :mod:`rexdeploy.costmodel`).

    ``throughput_gmacs[op_class][precision]`` is the sustained rate in GMAC/s; each layer also pays
    ``layer_overhead_us`` and each extra branch ``branch_overhead_us``; weights stream at ``bandwidth_gbps``
    and activations (each layer's output, each extra order's partial output) at
    ``activation_bandwidth_gbps`` (0: no such memory term); a network pays ``model_overhead_us`` once per
    inference; the concat form's extra orders cost ``concat_factor`` × what they cost as branches;
    int8 activations are quantized at ``quantize_bandwidth_gbps`` (fp32 bytes of each quantized layer input,
    0: no such term) and every sparse order pays ``sparse_overhead_us`` for its gather/scatter.
    """

    layer_overhead_us: float = 5.0
    branch_overhead_us: float = 3.0
    bandwidth_gbps: float = 20.0
    throughput_gmacs: dict[str, dict[str, float]] = field(default_factory=dict)
    calibrated: bool = False
    model_overhead_us: float = 10.0
    concat_factor: float = 1.0
    activation_bandwidth_gbps: float = 0.0
    quantize_bandwidth_gbps: float = 0.0
    sparse_overhead_us: float = 0.0


@dataclass(frozen=True)
class Profile:
    name: str
    engine: str
    device: str
    description: str = ""
    requires: tuple[str, ...] = ()  # CPU flags (/proc/cpuinfo names) the engine's int8 kernels need
    quantization: Quantization = field(default_factory=Quantization)
    parallel: Parallel = field(default_factory=Parallel)
    defaults: Defaults = field(default_factory=Defaults)
    cost: CostModel = field(default_factory=CostModel)

    def weight_bits(self, op_class: str) -> tuple[int, ...]:
        """The weight bit-widths this profile allows for an op class."""
        q = self.quantization
        if op_class == "depthwise":
            return q.depthwise_weight_bits
        if op_class in ("gemm", "matmul"):
            return q.gemm_weight_bits
        return q.conv_weight_bits

    def with_float_precision(self, precision: str) -> Profile | None:
        """This profile with its engine running float layers in ``precision`` (``fp32``, ``bf16``, ``fp16``):
        the FP32 reference, the device's default float engine, a plan that needs f32. None when the engine
        cannot (OpenVINO has no fp16 CPU mode here; TensorRT runs fp16 and bf16)."""
        q = self.quantization
        if precision == "fp32":
            quant = dataclasses.replace(q, bf16=False, fp16=False, fp8=False)
        elif precision == "bf16" and self.engine in ("openvino", "tensorrt"):
            quant = dataclasses.replace(q, bf16=True, fp16=False, fp8=False)
        elif precision == "fp16" and self.engine == "tensorrt":
            quant = dataclasses.replace(q, fp16=True, bf16=False, fp8=False)
        else:
            return None
        return self if quant == q else dataclasses.replace(self, quantization=quant)

    def with_threads(self, threads: int) -> Profile:
        """This profile with each inference request on ``threads`` threads (0: the runtime's default)."""
        if threads < 0:
            raise ProfileError(f"inference threads must be >= 0 (0: the runtime's default), got {threads}")
        if threads == self.parallel.threads:
            return self
        return dataclasses.replace(self, parallel=dataclasses.replace(self.parallel, threads=threads))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Serialize as a TOML document that :func:`load_profile` reads back to an equal Profile."""
        return _to_toml(self.to_dict())


_SECTIONS: dict[str, type] = {
    "quantization": Quantization,
    "parallel": Parallel,
    "defaults": Defaults,
    "cost": CostModel,
}


def _check_keys(where: str, given: dict[str, Any], allowed: list[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are: {', '.join(sorted(allowed))}"
        )


def _bits_tuple(where: str, value: Any, lo: int, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProfileError(f"{where}: expected a list of integers between {lo} and {hi}, got {value!r}")
    bad = [v for v in value if not lo <= v <= hi]
    if bad:
        raise ProfileError(f"{where}: values {bad} out of range; allowed bit-widths are {lo}..{hi}")
    return tuple(value)


def _positive(where: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ProfileError(f"{where}: must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _build_section(where: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(where, raw, list(fields))
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kw = f"{where}.{key}"
        default = getattr(defaults, key)
        if key in ("conv_weight_bits", "depthwise_weight_bits", "gemm_weight_bits"):
            values[key] = _bits_tuple(kw, value, 2, 8)
        elif key == "activation_bits":
            values[key] = _bits_tuple(kw, value, 8, 8)
        elif key == "int4_block_sizes":
            values[key] = _bits_tuple(kw, value, 1, 4096)
        elif key == "throughput_gmacs":
            values[key] = _throughput(kw, value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ProfileError(f"{kw}: expected true or false, got {value!r}")
            values[key] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProfileError(f"{kw}: expected a non-negative integer, got {value!r}")
            values[key] = value
        elif isinstance(default, float):
            values[key] = _positive(kw, value, allow_zero=True)
        elif key == "form":
            if value not in FORMS:
                raise ProfileError(f"{kw}: {value!r} is not a form; allowed: {', '.join(FORMS)}")
            values[key] = value
        else:  # pragma: no cover - every field is handled above
            values[key] = value
    section = cls(**values)
    if isinstance(section, Defaults):
        if not 2 <= section.bits <= 8:
            raise ProfileError(f"{where}.bits: {section.bits} out of range; allowed bit-widths are 2..8")
        if not 1 <= section.order <= 16:
            raise ProfileError(f"{where}.order: {section.order} out of range; allowed orders are 1..16")
        if section.act_bits not in (0, 8):
            raise ProfileError(f"{where}.act_bits: {section.act_bits} not allowed; use 8 or 0 (float)")
    if isinstance(section, Quantization) and not 1 <= section.max_act_order <= MAX_ACT_ORDER:
        raise ProfileError(
            f"{where}.max_act_order: {section.max_act_order} out of range; use 1 (no activation orders) to "
            f"{MAX_ACT_ORDER}"
        )
    if isinstance(section, CostModel) and section.concat_factor <= 0.0:
        raise ProfileError(
            f"{where}.concat_factor: must be > 0, got {section.concat_factor!r} (1 = as fast as branches)"
        )
    return section


def _throughput(where: str, raw: Any) -> dict[str, dict[str, float]]:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a table of op classes, got {raw!r}")
    _check_keys(where, raw, list(OP_CLASSES))
    table: dict[str, dict[str, float]] = {}
    for op_class, per_precision in raw.items():
        if not isinstance(per_precision, dict):
            raise ProfileError(f"{where}.{op_class}: expected a table of precisions, got {per_precision!r}")
        _check_keys(f"{where}.{op_class}", per_precision, list(PRECISIONS))
        table[op_class] = {p: _positive(f"{where}.{op_class}.{p}", v) for p, v in sorted(per_precision.items())}
    return table


def profile_from_dict(raw: dict[str, Any], source: str = "<profile>") -> Profile:
    """Validate a parsed profile document and build the frozen :class:`Profile`."""
    allowed = ["name", "engine", "device", "description", "requires", *_SECTIONS]
    _check_keys(source, raw, allowed)
    for key in ("name", "engine", "device"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ProfileError(f"{source}: missing or empty string key {key!r}")
    if raw["engine"] not in ENGINES:
        raise ProfileError(f"{source}: engine {raw['engine']!r} unknown; allowed: {', '.join(ENGINES)}")
    sections = {name: _build_section(f"{source}: [{name}]", cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(f, str) and f for f in requires):
        raise ProfileError(f'{source}: requires must be a list of CPU flag names, e.g. ["avx512_vnni"]')
    return Profile(
        name=raw["name"],
        requires=tuple(requires),
        engine=raw["engine"],
        device=raw["device"],
        description=str(raw.get("description", "")),
        **sections,
    )


def list_profiles() -> list[str]:
    """Names of the profiles shipped with rexdeploy, sorted."""
    folder = resources.files("rexdeploy.profiles")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (``x86-avx512``), ``auto`` (the shipped CPU profile matching
    this host, see :mod:`rexdeploy.hostcpu`), or a profile TOML file by path."""
    text: str
    if str(name_or_path) == "auto":
        from rexdeploy.hostcpu import host_profile_name

        name_or_path = host_profile_name()
    source = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProfileError(
                f"profile file {source} not found; give a shipped name ({', '.join(list_profiles())}) or a .toml path"
            )
        text = path.read_text(encoding="utf-8")
    else:
        shipped = resources.files("rexdeploy.profiles") / f"{source}.toml"
        if not shipped.is_file():
            raise ProfileError(
                f"unknown profile {source!r}; shipped profiles: {', '.join(list_profiles())} (or give a .toml path)"
            )
        text = shipped.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source} is not valid TOML: {exc}") from None
    return profile_from_dict(raw, source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _to_toml(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    while tables:
        prefix, table = tables.pop(0)
        lines.append("")
        lines.append(f"[{prefix}]")
        nested: list[tuple[str, dict[str, Any]]] = []
        for key, value in table.items():
            if isinstance(value, dict):
                nested.append((f"{prefix}.{key}", value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        tables[:0] = nested
    return "\n".join(lines) + "\n"
