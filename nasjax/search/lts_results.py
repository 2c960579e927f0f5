"""Exports of an LTS search (written at the end of ``nasjax search`` and by ``nasjax results``).

* ``results.csv``: every architecture (measured or failed): id, status, key, iteration,
  origin, n_layer, d_model, d_inner, n_head, decoder_params, total_params, latency_ms,
  peak_memory_mb, device_peak_mb, flops, compile_seconds, reason;
* ``pareto.csv`` / ``pareto.json``: the front (decoder params vs latency vs peak memory),
  sorted by latency;
* ``front/<id>.json``: the model spec of every front member (``nasjax train
  --config.model.spec=DIR/front/<id>.json``);
* ``params_vs_latency.png``, ``params_vs_memory.png``: every architecture, the front
  highlighted; ``front_over_iterations.png``: the front after each iteration.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import ml_collections

from nasjax.data import tokenizer_from_config
from nasjax.genome.stack import StackGenome, StackSpace
from nasjax.search.journal import read_journal
from nasjax.spec import save_spec

__all__ = ["export_lts", "LTSExport"]

COLUMNS = (
    "id",
    "status",
    "key",
    "iteration",
    "origin",
    "n_layer",
    "d_model",
    "d_inner",
    "n_head",
    "decoder_params",
    "total_params",
    "latency_ms",
    "peak_memory_mb",
    "activation_memory_mb",
    "device_peak_mb",
    "flops",
    "compile_seconds",
    "reason",
)


@dataclasses.dataclass
class LTSExport:
    front_size: int
    measured: int
    failed: int
    table: str
    files: list[str]


def _row(rec: dict) -> dict:
    g = StackGenome.from_dict(rec["genome"])
    n = g.n_layer
    mb = lambda b: "" if b is None else f"{b / 2**20:.3f}"
    return {
        "id": rec["id"],
        "status": rec["event"],
        "key": rec["key"],
        "iteration": rec.get("iteration"),
        "origin": rec.get("origin", ""),
        "n_layer": n,
        "d_model": g.d_model,
        "d_inner": " ".join(str(x) for x in g.d_inner[:n]),
        "n_head": " ".join(str(x) for x in g.n_head[:n]),
        "decoder_params": rec.get("decoder_params", ""),
        "total_params": rec.get("total_params", ""),
        "latency_ms": "" if rec.get("latency_s") is None else f"{rec['latency_s'] * 1e3:.4f}",
        "peak_memory_mb": mb(rec.get("peak_memory_bytes")),
        "activation_memory_mb": mb(rec.get("activation_memory_bytes")),
        "device_peak_mb": mb(rec.get("device_peak_bytes")),
        "flops": rec.get("flops") or "",
        "compile_seconds": "" if rec.get("compile_seconds") is None else f"{rec['compile_seconds']:.3f}",
        "reason": rec.get("reason", ""),
    }


def _scatter(path, measured, front, y_key, y_label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter([r["decoder_params"] / 1e6 for r in measured], [y_key(r) for r in measured], s=10, alpha=0.4,
               label="measured")  # fmt: skip
    fr = sorted(front, key=lambda r: r["decoder_params"])
    ax.plot([r["decoder_params"] / 1e6 for r in fr], [y_key(r) for r in fr], "o-", color="C3", label="Pareto front")
    ax.set_xlabel("decoder parameters (M)")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _front_over_iterations(path, records, iterations):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {r["id"]: r for r in records if r["event"] == "measured"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    cmap = plt.get_cmap("viridis")
    n = max(len(iterations), 1)
    for k, it in enumerate(iterations):
        fr = sorted((by_id[i] for i in it["front"] if i in by_id), key=lambda r: r["latency_s"])
        if fr:
            ax.plot([r["latency_s"] * 1e3 for r in fr], [r["decoder_params"] / 1e6 for r in fr], ".-",
                    color=cmap(k / n), label=f"iteration {it['iteration']}" if k in (0, n - 1) else None)  # fmt: skip
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("decoder parameters (M)")
    ax.set_title("Pareto front over iterations")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def export_lts(workdir: str, log=print) -> LTSExport:
    """Writes the files of the module docstring from the journal of ``workdir``."""
    from nasjax.search.lts import front_records, memory_of

    workdir = os.path.abspath(os.path.expanduser(workdir))
    records = read_journal(os.path.join(workdir, "journal.jsonl"), log=log)
    header = next(r for r in records if r["event"] == "search")
    cfg = ml_collections.ConfigDict(header["config"])
    archs = [r for r in records if r["event"] in ("measured", "failed")]
    measured = [r for r in archs if r["event"] == "measured"]
    iterations = [r for r in records if r["event"] == "iteration"]
    memory = cfg.lts.get("memory", "total")
    front = sorted(front_records(measured, cfg.lts.selection, memory), key=lambda r: r["latency_s"])
    files = []

    path = os.path.join(workdir, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(_row(r) for r in archs)
    files.append(path)
    path = os.path.join(workdir, "pareto.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(_row(r) for r in front)
    files.append(path)

    space = StackSpace.from_config(cfg.lts.space)
    vocab = int(cfg.lts.vocab_size)
    if not vocab:
        with open(os.path.join(workdir, "tokenizer.json")) as f:
            vocab = tokenizer_from_config(json.load(f)).vocab_size
    front_dir = os.path.join(workdir, "front")
    os.makedirs(front_dir, exist_ok=True)
    entries = []
    for r in front:
        spec = space.decode(StackGenome.from_dict(r["genome"]), vocab_size=vocab, max_len=int(cfg.lts.seq_len))
        spec_path = os.path.join(front_dir, f"{r['id']}.json")
        save_spec(spec.replace(name=f"lts-front-{r['id']}"), spec_path)
        entry = {k: v for k, v in _row(r).items() if k not in ("status", "reason")}
        entry["spec"] = os.path.relpath(spec_path, workdir)
        entries.append(entry)
    path = os.path.join(workdir, "pareto.json")
    with open(path, "w") as f:
        json.dump({"backend": front[0].get("backend") if front else None, "front": entries}, f, indent=2)
    files += [path, front_dir]
    if measured:
        files.append(_scatter(os.path.join(workdir, "params_vs_latency.png"), measured, front,
                              lambda r: r["latency_s"] * 1e3, "latency (ms)"))  # fmt: skip
        files.append(_scatter(os.path.join(workdir, "params_vs_memory.png"), measured, front,
                              lambda r: memory_of(r, memory) / 2**20, f"{memory} memory (MiB)"))  # fmt: skip
    if iterations:
        files.append(_front_over_iterations(os.path.join(workdir, "front_over_iterations.png"), records, iterations))

    lines = [f"{'id':>5} {'layers':>6} {'d_model':>7} {'dec. params':>12} {'latency ms':>11} {memory + ' MiB':>16}"]
    for r in front:
        lines.append(
            f"{r['id']:>5} {StackGenome.from_dict(r['genome']).n_layer:>6} {r['genome']['d_model']:>7} "
            f"{r['decoder_params']:>12,} {r['latency_s'] * 1e3:>11.3f} {memory_of(r, memory) / 2**20:>16.2f}"
        )
    failed = len(archs) - len(measured)
    lines.append(f"Pareto front: {len(front)} of {len(measured)} measured architectures ({failed} rejected)")
    return LTSExport(len(front), len(measured), failed, "\n".join(lines), files)
