"""Safe writes and reads for JAX's persistent compilation cache.

JAX's file cache (``jax._src.lru_cache.LRUCache``), in the unbounded mode nasjax runs it
in (``compile_cache_max_mb`` prunes at start-up instead, see
:func:`nasjax.train.run.prune_compile_cache`), writes an entry in place and never
rewrites an entry that exists. Two consequences, both measured on jax 0.10.2:

* a reader in another thread or process (``engine=threads``, ``engine=processes``, two
  searches on one machine, all sharing ``~/.cache/nasjax``) can read an entry while it is
  being written, get a truncated stream, warn and compile again;
* an entry cut short for good (a process killed while writing, a full disk) stays
  truncated: every later process warns ("Error reading persistent compilation cache
  entry ... incomplete or truncated stream") and compiles that program again, forever.

:func:`install` (called by :func:`nasjax.train.run.setup_compile_cache`) changes two
methods of that class, in this process:

* ``put`` writes to a temporary file beside the entry and renames it into place
  (``os.replace``, atomic on POSIX and Windows), so a reader sees a whole entry or none;
* ``get`` checks that an entry decompresses; a damaged one is deleted, named in one
  warning, and reported as a miss, so the program is compiled once more and its entry
  written whole.

JAX's bounded mode (``jax_compilation_cache_max_size`` set, eviction under a file lock)
and caches on remote file systems (``gs://...``) are left to JAX. Where JAX's cache class
or its helpers are not found (another JAX version), nothing is changed and
:func:`install` returns False.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings

__all__ = ["install", "TEMP_SUFFIX", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

# a write in progress: ".<uuid>.nasjax-tmp" in the cache directory, renamed to its entry when whole
TEMP_SUFFIX = ".nasjax-tmp"
_LOCK = threading.Lock()
_INSTALLED = False


def _codec_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a damaged entry raises in JAX's decompression (zlib, zstandard, zstd)."""
    import zlib

    errors: list[type[BaseException]] = [zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("compression.zstd", "ZstdError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _raise_errors() -> bool:
    """JAX's ``jax_raise_persistent_cache_errors``: then JAX's own error handling stands."""
    try:
        from jax._src import config

        return bool(config.raise_persistent_cache_errors.value)
    except (ImportError, AttributeError):
        return False


def _parts():
    """(LRUCache, its entry suffix, decompress) from this JAX, or None."""
    try:
        from jax._src import compilation_cache, lru_cache
    except ImportError:
        return None
    cls = getattr(lru_cache, "LRUCache", None)
    suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
    decompress = getattr(compilation_cache, "decompress_executable", None)
    if cls is None or not isinstance(suffix, str) or decompress is None:
        return None
    if not callable(getattr(cls, "put", None)) or not callable(getattr(cls, "get", None)):
        return None
    return cls, suffix, decompress


def install() -> bool:
    """Makes this process's persistent-cache writes atomic and its reads check entries.

    Idempotent; returns whether the methods are (now) replaced."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return True
        parts = _parts()
        if parts is None:
            logger.info("nasjax.xla_cache: JAX's cache class not found; its writes stay as they are")
            return False
        cls, suffix, decompress = parts
        original_put, original_get = cls.put, cls.get
        damaged = _codec_errors()

        def entry(self, key: str) -> str:  # the file JAX keeps the entry ``key`` in
            return os.path.join(str(self.path), f"{key}{suffix}")

        def mine(self) -> bool:  # unbounded, on a local file system (gs:// etc. stay JAX's)
            return not getattr(self, "eviction_enabled", True) and "://" not in str(getattr(self, "path", "://"))

        def put(self, key: str, value: bytes) -> None:
            if not (key and mine(self)):  # JAX's locked mode, remote paths, or its own errors
                return original_put(self, key, value)
            path = entry(self, key)
            if os.path.exists(path):
                return
            # a short name: an entry's own name can be near the file system's limit
            tmp = os.path.join(str(self.path), f".{uuid.uuid4().hex}{TEMP_SUFFIX}")
            try:
                with open(tmp, "wb") as f:
                    f.write(value)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        def get(self, key: str):
            value = original_get(self, key)
            if value is None or not mine(self) or _raise_errors():
                return value
            try:
                decompress(value)
            except damaged as e:  # truncated or damaged: drop it, compile again, write it whole
                path = entry(self, key)
                try:
                    with open(path, "rb") as f:
                        now = f.read()
                except OSError:
                    return None
                if now != value:  # another process has just written it whole: take that one
                    try:
                        decompress(now)
                        return now
                    except damaged:
                        pass
                try:  # (a whole entry renamed in between these two lines is lost: one more compile)
                    os.unlink(path)
                except OSError:
                    pass
                warnings.warn(
                    f"nasjax: deleted a damaged persistent compilation cache entry {path} "
                    f"({type(e).__name__}: {e}); the program is compiled again and its entry rewritten",
                    stacklevel=2,
                )
                return None
            return value

        put.__wrapped__ = original_put  # type: ignore[attr-defined]
        get.__wrapped__ = original_get  # type: ignore[attr-defined]
        cls.put, cls.get = put, get
        _INSTALLED = True
        return True


def remove_stale_temporaries(path: str, older_than_s: float = 3600.0) -> int:
    """Deletes writes in progress left by processes that died while writing (temporary
    files older than ``older_than_s``); returns how many."""
    removed, now = 0, time.time()
    try:
        names = os.listdir(path)
    except OSError:
        return 0
    for name in names:
        if not name.endswith(TEMP_SUFFIX):
            continue
        file = os.path.join(path, name)
        try:
            if now - os.stat(file).st_mtime > older_than_s:
                os.unlink(file)
                removed += 1
        except OSError:
            continue
    return removed
