"""Train-step throughput and model FLOPs utilisation (MFU) of zoo models.

    python benchmarks/train_throughput.py                      # tiny + small, vanilla/primer_ez/gpt2
    python benchmarks/train_throughput.py --sizes=tiny --steps=20 --dtype=bfloat16

For each model and size: compile time of the train step, tokens/s (median over timed
steps after warm-up), model FLOPs per token (analytic forward x 3 for forward +
backward, nasjax.measure.flops), and MFU against this machine's own measured matmul
peak (a large square matmul, timed in the same script, same dtype).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nasjax import hostmem  # noqa: E402
from nasjax import sharding as shd  # noqa: E402
from nasjax.config import base_config  # noqa: E402
from nasjax.measure.flops import flops_per_token  # noqa: E402
from nasjax.models import get_spec  # noqa: E402
from nasjax.train.loop import Trainer  # noqa: E402

DEFAULT_BATCH = {"tiny": (16, 128), "small": (8, 256), "base": (8, 512)}


def measure_matmul_peak(dtype, n: int, repeats: int = 10) -> float:
    """The machine's practical peak: best FLOP/s of square matmuls of size n/2, n and 2n.

    Best-of-repeats (not the median) and several sizes, so the peak is not
    underestimated by a noisy run; MFU is then a conservative ratio.
    """
    f = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for m in (n // 2, n, 2 * n):
        a = jnp.ones((m, m), dtype)
        f(a, a).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            best = max(best, 2 * m**3 / (time.perf_counter() - t0))
    return best


def bench_one(name, size, batch, seq_len, steps, dtype, mesh, rules):
    spec = get_spec(name, size, vocab_size=262 if size == "tiny" else 32768, max_len=seq_len)
    return bench_spec(spec, name, size, batch, seq_len, steps, dtype, mesh, rules)


def make_stepper(spec, batch, seq_len, dtype, mesh, rules):
    """``spec``'s compiled train step on random tokens: (run(n) -> n step times in s, info)."""
    cfg = base_config().train
    cfg.batch_size = batch
    cfg.steps = 10**6
    trainer = Trainer(spec, cfg, mesh, rules, seed=0, seq_len=seq_len, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.integers(0, spec.vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
    host = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": np.ones((batch, seq_len), np.float32)}
    box = {"state": trainer.init_state()}
    compile_s = trainer.compile(box["state"], shd.shard_batch(host, mesh))

    def run(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            box["state"], m = trainer.step(box["state"], host)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        return times

    run(2)  # warm-up
    return run, {"params": trainer.param_count(), "compile_s": compile_s}


def bench_spec(spec, name, size, batch, seq_len, steps, dtype, mesh, rules):
    """Compile time and median step time of ``spec``'s train step (random tokens)."""
    run, info = make_stepper(spec, batch, seq_len, dtype, mesh, rules)
    step_s = statistics.median(run(steps))
    tok_s = batch * seq_len / step_s
    train_flops_tok = 3 * flops_per_token(spec, seq_len)
    return {
        "model": name,
        "size": size,
        "params": info["params"],
        "batch": batch,
        "seq": seq_len,
        "compile_s": info["compile_s"],
        "step_ms": step_s * 1e3,
        "tok_s": tok_s,
        "tflops": tok_s * train_flops_tok / 1e12,
        "flops_tok": train_flops_tok,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vanilla,primer_ez,gpt2")
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=0, help="override the per-size batch")
    p.add_argument("--seq_len", type=int, default=0, help="override the per-size sequence length")
    p.add_argument("--peak_n", type=int, default=0, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    args = p.parse_args()
    hostmem.for_training()  # the heap setting of `nasjax train`, before jax starts its backend

    backend = jax.default_backend()
    dev = jax.devices()[0]
    n = args.peak_n or (8192 if backend in ("gpu", "tpu") else 2048)
    peak = measure_matmul_peak(jnp.dtype(args.dtype), n)
    mesh = shd.make_mesh((-1, 1, 1))
    rules = shd.DEFAULT_RULES
    print(
        f"# backend {backend} | device {dev.device_kind} x{jax.device_count()}"
        f" | {platform.processor() or platform.machine()}"
        f" | jax {jax.__version__} | dtype {args.dtype}"
    )
    print(f"# measured matmul peak (best of {n // 2}, {n}, {2 * n} square): {peak / 1e12:.3f} TFLOP/s\n")
    header = (
        "| model | size | params | batch x seq | compile s | step ms | tokens/s | train GFLOP/token "
        "| achieved TFLOP/s | MFU |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for size in args.sizes.split(","):
        b, s = DEFAULT_BATCH[size]
        b, s = args.batch or b, args.seq_len or s
        for name in args.models.split(","):
            r = bench_one(name, size, b, s, args.steps, args.dtype, mesh, rules)
            print(
                f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f}M | {b}x{s} | {r['compile_s']:.1f} "
                f"| {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {r['flops_tok'] / 1e9:.4f} | {r['tflops']:.3f} "
                f"| {100 * r['tflops'] * 1e12 / peak:.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
