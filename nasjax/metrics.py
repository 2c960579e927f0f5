"""Run outputs a person reads: JSONL metrics, TensorBoard events, a progress bar, a loss plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


def _clean(v: Any) -> Any:
    try:
        v = float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the information as text
    return v


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, ``truncate_after(step)`` drops rows written after the restored
    checkpoint so the file and the loss curve stay one consistent history.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # light, no TensorFlow

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def truncate_after(self, step: int) -> None:
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.path)

    def write(self, step: int, kind: str, **scalars: Any) -> None:
        row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "kind", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Reads a metrics JSONL file, skipping a torn last line."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_loss_curve(metrics_path: str, out_png: str, title: str = "") -> str | None:
    """Train (and validation) loss against step, as a PNG. Returns the path or None."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and isinstance(r.get("val_loss"), float)]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class ProgressBar:
    """A one-line progress bar: step, bar, loss, tokens/s and ETA.

    On a terminal it redraws in place; elsewhere (CI, log files) it prints a line at
    most every ``min_interval`` seconds so logs stay readable.
    """

    def __init__(
        self,
        total_steps: int,
        budget_seconds: float = 0.0,
        stream: TextIO | None = None,
        width: int = 24,
        min_interval: float = 5.0,
    ):
        self.total = max(int(total_steps), 1)
        self.budget = float(budget_seconds or 0.0)
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = 0.1 if self.tty else min_interval
        self._last = 0.0

    def update(
        self,
        step: int,
        loss: float,
        tokens_per_sec: float,
        elapsed: float,
        start_step: int = 0,
        extra: str = "",
        force: bool = False,
    ) -> None:
        now = time.time()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        done = step - start_step
        frac_steps = step / self.total
        eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
        if self.budget > 0:
            eta = min(eta, max(self.budget - elapsed, 0.0)) if math.isfinite(eta) else self.budget - elapsed
            frac_steps = max(frac_steps, min(elapsed / self.budget, 1.0))
        filled = int(self.width * min(frac_steps, 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {format_rate(tokens_per_sec)} tok/s"
            f" | elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}"
        )
        if extra:
            line += f" | {extra}"
        if self.tty:
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
