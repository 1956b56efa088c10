"""Per-channel ranges for a depthwise conv's int8 input, without data: the channels are equalized across the conv
that makes them.

An int8 activation has one scale per tensor. A depthwise conv's input is a stack of channels whose ranges spread
over two decades (MobileNetV2's first one, from its BatchNorm statistics: 0.02 to 2.55), so one step set by the
widest channel leaves the narrow ones a handful of codes. Calibrating with data does not help there: NNCF's
int8 keeps one scale per tensor too.

A depthwise conv's channel c reads channel c alone, and the Conv that makes the tensor makes channel c from its
weight row c alone. Multiplying that row and its bias by ``s_c`` and dividing the depthwise filter c by ``s_c``
leaves the product unchanged (through a ReLU, which is positively homogeneous), and neither weight's
per-output-channel quantization sees it: a row scaled as a whole keeps its relative rounding error. Only the
tensor between the two changes. With ``s_c = b / r_c`` every channel spans the same ``[0, b]``, and the
tensor's one int8 step acts as a step ``r_c / 255`` of channel c's own: per-channel activation ranges at no cost
at run time (same graph, other constants).

``r_c`` is channel c's own MSE-optimal range under a Laplace model of its BatchNorm statistics, rectified by the
activation (:meth:`rexdeploy.bnstats.ChannelStats.channel_mse_ranges`): a Gaussian model clips the channels'
real tails (MobileNetV2, natural photographs: the float graph alone moved by 0.119 with Gaussian ranges, 0.014
with Laplace ones), and ``b`` is the activation's upper bound (ReLU6: 6) or, for a ReLU, the largest ``r_c``.

A ``Clip(0, b)`` (ReLU6) is not homogeneous: on ``s_c·x`` it clips channel c at ``b / s_c = r_c`` of the original
units. The float graph changes there, the int8 engine does not: the input's quantization clips at the tensor's
range (≤ b) anyway. So the caller equalizes only the layers whose input it quantizes at activation order 1
(:func:`rexdeploy.passes.pipeline.expand_model`); the planner's error model assumes every depthwise input is
(:func:`rexdeploy.planner.search.prepare`).

Measured (MobileNetV2, W8A8 K=1, 120 natural photographs, AMD EPYC avx512_bf16; ``benchmarks/bench_activation_ranges.py``):
see ``docs/activation-ranges.md``.

The pass is written as a rewrite rule (pattern → check → rewrite):

* **pattern** (:func:`find_equalizable`): a depthwise Conv layer reading ``Relu`` / ``Clip(0, b)`` of a Conv's
  output;
* **check**: the producing Conv has a constant weight (and bias), its output carries BatchNorm statistics
  (:func:`rexdeploy.graph.fold_batchnorm`), nothing else reads it or the activation's output, and the
  channels' ranges differ (else there is nothing to gain);
* **rewrite** (:func:`equalize_depthwise_inputs`): new weight / bias initializers (the originals may be shared),
  unused originals dropped, the BatchNorm statistics of the scaled tensor scaled with it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from rexdeploy.analyze import ConstantResolver, Layer, clip_bounds
from rexdeploy.bnstats import ChannelStats, ClipFamily
from rexdeploy.graph import consumers
from rexdeploy.passes.rewrite import drop_unread, set_constant_input

MAX_SCALE = 1.0e4
"""The largest ``s_c``: a channel whose range is below ``b / MAX_SCALE`` (a dead one) is stretched no further."""

MIN_SPREAD = 1.05
"""Equalize only where the channels' largest range is at least this many times their smallest."""

CLIP_FAMILY: ClipFamily = "laplace"
"""The per-channel tail model of ``r_c``: Gaussian BN statistics under-state the channels' tails."""

