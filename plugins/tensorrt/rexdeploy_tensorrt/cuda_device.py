"""What CUDA GPU is here, asked of the NVIDIA driver (``libcuda``) through ctypes.

No Python CUDA package is needed: the driver library ships with the NVIDIA driver itself, so
``available()`` and the compute capability that :func:`select_settings` takes can be answered on any
machine, and answer "none" (never raise) where there is no driver. The calls are the CUDA driver API's
``cuInit``, ``cuDeviceGetCount``, ``cuDeviceGet``, ``cuDeviceGetAttribute`` and ``cuDeviceGetName``
(https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__DEVICE.html), and ``cuDriverGetVersion``
(https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__VERSION.html: ``1000 * major + 10 * minor``).

**CUDA majors.** TensorRT's wheels are built per CUDA major (``tensorrt-cu12`` / ``tensorrt-cu13``, the
``tensorrt`` metapackage picks the newest, CUDA 13 for recent 10.x releases) and so is cuda-python
(``cuda-python`` / ``cuda-bindings`` 12.x vs 13.x). A driver runs code built for its own CUDA major or
older, never newer: a CUDA 12 driver under ``tensorrt-cu13`` or cuda-python 13 fails at the first CUDA
call with an opaque "insufficient driver". :func:`check_cuda_stack` compares the driver's CUDA version
with the majors of the installed packages (:func:`installed_cuda_majors`, read from the package
metadata, no import) and says in one line which pins to install (:func:`cuda_mismatch`, pure).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from rexdeploy.errors import EngineUnavailableError

_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]


# The pins that work with each driver CUDA major (pyproject extras rexdeploy[tensorrt-cu12] / [tensorrt-cu13]).
PINS: dict[int, str] = {
    12: "pip install 'rexdeploy[tensorrt-cu12]' (tensorrt-cu12>=10.1,<11 and cuda-python>=12.6.1,<13)",
    13: "pip install 'rexdeploy[tensorrt-cu13]' (tensorrt-cu13>=10.13.2,<11 and cuda-python>=13,<14)",
}
_TRT_DIST = re.compile(r"^tensorrt[-_]cu(\d+)(?:[-_](?:libs|bindings))?$")


@functools.cache
def _libcuda() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.cache
def _driver() -> ctypes.CDLL | None:
    lib = _libcuda()
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
    except AttributeError:
        return None
    return lib


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, e.g. (12, 4); None without a driver."""
    try:
        lib = _libcuda()
        if lib is None:
            return None
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        return version.value // 1000, (version.value % 1000) // 10
    except Exception:
        return None


def installed_cuda_majors(dists: Mapping[str, str] | None = None) -> dict[str, int]:
    """The CUDA major each installed TensorRT / cuda-python distribution is built for, by distribution
    name: ``tensorrt-cu13`` (and its ``-libs`` / ``-bindings``) → 13 from the name; ``cuda-python`` /
    ``cuda-bindings`` → their version's major. ``dists`` (name → version) replaces the installed ones."""
    if dists is None:
        dists = {}
        for dist in metadata.distributions():
            name = str(dist.name or "")
            if name:
                dists[name] = str(dist.version)
    out: dict[str, int] = {}
    for raw, version in dists.items():
        name = raw.lower().replace("_", "-")
        m = _TRT_DIST.match(name)
        if m:
            out[name] = int(m.group(1))
        elif name in ("cuda-python", "cuda-bindings"):
            head = version.split(".")[0]
            if head.isdigit():
                out[name] = int(head)
    return dict(sorted(out.items()))


def cuda_mismatch(driver: tuple[int, int] | None, majors: Mapping[str, int]) -> str | None:
    """One line saying which installed packages need a newer CUDA than the driver has, and which pins to
    install instead; None when they fit (or there is no driver: the caller then finds no GPU)."""
    if driver is None:
        return None
    too_new = {name: major for name, major in majors.items() if major > driver[0]}
    if not too_new:
        return None
    names = ", ".join(f"{n} (CUDA {m})" for n, m in too_new.items())
    fix = PINS.get(driver[0], f"install the TensorRT 10 and cuda-python builds for CUDA {driver[0]}")
    return (
        f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} but {names} need a newer CUDA: {fix}, "
        "or update the driver"
    )


@functools.cache
def cuda_stack_problem() -> str | None:
    """:func:`cuda_mismatch` of this machine's driver and installed packages (cached)."""
    return cuda_mismatch(driver_cuda_version(), installed_cuda_majors())


def check_cuda_stack() -> None:
    """Raise :class:`EngineUnavailableError` (one line) when the installed TensorRT / cuda-python need a
    newer CUDA than the driver; called before the first CUDA call of a build, a timing or a run."""
    problem = cuda_stack_problem()
    if problem:
        raise EngineUnavailableError(problem)


def device_count() -> int:
    """Number of CUDA devices the driver sees (0 without a driver or GPU; never raises)."""
    try:
        lib = _driver()
        if lib is None:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except Exception:
        return 0


def device_info(index: int) -> CudaDevice | None:
    """Name and compute capability of device ``index``, or None when it is not there."""
    try:
        lib = _driver()
        if lib is None or not 0 <= index < device_count():
            return None
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return None
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        if lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev) != 0:
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev) != 0:
            return None
        buf = ctypes.create_string_buffer(256)
        named = lib.cuDeviceGetName(buf, 256, dev) == 0
        name = buf.value.decode(errors="replace") if named else ""
        return CudaDevice(index, name, (int(major.value), int(minor.value)))
    except Exception:
        return None
