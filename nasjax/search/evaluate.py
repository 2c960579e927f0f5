"""Evaluating one candidate: cheap checks, then training to a budget with halving hurdles.

Stages, each of which can fail the candidate with a recorded reason (never an
exception out of the search):

``decode``   the genome does not decode to a valid model spec
``params``   parameter count (``jax.eval_shape``, nothing allocated) above ``search.max_params``
``probe``    at a fixed init on a fixed probe batch: non-finite outputs, or a causal leak
             (:mod:`nasjax.measure.probe`); the probe also yields the functional-
             equivalence hash the controller uses to skip duplicates
``memory``   the compiled train step needs more than ``search.max_memory_bytes`` per device
             (XLA memory analysis, before any step runs)
``compile``  XLA could not compile the program
``train``    a NaN/Inf loss or gradient, or a non-finite validation loss

Training: the budget (``train.budget_seconds`` if positive, as in Primer, else
``train.steps``) is cut into ``search.hurdles + 1`` doubling bands
(:func:`~nasjax.search.evolution.hurdle_budgets`). After each band the validation loss
on ``search.val_batches`` fixed batches is the fitness so far; at hurdle j a candidate
whose fitness is above the threshold handed in by the controller stops there, with
that fitness. Every candidate sees the same data in the same order.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import traceback
from collections.abc import Callable

import jax

from nasjax import sharding as shd
from nasjax.measure.params import count_params
from nasjax.measure.probe import LEAK_TOLERANCE, probe_model
from nasjax.search.evolution import hurdle_budgets, hurdle_steps
from nasjax.spec import ModelSpec
from nasjax.train.loop import Hooks, Trainer

__all__ = ["CandidateFailed", "CheckResult", "TrainOutcome", "Interrupted", "TrainingEvaluator"]


class CandidateFailed(Exception):
    """A candidate is rejected at ``stage`` for ``reason`` (recorded, not fatal)."""

    def __init__(self, stage: str, reason: str, **info):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.info = stage, reason, info


class Interrupted(Exception):
    """The user asked the search to stop while a candidate trained (it is not recorded)."""


@dataclasses.dataclass
class CheckResult:
    params: int
    output_hash: str | None
    probe_seconds: float
    output_hash_alt: str | None = None


@dataclasses.dataclass
class TrainOutcome:
    fitness: float
    stopped_at_hurdle: int | None
    steps: int
    compile_seconds: float
    train_seconds: float
    memory_bytes: int
    hurdle_fitness: list[float]
    val: dict


def _short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_params_and_probe(spec: ModelSpec, cfg, seq_len: int):
    """``search.max_params`` (from eval_shape) and the finiteness probe at a fixed init.

    Returns:
      (parameter count, :class:`~nasjax.measure.probe.ProbeResult`); raises
      :class:`CandidateFailed` at stage ``decode``, ``params`` or ``probe``.
    """
    s = cfg.search
    try:
        params = int(count_params(spec)["total"])
    except Exception as e:  # shape errors of a malformed genome surface when tracing
        raise CandidateFailed("decode", f"the model does not trace: {_short(e)}") from None
    if s.max_params and params > s.max_params:
        raise CandidateFailed("params", f"{params:,} parameters > search.max_params={int(s.max_params):,}")
    try:
        probe = probe_model(spec, seq_len, batch=int(s.probe_batch), seed=int(cfg.seed), remember=True)
    except Exception as e:
        raise CandidateFailed("probe", f"the probe failed: {_short(e)}") from None
    if not probe.finite:
        raise CandidateFailed("probe", "non-finite outputs at initialisation on the probe batch")
    return params, probe


def fit_candidate(trainer: Trainer, state, iterator, steps: int, stage: str, mesh, should_stop=None):
    """Compiles and trains ``steps`` steps; compile errors, divergence and exceptions become
    :class:`CandidateFailed` (``compile`` or ``stage``), a stop request :class:`Interrupted`."""
    try:
        first = next(iterator)
        trainer.compile(state, shd.shard_batch(first, mesh))
    except Exception as e:
        raise CandidateFailed("compile", _short(e)) from None
    try:
        state, result = trainer.fit(
            state, _prepend(first, iterator), total_steps=steps, hooks=Hooks(should_stop=should_stop), log_every=10**9
        )
    except Exception as e:
        raise CandidateFailed(stage, _short(e)) from None
    if result.status == "interrupted":
        raise Interrupted()
    if result.status == "diverged":
        raise CandidateFailed(stage, f"diverged: {result.reason}")
    return state, result


def finetune_tasks(
    spec: ModelSpec,
    params,
    tasks,
    train_cfg,
    mesh,
    rules,
    *,
    seed: int,
    seq_len: int,
    dtype="float32",
    should_stop=None,
) -> dict:
    """Fine-tunes an encoder's ``params`` on each (name, ClassificationData) of ``tasks``.

    A classifier head (pooler + classifier) is added to ``spec``; tasks with the same
    number of classes share one compiled trainer. Returns ``{"accuracy": {name: acc},
    "compile_seconds", "train_seconds"}``; raises :class:`CandidateFailed` at stage
    ``finetune``.
    """
    accuracies, compile_s, train_s = {}, 0.0, 0.0
    trainers: dict[int, Trainer] = {}
    for name, data in tasks:
        trainer = trainers.get(data.n_classes)
        if trainer is None:
            cls_spec = spec.replace(head="cls", n_classes=data.n_classes, pooler=True)
            try:
                trainer = trainers[data.n_classes] = Trainer(cls_spec, train_cfg, mesh, rules, seed, seq_len, dtype)
            except Exception as e:
                raise CandidateFailed("compile", _short(e)) from None
        before = trainer.compile_seconds
        state, _ = trainer.with_params(trainer.init_state(), params)
        state, result = fit_candidate(
            trainer, state, data.train_iterator(), int(train_cfg.steps), "finetune", mesh, should_stop
        )
        val = trainer.evaluate(state.params, data.val_batches())
        acc = float(val.get("val_accuracy", math.nan))
        if not math.isfinite(acc):
            raise CandidateFailed("finetune", f"no validation accuracy on task {name}")
        accuracies[name] = acc
        compile_s += trainer.compile_seconds - before
        train_s += result.train_seconds
    return {"accuracy": accuracies, "compile_seconds": compile_s, "train_seconds": train_s}


class TrainingEvaluator:
    """Checks and trains candidates of one search (data, mesh and settings shared).

    Args:
      cfg: the search config (``train``, ``search``, ``seed``, ``model.dtype``).
      data: an :class:`~nasjax.data.pipeline.LMData` (fresh train iterator per candidate).
      mesh, rules: where candidates train.
      log: message sink.
    """

    def __init__(self, cfg, data, mesh, rules, log=print):
        self.cfg, self.data, self.mesh, self.rules, self.log = cfg, data, mesh, rules, log
        s, t = cfg.search, cfg.train
        self.seq_len = int(cfg.data.seq_len)
        self.n_hurdles = int(s.hurdles)
        self.by_time = float(t.budget_seconds) > 0
        if self.by_time:
            self.budgets = hurdle_budgets(float(t.budget_seconds), self.n_hurdles)
        else:
            self.budgets = [float(b) for b in hurdle_steps(int(t.steps), self.n_hurdles)]
        self.val_batches = int(s.val_batches) or None
        self._val_cache = None
        self._val_lock = threading.Lock()

    def budget_text(self) -> str:
        unit = "s" if self.by_time else " steps"
        return " / ".join(f"{b:.4g}{unit}" for b in self.budgets)

    # ------------------------------------------------------------------ checks
    def check(self, spec: ModelSpec) -> CheckResult:
        """Parameter bound and the probe; raises :class:`CandidateFailed`."""
        params, probe = check_params_and_probe(spec, self.cfg, self.seq_len)
        if not probe.causal:
            raise CandidateFailed(
                "probe",
                f"causal leak: outputs depend on later positions (relative gradient {probe.causal_leak:.3g} > "
                f"{LEAK_TOLERANCE:g})",
            )
        return CheckResult(params, probe.output_hash, probe.seconds, probe.output_hash_alt)

    # ------------------------------------------------------------------ engine jobs (plain dicts)
    def check_job(self, spec: ModelSpec) -> dict:
        c = self.check(spec)
        return {
            "params": c.params,
            "fec_hash": c.output_hash,
            "fec_hash_alt": c.output_hash_alt,
            "probe_seconds": c.probe_seconds,
        }

    def train_job(self, spec: ModelSpec, payload: dict, should_stop=None) -> dict:
        """:meth:`train` with ``payload["thresholds"]``; the hurdle observations come back in ``hurdles``."""
        hurdles: list[dict] = []

        def on_hurdle(hurdle, fitness, threshold, passed, step, train_seconds):
            hurdles.append(
                dict(
                    hurdle=hurdle,
                    fitness=fitness,
                    threshold=threshold,
                    passed=passed,
                    step=step,
                    train_seconds=train_seconds,
                )
            )

        try:
            out = self.train(spec, list(payload.get("thresholds", [])), on_hurdle=on_hurdle, should_stop=should_stop)
        except CandidateFailed as e:
            e.info["hurdles"] = hurdles  # observations made before the failure still count
            raise
        return {
            "fitness": out.fitness,
            "stopped_at_hurdle": out.stopped_at_hurdle,
            "hurdle_fitness": out.hurdle_fitness,
            "steps": out.steps,
            "compile_seconds": out.compile_seconds,
            "train_seconds": out.train_seconds,
            "memory_bytes": out.memory_bytes,
            "val_bpb": out.val.get("val_bpb"),
            "hurdles": hurdles,
        }

    # ------------------------------------------------------------------ training
    def _fixed_val(self):
        with self._val_lock:  # engine=threads: candidates train concurrently
            if self._val_cache is None:
                self._val_cache = list(self.data.val_batches(self.val_batches))
        return self._val_cache

    def train(
        self,
        spec: ModelSpec,
        thresholds: list[float | None],
        on_hurdle: Callable[..., None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainOutcome:
        """Trains ``spec`` band by band; raises :class:`CandidateFailed` or :class:`Interrupted`."""
        cfg, s = self.cfg, self.cfg.search
        try:
            trainer = Trainer(spec, cfg.train, self.mesh, self.rules, cfg.seed, self.seq_len, dtype=cfg.model.dtype)
            t_init = time.perf_counter()
            state = trainer.init_state()
            init_seconds = time.perf_counter() - t_init  # counted with compiling: per-candidate overhead
            iterator = self.data.train_iterator()
            first = next(iterator)
            trainer.compile(state, shd.shard_batch(first, self.mesh))
        except CandidateFailed:
            raise
        except Exception as e:
            raise CandidateFailed("compile", _short(e)) from None
        memory = trainer.memory_bytes().get("peak", 0)
        if s.max_memory_bytes and memory > s.max_memory_bytes:
            raise CandidateFailed(
                "memory", f"the train step needs {memory / 2**20:.1f} MiB per device > search.max_memory_bytes"
            )
        batches = _prepend(first, iterator)
        hooks = Hooks(should_stop=should_stop)
        fitness_at: list[float] = []
        train_seconds = 0.0
        val: dict = {}
        stopped = None
        result = None
        for band, budget in enumerate(self.budgets):
            if self.by_time:
                total_steps, budget_seconds = int(cfg.train.steps), budget
            else:
                total_steps, budget_seconds = int(budget), 0.0
            try:
                state, result = trainer.fit(
                    state,
                    batches,
                    total_steps=total_steps,
                    budget_seconds=budget_seconds,
                    train_seconds=train_seconds,
                    hooks=hooks,
                    log_every=10**9,
                )
            except Exception as e:
                raise CandidateFailed("train", _short(e), trace=traceback.format_exc(limit=3)) from None
            train_seconds = result.train_seconds
            if result.status == "interrupted":
                raise Interrupted()
            if result.status == "diverged":
                raise CandidateFailed("train", f"diverged: {result.reason}", steps=result.step)
            val = trainer.evaluate(state.params, self._fixed_val())
            fitness = float(val.get("val_loss", math.nan))
            if not math.isfinite(fitness):
                raise CandidateFailed("train", f"non-finite validation loss after step {result.step}")
            fitness_at.append(fitness)
            if band < self.n_hurdles:
                threshold = thresholds[band] if band < len(thresholds) else None
                passed = threshold is None or fitness <= threshold
                if on_hurdle:
                    on_hurdle(band, fitness, threshold, passed, result.step, train_seconds)
                if not passed:
                    stopped = band
                    break
        del state
        if s.clear_caches:  # long searches: drop compiled programs of finished candidates
            jax.clear_caches()
            release_free_memory()
        return TrainOutcome(
            fitness=fitness_at[-1],
            stopped_at_hurdle=stopped,
            steps=result.step if result else 0,
            compile_seconds=trainer.compile_seconds + init_seconds,
            train_seconds=train_seconds,
            memory_bytes=int(memory),
            hurdle_fitness=fitness_at,
            val=val,
        )


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Compiling leaves the heap fragmented: over a 120-candidate loop it kept resident
    memory ~250-280 MiB lower (``benchmarks/candidate_memory.py``, docs/benchmarks.md).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _prepend(first, iterator):
    yield first
    yield from iterator
