"""Candidates per hour: inline engine vs Ray with 1 and 2 actors, and Ray's overhead per evaluation.

    python benchmarks/engine_overhead.py --evaluations=12

Runs the same small Primer search (Shakespeare, bytes, 1-layer d_model 64 seed, 30
steps per candidate, 1 hurdle) from scratch in fresh workdirs:

* ``inline``  (search.in_flight=1, engine=inline)
* ``ray x1``  (search.in_flight=1, engine=ray, 1 actor)
* ``inline N=2`` and ``ray x2`` (search.in_flight=2; 2 actors)

and prints wall time, candidates per hour, and Ray's overhead per evaluation: the
difference in evaluation wall time between ``ray x1`` and ``inline`` divided by the
number of evaluations, after subtracting the actors' one-off start (reported apart).
It also checks that each Ray run evaluated the same architectures as the inline run
with the same ``in_flight``. Each mode gets its own compile cache folder, so none profits
from another's compilations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.search.journal import read_journal  # noqa: E402
from nasjax.search.run import run_search  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def evaluated(workdir: str) -> dict:
    recs = read_journal(os.path.join(workdir, "journal.jsonl"))
    props = {r["id"]: r["hash"] for r in recs if r["event"] == "proposed"}
    return {
        r["id"]: (props[r["id"]], round(r.get("fitness") or 0.0, 4))
        for r in recs
        if r["event"] in ("finished", "failed")
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_engine")
    p.add_argument("--evaluations", type=int, default=12)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    root = os.path.abspath(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)

    import ray

    def cfg(name, **kw):
        base = {
            "data.corpus": "shakespeare",
            "data.seq_len": 64,
            "train.batch_size": 8,
            "train.steps": args.steps,
            "train.warmup_steps": 3,
            "search.hurdles": 1,
            "search.population_size": 4,
            "search.tournament_size": 2,
            "search.max_evaluations": args.evaluations,
            "search.d_model": 64,
            "search.n_layers": 1,
            "search.n_heads": 2,
            "search.d_ff": 128,
            "search.val_batches": 4,
            "compile_cache_dir": os.path.join(root, f"xla_{name}"),
        }
        base.update(kw)
        return apply_overrides(load_config_file(os.path.join(ROOT, "configs/search/primer.py:tiny")), base)

    modes = [
        ("inline", {}, 1),
        ("ray x1", {"engine": "ray", "ray_actors": 1}, 1),
        ("inline N=2", {"search.in_flight": 2}, 2),
        ("ray x2", {"engine": "ray", "ray_actors": 2, "search.in_flight": 2}, 2),
    ]
    rows = []
    for name, kw, n in modes:
        workdir = os.path.join(root, name.replace(" ", "_").replace("=", ""))
        startup = 0.0
        if kw.get("engine") == "ray":
            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
            startup = time.perf_counter() - t0
        logs = []
        t0 = time.perf_counter()
        summary = run_search(cfg(name.split()[0] + str(n), **kw), workdir, log=logs.append)
        wall = time.perf_counter() - t0
        actors = next((line for line in logs if line.startswith("Ray engine")), "")
        if kw.get("engine") == "ray":
            ray.shutdown()
        rows.append(
            {
                "mode": name,
                "in_flight": n,
                "evaluations": summary.evaluations,
                "wall_s": wall,
                "ray_init_s": startup,
                "per_hour": summary.evaluations / (wall / 3600),
                "compile_s": summary.compile_seconds + summary.probe_seconds,
                "train_s": summary.train_seconds,
                "actors": actors,
                "set": evaluated(workdir),
            }
        )
        print(f"{name}: {summary.evaluations} evaluations in {wall:.1f}s (+{startup:.1f}s ray.init)", flush=True)

    print()
    print(f"{'mode':<12} {'N':>2} {'evals':>5} {'wall s':>8} {'cand/h':>8} {'compile+probe s':>15} {'train s':>8}")
    for r in rows:
        print(
            f"{r['mode']:<12} {r['in_flight']:>2} {r['evaluations']:>5} {r['wall_s']:>8.1f} {r['per_hour']:>8.0f} "
            f"{r['compile_s']:>15.1f} {r['train_s']:>8.1f}"
        )
    by = {r["mode"]: r for r in rows}
    overhead = (by["ray x1"]["wall_s"] - by["inline"]["wall_s"]) / max(by["inline"]["evaluations"], 1)
    print(f"\nRay overhead per evaluation (ray x1 - inline, actor start included): {overhead:+.2f} s")
    same1 = by["ray x1"]["set"] == by["inline"]["set"]
    same2 = by["ray x2"]["set"] == by["inline N=2"]["set"]
    print(f"same architectures and fitness: ray x1 == inline: {same1}; ray x2 == inline N=2: {same2}")
    with open(os.path.join(root, "engine_overhead.json"), "w") as f:
        json.dump(
            {
                "rows": [{k: v for k, v in r.items() if k != "set"} for r in rows],
                "overhead_s": overhead,
                "same_inline_ray1": same1,
                "same_inline_ray2": same2,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
