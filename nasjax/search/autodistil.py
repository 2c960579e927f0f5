"""``nasjax distil`` and ``nasjax distil-search``: AutoDistil end to end (methods.md §4).

    nasjax train   --config=configs/train/mlm.py:tiny --workdir=runs/teacher
    nasjax distil  --config=configs/search/autodistil.py:tiny --workdir=runs/ad --config.teacher=runs/teacher
    nasjax distil-search --config=configs/search/autodistil.py:tiny --workdir=runs/ad
    nasjax finetune --config=configs/train/finetune.py:tiny --workdir=runs/ft \\
        --config.data.path=X.jsonl --config.init_from=runs/ad/student

``distil`` trains one SuperLM per sub-space (``distil.subspaces``, the paper's K=3 grids
scaled to the teacher; ``distil.merge=true`` trains one SuperLM over their union, the
K=1 comparison) task-agnostically on the MLM corpus (labels unused) with
:class:`~nasjax.search.superlm.SuperLMTrainer`. Workdir layout::

    WORKDIR/superlm_<name>/state.msgpack (+ .json: step, data position)   resumable
    WORKDIR/superlm_<name>/metrics.jsonl                                  loss per log step
    WORKDIR/distil.json                                                   teacher, sub-spaces, config

``distil-search`` ranks every subnet of the trained SuperLMs that fits the budget
(``distil.budget_kind``: ``paper_flops`` / ``paper_params`` (the released formulas),
``flops`` (analytic count of the built model, forward per sequence), ``xla_flops``
(XLA's cost analysis of the lowered forward of one sequence; computed only when it is
the budget) or ``params`` (exact count); ``distil.budget``; 0 = no budget) by held-out relation-distillation loss
on ``distil.val_batches`` validation batches with its inherited weights (or, with
``distil.rank_by=proxy_finetune``, by validation accuracy after fine-tuning the
inherited student for ``distil.proxy_steps`` on ``distil.proxy_task``: the released
code's task-proxy search), writes
``candidates.csv`` and ``candidates.png``, and extracts the best into
``WORKDIR/student`` (a training workdir: spec, tokenizer, step-0 checkpoint) that
``nasjax finetune/eval/train`` load without the SuperLM.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import jax
import ml_collections

from nasjax.genome.autodistil import Subspace, paper_flops, paper_params, scaled_subspaces, subnet_spec
from nasjax.measure.flops import flops_per_token, xla_flops
from nasjax.measure.params import count_params
from nasjax.search.superlm import SuperLMTrainer
from nasjax.spec import ModelSpec, SpecError
from nasjax.train.run import RunError, StopFlag, load_run, make_mesh, setup_compile_cache

__all__ = ["run_distil", "run_distil_search", "DistilError", "BUDGET_KINDS"]

BUDGET_KINDS = ("paper_flops", "paper_params", "flops", "params", "xla_flops")
RANK_BY = ("kd_loss", "proxy_finetune")


class DistilError(RuntimeError):
    """A distillation run cannot start (clear message; nothing computed is touched)."""


def _teacher(cfg, log):
    if not cfg.teacher:
        raise DistilError("nasjax distil needs --config.teacher=WORKDIR (a trained encoder, e.g. from nasjax train)")
    try:
        spec, tcfg, tokenizer, _, state, step = load_run(cfg.teacher)
    except RunError as e:
        raise DistilError(f"cannot load the teacher: {e}") from None
    if spec.kind != "encoder":
        raise DistilError(f"the teacher in {cfg.teacher} is a {spec.kind}; AutoDistil distils encoders")
    log(f"teacher {cfg.teacher} (step {step}): {spec.n_layers} layers x d_model {spec.d_model}")
    return spec, tcfg, tokenizer, jax.device_get(state.params), step


def _subspaces(cfg, teacher: ModelSpec) -> list[tuple[Subspace, list]]:
    """(sub-space, its subnets) per SuperLM; ``distil.merge`` gives one over the union."""
    names = [n.strip() for n in str(cfg.distil.subspaces).split(",") if n.strip()]
    try:
        spaces = list(scaled_subspaces(teacher, names))
    except SpecError as e:
        raise DistilError(f"distil.subspaces: {e}") from None
    if not cfg.distil.merge:
        return [(sp, sp.subnets()) for sp in spaces]
    subnets = sorted({s for sp in spaces for s in sp.subnets()})
    values = lambda f: tuple(sorted({getattr(s, f) for s in subnets}))  # noqa: E731
    merged = Subspace("merged", values("layers"), values("hidden"), values("heads"), values("mlp_ratio"))
    return [(merged, subnets)]


def _data(cfg, tokenizer, teacher: ModelSpec, log):
    from nasjax.search.run import build_text_data

    if cfg.data.seq_len > teacher.max_len:
        raise DistilError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's max_len {teacher.max_len}")
    return build_text_data(cfg, tokenizer, "mlm", log)


def _trainer(cfg, teacher_spec, teacher_params, subnets) -> SuperLMTrainer:
    d = cfg.distil
    return SuperLMTrainer(
        teacher_spec,
        teacher_params,
        subnets,
        lr=float(cfg.train.learning_rate),
        weight_decay=float(cfg.train.weight_decay),
        steps=int(cfg.train.steps),
        warmup=int(cfg.train.warmup_steps),
        sandwich_size=int(d.sandwich_size),
        relation_heads=int(d.relation_heads),
        kd_kind=str(d.kd_kind),
        seed=int(cfg.seed),
    )


def run_distil(cfg: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
    """Trains (or resumes) every SuperLM of the config; returns {name: final step}."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    setup_compile_cache(cfg)
    teacher_spec, _, tokenizer, teacher_params, _ = _teacher(cfg, log)
    spaces = _subspaces(cfg, teacher_spec)
    data = _data(cfg, tokenizer, teacher_spec, log)
    info = {
        "teacher": os.path.abspath(cfg.teacher),
        "subspaces": [dict(dataclasses.asdict(sp), n_subnets=len(subs)) for sp, subs in spaces],
        "config": json.loads(cfg.to_json()),
    }
    with open(os.path.join(workdir, "distil.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer.to_config(embed=True), f)
    done = {}
    total = int(cfg.train.steps)
    with StopFlag() as stop:
        for space, subnets in spaces:
            trainer = _trainer(cfg, teacher_spec, teacher_params, subnets)
            folder = os.path.join(workdir, f"superlm_{space.name}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "state.msgpack")
            if os.path.exists(path):
                try:
                    state = trainer.restore(path)
                except ValueError as e:
                    raise DistilError(f"{e}; move it away to start this SuperLM again") from None
                log(f"SuperLM {space.name}: resuming at step {state.step}")
            else:
                state = trainer.init()
            iterator = data.train_iterator()
            if state.data_state is not None:
                iterator.set_state(state.data_state)
            log(f"SuperLM {space.name}: {len(subnets)} subnets, {total} steps, sandwich {cfg.distil.sandwich_size}")
            t0 = time.perf_counter()
            with open(os.path.join(folder, "metrics.jsonl"), "a") as metrics:
                while state.step < total and not stop.stop:
                    out = trainer.step(state, next(iterator))
                    if state.step % int(cfg.distil.log_every) == 0 or state.step == total:
                        metrics.write(json.dumps({"step": state.step, **out}) + "\n")
                        metrics.flush()
                        log(
                            f"  {space.name} step {state.step}/{total}: KD {out['loss']:.4f} (largest "
                            f"{out['loss_largest']:.4f}, smallest {out['loss_smallest']:.4f}) | "
                            f"{trainer.compiled_subnets} subnet programs, compile {trainer.compile_seconds:.0f}s | "
                            f"{time.perf_counter() - t0:.0f}s"
                        )
                    if state.step % int(cfg.distil.checkpoint_every) == 0 or state.step == total or stop.stop:
                        state.data_state = iterator.get_state()
                        trainer.save(state, path)
            state.data_state = iterator.get_state()
            trainer.save(state, path)
            done[space.name] = state.step
            if stop.stop:
                log(f"interrupted; the same command resumes from {folder}")
                break
    return done


def run_distil_search(cfg: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
    """Ranks the budget-feasible subnets of the trained SuperLMs and extracts the best."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    d = cfg.distil
    if d.budget_kind not in BUDGET_KINDS:
        raise DistilError(f"distil.budget_kind must be one of {', '.join(BUDGET_KINDS)}, got {d.budget_kind!r}")
    setup_compile_cache(cfg)
    teacher_spec, tcfg, tokenizer, teacher_params, _ = _teacher(cfg, log)
    data = _data(cfg, tokenizer, teacher_spec, log)
    val = list(data.val_batches(int(d.val_batches) or None))
    held_out = None  # (batch, teacher Q/K/V): the teacher runs once per batch, not once per subnet
    n = int(cfg.data.seq_len)
    if d.rank_by not in RANK_BY:
        raise DistilError(f"distil.rank_by must be one of {', '.join(RANK_BY)}, got {d.rank_by!r}")
    proxy = _proxy(cfg, tokenizer, tcfg, log) if d.rank_by == "proxy_finetune" else None
    rows = []
    best = None
    for space, subnets in _subspaces(cfg, teacher_spec):
        path = os.path.join(workdir, f"superlm_{space.name}", "state.msgpack")
        if not os.path.exists(path):
            raise DistilError(f"{path} is missing: run nasjax distil with this config first")
        trainer = _trainer(cfg, teacher_spec, teacher_params, subnets)
        try:
            state = trainer.restore(path)
        except ValueError as e:
            raise DistilError(str(e)) from None
        if held_out is None:
            held_out = trainer.with_teacher(val)
        for s in subnets:
            spec = subnet_spec(teacher_spec, s)
            counts = {
                "paper_params": paper_params(s),
                "paper_flops": paper_flops(s, n),
                "params": int(count_params(spec)["total"]),
                "flops": int(flops_per_token(spec, n) * n),
            }
            if d.budget_kind == "xla_flops":
                counts["xla_flops"] = int(xla_flops(spec, 1, n))
            feasible = not d.budget or counts[d.budget_kind] <= float(d.budget)
            row = {"superlm": space.name, "subnet": s.name, **s.to_dict(), **counts, "feasible": feasible}
            if feasible:
                row["kd_loss"] = trainer.held_out_loss(state.params, s, held_out)
                if proxy is not None:
                    row["proxy_accuracy"] = proxy(*trainer.extract(state.params, s))
                row["score"] = -row["proxy_accuracy"] if proxy is not None else row["kd_loss"]
                if best is None or row["score"] < best[0]["score"]:
                    best = (row, trainer, state, s)
            rows.append(row)
            log(f"  {space.name} {s.name}: {counts[d.budget_kind]:.4g} {d.budget_kind}, KD {row.get('kd_loss', '-')}")
    csv_path = os.path.join(workdir, "candidates.csv")
    fields = ["superlm", "subnet", "layers", "hidden", "heads", "mlp_ratio", *BUDGET_KINDS, "feasible", "kd_loss"]
    fields += ["proxy_accuracy"] if proxy is not None else []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    files = [csv_path]
    plot = _plot(rows, str(d.budget_kind), float(d.budget), best[0] if best else None, workdir)
    if plot:
        files.append(plot)
    if best is None:
        raise DistilError(f"no subnet fits distil.budget={d.budget:g} {d.budget_kind}; see {csv_path}")
    row, trainer, state, subnet = best
    student_dir = os.path.join(workdir, "student")
    _write_student(trainer, state, subnet, tcfg, tokenizer, student_dir)
    from nasjax.train.compare import STUDENT_FILE

    with open(os.path.join(student_dir, STUDENT_FILE), "w") as f:  # lets finetune compare_with=teacher find it
        json.dump({"teacher": os.path.abspath(cfg.teacher), "superlm_workdir": workdir, **row}, f, indent=2)
    files.append(student_dir)
    score = f"proxy accuracy {row['proxy_accuracy']:.4f}" if proxy is not None else f"KD {row['kd_loss']:.4f}"
    log(f"best under the budget: {row['subnet']} from SuperLM {row['superlm']} ({score})")
    log(f"student (spec + step-0 checkpoint): {student_dir}")
    return {"best": row, "files": files, "rows": rows}


def _proxy(cfg, tokenizer, tcfg, log):
    """``(spec, params) -> validation accuracy`` after a short fine-tune on ``distil.proxy_task``."""
    import copy

    from nasjax.data.classification import load_task_list
    from nasjax.search.evaluate import CandidateFailed, finetune_tasks

    d = cfg.distil
    if not d.proxy_task:
        raise DistilError("distil.rank_by=proxy_finetune needs distil.proxy_task (a labelled JSONL file or glue/NAME)")
    tasks = load_task_list(
        str(d.proxy_task),
        tokenizer,
        seq_len=int(d.proxy_seq_len),
        batch_size=int(d.proxy_batch_size),
        seed=int(cfg.seed),
        cache_dir=cfg.data.cache_dir or None,
        what="distil.proxy_task",
        log=log,
    )
    train_cfg = copy.deepcopy(cfg.train)
    train_cfg.steps, train_cfg.learning_rate = int(d.proxy_steps), float(d.proxy_lr)
    train_cfg.batch_size, train_cfg.warmup_steps = int(d.proxy_batch_size), max(int(d.proxy_steps) // 10, 1)
    mesh, rules = make_mesh(cfg)

    def score(spec, params) -> float:
        try:
            out = finetune_tasks(
                spec, params, tasks, train_cfg, mesh, rules, seed=int(cfg.seed), seq_len=int(d.proxy_seq_len)
            )
        except CandidateFailed as e:
            log(f"    proxy fine-tune failed ({e}); scored 0")
            return 0.0
        return sum(out["accuracy"].values()) / len(out["accuracy"])

    return score


def _write_student(trainer: SuperLMTrainer, state, subnet, tcfg, tokenizer, folder: str) -> None:
    """A training workdir at step 0 holding the extracted student (spec, tokenizer, weights)."""
    from nasjax.checkpointing import Checkpointer
    from nasjax.spec import save_spec
    from nasjax.train.loop import Trainer

    spec, params = trainer.extract(state.params, subnet)
    os.makedirs(folder, exist_ok=True)
    cfg = ml_collections.ConfigDict(tcfg.to_dict())
    mesh, rules = make_mesh(cfg)
    t = Trainer(spec, cfg.train, mesh, rules, cfg.seed, cfg.data.seq_len, dtype=cfg.model.dtype)
    st, copied = t.with_params(t.init_state(), params)
    expected = len(jax.tree.leaves(params))
    if copied != expected:
        raise DistilError(f"extraction copied {copied} of {expected} parameter arrays into the student")
    with Checkpointer(os.path.join(folder, "checkpoints"), async_save=False) as ck:
        ck.save(
            0,
            st,
            force=True,
            spec=spec.to_dict(),
            config=json.loads(cfg.to_json()),
            tokenizer=tokenizer.to_config(embed=True),
            run={"train_seconds": 0.0},
        )
    save_spec(spec, os.path.join(folder, "spec.json"))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer.to_config(embed=True), f)


def _plot(rows, kind: str, budget: float, best, workdir: str) -> str | None:
    scored = [r for r in rows if "kd_loss" in r]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name in sorted({r["superlm"] for r in scored}):
        pts = [(r[kind], r["kd_loss"]) for r in scored if r["superlm"] == name]
        ax.plot(*zip(*pts), ".", alpha=0.7, label=f"SuperLM {name}")
    if best is not None:
        ax.plot([best[kind]], [best["kd_loss"]], "*", ms=14, color="red", label=f"picked {best['subnet']}")
    if budget and budget < float("inf"):
        ax.axvline(budget, color="gray", ls="--", lw=1, label="budget")
    ax.set_xlabel(kind)
    ax.set_ylabel("held-out relation KD loss (inherited weights)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, "candidates.png")
    fig.savefig(path)
    plt.close(fig)
    return path
