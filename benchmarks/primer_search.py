"""A small Primer search on the Shakespeare corpus, and what it found.

    python benchmarks/primer_search.py --workdir=runs/bench_primer --minutes=60
    python benchmarks/primer_search.py --workdir=runs/bench_primer --minutes=60 --preset=small   # a GPU

Runs ``nasjax search`` (configs/search/primer.py, the given preset) for ``--minutes`` of
wall time (running it again resumes the same search), then prints:

1. throughput: evaluations, trained candidates per hour, reuse (identical or
   functionally equivalent programs), failure rate by stage, and the share of time
   spent compiling (train-step compile + probe) vs training;
2. best fitness over wall time;
3. whether the best program beats the vanilla seed at the same budget: both retrained
   for the full per-candidate budget (no hurdles) with ``--retrain_seeds`` fresh seeds
   (new init and data order), mean and std of the validation loss.

``--json_out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.search.journal import read_journal  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(args, **extra):
    cfg = load_config_file(os.path.join(ROOT, f"configs/search/primer.py:{args.preset}"))
    overrides = {"search.max_seconds": args.minutes * 60.0, "search.max_evaluations": args.max_evaluations}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = type(_get(cfg, key))(value) if not isinstance(_get(cfg, key), bool) else value == "true"
    overrides.update(extra)
    return apply_overrides(cfg, overrides)


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def search_stats(workdir: str) -> dict:
    recs = read_journal(os.path.join(workdir, "journal.jsonl"), log=lambda *a: None)
    t0 = recs[0]["time"]
    results = [r for r in recs if r["event"] in ("finished", "failed")]
    trained = [r for r in results if r.get("cached_from") is None and r["event"] == "finished"]
    failed = [r for r in results if r["event"] == "failed" and r.get("cached_from") is None]
    reused = [r for r in results if r.get("cached_from") is not None]
    wall = (results[-1]["time"] - t0) if results else 0.0
    compile_s = sum(float(r.get("compile_seconds") or 0) for r in results)
    probe_s = sum(float(r.get("probe_seconds") or 0) for r in results)
    train_s = sum(float(r.get("train_seconds") or 0) for r in results)
    xla_s = sum(float(r.get("xla_compile_seconds") or 0) for r in results)
    best, curve = math.inf, []
    for r in results:
        if r["event"] == "finished" and r.get("fitness") is not None and r["fitness"] < best:
            best = r["fitness"]
            curve.append((r["time"] - t0, r["id"], best))
    vanilla = next((r for r in results if r["id"] == 0 and r["event"] == "finished"), None)
    return {
        "evaluations": len(results),
        "trained": len(trained),
        "failed": len(failed),
        "reused": len(reused),
        "failure_stages": dict(collections.Counter(r.get("stage") for r in failed)),
        "wall_seconds": wall,
        "candidates_per_hour": (len(trained) + len(failed)) / max(wall / 3600, 1e-9),
        "evaluations_per_hour": len(results) / max(wall / 3600, 1e-9),
        "compile_seconds": compile_s,
        "probe_seconds": probe_s,
        "train_seconds": train_s,
        "xla_compile_seconds": xla_s,
        "compile_share": (compile_s + probe_s) / max(compile_s + probe_s + train_s, 1e-9),
        "best_curve": curve,
        "best_fitness": best,
        "best_id": curve[-1][1] if curve else None,
        "vanilla_fitness": vanilla["fitness"] if vanilla else None,
        "stopped_at_hurdle": sum(1 for r in trained if r.get("stopped_at_hurdle") is not None),
    }


def retrain(args, workdir: str, genome_id: int, seeds: list[int]) -> list[float]:
    """Full-budget validation loss of candidate ``genome_id`` for each seed (no hurdles)."""
    from nasjax import sharding as shd
    from nasjax.search.evaluate import TrainingEvaluator
    from nasjax.search.run import _build_data, make_space

    recs = read_journal(os.path.join(workdir, "journal.jsonl"), log=lambda *a: None)
    prop = next(r for r in recs if r["event"] == "proposed" and r["id"] == genome_id)
    out = []
    for seed in seeds:
        cfg = _config(args, **{"seed": seed, "search.hurdles": 0})
        tokenizer, data = _build_data(cfg, workdir, log=lambda *a: None)
        space = make_space(cfg, tokenizer.vocab_size)
        spec = space.decode(space.genome_from_json(prop["genome"]))
        mesh = shd.make_mesh(tuple(cfg.mesh.shape))
        evaluator = TrainingEvaluator(cfg, data, mesh, shd.rules_from_config(cfg.mesh.rules), log=lambda *a: None)
        out.append(evaluator.train(spec, []).fitness)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_primer")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--max_evaluations", type=int, default=100000)
    p.add_argument("--retrain_seeds", type=int, default=3)
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("--json_out", default="")
    args = p.parse_args()

    from nasjax.search.run import run_search

    t0 = time.time()
    summary = run_search(_config(args), args.workdir, log=print)
    print(f"\nsearch {summary.status} after {time.time() - t0:.0f}s\n")
    st = search_stats(args.workdir)

    print("| metric | value |\n|---|---|")
    rows = [
        ("evaluations (all)", st["evaluations"]),
        ("trained or failed candidates", st["trained"] + st["failed"]),
        ("reused (identical / equivalent)", st["reused"]),
        ("candidates per hour", f"{st['candidates_per_hour']:.0f}"),
        ("failure rate (of non-reused)", f"{st['failed'] / max(st['trained'] + st['failed'], 1):.1%}"),
        ("failures by stage", ", ".join(f"{k} {v}" for k, v in sorted(st["failure_stages"].items())) or "-"),
        ("stopped at a hurdle", st["stopped_at_hurdle"]),
        ("time compiling (step compile + probe)", f"{st['compile_share']:.0%}"),
        (
            "compile / probe / train seconds",
            f"{st['compile_seconds']:.0f} / {st['probe_seconds']:.0f} / {st['train_seconds']:.0f}",
        ),  # fmt: skip
        ("vanilla seed fitness (#0)", st["vanilla_fitness"]),
        ("best fitness", f"{st['best_fitness']:.4f} (#{st['best_id']})"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("\nbest fitness over wall time\n| minutes | candidate | best val loss |\n|---|---|---|")
    for t, cid, f in st["best_curve"]:
        print(f"| {t / 60:.1f} | #{cid} | {f:.4f} |")

    if args.retrain_seeds and st["best_id"] not in (None, 0):
        seeds = list(range(1, args.retrain_seeds + 1))
        van = retrain(args, args.workdir, 0, seeds)
        best = retrain(args, args.workdir, st["best_id"], seeds)
        st["retrain"] = {"seeds": seeds, "vanilla": van, "best": best}
        fmt = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}"
        print(f"\nretrained at the full budget, seeds {seeds}\n| model | val loss (mean ± std) | per seed |")
        print("|---|---|---|")
        print(f"| vanilla seed | {fmt(van)} | {', '.join(f'{x:.4f}' for x in van)} |")
        print(f"| best (#{st['best_id']}) | {fmt(best)} | {', '.join(f'{x:.4f}' for x in best)} |")
        wins = sum(b < v for b, v in zip(best, van))
        gain = statistics.mean(van) - statistics.mean(best)
        print(f"best beats vanilla on {wins}/{len(seeds)} seeds; mean improvement {gain:+.4f} nats/token")
    elif st["best_id"] == 0:
        print("\nno program beat the vanilla seed during the search")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(st, f, indent=2)


if __name__ == "__main__":
    main()
