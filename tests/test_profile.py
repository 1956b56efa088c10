from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rexdeploy.errors import ProfileError
from rexdeploy.profile import list_profiles, load_profile, profile_from_dict

SHIPPED = ["a100", "core-ultra", "h100", "orin", "x86-avx2", "x86-avx512", "x86-avx512-bf16", "xeon-spr"]


def test_shipped_profiles_listed() -> None:
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.engine in ("openvino", "tensorrt")
    path = tmp_path / f"{name}.toml"
    path.write_text(profile.to_toml())
    assert load_profile(path) == profile


def test_engines_of_profiles() -> None:
    assert load_profile("x86-avx512").engine == "openvino"
    assert load_profile("h100").engine == "tensorrt"
    assert load_profile("h100").quantization.fp8 and not load_profile("a100").quantization.fp8
    assert load_profile("orin").parallel.aux_streams >= 1


def _base() -> dict[str, object]:
    return tomllib.loads(load_profile("x86-avx512").to_toml())


def test_unknown_top_level_key_lists_allowed() -> None:
    raw = _base() | {"speed": 3}
    with pytest.raises(ProfileError, match=r"unknown key\(s\) speed; allowed keys are: cost, defaults, descr"):
        profile_from_dict(raw, "my.toml")


def test_unknown_section_key_lists_allowed() -> None:
    raw = _base()
    raw["quantization"]["int3"] = True  # type: ignore[index]
    with pytest.raises(
        ProfileError, match=r"\[quantization\]: unknown key\(s\) int3; allowed keys are: activation_bits"
    ):
        profile_from_dict(raw, "my.toml")


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("quantization", "conv_weight_bits", [1, 8], r"out of range; allowed bit-widths are 2\.\.8"),
        ("quantization", "fp16", "yes", "expected true or false"),
        ("quantization", "max_act_order", 4, r"max_act_order: 4 out of range; use 1 \(no activation orders\) to 3"),
        ("quantization", "max_act_order", 0, "max_act_order: 0 out of range"),
        ("parallel", "streams", -1, "non-negative integer"),
        ("defaults", "form", "tree", "allowed: branches, concat"),
        ("defaults", "order", 0, "allowed orders are 1..16"),
        ("cost", "layer_overhead_us", -2.0, "must be ≥ 0"),
    ],
)
def test_bad_values_rejected(section: str, key: str, value: object, message: str) -> None:
    raw = _base()
    raw[section][key] = value  # type: ignore[index]
    with pytest.raises(ProfileError, match=message):
        profile_from_dict(raw, "my.toml")


def test_bad_engine_and_missing_name() -> None:
    with pytest.raises(ProfileError, match="allowed: openvino, tensorrt, onnxruntime"):
        profile_from_dict(_base() | {"engine": "tvm"})
    raw = _base()
    del raw["name"]
    with pytest.raises(ProfileError, match="missing or empty string key 'name'"):
        profile_from_dict(raw)


def test_unknown_cost_op_class() -> None:
    raw = _base()
    raw["cost"]["throughput_gmacs"]["attention"] = {"fp32": 1.0}  # type: ignore[index]
    with pytest.raises(ProfileError, match="allowed keys are: conv, depthwise, gemm, matmul, pointwise"):
        profile_from_dict(raw)


def test_unknown_profile_name_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="unknown profile 'nope'; shipped profiles: a100"):
        load_profile("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ProfileError, match="is not valid TOML"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.toml")
