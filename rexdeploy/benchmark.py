"""Benchmark one model or engine the way trtexec / benchmark_app do: build it if needed, then time it.

:func:`bench` takes an ONNX model (built with the profile's engine, into a temporary directory or
``out_dir``), an OpenVINO IR ``.xml`` or a TensorRT ``.plan`` built earlier, warms it up by time,
times it for a duration or a number of runs, and returns a :class:`BenchResult`: the latency
statistics (:class:`~rexdeploy.builders.timing.Timing`), the engine it timed, the precision each
layer ran in, optionally OpenVINO's THROUGHPUT-mode fps, and optionally every ONNX node's time from the
engine's own profiler (``Builder.layer_times``, ``--layers``). Nothing here prints; ``rexdeploy bench``
prints :meth:`BenchResult.summary_lines` or :meth:`BenchResult.to_json`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rexdeploy.budget import format_ms
from rexdeploy.builders.base import Builder, Engine, LayerTimes, TimingSettings
from rexdeploy.builders.registry import get_builder, unavailable_error
from rexdeploy.builders.timing import COV_WARN, Timing
from rexdeploy.errors import EngineUnavailableError, InputError, RexError
from rexdeploy.fileio import atomic_dir
from rexdeploy.profile import Profile, load_profile

Progress = Callable[[str], None]

ONNX_SUFFIXES = (".onnx",)
IR_SUFFIXES = (".xml",)
PLAN_SUFFIXES = (".plan", ".engine", ".trt")

_KINDS = {
    **{s: ("onnx", "") for s in ONNX_SUFFIXES},
    **{s: ("openvino-ir", "openvino") for s in IR_SUFFIXES},
    **{s: ("tensorrt-plan", "tensorrt") for s in PLAN_SUFFIXES},
}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|µs)?\s*$")
_UNITS_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_duration(text: str, what: str = "duration") -> float:
    """``3s`` / ``500ms`` / ``800us`` / ``2`` (seconds) → seconds (≥ 0).

    >>> parse_duration("3s"), parse_duration("200ms"), parse_duration("1.5")
    (3.0, 0.2, 1.5)
    """
    match = _DURATION_RE.match(text)
    value = float(match.group(1)) * _UNITS_TO_S[match.group(2) or "s"] if match else math.nan
    if not math.isfinite(value):
        raise InputError(f"invalid {what} {text!r}: give a number with a unit, e.g. 3s, 500ms or 800us")
    return value


def cov_warning(timing: Timing) -> str | None:
    """The warning line for a noisy timing (coefficient of variation above 5 %), else None."""
    if timing.cov <= COV_WARN:
        return None
    return (
        f"CoV {timing.cov:.1%} is above {COV_WARN:.0%}: the latency varies too much to trust its median; "
        "stop other work on the machine or time longer (--duration)"
    )


@dataclass(frozen=True)
class ThroughputMode:
    """OpenVINO THROUGHPUT-mode figures: ``fps`` with ``requests`` infer requests over ``streams`` streams."""

    fps: float
    requests: int
    streams: int
    timing: Timing

    def to_dict(self) -> dict[str, Any]:
        return {"fps": self.fps, "requests": self.requests, "streams": self.streams, "timing": self.timing.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ThroughputMode:
        return cls(
            fps=float(raw["fps"]),
            requests=int(raw["requests"]),
            streams=int(raw["streams"]),
            timing=Timing.from_dict(raw["timing"]),
        )


@dataclass(frozen=True)
class BenchResult:
    """What ``rexdeploy bench`` measured on one model or engine.

    ``source`` is ``onnx`` (built here, in ``build_seconds``), ``openvino-ir`` or ``tensorrt-plan``
    (built earlier; ``build_seconds`` is then the time to load it). ``artifacts`` are the engine's
    files when they were kept (``out_dir``, or the given engine), else empty. ``precisions`` is
    layer type → runtime precision → count (OpenVINO's execution graph; for other engines
    ``{"layers": {precision: count}}``). ``layers`` are the per-ONNX-node times from the engine's own
    profiler when they were asked for (``bench(..., layers=True)``), else None.
    """

    model: str
    source: str
    profile: str
    backend: str
    device: str
    backend_version: str
    build_seconds: float
    artifacts: tuple[str, ...]
    inputs: dict[str, tuple[int, ...]]
    timing: Timing
    precisions: dict[str, dict[str, int]] = field(default_factory=dict)
    throughput: ThroughputMode | None = None
    warnings: tuple[str, ...] = ()
    layers: LayerTimes | None = None
    options: dict[str, str] = field(default_factory=dict)  # the runtime options the engine ran with

    @property
    def noisy(self) -> bool:
        """True when the latency CoV is above 5 %."""
        return self.timing.noisy

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "profile": self.profile,
            "engine": {
                "backend": self.backend,
                "device": self.device,
                "version": self.backend_version,
                "build_seconds": self.build_seconds,
                "artifacts": list(self.artifacts),
                "inputs": {k: list(v) for k, v in self.inputs.items()},
                "options": dict(self.options),
            },
            "timing": self.timing.to_dict(),
            "precisions": self.precisions,
            "throughput": self.throughput.to_dict() if self.throughput is not None else None,
            "warnings": list(self.warnings),
            "layers": self.layers.to_dict() if self.layers is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchResult:
        engine = raw["engine"]
        return cls(
            model=str(raw["model"]),
            source=str(raw["source"]),
            profile=str(raw["profile"]),
            backend=str(engine["backend"]),
            device=str(engine["device"]),
            backend_version=str(engine["version"]),
            build_seconds=float(engine["build_seconds"]),
            artifacts=tuple(engine["artifacts"]),
            inputs={k: tuple(v) for k, v in engine["inputs"].items()},
            timing=Timing.from_dict(raw["timing"]),
            precisions={k: dict(v) for k, v in raw["precisions"].items()},
            throughput=ThroughputMode.from_dict(raw["throughput"]) if raw.get("throughput") else None,
            warnings=tuple(raw.get("warnings", ())),
            layers=LayerTimes.from_dict(raw["layers"]) if raw.get("layers") else None,
            options={str(k): str(v) for k, v in raw["engine"].get("options", {}).items()},
        )

    def summary_lines(self) -> list[str]:
        """The human table (the CLI prints it on stderr)."""
        t = self.timing
        how = "built" if self.source == "onnx" else "loaded"
        version = f" {self.backend_version}" if self.backend_version else ""
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.inputs.items())
        lines = [
            f"model       {self.model}  ({self.source})",
            f"engine      {self.backend}{version} on {self.device}, profile {self.profile}, "
            f"{how} in {self.build_seconds:.2f} s" + (f"; inputs {shapes}" if shapes else ""),
        ]
        if self.precisions:
            parts = [
                f"{layer_type} " + " ".join(f"{p}×{n}" for p, n in counts.items())
                for layer_type, counts in self.precisions.items()
            ]
            lines.append(f"precisions  {'; '.join(parts)}")
        if self.options:
            lines.append("options     " + " ".join(f"{k}={v}" for k, v in self.options.items()))
        # one unit for the whole table, chosen by the median: µs below 1 ms, else ms
        scale, digits, unit = (1000.0, 1, "us") if t.median_ms < 1.0 else (1.0, 3, "ms")
        lines.append(
            f"timing      {t.runs} runs in {t.duration_s:.2f} s after {t.warmup_runs} warm-up runs "
            f"({t.warmup_s * 1000:.0f} ms), batch {t.batch}"
        )
        for label, value in (
            ("median", t.median_ms),
            ("mean", t.mean_ms),
            ("p90", t.p90_ms),
            ("p95", t.p95_ms),
            ("p99", t.p99_ms),
            ("min", t.min_ms),
            ("max", t.max_ms),
            ("std", t.std_ms),
        ):
            lines.append(f"  {label:<9} {value * scale:>10.{digits}f} {unit}")
        lines.append(f"  {'CoV':<9} {t.cov * 100:>10.1f} %")
        if t.h2d_ms is not None or t.d2h_ms is not None:
            copies = [f"{n} {format_ms(v)}" for n, v in (("H2D", t.h2d_ms), ("D2H", t.d2h_ms)) if v is not None]
            lines.append(f"  {'copies':<9} {', '.join(copies)} (not in the latency)")
        lines.append(f"throughput  {t.throughput_fps:,.1f} fps (latency mode, one request)")
        if self.throughput is not None:
            tp = self.throughput
            lines.append(
                f"throughput  {tp.fps:,.1f} fps (THROUGHPUT mode, {tp.requests} requests, {tp.streams} streams)"
            )
        if self.layers is not None:
            lines += layer_table_lines(self.layers, t.median_ms)
        lines += [f"warning     {w}" for w in self.warnings]
        if self.artifacts:
            lines.append(f"artifacts   {', '.join(self.artifacts)}")
        return lines


def layer_table_lines(layers: LayerTimes, median_ms: float) -> list[str]:
    """The per-layer table, trtexec ``--dumpProfile`` style: one row per ONNX node by decreasing time (µs
    per run, % of the profiler's total, cumulative %), then the unmapped time, then the profiler's total
    against the unprofiled median."""
    names = list(layers.nodes)
    us = np.array([layers.nodes[n] for n in names] + [layers.unmapped_us], dtype=np.float64)
    order = np.argsort(-us[:-1], kind="stable")
    us = np.concatenate([us[:-1][order], us[-1:]])
    labels = [names[i] for i in order] + ["(unmapped: reorders, copies and layers under no ONNX node)"]
    total = layers.total_us
    share = us / total * 100.0 if total > 0 else np.zeros_like(us)
    cumulative = np.cumsum(share)
    median_us = median_ms * 1000.0
    versus = f"{(total / median_us - 1.0) * 100.0:+.1f} %" if median_us > 0 else "n/a"
    lines = [
        f"layers      {layers.source}: {layers.runs} profiled runs, us per run",
        f"  {'time(us)':>10} {'time(%)':>8} {'cum(%)':>7}  node",
    ]
    lines += [
        f"  {u:>10.2f} {p:>8.1f} {c:>7.1f}  {label}"
        for u, p, c, label in zip(us, share, cumulative, labels, strict=True)
    ]
    lines.append(
        f"  {total:>10.2f} {100.0 if total > 0 else 0.0:>8.1f} {'':>7}  total (profiler) vs timed median "
        f"{median_us:.2f} us: {versus}"
    )
    return lines


def _quiet(_: str) -> None:
    return None


def _kind(path: Path) -> tuple[str, str]:
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(_KINDS))
        raise InputError(
            f"cannot bench {path.name!r}: unknown extension {path.suffix or '(none)'!r}; give an ONNX model "
            f"or a built engine ({known})"
        )
    return kind


def _check_settings(settings: TimingSettings) -> None:
    if not (math.isfinite(settings.warmup_s) and settings.warmup_s >= 0):
        raise InputError(f"warm-up {settings.warmup_s!r} s must be ≥ 0, e.g. 200ms")
    if settings.runs is None and not (math.isfinite(settings.duration_s) and settings.duration_s > 0):
        raise InputError(f"duration {settings.duration_s!r} s must be > 0, e.g. 3s (or give a number of runs)")
    if settings.runs is not None and settings.runs < 1:
        raise InputError(f"runs must be ≥ 1, got {settings.runs}")


def _profile_builder(profile: Profile) -> Builder:
    """The builder of the profile's engine, checked to run here (one line naming the pip extra if not)."""
    builder = get_builder(profile.engine)
    if not builder.available():
        target = f"'rexdeploy[{builder.pip_extra}]'" if builder.pip_extra else "rexdeploy"
        raise EngineUnavailableError(
            f"the {profile.engine} engine of profile {profile.name!r} is not installed here: pip install {target} "
            "(or bench the model on the target)"
        )
    return builder


def _engine_builder(engine: str) -> Builder:
    """The builder of a prebuilt engine, checked to run here (one line naming the pip extra if not)."""
    builder = get_builder(engine)
    if builder.available():
        return builder
    if engine == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        raise EngineUnavailableError(
            "TensorRT is installed but no CUDA GPU is visible here; a .plan runs only on a GPU like the one "
            "that built it: bench it there"
        )
    raise unavailable_error(builder.name, builder.pip_extra)


_KIND_NAMES = {"openvino-ir": "an OpenVINO IR", "tensorrt-plan": "a TensorRT plan"}


def _profile_for(kind: str, engine: str, profile: Profile | str | None) -> Profile | None:
    """The profile of a prebuilt engine: the one given, checked to be for that engine; else ``auto``
    (this host's CPU profile) for an OpenVINO IR, and none for a TensorRT plan (it names its own GPU)."""
    if profile is None:
        return None if engine == "tensorrt" else load_profile("auto")
    loaded = load_profile(profile) if isinstance(profile, str) else profile
    if loaded.engine != engine:
        raise InputError(
            f"profile {loaded.name!r} is for {loaded.engine}, but {_KIND_NAMES[kind]} runs on {engine}: "
            f"give a profile whose engine is {engine}, or leave --profile out"
        )
    return loaded


def _load(builder: Builder, artifact: Path, profile: Profile | None) -> Engine:
    """An Engine for a prebuilt artifact, through the builder's ``load`` (OpenVINO: compile the IR in place)."""
    if builder.name == "tensorrt":
        # The plan is deserialized when it is timed; engine_from_plan reads its engine.json for the shapes.
        from rexdeploy_tensorrt import engine_from_plan

        return engine_from_plan(artifact, profile.device if profile is not None else "cuda:0")
    load = getattr(builder, "load", None)
    if not callable(load) or profile is None:
        raise InputError(
            f"the {builder.name} engine cannot load a prebuilt {artifact.suffix} file; give the ONNX model"
        )
    engine: Engine = load(artifact, profile)
    return engine


def _precisions(builder: Builder, engine: Engine) -> dict[str, dict[str, int]]:
    summary = getattr(builder, "precision_summary", None)
    if callable(summary) and engine.handle is not None:
        result: dict[str, dict[str, int]] = summary(engine)
        return result
    counts: dict[str, int] = {}
    for precision in engine.layer_precisions.values():
        counts[precision] = counts.get(precision, 0) + 1
    return {"layers": dict(sorted(counts.items()))} if counts else {}


def _host_warnings(profile: Profile | None) -> list[str]:
    from rexdeploy.hostcpu import host_profile_name, missing_flags

    if profile is None or profile.engine != "openvino":
        return []
    missing = missing_flags(profile.requires)
    if not missing:
        return []
    return [
        f"profile {profile.name!r} is for CPUs with {', '.join(profile.requires)}, which this CPU lacks "
        f"({', '.join(missing)}); --profile auto picks {host_profile_name()!r} for this host"
    ]


@contextlib.contextmanager
def _build_dir(out_dir: str | Path | None) -> Iterator[tuple[Path, Path | None]]:
    """(directory to build in, final directory or None): ``out_dir`` written atomically, else a temp dir."""
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="rexdeploy-bench.") as tmp:
            yield Path(tmp), None
    else:
        with atomic_dir(out_dir) as tmp:
            yield tmp, Path(out_dir)


