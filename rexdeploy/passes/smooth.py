"""Data-free smoothing of LayerNorm outputs (SmoothQuant, Xiao et al. 2023, Eq. 4) before the expansion.

A per-tensor int8 scale on a LayerNorm output ``y = γ ⊙ x̂ + β`` is set by its largest channels: a few channels
with a large ``|γ_j|`` or ``|β_j|`` leave the others a handful of codes. SmoothQuant divides activation channel
``j`` by ``s_j`` and multiplies row ``j`` of the weights that read it by ``s_j`` — the product is unchanged — with

    s_j = max|X_j|^α / max|W_j|^(1-α)                                   (SmoothQuant Eq. 4)

When ``X`` is a LayerNorm output the division folds exactly into the LayerNorm's own parameters (``γ/s``,
``β/s``): no new node, float-exact up to rounding. SmoothQuant takes ``max|X_j|`` from calibration data; here
it is estimated without data from the LayerNorm's parameters: ``x̂`` is normalized per token (zero mean, unit
variance over the channels), so ``max|X_j| ≈ |γ_j|·c + |β_j|`` with ``c = NORMALIZED_MAX``.

The pass is written as rewrite rules (pattern → check → rewrite; a failed check says why):

* **pattern** (:func:`match_layernorm`): a ``LayerNormalization`` node over the last axis (opset ≥ 17, what
  ``torch.onnx.export`` of ``nn.LayerNorm`` gives at opset 17), or the decomposed form torch exports below
  opset 17: ``ReduceMean → Sub → Pow → ReduceMean → Add(eps) → Sqrt → Div → Mul(γ) → Add(β)``;
* **check** (:func:`check_readers`): γ and β are constant vectors over the channels, and the output is read
  only by MatMul / Gemm layers with a constant weight that contract its channel axis (``x @ W``), or by
  ``Shape`` (which reads no value). Anything else that reads it — a residual ``Add``, a graph output, another
  LayerNorm — would see the divided channels: the match fails, with the reader named;
* **rewrite** (:func:`smooth_layernorms`): new γ/s, β/s and weight initializers (the originals may be
  shared), unused originals dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from rexdeploy.analyze import ConstantResolver
from rexdeploy.errors import InputError
from rexdeploy.graph import consumers
from rexdeploy.passes.rewrite import drop_unread, set_constant_input, unique_name
from rexdeploy.plans import validate_smooth_alpha

NORMALIZED_MAX = 3.0
"""c in ``max|X_j| ≈ |γ_j|·c + |β_j|``: the largest |x̂_j| expected of a token normalized to unit variance over
its channels (3σ of a Gaussian channel)."""

SHAPE_ONLY_READERS = ("Shape",)
"""Readers that see the tensor's shape, not its values: smoothing leaves what they compute unchanged."""


@dataclass(frozen=True)
class LayerNormTail:
    """A matched LayerNorm: the node(s) reading γ and β, and their values as float64 vectors over the channels."""

    name: str  # the LayerNormalization node, or the decomposed form's last node (the β Add, or the γ Mul)
    form: str  # "op" | "decomposed"
    output: str
    gamma_at: tuple[str, int]  # (node name, input index) where γ is read
    beta_at: tuple[str, int] | None  # None: no β (LayerNormalization without bias, or a Mul-only tail)
    gamma: np.ndarray = field(compare=False, repr=False)
    beta: np.ndarray = field(compare=False, repr=False)

    @property
    def channels(self) -> int:
        return int(self.gamma.size)


@dataclass(frozen=True)
class LinearReader:
    """A MatMul / Gemm that reads the LayerNorm output as ``x @ W``: its weight as the node consumes it and the
    weight axis that runs over the LayerNorm's channels (the rows scaled by s)."""

    node: str
    weight_index: int
    row_axis: int
    weight: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class MatchResult:
    """A pattern match and its check: ``ok`` when it can be smoothed, else ``reason`` says why not."""

    name: str
    tail: LayerNormTail | None = None
    readers: tuple[LinearReader, ...] = ()
    reason: str = ""
    kept: tuple[str, ...] = ()  # with ``clone``: what must keep the original output (a residual Add, a graph output)

    @property
    def ok(self) -> bool:
        return not self.reason

    def fail(self, reason: str) -> MatchResult:
        return MatchResult(self.name, self.tail, self.readers, reason)


