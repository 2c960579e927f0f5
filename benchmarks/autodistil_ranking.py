"""Does a SuperLM rank its subnets the way standalone distillation does? K=3 vs one merged SuperLM.

    python benchmarks/autodistil_ranking.py --workdir=runs/bench_ad_rank
    (the same command resumes; every finished piece is kept in the workdir)

AutoDistil's claim (methods.md §4): K weight-sharing SuperLMs, one per sub-space, rank
their subnets better than one SuperLM over the whole space, because fewer subnets
interfere in each. This script measures it at CPU scale:

1. a BERT teacher (``--teacher_layers`` x ``--teacher_d``, head size ``d / heads``) is
   pre-trained with MLM on Shakespeare + Austen (``nasjax train``), or ``--teacher`` is
   used as given;
2. ``nasjax distil`` trains the K=3 SuperLMs (the paper's Tiny/Small/Base grids scaled
   to the teacher) for ``--steps`` sandwich steps each, and one merged SuperLM over the
   union (``distil.merge=true``) for ``--merged_steps`` (default K x steps: the same
   number of subnet gradient evaluations in total);
3. ``--per_space`` subnets of each sub-space, spread evenly over its parameter range,
   are each distilled *standalone* (the same relation-KD loss, initialised from the
   teacher's prefix slices like the SuperLM, a sandwich of one) for
   ``--standalone_steps``;
4. every subnet gets its held-out relation-KD loss (the same ``--val_batches``
   validation batches, teacher outputs shared) with weights inherited from its K=3
   SuperLM, from the merged SuperLM, and from its standalone run.

Prints Kendall's tau (tau-b) between the inherited and the standalone scores per
sub-space and pooled, for K=3 and for the merged SuperLM, next to the tau of a
parameter-count ranking (how much a SuperLM adds over counting). Writes
``ranking.csv`` and ``ranking.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.genome.autodistil import Subnet, scaled_subspaces, subnet_spec  # noqa: E402
from nasjax.measure.params import count_params  # noqa: E402
from nasjax.models import get_spec  # noqa: E402
from nasjax.search.autodistil import _trainer, run_distil  # noqa: E402
from nasjax.search.run import build_text_data  # noqa: E402
from nasjax.spec import save_spec  # noqa: E402
from nasjax.train.run import load_run, train  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def quiet(*_):
    pass


def teacher_run(args) -> str:
    if args.teacher:
        return args.teacher
    folder = os.path.join(args.workdir, "teacher")
    status = os.path.join(folder, "status.json")
    if os.path.exists(status) and json.load(open(status))["status"] == "finished":
        return folder
    os.makedirs(folder, exist_ok=True)
    spec = get_spec(
        "bert",
        "tiny",
        n_layers=args.teacher_layers,
        d_model=args.teacher_d,
        n_heads=args.teacher_heads,
        d_ff=4 * args.teacher_d,
        max_len=args.seq_len,
        vocab_size=262,  # the byte tokenizer's 256 bytes + specials (MLM mask, pad, ...)
    )
    save_spec(spec, os.path.join(args.workdir, "teacher_spec.json"))
    cfg = apply_overrides(
        load_config_file(os.path.join(ROOT, "configs/train/mlm.py:tiny")),
        {
            "model.spec": os.path.join(args.workdir, "teacher_spec.json"),
            "data.corpus": "shakespeare,austen",
            "data.seq_len": args.seq_len,
            "train.steps": args.teacher_steps,
            "train.batch_size": args.batch,
            "train.eval_every": 0,
            "train.eval_batches": args.val_batches,
        },
    )
    t0 = time.perf_counter()
    result = train(cfg, folder, log=quiet, progress=False)
    print(
        f"teacher: {result.status} at step {result.step}, val loss {result.val.get('val_loss', float('nan')):.3f} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    return folder


def distil_config(args, teacher: str, **kw):
    base = {
        "teacher": teacher,
        "data.seq_len": args.seq_len,
        "train.batch_size": args.batch,
        "train.steps": args.steps,
        "train.learning_rate": args.lr,
        "distil.relation_heads": args.relation_heads,
        "distil.kd_kind": args.kd_kind,
        "distil.val_batches": args.val_batches,
        "distil.log_every": 50,
        "distil.checkpoint_every": 50,
    }
    base.update(kw)
    return apply_overrides(load_config_file(os.path.join(ROOT, "configs/search/autodistil.py:tiny")), base)


def trainer_for(cfg, teacher_spec, teacher_params, subnets, steps: int, m: int):
    """The library's SuperLM trainer for ``cfg`` with ``steps`` and a sandwich of ``m``."""
    cfg = copy.deepcopy(cfg)
    cfg.train.steps, cfg.distil.sandwich_size = steps, m
    return _trainer(cfg, teacher_spec, teacher_params, subnets)


def picks(subnets, n: int, teacher_spec) -> list[Subnet]:
    """``n`` subnets spread evenly over the sub-space's parameter range."""
    ranked = sorted(subnets, key=lambda s: (count_params(subnet_spec(teacher_spec, s))["total"], s))
    idx = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return [ranked[i] for i in idx]


