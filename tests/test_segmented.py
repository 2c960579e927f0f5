"""train.segmented: the step as shared pieces computes the one-program step, and shares its programs."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax import sharding as shd
from nasjax.config import apply_overrides, load_config_file
from nasjax.models import get_spec, transformer
from nasjax.search.run import make_space
from nasjax.train import segmented
from nasjax.train.loop import TrainConfigError, Trainer

VOCAB, LEN, BATCH = 64, 16, 8
PRIMER_TINY = os.path.join(os.path.dirname(__file__), "..", "configs/search/primer.py:tiny")


def _primer_specs(n: int, d_model: int = 32):
    cfg = load_config_file(PRIMER_TINY)
    cfg = apply_overrides(cfg, {"search.d_model": d_model, "search.d_ff": 64, "search.n_heads": 2, "data.seq_len": LEN})
    space = make_space(cfg, VOCAB)
    rng, genome, specs = np.random.default_rng(7), space.seeds()[0][1], []
    while len(specs) < n:
        spec = space.decode(genome)
        if spec not in specs:
            specs.append(spec)
        genome = space.mutate(genome, rng)[0]
    return specs


def _train_cfg(**overrides):
    cfg = load_config_file(PRIMER_TINY)
    base = {"train.flat_optimizer": False, "train.segmented": False, "train.batch_size": BATCH, "train.warmup_steps": 2}
    # Clipping active (the global norm is well above 0.05) and decay on matrices: every
    # branch of the per-leaf update runs.
    base.update({"train.grad_clip": 0.05, "train.weight_decay": 1.0})
    base.update(overrides)
    return apply_overrides(cfg, base).train


def _batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, VOCAB, size=(BATCH, LEN + 1)).astype(np.int32)
        weights = (rng.random((BATCH, LEN)) > 0.1).astype(np.float32)
        out.append({"inputs": x[:, :-1], "targets": x[:, 1:], "weights": weights})
    return out


@pytest.mark.parametrize("which", ["primer_program", "gpt2_tied", "gpt2_untied"])
def test_segments_chain_computes_the_models_logits(which):
    if which == "primer_program":
        spec = _primer_specs(1)[0]
    else:
        spec = get_spec(
            "gpt2", "tiny", vocab_size=VOCAB, max_len=LEN, dropout_rate=0.0, attention_dropout_rate=0.0,
            tie_embeddings=which == "gpt2_tied",
        )  # fmt: skip
    model = transformer.build(spec)
    tokens = jnp.asarray(_batches(1)[0]["inputs"])
    params = jax.tree.map(
        lambda p: getattr(p, "value", p),
        model.init(jax.random.key(0), tokens)["params"],
        is_leaf=lambda p: hasattr(p, "value"),
    )
    seg = transformer.Segments(spec)
    x = seg.embed(params["embed"], tokens)
    for i in range(seg.n_layers):
        x = seg.layer(i, seg.layer_params(params, i), x)
    np.testing.assert_allclose(
        seg.logits(seg.head_params(params), x), model.apply({"params": params}, tokens), atol=1e-6
    )
    assert set(seg.head_params(params)) == (
        {"final_norm", "embed"} if spec.tie_embeddings else {"final_norm", "lm_head"}
    )


def _run(spec, train_cfg, mesh, batches, steps: int = 3):
    trainer = Trainer(spec, train_cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    state = trainer.init_state()
    metrics = []
    for b in batches[:steps]:
        state, m = trainer.step(state, b)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    val = trainer.evaluate(state.params, batches[steps:])
    return trainer, state, metrics, val


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_segmented_steps_equal_the_one_program_step(n_devices, tied):
    """Same losses, gradient norms, learning rates, parameters, optimizer state (structure
    and values) and validation as the one-program step, up to float rounding, over 3
    steps on a data-parallel mesh of all devices, with clipping and weight decay active."""
    if tied:
        spec = _primer_specs(1)[0]
    else:
        spec = get_spec(
            "gpt2", "tiny", vocab_size=VOCAB, max_len=LEN, dropout_rate=0.0, attention_dropout_rate=0.0,
            tie_embeddings=False,
        )  # fmt: skip
    mesh = shd.make_mesh((-1, 1, 1))
    batches = _batches(5)
    one = _run(spec, _train_cfg(), mesh, batches)
    seg = _run(spec, _train_cfg(**{"train.segmented": True}), mesh, batches)
    assert seg[0]._segments is not None and one[0]._segments is None
    for a, b in zip(one[2], seg[2]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
    assert one[2][0]["grad_norm"] > 0.05  # the clip was active
    assert jax.tree.structure(one[1]) == jax.tree.structure(seg[1])  # checkpoints interchangeable
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one[1])[0], jax.tree.leaves(seg[1])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # Relative to the leaf's magnitude, floored: some gradients are zero in exact
        # arithmetic and pure rounding noise here (a key projection's bias, which softmax
        # cancels), so their moments differ completely at the ~1e-6 level. A wrong clip,
        # decay or bias correction moves whole leaves by far more.
        scale = max(float(np.max(np.abs(a))), 0.05)
        np.testing.assert_allclose(b / scale, a / scale, atol=2e-4, err_msg=jax.tree_util.keystr(path))
    for k in ("val_loss", "val_tokens"):
        np.testing.assert_allclose(seg[3][k], one[3][k], rtol=1e-5, err_msg=k)
    assert seg[0].memory_bytes()["peak"] > 0


def test_segmented_pieces_are_shared_between_models():
    """A second model with the same layers compiles nothing; a mutated one compiles only
    its new layer pieces (and updates for parameter shapes not seen yet), never the
    embedding, head or norm again."""
    segmented.clear_programs()
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = _train_cfg(**{"train.segmented": True})
    specs = _primer_specs(4)
    batch = shd.shard_batch(_batches(1)[0], mesh)

    def compile_new(spec):
        before = set(segmented._PROGRAMS)
        trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
        seconds = trainer.compile(trainer.restore_target(), batch)
        return seconds, [k[0] for k in set(segmented._PROGRAMS) - before]

    seconds, kinds = compile_new(specs[0])
    assert seconds > 0 and {"embed", "layer", "head", "norm", "update"} <= set(kinds)
    assert kinds.count("layer") == 1  # the seed's layers are equal: one pair for all
    assert compile_new(dataclasses.replace(specs[0], name="again")) == (0.0, [])
    for spec in specs[1:]:
        _, kinds = compile_new(spec)
        assert set(kinds) <= {"layer", "update"} and kinds.count("layer") <= len(spec.layers)


def test_segmented_refuses_what_it_cannot_run():
    mesh = shd.make_mesh((-1, 1, 1))
    spec = _primer_specs(1)[0]
    on = {"train.segmented": True}
    gpt2 = get_spec("gpt2", "tiny", vocab_size=VOCAB, max_len=LEN)
    cases = [
        (gpt2, on, "train.segmented=true cannot run gpt2-tiny: dropout"),
        (get_spec("vanilla", "tiny", vocab_size=VOCAB, max_len=LEN), on, "relative position biases"),
        (spec, {**on, "train.flat_optimizer": True}, "train.flat_optimizer=true"),
        (spec, {**on, "train.grad_accum_steps": 2, "train.batch_size": 16}, "train.grad_accum_steps=2"),
    ]
    for s, overrides, message in cases:
        with pytest.raises(TrainConfigError, match=message):
            Trainer(s, _train_cfg(**overrides), mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    if jax.device_count() >= 2:
        fsdp = shd.make_mesh((1, -1, 1))
        with pytest.raises(TrainConfigError, match="shards parameters"):
            Trainer(spec, _train_cfg(**on), fsdp, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    trainer = Trainer(spec, _train_cfg(**on), mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    bad = dict(_batches(1)[0], segment_ids=np.zeros((BATCH, LEN), np.int32))
    with pytest.raises(ValueError, match="train.segmented runs language-model batches"):
        trainer.step(trainer.init_state(), bad)


def test_segmented_registry_is_bounded_and_live_trainers_keep_their_pieces(monkeypatch):
    """At most MAX_PROGRAMS['layer'] layer pieces stay registered (memory stays bounded
    over a long search); a trainer whose pieces were dropped still steps with them."""
    segmented.clear_programs()
    monkeypatch.setitem(segmented.MAX_PROGRAMS, "layer", 1)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = _train_cfg(**{"train.segmented": True})
    batch = _batches(1)[0]
    trainers = []
    for spec in _primer_specs(3):
        trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
        state = trainer.init_state()
        trainer.step(state, batch)
        trainers.append((trainer, state))
        assert sum(k[0] == "layer" for k in segmented._PROGRAMS) == 1
    first, state = trainers[0]
    _, metrics = first.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_segmented_trainer_steps_from_an_inherited_state(n_devices):
    """``Trainer.with_params`` (weight inheritance) hands the segmented step a state it
    can run on a multi-device mesh, with the step counter placed like ``init_state``'s."""
    spec = _primer_specs(1)[0]
    mesh = shd.make_mesh((-1, 1, 1))
    batches = _batches(2)
    parent = Trainer(spec, _train_cfg(), mesh, shd.DEFAULT_RULES, seed=1, seq_len=LEN)
    child = Trainer(spec, _train_cfg(**{"train.segmented": True}), mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    state, copied = child.with_params(child.init_state(), parent.init_state().params)
    assert copied == len(jax.tree.leaves(state.params))
    assert state.step.sharding.is_equivalent_to(child.state_shardings.step, 0)
    for b in batches:
        state, m = child.step(state, b)
    assert int(state.step) == 2 and np.isfinite(float(m["loss"]))