@dataclass(frozen=True)
class SmoothedSite:
    """One smoothed LayerNorm: its readers, and the estimated range spread (largest channel max over the median
    channel max) of its output before and after."""

    layernorm: str
    output: str  # the smoothed tensor the readers now read (a clone's output when ``cloned``)
    readers: tuple[str, ...]
    channels: int
    scale_min: float
    scale_max: float
    spread_before: float
    spread_after: float
    cloned: bool = False


@dataclass(frozen=True)
class SmoothResult:
    """The pass result (onnx-ir's ``PassResult`` shape): the model, whether it changed, what was smoothed and
    what was refused (LayerNorm name, reason)."""

    model: onnx.ModelProto
    modified: bool
    smoothed: tuple[SmoothedSite, ...]
    refused: tuple[tuple[str, str], ...]

    @property
    def smoothed_tensors(self) -> frozenset[str]:
        """The tensors whose values changed (the smoothed LayerNorm outputs): ranges derived before are stale."""
        return frozenset(site.output for site in self.smoothed)


# ----------------------------------------------------------------------------------------------------------
# pattern


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _vector(consts: ConstantResolver, name: str) -> np.ndarray | None:
    """A constant that varies only along the last axis, as a float64 vector (None: not constant or not so)."""
    value = consts.value(name) if name else None
    if value is None or value.dtype.kind != "f" or value.size == 0:
        return None
    if value.ndim > 1 and any(d != 1 for d in value.shape[:-1]):
        return None
    return value.astype(np.float64).reshape(-1)


def _reduce_axes(node: onnx.NodeProto, consts: ConstantResolver) -> list[int] | None:
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:  # opset 18: axes as an input
        value = consts.value(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]  # type: ignore[attr-defined]


def _other(node: onnx.NodeProto, name: str) -> tuple[int, str]:
    """The index and name of the input of a binary node that is not ``name``."""
    index = 1 if node.input[0] == name else 0
    return index, node.input[index]


def match_layernorm(
    node: onnx.NodeProto,
    consts: ConstantResolver,
    producers: dict[str, onnx.NodeProto],
    readers_of: dict[str, list[onnx.NodeProto]],
) -> MatchResult | None:
    """The pattern: None when ``node`` is not the last node of a LayerNorm; else a match (γ, β read), which may
    already fail (e.g. a LayerNorm over several axes, or non-constant γ)."""
    if node.op_type == "LayerNormalization":
        result = MatchResult(node.name)
        if int(_attr(node, "axis", -1)) != -1:  # type: ignore[call-overload]
            return result.fail(f"normalizes from axis {_attr(node, 'axis', -1)}, not over the last axis alone")
        gamma = _vector(consts, node.input[1] if len(node.input) > 1 else "")
        if gamma is None:
            return result.fail("its scale γ is not a constant vector over the channels")
        has_beta = len(node.input) > 2 and bool(node.input[2])
        beta = _vector(consts, node.input[2]) if has_beta else np.zeros_like(gamma)
        if beta is None or beta.size != gamma.size:
            return result.fail("its bias β is not a constant vector over the channels")
        tail = LayerNormTail(node.name, "op", node.output[0], (node.name, 1), (node.name, 2) if has_beta else None,
                             gamma, beta)  # fmt: skip
        return MatchResult(node.name, tail)
    if node.op_type not in ("Add", "Mul"):
        return None
    # decomposed: [Add(β) ∘] Mul(γ) ∘ Div(Sub(x, ReduceMean(x)), Sqrt(...))
    add: onnx.NodeProto | None = None
    mul = node
    if node.op_type == "Add":
        mul_out = next((i for i in node.input if producers.get(i) is not None and producers[i].op_type == "Mul"), None)
        if mul_out is None or _vector(consts, _other(node, mul_out)[1]) is None:
            return None  # not a β Add (e.g. a residual Add after a LayerNorm without β: the Mul is the tail)
        add, mul = node, producers[mul_out]
    div_out = next((i for i in mul.input if producers.get(i) is not None and producers[i].op_type == "Div"), None)
    if div_out is None or not _is_normalization(producers[div_out], consts, producers):
        return None
    if add is None and any(r.op_type == "Add" and _vector(consts, _other(r, node.output[0])[1]) is not None
                           for r in readers_of.get(node.output[0], [])):  # fmt: skip
        return None  # the Mul is not the tail: the β Add after it is
    name = (add or mul).name
    result = MatchResult(name)
    gamma_index, gamma_name = _other(mul, div_out)
    gamma = _vector(consts, gamma_name)
    if gamma is None:
        return result.fail("its scale γ (the Mul after the normalization) is not a constant vector")
    if add is not None and [r.name for r in readers_of.get(mul.output[0], [])] != [add.name]:
        return result.fail("the normalized, γ-scaled tensor is also read before its β Add")
    beta_at: tuple[str, int] | None = None
    beta = np.zeros_like(gamma)
    if add is not None:
        beta_index, beta_name = _other(add, mul.output[0])
        found = _vector(consts, beta_name)
        if found is None or found.size not in (1, gamma.size):
            return result.fail("its bias β (the Add after γ) is not a vector over the channels")
        beta, beta_at = np.broadcast_to(found, gamma.shape).copy(), (add.name, beta_index)
    tail = LayerNormTail(name, "decomposed", (add or mul).output[0], (mul.name, gamma_index), beta_at, gamma, beta)
    return MatchResult(name, tail)


