"""What precision each layer really ran in: OpenVINO's execution graph, mapped back to ONNX nodes.

A Q/DQ model only pays off when the engine fuses the QuantizeLinear/DequantizeLinear pairs into
integer kernels. OpenVINO's CPU plugin says what it did in the *execution graph*
(``CompiledModel.get_runtime_model()``): every executed layer carries rt_info ``layerType``
(``Convolution``, ``FullyConnected``, ``MatMul``, ``Subgraph``, ``Reorder``, ...), ``runtimePrecision``
(``u8`` / ``i8`` for integer kernels, ``f32``, ``bf16``, ...), ``primitiveType`` (the kernel, e.g.
``jit_avx2_I8``, ``brgconv_avx512_I8``) and ``originalLayersNames`` (the model ops fused into it).
The precision strings are OpenVINO's element-type names, reported as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexdeploy.errors import BuildError

if TYPE_CHECKING:
    from rexdeploy.builders.base import Engine

KERNEL_LAYER_TYPES = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
"""The execution-graph layer types whose precision decides whether int8 paid off."""

_PLUMBING = frozenset({"Input", "Output", "Const", "Reorder"})


@dataclass(frozen=True)
class ExecLayer:
    """One layer of OpenVINO's execution graph."""

    name: str
    layer_type: str
    runtime_precision: str
    primitive_type: str
    original_names: tuple[str, ...]
    onnx_nodes: tuple[str, ...]

    @property
    def key(self) -> str:
        """The name a user recognizes: the first ONNX node fused into this layer, else its own name."""
        return self.onnx_nodes[0] if self.onnx_nodes else self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnx_node_index(proto: Any) -> dict[str, str]:
    """Names OpenVINO may give an op → the ONNX node (of ``proto``, an ``onnx.ModelProto``) it came from.

    OpenVINO names an op after its ONNX node, or after the node's output tensor when that tensor is a
    model output; unnamed nodes are known by their first output.
    """
    index: dict[str, str] = {}
    for node in proto.graph.node:
        ident = node.name or (node.output[0] if node.output else "")
        if not ident:
            continue
        for out in node.output:
            if out:
                index.setdefault(out, ident)
        index[ident] = ident
    return index


def read_onnx(model: Path) -> Any:
    """The ``onnx.ModelProto`` of an ONNX file without its external data; None for an IR ``.xml`` or a file
    that does not parse."""
    if model.suffix == ".xml":
        return None
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:
        return None


def load_onnx_index(model: Path) -> dict[str, str]:
    """:func:`onnx_node_index` of an ONNX file; {} for an IR ``.xml`` or a file that does not parse
    (the execution-layer names are then used as they are)."""
    proto = read_onnx(model)
    return {} if proto is None else onnx_node_index(proto)


def _resolve(name: str, index: Mapping[str, str]) -> str | None:
    """An execution-graph original name → its ONNX node, trying ``a/b/WithoutBiases`` → ``a/b`` → ``a``."""
    probe = name
    while probe:
        if probe in index:
            return index[probe]
        if "/" not in probe:
            return None
        probe = probe.rsplit("/", 1)[0]
    return None


def read_execution_graph(compiled: Any, index: Mapping[str, str] | None = None) -> list[ExecLayer]:
    """The executed layers of a compiled OpenVINO model, in execution order."""
    index = index or {}
    layers: list[ExecLayer] = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()

        def get(key: str, info: Any = info) -> str:
            return str(info[key].astype(str)) if key in info else ""

        originals = tuple(n for n in get("originalLayersNames").split(",") if n)
        nodes: list[str] = []
        for original in originals:
            node = _resolve(original, index)
            if node is not None and node not in nodes:
                nodes.append(node)
        layers.append(
            ExecLayer(
                name=op.get_friendly_name(),
                layer_type=get("layerType"),
                runtime_precision=get("runtimePrecision"),
                primitive_type=get("primitiveType"),
                original_names=originals,
                onnx_nodes=tuple(nodes),
            )
        )
    return layers


def layer_precision_map(layers: Iterable[ExecLayer]) -> dict[str, str]:
    """ONNX node (or execution layer) name → runtime precision, for every layer that computes.

    Inputs, outputs, constants and reorders are left out. Every ONNX node fused into a layer gets that
    layer's precision; when a node shows up in several layers, a kernel layer (Convolution, MatMul,
    ...) decides.
    """
    out: dict[str, str] = {}
    decided_by_kernel: set[str] = set()
    for layer in layers:
        if layer.layer_type in _PLUMBING:
            continue
        is_kernel = layer.layer_type in KERNEL_LAYER_TYPES
        for key in layer.onnx_nodes or (layer.name,):
            if key in decided_by_kernel or (key in out and not is_kernel):
                continue
            out[key] = layer.runtime_precision
            if is_kernel:
                decided_by_kernel.add(key)
    return out


def execution_layers(engine: Engine) -> list[ExecLayer]:
    """The execution graph of an OpenVINO engine built in this process."""
    if engine.backend != "openvino" or engine.handle is None:
        raise BuildError(
            f"the execution graph needs an OpenVINO engine built in this process (got a {engine.backend} "
            "engine without a live handle); build it with OpenVINOBuilder().build(...)"
        )
    return read_execution_graph(engine.handle, load_onnx_index(engine.model_path))


def runtime_precision_summary(engine: Engine) -> dict[str, dict[str, int]]:
    """Execution-layer type → runtime precision → how many layers, e.g.
    ``{"Convolution": {"u8": 12, "f32": 1}, "Subgraph": {"f32": 14}}`` (inputs/outputs/consts/reorders
    left out)."""
    summary: dict[str, dict[str, int]] = {}
    for layer in execution_layers(engine):
        if layer.layer_type in _PLUMBING:
            continue
        per_type = summary.setdefault(layer.layer_type, {})
        per_type[layer.runtime_precision] = per_type.get(layer.runtime_precision, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(summary.items())}


def kernel_layers(engine: Engine, layer_types: Iterable[str] = KERNEL_LAYER_TYPES) -> dict[str, ExecLayer]:
    """The Convolution / Deconvolution / FullyConnected / MatMul layers (or ``layer_types``) of the
    execution graph, by ONNX node name (or execution-layer name when none maps back)."""
    wanted = set(layer_types)
    return {layer.key: layer for layer in execution_layers(engine) if layer.layer_type in wanted}


def kernel_precisions(engine: Engine, layer_types: Iterable[str] = KERNEL_LAYER_TYPES) -> dict[str, str]:
    """Runtime precision of each Convolution / FullyConnected / MatMul layer, by ONNX node name.

    ``"u8"`` or ``"i8"`` means the layer ran as an integer kernel (its ``primitive_type`` in
    :func:`kernel_layers` then names an ``*_I8`` kernel); ``"f32"`` means the Q/DQ pair was not fused
    and the layer ran in float.
    """
    return {key: layer.runtime_precision for key, layer in kernel_layers(engine, layer_types).items()}
