"""Candidates per hour of the default tiny Primer search, for several versions side by side.

    python benchmarks/primer_throughput.py --before=8f83601 --variants=inline,threads
    python benchmarks/primer_throughput.py --variants=inline_noahead,inline_ahead,threads_noahead,threads_ahead

Runs the default search (``configs/search/primer.py:tiny``: 60 evaluations, population
12, 160 steps cut by 2 hurdles, Shakespeare bytes) to the end, once per version, each
in its own subprocess with a fresh persistent compile cache (every program compiles
once), one after the other on the same machine. Versions:

* ``--before=REF``: the search of git ref REF (a temporary worktree), engine inline;
* ``--also=KEY=VALUE``: every variant once more with that setting (repeatable);
* ``--set=KEY=VALUE``: a setting for every version, ``--before`` included (repeatable;
  e.g. ``--set=seed=1`` for another search trajectory);
* ``--cache_dir=DIR``: one persistent compile cache shared by the runs and kept (a
  warm cache: what a second search on the same machine sees);
* ``--variants``: this tree with ``inline`` (search.in_flight=1, the preset's default)
  and/or ``threads`` (engine=threads, search.in_flight=2: two candidates at once),
  ``processes`` (engine=processes, two worker processes) or ``processes1`` (one); a
  ``_ahead`` or ``_noahead`` suffix (``inline_ahead``) also sets ``search.compile_ahead``
  to true or false (default: auto).

Prints, per version: wall time, evaluations, trained / failed / reused, candidates per
hour (trained or failed, i.e. evaluations that cost compute), evaluations per hour, the
share of wall time outside training steps (1 - the journal's summed train seconds / wall
time: probes, inits, compiles, validation, the search's own work), the compile share
(the journal's summed ``compile_seconds``, i.e. inits and compiles, over wall time x
candidates in flight), the XLA compile share (the journal's summed ``xla_compile_seconds``:
every program XLA compiled for the candidates, the per-op programs of probes and inits
included, as JAX's monitoring events report it (``nasjax.compile_meter``), over wall time
x candidates in flight: issue 8's <= 10% target; "-" for versions that do not record it),
the same measure taken by every process of the search, whatever the tree (a
``sitecustomize`` on the searches' PYTHONPATH adds up JAX's compile events and writes each
process's total at exit: it includes what the search compiles outside candidates, e.g.
its data pipeline), and the best fitness
found (same-quality check: in_flight=1 versions follow the same trajectory up to float
round-off). A second table splits each version's XLA compile seconds by program: the
segmented trainer's forward and backward layer pieces and update programs (count, seconds,
median), the rest, the lowering, and the backward pieces that took over 0.2 s.

The default search over 1,000 evaluations, this tree against another (docs/benchmarks.md,
stop 35)::

    python benchmarks/primer_throughput.py --before=REF --variants=inline --set=search.max_evaluations=1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.candidate_overhead import checkout  # noqa: E402
from benchmarks.primer_search import search_stats  # noqa: E402

# Put on the PYTHONPATH of every process of a measured search (workers included), it
# adds up what JAX reports of its compiles (lowering and XLA's compile, as
# nasjax.compile_meter counts them) and writes the process's total when it exits, with
# every compile event (kind, program name, seconds): the same measure for any tree,
# older ones included.
METER_SITE = """
import atexit, json, os, threading
import jax.monitoring

_total, _log, _lock = [0.0], [], threading.Lock()
_events = {
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "backend",
}


def _listen(event, duration, **kwargs):
    if event in _events:
        with _lock:
            _total[0] += duration
            _log.append((_events[event], kwargs.get("fun_name", ""), duration))


