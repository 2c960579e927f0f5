"""Attention whose per-head math is a searched graph (AutoBERT-Zero, nasjax.genome.attn_graph).

Legend: B batch, H heads, L length, K head dim (d_h), D model width.

:func:`eval_graph` interprets an :class:`~nasjax.genome.attn_graph.AttentionGraph` on
[B, H, L, K] arrays (every value carries two trailing "type" axes, n = L or d = K);
:class:`GraphAttention` adds the projections (``q_proj, k_proj, v_proj, o_proj``: the
names and shapes of :class:`~nasjax.layers.attention.MultiHeadAttention`, so weights
are shared with it and between graphs) and the output projection.

Padding (BERT): a softmax over an n axis adds -10000 at padded keys; a matmul that
contracts over n zeroes padded rows of its right operand. The graph runs in float32.
There is no dropout on attention probabilities (a graph may hold several softmaxes or
none); the block's residual dropout still applies.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nasjax.genome.attn_graph import LEAVES, AttentionGraph, GraphAttentionSpec
from nasjax.layers.attention import PADDING_BIAS, softmax
from nasjax.layers.mlp import make_dense

__all__ = ["GUARD_EPS", "eval_graph", "GraphAttention"]

GUARD_EPS = 1e-6
_QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def _unary(op: str, x, scale: float, key_valid, last_axis_is_n: bool):
    if op == "neg":
        return -x
    if op == "transpose":
        return jnp.swapaxes(x, -1, -2)
    if op == "scale":
        return x / scale
    if op == "softmax":
        if last_axis_is_n and key_valid is not None:
            x = x + jnp.where(key_valid, 0.0, PADDING_BIAS)
        return softmax(x)
    if op == "logsigmoid":
        return jax.nn.log_sigmoid(x)
    if op == "softsign":
        return jax.nn.soft_sign(x)
    if op == "sqrt":
        return jnp.sqrt(jnp.abs(x) + GUARD_EPS)
    if op == "log":
        return jnp.log(jnp.abs(x) + GUARD_EPS)
    if op == "abs":
        return jnp.abs(x)
    if op == "exp":
        return jnp.exp(x)
    if op == "sigmoid":
        return jax.nn.sigmoid(x)
    if op == "tanh":
        return jnp.tanh(x)
    raise ValueError(f"unknown unary op {op!r}")


def eval_graph(graph: AttentionGraph, q, k, v=None, key_valid=None):
    """Runs ``graph`` on per-head Q, K, V.

    Args:
      graph: a valid attention graph.
      q, k, v: [B, H, L, K]; ``v`` may be None when the graph does not read V.
      key_valid: optional bool [B, 1, 1, L] (True = real token).

    Returns:
      [B, H, L, K] float32.
    """
    types = graph.types()
    scale = float(np.sqrt(q.shape[-1]))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    q, k, v = f32(q), f32(k), f32(v)
    swap = lambda x: None if x is None else jnp.swapaxes(x, -1, -2)
    values: list[Any] = [q, k, v, swap(q), swap(k), swap(v)]
    live = graph.live()
    if key_valid is not None:
        row_valid = jnp.swapaxes(key_valid, -1, -2)  # [B, 1, L, 1]: real rows of an [n, *] operand
    for j, node in enumerate(graph.nodes):
        idx = j + len(LEAVES)
        if idx not in live:
            values.append(None)
            continue
        args = [values[i] for i in node.inputs]
        if any(a is None for a in args):
            missing = [LEAVES[i] for i in node.inputs if i < len(LEAVES) and values[i] is None]
            raise ValueError(f"node {j} ({node.op}) reads {', '.join(missing) or 'a missing value'}")
        if node.op == "matmul":
            a, b = args
            if key_valid is not None and types[node.inputs[1]][0] == "n":
                b = b * row_valid
            out = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        elif node.op == "add":
            out = args[0] + args[1]
        elif node.op == "mul":
            out = args[0] * args[1]
        elif node.op == "max":
            out = jnp.maximum(args[0], args[1])
        else:
            out = _unary(node.op, args[0], scale, key_valid, types[idx][1] == "n")
        values.append(out)
    return values[-1]


class GraphAttention(nn.Module):
    """Multi-head attention driven by a :class:`GraphAttentionSpec`.

    Attributes:
      spec: the mixer spec (heads, graph, head_dim, bias).
      init_std: N(0, init_std) initialiser of every projection.
      dtype: activation dtype of the projections (the graph itself runs in float32).
    """

    spec: GraphAttentionSpec
    init_std: float = 0.02
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD, *, padding_mask=None, deterministic: bool = True):
        """Args: x_BxLxD; padding_mask [B, L] bool (True = real). Returns: [B, L, D]."""
        spec = self.spec
        batch, length, d_model = x_BxLxD.shape
        n_heads, head_dim = spec.n_heads, spec.resolved_head_dim(d_model)
        dense = functools.partial(make_dense, init_std=self.init_std, dtype=self.dtype, use_bias=spec.use_bias)
        proj = lambda name: dense((n_heads, head_dim), ("embed", "heads", "kv"), name=name)(x_BxLxD)
        to_heads = lambda y: jnp.transpose(nn.with_logical_constraint(y, _QKV_AXES), (0, 2, 1, 3))
        merged = lambda y: y.reshape(batch, length, n_heads * head_dim)
        q_BxLxHxK, k_BxLxHxK = proj("q_proj"), proj("k_proj")
        self.sow("intermediates", "q", merged(q_BxLxHxK))
        self.sow("intermediates", "k", merged(k_BxLxHxK))
        v_BxHxLxK = None
        if spec.uses_value:
            v_BxLxHxK = proj("v_proj")
            self.sow("intermediates", "v", merged(v_BxLxHxK))
            v_BxHxLxK = to_heads(v_BxLxHxK)
        key_valid = None if padding_mask is None else padding_mask[:, None, None, :]
        out_BxHxLxK = eval_graph(spec.graph, to_heads(q_BxLxHxK), to_heads(k_BxLxHxK), v_BxHxLxK, key_valid)
        dtype = self.dtype or x_BxLxD.dtype
        out_BxLxHxK = nn.with_logical_constraint(jnp.transpose(out_BxHxLxK, (0, 2, 1, 3)).astype(dtype), _QKV_AXES)
        o_proj = dense(d_model, ("heads", "kv", "embed"), name="o_proj", axis=(-2, -1))
        return o_proj(out_BxLxHxK)
