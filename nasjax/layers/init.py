"""Parameter initializers that give Flax's values and compile nothing per shape when run op by op.

A search initialises every candidate op by op (``search.op_by_op``): each jax op runs as
its own small program, compiled once per (op, shapes) and shared by later candidates.
Flax's ``normal`` initializer is ``random.normal(key, shape) * stddev``: for every new
parameter shape a mutation brings, jax compiles a new sampler (~0.13 s on a 2-core
CPU, threefry included) and a new multiply. These initializers compute the same values
without that:

* ``normal``: with JAX's partitionable threefry (the default), the draw of a shape is
  the row-major prefix of a longer 1-D draw from the same key, bit for bit. Run op by
  op (a concrete key), the sampler therefore draws and scales a 1-D array of a draw
  class (:func:`draw_class`) and the host cuts and reshapes it; under jit (or
  ``eval_shape``) it is Flax's own expression, which XLA fuses;
* ``zeros``, ``ones``, ``constant``: filled on the host when run op by op.

Under ``vmap`` without jit (the branched parameters of a Primer program, ``nn.vmap``
over concrete keys), jax would run the cut, the reshape and the broadcast of a constant
as per-shape programs of the batched values: 13 of the 50 init programs a default
search compiled after its first candidate (docs/benchmarks.md, stop 28). There the
initializer is a :func:`jax.custom_batching.custom_vmap` function whose rule receives the
batched keys themselves, concrete, and computes the batched leaf as above: one sampler
program per (key batch shape, draw class), the cut and the fill on the host. Nested
vmaps are taken one level further out each (:func:`_host_batched`).

The values equal ``flax.linen.initializers``' exactly (``tests/test_layers.py``); with a
non-threefry key or a non-partitionable threefry, ``normal`` falls back to the per-shape
draw.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normal", "zeros", "ones", "constant", "size_class", "draw_class", "clear_draw_programs"]


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
def _scaled_draw(keys, scale, n: int, dtype):
    """``random.normal(key, (n,), dtype) * scale`` for every key of a key array of any
    shape B (a single key: B = ()), as one program with output B + (n,): one compile per
    (key batch shape, draw class) rather than a sampler and a product. The barrier keeps XLA
    from folding the scale into the sampler's own last product, which changes the
    rounding of some values (measured: 2 of 9 differed in the last bit)."""
    flat = keys.reshape(-1)
    draws = jax.vmap(lambda k: jax.lax.optimization_barrier(jax.random.normal(k, (n,), dtype)))(flat)
    return (draws * scale).reshape(keys.shape + (n,))


# The compiled samplers of :func:`_fill_on_host`, by (key batch shape, key type, draw size,
# dtype, the keys' sharding): a few per process (branch counts x draw classes). They outlive
# ``jax.clear_caches()`` (so ``search.op_by_op_clear_every`` keeps them); ``search.clear_caches``
# drops them with the segmented pieces (:func:`clear_draw_programs`).
_DRAW_PROGRAMS_MAX = 64


@functools.lru_cache(maxsize=_DRAW_PROGRAMS_MAX)
def _draw_program(shape: tuple, key_dtype, n: int, dtype, sharding):
    """:func:`_scaled_draw` compiled for keys of ``shape`` with the XLA options that
    ``train.segmented_xla_options=auto`` gives the platform (:mod:`nasjax.xla_options`; on CPU
    XLA's earlier kernel emitters, where this XLA takes them).

    The draw's values are the same bits either way (``tests/test_layers.py`` compares them
    with Flax's, which jax compiles with XLA's defaults), and its compile is ~25% shorter
    on CPU: 0.10-0.14 against 0.08-0.10 s per sampler (docs/benchmarks.md, stop 31). A
    search compiles a sampler per (branch count, draw class), 8 in its first 47 candidates.
    The init is not a trainer's, so ``train.segmented_xla_options`` does not reach it: a
    setting other than ``auto`` leaves the samplers as they are.
    """
    from nasjax import xla_options

    platform = next(iter(sharding.device_set)).platform if sharding is not None else jax.devices()[0].platform
    options = xla_options.auto(platform)  # XLA's defaults where it refuses them (the same values)
    keys = jax.ShapeDtypeStruct(shape, key_dtype, sharding=sharding)
    lowered = _scaled_draw.lower(keys, jax.ShapeDtypeStruct((), dtype), n=n, dtype=dtype)
    return lowered.compile(dict(options)) if options else lowered.compile()


def clear_draw_programs() -> None:
    """Drops the compiled samplers (:func:`_draw_program`)."""
    _draw_program.cache_clear()


def _draw(keys, scale, n: int, dtype) -> np.ndarray:
    """``_scaled_draw(keys, scale, n, dtype)`` through :func:`_draw_program`, on the host."""
    dtype = jnp.dtype(dtype)
    sharding = getattr(keys, "sharding", None)
    program = _draw_program(tuple(keys.shape), keys.dtype, n, dtype, sharding)
    return np.asarray(program(keys, np.asarray(scale, dtype)))


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


def _vmap_depth(key) -> int | None:
    """How many vmaps batch ``key`` when under them is a concrete typed key array (0:
    the key is concrete); None for any other tracer (jit, grad), a batch tracer whose
    value the vmap does not batch (``batch_dim`` None: jax would evaluate the
    custom_vmap function's body instead of its rule), a raw ``uint32`` key under vmap, or
    a JAX whose batch tracers this does not know."""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - another JAX layout
        return None if isinstance(key, jax.core.Tracer) else 0
    depth = 0
    while isinstance(key, BatchTracer):
        if getattr(key, "batch_dim", None) is None:  # a value the vmap does not batch: no rule would run
            return None
        key, depth = getattr(key, "val", None), depth + 1
    if key is None or isinstance(key, jax.core.Tracer):
        return None
    if depth == 0:
        return 0
    return depth if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else None


# The batched functions of :func:`_host_batched`, by (leaf, shape, dtype): a handful per
# search (parameter shapes); bounded all the same.
@functools.lru_cache(maxsize=4096)
def _batched_leaf(leaf: tuple, shape: tuple, dtype) -> jax.custom_batching.custom_vmap:
    """The initializer's leaf as a function of a key array of any shape B (output B +
    ``shape``), whose vmap rule computes the batched leaf from concrete keys
    (:func:`_fill_on_host`), or, when the keys are batched once more (nested vmaps),
    calls itself again, one trace further out."""

    @jax.custom_batching.custom_vmap
    def leaf_of(key):
        # Traced by custom_vmap only for the output's type: this function is called only
        # with a key that a vmap batches (:func:`_vmap_depth`), so the rule below gives
        # its values.
        return jnp.zeros(key.shape + shape, dtype)

    @leaf_of.def_vmap
    def rule(axis_size, in_batched, key):
        del axis_size, in_batched
        if isinstance(key, jax.core.Tracer):  # batched by an outer vmap too
            return leaf_of(key), True
        return jax.device_put(_fill_on_host(key, leaf, shape, dtype)), True

    return leaf_of


def _fill_on_host(keys, leaf: tuple, shape: tuple, dtype) -> np.ndarray:
    """The leaves of a concrete key array of any shape B (a single key: B = ()), as one
    array of shape B + shape:
    ``("normal", stddev)`` draws one draw class per key in one program and cuts it on the
    host; ``("constant", value)`` is filled on the host."""
    batch = tuple(keys.shape)
    if leaf[0] == "constant":
        return np.full(batch + shape, leaf[1], dtype)
    n = math.prod(shape)
    draws = _draw(keys, leaf[1], draw_class(n), dtype)
    return draws[..., :n].reshape(batch + shape)


# False once the batched host path has failed in this process (a JAX whose custom_vmap or
# batch tracers differ): the initializers then take Flax's per-shape path, same values.
_HOST_BATCHED_OK = [True]


def _host_batched(key, kind: str, value, shape: tuple, dtype):
    """The leaf for ``key``, batched by one or more vmaps over concrete keys; None (the
    caller takes Flax's path) when this path is off or fails. The cache key holds the
    value's bytes too (``0.0 == -0.0`` as Python floats, and NaN != NaN)."""
    if not _HOST_BATCHED_OK[0]:
        return None
    dtype = jnp.dtype(dtype)
    exact = np.asarray(value, dtype)
    leaf = (kind, exact.item(), exact.tobytes())
    try:
        return _batched_leaf(leaf, tuple(int(d) for d in shape), dtype)(key)
    except Exception as e:  # noqa: BLE001 - any failure here has Flax's path as its fallback
        _HOST_BATCHED_OK[0] = False
        warnings.warn(
            f"nasjax.layers.init: the batched host initializer failed ({type(e).__name__}: {e}); "
            "Flax's per-shape path is used from now on in this process (same values, more compiled programs)",
            stacklevel=3,
        )
        return None


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
            depth = _vmap_depth(key) if jnp.ndim(key) == 0 else None  # a key array: flax's error
            if depth == 0:
                return jax.device_put(_fill_on_host(key, ("normal", stddev), shape, dtype))
            if depth is not None:
                # vmapped (branched parameters): the batched sampler and the scaling per
                # draw class, the cut on the host (the same values: each key's draw is a
                # prefix, and scaling is elementwise, so scaling before the cut changes no bit)
                out = _host_batched(key, "normal", stddev, shape, dtype)
                if out is not None:
                    return out
        return jax.random.normal(key, shape, dtype, out_sharding=out_sharding) * jnp.array(stddev, dtype)

    return init


def constant(value, dtype=jnp.float32):
    """``flax.linen.initializers.constant(value)``: filled on the host when run op by op."""

    def init(key, shape, dtype=dtype, out_sharding=None):
        dtype = jnp.float32 if dtype is None else dtype
        if _op_by_op(key, out_sharding):
            if jnp.ndim(key) == 0 and _vmap_depth(key):  # vmapped: filled batched on the host
                out = _host_batched(key, "constant", value, shape, dtype)
                if out is not None:
                    return out
            return jax.device_put(np.full(tuple(shape), value, dtype))
        return jnp.full(shape, value, dtype, device=out_sharding)

    return init


zeros = constant(0.0)
ones = constant(1.0)
