"""Regularized (aging) evolution with an ask/tell interface, and Primer's halving hurdles.

Pure Python (no JAX): the controller asks for candidates, an engine evaluates them
(inline, or on remote workers), and the controller tells the results back. Everything
random is drawn from ``numpy.random.default_rng([seed, candidate_id])``, so the
proposal for candidate i depends only on the seed, i, and the population at the time
it was asked: replaying a journal's records in order rebuilds the exact state, and a
resumed search continues on the same trajectory as an uninterrupted one.

Algorithm (methods.md §2(b); Real et al. 2019): the first ``population_size``
candidates are the seed genomes (conceptual initialisation: Primer seeds the whole
population with the vanilla Transformer; copies cost nothing because an identical
genome reuses the recorded result). After that, each candidate is a mutation of the
best of ``tournament_size`` population members sampled without replacement (lower
fitness is better; ties go to the younger). Every told result joins the population and
the oldest member leaves (steady state). A failed candidate joins with fitness +inf
(it ages out like any other; UNCONFIRMED in the paper, a documented choice).

Halving hurdles: :func:`hurdle_budgets` splits a budget into ``h + 1`` bands of
doubling length so each band costs the same expected compute;
:class:`HurdleBook` sets the threshold at hurdle j to the ``quantile`` (0.5: the
median, i.e. the top 50% continue) of the fitness at hurdle j of all earlier
candidates that reached it, once at least ``min_samples`` have (before that everyone
passes). How Primer set the threshold is UNCONFIRMED; this is the configurable choice.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Proposal", "RegularizedEvolution", "HurdleBook", "hurdle_budgets"]


def hurdle_budgets(total: float, n_hurdles: int) -> list[float]:
    """Cumulative budgets at the hurdles and the end: band j lasts C * 2**j, C = T / (2**(h+1) - 1).

    ``hurdle_budgets(25200, 4)`` -> [812.9, 2438.7, 5690.3, 12193.5, 25200.0] (methods.md §2(b)).
    """
    if n_hurdles < 0:
        raise ValueError(f"n_hurdles must be >= 0, got {n_hurdles}")
    c = total / (2 ** (n_hurdles + 1) - 1)
    out = [c * (2 ** (j + 1) - 1) for j in range(n_hurdles + 1)]
    out[-1] = float(total)
    return out


def hurdle_steps(total_steps: int, n_hurdles: int) -> list[int]:
    """:func:`hurdle_budgets` in whole, strictly increasing steps (at least one step per band)."""
    out, last = [], 0
    for b in hurdle_budgets(total_steps, n_hurdles):
        last = max(last + 1, int(round(b)))
        out.append(last)
    if out[-1] > total_steps:
        raise ValueError(f"{total_steps} steps are too few for {n_hurdles} hurdles (one step per band at least)")
    return out


class HurdleBook:
    """Fitness seen at each hurdle, and the thresholds derived from it."""

    def __init__(self, n_hurdles: int, quantile: float = 0.5, min_samples: int = 5):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"hurdle quantile must be in (0, 1], got {quantile}")
        self.n_hurdles = n_hurdles
        self.quantile = quantile
        self.min_samples = max(int(min_samples), 1)
        self.seen: list[list[float]] = [[] for _ in range(n_hurdles)]

    def thresholds(self) -> list[float | None]:
        """Current threshold per hurdle (None = not enough history yet: pass)."""
        out = []
        for values in self.seen:
            finite = [v for v in values if math.isfinite(v)]
            if len(values) < self.min_samples or not finite:
                out.append(None)
            else:
                out.append(float(np.quantile(np.asarray(values, np.float64), self.quantile, method="lower")))
        return out

    def record(self, hurdle: int, fitness: float | None) -> None:
        self.seen[hurdle].append(math.inf if fitness is None else float(fitness))


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A candidate to evaluate.

    Attributes:
      id: 0, 1, 2, ... in order of asking.
      genome: the genome (a Program for Primer).
      parent: id of the parent, None for a seed.
      origin: ``seed:<name>`` or the mutation kind.
      detail: what the mutation changed.
    """

    id: int
    genome: Any
    parent: int | None
    origin: str
    detail: str = ""


