"""Interpreter of Primer programs (:mod:`nasjax.genome.program`) as a Flax (linen) block.

Legend: B batch, L length, D model width, W width of a hidden state (varies), k branches.

Every hidden state is a [B, L, W] array. The rules that make any valid program run
(deterministic, documented here once):

* **Width mismatch** of a binary op: if either width is 1 it broadcasts; otherwise the
  second input is resized to the first's width by :func:`match_width` (truncate the
  trailing features, or tile the features cyclically), parameter-free.
* **Position-by-position states.** ``T_MAT_MUL(a, b)`` gives [B, L, L] with
  ``out[t, s] = a_t . b_s`` for ``s <= t`` and exactly 0 above the diagonal;
  ``MAT_MUL(a, b)`` reads a's width as key positions (resizing it to L) and sums only
  over ``s <= t``; ``MASK`` sets entries ``s > t`` (column index > row index) to
  -1e9, so a following EXP gives exactly 0 there. Entries above the diagonal are
  constants, so no later op can read the future through them: every op is causal.
* **Learned ops** size their parameters by their input width; a learned op applied to
  a position-by-position state therefore ties the program to one sequence length.
* **Branches** (k > 1): the instruction (or called subprogram) runs k times with
  independent parameters (``nn.vmap`` over a leading parameter axis, so the k copies
  are one batched computation; a DCONV is one conv with k copies and the same
  parameters, :func:`_conv_copies`) and the outputs are concatenated along W (copy-major).
* **MAIN's output** is resized to D with :func:`match_width` so blocks stack.
* Numerics are the op's plain definition (LOG is log|x|, DIVIDE is a / b, RECIP is
  1 / x, RED_PROD multiplies): a program that produces inf or NaN is rejected by the
  search's finiteness probe or diverges in training, which the search records as a
  failure.

Parameter names come from :func:`~nasjax.genome.program.instruction_names` (the
expression an instruction computes), e.g. ``main/conv_1x1_3fa2b1c0/kernel``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nasjax.genome.program import OPS, Program, ProgramSpec, instruction_names, resolve_reference
from nasjax.layers import init as initializers
from nasjax.layers.dconv import CausalDepthwiseConv
from nasjax.layers.mlp import make_dense

__all__ = [
    "PROGRAM_MASK_VALUE",
    "match_width",
    "apply_pure_op",
    "program_output",
    "ProgramBlock",
    "SubprogramModule",
    "TapeStep",
    "program_tape",
    "tape_groups",
    "tape_step_function",
]

PROGRAM_MASK_VALUE = -1e9


def match_width(y: jnp.ndarray, width: int) -> jnp.ndarray:
    """Resize the last axis to ``width``: truncate, or tile cyclically then truncate."""
    n = y.shape[-1]
    if n == width:
        return y
    if n > width:
        return y[..., :width]
    reps = -(-width // n)
    return jnp.tile(y, (1,) * (y.ndim - 1) + (reps,))[..., :width]


def _lower_triangle(length: int, width: int) -> jnp.ndarray:
    """[L, W] bool, True where column index <= row index."""
    return jnp.arange(width)[None, :] <= jnp.arange(length)[:, None]


def _binary_operands(a, b):
    if a.shape[-1] == b.shape[-1] or a.shape[-1] == 1 or b.shape[-1] == 1:
        return a, b
    return a, match_width(b, a.shape[-1])


_UNARY = {
    "ABS": jnp.abs,
    "ABS_ROOT": lambda x: jnp.sqrt(jnp.abs(x)),
    "SQUARE": jnp.square,
    "EXP": jnp.exp,
    "LOG": lambda x: jnp.log(jnp.abs(x)),
    "RECIP": jnp.reciprocal,
    "SIGN": jnp.sign,
    "COS": jnp.cos,
    "SIN": jnp.sin,
    "TANH": jnp.tanh,
    "SIGMOID": jax.nn.sigmoid,
}
_BINARY = {
    "ADD": jnp.add,
    "DIFFERENCE": jnp.subtract,
    "MULTIPLY": jnp.multiply,
    "DIVIDE": jnp.divide,
    "MAX": jnp.maximum,
    "MIN": jnp.minimum,
}
_REDUCE = {"RED_MEAN": jnp.mean, "RED_SUM": jnp.sum, "RED_MIN": jnp.min, "RED_MAX": jnp.max, "RED_PROD": jnp.prod}


def apply_pure_op(op: str, a: jnp.ndarray, b: jnp.ndarray, constant: float) -> jnp.ndarray:
    """A parameter-free op on [B, L, W] states (see the module docstring for the rules)."""
    if op in _UNARY:
        return _UNARY[op](a)
    if op in _BINARY:
        x, y = _binary_operands(a, b)
        return _BINARY[op](x, y)
    if op in _REDUCE:
        return _REDUCE[op](a, axis=-1, keepdims=True)
    if op == "C_MUL":
        return a * jnp.asarray(constant, a.dtype)
    if op == "C_ADD":
        return a + jnp.asarray(constant, a.dtype)
    length = a.shape[1]
    if op == "MAT_MUL":
        weights_BxLxL = jnp.where(_lower_triangle(length, length), match_width(a, length), 0)
        return jnp.einsum("bts,bsw->btw", weights_BxLxL, b.astype(a.dtype))
    if op == "T_MAT_MUL":
        scores_BxLxL = jnp.einsum("btw,bsw->bts", a, match_width(b, a.shape[-1]).astype(a.dtype))
        return jnp.where(_lower_triangle(length, length), scores_BxLxL, 0)
    if op == "MASK":
        return jnp.where(_lower_triangle(length, a.shape[-1]), a, jnp.asarray(PROGRAM_MASK_VALUE, a.dtype))
    if op == "CUM_SUM":
        return jnp.cumsum(a, axis=1)
    if op == "CUM_PROD":
        return jnp.cumprod(a, axis=1)
    raise ValueError(f"op {op!r} is not a parameter-free op")


class LearnedOp(nn.Module):
    """SCALE, SHIFT, CONV_1X1, CONV_kX1 (causal) and DCONV_kX1 (causal depthwise).

    Attributes:
      op: the op name.
      features: output width of CONV ops (dims bank value x base_dim).
      init_std: N(0, init_std) initialiser of conv / dense kernels.
      dtype: computation dtype (None: the input dtype); parameters are float32.
      copies: DCONV only: C > 0 runs C copies with their own taps on the one input, output
        [B, L, C, W] (:func:`_branched`; ``CausalDepthwiseConv.copies``).
    """

    op: str
    features: int = 0
    init_std: float = 0.02
    dtype: Any = None
    copies: int = 0

    @nn.compact
    def __call__(self, x_BxLxW: jnp.ndarray) -> jnp.ndarray:
        op, width = self.op, x_BxLxW.shape[-1]
        if self.copies and not op.startswith("DCONV_"):
            raise ValueError(f"LearnedOp.copies is for DCONV ops, not {op!r}")
        dtype = self.dtype or x_BxLxW.dtype
        x = x_BxLxW.astype(dtype)
        if op == "SCALE":
            return x * self.param("scale", initializers.ones, (width,), jnp.float32).astype(dtype)
        if op == "SHIFT":
            return x + self.param("shift", initializers.zeros, (width,), jnp.float32).astype(dtype)
        if op == "CONV_1X1":
            dense = make_dense(self.features, (None, None), name="dense", use_bias=False, init_std=self.init_std)
            return dense(x).astype(dtype)
        kernel_size = int(op.split("_")[1].split("X")[0])
        if op.startswith("DCONV_"):
            return CausalDepthwiseConv(kernel_size, dtype=dtype, copies=self.copies, name="dconv")(x)
        # Causal full conv: left-pad k-1 positions; kernel[k-1] multiplies the current position.
        kernel = self.param(
            "kernel", initializers.normal(self.init_std), (kernel_size, width, self.features), jnp.float32
        )
        return jax.lax.conv_general_dilated(
            x,
            kernel.astype(dtype),
            window_strides=(1,),
            padding=((kernel_size - 1, 0),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )


def _copies_run(module):
    """``module`` (k copies, output [B, L, k, W]) with the copies concatenated into the features."""

    def run(*inputs):
        out_BxLxkxW = module(*inputs)
        return out_BxLxkxW.reshape(out_BxLxkxW.shape[:-2] + (-1,))

    return run


def _conv_copies(op: str, branches: int) -> bool:
    """Whether a branched learned op runs as one conv with ``copies`` instead of ``nn.vmap``:
    DCONV, whose backward runs 2.5-4.5x faster that way up to a size, as fast above it
    (``nasjax.layers.dconv``); the parameters and the forward's values are the same."""
    return branches > 1 and op.startswith("DCONV_")


