"""Host CPU detection: /proc/cpuinfo flags, the shipped profile `--profile auto` picks, missing flags.

Every case fakes the host (flags, architecture), so the same answers are checked on any CI machine
whatever CPU it really has; ``cpu_flags`` is ``functools.cache``'d, so its cache is cleared around each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rexdeploy import hostcpu
from rexdeploy.profile import load_profile

# flag sets as /proc/cpuinfo spells them on real parts (trimmed to what matters here)
AVX2_EPYC = frozenset({"fpu", "sse2", "ssse3", "sse4_2", "avx", "avx2", "fma", "bmi2", "sha_ni"})  # Zen 2: no VNNI
AVX512_VNNI = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # Cascade Lake / Ice Lake
AVX512_BF16 = AVX512_VNNI | {"avx512_bf16"}  # Cooper Lake / Zen 4: bf16 dot products, no AMX
AMX = AVX512_BF16 | {"amx_tile", "amx_int8", "amx_bf16"}  # Sapphire Rapids
AVX_VNNI = AVX2_EPYC | {"avx_vnni"}  # Alder Lake / Meteor Lake (Core Ultra): VEX-encoded VNNI, no AVX-512


_REAL_CPU_FLAGS = hostcpu.cpu_flags  # the cached function itself (tests replace the module attribute)


@pytest.fixture(autouse=True)
def _fresh_flag_cache() -> Iterator[None]:
    _REAL_CPU_FLAGS.cache_clear()
    yield
    _REAL_CPU_FLAGS.cache_clear()  # the real host's flags again for the tests that follow


def _fake_host(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], machine: str = "x86_64") -> None:
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hostcpu.platform, "machine", lambda: machine)


@pytest.mark.parametrize(
    ("flags", "machine", "want"),
    [
        (AMX, "x86_64", "xeon-spr"),  # AMX int8 tiles beat AVX-512 VNNI
        (AVX512_BF16, "x86_64", "x86-avx512-bf16"),  # bf16 without AMX: OpenVINO runs float layers in bf16
        (AVX512_VNNI, "x86_64", "x86-avx512"),
        (AVX512_VNNI, "AMD64", "x86-avx512"),  # Windows spells the architecture AMD64
        (AVX_VNNI, "x86_64", "core-ultra"),
        (AVX_VNNI | {"avx512_vnni"}, "x86_64", "x86-avx512"),  # both: the AVX-512 kind wins
        (AVX2_EPYC, "x86_64", "x86-avx2"),  # no VNNI: int16 accumulation, 7-bit weights
        (frozenset(), "x86_64", "x86-avx2"),  # flags unknown: the safe profile
        (frozenset({"fp", "asimd", "aes", "sha2", "crc32", "asimddp"}), "aarch64", "x86-avx2"),
        (AMX, "aarch64", "x86-avx2"),  # x86 flag names on another architecture are not trusted
        (frozenset(), "arm64", "x86-avx2"),
    ],
)
def test_host_profile_name(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], machine: str, want: str) -> None:
    _fake_host(monkeypatch, flags, machine)
    assert hostcpu.host_profile_name() == want
    profile = load_profile("auto")
    assert profile.name == want and profile.engine == "openvino"
    if machine in ("x86_64", "AMD64") and flags:
        # the chosen profile never needs a flag the host lacks
        assert hostcpu.missing_flags(profile.requires) == []


def test_auto_profile_precision_follows_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float layers run in bf16 where OpenVINO's CPU default is bf16 (AMX, AVX-512 BF16), f32 on VNNI-only and
    AVX2 hosts; an AVX2 host caps weights at 7 bits (no int16 overflow of u8×s8 pairs)."""
    _fake_host(monkeypatch, AMX)
    assert load_profile("auto").quantization.bf16
    _fake_host(monkeypatch, AVX512_BF16)
    assert load_profile("auto").quantization.bf16
    assert max(load_profile("auto").weight_bits("conv")) == 8
    _fake_host(monkeypatch, AVX512_VNNI)
    assert not load_profile("auto").quantization.bf16
    _fake_host(monkeypatch, AVX2_EPYC)
    auto = load_profile("auto")
    assert not auto.quantization.bf16 and max(auto.weight_bits("conv")) == 7


@pytest.mark.parametrize(
    ("flags", "required", "missing"),
    [
        (AVX2_EPYC, ("avx512_vnni",), ["avx512_vnni"]),
        (AVX2_EPYC, ("amx_int8", "avx2", "avx512_vnni"), ["amx_int8", "avx512_vnni"]),  # in the order asked
        (AMX, ("amx_int8",), []),
        (AVX512_VNNI, (), []),
        (frozenset(), ("avx512_vnni",), []),  # flags unknown (not Linux): nothing is reported missing
    ],
)
def test_missing_flags(
    monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], required: tuple[str, ...], missing: list[str]
) -> None:
    _fake_host(monkeypatch, flags)
    assert hostcpu.missing_flags(required) == missing


class _FakeCpuinfo:
    """Stands in for ``pathlib.Path`` inside hostcpu: ``read_text`` of /proc/cpuinfo returns ``text``
    (or raises OSError when it is None)."""

    text: str | None = None
    read: list[str] = []  # noqa: RUF012 - the paths asked for, per test

    def __init__(self, path: str) -> None:
        self.path = path

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        type(self).read.append(self.path)
        if self.text is None:
            raise FileNotFoundError(self.path)
        return self.text


X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (X86_CPUINFO, {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}),
        (ARM_CPUINFO, set()),  # aarch64 names its flags "Features": not x86 flags
        ("", set()),
        (None, set()),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_cpu_flags_parses_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, text: str | None, want: set[str]) -> None:
    monkeypatch.setattr(_FakeCpuinfo, "text", text)
    monkeypatch.setattr(_FakeCpuinfo, "read", [])
    monkeypatch.setattr(hostcpu, "Path", _FakeCpuinfo)
    flags = hostcpu.cpu_flags()
    assert isinstance(flags, frozenset) and flags == want
    assert _FakeCpuinfo.read == ["/proc/cpuinfo"]
    assert hostcpu.cpu_flags() is flags and _FakeCpuinfo.read == ["/proc/cpuinfo"]  # read once, then cached


def test_real_host_flags_pick_a_shipped_profile() -> None:
    """On the machine running the suite: whatever it is, auto names a shipped OpenVINO profile whose
    required flags this host has (an x86 host with /proc/cpuinfo always lists avx2 or better here)."""
    name = hostcpu.host_profile_name()
    assert name in ("xeon-spr", "x86-avx512-bf16", "x86-avx512", "core-ultra", "x86-avx2")
    assert hostcpu.missing_flags(load_profile(name).requires) == []
    assert hostcpu.cpu_flags() == hostcpu.cpu_flags()
    if Path("/proc/cpuinfo").exists() and hostcpu.platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in hostcpu.cpu_flags()  # parsed the real file, not an empty fallback
