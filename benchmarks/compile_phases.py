"""Where a Primer search's compiling goes: XLA compile seconds per phase and per program kind.

    python benchmarks/compile_phases.py --journal=runs/s1/journal.jsonl
    python benchmarks/compile_phases.py --journal=runs/s1/journal.jsonl --set=search.probe=model
    python benchmarks/compile_phases.py --journal=runs/s1/journal.jsonl --before=34977b1

Replays the candidates of a finished search's journal (``configs/search/primer.py:tiny``
settings plus ``--set`` overrides; the journal must come from that preset's space) through
a fresh :class:`~nasjax.search.evaluate.TrainingEvaluator` in this process, persistent
compile cache off, as the search evaluated them: each candidate's check (parameter count,
init, probe), then its training, stopped at the first hurdle when the journal says it
stopped there. Identical genomes and recorded failures before training are skipped as
the search skipped them.

What JAX reports of its compiles (lowering and XLA's compile, the events that
``nasjax.compile_meter`` counts) is attributed to a phase:

* ``init``: the candidate's initial parameters (``nasjax.train.state.initial_params``);
* ``check``: the rest of the check (the probe; with ``search.probe=steps`` this includes
  compiling the candidate's train-step pieces);
* ``train``: training and validation.

and, for ``train.segmented``, the wall seconds of the pieces compiled, by kind (layer
pieces, updates, embedding, heads). Prints the first candidate apart (a process's
warm-up) and the totals. ``--before=REF`` replays with the code of git ref REF (a
temporary worktree; this script only patches functions that older trees have too).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.candidate_overhead import parse_settings, tiny_evaluator  # noqa: E402

EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--journal", required=True)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE (repeatable): a setting of the replay")
    p.add_argument("--before", default="", help="replay with the code of this git ref")
    args = p.parse_args()
    if args.before:
        from benchmarks.candidate_overhead import checkout

        with checkout(args.before) as tree:
            replay(args, tree)
    else:
        replay(args, ROOT)


def replay(args, root: str):
    sys.path.insert(0, root)

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import jax.monitoring

    phase = ["other"]
    seconds, programs = collections.defaultdict(float), collections.defaultdict(int)

    def listen(event, duration, **kwargs):
        if event in EVENTS:
            seconds[phase[0]] += duration
            programs[phase[0]] += event == EVENTS[1]

    jax.monitoring.register_event_duration_secs_listener(listen)

    import nasjax.train.segmented as segmented
    import nasjax.train.state as state
    from nasjax.search.evaluate import CandidateFailed
    from nasjax.search.journal import read_journal

    real_init, real_program = state.initial_params, segmented._program
    kinds = collections.defaultdict(lambda: [0, 0.0])

    init_wall = [0.0]

    def timed_init(*a, **k):
        outer, phase[0] = phase[0], "init"
        t = time.perf_counter()
        try:
            return real_init(*a, **k)
        finally:
            phase[0] = outer
            init_wall[0] += time.perf_counter() - t

    def counted_program(key, build):
        program, dt = real_program(key, build)
        if dt > 0:
            kind = key[0] if key[0] != "instruction" else ("piece backward" if "backward" in key else "piece forward")
            kinds[kind][0] += 1
            kinds[kind][1] += dt
        return program, dt

    state.initial_params, segmented._program = timed_init, counted_program

    overrides = parse_settings(args.set)
    work = tempfile.mkdtemp(prefix="nasjax_phases_")
    cfg, space, evaluator = tiny_evaluator(root, {**overrides, "compile_cache_dir": "none"}, work)

    records = read_journal(args.journal, log=lambda *a: None)
    proposals = {r["id"]: r for r in records if r["event"] == "proposed"}
    results = {r["id"]: r for r in records if r["event"] in ("finished", "failed")}
    rows, t0 = [], time.perf_counter()
    for cid in sorted(proposals):
        rec = results.get(cid)
        if rec is None or "identical genome" in str(rec.get("reason") or ""):
            continue
        if rec["event"] == "failed" and rec.get("stage") in ("decode", "params"):
            continue
        spec = space.decode(space.genome_from_json(proposals[cid]["genome"], f"journal id {cid}"))
        seconds.clear()
        programs.clear()
        try:
            phase[0] = "check"
            evaluator.check(spec)
            if rec.get("cached_from") is None:
                phase[0] = "train"
                stop = rec.get("stopped_at_hurdle") is not None
                evaluator.train(spec, [-1e9 if stop else None] * evaluator.n_hurdles)
        except CandidateFailed:
            pass
        phase[0] = "other"
        rows.append((cid, dict(seconds), dict(programs)))
    wall = time.perf_counter() - t0

    def line(label, picked):
        total = collections.defaultdict(float)
        count = collections.defaultdict(int)
        for _, s, n in picked:
            for k, v in s.items():
                total[k] += v
                count[k] += n.get(k, 0)
        cells = [f"{total[k]:.1f} s / {count[k]}" for k in ("init", "check", "train")]
        print(f"| {label} | {len(picked)} | " + " | ".join(cells) + f" | {sum(total.values()):.1f} |")

    code = f"{args.before or 'this tree'}: {os.path.dirname(os.path.dirname(segmented.__file__))}"
    print(
        f"\nreplay of {args.journal} ({code}; {', '.join(args.set) or 'preset settings'}); wall {wall:.0f} s,"
        f" of it initial parameters {init_wall[0]:.1f} s"
    )
    print("| candidates | n | init: XLA s / programs | check | train | XLA compile s |")
    print("|---|---|---|---|---|---|")
    line("first", rows[:1])
    line("the others", rows[1:])
    line("all", rows)
    if kinds:
        print("\n| piece kind | compiled | wall s |\n|---|---|---|")
        for kind, (n, s) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
            print(f"| {kind} | {n} | {s:.1f} |")


if __name__ == "__main__":
    main()
