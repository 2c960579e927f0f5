"""The attention core alone (scores, causal softmax, mixing), nasjax vs PyTorch, forward and forward+backward.

    python benchmarks/attention_core.py                  # the zoo's tiny and small shapes
    python benchmarks/attention_core.py --shapes=16x4x128x16

Times ``nasjax.layers.attention.abz_attention("softmax", q, k, v, mask=causal_mask(L))``
(the code every softmax head runs: two batched einsums over [B, H, L, K] and a float32
masked softmax) under ``jax.jit``, and the same computation written the plain PyTorch
way (``q @ k^T``, ``masked_fill``, ``softmax``, ``@ v``), with the same thread count.
The backward is the gradient of sum(out^2) with respect to q, k and v. Median of
``--repeats`` calls after warm-up. It tells whether the attention core explains a gap
between ``benchmarks/vs_torch.py``'s whole train steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

# B x H x L x K of the zoo's tiny (d_model 64, 4 heads) and small (512, 8 heads) models at
# benchmarks/vs_torch.py's batch and sequence.
SHAPES = {"tiny": "16x4x128x16", "small": "8x8x256x64"}


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall ms of ``repeats`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,small", help="comma-separated: tiny, small or BxHxLxK")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, {args.threads} threads\n")
    print("| shape BxHxLxK | nasjax fwd ms | torch fwd ms | nasjax fwd+bwd ms | torch fwd+bwd ms | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|")
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        row = _measure(name, args.repeats)
        print("| " + " | ".join(row) + " |")
    print("\n(fwd+bwd ratio: torch time / nasjax time, > 1 = nasjax faster.)")


def _measure(name: str, repeats: int) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from nasjax.layers.attention import abz_attention, causal_mask

    b, h, length, k = (int(x) for x in SHAPES.get(name, name).split("x"))
    rng = np.random.default_rng(0)
    q, kk, v = (rng.standard_normal((b, h, length, k)).astype(np.float32) for _ in range(3))
    mask = causal_mask(length)

    def core(q, k, v):
        return abz_attention("softmax", q, k, v, mask=mask)

    fwd = jax.jit(core)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(core(q, k, v) ** 2), argnums=(0, 1, 2)))
    jq, jk, jv = (jnp.asarray(x) for x in (q, kk, v))
    j_fwd = _median_ms(lambda: fwd(jq, jk, jv).block_until_ready(), repeats)
    j_bwd = _median_ms(lambda: jax.block_until_ready(grad(jq, jk, jv)), repeats)

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, kk, v))
    tmask = torch.tensor(np.asarray(mask)).reshape(length, length)
    scale = 1.0 / float(np.sqrt(k))

    def t_core():
        s = (tq @ tk.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(~tmask, float("-inf")), -1) @ tv

    def t_fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        (t_core() ** 2).sum().backward()

    with torch.no_grad():
        t_fwd = _median_ms(t_core, repeats)
    t_bwd = _median_ms(t_fwd_bwd, repeats)
    return [
        f"{name} ({b}x{h}x{length}x{k})",
        f"{j_fwd:.2f}",
        f"{t_fwd:.2f}",
        f"{j_bwd:.2f}",
        f"{t_bwd:.2f}",
        f"{t_bwd / j_bwd:.2f}x",
    ]


if __name__ == "__main__":
    main()
