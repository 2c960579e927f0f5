"""Token, position and token-type embeddings; T5 relative bias; rotary positions.

Legend: B batch, L length, D model width, H heads, K head dim, V vocabulary,
N relative-position buckets.

Position schemes (``ModelSpec.positions``):
  * ``learned``: a trainable [max_len, D] table added to the token embeddings.
  * ``sinusoidal``: the fixed T2T timing signal (sin on the first half of D, cos
    on the second) added to the token embeddings.
  * ``relative``: T5's bucketed relative attention bias (:class:`RelativePositionBias`),
    one table shared by all layers, added to the attention logits.
  * ``rotary``: RoPE applied to q and k inside attention (:func:`apply_rotary`).
  * ``none``: nothing (e.g. a causal conv stack that infers position itself).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from nasjax.layers import init as initializers
from nasjax.layers.norms import make_norm

__all__ = [
    "sinusoidal_positions",
    "relative_position_bucket",
    "RelativePositionBias",
    "apply_rotary",
    "Embeddings",
]


def sinusoidal_positions(length: int, d_model: int, min_timescale: float = 1.0, max_timescale: float = 1e4):
    """T2T ``get_timing_signal_1d``: [L, D] float32, concat(sin, cos) (zero-padded if D is odd)."""
    n_timescales = d_model // 2
    log_increment = math.log(max_timescale / min_timescale) / max(n_timescales - 1, 1)
    inv_timescales = min_timescale * np.exp(np.arange(n_timescales, dtype=np.float64) * -log_increment)
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    signal = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)
    signal = np.pad(signal, ((0, 0), (0, d_model % 2)))
    return jnp.asarray(signal, dtype=jnp.float32)


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """T5's bucketing of ``memory_position - query_position`` into [0, num_buckets).

    Small distances get their own bucket, larger ones share logarithmically wider
    buckets up to ``max_distance``. Bidirectional (encoders) spends half of the
    buckets on each direction; unidirectional (decoders) maps every future offset to
    bucket 0, which the causal mask hides anyway. Computed in NumPy at trace time
    because lengths are static, so the bucket map is a compile-time constant.
    """
    ret = np.zeros_like(relative_position, dtype=np.int32)
    n = -np.asarray(relative_position)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        val_if_large = max_exact + (
            np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large).astype(np.int32)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias: a [N, H] table gathered into [1, H, Lq, Lk] logits.

    Attributes:
      n_heads: columns of the table (the most heads of any layer; a layer with fewer
        heads slices the first columns).
      num_buckets / max_distance: bucketing, see :func:`relative_position_bucket`.
      bidirectional: True for encoders.
      init_std: N(0, init_std) initialiser of the table.
    """

    n_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    init_std: float = 0.02

    @nn.compact
    def __call__(self, q_len: int, k_len: int) -> jnp.ndarray:
        table_NxH = self.param(
            "embedding",
            nn.with_logical_partitioning(initializers.normal(self.init_std), (None, "heads")),
            (self.num_buckets, self.n_heads),
            jnp.float32,
        )
        rel_LxL = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        buckets_LxL = relative_position_bucket(rel_LxL, self.bidirectional, self.num_buckets, self.max_distance)
        bias_LxLxH = jnp.take(table_NxH, jnp.asarray(buckets_LxL), axis=0)
        return jnp.transpose(bias_LxLxH, (2, 0, 1))[None]


def apply_rotary(x_BxLxHxK: jnp.ndarray, positions_L: jnp.ndarray | None = None, max_wavelength: float = 1e4):
    """Rotary position embedding (rotate-half convention of GPT-NeoX / LLaMA).

    Channel i pairs with channel i + K/2 and the pair is rotated by angle
    ``position * max_wavelength^(-2i/K)``. K must be even. Computed in float32.
    """
    length, head_dim = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    half = head_dim // 2
    if positions_L is None:
        positions_L = jnp.arange(length)
    inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_LxK2 = positions_L.astype(jnp.float32)[:, None] * inv_freq[None, :]
    sin = jnp.sin(angles_LxK2)[None, :, None, :]
    cos = jnp.cos(angles_LxK2)[None, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Embeddings(nn.Module):
    """Token (+ absolute position) (+ token type) embeddings, optional norm.

    Parameter paths: ``token_embed/embedding`` [V, D], ``position_embed/embedding``
    [max_len, D] (learned positions), ``type_embed/embedding`` [T, D],
    ``norm/{scale,bias}``.

    Attributes:
      vocab_size, d_model, max_len: table sizes.
      positions: the model's position scheme; only ``learned`` and ``sinusoidal`` add
        anything here.
      type_vocab_size: token-type vocabulary; 0 for none.
      norm_kind: norm kind applied to the summed embeddings (BERT), or None.
      norm_eps: its epsilon.
      init_std: N(0, init_std) initialiser of every table.
      dtype: activation dtype (None: float32).
    """

    vocab_size: int
    d_model: int
    max_len: int = 512
    positions: str = "learned"
    type_vocab_size: int = 0
    norm_kind: str | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = None

    def setup(self):
        init = initializers.normal(self.init_std)
        embed = lambda n, axes: nn.Embed(
            n,
            self.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(init, axes),
        )
        self.token_embed = embed(self.vocab_size, ("vocab", "embed"))
        if self.positions == "learned":
            self.position_embed = embed(self.max_len, (None, "embed"))
        if self.type_vocab_size > 0:
            self.type_embed = embed(self.type_vocab_size, (None, "embed"))
        if self.norm_kind is not None:
            self.norm = make_norm(self.norm_kind, self.norm_eps, dtype=self.dtype)

    def __call__(self, tokens_BxL: jnp.ndarray, segment_ids_BxL: jnp.ndarray | None = None) -> jnp.ndarray:
        """Args: int tokens_BxL, optional int segment_ids_BxL. Returns: x_BxLxD."""
        length = tokens_BxL.shape[1]
        x_BxLxD = self.token_embed(tokens_BxL)
        if self.positions == "learned":
            if length > self.max_len:
                raise ValueError(f"sequence length {length} exceeds max_len={self.max_len} of the position table")
            x_BxLxD = x_BxLxD + self.position_embed(jnp.arange(length))[None]
        elif self.positions == "sinusoidal":
            x_BxLxD = x_BxLxD + sinusoidal_positions(length, self.d_model).astype(x_BxLxD.dtype)[None]
        if self.type_vocab_size > 0:
            if segment_ids_BxL is None:
                segment_ids_BxL = jnp.zeros_like(tokens_BxL)
            x_BxLxD = x_BxLxD + self.type_embed(segment_ids_BxL)
        if self.norm_kind is not None:
            x_BxLxD = self.norm(x_BxLxD)
        return x_BxLxD

    def attend(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        """Tied output projection: x @ token_embed^T -> [B, L, V]."""
        return self.token_embed.attend(x_BxLxD)
