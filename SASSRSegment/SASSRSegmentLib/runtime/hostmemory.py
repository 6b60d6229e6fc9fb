"""How much physical memory this computer can give a new process without swapping, on Linux, Windows
and macOS, with only the standard library: Slicer's Python has no psutil (it is used where present)."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys

# When the system will not say, nothing is refused up front: the window-size cap
# (memory.LARGE_WINDOW_EXTRA_BYTES) still bounds what prediction adds.
UNKNOWN = sys.maxsize


def available_bytes() -> int:
    """Available physical memory in bytes, or UNKNOWN where no probe works."""
    probes = (_psutil, _linux, _windows, _macos)
    for probe in probes:
        try:
            value = probe()
        except (ImportError, OSError, ValueError, AttributeError, subprocess.SubprocessError):
            continue
        if value is not None and value > 0:
            return int(value)
    return UNKNOWN


def _psutil() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _linux() -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    with open("/proc/meminfo", encoding="ascii") as f:
        return meminfo_available(f.read())


def meminfo_available(text: str) -> int | None:
    """MemAvailable of /proc/meminfo (the kernel's estimate, page cache included), in bytes."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class _MemoryStatusEx(ctypes.Structure):
    _fields_ = [
        ("dwLength", ctypes.c_ulong),
        ("dwMemoryLoad", ctypes.c_ulong),
        ("ullTotalPhys", ctypes.c_ulonglong),
        ("ullAvailPhys", ctypes.c_ulonglong),
        ("ullTotalPageFile", ctypes.c_ulonglong),
        ("ullAvailPageFile", ctypes.c_ulonglong),
        ("ullTotalVirtual", ctypes.c_ulonglong),
        ("ullAvailVirtual", ctypes.c_ulonglong),
        ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
    ]


def _windows() -> int | None:
    if sys.platform != "win32":
        return None
    status = _MemoryStatusEx()
    status.dwLength = ctypes.sizeof(status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPhys)


def _macos() -> int | None:
    if sys.platform != "darwin":
        return None
    text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
    return vm_stat_available(text)


def vm_stat_available(text: str) -> int | None:
    """Free plus inactive pages of macOS's `vm_stat` (what psutil calls available), in bytes."""
    size = re.search(r"page size of (\d+) bytes", text)
    pages = {
        name: int(count)
        for name, count in re.findall(r"^Pages (free|inactive):\s+(\d+)\.", text, re.MULTILINE)
    }
    if not size or "free" not in pages or "inactive" not in pages:
        return None
    return int(size.group(1)) * sum(pages.values())
