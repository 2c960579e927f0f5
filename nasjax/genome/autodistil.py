"""AutoDistil student spaces: (L, H, A, R) subnets of a SuperLM, and the paper's counts (methods.md §4(a)).

A student is a BERT-style encoder with ``L`` layers, hidden size ``H``, ``A`` attention
heads and MLP ratio ``R`` (FFN width ``round(R * H)``). The head size stays the
teacher's (``A * head_dim`` attention width, as the released module does; the paper's
*formulas* instead assume an attention width of ``H * A / 12``, which is how its
reported numbers were computed: :func:`paper_params` / :func:`paper_flops` reproduce
them, :func:`nasjax.measure.params.count_params` counts the module exactly).

The space is split by hand into K sub-spaces, one SuperLM each. :data:`PAPER_SUBSPACES`
holds the released Tiny / Small / Base grids (BERT-base teacher: 12 x 768, 12 heads);
:func:`scaled_subspaces` maps them onto a smaller teacher (CPU scale) by scaling the
layer and hidden values to the teacher's depth and width and the head counts to its
heads, keeping the ratios.

Depth: subnet layer i uses SuperLM layer ``floor(i * L_max / L)`` (L=7 of 12 -> 0, 1, 3,
5, 6, 8, 10), :func:`layer_map`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from nasjax.spec import AttentionSpec, BlockSpec, ModelSpec, SpecError

__all__ = [
    "Subnet",
    "Subspace",
    "PAPER_SUBSPACES",
    "PAPER_TEACHER",
    "scaled_subspaces",
    "layer_map",
    "subnet_spec",
    "paper_params",
    "paper_flops",
    "largest",
    "smallest",
]


@dataclasses.dataclass(frozen=True, order=True)
class Subnet:
    """A student architecture: layers, hidden size, attention heads, MLP ratio."""

    layers: int
    hidden: int
    heads: int
    mlp_ratio: float

    @property
    def ffn(self) -> int:
        return int(round(self.mlp_ratio * self.hidden))

    @property
    def name(self) -> str:
        return f"L{self.layers}_H{self.hidden}_A{self.heads}_R{self.mlp_ratio:g}"

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "mlp_ratio": self.mlp_ratio}

    @classmethod
    def from_dict(cls, d: dict, where: str = "subnet") -> Subnet:
        try:
            return cls(int(d["layers"]), int(d["hidden"]), int(d["heads"]), float(d["mlp_ratio"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"{where}: expected layers, hidden, heads, mlp_ratio; got {d!r} ({e})") from None


@dataclasses.dataclass(frozen=True)
class Subspace:
    """A grid of subnets (the Cartesian product of the four value lists)."""

    name: str
    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]

    def subnets(self) -> list[Subnet]:
        return [Subnet(*c) for c in itertools.product(self.layers, self.hidden, self.heads, self.mlp_ratio)]


PAPER_TEACHER = {"layers": 12, "hidden": 768, "heads": 12}
PAPER_SUBSPACES = (
    Subspace("tiny", (4, 5, 6, 7), (128, 160, 192, 224), (7, 8, 9, 10), (2.0, 2.5, 3.0, 3.5)),
    Subspace("small", (9, 10, 11, 12), (256, 288, 320, 352), (7, 8, 9, 10), (2.5, 3.0, 3.5, 4.0)),
    Subspace("base", (9, 10, 11, 12), (544, 576, 608, 640), (9, 10, 11, 12), (2.5, 3.0, 3.5, 4.0)),
)


def _scaled(values: Sequence[int], factor: float, lo: int, hi: int, multiple: int = 1) -> tuple[int, ...]:
    out = []
    for v in values:
        x = max(lo, min(hi, int(round(v * factor / multiple)) * multiple))
        if x not in out:
            out.append(x)
    return tuple(out)


def scaled_subspaces(teacher: ModelSpec, names: Sequence[str] = ("tiny", "small", "base")) -> tuple[Subspace, ...]:
    """The paper's sub-spaces mapped onto ``teacher`` (depth, width and heads scaled, ratios kept).

    Hidden sizes are rounded to multiples of 8 (at least 8); heads to [1, teacher heads];
    layers to [1, teacher layers]. Values that collapse together are merged.
    """
    heads = _teacher_heads(teacher)
    out = []
    for sub in PAPER_SUBSPACES:
        if sub.name not in names:
            continue
        out.append(
            Subspace(
                sub.name,
                _scaled(sub.layers, teacher.n_layers / PAPER_TEACHER["layers"], 1, teacher.n_layers),
                _scaled(sub.hidden, teacher.d_model / PAPER_TEACHER["hidden"], 8, teacher.d_model, 8),
                _scaled(sub.heads, heads / PAPER_TEACHER["heads"], 1, heads),
                sub.mlp_ratio,
            )
        )
    unknown = sorted(set(names) - {s.name for s in PAPER_SUBSPACES})
    if unknown:
        raise SpecError(f"unknown sub-space {unknown[0]!r}; known: tiny, small, base")
    return tuple(out)


def _teacher_heads(teacher: ModelSpec) -> int:
    mixers = [b.mixer for b in teacher.layers]
    if not all(isinstance(m, AttentionSpec) and m.variant == "softmax" for m in mixers):
        raise SpecError("an AutoDistil teacher must be a standard-attention encoder (every layer softmax attention)")
    heads = {m.n_heads for m in mixers}
    dims = {m.resolved_head_dim(teacher.d_model) for m in mixers}
    if len(heads) != 1 or len(dims) != 1:
        raise SpecError("an AutoDistil teacher needs the same heads and head size in every layer")
    return heads.pop()


def largest(subnets: Sequence[Subnet]) -> Subnet:
    return max(subnets, key=lambda s: (paper_params(s), s))


def smallest(subnets: Sequence[Subnet]) -> Subnet:
    return min(subnets, key=lambda s: (paper_params(s), s))


def layer_map(n_layers: int, max_layers: int) -> list[int]:
    """SuperLM layers a subnet of ``n_layers`` keeps: ``floor(i * max_layers / n_layers)``."""
    if not 1 <= n_layers <= max_layers:
        raise SpecError(f"a subnet needs 1..{max_layers} layers, got {n_layers}")
    return [i * max_layers // n_layers for i in range(n_layers)]


def subnet_spec(teacher: ModelSpec, subnet: Subnet, name: str | None = None) -> ModelSpec:
    """The student's model spec: the teacher's layer recipe with the subnet's sizes.

    Raises:
      SpecError: a dimension exceeds the teacher's (the SuperLM has the teacher's shape).
    """
    heads = _teacher_heads(teacher)
    ffn = teacher.layers[0].ffn
    if ffn is None:
        raise SpecError("an AutoDistil teacher needs an FFN in every layer")
    problems = [
        f"{what} {got} > teacher's {limit}"
        for what, got, limit in (
            ("layers", subnet.layers, teacher.n_layers),
            ("hidden", subnet.hidden, teacher.d_model),
            ("heads", subnet.heads, heads),
            ("ffn", subnet.ffn, max(b.ffn.d_ff for b in teacher.layers)),
        )
        if got > limit
    ]
    if problems or min(subnet.layers, subnet.hidden, subnet.heads, subnet.ffn) < 1:
        raise SpecError(f"subnet {subnet.name} does not fit the SuperLM: {', '.join(problems) or 'sizes must be >= 1'}")
    head_dim = teacher.layers[0].mixer.resolved_head_dim(teacher.d_model)
    block = teacher.layers[0]
    mixer = dataclasses.replace(block.mixer, n_heads=subnet.heads, head_dim=head_dim)
    layers = tuple(
        BlockSpec(mixer, dataclasses.replace(ffn, d_ff=subnet.ffn), block.mixer_norm, block.ffn_norm)
        for _ in range(subnet.layers)
    )
    return teacher.replace(layers=layers, d_model=subnet.hidden, name=name or f"autodistil-{subnet.name}")


def paper_params(s: Subnet, vocab: int = 30522, max_len: int = 512, types: int = 2) -> int:
    """``cal_para_bert`` of the released code (attention width H*A/12; methods.md §4(a))."""
    h, a, r, n_layers = s.hidden, s.heads, s.mlp_ratio, s.layers
    embed = h * (vocab + max_len + types + 2)
    attn = n_layers * (h * h + 3 * h * h * a / 12 + 4 * h + 2 * h)
    mlp = n_layers * (2 * r * h * h + r * h + h + 2 * h)
    return int(round(embed + attn + mlp + h * h + 2 * h))


def paper_flops(s: Subnet, seq_len: int = 128) -> float:
    """``cal_flops_bert``: multiply-accumulates of one sequence of ``seq_len`` (methods.md §4(a))."""
    h, a, r, n = s.hidden, s.heads, s.mlp_ratio, seq_len
    per_layer = 3 * n * h * h * (a / 12) + 2 * n * n * h * (a / 12) + n * h * h + 2 * n * r * h * h
    return s.layers * per_layer + n * h * h + 2 * h
