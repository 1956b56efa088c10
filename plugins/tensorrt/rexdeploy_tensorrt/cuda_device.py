"""What CUDA GPU is here, asked of the NVIDIA driver (``libcuda``) through ctypes.

No Python CUDA package is needed: the driver library ships with the NVIDIA driver itself, so
``available()`` and the compute capability that :func:`select_settings` takes can be answered on any
machine, and answer "none" (never raise) where there is no driver. The calls are the CUDA driver API's
``cuInit``, ``cuDeviceGetCount``, ``cuDeviceGet``, ``cuDeviceGetAttribute`` and ``cuDeviceGetName``
(https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__DEVICE.html).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]


@functools.cache
def _driver() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return None
        except AttributeError:
            return None
        return lib
    return None


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
