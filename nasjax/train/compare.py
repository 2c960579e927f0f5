"""``nasjax finetune`` with baselines: the fine-tuned model next to the ones it should beat.

    nasjax finetune --config=configs/train/finetune.py:tiny --workdir=runs/ft \\
        --config.init_from=runs/ad/student --config.data.path=X.jsonl \\
        --config.compare_with=teacher,scratch

The main run trains in ``WORKDIR`` as usual. Each baseline of ``compare_with`` is then
fine-tuned with exactly the same config (data, split, seed, steps, learning rate) in
``WORKDIR/compare/<name>``, so every run resumes on its own, and the table is written
to ``WORKDIR/comparison.csv`` and ``comparison.json``:

* ``teacher``: the teacher of a ``distil-search`` student (``init_from/student.json``
  names it); an error for any other ``init_from``.
* ``scratch``: ``init_from``'s architecture and tokenizer with random weights (the
  same-size student trained from scratch of the AutoDistil paper's tables).
* ``NAME=WORKDIR``: any training workdir, e.g. a hand-designed small BERT.
"""

from __future__ import annotations

import copy
import csv
import json
import os

from nasjax.measure.flops import flops_per_token
from nasjax.measure.params import count_params
from nasjax.spec import load_spec
from nasjax.train.run import RunError, train

__all__ = ["finetune", "baselines", "STUDENT_FILE"]

STUDENT_FILE = "student.json"  # written by distil-search next to the extracted student
FIELDS = ("model", "init", "params", "flops_per_seq", "val_accuracy", "val_loss", "step", "status", "workdir")


def baselines(cfg) -> list[tuple[str, object]]:
    """(name, config) of every ``compare_with`` entry, validated before any training."""
    out, seen = [], set()
    for entry in [e.strip() for e in str(cfg.get("compare_with", "")).split(",") if e.strip()]:
        sub = copy.deepcopy(cfg)
        sub.compare_with = ""
        sub.init_weights = True
        if entry == "teacher":
            name, sub.init_from = "teacher", _teacher_of(cfg.init_from)
        elif entry == "scratch":
            if not cfg.init_from:
                raise RunError("compare_with=scratch needs init_from (whose architecture to train from scratch)")
            name, sub.init_from, sub.init_weights = "scratch", cfg.init_from, False
        elif "=" in entry:
            name, path = (x.strip() for x in entry.split("=", 1))
            if not name or not path:
                raise RunError(f"compare_with entry {entry!r}: expected NAME=WORKDIR")
            if not os.path.isdir(os.path.join(os.path.expanduser(path), "checkpoints")):
                raise RunError(f"compare_with {name}={path}: not a training workdir (no checkpoints/ folder)")
            sub.init_from = os.path.abspath(os.path.expanduser(path))
        else:
            raise RunError(f"compare_with entry {entry!r}: use teacher, scratch or NAME=WORKDIR")
        if not name.replace("_", "").replace("-", "").isalnum() or name == "main":
            raise RunError(f"compare_with name {name!r}: letters, digits, - and _ only, and not 'main'")
        if name in seen:
            raise RunError(f"compare_with names {name!r} twice")
        seen.add(name)
        out.append((name, sub))
    return out


def _teacher_of(init_from: str) -> str:
    path = os.path.join(os.path.expanduser(init_from or ""), STUDENT_FILE)
    if not init_from or not os.path.exists(path):
        raise RunError(
            f"compare_with=teacher needs init_from to be a distil-search student (no {path}); "
            "name the teacher explicitly with compare_with=teacher=WORKDIR"
        )
    with open(path) as f:
        teacher = json.load(f).get("teacher", "")
    if not os.path.isdir(os.path.join(teacher, "checkpoints")):
        raise RunError(f"{path} names the teacher {teacher!r}, which is not a training workdir any more")
    return teacher


def _row(name: str, cfg, workdir: str, result) -> dict:
    spec = load_spec(os.path.join(workdir, "spec.json"))
    n = int(cfg.data.seq_len)
    if name == "main":
        init = cfg.init_from or "random"
    else:
        init = ("random weights, architecture of " if not cfg.init_weights else "") + cfg.init_from
    return {
        "model": name,
        "init": init,
        "params": int(count_params(spec)["total"]),
        "flops_per_seq": int(flops_per_token(spec, n) * n),
        "val_accuracy": result.val.get("val_accuracy", float("nan")),
        "val_loss": result.val.get("val_loss", float("nan")),
        "step": result.step,
        "status": result.status,
        "workdir": workdir,
    }


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'params':>12} {'FLOPs/seq':>12} {'accuracy':>9} {'val loss':>9}  status"]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['params']:>12,} {r['flops_per_seq']:>12.4g} {r['val_accuracy']:>9.4f} "
            f"{r['val_loss']:>9.4f}  {r['status']}"
        )
    return "\n".join(lines)


def finetune(cfg, workdir: str, log=print, progress: bool = True):
    """Fine-tunes ``cfg`` in ``workdir``, then each baseline; returns the main run's result."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    others = baselines(cfg)  # a bad entry fails before anything trains
    result = train(cfg, workdir, log=log, progress=progress)
    if not others or result.status in ("interrupted", "diverged"):
        return result
    rows = [_row("main", cfg, workdir, result)]
    for name, sub in others:
        log(f"baseline {name}: fine-tuning {sub.init_from} with the same settings")
        folder = os.path.join(workdir, "compare", name)
        r = train(sub, folder, log=log, progress=progress)
        rows.append(_row(name, sub, folder, r))
        if r.status == "interrupted":
            log("interrupted; the same command resumes the baselines")
            return r
    with open(os.path.join(workdir, "comparison.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=2, default=float)
    log(format_table(rows))
    log(f"wrote {os.path.join(workdir, 'comparison.csv')}")
    return result
