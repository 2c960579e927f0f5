"""Multi-head attention: softmax, MDHA, Primer shared-QK, and the AutoBERT-Zero graphs.

Legend: B batch, L length (Lq queries, Lk keys), D model width, H heads, K head dim.

One module, :class:`MultiHeadAttention`, is driven by an
:class:`~nasjax.spec.AttentionSpec`:

* ``variant="softmax"``: softmax(Q K^T / sqrt(K)) V, the standard head.
* ``dconv_kernel > 0``: Multi-DConv-Head Attention (Primer): a causal depthwise conv
  (:class:`~nasjax.layers.dconv.CausalDepthwiseConv`) after each of the Q, K and V
  projections.
* ``shared_qk``: Primer's shared representation: K = dconv(X W_qk) and Q = K W_solo,
  W_solo an (H*K) x (H*K) dense without bias; V keeps its own projection (+ dconv).
* ``variant="abz_l2" .. "abz_l12"``: the discovered AutoBERT-Zero attentions
  (methods.md §1(d), Appendix A); l2, l4 and l6 never read V, so ``v_proj`` does not
  exist for them.

The per-head math of all variants is the pure function :func:`abz_attention`
(importable on its own); the module adds projections, dconvs, rotary positions,
biases and masks, dropout and the output projection. The scaling is an explicit
1/sqrt(K) at run time (not folded into the initialiser as in the T5 Primer code).
Q, K and V (heads merged, [B, L, H*K], after the dconv) are sown into the
``intermediates`` collection under ``q``, ``k``, ``v`` for relation distillation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nasjax.layers import products
from nasjax.layers.dconv import CausalDepthwiseConv
from nasjax.layers.dropout import Dropout
from nasjax.layers.embed import apply_rotary
from nasjax.layers.mlp import make_dense
from nasjax.spec import ATTENTION_VARIANTS, AttentionSpec

__all__ = [
    "MASK_VALUE",
    "PADDING_BIAS",
    "padding_key_bias",
    "causal_mask",
    "abz_scores_and_values",
    "abz_attention",
    "attention_probs",
    "softmax",
    "expand_over_batch",
    "MultiHeadAttention",
]

# Causal masking uses where(), so a masked score contributes exactly zero probability
# and exactly zero gradient; a finite value (not -inf) keeps fully masked rows NaN-free.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# BERT convention for padded keys: an additive -10000 on the logits.
PADDING_BIAS = -10000.0

_QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def padding_key_bias(padding_mask_BxL: jnp.ndarray) -> jnp.ndarray:
    """[B, L] bool (True = real token) -> additive [B, 1, 1, L] float32 key bias (0 or -10000)."""
    return jnp.where(padding_mask_BxL, 0.0, PADDING_BIAS).astype(jnp.float32)[:, None, None, :]


def causal_mask(length: int) -> jnp.ndarray:
    """[1, 1, L, L] bool, True where key position <= query position."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def abz_scores_and_values(variant: str, q_BxHxLxK, k_BxHxLxK, v_BxHxLxK=None):
    """Pre-softmax scores and the values to mix for one attention ``variant``.

    The AutoBERT-Zero graphs (s = sqrt(K); softplus(x) = ln(1 + e^x); softsign(x) =
    x / (1 + |x|)):

    ======== ========================================== ==========
    variant  key used in the scores (Q . key^T / s)      values
    ======== ========================================== ==========
    softmax  K                                          V
    abz_l2   softplus(K)                                Q + K
    abz_l4   softplus(-(logsigmoid(Q) + Q + K))         Q
    abz_l6   softplus(-K)       (also layer 8)          Q
    abz_l10  K/s + softsign(softsign(K)/s) + V          V
    abz_l12  K/s + V                                    V
    ======== ========================================== ==========

    Args:
      variant: one of :data:`nasjax.spec.ATTENTION_VARIANTS`.
      q_BxHxLxK, k_BxHxLxK: queries and keys.
      v_BxHxLxK: values; may be None for abz_l2/l4/l6.

    Returns:
      (scores_BxHxLqxLk, values_BxHxLkxK).
    """
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; known: {', '.join(ATTENTION_VARIANTS)}")
    q, k, v = q_BxHxLxK, k_BxHxLxK, v_BxHxLxK
    s = float(np.sqrt(q.shape[-1]))
    if variant in ("softmax", "abz_l10", "abz_l12") and v is None:
        raise ValueError(f"attention variant {variant!r} needs V")
    if variant == "softmax":
        key, values = k, v
    elif variant == "abz_l2":
        key, values = jax.nn.softplus(k), q + k
    elif variant == "abz_l4":
        key, values = jax.nn.softplus(-(jax.nn.log_sigmoid(q) + q + k)), q
    elif variant == "abz_l6":
        key, values = jax.nn.softplus(-k), q
    elif variant == "abz_l10":
        key, values = k / s + jax.nn.soft_sign(jax.nn.soft_sign(k) / s) + v, v
    else:  # abz_l12
        key, values = k / s + v, v
    scores = products.scores(q, key) / s
    return scores, values