def _is_normalization(div: onnx.NodeProto, consts: ConstantResolver, producers: dict[str, onnx.NodeProto]) -> bool:
    """``Div(Sub(x, ReduceMean(x, axes=[-1])), Sqrt(...))``: x̂, normalized over the last axis."""
    sub, sqrt = producers.get(div.input[0]), producers.get(div.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return False
    mean = producers.get(sub.input[1])
    return (
        mean is not None
        and mean.op_type == "ReduceMean"
        and mean.input[0] == sub.input[0]
        and _reduce_axes(mean, consts) == [-1]
    )


# ----------------------------------------------------------------------------------------------------------
# check


def check_readers(
    match: MatchResult,
    consts: ConstantResolver,
    readers_of: dict[str, list[onnx.NodeProto]],
    graph_outputs: set[str],
    clone: bool = False,
) -> MatchResult:
    """The check: every reader of the LayerNorm output is a MatMul / Gemm computing ``x @ W`` with a constant
    weight over the same channels, or a Shape; at least one such layer. With ``clone``, other readers (a residual
    Add, a graph output) may stay: they keep the original output, and the MatMul/Gemm readers get a smoothed
    copy of the LayerNorm's affine part (``kept`` names them)."""
    if not match.ok or match.tail is None:
        return match
    tail = match.tail
    kept: list[tuple[str, str]] = []
    if tail.output in graph_outputs:
        kept.append((tail.output, f"its output {tail.output!r} is a graph output: its channels cannot be divided"))
    found: list[LinearReader] = []
    for node in readers_of.get(tail.output, []):
        if node.op_type in SHAPE_ONLY_READERS:
            continue
        reader = _linear_reader(node, tail, consts)
        if isinstance(reader, str):
            kept.append((node.name, reader))
        else:
            found.append(reader)
    if kept and not clone:
        return match.fail(kept[0][1])
    if not found:
        return match.fail("its output feeds no MatMul/Gemm with a constant weight: nothing to move the scale into")
    return MatchResult(match.name, tail, tuple(found), kept=tuple(name for name, _ in kept))


def _linear_reader(node: onnx.NodeProto, tail: LayerNormTail, consts: ConstantResolver) -> LinearReader | str:
    """The reader as a LinearReader, or why it is not one."""
    what = f"{node.op_type} {node.name!r}"
    if node.op_type == "MatMul":
        if node.input[0] != tail.output:
            return f"its output is the right operand of {what} (W @ x runs over the tokens, not the channels)"
        weight = consts.value(node.input[1])
        if weight is None or weight.ndim != 2:
            return f"its output feeds {what} whose other operand is not a constant 2-D weight"
        index, axis = 1, 0
    elif node.op_type == "Gemm":
        if node.input[0] != tail.output or int(_attr(node, "transA", 0)):  # type: ignore[call-overload]
            return f"its output feeds {what} as B or transposed A (only x @ W is smoothed)"
        weight = consts.value(node.input[1])
        if weight is None or weight.ndim != 2:
            return f"its output feeds {what} whose B is not a constant 2-D weight"
        index, axis = 1, 1 if int(_attr(node, "transB", 0)) else 0  # type: ignore[call-overload]
    else:
        return (
            f"its output also feeds {what}, not a MatMul/Gemm with a constant weight: dividing its channels "
            "would change what that node computes"
        )
    if weight.shape[axis] != tail.channels:
        return f"{what} reads {weight.shape[axis]} channels, the LayerNorm has {tail.channels}"
    if weight.dtype.kind != "f":
        return f"{what} has a {weight.dtype} weight (already quantized?)"
    return LinearReader(node.name, index, axis, weight)


# ----------------------------------------------------------------------------------------------------------
# the scales (SmoothQuant Eq. 4) and the rewrite


def layernorm_channel_max(gamma: np.ndarray, beta: np.ndarray, normalized_max: float = NORMALIZED_MAX) -> np.ndarray:
    """Data-free estimate of max|X_j| of a LayerNorm output ``γ ⊙ x̂ + β``: ``|γ_j|·c + |β_j|``."""
    return np.abs(gamma) * normalized_max + np.abs(beta)


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` (SmoothQuant Eq. 4); 1 where either maximum is 0."""
    alpha = validate_smooth_alpha(alpha)
    x = np.asarray(x_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    live = (x > 0) & (w > 0)
    s = np.ones(np.broadcast(x, w).shape)
    s[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    return s


def _spread(channel_max: np.ndarray) -> float:
    median = float(np.median(channel_max))
    return float(np.max(channel_max)) / median if median > 0 else float("inf")


def find_smoothable(
    model: onnx.ModelProto, consts: ConstantResolver | None = None, clone: bool = False
) -> list[MatchResult]:
    """Every LayerNorm of ``model`` (pattern), each checked (:func:`check_readers`): ``ok`` or with the reason it
    cannot be smoothed."""
    consts = consts or ConstantResolver(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    readers_of = consumers(model)
    outputs = {o.name for o in model.graph.output}
    matches = []
    for node in model.graph.node:
        match = match_layernorm(node, consts, producers, readers_of)
        if match is not None:
            matches.append(check_readers(match, consts, readers_of, outputs, clone))
    return matches


def smooth_layernorms(
    model: onnx.ModelProto,
    alpha: float,
    *,
    normalized_max: float = NORMALIZED_MAX,
    clone: bool = False,
    channel_max: Mapping[str, np.ndarray] | None = None,
) -> SmoothResult:
    """Smooth every LayerNorm whose output only MatMul/Gemm layers with constant weights read (a copy of ``model``;
    the input is not changed): γ and β divided by s, those weights' input rows multiplied by s.

    ``clone``: a LayerNorm whose output other nodes read too (post-LN transformers: the residual ``Add``) is
    smoothed on a copy of its affine part — the ``LayerNormalization`` node, or the decomposed form's γ ``Mul``
    and β ``Add`` — that only the MatMul/Gemm readers read; the others keep the original. Float-exact as well;
    it costs one more LayerNorm (or Mul + Add) per site.

    ``channel_max``: max|X_j| of a LayerNorm output (by tensor name) from elsewhere (e.g. synthetic probes), used
    instead of the ``|γ_j|·c + |β_j|`` estimate."""
    alpha = validate_smooth_alpha(alpha)
    consts = ConstantResolver(model)
    matches = find_smoothable(model, consts, clone)
    refused = tuple((m.name, m.reason) for m in matches if not m.ok)
    good = [m for m in matches if m.ok]
    if not good:
        return SmoothResult(model, False, (), refused)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    taken = {i.name for i in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    taken |= {i.name for i in out.graph.input} | set(nodes)
    replaced: set[str] = set()

    def put(at: tuple[str, int], value: np.ndarray, name: str) -> None:
        set_constant_input(out, nodes[at[0]], at[1], value, name, taken, replaced, consts)

    sites = []
    for m in good:
        tail = m.tail
        assert tail is not None
        w_max = np.max(
            [np.max(np.abs(np.moveaxis(r.weight.astype(np.float64), r.row_axis, 0)), axis=1) for r in m.readers], axis=0
        )
        given = (channel_max or {}).get(tail.output)
        x_max = (
            layernorm_channel_max(tail.gamma, tail.beta, normalized_max)
            if given is None
            else np.asarray(given, dtype=np.float64).reshape(-1)
        )
        if x_max.shape != w_max.shape:
            raise InputError(
                f"channel_max of {tail.output!r} has {x_max.size} values; its LayerNorm has {tail.channels} channels"
            )
        s = smoothing_scales(x_max, w_max, alpha)
        if m.kept:
            tail = _clone_affine(out, nodes, tail, taken)
            for r in m.readers:
                reader = nodes[r.node]
                reader.input[0] = tail.output  # MatMul x @ W / Gemm A: the activation is input 0
        put(tail.gamma_at, tail.gamma / s, f"{tail.name}_smooth_gamma")
        if tail.beta_at is not None:
            put(tail.beta_at, tail.beta / s, f"{tail.name}_smooth_beta")
        for r in m.readers:
            shape = [1, 1]
            shape[r.row_axis] = -1
            weight = r.weight.astype(np.float64) * s.reshape(shape)
            put((r.node, r.weight_index), weight, f"{r.node}_smooth_weight")
        sites.append(SmoothedSite(m.name, tail.output, tuple(r.node for r in m.readers), tail.channels,
                                  float(np.min(s)), float(np.max(s)), _spread(x_max), _spread(x_max / s),
                                  cloned=bool(m.kept)))  # fmt: skip
    drop_unread(out, replaced)
    return SmoothResult(out, True, tuple(sites), refused)


def _clone_affine(
    model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], tail: LayerNormTail, taken: set[str]
) -> LayerNormTail:
    """A copy of the LayerNorm's affine part (the LayerNormalization node; the decomposed γ Mul and β Add), inserted
    after the original, with its own output; returns the copy as a LayerNormTail (γ, β still the original's)."""
    graph = model.graph
    originals = [tail.gamma_at[0]] if tail.beta_at is None else list(dict.fromkeys([tail.gamma_at[0], tail.beta_at[0]]))
    renamed: dict[str, str] = {}
    copies = []
    for name in originals:
        node = onnx.NodeProto()
        node.CopyFrom(nodes[name])
        node.name = unique_name(f"{name}_smoothed", taken)
        del node.output[1:]  # LayerNormalization's optional Mean / InvStdDev: not needed twice
        node.output[0] = renamed[nodes[name].output[0]] = unique_name(f"{nodes[name].output[0]}_smoothed", taken)
        for i, value in enumerate(node.input):
            node.input[i] = renamed.get(value, value)
        copies.append(node)
        nodes[node.name] = node
    position = max(i for i, n in enumerate(graph.node) if n.name in originals) + 1
    for offset, node in enumerate(copies):
        graph.node.insert(position + offset, node)
    nodes.update({n.name: n for n in graph.node})  # insert() copies: point the names at the graph's own nodes
    new_name = {old: copy.name for old, copy in zip(originals, copies, strict=True)}
    beta_at = None if tail.beta_at is None else (new_name[tail.beta_at[0]], tail.beta_at[1])
    return LayerNormTail(new_name[tail.name], tail.form, copies[-1].output[0], (new_name[tail.gamma_at[0]],
                         tail.gamma_at[1]), beta_at, tail.gamma, tail.beta)  # fmt: skip


def smoothing_note(result: SmoothResult, alpha: float) -> str:
    """One line for a plan's notes: how many LayerNorms were smoothed, and the first refusal with its reason."""
    text = f"LayerNorm smoothing alpha={alpha:g}: {len(result.smoothed)} smoothed"
    if result.refused:
        name, reason = result.refused[0]
        more = f" (and {len(result.refused) - 1} more)" if len(result.refused) > 1 else ""
        text += f", {len(result.refused)} left as they are: {name!r} {reason}{more}"
    return text


__all__ = [
    "NORMALIZED_MAX",
    "LayerNormTail",
    "LinearReader",
    "MatchResult",
    "SmoothResult",
    "SmoothedSite",
    "check_readers",
    "find_smoothable",
    "layernorm_channel_max",
    "match_layernorm",
    "smooth_layernorms",
    "smoothing_note",
    "smoothing_scales",
]
