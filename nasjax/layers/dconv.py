"""Primer's causal depthwise convolution along the sequence (the "DConv" of MDHA).

Legend: B batch, L length, H heads, K head dim.

``y[:, t, h, c] = sum_i w_i[h, c] * x[:, t - i, h, c]`` with zeros before the start.
It is written with shifts rather than ``lax.conv_general_dilated`` (methods.md §5.1):
parity with the T5 reference is exact, causality is structural, and XLA fuses the
few multiply-adds into one loop anyway (a grouped ``conv_general_dilated`` ran 8-11x
slower on XLA:CPU, docs/benchmarks.md, stop 34). One parameter per tap, shaped like the
trailing axes of the input (``(H, K)`` for head-split projections): every (head,
channel) pair has its own kernel, which is what the official code does (a
per-channel-but-shared-across-heads conv is a known reimplementation bug).

The sum runs under ``jax.checkpoint``: reverse-mode autodiff keeps only the input and
the taps for the backward, which shifts the input again. Without it, autodiff keeps every
shifted copy of the input, k - 1 arrays of the input's size. A compiled forward then
writes them all out: for a ``DCONV_31X1`` on a 16x64x64 input its forward compiled in
0.6 s instead of 0.1 s and ran twice as long. The backward now compiles and runs longer,
by less (``benchmarks/dconv_residuals.py``; docs/benchmarks.md, stop 34). The values are
the same ops on the same operands.

For wide kernels (``k >= BLOCK_MIN_TAPS``; Primer's ``DCONV_15X1`` and ``DCONV_31X1``) the
taps' gradients come from one product instead of k reductions (:func:`_tap_term`,
docs/benchmarks.md, stop 35): the sequence is cut into blocks of k positions, each block
beside the one before it, and ``dtap_i[c] = sum_s M[s, s + k - i, c]`` with
``M[s, r, c] = sum_{b,j} g[b, j, s, c] * pair[b, j, r, c]``, a product batched over the
channels. XLA:CPU compiles that backward in about two thirds of the time at k = 31 and
runs it faster; at k = 3 and 7 the k reductions are cheaper, so narrow kernels keep them.
The forward and the input's gradient are unchanged (the same bits); the taps' gradients
equal the reductions' up to float rounding (another summation order).

Branched copies (a learned op's ``branches`` > 1, ``nn.vmap`` with ``in_axes=None``; also
a DConv inside a branched CALL that reads the callee's arguments) share their input but
not their taps. Under ``vmap`` each ``shift_right(x, i) * tap_i`` then broadcast ``x`` to
the copies on its own, and reverse mode summed the copies' input gradients once per tap:
k reductions over the copies, each a kernel of its own. For 4 copies of a 31-tap conv on
a 16x64x64 input that backward compiled in ~0.75 s and ran in 17.5 ms (0.66 ms for one
copy). :func:`_shared` gives ``x`` the copies' axis once, before the shifts, so the copies'
gradients are summed once: ~0.52 s and 5.2 ms (stop 35). Outside ``vmap`` it compiles
away. The input's gradient of branched copies changes by float rounding (the copies are
summed after the taps rather than before).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from nasjax.layers import init as initializers

__all__ = ["shift_right", "CausalDepthwiseConv", "BLOCK_MIN_TAPS"]


def shift_right(x_BxLx: jnp.ndarray, shift: int) -> jnp.ndarray:
    """out[:, t] = x[:, t - shift], zeros for t < shift (sequence axis 1)."""
    if shift == 0:
        return x_BxLx
    length = x_BxLx.shape[1]
    pad = [(0, 0)] * x_BxLx.ndim
    pad[1] = (min(shift, length), 0)
    return jnp.pad(x_BxLx, pad)[:, :length]


def _shifted_sum(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """sum_i shift_right(x, i) * taps[i], the taps cast to the input's dtype."""
    y = None
    for i, w in enumerate(taps):
        term = shift_right(x_BxLx, i) * w.astype(x_BxLx.dtype)
        y = term if y is None else y + term
    return y


# Kernels at least this wide get their taps' gradients from one product (module docstring).
BLOCK_MIN_TAPS = 15


def _shared(x_BxLx: jnp.ndarray, tap: jnp.ndarray) -> jnp.ndarray:
    """``x``, carrying the batch axes of ``tap`` (module docstring: branched copies).

    ``where(True, x, tap)`` selects ``x``. Outside ``vmap`` XLA folds the select away; the
    compiled programs are those without it. Under a ``vmap`` whose copies share ``x``
    but not the taps, the result carries the copies' axis. The conv then runs on the copies
    alike, and reverse mode sums their input gradients once, at this select, instead of once
    per tap."""
    return jnp.where(True, x_BxLx, jax.lax.stop_gradient(tap).astype(x_BxLx.dtype))


