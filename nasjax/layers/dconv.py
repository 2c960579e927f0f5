"""Primer's causal depthwise convolution along the sequence (the "DConv" of MDHA).

Legend: B batch, L length, H heads, K head dim.

``y[:, t, h, c] = sum_i w_i[h, c] * x[:, t - i, h, c]`` with zeros before the start.
It is written with shifts rather than ``lax.conv_general_dilated`` (methods.md §5.1):
parity with the T5 reference is exact, causality is structural, and XLA fuses the
few multiply-adds into one loop anyway. One parameter per tap, shaped like the
trailing axes of the input (``(H, K)`` for head-split projections): every (head,
channel) pair has its own kernel, which is what the official code does (a
per-channel-but-shared-across-heads conv is a known reimplementation bug).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nasjax.layers import init as initializers

__all__ = ["shift_right", "CausalDepthwiseConv"]


def shift_right(x_BxLx: jnp.ndarray, shift: int) -> jnp.ndarray:
    """out[:, t] = x[:, t - shift], zeros for t < shift (sequence axis 1)."""
    if shift == 0:
        return x_BxLx
    length = x_BxLx.shape[1]
    pad = [(0, 0)] * x_BxLx.ndim
    pad[1] = (min(shift, length), 0)
    return jnp.pad(x_BxLx, pad)[:, :length]


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise conv of width ``kernel_size`` along axis 1, no bias.

    Attributes:
      kernel_size: number of taps (Primer: 3).
      dtype: computation dtype (None: input dtype); taps are float32 parameters.

    Parameters ``tap_0 .. tap_{k-1}`` have the trailing input shape (``(H, K)``) and
    logical axes ``(heads, kv)``; ``tap_0`` (the current position) is initialised to
    0.5 and the others to 0.5 / kernel_size, Primer's constant init, so at
    initialisation the layer is a smoothed copy of its input.
    """

    kernel_size: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxHxK: jnp.ndarray) -> jnp.ndarray:
        """Args: x_BxLxHxK (any trailing shape works). Returns: same shape."""
        trailing = x_BxLxHxK.shape[2:]
        names = ("heads", "kv") if len(trailing) == 2 else (None,) * len(trailing)
        dtype = self.dtype or x_BxLxHxK.dtype
        x = x_BxLxHxK.astype(dtype)
        y = None
        for i in range(self.kernel_size):
            value = 0.5 if i == 0 else 0.5 / self.kernel_size
            w = self.param(
                f"tap_{i}",
                nn.with_logical_partitioning(initializers.constant(value), names),
                trailing,
                jnp.float32,
            )
            term = shift_right(x, i) * w.astype(dtype)
            y = term if y is None else y + term
        return y
