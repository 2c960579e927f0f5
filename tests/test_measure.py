"""Measurement tests: parameter counts against published / analytic values, FLOPs, report."""

import pytest

from nasjax.measure import (
    count_params,
    describe,
    flops_per_token,
    gpt2_layer_params,
    gpt2_non_embedding_params,
    layer_flops_per_token,
    layer_param_counts,
    module_param_counts,
    param_tree_shapes,
    xla_flops,
)
from nasjax.models import get_spec

# BERT-base conventions: d 768, FFN 3072, 12 heads, vocab 30522, 512 positions, 2 token types.
d, f, VOCAB, POS, TYPES = 768, 3072, 30522, 512, 2


def linear(n_in, n_out):
    return n_in * n_out + n_out


LN = 2 * d
EMBEDDINGS = VOCAB * d + POS * d + TYPES * d + LN
FFN = linear(d, f) + linear(f, d)
POOLER = linear(d, d)


def test_bert_base_parameter_count():
    counts = module_param_counts(get_spec("bert", "base"))
    bert_layer = 4 * linear(d, d) + LN + FFN + LN
    assert EMBEDDINGS + 12 * bert_layer == 108_891_648
    assert counts["embed"] + counts["encoder"] == 108_891_648
    assert counts["embed"] + counts["encoder"] + counts["pooler"] == 109_482_240
    # The MLM head (transform + LN + output bias; decoder tied) sits on top.
    assert counts["mlm_head"] == linear(d, d) + LN + VOCAB


def test_autobert_zero_base_parameter_count():
    spec = get_spec("autobert_zero", "base")
    counts = module_param_counts(spec)
    conv_block = lambda k: linear(d, 2 * d) + 12 * k + linear(d, d)  # GLU in_proj, [H, k] kernel, out_proj
    attn_no_v = 3 * linear(d, d)  # layers 2, 4, 6, 8: W_Q, W_K, W_O
    attn = 4 * linear(d, d)  # layers 10, 12
    mixers = sum(conv_block(k) for k in (65, 9, 3, 7, 7, 3)) + 4 * attn_no_v + 2 * attn
    expected = EMBEDDINGS + mixers + 12 * (LN + FFN + LN)
    assert counts["embed"] + counts["encoder"] == expected == 102_986_856
    assert counts["embed"] + counts["encoder"] + counts["pooler"] == expected + POOLER == 103_577_448
    assert abs((expected + POOLER) / 1e6 - 103.6) < 0.05  # methods.md §1(d): ~103.6M (paper: 104M)


def test_gpt2_small_total_is_the_published_count():
    counts = count_params(get_spec("gpt2", "base"))
    assert counts["total"] == 124_439_808  # GPT-2 small (tied embeddings, 1024 positions)
    assert counts["embedding"] == 50257 * 768 + 1024 * 768
    assert counts["non_embedding"] == gpt2_non_embedding_params(768, [12] * 12, [3072] * 12)


def test_gpt2_analytic_formula_matches_heterogeneous_spec():
    heads, inners = [2, 4, 8, 1], [100, 256, 300, 130]
    spec = get_spec("gpt2", "tiny", n_heads=heads, d_inners=inners)
    counts = count_params(spec)
    assert counts["non_embedding"] == gpt2_non_embedding_params(64, heads, inners)
    assert counts["embedding"] == 256 * 64 + 512 * 64
    assert layer_param_counts(spec) == [gpt2_layer_params(64, h, i) for h, i in zip(heads, inners)]
    with pytest.raises(ValueError):
        gpt2_non_embedding_params(64, heads, inners[:2])


def test_untied_lm_head_counts_as_embedding():
    tied = get_spec("vanilla", "tiny")
    untied = tied.replace(tie_embeddings=False)
    a, b = count_params(tied), count_params(untied)
    assert b["embedding"] - a["embedding"] == 64 * 256
    assert b["non_embedding"] == a["non_embedding"]
    # The shared T5 relative bias table is [32 buckets, 4 heads], non-embedding.
    assert module_param_counts(tied)["relative_bias"] == 32 * 4


def test_param_tree_shapes():
    shapes = param_tree_shapes(get_spec("primer", "tiny"))
    mixer = shapes["decoder"]["layer_1"]["mixer"]
    assert mixer["qk_proj"]["kernel"] == (64, 4, 16)
    assert mixer["q_solo"]["kernel"] == (4, 16, 4, 16)
    assert mixer["k_dconv"]["tap_2"] == (4, 16)
    assert shapes["embed"]["token_embed"]["embedding"] == (256, 64)
    assert set(shapes["decoder"]["layer_0"]["ffn_norm"]) == {"scale", "bias"}


# ----------------------------------------------------------------------------- FLOPs


