"""The engine cache: the same (model, plan, profile, engine version) is loaded, not rebuilt."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import small_cnn

from rexdeploy.builders.cache import cache_key, cache_root, cached_build
from rexdeploy.builders.registry import get_builder
from rexdeploy.profile import load_profile

pytestmark = pytest.mark.openvino


def test_second_build_is_a_cache_hit(tmp_path: Path, _isolated_engine_cache: Path) -> None:
    pytest.importorskip("openvino")
    builder, profile = get_builder("openvino"), load_profile("auto")
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    first, hit1 = cached_build(builder, model, profile, tmp_path / "a")
    second, hit2 = cached_build(builder, model, profile, tmp_path / "b")
    assert (hit1, hit2) == (False, True)
    assert cache_root() == _isolated_engine_cache
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(builder.run(first, x)[0], builder.run(second, x)[0])
    assert (tmp_path / "b" / "model.xml").is_file()
    # another profile (or model, or engine version) is another key
    other = replace(profile, quantization=replace(profile.quantization, bf16=not profile.quantization.bf16))
    assert cache_key(model, other, builder) != cache_key(model, profile, builder)
    assert cached_build(builder, model, profile, tmp_path / "c", enabled=False)[1] is False


def test_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    builder, profile = get_builder("openvino"), load_profile("auto")
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    cached_build(builder, model, profile, tmp_path / "a")
    entry = cache_root() / cache_key(model, profile, builder)
    (entry / "manifest.json").write_text(json.dumps({"primary": "missing.xml"}))
    engine, hit = cached_build(builder, model, profile, tmp_path / "b")
    assert hit is False and Path(engine.artifacts[0]).is_file()
    assert json.loads((entry / "manifest.json").read_text())["primary"] == "model.xml"


def test_the_plugins_engine_format_is_part_of_the_cache_keys(tmp_path: Path) -> None:
    """A plugin that changes what it makes of a model (its ``engine_format``) never gets an engine or a cost
    table cached by its older form, though the engine's version is the same."""
    from rexdeploy.probing import table_key

    class Plugin:
        name, pip_extra = "scripted", ""

        def version(self) -> str:
            return "1.0"

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not parsed: hashed")
    profile = load_profile("x86-avx512")
    old, new = Plugin(), Plugin()
    new.engine_format = "form-2"  # type: ignore[attr-defined]
    assert cache_key(model, profile, old) != cache_key(model, profile, new)  # type: ignore[arg-type]
    assert table_key("sha", profile, old) != table_key("sha", profile, new)  # type: ignore[arg-type]
    assert cache_key(model, profile, old) == cache_key(model, profile, Plugin())  # type: ignore[arg-type]
