"""Layer tests: each block against an independent NumPy / closed-form reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax.layers import (
    FFN,
    CausalDepthwiseConv,
    Embeddings,
    GLUConvBlock,
    LayerNorm,
    LightweightConv1d,
    MultiHeadAttention,
    PrimerNorm,
    RelativePositionBias,
    RMSNorm,
    abz_attention,
    apply_rotary,
    make_norm,
    padding_key_bias,
    relative_position_bucket,
    shift_right,
    sinusoidal_positions,
    squared_relu,
)
from nasjax.spec import AttentionSpec

B, L, D, H = 2, 8, 32, 4
K = D // H


def _x(seed=0, shape=(B, L, D), scale=1.0):
    # NumPy draws: every distinct jax.random shape would compile its own kernel eagerly.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(module, *args, seed=1, **kwargs):
    # Eager on purpose: the per-shape initialiser kernels are cached across tests, while a
    # jitted init recompiles the whole RNG program for every module.
    return nn.unbox(module.init({"params": jax.random.key(seed)}, *args, **kwargs))


def _param_names(module, *args):
    """Top-level parameter names via eval_shape (no compile)."""
    return set(jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *args))["params"])


def _np(a):
    return np.asarray(a, np.float64)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _randomise(variables, seed=7, scale=0.3):
    """Replaces every parameter by random values so that symmetric inits cannot hide bugs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype), variables)


# ----------------------------------------------------------------------------- norms


def test_norms_match_formulas():
    x = _x(scale=3.0) + 1.5
    xn = _np(x)
    mu = xn.mean(-1, keepdims=True)
    for cls, expected in [
        (LayerNorm, (xn - mu) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)),
        (RMSNorm, xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6)),
        (PrimerNorm, (xn - mu) / np.sqrt((xn * (xn - mu)).mean(-1, keepdims=True) + 1e-6)),
    ]:
        variables = _init(cls(eps=1e-6), x)
        np.testing.assert_allclose(_np(cls(eps=1e-6).apply(variables, x)), expected, rtol=1e-4, atol=1e-5)
    assert _param_names(RMSNorm(), x) == {"scale"}
    assert _param_names(LayerNorm(), x) == {"scale", "bias"}


def test_norm_params_and_dtype():
    x = _x()
    v = _init(LayerNorm(), x)
    unit = LayerNorm().apply(v, x)  # scale 1, bias 0 at init
    v = {"params": {"scale": jnp.full((D,), 1.5), "bias": jnp.full((D,), 0.5)}}
    np.testing.assert_allclose(LayerNorm().apply(v, x), 1.5 * unit + 0.5, rtol=1e-5, atol=1e-6)
    assert LayerNorm(dtype=jnp.bfloat16).apply(v, x).dtype == jnp.bfloat16
    assert make_norm("rmsnorm", 1e-5, name="n").eps == 1e-5
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batchnorm", 1e-5)


# ----------------------------------------------------------------------------- FFN


def test_squared_relu():
    np.testing.assert_array_equal(squared_relu(jnp.array([-2.0, 0.0, 3.0])), [0.0, 0.0, 9.0])


