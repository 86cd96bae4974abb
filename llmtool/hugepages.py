"""Move freshly loaded model weights onto 2 MB transparent huge pages (Linux), for CPU decoding.

Why: a batch-1 decode step on the CPU streams every weight once (540 MB per token for SmolLM2 in
fp32), so it runs at the speed of memory. With 4 KB pages that stream touches one page table
entry per 4 KB, and the TLB misses cost bandwidth; with 2 MB pages they all but vanish. Measured
on SmolLM2-135M fp32, 2 threads (docs/benchmarks.md): +10% decode tok/s; ONNX Runtime's weight
buffers come from plain ``malloc``, which never asks for huge pages itself.

Two ways, the first preferred:

* The ``llmtool generate`` and ``eval`` commands start themselves again (once, before loading
  anything) with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which makes glibc's ``malloc`` ask
  for huge pages as it maps memory (glibc 2.35+): weights land on huge pages as they are read,
  at no copying cost (loading takes about as long). :func:`malloc_env` decides; the
  environment variable ``LLMTOOL_MALLOC_HUGE_PAGES=0`` or ``--no-huge-pages`` turns it off.
* Elsewhere (the library in someone else's process), ``madvise(MADV_COLLAPSE)`` (Linux 6.1+)
  turns already-populated memory into huge pages synchronously, whatever the system-wide THP
  mode (unless it is ``never``). :func:`huge_pages_for` wraps the loading of a model: it first
  hands the C allocator's free memory back to the kernel, then collapses only the 2 MB chunks of
  anonymous memory that are fully resident after the block and were not before it, so no page
  is committed that was not already in use, and memory that belongs to the rest of the process
  is left alone. It costs 0.5-1 s per GB at load.

Everything here is best effort: where the kernel, the platform or ``/proc`` says no, nothing
changes and the result says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+
PAGE = 4096
HUGE = 2 << 20
PAGES_PER_HUGE = HUGE // PAGE
MAX_MAPPING = 1 << 36  # skip address-space reservations larger than 64 GiB
PRESENT = 1 << 63  # /proc/self/pagemap: page present in RAM
TUNABLE = "glibc.malloc.hugetlb"


@dataclass
class HugePageResult:
    """What :func:`huge_pages_for` did.

    Attributes:
        candidate_bytes: New, fully resident anonymous memory in 2 MB chunks.
        collapsed_bytes: The part of it now backed by huge pages.
        seconds: Time spent scanning and collapsing.
        reason: Why nothing (or not everything) was collapsed; None when all of it was.
        malloc: glibc's malloc already asked for huge pages (``GLIBC_TUNABLES``), so there was
            nothing to collapse.
    """

    candidate_bytes: int = 0
    collapsed_bytes: int = 0
    seconds: float = 0.0
    reason: str | None = None
    malloc: bool = False

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        return {
            "malloc": self.malloc,
            "candidate_mb": round(self.candidate_bytes / 1e6, 1),
            "collapsed_mb": round(self.collapsed_bytes / 1e6, 1),
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
        }


def unsupported_reason() -> str | None:
    """Why huge pages cannot be used here, or None when they can be tried."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.sysconf("SC_PAGE_SIZE") != PAGE:
        return "page size is not 4 KB"
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "no transparent huge page support in this kernel"
    if "[never]" in mode:
        return "transparent huge pages are disabled (mode never)"
    return None


def malloc_uses_huge_pages() -> bool:
    """Whether this process's glibc ``malloc`` was started asking for huge pages."""
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value in ("1", "2")
    return False


