"""train.segmented: the step as shared pieces computes the one-program step, and shares its programs."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax import sharding as shd
from nasjax.config import apply_overrides, load_config_file
from nasjax.models import get_spec, transformer
from nasjax.search.run import make_space
from nasjax.train import segmented
from nasjax.train.loop import Hooks, TrainConfigError, Trainer

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
    base["train.segmented_pieces"] = "layer"  # the preset's subprogram pieces: the tests below that name them
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


@pytest.mark.parametrize(
    "tied,layout", [(True, "flat"), (False, "flat"), (True, "shaped")], ids=["tied", "untied", "tied-shaped"]
)
def test_segmented_steps_equal_the_one_program_step(n_devices, tied, layout):
    """Same losses, gradient norms, learning rates, parameters, optimizer state (structure
    and values) and validation as the one-program step, up to float rounding, over 3
    steps on a data-parallel mesh of all devices, with clipping and weight decay active
    (decay on matrices only: in the flat layout the buffers are 1-D, so a decay mask read
    from the buffers' rank would skip every matrix and fail this)."""
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
    seg = _run(spec, _train_cfg(**{"train.segmented": True, "train.segmented_layout": layout}), mesh, batches)
    assert seg[0]._segments.layout == layout
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


def test_segmented_registry_is_bounded_in_bytes_by_the_setting(monkeypatch):
    """train.segmented_max_mb is checked by name and sets the registry's bound in bytes; the
    bound drops the least recently used pieces (measured relative to what one model's
    pieces serialize to here, so it holds whatever the backend's program sizes); a
    trainer whose pieces were dropped still steps."""
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batch = _batches(1)[0]
    with pytest.raises(TrainConfigError, match=re.escape("train.segmented_max_mb=-1: expected an int >= 0")):
        Trainer(_primer_specs(1)[0], _train_cfg(**{"train.segmented_max_mb": -1}), mesh, shd.DEFAULT_RULES, 0, LEN)
    for bad in (1.5, True, "48"):  # a config file can hold any type
        with pytest.raises(ValueError, match=re.escape(f"train.segmented_max_mb={bad!r}: expected an int >= 0")):
            segmented.check_max_mb({"segmented_max_mb": bad})
    assert segmented.check_max_mb({}) == segmented.DEFAULT_MAX_MB * 2**20
    assert load_config_file(PRIMER_TINY).train.segmented_max_mb == segmented.DEFAULT_MAX_MB  # one default
    assert segmented.check_max_mb({"segmented_max_mb": 0}) is None
    segmented.clear_programs()
    try:
        for max_mb, expected in ((0, None), (3, 3 * 2**20)):  # the setting reaches the registry
            Trainer(
                _primer_specs(1)[0],
                _train_cfg(**{"train.segmented": True, "train.segmented_max_mb": max_mb}),
                mesh,
                shd.DEFAULT_RULES,
                0,
                LEN,
            )
            assert segmented._PROGRAMS.max_bytes == expected
        segmented.clear_programs()
        bound = [10**12]  # first: measured, not binding
        monkeypatch.setattr(segmented, "check_max_mb", lambda cfg: bound[0])
        cfg = _train_cfg(**{"train.segmented": True})
        trainers, counts = [], []
        for k, spec in enumerate(_primer_specs(3)):
            trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
            state = trainer.init_state()
            trainer.step(state, batch)
            trainers.append((trainer, state))
            counts.append(len(segmented._PROGRAMS))
            if k == 0:
                one_model = segmented._PROGRAMS.nbytes()
                assert one_model > 0
                bound[0] = one_model // 2  # the next trainers set half of one model's pieces
            else:
                assert segmented._PROGRAMS.nbytes() <= bound[0] or len(segmented._PROGRAMS) == 1
        assert counts[1] < counts[0] and counts[2] < counts[0]
        first, state = trainers[0]
        _, metrics = first.step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    finally:
        segmented.clear_programs()
        segmented._PROGRAMS.set_max_bytes(segmented.DEFAULT_MAX_MB * 2**20)


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


# ------------------------------------------------------------------ train.segmented_pieces=subprogram|instruction


def _every_structure_program():
    """A program with each structure the instruction tape handles: nested branched CALLs
    (parameters with two and three leading branch axes), a two-argument callee, branched
    learned and parameter-free ops (a branched DCONV, one conv with copies, at depth 0,
    inside a branched CALL, and on a branched callee's argument, which the callee's copies
    share), position-by-position states, an input read twice, constants,
    and dead code holding parameters."""
    from nasjax.genome.primer import _Writer
    from nasjax.genome.program import Program, Subprogram

    DK, DM = 0, 1  # dims: 8, 32 (base 8)
    HALF, EPS = 0, 1  # constants
    w = _Writer()
    n = w("CALL", 0, call=1)
    att = w("CALL", n, n, call=2, branches=2)
    y = w("ADD", 0, att)
    c = w("CONV_7X1", y, dim=DK, branches=2)
    d = w("DCONV_3X1", c, branches=2)
    sq = w("MULTIPLY", d, d)
    w("CONV_1X1", w("SIGMOID", sq), dim=DM)  # dead: its parameters get zero gradients
    t = w("TANH", w("C_MUL", w("CUM_SUM", sq), const=HALF), branches=2)
    w("ADD", y, w("CONV_1X1", t, dim=DM))
    main = Subprogram(tuple(w.instructions), 1, "main")

    w = _Writer()  # 1: a norm
    mean = w("RED_MEAN", 0)
    centred = w("DIFFERENCE", 0, mean)
    inv = w("RECIP", w("ABS_ROOT", w("C_ADD", w("RED_MEAN", w("SQUARE", centred)), const=EPS)))
    w("SHIFT", w("SCALE", w("MULTIPLY", centred, inv)))
    norm = Subprogram(tuple(w.instructions), 1, "norm")

    w = _Writer(2)  # 2: two arguments, branched by the caller; calls 3 branched again
    q = w("CONV_1X1", 0, dim=DK)
    k = w("DCONV_3X1", w("CONV_1X1", 1, dim=DK), branches=4)
    v = w("CONV_1X1", w("DCONV_3X1", 1, branches=2), dim=DK)  # on the shared argument itself
    s = w("MASK", w("T_MAT_MUL", q, k))
    p = w("CALL", s, call=3, branches=2)
    w("MAT_MUL", p, v)
    head = Subprogram(tuple(w.instructions), 2, "head")

    w = _Writer()  # 3: softmax with a branched learned scale on a position-by-position state
    m = w("DIFFERENCE", 0, w("RED_MAX", 0))
    e = w("EXP", m)
    w("SCALE", w("DIVIDE", e, w("RED_SUM", e)), branches=2)
    softmax = Subprogram(tuple(w.instructions), 1, "softmax")
    program = Program((main, norm, head, softmax), constants=(0.5, 1e-6), dims=(1, 4))
    program.validate()
    return program


def _layer_case(program, d_model: int = 32, base_dim: int = 8):
    from nasjax.genome.primer import program_model_spec

    return program_model_spec(program, base_dim=base_dim, d_model=d_model, n_layers=1, vocab_size=VOCAB, max_len=LEN)


@pytest.mark.parametrize("pieces,layout", [("subprogram", "flat"), ("subprogram", "shaped"), ("instruction", "flat")])
def test_program_pieces_compute_the_layer_and_its_gradients(pieces, layout):
    """In float64, the chain of instruction pieces gives the layer's output, the input's
    gradient and every parameter's gradient of ``jax.vjp`` of the one-program layer, to
    1e-12 of their scale: the vanilla and Primer-EZ seeds and a program with every
    structure the tape handles. Parameters read only by dead code get exact zeros. In the
    flat layout the pieces take and return 1-D buffers whose padding gets zero gradients."""
    from nasjax.genome.primer import primer_ez_program, vanilla_program

    programs = {
        "vanilla": vanilla_program(2, 32, 64),
        "primer_ez": primer_ez_program(2, 32, 64),
        "every_structure": _every_structure_program(),
    }
    with jax.enable_x64(True):
        for name, program in programs.items():
            layer = _check_program_layer(name, program, 8 if name == "every_structure" else 16, pieces, layout)
    assert {s.depth for s in layer.tape} == {0, 1, 2}  # every_structure's nested branches


def _abstract64(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _check_program_layer(name, program, base_dim, pieces, layout):
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = _train_cfg(**{"train.segmented": True, "train.segmented_pieces": pieces, "train.segmented_layout": layout})
    rep = shd.replicated(mesh)
    spec = _layer_case(program, base_dim=base_dim)
    trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    steps = trainer._segments
    steps.seg, steps.dtype = transformer.Segments(spec, dtype=jnp.float64), jnp.dtype(jnp.float64)
    seg = steps.seg
    params = jax.tree.map(
        lambda a: jax.device_put(np.asarray(a, np.float64) * 8, rep),  # larger weights: every op matters
        seg.layer_params(trainer.init_state().params, 0),
    )
    x = jax.device_put(np.random.default_rng(1).normal(size=(BATCH, LEN, 32)), rep)
    g = jax.device_put(np.random.default_rng(2).normal(size=(BATCH, LEN, 32)), rep)
    y_ref, vjp = jax.vjp(jax.jit(lambda p, h: seg.layer(0, p, h)), params, x)
    gp_ref, gx_ref = vjp(g)
    layer = segmented.ProgramLayer(
        steps, spec.layers[0].mixer, _abstract64(seg.program_params(params), rep), _abstract64(x, rep)
    )
    y, residuals = layer.forward(steps.pack_params(params), x)
    gp, gx, sumsq = layer.backward(residuals, g, None)
    if layout == "flat":
        sizes = [segmented.flat_size(a.shape) for a in jax.tree.leaves(params)]
        assert [a.shape for a in jax.tree.leaves(gp)] == [(n,) for n in sizes]
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(params)):  # the padding's gradient
            assert not np.any(np.asarray(a)[b.size :])
        gp = jax.tree.map(lambda a, b: np.asarray(a)[: b.size].reshape(b.shape), gp, params)
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(gp_ref))
    np.testing.assert_allclose(y, y_ref, atol=1e-12 * float(np.max(np.abs(y_ref))), err_msg=name)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-12 * float(np.max(np.abs(gx_ref))), err_msg=name)
    assert jax.tree.structure(gp) == jax.tree.structure(gp_ref), name
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gp)[0], jax.tree.leaves(gp_ref)):
        np.testing.assert_allclose(a, b, atol=1e-12 * scale, err_msg=f"{name} {jax.tree_util.keystr(path)}")
    expected = sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(gp_ref))
    np.testing.assert_allclose(float(sumsq), expected, rtol=1e-6)
    if name == "every_structure":
        dead = [p for p, a in jax.tree_util.tree_flatten_with_path(gp)[0] if not np.any(a)]
        # the dead CONV_1X1 (other zeros: a causal depthwise conv's taps past the first row)
        assert sum("conv_1x1" in jax.tree_util.keystr(p) for p in dead) == 1, dead
    return layer


