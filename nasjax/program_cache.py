"""A bounded, thread-safe cache of compiled programs keyed by what they compute.

``train.segmented`` (step pieces shared across candidates) and LTS's measurements
(sub-layer pieces shared across architectures) keep their compiled programs here: a miss
builds (compiles) the program and times it, a hit returns it at once, and beyond a
bound per group of keys the least recently used entries are dropped, so a long search's
memory stays bounded.

A bound on the number of programs is not a bound on their memory: on XLA:CPU a compiled
program holds at least ~170 KiB of host memory, and a search's pieces ~12-15x their
serialized size (their machine code and metadata; docs/benchmarks.md, stop 25); a
search that evolves toward larger candidates compiles larger pieces (~1.6 MiB each,
against 0.2 MiB for a one-op program). ``max_bytes`` therefore also bounds the summed
size of the entries, as ``size`` measures them (:func:`executable_bytes`: the serialized
executables), dropping the least recently used entries of any group first.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

__all__ = ["ProgramCache", "executable_bytes"]

logger = logging.getLogger(__name__)
_UNMEASURED: set[str] = set()  # the errors already reported (one warning each)


def executable_bytes(built: Any) -> int:
    """The summed serialized size of the compiled jax programs in ``built`` (a program, or
    tuples, lists and dicts holding them; other values count 0).

    The serialized executable is what XLA would write to a persistent cache: the
    program's machine code and metadata, the part of its host memory that varies from one
    program to another. A program that cannot be serialized (a backend without it)
    counts 0, so only the count bound applies to it; a warning says so once per kind of
    error. Costs ~3-5 ms for a 144 KB program (docs/benchmarks.md, stop 25).
    """
    import jax

    if isinstance(built, jax.stages.Compiled):
        try:
            return len(built.runtime_executable().serialize())
        except Exception as e:  # noqa: BLE001 - no serialization on this backend: not counted
            what = f"{type(e).__name__}: {e}"[:200]
            if what not in _UNMEASURED:
                _UNMEASURED.add(what)
                logger.warning(
                    "nasjax.program_cache: a compiled program could not be serialized to measure its size (%s); "
                    "such programs count 0 bytes, so only the count bounds limit them",
                    what,
                )
            return 0
    if isinstance(built, (tuple, list)):
        return sum(executable_bytes(x) for x in built)
    if isinstance(built, dict):
        return sum(executable_bytes(x) for x in built.values())
    return 0


class ProgramCache:
    """Programs by key, built once per key and kept up to a bound per group.

    Args:
      limits: the most entries kept per group (read at every insertion, so a caller may
        change it in place).
      group: a key's group (one of ``limits``' keys); default: everything in ``"all"``.
      max_bytes: the most bytes kept, all groups together, as ``size`` measures entries;
        None: no bound in bytes. The newest entry is kept even when it alone exceeds it.
      size: an entry's size in bytes, measured once when it is built (default
        :func:`executable_bytes`; only called when ``max_bytes`` is set).
    """

    def __init__(
        self,
        limits: dict[str, int],
        group: Callable[[Hashable], str] | None = None,
        max_bytes: int | None = None,
        size: Callable[[Any], int] | None = None,
    ):
        self.limits = limits
        self._group = group or (lambda key: "all")
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        # each group's keys, least recently used first (trimming a group is then O(dropped),
        # not a scan of every entry: a search inserts thousands)
        self._groups: dict[str, collections.OrderedDict[Hashable, None]] = {}
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self._size = size or executable_bytes
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, float]:
        """The program under ``key`` (``build()`` on a miss) and the seconds this call spent building."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._used(key)
                return hit, 0.0
        t0 = time.perf_counter()
        built = build()
        seconds = time.perf_counter() - t0
        size = max(0, int(self._size(built))) if self.max_bytes is not None else 0
        with self._lock:
            group = self._group(key)
            if key not in self._items:
                self._items[key] = built
                self._groups.setdefault(group, collections.OrderedDict())[key] = None
                self._sizes[key] = size
                self._bytes += size
            built = self._items[key]  # another thread may have built it meanwhile
            self._used(key, group)
            self._trim(group)
            self._trim_bytes()
        return built, seconds

    def _used(self, key: Hashable, group: str | None = None) -> None:
        """``key`` becomes the most recently used, overall and in its group."""
        self._items.move_to_end(key)
        self._groups[self._group(key) if group is None else group].move_to_end(key)

    def _drop(self, key: Hashable) -> None:
        del self._items[key]
        group = self._group(key)
        del self._groups[group][key]
        if not self._groups[group]:
            del self._groups[group]
        self._bytes -= self._sizes.pop(key, 0)

    def _trim(self, group: str) -> None:
        keys = self._groups.get(group)
        while keys and len(keys) > self.limits[group]:  # oldest first
            self._drop(next(iter(keys)))

    def _trim_bytes(self) -> None:
        if self.max_bytes is None:
            return
        while self._bytes > self.max_bytes and len(self._items) > 1:  # oldest first; the newest stays
            self._drop(next(iter(self._items)))

    def set_limit(self, group: str, n: int) -> None:
        """Bounds ``group`` to ``n`` entries, dropping the oldest beyond it now."""
        with self._lock:
            self.limits[group] = n
            self._trim(group)

    def set_max_bytes(self, n: int | None) -> None:
        """Bounds the summed size of the entries (None: no bound), dropping the oldest beyond
        it now. Entries built while there was no bound count 0."""
        with self._lock:
            self.max_bytes = n
            self._trim_bytes()

    def nbytes(self) -> int:
        """The summed size of the entries (those built while there was no bound in bytes count 0)."""
        with self._lock:
            return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._groups.clear()
            self._sizes.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def touch(self, key: Hashable) -> bool:
        """Whether ``key`` is held; if so it becomes the most recently used (as a hit would)."""
        with self._lock:
            if key not in self._items:
                return False
            self._used(key)
            return True

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._items))