def test_flops_per_token_gpt2_by_hand():
    dm, ff, vocab, seq = 64, 256, 256, 32
    spec = get_spec("gpt2", "tiny")
    layer = 2 * 3 * dm * dm + 2 * dm * dm + 2 * 2 * seq * dm + 2 * 2 * dm * ff
    assert layer_flops_per_token(spec, seq) == [layer, layer]
    assert flops_per_token(spec, seq) == 2 * layer + 2 * dm * vocab


def test_flops_per_token_mixers_by_hand():
    dm, seq = 64, 16
    primer = get_spec("primer", "tiny")
    # qk_proj + v_proj + q_solo, dconv on K and V, scores + values, o_proj; FFN up/down.
    attn = 2 * dm * dm * 3 + 2 * 3 * dm * 2 + 2 * 2 * seq * dm + 2 * dm * dm
    assert layer_flops_per_token(primer, seq)[0] == attn + 2 * 2 * dm * 256
    pp = get_spec("transformer_pp", "tiny")  # SwiGLU: three FFN matrices
    assert layer_flops_per_token(pp, seq)[0] == 2 * dm * dm * 4 + 2 * 2 * seq * dm + 3 * 2 * dm * 256
    azero = get_spec("autobert_zero", "tiny")
    per_layer = layer_flops_per_token(azero, seq)
    ffn = 2 * 2 * dm * 256
    assert per_layer[0] == 2 * dm * 2 * dm + 2 * 65 * dm + 2 * dm * dm + ffn
    assert per_layer[1] == 2 * dm * dm * 3 + 2 * 2 * seq * dm + ffn  # abz_l2 has no V projection
    assert per_layer[11] == 2 * dm * dm * 4 + 2 * 2 * seq * dm + ffn
    assert flops_per_token(azero, seq) == sum(per_layer) + 2 * dm * dm + 2 * dm * 256
    cls = get_spec("bert", "tiny", head="cls", n_classes=4)
    assert flops_per_token(cls, seq) == sum(layer_flops_per_token(cls, seq)) + (2 * dm * dm + 2 * dm * 4) // seq


def test_xla_flops_close_to_analytic():
    spec = get_spec("gpt2", "tiny")
    batch, seq = 2, 32
    analytic = flops_per_token(spec, seq) * batch * seq
    counted = xla_flops(spec, batch, seq)
    # XLA also counts element-wise work (softmax, gelu, norms), so it is a little higher.
    assert 1.0 <= counted / analytic < 1.25


# ----------------------------------------------------------------------------- report


def test_describe_bert_and_autobert_zero():
    spec = get_spec("bert", "base")
    text = describe(spec, seq_len=128)
    counts = count_params(spec)
    assert f"total {counts['total']:,}" in text and "embedding 23,837,184" in text
    assert "attn H=12 K=64" in text and "3072 gelu" in text and "post/post" in text
    assert len(text.splitlines()) == 12 + 5
    azero = describe(get_spec("autobert_zero", "tiny"), seq_len=64)
    assert "glu_conv k=65 H=4" in azero and "abz_l2 H=4 K=16 (no V)" in azero and "abz_l12 H=4 K=16 +bias" in azero
    primer = describe(get_spec("primer", "tiny"))
    assert "attn H=4 K=16 dconv3 sharedQK" in primer and "pre/branch" in primer
    assert "train ~3x" in primer


