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

**Copies sharing one input** (``copies``: a Primer instruction with ``branches`` > 1) are one
conv with taps ``[copies, *trailing]`` and output ``[B, L, copies, *trailing]``, the layout
``nn.vmap(..., in_axes=None, out_axes=-2)`` gives, with the same parameters (paths, shapes,
logical axes, values) and the same forward. Under ``vmap`` each ``shift_right(x, i) * w_i``
broadcast the shared input on its own, so reverse mode summed the input's gradient over the
copies once per tap, copies-major, and transposed it into the output's layout. Here a
``custom_jvp`` writes the tangent in the input through one broadcast of it, so the backward
adds the k taps' shifted cotangents first and sums over the copies once (up to a size,
``SHARED_TANGENT_MAX_BYTES``; above it, once per tap as before); the tangent in the taps
reads the unbroadcast input. It runs under the same ``jax.checkpoint``. The input's gradient
changes by float rounding (the sums' order). ``benchmarks/dconv_residuals.py --copies=N``
(docs/benchmarks.md, stop 36): below the bound the backward runs 2.5-4.5x faster than under
``nn.vmap`` at 2-16 copies of widths 64-256, and compiles up to 39% faster at width 64, up
to 8% slower at 192-256; above it, as under ``nn.vmap``. The forward runs up to 3.3x faster
at 8-16 copies, as fast at 4, and compiles up to ~20% slower (tracing the rule).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

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


def _shifted_sum(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """sum_i shift_right(x, i) * taps[i], the taps cast to the input's dtype."""
    y = None
    for i, w in enumerate(taps):
        term = shift_right(x_BxLx, i) * w.astype(x_BxLx.dtype)
        y = term if y is None else y + term
    return y


# The backward keeps (x, taps) and shifts x again (module docstring). prevent_cse=False:
# where forward and backward are one program (the one-program train step), XLA may keep
# the forward's shifted copies instead of recomputing them; the segmented pieces compile
# the two apart, so there the copies are never outputs.
_causal_depthwise = jax.checkpoint(_shifted_sum, prevent_cse=False)


def _copies_sum(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """C copies on one input: ``out[:, t, c] = sum_i taps[i][c] * x[:, t - i]``, [B, L, C, ...]."""
    return _shifted_sum(x_BxLx[:, :, None], taps)


# The shared input's tangent through one broadcast (below) while the k - 1 shifted
# cotangents that XLA:CPU then writes out for its one reduction over the copies, (k - 1) x
# the output's bytes, stay under this; above it, one reduction per tap reads the cotangent
# in place. Measured on a 2-core Zen 5 only (``benchmarks/dconv_residuals.py --copies``,
# docs/benchmarks.md, stop 36); other backends and CPUs are unmeasured. At 16 x 64 inputs
# the one reduction ran 2.5-4.5x faster up to 42 MiB written (e.g. 31 taps x 4 copies x
# width 64: 3.0 against 7.5 ms), and 1.5-2.4x slower from 56 MiB (15 taps x 16 copies x
# width 256: 84 against 45 ms), where two shapes were still faster: a coarse fit, in which the width
# seems to matter too. The bytes are those the conv sees: one copy of any enclosing
# branched CALL (an outer vmap), the whole batch of a sharded one. Both forms compute the
# same sums in another order.
SHARED_TANGENT_MAX_BYTES = 48 << 20


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _copies_conv(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...], shared: bool) -> jnp.ndarray:
    return _copies_sum(x_BxLx, taps)


@functools.partial(_copies_conv.defjvp, symbolic_zeros=True)
def _copies_conv_jvp(shared: bool, primals, tangents):
    """Linear in the tangents as the conv is; with ``shared``, written so that its transpose
    sums the input's cotangent over the copies once (module docstring)."""
    x, taps = primals
    dx, dtaps = tangents
    y = _copies_sum(x, taps)
    dy = None
    if not isinstance(dx, SymbolicZero):
        if shared:
            dy = _shifted_sum(jnp.broadcast_to(dx[:, :, None], y.shape), taps)  # the copies' axis, given once
        else:  # one reduction over the copies per tap
            dy = _copies_sum(dx, taps)
    for i, d in enumerate(dtaps):
        if isinstance(d, SymbolicZero):
            continue
        term = shift_right(x, i)[:, :, None] * d.astype(x.dtype)
        dy = term if dy is None else dy + term
    return y, jnp.zeros_like(y) if dy is None else dy


_copies_checkpointed = jax.checkpoint(_copies_conv, prevent_cse=False, static_argnums=(2,))


def _shares_tangent(x_BxLx, taps) -> bool:
    """Whether the input's tangent is broadcast once: (k - 1) x the output's bytes within
    ``SHARED_TANGENT_MAX_BYTES`` (read when a conv is traced)."""
    out_bytes = x_BxLx.size * taps[0].shape[0] * jnp.dtype(x_BxLx.dtype).itemsize
    return (len(taps) - 1) * out_bytes <= SHARED_TANGENT_MAX_BYTES


def _copies_depthwise(x_BxLx: jnp.ndarray, taps: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """C copies on one input, [B, L, C, ...], differentiated as the module docstring says.
    The form of the input's tangent (:func:`_shares_tangent`) is a static argument, so
    checkpoint's own trace cache follows a changed setting; programs already compiled (jit,
    the segmented trainer's pieces) keep theirs."""
    return _copies_checkpointed(x_BxLx, taps, _shares_tangent(x_BxLx, taps))


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise conv of width ``kernel_size`` along axis 1, no bias.

    Attributes:
      kernel_size: number of taps (Primer: 3).
      dtype: computation dtype (None: input dtype); taps are float32 parameters.
      copies: 0 for one conv; C > 0 for C convs with their own taps on the one input
        (module docstring): taps ``[C, *trailing]`` with a leading unnamed logical axis,
        output ``[B, L, C, *trailing]``, as ``nn.vmap`` over C copies lays them out.

    Parameters ``tap_0 .. tap_{k-1}`` have the trailing input shape (``(H, K)``) and
    logical axes ``(heads, kv)``; ``tap_0`` (the current position) is initialised to
    0.5 and the others to 0.5 / kernel_size, Primer's constant init, so at
    initialisation the layer is a smoothed copy of its input.
    """

    kernel_size: int = 3
    dtype: Any = None
    copies: int = 0

    @nn.compact
    def __call__(self, x_BxLxHxK: jnp.ndarray) -> jnp.ndarray:
        """Args: x_BxLxHxK (any trailing shape works). Returns: same shape ([B, L, C, ...]
        with ``copies``)."""
        trailing = x_BxLxHxK.shape[2:]
        names = ("heads", "kv") if len(trailing) == 2 else (None,) * len(trailing)
        if self.copies:  # nn.vmap's layout: a leading unnamed (replicated) axis
            trailing, names = (self.copies, *trailing), (None, *names)
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
        conv = _copies_depthwise if self.copies else _causal_depthwise
        return conv(x_BxLxHxK.astype(dtype), taps)
