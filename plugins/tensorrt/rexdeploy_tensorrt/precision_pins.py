"""FP32 pins inside a reduced-precision TensorRT engine (issue 14, item 3).

The expansion pass lists the ONNX nodes whose numerics need FP32 (an activation-order remainder
``x - DQ(Q(x))`` vanishes in fp16/bf16) in the model's ``rexdeploy.fp32_nodes`` metadata
(:mod:`rexdeploy.pins`). After TensorRT's ONNX parser has made the network, every layer made from a
pinned node gets ``layer.precision = trt.float32`` and float32 output types, and the builder config
gets ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (the build fails rather than run a pinned layer in
fp16). TensorRT 10 ``ILayer`` API: ``precision``, ``set_output_type(i, dtype)``, ``metadata``, ``type``,
``num_outputs``, ``get_output(i)`` (``ITensor.dtype``, ``is_shape_tensor``) — all weakly typed only
(strongly typed networks reject ``setPrecision`` / ``setOutputType``; there the graph's types rule).

Which layers come from a node (ONNX-TensorRT parser, ``ImporterContext::registerLayer``): a layer made
for a node is named after it — the node's name, or ``<name>_<n>`` for its further layers (one
global suffix counter) — and carries the metadata ``[ONNX Layer: <name>]`` (``[ONNX Layer: <name> |
Local Function: f]`` inside a local function). Helper layers the parser adds on its own
(``ONNXTRT_*``) and unnamed ones belong to no node. Matching (pure, :func:`layers_to_pin`): a layer's
metadata decides when it names ONNX nodes; without metadata, its name equal to a pinned node, or
``<pinned>_<digits>`` when that name is not itself another ONNX node's.

What each layer kind takes (``IQuantizeLayer`` / ``IDequantizeLayer`` docs): a Quantize layer computes
in float (its precision may be pinned) but outputs int8; a Dequantize layer's precision is its
*quantized* input type, so only its float output type is pinned; Constant and Shape layers, and
outputs that are shape tensors or not float, are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from rexdeploy_tensorrt.layer_profile import metadata_nodes

_SKIP_KINDS = frozenset({"CONSTANT", "SHAPE", "ASSERTION", "CONDITION", "TRIP_LIMIT", "ITERATOR"})
_OUTPUT_ONLY_KINDS = frozenset({"DEQUANTIZE"})
_PRECISION_ONLY_KINDS = frozenset({"QUANTIZE", "DYNAMIC_QUANTIZE"})
_UNIQUE_SUFFIX = re.compile(r"^(.*)_(\d+)$")


@dataclass(frozen=True)
class NetLayer:
    """What the pin rules need of one network layer: its name, its ``metadata`` string, its kind
    (``trt.LayerType`` member name, e.g. "CONVOLUTION", "ELEMENTWISE", "DEQUANTIZE") and, per output,
    whether it is a float execution tensor (not a shape tensor, not int/bool)."""

    name: str
    metadata: str
    kind: str
    float_outputs: tuple[bool, ...]


@dataclass(frozen=True)
class LayerPin:
    """One layer to constrain: network index, name, the pinned ONNX node it comes from, whether its
    precision is set to float32, and which outputs get the float32 type."""

    index: int
    name: str
    node: str
    precision: bool
    outputs: tuple[int, ...]


def _node_names(metadata: str) -> list[str]:
    """ONNX node names in a layer's metadata (``[ONNX Layer: a | Local Function: f]`` → ``a``)."""
    return [n.split(" | ")[0].strip() for n in metadata_nodes(metadata)]


def source_node(layer: NetLayer, pins: Collection[str], onnx_nodes: Collection[str]) -> str | None:
    """The pinned ONNX node ``layer`` was made from, or None."""
    from_meta = _node_names(layer.metadata)
    if from_meta:
        return next((n for n in from_meta if n in pins), None)
    if layer.name in pins:
        return layer.name
    m = _UNIQUE_SUFFIX.match(layer.name)
    if m and m.group(1) in pins and layer.name not in onnx_nodes:
        return m.group(1)
    return None


def layers_to_pin(layers: Sequence[NetLayer], pins: Collection[str], onnx_nodes: Collection[str]) -> list[LayerPin]:
    """The layers of the network to constrain to FP32, in network order (see the module docstring)."""
    pinned, known = set(pins), set(onnx_nodes)
    out: list[LayerPin] = []
    for index, layer in enumerate(layers):
        if not pinned or layer.kind in _SKIP_KINDS:
            continue
        node = source_node(layer, pinned, known)
        if node is None:
            continue
        outputs = (
            () if layer.kind in _PRECISION_ONLY_KINDS else tuple(i for i, f in enumerate(layer.float_outputs) if f)
        )
        precision = layer.kind not in _OUTPUT_ONLY_KINDS and (bool(outputs) or layer.kind in _PRECISION_ONLY_KINDS)
        if precision or outputs:
            out.append(LayerPin(index, layer.name, node, precision, outputs))
    return out


def unmatched_pins(pins: Collection[str], applied: Sequence[LayerPin]) -> list[str]:
    """Pinned nodes no layer was constrained for (folded away by the parser, e.g. an Identity)."""
    hit = {p.node for p in applied}
    return sorted(set(pins) - hit)


# ---------------------------------------------------------------------------------------------
# the TensorRT side (``trt`` passed in by the builder; never imported here)


def _kind(trt: Any, layer: Any) -> str:
    kind = layer.type
    return str(getattr(kind, "name", str(kind).rsplit(".", 1)[-1]))


def network_layers(trt: Any, network: Any) -> list[NetLayer]:
    """:class:`NetLayer` records of a parsed ``INetworkDefinition``."""
    floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outs.append(t is not None and t.dtype in floats and not bool(getattr(t, "is_shape_tensor", False)))
        layers.append(
            NetLayer(str(layer.name), str(getattr(layer, "metadata", "") or ""), _kind(trt, layer), tuple(outs))
        )
    return layers


def apply_pins(trt: Any, network: Any, pins: Collection[str], onnx_nodes: Collection[str]) -> list[LayerPin]:
    """Constrain the layers of ``network`` made from ``pins`` to FP32; returns what was set."""
    chosen = layers_to_pin(network_layers(trt, network), pins, onnx_nodes)
    for pin in chosen:
        layer = network.get_layer(pin.index)
        if pin.precision:
            layer.precision = trt.float32
        for j in pin.outputs:
            layer.set_output_type(j, trt.float32)
    return chosen
