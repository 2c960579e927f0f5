"""A small OP-NAS run on CPU, and an honest check of what it found.

    python benchmarks/autobert_search.py --minutes=25                 # search, then re-check
    python benchmarks/autobert_search.py --minutes=0 --recheck_seeds=3 # re-check an existing run

1. Runs (or resumes) ``nasjax search --config=configs/search/autobert.py:tiny`` in
   ``--workdir`` for ``--minutes`` of wall time, then prints the search's own view: the
   evaluations, failures, reuses, the best candidate vs the BERT seed (#0), and the UCB
   table.
2. Search fitness is not a fair comparison under BIWS: later children start from a
   supernet that earlier children trained, the BERT seed from a fresh one. So the best
   found and the BERT seed are retrained *from scratch* with the same per-candidate
   budget over ``--recheck_seeds`` init seeds, and both are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.search.autobert import AutoBertEvaluator, AutoBertSpace, autobert_fitness, load_tasks  # noqa: E402
from nasjax.search.journal import read_journal  # noqa: E402
from nasjax.search.results import export_results  # noqa: E402
from nasjax.search.run import _build_data, run_search  # noqa: E402
from nasjax.train.run import make_mesh  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_autobert_search")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--recheck_seeds", type=int, default=3)
    args = p.parse_args()
    cfg = load_config_file(os.path.join(ROOT, f"configs/search/autobert.py:{args.preset}"))
    cfg = apply_overrides(cfg, {"search.max_evaluations": 100000})
    if args.minutes > 0:
        t0 = time.time()
        run_search(apply_overrides(cfg, {"search.max_seconds": args.minutes * 60}), args.workdir)
        print(f"search wall time this run: {time.time() - t0:.0f}s")
    summary = export_results(args.workdir, log=lambda *_: None)
    print(summary.leaderboard)
    recs = read_journal(os.path.join(args.workdir, "journal.jsonl"))
    done = [r for r in recs if r["event"] in ("finished", "failed")]
    fresh = [r for r in done if r["event"] == "finished" and r.get("cached_from") is None]
    print(
        f"\n{len(done)} evaluations: {len(fresh)} trained, {sum(r['event'] == 'failed' for r in done)} failed, "
        f"{sum(r.get('cached_from') is not None for r in done)} reused; "
        f"compile {sum(r.get('compile_seconds') or 0 for r in done):.0f}s, "
        f"train {sum(r.get('train_seconds') or 0 for r in done):.0f}s, "
        f"probe {sum(r.get('probe_seconds') or 0 for r in done):.0f}s"
    )
    stages = {}
    for r in done:
        if r["event"] == "failed":
            stages[r.get("stage")] = stages.get(r.get("stage"), 0) + 1
    if stages:
        print("failures by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
    props = {r["id"]: r for r in recs if r["event"] == "proposed"}
    if summary.best_id is None:
        return
    header = next(r for r in recs if r["event"] == "search")
    cfg = apply_overrides(load_config_file(os.path.join(ROOT, f"configs/search/autobert.py:{args.preset}")), {})
    for key, value in header["config"]["autobert"].items():
        cfg.autobert[key] = tuple(value) if isinstance(value, list) else value
    mesh, rules = make_mesh(cfg)
    tokenizer, data = _build_data(cfg, args.workdir, lambda *_: None)
    tasks = load_tasks(cfg, tokenizer, log=lambda *_: None)
    space = AutoBertSpace(cfg, tokenizer.vocab_size)
    ev = AutoBertEvaluator(cfg, data, tasks, mesh, rules, log=print)
    result_of = {r["id"]: r for r in done}
    pick = {"bert seed (#0)": 0, f"best found (#{summary.best_id})": summary.best_id}
    print(f"\nre-check from scratch (no BIWS), {args.recheck_seeds} init seeds, same budget as the search:\n")
    print(
        "| candidate | layout | search fitness | from-scratch fitness | MLM loss | "
        + " | ".join(n for n, _ in tasks)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(tasks))
    for label, cid in pick.items():
        genome = space.genome_from_json(props[cid]["genome"])
        spec = space.decode(genome)
        fits, losses, accs = [], [], {n: [] for n, _ in tasks}
        for seed in range(args.recheck_seeds):
            ev.cfg = apply_overrides(cfg, {"seed": seed})
            pre = ev.pretrain(spec)
            ft = ev.finetune(spec, pre["params"])
            fits.append(autobert_fitness(ft["accuracy"], pre["mlm_loss"], float(cfg.autobert.mlm_weight)))
            losses.append(pre["mlm_loss"])
            for n, v in ft["accuracy"].items():
                accs[n].append(v)
        ms = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"  # noqa: E731
        sf = result_of[cid].get("fitness")
        print(
            f"| {label} | {genome.layout} | {sf if sf is None else round(sf, 4)} | {ms(fits)} | {ms(losses)} | "
            + " | ".join(ms(v) for v in accs.values())
            + " |"
        )
        print(f"\n{label}:\n{space.render(genome)}\n")
    snapshot = next((r for r in reversed(recs) if r["event"] == "ucb"), None)
    if snapshot:
        rows = sorted(snapshot["table"].items(), key=lambda kv: -(kv[1]["u"] if kv[1]["u"] is not None else math.inf))
        print("| op | N_i | mu_i | u_i |\n|---|---|---|---|")
        for op, st in rows:
            print(f"| {op} | {st['n']} | {st['mu']:.3f} | {'inf' if st['u'] is None else round(st['u'], 3)} |")
    print(json.dumps({"status": json.load(open(os.path.join(args.workdir, "status.json")))}, indent=None))


if __name__ == "__main__":
    main()