@pytest.mark.parametrize("pieces", ["subprogram", "instruction"])
def test_program_pieces_train_like_layer_pieces(n_devices, pieces):
    """Three steps of the vanilla seed on a data-parallel mesh of all devices, clipping and
    decay active: the same losses, norms, parameters and validation as layer pieces."""
    spec = _primer_specs(1)[0]
    mesh = shd.make_mesh((-1, 1, 1))
    batches = _batches(5)
    whole = _run(spec, _train_cfg(**{"train.segmented": True}), mesh, batches)
    ops = _run(spec, _train_cfg(**{"train.segmented": True, "train.segmented_pieces": pieces}), mesh, batches)
    for a, b in zip(whole[2], ops[2]):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(whole[1])[0], jax.tree.leaves(ops[1])):
        scale = max(float(np.max(np.abs(a))), 0.05)
        np.testing.assert_allclose(
            np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-4, err_msg=jax.tree_util.keystr(path)
        )
    for k in ("val_loss", "val_tokens"):
        np.testing.assert_allclose(ops[3][k], whole[3][k], rtol=1e-5, err_msg=k)
    assert ops[0].memory_bytes()["peak"] > 0


@pytest.mark.parametrize("pieces", ["subprogram", "instruction"])
def test_program_pieces_are_shared_across_programs(pieces):
    """After the seed, mutated programs compile few pieces (none for most), never a layer
    program; a program that differs only in a constant compiles nothing at all."""
    import dataclasses as dc

    from nasjax.genome.program import ProgramSpec

    segmented.clear_programs()
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = _train_cfg(**{"train.segmented": True, "train.segmented_pieces": pieces})
    batch = shd.shard_batch(_batches(1)[0], mesh)

    def compile_new(spec):
        before = set(segmented._PROGRAMS)
        trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
        trainer.compile(trainer.restore_target(), batch)
        return [k[0] for k in set(segmented._PROGRAMS) - before]

    specs = _primer_specs(8)
    kinds = compile_new(specs[0])
    assert "layer" not in kinds and kinds.count("instruction") >= 10
    new = [compile_new(s).count("instruction") for s in specs[1:]]
    first = kinds.count("instruction")
    # a child compiles the pieces its mutation touched, on average under half of a program's
    assert sum(new) < len(new) * first / 2, (first, new)
    assert new.count(0) >= 1, (first, new)  # and some children none at all
    block = specs[0].layers[0]
    program = block.mixer.program
    changed = dc.replace(program, constants=tuple(c * 1.5 for c in program.constants))
    spec = dc.replace(
        specs[0], layers=(dc.replace(block, mixer=ProgramSpec(changed, block.mixer.base_dim)),) * len(specs[0].layers)
    )
    assert [k for k in compile_new(spec) if k != "update"] == []


