"""Human-readable summary of a spec: layer table, parameter counts, FLOPs per token.

Example (``print(describe(get_spec("primer", "tiny"), seq_len=128))``)::

    primer-tiny: decoder, d_model 64, vocab 256, positions relative, norm primer_norm, head lm
      #  mixer                            ffn                 norms         params
      0  attn H=4 K=16 dconv3 sharedQK    256 squared_relu    pre/branch    ...
"""

from __future__ import annotations

from nasjax.measure.flops import TRAIN_FLOPS_MULTIPLIER, flops_per_token, layer_flops_per_token
from nasjax.measure.params import count_params, layer_param_counts
from nasjax.spec import AttentionSpec, BlockSpec, ConvSpec, ModelSpec

__all__ = ["mixer_summary", "describe"]


def mixer_summary(mixer, d_model: int) -> str:
    """One-line description of a token mixer, e.g. ``attn H=12 K=64 dconv3 sharedQK``."""
    if isinstance(mixer, AttentionSpec):
        head = "attn" if mixer.variant == "softmax" else mixer.variant
        parts = [head, f"H={mixer.n_heads}", f"K={mixer.resolved_head_dim(d_model)}"]
        if mixer.dconv_kernel:
            parts.append(f"dconv{mixer.dconv_kernel}")
        if mixer.shared_qk:
            parts.append("sharedQK")
        if not mixer.uses_value:
            parts.append("(no V)")
        if mixer.use_bias:
            parts.append("+bias")
        return " ".join(parts)
    if isinstance(mixer, ConvSpec):
        return f"{'glu_conv' if mixer.use_glu else 'conv'} k={mixer.kernel_size} H={mixer.n_heads}"
    if getattr(mixer, "kind", None) == "attention_graph":
        from nasjax.genome.attn_graph import render_graph

        return f"graph H={mixer.n_heads}{'' if mixer.uses_value else ' noV'}: {render_graph(mixer.graph)}"
    return str(getattr(mixer, "kind", type(mixer).__name__))


def _ffn_summary(block: BlockSpec) -> str:
    if block.ffn is None:
        return "-"
    return f"{block.ffn.d_ff} {block.ffn.activation}"


def _norms(block: BlockSpec) -> str:
    return block.mixer_norm if block.ffn is None else f"{block.mixer_norm}/{block.ffn_norm}"


def describe(spec: ModelSpec, seq_len: int = 512) -> str:
    """Readable report: header, one row per layer, parameter counts, analytic FLOPs.

    Args:
      spec: the architecture.
      seq_len: context length for the attention FLOPs.

    Returns:
      A multi-line string (no trailing newline).
    """
    counts = count_params(spec)
    per_layer = layer_param_counts(spec)
    layer_flops = layer_flops_per_token(spec, seq_len)
    rows = [
        (str(i), mixer_summary(b.mixer, spec.d_model), _ffn_summary(b), _norms(b), f"{n:,}", f"{fl:,}")
        for i, (b, n, fl) in enumerate(zip(spec.layers, per_layer, layer_flops))
    ]
    header = ("#", "mixer", "ffn", "norms", "params", "fwd FLOPs/tok")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = lambda r: (
        "  "
        + "  ".join(cell.rjust(w) if c in (0, 4, 5) else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
    )
    title = spec.name or "model"
    extras = []
    if spec.final_norm:
        extras.append("final norm")
    if spec.embed_norm:
        extras.append("embedding norm")
    extras.append("tied embeddings" if spec.tie_embeddings else "untied lm_head")
    if spec.pooler:
        extras.append("pooler")
    lines = [
        f"{title}: {spec.kind}, d_model {spec.d_model}, vocab {spec.vocab_size:,}, max_len {spec.max_len:,}, "
        f"positions {spec.positions}, norm {spec.norm} (eps {spec.norm_eps:g}), head {spec.head}",
        f"  {', '.join(extras)}; dropout {spec.dropout_rate:g} / attention {spec.attention_dropout_rate:g}",
        fmt(header),
        *(fmt(r).rstrip() for r in rows),
    ]
    fwd = flops_per_token(spec, seq_len)
    lines += [
        f"parameters: total {counts['total']:,} | embedding {counts['embedding']:,} | "
        f"non-embedding {counts['non_embedding']:,}",
        f"FLOPs per token at seq_len {seq_len:,}: forward {fwd:,} ({fwd / 1e9:.3f} GFLOP), "
        f"train ~{TRAIN_FLOPS_MULTIPLIER}x {TRAIN_FLOPS_MULTIPLIER * fwd:,}",
    ]
    return "\n".join(lines)
