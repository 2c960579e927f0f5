"""OP-NAS operation priority: UCB statistics over primitive ops (AutoBERT-Zero, methods.md §1(b)).

``u_i = mu_i + alpha * sqrt(2 ln N / N_i)``

Documented choices (the paper leaves them UNCONFIRMED):

* ``mu_i``: the mean reward of the children whose mutation *introduced* op i (inserted
  it or replaced a node by it): credit goes to the choice that was made, not to every
  architecture that happens to contain i.
* reward (``opnas.reward``): ``rank`` (default): the child's percentile among all
  results so far, 1 = best, 0 = worst or failed; scale-free, so ``alpha`` means the same
  for any fitness. ``improvement``: 1 if the child beats its parent, else 0.
* ``N``: all evaluated candidates (every told result), ``N_i``: how often op i was chosen
  and rewarded. An op never chosen has ``u_i = inf``.
* selection (``opnas.selection``): ``softmax`` (default) samples op i with probability
  proportional to exp(u_i / temperature) among the ops that apply to the graph at hand,
  untried applicable ops first; ``argmax`` takes the highest priority (ties at random).

Pure Python; the state is rebuilt by replaying the journal's results in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["OpPriority", "rank_reward", "REWARDS", "SELECTIONS"]

REWARDS = ("rank", "improvement")
SELECTIONS = ("softmax", "argmax")


def rank_reward(fitness: float, history: Sequence[float]) -> float:
    """Fraction of ``history`` (earlier finite fitness values, lower is better) that ``fitness`` beats or ties.

    An empty history gives 0.5; a non-finite fitness (failed candidate) gives 0.
    """
    if not math.isfinite(fitness):
        return 0.0
    finite = [h for h in history if math.isfinite(h)]
    if not finite:
        return 0.5
    return sum(1.0 for h in finite if fitness <= h) / len(finite)


class OpPriority:
    """UCB bookkeeping over ``ops`` (see the module docstring)."""

    def __init__(self, ops: Sequence[str], alpha: float = 1.0, selection: str = "softmax", temperature: float = 0.25):
        if selection not in SELECTIONS:
            raise ValueError(f"opnas.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if alpha < 0 or temperature <= 0:
            raise ValueError(f"need opnas.alpha >= 0 and opnas.temperature > 0, got {alpha} and {temperature}")
        self.ops = tuple(ops)
        self.alpha = float(alpha)
        self.selection = selection
        self.temperature = float(temperature)
        self.count = {op: 0 for op in self.ops}
        self.reward_sum = {op: 0.0 for op in self.ops}
        self.total = 0  # N: every told result

    def observe(self, op: str | None, reward: float | None) -> None:
        """One told result: N += 1; if its mutation chose ``op``, N_op += 1 and the reward counts."""
        self.total += 1
        if op is not None:
            if op not in self.count:
                raise ValueError(f"unknown op {op!r}")
            self.count[op] += 1
            self.reward_sum[op] += float(reward or 0.0)

    def mean(self, op: str) -> float:
        return self.reward_sum[op] / self.count[op] if self.count[op] else 0.0

    def priority(self, op: str) -> float:
        if self.count[op] == 0:
            return math.inf
        n = max(self.total, 1)
        return self.mean(op) + self.alpha * math.sqrt(2.0 * math.log(n) / self.count[op])

    def choose(self, applicable: Sequence[str], rng: np.random.Generator) -> str:
        """An op of ``applicable`` by priority (untried first, then softmax or argmax)."""
        if not applicable:
            raise ValueError("no applicable op to choose from")
        applicable = list(applicable)
        untried = [op for op in applicable if self.count.get(op, 0) == 0]
        if untried:
            return untried[int(rng.integers(len(untried)))]
        u = np.array([self.priority(op) for op in applicable], np.float64)
        if self.selection == "argmax":
            best = np.flatnonzero(u == u.max())
            return applicable[int(best[int(rng.integers(len(best)))])]
        z = (u - u.max()) / self.temperature
        p = np.exp(z) / np.exp(z).sum()
        return applicable[int(rng.choice(len(applicable), p=p))]

    def table(self) -> dict[str, dict]:
        """{op: {"n": N_i, "mu": mu_i, "u": u_i (None = untried)}} for journals and results."""
        out = {}
        for op in self.ops:
            u = self.priority(op)
            out[op] = {"n": self.count[op], "mu": round(self.mean(op), 6), "u": None if math.isinf(u) else round(u, 6)}
        return out
