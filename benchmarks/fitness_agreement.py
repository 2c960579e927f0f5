"""Do two settings give a search the same fitness? Every candidate trained under both.

    python benchmarks/fitness_agreement.py --journal=runs/s1/journal.jsonl \\
        --a=train.segmented_layout=shaped --b=train.segmented_layout=flat --candidates=16

A setting that changes only how a step is computed (program layout, pieces, fusion)
changes a candidate's fitness by float rounding, and a search's trajectory can then
diverge from its first close call on: two whole searches with one seed each cannot
tell rounding from a real change. This script holds the candidates fixed instead. It
takes the first ``--candidates`` candidates that the search in ``--journal`` trained
(the tiny Primer preset's space, ``configs/search/primer.py:tiny`` plus ``--set``), and
trains each through the whole budget (no hurdle stops) under setting A and under
setting B, each side in its own subprocess with a fresh persistent cache, as the search
evaluates them (:class:`~nasjax.search.evaluate.TrainingEvaluator`: check, probe, train,
fitness on the fixed validation batches after every band).

Prints, per candidate, the fitness after each band under A and B, and then:

* the median and largest |B - A| of the final fitness, against the spread of fitness
  across candidates (the signal a search ranks by);
* the Spearman rank correlation of the final fitness, and the number of candidate
  pairs that A and B order differently (tournament selections that could flip);
* hurdle decisions that would flip: the (candidate, hurdle) pairs where the journal
  recorded a threshold and A and B fall on different sides of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.candidate_overhead import parse_settings, tiny_evaluator  # noqa: E402


def trained_candidates(journal: str, n: int) -> tuple[list[int], dict[int, list]]:
    """The first ``n`` ids the search trained, and the hurdle thresholds it recorded per id."""
    from nasjax.search.journal import read_journal

    records = read_journal(journal, log=lambda *a: None)
    thresholds: dict[int, list] = {}
    for r in records:
        if r["event"] == "started":  # a resumed search trains a candidate again: its last run counts
            thresholds[r["id"]] = []
        elif r["event"] == "hurdle":
            band = thresholds.setdefault(r["id"], [])
            band.extend([None] * (int(r["hurdle"]) + 1 - len(band)))
            band[int(r["hurdle"])] = r.get("threshold")
    ids = [
        r["id"]
        for r in records
        if r.get("cached_from") is None
        and (r["event"] == "finished" or (r["event"] == "failed" and r.get("stage") == "train"))
    ]
    ids = sorted(set(ids))[:n]
    return ids, {i: thresholds.get(i, []) for i in ids}


def side(args) -> None:
    """One setting: trains the candidates and writes {id: hurdle fitness or failure} to --out."""
    import jax

    from nasjax.search.evaluate import CandidateFailed
    from nasjax.search.journal import read_journal

    overrides = parse_settings(args.set + args.side_set)
    overrides["compile_cache_dir"] = tempfile.mkdtemp(prefix="nasjax_agree_cache_")  # fresh: nothing shared
    _, space, evaluator = tiny_evaluator(ROOT, overrides, tempfile.mkdtemp(prefix="nasjax_agree_"))
    proposals = {r["id"]: r for r in read_journal(args.journal, log=lambda *a: None) if r["event"] == "proposed"}
    out, t0 = {}, time.perf_counter()
    for cid in json.loads(args.ids):
        try:
            spec = space.decode(space.genome_from_json(proposals[cid]["genome"], f"journal id {cid}"))
            evaluator.check(spec)
            outcome = evaluator.train(spec, [None] * evaluator.n_hurdles)
            out[cid] = {"hurdle_fitness": outcome.hurdle_fitness}
        except CandidateFailed as e:
            out[cid] = {"failed": str(e)}
        except Exception as e:  # e.g. a genome this tree's space no longer decodes: one row, not the run
            out[cid] = {"failed": f"{type(e).__name__}: {e}"[:300]}
    out["_wall"] = time.perf_counter() - t0
    out["_jax"] = jax.__version__
    with open(args.out, "w") as f:
        json.dump(out, f)


def compare(ids, thresholds, a: dict, b: dict, label_a: str, label_b: str) -> None:
    print(f"\nA: {label_a}\nB: {label_b}\n")
    print("| candidate | fitness per band, A | fitness per band, B | final B - A |")
    print("|---|---|---|---|")
    fa, fb, flips, decisions = [], [], [], 0
    for cid in ids:
        ra, rb = a[str(cid)], b[str(cid)]
        if "failed" in ra or "failed" in rb:
            print(f"| #{cid} | {ra.get('failed') or ''} | {rb.get('failed') or ''} | one failed |")
            continue
        ha, hb = ra["hurdle_fitness"], rb["hurdle_fitness"]
        fa.append(ha[-1])
        fb.append(hb[-1])
        cells = [" / ".join(f"{x:.5f}" for x in h) for h in (ha, hb)]
        print(f"| #{cid} | {cells[0]} | {cells[1]} | {hb[-1] - ha[-1]:+.2e} |")
        for j, thr in enumerate(thresholds.get(cid, [])):
            if thr is None or j >= min(len(ha), len(hb)):
                continue
            decisions += 1
            if (ha[j] <= thr) != (hb[j] <= thr):
                flips.append((cid, j, ha[j], hb[j], thr))
    if len(fa) < 2:
        print("\nfewer than two candidates trained under both settings")
        return
    diffs = sorted(abs(y - x) for x, y in zip(fa, fb))
    median = statistics.median(diffs)
    spread = statistics.stdev(fa)
    swapped = sum(1 for i in range(len(fa)) for j in range(i + 1, len(fa)) if (fa[i] - fa[j]) * (fb[i] - fb[j]) < 0)
    pairs = len(fa) * (len(fa) - 1) // 2
    print(f"\ncandidates trained under both: {len(fa)}")
    print(f"final fitness |B - A|: median {median:.2e}, largest {diffs[-1]:.2e}")
    print(f"spread of the final fitness across candidates (standard deviation, A): {spread:.4f}")
    from nasjax.search.lts_validate import spearman  # ties get average ranks; nan below 3

    print(f"Spearman rank correlation of the final fitness: {spearman(fa, fb):.4f}")
    print(f"candidate pairs ordered differently: {swapped} of {pairs}")
    print(f"hurdle decisions that flip at the journal's thresholds: {len(flips)} of {decisions}")
    for cid, j, x, y, thr in flips:
        print(f"  #{cid} hurdle {j}: A {x:.5f}, B {y:.5f}, threshold {thr:.5f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--journal", required=True, help="journal.jsonl of a finished tiny Primer search")
    p.add_argument("--a", action="append", default=[], help="KEY=VALUE (repeatable): setting A")
    p.add_argument("--b", action="append", default=[], help="KEY=VALUE (repeatable): setting B")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE (repeatable): for both sides")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--json_out", default="", help="also write both sides' results here")
    p.add_argument("--_side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side_set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--ids", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._side:
        side(args)
        return
    if not os.path.exists(args.journal):
        sys.exit(f"--journal: no such file {args.journal!r}")
    ids, thresholds = trained_candidates(args.journal, args.candidates)
    if len(ids) < 2:
        sys.exit(f"{args.journal}: fewer than two trained candidates")
    results = {}
    for name, settings in (("a", args.a), ("b", args.b)):
        out = os.path.join(tempfile.mkdtemp(prefix="nasjax_agree_out_"), f"{name}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_side", f"--journal={args.journal}"]
        cmd += [f"--set={s}" for s in args.set] + [f"--side_set={s}" for s in settings]
        cmd += [f"--ids={json.dumps(ids)}", f"--out={out}"]
        print(f"side {name.upper()}: {', '.join(settings) or 'preset settings'} ({len(ids)} candidates)", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        with open(out) as f:
            results[name] = json.load(f)
        print(f"  {results[name]['_wall']:.0f} s (jax {results[name]['_jax']})", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"ids": ids, "thresholds": thresholds, **results}, f)
    label = lambda s: ", ".join(args.set + s) or "preset settings"  # noqa: E731
    compare(ids, thresholds, results["a"], results["b"], label(args.a), label(args.b))


if __name__ == "__main__":
    main()
