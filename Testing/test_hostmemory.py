"""The free-memory probe the up-front memory check relies on, on every system Slicer runs on, without
psutil (Slicer's Python has none): a probe that cannot answer never stops a segmentation."""

import sys

import pytest

from SASSRSegmentLib.runtime import hostmemory

MEMINFO = """MemTotal:       24576000 kB
MemFree:         1024000 kB
MemAvailable:   20480000 kB
Buffers:          102400 kB
"""

# The layout of macOS 14's `vm_stat` (Apple silicon: 16 KiB pages).
VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12345.
Pages active:                            400000.
Pages inactive:                          300000.
Pages speculative:                         5000.
Pages throttled:                              0.
Pages wired down:                        150000.
"""


@pytest.fixture
def no_psutil(monkeypatch):
    # None in sys.modules makes `import psutil` raise ImportError, as in Slicer's Python.
    monkeypatch.setitem(sys.modules, "psutil", None)


def test_meminfo_gives_the_kernels_available_estimate():
    assert hostmemory.meminfo_available(MEMINFO) == 20480000 * 1024
    assert hostmemory.meminfo_available("MemTotal: 100 kB\n") is None


def test_vm_stat_gives_free_plus_inactive_pages():
    assert hostmemory.vm_stat_available(VM_STAT) == (12345 + 300000) * 16384
    assert hostmemory.vm_stat_available("Pages free: 3.\n") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_without_psutil_linux_reads_proc_meminfo(no_psutil):
    with open("/proc/meminfo", encoding="ascii") as f:
        expected = hostmemory.meminfo_available(f.read())
    measured = hostmemory.available_bytes()
    assert measured != hostmemory.UNKNOWN
    # Two readings of a live system's free memory, moments apart.
    assert abs(measured - expected) <= 0.05 * expected


def test_a_system_that_does_not_say_is_not_refused(no_psutil, monkeypatch):
    # Windows had no os.sysconf and macOS no SC_AVPHYS_PAGES: the old fallback stopped every run there.
    monkeypatch.setattr(sys, "platform", "sunos5")
    assert hostmemory.available_bytes() == hostmemory.UNKNOWN


def test_a_failing_probe_falls_through_to_the_next(no_psutil, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")

    def broken_vm_stat(*args, **kwargs):
        raise FileNotFoundError("vm_stat")

    monkeypatch.setattr(hostmemory.subprocess, "run", broken_vm_stat)
    assert hostmemory.available_bytes() == hostmemory.UNKNOWN
