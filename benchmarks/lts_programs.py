"""LTS measurements: one program per architecture vs shared sub-layer / layer pieces.

    python benchmarks/lts_programs.py --architectures=40            # part A only
    python benchmarks/lts_programs.py --architectures=40 --search   # A, then B

``lts.programs`` (:mod:`nasjax.measure.hardware`) decides what an LTS measurement
compiles: ``model`` (one forward per architecture), ``sublayers`` (attention and FFN
sub-layer programs shared across architectures; the default) or ``layers``.

A. Per architecture, side by side: ``--architectures`` genomes sampled with ``--seed``
   from the ``configs/search/lts.py:cpu`` space, each measured with every setting (the
   order rotates per architecture), in one process with the persistent compile cache
   off, exactly as the LTS search measures them (``LTSMeasurer.measure_job``: parameter
   counts, compile, 2 warm-up and ``lts.latency_repeats`` timed runs, memory analysis).
   Per setting: mean compile and total seconds per architecture, compile share (summed
   compile / summed measurement time), architectures per hour, and agreement with
   ``model``: Spearman rank correlation of latency and of activation memory, median
   latency ratio, largest FLOP difference. A second ``model`` pass (``model again``)
   shows how far two measurements of the same program agree on this machine.

B. (``--search``) The default LTS search (``configs/search/lts.py:cpu``) run to the end
   once per setting, each in its own process with a fresh persistent compile cache:
   wall time, architectures measured, compile share (the journal's summed
   ``xla_compile_seconds``, every XLA compile of the measurement jobs as JAX reports it,
   and its ``compile_seconds``, the measurement's own compile timing, each over the
   summed iteration seconds: the evaluation time; both over measured and capped
   architectures, and both include the ``precompiled`` records, what was compiled ahead
   for the iterations' populations with ``lts.compile_threads``: its compile events
   summed over the threads, and its wall time), architectures per hour, front size.
   ``--compile_threads=1,auto`` runs sub-layer searches with those settings instead.
   Same quality: every front member of every search is then measured again with
   ``programs=model`` (``--remeasure_repeats`` timed runs) in one process, and each
   front's hypervolume is computed from those common measurements (objectives
   max_P - P, latency, activation memory, normalised by the union's ranges; reference
   point 1.1; Monte-Carlo with 200,000 seeded samples).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

SETTINGS = ("model", "sublayers", "layers")


def part_a(n: int, seed: int) -> None:
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from nasjax.config import apply_overrides, load_config_file
    from nasjax.genome.stack import StackSpace
    from nasjax.search.lts import LTSMeasurer
    from nasjax.search.lts_validate import spearman

    base = load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu"))
    space = StackSpace.from_config(base.lts.space)
    names = SETTINGS + ("model again",)
    measurers = {s: LTSMeasurer(apply_overrides(base, {"lts.programs": s.split()[0]})) for s in names}
    rng = np.random.default_rng(seed)
    rows = {s: [] for s in names}
    for k in range(n):
        genome = space.sample(rng)
        spec = space.decode(genome, vocab_size=262, max_len=int(base.lts.seq_len))
        order = names[k % len(names) :] + names[: k % len(names)]
        for s in order:
            t0 = time.perf_counter()
            out = measurers[s].measure_job(spec, {})
            out["total"] = time.perf_counter() - t0
            rows[s].append(out)
    print(f"\nA. {n} architectures of the cpu space (seed {seed}), jax {jax.__version__}, {jax.devices()[0]}")
    print(
        "| programs | compile s / arch | pieces compiled / arch | total s / arch | compile share | architectures/hour "
        "| latency ms (median) | Spearman latency vs model | latency / model (median) "
        "| Spearman activation memory vs model | max FLOP difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = rows["model"]
    for s in names:
        r = rows[s]
        compile_s = sum(x["compile_seconds"] for x in r)
        total = sum(x["total"] for x in r)
        lat = [x["latency_s"] for x in r]
        ratio = statistics.median(a / b for a, b in zip(lat, (x["latency_s"] for x in ref)))
        mem = spearman([x["activation_memory_bytes"] for x in r], [x["activation_memory_bytes"] for x in ref])
        flops = max(abs(a["flops"] - b["flops"]) / b["flops"] for a, b in zip(r, ref))
        print(
            f"| {s} | {compile_s / n:.3f} | {statistics.fmean(x['compiled_pieces'] for x in r):.2f} | {total / n:.3f} "
            f"| {100 * compile_s / total:.0f}% | {3600 * n / total:.0f} | {1e3 * statistics.median(lat):.2f} "
            f"| {spearman(lat, [x['latency_s'] for x in ref]):.3f} | {ratio:.3f} | {mem:.3f} | {flops:.1e} |"
        )


def run_search(overrides: dict, workdir: str) -> dict:
    cache = tempfile.mkdtemp(prefix="nasjax_xla_")
    cmd = [sys.executable, "-m", "nasjax.cli", "search", f"--config={ROOT}/configs/search/lts.py:cpu"]
    cmd += [f"--workdir={workdir}", f"--config.compile_cache_dir={cache}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if out.returncode:
        raise SystemExit(f"search failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return {"wall": wall}


def hypervolume(points, ref, samples: int = 200_000, seed: int = 0) -> float:
    """Monte-Carlo hypervolume of minimised points in [0, ref]^d (points already normalised)."""
    import numpy as np

    pts = np.asarray(points, np.float64)
    u = np.random.default_rng(seed).uniform(0.0, ref, size=(samples, pts.shape[1]))
    dominated = np.zeros(samples, bool)
    for p in pts:
        dominated |= np.all(u >= p, axis=1)
    return float(dominated.mean() * ref ** pts.shape[1])


def part_b(workroot: str, repeats: int, reuse: bool = False, threads: str = "") -> None:
    import jax
    import numpy as np

    from nasjax.config import load_config_file
    from nasjax.genome.stack import StackGenome, StackSpace
    from nasjax.measure.hardware import measure_hardware
    from nasjax.search.journal import read_journal
    from nasjax.search.lts import front_records

    cfg = load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu"))
    space = StackSpace.from_config(cfg.lts.space)
    if threads:  # sub-layer searches, one per lts.compile_threads value
        settings = {f"sublayers, compile_threads={t}": {"lts.compile_threads": t} for t in threads.split(",")}
    else:
        settings = {s: {"lts.programs": s} for s in SETTINGS}
    results = {}
    for s, overrides in settings.items():
        work = os.path.join(workroot, s.replace(", ", "_").replace("=", ""))
        if reuse and os.path.exists(os.path.join(work, "journal.jsonl")):
            info = {"wall": float("nan")}
        else:
            shutil.rmtree(work, ignore_errors=True)
            info = run_search(overrides, work)
        recs = read_journal(os.path.join(work, "journal.jsonl"), log=lambda *a: None)
        measured = [r for r in recs if r["event"] == "measured"]
        archs = [r for r in recs if r["event"] in ("measured", "failed")]  # a capped one compiled too
        ahead = [r for r in recs if r["event"] == "precompiled"]  # lts.compile_threads
        info["measured"] = measured
        info["seconds"] = sum(float(r["seconds"]) for r in recs if r["event"] == "iteration")
        info["compile"] = sum(float(r.get("compile_seconds") or 0) for r in archs)
        info["compile"] += sum(float(r["seconds"]) for r in ahead)
        info["xla"] = sum(float(r.get("xla_compile_seconds") or 0) for r in archs)
        info["xla"] += sum(float(r["xla_seconds"]) for r in ahead)
        info["front"] = front_records(measured, cfg.lts.selection, cfg.lts.memory)
        results[s] = info
        print(f"search {s}: {info['wall']:.0f} s", flush=True)

    # every front member measured again with one protocol, in this process
    jax.config.update("jax_enable_compilation_cache", False)
    common = {}
    for s in settings:
        for r in results[s]["front"]:
            if r["key"] not in common:
                spec = space.decode(StackGenome.from_dict(r["genome"]), vocab_size=262, max_len=int(cfg.lts.seq_len))
                m = measure_hardware(spec, int(cfg.lts.seq_len), repeats=repeats, programs="model")
                common[r["key"]] = (r["decoder_params"], m.latency_s, m.activation_memory_bytes)
    allp = np.asarray(list(common.values()), np.float64)
    pmax = allp[:, 0].max()
    objs = np.stack([pmax - allp[:, 0], allp[:, 1], allp[:, 2]], 1)
    lo, hi = objs.min(0), objs.max(0)
    norm = {k: (np.asarray([pmax - v[0], v[1], v[2]]) - lo) / np.maximum(hi - lo, 1e-30) for k, v in common.items()}

    print(f"\nB. the default LTS search (configs/search/lts.py:cpu), jax {jax.__version__}, {jax.devices()[0]}")
    print(
        "| programs | wall s | measured | evaluation s | XLA compile s | XLA compile share | measurement compile s "
        "| its share | architectures/hour | front size | front hypervolume (common re-measurement) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        info = results[s]
        m, secs, comp, xla = info["measured"], info["seconds"], info["compile"], info["xla"]
        hv = hypervolume([norm[r["key"]] for r in info["front"]], 1.1)
        print(
            f"| {s} | {info['wall']:.0f} | {len(m)} | {secs:.1f} | {xla:.1f} | {100 * xla / secs:.0f}% | {comp:.1f} "
            f"| {100 * comp / secs:.0f}% | {3600 * len(m) / secs:.0f} | {len(info['front'])} | {hv:.4f} |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--architectures", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--search", action="store_true", help="also part B: the default search once per setting")
    p.add_argument("--workdir", default="", help="where part B's searches go (default: a temporary directory)")
    p.add_argument("--remeasure_repeats", type=int, default=30)
    p.add_argument("--reuse", action="store_true", help="part B: keep searches already in --workdir")
    p.add_argument(
        "--compile_threads",
        default="",
        help="part B: sub-layer searches with these lts.compile_threads values (e.g. 1,auto) instead of the settings",
    )
    args = p.parse_args()
    if args.architectures:
        part_a(args.architectures, args.seed)
    if args.search:
        workroot = args.workdir or tempfile.mkdtemp(prefix="nasjax_lts_programs_")
        part_b(workroot, args.remeasure_repeats, args.reuse, args.compile_threads)
        print(json.dumps({"workdir": workroot}))


if __name__ == "__main__":
    main()
