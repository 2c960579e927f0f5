"""Optimizers and learning-rate schedules from a ``train`` config block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax chain: global-norm clipping, then AdamW or Adafactor."""
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    if cfg.optimizer == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(cfg.b1),
                b2=float(cfg.b2),
                eps=float(cfg.eps),
                weight_decay=float(cfg.weight_decay),
                mask=_decay_mask,
            )
        )
    elif cfg.optimizer == "adafactor":
        parts.append(
            optax.adafactor(
                schedule,
                weight_decay_rate=float(cfg.weight_decay) or None,
                weight_decay_mask=_decay_mask if cfg.weight_decay else None,
                multiply_by_parameter_scale=False,
                clipping_threshold=1.0,
            )
        )
    else:
        raise OptimConfigError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    return optax.chain(*parts), schedule
