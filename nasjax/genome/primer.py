"""Primer seeds written as programs, and the program -> model-spec decoder.

Conceptual initialisation (methods.md §2(b)): the search starts from the vanilla
Transformer block written as a DNA decomposed into conceptual subprograms::

    0 main(x):        h = layer_norm(x); y = x + attention(h); z = y + ffn(layer_norm(y))
    1 attention(x):   heads = head(x) x H (branches, concatenated); W_o projection
    2 head(x):        q, k, v = CONV_1X1(x) each (head_dim);  s = T_MAT_MUL(q, k) * c;
                      p = softmax(s); MAT_MUL(p, v)
    3 softmax(s):     m = MASK(s); e = EXP(m - RED_MAX(m)); e / RED_SUM(e)
    4 ffn(x):         CONV_1X1 (d_ff) + SHIFT (bias), relu, CONV_1X1 (D) + SHIFT
    5 relu(x):        MAX(x, C_MUL(x, 0))
    6 layer_norm(x):  z-score (RED_MEAN, DIFFERENCE, SQUARE, C_ADD eps, ABS_ROOT, RECIP)
                      then SCALE and SHIFT

:func:`primer_ez_program` is the same with a DCONV_3X1 after each of the q, k, v
projections (MDHA) and a SQUARE after the relu (squared ReLU). Both compute exactly
the function of the zoo's ``vanilla`` / ``primer_ez`` blocks (pre-LN, no attention
biases, biased FFN) when given the same weights (tests/test_program.py).

:func:`program_model_spec` stacks a program to a fixed depth inside the fixed
embedding / final norm / tied softmax of the search's model template.
"""

from __future__ import annotations

import math

from nasjax.genome.program import DIM_VOCAB, Instruction, Program, ProgramSpec, Subprogram
from nasjax.spec import BlockSpec, ModelSpec, SpecError

__all__ = ["SEEDS", "choose_base_dim", "vanilla_program", "primer_ez_program", "seed_program", "program_model_spec"]

SEEDS = ("vanilla", "primer_ez")


