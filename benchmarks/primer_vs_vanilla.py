"""Primer ablation on Shakespeare: vanilla vs +squared ReLU vs +MDHA vs Primer-EZ.

    python benchmarks/primer_vs_vanilla.py                       # the defaults in docs/benchmarks.md
    python benchmarks/primer_vs_vanilla.py --steps=100 --seeds=1 # a quick smoke run

The CPU-scale check of methods.md §2(e): a byte-level decoder-only LM (T5-style vanilla
of the zoo: pre-LN, ReLU FFN, relative position bias, tied embeddings) and three arms
that change only what Primer-EZ changes:

* ``vanilla``: ReLU FFN, plain multi-head attention;
* ``+sqrelu``: every FFN's activation is squared ReLU;
* ``+mdha``: every attention layer is Multi-DConv-Head Attention (``dconv_kernel=3``);
* ``primer_ez``: the zoo's ``primer_ez`` (asserted to equal vanilla + both changes).

Protocol (Primer's, §2(c)): same optimizer, learning rate and schedule for every arm,
no re-tuning. The schedule is T2T's ``rsqrt`` decay, which does not depend on the run
length, so one run per arm and seed serves both regimes below: runs are cut at
different lengths without changing the learning rate they saw.

Every run evaluates the same fixed validation set (``--eval_windows`` windows evenly
spaced over the two held-out plays; the file split is fixed, not seeded) at step 0 and
every ``--eval_every`` steps. Per seed ``s`` (model init and training-data order both
come from ``s``; within a seed every arm sees the same batches) the four arms train in
lockstep, round-robin ``--eval_every`` steps at a time, so that load from other work
on the (shared) machine hits all arms alike:

1. vanilla trains ``--steps`` steps; its final validation loss is the seed's **target**
   and its training time there the seed's wall-clock **budget** (or ``--seconds``, in
   which case vanilla too trains until it is spent).
2. Every other arm trains at least ``--steps`` steps and until its training time reaches
   the budget, and, if it has not reached the target by then, on until it does or until
   ``--steps * (1 + --overrun)`` steps.

Read off the curves (val loss against step and against training seconds, linear
interpolation between eval points):

* equal steps: val loss at ``--steps``;
* steps-to-target: the first step at which the val loss is <= the target (interpolated
  between the two eval points around the crossing; vanilla included, so a noisy vanilla
  curve can cross its own final value before its end); speedup = vanilla's
  steps-to-target / the arm's (Primer's definition), per seed, then mean +- std;
* time-to-target: the same crossing on the training-seconds axis (compile, evaluation
  and data loading excluded; every step is synchronous);
* equal wall-clock: val loss at the budget on the training-seconds axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nasjax import sharding as shd  # noqa: E402
from nasjax.config import base_config  # noqa: E402
from nasjax.data import fetch, make_text_data, resolve_files  # noqa: E402
from nasjax.data.pipeline import LMData  # noqa: E402
from nasjax.models import get_spec  # noqa: E402
from nasjax.train.loop import Trainer  # noqa: E402

ARMS = ("vanilla", "+sqrelu", "+mdha", "primer_ez")


# ---------------------------------------------------------------------- specs


def _each_layer(spec, activation: str | None = None, dconv_kernel: int | None = None):
    layers = []
    for block in spec.layers:
        ffn, mixer = block.ffn, block.mixer
        if activation is not None:
            ffn = dataclasses.replace(ffn, activation=activation)
        if dconv_kernel is not None:
            mixer = dataclasses.replace(mixer, dconv_kernel=dconv_kernel)
        layers.append(dataclasses.replace(block, ffn=ffn, mixer=mixer))
    return spec.replace(layers=tuple(layers))


def arm_specs(vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> dict:
    """The four arms; primer_ez is the zoo's and must equal vanilla + both changes."""
    dims = dict(vocab_size=vocab_size, max_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff)
    vanilla = get_spec("vanilla", "tiny", **dims)
    if any(b.ffn.activation != "relu" or b.mixer.dconv_kernel for b in vanilla.layers):
        raise AssertionError("zoo vanilla is expected to use ReLU and plain attention")
    sq = _each_layer(vanilla, activation="squared_relu")
    mdha = _each_layer(vanilla, dconv_kernel=3)
    primer_ez = get_spec("primer_ez", "tiny", **dims)
    both = _each_layer(sq, dconv_kernel=3)
    if primer_ez.architecture_hash() != both.architecture_hash():
        raise AssertionError(
            f"zoo primer_ez ({primer_ez.architecture_hash()}) != vanilla + squared ReLU + MDHA "
            f"({both.architecture_hash()})"
        )
    return {
        "vanilla": vanilla.replace(name="vanilla"),
        "+sqrelu": sq.replace(name="vanilla+sqrelu"),
        "+mdha": mdha.replace(name="vanilla+mdha"),
        "primer_ez": primer_ez.replace(name="primer_ez"),
    }


