"""LTS on this machine: front extraction speed, then front members vs depth-scaled baselines.

    python benchmarks/lts_search.py --workdir=runs/bench_lts                 # CPU space, this CPU
    python benchmarks/lts_search.py --workdir=runs/bench_lts --preset=gpt2   # the paper's space (a GPU)

1. Runs ``nasjax search`` with configs/search/lts.py (the preset) and reports the
   wall time of front extraction, architectures measured per second and the front size.
2. Trains 3 front members (lowest latency, median latency, most decoder params) and the
   hand-designed depth-scaled baselines (homogeneous widths ``--baseline_*``, depths
   ``--baseline_layers``) with one identical recipe on the Shakespeare corpus, measures
   their latency with the same protocol, and reports for every baseline whether a front
   member reaches its validation loss at a lower latency (the paper's claim, §3(e)).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.config import apply_overrides, load_config_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_lts")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--iterations", type=int, default=-1, help="override search.iterations (-1 keeps the preset's)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each trained model")
    p.add_argument("--baseline_d_model", type=int, default=128)
    p.add_argument("--baseline_d_inner", type=int, default=512)
    p.add_argument("--baseline_n_head", type=int, default=4)
    p.add_argument("--baseline_layers", default="2,4,6")
    args = p.parse_args()

    from nasjax.genome.stack import StackGenome, StackSpace, baseline_genomes
    from nasjax.measure.hardware import measure_hardware
    from nasjax.search.journal import read_journal
    from nasjax.search.lts import front_records
    from nasjax.search.lts_validate import _train
    from nasjax.search.run import _build_data, run_search
    from nasjax.train.run import make_mesh

    cfg = load_config_file(os.path.join(ROOT, f"configs/search/lts.py:{args.preset}"))
    overrides = {"train.steps": args.steps}
    if args.iterations >= 0:
        overrides["search.iterations"] = args.iterations
    cfg = apply_overrides(cfg, overrides)
    t0 = time.time()
    summary = run_search(cfg, args.workdir)
    wall = time.time() - t0
    recs = read_journal(os.path.join(args.workdir, "journal.jsonl"), log=lambda *a: None)
    measured = [r for r in recs if r["event"] == "measured"]
    seconds = sum(r["seconds"] for r in recs if r["event"] == "iteration")
    front = sorted(front_records(measured, cfg.lts.selection, cfg.lts.memory), key=lambda r: r["latency_s"])
    print("\n| metric | value |\n|---|---|")
    print(f"| backend | {measured[0].get('backend') if measured else '?'} |")
    print(f"| architectures measured (all runs) | {len(measured)} |")
    print(f"| rejected (constraints / errors) | {len([r for r in recs if r['event'] == 'failed'])} |")
    print(f"| front extraction time (sum over iterations) | {seconds / 60:.1f} min |")
    print(f"| architectures scored per second | {len(measured) / max(seconds, 1e-9):.2f} |")
    print(
        f"| median compile seconds per architecture | {statistics.median(r['compile_seconds'] for r in measured):.2f} |"
    )
    print(f"| front size | {len(front)} |")
    print(f"| this run's wall time | {wall / 60:.1f} min ({summary.status}) |")

    space = StackSpace.from_config(cfg.lts.space)
    picks = {front[0]["id"]: front[0], front[len(front) // 2]["id"]: front[len(front) // 2]}
    most = max(front, key=lambda r: r["decoder_params"])
    picks[most["id"]] = most
    layers = [int(x) for x in args.baseline_layers.split(",")]
    bases = baseline_genomes(space, args.baseline_d_model, args.baseline_d_inner, args.baseline_n_head, layers)
    mesh, rules = make_mesh(cfg)
    tokenizer, data = _build_data(cfg, args.workdir, log=lambda *a: None)
    rows = []
    models = [(f"front #{i}", StackGenome.from_dict(r["genome"])) for i, r in picks.items()]
    models += [(f"baseline {g.n_layer} layers", g) for g in bases]
    for label, g in models:
        spec = space.decode(
            g, vocab_size=tokenizer.vocab_size, max_len=max(int(cfg.data.seq_len), int(cfg.lts.seq_len))
        )
        hw = measure_hardware(
            spec,
            int(cfg.lts.seq_len),
            batch=int(cfg.lts.batch),
            repeats=int(cfg.lts.latency_repeats),
            programs=str(cfg.lts.programs),
        )
        loss, train_s = _train(spec, cfg, data, mesh, rules)
        rows.append((label, space.decoder_params(g), hw.latency_s, hw.peak_memory_bytes, loss, train_s))
        print(f"trained {label}: val loss {loss:.4f}, latency {hw.latency_s * 1e3:.2f} ms", flush=True)
    print(f"\nequal recipe: {cfg.train.steps} steps x batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens")
    print("| model | decoder params | latency ms | peak MiB | val loss | train s |\n|---|---|---|---|---|---|")
    for label, n, lat, mem, loss, train_s in rows:
        print(f"| {label} | {n:,} | {lat * 1e3:.2f} | {mem / 2**20:.1f} | {loss:.4f} | {train_s:.0f} |")
    print()
    fronts = [r for r in rows if r[0].startswith("front")]
    for b in (r for r in rows if r[0].startswith("baseline")):
        better = [f for f in fronts if f[4] <= b[4] and f[2] < b[2]]
        verdict = (
            f"yes: {better[0][0]} (loss {better[0][4]:.4f}, {b[2] / better[0][2]:.2f}x faster)" if better else "no"
        )
        print(f"{b[0]} (loss {b[4]:.4f}, {b[2] * 1e3:.2f} ms): front member with <= loss at lower latency? {verdict}")


if __name__ == "__main__":
    main()
