"""The compiled-program registry: bounds by count per group and by bytes overall."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import pytest

from nasjax.program_cache import ProgramCache, executable_bytes


def _cache(max_bytes=None, limits=None):
    sizes = {}
    cache = ProgramCache(limits or {"a": 100, "b": 100}, group=lambda k: k[0], max_bytes=max_bytes, size=sizes.get)
    return cache, sizes


def _put(cache, sizes, key, size):
    value = f"program {key}"
    sizes[value] = size
    got, seconds = cache.get(key, lambda: value)
    assert got == value
    return seconds


def test_byte_bound_drops_least_recently_used_of_any_group():
    cache, sizes = _cache(max_bytes=10)
    _put(cache, sizes, ("a", 1), 4)
    _put(cache, sizes, ("b", 1), 4)
    assert cache.nbytes() == 8
    assert cache.get(("a", 1), lambda: pytest.fail("a hit builds nothing")) == ("program ('a', 1)", 0.0)
    _put(cache, sizes, ("a", 2), 4)  # 12 > 10: the least recently used, ("b", 1), goes
    assert list(cache) == [("a", 1), ("a", 2)]
    assert cache.nbytes() == 8
    _put(cache, sizes, ("b", 2), 30)  # alone over the bound: kept, everything older dropped
    assert list(cache) == [("b", 2)]
    assert cache.nbytes() == 30
    cache.clear()
    assert len(cache) == 0 and cache.nbytes() == 0


def test_count_bounds_hold_beside_the_byte_bound_and_sizes_leave_with_entries():
    cache, sizes = _cache(max_bytes=1000, limits={"a": 2, "b": 5})
    for i in range(4):
        _put(cache, sizes, ("a", i), 10 + i)
    assert list(cache) == [("a", 2), ("a", 3)]
    assert cache.nbytes() == 12 + 13
    cache.set_max_bytes(20)  # tightened: the oldest goes now
    assert list(cache) == [("a", 3)] and cache.nbytes() == 13
    cache.set_max_bytes(None)  # no bound: nothing is measured any more
    _put(cache, sizes, ("b", 0), 500)
    assert cache.nbytes() == 13


def test_count_bound_drops_each_groups_least_recently_used_and_hits_and_touches_renew():
    cache, sizes = _cache(limits={"a": 2, "b": 2})
    for key in (("a", 1), ("b", 1), ("a", 2), ("b", 2)):
        _put(cache, sizes, key, 1)
    cache.get(("a", 1), lambda: pytest.fail("a hit builds nothing"))  # ("a", 2) is now a's oldest
    assert cache.touch(("b", 1))  # ("b", 2) is now b's oldest
    _put(cache, sizes, ("a", 3), 1)
    _put(cache, sizes, ("b", 3), 1)
    assert list(cache) == [("a", 1), ("b", 1), ("a", 3), ("b", 3)]
    cache.set_limit("a", 1)
    assert list(cache) == [("b", 1), ("a", 3), ("b", 3)]
    cache.clear()
    _put(cache, sizes, ("a", 4), 1)  # a cleared registry starts its groups afresh
    assert list(cache) == [("a", 4)]


def test_without_a_byte_bound_nothing_is_measured():
    calls = []
    cache = ProgramCache({"all": 3}, size=lambda built: calls.append(built) or 1)
    cache.get("k", lambda: "v")
    assert calls == [] and cache.nbytes() == 0


def test_a_key_built_by_two_threads_is_counted_once():
    cache, sizes = _cache(max_bytes=100)
    sizes["program x"] = 7
    gate = threading.Barrier(2, timeout=60)

    def build():
        gate.wait()
        return "program x"

    threads = [threading.Thread(target=cache.get, args=(("a", "x"), build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(cache) == [("a", "x")] and cache.nbytes() == 7


def test_executable_bytes_measures_compiled_programs():
    small = jax.jit(lambda x: x + 1.0).lower(jnp.ones((4,))).compile()

    def bigger_fn(w, x):
        for i in range(4):
            x = jnp.tanh(x @ w) * (i + 1.0)
        return jnp.sum(x)

    bigger = jax.jit(jax.grad(bigger_fn)).lower(jnp.ones((32, 32)), jnp.ones((8, 32))).compile()
    one, other = executable_bytes(small), executable_bytes(bigger)
    assert 0 < one < other
    assert executable_bytes((small, {"b": bigger, "info": "not a program"}, [small])) == 2 * one + other
    assert executable_bytes("not a program") == 0 and executable_bytes(None) == 0
