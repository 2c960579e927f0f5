"""Resident memory of a Primer candidate loop in one process, with and without cache clearing.

    python benchmarks/candidate_memory.py --after=none     # also: clear | trim | both
    python benchmarks/candidate_memory.py --after=both --every=20
    python benchmarks/candidate_memory.py --override=search.op_by_op=false

Runs ``--candidates`` tiny Primer programs (the vanilla seed, then a chain of mutations
with seed 0; 1 layer at width 16, sequence 16, 8 steps) through a search's evaluator
(check + train, no controller or journal) and prints the process's resident memory
every 20 candidates. ``--after`` is what happens after each candidate: nothing,
``jax.clear_caches()`` (clear), glibc ``malloc_trim`` (trim), or both (what
``search.clear_caches=true`` does); ``--every=N`` does it after every N-th candidate only
(``search.clear_caches_every=N``). ``--override=KEY=VALUE`` (repeatable) changes a setting
of the preset (e.g. ``search.op_by_op=false``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.candidate_overhead import parse_settings, tiny_evaluator  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--after", default="none", choices=("none", "clear", "trim", "both"))
    p.add_argument("--candidates", type=int, default=121)
    p.add_argument("--every", type=int, default=1, help="clear / trim after every N-th candidate only")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a setting (repeatable)")
    args = p.parse_args()

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax.hostmem import release_free_memory
    from nasjax.search.evaluate import CandidateFailed

    small = {"search.d_model": 16, "search.n_layers": 1, "data.seq_len": 16, "train.steps": 8}
    small.update({"search.hurdles": 0, "search.val_batches": 1, "compile_cache_dir": "none"})
    small.update(parse_settings(args.override))
    _, space, evaluator = tiny_evaluator(ROOT, small, tempfile.mkdtemp(prefix="nasjax_mem_"))
    rng = np.random.default_rng(0)
    genome = space.seeds()[0][1]
    settings = ", ".join(args.override) or "preset defaults"
    print(f"after every {args.every} candidate(s): {args.after}; {settings}\n")
    print("| candidates | resident MiB |\n|---|---|")
    for i in range(args.candidates):
        spec = space.decode(genome)
        try:
            evaluator.check(spec)
            evaluator.train(spec, [])
        except CandidateFailed:
            pass
        genome = space.mutate(genome, rng)[0]
        due = (i + 1) % max(1, args.every) == 0
        if due and args.after in ("clear", "both"):
            jax.clear_caches()
        if due and args.after in ("trim", "both"):
            release_free_memory()
        if i % 20 == 0:
            gc.collect()
            print(f"| {i} | {_rss_mib():.0f} |", flush=True)


if __name__ == "__main__":
    main()
