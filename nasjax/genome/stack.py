"""LiteTransformerSearch (LTS) search space: heterogeneous GPT-2 stacks (methods.md §3(a)).

A :class:`StackGenome` is LTS's gene ``[n_layer, d_model, d_inner_1..d_inner_Lmax,
n_head_1..n_head_Lmax]``: a global depth and width plus one FFN width and one head
count per layer. Per-layer entries beyond ``n_layer`` are kept (a later mutation that
deepens the stack re-activates them, as in archai) but ignored by everything else: the
identity / dedup key (:meth:`StackGenome.key`), the validity check, the parameter count
and the decoded spec use only the first ``n_layer`` layers. Layers are numbered from 0.

A :class:`StackSpace` holds the choices of every gene and the constraints of
methods.md §3(b):

* every active ``d_inner_l > d_inner_ratio * d_model`` (1.7 in the paper);
* every active ``n_head_l`` divides ``d_model`` (head dim = d_model / n_head);
* ``min_params <= P(a) <= max_params`` where ``P`` is the analytic decoder
  (non-embedding) parameter count of archai's formula
  (:func:`nasjax.measure.params.gpt2_non_embedding_params`); 0 means no bound.

Sampling, mutation and crossover follow archai's ``Evolution`` (``neurips-lts``): genes
resampled independently with ``mutation_prob`` (d_inner only among values above
``ratio * d_model``), crossover takes each gene from parent A with ``crossover_prob``;
children are redrawn until valid, for a bounded number of attempts.

Choices (documented; the paper does not pin them):

* Adaptive input / softmax (``div_val``) and a separate ``d_embed`` are not part of
  nasjax's model spec, so ``div_val`` is fixed at 1 and ``d_embed = d_model``
  (UNCONFIRMED against the paper's runs, which used div_val 4; it changes only the
  embedding parameters, not the decoder parameters that LTS uses as its proxy).
* Head counts are drawn among the choices that divide ``d_model`` (as d_inner is drawn
  among the choices above the ratio), so no draw is wasted on an impossible head dim.
* A mutation also redraws any inactive or active ``d_inner`` / ``n_head`` entry that the
  (possibly new) ``d_model`` makes invalid, so every entry stays usable when a later
  mutation deepens the stack.

All randomness comes from the ``numpy.random.Generator`` the caller passes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from nasjax.measure.params import gpt2_non_embedding_params
from nasjax.spec import ModelSpec, SpecError

__all__ = [
    "SIZE_PRESETS",
    "StackGenome",
    "StackSpace",
    "baseline_genomes",
]

# Plain dicts a config section can copy (``StackSpace(**SIZE_PRESETS["cpu"])``).
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    # methods.md §3(a): the paper's GPT-2 search runs (run_search.sh) and constraints (§3(b)).
    "gpt2": {
        "n_layer": tuple(range(2, 16)),
        "d_model": tuple(range(128, 1024, 64)),
        "d_inner": tuple(range(128, 4096, 64)),
        "n_head": (2, 4, 8),
        "d_inner_ratio": 1.7,
        "min_params": 6_000_000,
        "max_params": 100_000_000,
    },
    # methods.md §3(e) CPU-scale check: n_layer 2-6, d_model 64-256, d_inner 128-1024.
    # Every d_model is divisible by 8, so every head count is usable.
    "cpu": {
        "n_layer": (2, 3, 4, 5, 6),
        "d_model": (64, 96, 128, 160, 192, 256),
        "d_inner": tuple(range(128, 1088, 64)),
        "n_head": (2, 4, 8),
        "d_inner_ratio": 1.7,
        "min_params": 0,
        "max_params": 0,
    },
}

_CHOICE_FIELDS = ("n_layer", "d_model", "d_inner", "n_head")
_CONFIG_KEYS = _CHOICE_FIELDS + ("d_inner_ratio", "min_params", "max_params")
_GENOME_FIELDS = ("n_layer", "d_model", "d_inner", "n_head")


def _fail(path: str, msg: str):
    raise SpecError(f"{path}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


# --------------------------------------------------------------------------- genome


def _genome_values(n_layer: Any, d_model: Any, d_inner: Any, n_head: Any, path: str) -> dict:
    """Validates the structure of a genome; returns normalised values (python ints, tuples)."""
    out: dict[str, Any] = {}
    for name, v in (("n_layer", n_layer), ("d_model", d_model)):
        if not _is_int(v) or v < 1:
            _fail(f"{path}.{name}", f"expected a positive integer, got {v!r}")
        out[name] = int(v)
    for name, v in (("d_inner", d_inner), ("n_head", n_head)):
        if not isinstance(v, (list, tuple, np.ndarray)) or len(v) == 0:
            _fail(f"{path}.{name}", f"expected a non-empty list of positive integers, got {v!r}")
        for i, x in enumerate(v):
            if not _is_int(x) or x < 1:
                _fail(f"{path}.{name}[{i}]", f"expected a positive integer, got {x!r}")
        out[name] = tuple(int(x) for x in v)
    if len(out["n_head"]) != len(out["d_inner"]):
        _fail(f"{path}.n_head", f"has {len(out['n_head'])} entries but d_inner has {len(out['d_inner'])}")
    if out["n_layer"] > len(out["d_inner"]):
        _fail(f"{path}.n_layer", f"{out['n_layer']} layers but only {len(out['d_inner'])} per-layer entries")
    return out


@dataclasses.dataclass(frozen=True)
class StackGenome:
    """One LTS architecture gene.

    Attributes:
      n_layer: active depth.
      d_model: model width (all layers).
      d_inner: FFN width per layer, ``space.max_layers`` entries; only the first
        ``n_layer`` are active.
      n_head: attention heads per layer, same length as ``d_inner``.
    """

    n_layer: int
    d_model: int
    d_inner: tuple[int, ...]
    n_head: tuple[int, ...]

    def __post_init__(self):
        values = _genome_values(self.n_layer, self.d_model, self.d_inner, self.n_head, "genome")
        for name, v in values.items():
            object.__setattr__(self, name, v)

    @property
    def max_layers(self) -> int:
        """Number of per-layer entries (active and inactive)."""
        return len(self.d_inner)

    def active(self) -> tuple:
        """``(n_layer, d_model, d_inner[:n_layer], n_head[:n_layer])``: the architecture."""
        n = self.n_layer
        return (n, self.d_model, self.d_inner[:n], self.n_head[:n])

    def key(self) -> str:
        """Stable hash (16 hex digits) of :meth:`active`; inactive entries do not count."""
        n, d, inner, heads = self.active()
        blob = json.dumps([n, d, list(inner), list(heads)], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Short human-readable form of the active architecture."""
        n, d, inner, heads = self.active()
        return f"L{n} d{d} d_inner{list(inner)} n_head{list(heads)}"

    def to_dict(self) -> dict:
        return {
            "n_layer": self.n_layer,
            "d_model": self.d_model,
            "d_inner": list(self.d_inner),
            "n_head": list(self.n_head),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any, path: str = "genome") -> StackGenome:
        """Parses a genome; :class:`SpecError` names the offending path (``genome.d_inner[3]``)."""
        if not isinstance(data, dict):
            _fail(path, f"expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_GENOME_FIELDS))
        if unknown:
            _fail(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(_GENOME_FIELDS)})")
        for name in _GENOME_FIELDS:
            if name not in data:
                _fail(f"{path}.{name}", "missing")
        values = _genome_values(data["n_layer"], data["d_model"], data["d_inner"], data["n_head"], path)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, source: str = "genome") -> StackGenome:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON: {e}") from None
        return cls.from_dict(data, source)


