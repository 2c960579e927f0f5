"""AutoBERT-Zero at CPU scale: does the discovered layout help, and does BIWS speed children up?

    python benchmarks/autobert_proxy.py                       # both parts, tiny preset
    python benchmarks/autobert_proxy.py --part=layouts --seeds=3 --mlm_steps=600
    python benchmarks/autobert_proxy.py --part=biws --children=4

Part ``layouts``: BERT (standard attention in every layer) vs the AutoBERT-Zero layout
(GLU light-conv / discovered attentions alternating, kernels scaled to the sequence)
vs all-conv, each trained from scratch with one identical recipe (``--mlm_steps`` MLM
steps on the search corpus, then ``--ft_steps`` fine-tuning steps per task), over
``--seeds`` seeds. Prints MLM validation loss, task accuracies and parameter counts.

Part ``biws``: a supernet is warmed up by ``--warm`` BIWS children (seeds and mutants,
each trained ``--mlm_steps`` steps and written back), then ``--children`` new mutants
train (a) from the supernet (BIWS) and (b) from a fresh init. Prints the MLM validation
loss every ``--eval_every`` steps and the steps each needs to reach ``--target`` (default:
the loss the fresh-init children reach at the end, averaged).

All settings come from configs/search/autobert.py (``--preset``); the data is the
search's (Shakespeare + Austen by default, ``--data`` to point elsewhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.genome.autobert import seed_genome  # noqa: E402
from nasjax.measure.params import count_params  # noqa: E402
from nasjax.search.autobert import AutoBertEvaluator, AutoBertSpace, initial_supernet, load_tasks  # noqa: E402
from nasjax.search.biws import SuperNet  # noqa: E402
from nasjax.search.run import _build_data  # noqa: E402
from nasjax.train.loop import Hooks  # noqa: E402
from nasjax.train.run import make_mesh, setup_compile_cache  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def setup(args):
    cfg = load_config_file(os.path.join(ROOT, f"configs/search/autobert.py:{args.preset}"))
    overrides = {"train.steps": args.mlm_steps, "autobert.finetune_steps": args.ft_steps}
    if args.data:
        overrides["data.path"] = args.data
    if args.corpus:
        overrides["data.corpus"] = args.corpus
    cfg = apply_overrides(cfg, overrides)
    setup_compile_cache(cfg)
    mesh, rules = make_mesh(cfg)
    os.makedirs(args.workdir, exist_ok=True)
    tokenizer, data = _build_data(cfg, args.workdir, print)
    tasks = load_tasks(cfg, tokenizer)
    space = AutoBertSpace(cfg, tokenizer.vocab_size)
    return cfg, space, AutoBertEvaluator(cfg, data, tasks, mesh, rules, log=print)


def layouts(args):
    cfg, space, ev = setup(args)
    rows = {}
    for name in ("bert", "autobert_zero", "all_conv"):
        genome = seed_genome(name, space.n_layers, space.seq_len, space.kernel_sizes)
        base = space.decode(genome)
        params = count_params(base)["total"]
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            ev.cfg = apply_overrides(cfg, {"seed": seed})
            pre = ev.pretrain(base)
            ft = ev.finetune(base, pre["params"])
            rows.setdefault(name, []).append((pre["mlm_loss"], ft["accuracy"]))
            acc = " ".join(f"{k} {v:.3f}" for k, v in ft["accuracy"].items())
            dt = time.perf_counter() - t0
            print(f"{name:<14} [{genome.layout}] seed {seed}: mlm {pre['mlm_loss']:.4f} {acc} ({dt:.0f}s)")
        rows[name + ":params"] = params
    ev.cfg = cfg
    tasks = list(rows["bert"][0][1])
    print(f"\n{args.seeds} seeds, {args.mlm_steps} MLM steps + {args.ft_steps} fine-tuning steps per task\n")
    header = "| layout | params | MLM val loss | " + " | ".join(f"{t} acc" for t in tasks) + " |"
    print(header + "\n|" + "---|" * (3 + len(tasks)))
    for name in ("bert", "autobert_zero", "all_conv"):
        runs = rows[name]
        cells = [_ms([r[0] for r in runs])] + [_ms([r[1][t] for r in runs]) for t in tasks]
        print(f"| {name} | {rows[name + ':params']:,} | " + " | ".join(cells) + " |")


def _ms(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _curve(ev, spec, init, every):
    """MLM validation loss every ``every`` steps (step 0 included)."""
    trainer = ev._trainer(spec, ev.cfg.train, ev.seq_len)
    state = trainer.init_state()
    if init is not None:
        params, _ = init(jax.device_get(state.params))
        state, _ = trainer.with_params(state, params)
    val = ev._fixed_val()
    curve = [(0, trainer.evaluate(state.params, val)["val_loss"])]
    hooks = Hooks(on_eval=lambda step, v: curve.append((step, v["val_loss"])))
    state, result = trainer.fit(
        state,
        ev.data.train_iterator(),
        total_steps=int(ev.cfg.train.steps),
        hooks=hooks,
        eval_fn=lambda p: trainer.evaluate(p, val),
        eval_every=every,
        log_every=10**9,
    )
    curve.append((result.step, trainer.evaluate(state.params, val)["val_loss"]))
    return curve, jax.device_get(state.params)


def _steps_to(curve, target):
    return next((s for s, loss in curve if loss <= target), None)


def biws(args):
    cfg, space, ev = setup(args)
    kinds_of = lambda g: tuple(x.kind for x in g.layers)  # noqa: E731
    sn: SuperNet = initial_supernet(space, ev)
    rng = np.random.default_rng(args.rng)
    seeds = [seed_genome(n, space.n_layers, space.seq_len, space.kernel_sizes) for n in ("bert", "autobert_zero")]
    genomes = list(seeds)
    while len(genomes) < args.warm:
        genomes.append(space.mutate(genomes[int(rng.integers(len(genomes)))], rng)[0])
    t0 = time.perf_counter()
    for i, g in enumerate(genomes):
        pre = ev.pretrain(space.decode(g), lambda p, g=g: sn.inherit(p, kinds_of(g))[:2])
        sn.update(pre["params"], kinds_of(g))
        print(f"warm-up child {i} [{g.layout}]: mlm {pre['mlm_loss']:.4f}")
    print(f"supernet warmed by {len(genomes)} children in {time.perf_counter() - t0:.0f}s\n")
    children = []
    while len(children) < args.children:
        children.append(space.mutate(seeds[len(children) % 2], rng)[0])
    results = []
    for g in children:
        spec = space.decode(g)
        inherited, _ = _curve(ev, spec, lambda p, g=g: sn.inherit(p, kinds_of(g))[:2], args.eval_every)
        fresh, _ = _curve(ev, spec, None, args.eval_every)
        results.append((g, inherited, fresh))
        print(f"child [{g.layout}]: BIWS {inherited[-1][1]:.4f} fresh {fresh[-1][1]:.4f} after {fresh[-1][0]} steps")
    target = args.target or statistics.mean(f[-1][1] for _, _, f in results)
    print(f"\ntarget MLM val loss {target:.4f}; eval every {args.eval_every} steps\n")
    print(
        "| child | layout | BIWS loss @0 | fresh loss @0 | BIWS final | fresh final "
        "| BIWS steps to target | fresh steps to target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, (g, a, b) in enumerate(results):
        sa, sb = _steps_to(a, target), _steps_to(b, target)
        print(
            f"| {i} | {g.layout} | {a[0][1]:.3f} | {b[0][1]:.3f} | {a[-1][1]:.4f} | {b[-1][1]:.4f} | "
            f"{sa if sa is not None else '>' + str(a[-1][0])} | {sb if sb is not None else '>' + str(b[-1][0])} |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=("all", "layouts", "biws"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--workdir", default="runs/bench_autobert_proxy")
    p.add_argument("--data", default="")
    p.add_argument("--corpus", default="")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mlm_steps", type=int, default=600)
    p.add_argument("--ft_steps", type=int, default=200)
    p.add_argument("--warm", type=int, default=6)
    p.add_argument("--children", type=int, default=4)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--target", type=float, default=0.0)
    p.add_argument("--rng", type=int, default=0)
    args = p.parse_args()
    print(f"devices: {jax.devices()}")
    if args.part in ("all", "layouts"):
        layouts(args)
    if args.part in ("all", "biws"):
        biws(args)


if __name__ == "__main__":
    main()
