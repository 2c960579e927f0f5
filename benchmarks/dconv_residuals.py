"""Primer's causal depthwise conv as a train-step piece: plain autodiff, nasjax's checkpoint, and two variants tried.

    python benchmarks/dconv_residuals.py
    python benchmarks/dconv_residuals.py --kernels=31 --shape=16x64x64 --repeats=3
    python benchmarks/dconv_residuals.py --copies=4      # branched copies sharing the input

Versions of the conv, each differentiated by reverse mode:

* ``plain autodiff``: ``_shifted_sum`` as it is; autodiff keeps k - 1 shifted copies of
  the input for the backward;
* ``nasjax``: ``nasjax.layers.dconv._causal_depthwise``, the sum under ``jax.checkpoint``
  (stop 34): the backward keeps the input and the taps and shifts the input again; the
  taps' gradients are k reductions;
* ``tried: product`` (stop 35, not adopted): the same, but for the taps' gradients one
  product over blocks of k positions (a ``custom_jvp`` whose tangent in the taps is
  :func:`product_term`), a constant number of ops however wide the kernel;
* ``tried: shared input`` (stop 35, not adopted): nasjax's checkpoint with the input
  first passed through ``where(True, x, tap_0)`` (below), for every width;
* ``tried: product + shared input`` (stop 35, not adopted): also the input's tangent run
  on ``where(True, x, tap_0)``, which under ``vmap`` gives the shared input the copies'
  axis once (and which XLA folds away outside it), so that reverse mode sums the copies'
  input gradients once instead of once per tap.

``--copies=N`` runs N copies with their own taps on one shared input, as a branched learned
op did until stop 35 (``jax.vmap`` over the taps, ``in_axes=None`` for the input, the copies'
axis placed second to last, ``out_axes=-2``), every version above so; and adds the row
the rows ``one conv with copies, shared`` and ``..., per tap`` (stop 36,
``nasjax.layers.dconv._copies_checkpointed``), which a branched DCONV runs now: the same
output layout, its input's tangent through one broadcast so that the backward sums the copies
once, or once per tap; ``(picked)`` marks the form ``SHARED_TANGENT_MAX_BYTES`` picks for the
shape. ``--no_tried`` leaves out the versions stop 35 tried. For each kernel width the script compiles the two programs
the segmented trainer compiles for a piece: the forward as ``jax.vjp`` (its residuals are
outputs) and the backward as that vjp applied to a cotangent, each jitted with the pieces'
XLA options (``nasjax.xla_options.auto``), with jax's caches cleared before each
forward/backward pair.
Compile ms are tracing, lowering and XLA's compile. Prints per version the residual arrays,
the compile ms (best of ``--repeats``), the run time of one call (median of 50), whether the
output, the input gradient and the taps' gradients are the same bits as plain autodiff's,
and the largest differences of the two gradients from it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention_core import _median_ms  # noqa: E402


def measure(f, x, taps, g, options: dict, repeats: int) -> dict:
    """Compile (best of ``repeats``) and run the forward-with-residuals and the backward of ``f``."""
    import jax
    import numpy as np

    best_f = best_b = float("inf")
    for _ in range(repeats):
        jax.clear_caches()
        t = time.perf_counter()
        forward = jax.jit(lambda taps, x: jax.vjp(f, x, taps)).lower(taps, x).compile(options)
        best_f = min(best_f, time.perf_counter() - t)
        y, vjp = forward(taps, x)
        t = time.perf_counter()
        backward = jax.jit(lambda vjp, g: vjp(g)).lower(vjp, g).compile(options)
        best_b = min(best_b, time.perf_counter() - t)
    g_x, g_taps = backward(vjp, g)
    return {
        "residuals": len(jax.tree.leaves(vjp)),
        "forward compile ms": 1e3 * best_f,
        "backward compile ms": 1e3 * best_b,
        "forward run ms": _median_ms(lambda: jax.block_until_ready(forward(taps, x)), 50),
        "backward run ms": _median_ms(lambda: jax.block_until_ready(backward(vjp, g)), 50),
        "values": (np.asarray(y), np.asarray(g_x), np.stack([np.asarray(t) for t in g_taps])),
    }


def product_term(x, taps):
    """``_shifted_sum(x, taps)`` as a product over blocks of k positions (linear in ``taps``):
    each block beside the one before it (B x J x 2k x C) against a k x 2k Toeplitz matrix of
    the taps, laid out from one vector ``[0, tap_{k-1} .. tap_0, 0 * k]`` repeated k times
    and read 2k at a time. Its transpose, the taps' gradient, is one product batched over
    the channels and a diagonal sum read with a pad and a reshape."""
    import jax.numpy as jnp

    from nasjax.layers.dconv import shift_right

    k = len(taps)
    b, length = x.shape[:2]
    trailing = x.shape[2:]
    x32 = x.reshape(b, length, -1).astype(jnp.float32)
    c = x32.shape[2]
    n_blocks = -(-length // k)
    current = jnp.pad(x32, ((0, 0), (0, n_blocks * k - length), (0, 0)))
    before = shift_right(current, k)
    pair = jnp.concatenate([before.reshape(b, n_blocks, k, c), current.reshape(b, n_blocks, k, c)], axis=2)
    t = jnp.stack([w.reshape(-1).astype(jnp.float32) for w in taps])
    row = jnp.concatenate([jnp.zeros((1, c), t.dtype), t[::-1], jnp.zeros((k, c), t.dtype)])
    w = jnp.broadcast_to(row, (k, 2 * k + 1, c)).reshape(k * (2 * k + 1), c)[: 2 * k * k].reshape(k, 2 * k, c)
    y = jnp.einsum("bjrc,src->bjsc", pair, w)
    return y.reshape(b, n_blocks * k, c)[:, :length].reshape(b, length, *trailing).astype(x.dtype)


def tried_variants():
    """The variants stop 35 measured and did not adopt (module docstring)."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    from nasjax.layers.dconv import _shifted_sum

    def shared(x, tap):
        return jnp.where(True, x, jax.lax.stop_gradient(tap).astype(x.dtype))

    def make(share: bool):
        @jax.custom_jvp
        def conv(x, taps):
            return _shifted_sum(x, taps)

        @functools.partial(conv.defjvp, symbolic_zeros=True)
        def _(primals, tangents):
            x, taps = primals
            dx, dtaps = tangents
            dy = None
            if not isinstance(dx, SymbolicZero):
                dy = _shifted_sum(shared(dx, taps[0]) if share else dx, taps)
            if not all(isinstance(d, SymbolicZero) for d in dtaps):
                dtaps = tuple(
                    jnp.zeros(t.shape, t.dtype) if isinstance(d, SymbolicZero) else d for d, t in zip(dtaps, taps)
                )
                term = product_term(x, dtaps)
                dy = term if dy is None else dy + term
            y = _shifted_sum(x, taps)
            return y, jnp.zeros_like(y) if dy is None else dy

        return jax.checkpoint(conv, prevent_cse=False)

    shared_only = jax.checkpoint(lambda x, taps: _shifted_sum(shared(x, taps[0]), taps), prevent_cse=False)
    return [
        ("tried: shared input", shared_only),
        ("tried: product", make(False)),
        ("tried: product + shared input", make(True)),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="3,7,31", help="kernel widths")
    p.add_argument("--shape", default="16x64x64", help="B x L x W of the conv's input")
    p.add_argument("--repeats", type=int, default=3, help="compiles per program (the best is kept)")
    p.add_argument("--copies", type=int, default=0, help="branched copies sharing the input (0: one conv, no vmap)")
    p.add_argument("--no_tried", action="store_true", help="leave out the versions stop 35 tried")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nasjax import xla_options
    from nasjax.layers import dconv
    from nasjax.layers.dconv import _causal_depthwise, _copies_checkpointed, _shifted_sum

    shape = tuple(int(v) for v in args.shape.split("x"))
    copies = (args.copies,) if args.copies else ()
    options = xla_options.auto(jax.default_backend())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, input {args.shape}, copies {args.copies}, options {options}"
    )
    head = ["k", "version", "residual arrays", "forward compile ms", "backward compile ms", "forward run ms"]
    head += ["backward run ms", "same bits (y, dx, dtaps)", "max abs diff (dx, dtaps)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in (int(v) for v in args.kernels.split(",")):
        taps = tuple(jnp.asarray(rng.normal(size=copies + shape[2:]), jnp.float32) for _ in range(k))
        versions = [("plain autodiff", _shifted_sum), ("nasjax", _causal_depthwise)]
        versions += [] if args.no_tried else tried_variants()
        if args.copies:
            versions = [(name, jax.vmap(f, in_axes=(None, 0), out_axes=-2)) for name, f in versions]
            versions[1] = ("vmap of nasjax's conv (stops 34-35)", versions[1][1])
            picked = dconv._shares_tangent(x, taps)
            versions[2:2] = [
                (
                    f"nasjax: one conv with copies, {form}" + (" (picked)" if shared == picked else ""),
                    functools.partial(lambda x, taps, shared: _copies_checkpointed(x, taps, shared), shared=shared),
                )
                for shared, form in ((True, "shared"), (False, "per tap"))
            ]
        g = jnp.asarray(rng.normal(size=jax.eval_shape(versions[0][1], x, taps).shape), jnp.float32)
        results = [(name, measure(f, x, taps, g, options, args.repeats)) for name, f in versions]
        plain = results[0][1]
        for name, r in results:
            same = "/".join("yes" if np.array_equal(a, b) else "no" for a, b in zip(r["values"], plain["values"]))
            diff = [float(np.max(np.abs(r["values"][i] - plain["values"][i]))) for i in (1, 2)]
            cells = [str(k), name, str(r["residuals"])]
            cells += [f"{r[c]:.{0 if 'compile' in c else 3}f}" for c in head[3:7]]
            print("| " + " | ".join(cells + [same, f"{diff[0]:.1e} / {diff[1]:.1e}"]) + " |")


if __name__ == "__main__":
    main()
