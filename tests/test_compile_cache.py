"""The persistent compilation cache: every program written by default, the directory bounded."""

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