BnStats = Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Match:
    """One depthwise layer and what the check found: ``reason`` is empty when it can be equalized."""

    layer: str
    tensor: str  # the depthwise input, between the activation and the layer
    producer: str = ""  # the Conv whose output channels are scaled
    produced: str = ""  # its output tensor (the activation's input), which BN statistics describe
    upper: float = np.inf  # the activation's upper bound b (inf: a ReLU)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class EqualizedSite:
    """What the rewrite did at one depthwise layer: the spread (largest / smallest ``r_c``) before, and the scales."""

    layer: str
    tensor: str
    channels: int
    spread: float
    min_scale: float
    max_scale: float


@dataclass(frozen=True)
class Equalized:
    """The rewritten model, its BatchNorm statistics (the scaled tensors' scaled with them), the sites and the
    layers refused with the reason."""

    model: onnx.ModelProto
    bn_stats: dict[str, tuple[np.ndarray, np.ndarray]]
    sites: tuple[EqualizedSite, ...]
    refused: tuple[tuple[str, str], ...]

    @property
    def tensors(self) -> frozenset[str]:
        return frozenset(site.tensor for site in self.sites)


def find_equalizable(model: onnx.ModelProto, layers: Sequence[Layer], bn_stats: BnStats,
                     consts: ConstantResolver | None = None) -> list[Match]:  # fmt: skip
    """Pattern and check for each depthwise layer of ``layers`` (the others are not looked at)."""
    consts = consts or ConstantResolver(model)
    producers = {out: node for node in model.graph.node for out in node.output if out}
    readers = consumers(model)
    outputs = {o.name for o in model.graph.output}
    found = []
    for layer in layers:
        if layer.op_class != "depthwise":
            continue
        found.append(_check(layer, producers, readers, outputs, bn_stats, consts))
    return found


def _check(layer: Layer, producers: Mapping[str, onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]],
           outputs: Collection[str], bn_stats: BnStats, consts: ConstantResolver) -> Match:  # fmt: skip
    t = layer.input
    act = producers.get(t)
    if act is None or act.op_type not in ("Relu", "Clip"):
        return Match(layer.name, t, reason=f"its input is not made by a Relu or Clip ({act.op_type if act else 'graph input'})")
    lo, hi = clip_bounds(act, consts) if act.op_type == "Clip" else (0.0, np.inf)
    if lo != 0.0 or not hi > 0.0:
        return Match(layer.name, t, reason=f"{act.name} clips to [{lo:g}, {hi:g}], not [0, b]")
    u = act.input[0]
    conv = producers.get(u)
    if conv is None or conv.op_type != "Conv":
        return Match(layer.name, t, reason=f"{act.name} does not read a Conv's output")
    if len(readers.get(u, [])) != 1 or len(readers.get(t, [])) != 1 or u in outputs or t in outputs:
        return Match(layer.name, t, reason=f"{u!r} or {t!r} is read elsewhere too")
    weight = consts.value(conv.input[1])
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    if weight is None or (has_bias and consts.value(conv.input[2]) is None):
        return Match(layer.name, t, reason=f"{conv.name} has a weight or bias that is not constant")
    if u not in bn_stats:
        return Match(layer.name, t, reason=f"no BatchNorm statistics describe {u!r}")
    if bn_stats[u][0].size != weight.shape[0] or weight.shape[0] != layer.weight_shape[0]:
        return Match(layer.name, t, reason=f"{conv.name}'s output channels do not match {layer.name}'s")
    return Match(layer.name, t, conv.name, u, float(hi))


def channel_ranges(stats: tuple[np.ndarray, np.ndarray], upper: float, levels: int) -> np.ndarray:
    """``r_c`` of each channel of ``act(g)``, ``g ~ N(beta_c, gamma_c²)`` as BN left it, the activation clipping to
    ``[0, upper]``: the channel's own MSE-optimal range on ``levels`` codes, Laplace tails."""
    beta, gamma = stats
    return ChannelStats.gaussian(beta, gamma).clip(0.0, upper).channel_mse_ranges(CLIP_FAMILY, levels)


