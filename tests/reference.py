"""An independent numpy interpreter for the small ONNX graphs the tests build, with REx fake
quantization: the reference the emitted Q/DQ graphs (run by onnxruntime / OpenVINO) are held to.

Nothing here comes from the code under test: the residual expansion, its sparse form, BatchNorm folding and
the activation scales are written from their definitions (shared/REX_METHOD.md, docs/activation-orders.md),
so a bug in rexdeploy's numerics shows as a mismatch instead of being copied into the reference."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from rexdeploy.api import Expanded, expand_model
from rexdeploy.plans import Plan
from rexdeploy.profile import Profile

ACT_QMAX = 127  # symmetric int8 activations, zero-point 0
ACT_UQMAX = 255  # uint8 activations (zero-point 0) of a tensor that is >= 0 (a ReLU output, pooled or not)
ACT_STEP = 254  # each activation order's scale is the previous one's / (2·127): its remainder spans ±s/2
# the first activation order's range with J >= 2 orders is the data-free range widened 4x (docs/activation-orders.md)
ACT_RANGE_WIDEN = {1: 1.0, 2: 4.0, 3: 4.0}


# --------------------------------------------------------------------------------------------------
# REx from its definition (shared/REX_METHOD.md)


def rex_orders(w: np.ndarray, bits: int, order: int, gamma: float | None = None) -> list[np.ndarray]:
    """The dequantized residual orders Q^-1(R^1) … Q^-1(R^K) of ``w`` (axis 0 = output channel), float64, each
    of ``w``'s shape (zero on the channels a sparse order skips).

    Per output channel, symmetric: s = max|W| / (2^(b-1) - 1) (1 for an all-zero channel), Q(W) = round(W / s)
    (half to even) clipped to ±(2^(b-1) - 1), Q^-1(R) = s·R. R^1 = Q(W); R^k = Q(W - Σ_{j<k} Q^-1(R^j)).
    Sparse (γ not None): every order k >= 2 quantizes only the round(γ/(K-1)·C) channels (at least one, at most
    C; none for γ = 0) whose current residual has the largest L1 norm, ties to the lowest channel index."""
    qmax = 2 ** (bits - 1) - 1
    residual = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1).copy()
    channels = residual.shape[0]
    fraction = 1.0 if gamma is None or order == 1 else min(1.0, gamma / (order - 1))
    keep = min(channels, max(1, int(fraction * channels + 0.5))) if fraction > 0.0 else 0
    orders = []
    for k in range(1, order + 1):
        if k == 1 or keep == channels:
            rows = np.arange(channels)
        else:
            l1 = np.abs(residual).sum(axis=1)
            rows = np.sort(np.argsort(-l1, kind="stable")[:keep])
        part = residual[rows]
        scale = np.abs(part).max(axis=1, initial=0.0) / qmax
        scale[scale == 0.0] = 1.0
        codes = np.clip(np.round(part / scale[:, None]), -qmax, qmax)
        dequantized = np.zeros_like(residual)
        dequantized[rows] = codes * scale[:, None]
        orders.append(dequantized.reshape(w.shape))
        residual = residual - dequantized
    return orders


def _per_layer(gamma: float | Mapping[str, float | None] | None, name: str) -> float | None:
    return gamma.get(name) if isinstance(gamma, Mapping) else gamma


def rex_order_weights(
    bits: int, order: int, gamma: float | Mapping[str, float | None] | None = None
) -> Callable[[str, np.ndarray], list[np.ndarray]]:
    """Each weight's dequantized residual orders W_1..W_K, one array each (``gamma`` per layer name or for all)."""

    def fn(name: str, w: np.ndarray) -> list[np.ndarray]:
        return rex_orders(w, bits, order, _per_layer(gamma, name))

    return fn


def rex_weight_map(
    bits: int, order: int, gamma: float | Mapping[str, float | None] | None = None
) -> Callable[[str, np.ndarray], np.ndarray]:
    """Replace each weight by the sum of its dequantized residual orders."""

    def fn(name: str, w: np.ndarray) -> np.ndarray:
        return np.sum(rex_orders(w, bits, order, _per_layer(gamma, name)), axis=0)

    return fn


