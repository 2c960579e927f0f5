"""AutoBERT-Zero's convolution token mixer: GLU + lightweight conv (methods.md §1(d)).

Legend: B batch, L length, D model width, H conv heads (groups), k kernel width.

Block (the unofficial port's ``LightConvEncoderLayer``, a fairseq LightConv layer)::

    h = Linear(D -> 2D)(x); h = GLU(h)          # first half * sigmoid(second half)
    h = h * padding_mask                        # padded positions contribute nothing
    h = LightweightConv1d(h)                    # H groups of D/H contiguous channels
    h = Linear(D -> D)(h)

The residual, dropout and (post-)norm around the block belong to the Transformer
block, exactly as for attention, so every mixer has the same interface. The port also
applies dropout to the block input; nasjax drops the branch output instead, like
every other sub-layer.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nasjax.layers.dropout import Dropout
from nasjax.layers.mlp import make_dense

__all__ = ["torch_conv_xavier_uniform", "LightweightConv1d", "GLUConvBlock"]


def torch_conv_xavier_uniform(key, shape, dtype=jnp.float32):
    """PyTorch ``xavier_uniform_`` of a conv weight [H, 1, k], returned as [H, k].

    PyTorch computes fan_in = in_channels/groups * k = k and fan_out = H * k for that
    weight, so the bound is sqrt(6 / (k + H * k)).
    """
    n_heads, width = shape
    bound = float(np.sqrt(6.0 / (width + n_heads * width)))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LightweightConv1d(nn.Module):
    """fairseq-style lightweight conv: one k-tap kernel per group of D/H channels.

    ``y[:, t, c] = sum_j w[c // (D/H), j] * x[:, t + j - pad_left, c]`` with zero
    padding; ``pad_left = k // 2`` ('same', encoders) or ``k - 1`` (causal, decoders).
    No softmax on the weights (the port's ``weight_softmax=False``) and no bias.

    Attributes:
      kernel_size: k.
      n_heads: H (must divide D).
      causal: left-pad by k - 1 so position t only sees positions <= t.
      weight_dropout_rate: DropConnect on the kernel during training (fairseq's
        ``weight_dropout``, the attention dropout rate in the port).
      dtype: computation dtype (None: input dtype).
    """

    kernel_size: int
    n_heads: int
    causal: bool = False
    weight_dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """Args: x_BxLxD. Returns: [B, L, D]."""
        d_model = x_BxLxD.shape[-1]
        if d_model % self.n_heads:
            raise ValueError(f"width {d_model} is not divisible by n_heads={self.n_heads}")
        k = self.kernel_size
        w_Hxk = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_conv_xavier_uniform, ("heads", None)),
            (self.n_heads, k),
            jnp.float32,
        )
        if self.weight_dropout_rate > 0.0:
            w_Hxk = Dropout(self.weight_dropout_rate)(w_Hxk, deterministic=deterministic)
        dtype = self.dtype or x_BxLxD.dtype
        # Channel c belongs to group c // (D/H): expand the group kernels per channel and
        # run one depthwise conv, which XLA maps to a single windowed loop on every backend.
        w_DxK = jnp.repeat(w_Hxk, d_model // self.n_heads, axis=0).astype(dtype)
        pad_left = k - 1 if self.causal else k // 2
        return lax.conv_general_dilated(
            x_BxLxD.astype(dtype),
            jnp.transpose(w_DxK)[:, None, :],
            window_strides=(1,),
            padding=[(pad_left, k - 1 - pad_left)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=d_model,
            precision=lax.Precision.HIGHEST,
        )


class GLUConvBlock(nn.Module):
    """in_proj (D -> 2D, GLU) -> zero padding -> LightweightConv1d -> out_proj (D -> D).

    Parameters: ``in_proj`` (kernel (embed, mlp), bias), ``conv/kernel`` [H, k]
    (heads, None), ``out_proj`` (kernel (mlp, embed), bias).

    Attributes:
      kernel_size, n_heads: of the lightweight conv.
      use_glu: GLU after a D -> 2D projection (else a plain D -> D projection).
      causal: causal conv (decoders) instead of 'same' padding (encoders).
      init_std: N(0, init_std) initialiser of the two linears.
      weight_dropout_rate: DropConnect rate of the conv kernel.
      dtype: activation dtype (None: input dtype).
    """

    kernel_size: int = 7
    n_heads: int = 4
    use_glu: bool = True
    causal: bool = False
    init_std: float = 0.02
    weight_dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x_BxLxD: jnp.ndarray, *, padding_mask: jnp.ndarray | None = None, deterministic: bool = True
    ) -> jnp.ndarray:
        """Args: x_BxLxD; padding_mask [B, L] bool (True = real). Returns: [B, L, D]."""
        d_model = x_BxLxD.shape[-1]
        dense = functools.partial(make_dense, init_std=self.init_std, dtype=self.dtype, use_bias=True)
        width = 2 * d_model if self.use_glu else d_model
        h = dense(width, ("embed", "mlp"), name="in_proj")(x_BxLxD)
        if self.use_glu:
            a_BxLxD, gate_BxLxD = jnp.split(h, 2, axis=-1)
            h = a_BxLxD * jax.nn.sigmoid(gate_BxLxD)
        if padding_mask is not None:
            h = h * padding_mask[..., None].astype(h.dtype)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = LightweightConv1d(
            self.kernel_size,
            self.n_heads,
            causal=self.causal,
            weight_dropout_rate=self.weight_dropout_rate,
            dtype=self.dtype,
            name="conv",
        )(h, deterministic=deterministic)
        return dense(d_model, ("mlp", "embed"), name="out_proj")(h)
