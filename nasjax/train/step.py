"""Pure train / eval step functions, jitted with shardings by the loop.

The step takes a global batch, optionally splits it into ``accum_steps`` micro
batches (strided, so each micro batch stays spread over all data-parallel devices),
sums per-token loss gradients, divides by the total token weight, applies one
optimizer update, and returns metrics. Dropout keys come from
``fold_in(key(seed), step)`` so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nasjax.train import losses
from nasjax.train.state import TrainState

OBJECTIVES = ("lm", "mlm", "cls")


def forward_loss(model: nn.Module, objective: str, params, batch, rng, deterministic: bool):
    """Model forward and summed loss for one (micro) batch.

    Returns:
      (loss_sum, (weight_sum, correct)) with ``correct`` the number of right class
      predictions for ``cls`` and 0 otherwise.
    """
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch.get("segment_ids"),
        padding_mask=batch.get("padding_mask"),
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    if objective == "cls":
        loss_sum, weight_sum, correct = losses.classification_cross_entropy(logits, batch["labels"], batch["weights"])
        return loss_sum, (weight_sum, correct)
    loss_sum, weight_sum = losses.token_cross_entropy(logits, batch["targets"], batch["weights"])
    return loss_sum, (weight_sum, jnp.zeros((), jnp.float32))


def _split_micro(batch, accum_steps: int):
    def split(x):
        b = x.shape[0]
        x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Callable,
    objective: str,
    seed: int,
    accum_steps: int = 1,
    dropout: bool = False,
):
    """Returns ``train_step(state, batch) -> (state, metrics)`` (pure, to be jitted)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    grad_fn = jax.value_and_grad(lambda p, b, r: forward_loss(model, objective, p, b, r, not dropout), has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        if accum_steps == 1:
            (loss_sum, (weight_sum, _)), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _split_micro(batch, accum_steps)

            def body(carry, xs):
                i, mb = xs
                (ls, (ws, _)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                acc_g, acc_l, acc_w = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_w + ws), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, weight_sum), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": weight_sum,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: nn.Module, objective: str):
    """Returns ``eval_step(params, batch) -> {loss_sum, weight_sum, correct}`` (pure)."""

    def eval_step(params, batch):
        loss_sum, (weight_sum, correct) = forward_loss(model, objective, params, batch, jax.random.key(0), True)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct}

    return eval_step
