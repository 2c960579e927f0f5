"""Parameter counts of a spec, from ``jax.eval_shape`` (no compile, no allocation).

Convention (LTS's ``non_embedding``): *embedding* parameters are everything under the
top-level ``embed`` module (token, position and type tables and the embedding norm)
plus an untied ``lm_head``; everything else (layers, the shared relative-position
bias, final norm, MLM transform and output bias, pooler, classifier) is
*non-embedding*.

The analytic GPT-2 formulas reproduce ``archai``'s
``analytical_params_formulae.py`` so that LTS constraints (P_low <= P(a) <= P_high)
can be checked without building a model; a test asserts they equal the counted
non-embedding parameters of heterogeneous GPT-2 specs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from nasjax.program_cache import ProgramCache
from nasjax.spec import ModelSpec

__all__ = [
    "EMBEDDING_MODULES",
    "abstract_boxed_params",
    "param_tree_shapes",
    "count_params",
    "module_param_counts",
    "layer_param_counts",
    "gpt2_layer_params",
    "gpt2_non_embedding_params",
]

EMBEDDING_MODULES = ("embed", "lm_head")


# Parameter shapes of model pieces (embedding, attention / FFN sub-layers, head), by what
# the piece computes: a search's architectures share most of their pieces, so a new one
# traces only its new pieces' inits (LTS: ~0.1 s of tracing per architecture otherwise).
# Keyed by a digest of the piece's key (:func:`_digest`), not the key itself: a Primer
# layer's key holds its whole program (~100 Python objects), which 4,096 entries kept
# alive. 1,024 entries hold far more than a search reuses (LTS's default space compiles ~100
# sub-layer pieces; a Primer candidate adds at most one layer piece, which all its layers
# share, to the embedding and final norm it shares with every other candidate).
_PIECE_SHAPES = ProgramCache({"all": 1024})


def _digest(key: tuple) -> bytes | tuple:
    """A 32-byte digest of a piece's key, from its pickle: unequal keys pickle differently,
    so they never share an entry (equal keys that pickle differently, such as equal sets in
    another order, only miss). A key that cannot be pickled is used as it is."""
    try:
        return hashlib.blake2b(pickle.dumps(key, protocol=pickle.HIGHEST_PROTOCOL), digest_size=32).digest()
    except (pickle.PicklingError, TypeError, AttributeError):
        return key


def _flat_piece_leaves(init) -> tuple:
    """A piece's abstract parameters as (path, leaf) pairs, each leaf as ``Module.init``
    boxes it (``nn.Partitioned`` around a ShapeDtypeStruct, or a bare one)."""
    boxed = jax.eval_shape(init, jax.random.key(0))
    return tuple(traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata)).items())


def _piece_leaves(spec: ModelSpec, length: int) -> dict | None:
    """``spec``'s flat abstract (boxed) parameters assembled piece by piece (None where the
    model cannot be cut into pieces: :meth:`Segments.unsupported`)."""
    from nasjax.models.transformer import Segments

    plain = spec.replace(dropout_rate=0.0, attention_dropout_rate=0.0)  # dropout holds no parameters
    if Segments.unsupported(plain):
        return None
    flat = {}
    for key, path, init in Segments(plain).param_pieces(length):
        leaves, _ = _PIECE_SHAPES.get(_digest(key), lambda init=init: _flat_piece_leaves(init))
        for p, leaf in leaves:
            flat[path + p] = leaf
    return flat


def _piece_shapes(spec: ModelSpec, length: int):
    """The flat shapes of ``spec``'s parameters assembled piece by piece (None where the
    model cannot be cut into pieces)."""
    flat = _piece_leaves(spec, length)
    if flat is None:
        return None
    return tuple(sorted((path, tuple(nn.unbox(leaf).shape)) for path, leaf in flat.items()))


def abstract_boxed_params(spec: ModelSpec, length: int) -> dict | None:
    """``jax.eval_shape`` of ``build(spec).init(...)["params"]`` on a ``length``-token
    input (boxed, float32), assembled from the per-piece cache without tracing the whole
    model; None where the model cannot be cut into pieces. Tested equal to the
    whole-model trace (tests/test_measure.py)."""
    flat = _piece_leaves(spec, length)
    return None if flat is None else traverse_util.unflatten_dict(flat)


# Each entry holds a spec (a Primer spec: its Program), so the bound is also one on the
# genomes kept alive; it stays above an LTS population (100, asked twice in order: the
# pieces compiled ahead, then the measurements), which a smaller LRU would miss every time.
@functools.lru_cache(maxsize=256)
def _flat_shapes(spec: ModelSpec) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    from nasjax.models.transformer import build  # local: models imports measure-free layers only

    # At the model's length: a Primer program's parameter shapes can depend on it (a
    # state of width L after T_MAT_MUL, then a CONV_1X1 of it has an L x W kernel).
    length = spec.max_len
    pieces = _piece_shapes(spec, length)
    if pieces is not None:
        return pieces
    model = build(spec)

    def init():
        tokens = jnp.zeros((1, length), jnp.int32)
        return model.init({"params": jax.random.key(0)}, tokens)["params"]

    abstract = nn.unbox(jax.eval_shape(init))
    flat = traverse_util.flatten_dict(abstract)
    return tuple(sorted((path, tuple(leaf.shape)) for path, leaf in flat.items()))


def param_tree_shapes(spec: ModelSpec) -> dict:
    """Nested dict of parameter shapes (tuples), exactly as ``build(spec).init`` makes them."""
    return traverse_util.unflatten_dict(dict(_flat_shapes(spec)))


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def module_param_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters per top-level module (``embed``, ``decoder``/``encoder``, ``pooler``, ...)."""
    counts: dict[str, int] = {}
    for path, shape in _flat_shapes(spec):
        counts[path[0]] = counts.get(path[0], 0) + _size(shape)
    return counts


