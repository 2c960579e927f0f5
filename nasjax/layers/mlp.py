"""Feed-forward sub-layer and the partitioned dense helper every nasjax layer uses.

Legend: B batch, L length, D model width, F FFN width.

Activations: ``relu``, ``squared_relu`` (Primer: relu(x)^2), ``gelu`` (exact, erf),
``gelu_tanh`` (GPT-2's tanh approximation), ``silu``, and the gated ``swiglu`` /
``geglu`` (Shazeer 2020): down(act(gate(x)) * up(x)), three matrices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nasjax.layers import init as initializers

__all__ = ["squared_relu", "ACTIVATIONS", "GATED_ACTIVATIONS", "Dense", "make_dense", "FFN"]


def squared_relu(x: jnp.ndarray) -> jnp.ndarray:
    """Primer's FFN activation: max(0, x)^2."""
    return jnp.square(jax.nn.relu(x))


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "squared_relu": squared_relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swiglu": jax.nn.silu,
    "geglu": functools.partial(jax.nn.gelu, approximate=False),
}
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu"})


class Dense(nn.Module):
    """Linear map over the ``axis`` input axes to a ``features`` shape, with logical names.

    Like ``nn.DenseGeneral`` but the kernel is created directly in its full shape, so
    its logical names always match its rank: ``DenseGeneral`` initialises a flattened
    2-D kernel and unboxes it, which applies a 3-name sharding constraint to a rank-2
    value (an error) whenever ``nn.logical_axis_rules`` and a mesh are active while
    Flax re-derives parameter shapes.

    Attributes:
      features: output feature shape, e.g. ``(H, K)`` for a head projection.
      axes: logical names of the full kernel shape (contracted axes first, then
        ``features``); the bias takes the trailing ``len(features)`` names.
      axis: contracted input axes.
      use_bias: add a bias.
      init_std: N(0, init_std) kernel initialiser; the bias starts at zero.
      dtype: computation dtype (None: the input dtype promoted with float32);
        parameters are float32.
    """

    features: int | Sequence[int]
    axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        axes = tuple(self.axes)
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        if len(axes) != len(kernel_shape):
            raise ValueError(f"{len(axes)} logical names {axes} for a kernel of shape {kernel_shape}")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(initializers.normal(self.init_std), axes),
            kernel_shape,
            jnp.float32,
        )
        dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
        n_in = len(axis)
        if axis == tuple(range(x.ndim - n_in, x.ndim)) and x.ndim > n_in + 1:
            # Contracting the trailing axes (every projection here): one 2-D matmul on [rows, in] x [in, out].
            # Same math; XLA:CPU otherwise emits the backward of a rank-3 dot with a fused activation
            # gradient (GELU) as a slow loop, ~2x the FFN's backward time (docs/benchmarks.md, issue 8).
            lead, d_in = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
            y = jnp.dot(x.reshape(-1, d_in).astype(dtype), kernel.reshape(d_in, -1).astype(dtype))
            y = y.reshape(lead + features)
        else:
            y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), ((axis, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(initializers.zeros, axes[-len(features) :]),
                features,
                jnp.float32,
            )
            y = y + bias.astype(dtype)
        return y


def make_dense(
    features: int | Sequence[int],
    axes: Sequence[str | None],
    *,
    name: str,
    use_bias: bool = True,
    init_std: float = 0.02,
    axis: int | Sequence[int] = -1,
    dtype: Any = None,
) -> Dense:
    """A :class:`Dense` with N(0, init_std) kernel, zero bias and logical axis names.

    Args:
      features: output feature shape, e.g. ``(H, K)`` for a head projection.
      axes: logical names of the full kernel shape (contracted axes first, then
        ``features``).
      name: module name (stable parameter paths matter for weight inheritance).
      use_bias: add a bias.
      init_std: kernel initialiser std.
      axis: contracted input axes.
      dtype: computation dtype (parameters stay float32).
    """
    return Dense(features, tuple(axes), axis=axis, use_bias=use_bias, init_std=init_std, dtype=dtype, name=name)


class FFN(nn.Module):
    """Position-wise feed-forward network D -> F -> D.

    Attributes:
      d_ff: inner width F.
      activation: a key of :data:`ACTIVATIONS`.
      use_bias: biases on up/gate/down.
      init_std: std of the kernel initialiser.
      dtype: activation dtype (None: input dtype).
    """

    d_ff: int
    activation: str = "relu"
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        """Args: x_BxLxD. Returns: [B, L, D]."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        d_model = x_BxLxD.shape[-1]
        act = ACTIVATIONS[self.activation]
        dense = functools.partial(make_dense, use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype)
        h_BxLxF = dense(self.d_ff, ("embed", "mlp"), name="up")(x_BxLxD)
        if self.activation in GATED_ACTIVATIONS:
            gate_BxLxF = dense(self.d_ff, ("embed", "mlp"), name="gate")(x_BxLxD)
            h_BxLxF = act(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = act(h_BxLxF)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(d_model, ("mlp", "embed"), name="down")(h_BxLxF)
