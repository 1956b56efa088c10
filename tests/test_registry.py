"""The builder registry: entry-point discovery, error messages, and no heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rexdeploy.builders import registry
from rexdeploy.builders.base import Builder
from rexdeploy.errors import EngineUnavailableError, ProfileError


def test_known_engines_come_from_entry_points() -> None:
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(registry.known_engines())


def test_get_builder_returns_one_cached_builder() -> None:
    builder = registry.get_builder("onnxruntime")
    assert isinstance(builder, Builder)
    assert builder.name == "onnxruntime"
    assert builder.pip_extra == ""
    assert registry.get_builder("onnxruntime") is builder


def test_openvino_builder_names_its_extra() -> None:
    builder = registry.get_builder("openvino")
    assert (builder.name, builder.pip_extra) == ("openvino", "openvino")


def test_unknown_engine_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        registry.get_builder("nope")
    message = str(info.value)
    assert "unknown engine 'nope'" in message
    assert "known engines: " in message
    for name in ("onnxruntime", "openvino", "tensorrt"):
        assert name in message
    assert "\n" not in message


def test_require_available_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = registry.get_builder("openvino")
    monkeypatch.setattr(builder, "available", lambda: False)
    with pytest.raises(EngineUnavailableError) as info:
        registry.require_available("openvino")
    assert str(info.value) == "the openvino engine is not installed here: pip install 'rexdeploy[openvino]'"


def test_require_available_without_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = registry.get_builder("onnxruntime")
    monkeypatch.setattr(builder, "available", lambda: False)
    with pytest.raises(
        EngineUnavailableError, match=r"^the onnxruntime engine is not installed here: pip install rexdeploy$"
    ):
        registry.require_available("onnxruntime")


def test_require_available_returns_the_builder() -> None:
    assert registry.require_available("onnxruntime") is registry.get_builder("onnxruntime")


def test_list_builders_reports_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    status = registry.list_builders()
    assert set(status) == set(registry.known_engines())
    assert status["onnxruntime"] is True
    assert all(isinstance(v, bool) for v in status.values())
    monkeypatch.setattr(registry.get_builder("onnxruntime"), "available", lambda: False)
    assert registry.list_builders()["onnxruntime"] is False


def test_importing_the_registry_imports_no_engine() -> None:
    code = (
        "import sys\n"
        "import rexdeploy.builders.registry as r\n"
        "r.known_engines()\n"
        "r.get_builder('openvino'); r.get_builder('onnxruntime')\n"
        "heavy = sorted(m for m in ('openvino', 'tensorrt') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