def abz_attention(variant: str, q, k, v, key_bias=None, mask=None):
    """Per-head attention of any variant on [B, H, L, K] arrays (before W_O).

    Args:
      variant: ``softmax`` or ``abz_l2/l4/l6/l10/l12`` (see :func:`abz_scores_and_values`).
      q, k, v: [B, H, L, K]; ``v`` may be None for variants that do not read it.
      key_bias: additive logits bias broadcastable to [B, H, Lq, Lk], e.g. the
        [B, 1, 1, Lk] padding bias (0 or -10000) or a relative position bias.
      mask: optional bool broadcastable to [B, H, Lq, Lk], False = never attend
        (causal mask).

    Returns:
      [B, H, Lq, K]; the softmax runs in float32.
    """
    scores, values = abz_scores_and_values(variant, q, k, v)
    probs = attention_probs(scores, key_bias, mask).astype(values.dtype)
    return products.mix(probs, values)


def expand_over_batch(bias_1xHxLxL: jnp.ndarray, batch: int) -> jnp.ndarray:
    """[1, H, L, L] -> [B, H, L, L] as a rank-1 matmul with ones (exact: one product each).

    The gradient of a plain broadcast is a reduce over the batch axis of a [B, H, L, L]
    array, which XLA:CPU runs ~30x slower than the same sum as a matmul with ones (4.6 vs
    0.16 ms at [16, 4, 128, 128]; it was ~20% of the tiny vanilla train step). Written as
    this matmul, the backward pass is a matmul too.
    """
    if bias_1xHxLxL.shape[0] != 1 or batch == 1:
        return bias_1xHxLxL
    ones_Bx1 = jnp.ones((batch, 1), bias_1xHxLxL.dtype)
    flat = ones_Bx1 @ bias_1xHxLxL.reshape(1, -1)
    return flat.reshape((batch,) + bias_1xHxLxL.shape[1:])


