"""Where a small zoo model's train step loses to PyTorch on some CPUs: the backward's weight-gradient matmuls.

    python benchmarks/weight_grad_matmuls.py                  # the matmul forms, the small zoo's shapes
    python benchmarks/weight_grad_matmuls.py --split=vanilla  # and the step split into its parts

Stop 37 found the vanilla small step at 0.96x of PyTorch's on a Zen 3 CPU (AVX2 only;
docs/benchmarks.md). This script takes that apart in two tables, each timed by the median
of ``--repeats`` calls after one warm-up (the split's parts, ~3 s steps, by half as many per
round), both frameworks on ``--threads`` threads, float32:

* ``--split=MODEL`` (a zoo model, size small: batch 8 x 256, vocabulary 32,768): the
  forward and loss alone, forward and backward (value and gradients, no optimizer), and
  the whole train step (``benchmarks/train_throughput.py``'s Trainer step, and
  ``benchmarks/torch_reference.py``'s eager step), nasjax next to PyTorch, interleaved
  over ``--rounds`` rounds. The differences give the backward's and the optimizer's share.
* the matmuls of the small models' backward, at their shapes (tokens N = 2,048, width D =
  512, d_ff 2,048, vocabulary 32,768), each as a jitted ``jnp`` expression and as the same
  ``torch`` expression:

  - the tied output projection's forward (``x @ emb.T``) and its input gradient;
  - its weight gradient ``dy.T @ x`` (the contraction runs over the leading axis of both
    operands), and the same product computed as ``(x.T @ dy).T`` with the small operand's
    transpose and the product kept apart (``lax.optimization_barrier``), so that XLA
    multiplies row-major operands and transposes the result in a kernel of its own;
  - a dense layer's weight gradient ``x.T @ g``, as it is and with ``x.T`` materialised.

  The last column is the largest difference from the plain form (a reordered sum).

Measurement only: nasjax's layers compute their gradients by autodiff, as the plain forms do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.attention_core import _median_ms  # noqa: E402

N, D, FF, V = 2048, 512, 2048, 32768  # the small zoo's tokens per step, width, d_ff, vocabulary


def median_ms(fn, repeats: int) -> float:
    """Median wall ms of ``repeats`` calls after one warm-up (the products take ~0.5 s each)."""
    return _median_ms(fn, repeats, warmup=1)


def matmul_forms():
    """(name, flops, operands key, jax function, torch function or None, the plain form's name or None) per row."""
    barrier = lax.optimization_barrier

    def transposed_lhs(a, b):  # a.T @ b: the contraction over the leading axis of both (jnp or torch)
        return a.T @ b

    def materialised(a, b):  # the same with a.T written out first
        return barrier(a.T) @ b

    def plain(name, flops, key, fn):  # the same expression in both frameworks
        return (name, flops, key, fn, fn, None)

    def variant(of, name, fn):  # another jax form of row ``of``, compared with it
        return (name, of[1], of[2], fn, None, of[0])

    head_grad = plain("tied head weight grad: dy.T @ x", 2 * N * D * V, "dy_x", transposed_lhs)
    dense_x = plain("dense weight grad: x.T @ g (D x FF)", 2 * N * D * FF, "x_g", transposed_lhs)
    dense_h = plain("dense weight grad: h.T @ g (FF x D)", 2 * N * D * FF, "h_gd", transposed_lhs)
    return [
        plain("tied head forward: x @ emb.T", 2 * N * D * V, "x_emb", lambda x, e: x @ e.T),
        plain("tied head input grad: dy @ emb", 2 * N * D * V, "dy_emb", lambda g, e: g @ e),
        head_grad,
        variant(head_grad, "  the same as (x.T @ dy).T, apart", lambda g, x: barrier(barrier(x.T) @ g).T),
        dense_x,
        variant(dense_x, "  the same with x.T materialised", materialised),
        dense_h,
        variant(dense_h, "  the same with h.T materialised", materialised),
    ]


def operands(rng):
    def r(*shape):
        return rng.standard_normal(shape, np.float32)

    x, e, dy, g, h, gd = r(N, D), r(V, D), r(N, V), r(N, FF), r(N, FF), r(N, D)
    return {"x_emb": (x, e), "dy_emb": (dy, e), "dy_x": (dy, x), "x_g": (x, g), "h_gd": (h, gd)}


def matmul_table(repeats: int, torch) -> None:
    ops = operands(np.random.default_rng(0))
    print("| product | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s | max abs diff from the plain form |")
    print("|---|---|---|---|---|---|")
    plain = {}
    for name, flops, which, jfn, tfn, base in matmul_forms():
        a, b = (jnp.asarray(o) for o in ops[which])
        f = jax.jit(jfn)
        out = np.asarray(f(a, b))
        j_ms = median_ms(lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), repeats)
        if base is None:
            plain[name] = out
            diff = "-"
        else:
            diff = f"{np.abs(out - plain[base]).max():.1e}"
        if tfn is not None:
            ta, tb = (torch.from_numpy(o) for o in ops[which])
            t_ms = median_ms(lambda tfn=tfn, ta=ta, tb=tb: tfn(ta, tb), repeats)
            t_cells = f"{t_ms:.1f} | {flops / t_ms / 1e6:.0f}"
        else:
            t_cells = "- | -"
        print(f"| {name} | {j_ms:.1f} | {flops / j_ms / 1e6:.0f} | {t_cells} | {diff} |", flush=True)