@pytest.mark.parametrize("activation", ["relu", "squared_relu", "gelu_tanh", "swiglu", "geglu"])
def test_ffn_matches_reference(activation):
    x = _x()
    ffn = FFN(d_ff=48, activation=activation)
    v = _randomise(_init(ffn, x))
    p = jax.tree.map(_np, v["params"])
    xn = _np(x)
    up = xn @ p["up"]["kernel"] + p["up"]["bias"]
    acts = {
        "relu": lambda z: np.maximum(z, 0),
        "squared_relu": lambda z: np.maximum(z, 0) ** 2,
        "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
        "swiglu": lambda z: z / (1 + np.exp(-z)),
        "geglu": lambda z: np.asarray(jax.nn.gelu(jnp.asarray(z), approximate=False), np.float64),
    }
    if activation in ("swiglu", "geglu"):
        assert set(p) == {"up", "gate", "down"}
        h = acts[activation](xn @ p["gate"]["kernel"] + p["gate"]["bias"]) * up
    else:
        assert set(p) == {"up", "down"}
        h = acts[activation](up)
    expected = h @ p["down"]["kernel"] + p["down"]["bias"]
    np.testing.assert_allclose(_np(ffn.apply(v, x)), expected, rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- dconv


def test_shift_right():
    x = jnp.arange(2 * 5).reshape(2, 5).astype(jnp.float32)
    np.testing.assert_array_equal(shift_right(x, 2), [[0, 0, 0, 1, 2], [0, 0, 5, 6, 7]])
    np.testing.assert_array_equal(shift_right(x, 9), np.zeros((2, 5)))


def test_causal_depthwise_conv_random_taps_match_numpy():
    x = _x(shape=(B, L, H, K))
    conv = CausalDepthwiseConv(kernel_size=4)
    v = _randomise(_init(conv, x))
    taps = [_np(v["params"][f"tap_{i}"]) for i in range(4)]
    assert all(t.shape == (H, K) for t in taps)
    xn = _np(x)
    expected = np.zeros_like(xn)
    for t in range(L):
        for i in range(4):
            if t - i >= 0:
                expected[:, t] += taps[i] * xn[:, t - i]
    np.testing.assert_allclose(_np(conv.apply(v, x)), expected, rtol=1e-5, atol=1e-6)


def _dconv_grads_reference(x, taps, g):
    """NumPy: the causal depthwise conv's gradients, dx[s] = sum_i tap_i g[s + i] and
    dtap_i = sum_{b,t} g[t] x[t - i] (sequence axis 1)."""
    length = x.shape[1]
    dx = np.zeros_like(x)
    for i, tap in enumerate(taps):
        dx[:, : length - i] += tap * g[:, i:]
    return dx, [(g[:, i:] * x[:, : length - i]).sum(axis=(0, 1)) for i in range(len(taps))]


@pytest.mark.parametrize("k, length", [(7, L), (15, 40), (31, 37)])
def test_dconv_backward_keeps_input_not_shifted_copies(k, length):
    """Reverse mode keeps the input and the taps (jax.checkpoint), not k - 1 shifted copies
    of the input, and its gradients are the formula's: dtap_i = sum_t g[t] x[t - i],
    dx[s] = sum_i tap_i g[s + i]. Forward mode (the model probe's causality test) works.
    Primer's kernel widths 7, 15 and 31, on lengths that are not multiples of the width."""
    x = _x(shape=(B, length, H, K))
    conv = CausalDepthwiseConv(kernel_size=k)
    v = _randomise(_init(conv, x))
    y, vjp = jax.vjp(lambda p, x: conv.apply(p, x), v, x)
    input_sized = [a for a in jax.tree.leaves(vjp) if a.shape == x.shape]
    assert len(input_sized) <= 1, f"{len(input_sized)} input-sized residuals (the shifted copies are kept)"
    g = _x(seed=3, shape=(B, length, H, K))
    g_params, g_x = vjp(g)
    taps = [_np(v["params"][f"tap_{i}"]) for i in range(k)]
    expected_x, expected_taps = _dconv_grads_reference(_np(x), taps, _np(g))
    for i in range(k):
        np.testing.assert_allclose(_np(g_params["params"][f"tap_{i}"]), expected_taps[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(g_x), expected_x, rtol=1e-5, atol=1e-6)
    tangent = _x(seed=4, shape=(B, length, H, K))
    _, y_dot = jax.jvp(lambda x: conv.apply(v, x), (x,), (tangent,))
    np.testing.assert_allclose(_np(y_dot), _np(conv.apply(v, tangent)), rtol=1e-5, atol=1e-6)  # linear in x
    # and linear in the taps: the tangent in the taps alone is the conv with the tangent taps
    v_dot = _randomise(v, seed=5)
    _, y_dot = jax.jvp(lambda p: conv.apply(p, x), (v,), (v_dot,))
    np.testing.assert_allclose(_np(y_dot), _np(conv.apply(v_dot, x)), rtol=1e-5, atol=1e-5)


def test_dconv_init_constants():
    v = _init(CausalDepthwiseConv(kernel_size=3), _x(shape=(B, L, H, K)))["params"]
    np.testing.assert_array_equal(v["tap_0"], np.full((H, K), 0.5, np.float32))
    np.testing.assert_allclose(v["tap_1"], np.full((H, K), 1 / 6), rtol=1e-7)
    np.testing.assert_allclose(v["tap_2"], np.full((H, K), 1 / 6), rtol=1e-7)


def test_mdha_dconv_at_init_is_smoothed_projection():
    """MDHA's Q/K/V equal 0.5 P_t + (P_{t-1} + P_{t-2}) / 6 of their projections at init."""
    x = _x()
    mha = MultiHeadAttention(AttentionSpec(n_heads=H, dconv_kernel=3), causal=True)
    v = _init(mha, x)
    _, state = mha.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    for name in ("q", "k", "v"):
        p = _np(inter[f"{name}_proj"]["__call__"][0]).reshape(B, L, D)
        prev1 = np.concatenate([np.zeros_like(p[:, :1]), p[:, :-1]], axis=1)
        prev2 = np.concatenate([np.zeros_like(p[:, :2]), p[:, :-2]], axis=1)
        expected = 0.5 * p + (prev1 + prev2) / 6
        np.testing.assert_allclose(_np(inter[name][0]), expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- attention: pure functions


def autobert_attention(layer, q, k, v, key_bias):
    """methods.md Appendix A, verbatim (the reference semantics)."""
    s = jnp.sqrt(q.shape[-1])
    T = lambda x: jnp.swapaxes(x, -1, -2)
    if layer == 2:
        keyT, val = T(jax.nn.softplus(k)), q + k
    elif layer == 4:
        S = jax.nn.log_sigmoid(q) + q + k
        keyT, val = T(jax.nn.softplus(-S)), q
    elif layer in (6, 8):
        keyT, val = T(jax.nn.softplus(-k)), q
    elif layer == 10:
        keyT, val = T(k / s + jax.nn.soft_sign(jax.nn.soft_sign(k) / s) + v), v
    elif layer == 12:
        keyT, val = T(k / s + v), v
    else:
        raise ValueError("conv layer")
    a = jax.nn.softmax(q @ keyT / s + key_bias, axis=-1)
    return a @ val


def _qkv_heads(scale=1.0):
    return [_x(seed, (B, H, L, K), scale) for seed in (10, 11, 12)]


def _key_bias():
    mask = jnp.ones((B, L), bool).at[1, -3:].set(False)
    return padding_key_bias(mask)


def test_abz_l2_closed_form():
    """softmax(Q softplus(K)^T / s) (Q + K), per head, computed independently in NumPy."""
    q, k, _ = _qkv_heads()
    out = _np(abz_attention("abz_l2", q, k, None, _key_bias()))
    qn, kn, bias = _np(q), _np(k), _np(_key_bias())
    s = np.sqrt(K)
    for b in range(B):
        for h in range(H):
            a = _softmax(qn[b, h] @ np.log1p(np.exp(kn[b, h])).T / s + bias[b, 0])
            np.testing.assert_allclose(out[b, h], a @ (qn[b, h] + kn[b, h]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "variant,layer", [("abz_l2", 2), ("abz_l4", 4), ("abz_l6", 6), ("abz_l10", 10), ("abz_l12", 12)]
)
def test_abz_variants_match_appendix_a(variant, layer):
    q, k, v = _qkv_heads()
    bias = _key_bias()
    np.testing.assert_allclose(
        abz_attention(variant, q, k, v, bias), autobert_attention(layer, q, k, v, bias), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("variant", ["softmax", "abz_l2", "abz_l4", "abz_l6", "abz_l10", "abz_l12"])
def test_abz_variants_finite_for_large_inputs(variant):
    q, k, v = _qkv_heads(scale=1e3)
    out = abz_attention(variant, q, k, v, _key_bias(), mask=jnp.tril(jnp.ones((L, L), bool)))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_abz_attention_padding_hides_keys():
    q, k, v = _qkv_heads()
    mask = jnp.ones((B, L), bool).at[:, -3:].set(False)
    v2 = v.at[:, :, -3:].set(123.0)
    k2 = k.at[:, :, -3:].set(-50.0)
    a = abz_attention("softmax", q, k, v, padding_key_bias(mask))
    b = abz_attention("softmax", q, k2, v2, padding_key_bias(mask))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_softmax_variant_needs_v():
    q, k, _ = _qkv_heads()
    with pytest.raises(ValueError, match="needs V"):
        abz_attention("softmax", q, k, None)
    with pytest.raises(ValueError, match="unknown attention variant"):
        abz_attention("abz_l8", q, k, None)


# ----------------------------------------------------------------------------- attention: module


def _heads(p, x, name):
    return np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + p[name].get("bias", 0.0)


def _reference_mha(p, x, q, k, v, variant, causal, key_bias=None):
    """Independent NumPy multi-head attention on [B, L, H, K] inputs, then W_O."""
    s = np.sqrt(q.shape[-1])
    out = np.zeros_like(q)
    for b in range(x.shape[0]):
        for h in range(q.shape[2]):
            qh, kh = q[b, :, h], k[b, :, h]
            vh = None if v is None else v[b, :, h]
            if variant == "softmax":
                key, val = kh, vh
            elif variant == "abz_l2":
                key, val = np.log1p(np.exp(kh)), qh + kh
            elif variant == "abz_l12":
                key, val = kh / s + vh, vh
            logits = qh @ key.T / s
            if key_bias is not None:
                logits = logits + key_bias[b]
            if causal:
                logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
            out[b, :, h] = _softmax(logits) @ val
    y = np.einsum("blhk,hkd->bld", out, p["o_proj"]["kernel"])
    return y + p["o_proj"].get("bias", 0.0)


@pytest.mark.parametrize(
    "spec,causal",
    [
        (AttentionSpec(n_heads=H), True),
        (AttentionSpec(n_heads=H, use_bias=True), False),
        (AttentionSpec(n_heads=H, use_bias=True, variant="abz_l2"), False),
        (AttentionSpec(n_heads=H, use_bias=True, variant="abz_l12"), True),
        (AttentionSpec(n_heads=H, head_dim=6), True),
    ],
)
def test_attention_module_matches_reference(spec, causal):
    x = _x()
    mha = MultiHeadAttention(spec, causal=causal)
    v = _randomise(_init(mha, x))
    p = jax.tree.map(_np, v["params"])
    assert ("v_proj" in p) == spec.uses_value
    assert ("bias" in p["q_proj"]) == spec.use_bias
    mask = np.ones((B, L), bool)
    mask[0, -2:] = False
    key_bias = None if causal else np.where(mask, 0.0, -10000.0)[:, None, :]
    xn = _np(x)
    q, k = _heads(p, xn, "q_proj"), _heads(p, xn, "k_proj")
    vv = _heads(p, xn, "v_proj") if spec.uses_value else None
    expected = _reference_mha(p, xn, q, k, vv, spec.variant, causal, key_bias)
    kb = None if causal else padding_key_bias(jnp.asarray(mask))
    np.testing.assert_allclose(_np(mha.apply(v, x, key_bias=kb)), expected, rtol=2e-4, atol=2e-5)


def test_no_value_projection_for_abz_l2_l4_l6():
    x = _x()
    for variant in ("abz_l2", "abz_l4", "abz_l6"):
        names = _param_names(MultiHeadAttention(AttentionSpec(H, variant=variant)), x)
        assert names == {"q_proj", "k_proj", "o_proj"}
    for variant in ("abz_l10", "abz_l12"):
        names = _param_names(MultiHeadAttention(AttentionSpec(H, variant=variant)), x)
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_shared_qk_matches_reference():
    """K = dconv(X W_qk), Q = K W_solo (no bias), V = dconv(X W_v); random taps."""
    x = _x()
    mha = MultiHeadAttention(AttentionSpec(n_heads=H, dconv_kernel=3, shared_qk=True), causal=True)
    v = _randomise(_init(mha, x))
    p = jax.tree.map(_np, v["params"])
    assert set(p) == {"qk_proj", "q_solo", "k_dconv", "v_proj", "v_dconv", "o_proj"}
    assert p["q_solo"]["kernel"].shape == (H, K, H, K) and "bias" not in p["q_solo"]

    def dconv(y, taps):
        out = np.zeros_like(y)
        for i in range(3):
            out[:, i:] += taps[f"tap_{i}"] * y[:, : L - i]
        return out

    xn = _np(x)
    k = dconv(_heads(p, xn, "qk_proj"), p["k_dconv"])
    q = np.einsum("blhk,hkgj->blgj", k, p["q_solo"]["kernel"])
    vv = dconv(_heads(p, xn, "v_proj"), p["v_dconv"])
    expected = _reference_mha(p, xn, q, k, vv, "softmax", causal=True)
    np.testing.assert_allclose(_np(mha.apply(v, x)), expected, rtol=2e-4, atol=2e-5)


def test_attention_sows_merged_qkv_and_relative_bias_slices_heads():
    x = _x()
    mha = MultiHeadAttention(AttentionSpec(n_heads=2, head_dim=8), causal=True)
    v = _init(mha, x)
    bias = jax.random.normal(jax.random.key(3), (1, 4, L, L))  # table has more heads than the layer
    y, state = mha.apply(v, x, position_bias=bias, mutable=["intermediates"])
    assert {n: a[0].shape for n, a in state["intermediates"].items()} == {n: (B, L, 16) for n in "qkv"}
    y2 = mha.apply(v, x, position_bias=bias[:, :2])
    np.testing.assert_allclose(y, y2, rtol=1e-6)
    assert not np.allclose(y, mha.apply(v, x), atol=1e-6)


# ----------------------------------------------------------------------------- conv


def _lightconv_reference(x, w, pad_left):
    x = _np(x)
    n_heads, k = w.shape
    width = x.shape[-1] // n_heads
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(k):
            src = t + j - pad_left
            if 0 <= src < x.shape[1]:
                out[:, t] += np.repeat(w[:, j], width) * x[:, src]
    return out


@pytest.mark.parametrize("kernel,causal", [(3, False), (7, True), (65, False), (4, False), (5, True)])
def test_lightweight_conv_matches_reference(kernel, causal):
    x = _x()
    conv = LightweightConv1d(kernel, H, causal=causal)
    v = _init(conv, x)
    w = _np(v["params"]["kernel"])
    assert w.shape == (H, kernel)
    expected = _lightconv_reference(x, w, kernel - 1 if causal else kernel // 2)
    np.testing.assert_allclose(_np(conv.apply(v, x)), expected, rtol=1e-5, atol=1e-6)


def test_lightweight_conv_init_is_torch_xavier_uniform():
    w = _np(_init(LightweightConv1d(9, 12), _x(shape=(1, 4, 24)))["params"]["kernel"])
    bound = np.sqrt(6.0 / (9 + 12 * 9))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound


def test_glu_conv_block_matches_reference_and_zeroes_padding():
    x = _x()
    block = GLUConvBlock(kernel_size=5, n_heads=H, causal=False)
    v = _randomise(_init(block, x))
    p = jax.tree.map(_np, v["params"])
    mask = np.ones((B, L), bool)
    mask[1, -3:] = False
    xn = _np(x)
    h = xn @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
    h = h[..., :D] / (1 + np.exp(-h[..., D:]))
    h = h * mask[..., None]
    h = _lightconv_reference(h, p["conv"]["kernel"], 2)
    expected = h @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
    got = block.apply(v, x, padding_mask=jnp.asarray(mask))
    np.testing.assert_allclose(_np(got), expected, rtol=2e-4, atol=2e-5)
    assert p["in_proj"]["kernel"].shape == (D, 2 * D) and p["out_proj"]["kernel"].shape == (D, D)


# ----------------------------------------------------------------------------- embeddings and positions


def test_relative_position_bucket_t5_values():
    rel = np.array([0, -1, 1, -7, -8, -20, -200, 5, 20])
    np.testing.assert_array_equal(relative_position_bucket(rel, True, 32, 128), [0, 1, 17, 7, 8, 10, 15, 21, 26])
    np.testing.assert_array_equal(relative_position_bucket(rel, False, 32, 128), [0, 1, 0, 7, 8, 17, 31, 0, 0])


def test_relative_position_bias_shape_and_direction():
    rpb = RelativePositionBias(n_heads=3, bidirectional=False)
    v = _init(rpb, L, L)
    assert v["params"]["embedding"].shape == (32, 3)
    bias = rpb.apply(v, L, L)
    assert bias.shape == (1, 3, L, L)
    # unidirectional: every future key shares bucket 0, so the upper triangle is constant.
    np.testing.assert_array_equal(bias[0, 0][np.triu_indices(L, 1)], v["params"]["embedding"][0, 0])


def test_sinusoidal_positions():
    pe = sinusoidal_positions(10, 16)
    assert pe.shape == (10, 16)
    np.testing.assert_allclose(pe[0], np.r_[np.zeros(8), np.ones(8)])
    np.testing.assert_allclose(pe[3, 0], np.sin(3.0), rtol=1e-6)


def test_rotary_is_relative_and_norm_preserving():
    x = _x(shape=(1, L, 1, K))
    y = _x(seed=5, shape=(1, L, 1, K))
    rx = apply_rotary(x)
    np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # <R_m x, R_n y> depends only on m - n: shift both positions by 3.
    same_x = jnp.broadcast_to(x[:, :1], x.shape)
    same_y = jnp.broadcast_to(y[:, :1], y.shape)
    a, b = apply_rotary(same_x), apply_rotary(same_y)
    d1 = jnp.sum(a[0, 1] * b[0, 4])
    d2 = jnp.sum(a[0, 3] * b[0, 6])
    np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_embeddings_parts_and_tied_attend():
    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]])
    seg = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    emb = Embeddings(vocab_size=10, d_model=D, max_len=16, positions="learned", type_vocab_size=2)
    v = _init(emb, tokens, seg)
    p = v["params"]
    expected = (
        p["token_embed"]["embedding"][tokens] + p["position_embed"]["embedding"][:4] + p["type_embed"]["embedding"][seg]
    )
    np.testing.assert_allclose(emb.apply(v, tokens, seg), expected, rtol=1e-6)
    x = _x(shape=(2, 4, D))
    np.testing.assert_allclose(
        emb.apply(v, x, method=Embeddings.attend), x @ p["token_embed"]["embedding"].T, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="exceeds max_len"):
        emb.apply(v, jnp.zeros((1, 17), jnp.int32))


def test_softmax_value_and_derivatives_match_the_plain_formula():
    """nasjax's softmax: jax.nn.softmax's value bit for bit, its VJP and JVP to rounding,
    and exactly zero probability and gradient at masked keys."""
    from nasjax.layers.attention import MASK_VALUE, softmax

    x = _x(3, (2, 3, 8, 8), 3.0)
    mask = jnp.tril(jnp.ones((8, 8), bool))
    masked = jnp.where(mask, x, MASK_VALUE)
    np.testing.assert_array_equal(_np(softmax(masked)), _np(jax.nn.softmax(masked, axis=-1)))
    w = _x(4, x.shape)

    def loss(fn):
        return lambda z: jnp.sum(w * fn(jnp.where(mask, z, MASK_VALUE)) ** 2)

    g = jax.grad(loss(softmax))(x)
    np.testing.assert_allclose(_np(g), _np(jax.grad(loss(lambda z: jax.nn.softmax(z, axis=-1)))(x)), atol=1e-6)
    assert np.all(_np(g)[..., ~np.asarray(mask)] == 0.0)
    dx = _x(5, x.shape)
    _, t = jax.jvp(softmax, (masked,), (dx,))
    _, t_ref = jax.jvp(lambda z: jax.nn.softmax(z, axis=-1), (masked,), (dx,))
    np.testing.assert_allclose(_np(t), _np(t_ref), atol=1e-6)


@pytest.mark.parametrize("shape", [(3,), (64, 128), (7, 5, 3), (262, 64), (1,), (0, 4), (2, 2, 16, 9)])
def test_initializers_give_flax_values_op_by_op_and_traced(shape):
    """nasjax.layers.init: Flax's values, bit for bit, eagerly (a 1-D draw of a size class,
    cut on the host), under vmap (branched parameters) and under jit (Flax's expression)."""
    import flax.linen as nn

    from nasjax.layers import init as ours

    key = jax.random.key(sum(shape) + 1)
    pairs = [
        (ours.normal(0.02), nn.initializers.normal(0.02)),
        (ours.zeros, nn.initializers.zeros),
        (ours.ones, nn.initializers.ones),
        (ours.constant(0.3), nn.initializers.constant(0.3)),
    ]
    keys = jax.random.split(key, 3)
    for mine, ref in pairs:
        for run in (
            lambda f: f(key, shape, jnp.float32),
            lambda f: jax.jit(lambda k: f(k, shape, jnp.float32))(key),
            lambda f: jax.vmap(lambda k: f(k, shape, jnp.float32))(keys),
        ):
            a, b = np.asarray(run(mine)), np.asarray(run(ref))
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert [ours.size_class(n) for n in (1, 7, 8, 9, 100, 4096, 4097)] == [1, 7, 8, 10, 112, 4096, 5120]
    big = ours.DRAW_COARSE_MAX
    assert [ours.draw_class(n) for n in (1, 4096, 4097, 16385, big, big + 1)] == [
        4096,
        4096,
        16384,
        65536,
        big,
        ours.size_class(big + 1),
    ]


def _init_under_vmaps(f, shape, keys, axes=(0,)):
    """``f`` (an initializer) under one vmap per entry of ``axes`` (outermost first)."""
    fn = functools.partial(lambda k, f, shape: f(k, shape, jnp.float32), f=f, shape=shape)
    for axis in reversed(axes):
        fn = jax.vmap(fn, in_axes=axis)
    return fn(keys)


def test_vmapped_initializers_give_flax_values_and_compile_nothing_per_shape():
    """Under vmap without jit (branched parameters): Flax's values bit for bit, nested and
    with the batch axis anywhere; a key array or raw keys take Flax's path (and its
    error); a new shape of a draw class seen before compiles no program (the cut and the
    fills are made on the host, :func:`nasjax.layers.init._fill_on_host`)."""
    import flax.linen as nn

    from nasjax.layers import init as ours

    keys = jax.random.split(jax.random.key(11), 6).reshape(3, 2)
    raw = jax.random.split(jax.random.PRNGKey(3), 4)
    pairs = [(ours.normal(0.02), nn.initializers.normal(0.02)), (ours.constant(0.3), nn.initializers.constant(0.3))]
    for shape in [(3,), (64, 128), (2, 2, 16, 9)]:
        for mine, ref in pairs:
            for batch, in_axes in ((keys, (0, 0)), (keys, (1, 0)), (raw, (0,))):
                a = np.asarray(_init_under_vmaps(mine, shape, batch, in_axes))
                b = np.asarray(_init_under_vmaps(ref, shape, batch, in_axes))
                assert a.shape == b.shape and a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="single key"):
        jax.vmap(lambda k: ours.normal(0.02)(k, (4,), jnp.float32), in_axes=1)(keys)
    # a key array under vmap: Flax's shape for a constant (the key is not read)
    ref_const = nn.initializers.constant(0.3)
    for axes in ((0,), (1,)):
        a = _init_under_vmaps(ours.constant(0.3), (4,), keys, axes)
        b = _init_under_vmaps(ref_const, (4,), keys, axes)
        assert a.shape == b.shape == (keys.shape[axes[0]], 4)

    # a key that the vmap does not batch but wraps in its tracer (the output of a custom_jvp
    # function): jax would run the custom_vmap body, not its rule; Flax's values all the same
    @jax.custom_jvp
    def passed(k):
        return k

    passed.defjvp(lambda primals, tangents: (primals[0], tangents[0]))
    one_key = jax.random.key(4)
    for mine, ref in pairs:
        a, b = (
            np.asarray(jax.vmap(lambda x, f=f: f(passed(one_key), (5, 3), jnp.float32) + 0 * x)(jnp.ones(2)))
            for f in (mine, ref)
        )
        np.testing.assert_array_equal(a, b)
    # signed zeros and bfloat16 keep Flax's bits (the cache of batched functions tells -0.0 from 0.0)
    branches = jax.random.split(jax.random.key(6), 4)
    for mine, ref in [
        (ours.constant(0.0), nn.initializers.constant(0.0)),
        (ours.constant(-0.0), nn.initializers.constant(-0.0)),
        (ours.normal(-0.0), nn.initializers.normal(-0.0)),
        (ours.normal(0.0), nn.initializers.normal(0.0)),
    ]:
        a, b = (np.asarray(_init_under_vmaps(f, (6, 7), branches)) for f in (mine, ref))
        assert a.tobytes() == b.tobytes()
    for mine, ref in pairs:
        a, b = (np.asarray(jax.vmap(lambda k, f=f: f(k, (33, 65), jnp.bfloat16))(branches)) for f in (mine, ref))
        assert a.dtype == b.dtype == jnp.bfloat16 and a.tobytes() == b.tobytes()

    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # 7 branches: a key batch shape no other test draws with, so the first shape compiles
        # the class's sampler, which shows that the listener hears compiles
        branches = jax.random.split(jax.random.key(5), 7)
        for i, shape in enumerate([(64, 128), (32, 200), (8192,), (4, 2, 1000)]):  # one draw class (16,384)
            for f in (ours.normal(0.02), ours.constant(0.5)):
                _init_under_vmaps(f, shape, branches).block_until_ready()
            if i == 0:
                assert compiled, "no compile event heard: has JAX renamed it?"
                compiled.clear()
        assert compiled == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert ours._draw_program.cache_info().currsize > 0  # the samplers outlive jax.clear_caches() ...
    ours.clear_draw_programs()  # ... until search.clear_caches drops them
    assert ours._draw_program.cache_info().currsize == 0


def test_vmapped_initializers_fall_back_to_flax_when_the_host_path_fails(monkeypatch):
    """A JAX whose custom_vmap or batch tracers behave otherwise: one warning, then Flax's
    path, with Flax's values (nasjax.layers.init._host_batched)."""
    import flax.linen as nn

    from nasjax.layers import init as ours

    def broken(*args, **kwargs):
        raise TypeError("a changed custom_vmap rule signature")

    monkeypatch.setattr(ours, "_batched_leaf", broken)
    monkeypatch.setattr(ours, "_HOST_BATCHED_OK", [True])
    branches = jax.random.split(jax.random.key(8), 3)
    with pytest.warns(UserWarning, match="batched host initializer failed"):
        a = _init_under_vmaps(ours.normal(0.02), (5, 6), branches)
    assert ours._HOST_BATCHED_OK == [False]
    np.testing.assert_array_equal(a, _init_under_vmaps(nn.initializers.normal(0.02), (5, 6), branches))
    b = _init_under_vmaps(ours.constant(0.7), (5, 6), branches)  # off now: no second warning
    np.testing.assert_array_equal(b, _init_under_vmaps(nn.initializers.constant(0.7), (5, 6), branches))


@pytest.mark.parametrize("batch_shape", [(2, 3), (4,)])
def test_attention_products_equal_the_einsums_in_value_and_every_derivative(batch_shape, monkeypatch):
    """nasjax.layers.products: the scores Q K^T and the mix P V equal the plain einsums
    in value, in reverse mode (both operands, one operand alone), in forward mode and at
    second order; with the CPU rule switched off, or for operands wider than
    products.MAX_WIDTH, they are the einsums themselves."""
    from nasjax.layers import products

    q, k, v = (_x(s, batch_shape + (8, 4)) for s in (11, 12, 13))
    w = _x(14, batch_shape + (8, 4))

    def attend(scores, mix):
        return lambda q, k, v: jnp.sum(w * mix(jax.nn.softmax(scores(q, k), axis=-1), v) ** 2)

    plain = attend(
        lambda a, b: jnp.einsum("...qd,...md->...qm", a, b), lambda p, b: jnp.einsum("...qm,...md->...qd", p, b)
    )
    ours = attend(products.scores, products.mix)
    np.testing.assert_array_equal(_np(products.scores(q, k)), _np(jnp.einsum("...qd,...md->...qm", q, k)))
    for argnums in ((0, 1, 2), 1, 2):
        got = jax.jit(jax.grad(ours, argnums))(q, k, v)
        want = jax.grad(plain, argnums)(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-5)
    tangents = (_x(15, q.shape), _x(16, k.shape), _x(17, v.shape))
    _, t = jax.jvp(ours, (q, k, v), tangents)
    _, t_ref = jax.jvp(plain, (q, k, v), tangents)
    np.testing.assert_allclose(_np(t), _np(t_ref), rtol=1e-5)
    second = lambda f: jax.grad(lambda k: jnp.sum(jax.grad(f, 0)(q, k, v) ** 2))(k)  # noqa: E731
    np.testing.assert_allclose(_np(second(ours)), _np(second(plain)), rtol=1e-4, atol=1e-5)
    rules = lambda: {n for n in ("_scores_cpu", "_mix_cpu") if n in str(jax.make_jaxpr(lambda *a: ours(*a))(q, k, v))}  # noqa: E731
    assert rules() == {"_scores_cpu", "_mix_cpu"}
    monkeypatch.setattr(products, "TRANSPOSED_GRADIENTS", frozenset())
    assert rules() == set()
    monkeypatch.setattr(products, "TRANSPOSED_GRADIENTS", frozenset({"cpu"}))
    monkeypatch.setattr(products, "MAX_WIDTH", 3)
    assert rules() == set()


@pytest.mark.parametrize("k, shared", [(3, True), (15, True), (15, False)])
def test_dconv_copies_match_the_formula_in_both_modes(k, shared, monkeypatch):
    """C copies on one input (``copies``, a learned op with ``branches`` > 1): taps [C, W]
    with a leading unnamed logical axis, output [B, L, C, W]; each copy is the conv with its
    own taps, the input's gradient is the copies' sum, each copy's taps get the formula's
    gradient, with the input's tangent broadcast once or per tap (``shared``, chosen by
    size). Reverse mode keeps the input and the taps, not shifted or broadcast copies;
    forward mode is linear in the input and in the taps."""
    from nasjax.layers import dconv

    monkeypatch.setattr(dconv, "SHARED_TANGENT_MAX_BYTES", 1 << 40 if shared else 0)
    copies, length = 3, 2 * k + 3
    x = _x(shape=(B, length, D))
    conv = CausalDepthwiseConv(kernel_size=k, copies=copies)
    boxed = conv.init(jax.random.key(0), x)["params"]
    assert boxed["tap_0"].names == (None, None)  # nn.vmap's metadata_params={PARTITION_NAME: None}
    v = _randomise(nn.meta.unbox({"params": boxed}))
    taps = [_np(v["params"][f"tap_{i}"]) for i in range(k)]
    assert all(t.shape == (copies, D) for t in taps)
    y, vjp = jax.vjp(lambda p, x: conv.apply(p, x), v, x)
    assert y.shape == (B, length, copies, D)
    assert not [a for a in jax.tree.leaves(vjp) if a.size >= x.size and a.shape != x.shape], "copies kept"
    assert len([a for a in jax.tree.leaves(vjp) if a.shape == x.shape]) <= 1
    g = _x(seed=3, shape=(B, length, copies, D))
    g_params, g_x = vjp(g)
    single = CausalDepthwiseConv(kernel_size=k)
    expected_x = 0
    for c in range(copies):  # each copy alone; the input's gradient is their sum
        one = {"params": {f"tap_{i}": jnp.asarray(taps[i][c]) for i in range(k)}}
        np.testing.assert_allclose(_np(y[:, :, c]), _np(single.apply(one, x)), rtol=1e-6, atol=1e-6)
        dx, dtaps = _dconv_grads_reference(_np(x), [t[c] for t in taps], _np(g)[:, :, c])
        expected_x = expected_x + dx
        for i in range(k):
            np.testing.assert_allclose(_np(g_params["params"][f"tap_{i}"][c]), dtaps[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(g_x), expected_x, rtol=1e-5, atol=1e-5)
    tangent = _x(seed=4, shape=(B, length, D))
    _, y_dot = jax.jvp(lambda x: conv.apply(v, x), (x,), (tangent,))
    np.testing.assert_allclose(_np(y_dot), _np(conv.apply(v, tangent)), rtol=1e-5, atol=1e-6)
    v_dot = _randomise(v, seed=5)
    _, y_dot = jax.jvp(lambda p: conv.apply(p, x), (v,), (v_dot,))
    np.testing.assert_allclose(_np(y_dot), _np(conv.apply(v_dot, x)), rtol=1e-5, atol=1e-5)


def test_dconv_copies_tangent_form_by_size():
    """The size rule: the input's tangent is broadcast once while (k - 1) x the output's
    bytes fit ``SHARED_TANGENT_MAX_BYTES`` (abstract shapes around 48 MiB, float32 and
    bfloat16)."""
    from nasjax.layers import dconv

    def form(b, w, copies, k, dtype=jnp.float32):
        x = jax.ShapeDtypeStruct((b, 64, w), dtype)
        return dconv._shares_tangent(x, [jax.ShapeDtypeStruct((copies, w), jnp.float32)] * k)

    assert dconv.SHARED_TANGENT_MAX_BYTES == 48 << 20
    assert form(16, 192, 4, 15)  # 14 x 3 MiB = 42 MiB
    assert not form(16, 256, 4, 15)  # 14 x 4 MiB = 56 MiB
    assert form(16, 256, 4, 13)  # 12 x 4 MiB = 48 MiB, at the bound
    assert form(16, 256, 4, 15, jnp.bfloat16)  # 14 x 2 MiB
    assert form(16, 256, 16, 3)  # 2 x 16 MiB
    assert not form(16, 256, 16, 15)  # 14 x 16 MiB


def _copies_reductions(shared: bool, k: int) -> int:
    from nasjax.layers import dconv

    x = jnp.zeros((2, 9, 5))
    taps = tuple(jnp.zeros((3, 5)) for _ in range(k))
    jaxpr = jax.make_jaxpr(lambda x, t, g: jax.vjp(lambda x: dconv._copies_checkpointed(x, t, shared), x)[1](g))(
        x, taps, jnp.zeros((2, 9, 3, 5))
    )
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "reduce_sum" and 2 in eqn.params["axes"] and eqn.invars[0].aval.shape[2] > 1:
                found.append(eqn)
            for v in eqn.params.values():
                if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                    walk(v.jaxpr)
                elif hasattr(v, "eqns"):
                    walk(v)

    walk(jaxpr.jaxpr)
    return len(found)


@pytest.mark.parametrize("k", [3, 7])
def test_dconv_copies_shared_tangent_sums_the_copies_once(k):
    """The backward's reductions over the copies' axis (of size > 1): one with the shared
    tangent, k per tap."""
    assert _copies_reductions(True, k) == 1
    assert _copies_reductions(False, k) == k


def test_dconv_copies_bfloat16_input_matches_vmap():
    """bfloat16 inputs with float32 taps: the output and the input's gradient in bfloat16,
    the taps' gradients in float32, as under nn.vmap, and the values agree to bfloat16."""
    from nasjax.layers.dconv import _causal_depthwise, _copies_depthwise

    x = _x(shape=(B, L, D)).astype(jnp.bfloat16)
    taps = tuple(_x(seed=10 + i, shape=(4, D)) for i in range(3))
    g = _x(seed=3, shape=(B, L, 4, D)).astype(jnp.bfloat16)
    vmapped = jax.vmap(_causal_depthwise, in_axes=(None, 0), out_axes=-2)
    ours = jax.vjp(_copies_depthwise, x, taps)
    ref = jax.vjp(vmapped, x, taps)
    assert ours[0].dtype == ref[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_np(ours[0]), _np(ref[0]))
    (gx, gt), (gx_ref, gt_ref) = ours[1](g), ref[1](g)
    assert gx.dtype == jnp.bfloat16 and all(t.dtype == jnp.float32 for t in gt)
    for a, b in zip((gx, *gt), (gx_ref, *gt_ref)):  # a few bfloat16 steps of the largest value
        np.testing.assert_allclose(_np(a), _np(b), atol=2**-6 * float(np.max(np.abs(_np(b)))))