def equalization_scales(ranges: np.ndarray, upper: float) -> np.ndarray:
    """``s_c = b / r_c`` (``b``: ``upper``, or the largest ``r_c`` when unbounded), at most :data:`MAX_SCALE`;
    1 for a channel with no range (identically 0)."""
    r = np.asarray(ranges, dtype=np.float64)
    target = upper if np.isfinite(upper) else float(np.max(r, initial=0.0))
    safe = np.maximum(r, target / MAX_SCALE)
    return np.where(r > 0.0, np.clip(target / safe, 1.0 / MAX_SCALE, MAX_SCALE), 1.0)


def equalize_depthwise_inputs(
    model: onnx.ModelProto,
    bn_stats: BnStats,
    layers: Sequence[Layer],
    names: Collection[str] | None = None,
    *,
    unsigned: Collection[str] = frozenset(),
) -> Equalized:
    """Equalize the input channels of the depthwise layers of ``layers`` named in ``names`` (None: all) on a copy
    of the BN-folded ``model``. ``unsigned``: the input tensors the expansion emits as uint8 (255 codes for
    ``r_c``; 127 otherwise). Layers that fail the check are left as they are and listed with the reason."""
    consts = ConstantResolver(model)
    wanted = [layer for layer in layers if names is None or layer.name in names]
    matches = find_equalizable(model, wanted, bn_stats, consts)
    refused = tuple((m.layer, m.reason) for m in matches if not m.ok)
    stats = dict(bn_stats)
    plans = []
    for m in (m for m in matches if m.ok):
        r = channel_ranges(stats[m.produced], m.upper, 255 if m.tensor in unsigned else 127)
        live = r[r > 0.0]
        spread = float(live.max() / live.min()) if live.size else 1.0
        if spread < MIN_SPREAD:
            refused += ((m.layer, f"its channels' ranges differ by {spread:.3g}x only"),)
            continue
        plans.append((m, equalization_scales(r, m.upper), spread))
    if not plans:
        return Equalized(model, stats, (), refused)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    by_name = {layer.name: layer for layer in layers}
    taken = {i.name for i in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    taken |= {i.name for i in out.graph.input} | set(nodes)
    replaced: set[str] = set()
    written: dict[tuple[str, int], np.ndarray] = {}  # a depthwise conv that also makes the next one's input: both

    def scale(node: onnx.NodeProto, index: int, by: np.ndarray, tag: str) -> None:
        """Input ``index`` of ``node`` (its value as rewritten so far) times ``by`` along axis 0."""
        value = written.get((node.name, index))
        value = np.asarray(consts.value(node.input[index]), dtype=np.float64) if value is None else value
        value = value * by.reshape(-1, *([1] * (value.ndim - 1)))
        written[(node.name, index)] = value
        set_constant_input(out, node, index, value, f"{node.name}_equalized_{tag}", taken, replaced, consts)

    sites = []
    for m, s, spread in plans:
        conv, layer = nodes[m.producer], nodes[m.layer]
        scale(conv, 1, s, "w")
        if len(conv.input) > 2 and conv.input[2]:
            scale(conv, 2, s, "b")
        scale(layer, by_name[m.layer].weight_index, 1.0 / s, "w")
        beta, gamma = stats[m.produced]
        stats[m.produced] = (np.asarray(beta) * s, np.asarray(gamma) * s)
        sites.append(EqualizedSite(m.layer, m.tensor, int(s.size), spread, float(s.min()), float(s.max())))
    drop_unread(out, replaced)
    return Equalized(out, stats, tuple(sites), refused)


def equalization_note(result: Equalized) -> str:
    """One line for a plan's notes: how many depthwise inputs were equalized and their median channel spread."""
    if not result.sites:
        return ""
    spread = float(np.median([site.spread for site in result.sites]))
    return (f"depthwise inputs equalized: {len(result.sites)} (per-channel int8 ranges through the producing conv; "
            f"median channel range spread {spread:.3g}x)")  # fmt: skip


__all__ = [
    "Equalized",
    "EqualizedSite",
    "Match",
    "channel_ranges",
    "equalization_note",
    "equalization_scales",
    "equalize_depthwise_inputs",
    "find_equalizable",
]
