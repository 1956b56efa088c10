"""Data-free activation ranges: the max |x| of each quantized layer input, whose scale is then
``max|x| / 127`` (int8) or ``max|x| / 255`` (uint8, a tensor ≥ 0 on an engine that runs uint8).

Two sources, combined by :func:`activation_ranges`:

* **BatchNorm statistics** (:mod:`rexdeploy.bnstats`): every folded BN output has per-channel mean
  ``beta`` and std ``|gamma|``; propagated through Relu / Clip / Add / pooling / Concat / activations /
  layers without BN, they give each reachable tensor's range by a clipping rule (``clip``): by default the
  range that minimizes the expected quantization error of Laplace channels of those moments, each channel's
  rounding noise weighted by the energy of the weights that read it and its clipping error by their gain for a
  patch (:func:`input_channel_gains`); ``"nstd"`` is the older
  ``max_c clip(mean_c ± n·std_c, lo_c, hi_c)``. No model run is needed.
* **Synthetic probes** (:func:`probe_ranges`): the FP32 model is run by onnxruntime on seeded inputs —
  standard-normal noise, or for image-shaped inputs smooth random fields with a natural-image 1/f
  spectrum — and each tensor's largest magnitude (or a high percentile of |x|) is recorded.

``method="auto"`` (what :func:`rexdeploy.api.expand_model` uses) takes BN statistics where they are
known and probes elsewhere — except an image-shaped model input (and the tensors that only rearrange its values),
ranged as standardised pixels, :data:`IMAGE_INPUT_RANGE` standard deviations. A user calibration array, when given,
replaces all of them (max |x| over it).
:func:`activation_means` gives the same statistics' channel means, for the expansion pass's bias correction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
import onnxruntime as ort

from rexdeploy.actorders import emits_unsigned, unsigned_activations_for
from rexdeploy.bnstats import (
    CLIP_RULES,
    DEFAULT_CLIP,
    DEFAULT_N_STD,
    DEFAULT_POOL_STD_FACTOR,
    ClipRule,
    bn_ranges,
    nonnegative_tensors,
    propagate_bn_stats,
)
from rexdeploy.errors import InputError, ModelError, UnsupportedModelError

if TYPE_CHECKING:
    from rexdeploy.analyze import Layer

RangeMethod = Literal["auto", "bn", "probe"]
ProbeKind = Literal["noise", "smooth"]
RANGE_METHODS: tuple[str, ...] = ("auto", "bn", "probe")
PROBE_KINDS: tuple[str, ...] = ("noise", "smooth")
# activation_ranges' probe fallback: N(0, 1) noise, 99.99th percentile of |x| (measured on MobileNetV2 W8A8,
# benchmarks/results/activation_ranges.md: better than the max, and than smooth 1/f fields)
DEFAULT_PROBE: ProbeKind = "noise"
DEFAULT_PERCENTILE: float | None = 99.99
SMOOTH_SPECTRUM_EXPONENT = 1.0  # amplitude ∝ 1/f (power ∝ 1/f²): the spectrum of natural images
_CALIBRATION_CHUNK = 16  # samples per onnxruntime run when reducing a user calibration batch
# the first BatchNorm's input scale (bn_input_scale) replaces the N(0, 1) assumption for a model input only when it
# is off by more than this factor: it assumes white inputs, and real ones are correlated (MobileNetV2: 1.67 vs 1.08)
INPUT_SCALE_TRUST = 2.0
# the range of a standardised image input, in standard deviations: an 8-bit photograph normalised by its data set's
# mean / std spans about (0 − m) / s … (1 − m) / s — ImageNet's mean / std: −2.1 … 2.6; the demo digits −0.8 … 1.8;
# MNIST's 0.13 / 0.31: −0.4 … 2.8 — where the N(0, 1) probes' 99.99th percentile says 3.9. Measured on MobileNetV2
# (benchmarks/results/activation_ranges.md, headroom, 128 crops of seed 1): the input alone quantized, relative logit
# error 0.063 at 3.9, 0.032–0.038 at 2.33–2.64, 0.073 at 2.0 (the ResNet-style net: 0.0083, 0.0056–0.0078, 0.028)
IMAGE_INPUT_RANGE = 2.5

_NP_TYPES: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (initializers listed as inputs by old exporters excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(info: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    """A concrete shape for an input: a symbolic / unknown first (batch) dim becomes ``batch``.

    Any other dynamic dim raises :class:`UnsupportedModelError`: probes need one size there, and a guess (1
    once) broke skip Concats of a UNet with dynamic height / width and probed a sequence model on one token.
    """
    shape: list[int] = []
    for axis, d in enumerate(info.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif axis == 0:
            shape.append(batch)
        else:
            param = d.dim_param or "?"
            raise UnsupportedModelError(
                f"input {info.name!r} has dynamic dimension {axis} ({param!r}); only the first (batch) dimension "
                "may be dynamic: export with a fixed size there, or fix it with python -m "
                f"onnxruntime.tools.make_dynamic_shape_fixed --dim_param {param} --dim_value SIZE in.onnx out.onnx"
            )
    return tuple(shape)


def smooth_field(
    shape: tuple[int, ...], rng: np.random.Generator, exponent: float = SMOOTH_SPECTRUM_EXPONENT
) -> np.ndarray:
    """Random fields over the last two axes with amplitude spectrum ∝ 1/f^exponent (natural images:
    exponent ≈ 1), each (sample, channel) plane standardised to mean 0, std 1. Float64."""
    h, w = shape[-2], shape[-1]
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fy * fy + fx * fx)
    radius[0, 0] = 1.0
    gain = radius**-exponent
    gain[0, 0] = 0.0  # the mean is set by the standardisation below
    field = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(h, w))
    field -= field.mean(axis=(-2, -1), keepdims=True)
    std = field.std(axis=(-2, -1), keepdims=True)
    return field / np.where(std > 0, std, 1.0)


def synthetic_inputs(
    model: onnx.ModelProto, batch: int = 8, seed: int = 0, kind: ProbeKind = "noise"
) -> dict[str, np.ndarray]:
    """Seeded synthetic inputs of the model's input shapes: floats as below; an input named like "mask": 1;
    integer ids of an embedding (:func:`rexdeploy.probes.embedding_vocab`): uniform in its vocabulary; other
    integers: 0.

    ``kind="noise"``: i.i.d. standard normal. ``kind="smooth"``: for image-shaped inputs (rank ≥ 3, both
    trailing dims ≥ 8) :func:`smooth_field` planes — unit variance like the noise, but spatially
    correlated like a normalised photograph; other inputs stay standard normal.
    """
    from rexdeploy.probes import embedding_vocab  # probes imports this module

    if kind not in PROBE_KINDS:
        raise InputError(f"unknown probe kind {kind!r}; use one of {', '.join(PROBE_KINDS)}")
    rng = np.random.default_rng(seed)
    token_rng = np.random.default_rng([seed, 1])  # its own stream: the float probes stay what they were
    vocab = embedding_vocab(model)
    feeds: dict[str, np.ndarray] = {}
    for info in graph_inputs(model):
        elem = info.type.tensor_type.elem_type
        dtype = _NP_TYPES.get(int(elem))
        if dtype is None:
            raise ModelError(f"input {info.name!r} has an element type rexdeploy cannot synthesize ({elem})")
        shape = input_shape(info, batch)
        if "mask" in info.name.lower():  # an attention mask: every token attended
            feeds[info.name] = np.ones(shape, dtype=dtype)
        elif info.name in vocab:  # token ids (all 0 once: one token, often the padding row, ranged everything)
            feeds[info.name] = token_rng.integers(0, vocab[info.name], size=shape).astype(dtype)
        elif not np.issubdtype(dtype, np.floating):
            feeds[info.name] = np.zeros(shape, dtype=dtype)
        elif kind == "smooth" and len(shape) >= 3 and min(shape[-2:]) >= 8:
            feeds[info.name] = smooth_field(shape, rng).astype(dtype)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def tap_session(model: onnx.ModelProto, taps: Sequence[str]) -> ort.InferenceSession:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    existing = {o.name for o in tapped.graph.output}
    for name in taps:
        if name not in existing:
            tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_with_taps(model: onnx.ModelProto, feeds: dict[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
    """Run the model with onnxruntime and return the values of the tensors named in ``taps``."""
    values = tap_session(model, taps).run(list(taps), feeds)
    return dict(zip(taps, values, strict=True))


def _magnitude(value: np.ndarray, percentile: float | None) -> float:
    if not value.size:
        return 0.0
    magnitude = np.abs(value.astype(np.float32, copy=False)).reshape(-1)
    if percentile is None or percentile >= 100.0:
        return float(np.max(magnitude))
    return float(np.percentile(magnitude, percentile))


PROBE_MACS = 16e9  # multiply-accumulates one probing run may spend (16 samples of a 1-GMAC network)


def probe_batch(macs_per_sample: float, predictors: int = 1) -> int:
    """How many synthetic probes to run: 16 for small networks, down to 2 for big ones (ResNet-50 at
    224²: 2), so that probing stays a fraction of the pass; ranges from 2 samples measured within the
    seed-to-seed spread of 16 on MobileNetV2 (benchmarks/results/expand_speed.md)."""
    per_run = max(macs_per_sample, 1.0) * max(predictors, 1)
    return int(min(16, max(2, PROBE_MACS // per_run)))


def probe_ranges(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    *,
    batch: int = 16,
    seed: int = 0,
    calibration: np.ndarray | None = None,
    probe: ProbeKind = "noise",
    percentile: float | None = None,
) -> dict[str, float]:
    """Largest magnitude of each tensor over synthetic probes (or the user's calibration batch).

    ``probe`` picks the synthetic inputs (:func:`synthetic_inputs`); ``percentile`` (e.g. 99.99) takes
    that percentile of |x| over the probes instead of the max, so that the rare extreme values of the
    probes do not set the scale. A user ``calibration`` batch always gives the max |x| over all of it
    (run in chunks of 16 samples to bound memory).
    """
    taps = list(dict.fromkeys(tensors))
    if not taps:
        return {}
    single = fixed_batch_of_one(model)
    if calibration is None:
        feeds = synthetic_probes(model, batch, seed=seed, kind=probe)  # a batch-1 export: run one at a time below
        known = {name: _magnitude(feeds[name], percentile) for name in taps if name in feeds}  # graph inputs
        rest = [name for name in taps if name not in known]
        if not rest:
            return known
        values = run_outputs(tap_session(model, rest), rest, feeds, single)
        return {**known, **{name: _magnitude(v, percentile) for name, v in zip(rest, values, strict=True)}}
    session = tap_session(model, taps)
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise InputError("a calibration .npy can only be used with a single-input model")
    ranges = dict.fromkeys(taps, 0.0)
    for start in range(0, max(len(calibration), 1), _CALIBRATION_CHUNK):
        chunk = calibration[start : start + _CALIBRATION_CHUNK]
        for name, v in zip(taps, run_outputs(session, taps, {inputs[0].name: chunk}, single), strict=True):
            ranges[name] = max(ranges[name], _magnitude(v, None))
    return ranges


def stacked_probes(model: onnx.ModelProto, count: int, seed: int,
                   draw: Callable[[int, int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:  # fmt: skip
    """``count`` probes from ``draw(count, seed)`` (batch axis first), also for a batch-1 export
    (:func:`fixed_batch_of_one`), whose fixed batch dimension would make them one: drawn one by one
    (``draw(1, seed + i)``) and stacked; such a model then runs them one at a time."""
    if count <= 1 or not fixed_batch_of_one(model):
        return draw(count, seed)
    samples = [draw(1, seed + i) for i in range(count)]
    return {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}


def synthetic_probes(
    model: onnx.ModelProto, count: int, seed: int = 0, kind: ProbeKind = "noise"
) -> dict[str, np.ndarray]:
    """``count`` probes of :func:`synthetic_inputs`, batch-1 exports included (:func:`stacked_probes`)."""
    return stacked_probes(model, count, seed, lambda n, s: synthetic_inputs(model, batch=n, seed=s, kind=kind))


def fixed_batch_of_one(model: onnx.ModelProto) -> bool:
    """Every input has a fixed leading (batch) dimension of 1: ``torch.onnx.export`` without ``dynamic_axes``.
    Such a model runs one sample at a time (a batch of probes once made it run on one probe only, and a
    calibration batch ended in an onnxruntime shape error)."""
    inputs = graph_inputs(model)
    dims = [i.type.tensor_type.shape.dim for i in inputs]
    return bool(inputs) and all(len(d) > 0 and d[0].HasField("dim_value") and d[0].dim_value == 1 for d in dims)


def run_outputs(
    session: ort.InferenceSession, outputs: Sequence[str], feeds: Mapping[str, np.ndarray], one_at_a_time: bool
) -> list[np.ndarray]:
    """The ``outputs``' values on ``feeds`` (batch axis first); with ``one_at_a_time`` (a batch-1 export), sample by
    sample — a feed without a batch axis (a scalar flag) goes to every run — each output's values flattened and
    joined (for magnitudes and norms)."""
    if not one_at_a_time:
        return [np.asarray(v) for v in session.run(list(outputs), dict(feeds))]
    n = max((v.shape[0] for v in feeds.values() if np.ndim(v) > 0), default=1)
    runs = [session.run(list(outputs), {k: (v[i : i + 1] if np.ndim(v) > 0 else v) for k, v in feeds.items()})
            for i in range(n)]  # fmt: skip
    return [np.concatenate([np.asarray(run[j]).reshape(-1) for run in runs]) for j in range(len(outputs))]


def input_channel_gains(model: onnx.ModelProto, *, clipping: bool = False) -> dict[str, np.ndarray]:
    """How much each input channel of each quantized layer input weighs in the layers that read it: per
    input channel c, ``Σ_o Σ_k W[o, c, k]²`` over the layer's weight (its output's response to a unit error
    on channel c that is independent from element to element: the rounding noise), normalised by the layer's
    total ``Σ W²`` so that every reading layer counts alike, summed over the layers that read the tensor.
    Data-free: the weights only. The MSE-optimal range (:func:`rexdeploy.bnstats.stats_range`) weighs each
    channel's quantization error by it.

    ``clipping=True``: the gain for an error that is the same over a kernel's window, ``Σ_o (Σ_k W[o, c, k])²``
    (the kernel's response to a constant), normalised by the same ``Σ W²``: the clipping error, since the values
    beyond a range come in patches (a bright region of an image), not alone. Equal to the first for a 1×1 kernel
    (pointwise conv, Gemm); for a 3×3 edge detector, whose weights sum to near 0, far smaller — MobileNetV2's first
    depthwise conv passes a patch of clipped values at 0.07× the gain of rounding noise, so clipping there is cheap
    (``tests/test_ranges_mse.py``, ``docs/activation-ranges.md``)."""
    from rexdeploy.analyze import ConstantResolver, find_layers, layer_weight

    consts = ConstantResolver(model)
    gains: dict[str, np.ndarray] = {}
    for layer in find_layers(model):
        w = layer_weight(model, layer, consts)  # output-channel-major: (O, I / group, ...)
        if w.ndim < 2:
            continue
        out, per_group = w.shape[0], w.shape[1]
        taps = w.reshape(out, per_group, -1).astype(np.float64)
        energy = np.square(taps).sum(axis=2)  # (O, I / group)
        group = max(layer.group, 1)
        if out % group:
            continue
        per_channel = energy.reshape(group, out // group, per_group).sum(axis=1).reshape(-1)  # (I,)
        total = float(per_channel.sum())
        if clipping:
            patch = np.square(taps.sum(axis=2))  # (O, I / group): the kernel's gain for a constant error
            per_channel = patch.reshape(group, out // group, per_group).sum(axis=1).reshape(-1)
        if total > 0.0:
            previous = gains.get(layer.input)
            share = per_channel / total
            gains[layer.input] = share if previous is None or previous.size != share.size else previous + share
    return gains


def activation_means(
    model: onnx.ModelProto,
    bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tensors: Sequence[str],
    *,
    pool_std_factor: float = DEFAULT_POOL_STD_FACTOR,
) -> dict[str, np.ndarray]:
    """The per-channel mean of each tensor in ``tensors`` that BatchNorm statistics reach (the moments of the
    propagated, rectified / clipped channels; :mod:`rexdeploy.bnstats`): what the expansion pass's bias
    correction needs. Tensors without statistics are left out. Data-free."""
    known = propagate_bn_stats(model, bn_stats, pool_std_factor=pool_std_factor)
    return {name: known[name].moments()[0] for name in dict.fromkeys(tensors) if name in known}


def unsigned_layers(model: onnx.ModelProto, layers: Sequence[Layer], profile_name: str) -> frozenset[str]:
    """The layers whose int8 input the expansion emits as uint8 for the engine of ``profile_name``
    (:func:`rexdeploy.actorders.unsigned_activations_for`, :func:`rexdeploy.actorders.emits_unsigned`): what the
    planner's error model prices at half the step, and what the range rule gives 255 levels."""
    if not unsigned_activations_for(profile_name):
        return frozenset()
    nonnegative = nonnegative_tensors(model)
    return frozenset(layer.name for layer in layers if emits_unsigned(layer.op_type, layer.input, nonnegative))


def activation_ranges(
    model: onnx.ModelProto,
    bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tensors: Sequence[str],
    *,
    method: RangeMethod = "auto",
    calibration: np.ndarray | None = None,
    n_std: float = DEFAULT_N_STD,
    pool_std_factor: float = DEFAULT_POOL_STD_FACTOR,
    clip: ClipRule = DEFAULT_CLIP,
    probe: ProbeKind = DEFAULT_PROBE,
    percentile: float | None = DEFAULT_PERCENTILE,
    batch: int = 16,
    seed: int = 0,
    unsigned: Collection[str] | None = None,
    patch_clipping: bool = True,
    image_input_range: float | None = IMAGE_INPUT_RANGE,
    rectified_tails: bool = True,
) -> dict[str, float]:
    """The max |x| of each tensor in ``tensors`` of the BN-folded ``model``.

    ``bn_stats`` is what :func:`rexdeploy.graph.fold_batchnorm` returned. ``method``:

    * ``"auto"``: BN statistics (:func:`rexdeploy.bnstats.bn_ranges`, ``mean ± n_std·std``) where the
      tensor is reachable from a BN output, synthetic probes (:func:`probe_ranges`) for the others — a model
      input probed as N(0, 1) is rescaled to the scale its first BatchNorm was trained for where that is more than
      2× off (:func:`bn_input_scale`: a waveform of RMS 0.1, 0–255 pixels);
    * ``"bn"``: BN statistics only; a tensor without statistics is a ModelError;
    * ``"probe"``: synthetic probes only.

    A user ``calibration`` batch overrides all of them: max |x| over it, for every tensor.

    ``unsigned``: the tensors that will be emitted as uint8 (:func:`unsigned_layers`); the MSE clipping rules
    then place 255 levels on those and 127 on every other — a tensor ≥ 0 emitted as int8 (a MatMul input, a
    TensorRT engine) has only 127 levels for its values. None: 255 wherever the tensor is ≥ 0.

    ``patch_clipping``: the MSE rules weigh each channel's clipping error by the reading kernels' gain for a
    constant (:func:`input_channel_gains` with ``clipping=True``), its rounding noise by their energy; False: both
    by the energy (the rule before). ``image_input_range``: the range of an image-shaped model input
    (:func:`image_input`) taken as standardised (the N(0, 1) probes' scale, not rescaled by
    :func:`bn_input_scale`), in standard deviations — a photograph's pixels are bounded, the N(0, 1) probes' tail
    is not (:data:`IMAGE_INPUT_RANGE`); None: the probes' percentile. ``rectified_tails``: a sum with a ReLU output
    (a residual block's Add) keeps the upper tail of the unclipped operands
    (:func:`rexdeploy.bnstats.propagate_bn_stats`); False: the moments only (the rule before).
    """
    taps = list(dict.fromkeys(tensors))
    if method not in RANGE_METHODS:
        raise InputError(f"unknown activation range method {method!r}; use one of {', '.join(RANGE_METHODS)}")
    if clip not in CLIP_RULES:
        raise InputError(f"unknown clipping rule {clip!r}; use one of {', '.join(CLIP_RULES)}")
    if calibration is not None:
        return probe_ranges(model, taps, calibration=calibration)
    if method == "probe":
        return probe_ranges(model, taps, batch=batch, seed=seed, probe=probe, percentile=percentile)
    gains = input_channel_gains(model) if clip != "nstd" else None
    clip_gains = input_channel_gains(model, clipping=True) if clip != "nstd" and patch_clipping else None
    ranges = bn_ranges(model, bn_stats, taps, n_std, pool_std_factor=pool_std_factor, clip=clip, gains=gains,
                       unsigned=unsigned, clip_gains=clip_gains, rectified_tails=rectified_tails)  # fmt: skip
    missing = [name for name in taps if name not in ranges]
    if missing and method == "bn":
        raise ModelError(
            f"no BatchNorm statistics reach tensor(s) {', '.join(repr(m) for m in missing[:5])}; "
            "use method 'auto' (probes there) or give a calibration batch"
        )
    if missing:
        probed = probe_ranges(model, missing, batch=batch, seed=seed, probe=probe, percentile=percentile)
        inputs = {info.name: info for info in graph_inputs(model)}
        views = input_views(model)
        for name in probed:  # probed as N(0, 1): is the input (or its values rearranged: a ViT's patches)?
            source = name if name in inputs else views.get(name)
            if source is None:
                continue
            scale = bn_input_scale(model, bn_stats, source)
            if scale is not None and not 1.0 / INPUT_SCALE_TRUST <= scale <= INPUT_SCALE_TRUST:
                if name == source:
                    probed[name] *= scale
            elif image_input_range is not None and image_input(inputs[source]):
                probed[name] = float(image_input_range)
        ranges.update(probed)
    return {name: ranges[name] for name in taps}


_VIEW_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "SpaceToDepth",
                       "DepthToSpace"})  # fmt: skip
