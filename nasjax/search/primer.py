"""The Primer search space as the search driver sees it: seeds, mutation, decoding.

A *space* is the genome-side half of a search method. It never builds Flax modules:
``decode`` returns a :class:`~nasjax.spec.ModelSpec` and the evaluator trains it.

Config keys (``search.*``, see configs/search/primer.py): ``seeds`` (comma-separated
names from :data:`nasjax.genome.primer.SEEDS`), ``d_model``, ``n_layers``, ``n_heads``,
``d_ff`` (0 = from ``model.size``), ``base_dim`` (0 = the largest base that expresses
the seed's widths), ``positions``, ``mutations`` (comma-separated kinds, '' = all),
``branch_probability``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nasjax.genome.mutate import MUTATIONS, mutate
from nasjax.genome.primer import SEEDS, choose_base_dim, program_model_spec, seed_program
from nasjax.genome.program import Program, expression_digest, render_program
from nasjax.models.zoo import SIZES
from nasjax.spec import ModelSpec, SpecError

__all__ = ["PrimerSpace", "split_names"]


def split_names(value: str | tuple | list, what: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """'a, b' or a sequence -> validated tuple of names."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n) for n in value]
    names = tuple(n for n in names if n)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(f"{what}: unknown {unknown[0]!r}; known: {', '.join(known)}")
    return names


class PrimerSpace:
    """Programs (DNA) stacked into a decoder LM of fixed depth, width, vocabulary and length."""

    name = "primer"

    def __init__(self, cfg, vocab_size: int):
        s = cfg.search
        dims = SIZES.get(cfg.model.size)
        if dims is None:
            raise SpecError(f"model.size: unknown size {cfg.model.size!r}; known: {', '.join(SIZES)}")
        self.d_model = int(s.d_model or dims["d_model"])
        self.n_layers = int(s.n_layers or dims["n_layers"])
        self.n_heads = int(s.n_heads or dims["n_heads"])
        self.d_ff = int(s.d_ff or dims["d_ff"])
        if self.d_model % self.n_heads:
            raise SpecError(f"search.d_model={self.d_model} is not divisible by search.n_heads={self.n_heads}")
        self.base_dim = int(s.base_dim) or choose_base_dim(self.d_model, self.d_model // self.n_heads, self.d_ff)
        self.vocab_size = int(vocab_size)
        self.max_len = int(cfg.data.seq_len)
        self.positions = str(s.positions)
        self.seed_names = split_names(s.seeds, "search.seeds", SEEDS) or ("vanilla",)
        self.mutation_kinds = split_names(s.mutations, "search.mutations", MUTATIONS) or MUTATIONS
        self.branch_probability = float(s.branch_probability)

    # ------------------------------------------------------------------ genomes
    def seeds(self) -> list[tuple[str, Program]]:
        return [
            (name, seed_program(name, self.n_heads, self.d_model, self.d_ff, self.base_dim)) for name in self.seed_names
        ]

    def mutate(self, genome: Program, rng: np.random.Generator) -> tuple[Program, str, str]:
        m = mutate(genome, rng, kinds=self.mutation_kinds, branch_probability=self.branch_probability)
        return m.program, m.kind, m.detail

    def decode(self, genome: Program) -> ModelSpec:
        return program_model_spec(
            genome,
            base_dim=self.base_dim,
            d_model=self.d_model,
            n_layers=self.n_layers,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
            positions=self.positions,
            name="primer-search",
        )

    # ------------------------------------------------------------------ serialisation
    @staticmethod
    def genome_to_json(genome: Program) -> dict[str, Any]:
        return genome.to_dict()

    @staticmethod
    def genome_from_json(data: Any, where: str = "genome") -> Program:
        return Program.from_dict(data, where)

    @staticmethod
    def genome_hash(genome: Program) -> str:
        return genome.canonical_hash()

    @staticmethod
    def expression_hash(genome: Program) -> str:
        return expression_digest(genome)

    def render(self, genome: Program) -> str:
        return render_program(genome, self.base_dim)

    def describe(self) -> str:
        return (
            f"primer programs: {self.n_layers} layers x d_model {self.d_model} (base_dim {self.base_dim}), "
            f"seeds {', '.join(self.seed_names)}, vocab {self.vocab_size}, seq_len {self.max_len}"
        )