def activation_scales(
    ranges: Mapping[str, float], act_order: int = 1, unsigned: Collection[str] = ()
) -> dict[str, float]:
    """The first activation order's int8 scale of each tensor: its range (widened for J >= 2) / 127 (float64;
    the graph stores each order's scale in float32, which :func:`fake_quant_int8` rounds to); for a tensor in
    ``unsigned`` (known ≥ 0, quantized to uint8 with zero-point 0) the range / 255."""
    return {t: r * ACT_RANGE_WIDEN[act_order] / (ACT_UQMAX if t in unsigned else ACT_QMAX) for t, r in ranges.items()}


# --------------------------------------------------------------------------------------------------
# BatchNorm folding from its definition


def fold_batchnorm_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv → BatchNormalization pair (the Conv output feeding only the BN) as one Conv:
    W' = W·γ/√(σ² + ε) per output channel, b' = (b − μ)·γ/√(σ² + ε) + β (float64, stored in W's dtype);
    the Conv takes the BN's output name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    uses: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    producer = {o: n for n in out.graph.node for o in n.output}
    keep: list[onnx.NodeProto] = []
    for node in out.graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or uses[conv.output[0]] != 1:
            keep.append(node)
            continue
        gamma, beta, mean, var = (inits[n].astype(np.float64) for n in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        w = inits[conv.input[1]]
        b = inits[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        w_name, b_name = f"{conv.name}_ref_folded_w", f"{conv.name}_ref_folded_b"
        out.graph.initializer.extend([
            numpy_helper.from_array((w.astype(np.float64) * factor.reshape(-1, 1, 1, 1)).astype(w.dtype), w_name),
            numpy_helper.from_array(((b - mean) * factor + beta).astype(w.dtype), b_name),
        ])  # fmt: skip
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = node.output[0]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def layer_input_ranges(
    model: onnx.ModelProto, probe: np.ndarray, name: str = "x", joins: bool = False
) -> dict[str, float]:
    """max |x| of every Conv/Gemm input on ``probe`` (``joins``: and of every Add and GlobalAveragePool input),
    computed by the reference interpreter in float64."""
    seen: dict[str, float] = {}
    run_reference(model, {name: probe}, inputs_seen=seen)
    ranges = {k: v for k, v in seen.items() if ":" not in k}
    if joins:
        ranges.update({k.split(":", 1)[1]: v for k, v in seen.items() if ":" in k})
    return ranges


def bias_correction_means(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The per-channel means of every layer input that expand_model's bias correction uses (BN statistics
    propagated by rexdeploy: an input here, whose own accuracy tests/test_ranges*.py check against Monte Carlo)."""
    from rexdeploy.analyze import quantizable_layers
    from rexdeploy.graph import fold_batchnorm
    from rexdeploy.ranges import activation_means

    folded, stats = fold_batchnorm(model)
    return activation_means(folded, stats, [layer.input for layer in quantizable_layers(folded)])


def checked_expansion(
    model: onnx.ModelProto,
    probe: np.ndarray,
    profile: Profile,
    plan: Plan | None = None,
    *,
    joins: bool = False,
    **settings: object,
) -> tuple[Expanded, np.ndarray, onnx.ModelProto, dict[str, float]]:
    """Expand ``model`` with ``plan`` or ``settings``, run ``onnx.checker``'s full check, compute it exactly on
    ``probe``. The activation ranges are the reference's own (max |x| of each layer input on ``probe``; ``joins``:
    and of each Add and pool input), handed to the pass, so the reference derives the scales itself. Returns the
    expansion, its output, the BN-folded FP32 model (folded by the reference) and those ranges."""
    folded = fold_batchnorm_reference(model)
    ranges = layer_input_ranges(folded, probe, joins=joins)
    expanded = expand_model(model, plan, profile=profile, ranges=ranges, **settings)
    onnx.checker.check_model(expanded.model, full_check=True)
    return expanded, run_exact(expanded.model, probe), folded, ranges


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 distance ``‖a − b‖ / ‖b‖``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fake_quant_int8(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear(int8, zp 0) then DequantizeLinear: round half to even, saturate to [-128, 127]."""
    return (np.clip(np.rint(x / np.float32(scale)), -128, 127) * np.float32(scale)).astype(np.float32)


def fake_quant_uint8(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear(uint8, zp 0) then DequantizeLinear: round half to even, saturate to [0, 255]."""
    return (np.clip(np.rint(x / np.float32(scale)), 0, 255) * np.float32(scale)).astype(np.float32)


def _fake_quant(x: np.ndarray, scale: float, unsigned: bool) -> np.ndarray:
    return (fake_quant_uint8 if unsigned else fake_quant_int8)(x.astype(np.float32), scale).astype(np.float64)


def conv2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides: list[int], pads: list[int], group: int
) -> np.ndarray:
    n, c, _, _ = x.shape
    cout, cin_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    win = win.reshape(n, group, c // group, *win.shape[2:])
    wg = w.reshape(group, cout // group, cin_g, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win.astype(np.float64), wg.astype(np.float64))
    y = y.reshape(n, cout, *y.shape[3:])
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def run_reference(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    weight_map: Callable[[str, np.ndarray], np.ndarray] | None = None,
    act_scales: dict[str, float] | None = None,
    order_weights: Callable[[str, np.ndarray], list[np.ndarray]] | None = None,
    terms: set[tuple[int, int]] | None = None,
    act_order: int = 1,
    inputs_seen: dict[str, float] | None = None,
    unsigned: Collection[str] = (),
    input_means: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Interpret ``model`` in float64 numpy. ``weight_map(node_name, w)`` replaces a Conv/Gemm weight
    (e.g. by its REx reconstruction); ``act_scales`` fake-quantizes a node's input tensor (a Conv/Gemm's, an
    Add's or a GlobalAveragePool's: the joins between int8 layers, rexdeploy.passes.residual).

    Activation orders: with ``act_order`` J > 1 a quantized input becomes x_1 = fq(x, s), x_j =
    fq(x − x_1 − … − x_{j−1}, s / 254^(j−1)), and the node computes Σ_{(j, k) in terms} op(x_j, W_k), where
    ``order_weights(node_name, w)`` gives the dequantized weight orders W_1..W_K (bias once). ``inputs_seen``
    collects max |x| of each Conv/Gemm input tensor. A tensor in ``unsigned`` has its first order quantized to
    uint8 (zero-point 0) instead of int8. ``input_means`` (per-channel means of layer inputs) turns on the bias
    correction: a layer whose weight was replaced adds ``Σ_{c,k} (W − Ŵ)[o,c,k]·mean_c`` to its bias (Ŵ the sum of
    its replacement orders)."""
    env: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in feeds.items()}
    env.update({i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer})
    for node in model.graph.node:
        a = _attrs(node)
        ins = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op in ("Conv", "Gemm"):
            x, w = ins[0], ins[1]
            assert x is not None and w is not None
            if inputs_seen is not None:
                inputs_seen[node.input[0]] = float(np.abs(x).max())
            xs = [x]
            if act_scales and node.input[0] in act_scales:
                xs, rest, s1 = [], x.astype(np.float32), act_scales[node.input[0]]
                for j in range(act_order):
                    quant = fake_quant_uint8 if j == 0 and node.input[0] in unsigned else fake_quant_int8
                    xs.append(quant(rest, s1 / float(ACT_STEP) ** j))
                    rest = (rest - xs[-1]).astype(np.float32)
            transposed = op == "Gemm" and not a.get("transB", 0)
            if transposed:
                w = w.T  # out-channel-major, like rexdeploy's numerics
            ws = [w]
            if weight_map is not None:
                ws = [weight_map(node.name, w)]
            if order_weights is not None:
                ws = order_weights(node.name, w)
            pairs = sorted(terms) if terms is not None and len(xs) > 1 else [(1, k) for k in range(1, len(ws) + 1)]
            b = ins[2] if len(ins) > 2 else None
            if input_means is not None and node.input[0] in input_means and (weight_map or order_weights):
                delta = (w - np.sum(ws, axis=0)).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # (O, I / group)
                group = int(a.get("group", 1))  # type: ignore[call-overload]
                mean = np.asarray(input_means[node.input[0]], dtype=np.float64).reshape(group, 1, -1)
                shift = (delta.reshape(group, -1, delta.shape[1]) * mean).sum(axis=2).reshape(-1)
                b = shift if b is None else b + shift
            out = sum(
                _layer(op, a, xs[j - 1].astype(np.float64), ws[k - 1], b if first else None)
                for first, (j, k) in zip([True] + [False] * len(pairs), pairs, strict=False)
            )
        elif op == "Relu":
            out = np.maximum(ins[0], 0.0)
        elif op == "Clip":
            lo = ins[1] if len(ins) > 1 and ins[1] is not None else -np.inf
            hi = ins[2] if len(ins) > 2 and ins[2] is not None else np.inf
            out = np.clip(ins[0], lo, hi)
        elif op == "Add":
            a0, a1 = ins[0], ins[1]
            if inputs_seen is not None:  # recorded under the Add's name: layer_input_ranges(joins=True) wants them
                inputs_seen.update(
                    {f"{node.name}:{t}": float(np.abs(v).max()) for t, v in zip(node.input, (a0, a1), strict=True)}
                )
            if act_scales:  # a residual Add between int8 layers reads Q/DQ'd inputs (rexdeploy.passes.residual)
                a0, a1 = (_fake_quant(v, act_scales[t], t in unsigned) if t in act_scales else v
                          for t, v in zip(node.input, (a0, a1), strict=True))  # fmt: skip
            out = a0 + a1
        elif op == "GlobalAveragePool":
            x = ins[0]
            if inputs_seen is not None:  # under the pool's name, like an Add's: layer_input_ranges(joins=True)
                inputs_seen[f"{node.name}:{node.input[0]}"] = float(np.abs(x).max())
            if act_scales and node.input[0] in act_scales:  # a pool between int8 layers reads a Q/DQ'd input
                x = _fake_quant(x, act_scales[node.input[0]], node.input[0] in unsigned)
            out = x.mean(axis=(2, 3), keepdims=True)
        elif op == "Flatten":
            out = ins[0].reshape(ins[0].shape[0], -1)
        elif op == "BatchNormalization":
            x, s, bb, m, v = ins
            eps = float(a.get("epsilon", 1e-5))  # type: ignore[arg-type]
            sh = (1, -1, 1, 1)
            out = (x - m.reshape(sh)) / np.sqrt(v.reshape(sh) + eps) * s.reshape(sh) + bb.reshape(sh)
        else:
            raise NotImplementedError(f"reference interpreter has no {op}")
        env[node.output[0]] = out
    return [env[o.name] for o in model.graph.output]


def _layer(op: str, a: dict[str, object], x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if op == "Conv":
        pads = list(a.get("pads", [0] * 4))  # type: ignore[call-overload]
        return conv2d(x, w, b, list(a.get("strides", [1, 1])), pads, int(a.get("group", 1)))  # type: ignore[call-overload]
    out = float(a.get("alpha", 1.0)) * x @ w.T  # type: ignore[arg-type]
    if b is not None:
        out = out + float(a.get("beta", 1.0)) * b  # type: ignore[arg-type]
    return np.asarray(out)


# OpenVINO (float layers pinned to f32) against the graph's exact semantics (run_exact), one probe at a time.
# Integer kernels are exact and the float parts agree to ~1e-7; what is left is an activation code that flips
# where a quantizer's input lies within float32 rounding of a rounding boundary. Only flips of the *last*
# activation order J show (a flip of x_j, j < J, moves the remainder by one step the other way and x_{j+1}
# takes it back), each costing ~5e-3 / 254^(J-1) of the output on these models: J = 1 flips are rare (one in
# 64 probes), J >= 2 flips are many but small. Measured (64 probes, AVX-512 VNNI host, f32), per-probe
# relative error median / max: J = 1: 1e-7 / 2e-7; J = 2: 1e-7 / 2.5e-4; J = 3: 1.2e-6 / 3.2e-6 (onnxruntime's
# fused integer kernels, J = 1: 7e-8 / 1e-2, one probe with a flip). The bounds leave room for other CPUs' flips
# and still catch bf16 float layers (median 3e-3 to 7e-2), a dropped activation order (~3e-2) or int16
# overflow (~0.2).
AGREE_MEDIAN = {1: 1e-6, 2: 1e-3, 3: 4e-5}
AGREE_MAX = {1: 5e-2, 2: 4e-3, 3: 1e-4}


def assert_engine_agrees(got: list[np.ndarray], want: list[np.ndarray], act_order: int = 1) -> np.ndarray:
    """Per-probe relative errors of an engine's outputs ``got`` against ``want`` (the exact graph), held to
    :data:`AGREE_MEDIAN` (most probes) and :data:`AGREE_MAX` (every probe) for ``act_order``; returns them."""
    assert len(got) == len(want) >= 8, "need at least 8 probes for a median"
    errors = np.array([rel_error(g, w) for g, w in zip(got, want, strict=True)])
    assert float(np.median(errors)) <= AGREE_MEDIAN[act_order], errors
    assert float(errors.max()) <= AGREE_MAX[act_order], errors
    return errors


def run_exact(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> np.ndarray:
    """onnxruntime with graph optimizations off: the graph's exact ONNX semantics (its Q/DQ fusions
    would swap in integer kernels with their own bias rounding)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {name: x})[0])