"""Ops whose output holds exactly the values of their first input, rearranged."""


def input_views(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor → the graph input whose values it holds, rearranged (reached from it through :data:`_VIEW_OPS` on
    their first input only): a ViT's patch tensor ``Transpose(Reshape(image))`` has the image's range."""
    views = {info.name: info.name for info in graph_inputs(model)}
    for node in model.graph.node:
        if node.op_type in _VIEW_OPS and node.input and node.input[0] in views:
            views.update({out: views[node.input[0]] for out in node.output if out})
    return {name: source for name, source in views.items() if name != source}


def image_input(info: onnx.ValueInfoProto) -> bool:
    """Whether a model input is image-shaped: float, rank 4, 1 to 4 channels first (NCHW) or last (NHWC), and
    both spatial dimensions fixed and at least 8."""
    tensor = info.type.tensor_type
    if _NP_TYPES.get(int(tensor.elem_type)) not in (np.float32, np.float16, np.float64):
        return False
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    if len(dims) != 4:
        return False
    nchw = 1 <= dims[1] <= 4 and min(dims[2], dims[3]) >= 8
    nhwc = 1 <= dims[3] <= 4 and min(dims[1], dims[2]) >= 8
    return nchw or nhwc


def bn_input_scale(model: onnx.ModelProto, bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   name: str) -> float | None:  # fmt: skip
    """The standard deviation of the graph input ``name`` that the BatchNorm after the first Conv reading it was
    trained for (data-free): the folded Conv's output channel ``o`` has std ``|γ_o|`` (the BN statistics) and
    weights ``W'_o``, and a white input of std σ gives ``σ²·‖W'_o‖² = γ_o²``, so ``σ = sqrt(median_o γ_o²/‖W'_o‖²)``.
    None where no ungrouped Conv with BN statistics reads the input. Real inputs are not white (images, audio:
    correlated), so this is a scale, not a measurement: :func:`activation_ranges` uses it only where it says the
    N(0, 1) probes are off by more than :data:`INPUT_SCALE_TRUST` (MobileNetV2's ImageNet-normalised images: 1.67,
    left alone; a waveform of RMS 0.1, or 0–255 pixels: rescaled)."""
    from rexdeploy.graph import constant_value

    for node in model.graph.node:
        if node.op_type != "Conv" or not node.input or node.input[0] != name or node.output[0] not in bn_stats:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = constant_value(model, node.input[1]) if len(node.input) > 1 else None
        if group != 1 or weight is None:
            continue
        norms2 = np.square(weight.astype(np.float64).reshape(weight.shape[0], -1)).sum(axis=1)
        std = np.asarray(bn_stats[node.output[0]][1], dtype=np.float64).reshape(-1)
        ok = norms2 > 0.0
        if std.size != norms2.size or not ok.any():
            continue
        return float(np.sqrt(np.median(np.square(std[ok]) / norms2[ok])))
    return None


def load_calibration(path: str, model: onnx.ModelProto) -> np.ndarray:
    """Read a user calibration ``.npy`` batch and check it against the model's single input."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"calibration file {path} not found") from None
    except Exception as exc:
        raise InputError(f"calibration file {path} is not a readable .npy array ({exc})") from None
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise InputError("a calibration .npy can only be used with a single-input model")
    expected = input_shape(inputs[0], array.shape[0] if array.ndim else 1)
    if array.ndim != len(expected) or tuple(array.shape[1:]) != tuple(expected[1:]):
        raise InputError(
            f"calibration array shape {array.shape} does not match the model input {inputs[0].name!r} "
            f"(N, {', '.join(map(str, expected[1:]))})"
        )
    return array.astype(np.float32)
