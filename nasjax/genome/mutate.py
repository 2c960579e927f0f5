"""Mutations of Primer programs (methods.md §2(b)).

One mutation per child, its type drawn uniformly from :data:`MUTATIONS`:

``delete``        remove a random instruction
``insert``        insert a random instruction at a random position
``replace``       delete then insert at the same position
``change_field``  change one used field of one instruction (op, an input, the constant
                  or dimension bank reference, the branch count, the callee)
``swap``          swap two instructions of a subprogram (relative references keep every
                  program valid, so no rewiring is needed)
``bank_value``    change one bank entry: a constant c -> c * 10**X + Y with X, Y ~ N(0, 1)
                  (Primer's rule), a dimension -> another value of DIM_VOCAB

Mutations act on a subprogram reachable from MAIN (changes to unreachable code cannot
change the function). A child whose live expression equals its parent's
(:func:`~nasjax.genome.program.expression_digest`: dead code, no-op edits) or that fails
validation (e.g. nested branches above the limit) is discarded and the parent mutated
again, up to ``max_attempts`` times, after which :class:`MutationError` is raised.

Random instructions (UNCONFIRMED in the paper; a documented choice): op uniform over
:data:`~nasjax.genome.program.OPS` (``CALL`` only where a higher-indexed subprogram
exists), inputs uniform over the states available at that position, bank references
uniform, ``branches`` 1 with probability ``1 - branch_probability`` (default 0.75) and
otherwise uniform over 2, 4, 8, 16. All randomness comes from the ``numpy`` Generator the
caller passes (the search derives it from the seed and the candidate id).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nasjax.genome.program import (
    BRANCH_CHOICES,
    DIM_VOCAB,
    MAX_INSTRUCTIONS,
    OPS,
    Instruction,
    Program,
    expression_digest,
    used_fields,
)
from nasjax.spec import SpecError

__all__ = ["MUTATIONS", "Mutation", "MutationError", "mutate", "random_instruction"]

MUTATIONS = ("delete", "insert", "replace", "change_field", "swap", "bank_value")
_OP_NAMES = tuple(OPS)


class MutationError(RuntimeError):
    """No valid, functionally different child was found within the allowed attempts."""


@dataclasses.dataclass(frozen=True)
class Mutation:
    """A child program and what was done to its parent (for the journal)."""

    program: Program
    kind: str
    detail: str
    attempts: int


def random_instruction(
    program: Program, index: int, position: int, rng: np.random.Generator, branch_probability: float = 0.25
) -> Instruction:
    """A random valid instruction for subprogram ``index`` at ``position``."""
    sub = program.subprograms[index]
    n_states = sub.n_args + position
    ops = _OP_NAMES if index < len(program.subprograms) - 1 else tuple(o for o in _OP_NAMES if o != "CALL")
    op = ops[rng.integers(len(ops))]
    branches = 1
    if rng.random() < branch_probability:
        branches = int(rng.choice(BRANCH_CHOICES[1:]))
    return Instruction(
        op=op,
        in1=int(rng.integers(1, n_states + 1)),
        in2=int(rng.integers(1, n_states + 1)),
        const=int(rng.integers(len(program.constants))),
        dim=int(rng.integers(len(program.dims))),
        branches=branches,
        call=int(rng.integers(index + 1, len(program.subprograms))) if op == "CALL" else 0,
    )


def _with_instructions(program: Program, index: int, instructions) -> Program:
    subs = list(program.subprograms)
    subs[index] = dataclasses.replace(subs[index], instructions=tuple(instructions))
    return dataclasses.replace(program, subprograms=tuple(subs))


def _change_field(program: Program, index: int, rng: np.random.Generator, branch_probability: float):
    sub = program.subprograms[index]
    j = int(rng.integers(len(sub.instructions)))
    ins = sub.instructions[j]
    callee_args = program.subprograms[ins.call].n_args if ins.op == "CALL" else None
    field = str(rng.choice(used_fields(ins, callee_args)))
    n_states = sub.n_args + j
    if field == "op":
        fresh = random_instruction(program, index, j, rng, branch_probability)
        new = dataclasses.replace(ins, op=fresh.op, call=fresh.call if fresh.op == "CALL" else 0)
    elif field in ("in1", "in2"):
        new = dataclasses.replace(ins, **{field: int(rng.integers(1, n_states + 1))})
    elif field == "const":
        new = dataclasses.replace(ins, const=int(rng.integers(len(program.constants))))
    elif field == "dim":
        new = dataclasses.replace(ins, dim=int(rng.integers(len(program.dims))))
    elif field == "branches":
        new = dataclasses.replace(ins, branches=int(rng.choice(BRANCH_CHOICES)))
    else:  # call
        new = dataclasses.replace(ins, call=int(rng.integers(index + 1, len(program.subprograms))))
    instructions = list(sub.instructions)
    instructions[j] = new
    return _with_instructions(program, index, instructions), f"subprogram {index} instruction {j}: {field}"


def _apply(program: Program, kind: str, rng: np.random.Generator, branch_probability: float):
    """One mutation of ``kind``; returns (child, detail) or None when not applicable."""
    reachable = program.reachable()
    index = int(reachable[rng.integers(len(reachable))])
    sub = program.subprograms[index]
    n = len(sub.instructions)
    if kind == "delete":
        if n == 0:
            return None
        j = int(rng.integers(n))
        return _with_instructions(program, index, sub.instructions[:j] + sub.instructions[j + 1 :]), (
            f"subprogram {index}: deleted instruction {j} ({sub.instructions[j].op})"
        )
    if kind == "insert":
        if n >= MAX_INSTRUCTIONS:
            return None
        j = int(rng.integers(n + 1))
        ins = random_instruction(program, index, j, rng, branch_probability)
        return _with_instructions(program, index, sub.instructions[:j] + (ins,) + sub.instructions[j:]), (
            f"subprogram {index}: inserted {ins.op} at {j}"
        )
    if kind == "replace":
        if n == 0:
            return None
        j = int(rng.integers(n))
        ins = random_instruction(program, index, j, rng, branch_probability)
        instructions = list(sub.instructions)
        old = instructions[j].op
        instructions[j] = ins
        detail = f"subprogram {index}: replaced {old} at {j} by {ins.op}"
        return _with_instructions(program, index, instructions), detail
    if kind == "change_field":
        if n == 0:
            return None
        return _change_field(program, index, rng, branch_probability)
    if kind == "swap":
        if n < 2:
            return None
        a, b = (int(x) for x in rng.choice(n, size=2, replace=False))
        instructions = list(sub.instructions)
        instructions[a], instructions[b] = instructions[b], instructions[a]
        return _with_instructions(program, index, instructions), f"subprogram {index}: swapped {a} and {b}"
    if kind == "bank_value":
        if rng.random() < 0.5:
            k = int(rng.integers(len(program.constants)))
            old = program.constants[k]
            new = float(old * 10.0 ** rng.normal() + rng.normal())
            constants = program.constants[:k] + (new,) + program.constants[k + 1 :]
            return dataclasses.replace(program, constants=constants), f"constant {k}: {old:.4g} -> {new:.4g}"
        k = int(rng.integers(len(program.dims)))
        choices = [d for d in DIM_VOCAB if d != program.dims[k]]
        new_dim = int(choices[rng.integers(len(choices))])
        dims = program.dims[:k] + (new_dim,) + program.dims[k + 1 :]
        return dataclasses.replace(program, dims=dims), f"dim {k}: {program.dims[k]} -> {new_dim}"
    raise ValueError(f"unknown mutation {kind!r}; known: {', '.join(MUTATIONS)}")


def mutate(
    program: Program,
    rng: np.random.Generator,
    *,
    kinds: tuple[str, ...] = MUTATIONS,
    branch_probability: float = 0.25,
    max_attempts: int = 100,
) -> Mutation:
    """A valid child of ``program`` that computes a different expression.

    Args:
      program: the parent (valid).
      rng: the source of all randomness.
      kinds: mutation types to draw from (uniformly).
      branch_probability: chance that a random instruction gets more than one branch.
      max_attempts: mutations tried before giving up.

    Raises:
      MutationError: no valid, different child within ``max_attempts``.
    """
    unknown = [k for k in kinds if k not in MUTATIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown mutation kinds {unknown}; known: {', '.join(MUTATIONS)}")
    parent = expression_digest(program)
    for attempt in range(1, max_attempts + 1):
        kind = kinds[rng.integers(len(kinds))]
        out = _apply(program, kind, rng, branch_probability)
        if out is None:
            continue
        child, detail = out
        try:
            child.validate()
        except SpecError:
            continue
        if expression_digest(child) == parent:
            continue
        return Mutation(child, kind, detail, attempt)
    raise MutationError(f"no valid child that differs from its parent after {max_attempts} attempts")
