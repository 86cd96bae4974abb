"""What the machine is: CPU and GPU names, driver, memory in use, and peak memory bandwidth.

GPU facts come from NVML (``libnvidia-ml``, loaded with ctypes, so no extra package); a GPU's peak
bandwidth from a table of datasheet figures, and the CPU's from a timed copy of a large array.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults

# Datasheet peak DRAM bandwidth in bytes/s, matched in order against the NVML device name (so
# "H100 PCIe" comes before "H100", "A100" before "A10", "GH200" before "H200").
GPU_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("GB200", 8.0e12),
    ("B200", 8.0e12),
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("A800", 2.039e12),
    ("A10G", 0.6e12),
    ("A10", 0.6e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 6000 Ada", 0.96e12),
    ("RTX A6000", 0.768e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
)


def gpu_peak_bandwidth(name: str) -> float | None:
    """Datasheet bandwidth (bytes/s) of a GPU by its NVML name, or None if it is not in the table."""
    for pattern, bandwidth in GPU_BANDWIDTH:
        if pattern.lower() in name.lower():
            return bandwidth
    return None


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    """The initialized NVML library, or None without an NVIDIA driver."""
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.nvmlInit_v2() == 0:
                return lib
        except AttributeError:
            return None
    return None


def _nvml_handle(index: int) -> Any:
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    return handle


def gpu_info(index: int = 0) -> dict[str, Any] | None:
    """``{"name", "driver", "memory_bytes"}`` of a GPU from NVML, or None without one."""
    handle = _nvml_handle(index)
    if handle is None:
        return None
    lib = _nvml()
    name = ctypes.create_string_buffer(96)
    driver = ctypes.create_string_buffer(80)
    memory = _NvmlMemory()
    if lib.nvmlDeviceGetName(handle, name, 96) != 0:
        return None
    lib.nvmlSystemGetDriverVersion(driver, 80)
    lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
    return {
        "name": name.value.decode(errors="replace"),
        "driver": driver.value.decode(errors="replace") or None,
        "memory_bytes": int(memory.total),
    }


def gpu_memory_used(index: int = 0) -> int | None:
    """Bytes in use on a GPU (all processes, as NVML reports), or None without NVML."""
    handle = _nvml_handle(index)
    if handle is None:
        return None
    memory = _NvmlMemory()
    if _nvml().nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    return int(memory.used)


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=4)
def measure_cpu_bandwidth(nbytes: int | None = None, repeats: int = 3) -> float:
    """Host memory bandwidth in bytes/s: best of ``repeats`` copies of ``nbytes`` (read + write).

    ``nbytes`` defaults to :data:`~llmtool.defaults.CPU_BANDWIDTH_PROBE_BYTES`; the result is
    cached per process.
    """
    nbytes = nbytes or defaults.CPU_BANDWIDTH_PROBE_BYTES
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def cpu_cache_bytes() -> int | None:
    """Size of the CPU's last-level cache (the largest level cpu0 reports in sysfs), or None."""
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit() and (best is None or level > best[0]):
            best = (level, int(digits) * scale)
    return best[1] if best else None


def peak_bandwidth(device: str) -> dict[str, Any]:
    """``{"bytes_per_s", "source"}``: the GPU's datasheet figure, or the CPU's measured one.

    ``bytes_per_s`` is None for a GPU missing from :data:`GPU_BANDWIDTH`.
    """
    if device == "cuda":
        info = gpu_info()
        name = info["name"] if info else "unknown GPU"
        bandwidth = gpu_peak_bandwidth(name) if info else None
        return {
            "bytes_per_s": bandwidth,
            "source": f"datasheet ({name})" if bandwidth else f"unknown ({name})",
        }
    return {"bytes_per_s": measure_cpu_bandwidth(), "source": "measured (numpy copy)"}


class PeakRss:
    """Peak resident set size of this process over a block.

    On Linux the kernel's high-water mark is reset on entry (``/proc/self/clear_refs``) and read on
    exit (``VmHWM``); elsewhere the larger of the RSS at entry and exit is reported.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._linux = Path("/proc/self/clear_refs").exists()

    def __enter__(self) -> PeakRss:
        if self._linux:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self._linux = False
        self.peak = _rss()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _vm_hwm() if self._linux else None
        self.peak = max(self.peak, hwm or 0, _rss())


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _vm_hwm() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def environment(provider: str, dtype: str | None = None) -> dict[str, Any]:
    """The machine and software a measurement ran on (the ``environment`` block of a report)."""
    from llmtool.manifest import tool_versions

    gpu = gpu_info() if provider == "cuda" else None
    # torch's CUDA build, only when something already imported torch (importing it takes seconds).
    torch = sys.modules.get("torch")
    torch_cuda = getattr(getattr(torch, "version", None), "cuda", None)
    return {
        "device": gpu["name"] if gpu else cpu_name(),
        "device_memory_bytes": gpu["memory_bytes"] if gpu else None,
        "driver": gpu["driver"] if gpu else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "execution_provider": provider,
        "dtype": dtype,
        "torch_cuda": torch_cuda,
        "onnxruntime": getattr(sys.modules.get("onnxruntime"), "__version__", None),
        "versions": tool_versions(),
    }