# --------------------------------------------------------------------------- space


def _get(cfg: Any, key: str, default: Any) -> Any:
    if hasattr(cfg, "keys") and hasattr(cfg, "__getitem__"):
        return cfg[key] if key in cfg else default
    return getattr(cfg, key, default)


def _space_values(raw: dict, path: str) -> dict:
    """Validates a space's fields; errors name ``{path}.{key}``. Returns normalised values."""
    out: dict[str, Any] = {}
    for name in _CHOICE_FIELDS:
        v = raw[name]
        if (
            isinstance(v, (str, bytes))
            or not isinstance(v, (list, tuple, range, np.ndarray))
            or len(v) == 0
            or not all(_is_int(x) and x >= 1 for x in v)
        ):
            _fail(f"{path}.{name}", f"expected a non-empty list of positive integers, got {v!r}")
        out[name] = tuple(sorted({int(x) for x in v}))
    ratio = raw["d_inner_ratio"]
    if not _is_number(ratio) or not math.isfinite(ratio) or ratio < 0:
        _fail(f"{path}.d_inner_ratio", f"expected a non-negative number, got {ratio!r}")
    out["d_inner_ratio"] = float(ratio)
    for name in ("min_params", "max_params"):
        v = raw[name]
        if not _is_int(v) or v < 0:
            _fail(f"{path}.{name}", f"expected a non-negative integer (0 = no bound), got {v!r}")
        out[name] = int(v)
    if out["max_params"] and out["min_params"] > out["max_params"]:
        _fail(f"{path}.min_params", f"{out['min_params']:,} > max_params {out['max_params']:,}")

    # Feasibility, so that a hopeless space fails at config time rather than in sample().
    num, den = _ratio_fraction(out["d_inner_ratio"])
    usable = []  # (d_model, smallest valid d_inner, largest valid d_inner, a valid head)
    for d in out["d_model"]:
        inner = [f for f in out["d_inner"] if f * den > num * d]
        heads = [h for h in out["n_head"] if d % h == 0]
        if inner and heads:
            usable.append((d, inner[0], inner[-1], heads[0]))
    if not usable:
        if not any(f * den > num * d for d in out["d_model"] for f in out["d_inner"]):
            _fail(
                f"{path}.d_inner",
                f"no choice exceeds d_inner_ratio {out['d_inner_ratio']} x d_model for any d_model choice",
            )
        _fail(f"{path}.n_head", "no d_model choice has both a valid d_inner and a head count that divides it")
    n_lo, n_hi = out["n_layer"][0], out["n_layer"][-1]
    lo = min(gpt2_non_embedding_params(d, [h] * n_lo, [f_lo] * n_lo) for d, f_lo, _, h in usable)
    hi = max(gpt2_non_embedding_params(d, [h] * n_hi, [f_hi] * n_hi) for d, _, f_hi, h in usable)
    if out["min_params"] > hi:
        _fail(f"{path}.min_params", f"{out['min_params']:,} exceeds the largest decoder in the space ({hi:,} params)")
    if out["max_params"] and out["max_params"] < lo:
        _fail(f"{path}.max_params", f"{out['max_params']:,} is below the smallest decoder in the space ({lo:,} params)")
    return out


