"""AutoBERT-Zero backbones: per layer an attention graph or a GLU light-conv (methods.md §1(a)).

A :class:`BertGenome` is a tuple of :class:`LayerGene` (``attn`` with an
:class:`~nasjax.genome.attn_graph.AttentionGraph`, or ``conv`` with a kernel size).
:func:`decode_genome` turns it into a BERT-style :class:`~nasjax.spec.ModelSpec`
(post-LN layers, GELU FFN, learned positions, token types, MLM head): the genome never
becomes a separate model class.

Mutations (OP-NAS, methods.md §1(b)); :func:`mutate_genome` picks one kind uniformly
among those that apply:

* ``op``: in one attention layer, insert a node or replace a node's op, with the op
  chosen by the caller's ``choose_op`` (the UCB priority of the search); or, with
  probability ``delete_probability``, delete a node (no op chosen). Every edit keeps the
  graph type-correct; the result is pruned and must differ from the parent.
* ``flip``: turn an attention layer into a conv (kernel uniform from the set) or a conv
  layer into standard attention (the BERT graph, which later ``op`` mutations evolve).
* ``kernel``: give one conv layer another kernel size from the set.

Kernel sizes must be odd (a 'same' conv centred on the token; BIWS slices the centred
window of the largest kernel). The paper's kernels (65, 9, 3, 7, 7, 3) were used at
BERT's sequence length 128; :func:`scaled_kernel` maps them to a shorter proxy length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nasjax.genome.attn_graph import (
    LEAVES,
    OPS,
    UNARY_OPS,
    AttentionGraph,
    GraphAttentionSpec,
    Node,
    render_graph,
    result_type,
    seed_graph,
)
from nasjax.models.zoo import AUTOBERT_ZERO_LAYOUT, get_spec
from nasjax.spec import BlockSpec, ConvSpec, ModelSpec, SpecError

__all__ = [
    "LayerGene",
    "BertGenome",
    "GENOME_SEEDS",
    "MUTATION_KINDS",
    "Mutation",
    "seed_genome",
    "scaled_kernel",
    "decode_genome",
    "mutate_genome",
    "graph_edits",
    "render_genome",
]

GENOME_SEEDS = ("bert", "autobert_zero", "all_conv")
MUTATION_KINDS = ("op", "flip", "kernel")
REFERENCE_SEQ_LEN = 128  # BERT's pre-training length at which the paper's kernels were found


@dataclasses.dataclass(frozen=True)
class LayerGene:
    """One layer's token mixer: ``kind`` ``attn`` (``graph``) or ``conv`` (``kernel``)."""

    kind: str
    graph: AttentionGraph | None = None
    kernel: int = 0

    def to_json(self) -> Any:
        return {"attn": self.graph.to_list()} if self.kind == "attn" else {"conv": self.kernel}

    def render(self) -> str:
        return f"attention: {render_graph(self.graph)}" if self.kind == "attn" else f"conv k={self.kernel}"


@dataclasses.dataclass(frozen=True)
class BertGenome:
    layers: tuple[LayerGene, ...]

    def validate(self, kernel_sizes: Sequence[int] | None = None, max_nodes: int = 10**6) -> None:
        if not self.layers:
            raise SpecError("a genome needs at least one layer")
        for i, gene in enumerate(self.layers):
            if gene.kind == "attn":
                if not isinstance(gene.graph, AttentionGraph):
                    raise SpecError(f"layers[{i}]: an attention layer needs a graph")
                try:
                    gene.graph.validate(max_nodes)
                except SpecError as e:
                    raise SpecError(f"layers[{i}].attn: {e}") from None
            elif gene.kind == "conv":
                k = gene.kernel
                if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                    raise SpecError(f"layers[{i}].conv: kernel size must be a positive odd int, got {k!r}")
                if kernel_sizes is not None and k not in kernel_sizes:
                    raise SpecError(f"layers[{i}].conv: kernel {k} is not in the kernel set {tuple(kernel_sizes)}")
            else:
                raise SpecError(f"layers[{i}]: kind must be 'attn' or 'conv', got {gene.kind!r}")

    def to_json(self) -> list:
        return [g.to_json() for g in self.layers]

    @classmethod
    def from_json(cls, data: Any, where: str = "genome") -> BertGenome:
        """``[{"attn": [[op, in, ...], ...]} | {"conv": k}, ...]`` -> validated genome."""
        if not isinstance(data, list) or not data:
            raise SpecError(f"{where}: expected a non-empty list of layers, got {data!r:.60}")
        layers = []
        for i, item in enumerate(data):
            if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ("attn", "conv"):
                raise SpecError(f"{where}[{i}]: expected {{'attn': graph}} or {{'conv': kernel}}, got {item!r:.60}")
            if "attn" in item:
                layers.append(LayerGene("attn", AttentionGraph.from_list(item["attn"], f"{where}[{i}].attn", 10**6)))
            else:
                layers.append(LayerGene("conv", kernel=item["conv"]))
        genome = cls(tuple(layers))
        try:
            genome.validate()
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None
        return genome

    def canonical_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:16]

    @property
    def layout(self) -> str:
        """e.g. ``C33 A C5 A``: C = conv with its kernel, A = attention."""
        return " ".join("A" if g.kind == "attn" else f"C{g.kernel}" for g in self.layers)


