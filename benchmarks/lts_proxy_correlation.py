"""Does decoder-parameter count rank architectures like training does? (LTS, methods.md §3(c))

    python benchmarks/lts_proxy_correlation.py --workdir=runs/bench_lts_val              # 30 archs, CPU space
    python benchmarks/lts_proxy_correlation.py --workdir=runs/bench_lts_val --n=60 --steps=1000

Trains ``--n`` random architectures of the CPU-sized LTS space (configs/search/lts.py:cpu)
on the Shakespeare corpus with one identical recipe, then prints the Spearman rank
correlation of every proxy (decoder params, total params, XLA FLOPs, grad_norm,
synflow, jacob_cov, snip) with validation loss. Resumable: rerun to finish an
interrupted run. The paper's released benchmark gives 0.95-0.99 for decoder params.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.search.lts_validate import validate_proxies  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_lts_val")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    args = p.parse_args()
    cfg = load_config_file(os.path.join(ROOT, f"configs/search/lts.py:{args.preset}"))
    cfg = apply_overrides(
        cfg,
        {
            "lts.validate_architectures": args.n,
            "train.steps": args.steps,
            "train.batch_size": args.batch_size,
            "data.seq_len": args.seq_len,
        },
    )
    t0 = time.time()
    summary = validate_proxies(cfg, args.workdir)
    print(f"\n{summary.n} architectures trained for {args.steps} steps (batch {args.batch_size} x {args.seq_len})")
    print(f"wall time {time.time() - t0:.0f}s (this run)\n")
    print("| proxy | Spearman vs -val loss |\n|---|---|")
    for name, value in sorted(summary.correlations.items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else -9)):
        print(f"| {name} | {value:.3f} |")
    print("\nwrote " + ", ".join(summary.files))


if __name__ == "__main__":
    main()
