"""Primer's search space: a decoder block written as a program of primitive ops (a "DNA").

A :class:`Program` (methods.md §2(a)) is

* a bank of :class:`Subprogram` s; subprogram 0 is ``MAIN`` (one argument: the block
  input x, [B, L, D]); a subprogram may only ``CALL`` subprograms with a higher index,
  so call graphs are acyclic;
* two shared **value banks**: ``constants`` (floats, read by ``C_MUL`` / ``C_ADD``)
  and ``dims`` (relative dimension sizes from :data:`DIM_VOCAB`, multiplied by the
  spec's ``base_dim``); instructions hold bank *indices*, so one bank mutation changes
  every instruction that points to the entry.

A subprogram is a list of :class:`Instruction` s ``(op, in1, in2, const, dim, branches,
call)``. Its hidden states start as its arguments; each instruction appends one state.
``in1`` / ``in2`` are **relative** references: 1 is the most recent state, 2 the one
before, ...; a reference past the first state reads the first state (deterministic
clamp). The subprogram returns its last state, MAIN's output is the block output.
``branches`` = k runs the instruction k times in parallel (independent parameters) and
concatenates the outputs along the feature axis; with ``CALL`` this is how multi-head
structure is written.

Hidden states are [B, L, W] arrays (W varies). Semantics of the ops (interpreted by
:mod:`nasjax.layers.program`; shape rules there):

=================  ===============================================================
family             ops
=================  ===============================================================
binary             ADD, DIFFERENCE, MULTIPLY, DIVIDE, MAX, MIN
unary              ABS, ABS_ROOT (sqrt|x|), SQUARE, EXP, LOG (log|x|), RECIP, SIGN,
                   COS, SIN, TANH, SIGMOID
constant           C_MUL (x * c), C_ADD (x + c; a nasjax addition so a norm's epsilon
                   is expressible)
learned            SCALE (x * learned vector, init 1), SHIFT (x + learned vector,
                   init 0), CONV_1X1 (dense to dims[dim]*base_dim, no bias),
                   CONV_{3,7,15,31}X1 (causal conv), DCONV_{3,7,15,31}X1 (causal
                   depthwise conv, Primer's 0.5 / 0.5/k init)
reduction          RED_MEAN, RED_SUM, RED_MIN, RED_MAX, RED_PROD (over features -> W=1)
matrix             MAT_MUL (causal: out_t = sum_{s<=t} a[t, s] b_s),
                   T_MAT_MUL (out[t, s] = a_t . b_s for s <= t, 0 above the diagonal)
structural         MASK (entries s > t of a position-by-position state -> -1e9),
                   CUM_SUM, CUM_PROD (along the sequence), CALL
=================  ===============================================================

Every op is causal by construction (row t of every state depends only on inputs at
positions <= t), so every valid program is a valid decoder block.

Programs are frozen and hashable (jit caches by them), round-trip through JSON with
path-named validation errors (:meth:`Program.from_dict`), and have a canonical hash.
:func:`instruction_names` derives each instruction's module name from the *expression*
it computes (op, used fields, the names of its inputs), not from its position, so
inserting dead code or re-ordering independent instructions keeps every other
parameter's name and initial value: that is what makes the functional-equivalence
check (same outputs at the same init) find such programs equivalent, and what lets a
child inherit its parent's weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, ClassVar

from nasjax.spec import SpecError, register_mixer

__all__ = [
    "OPS",
    "OpInfo",
    "DIM_VOCAB",
    "BRANCH_CHOICES",
    "CONV_WIDTHS",
    "MAX_INSTRUCTIONS",
    "MAX_SUBPROGRAMS",
    "MAX_BRANCH_PRODUCT",
    "Instruction",
    "Subprogram",
    "Program",
    "ProgramSpec",
    "instruction_names",
    "expression_digest",
    "resolve_reference",
    "used_fields",
    "render_program",
]

DIM_VOCAB = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
BRANCH_CHOICES = (1, 2, 4, 8, 16)
CONV_WIDTHS = (3, 7, 15, 31)
MAX_INSTRUCTIONS = 128  # per subprogram
MAX_SUBPROGRAMS = 16
MAX_BRANCH_PRODUCT = 64  # parallel copies of any instruction through nested CALLs
MAX_REFERENCE = MAX_INSTRUCTIONS + 2


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What an op reads: number of state inputs, a constant, a dimension, a callee."""

    n_inputs: int
    const: bool = False
    dim: bool = False
    learned: bool = False
    family: str = ""


