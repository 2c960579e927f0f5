"""AutoDistil's SuperLM: sliced subnets, relation distillation, sandwich steps (methods.md §4(b)).

Legend: B batch, L length, D width (heads merged), R relation heads.

SuperLM = an encoder of the teacher's shape, initialised from the teacher. A subnet's
parameters are **prefix slices** of the SuperLM's (hidden size, heads with the head size
fixed, FFN width; vocabulary, positions and head size whole) of the layers
:func:`~nasjax.genome.autodistil.layer_map` keeps. :func:`slice_params` cuts them to the
shapes of the subnet's own model (``models.build(subnet_spec)``), so a subnet runs as an
ordinary nasjax model: LayerNorm statistics cover the active prefix only, and the
"extracted" student *is* the SuperLM's subnet (same function, same outputs).

Cost choice (documented, measured in benchmarks/autodistil_*.py): each subnet shape
compiles its own program (``jax.jit`` keyed by the static subnet), as the released code's
static configs do, so no FLOPs are wasted on masked units; the price is one compile per
distinct subnet sampled (cached for the run). The gradient of the sliced forward lands
in the SuperLM's prefix slices (zero elsewhere).

Relation distillation (MiniLMv2 style, last layer only): for X in {Q, K, V} take the
first ``R * d_r`` features (``d_r = width // R``), split into R relation heads and form
``X_r X_r^T / sqrt(d_r)`` + the padding bias (-10000 on padded keys). ``mse`` (the
released code) averages the squared difference of those logits; ``kl`` (the paper's
text) is KL(teacher || student) of their row softmaxes, averaged over rows. Relations are
L x L, so teacher and student widths and head counts may differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from nasjax.genome.autodistil import Subnet, layer_map
from nasjax.layers.attention import PADDING_BIAS

__all__ = ["relations", "relation_kd", "KD_KINDS", "slice_params", "last_layer_qkv"]

KD_KINDS = ("kl", "mse")


def relations(x_BxLxD: jnp.ndarray, n_rel: int) -> jnp.ndarray:
    """[B, L, D] -> [B, R, L, L] scaled relation logits of ``n_rel`` relation heads."""
    d_r = x_BxLxD.shape[-1] // n_rel
    if d_r < 1:
        raise ValueError(f"width {x_BxLxD.shape[-1]} is smaller than the {n_rel} relation heads")
    b, length = x_BxLxD.shape[:2]
    x = x_BxLxD[..., : n_rel * d_r].astype(jnp.float32).reshape(b, length, n_rel, d_r)
    return jnp.einsum("bird,bjrd->brij", x, x) / jnp.sqrt(jnp.float32(d_r))


def relation_kd(student_qkv, teacher_qkv, padding_mask_BxL=None, n_rel: int = 12, kind: str = "kl") -> jnp.ndarray:
    """Sum over Q, K, V of the relation loss between student and teacher (see the module docstring).

    Args:
      student_qkv, teacher_qkv: three [B, L, D_s] / [B, L, D_t] arrays each.
      padding_mask_BxL: bool, True at real tokens (None = all real). Padded query rows
        are left out of the average.
      n_rel: relation heads R.
      kind: ``kl`` or ``mse``.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"relation KD kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    b, length = student_qkv[0].shape[:2]
    if padding_mask_BxL is None:
        padding_mask_BxL = jnp.ones((b, length), bool)
    bias = jnp.where(padding_mask_BxL, 0.0, PADDING_BIAS)[:, None, None, :]
    rows = padding_mask_BxL[:, None, :, None].astype(jnp.float32)  # real query rows
    n_rows = jnp.maximum(jnp.sum(rows) * n_rel, 1.0)
    total = jnp.float32(0.0)
    for xs, xt in zip(student_qkv, teacher_qkv):
        rs, rt = relations(xs, n_rel) + bias, relations(xt, n_rel) + bias
        if kind == "mse":
            real = rows * padding_mask_BxL[:, None, None, :].astype(jnp.float32)
            total += jnp.sum(real * (rs - rt) ** 2) / jnp.maximum(jnp.sum(real) * n_rel, 1.0)
        else:
            ls, lt = jax.nn.log_softmax(rs, -1), jax.nn.log_softmax(rt, -1)
            kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1, keepdims=True)
            total += jnp.sum(rows * kl) / n_rows
    return total


def last_layer_qkv(intermediates: Mapping, n_layers: int, stack: str = "encoder") -> tuple:
    """The sown ``q, k, v`` ([B, L, H*K]) of the last layer from ``mutable=["intermediates"]``."""
    mixer = intermediates[stack][f"layer_{n_layers - 1}"]["mixer"]
    return tuple(mixer[name][0] for name in ("q", "k", "v"))


def _layer_index(path: tuple[str, ...]) -> int | None:
    if len(path) > 1 and path[0] in ("encoder", "decoder") and path[1].startswith("layer_"):
        return int(path[1][len("layer_") :])
    return None


def slice_params(super_params: Mapping, target_shapes: Mapping, subnet: Subnet, max_layers: int) -> dict:
    """The subnet's params: prefix slices of the SuperLM's to ``target_shapes``.

    Args:
      super_params: the SuperLM's (teacher-shaped) params.
      target_shapes: the subnet model's params or their ShapeDtypeStructs (same tree as
        ``models.build(subnet_spec).init``).
      subnet: which layers to keep (:func:`layer_map`).
      max_layers: the SuperLM's depth.

    Works under ``jax.grad``/``jit`` (slicing is differentiable).
    """
    keep = layer_map(subnet.layers, max_layers)
    flat_super = traverse_util.flatten_dict(dict(super_params))
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(target_shapes)).items():
        src_path = path
        i = _layer_index(path)
        if i is not None:
            src_path = (path[0], f"layer_{keep[i]}") + path[2:]
        full = flat_super.get(src_path)
        if full is None:
            raise KeyError(f"the SuperLM has no parameter {'/'.join(src_path)} (for the subnet's {'/'.join(path)})")
        shape = tuple(leaf.shape)
        if len(shape) != full.ndim or any(s > f for s, f in zip(shape, full.shape)):
            raise ValueError(f"subnet parameter {'/'.join(path)} {shape} does not fit the SuperLM's {full.shape}")
        out[path] = full[tuple(slice(0, s) for s in shape)]
    return traverse_util.unflatten_dict(out)
