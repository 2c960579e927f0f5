"""Task-agnostic SuperLM training with sandwich sampling (AutoDistil stage 1, methods.md §4(b)).

One SuperLM per sub-space, of the teacher's shape and initialised from the teacher's
weights. Per batch: the teacher's last-layer Q, K, V once; then for the largest, the
smallest and ``M - 2`` random subnets of the sub-space (``random`` seeded by the step,
so a resumed run draws the same subnets), the relation-distillation loss of the subnet
(:mod:`nasjax.train.distill`) is differentiated w.r.t. the SuperLM's params through the
prefix slices and the gradients are summed; then global-norm clipping (1.0) and one
AdamW step (weight decay off for biases and norms, as the released code).

Each distinct subnet compiles one gradient program (cached per run); the teacher
forward and the update compile once. State (params, optimizer, step, data position)
is written atomically every ``distil.checkpoint_every`` steps and at the end, so an
interrupted run resumes where it stopped with the same subnet draws and batches.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util

from nasjax.genome.autodistil import Subnet, largest, smallest, subnet_spec
from nasjax.models import build
from nasjax.train.distill import last_layer_qkv, relation_kd, slice_params

__all__ = ["SuperLMTrainer", "SuperLMState", "sandwich", "decay_mask"]


def sandwich(subnets: Sequence[Subnet], m: int, seed: int, step: int) -> list[Subnet]:
    """[largest, smallest] + ``m - 2`` distinct random others (by parameter count; seeded by ``step``)."""
    big, small = largest(subnets), smallest(subnets)
    rest = [s for s in subnets if s not in (big, small)]
    rng = np.random.default_rng([seed, step])
    k = max(0, min(m - 2, len(rest)))
    picks = [rest[int(i)] for i in rng.choice(len(rest), size=k, replace=False)] if k else []
    return ([big, small] if big != small else [big])[:m] + picks


def decay_mask(params) -> dict:
    """True for weight matrices (decayed), False for biases and norm scales/offsets."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: (k[-1] not in ("bias", "scale") and np.ndim(v) > 1) for k, v in flat.items()}
    )


class SuperLMState:
    """Params, optimizer state, step and the data iterator's state."""

    def __init__(self, params, opt_state, step: int = 0, data_state: dict | None = None):
        self.params, self.opt_state, self.step, self.data_state = params, opt_state, int(step), data_state


