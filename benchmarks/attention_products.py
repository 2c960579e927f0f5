"""Attention products with and without the CPU gradient rule (``nasjax.layers.products``).

    python benchmarks/attention_products.py                       # core shapes + tiny train steps
    python benchmarks/attention_products.py --shapes=16x4x128x16 --models=

Two tables, each timed interleaved (A, B, A, B, ... ``--rounds`` rounds) in one process,
so that a slow minute of a shared machine slows both alike:

* the attention core (``abz_attention("softmax", ...)`` with a causal mask), forward +
  backward (gradient of sum(out^2) in q, k, v) under ``jax.jit``, per B x H x L x D
  shape: the plain einsums (``products.TRANSPOSED_GRADIENTS`` empty) against the rule
  (forced on for every width, ``products.MAX_WIDTH`` lifted), and whether the rule is
  on for that width by default;
* whole train steps of zoo models (``benchmarks/train_throughput.py``'s stepper: AdamW,
  clipping, random tokens), built twice, once with the rule switched off.

Each column is the median over rounds of a round's median time. The gradients agree to
rounding (checked here on the core: max |difference| printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nasjax import hostmem  # noqa: E402
from nasjax import sharding as shd  # noqa: E402
from nasjax.layers import products  # noqa: E402
from nasjax.layers.attention import abz_attention, causal_mask  # noqa: E402
from nasjax.models import get_spec  # noqa: E402

SHAPES = "16x4x128x8,16x4x128x16,8x8x256x16,16x4x128x32,8x8x256x64,16x1x64x64"


def _with_rule(on: bool, build):
    """``build()`` traced with the rule off, or on for every width (restored after)."""
    saved = products.TRANSPOSED_GRADIENTS, products.MAX_WIDTH
    products.TRANSPOSED_GRADIENTS = frozenset({jax.default_backend()}) if on else frozenset()
    products.MAX_WIDTH = 1 << 30
    try:
        return build()
    finally:
        products.TRANSPOSED_GRADIENTS, products.MAX_WIDTH = saved


def _interleaved(fns, rounds: int, calls: int) -> list[float]:
    """Median over rounds of each fn's per-call ms, the fns alternated within a round."""
    per = [[] for _ in fns]
    for _ in range(rounds):
        for f, out in zip(fns, per):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            out.append((time.perf_counter() - t0) / calls * 1e3)
    return [statistics.median(t) for t in per]


def _core_row(shape: str, rounds: int) -> str:
    b, h, length, d = (int(x) for x in shape.split("x"))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, h, length, d)), jnp.float32) for _ in range(3))
    mask = causal_mask(length)

    def build():
        loss = lambda q, k, v: jnp.sum(abz_attention("softmax", q, k, v, mask=mask) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()

    plain, rule = _with_rule(False, build), _with_rule(True, build)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(plain(q, k, v), rule(q, k, v)))
    calls = [lambda f=f: jax.block_until_ready(f(q, k, v)) for f in (plain, rule)]
    ms = _interleaved(calls, rounds, max(1, 20 // b))
    default = "yes" if d <= products.MAX_WIDTH and jax.default_backend() in products.TRANSPOSED_GRADIENTS else "no"
    return f"| {shape} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.2f}x | {default} | {diff:.1e} |"


def core_table(shapes: list[str], rounds: int) -> None:
    print(
        "| shape BxHxLxD | einsums fwd+bwd ms | rule fwd+bwd ms | einsums / rule | rule on by default | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        print(_core_row(shape, rounds), flush=True)


def _step_row(name: str, size: str, batch: int, seq: int, rounds: int) -> str:
    import train_throughput

    spec = get_spec(name, size, vocab_size=262 if size == "tiny" else 32768, max_len=seq)
    mesh = shd.make_mesh((-1, 1, 1))

    def build():
        return train_throughput.make_stepper(spec, batch, seq, "float32", mesh, shd.DEFAULT_RULES)[0]

    runs = [_with_rule(False, build), _with_rule(True, build)]
    per = [[], []]
    for _ in range(rounds):
        for run, out in zip(runs, per):
            out.append(statistics.median(run(5)))
    a, b = (1e3 * statistics.median(t) for t in per)
    return f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |"


def step_table(models: list[str], size: str, rounds: int) -> None:
    import train_throughput

    batch, seq = train_throughput.DEFAULT_BATCH[size]
    print(f"\n| model ({size}, {batch}x{seq}) | einsums step ms | rule step ms | einsums / rule |")
    print("|---|---|---|---|")
    for name in models:
        print(_step_row(name, size, batch, seq, rounds), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="B x H x L x D shapes of the core table ('' for none)")
    p.add_argument("--models", default="vanilla,primer_ez,gpt2", help="zoo models of the step table ('' for none)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    hostmem.for_training()
    print(f"# jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cores\n")
    if args.shapes:
        core_table([s for s in args.shapes.split(",") if s], args.rounds)
    if args.models:
        step_table([m for m in args.models.split(",") if m], args.size, args.rounds)


if __name__ == "__main__":
    main()
