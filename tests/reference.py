"""An independent numpy interpreter for the small ONNX graphs the tests build, with REx fake
quantization: the reference the emitted Q/DQ graphs (run by onnxruntime / OpenVINO) are held to."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from rexdeploy.api import Expanded, expand_model
from rexdeploy.graph import fold_batchnorm
from rexdeploy.numerics import expand_weight, reconstruct
from rexdeploy.profile import Profile


def checked_expansion(
    model: onnx.ModelProto, probe: np.ndarray, profile: Profile, **settings: object
) -> tuple[Expanded, np.ndarray, onnx.ModelProto]:
    """Expand ``model`` with ``settings``, run ``onnx.checker``'s full check, compute it exactly on ``probe``;
    returns the expansion, its output and the BN-folded FP32 model the reference interprets."""
    expanded = expand_model(model, profile=profile, **settings)
    onnx.checker.check_model(expanded.model, full_check=True)
    return expanded, run_exact(expanded.model, probe), fold_batchnorm(model)[0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 distance ``‖a − b‖ / ‖b‖``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fake_quant_int8(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear(int8, zp 0) then DequantizeLinear: round half to even, saturate to [-128, 127]."""
    return (np.clip(np.rint(x / np.float32(scale)), -128, 127) * np.float32(scale)).astype(np.float32)


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
) -> list[np.ndarray]:
    """Interpret ``model`` in float64 numpy. ``weight_map(node_name, w)`` replaces a Conv/Gemm weight
    (e.g. by its REx reconstruction); ``act_scales`` fake-quantizes a node's input tensor.

    Activation orders: with ``act_order`` J > 1 a quantized input becomes x_1 = fq(x, s), x_j =
    fq(x − x_1 − … − x_{j−1}, s / 254^(j−1)), and the node computes Σ_{(j, k) in terms} op(x_j, W_k), where
    ``order_weights(node_name, w)`` gives the dequantized weight orders W_1..W_K (bias once)."""
    env: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in feeds.items()}
    env.update({i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer})
    for node in model.graph.node:
        a = _attrs(node)
        ins = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op in ("Conv", "Gemm"):
            x, w = ins[0], ins[1]
            assert x is not None and w is not None
            xs = [x]
            if act_scales and node.input[0] in act_scales:
                xs, rest, s1 = [], x.astype(np.float32), act_scales[node.input[0]]
                for j in range(act_order):
                    xs.append(fake_quant_int8(rest, float(np.float32(s1 / 254.0**j))))
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
            out = ins[0] + ins[1]
        elif op == "GlobalAveragePool":
            out = ins[0].mean(axis=(2, 3), keepdims=True)
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


def rex_order_weights(bits: int, order: int) -> Callable[[str, np.ndarray], list[np.ndarray]]:
    """Each weight's dequantized residual orders W_1..W_K, one array each."""

    def fn(name: str, w: np.ndarray) -> list[np.ndarray]:
        return [reconstruct([o], w.shape) for o in expand_weight(w, bits, order)]

    return fn


def rex_weight_map(bits: int, order: int, gamma: float | None = None) -> Callable[[str, np.ndarray], np.ndarray]:
    """Replace each weight by the sum of its dequantized residual orders (float32 scales, like the graph)."""

    def fn(name: str, w: np.ndarray) -> np.ndarray:
        orders = expand_weight(w, bits, order, gamma)
        return reconstruct(orders, w.shape)

    return fn


# OpenVINO (float layers pinned to f32) against the graph's exact semantics (run_exact), one probe at a time.
# Integer kernels are exact and the float parts agree to ~1e-7; what is left is an activation code that flips
# where a quantizer's input lies within float32 rounding of a rounding boundary. Only flips of the *last*
# activation order J show (a flip of x_j, j < J, moves the remainder by one step the other way and x_{j+1}
# takes it back), each costing ~5e-3 / 254^(J-1) of the output on these models: J = 1 flips are rare (one in
# 64 probes), J >= 2 flips are many but small. Measured (64 probes, AVX-512 VNNI host, f32), per-probe
# relative error median / max: J = 1: 1e-7 / 2e-7; J = 2: 1e-7 / 2.5e-4; J = 3: 1.2e-6 / 3.2e-6. The bounds
# leave room for other CPUs' flips and still catch bf16 float layers (3e-3 to 7e-2), a dropped activation
# order (~3e-2) or int16 overflow (~0.2).
AGREE_MEDIAN = {1: 1e-6, 2: 1e-3, 3: 4e-5}
AGREE_MAX = {1: 2e-2, 2: 4e-3, 3: 1e-4}


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
