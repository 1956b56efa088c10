"""How much each layer's output error reaches the network output (data-free, measured once).

One onnxruntime session runs the FP32 model with Gaussian noise injectable at every layer output:
``y_l + δ · rms(y_l) · N(0, 1)`` inside an ``If(mask_l)``, the masks being boolean graph inputs (only
the layer being measured generates noise). Switching one mask on
at a time gives the gain ``g_l = ||F'(x) - F(x)|| / (δ ||F(x)||)``: the relative output error per
unit relative error at layer l. With independent errors the network's relative error is then
``E ≈ sqrt(Σ_l g_l² ε_l²)`` (:mod:`rexdeploy.planner.fidelity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.analyze import Layer
from rexdeploy.ranges import fixed_batch_of_one, run_outputs, tap_session

NOISE = 1e-2  # relative noise injected: small enough to stay in the linear regime
SAMPLE = 16384  # |x| values kept per layer input to estimate clipping


@dataclass(frozen=True)
class Sensitivity:
    gains: dict[str, float]  # layer name → g_l
    input_rms: dict[str, float]  # layer name → rms of its activation input over the probes
    output_rms: dict[str, float]
    input_abs: dict[str, np.ndarray]  # layer name → a seeded sample of |x| of its input (for clipping)

    def clip_ms(self, name: str, max_abs: float) -> float:
        """Mean square of what a symmetric range ``max_abs`` clips off the layer's input on the probes."""
        excess = np.maximum(self.input_abs[name] - max_abs, 0.0)
        return float(np.mean(excess * excess))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure_sensitivity(
    model: onnx.ModelProto, layers: Sequence[Layer], feeds: dict[str, np.ndarray], seed: int = 0
) -> Sensitivity:
    """Gains of every layer of the (BN-folded) FP32 ``model`` on the probe ``feeds`` (a batch-1 export runs them
    one at a time: :func:`rexdeploy.ranges.fixed_batch_of_one`)."""
    taps = list(dict.fromkeys([*(layer.output for layer in layers), *(layer.input for layer in layers)]))
    single = fixed_batch_of_one(model)
    values = dict(zip(taps, run_outputs(tap_session(model, taps), taps, feeds, single), strict=True))
    rms = {name: float(np.sqrt(np.mean(np.square(v, dtype=np.float64)))) for name, v in values.items()}
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    graph = noisy.graph
    rename = {layer.output: f"{layer.output}__clean" for layer in layers}
    for node in graph.node:
        for k, out in enumerate(node.output):
            if out in rename:
                node.output[k] = rename[out]
    for i, layer in enumerate(layers):
        clean, mask = rename[layer.output], f"__mask_{i}"
        graph.input.append(helper.make_tensor_value_info(mask, TensorProto.BOOL, []))
        amp = np.array(NOISE * max(rms[layer.output], 1e-12), dtype=np.float32)
        # If(mask): only the layer being measured pays for its noise; the others pass y through
        noisy_branch = helper.make_graph(
            [
                helper.make_node("RandomNormalLike", [clean], [f"__n_{i}"], seed=float(seed + i)),
                helper.make_node("Mul", [f"__n_{i}", f"__amp_{i}"], [f"__na_{i}"]),
                helper.make_node("Add", [clean, f"__na_{i}"], [f"__y_{i}"]),
            ],
            f"noisy_{i}",
            [],
            [helper.make_tensor_value_info(f"__y_{i}", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(amp, f"__amp_{i}")],
        )
        clean_branch = helper.make_graph(
            [helper.make_node("Identity", [clean], [f"__c_{i}"])],
            f"clean_{i}",
            [],
            [helper.make_tensor_value_info(f"__c_{i}", TensorProto.FLOAT, None)],
        )
        graph.node.append(
            helper.make_node("If", [mask], [layer.output], then_branch=noisy_branch, else_branch=clean_branch)
        )
    del graph.value_info[:]
    session = _session(noisy)
    masks = {f"__mask_{i}": np.array(False) for i in range(len(layers))}
    first = [session.get_outputs()[0].name]
    reference = np.asarray(run_outputs(session, first, {**feeds, **masks}, single)[0], dtype=np.float64)
    ref_norm = max(float(np.linalg.norm(reference)), 1e-30)
    gains: dict[str, float] = {}
    for i, layer in enumerate(layers):
        on = {**masks, f"__mask_{i}": np.array(True)}
        out = np.asarray(run_outputs(session, first, {**feeds, **on}, single)[0], dtype=np.float64)
        gains[layer.name] = float(np.linalg.norm(out - reference) / ref_norm / NOISE)
    rng = np.random.default_rng(seed)
    samples = {}
    for layer in layers:
        flat = np.abs(values[layer.input].ravel())
        samples[layer.name] = flat if flat.size <= SAMPLE else rng.choice(flat, SAMPLE, replace=False)
    return Sensitivity(
        gains,
        {layer.name: rms[layer.input] for layer in layers},
        {layer.name: rms[layer.output] for layer in layers},
        samples,
    )
