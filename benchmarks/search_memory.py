"""Peak host memory of a long search: does it stay flat over 1,000 evaluations?

    python benchmarks/search_memory.py --evaluations=1000 --workdir=/tmp/mem \\
        --override search.d_model=16 --override search.n_layers=1 --override data.seq_len=16 \\
        --override train.steps=8 --override search.hurdles=0 --override search.val_batches=1 \\
        --override engine=threads --override search.in_flight=2

Runs ``nasjax search`` (``--config``, default the tiny Primer preset, with the given
``--override KEY=VALUE`` settings, passed as ``--config.KEY=VALUE``) in a subprocess
until ``--evaluations`` results are journaled, and samples every second the resident
memory (VmRSS) of the search's processes (the controller and, with ``engine=processes``,
its worker processes, summed), the peak (the controller's high-water mark VmHWM, or the
largest sampled sum when there are workers) and the journal's size. The table
gives them at every ``--every`` evaluations, and the growth of resident memory per 100
evaluations (least-squares slope over the second half of the run, after the caches of
the first candidates have filled). Each row also gives the median and the range of the
1 s samples since the previous row, which a mark's single sample can misrepresent. What
could grow: compiled executables kept by jit caches, the evolution's history, the journal
index, the probe's parameter hand-over.

Small candidates are the hard case for memory (many programs per minute), and make
1,000 evaluations take minutes instead of hours on a CPU.

Below the table: the growth over the second half, of the 1 s samples and of their floors
(each 50 results' lowest sample). A floor is what the process holds between its candidates'
peaks: caches, the journal, the evolution's history, the heap kept. The samples follow
the candidate in hand, whose train step alone may need up to ``search.max_memory_bytes``.

``--heap`` also samples, inside the search's process (a ``sitecustomize`` on its
PYTHONPATH; glibc only), glibc's heap every second: the blocks in use (live, mmapped ones
included), the free blocks the heap keeps for reuse (:mod:`nasjax.hostmem`), the piece
registry's entries and bytes and JAX's live arrays. It prints them per mark, and the
growth of the live heap's floor over the second half.

After the memory table it prints, from the search's journal, XLA's compile seconds
against wall time per ``--window`` results and by outcome (trained, stopped at a hurdle,
reused, failed); ``--report=DIR`` prints only those, for a finished search in DIR.

History or current candidates? ``--resume_from=DIR --resume_at=N`` copies the finished
search DIR's settings and the first N results of its journal into ``--workdir`` and
resumes the search there, in a fresh process (same overrides as DIR's run; a fresh
compile cache): its population and history are DIR's at N, nothing else is. If a fresh
process reaches the original's resident memory at the same evaluations, what the memory
follows is the candidates evaluated then, not what the search kept from before N.

    python benchmarks/search_memory.py --resume_from=/tmp/mem --resume_at=800 --workdir=/tmp/mem800 \
        --evaluations=1000 --every=20 --override ... (the same as /tmp/mem's)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
_RESULT = re.compile(rb'"event": ?"(?:finished|failed)"')


# --heap: a sitecustomize on the search's PYTHONPATH starts, in the search's own process,
# a thread that writes every second what glibc's heap holds (mallinfo2: live blocks, mmapped
# blocks, free blocks kept), the piece registry's entries and bytes, and JAX's live arrays.
HEAP_SITE = """
import ctypes, os, sys, threading, time

_PATH = os.environ.get("NASJAX_HEAP_TRACE")


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _sample(libc, out):
    mib = 1.0 / 2**20
    while True:
        info = libc.mallinfo2()
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    status[key] = int(value.split()[0]) / 1024.0
        seg = sys.modules.get("nasjax.train.segmented")
        reg = getattr(seg, "_PROGRAMS", None)
        pieces, piece_mib = (len(reg._items), reg._bytes * mib) if reg is not None else (0, 0.0)
        bridge = sys.modules.get("jax._src.xla_bridge")
        live = float("nan")
        try:  # only once the search has started its backend: live_arrays() would start it here,
            # off the main thread and before jax.distributed.initialize
            if bridge is not None and bridge.backends_are_initialized():
                live = sum(a.nbytes for a in sys.modules["jax"].live_arrays()) * mib
        except Exception:
            pass
        out.write(f"{time.time():.2f},{status.get('VmRSS', 0.0):.1f},{(info.uordblks + info.hblkhd) * mib:.1f},"
                  f"{info.hblkhd * mib:.1f},{info.fordblks * mib:.1f},{pieces},{piece_mib:.1f},{live:.1f},"
                  f"{status.get('RssAnon', 0.0):.1f},{status.get('RssFile', 0.0):.1f},{sys.getallocatedblocks()}\\n")
        out.flush()
        time.sleep(1.0)


