"""XLA compile options for a search's segmented pieces: compile and run time per program kind.

    python benchmarks/piece_compile_options.py --journal=runs/s1/journal.jsonl
    python benchmarks/piece_compile_options.py --journal=J --candidates=20 \
        --options='default=;noemit=xla_cpu_use_fusion_emitters=false;O1=xla_backend_optimization_level=1'

Replays candidates of a finished tiny Primer search's journal (``configs/search/primer.py:tiny``,
from the 13th proposal on: the first 12 are the seed population) through a fresh
:class:`~nasjax.search.evaluate.TrainingEvaluator` (persistent compile cache off), each
checked and trained to the full budget, and keeps every program it lowers. Then compiles
each kept program once under every option set of ``--options`` (``NAME=OPTIONS`` separated
by ``;``, OPTIONS as ``train.segmented_xla_options`` takes them, ``name=value,...``; an
empty set is XLA's defaults), the sets' order alternating from program to program, and
runs each compiled program on zero inputs (median of 5 calls). Prints per program kind
(the lowered module's name: ``jit_forward`` / ``jit_backward`` are the layer pieces,
``jit__leaf_updates`` the update programs) the count, the fusions (kernels) in XLA's
default compile, and per option set the summed compile wall seconds, the summed process
CPU seconds of those compiles and the summed run milliseconds (one call of each program:
what one train step spends in them, roughly, for the programs a step runs once).

A program compiled twice with the same options comes from jax's in-memory cache, so each
set is made distinct by an option that does not change the code
(``xla_dump_max_hlo_modules``), keyed to the set.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.candidate_overhead import tiny_evaluator  # noqa: E402


def option_sets(text: str) -> dict[str, dict]:
    from nasjax.xla_options import parse

    out = {}
    for part in (p.strip() for p in text.split(";")):
        if part:
            name, _, options = part.partition("=")
            out[name.strip()] = parse(options, "--options")
    return out


def capture(journal: str, n: int) -> list:
    import jax
    import jax._src.stages as stages

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax.search.evaluate import CandidateFailed
    from nasjax.search.journal import read_journal

    kept, real = [], stages.Lowered.compile

    def keep(self, *a, **k):
        kept.append(self)
        return real(self, *a, **k)

    _, space, evaluator = tiny_evaluator(ROOT, {"compile_cache_dir": "none"}, tempfile.mkdtemp(prefix="nasjax_opts_"))
    proposals = {r["id"]: r for r in read_journal(journal, log=lambda *a: None) if r["event"] == "proposed"}
    seen = set()
    stages.Lowered.compile = keep
    try:
        for cid in sorted(proposals)[12 : 12 + n]:
            if proposals[cid]["hash"] in seen:
                continue
            seen.add(proposals[cid]["hash"])
            try:
                spec = space.decode(space.genome_from_json(proposals[cid]["genome"], f"#{cid}"))
                evaluator.check(spec)
                evaluator.train(spec, [-1e9] * evaluator.n_hurdles)
            except CandidateFailed:
                pass
    finally:
        stages.Lowered.compile = real
    return kept


def zeros_for(lowered):
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree.flatten(lowered.args_info)
    return jax.tree.unflatten(tree, [jnp.zeros(a.shape, a.dtype) for a in leaves])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--journal", required=True)
    p.add_argument("--candidates", type=int, default=16, help="proposals replayed, from the 13th on")
    p.add_argument("--options", default="default=;noemit=xla_cpu_use_fusion_emitters=false")
    args = p.parse_args()
    sets = option_sets(args.options)
    import jax

    kept = capture(args.journal, args.candidates)
    names = list(sets)
    rows = collections.defaultdict(lambda: collections.defaultdict(float))
    for i, lowered in enumerate(kept):
        kind = (re.search(r"module @(\S+)", lowered.as_text()[:2000]) or [None, "?"])[1]
        rows[kind]["n"] += 1
        inputs = zeros_for(lowered)
        for name in names if i % 2 == 0 else names[::-1]:
            options = dict(sets[name], xla_dump_max_hlo_modules=-1000 - names.index(name))
            t, c = time.perf_counter(), time.process_time()
            compiled = lowered.compile(options)
            rows[kind][name + " compile"] += time.perf_counter() - t
            rows[kind][name + " cpu"] += time.process_time() - c
            if name == names[0]:
                rows[kind]["fusions"] += len(re.findall(r"= \S+ fusion\(", compiled.as_text()))
            args_, kwargs = inputs
            jax.block_until_ready(compiled(*args_, **kwargs))
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(compiled(*args_, **kwargs))
                runs.append(time.perf_counter() - t)
            rows[kind][name + " run"] += statistics.median(runs)
    print(f"{len(kept)} programs of {args.candidates} proposals of {args.journal}; jax {jax.__version__}")
    head = ["kind", "programs", "fusions"] + [f"{n}: compile s / CPU s / run ms" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    total = collections.defaultdict(float)
    for kind in sorted(rows, key=lambda k: -rows[k][names[0] + " compile"]):
        r = rows[kind]
        for k, v in r.items():
            total[k] += v
        cells = [kind, str(int(r["n"])), str(int(r["fusions"]))]
        cells += [f"{r[n + ' compile']:.2f} / {r[n + ' cpu']:.2f} / {r[n + ' run'] * 1e3:.2f}" for n in names]
        print("| " + " | ".join(cells) + " |")
    cells = ["all", str(int(total["n"])), str(int(total["fusions"]))]
    cells += [f"{total[n + ' compile']:.2f} / {total[n + ' cpu']:.2f} / {total[n + ' run'] * 1e3:.2f}" for n in names]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
