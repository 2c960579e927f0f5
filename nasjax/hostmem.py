"""The host heap under XLA:CPU: freed pages kept for reuse, and given back on demand.

XLA:CPU allocates every execution's temporary buffer (and its outputs) with
``posix_memalign``, on one of its worker threads, and frees it when the execution ends.
With glibc's defaults that buffer is mapped fresh and unmapped again on every step:
- blocks above the mmap threshold (128 KiB, raised dynamically up to 32 MiB) come from
  ``mmap`` and are unmapped on ``free``;
- a worker thread allocates from its own arena, whose heaps hold at most 64 MiB, so a
  larger block is ``mmap``'d whatever the threshold;
- the main heap's top is trimmed (``brk``) once more than 128 KiB of it is free.
A train step then page-faults its whole working set in again, zero-filled by the kernel:
~9,000 faults (35 MiB) per tiny step and ~285,000 (1.1 GiB) per small step. The profile
showed it as matmuls running at a tenth of their standalone speed
(docs/benchmarks.md, "The host heap").

:func:`keep_freed_pages` sets, with ``mallopt``: one arena for all threads, an mmap
threshold of 2 GiB - 1 (the largest ``mallopt`` takes; larger blocks stay mapped and
return at once), and no automatic trimming. Freed buffers stay in the heap and the next
step reuses them already mapped. It runs once, when ``nasjax`` is imported (every nasjax
process runs XLA programs), unless the environment sets ``NASJAX_HOST_HEAP=system``
(glibc's defaults). The arena setting reaches only threads that allocate afterwards, so
import nasjax before jax starts its backend (the CLI does).

The cost is resident memory the heap keeps after a peak; :func:`release_free_memory`
(``malloc_trim``) returns it, and searches call it between candidates
(``search.clear_caches``, ``search.op_by_op``). Elsewhere than glibc (macOS, musl) both
are no-ops.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["ENV", "THRESHOLD_BYTES", "keep_freed_pages", "release_free_memory", "configure_from_env"]

ENV = "NASJAX_HOST_HEAP"
MODES = ("reuse", "system")
# Allocations below this come from the heap (and return to it); above it, from mmap.
# mallopt takes an int: 2 GiB - 1 is the most it can be.
THRESHOLD_BYTES = 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters

_applied: bool | None = None


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_pages(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Makes glibc keep freed blocks below ``threshold_bytes`` in one heap for reuse.

    One arena for every thread (so a worker thread's large block comes from the heap,
    not from ``mmap``), ``threshold_bytes`` as the mmap threshold, and no automatic
    trimming of the heap's top (``-1``: glibc's "never").

    Returns:
      True where glibc accepted the three settings, False elsewhere (nothing changed).
    """
    if not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes must be in (0, 2**31), got {threshold_bytes}")
    libc = _libc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, int(threshold_bytes)), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


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