def test_param_shapes_assembled_from_pieces_equal_the_model_init():
    """Shapes of pieces (cached across specs) make exactly Transformer.init's tree."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from nasjax.genome.primer import primer_ez_program, program_model_spec
    from nasjax.measure import params as P
    from nasjax.models.transformer import build

    specs = [
        # a Primer program layer with branched (vmapped) parameters
        program_model_spec(
            primer_ez_program(2, 32, 64), base_dim=16, d_model=32, n_layers=2, vocab_size=50, max_len=16
        ),
        get_spec("gpt2", "tiny", vocab_size=50, max_len=32, n_heads=[2, 4, 8], d_inners=[96, 128, 96]),
        get_spec("gpt2", "tiny", vocab_size=50, max_len=32, tie_embeddings=False),
        get_spec("gpt2", "tiny", vocab_size=50, max_len=32, dropout_rate=0.1),
    ]
    for spec in specs:
        length = min(8, spec.max_len)
        pieces = P._piece_shapes(spec, length)
        assert pieces is not None
        model, tokens = build(spec), jnp.zeros((1, length), jnp.int32)
        whole = nn.unbox(jax.eval_shape(model.init, {"params": jax.random.key(0)}, tokens))["params"]
        flat = traverse_util.flatten_dict(whole)
        assert pieces == tuple(sorted((k, tuple(v.shape)) for k, v in flat.items()))
    # models the pieces do not cover (relative position biases, an MLM head) are traced whole
    assert P._piece_shapes(get_spec("vanilla", "tiny"), 8) is None
    assert P._piece_shapes(get_spec("bert", "tiny"), 8) is None


def test_piece_shape_cache_holds_digests_not_programs():
    """The per-piece cache is keyed by digests of the pieces' keys: it keeps no genome alive,
    equal pieces share an entry, and pieces that differ in one field do not."""
    import gc

    from nasjax.genome.primer import primer_ez_program, program_model_spec
    from nasjax.genome.program import Program
    from nasjax.measure import params as P

    P._PIECE_SHAPES.clear()
    spec = program_model_spec(primer_ez_program(2, 32, 64), base_dim=16, d_model=32, n_layers=2, vocab_size=50,
                              max_len=16)  # fmt: skip
    wider = program_model_spec(primer_ez_program(2, 32, 96), base_dim=16, d_model=32, n_layers=2, vocab_size=50,
                               max_len=16)  # fmt: skip
    before = P._piece_shapes(spec, 8)
    n = len(P._PIECE_SHAPES)
    assert n == 3  # embedding, one entry for both (equal) layers, final norm
    assert all(isinstance(k, bytes) and len(k) == 32 for k in P._PIECE_SHAPES)
    assert P._piece_shapes(spec, 8) == before and len(P._PIECE_SHAPES) == n  # all hits
    assert P._piece_shapes(wider, 8) != before and len(P._PIECE_SHAPES) == n + 1  # only the layer differs
    # nothing the cache holds reaches a Program
    seen, todo = set(), [P._PIECE_SHAPES._items]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        assert not isinstance(o, Program)
        todo.extend(r for r in gc.get_referents(o) if not isinstance(r, type))
    # a key that cannot be pickled is used as it is
    key = ("local", lambda: None)
    assert P._digest(key) is key


def _length_dependent_program_spec(max_len: int):
    """A Primer program whose parameter shapes depend on the sequence length: T_MAT_MUL
    makes a state of width L, and a CONV_1X1 of it has an L x W kernel."""
    from nasjax.genome.primer import program_model_spec
    from nasjax.genome.program import Instruction, Program, Subprogram

    main = Subprogram(
        (Instruction("T_MAT_MUL", 1, 1), Instruction("CONV_1X1", 1, dim=0), Instruction("ADD", 1, 3)), 1, "main"
    )
    return program_model_spec(Program((main,), (1.0,), (1,)), base_dim=16, d_model=16, n_layers=1,
                              vocab_size=50, max_len=max_len)  # fmt: skip


def test_parameter_count_is_at_the_model_length():
    """count_params counts at the spec's max_len: the parameters a model of that length has
    (a length-dependent program counted at 8 tokens undercounted its L-wide kernels)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nasjax.models.transformer import build

    spec = _length_dependent_program_spec(32)
    tokens = jnp.zeros((1, spec.max_len), jnp.int32)
    whole = jax.eval_shape(build(spec).init, {"params": jax.random.key(0)}, tokens)["params"]
    want = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(whole)))
    assert count_params(spec)["total"] == want
    assert count_params(_length_dependent_program_spec(8))["total"] < want


def test_abstract_state_from_pieces_equals_the_whole_model_trace():
    """Trainer's abstract state and shardings built from the per-piece cache (given the
    spec) equal those of the whole model's eval_shape: boxes, shapes, dtypes, optimizer
    state and NamedShardings, at the training length."""
    import jax

    from nasjax import sharding as shd
    from nasjax.config import base_config
    from nasjax.genome.primer import primer_ez_program, program_model_spec
    from nasjax.models.transformer import build
    from nasjax.train.optim import make_optimizer
    from nasjax.train.state import state_shardings

    specs = [
        _length_dependent_program_spec(24),
        program_model_spec(
            primer_ez_program(2, 32, 64), base_dim=16, d_model=32, n_layers=2, vocab_size=50, max_len=16
        ),  # fmt: skip
        get_spec("gpt2", "tiny", vocab_size=50, max_len=32, n_heads=[2, 4, 8], d_inners=[96, 128, 96]),
    ]
    mesh = shd.make_mesh((-1, 1, 1))
    for optimizer in ("adamw", "adafactor"):
        cfg = base_config().train
        cfg.optimizer = optimizer
        tx, _ = make_optimizer(cfg)
        for spec in specs:
            model = build(spec)
            whole = state_shardings(model, tx, spec.max_len, mesh, shd.DEFAULT_RULES)
            pieces = state_shardings(model, tx, spec.max_len, mesh, shd.DEFAULT_RULES, spec=spec)
            assert jax.tree.structure(whole) == jax.tree.structure(pieces)
            assert jax.tree.leaves(whole) == jax.tree.leaves(pieces)
