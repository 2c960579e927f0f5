"""The training loop: one ``Trainer`` per model spec, used by ``nasjax train`` and by searches.

A Trainer owns the built model, the optimizer, the mesh and the jitted (AOT compiled)
step functions. It never touches files: checkpoints, metrics and the progress bar
are passed in as hooks by the caller (``nasjax.train.run`` for the CLI, the search
evaluators for candidates), so the same code scores a Primer candidate under a
time budget and trains a final model for days.

Time accounting: compile time is measured apart (``lower().compile()``), and the
training budget counts only step time, as Primer's fixed-time fitness needs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nasjax import sharding as shd
from nasjax import xla_options
from nasjax.models import build
from nasjax.spec import ModelSpec
from nasjax.train import segmented
from nasjax.train.optim import make_optimizer
from nasjax.train.state import (
    TrainState,
    abstract_with_shardings,
    inherit_params,
    init_state,
    optimizer_init,
    params_replicated,
    state_shardings,
)
from nasjax.train.step import make_eval_step, make_train_step


class TrainConfigError(ValueError):
    """A training setting cannot work with this mesh or batch."""


@dataclasses.dataclass
class TrainResult:
    """What a training run (or a candidate's proxy training) produced.

    status: finished (all steps) | budget (time budget spent) | diverged (non-finite
    loss) | interrupted (Ctrl-C / SIGTERM / preemption; a checkpoint was written).
    """

    status: str
    step: int
    train_loss: float = float("nan")
    val: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Hooks:
    """Side effects the loop calls; all optional.

    on_log(step, metrics: dict) every ``log_every`` steps; on_step_end(step, state) after
    every step (checkpointing), or only after the steps where ``state_needed(step)`` is
    true when that is given; should_stop() polled each step (signals); on_eval(step,
    val: dict) after each evaluation.

    ``state_needed`` lets a hook that saves now and then (a checkpoint manager) say so
    before the state is handed over: with ``train.segmented_layout=flat`` the loop then
    converts the state to its shaped tree only at those steps, not after every step.
    """

    on_log: Callable[[int, dict], None] | None = None
    on_step_end: Callable[[int, TrainState], bool | None] | None = None
    state_needed: Callable[[int], bool] | None = None
    should_stop: Callable[[], bool] | None = None
    on_eval: Callable[[int, dict], None] | None = None


def abstract_batch(batch: dict) -> dict:
    """``jax.ShapeDtypeStruct`` s (shape, dtype and, for arrays, sharding) of a batch's arrays."""
    return {
        k: v
        if isinstance(v, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
        for k, v in batch.items()
    }


def objective_for(spec: ModelSpec) -> str:
    return {"lm": "lm", "mlm": "mlm", "cls": "cls"}[spec.head]


class Trainer:
    """Builds, shards, compiles and runs one model spec.

    Args:
      spec: the model spec.
      train_cfg: the ``train`` ConfigDict (optimizer, schedule, batch, budgets).
      mesh: device mesh; rules: logical axis rules.
      seed: init and dropout seed.
      seq_len: training sequence length (for shapes of the dummy init input).
      dtype: activation dtype name.
      op_by_op: run the one-off inits (parameters, optimizer state) op by op rather than
        as programs compiled for this model (``search.op_by_op``;
        :func:`nasjax.train.state.initial_params`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        train_cfg,
        mesh,
        rules,
        seed: int,
        seq_len: int,
        dtype: str = "float32",
        op_by_op: bool = False,
    ):
        self.spec = spec
        self.op_by_op = bool(op_by_op)
        self.cfg = train_cfg
        self.mesh = mesh
        self.rules = rules
        self.seed = int(seed)
        self.seq_len = int(seq_len)
        self.objective = objective_for(spec)
        dp = shd.data_parallel_size(mesh)
        accum = max(int(train_cfg.grad_accum_steps), 1)
        if train_cfg.batch_size % accum or (train_cfg.batch_size // accum) % dp:
            raise TrainConfigError(
                f"train.batch_size={train_cfg.batch_size} must split into grad_accum_steps={accum} micro-batches "
                f"that divide over the {dp} data-parallel devices of mesh {dict(mesh.shape)}"
            )
        self.accum_steps = accum
        self.model = build(spec, dtype=jnp.dtype(dtype))
        self.tx, self.schedule = make_optimizer(train_cfg)
        dropout = spec.dropout_rate > 0 or spec.attention_dropout_rate > 0
        self._train_step = make_train_step(
            self.model, self.tx, self.schedule, self.objective, self.seed, accum, dropout=dropout
        )
        self._eval_step = make_eval_step(self.model, self.objective)
        self.abstract_state, self.state_shardings = state_shardings(
            self.model, self.tx, self.seq_len, mesh, rules, spec=spec
        )
        if train_cfg.get("flat_optimizer", False) and not params_replicated(self.state_shardings.params):
            raise TrainConfigError(
                f"train.flat_optimizer=true keeps the optimizer state as one vector, so it needs replicated "
                f"parameters, but mesh {dict(mesh.shape)} shards them (FSDP / tensor axes); "
                f"set train.flat_optimizer=false"
            )
        self._segments = None
        try:
            segmented.check_pieces(train_cfg)
            segmented.check_update_chunk(train_cfg)
            segmented.check_layout(train_cfg)
            segmented.check_max_mb(train_cfg)
            xla_options.check(train_cfg, mesh.devices.flat[0].platform)  # before anything compiles
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        if train_cfg.get("segmented", False):
            problem = segmented.unsupported(spec, train_cfg, accum, params_replicated(self.state_shardings.params))
            if problem:
                raise TrainConfigError(
                    f"train.segmented=true cannot run {spec.name or 'this model'}: {problem}; set train.segmented=false"
                )
            self._segments = segmented.SegmentedSteps(
                spec,
                train_cfg,
                mesh,
                rules,
                self._context,
                jnp.dtype(dtype),
                self.state_shardings,
                abstract_state=self.restore_target(),
            )
        self._compiled_train = None
        self._compiled_eval = None
        self._batch_keys: tuple | None = None
        self.compile_seconds = 0.0
        self.train_seconds = 0.0  # training time of the current fit, restored part included

    # ------------------------------------------------------------------ state
    def init_state(self) -> TrainState:
        return init_state(
            self.model,
            self.tx,
            self.seed,
            self.seq_len,
            self.mesh,
            self.rules,
            shardings=self.state_shardings,
            cache_key=(self.spec, self.seed, self.seq_len, self.op_by_op),
            abstract_params=self.abstract_state.params,
            op_by_op=self.op_by_op,
        )

    def param_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    def restore_target(self) -> Any:
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def with_params(self, state: TrainState, params: Any) -> tuple[TrainState, int]:
        """Inherits matching leaves of ``params`` (by path and shape) into a fresh state.

        Returns:
          (state with a fresh optimizer state at step 0, number of leaves inherited).
        """
        merged, copied = inherit_params(jax.device_get(state.params), jax.device_get(params))
        params = jax.device_put(merged, self.state_shardings.params)
        op_by_op = self.op_by_op and jax.process_count() == 1 and params_replicated(self.state_shardings.params)
        opt = optimizer_init(self.tx, params, self.state_shardings.opt_state, op_by_op)  # runs once
        # The counter goes on the mesh like init_state's: the segmented step's norm piece
        # and the one-program step are compiled for a replicated (committed) step.
        step = jax.device_put(np.zeros((), np.int32), self.state_shardings.step)
        return TrainState(step=step, params=params, opt_state=opt), copied

    # ------------------------------------------------------------------ compile
    def _context(self):
        return _Ctx(self.mesh, self.rules)

    def compile(self, state: TrainState, batch: dict, forward_only: bool = False) -> float:
        """AOT-compiles the train step for this batch layout; returns seconds.

        ``state`` and ``batch`` may be concrete arrays or ``jax.ShapeDtypeStruct`` s (what
        :meth:`precompile` passes): only shapes, dtypes and shardings enter the program.
        ``forward_only`` (``train.segmented`` only): just the forward programs that
        :meth:`probe_forward` runs; a later call without it compiles the rest.
        """
        keys = tuple(sorted(batch))
        if self._compiled_train is not None and keys == self._batch_keys:
            return 0.0
        if forward_only:
            if self._segments is None:
                raise TrainConfigError("Trainer.compile(forward_only=True) needs train.segmented=true")
            dt = self._segments.compile(state, batch, forward_only=True)
            self.compile_seconds += dt
            return dt
        if self._segments is not None:  # train.segmented: pieces shared across models
            dt = self._segments.compile(state, batch)
            self._compiled_train, self._batch_keys = self._segments.step, keys
            self.compile_seconds += dt
            return dt
        batch_sh = {k: shd.batch_sharding(self.mesh, len(np.shape(v))) for k, v in batch.items()}
        t0 = time.perf_counter()
        with self._context():
            train = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, batch_sh),
                out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
                donate_argnums=(0,),
            )
            self._compiled_train = train.lower(state, batch).compile()
        dt = time.perf_counter() - t0
        self._batch_keys = keys
        self.compile_seconds += dt
        return dt

    def precompile(self, train_batch: dict, eval_batch: dict | None = None) -> float:
        """Compiles the train step (and the eval step) before any state exists; returns seconds.

        Args:
          train_batch, eval_batch: a sharded batch of each kind, as arrays or
            ``jax.ShapeDtypeStruct`` s (:func:`abstract_batch`); only the layout is used.

        The programs are the ones :meth:`step` and :meth:`evaluate` would compile on first
        use (same shapes, dtypes, shardings), so a search can compile a candidate while
        its probe runs (``search.compile_ahead``) without changing any result.
        """
        t0 = self.compile_seconds
        self.compile(self.restore_target(), abstract_batch(train_batch))
        if eval_batch is not None:
            self._eval_fn(abstract_batch(eval_batch))
        return self.compile_seconds - t0

    def probe(self, params, host_batch: dict) -> dict:
        """The pre-training checks on this model's own train-step pieces
        (``train.segmented``; :meth:`SegmentedSteps.probe`): compiles the train step for
        the batch's layout if needed, then runs one forward and backward without updating.
        """
        if self._segments is None:
            raise TrainConfigError("Trainer.probe runs the segmented train step; set train.segmented=true")
        batch = shd.shard_batch(host_batch, self.mesh)
        if self._compiled_train is None or tuple(sorted(batch)) != self._batch_keys:
            self.compile(self.restore_target(), abstract_batch(batch))
        return self._segments.probe(params, batch)

    def probe_forward(self, params, host_batch: dict) -> dict:
        """The search's probe (``train.segmented``; :meth:`SegmentedSteps.probe_forward`): the
        last position's logits, whether all logits are finite and the last layer's outputs,
        from the train step's forward programs alone (compiled here if needed, without the
        program layers' backwards and the updates).
        """
        if self._segments is None:
            raise TrainConfigError("Trainer.probe_forward runs the segmented train step; set train.segmented=true")
        batch = shd.shard_batch(host_batch, self.mesh)
        self.compile_seconds += self._segments.compile(self.restore_target(), abstract_batch(batch), forward_only=True)
        return self._segments.probe_forward(params, batch)

    def memory_bytes(self) -> dict:
        """XLA's memory analysis of the compiled train step (bytes per device), {} if unknown.

        ``peak`` = arguments + outputs + temporaries - donated aliases: what one device
        must hold while the step runs. With ``train.segmented``, an estimate from the
        pieces' analyses; after ``compile(forward_only=True)`` a lower bound of it, marked
        ``"complete": False``.
        """
        if self._segments is not None:
            return self._segments.memory_estimate()
        if self._compiled_train is None:
            return {}
        from nasjax.measure.hardware import compiled_memory_bytes

        return compiled_memory_bytes(self._compiled_train)

    def _eval_fn(self, batch: dict):
        if self._compiled_eval is None or self._compiled_eval[0] != tuple(sorted(batch)):
            if self._segments is not None:  # pieces per batch layout, found or compiled on first use

                def run(params, b):
                    self.compile_seconds += self._segments.compile_eval(lambda: self.restore_target().params, b)
                    return self._segments.evaluate(params, b)

                self.compile_seconds += self._segments.compile_eval(lambda: self.restore_target().params, batch)
                self._compiled_eval = (tuple(sorted(batch)), run)
                return run
            batch_sh = {k: shd.batch_sharding(self.mesh, len(np.shape(v))) for k, v in batch.items()}
            t0 = time.perf_counter()
            with self._context():
                fn = jax.jit(
                    self._eval_step,
                    in_shardings=(self.state_shardings.params, batch_sh),
                    out_shardings=shd.replicated(self.mesh),
                )
                compiled = fn.lower(self.abstract_state.params, batch).compile()
            self.compile_seconds += time.perf_counter() - t0
            self._compiled_eval = (tuple(sorted(batch)), compiled)
        return self._compiled_eval[1]

    # ------------------------------------------------------------------ run
    def _flat(self):
        """The segmented steps when they hold parameters as flat buffers (``train.segmented_layout=flat``)."""
        return self._segments if self._segments is not None and self._segments.flat else None

    def step(self, state: TrainState, host_batch: dict) -> tuple[TrainState, dict]:
        """One train step. The state comes back in the layout it came in (:meth:`fit` keeps
        the flat layout's buffers from step to step)."""
        batch = shd.shard_batch(host_batch, self.mesh)
        if self._compiled_train is None or tuple(sorted(batch)) != self._batch_keys:
            self.compile(state, batch)
        flat = self._flat()
        if flat is not None and not flat.is_packed(state):
            state, metrics = self._compiled_train(flat.pack_state(state), batch)
            return flat.unpack_state(state), metrics
        return self._compiled_train(state, batch)

    def evaluate(self, params: Any, batches: Iterable[dict], num_bytes: int | None = None) -> dict:
        """Validation loss, perplexity, bits per byte (LM/MLM) or accuracy (classification)."""
        if self._flat() is not None:  # once, not per batch
            params = self._flat().pack_params(params)
        loss_sum = weight_sum = correct = 0.0
        n_bytes = 0
        for host_batch in batches:
            host_batch = dict(host_batch)
            n_bytes += int(host_batch.pop("num_bytes", 0) or 0)
            batch = shd.shard_batch(host_batch, self.mesh)
            out = jax.device_get(self._eval_fn(batch)(params, batch))
            loss_sum += float(out["loss_sum"])
            weight_sum += float(out["weight_sum"])
            correct += float(out["correct"])
        if weight_sum == 0:
            return {}
        loss = loss_sum / weight_sum
        result = {"val_loss": loss}
        if self.objective == "cls":
            result["val_accuracy"] = correct / weight_sum
            return result
        result["val_ppl"] = math.exp(min(loss, 700.0))
        n_bytes = num_bytes if num_bytes is not None else n_bytes
        if n_bytes:
            result["val_bpb"] = loss_sum / (math.log(2.0) * n_bytes)
        result["val_tokens"] = weight_sum
        return result

    def fit(
        self,
        state: TrainState,
        batches: Iterator[dict],
        total_steps: int,
        budget_seconds: float = 0.0,
        train_seconds: float = 0.0,
        hooks: Hooks | None = None,
        eval_fn: Callable[[Any], dict] | None = None,
        eval_every: int = 0,
        log_every: int = 10,
    ) -> tuple[TrainState, TrainResult]:
        """Runs steps until ``total_steps``, the time budget, divergence or a stop request.

        Args:
          state: the (initial or restored) state; its ``step`` says where to start.
          batches: host batches (numpy dicts), this process's slice of each global batch.
          total_steps: stop when ``state.step`` reaches it.
          budget_seconds: stop when training time (compile excluded) reaches it; 0 = none.
          train_seconds: training time already spent (restored from a checkpoint).
          hooks: side effects (checkpointing, metrics, progress).
          eval_fn: ``eval_fn(params) -> dict`` of validation metrics, run every ``eval_every``.

        Returns:
          (state, result). On divergence the returned state holds non-finite values and
          must not be checkpointed; the last checkpoint stays the last good one.

        With ``train.segmented_layout=flat`` the steps run on the flat buffers; hooks, the
        eval function and the caller get shaped states and parameters (converted on the
        host: an ``on_step_end`` hook without ``state_needed`` pays that every step).
        """
        hooks = hooks or Hooks()
        flat = self._flat()
        if flat is not None:
            state = flat.pack_state(state)
        shaped = flat.unpack_state if flat is not None else lambda st: st
        step = int(jax.device_get(state.step))
        start_step = step
        tokens = 0.0
        last_loss = float("nan")
        status, reason = "finished", ""
        window_time, window_tokens = 0.0, 0.0
        while step < total_steps:
            if budget_seconds and train_seconds >= budget_seconds:
                status, reason = "budget", f"training budget of {budget_seconds:g}s spent"
                break
            if hooks.should_stop and hooks.should_stop():
                status, reason = "interrupted", "stop requested"
                break
            try:
                host_batch = next(batches)
            except StopIteration:
                status, reason = "finished", "data exhausted"
                break
            if self._compiled_train is None:
                self.compile(state, shd.shard_batch(host_batch, self.mesh))
            t0 = time.perf_counter()
            state, metrics = self.step(state, host_batch)
            # Synchronous on purpose: the time budget needs true step time, and a NaN must
            # be caught before the state is handed to a checkpoint hook.
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            train_seconds += dt
            self.train_seconds = train_seconds  # read by checkpoint hooks
            window_time += dt
            step += 1
            if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
                status = "diverged"
                reason = f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {step}"
                break
            last_loss = m["loss"]
            tokens += m["tokens"]
            window_tokens += m["tokens"]
            if hooks.on_log and (step % max(log_every, 1) == 0 or step == total_steps):
                m.update(tokens_per_sec=window_tokens / max(window_time, 1e-9), train_seconds=train_seconds)
                window_time, window_tokens = 0.0, 0.0
                hooks.on_log(step, m)
            if hooks.on_step_end and (hooks.state_needed is None or hooks.state_needed(step)):
                hooks.on_step_end(step, shaped(state))
            if eval_fn is not None and eval_every and step % eval_every == 0 and step < total_steps:
                val = eval_fn(shaped(state).params)
                if hooks.on_eval:
                    hooks.on_eval(step, val)
        result = TrainResult(
            status=status,
            step=step,
            train_loss=last_loss,
            compile_seconds=self.compile_seconds,
            train_seconds=train_seconds,
            tokens_per_second=tokens / max(train_seconds, 1e-9) if step > start_step else 0.0,
            reason=reason,
        )
        return shaped(state), result


class _Ctx:
    """``jax.set_mesh`` + ``nn.logical_axis_rules`` as one context manager."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def __enter__(self):
        self._a = jax.set_mesh(self.mesh)
        self._b = nn.logical_axis_rules(self.rules)
        self._a.__enter__()
        self._b.__enter__()
        return self

    def __exit__(self, *exc):
        self._b.__exit__(*exc)
        self._a.__exit__(*exc)
        return False
