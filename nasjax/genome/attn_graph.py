"""AutoBERT-Zero attention computation graphs: a typed DAG of primitive math ops.

Legend: n sequence length, d per-head width d_h; s = sqrt(d_h).

A graph is evaluated per head. Its leaves are the head's projections ``Q, K, V``
(type ``nd``, i.e. [n, d_h]) and their transposes ``Q^T, K^T, V^T`` (type ``dn``).
Each node applies one primitive to earlier values; the last node is the output and must
have type ``nd``: it is concatenated over heads and fed to W_O (methods.md §1(a)).

Types are pairs of axes from {n, d}: ``nd``, ``dn``, ``nn`` (a score matrix) and ``dd``.

========== ======= ================================================================
op         arity   typing and meaning
========== ======= ================================================================
neg        1       -x (type kept)
transpose  1       swaps the two axes (nd <-> dn; nn, dd stay)
scale      1       x / sqrt(d_h)
softmax    1       softmax over the last axis; when that axis is n (keys), padded
                   keys get BERT's additive -10000 first
logsigmoid 1       log(sigmoid(x))
softsign   1       x / (1 + |x|)
sqrt       1       sqrt(|x| + 1e-6)   (guarded: finite value and gradient everywhere)
log        1       log(|x| + 1e-6)    (guarded)
abs, exp, sigmoid, tanh   1   elementwise
add, mul, max  2   elementwise; both inputs must have the same type
matmul     2       (a, b) @ (b, c) -> (a, c); when the contracted axis is n, padded
                   positions of the right operand are zeroed first, so padding never
                   leaks into real tokens even without a softmax
========== ======= ================================================================

Standard attention is ``matmul(softmax(scale(matmul(Q, K^T))), V)``. The six discovered
AutoBERT-Zero graphs are in :data:`SEED_GRAPHS` (``bert``, ``abz_l2`` ... ``abz_l12``)
and equal the zoo's hand-written variants (tests). A graph whose output does not
reach V needs no V projection (:attr:`AttentionGraph.uses_value`).

The op set, the node bound and the guarded forms of sqrt/log are UNCONFIRMED in the
paper (methods.md §1(a)); they are this module's documented choices. Graphs are frozen
and hashable, kept *pruned* (every node reaches the output), round-trip through JSON
with path-named errors, and render as equations (:func:`render_graph`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from nasjax.spec import SpecError, _fail, _positive, register_mixer

__all__ = [
    "LEAVES",
    "LEAF_TYPES",
    "UNARY_OPS",
    "BINARY_OPS",
    "OPS",
    "Node",
    "AttentionGraph",
    "GraphAttentionSpec",
    "SEED_GRAPHS",
    "seed_graph",
    "result_type",
    "render_graph",
    "random_graph",
]

LEAVES = ("Q", "K", "V", "Q^T", "K^T", "V^T")
LEAF_TYPES = ("nd", "nd", "nd", "dn", "dn", "dn")
UNARY_OPS = (
    "neg",
    "transpose",
    "scale",
    "softmax",
    "logsigmoid",
    "softsign",
    "sqrt",
    "abs",
    "log",
    "exp",
    "sigmoid",
    "tanh",
)
BINARY_OPS = ("add", "mul", "matmul", "max")
OPS = UNARY_OPS + BINARY_OPS
TYPES = ("nd", "dn", "nn", "dd")
DEFAULT_MAX_NODES = 16


def result_type(op: str, types: tuple[str, ...]) -> str | None:
    """The type of ``op`` applied to inputs of ``types``, or None when it does not type-check."""
    if op in UNARY_OPS:
        if len(types) != 1:
            return None
        (t,) = types
        return t[::-1] if op == "transpose" else t
    if op in BINARY_OPS:
        if len(types) != 2:
            return None
        a, b = types
        if op == "matmul":
            return a[0] + b[1] if a[1] == b[0] else None
        return a if a == b else None
    return None


@dataclasses.dataclass(frozen=True)
class Node:
    """One primitive: ``op`` applied to ``inputs`` (indices: 0-5 the leaves, 6+j node j)."""

    op: str
    inputs: tuple[int, ...]

    def to_list(self) -> list:
        return [self.op, *self.inputs]


@dataclasses.dataclass(frozen=True)
class AttentionGraph:
    """A per-head attention graph; ``nodes[-1]`` is the output (see the module docstring)."""

    nodes: tuple[Node, ...]

    # ------------------------------------------------------------------ checks
    def types(self) -> tuple[str, ...]:
        """Type of every value (leaves first); raises SpecError naming the first bad node."""
        types = list(LEAF_TYPES)
        for j, node in enumerate(self.nodes):
            where = f"node {j} ({node.op})"
            if node.op not in OPS:
                raise SpecError(f"{where}: unknown op {node.op!r}; known: {', '.join(OPS)}")
            want = 1 if node.op in UNARY_OPS else 2
            if len(node.inputs) != want:
                raise SpecError(f"{where}: takes {want} input(s), got {len(node.inputs)}")
            for i in node.inputs:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(types):
                    raise SpecError(f"{where}: input {i!r} is not a leaf or an earlier node (0..{len(types) - 1})")
            t = result_type(node.op, tuple(types[i] for i in node.inputs))
            if t is None:
                shown = ", ".join(f"{_name(i)}:[{types[i][0]},{types[i][1]}]" for i in node.inputs)
                raise SpecError(f"{where}: does not type-check on ({shown})")
            types.append(t)
        return tuple(types)

    def validate(self, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        """Raises SpecError unless the graph type-checks, is pruned and outputs [n, d_h]."""
        if not self.nodes:
            raise SpecError("an attention graph needs at least one node")
        if len(self.nodes) > max_nodes:
            raise SpecError(f"{len(self.nodes)} nodes exceed the bound of {max_nodes}")
        types = self.types()
        if types[-1] != "nd":
            raise SpecError(
                f"the output (node {len(self.nodes) - 1}) has type [{types[-1][0]},{types[-1][1]}], not [n,d]"
            )
        live = self.live()
        dead = [j for j in range(len(self.nodes)) if j + len(LEAVES) not in live]
        if dead:
            raise SpecError(f"node {dead[0]} does not reach the output (graphs are kept pruned)")

    def live(self) -> set[int]:
        """Value indices (leaves and nodes) the output depends on."""
        out = len(LEAVES) + len(self.nodes) - 1
        live, stack = set(), [out]
        while stack:
            i = stack.pop()
            if i in live:
                continue
            live.add(i)
            if i >= len(LEAVES):
                stack.extend(self.nodes[i - len(LEAVES)].inputs)
        return live

    @property
    def uses_value(self) -> bool:
        """Whether V (or V^T) reaches the output (else W_V is absent)."""
        return bool({2, 5} & self.live())

    def pruned(self) -> AttentionGraph:
        """The same function without nodes that do not reach the output (indices renumbered)."""
        live = self.live()
        remap = {i: i for i in range(len(LEAVES))}
        nodes = []
        for j, node in enumerate(self.nodes):
            if j + len(LEAVES) in live:
                remap[j + len(LEAVES)] = len(LEAVES) + len(nodes)
                nodes.append(Node(node.op, tuple(remap[i] for i in node.inputs)))
        return AttentionGraph(tuple(nodes))

    def ops(self) -> tuple[str, ...]:
        return tuple(n.op for n in self.nodes)

    # ------------------------------------------------------------------ serialisation
    def to_list(self) -> list:
        return [n.to_list() for n in self.nodes]

    @classmethod
    def from_list(cls, data: Any, where: str = "graph", max_nodes: int = DEFAULT_MAX_NODES) -> AttentionGraph:
        """``[[op, input, (input)], ...]`` -> validated graph; SpecError names ``where`` and the node."""
        if not isinstance(data, list | tuple):
            raise SpecError(f"{where}: expected a list of [op, inputs...] nodes, got {type(data).__name__}")
        nodes = []
        for j, item in enumerate(data):
            if not isinstance(item, list | tuple) or not item or not isinstance(item[0], str):
                raise SpecError(f"{where}[{j}]: expected [op, input, ...], got {item!r}")
            nodes.append(Node(item[0], tuple(item[1:])))
        graph = cls(tuple(nodes))
        try:
            graph.validate(max_nodes)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None
        return graph

    def __str__(self) -> str:
        return render_graph(self)


def _name(i: int) -> str:
    return LEAVES[i] if i < len(LEAVES) else f"n{i - len(LEAVES)}"


# ---------------------------------------------------------------------- mixer spec


@register_mixer
@dataclasses.dataclass(frozen=True)
class GraphAttentionSpec:
    """Token mixer whose per-head math is an :class:`AttentionGraph` (AutoBERT-Zero).

    Parameters (same names and shapes as :class:`~nasjax.spec.AttentionSpec`'s, so
    BIWS and inheritance share them): ``q_proj, k_proj, v_proj`` (only when the graph
    reads V), ``o_proj``.

    Attributes:
      n_heads: H.
      graph: the per-head graph.
      head_dim: per-head width; 0 = d_model // n_heads.
      use_bias: biases on the projections (BERT: yes).
    """

    kind: ClassVar[str] = "attention_graph"
    encoder_only: ClassVar[bool] = True  # a graph has no causal form
    n_heads: int = 4
    graph: AttentionGraph = None  # type: ignore[assignment]
    head_dim: int = 0
    use_bias: bool = True

    def validate(self, path: str, d_model: int) -> None:
        _positive(self.n_heads, f"{path}.n_heads")
        if self.head_dim == 0 and d_model % self.n_heads:
            _fail(f"{path}.n_heads", f"d_model={d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if not isinstance(self.graph, AttentionGraph):
            _fail(f"{path}.graph", "missing attention graph")
        try:
            self.graph.validate(max_nodes=max(len(self.graph.nodes), 1))
        except SpecError as e:
            _fail(f"{path}.graph", str(e))

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    @property
    def uses_value(self) -> bool:
        return self.graph.uses_value


# ---------------------------------------------------------------------- seeds


def _g(*nodes) -> AttentionGraph:
    return AttentionGraph(tuple(Node(op, tuple(inputs)) for op, *inputs in nodes))


# Leaf indices.
_Q, _K, _V, _QT, _KT, _VT = range(6)
_N = len(LEAVES)  # node j is value _N + j

SEED_GRAPHS: dict[str, AttentionGraph] = {
    # softmax(Q K^T / s) V
    "bert": _g(("matmul", _Q, _KT), ("scale", _N), ("softmax", _N + 1), ("matmul", _N + 2, _V)),
    # softmax(Q softplus(K)^T / s) (Q + K); figure: K -> neg -> logsigmoid -> transpose -> neg
    "abz_l2": _g(
        ("neg", _KT),
        ("logsigmoid", _N),
        ("neg", _N + 1),
        ("matmul", _Q, _N + 2),
        ("scale", _N + 3),
        ("softmax", _N + 4),
        ("add", _Q, _K),
        ("matmul", _N + 5, _N + 6),
    ),
    # S = logsigmoid(Q) + Q + K; softmax(Q softplus(-S)^T / s) Q
    "abz_l4": _g(
        ("logsigmoid", _Q),
        ("add", _N, _Q),
        ("add", _N + 1, _K),
        ("transpose", _N + 2),
        ("logsigmoid", _N + 3),
        ("neg", _N + 4),
        ("matmul", _Q, _N + 5),
        ("scale", _N + 6),
        ("softmax", _N + 7),
        ("matmul", _N + 8, _Q),
    ),
    # softmax(Q softplus(-K)^T / s) Q   (layers 6 and 8)
    "abz_l6": _g(
        ("logsigmoid", _KT),
        ("neg", _N),
        ("matmul", _Q, _N + 1),
        ("scale", _N + 2),
        ("softmax", _N + 3),
        ("matmul", _N + 4, _Q),
    ),
    # K' = K/s + softsign(softsign(K)/s) + V; softmax(Q K'^T / s) V
    "abz_l10": _g(
        ("scale", _K),
        ("softsign", _K),
        ("scale", _N + 1),
        ("softsign", _N + 2),
        ("add", _N, _N + 3),
        ("add", _N + 4, _V),
        ("transpose", _N + 5),
        ("matmul", _Q, _N + 6),
        ("scale", _N + 7),
        ("softmax", _N + 8),
        ("matmul", _N + 9, _V),
    ),
    # softmax(Q (K/s + V)^T / s) V
    "abz_l12": _g(
        ("scale", _K),
        ("add", _N, _V),
        ("transpose", _N + 1),
        ("matmul", _Q, _N + 2),
        ("scale", _N + 3),
        ("softmax", _N + 4),
        ("matmul", _N + 5, _V),
    ),
}


def seed_graph(name: str) -> AttentionGraph:
    if name not in SEED_GRAPHS:
        raise SpecError(f"unknown seed attention graph {name!r}; known: {', '.join(SEED_GRAPHS)}")
    return SEED_GRAPHS[name]


# ---------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class _Term:
    """A rendered value: text, binding strength (0 sum, 1 negation, 2 product, 3 atom), op, inputs."""

    text: str
    prec: int
    op: str = ""
    args: tuple = ()


def _wrap(t: _Term, prec: int) -> str:
    return t.text if t.prec >= prec else f"({t.text})"


def _term(op: str, args: list[_Term]) -> _Term:
    a = args[0]
    if op == "transpose":
        if a.op == "transpose":  # (x^T)^T = x
            return a.args[0]
        return _Term(f"{_wrap(a, 3)}^T", 3, op, (a,))
    if op == "neg":
        if a.op == "neg":
            return a.args[0]
        if a.op == "logsigmoid":  # -logsigmoid(x) = softplus(-x)
            inner = a.args[0]
            text = inner.args[0].text if inner.op == "neg" else f"-{_wrap(inner, 2)}"
            return _Term(f"softplus({text})", 3, "softplus", (inner,))
        return _Term(f"-{_wrap(a, 2)}", 1, op, (a,))
    if op == "scale":
        return _Term(f"{_wrap(a, 2)}/√d", 2, op, (a,))
    if op in UNARY_OPS:
        return _Term(f"{op}({a.text})", 3, op, (a,))
    b = args[1]
    if op == "add":
        if b.op == "neg":
            return _Term(f"{a.text} - {_wrap(b.args[0], 2)}", 0, op, (a, b))
        return _Term(f"{a.text} + {_wrap(b, 1)}", 0, op, (a, b))
    if op == "matmul":
        return _Term(f"{_wrap(a, 2)}·{_wrap(b, 3)}", 2, op, (a, b))
    if op == "mul":
        return _Term(f"{_wrap(a, 2)} ⊙ {_wrap(b, 3)}", 2, op, (a, b))
    if op == "max":
        return _Term(f"max({a.text}, {b.text})", 3, op, (a, b))
    raise SpecError(f"unknown op {op!r}")


def render_graph(graph: AttentionGraph, shared: bool = True) -> str:
    """The graph as an equation, e.g. ``O = softmax(Q·K^T/√d)·V`` for standard attention.

    ``-logsigmoid(x)`` is written ``softplus(-x)`` as in the paper. With ``shared``, a
    non-leaf value used more than once is named ``h1, h2, ...`` and defined first
    (``h1 = ...; O = ...``).
    """
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for i in node.inputs:
            uses[i] = uses.get(i, 0) + 1
    terms: dict[int, _Term] = {i: _Term(LEAVES[i], 3) for i in range(len(LEAVES))}
    lines = []
    last = len(LEAVES) + len(graph.nodes) - 1
    for j, node in enumerate(graph.nodes):
        idx = j + len(LEAVES)
        term = _term(node.op, [terms[i] for i in node.inputs])
        reused = shared and uses.get(idx, 0) > 1 and idx != last
        if reused and (term.prec < 3 or len(term.text) > 24):
            name = f"h{len(lines) + 1}"
            lines.append(f"{name} = {term.text}")
            term = _Term(name, 3)
        terms[idx] = term
    lines.append(f"O = {terms[last].text}")
    return "; ".join(lines)


# ---------------------------------------------------------------------- random graphs


def random_graph(rng, max_nodes: int = 8, tries: int = 200) -> AttentionGraph:
    """A random valid graph (for tests and random initial populations).

    Grows up to ``max_nodes`` type-correct nodes over the leaves, then ends with a node
    producing [n, d] if the last value is not one already; retried until valid.
    """
    for _ in range(tries):
        types = list(LEAF_TYPES)
        nodes: list[Node] = []
        n_nodes = int(rng.integers(1, max_nodes + 1))
        for _ in range(n_nodes):
            op = str(OPS[int(rng.integers(len(OPS)))])
            arity = 1 if op in UNARY_OPS else 2
            a = int(rng.integers(len(types)))
            if arity == 1:
                nodes.append(Node(op, (a,)))
                types.append(result_type(op, (types[a],)))
                continue
            fits = [b for b in range(len(types)) if result_type(op, (types[a], types[b])) is not None]
            if not fits:
                continue
            b = int(fits[int(rng.integers(len(fits)))])
            nodes.append(Node(op, (a, b)))
            types.append(result_type(op, (types[a], types[b])))
        if not nodes:
            continue
        graph = AttentionGraph(tuple(nodes)).pruned()
        try:
            graph.validate(max_nodes)
        except SpecError:
            continue
        return graph
    return SEED_GRAPHS["bert"]
