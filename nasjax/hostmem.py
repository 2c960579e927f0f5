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

:func:`keep_freed_pages` raises glibc's mmap and trim thresholds (1 GiB), so freed
buffers stay in the heap and the next step reuses them already mapped. That covers
blocks allocated from the main arena. With ``one_arena=True`` it also puts every thread
on the main arena, with an mmap threshold of 2 GiB - 1 (the most ``mallopt`` takes) and
no automatic trimming, so a worker thread's large temporaries stay mapped too. One
arena makes threads share one malloc lock: compile-bound work (a tiny Primer search,
whose compiles run LLVM on several threads) lost ~15% candidates per hour with it, while
step-bound training of the small models gained ~22% tokens per second.

``NASJAX_HOST_HEAP`` chooses, read when ``nasjax`` is imported (every nasjax process
runs XLA programs):
- ``auto`` (the default): ``reuse`` at import; step-bound entry points (``nasjax
  train``, ``nasjax finetune``, the train-step benchmarks) call :func:`for_training`,
  which moves to ``one_arena``;
- ``reuse``: thresholds only, everywhere;
- ``one_arena``: thresholds and one arena, everywhere;
- ``system``: glibc's defaults.
The arena setting reaches only threads that allocate afterwards, so it must come before
jax starts its backend (the CLI applies it first thing).

The cost is resident memory the heap keeps after a peak; :func:`release_free_memory`
(``malloc_trim``) returns it, and searches call it between candidates
(``search.clear_caches``, ``search.op_by_op``). Elsewhere than glibc (macOS, musl) both
are no-ops.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "ENV",
    "MODES",
    "keep_freed_pages",
    "release_free_memory",
    "resident_mib",
    "configure_from_env",
    "for_training",
]

ENV = "NASJAX_HOST_HEAP"
MODES = ("auto", "reuse", "one_arena", "system")
# Allocations below this come from the heap (and return to it); above it, from mmap.
THRESHOLD_BYTES = 1 << 30
# With one arena: mallopt takes an int, so 2 GiB - 1 is the most it can be.
ONE_ARENA_THRESHOLD_BYTES = 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters

_active = "system"


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_pages(one_arena: bool = False) -> bool:
    """Makes glibc keep freed blocks in the heap for the next execution to reuse.

    Args:
      one_arena: also put every thread on the main arena (so a worker thread's block
        larger than a thread arena's 64 MiB heap comes from the heap, not from ``mmap``),
        with a 2 GiB - 1 mmap threshold and no automatic trimming (``-1``: "never").

    Returns:
      True where glibc accepted every setting, False elsewhere (nothing changed).
    """
    libc = _libc()
    if libc is None:
        return False
    if one_arena:
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, ONE_ARENA_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, -1))
    else:
        settings = ((_M_MMAP_THRESHOLD, THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
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


def resident_mib() -> float:
    """This process's resident memory (VmRSS) in MiB; 0.0 where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _apply(mode: str) -> str:
    global _active
    if mode != "system" and keep_freed_pages(one_arena=mode == "one_arena"):
        _active = mode
    return _active


def configure_from_env() -> str:
    """Applies ``NASJAX_HOST_HEAP`` at import (``auto`` and ``reuse``: thresholds only).

    Returns:
      The heap setting in force: ``reuse``, ``one_arena`` or ``system``.

    Raises:
      ValueError: an unknown value, naming the variable and the accepted ones.
    """
    mode = _mode()
    return _apply("reuse" if mode == "auto" else mode)


def for_training() -> str:
    """Moves to ``one_arena`` under ``auto``, for step-bound work; call before jax starts.

    Returns:
      The heap setting in force afterwards.
    """
    mode = _mode()
    return _apply("one_arena" if mode == "auto" else mode)