def _ratio_fraction(ratio: float) -> tuple[int, int]:
    """``ratio`` as an exact fraction of its decimal form (1.7 -> 17/10), for exact comparisons."""
    frac = Fraction(repr(float(ratio)))
    return frac.numerator, frac.denominator


@dataclasses.dataclass(frozen=True)
class StackSpace:
    """Choices and constraints of the LTS heterogeneous GPT-2 space.

    Attributes:
      n_layer, d_model, d_inner, n_head: the choices of each gene (stored sorted and
        deduplicated); ``d_inner`` and ``n_head`` are per layer.
      d_inner_ratio: a genome is valid only if every active ``d_inner > ratio * d_model``.
      min_params, max_params: bounds on the analytic decoder (non-embedding) parameter
        count; 0 means no bound.
    """

    n_layer: tuple[int, ...]
    d_model: tuple[int, ...]
    d_inner: tuple[int, ...]
    n_head: tuple[int, ...]
    d_inner_ratio: float = 1.7
    min_params: int = 0
    max_params: int = 0

    def __post_init__(self):
        values = _space_values({k: getattr(self, k) for k in _CONFIG_KEYS}, "space")
        for name, v in values.items():
            object.__setattr__(self, name, v)
        num, den = _ratio_fraction(self.d_inner_ratio)
        object.__setattr__(self, "_ratio", (num, den))
        # per d_model: the d_inner choices above the ratio and the head choices dividing it
        inner_ok = {d: tuple(f for f in self.d_inner if f * den > num * d) for d in self.d_model}
        heads_ok = {d: tuple(h for h in self.n_head if d % h == 0) for d in self.d_model}
        object.__setattr__(self, "_inner_ok", inner_ok)
        object.__setattr__(self, "_heads_ok", heads_ok)

    # ------------------------------------------------------------------ construction
    @property
    def max_layers(self) -> int:
        """Length of every genome's per-layer lists (the largest n_layer choice)."""
        return self.n_layer[-1]

    @classmethod
    def from_config(cls, cfg: Any, path: str = "lts.space") -> StackSpace:
        """Builds a space from a config section (``ConfigDict``, mapping or attribute object).

        Keys: ``n_layer``, ``d_model``, ``d_inner``, ``n_head`` (required lists of positive
        integers), ``d_inner_ratio`` (default 1.7), ``min_params`` and ``max_params``
        (default 0 = no bound). Unknown keys and invalid values raise :class:`SpecError`
        naming ``{path}.{key}``.
        """
        if cfg is None:
            _fail(path, "missing")
        if hasattr(cfg, "keys"):
            unknown = sorted(str(k) for k in cfg.keys() if k not in _CONFIG_KEYS)
            if unknown:
                _fail(f"{path}.{unknown[0]}", f"unknown key (known: {', '.join(_CONFIG_KEYS)})")
        missing = object()
        defaults = {"d_inner_ratio": 1.7, "min_params": 0, "max_params": 0}
        raw = {}
        for key in _CONFIG_KEYS:
            v = _get(cfg, key, defaults.get(key, missing))
            if v is missing:
                _fail(f"{path}.{key}", "missing (expected a non-empty list of positive integers)")
            raw[key] = v
        return cls(**_space_values(raw, path))

    @classmethod
    def from_preset(cls, name: str) -> StackSpace:
        """The space of :data:`SIZE_PRESETS` ``name`` (``gpt2`` or ``cpu``)."""
        if name not in SIZE_PRESETS:
            raise SpecError(f"unknown LTS space preset {name!r}; known: {', '.join(SIZE_PRESETS)}")
        return cls(**SIZE_PRESETS[name])

    def to_dict(self) -> dict:
        """Plain dict of the space (the ``from_config`` keys)."""
        return {k: list(getattr(self, k)) if k in _CHOICE_FIELDS else getattr(self, k) for k in _CONFIG_KEYS}

    # ------------------------------------------------------------------ constraints
    def decoder_params(self, g: StackGenome) -> int:
        """Analytic decoder (non-embedding) parameters of the active layers (archai's formula)."""
        n = g.n_layer
        return gpt2_non_embedding_params(g.d_model, g.n_head[:n], g.d_inner[:n])

    def _ratio_ok(self, d_inner: int, d_model: int) -> bool:
        num, den = self._ratio
        return d_inner * den > num * d_model

    def _violation(self, g: StackGenome) -> tuple[str, str] | None:
        """``(constraint, reason)`` of the first violated constraint, or None."""
        if not isinstance(g, StackGenome):
            return "type", f"expected a StackGenome, got {type(g).__name__}"
        if g.max_layers != self.max_layers:
            return "max_layers", f"genome has {g.max_layers} per-layer entries; the space needs {self.max_layers}"
        if g.n_layer not in self.n_layer:
            return "n_layer", f"n_layer {g.n_layer} not in choices {self.n_layer}"
        if g.d_model not in self.d_model:
            return "d_model", f"d_model {g.d_model} not in choices {self.d_model}"
        for layer in range(g.n_layer):
            f, h = g.d_inner[layer], g.n_head[layer]
            if f not in self.d_inner:
                return "d_inner", f"layer {layer}: d_inner {f} not in choices"
            if h not in self.n_head:
                return "n_head", f"layer {layer}: n_head {h} not in choices {self.n_head}"
            if g.d_model % h:
                return "n_head divides d_model", f"layer {layer}: n_head {h} does not divide d_model {g.d_model}"
            if not self._ratio_ok(f, g.d_model):
                return "d_inner_ratio", (f"layer {layer}: d_inner {f} <= {self.d_inner_ratio:g} x d_model {g.d_model}")
        if self.min_params or self.max_params:
            p = self.decoder_params(g)
            if p < self.min_params:
                return "min_params", f"decoder params {p:,} < min_params {self.min_params:,}"
            if self.max_params and p > self.max_params:
                return "max_params", f"decoder params {p:,} > max_params {self.max_params:,}"
        return None

    def check(self, g: StackGenome) -> str | None:
        """None if ``g`` is a valid member of the space, else the first reason it is not.

        Only the active layers are checked (inactive entries are ignored), e.g.
        ``"layer 2: d_inner 256 <= 1.7 x d_model 192"``,
        ``"decoder params 1,234 < min_params 5,000"``,
        ``"layer 0: n_head 8 does not divide d_model 100"``,
        ``"d_model 100 not in choices (...)"``.
        """
        v = self._violation(g)
        return None if v is None else v[1]

    def _require_shape(self, g: StackGenome, what: str) -> None:
        if not isinstance(g, StackGenome):
            raise SpecError(f"{what}: expected a StackGenome, got {type(g).__name__}")
        if g.max_layers != self.max_layers:
            raise SpecError(f"{what}: genome has {g.max_layers} per-layer entries; the space needs {self.max_layers}")

    # ------------------------------------------------------------------ random draws
    @staticmethod
    def _pick(options: Sequence[int], rng: np.random.Generator) -> int:
        return int(options[int(rng.integers(len(options)))])

    def _valid_for(self, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        inner = self._inner_ok.get(d_model)
        heads = self._heads_ok.get(d_model)
        if inner is None:  # d_model outside the choices (e.g. a baseline being mutated)
            inner = tuple(f for f in self.d_inner if self._ratio_ok(f, d_model))
            heads = tuple(h for h in self.n_head if d_model % h == 0)
        return inner, heads

    @staticmethod
    def _give_up(what: str, attempts: int, failures: collections.Counter, examples: dict) -> RuntimeError:
        if not failures:
            return RuntimeError(f"{what}: no valid genome in {attempts} attempts")
        constraint, count = failures.most_common(1)[0]
        return RuntimeError(
            f"{what}: no valid genome in {attempts} attempts; the constraint that kept failing is "
            f"{constraint!r} ({count} of {attempts} attempts, e.g. {examples[constraint]})"
        )

    def sample(self, rng: np.random.Generator, max_attempts: int = 10_000) -> StackGenome:
        """A random valid genome (rejection sampling).

        ``n_layer`` and ``d_model`` uniform over their choices; every per-layer
        ``d_inner`` (active or not) uniform over the choices above ``ratio * d_model``,
        every ``n_head`` uniform over the choices dividing ``d_model``; redrawn until the
        parameter bounds hold.

        Raises:
          RuntimeError: no valid genome in ``max_attempts`` draws; names the constraint
            that failed most often.
        """
        failures: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}
        L = self.max_layers
        for _ in range(max_attempts):
            n = self._pick(self.n_layer, rng)
            d = self._pick(self.d_model, rng)
            inner, heads = self._valid_for(d)
            if not inner or not heads:
                c = "d_inner_ratio" if not inner else "n_head divides d_model"
                failures[c] += 1
                examples.setdefault(c, f"d_model {d} has no valid {'d_inner' if not inner else 'n_head'} choice")
                continue
            g = StackGenome(
                n_layer=n,
                d_model=d,
                d_inner=tuple(self._pick(inner, rng) for _ in range(L)),
                n_head=tuple(self._pick(heads, rng) for _ in range(L)),
            )
            v = self._violation(g)
            if v is None:
                return g
            failures[v[0]] += 1
            examples.setdefault(v[0], v[1])
        raise self._give_up("StackSpace.sample", max_attempts, failures, examples)

    def mutate(
        self,
        g: StackGenome,
        rng: np.random.Generator,
        prob: float = 0.3,
        *,
        require_change: bool = False,
        max_attempts: int = 1_000,
    ) -> StackGenome:
        """A valid child of ``g``: each gene resampled independently with probability ``prob``.

        Genes: ``n_layer``, ``d_model``, then ``d_inner_l`` and ``n_head_l`` for every
        ``l < max_layers``. ``d_inner`` is resampled only among the choices above
        ``ratio * d_model`` of the (possibly new) ``d_model``, ``n_head`` among those
        dividing it; an entry that the new ``d_model`` makes invalid is resampled too.
        The whole draw is repeated until the child is valid (and, with
        ``require_change``, differs from ``g`` in its active architecture).

        Raises:
          SpecError: ``g`` does not have ``max_layers`` per-layer entries.
          RuntimeError: no valid child in ``max_attempts`` draws.
        """
        self._require_shape(g, "mutate")
        failures: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}
        parent_key = g.key()
        for _ in range(max_attempts):
            n = self._pick(self.n_layer, rng) if rng.random() < prob else g.n_layer
            d = self._pick(self.d_model, rng) if rng.random() < prob else g.d_model
            inner, heads = self._valid_for(d)
            if not inner or not heads:
                c = "d_inner_ratio" if not inner else "n_head divides d_model"
                failures[c] += 1
                examples.setdefault(c, f"d_model {d} has no valid {'d_inner' if not inner else 'n_head'} choice")
                continue
            d_inner = tuple(self._pick(inner, rng) if rng.random() < prob or f not in inner else f for f in g.d_inner)
            n_head = tuple(self._pick(heads, rng) if rng.random() < prob or h not in heads else h for h in g.n_head)
            child = StackGenome(n_layer=n, d_model=d, d_inner=d_inner, n_head=n_head)
            v = self._violation(child)
            if v is None and require_change and child.key() == parent_key:
                v = ("change", "the child equals its parent")
            if v is None:
                return child
            failures[v[0]] += 1
            examples.setdefault(v[0], v[1])
        raise self._give_up("StackSpace.mutate", max_attempts, failures, examples)

    def crossover(
        self,
        a: StackGenome,
        b: StackGenome,
        rng: np.random.Generator,
        prob: float = 0.5,
        *,
        max_attempts: int = 1_000,
    ) -> StackGenome:
        """A valid child taking each gene (n_layer, d_model, each d_inner_l, each n_head_l)
        from ``a`` with probability ``prob``, else from ``b``; redrawn until valid.

        Raises:
          SpecError: a parent does not have ``max_layers`` per-layer entries.
          RuntimeError: no valid child in ``max_attempts`` draws.
        """
        self._require_shape(a, "crossover (parent a)")
        self._require_shape(b, "crossover (parent b)")
        failures: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}

        def pick(x: int, y: int) -> int:
            return x if rng.random() < prob else y

        for _ in range(max_attempts):
            child = StackGenome(
                n_layer=pick(a.n_layer, b.n_layer),
                d_model=pick(a.d_model, b.d_model),
                d_inner=tuple(pick(x, y) for x, y in zip(a.d_inner, b.d_inner)),
                n_head=tuple(pick(x, y) for x, y in zip(a.n_head, b.n_head)),
            )
            v = self._violation(child)
            if v is None:
                return child
            failures[v[0]] += 1
            examples.setdefault(v[0], v[1])
        raise self._give_up("StackSpace.crossover", max_attempts, failures, examples)

    # ------------------------------------------------------------------ decoding
    def decode(self, g: StackGenome, vocab_size: int, max_len: int, **overrides) -> ModelSpec:
        """The GPT-2 :class:`ModelSpec` of the active layers of ``g``.

        ``get_spec("gpt2", ...)`` with ``d_model``, per-layer ``n_heads`` and
        ``d_inners``, dropout 0 (``overrides`` may set other ModelSpec fields, e.g.
        ``dropout_rate=0.1`` for final training), named ``lts-{key[:8]}``. Decoding does
        not require ``g`` to be in the space (baselines need not be); use :meth:`check`
        for that. Head dim is ``d_model // n_head``; ``d_embed = d_model``, no adaptive
        embedding / softmax.

        Raises:
          SpecError: the genome does not make a valid spec (e.g. a head count that does
            not divide d_model).
        """
        from nasjax.models.zoo import get_spec  # local: keeps the genome import light

        if not isinstance(g, StackGenome):
            raise SpecError(f"decode: expected a StackGenome, got {type(g).__name__}")
        n = g.n_layer
        fields = {"dropout_rate": 0.0, "attention_dropout_rate": 0.0}
        fields.update(overrides)
        name = fields.pop("name", f"lts-{g.key()[:8]}")  # get_spec's first argument is also 'name'
        spec = get_spec(
            "gpt2",
            "tiny",
            vocab_size=vocab_size,
            max_len=max_len,
            d_model=g.d_model,
            n_heads=list(g.n_head[:n]),
            d_inners=list(g.d_inner[:n]),
            **fields,
        )
        return spec.replace(name=name)


