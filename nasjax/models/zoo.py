"""Named model specs: the baselines and discovered architectures of the four papers.

=============== ====================================================================
name            architecture
=============== ====================================================================
vanilla         T2T-style decoder: pre-LN LayerNorm, ReLU FFN (bias), attention
                without bias, T5 relative bias, tied embeddings, final norm
transformer_pp  vanilla + SwiGLU + RMSNorm (Primer's "Transformer++" baseline)
primer_ez       vanilla + squared ReLU + MDHA (dconv width 3)
primer          primer_ez + shared QK + attention 'pre' / FFN 'branch' norms +
                Primer norm + final norm
gpt2            GPT-2: pre-LN (eps 1e-5), biased attention, gelu_tanh FFN, learned
                positions, tied embeddings, final LN; per-layer heads / FFN widths
bert            BERT: post-LN encoder (eps 1e-12), GELU FFN, learned positions,
                token types, embedding LN, MLM head, pooler
autobert_zero   AutoBERT-Zero: 12 layers alternating GLU light-conv (kernels
                65, 9, 3, 7, 7, 3) and the discovered attentions abz_l2, l4, l6, l6,
                l10, l12; otherwise BERT settings
=============== ====================================================================

Sizes: ``tiny`` (64 wide, 2 layers, 4 heads, FFN 256), ``small`` (512, 6, 8, 2048;
Primer's LM1B search size), ``base`` (768, 12, 12, 3072). AutoBERT-Zero keeps its
12-layer layout at every size. At ``base`` the vocabulary and position table are the
papers' (BERT 30522 / 512 / 2 types, GPT-2 50257 / 1024, T5 family 32128); ``tiny``
and ``small`` use a byte-level vocabulary of 256.
"""

from __future__ import annotations

from collections.abc import Sequence

from nasjax.spec import AttentionSpec, BlockSpec, ConvSpec, FFNSpec, ModelSpec, SpecError

__all__ = ["ZOO_NAMES", "SIZES", "get_spec", "AUTOBERT_ZERO_LAYOUT"]

SIZES = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
    "small": {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 2048},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
}
ZOO_NAMES = ("vanilla", "transformer_pp", "primer_ez", "primer", "gpt2", "bert", "autobert_zero")

BYTE_VOCAB = 256
_BASE_VOCAB = {"gpt2": 50257, "bert": 30522, "autobert_zero": 30522}
_T5_VOCAB = 32128
_BASE_MAX_LEN = {"gpt2": 1024}
_DEFAULT_MAX_LEN = 512

# (mixer kind, conv kernel or attention variant) for layers 1..12 (methods.md §1(d)).
AUTOBERT_ZERO_LAYOUT = (
    ("conv", 65),
    ("attn", "abz_l2"),
    ("conv", 9),
    ("attn", "abz_l4"),
    ("conv", 3),
    ("attn", "abz_l6"),
    ("conv", 7),
    ("attn", "abz_l6"),  # layer 8 repeats layer 6's graph with its own weights
    ("conv", 7),
    ("attn", "abz_l10"),
    ("conv", 3),
    ("attn", "abz_l12"),
)


def _t5_family(name: str, heads: Sequence[int], ffs: Sequence[int]) -> dict:
    primer_like = name in ("primer_ez", "primer")
    activation = {"vanilla": "relu", "transformer_pp": "swiglu"}.get(name, "squared_relu")
    layers = tuple(
        BlockSpec(
            mixer=AttentionSpec(
                n_heads=h, use_bias=False, dconv_kernel=3 if primer_like else 0, shared_qk=name == "primer"
            ),
            ffn=FFNSpec(d_ff=f, activation=activation, use_bias=True),
            mixer_norm="pre",
            ffn_norm="branch" if name == "primer" else "pre",
        )
        for h, f in zip(heads, ffs)
    )
    norm = {"transformer_pp": "rmsnorm", "primer": "primer_norm"}.get(name, "layernorm")
    return dict(
        kind="decoder",
        layers=layers,
        positions="relative",
        norm=norm,
        norm_eps=1e-6,
        final_norm=True,
        tie_embeddings=True,
        head="lm",
    )


def _gpt2(heads: Sequence[int], ffs: Sequence[int]) -> dict:
    layers = tuple(
        BlockSpec(AttentionSpec(n_heads=h, use_bias=True), FFNSpec(d_ff=f, activation="gelu_tanh", use_bias=True))
        for h, f in zip(heads, ffs)
    )
    return dict(
        kind="decoder",
        layers=layers,
        positions="learned",
        norm="layernorm",
        norm_eps=1e-5,
        final_norm=True,
        tie_embeddings=True,
        head="lm",
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )


def _bert_model(layers: tuple[BlockSpec, ...]) -> dict:
    return dict(
        kind="encoder",
        layers=layers,
        positions="learned",
        norm="layernorm",
        norm_eps=1e-12,
        final_norm=False,
        embed_norm=True,
        type_vocab_size=2,
        tie_embeddings=True,
        head="mlm",
        pooler=True,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )


def _bert(heads: Sequence[int], ffs: Sequence[int]) -> dict:
    layers = tuple(
        BlockSpec(
            AttentionSpec(n_heads=h, use_bias=True),
            FFNSpec(d_ff=f, activation="gelu", use_bias=True),
            mixer_norm="post",
            ffn_norm="post",
        )
        for h, f in zip(heads, ffs)
    )
    return _bert_model(layers)


def _autobert_zero(heads: Sequence[int], ffs: Sequence[int]) -> dict:
    layers = []
    for i, (h, f) in enumerate(zip(heads, ffs)):
        kind, arg = AUTOBERT_ZERO_LAYOUT[i % len(AUTOBERT_ZERO_LAYOUT)]
        mixer = ConvSpec(kernel_size=arg, n_heads=h) if kind == "conv" else AttentionSpec(h, use_bias=True, variant=arg)
        ffn = FFNSpec(d_ff=f, activation="gelu", use_bias=True)
        layers.append(BlockSpec(mixer, ffn, mixer_norm="post", ffn_norm="post"))
    return _bert_model(tuple(layers))


def _per_layer(value, n_layers: int | None, what: str) -> list[int] | None:
    if value is None or isinstance(value, int):
        return None if value is None else [value] * (n_layers or 1)
    value = list(value)
    if n_layers is not None and len(value) != n_layers:
        raise SpecError(f"{what}: got {len(value)} per-layer values for n_layers={n_layers}")
    return value


def get_spec(
    name: str,
    size: str = "tiny",
    *,
    vocab_size: int | None = None,
    max_len: int | None = None,
    d_model: int | None = None,
    n_layers: int | None = None,
    n_heads: int | Sequence[int] | None = None,
    d_ff: int | None = None,
    d_inners: Sequence[int] | None = None,
    **fields,
) -> ModelSpec:
    """Returns the zoo spec ``name`` at ``size`` with overrides.

    Args:
      name: one of :data:`ZOO_NAMES`.
      size: ``tiny``, ``small`` or ``base`` (:data:`SIZES`).
      vocab_size, max_len: replace the size's defaults (None keeps them).
      d_model, n_layers, d_ff: replace the size's widths and depth.
      n_heads: an int for every layer, or one value per layer (heterogeneous, LTS).
      d_inners: FFN width per layer (heterogeneous).
      **fields: any other :class:`ModelSpec` field (``dropout_rate=0.0``, ...).

    Raises:
      SpecError: unknown name, size or field, or inconsistent per-layer lists.
    """
    if name not in ZOO_NAMES:
        raise SpecError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_NAMES)}")
    if size not in SIZES:
        raise SpecError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    dims = SIZES[size]
    if n_layers is None:
        for per_layer in (n_heads, d_inners):
            if per_layer is not None and not isinstance(per_layer, int):
                n_layers = len(per_layer)
                break
    if n_layers is None:
        n_layers = len(AUTOBERT_ZERO_LAYOUT) if name == "autobert_zero" else dims["n_layers"]
    heads = _per_layer(dims["n_heads"] if n_heads is None else n_heads, n_layers, "n_heads")
    ffs = _per_layer(d_inners if d_inners is not None else (d_ff or dims["d_ff"]), n_layers, "d_inners")

    builders = {"gpt2": _gpt2, "bert": _bert, "autobert_zero": _autobert_zero}
    builder = builders.get(name, lambda h, f: _t5_family(name, h, f))
    kwargs = builder(heads, ffs)

    if size == "base":
        default_vocab = _BASE_VOCAB.get(name, _T5_VOCAB)
        default_max_len = _BASE_MAX_LEN.get(name, _DEFAULT_MAX_LEN)
    else:
        default_vocab, default_max_len = BYTE_VOCAB, _DEFAULT_MAX_LEN
    known = {f for f in ModelSpec.__dataclass_fields__}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SpecError(f"get_spec({name!r}): unknown override {unknown[0]!r}")
    if "layers" in fields:
        raise SpecError(f"get_spec({name!r}): pass n_heads / d_inners / n_layers instead of layers")
    kwargs.update(
        d_model=d_model or dims["d_model"],
        vocab_size=vocab_size or default_vocab,
        max_len=max_len or default_max_len,
        name=f"{name}-{size}",
    )
    kwargs.update(fields)
    return ModelSpec(**kwargs)