class RegularizedEvolution:
    """Aging evolution, steady state, ask/tell (see the module docstring).

    Args:
      seeds: (name, genome) pairs that fill the initial population (cycled).
      mutate: ``mutate(genome, rng) -> (child, kind, detail)``.
      population_size, tournament_size: Primer uses 100 and 10.
      seed: the search seed.
      keep_genomes: keep every proposal's genome (True), or only those of candidates that
        can still be parents, pending or in the population (False: a told candidate that
        ages out keeps its id, parent, origin and detail, with ``genome`` None). A long
        search then holds a bounded number of genomes; its journal keeps them all.
    """

    def __init__(
        self,
        seeds: Sequence[tuple[str, Any]],
        mutate: Callable[[Any, np.random.Generator], tuple[Any, str, str]],
        population_size: int = 100,
        tournament_size: int = 10,
        seed: int = 0,
        keep_genomes: bool = True,
    ):
        if not seeds:
            raise ValueError("regularized evolution needs at least one seed genome")
        if population_size < 1 or not 1 <= tournament_size <= population_size:
            raise ValueError(
                f"need population_size >= 1 and 1 <= tournament_size <= population_size; got "
                f"{population_size} and {tournament_size}"
            )
        self.seeds = list(seeds)
        self.mutate = mutate
        self.population_size = population_size
        self.tournament_size = tournament_size
        self.seed = int(seed)
        self.population: collections.deque = collections.deque()  # (id, fitness), oldest first
        self.proposals: dict[int, Proposal] = {}
        self.pending: set[int] = set()
        self.results: dict[int, float] = {}
        self.next_id = 0
        self.keep_genomes = bool(keep_genomes)

    def rng(self, candidate_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, candidate_id])

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> Proposal:
        """The next candidate (registered as pending until told)."""
        cid = self.next_id
        if cid < self.population_size:
            name, genome = self.seeds[cid % len(self.seeds)]
            proposal = Proposal(cid, genome, None, f"seed:{name}")
        else:
            parent_id = self._tournament(self.rng(cid))
            child, kind, detail = self.mutate(self.proposals[parent_id].genome, self.rng(cid))
            proposal = Proposal(cid, child, parent_id, kind, detail)
        self.register(proposal)
        return proposal

    def register(self, proposal: Proposal) -> None:
        """Records a proposal (from :meth:`ask`, or replayed from a journal)."""
        if proposal.id != self.next_id:
            raise ValueError(f"proposal {proposal.id} out of order (expected {self.next_id})")
        self.proposals[proposal.id] = proposal
        self.pending.add(proposal.id)
        self.next_id += 1

    def tell(self, candidate_id: int, fitness: float | None) -> None:
        """The result of a pending candidate: a fitness (lower is better) or None (failed)."""
        if candidate_id not in self.pending:
            raise ValueError(f"candidate {candidate_id} is not pending")
        self.pending.discard(candidate_id)
        value = math.inf if fitness is None or not math.isfinite(fitness) else float(fitness)
        self.results[candidate_id] = value
        self.population.append((candidate_id, value))
        while len(self.population) > self.population_size:
            aged, _ = self.population.popleft()
            if not self.keep_genomes:  # told, so not pending: no longer a possible parent
                self.proposals[aged] = dataclasses.replace(self.proposals[aged], genome=None)

    def _tournament(self, rng: np.random.Generator) -> int:
        members = list(self.population)
        if not members:  # everything asked so far is still pending (asynchronous engines)
            members = [(cid, math.inf) for cid in sorted(self.proposals)]
        k = min(self.tournament_size, len(members))
        picks = sorted(int(i) for i in rng.choice(len(members), size=k, replace=False))
        # lowest fitness wins; among equals the youngest (largest position in the deque)
        best = min(picks, key=lambda i: (members[i][1], -i))
        return members[best][0]

    # ------------------------------------------------------------------ views
    def best(self) -> tuple[int, float] | None:
        """(id, fitness) of the best result so far (over all evaluations, not only the population)."""
        finite = [(f, cid) for cid, f in self.results.items() if math.isfinite(f)]
        if not finite:
            return None
        f, cid = min(finite)
        return cid, f