def tau(a, b) -> float:
    return float(stats.kendalltau(a, b).statistic) if len(a) > 1 else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_ad_rank")
    p.add_argument("--teacher", default="", help="an existing encoder workdir (default: train one)")
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--teacher_d", type=int, default=128)
    p.add_argument("--teacher_heads", type=int, default=4)
    p.add_argument("--teacher_steps", type=int, default=1500)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="sandwich steps per K=3 SuperLM")
    p.add_argument("--merged_steps", type=int, default=0, help="merged SuperLM steps (0 = K x steps)")
    p.add_argument("--standalone_steps", type=int, default=300)
    p.add_argument("--per_space", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--relation_heads", type=int, default=4)
    p.add_argument("--kd_kind", default="kl")
    p.add_argument("--val_batches", type=int, default=8)
    args = p.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)

    teacher = teacher_run(args)
    teacher_spec, _, tokenizer, _, tstate, _ = load_run(teacher)
    import jax

    teacher_params = jax.device_get(tstate.params)
    spaces = scaled_subspaces(teacher_spec, ["tiny", "small", "base"])
    k = len(spaces)
    merged_steps = args.merged_steps or k * args.steps

    timings = {}
    t0 = time.perf_counter()
    k3_cfg = distil_config(args, teacher)
    run_distil(k3_cfg, os.path.join(args.workdir, "k3"), log=quiet)
    timings["k3_superlms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged_cfg = distil_config(args, teacher, **{"distil.merge": True, "train.steps": merged_steps})
    run_distil(merged_cfg, os.path.join(args.workdir, "merged"), log=quiet)
    timings["merged_superlm_s"] = time.perf_counter() - t0
    print(
        f"SuperLMs: K={k} x {args.steps} steps {timings['k3_superlms_s']:.0f}s, "
        f"merged x {merged_steps} steps {timings['merged_superlm_s']:.0f}s (0 when resumed complete)"
    )

    data = build_text_data(k3_cfg, tokenizer, "mlm", quiet)
    val = list(data.val_batches(args.val_batches))
    all_subnets = sorted({s for sp in spaces for s in sp.subnets()})
    merged = trainer_for(merged_cfg, teacher_spec, teacher_params, all_subnets, merged_steps, 4)
    held_out = merged.with_teacher(val)
    merged_state = merged.restore(os.path.join(args.workdir, "merged", "superlm_merged", "state.msgpack"))

    cache_path = os.path.join(args.workdir, "standalone.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    rows = []
    for space in spaces:
        sup = trainer_for(k3_cfg, teacher_spec, teacher_params, space.subnets(), args.steps, 4)
        sup_state = sup.restore(os.path.join(args.workdir, "k3", f"superlm_{space.name}", "state.msgpack"))
        for s in picks(space.subnets(), args.per_space, teacher_spec):
            key = f"{s.name}@{args.standalone_steps}"
            if key not in cache:
                t0 = time.perf_counter()
                alone = trainer_for(k3_cfg, teacher_spec, teacher_params, [s], args.standalone_steps, 1)
                st = alone.init()
                it = data.train_iterator()
                while st.step < args.standalone_steps:
                    alone.step(st, next(it))
                cache[key] = {
                    "kd_loss": alone.held_out_loss(st.params, s, held_out),
                    "seconds": time.perf_counter() - t0,
                }
                with open(cache_path + ".tmp", "w") as f:
                    json.dump(cache, f, indent=1)
                os.replace(cache_path + ".tmp", cache_path)
            row = {
                "space": space.name,
                "subnet": s.name,
                "params": int(count_params(subnet_spec(teacher_spec, s))["total"]),
                "k3_inherited": sup.held_out_loss(sup_state.params, s, held_out),
                "merged_inherited": merged.held_out_loss(merged_state.params, s, held_out),
                "standalone": cache[key]["kd_loss"],
                "standalone_seconds": cache[key]["seconds"],
            }
            rows.append(row)
            print(
                f"  {space.name:5s} {s.name:22s} params {row['params']:>9,}  K=3 {row['k3_inherited']:.4f}  "
                f"merged {row['merged_inherited']:.4f}  standalone {row['standalone']:.4f}",
                flush=True,
            )

    table = []
    for name in [sp.name for sp in spaces] + ["pooled"]:
        sel = [r for r in rows if name in ("pooled", r["space"])]
        truth = [r["standalone"] for r in sel]
        table.append(
            {
                "space": name,
                "n": len(sel),
                "tau_k3": tau([r["k3_inherited"] for r in sel], truth),
                "tau_merged": tau([r["merged_inherited"] for r in sel], truth),
                "tau_params": tau([-r["params"] for r in sel], truth),  # more params -> lower loss
            }
        )
    print()
    print(f"{'sub-space':<10} {'n':>3} {'tau K=3':>9} {'tau merged':>11} {'tau -params':>12}")
    for t in table:
        print(f"{t['space']:<10} {t['n']:>3} {t['tau_k3']:>9.3f} {t['tau_merged']:>11.3f} {t['tau_params']:>12.3f}")
    with open(os.path.join(args.workdir, "ranking.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.workdir, "ranking.json"), "w") as f:
        json.dump({"args": vars(args), "table": table, "rows": rows, "timings": timings}, f, indent=2)
    print(f"wrote {args.workdir}/ranking.csv, ranking.json")


if __name__ == "__main__":
    main()
