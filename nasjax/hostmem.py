"""The host heap under XLA:CPU: freed pages kept for reuse, and given back on demand.

XLA:CPU allocates every execution's temporary buffer (and its outputs) with ``malloc``
and frees it when the execution ends. glibc serves an allocation above its mmap
threshold (128 KiB, raised dynamically up to 32 MiB) with fresh ``mmap`` pages and
unmaps them on ``free``. A train step whose temporaries exceed that threshold therefore
page-faults its whole working set in again, zero-filled by the kernel, on every step.
The profile showed it as matmuls running at a tenth of their standalone speed: the
first op to write each fresh buffer pays its faults (docs/benchmarks.md, "The host heap").

:func:`keep_freed_pages` raises glibc's mmap and trim thresholds, so freed buffers stay
in the heap and the next step reuses them, already mapped. It runs once, when
``nasjax`` is imported (every nasjax process runs XLA programs), unless the environment
sets ``NASJAX_HOST_HEAP=system`` (glibc's defaults). The cost is resident memory the
heap keeps after a peak; :func:`release_free_memory` (``malloc_trim``) returns it, and
searches call it between candidates (``search.clear_caches``, ``search.op_by_op``).

Elsewhere than glibc (macOS, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["ENV", "THRESHOLD_BYTES", "keep_freed_pages", "release_free_memory", "configure_from_env"]

ENV = "NASJAX_HOST_HEAP"
MODES = ("reuse", "system")
# Allocations below this come from the heap (and return to it); above it, from mmap.
# 1 GiB: every temporary of the models here; the largest arrays (datasets) stay mapped.
THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters

_applied: bool | None = None


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_pages(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Makes glibc keep freed blocks below ``threshold_bytes`` in the heap for reuse.

    Returns:
      True where glibc accepted both settings, False elsewhere (nothing changed).
    """
    if not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes must be in (0, 2**31), got {threshold_bytes}")
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, int(threshold_bytes)) == 1


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Compiling leaves the heap fragmented: over a 120-candidate loop it kept resident
    memory ~250-280 MiB lower (``benchmarks/candidate_memory.py``, docs/benchmarks.md).
    With :func:`keep_freed_pages` in force it is also what gives back the pages a large
    program's temporaries left in the heap.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def configure_from_env() -> bool:
    """Applies ``NASJAX_HOST_HEAP`` (``reuse``, the default, or ``system``) once per process.

    Returns:
      Whether freed pages are kept for reuse.

    Raises:
      ValueError: an unknown value, naming the variable and the accepted ones.
    """
    global _applied
    mode = os.environ.get(ENV, "reuse").strip().lower() or "reuse"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}")
    if _applied is None:
        _applied = mode == "reuse" and keep_freed_pages()
    return _applied