def bench(
    path: str | Path,
    profile: Profile | str | None = None,
    settings: TimingSettings | None = None,
    *,
    out_dir: str | Path | None = None,
    throughput: bool = False,
    layers: bool = False,
    progress: Progress | None = None,
) -> BenchResult:
    """Time ``path``: an ONNX model (built with ``profile``'s engine first), an OpenVINO IR ``.xml`` or
    a TensorRT ``.plan``.

    ``profile`` defaults to ``auto`` (this host's CPU profile); a TensorRT plan needs none (its device
    comes from its ``engine.json``, else ``cuda:0``). An ONNX model is built into a temporary directory,
    or into ``out_dir`` (written atomically) to keep the engine. ``settings`` default to a 200 ms
    warm-up then 3 s of runs. ``throughput`` adds OpenVINO's THROUGHPUT-mode fps (OpenVINO only).
    ``layers`` then profiles the engine with the same settings (``Builder.layer_times``) into
    :attr:`BenchResult.layers`; InputError where the engine has no profiler.
    """
    say = progress or _quiet
    path = Path(path)
    kind, engine_name = _kind(path)
    if not path.is_file():
        raise InputError(f"{'model' if kind == 'onnx' else 'engine'} file {path} not found")
    settings = settings or TimingSettings()
    _check_settings(settings)
    if kind == "onnx":
        loaded = profile if isinstance(profile, Profile) else load_profile(profile or "auto")
        return _bench_onnx(path, loaded, _profile_builder(loaded), settings, out_dir, throughput, layers, say)
    if out_dir is not None:
        raise InputError(f"--out keeps the engine built from an ONNX model; {path.name} is already built")
    builder = _engine_builder(engine_name)
    prof = _profile_for(kind, engine_name, profile)
    say(f"loading {path.name} with {builder.name} ...")
    engine = _load(builder, path, prof)
    return _measure(
        path, kind, prof, builder, engine, settings, throughput, layers, tuple(str(p) for p in engine.artifacts), say
    )


