"""Speed of the whole REx compiler pass on a ResNet-50-sized ONNX model, load to save.

Run: ``python benchmarks/bench_expand_speed.py [--repeats N] [--no-write]``.

The model is generated here with ``onnx.helper``: torchvision's resnet50 topology (stem Conv 7×7 + BN +
ReLU + MaxPool, 16 bottleneck blocks with BN, residual Adds and downsample convs, GlobalAveragePool,
Flatten, Gemm 2048→1000), seeded He-normal weights, BatchNormalization nodes kept (so the pass folds
them), dynamic batch, opset 17; 25.6 M parameters. It is cached under ``~/.cache/rexdeploy-bench/``
(``$REXDEPLOY_BENCH_CACHE``), never in the repository.

Cases (each: ``rexdeploy.graph.load_model`` → ``rexdeploy.api.expand_model`` → ``rexdeploy.graph.save_model``,
median of N runs after one warm-up run):

- ``target``: W4A8, K = 4, γ = 0.5, ensemble of 2 predictors split (2, 2), profile x86-avx512 — the issue's
  target: < 5 s on this 2-core machine (``expand_model`` keeps γ uniform over the layers of an ensemble);
- ``target_uniform``: the same setting given as an explicit plan (γ = 0.5 on every layer), as a plan file would;
- ``plain``: W8A8, K = 2, dense, one predictor.

Two variants: ``as_is`` (the library) and ``proposed`` — the library with the two probe changes this benchmark
proposes for ``rexdeploy.ranges.probe_ranges`` (graph-input taps answered from the synthetic feed; at most
``--probe-batch`` probe samples), applied by wrapping the function (the library is not changed).

The split of each run is taken by wrapping the stage functions the API calls (load / fold BN / find layers /
plan / ensemble clone / float predictors / activation ranges and probes / expansion numerics / graph emission /
checker / serialization); one extra run under cProfile names the heaviest functions, and a probe-batch study
measures the probing cost and how much the ranges move with the batch.
Results go to ``benchmarks/results/expand_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import rexdeploy.api as api
import rexdeploy.graph as graph
import rexdeploy.passes.ensemble as ensemble_pass
import rexdeploy.ranges as ranges
from rexdeploy.analyze import find_layers
from rexdeploy.errors import RexError
from rexdeploy.passes.ensemble import build_ensemble, float_predictors
from rexdeploy.plans import Plan, uniform_plan
from rexdeploy.profile import load_profile

RESULTS = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(os.environ.get("REXDEPLOY_BENCH_CACHE", Path.home() / ".cache" / "rexdeploy-bench"))
TARGET_S = 5.0
MODEL_VERSION = 1  # bump when the generator changes (the cache file name carries it)

CASES: dict[str, dict[str, Any]] = {
    "target": {
        "label": "W4A8 K=4 γ=0.5 ensemble 2 predictors (2,2)",
        "overrides": {"bits": 4, "order": 4, "gamma": 0.5, "split": (2, 2), "act_bits": 8},
    },
    "target_uniform": {
        "label": "same, as an explicit uniform plan (γ=0.5 on every layer)",
        "overrides": {"bits": 4, "order": 4, "gamma": 0.5, "split": (2, 2), "act_bits": 8},
        "uniform_plan": True,
    },
    "plain": {
        "label": "W8A8 K=2 dense, 1 predictor",
        "overrides": {"bits": 8, "order": 2, "act_bits": 8},
    },
}


# ----------------------------------------------------------------------------------------------------------
# the model


class _ResNetBuilder:
    """Builds torchvision's resnet50 graph node by node, with torchvision's parameter names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0

    def _param(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.params += int(value.size)
        return name

    def conv_bn(self, x: str, prefix: str, bn: str, c_in: int, c_out: int, k: int, stride: int,
                zero_ish: bool = False) -> str:  # fmt: skip
        fan_in = c_in * k * k
        w = self.rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        wn = self._param(f"{prefix}.weight", w)
        pad = k // 2
        y = f"{prefix}_out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, wn],
                [y],
                name=prefix,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        # BN with plausible running statistics; the last BN of a block scaled down (as zero-init-residual
        # training leaves it) so the residual stream does not blow up through 16 random blocks
        gamma = self.rng.uniform(0.1, 0.3, c_out) if zero_ish else self.rng.uniform(0.5, 1.5, c_out)
        names = [
            self._param(f"{bn}.weight", gamma),
            self._param(f"{bn}.bias", self.rng.normal(0.0, 0.1, c_out)),
        ]
        names.append(self._buffer(f"{bn}.running_mean", self.rng.normal(0.0, 0.2, c_out)))
        names.append(self._buffer(f"{bn}.running_var", self.rng.uniform(0.5, 2.0, c_out)))
        out = f"{bn}_out"
        self.nodes.append(helper.make_node("BatchNormalization", [y, *names], [out], name=bn, epsilon=1e-5))
        return out

    def _buffer(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def relu(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    def bottleneck(self, x: str, prefix: str, c_in: int, width: int, stride: int) -> str:
        c_out = width * 4
        h = self.relu(self.conv_bn(x, f"{prefix}.conv1", f"{prefix}.bn1", c_in, width, 1, 1), f"{prefix}.relu1")
        h = self.relu(self.conv_bn(h, f"{prefix}.conv2", f"{prefix}.bn2", width, width, 3, stride), f"{prefix}.relu2")
        h = self.conv_bn(h, f"{prefix}.conv3", f"{prefix}.bn3", width, c_out, 1, 1, zero_ish=True)
        identity = x
        if stride != 1 or c_in != c_out:
            identity = self.conv_bn(x, f"{prefix}.downsample.0", f"{prefix}.downsample.1", c_in, c_out, 1, stride)
        self.nodes.append(helper.make_node("Add", [h, identity], [f"{prefix}_add"], name=f"{prefix}.add"))
        return self.relu(f"{prefix}_add", f"{prefix}.relu3")


def make_resnet50(seed: int = 0) -> onnx.ModelProto:
    """torchvision resnet50 (v1.5: stride on the 3×3 conv), random weights, BN kept, dynamic batch."""
    b = _ResNetBuilder(seed)
    h = b.relu(b.conv_bn("input", "conv1", "bn1", 3, 64, 7, 2), "relu")
    b.nodes.append(
        helper.make_node(
            "MaxPool", [h], ["maxpool_out"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x, c_in = "maxpool_out", 64
    for stage, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
        for block in range(blocks):
            x = b.bottleneck(x, f"layer{stage}.{block}", c_in, width, stride if block == 0 else 1)
            c_in = width * 4
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool_out"], name="avgpool"))
    b.nodes.append(helper.make_node("Flatten", ["avgpool_out"], ["flatten_out"], name="flatten", axis=1))
    fc_w = b.rng.standard_normal((1000, 2048), dtype=np.float32) * np.float32(np.sqrt(1.0 / 2048))
    b.nodes.append(
        helper.make_node(
            "Gemm",
            ["flatten_out", b._param("fc.weight", fc_w), b._param("fc.bias", np.zeros(1000))],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    g = helper.make_graph(
        b.nodes,
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        b.inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_expand_speed")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def resnet50_path(seed: int = 0) -> Path:
    path = CACHE_DIR / f"resnet50_random_s{seed}_v{MODEL_VERSION}_bn_opset17.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(make_resnet50(seed), str(tmp))
        os.replace(tmp, path)
    return path


def model_stats(model: onnx.ModelProto) -> dict[str, Any]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())), "initializer_elements": params}


# ----------------------------------------------------------------------------------------------------------
# the proposed probe settings (an experiment: rexdeploy.ranges is not changed by this script)


def proposed_probes(original: Callable[..., dict[str, float]], batch: int) -> Callable[..., dict[str, float]]:
    """``rexdeploy.ranges.probe_ranges`` with the two changes this benchmark measures:

    1. a tap that is a graph input is answered from the synthetic feed itself (max |x| of the same
       seeded array onnxruntime would be given): no session, no network run — exact;
    2. synthetic probes of at most ``batch`` samples (the library's default is 16): a policy change,
       whose effect on the ranges is measured by :func:`probe_batch_study`.

    A user calibration batch is passed through unchanged.
    """

    @functools.wraps(original)
    def probe(model: onnx.ModelProto, tensors: Any, **kwargs: Any) -> dict[str, float]:
        if kwargs.get("calibration") is not None:
            return original(model, tensors, **kwargs)
        kwargs["batch"] = min(int(kwargs.get("batch", 16)), batch)
        inputs = {i.name for i in ranges.graph_inputs(model)}
        direct = [t for t in dict.fromkeys(tensors) if t in inputs]
        out: dict[str, float] = {}
        if direct:
            kind = kwargs.get("probe", "noise")
            feeds = ranges.synthetic_inputs(model, batch=kwargs["batch"], seed=kwargs.get("seed", 0), kind=kind)
            out = {t: float(np.max(np.abs(feeds[t]))) if feeds[t].size else 0.0 for t in direct}
        rest = [t for t in tensors if t not in inputs]
        if rest:
            out.update(original(model, rest, **kwargs))
        return out

    return probe


def install_proposed_probes(batch: int) -> list[tuple[Any, str, Any]]:
    """Swap the proposed probes in where the API reaches them; returns what to put back."""
    undo: list[tuple[Any, str, Any]] = []
    for owner in (ranges, api):
        if hasattr(owner, "probe_ranges"):
            undo.append((owner, "probe_ranges", owner.probe_ranges))
            owner.probe_ranges = proposed_probes(owner.probe_ranges, batch)  # type: ignore[attr-defined]
    return undo


def probe_batch_study(path: Path, overrides: dict[str, Any], batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Cost and effect of the probe batch on the target case's probing model (the float predictors of the
    ensemble, every int8 layer input tapped): session build + run seconds, and each tap's max |x| against
    batch 16 (ratio min / median)."""
    model = graph.load_model(path)
    folded, _ = graph.fold_batchnorm(model)
    layers = find_layers(folded)
    plan = api.default_plan(layers, load_profile("x86-avx512"), **overrides)
    ensemble = build_ensemble(folded, plan, layers)
    by_node = {n.name: n for n in ensemble.model.graph.node}
    taps = list(dict.fromkeys(by_node[n].input[j.layer.act_index] for n, j in ensemble.jobs.items()))
    probe_model = float_predictors(ensemble, folded)
    rows: list[dict[str, Any]] = []
    reference: dict[str, float] = {}
    for batch in batches:
        t0 = time.perf_counter()
        got = ranges.probe_ranges(probe_model, taps, batch=batch)
        seconds = time.perf_counter() - t0
        reference = reference or got
        ratio = np.array([got[t] / reference[t] for t in taps if reference[t] > 0])
        rows.append(
            {
                "batch": batch,
                "seconds": seconds,
                "taps": len(taps),
                "ratio_vs_first_min": float(ratio.min()),
                "ratio_vs_first_median": float(np.median(ratio)),
                "ratio_vs_first_max": float(ratio.max()),
            }
        )
        print(f"  probe batch {batch:2d}: {seconds:6.2f} s, max|x| / batch-{batches[0]} value: "
              f"min {ratio.min():.3f} median {np.median(ratio):.3f}")  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------
# stage timers: wrap the functions the API calls, by module attribute


class StageTimer:
    """Accumulates the wall time of wrapped functions (inclusive), per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, *stages: str) -> None:
        if not hasattr(owner, attr):
            return
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                for stage in stages:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()

    def reset(self) -> None:
        self.seconds = {}


def install_timers() -> StageTimer:
    t = StageTimer()
    t.wrap(api, "fold_batchnorm", "fold_batchnorm")
    t.wrap(api, "quantizable_layers", "find_layers")
    t.wrap(api, "default_plan", "plan")
    t.wrap(api, "build_ensemble", "ensemble_clone")
    t.wrap(api, "float_predictors", "float_predictors")
    t.wrap(ensemble_pass, "expand_weight", "float_predictors_numerics")  # the orders, shared with the pass
    # activation ranges: the API calls one of these (BN statistics + probes, or probes alone)
    t.wrap(api, "activation_ranges", "ranges")
    t.wrap(api, "probe_ranges", "ranges", "probe")
    t.wrap(ranges, "probe_ranges", "probe")  # the onnxruntime part, also when reached through activation_ranges
    t.wrap(ranges, "tap_session", "probe_session")  # building the tapped onnxruntime session
    t.wrap(api, "expand", "expand_pass")
    t.wrap(onnx.checker, "check_model", "checker")  # load_model's and save_model's
    return t


def uniform(path: Path, overrides: dict[str, Any]) -> Plan:
    """The case's setting on every layer, γ included (what a plan file would carry); made before timing."""
    layers = find_layers(graph.fold_batchnorm(graph.load_model(path))[0])
    return uniform_plan([layer.name for layer in layers], **overrides)


def _expand(model: onnx.ModelProto, overrides: dict[str, Any], plan: Plan | None) -> Any:
    profile = load_profile("x86-avx512")
    if plan is not None:
        return api.expand_model(model, plan, profile=profile)
    return api.expand_model(model, profile=profile, **overrides)


def run_once(
    path: Path, out: Path, overrides: dict[str, Any], timer: StageTimer, plan: Plan | None = None
) -> dict[str, float]:
    timer.reset()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    model = graph.load_model(path)
    t_load = time.perf_counter()
    check_load = timer.seconds.get("checker", 0.0)
    expanded = _expand(model, overrides, plan)
    t_expand = time.perf_counter()
    check_before_save = timer.seconds.get("checker", 0.0)
    graph.save_model(expanded.model, out)
    t_end = time.perf_counter()
    s = dict(timer.seconds)
    # numerics: the expansion orders (Expanded.numerics_seconds: computed once, by the float predictors in
    # an ensemble, and counted there too) — so the float predictors' own work is their time minus that
    numerics = float(expanded.numerics_seconds)
    shared = s.get("float_predictors_numerics", 0.0)
    expand_pass_s = s.get("expand_pass", 0.0)
    check_save = s.get("checker", 0.0) - check_before_save
    row = {
        "total_s": t_end - t0,
        "cpu_s": time.process_time() - cpu0,
        "load_s": t_load - t0,
        "load_read_parse_s": t_load - t0 - check_load,
        "load_check_s": check_load,
        "expand_model_s": t_expand - t_load,
        "save_s": t_end - t_expand,
        "save_check_s": check_save,
        "save_serialize_write_s": t_end - t_expand - check_save,
        "fold_batchnorm_s": s.get("fold_batchnorm", 0.0),
        "find_layers_s": s.get("find_layers", 0.0),
        "plan_s": s.get("plan", 0.0),
        "ensemble_clone_s": s.get("ensemble_clone", 0.0),
        "float_predictors_s": s.get("float_predictors", 0.0),
        "float_predictors_graph_s": max(0.0, s.get("float_predictors", 0.0) - shared),
        "ranges_s": s.get("ranges", 0.0),
        "probe_s": s.get("probe", 0.0),
        "probe_session_s": s.get("probe_session", 0.0),
        "numerics_s": numerics,
        "expand_pass_s": expand_pass_s,
        "graph_emission_s": max(0.0, expand_pass_s - (numerics - shared)),
        "expanded_file_mb": out.stat().st_size / 1e6,
        "expanded_nodes": len(expanded.model.graph.node),
    }
    named = ("fold_batchnorm_s", "find_layers_s", "plan_s", "ensemble_clone_s", "float_predictors_s", "ranges_s")
    row["expand_other_s"] = max(0.0, row["expand_model_s"] - expand_pass_s - sum(row[k] for k in named))
    row["graph_work_s"] = row["total_s"] - numerics - row["ranges_s"]
    return row


def profile_once(
    path: Path, out: Path, overrides: dict[str, Any], plan: Plan | None = None, top: int = 25
) -> list[dict[str, Any]]:
    """One run under cProfile; the heaviest functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    expanded = _expand(graph.load_model(path), overrides, plan)
    graph.save_model(expanded.model, out)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = [
        {"function": f"{Path(file).name}:{line}({func})", "calls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime}
        for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    rows.sort(key=lambda r: -r["cumtime_s"])
    return rows[:top]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.machine()
    except OSError:
        info["cpu"] = platform.machine()
    return info


SPLIT_ROWS = (
    ("load_read_parse_s", "load: read + parse"),
    ("load_check_s", "load: onnx checker"),
    ("fold_batchnorm_s", "fold BatchNorm"),
    ("find_layers_s", "find layers (shape inference)"),
    ("plan_s", "plan (linear+ γ split)"),
    ("ensemble_clone_s", "ensemble: clone the network per predictor"),
    ("float_predictors_graph_s", "ensemble: float predictors for probing (graph work)"),
    ("ranges_s", "activation ranges (BN statistics + probes), all"),
    ("probe_s", "  of which onnxruntime probes"),
    ("probe_session_s", "    of which building the probe session"),
    ("numerics_s", "**numerics**: residual expansion (Expanded.numerics_seconds)"),
    ("graph_emission_s", "graph emission (expand pass minus numerics)"),
    ("expand_other_s", "other expand_model work"),
    ("save_check_s", "save: onnx checker (full_check)"),
    ("save_serialize_write_s", "save: serialize + write"),
    ("graph_work_s", "**graph work** (total − numerics − ranges)"),
)


def _median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run_cases(path: Path, cases: list[str], repeats: int, variant: str, probe_batch: int) -> dict[str, Any]:
    """Every case, warm-up + ``repeats`` runs; ``variant`` "as_is" (the library) or "proposed" (probes)."""
    undo = install_proposed_probes(probe_batch) if variant == "proposed" else []
    timer = install_timers()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rexdeploy-bench-") as tmp:
            out = Path(tmp) / "expanded.onnx"
            for case in cases:
                overrides = CASES[case]["overrides"]
                plan = uniform(path, overrides) if CASES[case].get("uniform_plan") else None
                record: dict[str, Any] = {"label": CASES[case]["label"]}
                results[case] = record
                try:
                    run_once(path, out, overrides, timer, plan)  # warm-up (imports, allocator, page cache)
                except RexError as exc:
                    record["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"[{variant}] {case}: {record['error']}")
                    continue
                load = [os.getloadavg()[0]]
                runs = []
                for _ in range(repeats):
                    runs.append(run_once(path, out, overrides, timer, plan))
                    load.append(os.getloadavg()[0])
                med = _median_row(runs)
                record.update(runs=runs, median=med, loadavg_1min=load)
                each = ", ".join(f"{r['total_s']:.2f}" for r in runs)
                print(f"[{variant}] {case}: {CASES[case]['label']}: median {med['total_s']:.2f} s (runs {each}); "
                      f"load {', '.join(f'{x:.1f}' for x in load)}")  # fmt: skip
                for key, label in SPLIT_ROWS:
                    print(f"    {label:62s} {med[key]:7.3f} s")
    finally:
        timer.restore()
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="*", default=["as_is", "proposed"], choices=["as_is", "proposed"])
    parser.add_argument("--probe-batch", type=int, default=2, help="the proposed variant's probe batch")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    parser.add_argument("--no-study", action="store_true", help="skip the probe batch study")
    parser.add_argument("--before", type=Path, help="JSON of an earlier run (e.g. before a change) to include")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    parser.add_argument("--render", type=Path, help="only re-render this results JSON (labels, --note)")
    args = parser.parse_args()
    if args.render is not None:
        rendered = json.loads(args.render.read_text())
        for cases in rendered["variants"].values():
            for case, record in cases.items():
                record["label"] = CASES.get(case, record)["label"]
        rendered["note"] = args.note or rendered.get("note", "")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "expand_speed.json").write_text(json.dumps(rendered, indent=2) + "\n")
        (RESULTS / "expand_speed.md").write_text(markdown(rendered))
        return

    path = resnet50_path()
    stats_in = model_stats(onnx.load(str(path)))
    load_before = os.getloadavg()
    variants = {v: run_cases(path, args.cases, args.repeats, v, args.probe_batch) for v in args.variants}
    top: list[dict[str, Any]] = []
    if not args.no_profile:
        undo = install_proposed_probes(args.probe_batch) if "proposed" in args.variants else []
        with tempfile.TemporaryDirectory(prefix="rexdeploy-bench-") as tmp:
            case = args.cases[0]
            plan = uniform(path, CASES[case]["overrides"]) if CASES[case].get("uniform_plan") else None
            top = profile_once(path, Path(tmp) / "expanded.onnx", CASES[case]["overrides"], plan)
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)
        print(f"cProfile ({case}, {'proposed' if undo else 'as is'}), top by cumulative time:")
        for r in top:
            print(f"  {r['cumtime_s']:7.3f} s cum  {r['tottime_s']:7.3f} s own  {r['calls']:6d}  {r['function']}")
    study: list[dict[str, Any]] = []
    if not args.no_study:
        print("probe batch study (target case's probing model):")
        study = probe_batch_study(path, CASES["target"]["overrides"], (16, 8, 4, 2, 1))
    machine = machine_info()
    machine["loadavg_before"] = list(load_before)
    machine["loadavg_after"] = list(os.getloadavg())
    result: dict[str, Any] = {
        "model": {
            "description": "torchvision resnet50 topology, seeded He-normal random weights, BatchNormalization "
            "nodes kept, dynamic batch, opset 17 (generated with onnx.helper)",
            "path": str(path),
            "file_mb": path.stat().st_size / 1e6,
            **stats_in,
        },
        "profile": "x86-avx512",
        "repeats": args.repeats,
        "target_s": TARGET_S,
        "proposed_probe_batch": args.probe_batch,
        "variants": variants,
        "cprofile_top": top,
        "cprofile_case": args.cases[0],
        "probe_batch_study": study,
        "machine": machine,
        "note": args.note,
    }
    if args.before is not None:
        result["before"] = json.loads(args.before.read_text())
    text = json.dumps(result, indent=2) + "\n"
    if args.json_out is not None:
        args.json_out.write_text(text)
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "expand_speed.json").write_text(text)
    (RESULTS / "expand_speed.md").write_text(markdown(result))


def _cell(record: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(record["median"][key]) if "median" in record else "—"


def markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        "# REx pass speed: ResNet-50-sized ONNX, load → expand → save",
        "",
        f"`python benchmarks/bench_expand_speed.py` — {m['description']}; {m['initializer_elements'] / 1e6:.1f} M "
        f"initializer elements ({m['file_mb']:.0f} MB), {m['nodes']} nodes. Profile `{result['profile']}`. "
        f"Each figure is the median of {result['repeats']} runs after one warm-up run, wall time, "
        "`rexdeploy.graph.load_model` → `rexdeploy.api.expand_model` → `rexdeploy.graph.save_model`.",
        "",
        "Variants: **as is** = the library as it stands; **proposed** = the same with the two probe changes this "
        f"benchmark proposes for `rexdeploy.ranges.probe_ranges` (applied here by wrapping it, the library is "
        f"unchanged): a tap that is a graph input is answered from the synthetic feed itself (exact, no network "
        f"run), and synthetic probes use at most {result['proposed_probe_batch']} samples instead of 16.",
        "",
    ]
    for variant, cases in result["variants"].items():
        names = list(cases)
        lines += [
            f"## {variant.replace('_', ' ')}",
            "",
            "| stage (median s) | " + " | ".join(f"{n}: {cases[n]['label']}" for n in names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for key, label in SPLIT_ROWS:
            lines.append(f"| {label} | " + " | ".join(_cell(cases[n], key) for n in names) + " |")
        lines.append(
            "| **total, load → save** | " + " | ".join(_cell(cases[n], "total_s", "**{:.2f}**") for n in names) + " |"
        )
        lines.append(
            "| process CPU s (all threads) | " + " | ".join(_cell(cases[n], "cpu_s", "{:.2f}") for n in names) + " |"
        )
        lines.append(
            "| expanded file MB | " + " | ".join(_cell(cases[n], "expanded_file_mb", "{:.0f}") for n in names) + " |"
        )
        lines.append(
            "| expanded nodes | " + " | ".join(_cell(cases[n], "expanded_nodes", "{:.0f}") for n in names) + " |"
        )
        loads = [
            f"{n}: {'/'.join(f'{x:.1f}' for x in cases[n]['loadavg_1min'])}"
            for n in names
            if "loadavg_1min" in cases[n]
        ]
        lines += ["", f"1-min load average around the runs: {'; '.join(loads)}.", ""]
        for n in names:
            if "error" in cases[n]:
                lines += [f"{n}: {cases[n]['error']}", ""]
    target = result["variants"].get("proposed", result["variants"].get("as_is", {})).get("target", {})
    if "median" in target:
        t = target["median"]["total_s"]
        lines += [
            f"**Target case ({'proposed probes' if 'proposed' in result['variants'] else 'as is'}): {t:.2f} s — "
            f"{'meets' if t < result['target_s'] else 'misses'} the < {result['target_s']:g} s target.**",
            "",
        ]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += [
        "How the split is taken: the stage functions the API calls are wrapped with timers (inclusive wall time). "
        "*numerics* is `Expanded.numerics_seconds` — the residual expansion of every weight, computed once: in an "
        "ensemble by the float predictors (which need each predictor's float weight for probing) and handed to "
        "the expand pass; *graph emission* is the expand pass without it; *graph work* is everything that is "
        "neither numerics nor activation ranges (loading, checking, BN folding, shape inference, cloning, "
        "emission, serialization).",
        "",
    ]
    if result.get("before"):
        lines += _before_section(result)
    if result.get("probe_batch_study"):
        lines += [
            "## Probe batch: cost and effect (target case's probing model: both float predictors, every int8 "
            "layer input tapped)",
            "",
            "| probe batch | seconds (session + run) | max\\|x\\| / batch-16 value: min | median | max |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['batch']} | {r['seconds']:.2f} | {r['ratio_vs_first_min']:.3f} | {r['ratio_vs_first_median']:.3f} "
            f"| {r['ratio_vs_first_max']:.3f} |"
            for r in result["probe_batch_study"]
        ]
        lines += [""]
    if result["cprofile_top"]:
        lines += [
            f"cProfile of one `{result['cprofile_case']}` run (top by cumulative time; cProfile's overhead inflates "
            "Python-heavy rows):",
            "",
            "| cum s | own s | calls | function |",
            "|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['cumtime_s']:.3f} | {r['tottime_s']:.3f} | {r['calls']} | `{r['function']}` |"
            for r in result["cprofile_top"]
        ]
        lines.append("")
    mi = result["machine"]
    lines += [
        f"Machine: {mi['cpu']}, {mi['cpu_count']} CPUs, Python {mi['python']}, numpy {mi['numpy']}, onnx {mi['onnx']}, "
        f"onnxruntime {mi['onnxruntime']}; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in mi['loadavg_before'])}, after {'/'.join(f'{x:.1f}' for x in mi['loadavg_after'])} "
        f"(other agents share these 2 cores); {mi['date']}.",
        "",
    ]
    return "\n".join(lines)


def _before_section(result: dict[str, Any]) -> list[str]:
    """Stage by stage: the pass before this benchmark's optimisations vs now (same variant, same session)."""
    before = result["before"]
    lines = ["## Before / after the pass optimisations", ""]
    if before.get("note"):
        lines += [before["note"], ""]
    for variant, cases in before.get("variants", {}).items():
        after = result["variants"].get(variant, {})
        for case, rec in cases.items():
            if "median" not in rec or "median" not in after.get(case, {}):
                continue
            lines += [
                f"`{case}` ({variant.replace('_', ' ')}):",
                "",
                "| stage (median s) | before | after |",
                "|---|---:|---:|",
            ]
            for key, label in (*SPLIT_ROWS, ("total_s", "**total**")):
                lines.append(
                    f"| {label} | {rec['median'].get(key, float('nan')):.3f} | {after[case]['median'][key]:.3f} |"
                )
            lines.append("")
    return lines


if __name__ == "__main__":
    main()
