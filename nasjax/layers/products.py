"""Batched products of multi-head attention whose gradients XLA:CPU runs fast.

Legend: ... batch axes (e.g. B, H), Q query positions, M key positions, D width.

Attention has two batched products: the scores ``Q K^T`` ([..., Q, D] x [..., M, D]
-> [..., Q, M]) and the mix ``P V`` ([..., Q, M] x [..., M, D] -> [..., Q, D]).
Reverse mode needs, besides products of the same forms, ``dS^T Q`` (K's gradient)
and ``P^T dO`` (V's gradient): products whose left operand is contracted over its
second-to-last axis. XLA:CPU (jax 0.10-0.11) runs those as plain loops, outside its
YNNPACK dot fusions; in the tiny train steps they were the four slowest single
operations (1.0-2.1 ms each at [16, 4, 128, 128] x [16, 4, 128, 16]; see
docs/benchmarks.md, "Attention's transposed gradients").

:func:`scores` and :func:`mix` compute the same values as the plain einsums. Their
derivative rules (``custom_jvp``, so forward mode, reverse mode and higher orders all
work) write the tangent in the key/value argument so that its transpose is a product
of standard form on the small operand's transposed copy:
``dK = (Q^T dS)^T`` and ``dV = (dO^T P)^T``, with ``Q^T`` and ``dO^T`` ([..., D, Q],
8x smaller than the score-shaped operand at D = 16, L = 128) materialised behind
``lax.optimization_barrier`` so that XLA does not fold the transposes back into the
products. Every product then runs in a YNNPACK fusion. The gradients are bit-identical
to the einsums' on this CPU (tests/test_layers.py checks equality to rounding).

The rule is used on the CPU backend only (:data:`TRANSPOSED_GRADIENTS`): GPU and TPU
libraries take transposed operands at no cost, and the barrier would only add copies.
And only for narrow operands, D <= :data:`MAX_WIDTH` (16): XLA:CPU's plain loop is slow
for products with a narrow output ([128 x 128]^T x [128 x 16]), while at D >= 32 it is
as fast as YNNPACK and the copies and barriers cost more than they save. Attention
core forward+backward, this 2-core CPU, jax 0.10.2 (B x H x L x D: einsums -> rule, ms):
16x4x128x8 5.1 -> 3.6, 16x4x128x16 5.4 -> 4.5, 8x8x256x16 27.1 -> 22.7,
16x4x128x32 6.4 -> 7.0, 8x8x256x64 43.5 -> 55.9, [B, L, W] 16x64x64 1.05 -> 1.22.

Only the multi-head attentions use these (the zoo's and AutoBERT-Zero's discovered
variants). Primer programs' T_MAT_MUL / MAT_MUL ([B, L, W], no head axis) keep the plain
einsums: at their shapes the rule gained nothing (16x64x16: 0.58 -> 0.61 ms) and only
made the search's backward pieces larger to compile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["TRANSPOSED_GRADIENTS", "MAX_WIDTH", "scores", "mix"]

# Backends on which the derivative rules below are used (read at trace time).
TRANSPOSED_GRADIENTS: frozenset[str] = frozenset({"cpu"})
# Widest D (the small operand's last axis) that takes the rule (see the module docstring).
MAX_WIDTH = 16

_barrier = jax.lax.optimization_barrier


def _t(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.swapaxes(x, -1, -2)


def _on(width: int) -> bool:
    return width <= MAX_WIDTH and jax.default_backend() in TRANSPOSED_GRADIENTS


def _scores(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("...qd,...md->...qm", q, k)


def _mix(p: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("...qm,...md->...qd", p, v)


@jax.custom_jvp
def _scores_cpu(q, k):
    return _scores(q, k)


def _zero(t) -> bool:
    return isinstance(t, SymbolicZero)


def _sum(a, b, like):
    if a is None and b is None:
        return jnp.zeros(like.shape, like.dtype)
    return b if a is None else a if b is None else a + b


def _scores_cpu_jvp(primals, tangents):
    (q, k), (dq, dk) = primals, tangents
    out = _scores_cpu(q, k)
    # d(Q K^T) = dQ K^T + Q dK^T, the second term as (Q^T)^T (dK^T): its transpose in
    # dK is (Q^T dS)^T, a standard product on the copy Q^T.
    along_q = None if _zero(dq) else _scores(dq, k)
    along_k = None if _zero(dk) else jnp.einsum("...dq,...dm->...qm", _barrier(_t(q)), _barrier(_t(dk)))
    return out, _sum(along_q, along_k, out)


@jax.custom_jvp
def _mix_cpu(p, v):
    return _mix(p, v)


def _mix_cpu_jvp(primals, tangents):
    (p, v), (dp, dv) = primals, tangents
    out = _mix_cpu(p, v)
    # d(P V) = dP V + P dV, the second term as (dV^T P^T)^T: its transpose in dV is
    # (dO^T P)^T, a standard product on the copy dO^T.
    along_p = None if _zero(dp) else _mix(dp, v)
    along_v = None if _zero(dv) else _t(_barrier(jnp.einsum("...dm,...qm->...dq", _barrier(_t(dv)), p)))
    return out, _sum(along_p, along_v, out)


# Symbolic zeros: a term whose operand has no tangent is not computed (a zero tangent
# would otherwise be a product of zeros in the forward pass).
_scores_cpu.defjvp(_scores_cpu_jvp, symbolic_zeros=True)
_mix_cpu.defjvp(_mix_cpu_jvp, symbolic_zeros=True)


def scores(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    """``q @ k^T`` over the last two axes: [..., Q, D] x [..., M, D] -> [..., Q, M]."""
    return _scores_cpu(q, k) if _on(q.shape[-1]) else _scores(q, k)


def mix(p: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """``p @ v`` over the last two axes: [..., Q, M] x [..., M, D] -> [..., Q, D]."""
    return _mix_cpu(p, v) if _on(v.shape[-1]) else _mix(p, v)
