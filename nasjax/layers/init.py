"""Parameter initializers that give Flax's values and compile nothing per shape when run op by op.

A search initialises every candidate op by op (``search.op_by_op``): each jax op runs as
its own small program, compiled once per (op, shapes) and shared by later candidates.
Flax's ``normal`` initializer is ``random.normal(key, shape) * stddev``: for every new
parameter shape a mutation brings, jax compiles a new sampler (~0.13 s on a 2-core
CPU, threefry included) and a new multiply. These initializers compute the same values
without that:

* ``normal``: with JAX's partitionable threefry (the default), the draw of a shape is
  the row-major prefix of a longer 1-D draw from the same key, bit for bit. Run op by
  op (a concrete key), the sampler therefore draws a 1-D array of a draw class
  (:func:`draw_class`) and the host cuts, reshapes and scales it; under ``vmap`` alone
  (branched parameters) the batched sampler draws and scales the draw class in one
  program and jax cuts it; under jit (or ``eval_shape``) it is Flax's own expression,
  which XLA fuses;
* ``zeros``, ``ones``, ``constant``: filled on the host when run op by op.

The values equal ``flax.linen.initializers``' exactly (``tests/test_layers.py``); with a
non-threefry key or a non-partitionable threefry, ``normal`` falls back to the per-shape
draw.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normal", "zeros", "ones", "constant", "size_class", "draw_class"]


def size_class(n: int) -> int:
    """The smallest m * 2**e >= n with m in 4..7 (n itself below 8): at most 25% more than
    ``n`` (the flat layout's buffer sizes, :func:`nasjax.train.segmented.flat_size`)."""
    if n < 8:
        return max(n, 1)
    e = max(0, math.ceil(math.log2(n)) - 3)
    while True:
        for m in (4, 5, 6, 7, 8):
            if m * 2**e >= n:
                return m * 2**e
        e += 1


# The sampler's 1-D draw sizes up to DRAW_COARSE_MAX: 4**k, from DRAW_MIN. A sampler
# compiles in ~0.2 s on a 2-core CPU whatever its size, and draws 65,536 normals in ~0.6 ms:
# a draw class is a compile that later candidates skip, and drawing up to 4x more than a
# leaf needs costs them less than a millisecond. Above DRAW_COARSE_MAX (large models,
# few leaves) the draw is the size class, at most 25% more. A default tiny Primer search's
# leaves fell into 13 size classes and fall into 5 draw classes (docs/benchmarks.md, stop 27).
DRAW_MIN = 4096
DRAW_COARSE_MAX = 1 << 20


def draw_class(n: int) -> int:
    """The 1-D draw size of :func:`normal` for a leaf of ``n`` elements (``n`` > 0)."""
    if n > DRAW_COARSE_MAX:
        return size_class(n)
    m = DRAW_MIN
    while m < n:
        m *= 4
    return m


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def _scaled_draw(key, scale, n: int, dtype):
    """``random.normal(key, (n,), dtype) * scale`` as one program (the vmapped path: one
    compile per (branches, draw class) rather than a sampler and a product). The barrier
    keeps XLA from folding the scale into the sampler's own last product, which changes
    the rounding of some values (measured: 2 of 9 differed in the last bit)."""
    return jax.lax.optimization_barrier(jax.random.normal(key, (n,), dtype)) * scale


def _under_jit() -> bool:
    """Whether a jit (or ``eval_shape``) trace is active; True when JAX cannot tell."""
    try:
        from jax._src import core as jax_core

        return bool(jax_core.unsafe_am_i_under_a_jit())
    except Exception:  # an API this JAX lacks: take the traced, unchanged path
        return True


def _op_by_op(key, out_sharding) -> bool:
    """True when the initializer runs op by op: a concrete key, or under ``vmap`` alone
    (the branched parameters of a Primer program, ``nn.vmap``) but no jit trace."""
    if out_sharding is not None:
        return False
    return not isinstance(key, jax.core.Tracer) or not _under_jit()


def _prefix_consistent(key) -> bool:
    """Whether a draw of a shape is the prefix of a longer 1-D draw from the same key."""
    if not jax.config.jax_threefry_partitionable:
        return False
    try:
        return "threefry" in str(jax.random.key_impl(key))
    except Exception:  # a raw uint32 key: the default implementation
        return "threefry" in str(jax.config.jax_default_prng_impl)


def normal(stddev: float = 1e-2, dtype=jnp.float32):
    """``flax.linen.initializers.normal(stddev)``: the same values (module docstring)."""

    def init(key, shape, dtype=dtype, out_sharding=None):
        with jax.disable_jit(False):  # the lazy init disables jit for the forward's ops only
            return _normal(key, tuple(shape), jnp.float32 if dtype is None else dtype, out_sharding)

    def _normal(key, shape, dtype, out_sharding):
        n = math.prod(shape)
        if n and _op_by_op(key, out_sharding) and _prefix_consistent(key):
            if not isinstance(key, jax.core.Tracer):
                draw = np.asarray(jax.random.normal(key, (draw_class(n),), dtype))
                return jnp.asarray(draw[:n].reshape(shape) * np.asarray(stddev, dtype))
            # vmapped (branched parameters): the batched sampler and the scaling per draw
            # class, then per-shape slicing (the same values: each key's draw is a prefix,
            # and scaling is elementwise, so scaling before the cut changes no bit)
            draw = _scaled_draw(key, jnp.array(stddev, dtype), n=draw_class(n), dtype=jnp.dtype(dtype))
            return draw[:n].reshape(shape)
        return jax.random.normal(key, shape, dtype, out_sharding=out_sharding) * jnp.array(stddev, dtype)

    return init


def constant(value, dtype=jnp.float32):
    """``flax.linen.initializers.constant(value)``: filled on the host when run op by op."""

    def init(key, shape, dtype=dtype, out_sharding=None):
        dtype = jnp.float32 if dtype is None else dtype
        if _op_by_op(key, out_sharding):
            return jnp.asarray(np.full(tuple(shape), value, dtype))
        return jnp.full(shape, value, dtype, device=out_sharding)

    return init


zeros = constant(0.0)
ones = constant(1.0)
