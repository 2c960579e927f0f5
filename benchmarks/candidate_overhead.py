"""Per-candidate cost of a Primer or LTS search, phase by phase, for this tree and an older one side by side.

    python benchmarks/candidate_overhead.py --candidates=12 --before=8f83601
    python benchmarks/candidate_overhead.py --candidates=12 --also=search.compile_ahead=true
    python benchmarks/candidate_overhead.py --candidates=16 --also='train.segmented=true;train.flat_optimizer=false'
    python benchmarks/candidate_overhead.py --method=lts --candidates=30 --before=8f83601

What it measures: the same ``--candidates`` programs (the vanilla seed, then a chain of
mutations with a fixed seed, as a search would draw them) go through what a search does
with each, with the ``configs/search/primer.py:tiny`` settings on the local corpus:

* ``check``: parameter count and the probe (finiteness, causality, FEC hashes);
* ``train``: the trainer's init, train-step compile, the hurdle bands' training and
  validation (``--hurdles_pass``: every band trained, the full 160 steps; otherwise the
  first hurdle stops the candidate at 23 steps, as it stopped 72% of them in the
  40-minute benchmark search).

``--method=lts``: ``--candidates`` architectures sampled from the ``configs/search/lts.py:cpu``
space with a fixed seed, each measured as an LTS search measures it (parameter counts, the
compiled forward's latency over 2 warm-up + 10 timed runs at batch 1 and sequence 128,
its memory analysis); ``runs`` is 12 x the median latency (the warm-up and timed calls).

Every phase is wall time. ``overhead`` = everything but the training steps themselves
(probe, init, compiles, validation); ``overhead share`` = overhead / total. Each
version runs in its own subprocess with the persistent XLA cache off, so every program
compiles once, as for a new candidate. ``--before=REF`` checks REF out into a temporary
git worktree and runs the same measurement there first (the script only calls APIs both
trees have).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def tiny_evaluator(root: str, overrides: dict, workdir: str):
    """(config, space, evaluator) of the tiny Primer preset with ``overrides``, built as a
    search builds them (its data under ``workdir``), from the nasjax under ``root`` (on
    ``sys.path`` first).

    ``overrides``: {KEY: value}; a string value is read as :func:`_value` reads it, and kept
    a string where the setting is one (e.g. ``search.compile_ahead=true``).
    """
    sys.path.insert(0, root)
    from nasjax import sharding as shd
    from nasjax.config import apply_overrides, load_config_file
    from nasjax.search.evaluate import TrainingEvaluator
    from nasjax.search.run import _build_data, make_space
    from nasjax.train.run import setup_compile_cache

    cfg = load_config_file(os.path.join(root, "configs/search/primer.py:tiny"))
    for key, value in overrides.items():
        try:
            cfg = apply_overrides(cfg, {key: _value(value) if isinstance(value, str) else value})
        except TypeError:  # a string-typed setting
            cfg = apply_overrides(cfg, {key: value})
    setup_compile_cache(cfg)  # compile_cache_dir as the search would ('none': off)
    tokenizer, data = _build_data(cfg, workdir, log=lambda *a: None)
    space = make_space(cfg, tokenizer.vocab_size)
    mesh = shd.make_mesh(tuple(cfg.mesh.shape))
    evaluator = TrainingEvaluator(cfg, data, mesh, shd.rules_from_config(cfg.mesh.rules), log=lambda *a: None)
    evaluator._fixed_val()  # the validation batches are built once per search, not per candidate
    return cfg, space, evaluator


def measure(root: str, n: int, seed: int, hurdles_pass: bool, overrides: dict | None = None) -> dict:
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    work = tempfile.mkdtemp(prefix="nasjax_overhead_")
    cfg, space, evaluator = tiny_evaluator(root, {"compile_cache_dir": "none", **(overrides or {})}, work)
    from nasjax.search.evaluate import CandidateFailed

    rng = np.random.default_rng(seed)
    genome = space.seeds()[0][1]
    rows = []
    threshold = None if hurdles_pass else -1e9  # -1e9: stop at the first hurdle
    while len(rows) < n:
        spec = space.decode(genome)
        row = {"hash": space.genome_hash(genome)}
        t0 = time.perf_counter()
        try:
            evaluator.check(spec)
            row["check"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            out = evaluator.train(spec, [threshold] * evaluator.n_hurdles)
            row["train_phase"] = time.perf_counter() - t1
            row["train_steps"] = out.train_seconds
            row["steps"] = out.steps
            row["fitness"] = out.fitness
            row["status"] = "trained"
        except CandidateFailed as e:
            row["status"] = f"failed:{e.stage}"
            row.setdefault("check", time.perf_counter() - t0)
        row["total"] = time.perf_counter() - t0
        rows.append(row)
        genome = space.mutate(genome, rng)[0]
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "jax": jax.__version__}


def measure_lts(root: str, n: int, seed: int) -> dict:
    sys.path.insert(0, root)
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax.config import load_config_file
    from nasjax.genome.stack import StackSpace
    from nasjax.search.lts import LTSMeasurer

    cfg = load_config_file(os.path.join(root, "configs/search/lts.py:cpu"))
    space = StackSpace.from_config(cfg.lts.space)
    measurer = LTSMeasurer(cfg)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        genome = space.sample(rng)
        spec = space.decode(genome, vocab_size=262, max_len=int(cfg.lts.seq_len))
        t0 = time.perf_counter()
        out = measurer.measure_job(spec, {})
        total = time.perf_counter() - t0
        runs = out["latency_s"] * (int(cfg.lts.latency_repeats) + 2)  # the timed and the 2 warm-up calls
        rows.append(
            {"hash": genome.key(), "total": total, "compile": out["compile_seconds"], "runs": runs, "status": "ok"}
        )
    return {"rows": rows, "jax": jax.__version__}


def summarize_lts(rows: list[dict]) -> dict:
    total = sum(r["total"] for r in rows)
    runs = sum(r["runs"] for r in rows)
    med = statistics.median
    return {
        "candidates": len(rows),
        "compile_s": med([r["compile"] for r in rows]),
        "runs_s": med([r["runs"] for r in rows]),
        "total_s": total / len(rows),
        "overhead_share": (total - runs) / max(total, 1e-9),
        "candidates_per_hour": 3600 * len(rows) / max(total, 1e-9),
    }


def summarize(rows: list[dict]) -> dict:
    trained = [r for r in rows if r["status"] == "trained"]
    total = sum(r["total"] for r in rows)
    steps = sum(r.get("train_steps", 0.0) for r in rows)
    med = statistics.median
    return {
        "candidates": len(rows),
        "trained": len(trained),
        "check_s": med([r["check"] for r in rows]),
        "train_phase_s": med([r["train_phase"] for r in trained]) if trained else float("nan"),
        "train_steps_s": med([r["train_steps"] for r in trained]) if trained else float("nan"),
        "total_s": total / len(rows),
        "overhead_share": (total - steps) / max(total, 1e-9),
        "candidates_per_hour": 3600 * len(rows) / max(total, 1e-9),
    }


@contextlib.contextmanager
def checkout(ref: str):
    """Git ref ``ref`` of this repository in a temporary worktree (removed afterwards)."""
    worktree = tempfile.mkdtemp(prefix="nasjax_before_")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", worktree, ref], check=True)
    try:
        yield worktree
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree], check=False)


def parse_settings(items) -> dict:
    """``KEY=VALUE`` command-line items as {KEY: VALUE} (values still strings, read by
    :func:`tiny_evaluator`); an item without ``=`` is refused by name."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _value(text: str):
    """A command-line override's value: true/false, an int, a float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_version(root: str, args, overrides: list[str] = ()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", root, f"--candidates={args.candidates}"]
    cmd += [f"--_override={o}" for o in overrides]
    cmd += [f"--seed={args.seed}", f"--method={args.method}"] + (["--hurdles_pass"] if args.hurdles_pass else [])
    env = dict(os.environ, PYTHONPATH=root, JAX_ENABLE_COMPILATION_CACHE="false")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"measurement in {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="primer", choices=("primer", "lts"))
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--before", default="", help="a git ref to measure first, side by side")
    p.add_argument("--hurdles_pass", action="store_true", help="train every band (160 steps), not 23 steps")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra row: this tree with these config overrides, ';'-separated (repeatable; "
        "e.g. search.compile_ahead=false or 'train.segmented=true;train.flat_optimizer=false')",
    )
    p.add_argument("--json_out", default="")
    p.add_argument("--_override", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        if args.method == "lts":
            print(json.dumps(measure_lts(args._worker, args.candidates, args.seed)))
        else:
            overrides = parse_settings(args._override)
            print(json.dumps(measure(args._worker, args.candidates, args.seed, args.hurdles_pass, overrides)))
        return

    versions = []
    if args.before:
        with checkout(args.before) as worktree:
            versions.append((args.before, run_version(worktree, args)))
    for override in args.also:
        versions.append((f"this tree, {override}", run_version(ROOT, args, override.split(";"))))
    versions.append(("this tree", run_version(ROOT, args)))
    hashes = [[r["hash"] for r in v["rows"]] for _, v in versions]
    same = all(h == hashes[0] for h in hashes)
    print(f"candidates: {args.candidates} programs (seed {args.seed}), identical in every version: {same}")
    if args.method == "primer" and args.also:
        fits = [[r.get("fitness") for r in v["rows"]] for _, v in versions if not _.startswith(args.before or " ")]
        print(f"fitness of every candidate identical across this tree's rows: {all(f == fits[0] for f in fits)}")
    if args.method == "lts":
        print(
            "\n| version | architectures | forward compile s | runs s | total s per architecture | overhead share"
            " | architectures/hour |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, v in versions:
            s = summarize_lts(v["rows"])
            print(
                f"| {name} | {s['candidates']} | {s['compile_s']:.2f} | {s['runs_s']:.3f} | {s['total_s']:.2f} | "
                f"{s['overhead_share']:.0%} | {s['candidates_per_hour']:.0f} |"
            )
        print("\n(compile and runs: medians; total: mean.)")
        return
    bands = "every band (160 steps)" if args.hurdles_pass else "stopped at the first hurdle (23 steps)"
    print(f"training: {bands}")
    print()
    print(
        "| version | candidates (trained) | check s | train phase s | of it training steps s | total s per candidate"
        " | overhead share | candidates/hour |"
    )
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for name, v in versions:
        s = summarize(v["rows"])
        out[name] = s
        print(
            f"| {name} | {s['candidates']} ({s['trained']}) | {s['check_s']:.2f} | {s['train_phase_s']:.2f} | "
            f"{s['train_steps_s']:.2f} | {s['total_s']:.2f} | {s['overhead_share']:.0%} | "
            f"{s['candidates_per_hour']:.0f} |"
        )
    print("\n(check, train phase and training steps: medians; total: mean over all candidates.)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