def malloc_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to start again with so that ``malloc`` asks for huge pages, or None.

    None when it would change nothing or cannot work: not Linux with glibc 2.35+, huge pages
    unavailable, the tunable already set (to anything: the user's choice stands), or
    ``LLMTOOL_MALLOC_HUGE_PAGES=0``.
    """
    import platform

    env = dict(os.environ if environ is None else environ)
    if env.get("LLMTOOL_MALLOC_HUGE_PAGES", "1") == "0" or unsupported_reason() is not None:
        return None
    libc, version = platform.libc_ver()
    try:
        new_enough = libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        new_enough = False
    tunables = env.get("GLIBC_TUNABLES", "")
    if not new_enough or TUNABLE in tunables:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def restart_with_huge_page_malloc() -> None:
    """Replace this process by the same command with glibc's malloc asking for huge pages.

    Returns (doing nothing) where :func:`malloc_env` says it would change nothing or cannot
    work, or where the interpreter cannot be started again; call it before loading anything.
    """
    env = malloc_env()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # The same interpreter options and script as this run (python -m ..., a console script).
    with contextlib.suppress(OSError):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def resident_chunks() -> set[int]:
    """Start addresses of the 2 MB-aligned chunks of anonymous, writable memory fully in RAM."""
    import numpy as np

    chunks: set[int] = set()
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pm:
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            # Private anonymous memory (malloc arenas, mmap'd buffers, the brk heap) only.
            if not fields[1].startswith("rw") or fields[1][3] != "p":
                continue
            if name and name != "[heap]" and not name.startswith("[anon"):
                continue
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            lo, hi = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
            if hi - lo < HUGE or hi - lo > MAX_MAPPING:
                continue
            n = (hi - lo) // PAGE
            entries = np.frombuffer(os.pread(pm.fileno(), n * 8, lo // PAGE * 8), np.uint64)
            if entries.size != n:
                continue
            full = ((entries & np.uint64(PRESENT)) != 0).reshape(-1, PAGES_PER_HUGE).all(axis=1)
            chunks.update(lo + int(i) * HUGE for i in np.flatnonzero(full))
    return chunks


def _release_free_memory() -> None:
    """Hand memory the C allocator holds free back to the kernel (glibc ``malloc_trim``).

    Otherwise a process that freed memory earlier (an export, a PyTorch model) serves the new
    weights from pages that were already resident, and they would not count as new.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def collapse(chunks: set[int]) -> tuple[int, str | None]:
    """``MADV_COLLAPSE`` each run of adjacent chunks; returns (bytes collapsed, first error)."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, error = 0, None
    starts = sorted(chunks)
    i = 0
    while i < len(starts):
        j = i
        while j + 1 < len(starts) and starts[j + 1] == starts[j] + HUGE:
            j += 1
        size = (j - i + 1) * HUGE
        if libc.madvise(starts[i], size, MADV_COLLAPSE) == 0:
            done += size
        elif error is None:
            code = ctypes.get_errno()
            error = f"madvise(MADV_COLLAPSE): {errno.errorcode.get(code, code)}"
            if code == errno.EINVAL:  # kernel older than 6.1: no point trying the rest
                return done, error + " (Linux 6.1 or newer needed)"
        i = j + 1
    return done, error


@contextlib.contextmanager
def huge_pages_for(enabled: bool = True) -> Iterator[HugePageResult]:
    """Collapse the memory a block allocates (e.g. an inference session's weights) to huge pages.

    Args:
        enabled: False turns this into a no-op (the result says so).

    Yields:
        A :class:`HugePageResult`, filled in when the block ends.
    """
    result = HugePageResult(malloc=enabled and malloc_uses_huge_pages())
    reason = "turned off" if not enabled else unsupported_reason()
    if reason is None and result.malloc:
        reason = "malloc already asks for huge pages"
    before: set[int] | None = None
    if reason is None:
        _release_free_memory()
        try:
            before = resident_chunks()
        except OSError as e:
            reason = f"cannot read /proc/self/pagemap ({e.strerror})"
    result.reason = reason
    yield result
    if before is None:
        return
    start = time.perf_counter()
    try:
        new = resident_chunks() - before
    except OSError as e:
        result.reason = f"cannot read /proc/self/pagemap ({e.strerror})"
        return
    result.candidate_bytes = len(new) * HUGE
    result.collapsed_bytes, result.reason = collapse(new)
    result.seconds = time.perf_counter() - start
