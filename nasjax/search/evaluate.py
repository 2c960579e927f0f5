"""Evaluating one candidate: cheap checks, then training to a budget with halving hurdles.

Stages, each of which can fail the candidate with a recorded reason (never an
exception out of the search):

``decode``   the genome does not decode to a valid model spec
``params``   parameter count (``jax.eval_shape``, nothing allocated) above ``search.max_params``
``probe``    at a fixed init on a fixed probe batch: non-finite outputs, or a causal leak
             (:mod:`nasjax.measure.probe`); the probe also yields the functional-
             equivalence hash the controller uses to skip duplicates
``memory``   the compiled train step needs more than ``search.max_memory_bytes`` per device
             (XLA memory analysis, before any step runs; with ``search.probe=steps`` a
             lower bound from the forward pieces is checked already before the probe
             runs them, so a candidate far above the bound never allocates its activations)
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

import collections
import dataclasses
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from nasjax import compile_meter
from nasjax import sharding as shd
from nasjax.hostmem import release_free_memory
from nasjax.layers.init import clear_draw_programs
from nasjax.measure.params import count_params
from nasjax.measure.probe import (
    LEAK_TOLERANCE,
    future_changed,
    logits_finite,
    probe_from_forward,
    probe_model,
    step_probe_batch,
)
from nasjax.search.evolution import hurdle_budgets, hurdle_steps
from nasjax.spec import ModelSpec
from nasjax.train import segmented
from nasjax.train.loop import Hooks, Trainer, abstract_batch

__all__ = ["CandidateFailed", "CheckResult", "TrainOutcome", "Interrupted", "TrainingEvaluator"]

# the reason a candidate whose logits on the probe batch are not all finite fails with
NON_FINITE = "non-finite outputs at initialisation on the probe batch"


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


def check_param_bound(spec: ModelSpec, cfg) -> int:
    """The parameter count (eval_shape, nothing compiled), checked against ``search.max_params``;
    raises :class:`CandidateFailed` at stage ``decode`` or ``params``."""
    s = cfg.search
    try:
        params = int(count_params(spec)["total"])
    except Exception as e:  # shape errors of a malformed genome surface when tracing
        raise CandidateFailed("decode", f"the model does not trace: {_short(e)}") from None
    if s.max_params and params > s.max_params:
        raise CandidateFailed("params", f"{params:,} parameters > search.max_params={int(s.max_params):,}")
    return params


PROBES = ("auto", "steps", "model")


def probe_on_steps(cfg) -> bool:
    """Reads ``search.probe`` (auto | steps | model); raises ValueError naming it otherwise.

    ``steps``: a candidate's probe runs on the forward programs of its own train step
    (``train.segmented``, :meth:`nasjax.train.segmented.SegmentedSteps.probe_forward`):
    two forwards on a fixed batch of the training layout (:meth:`_check_on_steps`). Its
    checks then compile nothing that training does not compile anyway, where the op-by-op
    probe compiled ~7 per-op programs per new candidate (~0.25 s on this CPU, a quarter of
    a tiny search's compiling: docs/benchmarks.md). The verdicts are those of the model
    probe; the equivalence hashes come from another batch, so the two kinds never match
    each other.
    ``auto``: steps with ``train.segmented`` in a one-process search, else model.
    """
    text = str(cfg.search.get("probe", "auto")).strip().lower()
    if text not in PROBES:
        raise ValueError(f"search.probe must be auto, steps or model, got {cfg.search.get('probe')!r}")
    segmented_on = bool(cfg.train.get("segmented", False))
    if text == "steps":
        if not segmented_on:
            raise ValueError("search.probe=steps runs the segmented train step: set train.segmented=true")
        if jax.process_count() > 1:
            raise ValueError("search.probe=steps runs in one-process searches only; use search.probe=model")
        return True
    return text == "auto" and segmented_on and jax.process_count() == 1


def check_params_and_probe(
    spec: ModelSpec, cfg, seq_len: int, before_probe: Callable[[], None] | None = None, op_by_op: bool = False
):
    """``search.max_params`` (from eval_shape) and the finiteness probe at a fixed init.

    ``before_probe`` is called once the parameter bound has passed (compile-ahead).
    ``op_by_op``: run the probe (and the init it leaves for the trainer) op by op
    (:func:`op_by_op_enabled`).

    Returns:
      (parameter count, :class:`~nasjax.measure.probe.ProbeResult`); raises
      :class:`CandidateFailed` at stage ``decode``, ``params`` or ``probe``.
    """
    s = cfg.search
    params = check_param_bound(spec, cfg)
    if before_probe is not None:
        before_probe()
    try:
        probe = probe_model(
            spec, seq_len, batch=int(s.probe_batch), seed=int(cfg.seed), remember=True, op_by_op=op_by_op
        )
    except Exception as e:
        raise CandidateFailed("probe", f"the probe failed: {_short(e)}") from None
    if not probe.finite:
        raise CandidateFailed("probe", NON_FINITE)
    return params, probe


# search.compile_ahead=auto turns compile-ahead on from this many usable CPU cores. XLA:CPU
# already spreads one compile's kernel code generation over ~1.6 cores, so on 2 cores the
# overlap with the probe bought nothing: 668 vs 647 candidates/hour inline, 708 vs 743 with
# engine=threads (benchmarks/primer_throughput.py, docs/benchmarks.md). The threshold is a
# choice: hosts with spare cores (GPU and TPU VMs) can overlap; this CPU cannot.
COMPILE_AHEAD_MIN_CORES = 4


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compile_ahead_enabled(value) -> bool:
    """Reads ``search.compile_ahead`` (auto | true | false); raises ValueError naming it otherwise.

    ``auto``: on with at least :data:`COMPILE_AHEAD_MIN_CORES` usable CPU cores. Never on in a
    multi-process search, whose processes compile each program in step with each other.
    """
    text = str(value).strip().lower()
    if text == "auto":
        on = _usable_cores() >= COMPILE_AHEAD_MIN_CORES
    elif text in ("true", "on", "1", "yes"):
        on = True
    elif text in ("false", "off", "0", "no"):
        on = False
    else:
        raise ValueError(f"search.compile_ahead must be auto, true or false, got {value!r}")
    return on and jax.process_count() == 1


def op_by_op_enabled(search_cfg) -> bool:
    """Reads ``search.op_by_op`` (auto | true | false); raises ValueError naming it otherwise.

    On: a candidate's one-off programs (parameter init, probe, optimizer-state init) run
    op by op. Every jax op then runs as a small program that jax compiles once per (op,
    shapes) and keeps for the process, and candidates share nearly all of them, so no
    program is compiled per candidate for these steps. On this 2-core CPU the probe with
    its init fell from ~1.5 s to ~0.7 s per tiny candidate after a one-time ~8 s warm-up
    (docs/benchmarks.md). Off: each is one program compiled for the candidate without
    backend optimisation.

    ``auto``: on unless ``search.clear_caches`` is on. Clearing drops the per-op programs
    too, and compiling them all again cost ~9.5 s per candidate, against ~1.9 s for the
    compiled path. (A choice for CPU hosts; on accelerators op-by-op dispatch is cheap
    too, and the warm-up is paid once per process.)
    """
    text = str(search_cfg.get("op_by_op", "auto")).strip().lower()
    if text == "auto":
        return not bool(search_cfg.get("clear_caches", False))
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise ValueError(f"search.op_by_op must be auto, true or false, got {search_cfg.get('op_by_op')!r}")


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
        # Compile-ahead (search.compile_ahead): a candidate's train and eval steps compile on
        # a background thread while its probe runs; train() takes the compiled Trainer.
        self.compile_ahead = compile_ahead_enabled(s.get("compile_ahead", "auto"))
        self.op_by_op = op_by_op_enabled(s)  # one-off inits and the probe run op by op
        self._ahead: collections.OrderedDict[ModelSpec, Future] = collections.OrderedDict()
        self._ahead_lock = threading.Lock()
        self._ahead_pool: ThreadPoolExecutor | None = None
        # Candidates checked but not trained (probe failures, equivalent programs) leave
        # entries behind: keep the newest few (every in-flight candidate's, and one spare).
        self._ahead_keep = max(1, int(s.in_flight)) + 1
        self._layouts: tuple[dict, dict | None] | None = None
        self._trained = 0  # candidates trained by this evaluator (search.clear_caches_every)
        self._checked = 0  # candidates checked op by op (search.op_by_op_clear_every)
        # search.probe=steps: the probe builds the candidate's trainer and initial state;
        # train() takes them (the newest few, like compile-ahead's entries)
        self.probe_steps = probe_on_steps(cfg)
        self._probed: collections.OrderedDict[ModelSpec, tuple] = collections.OrderedDict()
        self._probe_batches: tuple[dict, dict] | None = None

    def budget_text(self) -> str:
        unit = "s" if self.by_time else " steps"
        return " / ".join(f"{b:.4g}{unit}" for b in self.budgets)

    def _count_for_clearing(self) -> bool:
        """Counts a trained candidate; True on every ``search.clear_caches_every``-th."""
        every = int(self.cfg.search.get("clear_caches_every", 1))  # >= 1: checked before a search starts
        with self._ahead_lock:
            self._trained += 1
            return self._trained % every == 0

    def _count_check_for_clearing(self) -> bool:
        """Counts a candidate checked op by op; True on every ``search.op_by_op_clear_every``-th.

        Per-op programs are kept for the process, and candidates keep bringing new (op,
        shapes) pairs: ~7 new programs of ~1.4 MiB each per tiny candidate at the default
        shapes (docs/benchmarks.md), so without a drop a 1,000-candidate search would grow by
        ~10 GiB. Dropping them costs a re-warm (the next candidates compile their ops again).
        """
        every = int(self.cfg.search.get("op_by_op_clear_every", 0))  # >= 0: checked before a search starts
        if not self.op_by_op or every <= 0:
            return False
        with self._ahead_lock:
            self._checked += 1
            return self._checked % every == 0

    # ------------------------------------------------------------------ compile-ahead
    def _batch_layouts(self) -> tuple[dict, dict | None]:
        """Abstract (train, eval) batches: the layout every candidate's steps compile for."""
        with self._val_lock:
            layouts = self._layouts
        if layouts is None:
            train = abstract_batch(shd.shard_batch(next(self.data.train_iterator()), self.mesh))
            val = [dict(b) for b in self._fixed_val()[:1]]
            for b in val:
                b.pop("num_bytes", None)
            layouts = (train, abstract_batch(shd.shard_batch(val[0], self.mesh)) if val else None)
            with self._val_lock:
                self._layouts = layouts
        return layouts

    def _new_trainer(self, spec: ModelSpec) -> Trainer:
        cfg = self.cfg
        return Trainer(
            spec,
            cfg.train,
            self.mesh,
            self.rules,
            cfg.seed,
            self.seq_len,
            dtype=cfg.model.dtype,
            op_by_op=self.op_by_op,
        )

    def _compiled_trainer(self, spec: ModelSpec) -> Trainer:
        t0 = compile_meter.thread_seconds()
        trainer = self._new_trainer(spec)
        trainer.precompile(*self._batch_layouts())
        # XLA's compile seconds on this (compile-ahead) thread: the train job adds them to its own
        trainer.ahead_xla_seconds = compile_meter.thread_seconds() - t0
        return trainer

    def start_compile(self, spec: ModelSpec) -> None:
        """Starts compiling ``spec``'s train and eval steps on a background thread (if enabled)."""
        if not self.compile_ahead:
            return
        with self._ahead_lock:
            if spec in self._ahead:
                return
            if self._ahead_pool is None:
                workers = max(1, int(self.cfg.search.in_flight))
                self._ahead_pool = ThreadPoolExecutor(workers, thread_name_prefix="nasjax-compile")
            self._ahead[spec] = self._ahead_pool.submit(self._compiled_trainer, spec)
            while len(self._ahead) > self._ahead_keep:  # a dropped future finishes and is freed
                self._ahead.popitem(last=False)[1].cancel()

    def _take_compiled(self, spec: ModelSpec) -> Future | None:
        with self._ahead_lock:
            return self._ahead.pop(spec, None)

    def close(self) -> None:
        """Stops compile-ahead work (queued compiles are cancelled; a running one finishes)."""
        with self._ahead_lock:
            pool, self._ahead_pool = self._ahead_pool, None
            self._ahead.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ checks
    def check(self, spec: ModelSpec) -> CheckResult:
        """Parameter bound and the probe; raises :class:`CandidateFailed`.

        With ``search.compile_ahead``, the train and eval steps start compiling once the
        parameter bound has passed, while the probe runs. With ``search.probe=steps`` the
        probe runs on the candidate's train-step pieces (:meth:`_check_on_steps`).
        """
        if self.probe_steps:
            return self._check_on_steps(spec)
        try:
            params, probe = check_params_and_probe(
                spec, self.cfg, self.seq_len, lambda: self.start_compile(spec), op_by_op=self.op_by_op
            )
        except CandidateFailed:
            self._take_compiled(spec)
            raise
        finally:
            if self._count_check_for_clearing():  # bound the per-op programs' memory
                jax.clear_caches()
                release_free_memory()
        if not probe.causal:
            self._take_compiled(spec)
            raise CandidateFailed(
                "probe",
                f"causal leak: outputs depend on later positions (relative derivative {probe.causal_leak:.3g} > "
                f"{LEAK_TOLERANCE:g})",
            )
        return CheckResult(params, probe.output_hash, probe.seconds, probe.output_hash_alt)

    def _step_probe_batches(self, vocab_size: int) -> tuple[dict, dict]:
        """The fixed probe batch, in the training batches' layout, and the same batch with
        each row's future changed (:func:`future_changed`); built once: a search's
        candidates share their vocabulary."""
        with self._val_lock:
            batches = self._probe_batches
        if batches is None:
            layout = self._batch_layouts()[0]
            size, length = layout["inputs"].shape
            seed = int(self.cfg.seed)
            batch = step_probe_batch(vocab_size, size, length, seed, layout["weights"].dtype)
            batches = (batch, future_changed(batch, vocab_size, seed))
            with self._val_lock:
                self._probe_batches = batches
        return batches

    def _check_on_steps(self, spec: ModelSpec) -> CheckResult:
        """The parameter bound, then the probe on the forward programs of the candidate's
        own train step.

        Only the forward programs compile here: two forwards, on the probe batch and on
        the same batch with every token after each row's probed position changed, give
        finiteness, causality (:func:`~nasjax.measure.probe.probe_from_forward`) and the
        FEC hashes. The trainer, its initial state (op by op, as for training) and its
        compiled forward programs are kept for :meth:`train`, which compiles the rest of
        the step (the program layers' backwards, loss head, norm, updates). A candidate
        that fails here, or that the search then finds functionally equivalent to an
        earlier one (28 and 45 of 200 candidates in two default searches), never compiles
        those. (Pairs, the embedding's and whole layers' with
        ``train.segmented_pieces=layer``, compile forward and backward together.)
        A compile error fails the candidate at stage ``compile``, as it would have in
        training.
        """
        params = check_param_bound(spec, self.cfg)
        t0 = time.perf_counter()
        try:
            try:
                trainer = self._new_trainer(spec)
                state = trainer.init_state()
            except Exception as e:  # shape errors of a malformed program surface when tracing
                raise CandidateFailed("probe", f"the probe failed: {_short(e)}") from None
            batch, changed_batch = self._step_probe_batches(spec.vocab_size)
            t_compile = time.perf_counter()
            try:
                trainer.compile(state, shd.shard_batch(batch, self.mesh), forward_only=True)
            except Exception as e:
                raise CandidateFailed("compile", _short(e)) from None
            t_compile = time.perf_counter() - t_compile
            self._check_memory(trainer)  # the forwards' lower bound: before they run
            try:
                first = trainer.probe_forward(state.params, batch)
                if not logits_finite(first):
                    raise CandidateFailed("probe", NON_FINITE)
                changed = trainer.probe_forward(state.params, changed_batch)
            except CandidateFailed:
                raise
            except Exception as e:
                raise CandidateFailed("probe", f"the probe failed: {_short(e)}") from None
        finally:
            if self._count_check_for_clearing():  # bound the per-op programs' memory (the init's)
                jax.clear_caches()
                release_free_memory()
        probe = probe_from_forward(first, changed, batch["weights"], seed=int(self.cfg.seed))
        if probe.causality_undecided:  # the changed batch's outputs are not finite: the forward-mode test decides
            try:
                model_probe = probe_model(
                    spec,
                    self.seq_len,
                    batch=int(self.cfg.search.probe_batch),
                    seed=int(self.cfg.seed),
                    op_by_op=self.op_by_op,
                )
            except Exception as e:
                raise CandidateFailed("probe", f"the probe failed: {_short(e)}") from None
            probe = dataclasses.replace(probe, causal_leak=model_probe.causal_leak)
        probe = dataclasses.replace(probe, seconds=time.perf_counter() - t0 - t_compile)  # compile: the trainer's
        if not probe.causal:
            raise CandidateFailed(
                "probe",
                f"causal leak: outputs depend on later positions (relative change {probe.causal_leak:.3g} > "
                f"{LEAK_TOLERANCE:g})",
            )
        with self._ahead_lock:
            self._probed[spec] = (trainer, state)
            while len(self._probed) > self._ahead_keep:
                self._probed.popitem(last=False)
        return CheckResult(params, probe.output_hash, probe.seconds, probe.output_hash_alt)

    def _check_memory(self, trainer: Trainer) -> int:
        """The train step's estimated peak bytes per device; raises :class:`CandidateFailed` at
        stage ``memory`` above ``search.max_memory_bytes``. After a forward-only compile the
        estimate is a lower bound (:meth:`Trainer.memory_bytes`), and the reason says so."""
        memory = trainer.memory_bytes()
        peak, bound = int(memory.get("peak", 0)), int(self.cfg.search.max_memory_bytes or 0)
        if bound and peak > bound:
            least = "" if memory.get("complete", True) else "at least "
            raise CandidateFailed(
                "memory", f"the train step needs {least}{peak / 2**20:.1f} MiB per device > search.max_memory_bytes"
            )
        return peak

    def _take_probed(self, spec: ModelSpec) -> tuple | None:
        with self._ahead_lock:
            return self._probed.pop(spec, None)

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

        costs: dict = {}
        try:
            out = self.train(
                spec, list(payload.get("thresholds", [])), on_hurdle=on_hurdle, should_stop=should_stop, costs=costs
            )
        except CandidateFailed as e:
            e.info["hurdles"] = hurdles  # observations made before the failure still count
            e.info.update(costs)
            raise
        return {
            **costs,
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
        costs: dict | None = None,
    ) -> TrainOutcome:
        """Trains ``spec`` band by band; raises :class:`CandidateFailed` or :class:`Interrupted`.

        ``costs``: a dict that receives ``compile_ahead_xla_seconds`` (what a compile-ahead
        thread compiled for this candidate), failure or not."""
        costs = {} if costs is None else costs
        cfg, s = self.cfg, self.cfg.search
        probed = self._take_probed(spec)  # search.probe=steps: trainer and state from the check
        ahead = self._take_compiled(spec) if probed is None else None
        try:
            init_seconds = 0.0
            if probed is not None:
                trainer, state = probed
            else:
                if ahead is not None:
                    trainer = ahead.result()  # a compile error surfaces here, as stage "compile"
                    costs["compile_ahead_xla_seconds"] = getattr(trainer, "ahead_xla_seconds", 0.0)
                else:
                    trainer = self._new_trainer(spec)
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
        memory = self._check_memory(trainer)
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
        if s.clear_caches and self._count_for_clearing():  # long searches: drop finished programs
            jax.clear_caches()
            segmented.clear_programs()
            clear_draw_programs()  # the init's compiled samplers (they outlive jax.clear_caches)
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


def _prepend(first, iterator):
    yield first
    yield from iterator
