"""Forward FLOPs: analytic per token, and XLA's count of a lowered forward pass.

Analytic convention (:func:`flops_per_token`):

* 2 FLOPs per multiply-accumulate, for every matmul: the Q/K/V/O (and shared-QK
  ``q_solo``) projections, the FFN matrices, the conv block's two linears, and the
  output logits (plus the MLM transform).
* Attention scores and the value mix are counted over the **full** context of
  ``seq_len`` keys (2·L·H·K each per token), without halving for the causal mask;
  this is the usual convention (Kaplan et al.) and what XLA executes.
* Depthwise (MDHA) and lightweight convolutions count 2 FLOPs per tap per channel.
* Element-wise work (norms, activations, softmax, biases, the AutoBERT-Zero
  element-wise graph ops), embedding lookups and the relative-bias gather are not
  counted. The pooler and classifier of a ``cls`` head run once per sequence and are
  divided by ``seq_len``; the pooler of an ``mlm`` model is dead code and not counted.

Training FLOPs are conventionally 3x forward (backward ~ 2x forward).

:func:`xla_flops` instead lowers the jitted forward and reads XLA's own count
(``Lowered.cost_analysis()``, which in jax 0.10 needs no compile), which includes
element-wise ops, so it is somewhat larger than the analytic value.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nasjax.layers.mlp import GATED_ACTIVATIONS
from nasjax.spec import AttentionSpec, BlockSpec, ConvSpec, ModelSpec

__all__ = [
    "TRAIN_FLOPS_MULTIPLIER",
    "mixer_flops_per_token",
    "ffn_flops_per_token",
    "layer_flops_per_token",
    "head_flops_per_token",
    "flops_per_token",
    "xla_flops",
]

TRAIN_FLOPS_MULTIPLIER = 3


def mixer_flops_per_token(mixer, d_model: int, seq_len: int) -> int:
    """Forward FLOPs per token of one token mixer (attention or GLU conv)."""
    d = d_model
    if isinstance(mixer, AttentionSpec):
        hk = mixer.n_heads * mixer.resolved_head_dim(d)
        n_proj = 3 if mixer.uses_value else 2  # q (or qk), k, v
        if mixer.shared_qk:
            n_proj -= 1  # one qk_proj replaces q_proj and k_proj ...
            flops = 2 * hk * hk  # ... and q_solo maps K to Q
        else:
            flops = 0
        flops += n_proj * 2 * d * hk
        if mixer.dconv_kernel:
            flops += n_proj * 2 * mixer.dconv_kernel * hk
        flops += 2 * 2 * seq_len * hk  # scores and value mix over the full context
        flops += 2 * hk * d  # o_proj
        return flops
    if isinstance(mixer, ConvSpec):
        inner = 2 * d if mixer.use_glu else d
        return 2 * d * inner + 2 * mixer.kernel_size * d + 2 * d * d
    if getattr(mixer, "kind", None) == "attention_graph":
        return _graph_flops_per_token(mixer, d, seq_len)
    raise NotImplementedError(f"no FLOP formula for mixer kind {getattr(mixer, 'kind', mixer)!r}")


def _graph_flops_per_token(mixer, d_model: int, seq_len: int) -> int:
    """A searched attention graph: its projections plus every matmul node
    ((a, b) @ (b, c) costs 2·a·b·c per head and sequence, a, b, c in {n = seq_len, d = head dim})."""
    from nasjax.genome.attn_graph import LEAVES

    head_dim = mixer.resolved_head_dim(d_model)
    hk = mixer.n_heads * head_dim
    size = {"n": seq_len, "d": head_dim}
    types = mixer.graph.types()
    flops = (3 if mixer.uses_value else 2) * 2 * d_model * hk + 2 * hk * d_model
    per_sequence = 0
    for j, node in enumerate(mixer.graph.nodes):
        if node.op == "matmul":
            (a, b), c = types[node.inputs[0]], types[len(LEAVES) + j][1]
            per_sequence += 2 * size[a] * size[b] * size[c]
    return flops + mixer.n_heads * per_sequence // seq_len


def ffn_flops_per_token(block: BlockSpec, d_model: int) -> int:
    """Forward FLOPs per token of a block's FFN (0 when the block has none)."""
    if block.ffn is None:
        return 0
    n_mats = 3 if block.ffn.activation in GATED_ACTIVATIONS else 2
    return n_mats * 2 * d_model * block.ffn.d_ff


def layer_flops_per_token(spec: ModelSpec, seq_len: int) -> list[int]:
    """Forward FLOPs per token of every layer."""
    return [
        mixer_flops_per_token(b.mixer, spec.d_model, seq_len) + ffn_flops_per_token(b, spec.d_model)
        for b in spec.layers
    ]


def head_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """Forward FLOPs per token of the output head (logits, MLM transform, or classifier)."""
    d = spec.d_model
    if spec.head == "lm":
        return 2 * d * spec.vocab_size
    if spec.head == "mlm":
        return 2 * d * d + 2 * d * spec.vocab_size
    per_sequence = (2 * d * d if spec.pooler else 0) + 2 * d * spec.n_classes
    return per_sequence // seq_len


def flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """Analytic forward FLOPs per token at context ``seq_len`` (see module docstring)."""
    return sum(layer_flops_per_token(spec, seq_len)) + head_flops_per_token(spec, seq_len)


def xla_flops(spec: ModelSpec, batch: int, seq_len: int, dtype=jnp.float32) -> float:
    """FLOPs XLA counts for one jitted forward of [batch, seq_len] tokens (no compile).

    Args:
      spec: the architecture.
      batch, seq_len: input shape.
      dtype: activation dtype of the model.

    Returns:
      The ``flops`` entry of the lowered program's cost analysis.
    """
    from nasjax.models.transformer import build

    model = build(spec, dtype=dtype)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda t: model.init({"params": jax.random.key(0)}, t)["params"], tokens)
    params = nn.unbox(abstract)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    lowered = forward.lower(params, tokens)
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends only analyse compiled programs
        cost = None
    if not cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0]
    return float(cost["flops"])
