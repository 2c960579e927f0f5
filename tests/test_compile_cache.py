"""The persistent compilation cache: every program written by default, the directory bounded."""

import builtins
import os

import pytest


def _fill(folder, n: int, size: int = 1000) -> None:
    for i in range(n):
        path = folder / f"jit_f{i}-cache"
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # f0 least recently used


def test_prune_deletes_least_recently_used_down_to_three_quarters(tmp_path):
    from nasjax.train.run import prune_compile_cache

    _fill(tmp_path, 10)
    assert prune_compile_cache(str(tmp_path), 20_000) == 0  # under the bound: untouched
    assert len(os.listdir(tmp_path)) == 10
    assert prune_compile_cache(str(tmp_path), 8_000) == 4_000  # 10 kB > 8 kB: down to 6 kB
    assert sorted(os.listdir(tmp_path)) == [f"jit_f{i}-cache" for i in range(4, 10)]
    os.utime(tmp_path / "jit_f4-cache", (2_000_000, 2_000_000))  # f4 just read: kept, f5 goes
    assert prune_compile_cache(str(tmp_path), 5_000) == 3_000
    assert sorted(os.listdir(tmp_path)) == ["jit_f4-cache", "jit_f8-cache", "jit_f9-cache"]


def test_setup_writes_every_program_and_bounds_the_directory(tmp_path):
    import jax
    import ml_collections

    from nasjax.train.run import RunError, setup_compile_cache

    folder = tmp_path / "cache"
    folder.mkdir()
    _fill(folder, 4, size=2**20)  # 4 MiB of old entries
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        cfg = ml_collections.ConfigDict({"compile_cache_dir": str(folder), "compile_cache_max_mb": 2})
        setup_compile_cache(cfg)
        assert jax.config.jax_compilation_cache_dir == str(folder)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # default: every program
        assert sorted(os.listdir(folder)) == ["jit_f3-cache"]  # pruned to <= 1.5 MiB, newest kept
        cfg.compile_cache_min_seconds = -1.0
        with pytest.raises(RunError, match="compile_cache_min_seconds and compile_cache_max_mb must be >= 0"):
            setup_compile_cache(cfg)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_cache_entries_are_written_whole_and_damaged_ones_dropped(tmp_path, monkeypatch):
    """nasjax.xla_cache: an entry appears by one atomic rename (a reader never sees a write
    in progress), and an entry cut short is deleted and reported as a miss (JAX alone
    warned and recompiled it in every later process, never rewriting it)."""
    from jax._src import compilation_cache
    from jax._src.lru_cache import LRUCache

    from nasjax import xla_cache

    assert xla_cache.install() and xla_cache.install()  # idempotent
    cache = LRUCache(str(tmp_path), max_size=-1)
    value = compilation_cache.compress_executable(os.urandom(5000))
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        assert not os.path.exists(dst) and os.path.getsize(src) == len(value)  # whole, then visible
        renames.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cache.put("k", value)
    assert renames and renames[0].endswith(xla_cache.TEMP_SUFFIX)
    assert os.listdir(tmp_path) == ["k-cache"] and cache.get("k") == value
    cache.put("k", b"other")  # an existing entry is kept, as JAX does
    assert cache.get("k") == value
    (tmp_path / "cut-cache").write_bytes(value[: len(value) // 2])
    with pytest.warns(UserWarning, match="damaged persistent compilation cache entry"):
        assert cache.get("cut") is None
    assert not (tmp_path / "cut-cache").exists()
    cache.put("cut", value)  # compiled again: written whole
    assert cache.get("cut") == value
    # a reader that read a damaged entry just before another process renamed a whole one
    # into place takes the whole one and deletes nothing
    (tmp_path / "race-cache").write_bytes(value[:100])

    def open_after_rewrite(path, *args, **kwargs):
        with builtins.open(path, "wb") as f:
            f.write(value)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(xla_cache, "open", open_after_rewrite, raising=False)
    assert cache.get("race") == value and (tmp_path / "race-cache").read_bytes() == value


def test_stale_temporaries_are_removed_and_never_pruned_as_entries(tmp_path):
    from nasjax import xla_cache
    from nasjax.train.run import prune_compile_cache

    old, new = tmp_path / f"a-cache.1{xla_cache.TEMP_SUFFIX}", tmp_path / f"b-cache.2{xla_cache.TEMP_SUFFIX}"
    old.write_bytes(b"x" * 100)
    new.write_bytes(b"x" * 100)
    os.utime(old, (1_000_000, 1_000_000))
    assert xla_cache.remove_stale_temporaries(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == [new.name]
    assert prune_compile_cache(str(tmp_path), 10) == 0  # a write in progress is not an entry


def test_a_truncated_entry_is_rewritten_by_the_next_process(tmp_path):
    """End to end, two processes on one cache: the first writes, the entry is cut short
    (a process killed mid-write), the second drops it, compiles and writes it whole."""
    import subprocess
    import sys

    folder = tmp_path / "xla"
    script = f"""
import warnings, jax, jax.numpy as jnp, ml_collections
from nasjax.train.run import setup_compile_cache
setup_compile_cache(ml_collections.ConfigDict({{"compile_cache_dir": {str(folder)!r}, "compile_cache_max_mb": 0}}))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones((8, 8))).block_until_ready()
print("WARNINGS", [str(w.message)[:60] for w in caught])
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def run():
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [line for line in out.stdout.splitlines() if line.startswith("WARNINGS")][0]

    assert run() == "WARNINGS []"
    entry = next(p for p in folder.iterdir() if p.name.startswith("jit__lambda"))
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    assert "damaged persistent compilation cache entry" in run()
    assert entry.stat().st_size == len(whole)  # rewritten whole
    assert run() == "WARNINGS []"