def _bench_onnx(
    path: Path,
    profile: Profile,
    builder: Builder,
    settings: TimingSettings,
    out_dir: str | Path | None,
    throughput: bool,
    layers: bool,
    say: Progress,
) -> BenchResult:
    with _build_dir(out_dir) as (work, final):
        say(f"building {path.name} with {builder.name} for {profile.device} ...")
        engine = builder.build(path, profile, work)
        kept = () if final is None else tuple(str(final / Path(p).relative_to(work)) for p in engine.artifacts)
        return _measure(path, "onnx", profile, builder, engine, settings, throughput, layers, kept, say)


def _measure(
    path: Path,
    kind: str,
    profile: Profile | None,
    builder: Builder,
    engine: Engine,
    settings: TimingSettings,
    throughput: bool,
    layers: bool,
    artifacts: tuple[str, ...],
    say: Progress,
) -> BenchResult:
    if throughput and not callable(getattr(builder, "time_throughput", None)):
        raise InputError(f"--throughput needs OpenVINO's THROUGHPUT mode; the {builder.name} engine has none")
    if layers and not callable(getattr(builder, "layer_times", None)):
        raise InputError(
            f"--layers needs the engine's own profiler; the {builder.name} builder has none: bench without --layers"
        )
    span = f"{settings.runs} runs" if settings.runs is not None else f"{settings.duration_s:g} s"
    say(f"timing ({settings.warmup_s * 1000:g} ms warm-up, then {span}) ...")
    timing = builder.time(engine, settings)
    mode: ThroughputMode | None = None
    time_throughput = getattr(builder, "time_throughput", None)
    if throughput and callable(time_throughput):
        say(f"timing THROUGHPUT mode ({span}) ...")
        result = time_throughput(engine, settings)
        mode = ThroughputMode(
            fps=float(result.fps), requests=int(result.requests), streams=int(result.streams), timing=result.timing
        )
    per_node = _layer_times(builder, engine, settings, say) if layers else None
    warnings = _host_warnings(profile)
    noisy = cov_warning(timing)
    if noisy is not None:
        warnings.append(noisy)
    return BenchResult(
        model=str(path),
        source=kind,
        profile=profile.name if profile is not None else "(from the plan)",
        backend=engine.backend,
        device=engine.device,
        backend_version=engine.backend_version,
        build_seconds=engine.build_seconds,
        artifacts=artifacts,
        inputs=dict(engine.inputs),
        timing=timing,
        precisions=_precisions(builder, engine),
        options=dict(engine.options),
        throughput=mode,
        warnings=tuple(warnings),
        layers=per_node,
    )


def _layer_times(builder: Builder, engine: Engine, settings: TimingSettings, say: Progress) -> LayerTimes:
    """``builder.layer_times`` with the timing settings; a builder that cannot profile is one InputError."""
    span = f"{settings.runs} runs" if settings.runs is not None else f"{settings.duration_s:g} s"
    say(f"profiling layers with {builder.name}'s profiler ({settings.warmup_s * 1000:g} ms warm-up, then {span}) ...")
    try:
        return builder.layer_times(engine, settings)
    except RexError:
        raise
    except NotImplementedError as exc:
        detail = " ".join(str(exc).split()) or "not implemented"
        raise InputError(f"the {builder.name} engine cannot profile layers ({detail}): bench without --layers") from exc


__all__ = [
    "BenchResult",
    "ThroughputMode",
    "bench",
    "cov_warning",
    "layer_table_lines",
    "parse_duration",
]
