"""Primer's causal depthwise conv as a train-step piece: plain autodiff against the checkpoint.

    python benchmarks/dconv_residuals.py
    python benchmarks/dconv_residuals.py --kernels=31 --shape=16x64x64 --repeats=3

``nasjax.layers.dconv`` sums ``shift_right(x, i) * tap_i`` under ``jax.checkpoint``
(``_causal_depthwise``). Without it (``_shifted_sum`` differentiated as it is), reverse-mode
autodiff keeps k - 1 shifted copies of the input for the backward. For each kernel width
the script compiles the two programs the segmented trainer compiles for a piece: the
forward as ``jax.vjp`` (its residuals are outputs) and the backward as that vjp applied to
a cotangent, each jitted with the pieces' XLA options (``nasjax.xla_options.auto``), with
jax's caches cleared before each compile. Prints per version the residual arrays, the
compile seconds (best of ``--repeats``), the run time of one call (median of 50), and
whether the output, the input gradient and the tap gradients are the same bits as plain
autodiff's.
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
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nasjax import xla_options
    from nasjax.layers.dconv import _causal_depthwise, _shifted_sum

    shape = tuple(int(v) for v in args.shape.split("x"))
    options = xla_options.auto(jax.default_backend())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    print(f"jax {jax.__version__}, {jax.default_backend()}, input {args.shape}, options {options}")
    head = ["k", "version", "residual arrays", "forward compile ms", "backward compile ms", "forward run ms"]
    head += ["backward run ms", "same bits (y, dx, dtaps)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in (int(v) for v in args.kernels.split(",")):
        taps = tuple(jnp.asarray(rng.normal(size=shape[2:]), jnp.float32) for _ in range(k))
        plain = measure(_shifted_sum, x, taps, g, options, args.repeats)
        checkpointed = measure(_causal_depthwise, x, taps, g, options, args.repeats)
        for name, r in (("plain autodiff", plain), ("checkpoint (nasjax)", checkpointed)):
            same = "/".join("yes" if np.array_equal(a, b) else "no" for a, b in zip(r["values"], plain["values"]))
            cells = [str(k), name, str(r["residuals"])]
            cells += [f"{r[c]:.{0 if 'compile' in c else 3}f}" for c in head[3:7]]
            print("| " + " | ".join(cells + [same]) + " |")


if __name__ == "__main__":
    main()
