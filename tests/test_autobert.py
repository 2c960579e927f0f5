"""AutoBERT-Zero: attention graphs, seeds vs the zoo, mutations, UCB, BIWS, the search."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax.genome.attn_graph import (
    LEAVES,
    OPS,
    SEED_GRAPHS,
    UNARY_OPS,
    AttentionGraph,
    GraphAttentionSpec,
    Node,
    random_graph,
    render_graph,
)
from nasjax.genome.autobert import (
    BertGenome,
    LayerGene,
    apply_edit,
    decode_genome,
    graph_edits,
    mutate_genome,
    scaled_kernel,
    seed_genome,
)
from nasjax.layers.attention import MultiHeadAttention
from nasjax.layers.graph_attention import GraphAttention, eval_graph
from nasjax.measure.params import count_params
from nasjax.search.biws import SuperNet, flat_params
from nasjax.search.opnas import OpPriority, rank_reward
from nasjax.spec import AttentionSpec, ModelSpec, SpecError

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KERNELS = (3, 5, 7, 9, 17, 33)


# --------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("name", ["bert", "abz_l2", "abz_l4", "abz_l6", "abz_l10", "abz_l12"])
def test_seed_graphs_equal_zoo_attention(name):
    """Each seed graph, with the zoo module's weights, computes the hand-written variant."""
    variant = "softmax" if name == "bert" else name
    zoo = MultiHeadAttention(AttentionSpec(n_heads=4, use_bias=True, variant=variant))
    graph = GraphAttention(GraphAttentionSpec(n_heads=4, graph=SEED_GRAPHS[name], use_bias=True))
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    params = zoo.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    want = zoo.apply({"params": params}, x, key_bias=jnp.where(mask, 0.0, -10000.0)[:, None, None, :])
    got = graph.apply({"params": params}, x, padding_mask=mask)
    assert set(graph.init(jax.random.key(1), x)["params"]) == set(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


def test_seed_closed_forms():
    """Attn_L2 = softmax(Q softplus(K)^T / s)(Q + K); Attn_L12 = softmax(Q (K/s + V)^T / s) V (methods.md §1(d))."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 1, 5, 4)) for _ in range(3))
    s = 2.0

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    T = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    l2 = softmax(q @ T(softplus(k)) / s) @ (q + k)
    l12 = softmax(q @ T(k / s + v) / s) @ v
    f = lambda g: np.asarray(eval_graph(SEED_GRAPHS[g], *(jnp.asarray(a, jnp.float32) for a in (q, k, v))))  # noqa: E731
    np.testing.assert_allclose(f("abz_l2"), l2, rtol=1e-5)
    np.testing.assert_allclose(f("abz_l12"), l12, rtol=1e-5)
    assert not SEED_GRAPHS["abz_l2"].uses_value and SEED_GRAPHS["abz_l12"].uses_value


def test_render_seeds_like_the_paper():
    assert render_graph(SEED_GRAPHS["bert"]) == "O = softmax(Q·K^T/√d)·V"
    assert render_graph(SEED_GRAPHS["abz_l2"]) == "O = softmax(Q·softplus(K^T)/√d)·(Q + K)"
    assert render_graph(SEED_GRAPHS["abz_l12"]) == "O = softmax(Q·(K/√d + V)^T/√d)·V"
    assert render_graph(SEED_GRAPHS["abz_l6"]) == "O = softmax(Q·softplus(-K^T)/√d)·Q"


def _random_nodes(rng, n):
    nodes = []
    for j in range(n):
        op = str(OPS[int(rng.integers(len(OPS)))])
        arity = 1 if op in UNARY_OPS else 2
        nodes.append(Node(op, tuple(int(rng.integers(len(LEAVES) + j)) for _ in range(arity))))
    return AttentionGraph(tuple(nodes))


def test_random_graphs_type_check_or_are_rejected():
    """Arbitrary node lists either validate (and evaluate to [B, H, n, d]) or raise SpecError."""
    rng = np.random.default_rng(0)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 6, 4)) for i in range(3))
    valid = 0
    for _ in range(400):
        graph = _random_nodes(rng, int(rng.integers(1, 8)))
        try:
            graph.validate(max_nodes=8)
        except SpecError:
            continue
        valid += 1
        out = eval_graph(graph, q, k, v if graph.uses_value else None)
        assert out.shape == (2, 3, 6, 4)
    assert valid > 10
    for _ in range(100):  # the generator only makes valid graphs
        g = random_graph(rng, max_nodes=8)
        g.validate(max_nodes=8)


def test_padding_never_leaks_into_real_tokens():
    """For any valid graph, changing Q/K/V at padded positions leaves real outputs unchanged."""
    rng = np.random.default_rng(1)
    key_valid = (jnp.arange(8) < 5)[None, None, None, :]
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 2, 8, 4)) for i in range(3))
    noise = lambda x, i: x.at[:, :, 5:].add(3.0 * jax.random.normal(jax.random.key(10 + i), (1, 2, 3, 4)))  # noqa: E731
    checked = 0
    for name, graph in list(SEED_GRAPHS.items()) + [(str(i), random_graph(rng, 8)) for i in range(60)]:
        a = np.asarray(eval_graph(graph, q, k, v, key_valid))[:, :, :5]
        b = np.asarray(eval_graph(graph, noise(q, 0), noise(k, 1), noise(v, 2), key_valid))[:, :, :5]
        if np.isfinite(a).all() and np.isfinite(b).all():
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"graph {name}: {render_graph(graph)}")
            checked += 1
    assert checked > 40


def test_graph_json_round_trip_and_errors():
    g = SEED_GRAPHS["abz_l10"]
    assert AttentionGraph.from_list(json.loads(json.dumps(g.to_list()))) == g
    with pytest.raises(SpecError, match=r"genome\[1\].attn: node 0 \(matmul\): does not type-check"):
        BertGenome.from_json([{"conv": 3}, {"attn": [["matmul", 0, 1]]}])
    with pytest.raises(SpecError, match="not \\[n,d\\]"):
        AttentionGraph.from_list([["matmul", 0, 4]])
    with pytest.raises(SpecError, match="kernel size must be a positive odd"):
        BertGenome.from_json([{"conv": 4}])
    with pytest.raises(SpecError, match="unknown op 'frobnicate'"):
        AttentionGraph.from_list([["frobnicate", 0]])
    spec = decode_genome(seed_genome("autobert_zero", 4, 64, KERNELS), size="tiny", vocab_size=262, max_len=64)
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="bidirectional"):
        spec.replace(kind="decoder", head="lm")


# --------------------------------------------------------------------------- genomes


def test_seed_genomes_and_kernel_scaling():
    assert scaled_kernel(65, 64, KERNELS) == 33 and scaled_kernel(9, 64, KERNELS) == 5
    abz = seed_genome("autobert_zero", 12, 128, (3, 5, 7, 9, 15, 31, 65))
    assert abz.layout == "C65 A C9 A C3 A C7 A C7 A C3 A"
    assert [g.graph for g in abz.layers[1::2]] == [SEED_GRAPHS[n] for n in ("abz_l2", "abz_l4", "abz_l6", "abz_l6")] + [
        SEED_GRAPHS["abz_l10"],
        SEED_GRAPHS["abz_l12"],
    ]
    assert seed_genome("autobert_zero", 4, 64, KERNELS).layout == "C33 A C3 A"  # pairs 1 and 4 of 6
    assert seed_genome("all_conv", 3, 64, KERNELS).layout == "C9 C9 C9"


def test_parameter_counts_follow_the_formulas():
    """Graph layers = BERT attention (4(d^2 + d)) minus W_V when V is unused; conv = 3d^2 + 3d + H k."""
    d, h, n = 64, 4, 4
    kw = dict(size="tiny", vocab_size=262, max_len=64)
    bert = count_params(decode_genome(seed_genome("bert", n, 64, KERNELS), **kw))["total"]
    layers = [LayerGene("attn", SEED_GRAPHS["abz_l6"])] + [LayerGene("attn", SEED_GRAPHS["bert"])] * 3
    no_v = count_params(decode_genome(BertGenome(tuple(layers)), **kw))["total"]
    assert bert - no_v == d * d + d
    conv = BertGenome((LayerGene("conv", kernel=9),) + (LayerGene("attn", SEED_GRAPHS["bert"]),) * 3)
    conv_count = count_params(decode_genome(conv, **kw))["total"]
    assert conv_count - bert == (2 * d * d + 2 * d + d * d + d + h * 9) - 4 * (d * d + d)


def test_mutations_are_valid_new_and_bounded():
    rng = np.random.default_rng(0)
    chosen = []

    def choose(ops, r):
        assert ops and set(ops) <= set(OPS)
        op = ops[int(r.integers(len(ops)))]
        chosen.append(op)
        return op

    kinds = set()
    for name in ("bert", "autobert_zero", "all_conv"):
        genome = seed_genome(name, 4, 64, KERNELS)
        for _ in range(150):
            m = mutate_genome(genome, rng, kernel_sizes=KERNELS, max_nodes=10, choose_op=choose)
            assert m.genome != genome
            m.genome.validate(KERNELS, max_nodes=10)
            assert BertGenome.from_json(json.loads(json.dumps(m.genome.to_json()))) == m.genome
            assert (m.op is not None) == (m.kind == "op")
            kinds.add(m.kind)
            genome = m.genome
    assert kinds == {"op", "delete", "flip", "kernel"}
    assert len(set(chosen)) >= 10  # every kind of op gets inserted somewhere


def test_graph_edits_keep_types():
    g = SEED_GRAPHS["bert"]
    edits = graph_edits(g, max_nodes=16)
    assert {e.op for e in edits} == set(OPS)
    for e in edits:
        apply_edit(g, e).validate(max_nodes=16)
    assert graph_edits(g, max_nodes=len(g.nodes))  # replacements remain at the bound
    assert all(e.kind == "replace" for e in graph_edits(g, max_nodes=len(g.nodes)))


# --------------------------------------------------------------------------- UCB


def test_ucb_bookkeeping_on_a_scripted_sequence():
    p = OpPriority(("add", "mul", "neg"), alpha=0.5, selection="argmax")
    rng = np.random.default_rng(0)
    assert p.choose(["add", "mul"], rng) in ("add", "mul")  # untried first
    script = [("add", 1.0), ("add", 0.0), ("mul", 0.5), (None, None), ("add", 1.0)]
    for op, r in script:
        p.observe(op, r)
    assert p.total == 5 and p.count == {"add": 3, "mul": 1, "neg": 0}
    assert p.mean("add") == pytest.approx(2 / 3) and p.mean("mul") == 0.5
    assert p.priority("add") == pytest.approx(2 / 3 + 0.5 * math.sqrt(2 * math.log(5) / 3))
    assert p.priority("mul") == pytest.approx(0.5 + 0.5 * math.sqrt(2 * math.log(5) / 1))
    assert p.priority("neg") == math.inf
    assert p.choose(["add", "mul", "neg"], rng) == "neg"
    assert p.choose(["add", "mul"], rng) == "mul"  # 1.397 > 1.130
    table = p.table()
    assert table["neg"] == {"n": 0, "mu": 0.0, "u": None} and table["add"]["n"] == 3
    soft = OpPriority(("add", "mul"), alpha=0.0, temperature=0.05)
    soft.observe("add", 1.0)
    soft.observe("mul", 0.0)
    picks = [soft.choose(["add", "mul"], np.random.default_rng(i)) for i in range(200)]
    assert picks.count("add") > 190


def test_rank_reward():
    assert rank_reward(0.3, [0.1, 0.2, 0.4, 0.5]) == 0.5
    assert rank_reward(0.0, [0.1, math.inf]) == 1.0
    assert rank_reward(math.inf, [0.1]) == 0.0 and rank_reward(0.2, []) == 0.5


# --------------------------------------------------------------------------- BIWS


def _params(genome, seed=0):
    from nasjax.models import build

    spec = decode_genome(genome, size="tiny", vocab_size=262, max_len=32)
    return jax.device_get(build(spec).init(jax.random.key(seed), jnp.zeros((1, 32), jnp.int32))["params"])


def test_biws_inherits_the_right_slices_and_writes_back():
    n = 2
    attn_g = BertGenome((LayerGene("attn", SEED_GRAPHS["bert"]),) * n)
    conv_g = BertGenome((LayerGene("conv", kernel=9),) * n)
    sn = SuperNet.initial(_params(attn_g, 0), _params(conv_g, 1))
    child = BertGenome((LayerGene("conv", kernel=5), LayerGene("attn", SEED_GRAPHS["abz_l6"])))
    kinds = ("conv", "attn")
    fresh = _params(child, 7)
    inherited, copied, missing = sn.inherit(fresh, kinds)
    flat, arrays = flat_params(inherited), sn.arrays
    assert not missing and copied == len(flat)
    k9 = arrays["conv:encoder/layer_0/mixer/conv/kernel"]
    np.testing.assert_array_equal(flat["encoder/layer_0/mixer/conv/kernel"], k9[:, 2:7])  # centred 5 of 9
    for name in ("q_proj", "k_proj", "o_proj"):
        np.testing.assert_array_equal(
            flat[f"encoder/layer_1/mixer/{name}/kernel"], arrays[f"attn:encoder/layer_1/mixer/{name}/kernel"]
        )
    assert "encoder/layer_1/mixer/v_proj/kernel" not in flat  # abz_l6 has no W_V
    np.testing.assert_array_equal(flat["encoder/layer_0/ffn/up/kernel"], arrays["shared:encoder/layer_0/ffn/up/kernel"])
    np.testing.assert_array_equal(
        flat["encoder/layer_0/mixer_norm/scale"], arrays["conv:encoder/layer_0/mixer_norm/scale"]
    )
    # write back: only the slices the child used change
    trained = jax.tree.map(lambda x: x + 1.0, inherited)
    v_before = arrays["attn:encoder/layer_1/mixer/v_proj/kernel"].copy()
    k_before = k9.copy()
    sn.update(trained, kinds, rate=0.5)
    k_after = sn.arrays["conv:encoder/layer_0/mixer/conv/kernel"]
    np.testing.assert_allclose(k_after[:, 2:7], k_before[:, 2:7] + 0.5)
    np.testing.assert_array_equal(k_after[:, :2], k_before[:, :2])
    np.testing.assert_array_equal(sn.arrays["attn:encoder/layer_1/mixer/v_proj/kernel"], v_before)
    assert sn.version == 1


def test_supernet_file_round_trip_and_corruption(tmp_path):
    from nasjax.search.biws import SuperNetError

    sn = SuperNet({"shared:a/b": np.arange(6.0).reshape(2, 3)}, version=4)
    path = str(tmp_path / "s.npz")
    sn.save(path)
    back = SuperNet.load(path)
    assert back.version == 4 and np.array_equal(back.arrays["shared:a/b"], sn.arrays["shared:a/b"])
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(SuperNetError, match="corrupt"):
        SuperNet.load(path)
    with pytest.raises(SuperNetError, match="missing"):
        SuperNet.load(str(tmp_path / "nope.npz"))


# --------------------------------------------------------------------------- the search


def test_autobert_search_resumes_and_exports(autobert_config, tmp_path):
    from nasjax.search.journal import read_journal
    from nasjax.search.results import export_results
    from nasjax.search.run import run_search

    workdir = str(tmp_path / "ab")
    first = run_search(autobert_config(**{"search.max_evaluations": 3}), workdir, log=lambda *_: None)
    assert first.status == "finished" and first.evaluations == 3
    assert os.path.exists(os.path.join(workdir, "supernet", "supernet_000002.npz"))
    second = run_search(autobert_config(**{"search.max_evaluations": 5}), workdir, log=lambda *_: None)
    assert second.evaluations == 5
    recs = read_journal(os.path.join(workdir, "journal.jsonl"))
    started = [r["id"] for r in recs if r["event"] == "started"]
    assert started == sorted(set(started)) == list(range(5))  # nothing evaluated twice
    results = {r["id"]: r for r in recs if r["event"] in ("finished", "failed")}
    assert all(r["event"] == "finished" for r in results.values()), results
    supernet = {r["id"]: r["version"] for r in recs if r["event"] == "supernet"}
    assert supernet[0] == 1 and results[0]["inherited"] > 0  # told in id order, one update each
    assert [supernet[i] for i in sorted(supernet)] == list(range(1, len(supernet) + 1))
    proposed = {r["id"]: r for r in recs if r["event"] == "proposed"}
    assert proposed[4]["origin"] in ("op", "delete", "flip", "kernel")
    assert all(0.0 <= v <= 1.0 for v in results[0]["accuracy"].values())
    ucb = [r for r in recs if r["event"] == "ucb"]
    assert len(ucb) == 5 and ucb[-1]["total"] == 5
    summary = export_results(workdir, log=lambda *_: None)
    assert summary.evaluations == 5
    names = {os.path.basename(f) for f in summary.files}
    assert {"results.csv", "best_spec.json", "architectures.txt", "ucb.csv"} <= names
    text = open(os.path.join(workdir, "architectures.txt")).read()
    assert "O = softmax(Q·K^T/√d)·V" in text
    ModelSpec.from_json(open(os.path.join(workdir, "best_spec.json")).read())


def test_autobert_search_without_biws_and_bad_config(autobert_config, tmp_path):
    from nasjax.search.run import run_search

    workdir = str(tmp_path / "nobiws")
    out = run_search(
        autobert_config(**{"autobert.biws": False, "search.max_evaluations": 2}), workdir, log=lambda *_: None
    )
    assert out.evaluations == 2 and not os.path.exists(os.path.join(workdir, "supernet"))
    with pytest.raises(SpecError, match="kernel_sizes must be positive odd"):
        run_search(autobert_config(**{"autobert.kernel_sizes": (3, 4)}), str(tmp_path / "bad"), log=lambda *_: None)


def test_graph_flops_and_describe():
    from nasjax.measure.flops import mixer_flops_per_token
    from nasjax.measure.report import mixer_summary

    bert = GraphAttentionSpec(4, SEED_GRAPHS["bert"])
    assert mixer_flops_per_token(bert, 64, 128) == mixer_flops_per_token(AttentionSpec(4, use_bias=True), 64, 128)
    # abz_l6: no V projection, the same two n x n matmuls
    l6 = mixer_flops_per_token(GraphAttentionSpec(4, SEED_GRAPHS["abz_l6"]), 64, 128)
    assert mixer_flops_per_token(bert, 64, 128) - l6 == 2 * 64 * 64
    assert mixer_summary(GraphAttentionSpec(4, SEED_GRAPHS["abz_l6"]), 64).endswith(
        "O = softmax(Q·softplus(-K^T)/√d)·Q"
    )


def test_crash_after_supernet_save_resumes_on_the_same_trajectory(autobert_config, tmp_path):
    """A kill between the supernet write-back and the journal record: the resumed search
    reloads the supernet version its journal knows and re-evaluates the candidate to the
    same result."""
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    workdir = str(tmp_path / "crash")
    cfg = autobert_config(**{"search.max_evaluations": 2, "search.fec": False})
    run_search(cfg, workdir, log=lambda *_: None)
    path = os.path.join(workdir, "journal.jsonl")
    lines = open(path).read().splitlines()
    recs = [json.loads(x) for x in lines]
    original = next(r for r in recs if r["event"] == "finished" and r["id"] == 1)
    assert [(r["id"], r["version"]) for r in recs if r["event"] == "supernet"] == [(0, 1), (1, 2)]
    cut = next(i for i, r in enumerate(recs) if r["event"] == "finished" and r["id"] == 1)
    with open(path, "w") as f:  # candidate 1 was "in flight": its supernet file exists, its record does not
        f.write("\n".join(lines[:cut]) + "\n")
    run_search(cfg, workdir, log=lambda *_: None)
    again = next(r for r in read_journal(path) if r["event"] == "finished" and r["id"] == 1)
    assert [(r["id"], r["version"]) for r in read_journal(path) if r["event"] == "supernet"] == [(0, 1), (1, 2)]
    assert again["mlm_loss"] == pytest.approx(original["mlm_loss"], rel=1e-5)
    assert again["accuracy"] == original["accuracy"]


def test_crash_between_result_and_supernet_write_back_loses_nothing(autobert_config, tmp_path, monkeypatch):
    """The child's weights are on disk before its result is journaled: a crash before the
    supernet update is finished on resume, and the search continues as if uninterrupted."""
    from nasjax.search.autobert import _AutoBertController
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    cfg = autobert_config(**{"search.max_evaluations": 4, "search.fec": False})
    run_search(cfg, str(tmp_path / "ref"), log=lambda *_: None)
    original = _AutoBertController._write_back
    calls = []

    def crash_once(self, cid):
        if cid == 1 and not calls:
            calls.append(cid)
            raise RuntimeError("killed before the write-back")
        return original(self, cid)

    monkeypatch.setattr(_AutoBertController, "_write_back", crash_once)
    workdir = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="killed before the write-back"):
        run_search(cfg, str(workdir), log=lambda *_: None)
    assert (workdir / "supernet" / "child_000001.npz").exists()
    logs = []
    run_search(cfg, str(workdir), log=logs.append)
    assert any("applying candidate 1's weights" in line for line in logs)
    assert not (workdir / "supernet" / "child_000001.npz").exists()

    def outcome(d):
        recs = read_journal(str(d / "journal.jsonl"))
        done = {r["id"]: (r.get("mlm_loss"), r.get("accuracy")) for r in recs if r["event"] == "finished"}
        return done, [(r["id"], r["version"]) for r in recs if r["event"] == "supernet"]

    got, want = outcome(workdir), outcome(tmp_path / "ref")
    assert got[1] == want[1]
    assert sorted(got[0]) == sorted(want[0])
    for cid, (loss, acc) in want[0].items():
        assert got[0][cid][0] == pytest.approx(loss, rel=1e-5) and got[0][cid][1] == acc