def _branched(module_cls, branches: int, name: str, **attrs):
    """The module, or k copies of it with independent parameters run as one vmapped call
    (a DCONV: one conv with k copies, the same parameters, :func:`_conv_copies`)."""
    if branches == 1:
        return module_cls(name=name, **attrs)
    if module_cls is LearnedOp and _conv_copies(attrs["op"], branches):
        return _copies_run(LearnedOp(name=name, copies=branches, **attrs))
    vmapped = nn.vmap(
        module_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=-2,
        axis_size=branches,
        # logically partitioned params (dense, dconv) get a leading unnamed (replicated) axis;
        # a name would repeat under nested branches, which logical partitioning rejects
        metadata_params={nn.PARTITION_NAME: None},
    )
    return _copies_run(vmapped(name=name, **attrs))


class SubprogramModule(nn.Module):
    """Runs subprogram ``index`` of ``program`` on its argument states; returns the last state."""

    program: Program
    index: int
    base_dim: int
    init_std: float = 0.02
    dtype: Any = None

    @nn.compact
    def __call__(self, *args: jnp.ndarray) -> jnp.ndarray:
        program = self.program
        sub = program.subprograms[self.index]
        names = instruction_names(program, self.index)
        states = list(args)
        for ins, name in zip(sub.instructions, names):
            a = states[resolve_reference(len(states), ins.in1)]
            b = states[resolve_reference(len(states), ins.in2)]
            if ins.op == "CALL":
                callee = program.subprograms[ins.call]
                inputs = (a,) if callee.n_args == 1 else (a, b)
                fn = _branched(
                    SubprogramModule,
                    ins.branches,
                    name,
                    program=program,
                    index=ins.call,
                    base_dim=self.base_dim,
                    init_std=self.init_std,
                    dtype=self.dtype,
                )
                out = fn(*inputs)
            elif OPS[ins.op].learned:
                features = program.dims[ins.dim] * self.base_dim
                attrs = dict(op=ins.op, features=features, init_std=self.init_std, dtype=self.dtype)
                fn = _branched(LearnedOp, ins.branches, name, **attrs)
                out = fn(a)
            else:
                out = apply_pure_op(ins.op, a, b, program.constants[ins.const])
                if ins.branches > 1:  # identical parameter-free copies, concatenated
                    out = jnp.tile(out, (1,) * (out.ndim - 1) + (ins.branches,))
            states.append(out)
        return states[-1]