def split_table(model: str, rounds: int, repeats: int, threads: int, torch) -> None:
    import torch.nn.functional as F

    from benchmarks import torch_reference, train_throughput
    from nasjax import sharding as shd
    from nasjax.models.transformer import build
    from nasjax.models.zoo import get_spec
    from nasjax.train.step import forward_loss

    batch, seq, vocab = 8, 256, V
    spec = get_spec(model, "small", vocab_size=vocab, max_len=seq)
    mesh = shd.make_mesh((-1, 1, 1))
    j_step, _ = train_throughput.make_stepper(spec, batch, seq, "float32", mesh, shd.DEFAULT_RULES)
    t_step, _ = torch_reference.make_stepper(spec, batch, seq, threads)

    flax_model = build(spec)
    tokens = np.random.default_rng(0).integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    jb = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "weights": jnp.ones((batch, seq), jnp.float32),
    }
    params = flax_model.init(jax.random.PRNGKey(0), jb["inputs"])["params"]

    def loss(p, b):
        return forward_loss(flax_model, "lm", p, b, jax.random.PRNGKey(0), True)[0]

    j_fwd, j_grad = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    torch_model = torch_reference.TorchDecoder(spec, seq)
    tt = torch.as_tensor(tokens).long()
    ti, tg = tt[:, :-1].contiguous(), tt[:, 1:].contiguous()

    def t_loss():
        return F.cross_entropy(torch_model(ti).reshape(-1, vocab), tg.reshape(-1))

    def t_fwd():
        with torch.no_grad():
            t_loss()

    def t_grad():
        for q in torch_model.parameters():
            q.grad = None
        t_loss().backward()

    parts = {
        "forward and loss": (lambda: jax.block_until_ready(j_fwd(params, jb)), t_fwd),
        "forward and backward": (lambda: jax.block_until_ready(j_grad(params, jb)), t_grad),
        "train step (with clipping and AdamW)": (None, None),
    }
    times = {k: ([], []) for k in parts}
    for _ in range(rounds):
        for k, (jf, tf) in parts.items():
            if jf is None:
                times[k][0].extend(j_step(repeats))
                times[k][1].extend(t_step(repeats))
            else:
                times[k][0].append(median_ms(jf, repeats) / 1e3)
                times[k][1].append(median_ms(tf, repeats) / 1e3)
    print(f"{model} small, batch {batch} x {seq}, {rounds} rounds:\n")
    print("| part | nasjax ms | torch ms | nasjax / torch time |")
    print("|---|---|---|---|")
    med = {k: (statistics.median(a) * 1e3, statistics.median(b) * 1e3) for k, (a, b) in times.items()}
    for k, (j, t) in med.items():
        print(f"| {k} | {j:.0f} | {t:.0f} | {j / t:.2f} |")
    keys = list(med)
    differences = (("backward (difference)", keys[1], keys[0]), ("clipping and AdamW (difference)", keys[2], keys[1]))
    for label, hi, lo in differences:
        j, t = med[hi][0] - med[lo][0], med[hi][1] - med[lo][1]
        print(f"| {label} | {j:.0f} | {t:.0f} | {j / t:.2f} |" if t > 0 else f"| {label} | {j:.0f} | {t:.0f} | - |")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="", help="a zoo model whose small train step to take apart (e.g. vanilla)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the split")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    from nasjax import hostmem

    hostmem.for_training()  # the heap setting of `nasjax train`, before jax starts its backend
    import torch

    torch.set_num_threads(args.threads)
    versions = f"jax {jax.__version__} | torch {torch.__version__}"
    print(f"# {jax.devices()[0].device_kind} | {versions} | {args.threads} threads\n")
    if args.split:
        split_table(args.split, args.rounds, max(1, args.repeats // 2), args.threads, torch)
    matmul_table(args.repeats, torch)


if __name__ == "__main__":
    main()
