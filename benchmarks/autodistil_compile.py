"""What does compiling one program per subnet shape cost a SuperLM run? (AutoDistil, issue 6)

    python benchmarks/autodistil_compile.py --steps=60

nasjax runs each sampled subnet at its own static shape (one jitted gradient program per
distinct subnet, cached for the run) instead of masking a full-size model. This script
trains one SuperLM of a random-init teacher (the cost does not depend on the weights)
with sandwich sampling for ``--steps`` steps and prints: distinct subnets compiled,
total and per-subnet compile time, the steady step time once a step's subnets are all
compiled, and what a masked fixed-shape implementation would cost per step (M times the
full-size subnet's gradient step, since every sampled subnet would run at full shape).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nasjax.genome.autodistil import largest, scaled_subspaces  # noqa: E402
from nasjax.models import build, get_spec  # noqa: E402
from nasjax.search.superlm import SuperLMTrainer, sandwich  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--subspace", default="small")
    args = p.parse_args()
    teacher = get_spec(
        "bert",
        "tiny",
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        d_ff=4 * args.d_model,
        max_len=args.seq_len,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    params = nn.meta.unbox(build(teacher).init(jax.random.key(0), jnp.zeros((1, args.seq_len), jnp.int32))["params"])
    (space,) = scaled_subspaces(teacher, [args.subspace])
    subnets = space.subnets()
    trainer = SuperLMTrainer(teacher, params, subnets, lr=1e-3, steps=args.steps, relation_heads=4)
    state = trainer.init()
    rng = np.random.default_rng(0)
    seen, steady, all_steps = set(), [], []
    t_start = time.perf_counter()
    for _ in range(args.steps):
        tokens = rng.integers(6, teacher.vocab_size, size=(args.batch, args.seq_len)).astype(np.int32)
        batch = {"inputs": tokens, "padding_mask": np.ones_like(tokens, bool)}
        draw = sandwich(trainer.subnets, 4, 0, state.step)
        warm = all(s in seen for s in draw)
        t0 = time.perf_counter()
        trainer.step(state, batch)
        dt = time.perf_counter() - t0
        all_steps.append(dt)
        if warm:
            steady.append(dt)
        seen.update(draw)
    total = time.perf_counter() - t_start
    big = largest(trainer.subnets)
    fn = trainer._grad_fn(big)
    tok = jnp.asarray(batch["inputs"])
    mask = jnp.asarray(batch["padding_mask"])
    t_qkv = trainer._teacher_qkv(tok, mask)
    jax.block_until_ready(fn(state.params, tok, mask, t_qkv))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state.params, tok, mask, t_qkv))
        times.append(time.perf_counter() - t0)
    full = statistics.median(times)
    print(f"devices: {jax.devices()}")
    print(
        f"teacher {args.layers} x {args.d_model}, {args.heads} heads; sub-space {space.name}: {len(subnets)} subnets; "
        f"batch {args.batch} x {args.seq_len}; {args.steps} sandwich steps (M=4)\n"
    )
    print("| metric | value |\n|---|---|")
    print(f"| distinct subnets compiled | {trainer.compiled_subnets} |")
    share = trainer.compile_seconds / total
    print(f"| compile time, total | {trainer.compile_seconds:.1f} s ({share:.0%} of {total:.1f} s) |")
    print(f"| compile time per subnet shape | {trainer.compile_seconds / max(trainer.compiled_subnets, 1):.2f} s |")
    print(
        f"| steady step (all 4 subnets compiled; {len(steady)} steps) | "
        f"{statistics.median(steady) * 1e3 if steady else float('nan'):.1f} ms |"
    )
    print(f"| full-size subnet gradient step | {full * 1e3:.1f} ms |")
    print(f"| masked fixed-shape estimate (4 x full-size) | {4 * full * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