if _PATH and "nasjax.cli" in " ".join(sys.orig_argv):
    try:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallinfo2.restype = _Info
    except (OSError, AttributeError):
        _libc = None
    if _libc is not None:
        threading.Thread(target=_sample, args=(_libc, open(_PATH, "w")), daemon=True).start()
"""


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0  # kB -> MiB
    return out


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (engine=processes: the worker processes)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _tree_rss(pid: int) -> tuple[float, int]:
    """Resident MiB of ``pid``'s descendants, and how many there are."""
    total, n = 0.0, 0
    for child in _children(pid):
        try:
            total += _status(child).get("VmRSS", 0.0)
            n += 1
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total, n


def _results(journal: str) -> int:
    try:
        with open(journal, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    return len(_RESULT.findall(data))


def _copy_truncated(src: str, dst: str, results: int) -> None:
    """``src``'s search files into ``dst``, its journal cut after the ``results``-th result."""
    import shutil

    if os.path.exists(os.path.join(dst, "journal.jsonl")):
        raise SystemExit(f"--workdir {dst} already holds a journal; give an empty or new directory")
    source = os.path.join(src, "journal.jsonl")
    if not os.path.isfile(source):
        raise SystemExit(f"--resume_from {src}: no journal.jsonl there")
    held = _results(source)
    if held < results:
        raise SystemExit(f"{source} holds {held} results, fewer than --resume_at={results}")
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    n = 0
    with open(source, "rb") as f, open(os.path.join(dst, "journal.jsonl"), "wb") as out:
        for line in f:
            if n >= results:
                break
            out.write(line)
            n += bool(_RESULT.search(line))


def _slope(points: list[tuple[int, float]]) -> float:
    """MiB per 100 evaluations, least squares."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return 100.0 * sxy / sxx if sxx else float("nan")


# Results per window whose lowest sample is a floor: what the process holds between its
# candidates' peaks (caches, journal, heap kept), rather than what the candidate in hand needs.
_FLOOR_WINDOW = 50


def _floors(points: list[tuple[int, float]], start: int, final: int) -> list[tuple[int, float]]:
    """(window end, lowest value) per ``_FLOOR_WINDOW`` results over the second half."""
    out = []
    for lo in range(start + (final - start) // 2, final, _FLOOR_WINDOW):
        window = [v for n, v in points if lo <= n < lo + _FLOOR_WINDOW]
        if window:
            out.append((lo + _FLOOR_WINDOW, min(window)))
    return out


def heap_tables(path: str, samples: list, t0: float, start: int, final: int, every: int) -> None:
    """The ``--heap`` trace per mark: the lowest and median live heap (glibc's blocks in use,
    mmapped ones included), the free blocks the heap kept (median), the piece registry and
    JAX's live arrays at the mark; and the floors' growth over the second half."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) != 11:
                continue
            try:  # the last line may be cut short when the search ended
                rows.append([float(v) for v in parts])
            except ValueError:
                continue
    if not rows:
        print(f"\n--heap: {path} holds no samples (not glibc?)")
        return
    # each heap sample takes the result count of the last outside sample before it
    counted, i, n = [], 0, 0
    for r in rows:
        while i < len(samples) and t0 + samples[i][0] <= r[0]:
            n = samples[i][1]
            i += 1
        counted.append((n, r))
    print(
        "\n| evaluations | live heap MiB: window lowest / median | of it mmapped (median) | free kept MiB "
        "(median) | anonymous resident less live heap MiB: lowest / median | file-backed resident MiB (median) "
        "| Python's small blocks, thousands (median) | pieces held | their MiB | JAX live arrays MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    marks = list(range(start + every, final + 1, every))
    for lo, m in zip([start] + marks, marks):
        window = [r for c, r in counted if lo <= c < m]
        if not window:
            continue
        live = sorted(r[2] for r in window)
        mm = sorted(r[3] for r in window)
        free = sorted(r[4] for r in window)
        rest = sorted(r[8] - r[2] for r in window)
        files = sorted(r[9] for r in window)
        blocks = sorted(r[10] for r in window)
        last = window[-1]
        print(
            f"| {m} | {live[0]:.0f} / {live[len(live) // 2]:.0f} | {mm[len(mm) // 2]:.0f} | {free[len(free) // 2]:.0f} "
            f"| {rest[0]:.0f} / {rest[len(rest) // 2]:.0f} | {files[len(files) // 2]:.0f} "
            f"| {blocks[len(blocks) // 2] / 1000:.0f} | {last[5]:.0f} | {last[6]:.0f} | {last[7]:.0f} |"
        )
    print("\ngrowth over the second half, per 100 evaluations, of the floors (each 50 results' lowest sample):")
    for name, column in (
        ("live heap, MiB", lambda r: r[2]),
        ("anonymous resident less live heap, MiB", lambda r: r[8] - r[2]),
        ("file-backed resident, MiB", lambda r: r[9]),
        ("Python's small blocks, thousands", lambda r: r[10] / 1000),
    ):
        print(f"- {name}: {_slope(_floors([(c, column(r)) for c, r in counted], start, final)):+.1f}")


def _outcome(rec: dict) -> str:
    """What became of a journaled result: reused (and why), failed, stopped at a hurdle,
    or trained through the whole budget."""
    if rec["event"] == "failed":
        return "failed"
    if rec.get("cached_from") is not None:
        reason = str(rec.get("reason") or "")
        return "reused: identical expression" if "identical" in reason else "reused: functionally equivalent"
    return "full budget" if rec.get("stopped_at_hurdle") is None else "stopped at a hurdle"


def journal_tables(journal: str, window: int) -> None:
    """Prints, from a search's journal, XLA's compile seconds against wall time per
    ``window`` results, and XLA and training seconds by outcome (``xla_compile_seconds``,
    ``train_seconds`` of the result records)."""
    if ROOT not in sys.path:  # a checkout that is not installed
        sys.path.insert(0, ROOT)
    from nasjax.search.journal import read_journal

    records = read_journal(journal, log=lambda *a: None)  # a damaged line is skipped there
    results = sorted((r for r in records if r.get("event") in ("finished", "failed")), key=lambda r: r["seq"])
    if not results:
        print(f"{journal}: no results")
        return
    start = min(r["time"] for r in records if "time" in r)
    print("| results | wall s | XLA compile s | share | trained |\n|---|---|---|---|---|")
    before = start
    for a in range(0, len(results), window):
        part = results[a : a + window]
        wall = part[-1]["time"] - before
        xla = sum(r.get("xla_compile_seconds") or 0.0 for r in part)
        trained = sum(_outcome(r) in ("full budget", "stopped at a hurdle") for r in part)
        print(f"| {a + 1}-{a + len(part)} | {wall:.0f} | {xla:.0f} | {xla / max(wall, 1e-9):.0%} | {trained} |")
        before = part[-1]["time"]
    total = sum(r.get("xla_compile_seconds") or 0.0 for r in results)
    wall = results[-1]["time"] - start
    print(f"| all | {wall:.0f} | {total:.0f} | {total / max(wall, 1e-9):.0%} | |")
    by: dict[str, list[float]] = {}
    for r in results:
        row = by.setdefault(_outcome(r), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += r.get("xla_compile_seconds") or 0.0
        row[2] += r.get("train_seconds") or 0.0
    print("\n| outcome | results | XLA compile s | train s |\n|---|---|---|---|")
    for name, (n, xla, train) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {xla:.1f} | {train:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/search/primer.py:tiny")
    p.add_argument("--evaluations", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--workdir", default="")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.add_argument("--trace", default="", help="also write every 1 s sample to this CSV file")
    p.add_argument("--resume_from", default="", help="a finished search's workdir to resume from (docstring)")
    p.add_argument("--resume_at", type=int, default=0, help="with --resume_from: its first N results are kept")
    p.add_argument("--window", type=int, default=200, help="results per row of the compile-share table")
    p.add_argument("--report", default="", help="only print the compile tables of this finished search's workdir")
    p.add_argument(
        "--heap",
        action="store_true",
        help="also sample, inside the search's process, glibc's heap (live and free kept), the piece "
        "registry and JAX's live arrays every second, and print them per mark (glibc only)",
    )
    args = p.parse_args()
    if args.report:
        path = os.path.join(args.report, "journal.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"--report {args.report}: no journal.jsonl there")
        journal_tables(path, args.window)
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="nasjax_memory_")
    if bool(args.resume_from) != (args.resume_at != 0):
        raise SystemExit("--resume_from and --resume_at go together")
    if args.resume_at < 0 or (args.resume_from and args.evaluations <= args.resume_at):
        raise SystemExit("--resume_at must be >= 0 and below --evaluations")
    if args.resume_from:
        _copy_truncated(args.resume_from, workdir, args.resume_at)
    journal = os.path.join(workdir, "journal.jsonl")
    cache = tempfile.mkdtemp(prefix="nasjax_xla_")
    cmd = [sys.executable, "-m", "nasjax.cli", "search", f"--config={os.path.join(ROOT, args.config)}"]
    cmd += [f"--workdir={workdir}", f"--config.search.max_evaluations={args.evaluations}"]
    cmd += [f"--config.compile_cache_dir={cache}"] + [f"--config.{o}" for o in args.override]
    log_path = os.path.join(workdir + "_search.log")
    env = dict(os.environ)
    heap_trace = ""
    if args.heap:
        site = tempfile.mkdtemp(prefix="nasjax_heap_site_")
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(HEAP_SITE)
        heap_trace = os.path.join(workdir + "_heap.csv")
        env["PYTHONPATH"] = os.pathsep.join([site, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["NASJAX_HEAP_TRACE"] = heap_trace
    t0 = time.time()
    # time, results, rss (all processes), peak (running max of that sum, or the controller's VmHWM
    # when it is alone), journal MiB, controller rss, worker processes
    samples: list[tuple[float, int, float, float, float, float, int]] = []
    peak = 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                st = _status(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            size = os.path.getsize(journal) / 2**20 if os.path.exists(journal) else 0.0
            workers, n = _tree_rss(proc.pid)
            rss = st.get("VmRSS", 0.0) + workers
            peak = max(peak, rss, st.get("VmHWM", 0.0))
            samples.append((time.time() - t0, _results(journal), rss, peak, size, st.get("VmRSS", 0.0), n))
            time.sleep(1.0)
    if args.trace:
        with open(args.trace, "w") as f:
            f.write("seconds,evaluations,resident_mib,peak_mib,journal_mib,controller_mib,workers\n")
            for x in samples:
                f.write(",".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in x) + "\n")
    if proc.returncode:
        raise SystemExit(f"the search failed (exit {proc.returncode}); see {log_path}")
    if not samples:
        raise SystemExit(f"the search ended before its memory was sampled; see {log_path}")
    final = _results(journal)
    print(f"search: {final} evaluations in {(time.time() - t0) / 60:.1f} min; command: {' '.join(cmd[1:])}\n")
    print(
        "| evaluations | minutes | resident MiB | peak MiB | journal MiB | controller MiB | workers"
        " | window median MiB | window range MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    start = args.resume_at  # a resumed search's results begin after the kept ones
    marks = list(range(start + args.every, final + 1, args.every))
    for lo, m in zip([start] + marks, marks):
        s = next((x for x in samples if x[1] >= m), samples[-1])
        window = sorted(x[2] for x in samples if lo <= x[1] < m) or [s[2]]  # the samples since the last mark
        print(
            f"| {m} | {s[0] / 60:.1f} | {s[2]:.0f} | {s[3]:.0f} | {s[4]:.2f} | {s[5]:.0f} | {s[6]} "
            f"| {window[len(window) // 2]:.0f} | {window[0]:.0f}-{window[-1]:.0f} |"
        )
    half = [(x[1], x[2]) for x in samples if x[1] >= start + (final - start) // 2]
    print(f"\nresident memory growth over the second half: {_slope(half):+.1f} MiB per 100 evaluations")
    floors = _floors([(x[1], x[2]) for x in samples], start, final)
    print(
        f"resident floor (each {_FLOOR_WINDOW} results' lowest 1 s sample) growth over the second half: "
        f"{_slope(floors):+.1f} MiB per 100 evaluations"
    )
    first = next((x for x in samples if x[1] >= start + args.every), samples[-1])
    highest = max(x[3] for x in samples)
    print(f"peak resident: {highest:.0f} MiB (at {start + args.every} evaluations: {first[3]:.0f} MiB)")
    print(
        "resident and peak count every process of the search (engine=processes: the controller and its "
        "workers, summed at each 1 s sample; alone, the peak is the controller's high-water mark)"
    )
    if heap_trace:
        heap_tables(heap_trace, samples, t0, start, final, args.every)
    print()
    journal_tables(journal, args.window)


if __name__ == "__main__":
    main()