def count_params(spec: ModelSpec) -> dict[str, int]:
    """Returns ``{"total", "embedding", "non_embedding"}`` parameter counts of ``spec``."""
    by_module = module_param_counts(spec)
    total = sum(by_module.values())
    embedding = sum(n for name, n in by_module.items() if name in EMBEDDING_MODULES)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def layer_param_counts(spec: ModelSpec) -> list[int]:
    """Parameters of each layer ``{kind}/layer_{i}`` (mixer, FFN and their norms)."""
    counts = [0] * spec.n_layers
    for path, shape in _flat_shapes(spec):
        if path[0] == spec.kind and path[1].startswith("layer_"):
            counts[int(path[1].removeprefix("layer_"))] += _size(shape)
    return counts


def gpt2_layer_params(d_model: int, n_head: int, d_inner: int, d_head: int | None = None) -> int:
    """Analytic parameters of one GPT-2 layer (archai's formula).

    3·d·(h·k) + 3·h·k (Q, K, V with bias) + h·k·d + d (output projection) +
    2·d·f + f + d (FFN) + 4·d (two LayerNorms).
    """
    d_head = d_head or d_model // n_head
    hk = n_head * d_head
    attn = 3 * d_model * hk + 3 * hk + hk * d_model + d_model
    ffn = 2 * d_model * d_inner + d_inner + d_model
    return attn + ffn + 4 * d_model


def gpt2_non_embedding_params(
    d_model: int, n_heads: Sequence[int], d_inners: Sequence[int], d_head: int | None = None
) -> int:
    """Sum of :func:`gpt2_layer_params` over layers plus the final LayerNorm (2·d)."""
    if len(n_heads) != len(d_inners):
        raise ValueError(f"n_heads has {len(n_heads)} layers but d_inners has {len(d_inners)}")
    layers = sum(gpt2_layer_params(d_model, h, f, d_head) for h, f in zip(n_heads, d_inners))
    return layers + 2 * d_model