def test_segmented_pieces_is_checked():
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(
        TrainConfigError, match="train.segmented_pieces='ops': expected one of 'layer', 'subprogram', 'instruction'"
    ):
        Trainer(
            _primer_specs(1)[0],
            _train_cfg(**{"train.segmented_pieces": "ops"}),
            mesh,
            shd.DEFAULT_RULES,
            seed=0,
            seq_len=LEN,
        )


def test_segmented_update_chunk_is_checked_and_changes_only_the_grouping():
    """train.segmented_update_chunk: a bad value is refused by name; 1 (one update
    program per leaf) and the default 16 give the same step, leaf for leaf."""
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = _primer_specs(1)[0]
    for bad in ("16", True, 2.0):  # what a config typed by hand could hold
        with pytest.raises(ValueError, match="train.segmented_update_chunk"):
            segmented.check_update_chunk({"segmented_update_chunk": bad})
    assert segmented.check_update_chunk({"segmented_update_chunk": 4}) == (4, 2, 1)
    for bad in (3, 32):
        with pytest.raises(TrainConfigError, match=r"train.segmented_update_chunk=.*expected one of 1, 2, 4, 8, 16"):
            Trainer(
                spec,
                _train_cfg(**{"train.segmented": True, "train.segmented_update_chunk": bad}),
                mesh,
                shd.DEFAULT_RULES,
                seed=0,
                seq_len=LEN,
            )
    batches = _batches(4)
    wide = _run(spec, _train_cfg(**{"train.segmented": True}), mesh, batches, steps=2)
    narrow = _run(spec, _train_cfg(**{"train.segmented": True, "train.segmented_update_chunk": 1}), mesh, batches, 2)
    groups = {name: run[0]._segments._train[1]["updates"] for name, run in (("wide", wide), ("narrow", narrow))}
    assert all(len(chunk) == 1 for _, chunk in groups["narrow"]) and len(groups["narrow"]) > len(groups["wide"])
    for a, b in zip(jax.tree.leaves(wide[1]), jax.tree.leaves(narrow[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert [m["loss"] for m in wide[2]] == pytest.approx([m["loss"] for m in narrow[2]], rel=1e-6)


def test_layers_without_parameters_train_in_every_mode():
    """A program of parameter-free ops has no parameter subtree for its layers: every
    segmented mode steps it, with the one-program step's losses."""
    from nasjax.genome.primer import _Writer
    from nasjax.genome.program import Program, Subprogram

    w = _Writer()
    w("ADD", 0, w("TANH", 0))
    spec = _layer_case(Program((Subprogram(tuple(w.instructions), 1, "main"),), (1.0,), (1,)))
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batches = _batches(4)
    losses = {}
    for mode in ("one", "layer", "subprogram", "instruction"):
        overrides = {"train.segmented": mode != "one", "train.segmented_pieces": "layer" if mode == "one" else mode}
        losses[mode] = _run(spec, _train_cfg(**overrides), mesh, batches, steps=2)[2]
    for mode in ("layer", "subprogram", "instruction"):
        for a, b in zip(losses["one"], losses[mode]):
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, err_msg=mode)


def test_segmented_layout_is_checked():
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = _primer_specs(1)[0]
    cases = [
        ({"train.segmented_layout": "packed"}, "train.segmented_layout='packed': expected one of 'shaped', 'flat'"),
        (
            {"train.segmented_layout": "flat", "train.optimizer": "adafactor"},
            "train.segmented_layout='flat' needs train.optimizer=adamw",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(TrainConfigError, match=re.escape(message)):
            Trainer(spec, _train_cfg(**{"train.segmented": True, **overrides}), mesh, shd.DEFAULT_RULES, 0, LEN)
    shaped = Trainer(
        spec,
        _train_cfg(**{"train.segmented": True, "train.segmented_layout": "shaped", "train.optimizer": "adafactor"}),
        mesh,
        shd.DEFAULT_RULES,
        0,
        LEN,
    )
    assert not shaped._segments.flat


def test_flat_sizes():
    shapes = [(), (5,), (60,), (64,), (2, 32, 16), (30, 64)]
    assert [segmented.flat_size(s) for s in shapes] == [1, 5, 64, 64, 1024, 2048]
    for n in range(1, 5000, 7):  # a size class holds the leaf, at most 25% more (8 and up)
        assert n <= segmented.flat_size((n,)) <= max(8, n * 1.25)


def test_flat_layout_updates_depend_on_size_classes_only():
    """Two GPT-2 models whose parameter shapes differ (d_ff 64 vs 60) but fall in the same
    size classes share every update program in the flat layout, and compile their own
    in the shaped one; the flat programs take 1-D buffers only."""
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batch = shd.shard_batch(_batches(1)[0], mesh)

    def new_updates(spec, layout, **overrides):
        before = set(segmented._PROGRAMS)
        cfg = _train_cfg(**{"train.segmented": True, "train.segmented_layout": layout, **overrides})
        trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
        trainer.compile(trainer.restore_target(), batch)
        return [k for k in set(segmented._PROGRAMS) - before if k[0] == "update"]

    def gpt2(d_ff):
        return get_spec(
            "gpt2", "tiny", vocab_size=VOCAB, max_len=LEN, d_model=32, n_heads=2, d_ff=d_ff, dropout_rate=0.0,
            attention_dropout_rate=0.0,
        )  # fmt: skip

    for layout, shares in (("flat", True), ("shaped", False)):
        segmented.clear_programs()
        first = new_updates(gpt2(64), layout)
        assert first
        if layout == "flat":
            assert all(len(shape) == 1 for k in first for (shape, _, _) in k[2][1])
        n = len(new_updates(gpt2(60), layout))
        assert (n == 0) if shares else (n > 0), (layout, n)
        if layout == "flat":  # decay on matrices only: two chains
            assert {k[5] for k in first} == {True, False}
    segmented.clear_programs()  # without weight decay one chain serves every leaf: half the programs
    assert {k[5] for k in new_updates(gpt2(64), "flat", **{"train.weight_decay": 0.0})} == {False}


def test_flat_layout_keeps_the_callers_layout_and_zero_padding(monkeypatch):
    """Trainer.step and fit take and give parameters in their own shapes; inside a fit
    the buffers' padding stays exactly zero (parameters and both Adam moments), and the
    host conversions are exact both ways."""
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = _primer_specs(2)[1]
    cfg = _train_cfg(**{"train.segmented": True, "train.segmented_layout": "flat"})
    trainer = Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    flat = trainer._segments
    state = trainer.init_state()
    shapes = [a.shape for a in jax.tree.leaves(trainer.abstract_state.params)]
    packed = flat.pack_state(state)
    assert flat.is_packed(packed) and not flat.is_packed(state)
    assert [x.shape for x in jax.tree.leaves(packed.params)] == [(segmented.flat_size(s),) for s in shapes]
    for a, b in zip(jax.tree.leaves(flat.unpack_state(packed)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batches = _batches(4)
    stepped, _ = trainer.step(state, batches[0])
    assert [x.shape for x in jax.tree.leaves(stepped.params)] == shapes
    seen, unpacks = [], []
    unpack = flat.unpack_state
    monkeypatch.setattr(flat, "unpack_state", lambda st: unpacks.append(1) or unpack(st))
    hooks = Hooks(on_step_end=lambda step, st: seen.append((step, st)), state_needed=lambda step: step == 3)
    fitted, result = trainer.fit(stepped, iter(batches[1:]), total_steps=4, hooks=hooks)
    monkeypatch.undo()
    assert result.step == 4 and [x.shape for x in jax.tree.leaves(fitted.params)] == shapes
    # the hook ran only at the step it asked for, with a shaped state; converted there and at the end
    assert [step for step, _ in seen] == [3] and len(unpacks) == 2
    assert [x.shape for x in jax.tree.leaves(seen[0][1].params)] == shapes
    inside = flat.pack_state(fitted)
    for _ in range(2):
        inside, _ = trainer.step(inside, batches[0])
    assert flat.is_packed(inside)
    mu, nu = inside.opt_state[1][0].mu, inside.opt_state[1][0].nu
    for tree in (inside.params, mu, nu):
        for x, shape in zip(jax.tree.leaves(tree), shapes):
            assert not np.any(np.asarray(x)[int(np.prod(shape)) :])
    assert float(jnp.sum(jnp.abs(jax.tree.leaves(nu)[0]))) > 0


def test_segmented_xla_options_are_checked_keyed_and_change_only_rounding():
    """train.segmented_xla_options: malformed values and options this XLA lacks are refused
    by name; 'auto' sets XLA:CPU's earlier kernel emitters here; the options are part of a
    piece's key (a trainer with other options compiles its own pieces); and the step with
    them equals the step with XLA's defaults up to float rounding."""
    from nasjax import xla_options
    from nasjax.search.engine import EngineError, check_engine_settings

    for bad in ("xla_cpu_use_fusion_emitters", "=1", "a=1,b", "a b=1"):
        with pytest.raises(ValueError, match="train.segmented_xla_options=.*cannot read"):
            xla_options.check({"segmented_xla_options": bad})
    with pytest.raises(ValueError, match="expected a string"):
        xla_options.check({"segmented_xla_options": 3})
    # booleans as booleans (XLA refuses the text for a bool option), the rest as text (XLA
    # parses it by the option's type; a NaN would never equal itself in a program's key)
    assert xla_options.parse("a=true, b=2,c=0.5,d=x,e=nan") == {"a": True, "b": "2", "c": "0.5", "d": "x", "e": "nan"}
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = _primer_specs(1)[0]

    def trainer(value):
        cfg = _train_cfg(**{"train.segmented": True, "train.segmented_xla_options": value})
        return Trainer(spec, cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)

    with pytest.raises(TrainConfigError, match="train.segmented_xla_options='a=1,b': expected"):
        trainer("a=1,b")
    with pytest.raises(TrainConfigError, match="xla_no_such_option.*does not compile with these options"):
        trainer("xla_no_such_option=true")
    search_cfg = apply_overrides(load_config_file(PRIMER_TINY), {"train.segmented_xla_options": "xla_no_such_option=1"})
    with pytest.raises(EngineError, match="xla_no_such_option"):  # a search refuses it before any candidate
        check_engine_settings(search_cfg)
    from nasjax.search.engine import Worker

    with pytest.raises(ValueError, match="xla_no_such_option"):  # ... and so does a worker process or actor
        Worker(search_cfg.to_json(), {"kind": "byte"}, "primer")
    assert xla_options.resolve({"segmented_xla_options": "xla_cpu_enable_fast_min_max=false"}, "cpu") == {
        "xla_cpu_enable_fast_min_max": False
    }
    if xla_options.accepted(xla_options.AUTO["cpu"], "cpu"):  # a newer XLA may drop it: auto then warns
        pytest.skip("this XLA does not take xla_cpu_use_fusion_emitters")
    assert trainer("auto")._segments.xla_options == xla_options.AUTO["cpu"]
    # auto's update programs also split their code generation (same bits, shorter compile)
    split = xla_options.accepted({**xla_options.AUTO["cpu"], **xla_options.AUTO_UPDATES["cpu"]}, "cpu") == ""
    expected = {**xla_options.AUTO["cpu"], **(xla_options.AUTO_UPDATES["cpu"] if split else {})}
    assert trainer("auto")._segments.update_xla_options == expected
    assert trainer("")._segments.xla_options == trainer("")._segments.update_xla_options == {}
    explicit = trainer("xla_cpu_use_fusion_emitters=false")._segments  # an explicit setting: every program alike
    assert explicit.update_xla_options == explicit.xla_options == xla_options.AUTO["cpu"]
    assert xla_options.resolve({"segmented_xla_options": "auto"}, "gpu") == {}
    assert xla_options.resolve({"segmented_xla_options": "auto"}, "gpu", updates=True) == {}

    segmented.clear_programs()
    batches = _batches(4)
    runs = {}
    for value in ("", "auto", "xla_cpu_use_fusion_emitters=false"):
        before = set(segmented._PROGRAMS)
        runs[value] = (_run(spec, _train_cfg(**{"train.segmented": True, "train.segmented_xla_options": value}),
                            mesh, batches, steps=2), set(segmented._PROGRAMS) - before)  # fmt: skip
    assert runs[""][1] and runs["auto"][1]
    # the explicit emitters option shares auto's pieces; only its update programs differ (when auto splits)
    assert {k[0] for k in runs["xla_cpu_use_fusion_emitters=false"][1]} == ({"update"} if split else set())
    (a, _), (b, _), (c, _) = runs[""], runs["auto"], runs["xla_cpu_use_fusion_emitters=false"]
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    assert [m["loss"] for m in b[2]] == pytest.approx([m["loss"] for m in a[2]], rel=1e-5)
    for x, y in zip(jax.tree.leaves(b[1]), jax.tree.leaves(c[1]), strict=True):  # the split changes no bit
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_auto_xla_options_fall_back_option_by_option(monkeypatch):
    """``auto`` when this XLA refuses some of its options: the pieces fall back to XLA's
    defaults, the update programs keep what XLA takes (the split alone when only the
    emitters option is refused), and each fallback warns once."""
    import warnings

    from nasjax import xla_options

    emitters = next(iter(xla_options.AUTO["cpu"]))
    cfg = {"segmented_xla_options": "auto"}

    def refusing(names):
        return lambda options, platform=None: "INVALID_ARGUMENT: refused" if set(options) & set(names) else ""

    monkeypatch.setattr(xla_options, "_warned", set())
    monkeypatch.setattr(xla_options, "accepted", refusing({emitters}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xla_options.resolve(cfg, "cpu") == {}
        assert xla_options.resolve(cfg, "cpu", updates=True) == xla_options.AUTO_UPDATES["cpu"]
        assert xla_options.resolve(cfg, "cpu", updates=True) == xla_options.AUTO_UPDATES["cpu"]
    assert len(caught) == 1 and "XLA's defaults" in str(caught[0].message)
    monkeypatch.setattr(xla_options, "_warned", set())
    monkeypatch.setattr(xla_options, "accepted", refusing({emitters, *xla_options.AUTO_UPDATES["cpu"]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xla_options.resolve(cfg, "cpu", updates=True) == {}
        assert xla_options.resolve(cfg, "cpu", updates=True) == {}
    assert len(caught) == 2  # the pieces' fallback and the updates', once each
    assert xla_options.resolve({"segmented_xla_options": ""}, "cpu", updates=True) == {}


@pytest.mark.parametrize("optimizer,layout", [("adamw", "flat"), ("adafactor", "shaped")])
def test_update_programs_read_the_shared_step_count_once(optimizer, layout):
    """An update program of several leaves reads the optimizer's shared leaves (the step
    counts) from its first view only, so XLA computes the step's scalars once per program:
    the same values bit for bit as every view reading its own (clipping and weight decay
    active), and fewer kernels."""
    import functools

    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = _train_cfg(**{"train.segmented": True, "train.segmented_layout": layout, "train.optimizer": optimizer})
    trainer = Trainer(_primer_specs(1)[0], cfg, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    state = trainer.init_state()
    for b in _batches(2):
        state, _ = trainer.step(state, b)  # counts > 0, moments nonzero
    steps = trainer._segments
    plan = steps._train[1]
    slots = plan["slots"]
    shared = tuple(not m for m in slots.mirror)
    assert any(shared) and not all(shared)
    packed = steps.pack_state(state)
    views = slots.views(steps._inner_state(packed.opt_state))
    params = jax.tree.leaves(packed.params)
    groups = [g for g in plan["updates"] if len(g[1]) >= 4]
    assert groups, "the tiny program has several leaves of one size class"
    chunk = groups[0][1]
    rng = np.random.default_rng(0)
    ps = tuple(params[i] for i in chunk)
    gs = tuple(jnp.asarray(rng.normal(size=p.shape), p.dtype) for p in ps)
    vs = tuple(views[i] for i in chunk)
    args = (ps, gs, vs, jnp.float32(3.0), jnp.float32(0.5))
    kernels = {}
    outs = {}
    decay = True if layout == "flat" else None  # the flat layout names the decay; shaped: the optimizer's mask
    for name, flag in (("own", None), ("shared", shared)):
        fn = jax.jit(functools.partial(steps._leaf_updates, decay=decay, shared=flag))
        compiled = fn.lower(*args).compile()
        kernels[name] = len(re.findall(r"= \S+ fusion\(", compiled.as_text()))
        outs[name] = jax.device_get(compiled(*args))
    for a, b in zip(jax.tree.leaves(outs["own"]), jax.tree.leaves(outs["shared"]), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert kernels["shared"] < kernels["own"]
