"""Primer's causal depthwise conv as a train-step piece: plain autodiff, stop 34's checkpoint, nasjax today.

    python benchmarks/dconv_residuals.py
    python benchmarks/dconv_residuals.py --kernels=31 --shape=16x64x64 --repeats=3
    python benchmarks/dconv_residuals.py --copies=4      # branched copies sharing the input

Three versions of the conv, each differentiated by reverse mode:

* ``plain autodiff``: ``_shifted_sum`` as it is; autodiff keeps k - 1 shifted copies of
  the input for the backward;
* ``stop 34``: the sum under ``jax.checkpoint`` (the backward keeps the input and the taps
  and shifts the input again), the taps' gradients as k reductions;
* ``nasjax``: ``nasjax.layers.dconv._causal_depthwise`` (stop 35): kernels of at least
  ``BLOCK_MIN_TAPS`` taps take the taps' gradients from one product, and branched copies
  sum their shared input's gradients once rather than once per tap.

``--copies=N`` runs N copies with their own taps on one shared input (``jax.vmap`` over
the taps, as a branched learned op does); the cotangent has the copies' axis. For each
kernel width the script compiles the two programs the segmented trainer compiles for a
piece: the forward as ``jax.vjp`` (its residuals are outputs) and the backward as that
vjp applied to a cotangent, each jitted with the pieces' XLA options
(``nasjax.xla_options.auto``), with jax's caches cleared before each compile. Prints per
version the residual arrays, the compile seconds (best of ``--repeats``), the run time of
one call (median of 50), whether the output, the input gradient and the taps' gradients
are the same bits as plain autodiff's, and the largest difference of the gradients from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _median_ms(fn, *args, n: int = 50) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


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
        "forward run ms": _median_ms(forward, taps, x),
        "backward run ms": _median_ms(backward, vjp, g),
        "values": (np.asarray(y), np.asarray(g_x), np.stack([np.asarray(t) for t in g_taps])),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="3,7,31", help="kernel widths")
    p.add_argument("--shape", default="16x64x64", help="B x L x W of the conv's input")
    p.add_argument("--repeats", type=int, default=3, help="compiles per program (the best is kept)")
    p.add_argument("--copies", type=int, default=0, help="branched copies sharing the input (0: one conv, no vmap)")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nasjax import xla_options
    from nasjax.layers.dconv import _causal_depthwise, _shifted_sum

    stop34 = jax.checkpoint(_shifted_sum, prevent_cse=False)  # stop 34's version, for comparison
    shape = tuple(int(v) for v in args.shape.split("x"))
    copies = (args.copies,) if args.copies else ()
    options = xla_options.auto(jax.default_backend())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=copies + shape), jnp.float32)
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, input {args.shape}, copies {args.copies}, options {options}"
    )
    head = ["k", "version", "residual arrays", "forward compile ms", "backward compile ms", "forward run ms"]
    head += ["backward run ms", "same bits (y, dx, dtaps)", "max abs diff (dx, dtaps)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in (int(v) for v in args.kernels.split(",")):
        taps = tuple(jnp.asarray(rng.normal(size=copies + shape[2:]), jnp.float32) for _ in range(k))
        versions = [("plain autodiff", _shifted_sum), ("stop 34", stop34), ("nasjax", _causal_depthwise)]
        if args.copies:
            versions = [(name, jax.vmap(f, in_axes=(None, 0))) for name, f in versions]
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
