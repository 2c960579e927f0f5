"""Normalisation layers: LayerNorm (with bias), RMSNorm (T5 / Transformer++), PrimerNorm.

Legend: B batch, L length, D model width.

All norms compute their statistics in float32 whatever the activation dtype (a
bfloat16 variance over 768 features loses most of its mantissa), keep their
parameters in float32, and return the module's ``dtype`` (or the input's dtype when
``dtype`` is None). Scale and bias carry the logical axis name ``embed``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nasjax.layers import init as initializers

__all__ = ["LayerNorm", "RMSNorm", "PrimerNorm", "make_norm", "NORMS"]


def _scale_bias(module: nn.Module, d: int, use_bias: bool):
    scale = module.param("scale", nn.with_logical_partitioning(initializers.ones, ("embed",)), (d,), jnp.float32)
    bias = None
    if use_bias:
        bias = module.param("bias", nn.with_logical_partitioning(initializers.zeros, ("embed",)), (d,), jnp.float32)
    return scale, bias


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis.

    Attributes:
      eps: added to the variance.
      use_bias: learn the additive bias (BERT, GPT-2 and T2T all do).
      dtype: output dtype; None keeps the input dtype.
    """

    eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        x = x_BxLxD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        scale, bias = _scale_bias(self, x.shape[-1], self.use_bias)
        y = y * scale
        if bias is not None:
            y = y + bias
        return y.astype(self.dtype or x_BxLxD.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (T5's norm: no centring, no bias)."""

    eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        x = x_BxLxD.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        scale, _ = _scale_bias(self, x.shape[-1], use_bias=False)
        y = x * jnp.reciprocal(jnp.sqrt(ms + self.eps)) * scale
        return y.astype(self.dtype or x_BxLxD.dtype)


class PrimerNorm(nn.Module):
    """Primer's custom norm, T5 version: y = (x - mu) * rsqrt(mean(x * (x - mu)) + eps) * g + b.

    mean(x * (x - mu)) equals Var(x) exactly in real arithmetic, so this is LayerNorm
    up to floating-point order; it is kept separate so that a searched program using
    it reproduces the released T5 code rather than Lingvo's uncentred variant.
    """

    eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        x = x_BxLxD.astype(jnp.float32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mu
        var = jnp.mean(x * centred, axis=-1, keepdims=True)
        scale, bias = _scale_bias(self, x.shape[-1], use_bias=True)
        y = centred * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale + bias
        return y.astype(self.dtype or x_BxLxD.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "primer_norm": PrimerNorm}


def make_norm(kind: str, eps: float, name: str | None = None, dtype: Any = None) -> nn.Module:
    """Returns an (unbound) norm module of ``kind`` (layernorm | rmsnorm | primer_norm).

    Args:
      kind: one of :data:`NORMS`.
      eps: epsilon.
      name: module name; leave None when assigning in ``setup`` (Linen names it there).
      dtype: output dtype.
    """
    if kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; known: {', '.join(NORMS)}")
    kwargs = {"eps": eps, "dtype": dtype}
    if name is not None:
        kwargs["name"] = name
    return NORMS[kind](**kwargs)
