"""Engine cache: a build keyed by (sha256 of the ONNX being built — the model and the plan carried out
on it —, the profile, the engine and its version) is reused instead of rebuilt.

Entries live in ``$REXDEPLOY_CACHE`` (default ``~/.cache/rexdeploy/engines``), one folder per key with
the engine's files and a ``manifest.json`` naming the file the builder's ``load`` takes. A builder
without ``load`` is simply not cached. Entries are written atomically; a corrupt one is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from rexdeploy.builders.base import Builder, Engine
from rexdeploy.errors import RexError
from rexdeploy.fileio import atomic_dir
from rexdeploy.graph import file_sha256
from rexdeploy.profile import Profile

MANIFEST = "manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("REXDEPLOY_CACHE") or Path.home() / ".cache" / "rexdeploy" / "engines")


def engine_format(builder: Builder) -> str:
    """The plugin's ``engine_format`` tag (what it makes of a model beyond the engine's version; "" if none)."""
    return str(getattr(builder, "engine_format", ""))


def cache_key(model: Path, profile: Profile, builder: Builder) -> str:
    parts = [file_sha256(model), profile.to_toml(), builder.name, builder.version(), engine_format(builder)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cached_build(
    builder: Builder, model: Path, profile: Profile, out_dir: Path, *, enabled: bool = True
) -> tuple[Engine, bool]:
    """Build ``model`` into ``out_dir``, or copy a cached build there and load it. Returns (engine, hit)."""
    load = getattr(builder, "load", None)
    if not enabled or not callable(load):
        return builder.build(model, profile, out_dir), False
    entry = cache_root() / cache_key(model, profile, builder)
    manifest = entry / MANIFEST
    if manifest.is_file():
        try:
            primary = json.loads(manifest.read_text(encoding="utf-8"))["primary"]
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in entry.iterdir():
                if f.name != MANIFEST:
                    shutil.copy2(f, out_dir / f.name)
            engine: Engine = load(out_dir / primary, profile)
            # the engine was built from ``model``: keep it as its source (maps profiler names to ONNX nodes)
            return dataclasses.replace(engine, model_path=model), True
        except (OSError, KeyError, ValueError, RexError):
            shutil.rmtree(entry, ignore_errors=True)  # corrupt entry: rebuild below
    engine = builder.build(model, profile, out_dir)
    files = [Path(a) for a in engine.artifacts if Path(a).is_file() and Path(a).parent == out_dir]
    if files:
        try:
            with atomic_dir(entry) as tmp:
                for f in files:
                    shutil.copy2(f, tmp / f.name)
                (tmp / MANIFEST).write_text(json.dumps({"primary": files[0].name}), encoding="utf-8")
        except OSError:
            pass  # a read-only or full cache never fails a build
    return engine, False