def _write():
    with open(os.path.join(os.environ["NASJAX_XLA_METER_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"xla_compile_seconds": _total[0], "compiles": _log}, f)


jax.monitoring.register_event_duration_secs_listener(_listen)
atexit.register(_write)
"""


def run_version(root: str, workdir: str, overrides: list[str], cache_dir: str = "") -> None:
    cache = cache_dir or tempfile.mkdtemp(prefix="nasjax_xla_")
    cmd = [sys.executable, "-m", "nasjax.cli", "search", f"--config={root}/configs/search/primer.py:tiny"]
    cmd += [f"--workdir={workdir}", f"--config.compile_cache_dir={cache}"] + [f"--config.{o}" for o in overrides]
    meter = os.path.join(workdir + ".meter")
    shutil.rmtree(meter, ignore_errors=True)
    os.makedirs(os.path.join(meter, "site"))
    with open(os.path.join(meter, "site", "sitecustomize.py"), "w") as f:
        f.write(METER_SITE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(meter, "site"), root]), NASJAX_XLA_METER_DIR=meter)
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if not cache_dir:
        shutil.rmtree(cache, ignore_errors=True)
    if out.returncode:
        raise SystemExit(f"search in {root} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


# variant -> (engine, search.in_flight)
ENGINES = {
    "inline": ("inline", 1),
    "threads": ("threads", 2),
    "processes": ("processes", 2),
    "processes1": ("processes", 1),
}


# the segmented trainer's programs by the name JAX reports (nasjax.train.segmented)
PROGRAM_KINDS = (
    ("forward pieces", "jit(forward)"),
    ("backward pieces", "jit(backward)"),
    ("updates", "jit(_leaf_updates)"),
)


def print_by_program(runs) -> None:
    """Where each version's compile seconds went: XLA's compile per program kind, lowering."""
    import numpy as np

    print(
        "\n| version | "
        + " | ".join(f"{k}: n / XLA s / median ms" for k, _ in PROGRAM_KINDS)
        + " | other XLA s | lowering s (n) | backward pieces over 0.2 s: n / s |"
    )
    print("|---|" + "---|" * (len(PROGRAM_KINDS) + 3))
    for name, wd, _ in runs:
        meter = wd + ".meter"
        events = [
            e
            for f in os.listdir(meter)
            if f.endswith(".json")
            for e in json.load(open(os.path.join(meter, f)))["compiles"]
        ]
        backend = [(fn, sec) for kind, fn, sec in events if kind == "backend"]
        lower = [sec for kind, _, sec in events if kind == "lower"]
        cells, named = [], set()
        for _, fn in PROGRAM_KINDS:
            secs = [sec for f, sec in backend if f == fn]
            named.add(fn)
            median = 1e3 * float(np.median(secs)) if secs else 0.0
            cells.append(f"{len(secs)} / {sum(secs):.1f} / {median:.1f}")
        other = sum(sec for f, sec in backend if f not in named)
        slow = [sec for f, sec in backend if f == "jit(backward)" and sec > 0.2]
        cells += [f"{other:.1f}", f"{sum(lower):.1f} ({len(lower)})", f"{len(slow)} / {sum(slow):.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="", help="a git ref to run first (engine inline)")
    p.add_argument(
        "--variants",
        default="inline,threads",
        help="this tree: inline, threads, processes (2 workers), processes1 (1 worker), each optionally "
        "_ahead / _noahead (search.compile_ahead=true/false)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        help="KEY=VALUE[;KEY=VALUE...] (repeatable): also run every variant with these settings, as a row of its own",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="KEY=VALUE (repeatable): a setting for every version (e.g. seed=1)",
    )
    p.add_argument("--workdir", default="", help="where the searches' workdirs go (default: a temp dir)")
    p.add_argument(
        "--cache_dir",
        default="",
        help="one persistent compile cache for every run, kept (default: a fresh one per run): run a search "
        "first to warm it, e.g. --set=seed=1 after a seed-0 run, to measure a second search on a machine",
    )
    p.add_argument("--json_out", default="")
    args = p.parse_args()

    base = args.workdir or tempfile.mkdtemp(prefix="nasjax_throughput_")
    os.makedirs(base, exist_ok=True)
    runs = []
    if args.before:
        with checkout(args.before) as worktree:
            wd = os.path.join(base, "before")
            run_version(worktree, wd, list(args.set), args.cache_dir)
            runs.append((f"{args.before} (inline, in_flight 1)", wd, 1))
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        engine, _, ahead = v.partition("_")
        if engine not in ENGINES or ahead not in ("", "ahead", "noahead"):
            raise SystemExit(f"unknown variant {v!r}: {', '.join(ENGINES)}, optionally with _ahead or _noahead")
        name, in_flight = ENGINES[engine]
        overrides = list(args.set) + ([f"engine={name}", f"search.in_flight={in_flight}"] if name != "inline" else [])
        overrides += [f"search.compile_ahead={'true' if ahead == 'ahead' else 'false'}"] if ahead else []
        label = f"{name}, in_flight {in_flight}"
        label += {"ahead": ", compile_ahead on", "noahead": ", compile_ahead off"}.get(ahead, "")
        for extra in [None] + args.also:
            wd = os.path.join(base, v if extra is None else f"{v}_{extra.replace('=', '_')}")
            run_version(ROOT, wd, overrides + (extra.split(";") if extra else []), args.cache_dir)
            runs.append((f"this tree ({label}{', ' + extra if extra else ''})", wd, in_flight))

    print(
        "| version | wall min | evaluations | trained / failed / reused | candidates/hour | evaluations/hour"
        " | wall outside training steps | compile share | XLA compile share | XLA compile s (processes) "
        "| its share | best fitness |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for name, wd, in_flight in runs:
        st = search_stats(wd)
        meter = wd + ".meter"
        totals = [json.load(open(os.path.join(meter, f))) for f in os.listdir(meter) if f.endswith(".json")]
        st["process_xla_compile_seconds"] = sum(t["xla_compile_seconds"] for t in totals)
        out[name] = st
        # the journal's compile seconds (inits and compiles, summed over candidates) over
        # the evaluation time: wall x candidates in flight
        share = st["compile_seconds"] / max(st["wall_seconds"] * in_flight, 1e-9)
        xla = st["xla_compile_seconds"] / max(st["wall_seconds"] * in_flight, 1e-9)
        print(
            f"| {name} | {st['wall_seconds'] / 60:.1f} | {st['evaluations']} | {st['trained']} / {st['failed']} / "
            f"{st['reused']} | {st['candidates_per_hour']:.0f} | {st['evaluations_per_hour']:.0f} | "
            f"{1 - st['train_seconds'] / max(st['wall_seconds'], 1e-9):.0%} | {share:.0%} | "
            f"{f'{xla:.0%}' if st['xla_compile_seconds'] else '-'} | {st['process_xla_compile_seconds']:.1f} "
            f"| {st['process_xla_compile_seconds'] / max(st['wall_seconds'] * in_flight, 1e-9):.0%} "
            f"| {st['best_fitness']:.4f} |"
        )
    print_by_program(runs)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