def _ops() -> dict[str, OpInfo]:
    ops = {}
    for name in ("ADD", "DIFFERENCE", "MULTIPLY", "DIVIDE", "MAX", "MIN"):
        ops[name] = OpInfo(2, family="binary")
    for name in ("ABS", "ABS_ROOT", "SQUARE", "EXP", "LOG", "RECIP", "SIGN", "COS", "SIN", "TANH", "SIGMOID"):
        ops[name] = OpInfo(1, family="unary")
    ops["C_MUL"] = OpInfo(1, const=True, family="constant")
    ops["C_ADD"] = OpInfo(1, const=True, family="constant")
    ops["SCALE"] = OpInfo(1, learned=True, family="learned")
    ops["SHIFT"] = OpInfo(1, learned=True, family="learned")
    ops["CONV_1X1"] = OpInfo(1, dim=True, learned=True, family="learned")
    for w in CONV_WIDTHS:
        ops[f"CONV_{w}X1"] = OpInfo(1, dim=True, learned=True, family="learned")
        ops[f"DCONV_{w}X1"] = OpInfo(1, learned=True, family="learned")
    for name in ("RED_MEAN", "RED_SUM", "RED_MIN", "RED_MAX", "RED_PROD"):
        ops[name] = OpInfo(1, family="reduction")
    ops["MAT_MUL"] = OpInfo(2, family="matrix")
    ops["T_MAT_MUL"] = OpInfo(2, family="matrix")
    ops["MASK"] = OpInfo(1, family="structural")
    ops["CUM_SUM"] = OpInfo(1, family="structural")
    ops["CUM_PROD"] = OpInfo(1, family="structural")
    ops["CALL"] = OpInfo(2, learned=True, family="call")
    return ops


OPS: dict[str, OpInfo] = _ops()