def spread_val_batches(val_tokens, seq_len: int, n_windows: int, batch_size: int) -> list[dict]:
    """``n_windows`` next-token windows at evenly spaced offsets over the whole held-out stream.

    Spread rather than the stream's first windows, which would be one play's Project
    Gutenberg header and opening scenes.
    """
    starts = np.linspace(0, len(val_tokens) - seq_len - 1, n_windows).round().astype(np.int64)
    rows = np.asarray(val_tokens[starts[:, None] + np.arange(seq_len + 1)], np.int32)
    return [
        {
            "inputs": rows[i : i + batch_size, :-1],
            "targets": rows[i : i + batch_size, 1:],
            "weights": np.ones((len(rows[i : i + batch_size]), seq_len), np.float32),
        }
        for i in range(0, n_windows, batch_size)
    ]


# ---------------------------------------------------------------------- one run


def crossing(xs, ys, target):
    """First x where y <= target, linearly interpolated between samples; None if never."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (y0 - target) / (y0 - y) * (x - x0))
    return None


def interp(x, xs, ys):
    """ys linearly interpolated at x (xs increasing); clamps to the ends."""
    return float(np.interp(x, xs, ys))


class ArmRun:
    """One arm of one seed: trainer, state, data iterator, and its validation curve."""

    def __init__(self, spec, train_cfg, mesh, rules, seed, data: LMData, val_batches, seq_len):
        self.spec, self.seed, self.val_batches = spec, seed, val_batches
        self.trainer = Trainer(spec, train_cfg, mesh, rules, seed=seed, seq_len=seq_len, dtype="float32")
        self.state = self.trainer.init_state()
        self.iterator = data.train_iterator()
        self.trainer.compile(self.state, shd.shard_batch(data._train_batch(0), mesh))  # any batch of the layout
        self.step, self.train_s, self.step_times = 0, 0.0, []
        self.curve = []  # (step, training seconds, val loss)
        self.evaluate()  # also compiles the eval step

    def train(self, n: int):
        for _ in range(n):
            batch = next(self.iterator)
            t0 = time.perf_counter()
            self.state, metrics = self.trainer.step(self.state, batch)
            loss = float(metrics["loss"])  # synchronous, like Trainer.fit
            dt = time.perf_counter() - t0
            self.step += 1
            self.train_s += dt
            self.step_times.append(dt)
            if not math.isfinite(loss):
                raise RuntimeError(f"{self.spec.name} seed {self.seed}: non-finite loss at step {self.step}")

    def evaluate(self) -> float:
        val = self.trainer.evaluate(self.state.params, self.val_batches)["val_loss"]
        self.curve.append((self.step, self.train_s, val))
        return val

    def at_step(self, step: int) -> tuple[int, float, float]:
        return next(c for c in self.curve if c[0] == step)

    def result(self, steps: int, budget_s: float) -> dict:
        xs, ts, ys = (list(v) for v in zip(*self.curve))
        return {
            "arm": self.spec.name,
            "seed": self.seed,
            "params": self.trainer.param_count(),
            "curve": self.curve,
            "steps_run": self.step,
            "median_step_ms": 1e3 * statistics.median(self.step_times),
            "mean_step_ms": 1e3 * self.train_s / self.step,
            "val_at_steps": self.at_step(steps)[2],
            "time_at_steps": self.at_step(steps)[1],
            "budget_s": budget_s,
            "steps_in_budget": interp(budget_s, ts, xs),
            "val_at_budget": interp(budget_s, ts, ys),
            "compile_s": self.trainer.compile_seconds,
        }


def run_seed(specs: dict, arms, train_cfg, mesh, rules, seed, data: LMData, val_batches, args, log) -> dict:
    """Trains all arms of one seed in lockstep (round-robin, ``eval_every`` steps each)."""
    runs = {a: ArmRun(specs[a], train_cfg, mesh, rules, seed, data, val_batches, args.seq_len) for a in arms}
    max_steps = int(round(args.steps * (1 + args.overrun)))
    target, budget = None, (args.seconds or None)
    active = list(arms)
    while active:
        for arm in list(active):
            r = runs[arm]
            r.train(args.eval_every)
            loss = r.evaluate()
            if r.step % (10 * args.eval_every) == 0:
                log(f"  seed {seed} {arm:9s} step {r.step:5d}: val {loss:.4f}, {r.train_s:.1f}s training")
            if arm == "vanilla":
                if r.step == args.steps:
                    target, budget = loss, (budget or r.train_s)
                done = r.step >= args.steps and r.train_s >= budget
            else:
                done = (
                    r.step >= args.steps
                    and r.train_s >= budget
                    and (min(c[2] for c in r.curve) <= target or r.step >= max_steps)
                )
            if done:
                active.remove(arm)
    out = {}
    for arm in arms:
        r = runs[arm]
        res = out[arm] = r.result(args.steps, budget)
        log(
            f"  seed {seed} {r.spec.name:15s}: val@{args.steps} {res['val_at_steps']:.4f} in "
            f"{res['time_at_steps']:.1f}s | budget {budget:.1f}s: step {res['steps_in_budget']:.0f}, val "
            f"{res['val_at_budget']:.4f} | ran {r.step} steps, median step {res['median_step_ms']:.1f} ms"
            f" | compile {res['compile_s']:.1f}s"
        )
    return out


# ---------------------------------------------------------------------- tables


def _ms(values, fmt="{:.4f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def summarise(runs: dict, arms, seeds) -> dict:
    """Per-arm numbers of both regimes from the runs {(arm, seed): result}."""
    out = {}
    for arm in arms:
        rows = []
        for seed in seeds:
            r, v = runs[(arm, seed)], runs[("vanilla", seed)]
            target = v["val_at_steps"]
            steps, times, losses = zip(*r["curve"])
            vsteps, vtimes, vlosses = zip(*v["curve"])
            s_arm, s_van = crossing(steps, losses, target), crossing(vsteps, vlosses, target)
            t_arm, t_van = crossing(times, losses, target), crossing(vtimes, vlosses, target)
            rows.append(
                {
                    "seed": seed,
                    "target": target,
                    "val_at_steps": r["val_at_steps"],
                    "delta_at_steps": r["val_at_steps"] - target,
                    "steps_to_target": s_arm,
                    "speedup": s_van / s_arm if s_arm else None,
                    "speedup_bound": None if s_arm else s_van / r["steps_run"],
                    "time_to_target": t_arm,
                    "time_speedup": t_van / t_arm if t_arm else None,
                    "median_step_ms": r["median_step_ms"],
                    "mean_step_ms": r["mean_step_ms"],
                    "budget_s": r["budget_s"],
                    "steps_in_budget": r["steps_in_budget"],
                    "val_at_budget": r["val_at_budget"],
                    "delta_at_budget": r["val_at_budget"] - v["val_at_budget"],
                }
            )
        out[arm] = {"params": runs[(arm, seeds[0])]["params"], "seeds": rows}
    return out


def print_tables(summary: dict, arms, args, budget_note: str):
    n = len(next(iter(summary.values()))["seeds"])
    print(f"\n### Equal steps ({args.steps} steps; target = each seed's vanilla val loss at step {args.steps})\n")
    head = (
        "| arm | params | val loss @ steps | Δ vs vanilla | steps-to-target | speedup (steps) "
        "| step ms (median) | time-to-target s | speedup (time) |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for arm in arms:
        rows = summary[arm]["seeds"]
        reached = [r for r in rows if r["steps_to_target"] is not None]
        s2t = _ms([r["steps_to_target"] for r in rows], "{:.0f}")
        spd = _ms([r["speedup"] for r in rows], "{:.2f}") + "x"
        if len(reached) < n:
            bound = max(r["speedup_bound"] for r in rows if r["speedup_bound"] is not None)
            s2t += f" ({len(reached)}/{n} reached)"
            spd += f" (unreached: < {bound:.2f}x)"
        print(
            f"| {arm} | {summary[arm]['params'] / 1e6:.3f}M | {_ms([r['val_at_steps'] for r in rows])} "
            f"| {_ms([r['delta_at_steps'] for r in rows], '{:+.4f}')} | {s2t} | {spd} "
            f"| {_ms([r['median_step_ms'] for r in rows], '{:.1f}')} "
            f"| {_ms([r['time_to_target'] for r in rows], '{:.1f}')} "
            f"| {_ms([r['time_speedup'] for r in rows], '{:.2f}')}x |"
        )
    print(f"\n### Equal wall-clock ({budget_note})\n")
    head = "| arm | budget s | steps in budget | val loss @ budget | Δ vs vanilla |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for arm in arms:
        rows = summary[arm]["seeds"]
        print(
            f"| {arm} | {_ms([r['budget_s'] for r in rows], '{:.1f}')} "
            f"| {_ms([r['steps_in_budget'] for r in rows], '{:.0f}')} "
            f"| {_ms([r['val_at_budget'] for r in rows])} | {_ms([r['delta_at_budget'] for r in rows], '{:+.4f}')} |"
        )
    print("\nPer seed (target, then per arm: val@steps / steps-to-target / speedup / val@budget):")
    for i, row in enumerate(summary["vanilla"]["seeds"]):
        parts = [f"seed {row['seed']}: target {row['target']:.4f}"]
        for arm in arms:
            r = summary[arm]["seeds"][i]
            s2t = f"{r['steps_to_target']:.0f}" if r["steps_to_target"] else "n/r"
            spd = f"{r['speedup']:.2f}x" if r["speedup"] else f"<{r['speedup_bound']:.2f}x"
            parts.append(f"{arm} {r['val_at_steps']:.4f}/{s2t}/{spd}/{r['val_at_budget']:.4f}")
        print("  " + " | ".join(parts))


# ---------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="training length of the equal-steps regime")
    p.add_argument("--seconds", type=float, default=0.0, help="wall-clock budget; 0 = vanilla's time for --steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (configs/train/lm.py tiny)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_windows", type=int, default=256, help="fixed validation windows of --seq_len")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--overrun", type=float, default=0.25, help="extra steps (fraction) to chase an unreached target")
    p.add_argument("--json_out", default="", help="write all curves and the summary here")
    args = p.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "vanilla" not in arms:
        arms.insert(0, "vanilla")  # the target and the budget come from vanilla
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        p.error(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    arms = [a for a in ARMS if a in arms]
    if args.steps % args.eval_every:
        p.error("--steps must be a multiple of --eval_every")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    mesh, rules = shd.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES
    base = make_text_data(
        resolve_files(str(fetch("shakespeare", log=log))),
        seq_len=args.seq_len,
        global_batch_size=args.batch_size,
        seed=0,  # fixes which plays are held out, for every seed
        log=log,
    )
    val_batches = spread_val_batches(base.val_tokens, args.seq_len, args.eval_windows, args.eval_batch_size)
    val_tokens = int(sum(b["weights"].sum() for b in val_batches))
    specs = arm_specs(base.vocab_size, args.seq_len, args.d_model, args.n_layers, args.n_heads, args.d_ff)
    cfg = base_config().train
    cfg.steps = 10**9  # rsqrt ignores the length; this only keeps the trainer's bookkeeping happy
    cfg.batch_size = args.batch_size
    cfg.optimizer, cfg.schedule = "adamw", "rsqrt"
    cfg.learning_rate, cfg.warmup_steps = args.lr, args.warmup

    print(
        f"# backend {jax.default_backend()} | {os.cpu_count()} CPU cores | {platform.processor() or platform.machine()}"
        f" | jax {jax.__version__} | float32"
    )
    print(
        f"# Shakespeare bytes: {len(base.train_tokens):,} train tokens; val = {args.eval_windows} windows evenly "
        f"spaced over the {len(base.val_tokens):,}-token held-out stream ({val_tokens:,} tokens; {base.note})"
    )
    print(
        f"# model: decoder d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, d_ff {args.d_ff}, "
        f"vocab {base.vocab_size}, seq {args.seq_len}, batch {args.batch_size}; AdamW lr {args.lr} "
        f"warmup {args.warmup} rsqrt decay, clip {cfg.grad_clip}, b2 {cfg.b2}; eval every {args.eval_every}"
    )
    print(f"# arms: {', '.join(f'{a} ({specs[a].architecture_hash()})' for a in arms)}; seeds 0..{args.seeds - 1}")
    sys.stdout.flush()

    runs, seeds = {}, list(range(args.seeds))
    t_start = time.perf_counter()
    for seed in seeds:
        data = LMData(base.train_tokens, base.val_tokens, args.seq_len, args.batch_size, seed=seed)
        for arm, res in run_seed(specs, arms, cfg, mesh, rules, seed, data, val_batches, args, log).items():
            runs[(arm, seed)] = res
    log(f"total {time.perf_counter() - t_start:.0f}s")

    summary = summarise(runs, arms, seeds)
    note = f"{args.seconds:g} s of training each" if args.seconds else "budget = each seed's vanilla time for --steps"
    print_tables(summary, arms, args, note)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "jax": jax.__version__,
                    "summary": summary,
                    "runs": [dict(v, arm_key=k[0]) for k, v in runs.items()],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