def choose_base_dim(d_model: int, head_dim: int, d_ff: int) -> int:
    """Largest base such that d_model, head_dim and d_ff are all base x a value of DIM_VOCAB."""
    for base in range(d_model, 0, -1):
        if all(v % base == 0 and v // base in DIM_VOCAB for v in (d_model, head_dim, d_ff)):
            return base
    raise SpecError(
        f"no base_dim expresses d_model={d_model}, head_dim={head_dim} and d_ff={d_ff} as multiples "
        f"from {list(DIM_VOCAB)}; choose other widths"
    )


class _Writer:
    """Appends instructions, turning absolute state indices into relative references."""

    def __init__(self, n_args: int = 1):
        self.n_states = n_args
        self.instructions: list[Instruction] = []

    def __call__(self, op: str, a: int, b: int | None = None, **fields) -> int:
        ref = lambda s: self.n_states - s
        ins = Instruction(op, in1=ref(a), in2=ref(b if b is not None else a), **fields)
        self.instructions.append(ins)
        self.n_states += 1
        return self.n_states - 1


def _program(n_heads: int, d_model: int, d_ff: int, base_dim: int | None, mdha: bool, squared: bool) -> Program:
    if d_model % n_heads:
        raise SpecError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    head_dim = d_model // n_heads
    if n_heads not in (1, 2, 4, 8, 16):
        raise SpecError(f"n_heads={n_heads}: program branches are one of 1, 2, 4, 8, 16")
    base = base_dim or choose_base_dim(d_model, head_dim, d_ff)
    for what, v in (("d_model", d_model), ("head_dim", head_dim), ("d_ff", d_ff)):
        if v % base or v // base not in DIM_VOCAB:
            raise SpecError(f"{what}={v} is not base_dim={base} x one of {list(DIM_VOCAB)}")
    dims = (head_dim // base, d_model // base, d_ff // base)
    DK, DM, DF = 0, 1, 2
    constants = (1.0 / math.sqrt(head_dim), 0.0, 1e-6)
    C_SCALE, C_ZERO, C_EPS = 0, 1, 2
    MAIN, ATTN, HEAD, SOFTMAX, FFN, RELU, LN = range(7)

    w = _Writer()
    h = w("CALL", 0, call=LN)
    a = w("CALL", h, call=ATTN)
    y = w("ADD", 0, a)
    h2 = w("CALL", y, call=LN)
    f = w("CALL", h2, call=FFN)
    w("ADD", y, f)
    main = Subprogram(tuple(w.instructions), 1, "main")

    w = _Writer()
    heads = w("CALL", 0, call=HEAD, branches=n_heads)
    w("CONV_1X1", heads, dim=DM)
    attention = Subprogram(tuple(w.instructions), 1, "attention")

    w = _Writer()
    qkv = []
    for _ in range(3):
        p = w("CONV_1X1", 0, dim=DK)
        qkv.append(w("DCONV_3X1", p) if mdha else p)
    q, k, v = qkv
    s = w("T_MAT_MUL", q, k)
    s = w("C_MUL", s, const=C_SCALE)
    p = w("CALL", s, call=SOFTMAX)
    w("MAT_MUL", p, v)
    head = Subprogram(tuple(w.instructions), 1, "head")

    w = _Writer()
    m = w("MASK", 0)
    mx = w("RED_MAX", m)
    e = w("EXP", w("DIFFERENCE", m, mx))
    w("DIVIDE", e, w("RED_SUM", e))
    softmax = Subprogram(tuple(w.instructions), 1, "softmax")

    w = _Writer()
    u = w("SHIFT", w("CONV_1X1", 0, dim=DF))
    r = w("CALL", u, call=RELU)
    if squared:
        r = w("SQUARE", r)
    w("SHIFT", w("CONV_1X1", r, dim=DM))
    ffn = Subprogram(tuple(w.instructions), 1, "ffn")

    w = _Writer()
    w("MAX", 0, w("C_MUL", 0, const=C_ZERO))
    relu = Subprogram(tuple(w.instructions), 1, "relu")

    w = _Writer()
    mean = w("RED_MEAN", 0)
    c = w("DIFFERENCE", 0, mean)
    var = w("RED_MEAN", w("SQUARE", c))
    inv = w("RECIP", w("ABS_ROOT", w("C_ADD", var, const=C_EPS)))
    w("SHIFT", w("SCALE", w("MULTIPLY", c, inv)))
    layer_norm = Subprogram(tuple(w.instructions), 1, "layer_norm")

    program = Program((main, attention, head, softmax, ffn, relu, layer_norm), constants, dims)
    assert [MAIN, ATTN, HEAD, SOFTMAX, FFN, RELU, LN] == list(range(7))
    program.validate()
    return program


def vanilla_program(n_heads: int = 4, d_model: int = 64, d_ff: int = 256, base_dim: int | None = None) -> Program:
    """The vanilla (pre-LN, ReLU) Transformer block as a DNA."""
    return _program(n_heads, d_model, d_ff, base_dim, mdha=False, squared=False)


def primer_ez_program(n_heads: int = 4, d_model: int = 64, d_ff: int = 256, base_dim: int | None = None) -> Program:
    """Primer-EZ (vanilla + MDHA + squared ReLU) as a DNA."""
    return _program(n_heads, d_model, d_ff, base_dim, mdha=True, squared=True)


def seed_program(name: str, n_heads: int, d_model: int, d_ff: int, base_dim: int | None = None) -> Program:
    """A seed by name (one of :data:`SEEDS`)."""
    builders = {"vanilla": vanilla_program, "primer_ez": primer_ez_program}
    if name not in builders:
        raise SpecError(f"unknown seed program {name!r}; known: {', '.join(SEEDS)}")
    return builders[name](n_heads, d_model, d_ff, base_dim)


def program_model_spec(
    program: Program,
    *,
    base_dim: int,
    d_model: int,
    n_layers: int,
    vocab_size: int,
    max_len: int,
    positions: str = "learned",
    norm_eps: float = 1e-6,
    init_std: float = 0.02,
    name: str = "program",
) -> ModelSpec:
    """A decoder LM whose ``n_layers`` layers each run ``program`` (own weights per layer).

    The fixed parts: token embedding + ``positions``, the program block stacked
    ``n_layers`` times, a final LayerNorm, and the tied embedding as the softmax.
    Positions default to a learned table: T2T's sinusoidal timing signal (unit scale)
    would drown token embeddings initialised at ``init_std`` = 0.02 unless they were
    rescaled by sqrt(D) as T2T does, which the zoo's embedding does not.
    """
    block = BlockSpec(ProgramSpec(program, base_dim), ffn=None, mixer_norm="none")
    return ModelSpec(
        kind="decoder",
        vocab_size=vocab_size,
        d_model=d_model,
        layers=(block,) * n_layers,
        max_len=max_len,
        positions=positions,
        norm="layernorm",
        norm_eps=norm_eps,
        final_norm=True,
        tie_embeddings=True,
        head="lm",
        init_std=init_std,
        name=name,
    )
