"""Do the probes agree? ``search.probe=steps`` (both forms) against ``search.probe=model`` on mutated programs.

    python benchmarks/probe_agreement.py --programs=150
    python benchmarks/probe_agreement.py --programs=150 --d_model=64 --n_layers=2 --seq_len=64

Draws ``--programs`` distinct Primer programs by mutating random earlier ones (seed
``--seed``; the ``configs/search/primer.py:tiny`` space at the given sizes) and probes each
both ways at the same initial parameters:

* ``model``: :func:`nasjax.measure.probe.probe_model`, op by op (batch 2, forward-mode
  causality);
* ``steps``: the candidate's own train-step pieces (:meth:`Trainer.probe`, a batch of the
  training layout, reverse-mode causality), with the rule its search used: gradients that
  are not finite leave causality to the forward-mode test;
* ``forward``: what the search runs now, two forwards through the train step's forward
  programs (:meth:`Trainer.probe_forward`, the same batch and that batch with every token
  after each row's probed position changed: :func:`probe_from_forward`), with the same
  rule for changed outputs that are not finite.

Reports the verdicts (finite, causal) that differ from the model probe's, and the functional-equivalence pairs
each probe finds (two programs whose hashes match on either rounding grid), with how
many of them are truly equivalent: their logits on another random batch agree to 1e-4 of
their scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d_model", type=int, default=16)
    p.add_argument("--n_layers", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="the training batch (the steps probe's rows)")
    args = p.parse_args()

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax import sharding as shd
    from nasjax.config import apply_overrides, load_config_file
    from nasjax.measure.probe import future_changed, probe_from_forward, probe_from_steps, probe_model, step_probe_batch
    from nasjax.models import build
    from nasjax.search.run import make_space
    from nasjax.train.loop import Trainer

    cfg = load_config_file(os.path.join(ROOT, "configs/search/primer.py:tiny"))
    overrides = {"search.d_model": args.d_model, "search.n_layers": args.n_layers, "data.seq_len": args.seq_len}
    cfg = apply_overrides(cfg, overrides)
    vocab, length = 262, args.seq_len
    space = make_space(cfg, vocab)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = shd.rules_from_config(cfg.mesh.rules)
    rng = np.random.default_rng(args.seed)
    pool, seen, specs = [space.seeds()[0][1]], set(), []
    while len(specs) < args.programs:
        genome = space.mutate(pool[rng.integers(len(pool))], rng)[0]
        key = space.genome_hash(genome)
        if key in seen:
            continue
        seen.add(key)
        pool.append(genome)
        try:
            specs.append(space.decode(genome))
        except Exception:  # a genome that does not decode: the search records it, nothing to probe
            pass
    other = np.random.default_rng(123).integers(0, vocab, (4, length)).astype(np.int32)
    rows, skipped = [], 0
    for spec in specs:
        try:
            model = probe_model(spec, seq_len=length, batch=2, seed=0, op_by_op=True)
            trainer = Trainer(spec, cfg.train, mesh, rules, 0, length, op_by_op=True)
            state = trainer.init_state()
            batch = step_probe_batch(vocab, args.batch, length)
            first = trainer.probe_forward(state.params, batch)
            changed = trainer.probe_forward(state.params, future_changed(batch, vocab))
            forward = probe_from_forward(first, changed, batch["weights"])
            if forward.causality_undecided:
                forward = dataclasses.replace(forward, causal_leak=model.causal_leak)
            steps = probe_from_steps(trainer.probe(state.params, batch), length)
            if steps.causality_undecided:
                steps = dataclasses.replace(steps, causal_leak=model.causal_leak)
            logits = np.asarray(build(spec).apply({"params": state.params}, other), np.float64)
            rows.append((model, steps, logits, steps.causality_undecided, forward))
        except Exception:  # a program that does not trace: recorded as a failure by the search
            skipped += 1

    def verdict(r):
        return (r.finite, r.finite and r.causal)

    def equivalent_pairs(which):
        out = set()
        for i, j in itertools.combinations(range(len(rows)), 2):
            a, b = rows[i][which], rows[j][which]
            if a.finite and b.finite and (a.output_hash == b.output_hash or a.output_hash_alt == b.output_hash_alt):
                out.add((i, j))
        return out

    def truly_equal(pair):
        a, b = rows[pair[0]][2], rows[pair[1]][2]
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return False
        return np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(a)), 1e-12)

    model_pairs, steps_pairs, forward_pairs = equivalent_pairs(0), equivalent_pairs(1), equivalent_pairs(4)
    print(
        f"\n{len(rows)} programs probed ({skipped} did not trace), d_model {args.d_model}, {args.n_layers} layers, "
        f"sequence {length}, jax {jax.__version__}"
    )
    differ = [sum(verdict(r[0]) != verdict(r[k]) for r in rows) for k in (1, 4)]
    print(f"- verdicts (finite, causal) that differ from the model probe's: steps {differ[0]}, forward {differ[1]}")
    print(
        f"- non-finite: {sum(not r[0].finite for r in rows)}; leaking (model probe): "
        f"{sum(r[0].finite and not r[0].causal for r in rows)}; reverse-mode undecided: {sum(r[3] for r in rows)}; "
        f"forward undecided: {sum(r[4].causality_undecided for r in rows)}"
    )
    print("\n| probe | equivalent pairs found | truly equivalent | not found by the model probe |\n|---|---|---|---|")
    for name, mine in (("model", model_pairs), ("steps", steps_pairs), ("forward", forward_pairs)):
        print(f"| {name} | {len(mine)} | {sum(map(truly_equal, mine))} | {len(mine - model_pairs)} |")


if __name__ == "__main__":
    main()
