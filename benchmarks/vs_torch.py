"""nasjax train-step throughput next to the plain PyTorch reference of the same model (issue 8).

    python benchmarks/vs_torch.py                          # vanilla, primer_ez, gpt2 x tiny, small
    python benchmarks/vs_torch.py --models=gpt2 --sizes=tiny --widths=128,256,512

For each model: the nasjax train step (``benchmarks/train_throughput.py``'s stepper:
one jitted step with AdamW and clipping, after 2 warm-up steps) and the PyTorch eager
step of ``benchmarks/torch_reference.py`` (built from the same spec, parameter count
checked equal), same batch, sequence and thread count, in this process. The two are
timed interleaved: ``--rounds`` rounds of ``--steps`` nasjax steps then ``--steps``
PyTorch steps, so that a slow minute on a shared machine slows both alike. Prints the
median tokens/s of both over all their steps, the median over rounds of the per-round
ratio nasjax / PyTorch (with its lowest and highest round), and MFU against each
framework's own measured matmul peak. ``--widths`` replaces the zoo sizes
by 4-layer, 4-head models of those d_model (d_ff 4 d), byte vocabulary.

On a GPU (``--device=cuda``; ``auto``, the default, takes the GPU when both JAX and
PyTorch see one) both run there, PyTorch's steps timed to ``torch.cuda.synchronize``;
``--dtype=bfloat16`` runs nasjax with bfloat16 activations and PyTorch under autocast
(float32 parameters in both), and the matmul peaks in that dtype. ``--sizes=base`` adds
the ~110M-parameter zoo models (batch 8 x 512), for the GPU.

    python benchmarks/vs_torch.py --device=cuda --dtype=bfloat16 --sizes=small,base
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torch_reference  # noqa: E402
import train_throughput  # noqa: E402

from nasjax import hostmem  # noqa: E402
from nasjax import sharding as shd  # noqa: E402
from nasjax.measure.flops import flops_per_token  # noqa: E402
from nasjax.models import get_spec  # noqa: E402

SIZES = {"tiny": (16, 128, 262), "small": (8, 256, 32768), "base": (8, 512, 32768)}


def specs(args):
    for name in args.models.split(","):
        if args.widths:
            for d in (int(w) for w in args.widths.split(",")):
                spec = get_spec(name, "tiny", vocab_size=262, max_len=128, d_model=d, n_layers=4, n_heads=4, d_ff=4 * d)
                yield name, f"L4 d{d}", spec, 16, 128
        else:
            for size in args.sizes.split(","):
                batch, seq, vocab = SIZES[size]
                yield name, size, get_spec(name, size, vocab_size=vocab, max_len=seq), batch, seq


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vanilla,primer_ez,gpt2")
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--widths", default="", help="4-layer models of these d_model instead of the zoo sizes")
    p.add_argument("--steps", type=int, default=5, help="steps per framework per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="auto", help="PyTorch's device: cpu, cuda[:N], auto (cuda where JAX has a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    hostmem.for_training()  # the heap setting of `nasjax train`, before jax starts its backend
    torch.set_num_threads(args.threads)
    backend = jax.default_backend()
    device = args.device
    if device == "auto":
        device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    device = torch_reference.device_of(device)
    if (device.type == "cuda") != (backend == "gpu"):
        raise SystemExit(
            f"PyTorch on {device}, JAX on {backend}: not the same hardware (set --device or JAX_PLATFORMS)"
        )
    n = 8192 if device.type == "cuda" else 1024
    jax_peak = train_throughput.measure_matmul_peak(jnp.dtype(args.dtype), n)
    torch_peak = torch_reference.matmul_peak(n, device=device, dtype=args.dtype)
    print(
        f"# {jax.devices()[0].device_kind} x{jax.device_count()} | jax {jax.__version__} | torch {torch.__version__}"
        f" on {device} | {args.threads} threads | {args.dtype}"
    )
    print(
        f"# matmul peak (best of {n // 2}, {n}, {2 * n} square): jax {jax_peak / 1e9:.0f} GFLOP/s, "
        f"torch {torch_peak / 1e9:.0f} GFLOP/s\n"
    )
    mesh = shd.make_mesh((-1, 1, 1))
    print(
        "| model | size | params | batch x seq | nasjax tok/s | torch tok/s | nasjax / torch (rounds min-max) "
        "| nasjax MFU | torch MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, spec, batch, seq in specs(args):
        j_run, j = train_throughput.make_stepper(spec, batch, seq, args.dtype, mesh, shd.DEFAULT_RULES)
        t_run, t = torch_reference.make_stepper(spec, batch, seq, args.threads, device, args.dtype)
        if t["params"] != j["params"]:
            raise SystemExit(f"{name} {size}: parameter counts differ ({j['params']} vs {t['params']})")
        j_times, t_times, ratios = [], [], []
        for _ in range(args.rounds):
            jr, tr = j_run(args.steps), t_run(args.steps)
            j_times += jr
            t_times += tr
            ratios.append(statistics.median(tr) / statistics.median(jr))
        j_tok = batch * seq / statistics.median(j_times)
        t_tok = batch * seq / statistics.median(t_times)
        flops = 3 * flops_per_token(spec, seq)
        print(
            f"| {name} | {size} | {j['params'] / 1e6:.2f}M | {batch}x{seq} | {j_tok:,.0f} | {t_tok:,.0f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{j_tok * flops / jax_peak:.1%} | {t_tok * flops / torch_peak:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
