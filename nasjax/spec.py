"""Model specs: the one currency between search spaces, models, trainers and journals.

A :class:`ModelSpec` is a frozen, hashable dataclass tree that describes a whole
Transformer: encoder or decoder, vocabulary, widths, positions, and one
:class:`BlockSpec` per layer so that layers may differ (per-layer heads and FFN
widths for LTS, per-layer token mixers for AutoBERT-Zero, interpreted programs for
Primer). Every search space decodes its genome into a spec; ``nasjax.models.build``
is the only place that turns a spec into a Flax module.

JSON round trip: ``spec.to_json()`` / ``ModelSpec.from_json(text)``. Parsing is
field by field with errors that name the offending path (``layers[3].mixer.n_heads``);
no ``eval`` and no pickle are involved anywhere.

Mixer kinds are registered in :data:`MIXER_KINDS` by their ``kind`` string, so later
search spaces add a mixer type with :func:`register_mixer` without touching this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import types
import typing
from typing import Any, ClassVar, Union

__all__ = [
    "SpecError",
    "AttentionSpec",
    "ConvSpec",
    "FFNSpec",
    "BlockSpec",
    "ModelSpec",
    "MIXER_KINDS",
    "register_mixer",
    "load_spec",
    "save_spec",
]

ATTENTION_VARIANTS = ("softmax", "abz_l2", "abz_l4", "abz_l6", "abz_l10", "abz_l12")
ACTIVATIONS = ("relu", "squared_relu", "gelu", "gelu_tanh", "swiglu", "geglu", "silu")
NORM_KINDS = ("layernorm", "rmsnorm", "primer_norm")
NORM_PLACEMENTS = ("pre", "post", "branch", "none")
POSITIONS = ("learned", "sinusoidal", "relative", "rotary", "none")
MODEL_KINDS = ("decoder", "encoder")
HEADS = ("lm", "mlm", "cls")


class SpecError(ValueError):
    """A model spec (or its JSON) is malformed; the message names the field."""


def _fail(path: str, msg: str):
    raise SpecError(f"{path or 'spec'}: {msg}")


# --------------------------------------------------------------------------- mixers


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention token mixer.

    Attributes:
      n_heads: number of heads H.
      head_dim: per-head width K; 0 means ``d_model // n_heads``.
      use_bias: biases on the Q/K/V/O projections (BERT, GPT-2) or none (T5, Primer).
      dconv_kernel: >0 turns the layer into Multi-DConv-Head Attention (Primer): a
        causal depthwise conv of this width along the sequence after each of the Q, K
        and V projections, one kernel per (head, channel), no bias, initialised
        0.5 for shift 0 and 0.5/width for the other shifts.
      shared_qk: Primer's shared Q/K representation: ``K = dconv(X W_qk)``,
        ``Q = K W_solo``.
      variant: ``softmax`` (standard scaled dot product) or one of the discovered
        AutoBERT-Zero attentions ``abz_l2/l4/l6/l10/l12`` (methods.md §1(d)); layers 2,
        4, 6 and 8 of AutoBERT-Zero use no V projection, which is then absent.
    """

    kind: ClassVar[str] = "attention"
    n_heads: int = 4
    head_dim: int = 0
    use_bias: bool = False
    dconv_kernel: int = 0
    shared_qk: bool = False
    variant: str = "softmax"

    def validate(self, path: str, d_model: int) -> None:
        _positive(self.n_heads, f"{path}.n_heads")
        _non_negative(self.head_dim, f"{path}.head_dim")
        _non_negative(self.dconv_kernel, f"{path}.dconv_kernel")
        if self.head_dim == 0 and d_model % self.n_heads:
            _fail(f"{path}.n_heads", f"d_model={d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        _choice(self.variant, ATTENTION_VARIANTS, f"{path}.variant")
        if self.variant != "softmax" and (self.shared_qk or self.dconv_kernel):
            _fail(f"{path}.variant", f"{self.variant!r} cannot be combined with shared_qk or dconv_kernel")

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    @property
    def uses_value(self) -> bool:
        """Whether the attention graph reads V (else W_V is absent)."""
        return self.variant not in ("abz_l2", "abz_l4", "abz_l6")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """GLU light-conv token mixer (AutoBERT-Zero conv layer, methods.md §1(d)).

    ``Linear(d->2d) -> GLU -> zero padded positions -> lightweight conv (n_heads
    groups of d/n_heads channels, one k-tap kernel per group) -> Linear(d->d)``.
    The conv is 'same' (centred) in encoders and causal in decoders.
    """

    kind: ClassVar[str] = "glu_conv"
    kernel_size: int = 7
    n_heads: int = 4
    use_glu: bool = True

    def validate(self, path: str, d_model: int) -> None:
        _positive(self.kernel_size, f"{path}.kernel_size")
        _positive(self.n_heads, f"{path}.n_heads")
        if d_model % self.n_heads:
            _fail(f"{path}.n_heads", f"d_model={d_model} is not divisible by n_heads={self.n_heads}")


MIXER_KINDS: dict[str, type] = {"attention": AttentionSpec, "glu_conv": ConvSpec}
# Kinds defined outside this file, imported on first use so JSON specs parse without
# the caller importing the genome package first.
_LAZY_MIXER_MODULES = {"program": "nasjax.genome.program", "attention_graph": "nasjax.genome.attn_graph"}


def register_mixer(cls: type) -> type:
    """Registers a mixer spec dataclass (needs a ClassVar ``kind`` and ``validate``)."""
    MIXER_KINDS[cls.kind] = cls
    return cls


# --------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """Position-wise feed-forward sub-layer.

    Attributes:
      d_ff: inner width F.
      activation: relu, squared_relu (Primer), gelu, gelu_tanh (GPT-2), silu, or the
        gated swiglu / geglu (three matrices: gate, up, down).
      use_bias: biases on the FFN projections.
    """

    d_ff: int = 256
    activation: str = "relu"
    use_bias: bool = True

    def validate(self, path: str) -> None:
        _positive(self.d_ff, f"{path}.d_ff")
        _choice(self.activation, ACTIVATIONS, f"{path}.activation")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One layer: token mixer then FFN, each with a residual and a norm placement.

    Norm placements per sub-layer: ``none`` is F(x) (whole-layer mixers, which hold
    their own residuals and norms); ``pre`` is x + F(N(x)); ``post`` is N(x + F(x))
    (BERT); ``branch`` is x + N(F(x)) (Primer's odd sub-layers).
    """

    mixer: Any = dataclasses.field(default_factory=AttentionSpec)
    ffn: FFNSpec | None = dataclasses.field(default_factory=FFNSpec)
    mixer_norm: str = "pre"
    ffn_norm: str = "pre"

    def validate(self, path: str, d_model: int) -> None:
        if type(self.mixer) not in MIXER_KINDS.values():
            _fail(f"{path}.mixer", f"unknown mixer type {type(self.mixer).__name__}")
        self.mixer.validate(f"{path}.mixer", d_model)
        if getattr(self.mixer, "whole_layer", False):
            # the mixer is the whole layer (a Primer program with its own residuals and norms)
            if self.ffn is not None:
                _fail(f"{path}.ffn", f"a {self.mixer.kind!r} mixer is a whole layer; ffn must be null")
            if self.mixer_norm != "none":
                _fail(f"{path}.mixer_norm", f"a {self.mixer.kind!r} mixer is a whole layer; use 'none'")
        elif self.mixer_norm == "none":
            _fail(f"{path}.mixer_norm", "'none' is only for whole-layer mixers (programs)")
        if self.ffn is not None and self.ffn_norm == "none":
            _fail(f"{path}.ffn_norm", "'none' is only for whole-layer mixers (programs)")
        if self.ffn is not None:
            self.ffn.validate(f"{path}.ffn")
        _choice(self.mixer_norm, NORM_PLACEMENTS, f"{path}.mixer_norm")
        _choice(self.ffn_norm, NORM_PLACEMENTS, f"{path}.ffn_norm")


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A whole Transformer.

    Attributes:
      kind: ``decoder`` (causal LM) or ``encoder`` (bidirectional).
      vocab_size: V.
      d_model: D.
      layers: one BlockSpec per layer.
      max_len: longest sequence (table size for learned positions).
      positions: learned | sinusoidal | relative (T5 bias, shared by all layers) |
        rotary | none.
      norm: layernorm | rmsnorm | primer_norm.
      norm_eps: epsilon of every norm.
      final_norm: a norm after the stack (pre-norm models).
      embed_norm: a norm on the embedding output (BERT).
      type_vocab_size: token-type (segment) embeddings; 0 for none.
      tie_embeddings: output projection shares the token embedding.
      head: lm (next token), mlm (BERT MLM head), cls (pooled classifier).
      n_classes: classes of the ``cls`` head.
      pooler: BERT pooler (dense + tanh on the first token) before the classifier.
      dropout_rate / attention_dropout_rate: 0 by default (Primer's proxy uses none).
      init_std: std of the normal initialiser of dense and embedding weights.
      relative_buckets / relative_max_distance: T5 relative position bias.
      name: a label (zoo name); not part of the architecture hash.
    """

    kind: str = "decoder"
    vocab_size: int = 256
    d_model: int = 64
    layers: tuple[BlockSpec, ...] = (BlockSpec(),)
    max_len: int = 512
    positions: str = "learned"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    final_norm: bool = True
    embed_norm: bool = False
    type_vocab_size: int = 0
    tie_embeddings: bool = True
    head: str = "lm"
    n_classes: int = 0
    pooler: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02
    relative_buckets: int = 32
    relative_max_distance: int = 128
    name: str = ""

    def __post_init__(self):
        if isinstance(self.layers, list):  # keep the spec hashable
            object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        _choice(self.kind, MODEL_KINDS, "kind")
        _positive(self.vocab_size, "vocab_size")
        _positive(self.d_model, "d_model")
        _positive(self.max_len, "max_len")
        if not self.layers:
            _fail("layers", "needs at least one layer")
        for i, block in enumerate(self.layers):
            if not isinstance(block, BlockSpec):
                _fail(f"layers[{i}]", f"expected BlockSpec, got {type(block).__name__}")
            block.validate(f"layers[{i}]", self.d_model)
        _choice(self.positions, POSITIONS, "positions")
        _choice(self.norm, NORM_KINDS, "norm")
        _choice(self.head, HEADS, "head")
        if self.kind == "decoder" and self.head != "lm":
            _fail("head", f"a decoder has an 'lm' head, got {self.head!r}")
        if self.kind == "encoder" and self.head == "lm":
            _fail("head", "an encoder has an 'mlm' or 'cls' head, not 'lm'")
        if self.head == "cls" and self.n_classes < 2:
            _fail("n_classes", f"a 'cls' head needs n_classes >= 2, got {self.n_classes}")
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail("dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        if not 0.0 <= self.attention_dropout_rate < 1.0:
            _fail("attention_dropout_rate", f"must be in [0, 1), got {self.attention_dropout_rate}")
        _non_negative(self.type_vocab_size, "type_vocab_size")
        if self.norm_eps <= 0:
            _fail("norm_eps", "must be positive")
        for i, block in enumerate(self.layers):
            supported = getattr(block.mixer, "supported_positions", None)
            if supported is not None and self.positions not in supported:
                _fail(
                    "positions",
                    f"layers[{i}] is a {block.mixer.kind!r} mixer, which supports positions "
                    f"{', '.join(supported)}; got {self.positions!r}",
                )
            if getattr(block.mixer, "encoder_only", False) and self.kind != "encoder":
                _fail(f"layers[{i}].mixer", f"a {block.mixer.kind!r} mixer is bidirectional; use kind='encoder'")
        if self.positions == "rotary":
            for i, block in enumerate(self.layers):
                m = block.mixer
                if isinstance(m, AttentionSpec) and m.resolved_head_dim(self.d_model) % 2:
                    _fail(f"layers[{i}].mixer.head_dim", "rotary positions need an even head_dim")

    # ------------------------------------------------------------------ helpers
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is None)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        spec = _from_dict(cls, data, "")
        return spec

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None

    def architecture_hash(self) -> str:
        """Canonical hash of the architecture (ignores ``name``)."""
        d = self.to_dict()
        d.pop("name", None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_spec(path: str) -> ModelSpec:
    """Reads and validates a spec JSON file (clear error if missing or malformed)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read model spec {path!r}: {e.strerror}") from None
    return ModelSpec.from_json(text, source=path)


def save_spec(spec: ModelSpec, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(spec.to_json() + "\n")


# --------------------------------------------------------------------------- (de)serialisation


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        kind = getattr(type(obj), "kind", None)
        if isinstance(kind, str):
            out["kind"] = kind
        for f in dataclasses.fields(obj):
            out[f.name] = _to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (tuple, list)):
        return [_to_dict(x) for x in obj]
    return obj


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        _fail(path, f"expected an object for {cls.__name__}, got {type(data).__name__}")
    data = dict(data)
    class_kind = getattr(cls, "kind", None)
    if isinstance(class_kind, str) and not any(f.name == "kind" for f in dataclasses.fields(cls)):
        got = data.pop("kind", class_kind)
        if got != class_kind:
            _fail(f"{path}.kind" if path else "kind", f"expected {class_kind!r}, got {got!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        _fail(f"{where}{unknown[0]}", f"unknown field for {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, sub, name)
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except TypeError as e:
        _fail(path, str(e))


def _coerce(hint: Any, value: Any, path: str, name: str) -> Any:
    if name == "mixer":
        return _parse_mixer(value, path)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, name)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            _fail(path, f"expected a list, got {type(value).__name__}")
        return tuple(_coerce(item, v, f"{path}[{i}]", "") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    return value


def _parse_mixer(value: Any, path: str):
    if not isinstance(value, dict):
        _fail(path, f"expected an object with a 'kind', got {type(value).__name__}")
    kind = value.get("kind")
    if kind not in MIXER_KINDS and kind in _LAZY_MIXER_MODULES:
        importlib.import_module(_LAZY_MIXER_MODULES[kind])
    if kind not in MIXER_KINDS:
        _fail(f"{path}.kind", f"unknown mixer kind {kind!r} (known: {', '.join(sorted(MIXER_KINDS))})")
    return _from_dict(MIXER_KINDS[kind], value, path)


def _positive(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(path, f"expected a positive integer, got {v!r}")


def _non_negative(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _fail(path, f"expected a non-negative integer, got {v!r}")


def _choice(v: Any, choices: tuple, path: str) -> None:
    if v not in choices:
        _fail(path, f"expected one of {', '.join(choices)}; got {v!r}")