def _fail(path: str, msg: str):
    raise SpecError(f"{path}: {msg}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction; fields an op does not read are ignored (see :func:`used_fields`).

    Attributes:
      op: a key of :data:`OPS`.
      in1, in2: relative references to earlier states (1 = the previous state).
      const: index into the program's constant bank.
      dim: index into the program's dimension bank.
      branches: parallel copies (one of :data:`BRANCH_CHOICES`), concatenated.
      call: callee subprogram index (``CALL`` only; must exceed the caller's index).
        A callee with one argument reads ``in1``; with two, ``in1`` and ``in2``.
    """

    op: str
    in1: int = 1
    in2: int = 1
    const: int = 0
    dim: int = 0
    branches: int = 1
    call: int = 0


@dataclasses.dataclass(frozen=True)
class Subprogram:
    """A list of instructions over ``n_args`` argument states; returns its last state."""

    instructions: tuple[Instruction, ...] = ()
    n_args: int = 1
    name: str = ""

    def __post_init__(self):
        if isinstance(self.instructions, list):
            object.__setattr__(self, "instructions", tuple(self.instructions))


def used_fields(ins: Instruction, n_args_of_callee: int | None = None) -> tuple[str, ...]:
    """The fields of ``ins`` that change what it computes (for hashing and mutation)."""
    info = OPS[ins.op]
    n_in = info.n_inputs if ins.op != "CALL" else (n_args_of_callee or 1)
    fields = ["op", "in1"] + (["in2"] if n_in == 2 else [])
    if info.const:
        fields.append("const")
    if info.dim:
        fields.append("dim")
    if ins.op == "CALL":
        fields.append("call")
    fields.append("branches")
    return tuple(fields)


@dataclasses.dataclass(frozen=True)
class Program:
    """A DNA: subprograms (0 = MAIN) plus the shared constant and dimension banks."""

    subprograms: tuple[Subprogram, ...]
    constants: tuple[float, ...] = (1.0,)
    dims: tuple[int, ...] = (1,)

    def __post_init__(self):
        for name in ("subprograms", "constants", "dims"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    # ------------------------------------------------------------------ checks
    def validate(self, path: str = "program") -> None:
        """Raises SpecError naming the first problem (``program.subprograms[1].instructions[3].op``)."""
        if not self.subprograms:
            _fail(f"{path}.subprograms", "needs at least MAIN")
        if len(self.subprograms) > MAX_SUBPROGRAMS:
            _fail(f"{path}.subprograms", f"at most {MAX_SUBPROGRAMS} subprograms, got {len(self.subprograms)}")
        if not self.constants:
            _fail(f"{path}.constants", "the constant bank needs at least one value")
        for i, c in enumerate(self.constants):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                _fail(f"{path}.constants[{i}]", f"expected a finite number, got {c!r}")
        if not self.dims:
            _fail(f"{path}.dims", "the dimension bank needs at least one value")
        for i, d in enumerate(self.dims):
            if d not in DIM_VOCAB or isinstance(d, bool):
                _fail(f"{path}.dims[{i}]", f"expected one of {list(DIM_VOCAB)}, got {d!r}")
        for s, sub in enumerate(self.subprograms):
            spath = f"{path}.subprograms[{s}]"
            if not isinstance(sub, Subprogram):
                _fail(spath, f"expected a Subprogram, got {type(sub).__name__}")
            if sub.n_args not in (1, 2) or (s == 0 and sub.n_args != 1):
                _fail(f"{spath}.n_args", f"MAIN takes 1 argument, others 1 or 2; got {sub.n_args!r}")
            if len(sub.instructions) > MAX_INSTRUCTIONS:
                _fail(f"{spath}.instructions", f"at most {MAX_INSTRUCTIONS} instructions, got {len(sub.instructions)}")
            for j, ins in enumerate(sub.instructions):
                self._validate_instruction(ins, s, f"{spath}.instructions[{j}]")
        if self.max_branch_product() > MAX_BRANCH_PRODUCT:
            _fail(f"{path}", f"nested branches multiply to {self.max_branch_product()} > {MAX_BRANCH_PRODUCT}")

    def _validate_instruction(self, ins: Instruction, s: int, path: str) -> None:
        if not isinstance(ins, Instruction):
            _fail(path, f"expected an Instruction, got {type(ins).__name__}")
        if ins.op not in OPS:
            _fail(f"{path}.op", f"unknown op {ins.op!r} (known: {', '.join(OPS)})")
        for name in ("in1", "in2"):
            v = getattr(ins, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_REFERENCE:
                _fail(f"{path}.{name}", f"expected a relative reference in 1..{MAX_REFERENCE}, got {v!r}")
        if isinstance(ins.const, bool) or not isinstance(ins.const, int) or not 0 <= ins.const < len(self.constants):
            _fail(f"{path}.const", f"expected a constant-bank index in 0..{len(self.constants) - 1}, got {ins.const!r}")
        if isinstance(ins.dim, bool) or not isinstance(ins.dim, int) or not 0 <= ins.dim < len(self.dims):
            _fail(f"{path}.dim", f"expected a dimension-bank index in 0..{len(self.dims) - 1}, got {ins.dim!r}")
        if ins.branches not in BRANCH_CHOICES or isinstance(ins.branches, bool):
            _fail(f"{path}.branches", f"expected one of {list(BRANCH_CHOICES)}, got {ins.branches!r}")
        if ins.op == "CALL":
            if isinstance(ins.call, bool) or not isinstance(ins.call, int) or not s < ins.call < len(self.subprograms):
                _fail(
                    f"{path}.call",
                    f"subprogram {s} may only call subprograms {s + 1}..{len(self.subprograms) - 1}, got {ins.call!r}",
                )

    def max_branch_product(self, index: int = 0) -> int:
        """Largest number of parallel copies of any instruction reachable from subprogram ``index``."""
        best = 1
        for ins in self.subprograms[index].instructions:
            if ins.op == "CALL" and 0 <= ins.call < len(self.subprograms) and ins.call > index:
                best = max(best, ins.branches * self.max_branch_product(ins.call))
            else:
                best = max(best, ins.branches)
        return best

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        return {
            "subprograms": [
                {
                    "name": sub.name,
                    "n_args": sub.n_args,
                    "instructions": [dataclasses.asdict(ins) for ins in sub.instructions],
                }
                for sub in self.subprograms
            ],
            "constants": list(self.constants),
            "dims": list(self.dims),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any, path: str = "program") -> Program:
        """Parses and validates a program; errors name the offending path."""
        if not isinstance(data, dict):
            _fail(path, f"expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"subprograms", "constants", "dims"})
        if unknown:
            _fail(f"{path}.{unknown[0]}", "unknown field (known: constants, dims, subprograms)")
        subs_data = data.get("subprograms")
        if not isinstance(subs_data, list):
            _fail(f"{path}.subprograms", "expected a list of subprograms")
        subs = []
        for s, sd in enumerate(subs_data):
            spath = f"{path}.subprograms[{s}]"
            if not isinstance(sd, dict):
                _fail(spath, f"expected an object, got {type(sd).__name__}")
            unknown = sorted(set(sd) - {"name", "n_args", "instructions"})
            if unknown:
                _fail(f"{spath}.{unknown[0]}", "unknown field (known: instructions, n_args, name)")
            ins_data = sd.get("instructions", [])
            if not isinstance(ins_data, list):
                _fail(f"{spath}.instructions", "expected a list")
            instructions = []
            for j, idata in enumerate(ins_data):
                ipath = f"{spath}.instructions[{j}]"
                if not isinstance(idata, dict):
                    _fail(ipath, f"expected an object, got {type(idata).__name__}")
                known = {f.name for f in dataclasses.fields(Instruction)}
                unknown = sorted(set(idata) - known)
                if unknown:
                    _fail(f"{ipath}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
                if "op" not in idata:
                    _fail(f"{ipath}.op", "missing")
                instructions.append(Instruction(**idata))
            name = sd.get("name", "")
            if not isinstance(name, str):
                _fail(f"{spath}.name", "expected a string")
            subs.append(Subprogram(tuple(instructions), n_args=sd.get("n_args", 1), name=name))
        constants = data.get("constants", [1.0])
        dims = data.get("dims", [1])
        if not isinstance(constants, list):
            _fail(f"{path}.constants", "expected a list of numbers")
        if not isinstance(dims, list):
            _fail(f"{path}.dims", "expected a list of integers")
        program = cls(tuple(subs), tuple(float(c) if _is_number(c) else c for c in constants), tuple(dims))
        program.validate(path)
        return program

    @classmethod
    def from_json(cls, text: str, source: str = "program") -> Program:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON: {e}") from None
        return cls.from_dict(data, source)

    def canonical_hash(self) -> str:
        """Hash of the program text (all fields, subprogram names excluded)."""
        d = self.to_dict()
        for sub in d["subprograms"]:
            sub.pop("name")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def n_instructions(self) -> int:
        return sum(len(s.instructions) for s in self.subprograms)

    def reachable(self) -> tuple[int, ...]:
        """Subprogram indices reachable from MAIN (MAIN first)."""
        seen, todo = set(), [0]
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            todo.extend(i.call for i in self.subprograms[s].instructions if i.op == "CALL")
        return tuple(sorted(seen))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_reference(n_states: int, ref: int) -> int:
    """Absolute state index of relative reference ``ref`` given ``n_states`` so far (clamped)."""
    return max(0, n_states - ref)


# These caches serve the many calls made while one candidate's model is built; each entry
# holds its whole Program, so their bounds set how many genomes a long search keeps alive
# (8192 entries kept ~600 candidates' genomes; docs/benchmarks.md, stop 32).
_NAMES_MAX = 512


@functools.lru_cache(maxsize=_NAMES_MAX)
def instruction_names(program: Program, index: int) -> tuple[str, ...]:
    """Module names of subprogram ``index``'s instructions, derived from what they compute.

    The name is ``{op}_{h}`` where h hashes the op, its used fields (bank *values*,
    not indices), the callee's *index* for ``CALL`` and, recursively, the names of its
    inputs; a repeated expression gets ``_2``, ``_3``... in program order. Dead code,
    position shifts and edits inside a callee therefore leave every other name (and so
    every other parameter's initial value) unchanged.
    """
    return _names(program, index, content=False)


@functools.lru_cache(maxsize=_NAMES_MAX)
def _names(program: Program, index: int, content: bool) -> tuple[str, ...]:
    sub = program.subprograms[index]
    states = [f"arg{a}" for a in range(sub.n_args)]
    names, seen = [], {}
    for ins in sub.instructions:
        callee_args = program.subprograms[ins.call].n_args if ins.op == "CALL" else None
        parts = [ins.op, f"b{ins.branches}"]
        fields = used_fields(ins, callee_args)
        parts.append(states[resolve_reference(len(states), ins.in1)])
        if "in2" in fields:
            parts.append(states[resolve_reference(len(states), ins.in2)])
        if "const" in fields:
            parts.append(repr(float(program.constants[ins.const])))
        if "dim" in fields:
            parts.append(f"d{program.dims[ins.dim]}")
        if ins.op == "CALL":
            # content: what the callee computes (expression identity); else its index (param identity)
            parts.append(f"sub:{_subprogram_digest(program, ins.call)}" if content else f"sub{ins.call}")
        digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]
        base = f"{ins.op.lower()}_{digest}"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        names.append(name)
        states.append(name)
    return tuple(names)


def _subprogram_digest(program: Program, index: int) -> str:
    """Digest of the expression a subprogram returns (dead code inside it does not count)."""
    sub = program.subprograms[index]
    names = _names(program, index, content=True)
    out = names[-1] if names else "arg0"
    return hashlib.sha1(f"{sub.n_args}|{out}".encode()).hexdigest()[:12]


def expression_digest(program: Program) -> str:
    """Digest of the expression MAIN computes: equal for programs that differ only in dead
    code, unreachable subprograms, unused bank entries or the order of independent
    instructions (structurally identical functions)."""
    return _subprogram_digest(program, 0)


# --------------------------------------------------------------------------- rendering


def render_program(program: Program, base_dim: int | None = None) -> str:
    """Readable text of a program: one line per instruction, states named s0, s1, ...

    Example line: ``s3 = CONV_1X1(s2, dim=8x8=64)`` or ``s2 = CALL head(s1) x4``.
    Unreachable subprograms are listed last and marked.
    """
    reachable = set(program.reachable())
    lines = []
    for idx, sub in enumerate(program.subprograms):
        label = sub.name or f"sub{idx}"
        args = ", ".join(f"s{a}" for a in range(sub.n_args))
        mark = "" if idx in reachable else "   # unreachable"
        lines.append(f"def {label}({args}):  # subprogram {idx}{mark}")
        n = sub.n_args
        for ins in sub.instructions:
            a = resolve_reference(n, ins.in1)
            b = resolve_reference(n, ins.in2)
            info = OPS[ins.op]
            if ins.op == "CALL":
                callee = program.subprograms[ins.call]
                cargs = [f"s{a}"] + ([f"s{b}"] if callee.n_args == 2 else [])
                text = f"{callee.name or f'sub{ins.call}'}({', '.join(cargs)})"
            else:
                operands = [f"s{a}"] + ([f"s{b}"] if info.n_inputs == 2 else [])
                if info.const:
                    operands.append(f"c={program.constants[ins.const]:.4g}")
                if info.dim:
                    rel = program.dims[ins.dim]
                    operands.append(f"dim={rel}" + (f"x{base_dim}={rel * base_dim}" if base_dim else ""))
                text = f"{ins.op}({', '.join(operands)})"
            if ins.branches > 1:
                text += f" x{ins.branches} (concatenated)"
            lines.append(f"    s{n} = {text}")
            n += 1
        lines.append(f"    return s{n - 1}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- model-spec mixer


@register_mixer
@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """A whole decoder layer given by a :class:`Program` (Primer's DNA), interpreted as is.

    The program includes its own residuals and norms, so a :class:`~nasjax.spec.BlockSpec`
    holding one must have ``ffn=None`` and ``mixer_norm="none"``.

    Attributes:
      program: the DNA.
      base_dim: dimension-bank values are multiplied by this.
    """

    kind: ClassVar[str] = "program"
    # Program blocks carry no relative-bias or rotary hook; positions come from the embedding.
    supported_positions: ClassVar[tuple[str, ...]] = ("learned", "sinusoidal", "none")
    whole_layer: ClassVar[bool] = True
    program: Program = None  # type: ignore[assignment]
    base_dim: int = 8

    def validate(self, path: str, d_model: int) -> None:
        if not isinstance(self.program, Program):
            _fail(f"{path}.program", "missing or not a program")
        self.program.validate(f"{path}.program")
        if isinstance(self.base_dim, bool) or not isinstance(self.base_dim, int) or self.base_dim <= 0:
            _fail(f"{path}.base_dim", f"expected a positive integer, got {self.base_dim!r}")
