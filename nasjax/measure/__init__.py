"""Cost measurements of a spec: parameter counts, FLOPs, and a readable report."""

from nasjax.measure.flops import flops_per_token, layer_flops_per_token, xla_flops
from nasjax.measure.params import (
    count_params,
    gpt2_layer_params,
    gpt2_non_embedding_params,
    layer_param_counts,
    module_param_counts,
    param_tree_shapes,
)
from nasjax.measure.report import describe

__all__ = [
    "count_params",
    "describe",
    "flops_per_token",
    "gpt2_layer_params",
    "gpt2_non_embedding_params",
    "layer_flops_per_token",
    "layer_param_counts",
    "module_param_counts",
    "param_tree_shapes",
    "xla_flops",
]
