"""A bounded, thread-safe cache of compiled programs keyed by what they compute.

``train.segmented`` (step pieces shared across candidates) and LTS's measurements
(sub-layer pieces shared across architectures) keep their compiled programs here: a miss
builds (compiles) the program and times it, a hit returns it at once, and beyond a
bound per group of keys the least recently used entries are dropped, so a long search's
memory stays bounded.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

__all__ = ["ProgramCache"]


class ProgramCache:
    """Programs by key, built once per key and kept up to a bound per group.

    Args:
      limits: the most entries kept per group (read at every insertion, so a caller may
        change it in place).
      group: a key's group (one of ``limits``' keys); default: everything in ``"all"``.
    """

    def __init__(self, limits: dict[str, int], group: Callable[[Hashable], str] | None = None):
        self.limits = limits
        self._group = group or (lambda key: "all")
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, float]:
        """The program under ``key`` (``build()`` on a miss) and the seconds this call spent building."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit, 0.0
        t0 = time.perf_counter()
        built = build()
        seconds = time.perf_counter() - t0
        with self._lock:
            built = self._items.setdefault(key, built)  # another thread may have built it meanwhile
            self._items.move_to_end(key)
            self._trim(self._group(key))
        return built, seconds

    def _trim(self, group: str) -> None:
        keys = [k for k in self._items if self._group(k) == group]
        for k in keys[: max(0, len(keys) - self.limits[group])]:  # oldest first
            del self._items[k]

    def set_limit(self, group: str, n: int) -> None:
        """Bounds ``group`` to ``n`` entries, dropping the oldest beyond it now."""
        with self._lock:
            self.limits[group] = n
            self._trim(group)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._items))
