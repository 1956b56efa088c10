"""What the host CPU can do: its feature flags, and the shipped profile that matches it."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this host (Linux /proc/cpuinfo names); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def host_id() -> str:
    """This host as a cache key part: CPU model, architecture and a digest of the feature flags."""
    digest = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{cpu_model()} ({platform.machine()}, flags {digest})"


def host_profile_name() -> str:
    """The shipped OpenVINO CPU profile for this host: AMX → xeon-spr, AVX-512 VNNI with AVX-512 BF16 →
    x86-avx512-bf16 (OpenVINO's default float precision there is bf16), AVX-512 VNNI → x86-avx512,
    AVX-VNNI → core-ultra, otherwise x86-avx2 (7-bit weights, no int16 overflow)."""
    flags = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") and flags:
        return "x86-avx2"
    if "amx_int8" in flags:
        return "xeon-spr"
    if "avx512_vnni" in flags and "avx512_bf16" in flags:
        return "x86-avx512-bf16"
    if "avx512_vnni" in flags:
        return "x86-avx512"
    if "avx_vnni" in flags:
        return "core-ultra"
    return "x86-avx2"


def missing_flags(required: tuple[str, ...]) -> list[str]:
    """The required flags this host lacks (none when the host's flags are unknown)."""
    flags = cpu_flags()
    return [] if not flags else [f for f in required if f not in flags]