class ProgramBlock(nn.Module):
    """A whole decoder layer given by a :class:`~nasjax.genome.program.ProgramSpec`.

    Args of ``__call__``: x_BxLxD. Returns [B, L, D] (MAIN's output resized to D).
    """

    spec: ProgramSpec
    init_std: float = 0.02
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        main = SubprogramModule(
            self.spec.program, 0, self.spec.base_dim, init_std=self.init_std, dtype=self.dtype, name="main"
        )
        return program_output(main(x_BxLxD), x_BxLxD)


def program_output(y_BxLxW: jnp.ndarray, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
    """MAIN's last state as the block's output: resized to D, in the input's dtype."""
    return match_width(y_BxLxW, x_BxLxD.shape[-1]).astype(x_BxLxD.dtype)


# ---------------------------------------------------------------------------------------
# The same program as a flat tape of instructions (``train.segmented_pieces=instruction``)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TapeStep:
    """One step of :func:`program_tape`: what :class:`SubprogramModule` does at one instruction.

    Attributes:
      kind: ``op`` (one instruction), ``exit`` (a branched callee's result, its branch
        axis concatenated into the features, copy-major) or ``output`` (MAIN's result as
        the block's output, :func:`program_output`). A callee reads its caller's states
        as its arguments directly.
      inputs: state ids read (``op``: a, then b for two-input ops; ``output``: MAIN's
        result, then the block input x).
      output: the state id written.
      op: the instruction's op (``op`` steps).
      path: the learned op's module path under the block (``("main", name, ...)``);
        () for parameter-free steps.
      features: output width of CONV ops.
      constant: the constant bank value (constant ops), else None.
      branches: parallel copies (``op``: of this instruction; ``exit``: of the callee).
      depth: branched CALLs enclosing this step. A state in such a scope carries a
        leading axis for each of them that it varies over (see
        :func:`tape_step_function`), as inside ``nn.vmap`` with unbatched arguments.
      scope: the module path of the subprogram invocation the step belongs to
        (``exit``: the caller's); :func:`tape_groups` cuts the tape there.
    """

    kind: str
    inputs: tuple[int, ...]
    output: int
    op: str = ""
    path: tuple[str, ...] = ()
    features: int = 0
    constant: float | None = None
    branches: int = 1
    depth: int = 0
    scope: tuple[str, ...] = ()


@functools.lru_cache(maxsize=64)  # each entry holds a Program: a bound on the genomes kept alive
def program_tape(program: Program, base_dim: int) -> tuple[TapeStep, ...]:
    """The program's instructions in execution order, CALLs inlined (state 0 is the block input).

    Only the steps that the output depends on are kept (dead code changes neither the
    output nor any gradient: its parameters get zero gradients). Walks the program with
    the same rules as :class:`SubprogramModule` (references, callee arguments, names).
    """
    steps: list[TapeStep] = []
    n_states = [1]

    def new_state() -> int:
        n_states[0] += 1
        return n_states[0] - 1

    def run(index: int, arg_ids: tuple[int, ...], path: tuple[str, ...], depth: int) -> int:
        sub = program.subprograms[index]
        states = list(arg_ids)
        for ins, name in zip(sub.instructions, instruction_names(program, index)):
            a = states[resolve_reference(len(states), ins.in1)]
            b = states[resolve_reference(len(states), ins.in2)]
            if ins.op == "CALL":
                callee = program.subprograms[ins.call]
                inputs = (a,) if callee.n_args == 1 else (a, b)
                if ins.branches == 1:
                    out = run(ins.call, inputs, path + (name,), depth)
                else:
                    result = run(ins.call, inputs, path + (name,), depth + 1)
                    out = new_state()
                    steps.append(TapeStep("exit", (result,), out, branches=ins.branches, depth=depth, scope=path))
            else:
                info = OPS[ins.op]
                out = new_state()
                steps.append(
                    TapeStep(
                        "op",
                        (a, b) if info.n_inputs == 2 else (a,),
                        out,
                        op=ins.op,
                        path=path + (name,) if info.learned else (),
                        features=program.dims[ins.dim] * base_dim if info.dim else 0,
                        constant=float(program.constants[ins.const]) if info.const else None,
                        branches=ins.branches,
                        depth=depth,
                        scope=path,
                    )
                )
            states.append(out)
        return states[-1]

    result = run(0, (0,), ("main",), 0)
    steps.append(TapeStep("output", (result, 0), new_state(), scope=("main",)))
    needed, live = {steps[-1].output}, []
    for step in reversed(steps):
        if step.output in needed:
            live.append(step)
            needed.update(step.inputs)
    return tuple(reversed(live))


def tape_groups(tape: tuple[TapeStep, ...], pieces: str) -> tuple[tuple[int, ...], ...]:
    """The tape cut into pieces: ``instruction``, one step each; ``subprogram``, maximal
    runs of consecutive steps of one subprogram invocation (a body up to its next CALL)."""
    if pieces == "instruction":
        return tuple((i,) for i in range(len(tape)))
    if pieces != "subprogram":
        raise ValueError(f"unknown tape grouping {pieces!r}")
    groups: list[list[int]] = []
    for i, step in enumerate(tape):
        if groups and tape[groups[-1][-1]].scope == step.scope:
            groups[-1].append(i)
        else:
            groups.append([i])
    return tuple(tuple(g) for g in groups)


def tape_step_function(step: TapeStep, in_flags: tuple[tuple[bool, ...], ...], init_std: float = 0.02, dtype=None):
    """The pure function of one tape step, and which branch axes its output carries.

    Branch axes: a state in a scope of depth d carries, in level order, an axis for each
    enclosing branched CALL whose branches it differs across (``flags[l]``); a callee's
    arguments carry none of the callee's own (``nn.vmap`` with ``in_axes=None``), a
    learned op's output carries all of them (its parameters have them), a parameter-free
    op's output those of its inputs. ``in_flags`` gives the inputs' flags (shorter
    tuples: not batched at the deeper levels).

    Returns ``(fn, out_flags)``; ``fn(params, inputs, constant)`` takes the learned op's
    parameter subtree (None otherwise), the tuple of input states and a float32 scalar
    (constant ops) or None.
    """
    learned = step.kind == "op" and OPS[step.op].learned
    levels = step.depth + (1 if step.kind == "exit" else 0)  # exit: its input is the callee's
    flags = [tuple(f) + (False,) * (levels - len(f)) for f in in_flags]
    if learned:
        copies = step.branches if _conv_copies(step.op, step.branches) else 0
        module = LearnedOp(step.op, features=step.features, init_std=init_std, dtype=dtype, copies=copies)

        def one(p, a):
            return module.apply({"params": p}, a)

        if copies:  # one conv with copies, as _branched runs it
            apply = _copies_run(one)
        elif step.branches > 1:  # nn.vmap(in_axes=None, out_axes=-2) of _branched, then the concatenation
            apply = _copies_run(jax.vmap(one, in_axes=(0, None), out_axes=-2))
        else:
            apply = one

        def fn(p, inputs, constant):
            return apply(p, inputs[0])

    elif step.kind == "op":

        def fn(p, inputs, constant):
            a, b = inputs if len(inputs) == 2 else (inputs[0], inputs[0])
            out = apply_pure_op(step.op, a, b, constant)
            if step.branches > 1:  # identical parameter-free copies, concatenated
                out = jnp.tile(out, (1,) * (out.ndim - 1) + (step.branches,))
            return out

    elif step.kind == "exit":
        branched = flags[0][step.depth]  # the result differs across the callee's branches
        flags = [f[: step.depth] for f in flags]

        def fn(p, inputs, constant):
            if not branched:  # nn.vmap broadcasts an unbatched result: k equal copies
                return jnp.tile(inputs[0], (1,) * (inputs[0].ndim - 1) + (step.branches,))
            out_BxLxkxW = jnp.moveaxis(inputs[0], 0, -2)
            return out_BxLxkxW.reshape(out_BxLxkxW.shape[:-2] + (-1,))

    elif step.kind == "output":

        def fn(p, inputs, constant):
            return program_output(inputs[0], inputs[1])

    else:
        raise ValueError(f"unknown tape step kind {step.kind!r}")
    out_flags = []
    for level in reversed(range(step.depth)):  # innermost first, so the outermost vmap is applied last
        axes = tuple(0 if f[level] else None for f in flags)
        if learned or any(a == 0 for a in axes):
            fn = jax.vmap(fn, in_axes=(0 if learned else None, axes, None))
            out_flags.append(True)
        else:
            out_flags.append(False)
    return fn, tuple(reversed(out_flags))
