"""``nasjax lts-validate``: does a zero-cost proxy rank architectures like training does?

Samples ``lts.validate_architectures`` random architectures of the LTS space, scores each
with every proxy (decoder params, total params, XLA FLOPs, and the gradient proxies of
:mod:`nasjax.measure.zero_cost`), trains each with the same recipe (``train.*``: steps,
batch, learning rate; same data order) and reports the Spearman rank correlation of
each proxy with the validation loss, sign-adjusted so that +1 means "a higher proxy
predicts a lower loss" (the paper's SRC(params, -ppl)).

Resumable like a search: one ``validated`` (or ``failed``) journal record per
architecture in ``WORKDIR/journal.jsonl``; a rerun trains only what is missing.
Outputs ``validation.csv`` (per architecture), ``proxy_correlation.csv`` and
``proxy_scatter.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from nasjax.genome.stack import StackGenome, StackSpace
from nasjax.search.journal import Journal

__all__ = ["spearman", "validate_proxies", "ValidationSummary"]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # average ranks of ties
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get average ranks); nan if undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclasses.dataclass
class ValidationSummary:
    n: int
    correlations: dict[str, float]
    table: str
    files: list[str]


def _proxies(spec, cfg) -> dict[str, float]:
    from nasjax.measure.flops import xla_flops
    from nasjax.measure.params import count_params
    from nasjax.measure.zero_cost import PROXIES, zero_cost_proxies

    counts = count_params(spec)
    seq = int(cfg.data.seq_len)
    out = {"decoder_params": float(counts["non_embedding"]), "total_params": float(counts["total"])}
    try:
        out["flops"] = float(xla_flops(spec, 1, seq))
    except Exception:  # a backend without cost analysis
        out["flops"] = math.nan
    names = tuple(p.strip() for p in str(cfg.lts.proxies).split(",") if p.strip()) or PROXIES
    scores = zero_cost_proxies(spec, seq, names=names, seed=int(cfg.seed))
    out.update({k: float(v) for k, v in scores.items() if not k.endswith("_std")})
    return out


def _train(spec, cfg, data, mesh, rules) -> tuple[float, float]:
    from nasjax.train.loop import Trainer

    trainer = Trainer(spec, cfg.train, mesh, rules, cfg.seed, int(cfg.data.seq_len), dtype=cfg.model.dtype)
    state = trainer.init_state()
    state, result = trainer.fit(state, data.train_iterator(), total_steps=int(cfg.train.steps), log_every=10**9)
    if result.status == "diverged":
        raise RuntimeError(result.reason)
    val = trainer.evaluate(state.params, data.val_batches(int(cfg.train.eval_batches) or 16))
    return float(val["val_loss"]), float(result.train_seconds)


def validate_proxies(cfg, workdir: str, log=print) -> ValidationSummary:
    """Runs (or resumes) the proxy validation of the module docstring in ``workdir``."""
    from nasjax.search.run import _build_data
    from nasjax.train.run import make_mesh, setup_compile_cache

    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    space = StackSpace.from_config(cfg.lts.space)
    n = int(cfg.lts.validate_architectures)
    with Journal(os.path.join(workdir, "journal.jsonl"), log=log) as journal:
        header = next((r for r in journal.records if r["event"] == "search"), None)
        if header is None:
            journal.append("search", method="lts-validate", config=json.loads(cfg.to_json()))
        setup_compile_cache(cfg)
        mesh, rules = make_mesh(cfg)
        tokenizer, data = _build_data(cfg, workdir, log)
        done = {r["key"]: r for r in journal.records if r["event"] in ("validated", "failed")}
        rng = np.random.default_rng([int(cfg.seed), 7919])
        genomes, seen = [], set()
        while len(genomes) < n:
            g = space.sample(rng)
            if g.key() not in seen:
                seen.add(g.key())
                genomes.append(g)
        t0 = time.perf_counter()
        for i, g in enumerate(genomes):
            if g.key() in done:
                continue
            base = {"id": i, "key": g.key(), "genome": g.to_dict()}
            try:
                spec = space.decode(g, vocab_size=tokenizer.vocab_size, max_len=int(cfg.data.seq_len))
                proxies = _proxies(spec, cfg)
                val_loss, seconds = _train(spec, cfg, data, mesh, rules)
                rec = journal.append("validated", proxies=_finite(proxies), val_loss=val_loss, train_seconds=seconds,
                                     **base)  # fmt: skip
            except Exception as e:
                rec = journal.append("failed", reason=f"{type(e).__name__}: {e}"[:400], **base)
            done[g.key()] = rec
            shown = f"val loss {rec['val_loss']:.4f}" if rec["event"] == "validated" else f"FAILED {rec['reason']}"
            elapsed = time.perf_counter() - t0
            log(f"[{len(done)}/{n}] {g.n_layer} layers x d_model {g.d_model}: {shown} | {elapsed:.0f}s")
            jax.clear_caches()
    rows = [done[g.key()] for g in genomes if done[g.key()]["event"] == "validated"]
    return _report(workdir, rows)


def _finite(d: dict) -> dict:
    return {k: (v if v is not None and math.isfinite(v) else None) for k, v in d.items()}


def _report(workdir: str, rows: list[dict]) -> ValidationSummary:
    names = sorted({k for r in rows for k in r["proxies"]})
    loss = [r["val_loss"] for r in rows]
    value = lambda r, k: math.nan if r["proxies"].get(k) is None else r["proxies"][k]
    corr = {k: spearman([value(r, k) for r in rows], [-x for x in loss]) for k in names}
    files = []
    path = os.path.join(workdir, "validation.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "n_layer", "d_model", "val_loss", "train_seconds"] + names)
        for r in rows:
            g = StackGenome.from_dict(r["genome"])
            cells = [r["id"], g.n_layer, g.d_model, r["val_loss"], r["train_seconds"]]
            w.writerow(cells + [value(r, k) for k in names])
    files.append(path)
    path = os.path.join(workdir, "proxy_correlation.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["proxy", "spearman_vs_minus_val_loss", "n"])
        for k in names:
            w.writerow([k, corr[k], len(rows)])
    files.append(path)
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(len(names), 4)
        nrows = -(-len(names) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), dpi=100, squeeze=False)
        for ax, k in zip(axes.flat, names):
            ax.scatter([value(r, k) for r in rows], loss, s=12)
            ax.set_title(f"{k}: SRC {corr[k]:+.3f}", fontsize=9)
            ax.set_xscale("log" if all(value(r, k) > 0 for r in rows) else "linear")
            ax.set_ylabel("val loss", fontsize=8)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(workdir, "proxy_scatter.png")
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    lines = [f"{'proxy':<16} {'Spearman vs -val loss':>22}   (n = {len(rows)})"]
    lines += [f"{k:<16} {corr[k]:>22.3f}" for k in sorted(names, key=lambda k: -np.nan_to_num(corr[k], nan=-9))]
    return ValidationSummary(len(rows), corr, "\n".join(lines), files)
