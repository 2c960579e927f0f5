"""Loss functions (pure; sums and weights so that sharded and accumulated steps agree).

Every loss returns ``(loss_sum, weight_sum)`` in float32; the mean is taken by the
caller after summing over micro-batches, so gradient accumulation and any batch
sharding give the same result as one big batch.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
    """Summed next-token (or masked-token) cross entropy and the number of counted tokens."""
    logits = logits_BxLxV.astype(jnp.float32)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
    weights = weights_BxL.astype(jnp.float32)
    return jnp.sum(ce_BxL * weights), jnp.sum(weights)


def classification_cross_entropy(logits_BxC, labels_B, weights_B):
    """Summed classification cross entropy, number of examples, and correct predictions."""
    logits = logits_BxC.astype(jnp.float32)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits, labels_B)
    weights = weights_B.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels_B) * weights)
    return jnp.sum(ce_B * weights), jnp.sum(weights), correct
