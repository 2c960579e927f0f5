"""One program per model vs shared pieces (``train.segmented``): compile and step time per candidate.

    python benchmarks/segmented_step.py
    python benchmarks/segmented_step.py --candidates=16 --steps=60 --versions=layer,subprogram,instruction

The tiny Primer preset's shapes (2 layers x d_model 64, batch 16 x sequence 64, byte
vocabulary): the vanilla seed, then a chain of mutations (seed 0), each built as a
search's trainer twice, in one process with the persistent cache off:

* ``one program``: ``train.segmented=false`` with the flat AdamW (what the preset ran
  before), its train and eval steps compiled per model;
* ``layer``, ``subprogram``, ``instruction``: ``train.segmented=true`` with that
  ``train.segmented_pieces``; pieces found in the registry (the embedding, head, norm and
  update pieces after the first model; with ``subprogram`` / ``instruction`` also the
  program pieces a child shares with earlier programs) cost nothing.

Per candidate: compile seconds (train and eval steps, as ``Trainer.compile_seconds``
counts them), the median step time over ``--steps`` steps, and the first step's loss of
each (equal up to rounding). The two are timed alternately, candidate by candidate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--versions", default="one,layer,subprogram,instruction", help="comma-separated, in timing order")
    args = p.parse_args()

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax import sharding as shd
    from nasjax.config import apply_overrides, load_config_file
    from nasjax.search.run import make_space
    from nasjax.train.loop import Trainer

    cfg = load_config_file(os.path.join(ROOT, "configs/search/primer.py:tiny"))
    vocab, batch_size, seq_len = 262, int(cfg.train.batch_size), int(cfg.data.seq_len)
    space = make_space(cfg, vocab)
    mesh = shd.make_mesh((-1, 1, 1))
    rules = shd.rules_from_config(cfg.mesh.rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32)}
    known = {"one": {"train.segmented": False, "train.flat_optimizer": True}}
    for pieces in ("layer", "subprogram", "instruction"):
        known[pieces] = {"train.segmented": True, "train.flat_optimizer": False, "train.segmented_pieces": pieces}
    names = [v.strip() for v in args.versions.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown:
        raise SystemExit(f"unknown versions {unknown}; known: {', '.join(known)}")
    versions = {v: known[v] for v in names}
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {args.steps} steps per model\n")
    print("| candidate | version | compile s (train + eval) | step ms (median) | first loss |")
    print("|---|---|---|---|---|")
    genome, totals = space.seeds()[0][1], {v: ([], []) for v in versions}
    for c in range(args.candidates):
        spec = space.decode(genome)
        genome = space.mutate(genome, rng)[0]
        for name, overrides in versions.items():
            train_cfg = apply_overrides(cfg, overrides).train
            trainer = Trainer(spec, train_cfg, mesh, rules, seed=0, seq_len=seq_len)
            state = trainer.init_state()
            batch = shd.shard_batch(host, mesh)
            trainer.compile(state, batch)
            trainer._eval_fn(batch)
            state, metrics = trainer.step(state, host)
            first = float(metrics["loss"])
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = trainer.step(state, host)
                float(metrics["loss"])
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            totals[name][0].append(trainer.compile_seconds)
            totals[name][1].append(ms)
            print(f"| {c} | {name} | {trainer.compile_seconds:.2f} | {ms:.2f} | {first:.6f} |", flush=True)
    print("\n| version | compile s, first candidate | compile s, later ones (mean) | step ms (median of medians) |")
    print("|---|---|---|---|")
    for name, (compiles, steps) in totals.items():
        later = statistics.mean(compiles[1:]) if len(compiles) > 1 else float("nan")
        print(f"| {name} | {compiles[0]:.2f} | {later:.2f} | {statistics.median(steps):.2f} |")


if __name__ == "__main__":
    main()
