"""``nasjax results DIR``: plain-file exports of a search, read from its journal.

Writes, next to the journal (safe while the search is still running; the journal is
opened read-only):

* ``results.csv``: one row per finished or failed evaluation, in evaluation order:
  id, status (finished | stopped@hurdleJ | reused | failed), fitness, hash, params,
  compile_seconds, train_seconds, reason, plus parent, origin, fec_hash, steps, stage;
* ``best_spec.json``: the model spec of the best candidate (train it with
  ``nasjax train --config=configs/train/lm.py:tiny --config.model.spec=DIR/best_spec.json``);
* ``best_program.txt``: the best program rendered as readable text, with its origin;
* ``fitness.png``: fitness of every evaluation against its index, and the best so far.

AutoBERT-Zero searches also get ``architectures.txt`` (every evaluated candidate's
layers, attention graphs written as equations), ``ucb.csv`` (the OP-NAS statistics
N_i, mu_i, u_i per op after the last result) and extra ``results.csv`` columns
(mean_accuracy, mlm_loss, layout, op, and one accuracy column per task).

Returns (and the CLI prints) a leaderboard of the top candidates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import ml_collections

from nasjax.data import tokenizer_from_config
from nasjax.search.journal import read_journal
from nasjax.spec import save_spec

__all__ = ["ResultsSummary", "export_results", "COLUMNS"]

COLUMNS = (
    "id",
    "status",
    "fitness",
    "hash",
    "params",
    "compile_seconds",
    "train_seconds",
    "reason",
    "parent",
    "origin",
    "fec_hash",
    "steps",
    "stage",
)


@dataclasses.dataclass
class ResultsSummary:
    evaluations: int
    failures: int
    best_id: int | None
    best_fitness: float | None
    leaderboard: str
    files: list[str]


def _status(rec: dict) -> str:
    if rec["event"] == "failed":
        return "failed"
    if rec.get("cached_from") is not None:
        return "reused"
    stop = rec.get("stopped_at_hurdle")
    return "finished" if stop is None else f"stopped@hurdle{stop}"


def _rows(records: list[dict]) -> tuple[list[dict], dict[int, dict]]:
    proposals = {r["id"]: r for r in records if r["event"] == "proposed"}
    rows = []
    for rec in records:
        if rec["event"] not in ("finished", "failed"):
            continue
        prop = proposals.get(rec["id"], {})
        fitness = rec.get("fitness") if rec["event"] == "finished" else None
        rows.append(
            {
                "id": rec["id"],
                "status": _status(rec),
                "fitness": "" if fitness is None else repr(float(fitness)),
                "hash": rec.get("hash") or prop.get("hash", ""),
                "params": rec.get("params", ""),
                "compile_seconds": f"{float(rec.get('compile_seconds') or 0):.2f}",
                "train_seconds": f"{float(rec.get('train_seconds') or 0):.2f}",
                "reason": rec.get("reason", ""),
                "parent": "" if prop.get("parent") is None else prop["parent"],
                "origin": prop.get("origin", ""),
                "fec_hash": rec.get("fec_hash") or "",
                "steps": rec.get("steps", ""),
                "stage": rec.get("stage", ""),
                "_fitness": math.inf if fitness is None else float(fitness),
            }
        )
    return rows, proposals


def _space_for(workdir: str, header: dict):
    from nasjax.search.run import make_space

    cfg = ml_collections.ConfigDict(header["config"])
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        vocab = tokenizer_from_config(json.load(f)).vocab_size
    return make_space(cfg, vocab)


def _plot(rows: list[dict], path: str, ylabel: str | None = None) -> str | None:
    points = [(i, r["_fitness"]) for i, r in enumerate(rows) if math.isfinite(r["_fitness"])]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, best_curve = math.inf, []
    for i, f in points:
        best = min(best, f)
        best_curve.append((i, best))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*points), ".", alpha=0.5, label="candidate fitness")
    ax.plot(*zip(*best_curve), "-", lw=1.8, label="best so far")
    failed = [i for i, r in enumerate(rows) if r["status"] == "failed"]
    if failed:
        ax.plot(failed, [max(f for _, f in points)] * len(failed), "x", color="red", alpha=0.5, label="failed")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(ylabel or "validation loss (lower is better)")
    ax.set_title("search fitness")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _autobert_exports(workdir, records, rows, proposals, header) -> tuple[list[str], list[str]]:
    """architectures.txt, ucb.csv and the accuracy columns of results.csv (AutoBERT-Zero)."""
    space = _space_for(workdir, header)
    results = {r["id"]: r for r in records if r["event"] in ("finished", "failed")}
    tasks = sorted({t for r in results.values() for t in (r.get("accuracy") or {})})
    arch_path = os.path.join(workdir, "architectures.txt")
    with open(arch_path, "w") as f:
        for row in rows:
            rec, prop = results[row["id"]], proposals.get(row["id"], {})
            genome = space.genome_from_json(prop["genome"], f"candidate {row['id']}")
            row["layout"] = genome.layout
            row["op"] = prop.get("op") or ""
            acc = rec.get("accuracy") or {}
            row["mean_accuracy"] = f"{sum(acc.values()) / len(acc):.4f}" if acc else ""
            row["mlm_loss"] = "" if rec.get("mlm_loss") is None else f"{rec['mlm_loss']:.4f}"
            for t in tasks:
                row[f"acc_{t}"] = "" if t not in acc else f"{acc[t]:.4f}"
            score = f"fitness {row['_fitness']:.4f}" if math.isfinite(row["_fitness"]) else f"failed: {row['reason']}"
            origin = prop.get("origin", "") + (f" of #{prop['parent']}" if prop.get("parent") is not None else "")
            detail = f" ({prop['detail']})" if prop.get("detail") else ""
            f.write(f"# candidate #{row['id']} {origin}{detail}: {score}\n{space.render(genome)}\n\n")
    csv_path = os.path.join(workdir, "results.csv")
    columns = COLUMNS + ("mean_accuracy", "mlm_loss", "layout", "op") + tuple(f"acc_{t}" for t in tasks)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    snapshot = next((r for r in reversed(records) if r["event"] == "ucb"), None)
    lines = []
    files = [arch_path]
    if snapshot is not None:
        ucb_path = os.path.join(workdir, "ucb.csv")
        table = snapshot["table"]
        with open(ucb_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["op", "n", "mu", "u"])
            for op, st in table.items():
                writer.writerow([op, st["n"], st["mu"], "" if st["u"] is None else st["u"]])
        files.append(ucb_path)
        tried = sorted(((st["u"], op, st) for op, st in table.items() if st["u"] is not None), reverse=True)
        shown = ", ".join(f"{op} {st['mu']:.2f}/{st['n']}" for _, op, st in tried[:8])
        lines.append(f"UCB (op mu/N, by priority, N={snapshot['total']}): {shown or 'no op chosen yet'}")
    best = min((r for r in rows if math.isfinite(r["_fitness"])), key=lambda r: (r["_fitness"], r["id"]), default=None)
    if best is not None:
        genome = space.genome_from_json(proposals[best["id"]]["genome"], f"candidate {best['id']}")
        lines.append(f"best architecture (#{best['id']}):\n{space.render(genome)}")
    return files, lines


def export_results(workdir: str, top: int = 10, log=print) -> ResultsSummary:
    """Writes the exports of the module docstring and returns the leaderboard."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    records = read_journal(os.path.join(workdir, "journal.jsonl"), log=log)
    header = next((r for r in records if r["event"] == "search"), None)
    if header is not None and header.get("method") == "lts":
        from nasjax.search.lts_results import export_lts

        out = export_lts(workdir, log=log)
        return ResultsSummary(out.measured + out.failed, out.failed, None, None, out.table, out.files)
    rows, proposals = _rows(records)
    files = []
    csv_path = os.path.join(workdir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    files.append(csv_path)

    ranked = sorted((r for r in rows if math.isfinite(r["_fitness"])), key=lambda r: (r["_fitness"], r["id"]))
    lines = [f"{'rank':>4} {'id':>5} {'fitness':>9} {'status':<16} {'params':>10} {'origin'}"]
    for rank, r in enumerate(ranked[:top], 1):
        origin = r["origin"] + (f" of #{r['parent']}" if r["parent"] != "" else "")
        lines.append(f"{rank:>4} {r['id']:>5} {r['_fitness']:>9.4f} {r['status']:<16} {r['params']!s:>10} {origin}")
    failures = sum(1 for r in rows if r["status"] == "failed")
    lines.append(f"{len(rows)} evaluations, {failures} failed, {sum(r['status'] == 'reused' for r in rows)} reused")
    best = ranked[0] if ranked else None
    if best is not None and header is not None:
        space = _space_for(workdir, header)
        genome = space.genome_from_json(proposals[best["id"]]["genome"], f"candidate {best['id']}")
        spec_path = os.path.join(workdir, "best_spec.json")
        save_spec(space.decode(genome).replace(name=f"search-best-{best['id']}"), spec_path)
        text_path = os.path.join(workdir, "best_program.txt")
        with open(text_path, "w") as f:
            f.write(f"# candidate #{best['id']} ({best['origin']}), fitness {best['_fitness']:.6f}\n")
            f.write(space.render(genome))
        files += [spec_path, text_path]
        lines.append(f"best: #{best['id']} fitness {best['_fitness']:.4f} -> {spec_path}")
    if header is not None and header.get("method") == "autobert":
        extra_files, extra_lines = _autobert_exports(workdir, records, rows, proposals, header)
        files += extra_files
        lines += extra_lines
    ylabel = "1 - mean accuracy (lower is better)" if header and header.get("method") == "autobert" else None
    plot = _plot(rows, os.path.join(workdir, "fitness.png"), ylabel=ylabel)
    if plot:
        files.append(plot)
    return ResultsSummary(
        evaluations=len(rows),
        failures=failures,
        best_id=best["id"] if best else None,
        best_fitness=best["_fitness"] if best else None,
        leaderboard="\n".join(lines),
        files=files,
    )