def _tap_term(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """``_shifted_sum(x, taps)`` as a product over blocks of k positions, in float32 (the
    taps' dtype), cast to the input's dtype. Linear in ``taps``: its transpose, the taps'
    gradient, is one product batched over the channels and a fixed diagonal sum, however
    wide the kernel (module docstring). Used only as the tangent in the taps, where that
    transpose is what reverse mode computes; twice the multiply-adds of the shifted sum."""
    k = len(taps)
    b, length = x_BxLx.shape[:2]
    trailing = x_BxLx.shape[2:]
    x = x_BxLx.reshape(b, length, -1).astype(jnp.float32)
    c = x.shape[2]
    n_blocks = -(-length // k)
    current = jnp.pad(x, ((0, 0), (0, n_blocks * k - length), (0, 0)))
    before = shift_right(current, k)
    # pair[b, j, r]: positions jk - k + r (r < k, the block before) and jk + r - k (r >= k)
    pair = jnp.concatenate(
        [before.reshape(b, n_blocks, k, c), current.reshape(b, n_blocks, k, c)], axis=2
    )  # B x J x 2k x C
    # w[s, r] = tap_{s + k - r} where 0 <= s + k - r < k, else 0: the rows of one vector
    # [0, tap_{k-1} .. tap_0, 0 * k] laid k times end to end, read 2k at a time.
    t = jnp.stack([w.reshape(-1).astype(jnp.float32) for w in taps])  # k x C
    row = jnp.concatenate([jnp.zeros((1, c), t.dtype), t[::-1], jnp.zeros((k, c), t.dtype)])  # (2k + 1) x C
    w = jnp.broadcast_to(row, (k, 2 * k + 1, c)).reshape(k * (2 * k + 1), c)[: 2 * k * k].reshape(k, 2 * k, c)
    y = jnp.einsum("bjrc,src->bjsc", pair, w)  # position jk + s
    return y.reshape(b, n_blocks * k, c)[:, :length].reshape(b, length, *trailing).astype(x_BxLx.dtype)


@jax.custom_jvp
def _wide_shifted_sum(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """``_shifted_sum``, whose tangent in the taps is :func:`_tap_term`."""
    return _shifted_sum(x_BxLx, taps)


@functools.partial(_wide_shifted_sum.defjvp, symbolic_zeros=True)
def _wide_shifted_sum_jvp(primals, tangents):
    x, taps = primals
    dx, dtaps = tangents
    y = _shifted_sum(x, taps)
    dy = None
    if not isinstance(dx, SymbolicZero):
        dy = _shifted_sum(_shared(dx, taps[0]), taps)
    if not all(isinstance(d, SymbolicZero) for d in dtaps):
        dtaps = tuple(jnp.zeros(t.shape, t.dtype) if isinstance(d, SymbolicZero) else d for d, t in zip(dtaps, taps))
        term = _tap_term(x, dtaps)
        dy = term if dy is None else dy + term
    return y, jnp.zeros_like(y) if dy is None else dy


# The backward keeps (x, taps) and shifts x again (module docstring). prevent_cse=False:
# where forward and backward are one program (the one-program train step), XLA may keep
# the forward's shifted copies instead of recomputing them; the segmented pieces compile
# the two apart, so there the copies are never outputs.
_causal_depthwise_narrow = jax.checkpoint(lambda x, taps: _shifted_sum(_shared(x, taps[0]), taps), prevent_cse=False)
_causal_depthwise_wide = jax.checkpoint(_wide_shifted_sum, prevent_cse=False)


def _causal_depthwise(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """The layer's sum, with the taps' gradients by reductions (narrow) or one product (wide)."""
    fn = _causal_depthwise_wide if len(taps) >= BLOCK_MIN_TAPS else _causal_depthwise_narrow
    return fn(x_BxLx, taps)


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
        taps = tuple(
            self.param(
                f"tap_{i}",
                nn.with_logical_partitioning(initializers.constant(0.5 if i == 0 else 0.5 / self.kernel_size), names),
                trailing,
                jnp.float32,
            )
            for i in range(self.kernel_size)
        )
        return _causal_depthwise(x_BxLxHxK.astype(dtype), taps)
