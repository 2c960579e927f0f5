"""Optimizers and learning-rate schedules from a ``train`` config block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant", "linear")


class OptimConfigError(ValueError):
    """An optimizer or schedule setting is invalid."""


def make_schedule(cfg) -> optax.Schedule:
    """Linear warmup then cosine / reciprocal-sqrt / constant / linear decay.

    ``rsqrt`` is T2T/T5's ``rsqrt_decay``: lr * min(1, step/warmup) * rsqrt(max(step, warmup)/warmup),
    which Primer's search used (with Adafactor, lr 0.01, 10K warmup).
    """
    lr, warmup, total = float(cfg.learning_rate), int(cfg.warmup_steps), max(int(cfg.steps), 1)
    kind = cfg.schedule
    if kind not in SCHEDULES:
        raise OptimConfigError(f"train.schedule: expected one of {', '.join(SCHEDULES)}, got {kind!r}")
    if lr <= 0:
        raise OptimConfigError(f"train.learning_rate must be positive, got {lr}")
    warm = max(warmup, 0)

    def warmup_factor(step):
        return jnp.minimum(1.0, (step + 1.0) / max(warm, 1)) if warm else 1.0

    if kind == "cosine":
        floor = float(cfg.min_learning_rate_ratio)

        def sched(step):
            frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
            cos = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
            return lr * warmup_factor(step) * cos

    elif kind == "linear":

        def sched(step):
            frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
            return lr * warmup_factor(step) * (1.0 - frac)

    elif kind == "rsqrt":

        def sched(step):
            return lr * warmup_factor(step) * jax.lax.rsqrt(jnp.maximum(step + 1.0, max(warm, 1)) / max(warm, 1))

    else:

        def sched(step):
            return lr * warmup_factor(step)

    return sched


def _decay_mask(params):
    # No weight decay on biases, norm scales and conv taps (vectors), as BERT/AutoDistil do.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg, decay_mask=_decay_mask) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax chain: global-norm clipping, then AdamW or Adafactor.

    With ``train.flat_optimizer`` the same clipping and AdamW run on one vector of all
    parameters (:func:`_flat_adamw`). ``decay_mask``: which leaves weight decay applies
    to (default: matrices and larger, :func:`_decay_mask`).
    """
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    if cfg.get("flat_optimizer", False):
        if cfg.optimizer != "adamw":
            raise OptimConfigError(
                f"train.flat_optimizer=true needs train.optimizer=adamw (Adafactor factors each matrix's "
                f"second moments, which one flat vector cannot hold); got {cfg.optimizer!r}"
            )
        return _flat_adamw(cfg, schedule, parts), schedule
    if cfg.optimizer == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(cfg.b1),
                b2=float(cfg.b2),
                eps=float(cfg.eps),
                weight_decay=float(cfg.weight_decay),
                mask=decay_mask,
            )
        )
    elif cfg.optimizer == "adafactor":
        parts.append(
            optax.adafactor(
                schedule,
                weight_decay_rate=float(cfg.weight_decay) or None,
                weight_decay_mask=decay_mask if cfg.weight_decay else None,
                multiply_by_parameter_scale=False,
                clipping_threshold=1.0,
            )
        )
    else:
        raise OptimConfigError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    return optax.chain(*parts), schedule


# The settings make_optimizer reads: programs compiled for one optimizer (train.segmented's
# per-leaf updates) are shared by every trainer whose values of these are equal.
OPTIMIZER_KEYS = (
    "optimizer",
    "learning_rate",
    "warmup_steps",
    "steps",
    "schedule",
    "min_learning_rate_ratio",
    "b1",
    "b2",
    "eps",
    "weight_decay",
    "grad_clip",
)


def segment_optimizer(cfg) -> tuple[float, optax.GradientTransformation, int, tuple, optax.Schedule]:
    """:func:`make_optimizer`'s chain split for per-leaf updates (``train.segmented``).

    Returns:
      (clip norm, 0 if none; the chain after its clipping, to run on one leaf at a time;
      how many leading entries of the whole chain's state belong to the clipping; the
      settings as a hashable key; the schedule). Running the returned chain leaf by leaf
      on gradients clipped by the global norm computes what the whole chain computes.
    """
    clip = float(cfg.grad_clip) if cfg.grad_clip and cfg.grad_clip > 0 else 0.0
    inner, schedule = make_optimizer(_without_clipping(cfg))  # the schedule does not depend on clipping
    key = tuple((k, str(cfg.get(k))) for k in OPTIMIZER_KEYS)
    return clip, inner, 1 if clip else 0, key, schedule


def decay_chains(cfg) -> dict[bool, optax.GradientTransformation]:
    """:func:`segment_optimizer`'s chain twice, with weight decay on every leaf (True) and on
    none (False): for leaves whose shape no longer tells (``train.segmented_layout=flat``
    keeps each parameter as a 1-D buffer), the caller picks the chain by the parameter's
    real rank, as :func:`_decay_mask` would. The two states have the chain's structure.
    """
    settings = _without_clipping(cfg)
    return {
        flag: make_optimizer(settings, decay_mask=lambda p, flag=flag: jax.tree.map(lambda _: flag, p))[0]
        for flag in (True, False)
    }


def _without_clipping(cfg) -> _Settings:
    """The ``train`` settings with clipping and the flat optimizer off: the per-leaf chain's."""
    no_clip = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    no_clip.update(grad_clip=0.0, flat_optimizer=False)
    return _Settings(no_clip)


class _Settings(dict):
    """A plain dict readable as ``cfg.name`` and ``cfg.get(name)`` (what make_optimizer reads)."""

    __getattr__ = dict.__getitem__


def _flat_adamw(cfg, schedule, clipping: list) -> optax.GradientTransformation:
    """Clipping and AdamW on one vector that holds every parameter (``train.flat_optimizer``).

    The per-element math is optax's own (``clip_by_global_norm``, ``scale_by_adam``,
    ``scale_by_learning_rate``, run on the flattened vector), and weight decay follows
    :func:`_decay_mask` leaf by leaf, so every element gets the update the per-leaf
    chain of :func:`make_optimizer` gives it, up to float rounding: the global norm is
    summed in another order and XLA fuses the update differently. What it buys is compile
    time: XLA:CPU emits each parameter's mu, nu and update as kernels of their own, and
    on a tiny model those make a third of the train step's compile
    (``benchmarks/compile_composition.py``). The state holds ``mu`` and ``nu`` as one
    [num_params] vector each, so it suits replicated parameters only (the trainer checks).
    ``clipping``: the clip transformation, if any, as :func:`make_optimizer` builds it.
    """
    parts = list(clipping)
    parts.append(optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)))
    parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
    parts.append(optax.scale_by_learning_rate(schedule))
    inner = optax.chain(*parts)

    def init(params):
        flat, _ = ravel_pytree(params)
        return inner.init(flat)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the flat AdamW update needs the parameters (weight decay)")
        flat_updates, unravel = ravel_pytree(updates)
        # Decay only where the per-leaf mask allows it: masked-off leaves enter as zeros, so
        # their elements get update + weight_decay * 0, the same value as no decay at all.
        mask = _decay_mask(params)
        decayed = jax.tree.map(lambda p, m: p if m else jnp.zeros_like(p), params, mask)
        flat_decayed, _ = ravel_pytree(decayed)
        flat_updates, state = inner.update(flat_updates, state, flat_decayed)
        return unravel(flat_updates), state

    return optax.GradientTransformation(init, update)