@jax.custom_jvp
def softmax(x: jnp.ndarray) -> jnp.ndarray:
    """Softmax over the last axis, differentiated through its output.

    The value is jax.nn.softmax's, bit for bit: exp(x - max) / sum. The derivative is
    y * (dx - sum(y * dx)), so reverse mode keeps only y and the backward is one
    product and one row sum, as in PyTorch. jax.nn.softmax instead differentiates the
    division (``jax_softmax_custom_jvp`` is off by default), which keeps 1/sum broadcast
    to the full [B, H, Lq, Lk] shape as an extra saved array per layer. Entries whose
    probability is exactly 0 (masked keys) get an exactly 0 derivative.
    """
    x_max = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    unnormalized = jnp.exp(x - x_max)
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def attention_probs(scores_BxHxLxL, key_bias=None, mask=None):
    """softmax over keys in float32 after adding ``key_bias`` and applying ``mask``."""
    scores = scores_BxHxLxL.astype(jnp.float32)
    if key_bias is not None:
        scores = scores + key_bias
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    return softmax(scores)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of any :class:`AttentionSpec`.

    Parameters (only those the spec needs): ``q_proj, k_proj, v_proj`` (kernel
    [D, H, K], logical (embed, heads, kv)), ``qk_proj`` and ``q_solo`` (shared QK),
    ``q_dconv, k_dconv, v_dconv`` (MDHA taps (heads, kv)), ``o_proj`` (kernel
    [H, K, D], (heads, kv, embed)).

    Attributes:
      spec: the attention spec.
      causal: mask future keys (decoders).
      rotary: apply rotary positions to Q and K (after the dconv).
      init_std: N(0, init_std) initialiser of every projection.
      dropout_rate: dropout on the attention probabilities.
      dtype: activation dtype (None: input dtype).
    """

    spec: AttentionSpec
    causal: bool = False
    rotary: bool = False
    init_std: float = 0.02
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jnp.ndarray,
        *,
        key_bias: jnp.ndarray | None = None,
        position_bias: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Args:
          x_BxLxD: input.
          key_bias: additive [B, 1, 1, L] padding bias (see :func:`padding_key_bias`).
          position_bias: additive [1, >=H, L, L] relative bias; the first H heads are used.
          deterministic: disable dropout.

        Returns:
          [B, L, D].
        """
        spec = self.spec
        batch, length, d_model = x_BxLxD.shape
        n_heads, head_dim = spec.n_heads, spec.resolved_head_dim(d_model)
        dense = functools.partial(make_dense, init_std=self.init_std, dtype=self.dtype)
        proj = lambda name: dense((n_heads, head_dim), ("embed", "heads", "kv"), name=name, use_bias=spec.use_bias)
        dconv = lambda name, y: (
            CausalDepthwiseConv(spec.dconv_kernel, dtype=self.dtype, name=name)(y) if spec.dconv_kernel else y
        )

        if spec.shared_qk:
            k_BxLxHxK = dconv("k_dconv", proj("qk_proj")(x_BxLxD))
            q_solo = dense(
                (n_heads, head_dim), (None, None, "heads", "kv"), name="q_solo", axis=(-2, -1), use_bias=False
            )
            q_BxLxHxK = q_solo(k_BxLxHxK)
        else:
            q_BxLxHxK = dconv("q_dconv", proj("q_proj")(x_BxLxD))
            k_BxLxHxK = dconv("k_dconv", proj("k_proj")(x_BxLxD))
        v_BxLxHxK = dconv("v_dconv", proj("v_proj")(x_BxLxD)) if spec.uses_value else None

        if self.rotary:
            q_BxLxHxK, k_BxLxHxK = apply_rotary(q_BxLxHxK), apply_rotary(k_BxLxHxK)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, _QKV_AXES)
        k_BxLxHxK = nn.with_logical_constraint(k_BxLxHxK, _QKV_AXES)
        merged = lambda y: y.reshape(batch, length, n_heads * head_dim)
        self.sow("intermediates", "q", merged(q_BxLxHxK))
        self.sow("intermediates", "k", merged(k_BxLxHxK))
        if v_BxLxHxK is not None:
            v_BxLxHxK = nn.with_logical_constraint(v_BxLxHxK, _QKV_AXES)
            self.sow("intermediates", "v", merged(v_BxLxHxK))

        to_heads = lambda y: None if y is None else jnp.transpose(y, (0, 2, 1, 3))
        scores_BxHxLxL, values_BxHxLxK = abz_scores_and_values(
            spec.variant, to_heads(q_BxLxHxK), to_heads(k_BxLxHxK), to_heads(v_BxLxHxK)
        )
        bias = key_bias
        if position_bias is not None:
            pos = expand_over_batch(position_bias[:, :n_heads].astype(jnp.float32), batch)
            bias = pos if bias is None else bias + pos
        mask = causal_mask(length) if self.causal else None
        probs_BxHxLxL = attention_probs(scores_BxHxLxL, bias, mask)
        if self.dropout_rate > 0.0:
            probs_BxHxLxL = Dropout(self.dropout_rate)(probs_BxHxLxL, deterministic=deterministic)
        out_BxHxLxK = products.mix(probs_BxHxLxL.astype(values_BxHxLxK.dtype), values_BxHxLxK)
        out_BxLxHxK = nn.with_logical_constraint(jnp.transpose(out_BxHxLxK, (0, 2, 1, 3)), _QKV_AXES)
        o_proj = dense(d_model, ("heads", "kv", "embed"), name="o_proj", axis=(-2, -1), use_bias=spec.use_bias)
        return o_proj(out_BxLxHxK)