class SuperLMTrainer:
    """Trains one SuperLM (see the module docstring).

    Args:
      teacher_spec, teacher_params: the frozen teacher (an encoder of standard attention).
      subnets: the sub-space's subnets.
      lr, weight_decay, steps, warmup: AdamW with linear decay (the released configs:
        4e-5, 0.01, warmup 0).
      sandwich_size: M (4).
      relation_heads, kd_kind: the relation loss (:func:`~nasjax.train.distill.relation_kd`).
      seed: sampling seed.
    """

    def __init__(
        self,
        teacher_spec,
        teacher_params,
        subnets: Sequence[Subnet],
        *,
        lr: float = 4e-5,
        weight_decay: float = 0.01,
        steps: int = 1000,
        warmup: int = 0,
        sandwich_size: int = 4,
        relation_heads: int = 12,
        kd_kind: str = "kl",
        seed: int = 0,
    ):
        if not subnets:
            raise ValueError("a SuperLM needs at least one subnet")
        self.teacher_spec = teacher_spec
        self.teacher_params = jax.device_put(nn.meta.unbox(teacher_params))
        self.subnets = sorted(subnets)
        for s in self.subnets:  # every subnet must fit the SuperLM
            subnet_spec(teacher_spec, s)
        self.max_layers = teacher_spec.n_layers
        self.m = int(sandwich_size)
        self.relation_heads, self.kd_kind, self.seed = int(relation_heads), kd_kind, int(seed)
        decay = optax.linear_schedule(lr, 0.0, max(steps - warmup, 1))
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
        self.tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
        )
        teacher = build(teacher_spec)
        n_teacher = teacher_spec.n_layers

        def teacher_qkv(tokens, padding_mask):
            _, state = teacher.apply(
                {"params": self.teacher_params}, tokens, padding_mask=padding_mask, mutable=["intermediates"]
            )
            return last_layer_qkv(state["intermediates"], n_teacher)

        self._teacher_qkv = jax.jit(teacher_qkv)
        self._update = jax.jit(self._apply_update, donate_argnums=(0, 1))
        self._accumulate = jax.jit(lambda acc, g: jax.tree.map(jnp.add, acc, g), donate_argnums=(0,))
        self._grad_fns: dict[Subnet, Callable] = {}
        self._loss_fns: dict[Subnet, Callable] = {}
        self.compile_seconds = 0.0
        self.compiled_subnets = 0

    # ------------------------------------------------------------------ pieces
    def init(self) -> SuperLMState:
        params = jax.tree.map(jnp.array, self.teacher_params)  # initialised from the teacher
        return SuperLMState(params, self.tx.init(params), 0)

    def subnet_model(self, subnet: Subnet):
        spec = subnet_spec(self.teacher_spec, subnet)
        model = build(spec)
        shapes = nn.meta.unbox(
            jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        )
        return spec, model, shapes

    def extract(self, params, subnet: Subnet):
        """(model spec, params) of a standalone student: the subnet's slices of ``params``."""
        spec, _, shapes = self.subnet_model(subnet)
        return spec, jax.device_get(slice_params(params, shapes, subnet, self.max_layers))

    def _loss(self, subnet: Subnet):
        """``loss(super_params, tokens, padding_mask, teacher_qkv)`` of one subnet (not jitted)."""
        _, model, shapes = self.subnet_model(subnet)
        max_layers, n_rel, kind = self.max_layers, self.relation_heads, self.kd_kind

        def loss(params, tokens, padding_mask, t_qkv):
            sub = slice_params(params, shapes, subnet, max_layers)
            _, state = model.apply({"params": sub}, tokens, padding_mask=padding_mask, mutable=["intermediates"])
            s_qkv = last_layer_qkv(state["intermediates"], subnet.layers)
            return relation_kd(s_qkv, t_qkv, padding_mask, n_rel=n_rel, kind=kind)

        return loss

    def _grad_fn(self, subnet: Subnet):
        fn = self._grad_fns.get(subnet)
        if fn is None:
            fn = self._grad_fns[subnet] = jax.jit(jax.value_and_grad(self._loss(subnet)))
            self.compiled_subnets += 1
        return fn

    def _apply_update(self, params, opt_state, grads):
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

    def with_teacher(self, batches) -> list[tuple]:
        """(tokens, padding_mask, teacher Q/K/V) per batch: the teacher runs once per held-out batch."""
        out = []
        for b in batches:
            tokens, mask = jnp.asarray(b["inputs"]), jnp.asarray(b["padding_mask"])
            out.append((tokens, mask, self._teacher_qkv(tokens, mask)))
        return out

    def held_out_loss(self, params, subnet: Subnet, held_out: list[tuple]) -> float:
        """Mean relation-distillation loss of one subnet over :meth:`with_teacher` batches (forward only)."""
        fn = self._loss_fns.get(subnet)
        if fn is None:
            fn = self._loss_fns[subnet] = jax.jit(self._loss(subnet))
        return sum(float(fn(params, *b)) for b in held_out) / len(held_out)

    # ------------------------------------------------------------------ training
    def step(self, state: SuperLMState, batch: dict) -> dict:
        """One sandwich step in place; returns {"loss": mean over the sampled subnets, ...}."""
        tokens, mask = jnp.asarray(batch["inputs"]), jnp.asarray(batch["padding_mask"])
        t_qkv = self._teacher_qkv(tokens, mask)
        grads, losses = None, []
        sampled = sandwich(self.subnets, self.m, self.seed, state.step)
        for subnet in sampled:
            t0 = time.perf_counter()
            fresh = subnet not in self._grad_fns
            loss, g = self._grad_fn(subnet)(state.params, tokens, mask, t_qkv)
            if fresh:
                jax.block_until_ready(loss)
                self.compile_seconds += time.perf_counter() - t0
            losses.append(loss)
            grads = g if grads is None else self._accumulate(grads, g)
        state.params, state.opt_state, gnorm = self._update(state.params, state.opt_state, grads)
        state.step += 1
        values = [float(x) for x in losses]
        return {
            "loss": sum(values) / len(values),
            "loss_largest": values[0],
            "loss_smallest": values[1] if len(values) > 1 else values[0],
            "grad_norm": float(gnorm),
            "subnets": [s.name for s in sampled],
        }

    # ------------------------------------------------------------------ checkpoints
    def save(self, state: SuperLMState, path: str) -> None:
        """Atomic msgpack of params + optimizer state, with step and data position beside it."""
        blob = serialization.to_bytes({"params": state.params, "opt_state": state.opt_state})
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        meta = {"step": state.step, "data_state": state.data_state}
        with open(path + ".json.tmp", "w") as f:
            json.dump(meta, f)
        os.replace(path + ".json.tmp", path + ".json")

    def restore(self, path: str) -> SuperLMState:
        """The state saved at ``path``; raises ValueError naming the file if it is unreadable."""
        fresh = self.init()
        try:
            with open(path, "rb") as f:
                blob = f.read()
            with open(path + ".json") as f:
                meta = json.load(f)
            tree = serialization.from_bytes({"params": fresh.params, "opt_state": fresh.opt_state}, blob)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"SuperLM checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from None
        params = jax.tree.map(jnp.asarray, tree["params"])
        opt_state = jax.tree.map(jnp.asarray, tree["opt_state"])
        return SuperLMState(params, opt_state, int(meta["step"]), meta.get("data_state"))
