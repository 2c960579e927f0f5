"""XLA compile options for a search's segmented pieces: compile and run time per program kind.

    python benchmarks/piece_compile_options.py --journal=runs/s1/journal.jsonl
    python benchmarks/piece_compile_options.py --journal=J --candidates=20 \
        --options='default=;noemit=xla_cpu_use_fusion_emitters=false;O1=xla_backend_optimization_level=1'

Replays candidates of a finished tiny Primer search's journal (``configs/search/primer.py:tiny``,
from the 13th proposal on: the first 12 are the seed population) through a fresh
:class:`~nasjax.search.evaluate.TrainingEvaluator` (persistent compile cache off), each
checked and trained to the full budget, and keeps every program its segmented trainers
compile (``SegmentedSteps._finish``). Then compiles each kept program once under every
option set of ``--options`` (``NAME=OPTIONS`` separated by ``;``, OPTIONS as
``train.segmented_xla_options`` takes them, ``name=value,...``; an empty set is XLA's
defaults), the sets' order rotated from program to program, and runs each compiled
program (median of 5 calls) on inputs of its shapes: integers 0 (token ids), floats drawn
uniformly from [0.5, 1.5) (positive, so logarithms, roots and divisions stay finite).
Prints per program kind (the lowered module's name: ``jit_forward`` / ``jit_backward``
are the layer pieces, ``jit__leaf_updates`` the update programs) the count, the fusions
(kernels) of the first set's compile, and per option set the summed compile wall seconds,
the summed process CPU seconds of those compiles and the summed run milliseconds (one
call of each program: roughly what one train step spends in them, for the programs a
step runs once).

Every compile is a real one: jax's in-memory caches are cleared before each
(``Lowered.compile`` returns the executable it compiled earlier for equal options, among
them the replay's own), and the persistent cache is off.
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

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax.search.evaluate import CandidateFailed
    from nasjax.search.journal import read_journal
    from nasjax.train.segmented import SegmentedSteps

    kept, real = [], SegmentedSteps._finish

    def keep(self, lowered, options=None):
        kept.append(lowered)
        return real(self, lowered, options)

    _, space, evaluator = tiny_evaluator(ROOT, {"compile_cache_dir": "none"}, tempfile.mkdtemp(prefix="nasjax_opts_"))
    proposals = {r["id"]: r for r in read_journal(journal, log=lambda *a: None) if r["event"] == "proposed"}
    seen = set()
    SegmentedSteps._finish = keep
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
        SegmentedSteps._finish = real
    return kept


def inputs_for(lowered, rng):
    import jax
    import jax.numpy as jnp

    def value(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(rng.uniform(0.5, 1.5, size=a.shape), a.dtype)
        return jnp.zeros(a.shape, a.dtype)

    leaves, tree = jax.tree.flatten(lowered.args_info)
    return jax.tree.unflatten(tree, [value(a) for a in leaves])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--journal", required=True)
    p.add_argument("--candidates", type=int, default=16, help="proposals replayed, from the 13th on")
    p.add_argument("--options", default="default=;noemit=xla_cpu_use_fusion_emitters=false")
    args = p.parse_args()
    sets = option_sets(args.options)
    import jax
    import numpy as np

    kept = capture(args.journal, args.candidates)
    names, rng = list(sets), np.random.default_rng(0)
    rows = collections.defaultdict(lambda: collections.defaultdict(float))
    for i, lowered in enumerate(kept):
        kind = (re.search(r"module @(\S+)", lowered.as_text()[:2000]) or [None, "?"])[1]
        rows[kind]["n"] += 1
        inputs = inputs_for(lowered, rng)
        k = i % len(names)
        for name in names[k:] + names[:k]:
            jax.clear_caches()  # else equal options (the replay's own among them) return the earlier executable
            t, c = time.perf_counter(), time.process_time()
            compiled = lowered.compile(dict(sets[name]))
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
    head = ["kind", "programs", f"fusions ({names[0]})"] + [f"{n}: compile s / CPU s / run ms" for n in names]
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
