"""Model tests: causality, the call contract, parameter paths, the zoo, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax.measure import count_params
from nasjax.models import SIZES, ZOO_NAMES, build, get_spec
from nasjax.spec import AttentionSpec, BlockSpec, ConvSpec, FFNSpec, ModelSpec, SpecError

B, L, D, V = 2, 8, 32, 40


def _decoder(mixers, positions="learned", **kw):
    layers = tuple(BlockSpec(m, FFNSpec(d_ff=48, activation="squared_relu")) for m in mixers)
    return ModelSpec(kind="decoder", vocab_size=V, d_model=D, max_len=16, layers=layers, positions=positions, **kw)


def _tokens(seed=0, shape=(B, L), vocab=V):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _init(spec, tokens, seed=1, dtype=jnp.float32):
    """The real initialiser (eager, so it compiles one kernel per parameter shape)."""
    model = build(spec, dtype=dtype)
    return model, model.init({"params": jax.random.key(seed)}, tokens)


def _abstract(spec, tokens, dtype=jnp.float32):
    """What ``init`` returns, as ShapeDtypeStructs (still boxed with logical names); no compile."""
    model = build(spec, dtype=dtype)
    return jax.eval_shape(lambda t: model.init({"params": jax.random.key(0)}, t), tokens)


def _random_init(spec, tokens, seed=1, dtype=jnp.float32, scale=0.1):
    """Random parameters of the right (boxed) structure, from eval_shape and NumPy: no compile.

    Random norm scales, dconv taps and biases also exercise paths an init leaves at 0 / 1.
    """
    model = build(spec, dtype=dtype)
    abstract = _abstract(spec, tokens, dtype)
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), abstract)


# ----------------------------------------------------------------------------- causality

CAUSAL_CASES = {
    "softmax": _decoder([AttentionSpec(4)]),
    "mdha_relative": _decoder([AttentionSpec(4, dconv_kernel=3)], positions="relative"),
    "shared_qk_primer": _decoder([AttentionSpec(4, dconv_kernel=3, shared_qk=True)], positions="relative"),
    "abz_l2": _decoder([AttentionSpec(4, variant="abz_l2")]),
    "abz_l4": _decoder([AttentionSpec(4, variant="abz_l4")]),
    "abz_l6": _decoder([AttentionSpec(4, variant="abz_l6")]),
    "abz_l10": _decoder([AttentionSpec(4, variant="abz_l10")]),
    "abz_l12": _decoder([AttentionSpec(4, variant="abz_l12")]),
    "glu_conv": _decoder([ConvSpec(kernel_size=5, n_heads=4), ConvSpec(kernel_size=4, n_heads=4)], positions="none"),
    "rotary": _decoder([AttentionSpec(4)], positions="rotary"),
    "sinusoidal_mixed": _decoder([ConvSpec(kernel_size=4, n_heads=2), AttentionSpec(2)], positions="sinusoidal"),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_decoder_causality_by_gradients(case):
    """d logits[t] / d input_embedding[t'] == 0 exactly for every t' > t."""
    spec = CAUSAL_CASES[case]
    tokens = _tokens(shape=(1, L))
    model, variables = _random_init(spec, tokens)
    readout = jnp.asarray(np.random.default_rng(2).standard_normal(V), jnp.float32)

    def f(pert):
        logits = model.apply({"params": variables["params"], "perturbations": {"embeddings": pert}}, tokens)
        return logits[0] @ readout

    jac = jax.jit(jax.jacrev(f))(jnp.zeros((1, L, D)))  # [L_out, 1, L_in, D]
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))
    assert np.all(dep[np.triu_indices(L, 1)] == 0.0), dep
    assert np.all(np.diag(dep) > 0) and dep[-1, 0] > 0  # gradients do flow, from the past


def test_perturbation_hook_is_a_noop_without_the_collection():
    spec = CAUSAL_CASES["softmax"]
    tokens = _tokens()
    assert set(_abstract(spec, tokens)) == {"params"}  # init creates no perturbation variables
    model, variables = _random_init(spec, tokens)
    pert = {"embeddings": jnp.zeros((B, L, D))}
    np.testing.assert_array_equal(
        model.apply(variables, tokens), model.apply({**variables, "perturbations": pert}, tokens)
    )


# ----------------------------------------------------------------------------- norm placement


@pytest.mark.parametrize("placement", ["pre", "post", "branch"])
def test_norm_placement_equations(placement):
    spec = ModelSpec(
        kind="decoder",
        vocab_size=V,
        d_model=D,
        layers=(BlockSpec(ConvSpec(kernel_size=3, n_heads=4), ffn=None, mixer_norm=placement),),
        positions="none",
        final_norm=False,
    )
    tokens = _tokens()
    model, variables = _random_init(spec, tokens)
    _, state = model.apply(variables, tokens, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    x0 = inter["embed"]["__call__"][0]
    layer = inter["decoder"]["layer_0"]
    out, mix, normed = layer["__call__"][0], layer["mixer"]["__call__"][0], layer["mixer_norm"]["__call__"][0]
    norm = lambda y: nn.LayerNorm(epsilon=spec.norm_eps).apply(
        {"params": variables["params"]["decoder"]["layer_0"]["mixer_norm"]}, y
    )
    if placement == "pre":  # x + F(N(x))
        np.testing.assert_allclose(normed, norm(x0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, x0 + mix, rtol=1e-6)
    elif placement == "post":  # N(x + F(x))
        np.testing.assert_allclose(normed, norm(x0 + mix), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out, normed)
    else:  # x + N(F(x))
        np.testing.assert_allclose(normed, norm(mix), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, x0 + normed, rtol=1e-6)


# ----------------------------------------------------------------------------- contract


def test_parameter_paths_and_logical_names():
    spec = _decoder(
        [AttentionSpec(4, dconv_kernel=3, shared_qk=True), ConvSpec(kernel_size=3, n_heads=4)],
        positions="relative",
        tie_embeddings=False,
    )
    tokens = _tokens()
    params = _abstract(spec, tokens)["params"]
    assert set(params) == {"embed", "relative_bias", "decoder", "final_norm", "lm_head"}
    assert set(params["embed"]) == {"token_embed"}
    assert set(params["decoder"]["layer_0"]) == {"mixer", "mixer_norm", "ffn", "ffn_norm"}
    assert set(params["decoder"]["layer_0"]["mixer"]) == {"qk_proj", "q_solo", "k_dconv", "v_proj", "v_dconv", "o_proj"}
    assert set(params["decoder"]["layer_1"]["mixer"]) == {"in_proj", "conv", "out_proj"}
    assert set(params["decoder"]["layer_1"]["ffn"]) == {"up", "down"}
    assert params["relative_bias"]["embedding"].value.shape == (32, 4)
    allowed = {"embed", "mlp", "heads", "kv", "vocab", None}
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed
        assert leaf.value.dtype == jnp.float32


def test_init_values():
    """Dense and embedding weights N(0, init_std), biases 0, norm scales 1, dconv 0.5 / (0.5 / k)."""
    spec = _decoder([AttentionSpec(4, dconv_kernel=3, use_bias=True)], init_std=0.05)
    _, variables = _init(spec, _tokens())
    p = nn.unbox(variables)["params"]
    layer = p["decoder"]["layer_0"]
    assert abs(float(jnp.std(p["embed"]["token_embed"]["embedding"])) - 0.05) < 0.01
    assert abs(float(jnp.std(layer["ffn"]["up"]["kernel"])) - 0.05) < 0.01
    assert abs(float(jnp.mean(layer["mixer"]["q_proj"]["kernel"]))) < 0.01
    np.testing.assert_array_equal(layer["mixer"]["q_proj"]["bias"], 0.0)
    np.testing.assert_array_equal(layer["ffn"]["down"]["bias"], 0.0)
    np.testing.assert_array_equal(layer["mixer_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(layer["mixer"]["v_dconv"]["tap_0"], 0.5)
    np.testing.assert_allclose(layer["mixer"]["v_dconv"]["tap_2"], 0.5 / 3)


def test_bert_heads_and_paths():
    spec = get_spec("bert", "tiny", n_layers=1)
    tokens = _tokens(vocab=spec.vocab_size)
    model, variables = _random_init(spec, tokens)
    params = variables["params"]
    assert set(params) == {"embed", "encoder", "pooler", "mlm_head"}
    assert set(params["embed"]) == {"token_embed", "position_embed", "type_embed", "norm"}
    assert set(params["mlm_head"]) == {"transform", "norm", "bias"}
    assert model.apply(variables, tokens).shape == (B, L, spec.vocab_size)
    cls = spec.replace(head="cls", n_classes=3)
    model, variables = _random_init(cls, tokens)
    assert {"pooler", "classifier"} <= set(variables["params"])
    assert model.apply(variables, tokens, segment_ids=jnp.ones_like(tokens)).shape == (B, 3)


def test_intermediates_hold_qkv_for_distillation():
    spec = get_spec("bert", "tiny")
    tokens = _tokens(vocab=spec.vocab_size)
    model, variables = _random_init(spec, tokens)
    _, state = model.apply(variables, tokens, mutable=["intermediates"])
    mixer = state["intermediates"]["encoder"]["layer_1"]["mixer"]
    assert {k: v[0].shape for k, v in mixer.items()} == {k: (B, L, 64) for k in "qkv"}


def test_dropout_only_when_not_deterministic():
    spec = get_spec("gpt2", "tiny", vocab_size=V, n_layers=1)  # dropout 0.1 / 0.1
    tokens = _tokens()
    model, variables = _random_init(spec, tokens)
    no_drop = build(spec.replace(dropout_rate=0.0, attention_dropout_rate=0.0))
    det = model.apply(variables, tokens)
    np.testing.assert_array_equal(det, no_drop.apply(variables, tokens))
    r1 = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(5)})
    r2 = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(r1, det) and not np.allclose(r1, r2)


def test_bfloat16_activations_keep_float32_params_and_logits():
    spec = get_spec("primer", "tiny", vocab_size=V, n_layers=1)
    tokens = _tokens()
    abstract = _abstract(spec, tokens, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(abstract)))
    model, variables = _random_init(spec, tokens, dtype=jnp.bfloat16)
    logits = jax.jit(model.apply)(variables, tokens)
    ref = jax.jit(build(spec).apply)(variables, tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


# ----------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_builds_under_eval_shape_and_round_trips(name, size):
    spec = get_spec(name, size)
    counts = count_params(spec)  # jax.eval_shape of init: no compile, no allocation
    assert counts["total"] > counts["non_embedding"] > 0
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.architecture_hash() == spec.architecture_hash()
    assert spec.d_model == SIZES[size]["d_model"]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_tiny_zoo_forward_jit_equals_eager(name):
    spec = get_spec(name, "tiny")
    tokens = _tokens(vocab=spec.vocab_size, shape=(B, 16))
    model, variables = _random_init(spec, tokens)
    eager = model.apply(variables, tokens)
    jitted = jax.jit(model.apply)(variables, tokens)
    assert eager.shape == (B, 16, spec.vocab_size)
    assert bool(jnp.all(jnp.isfinite(eager)))
    np.testing.assert_allclose(eager, jitted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "autobert_zero"])
def test_encoder_padding_does_not_leak(name):
    spec = get_spec(name, "tiny", n_layers=4 if name == "autobert_zero" else None)
    tokens = _tokens(vocab=spec.vocab_size, shape=(B, 16))
    mask = jnp.ones((B, 16), bool).at[0, 10:].set(False).at[1, 5:].set(False)
    other = jnp.where(mask, tokens, (tokens + 7) % spec.vocab_size)
    model, variables = _random_init(spec, tokens)
    apply = jax.jit(lambda t: model.apply(variables, t, padding_mask=mask))
    a, b = np.asarray(apply(tokens)), np.asarray(apply(other))
    m = np.asarray(mask)
    np.testing.assert_allclose(a[m], b[m], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[~m], b[~m])


def test_zoo_settings():
    primer = get_spec("primer", "small")
    block = primer.layers[0]
    assert (block.mixer.dconv_kernel, block.mixer.shared_qk, block.ffn.activation) == (3, True, "squared_relu")
    assert (block.mixer_norm, block.ffn_norm, primer.norm, primer.final_norm) == ("pre", "branch", "primer_norm", True)
    assert primer.positions == "relative" and primer.d_model == 512 and primer.n_layers == 6
    assert get_spec("transformer_pp", "base").layers[0].ffn.activation == "swiglu"
    assert get_spec("transformer_pp", "base").vocab_size == 32128
    gpt2 = get_spec("gpt2", "base")
    assert (gpt2.vocab_size, gpt2.max_len, gpt2.norm_eps) == (50257, 1024, 1e-5)
    azero = get_spec("autobert_zero", "tiny")
    assert azero.n_layers == 12
    kernels = [b.mixer.kernel_size for b in azero.layers[0::2]]
    variants = [b.mixer.variant for b in azero.layers[1::2]]
    assert kernels == [65, 9, 3, 7, 7, 3]
    assert variants == ["abz_l2", "abz_l4", "abz_l6", "abz_l6", "abz_l10", "abz_l12"]


def test_get_spec_overrides():
    spec = get_spec("gpt2", "tiny", n_heads=[2, 4, 8], d_inners=[100, 200, 300], vocab_size=1000, max_len=64)
    assert spec.n_layers == 3
    assert [b.mixer.n_heads for b in spec.layers] == [2, 4, 8]
    assert [b.ffn.d_ff for b in spec.layers] == [100, 200, 300]
    assert (spec.vocab_size, spec.max_len, spec.name) == (1000, 64, "gpt2-tiny")
    assert get_spec("bert", "tiny", dropout_rate=0.0).dropout_rate == 0.0
    with pytest.raises(SpecError, match="unknown override"):
        get_spec("bert", "tiny", dropuot_rate=0.0)
    with pytest.raises(SpecError, match="per-layer"):
        get_spec("gpt2", "tiny", n_layers=2, n_heads=[2, 4, 8])
    with pytest.raises(SpecError, match="unknown zoo model"):
        get_spec("gpt3")


# ----------------------------------------------------------------------------- sharding


def test_sharded_forward_matches_single_device(n_devices):
    if n_devices < 8:
        pytest.skip("needs 8 (simulated) devices")
    spec = _decoder(
        [AttentionSpec(4, dconv_kernel=3, shared_qk=True), ConvSpec(kernel_size=3, n_heads=4)],
        positions="relative",
        tie_embeddings=False,
    )
    tokens = _tokens(shape=(4, L))
    model, variables = _random_init(spec, tokens)
    expected = jax.jit(model.apply)(variables, tokens)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (
        ("activation_batch", ("data", "fsdp")),
        ("activation_length", None),
        ("activation_embed", None),
        ("activation_mlp", "tensor"),
        ("activation_heads", "tensor"),
        ("activation_kv", None),
        ("activation_vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
        sharded = jax.device_put(variables, shardings)
        got = jax.jit(model.apply)(sharded, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dropout_keeps_the_right_fraction_and_the_mean():
    """16-bit keep decisions: the keep rate is exact to 1/65536, the expectation is kept."""
    from nasjax.layers.dropout import Dropout, keep_mask

    n = 1_000_001  # odd: the last 32-bit word is half used
    for keep in (0.9, 0.5, 0.25):
        mask = np.asarray(keep_mask(jax.random.key(0), keep, (n,)))
        want = round(keep * 65536) / 65536
        assert abs(mask.mean() - want) < 4 * np.sqrt(want * (1 - want) / n)
    a = np.asarray(keep_mask(jax.random.key(1), 0.5, (1000, 3)))
    b = np.asarray(keep_mask(jax.random.key(1), 0.5, (1000, 3)))
    c = np.asarray(keep_mask(jax.random.key(2), 0.5, (1000, 3)))
    assert a.shape == (1000, 3) and (a == b).all() and (a != c).any()  # a function of the key
    # the two 16-bit halves of a word are independent draws (no pairing of neighbours)
    pairs = np.asarray(keep_mask(jax.random.key(3), 0.5, (200_000,))).reshape(-1, 2)
    assert abs(np.mean(pairs[:, 0] & pairs[:, 1]) - 0.25) < 0.005
    x = jnp.ones((400, 500))
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.01
    np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True), x)
