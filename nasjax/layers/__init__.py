"""Reusable Linen building blocks: attention variants, dconv, GLU conv, FFN, norms, embeddings.

Each block is a plain Flax module with plain fields (no ModelSpec), so it can be
dropped into other models; ``nasjax.models.transformer`` wires them from a spec.
"""

from nasjax.layers.attention import (
    MultiHeadAttention,
    abz_attention,
    abz_scores_and_values,
    attention_probs,
    causal_mask,
    padding_key_bias,
)
from nasjax.layers.conv import GLUConvBlock, LightweightConv1d
from nasjax.layers.dconv import CausalDepthwiseConv, shift_right
from nasjax.layers.embed import (
    Embeddings,
    RelativePositionBias,
    apply_rotary,
    relative_position_bucket,
    sinusoidal_positions,
)
from nasjax.layers.mlp import ACTIVATIONS, FFN, Dense, make_dense, squared_relu
from nasjax.layers.norms import NORMS, LayerNorm, PrimerNorm, RMSNorm, make_norm

__all__ = [
    "ACTIVATIONS",
    "FFN",
    "NORMS",
    "CausalDepthwiseConv",
    "Dense",
    "Embeddings",
    "GLUConvBlock",
    "LayerNorm",
    "LightweightConv1d",
    "MultiHeadAttention",
    "PrimerNorm",
    "RMSNorm",
    "RelativePositionBias",
    "abz_attention",
    "abz_scores_and_values",
    "apply_rotary",
    "attention_probs",
    "causal_mask",
    "make_dense",
    "make_norm",
    "padding_key_bias",
    "relative_position_bucket",
    "shift_right",
    "sinusoidal_positions",
    "squared_relu",
]