def baseline_genomes(
    space: StackSpace,
    d_model: int,
    d_inner: int,
    n_head: int,
    layers: Iterable[int],
    path: str = "baselines",
) -> tuple[StackGenome, ...]:
    """Hand-designed depth-scaled baselines (methods.md §3(a)): same widths, ``n_layer`` varied.

    One homogeneous genome per depth in ``layers``, padded to ``space.max_layers``. The
    baselines need not lie in the space's choices (the paper's GPT-2 baseline has
    d_model 1024 and 12 heads); :meth:`StackSpace.decode` accepts them regardless.

    Raises:
      SpecError: a width is not a positive integer or a depth is outside
        ``1..space.max_layers`` (the message names ``{path}.<field>``).
    """
    for name, v in (("d_model", d_model), ("d_inner", d_inner), ("n_head", n_head)):
        if not _is_int(v) or v < 1:
            _fail(f"{path}.{name}", f"expected a positive integer, got {v!r}")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        _fail(f"{path}.layers", f"expected a list of depths, got {layers!r}")
    depths = list(layers)
    if not depths:
        _fail(f"{path}.layers", "expected at least one depth")
    L = space.max_layers
    out = []
    for i, n in enumerate(depths):
        if not _is_int(n) or not 1 <= n <= L:
            _fail(f"{path}.layers[{i}]", f"expected a depth in 1..{L} (the space's max_layers), got {n!r}")
        widths = {"d_inner": (int(d_inner),) * L, "n_head": (int(n_head),) * L}
        out.append(StackGenome(n_layer=int(n), d_model=int(d_model), **widths))
    return tuple(out)
