"""Spec -> Flax module: the only place that interprets a :class:`~nasjax.spec.ModelSpec`.

Legend: B batch, L length, D model width, H heads, K head dim, F FFN width,
V vocabulary, C classes.

Parameter tree (stable paths, so parents and children of a search share names)::

    embed/{token_embed, position_embed, type_embed, norm}
    relative_bias/embedding                   # T5 bias [buckets, max heads], if positions == "relative"
    decoder|encoder/layer_{i}/{mixer, mixer_norm, ffn, ffn_norm}
    final_norm                                # if spec.final_norm
    lm_head                                   # untied output projection (D -> V, no bias)
    mlm_head/{transform, norm, bias}          # BERT MLM head (head == "mlm")
    pooler, classifier                        # BERT pooler (spec.pooler), head == "cls"

Call contract::

    model = build(spec)
    variables = model.init({"params": rng}, tokens_BxL)
    logits = model.apply(variables, tokens_BxL, segment_ids=None, padding_mask=None,
                         deterministic=True, rngs={"dropout": rng})
    # [B, L, V] for heads lm / mlm, [B, C] for head cls; always float32.

Gradient w.r.t. the summed input embeddings (causality tests, saliency): pass
``{"params": ..., "perturbations": {"embeddings": zeros_BxLxD}}`` and differentiate
w.r.t. the perturbation; without that collection the hook is a no-op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nasjax.genome.attn_graph import GraphAttentionSpec
from nasjax.genome.program import ProgramSpec
from nasjax.layers import init as initializers
from nasjax.layers.attention import MultiHeadAttention, padding_key_bias
from nasjax.layers.conv import GLUConvBlock
from nasjax.layers.dropout import Dropout
from nasjax.layers.embed import Embeddings, RelativePositionBias
from nasjax.layers.graph_attention import GraphAttention
from nasjax.layers.mlp import FFN, make_dense
from nasjax.layers.norms import make_norm
from nasjax.layers.program import ProgramBlock
from nasjax.spec import AttentionSpec, BlockSpec, ConvSpec, ModelSpec

__all__ = ["Transformer", "Block", "Stack", "Segments", "build", "max_attention_heads"]

_X_AXES = ("activation_batch", "activation_length", "activation_embed")
BLOCK_PARTS = ("all", "mixer", "ffn")


def max_attention_heads(spec: ModelSpec) -> int:
    """Most heads of any attention layer (columns of the shared relative-bias table); 0 if none."""
    return max((b.mixer.n_heads for b in spec.layers if isinstance(b.mixer, AttentionSpec)), default=0)


class Block(nn.Module):
    """One layer: token mixer sub-layer, then (optionally) an FFN sub-layer.

    Norm placement per sub-layer F with norm N: ``none`` F(x) (a whole-layer mixer such
    as a Primer program); ``pre`` x + F(N(x)); ``post``
    N(x + F(x)); ``branch`` x + N(F(x)). Dropout acts on F's output.
    """

    block: BlockSpec
    model: ModelSpec
    dtype: Any = jnp.float32
    # which sub-layers to run: "all" (the layer), or one of them alone, "mixer" (with
    # mixer_norm) or "ffn" (with ffn_norm), on the same parameter names (Segments.sublayer)
    part: str = "all"

    @nn.compact
    def __call__(self, x_BxLxD, *, padding_mask, key_bias, position_bias, deterministic):
        if self.part not in BLOCK_PARTS:
            raise ValueError(f"Block.part={self.part!r}: expected one of {', '.join(BLOCK_PARTS)}")
        if self.part != "ffn":
            x_BxLxD = self._mixer_sublayer(x_BxLxD, padding_mask, key_bias, position_bias, deterministic)
        if self.part != "mixer" and self.block.ffn is not None:
            f = self.block.ffn
            ffn = FFN(f.d_ff, f.activation, f.use_bias, init_std=self.model.init_std, dtype=self.dtype, name="ffn")
            x_BxLxD = self._sublayer(x_BxLxD, ffn, self.block.ffn_norm, "ffn_norm", deterministic)
        return x_BxLxD

    def _mixer_sublayer(self, x_BxLxD, padding_mask, key_bias, position_bias, deterministic):
        model, mixer_spec = self.model, self.block.mixer
        if isinstance(mixer_spec, AttentionSpec):
            attn = MultiHeadAttention(
                mixer_spec,
                causal=model.causal,
                rotary=model.positions == "rotary",
                init_std=model.init_std,
                dropout_rate=model.attention_dropout_rate,
                dtype=self.dtype,
                name="mixer",
            )
            mixer = lambda h: attn(h, key_bias=key_bias, position_bias=position_bias, deterministic=deterministic)
        elif isinstance(mixer_spec, ConvSpec):
            conv = GLUConvBlock(
                kernel_size=mixer_spec.kernel_size,
                n_heads=mixer_spec.n_heads,
                use_glu=mixer_spec.use_glu,
                causal=model.causal,
                init_std=model.init_std,
                weight_dropout_rate=model.attention_dropout_rate,
                dtype=self.dtype,
                name="mixer",
            )
            mixer = lambda h: conv(h, padding_mask=padding_mask, deterministic=deterministic)
        elif isinstance(mixer_spec, GraphAttentionSpec):
            graph_attn = GraphAttention(mixer_spec, init_std=model.init_std, dtype=self.dtype, name="mixer")
            mixer = lambda h: graph_attn(h, padding_mask=padding_mask, deterministic=deterministic)
        elif isinstance(mixer_spec, ProgramSpec):
            program = ProgramBlock(mixer_spec, init_std=model.init_std, dtype=self.dtype, name="mixer")
            mixer = program
        else:  # a registered mixer kind that this version cannot build
            raise NotImplementedError(f"no module for mixer kind {getattr(mixer_spec, 'kind', mixer_spec)!r}")

        return self._sublayer(x_BxLxD, mixer, self.block.mixer_norm, "mixer_norm", deterministic)

    def _sublayer(self, x_BxLxD, fn, placement, norm_name, deterministic):
        norm = make_norm(self.model.norm, self.model.norm_eps, name=norm_name, dtype=self.dtype)
        drop = lambda h: _dropout(h, self.model.dropout_rate, deterministic)
        if placement == "none":  # whole-layer mixer: its own residuals and norms
            out = fn(x_BxLxD)
        elif placement == "pre":
            out = x_BxLxD + drop(fn(norm(x_BxLxD)))
        elif placement == "post":
            out = norm(x_BxLxD + drop(fn(x_BxLxD)))
        elif placement == "branch":
            out = x_BxLxD + drop(norm(fn(x_BxLxD)))
        else:
            raise ValueError(f"unknown norm placement {placement!r}")
        return nn.with_logical_constraint(out, _X_AXES)


class Stack(nn.Module):
    """The layers ``layer_0 .. layer_{n-1}`` (named ``decoder`` or ``encoder`` by the parent)."""

    model: ModelSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, *, padding_mask, key_bias, position_bias, deterministic):
        for i, block in enumerate(self.model.layers):
            x_BxLxD = Block(block, self.model, dtype=self.dtype, name=f"layer_{i}")(
                x_BxLxD,
                padding_mask=padding_mask,
                key_bias=key_bias,
                position_bias=position_bias,
                deterministic=deterministic,
            )
        return x_BxLxD


class MLMHead(nn.Module):
    """BERT MLM head: dense D -> D, gelu, norm, output projection (tied) + output bias."""

    model: ModelSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, decode):
        m = self.model
        h = make_dense(m.d_model, ("embed", None), name="transform", init_std=m.init_std, dtype=self.dtype)(x_BxLxD)
        h = make_norm(m.norm, m.norm_eps, name="norm", dtype=self.dtype)(jax.nn.gelu(h, approximate=False))
        bias_V = self.param(
            "bias", nn.with_logical_partitioning(initializers.zeros, ("vocab",)), (m.vocab_size,), jnp.float32
        )
        return decode(h).astype(jnp.float32) + bias_V


class Transformer(nn.Module):
    """A whole model built from a :class:`ModelSpec` (see the module docstring).

    Attributes:
      spec: the architecture.
      dtype: activation dtype (e.g. ``jnp.bfloat16``); parameters are always float32
        and softmax, norms and the returned logits are float32.
    """

    spec: ModelSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids=None, padding_mask=None, deterministic=True):
        """Args:
          tokens_BxL: int token ids.
          segment_ids: int [B, L] token types (encoders with type embeddings); None = 0.
          padding_mask: bool [B, L], True at real tokens; None = all real.
          deterministic: disable dropout (needs a ``dropout`` rng when False and rates > 0).

        Returns:
          float32 logits [B, L, V] (heads lm, mlm) or [B, C] (head cls).
        """
        spec = self.spec
        length = tokens_BxL.shape[1]
        embed = _embeddings(spec, self.dtype, name="embed")
        x_BxLxD = embed(tokens_BxL, segment_ids).astype(self.dtype)
        if self.has_variable("perturbations", "embeddings"):
            x_BxLxD = self.perturb("embeddings", x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(_dropout(x_BxLxD, spec.dropout_rate, deterministic), _X_AXES)

        key_bias = None if padding_mask is None else padding_key_bias(padding_mask)
        position_bias = None
        n_heads = max_attention_heads(spec)
        if spec.positions == "relative" and n_heads:
            position_bias = RelativePositionBias(
                n_heads=n_heads,
                num_buckets=spec.relative_buckets,
                max_distance=spec.relative_max_distance,
                bidirectional=not spec.causal,
                init_std=spec.init_std,
                name="relative_bias",
            )(length, length)

        x_BxLxD = Stack(spec, dtype=self.dtype, name=spec.kind)(
            x_BxLxD,
            padding_mask=padding_mask,
            key_bias=key_bias,
            position_bias=position_bias,
            deterministic=deterministic,
        )
        if spec.final_norm:
            x_BxLxD = make_norm(spec.norm, spec.norm_eps, name="final_norm", dtype=self.dtype)(x_BxLxD)

        decode = embed.attend if spec.tie_embeddings else _lm_head(spec, self.dtype, name="lm_head")

        pooled_BxD = None
        if spec.pooler or spec.head == "cls":
            first_BxD = x_BxLxD[:, 0]
            if spec.pooler:
                pooler = make_dense(spec.d_model, ("embed", None), name="pooler", init_std=spec.init_std)
                pooled_BxD = jnp.tanh(pooler(first_BxD.astype(jnp.float32)))
            else:
                pooled_BxD = first_BxD.astype(jnp.float32)
            # BERT's pooled output also feeds NSP; expose it even when the MLM head is used.
            self.sow("intermediates", "pooled", pooled_BxD)

        if spec.head == "lm":
            logits = decode(x_BxLxD).astype(jnp.float32)
        elif spec.head == "mlm":
            logits = MLMHead(spec, dtype=self.dtype, name="mlm_head")(x_BxLxD, decode)
        else:
            pooled_BxD = _dropout(pooled_BxD, spec.dropout_rate, deterministic)
            classifier = make_dense(spec.n_classes, ("embed", None), name="classifier", init_std=spec.init_std)
            return classifier(pooled_BxD).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _embeddings(spec: ModelSpec, dtype, name: str | None = None) -> Embeddings:
    return Embeddings(
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        max_len=spec.max_len,
        positions=spec.positions,
        type_vocab_size=spec.type_vocab_size if spec.kind == "encoder" else 0,
        norm_kind=spec.norm if spec.embed_norm else None,
        norm_eps=spec.norm_eps,
        init_std=spec.init_std,
        dtype=dtype,
        name=name,
    )


def _lm_head(spec: ModelSpec, dtype, name: str | None = None) -> nn.Module:
    return make_dense(
        spec.vocab_size, ("embed", "vocab"), name=name, use_bias=False, init_std=spec.init_std, dtype=dtype
    )


class Segments:
    """The model of a spec cut at its layer boundaries: embedding, each layer, head + loss.

    Each piece is a pure function of its own parameter subtree (the paths of the
    module docstring), and chaining them computes what :class:`Transformer` computes
    for the same parameters. ``train.segmented`` compiles one program per piece instead
    of one per model, so candidates of a search that share pieces (the embedding and
    head always, layers when their blocks are equal) share their compiled programs
    (``nasjax.train.segmented``).

    Only what the pieces need is supported; :meth:`unsupported` names the rest.
    """

    def __init__(self, spec: ModelSpec, dtype: Any = jnp.float32):
        problem = self.unsupported(spec)
        if problem:
            raise ValueError(f"this model cannot be cut into layer pieces: {problem}")
        self.spec, self.dtype = spec, dtype
        self._embed = _embeddings(spec, dtype)
        self._blocks = [Block(b, spec, dtype=dtype) for b in spec.layers]
        self._final_norm = make_norm(spec.norm, spec.norm_eps, dtype=dtype) if spec.final_norm else None
        self._lm_head = None if spec.tie_embeddings else _lm_head(spec, dtype)

    @staticmethod
    def unsupported(spec: ModelSpec) -> str:
        """Why ``spec`` cannot be cut into pieces, or '' if it can."""
        if spec.head != "lm":
            return f"head {spec.head!r} (only the language-model head)"
        if spec.dropout_rate > 0 or spec.attention_dropout_rate > 0:
            return "dropout (the pieces run deterministically)"
        if spec.positions == "relative":
            return "relative position biases (shared by all layers)"
        if spec.pooler:
            return "a pooler"
        return ""

    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    def template_key(self) -> tuple:
        """What the embedding and head pieces depend on: every spec field but the layers."""
        fields = dataclasses.fields(self.spec)
        return tuple((f.name, getattr(self.spec, f.name)) for f in fields if f.name not in ("layers", "name"))

    def layer_key(self, i: int) -> tuple:
        """What layer ``i`` depends on: its block and the model-wide settings it reads."""
        return (self.spec.layers[i], self.template_key())

    def layer_params(self, params, i: int):
        # a layer without parameters (a Primer program of parameter-free ops) has no subtree
        return params.get(self.spec.kind, {}).get(f"layer_{i}", {})

    def head_params(self, params) -> dict:
        """The subtree the head reads (the embedding too when the output is tied to it)."""
        names = ["final_norm"] if self._final_norm is not None else []
        names.append("embed" if self._lm_head is None else "lm_head")
        return {n: params[n] for n in names}

    def param_pieces(self, length: int) -> list[tuple[tuple, tuple[str, ...], Any]]:
        """The model's parameters piece by piece: ``(key, path, init)`` per piece that holds
        parameters, where ``init(rng)`` returns the piece's parameter dict (boxed, as
        ``Module.init`` returns it), to be merged into the tree at ``path``. Together they
        make exactly the tree of ``Transformer.init`` at this ``length``; equal keys make
        equal trees (``nasjax.measure.params`` caches their shapes by key)."""
        tokens = jnp.zeros((1, length), jnp.int32)
        x = jnp.zeros((1, length, self.spec.d_model), self.dtype)
        template = self.template_key()
        pieces = [(("embed", template, length), ("embed",), lambda r: self._embed.init({"params": r}, tokens, None))]
        for i in range(self.n_layers):
            for part in self.sublayer_parts(i):
                block = Block(self.spec.layers[i], self.spec, dtype=self.dtype, part=part)
                init = lambda r, block=block: block.init(  # noqa: E731
                    {"params": r}, x, padding_mask=None, key_bias=None, position_bias=None, deterministic=True
                )
                pieces.append(((*self.sublayer_key(i, part), length), (self.spec.kind, f"layer_{i}"), init))
        if self._final_norm is not None:
            pieces.append((("final_norm", template), ("final_norm",), lambda r: self._final_norm.init(r, x)))
        if self._lm_head is not None:
            pieces.append((("lm_head", template), ("lm_head",), lambda r: self._lm_head.init(r, x)))
        return [(key, path, lambda r, init=init: init(r).get("params", {})) for key, path, init in pieces]

    def embed(self, embed_params, tokens_BxL):
        x_BxLxD = self._embed.apply({"params": embed_params}, tokens_BxL, None).astype(self.dtype)
        return nn.with_logical_constraint(x_BxLxD, _X_AXES)

    def program_block(self, i: int) -> ProgramSpec | None:
        """Layer ``i``'s program when the whole layer is one Primer program block (its
        parameters under ``mixer``, no FFN, no norm), else None."""
        block = self.spec.layers[i]
        if isinstance(block.mixer, ProgramSpec) and block.ffn is None and block.mixer_norm == "none":
            return block.mixer
        return None

    @staticmethod
    def program_params(layer_params):
        """The program block's parameters within its layer's (see :meth:`program_block`)."""
        return layer_params.get("mixer", {})

    @staticmethod
    def program_layer_grads(program_grads) -> dict:
        """Gradients of a program block as its layer's gradient tree."""
        return {"mixer": program_grads} if program_grads else {}

    @staticmethod
    def constrain(x_BxLxD):
        """The sharding constraint :class:`Block` puts on a layer's output."""
        return nn.with_logical_constraint(x_BxLxD, _X_AXES)

    def layer(self, i: int, layer_params, x_BxLxD):
        return self._blocks[i].apply(
            {"params": layer_params}, x_BxLxD, padding_mask=None, key_bias=None, position_bias=None, deterministic=True
        )

    # Sub-layer pieces: a layer cut once more, into its mixer and its FFN sub-layer (each
    # with its norm and residual). Heterogeneous stacks (LTS) repeat sub-layers far more
    # often than whole layers: a layer is (mixer, FFN) and a space of m mixers and f
    # FFN widths has m * f layers but only m + f sub-layers (nasjax.measure.hardware).
    _SUBLAYER_PARAMS = {"mixer": ("mixer", "mixer_norm"), "ffn": ("ffn", "ffn_norm")}

    def sublayer_parts(self, i: int) -> tuple[str, ...]:
        """Layer ``i``'s sub-layers in order: ``("mixer", "ffn")``, or ``("mixer",)`` without an FFN."""
        return ("mixer", "ffn") if self.spec.layers[i].ffn is not None else ("mixer",)

    def sublayer_key(self, i: int, part: str) -> tuple:
        """What sub-layer ``part`` of layer ``i`` depends on: its own spec and placement and
        the model-wide settings (equal keys compute the same function of equal parameters)."""
        block = self.spec.layers[i]
        own = (block.mixer, block.mixer_norm) if part == "mixer" else (block.ffn, block.ffn_norm)
        return (part, *own, self.template_key())

    def sublayer_params(self, layer_params, part: str) -> dict:
        """The parameters sub-layer ``part`` reads, out of its layer's."""
        return {k: layer_params[k] for k in self._SUBLAYER_PARAMS[part] if k in layer_params}

    def sublayer(self, i: int, part: str, sublayer_params, x_BxLxD):
        """Sub-layer ``part`` of layer ``i`` (chaining a layer's parts computes :meth:`layer`)."""
        block = Block(self.spec.layers[i], self.spec, dtype=self.dtype, part=part)
        out = block.apply(
            {"params": sublayer_params},
            x_BxLxD,
            padding_mask=None,
            key_bias=None,
            position_bias=None,
            deterministic=True,
        )
        return out

    def logits(self, head_params, x_BxLxD):
        if self._final_norm is not None:
            x_BxLxD = self._final_norm.apply({"params": head_params["final_norm"]}, x_BxLxD)
        if self._lm_head is None:
            logits = self._embed.apply({"params": head_params["embed"]}, x_BxLxD, method="attend")
        else:
            logits = self._lm_head.apply({"params": head_params["lm_head"]}, x_BxLxD)
        logits = logits.astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _dropout(x, rate: float, deterministic: bool):
    if rate <= 0.0 or deterministic:
        return x
    return Dropout(rate)(x, deterministic=False)


def build(spec: ModelSpec, dtype: Any = jnp.float32) -> Transformer:
    """Returns the (unbound) Flax module of ``spec``; ``dtype`` is the activation dtype."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build() needs a ModelSpec, got {type(spec).__name__}")
    return Transformer(spec, dtype=dtype)