def render_genome(genome: BertGenome) -> str:
    """One line per layer, attention graphs as equations (``L1  conv k=33`` / ``L2  O = ...``)."""
    return "\n".join(f"L{i + 1:<3} {g.render()}" for i, g in enumerate(genome.layers))


# ---------------------------------------------------------------------- seeds


def scaled_kernel(kernel: int, seq_len: int, kernel_sizes: Sequence[int]) -> int:
    """The member of ``kernel_sizes`` nearest to ``kernel * seq_len / 128`` (ties: the smaller)."""
    target = kernel * seq_len / REFERENCE_SEQ_LEN
    return min(sorted(kernel_sizes), key=lambda k: abs(k - target))


def seed_genome(name: str, n_layers: int, seq_len: int, kernel_sizes: Sequence[int]) -> BertGenome:
    """``bert`` (standard attention everywhere), ``autobert_zero`` (the discovered layout)
    or ``all_conv`` (every layer a conv with the kernel nearest the set's median).

    ``autobert_zero`` at fewer than 12 layers keeps whole (conv, attention) pairs of the
    12-layer layout, spread evenly (pair ``floor(j * 6 / n_pairs)``), with kernels scaled
    by :func:`scaled_kernel`.
    """
    if name not in GENOME_SEEDS:
        raise SpecError(f"unknown seed genome {name!r}; known: {', '.join(GENOME_SEEDS)}")
    if n_layers < 1:
        raise SpecError(f"n_layers must be positive, got {n_layers}")
    if name == "bert":
        return BertGenome(tuple(LayerGene("attn", seed_graph("bert")) for _ in range(n_layers)))
    if name == "all_conv":
        ks = sorted(kernel_sizes)
        return BertGenome(tuple(LayerGene("conv", kernel=ks[len(ks) // 2]) for _ in range(n_layers)))
    n_pairs_paper = len(AUTOBERT_ZERO_LAYOUT) // 2
    n_pairs = (n_layers + 1) // 2
    layers = []
    for i in range(n_layers):
        pair = (i // 2) * n_pairs_paper // n_pairs
        kind, arg = AUTOBERT_ZERO_LAYOUT[2 * pair + i % 2]
        if kind == "conv":
            layers.append(LayerGene("conv", kernel=scaled_kernel(arg, seq_len, kernel_sizes)))
        else:
            layers.append(LayerGene("attn", seed_graph(arg)))
    return BertGenome(tuple(layers))


# ---------------------------------------------------------------------- decoding


def decode_genome(
    genome: BertGenome,
    *,
    size: str,
    vocab_size: int,
    max_len: int,
    d_model: int = 0,
    n_heads: int = 0,
    d_ff: int = 0,
    dropout_rate: float = 0.1,
    name: str = "autobert-search",
) -> ModelSpec:
    """The BERT encoder spec (MLM head) of ``genome`` at ``size`` (widths override it when > 0)."""
    base = get_spec(
        "bert",
        size,
        vocab_size=vocab_size,
        max_len=max_len,
        d_model=d_model or None,
        n_layers=len(genome.layers),
        n_heads=n_heads or None,
        d_ff=d_ff or None,
        dropout_rate=dropout_rate,
        attention_dropout_rate=dropout_rate,
    )
    layers = []
    for gene, block in zip(genome.layers, base.layers):
        heads = block.mixer.n_heads
        if gene.kind == "attn":
            mixer = GraphAttentionSpec(n_heads=heads, graph=gene.graph, use_bias=True)
        else:
            mixer = ConvSpec(kernel_size=gene.kernel, n_heads=heads)
        layers.append(BlockSpec(mixer, block.ffn, mixer_norm=block.mixer_norm, ffn_norm=block.ffn_norm))
    return base.replace(layers=tuple(layers), name=name)


# ---------------------------------------------------------------------- graph edits


@dataclasses.dataclass(frozen=True)
class Edit:
    """A type-preserving change of a graph: ``insert`` a node before node ``at`` (feeding
    its input slot ``slot``; at == len(nodes) wraps the output) or ``replace`` node ``at``."""

    kind: str
    op: str
    at: int
    slot: int
    inputs: tuple[int, ...]


def _types(graph: AttentionGraph) -> list[str]:
    return list(graph.types())


def graph_edits(graph: AttentionGraph, max_nodes: int) -> list[Edit]:
    """Every single-op insert/replace that keeps ``graph`` type-correct (value indices as in the graph)."""
    types = _types(graph)
    n_leaf = len(LEAVES)
    out: list[Edit] = []
    # replace node j by op o on (some of) the values before it, keeping its type
    for j, node in enumerate(graph.nodes):
        idx = n_leaf + j
        want = types[idx]
        for op in OPS:
            if op == node.op:
                continue
            if op in UNARY_OPS:
                for a in dict.fromkeys(node.inputs):
                    if result_type(op, (types[a],)) == want:
                        out.append(Edit("replace", op, j, 0, (a,)))
            else:
                first = node.inputs[0]
                for b in range(idx):
                    if result_type(op, (types[first], types[b])) == want:
                        out.append(Edit("replace", op, j, 0, (first, b)))
    if len(graph.nodes) >= max_nodes:
        return out
    # insert a node on an edge (consumer j, slot s) or on the output
    sites = [(j, s, node.inputs[s]) for j, node in enumerate(graph.nodes) for s in range(len(node.inputs))]
    sites.append((len(graph.nodes), 0, n_leaf + len(graph.nodes) - 1))
    for j, s, value in sites:
        t = types[value]
        for op in OPS:
            if op in UNARY_OPS:
                if result_type(op, (t,)) == t:
                    out.append(Edit("insert", op, j, s, (value,)))
                continue
            for b in range(n_leaf + j):  # partners must exist before the new node
                if result_type(op, (t, types[b])) == t:
                    out.append(Edit("insert", op, j, s, (value, b)))
                if op == "matmul" and result_type(op, (types[b], t)) == t:
                    out.append(Edit("insert", op, j, s, (b, value)))
    return out


def apply_edit(graph: AttentionGraph, edit: Edit) -> AttentionGraph:
    """The graph after ``edit`` (pruned)."""
    n_leaf = len(LEAVES)
    nodes = [list(n.to_list()) for n in graph.nodes]
    if edit.kind == "replace":
        nodes[edit.at] = [edit.op, *edit.inputs]
        return AttentionGraph(tuple(Node(n[0], tuple(n[1:])) for n in nodes)).pruned()
    pos = edit.at  # the new node goes before node `at` (value index n_leaf + at)
    shift = lambda i: i + 1 if i >= n_leaf + pos else i
    new_nodes = []
    for j, n in enumerate(nodes):
        if j == pos:
            new_nodes.append([edit.op, *edit.inputs])
        ins = [shift(i) for i in n[1:]]
        if j == pos:
            ins[edit.slot] = n_leaf + pos
        new_nodes.append([n[0], *ins])
    if pos == len(nodes):  # wrap the output
        new_nodes.append([edit.op, *edit.inputs])
    return AttentionGraph(tuple(Node(n[0], tuple(n[1:])) for n in new_nodes)).pruned()


def delete_edits(graph: AttentionGraph) -> list[tuple[int, int]]:
    """(node j, input value x) pairs where node j can be bypassed by its same-typed input x."""
    types = _types(graph)
    n_leaf = len(LEAVES)
    out = []
    last = len(graph.nodes) - 1
    for j, node in enumerate(graph.nodes):
        for x in dict.fromkeys(node.inputs):
            if types[x] == types[n_leaf + j] and not (j == last and x < n_leaf):
                out.append((j, x))
    return out


def apply_delete(graph: AttentionGraph, j: int, x: int) -> AttentionGraph:
    n_leaf = len(LEAVES)
    removed = n_leaf + j
    remap = lambda i: x if i == removed else (i - 1 if i > removed else i)
    nodes = [Node(n.op, tuple(remap(i) for i in n.inputs)) for k, n in enumerate(graph.nodes) if k != j]
    if j == len(graph.nodes) - 1:  # the bypass input becomes the output: move it last
        return _with_output(AttentionGraph(tuple(nodes)), x)
    return AttentionGraph(tuple(nodes)).pruned()


def _with_output(graph: AttentionGraph, value: int) -> AttentionGraph:
    """``graph`` with ``value`` (a node index) as its output."""
    n_leaf = len(LEAVES)
    nodes = list(graph.nodes[: value - n_leaf + 1])
    return AttentionGraph(tuple(nodes)).pruned()


# ---------------------------------------------------------------------- mutation


@dataclasses.dataclass(frozen=True)
class Mutation:
    genome: BertGenome
    kind: str  # op | delete | flip | kernel
    detail: str
    layer: int
    op: str | None = None  # the op chosen by choose_op (kind "op"), else None


def mutate_genome(
    genome: BertGenome,
    rng: np.random.Generator,
    *,
    kernel_sizes: Sequence[int],
    max_nodes: int,
    choose_op: Callable[[Sequence[str], np.random.Generator], str],
    kinds: Sequence[str] = MUTATION_KINDS,
    delete_probability: float = 0.25,
    tries: int = 50,
) -> Mutation:
    """One OP-NAS mutation of ``genome`` (see the module docstring); never returns the parent."""
    for _ in range(tries):
        m = _mutate_once(genome, rng, kernel_sizes, max_nodes, choose_op, kinds, delete_probability)
        if m is not None and m.genome != genome:
            m.genome.validate(kernel_sizes, max_nodes)
            return m
    raise SpecError(f"no applicable mutation of kinds {tuple(kinds)} changes genome {genome.layout!r}")


def _mutate_once(genome, rng, kernel_sizes, max_nodes, choose_op, kinds, delete_probability):
    attn = [i for i, g in enumerate(genome.layers) if g.kind == "attn"]
    conv = [i for i, g in enumerate(genome.layers) if g.kind == "conv"]
    applicable = [
        k for k in kinds if k == "flip" or (k == "op" and attn) or (k == "kernel" and conv and len(kernel_sizes) > 1)
    ]
    if not applicable:
        return None
    kind = applicable[int(rng.integers(len(applicable)))]
    layers = list(genome.layers)
    if kind == "flip":
        i = int(rng.integers(len(layers)))
        if layers[i].kind == "attn":
            k = int(kernel_sizes[int(rng.integers(len(kernel_sizes)))])
            layers[i] = LayerGene("conv", kernel=k)
            return Mutation(BertGenome(tuple(layers)), "flip", f"layer {i + 1}: attention -> conv k={k}", i)
        layers[i] = LayerGene("attn", seed_graph("bert"))
        return Mutation(BertGenome(tuple(layers)), "flip", f"layer {i + 1}: conv -> standard attention", i)
    if kind == "kernel":
        i = conv[int(rng.integers(len(conv)))]
        others = [k for k in kernel_sizes if k != layers[i].kernel]
        k = int(others[int(rng.integers(len(others)))])
        old = layers[i].kernel
        layers[i] = LayerGene("conv", kernel=k)
        return Mutation(BertGenome(tuple(layers)), "kernel", f"layer {i + 1}: kernel {old} -> {k}", i)
    i = attn[int(rng.integers(len(attn)))]
    graph = layers[i].graph
    deletions = delete_edits(graph)
    if deletions and rng.random() < delete_probability:
        j, x = deletions[int(rng.integers(len(deletions)))]
        new = apply_delete(graph, j, x)
        what = LEAVES[x] if x < len(LEAVES) else f"n{x - len(LEAVES)}"
        detail = f"layer {i + 1}: delete node {j} ({graph.nodes[j].op}), bypassed by {what}"
        layers[i] = LayerGene("attn", new)
        return Mutation(BertGenome(tuple(layers)), "delete", detail, i)
    edits = graph_edits(graph, max_nodes)
    if not edits:
        return None
    ops = sorted({e.op for e in edits}, key=OPS.index)
    op = choose_op(ops, rng)
    chosen = [e for e in edits if e.op == op]
    edit = chosen[int(rng.integers(len(chosen)))]
    new = apply_edit(graph, edit)
    try:
        new.validate(max_nodes)
    except SpecError:
        return None
    layers[i] = LayerGene("attn", new)
    what = "insert" if edit.kind == "insert" else f"replace node {edit.at} ({graph.nodes[edit.at].op}) by"
    return Mutation(BertGenome(tuple(layers)), "op", f"layer {i + 1}: {what} {op}", i, op)
