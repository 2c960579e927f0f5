"""Population-level packing: k same-shape models trained by one vmapped step vs k separate steps.

    python benchmarks/packing.py --models=vanilla,gpt2 --k=1,2,4,8 --steps=10

Where candidates of a search share a shape *and* a program (the same architecture under
several seeds: re-training a search's winner and its baseline, `primer_search.py
--retrain_seeds`; several subnets of one shape), their train steps can run as one
program: ``jax.vmap`` of nasjax's train step over stacked train states and batches.
This measures whether that is faster than running the k steps one after the other, for
the tiny zoo models (where per-op overhead dominates) and a wider one.

For each model and k: compile seconds of the packed step, median step time, tokens/s
summed over the k models, and the speed-up over k separate steps of the unpacked
program (k x its median step time). Random byte tokens, batch 16 x 128 per model,
AdamW, float32, one device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nasjax import sharding as shd  # noqa: E402
from nasjax.config import base_config  # noqa: E402
from nasjax.models import get_spec  # noqa: E402
from nasjax.train.loop import Trainer  # noqa: E402


def _median_step(fn, state, batch, steps: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vanilla,gpt2")
    p.add_argument("--k", default="1,2,4,8")
    p.add_argument("--width", type=int, default=0, help="d_model (0: the tiny preset's 64)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = base_config().train
    cfg.batch_size, cfg.steps = args.batch, 10**6
    ks = [int(k) for k in args.k.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch} x {args.seq_len} per model\n")
    print("| model | k | compile s | step ms | tokens/s (all k) | speed-up vs k separate steps |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        extra = dict(d_model=args.width, n_heads=4, d_ff=4 * args.width) if args.width else {}
        spec = get_spec(name, "tiny", vocab_size=262, max_len=args.seq_len, **extra)
        rng = np.random.default_rng(0)
        single_ms = None
        for k in ks:
            trainers = [Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=i, seq_len=args.seq_len) for i in range(k)]
            states = [t.init_state() for t in trainers]
            x = rng.integers(0, 262, size=(k, args.batch, args.seq_len + 1)).astype(np.int32)
            batch = {
                "inputs": x[..., :-1],
                "targets": x[..., 1:],
                "weights": np.ones((k, args.batch, args.seq_len), np.float32),
            }
            step = trainers[0]._train_step
            if k == 1:
                fn, state, b = step, states[0], {n: v[0] for n, v in batch.items()}
            else:
                fn = jax.vmap(step)
                state = jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *states)
                b = batch
            compile_s, step_s = _median_step(fn, state, b, args.steps)
            if k == 1:
                single_ms = step_s * 1e3
            tok_s = k * args.batch * args.seq_len / step_s
            speedup = f"{k * single_ms / (step_s * 1e3):.2f}x" if single_ms else "-"
            print(f"| {name} | {k} | {compile_s:.1f} | {step_s * 1e3:.1f} | {tok_s:,.0f} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
