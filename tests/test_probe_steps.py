"""search.probe=steps: a candidate's checks on its own train-step pieces give the model probe's verdicts."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax import sharding as shd
from nasjax.config import apply_overrides, load_config_file
from nasjax.genome.primer import primer_ez_program, program_model_spec, vanilla_program
from nasjax.genome.program import Instruction
from nasjax.measure.probe import future_changed, probe_from_forward, probe_from_steps, probe_model, step_probe_batch
from nasjax.models import get_spec
from nasjax.train.loop import TrainConfigError, Trainer

VOCAB, LEN, BATCH = 64, 16, 8
PRIMER_TINY = os.path.join(os.path.dirname(__file__), "..", "configs/search/primer.py:tiny")


def _train_cfg(**overrides):
    cfg = load_config_file(PRIMER_TINY)
    base = {"train.segmented": True, "train.flat_optimizer": False, "train.batch_size": BATCH}
    base.update(overrides)
    return apply_overrides(cfg, base).train


def steps_probe(spec, devices=1, pieces="subprogram"):
    mesh = shd.make_mesh((devices, 1, 1), devices=jax.devices()[:devices])
    trainer = Trainer(
        spec, _train_cfg(**{"train.segmented_pieces": pieces}), mesh, shd.DEFAULT_RULES, 0, LEN, op_by_op=True
    )
    state = trainer.init_state()
    batch = step_probe_batch(spec.vocab_size, BATCH, LEN, seed=0)
    out = trainer.probe(state.params, batch)
    assert set(out) == {"last_logits", "finite", "input_grads"}
    assert out["last_logits"].shape == (BATCH, spec.vocab_size) and out["input_grads"].shape == (
        BATCH,
        LEN,
        spec.d_model,
    )
    return probe_from_steps(out, LEN, seed=0), trainer


def forward_probe(spec, devices=1):
    """The search's probe (two forwards through the train step's forward programs)."""
    mesh = shd.make_mesh((devices, 1, 1), devices=jax.devices()[:devices])
    trainer = Trainer(spec, _train_cfg(), mesh, shd.DEFAULT_RULES, 0, LEN, op_by_op=True)
    state = trainer.init_state()
    batch = step_probe_batch(spec.vocab_size, BATCH, LEN, seed=0)
    first = trainer.probe_forward(state.params, batch)
    changed = trainer.probe_forward(state.params, future_changed(batch, spec.vocab_size))
    assert set(first) == {"last_logits", "finite", "x"} and first["x"].shape == (BATCH, LEN, spec.d_model)
    return probe_from_forward(first, changed, batch["weights"], seed=0)


def _program_spec(program, n_layers=1):
    return program_model_spec(program, base_dim=16, d_model=32, n_layers=n_layers, vocab_size=VOCAB, max_len=LEN)


def _gpt2(**kw):
    return get_spec("gpt2", "tiny", vocab_size=VOCAB, max_len=LEN, dropout_rate=0.0, attention_dropout_rate=0.0, **kw)


def test_probe_batch_weights_cover_each_rows_prefix():
    batch = step_probe_batch(VOCAB, 5, LEN, seed=0)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (5, LEN)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    # the middle position first, then 0, LEN // 3, LEN - 2, cycling
    prefix = batch["weights"].sum(axis=1).astype(int) - 1
    assert list(prefix) == [LEN // 2, 0, LEN // 3, LEN - 2, LEN // 2]
    assert (batch["weights"] == step_probe_batch(VOCAB, 5, LEN, seed=0)["weights"]).all()


def test_a_causal_model_passes_and_a_leaking_one_fails(monkeypatch):
    from nasjax.layers import attention
    from nasjax.train import segmented

    causal, _ = steps_probe(_gpt2())
    assert causal.finite and causal.causal_leak == 0.0 and causal.causal
    # a decoder whose attention sees the future: the causal mask lets every key through
    segmented.clear_programs()  # the pieces above were compiled with the mask
    monkeypatch.setattr(attention, "causal_mask", lambda length: np.ones((length, length), bool))
    try:
        leaky, _ = steps_probe(_gpt2())
        model = probe_model(_gpt2(), seq_len=LEN)
    finally:
        segmented.clear_programs()
    assert leaky.finite and leaky.causal_leak > 1e-3 and not leaky.causal
    assert not model.causal  # the model probe agrees


def test_verdicts_agree_with_the_model_probe_on_primer_programs():
    """Causal and finite alike on the seeds and on programs that look at the future
    (a causal mask dropped) or overflow at init (exp of exp)."""
    seeds = [vanilla_program(2, 32, 64), primer_ez_program(2, 32, 64)]
    programs = list(seeds)
    # non-finite at init: a layer that returns exp(exp(exp(x)))
    base = seeds[0]
    blowup = base.subprograms[0]
    exps = tuple(Instruction("EXP", in1=1) for _ in range(3))
    subs = list(base.subprograms)
    subs[0] = dataclasses.replace(blowup, instructions=blowup.instructions + exps)
    programs.append(dataclasses.replace(base, subprograms=tuple(subs)))
    for program in programs:
        spec = program_model_spec(program, base_dim=16, d_model=32, n_layers=1, vocab_size=VOCAB, max_len=LEN)
        steps, _ = steps_probe(spec)
        model = probe_model(spec, seq_len=LEN, op_by_op=True)
        assert (steps.finite, steps.causal) == (model.finite, model.causal), (steps, model)


def test_equivalent_programs_share_a_hash_on_steps(noop_variant):
    """A live no-op instruction (x * 0 added back) changes the program, not the function."""
    base, variant = noop_variant
    spec = lambda p: program_model_spec(p, base_dim=16, d_model=32, n_layers=2, vocab_size=VOCAB, max_len=LEN)  # noqa: E731
    a, _ = steps_probe(spec(base))
    b, _ = steps_probe(spec(variant))
    assert a.output_hash == b.output_hash or a.output_hash_alt == b.output_hash_alt
    c, _ = steps_probe(spec(primer_ez_program(2, 32, 64)))
    assert c.output_hash != a.output_hash


def test_probe_on_eight_devices_matches_one_device():
    one, _ = steps_probe(_gpt2())
    eight, _ = steps_probe(_gpt2(), devices=8)
    assert eight.causal_leak == 0.0 and (
        one.output_hash == eight.output_hash or one.output_hash_alt == eight.output_hash_alt
    )


def test_probe_needs_the_segmented_step():
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = Trainer(_gpt2(), _train_cfg(**{"train.segmented": False}), mesh, shd.DEFAULT_RULES, 0, LEN)
    with pytest.raises(TrainConfigError, match="set train.segmented=true"):
        trainer.probe(None, step_probe_batch(VOCAB, BATCH, LEN))


def test_search_probe_setting_is_read_or_refused(search_config):
    from nasjax.search.evaluate import probe_on_steps

    assert probe_on_steps(search_config())  # the tiny preset: segmented, one process
    assert not probe_on_steps(search_config(**{"search.probe": "model"}))
    assert not probe_on_steps(search_config(**{"train.segmented": False}))
    with pytest.raises(ValueError, match="search.probe=steps runs the segmented train step"):
        probe_on_steps(search_config(**{"train.segmented": False, "search.probe": "steps"}))
    with pytest.raises(ValueError, match="search.probe must be auto, steps or model, got 'sometimes'"):
        probe_on_steps(search_config(**{"search.probe": "sometimes"}))


def test_bad_probe_or_segmented_settings_stop_the_search_before_its_journal(search_config, tmp_path):
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    with pytest.raises(EngineError, match="search.probe must be auto, steps or model, got 'often'"):
        run_search(search_config(**{"search.probe": "often"}), str(tmp_path / "s"), log=lambda *a: None)
    assert not (tmp_path / "s" / "journal.jsonl").exists()
    for key, value in (("train.segmented_update_chunk", 3), ("train.segmented_pieces", "ops")):
        with pytest.raises(EngineError, match=f"{key}="):
            run_search(search_config(**{"train.segmented": True, key: value}), str(tmp_path / key), log=lambda *a: None)
        assert not (tmp_path / key / "journal.jsonl").exists()


def _blowup_program():
    """The vanilla seed with a first subprogram that ends in exp applied five times: exp^5(x)
    overflows for any x > -1.2 or so (exp^5(0) = exp(exp(15.2))), non-finite at init."""
    base = vanilla_program(2, 32, 64)
    first = base.subprograms[0]
    exps = tuple(Instruction("EXP", in1=1) for _ in range(5))
    subs = list(base.subprograms)
    subs[0] = dataclasses.replace(first, instructions=first.instructions + exps)
    return dataclasses.replace(base, subprograms=tuple(subs))


def _built_kinds(monkeypatch):
    """Records the kind of every piece compiled from now on: "backward" for a program layer
    piece's backward, else the key's kind ("instruction" for a program layer piece's
    forward; a pair such as the embedding's, forward and backward, is one "embed")."""
    from nasjax.train import segmented

    built, real = [], segmented._program

    def counted(key, build):
        program, dt = real(key, build)
        if dt > 0:
            built.append("backward" if "backward" in key else key[0])
        return program, dt

    monkeypatch.setattr(segmented, "_program", counted)
    return built


def test_forward_stage_gives_the_probes_values_and_compiles_no_backward(monkeypatch):
    """The probe's first stage runs the train step's own forward programs: its logits and
    verdict equal the whole probe's bit for bit, and until the rest is compiled no backward,
    loss-head, norm or update program exists."""
    from nasjax.train import segmented

    segmented.clear_programs()
    built = _built_kinds(monkeypatch)
    for n, program in enumerate((primer_ez_program(2, 32, 64), _blowup_program())):
        spec = program_model_spec(program, base_dim=16, d_model=32, n_layers=2, vocab_size=VOCAB, max_len=LEN)
        mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        trainer = Trainer(spec, _train_cfg(), mesh, shd.DEFAULT_RULES, 0, LEN, op_by_op=True)
        state = trainer.init_state()
        batch = step_probe_batch(spec.vocab_size, BATCH, LEN, seed=0)
        built.clear()
        first = trainer.probe_forward(state.params, batch)
        assert set(first) == {"last_logits", "finite", "x"} and first["last_logits"].shape == (BATCH, VOCAB)
        assert built and not {"backward", "head", "norm", "update"} & set(built), built
        lower = trainer.memory_bytes()  # nothing else of the step is compiled yet: a lower bound
        assert lower["complete"] is False and lower["peak"] > 0
        whole = trainer.probe(state.params, batch)  # compiles the rest
        # the first model compiles all kinds; the second shares the head, norm and updates
        assert {"backward"} | ({"head", "norm", "update"} if n == 0 else set()) <= set(built), built
        assert bool(first["finite"]) == bool(whole["finite"])
        np.testing.assert_array_equal(first["last_logits"], whole["last_logits"])
        memory = trainer.memory_bytes()
        assert memory["complete"] is True and memory["peak"] >= lower["peak"]
    assert bool(first["finite"]) is False  # the blow-up overflows


def test_a_candidate_non_finite_at_init_fails_before_its_backward_compiles(search_config, tmp_path, monkeypatch):
    from nasjax.search.evaluate import NON_FINITE, CandidateFailed
    from nasjax.train import segmented
    from tests.test_compile_ahead import _evaluator

    cfg = search_config()
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "eval")
    assert evaluator.probe_steps
    segmented.clear_programs()
    built = _built_kinds(monkeypatch)
    spec = program_model_spec(
        _blowup_program(),
        base_dim=16,
        d_model=32,
        n_layers=1,
        vocab_size=tokenizer.vocab_size,
        max_len=cfg.data.seq_len,
    )
    with pytest.raises(CandidateFailed) as failed:
        evaluator.check(spec)
    assert (failed.value.stage, failed.value.reason) == ("probe", NON_FINITE)
    assert built and not {"backward", "head", "norm", "update"} & set(built), built


def test_future_changed_changes_every_token_after_each_rows_position_and_nothing_before():
    batch = step_probe_batch(VOCAB, 5, LEN, seed=0)
    changed = future_changed(batch, VOCAB)
    after = batch["weights"] == 0  # the positions after t_r
    assert after.any() and (~after).any()
    assert (changed["inputs"][after] != batch["inputs"][after]).all()
    assert (changed["inputs"][~after] == batch["inputs"][~after]).all()
    assert changed["inputs"].dtype == np.int32 and changed["inputs"].min() >= 0 and changed["inputs"].max() < VOCAB
    assert changed["targets"] is batch["targets"] and changed["weights"] is batch["weights"]


def test_forward_probe_passes_a_causal_model_and_fails_a_leaking_one(monkeypatch):
    from nasjax.layers import attention
    from nasjax.train import segmented

    causal = forward_probe(_gpt2())
    assert causal.finite and causal.causal_leak == 0.0 and causal.causal
    segmented.clear_programs()
    monkeypatch.setattr(attention, "causal_mask", lambda length: np.ones((length, length), bool))
    try:
        leaky = forward_probe(_gpt2())
    finally:
        segmented.clear_programs()
    assert leaky.finite and leaky.causal_leak > 1e-3 and not leaky.causal


def test_forward_probe_agrees_with_the_model_probe_and_hashes_as_the_steps_probe():
    """Finite and causal alike on the seeds and on a program that overflows; the FEC hashes
    are the steps probe's (the same logits); eight devices give the one-device verdict."""
    for program in (vanilla_program(2, 32, 64), primer_ez_program(2, 32, 64), _blowup_program()):
        spec = program_model_spec(program, base_dim=16, d_model=32, n_layers=1, vocab_size=VOCAB, max_len=LEN)
        fwd = forward_probe(spec)
        steps, _ = steps_probe(spec)
        model = probe_model(spec, seq_len=LEN, op_by_op=True)
        assert (fwd.finite, fwd.causal) == (model.finite, model.causal), (fwd, model)
        assert (fwd.output_hash, fwd.output_hash_alt) == (steps.output_hash, steps.output_hash_alt)
    one, eight = forward_probe(_gpt2()), forward_probe(_gpt2(), devices=8)
    assert eight.finite and eight.causal_leak == 0.0
    assert one.output_hash == eight.output_hash or one.output_hash_alt == eight.output_hash_alt


def test_forward_probe_finds_a_leak_inside_a_program_layer(monkeypatch):
    """A Primer program whose attention-like ops see the future (the lower-triangle mask of
    T_MAT_MUL / MAT_MUL patched to all ones) leaks in its program-layer pieces."""
    from nasjax.layers import program as program_layers
    from nasjax.train import segmented

    spec = _program_spec(vanilla_program(2, 32, 64))
    assert forward_probe(spec).causal_leak == 0.0
    segmented.clear_programs()
    monkeypatch.setattr(program_layers, "_lower_triangle", lambda length, width: jnp.ones((length, width), bool))
    try:
        leaky = forward_probe(spec)
        model = probe_model(spec, seq_len=LEN, op_by_op=True)
    finally:
        segmented.clear_programs()
    assert leaky.finite and leaky.causal_leak > 1e-3 and not leaky.causal and not model.causal


def test_future_changed_reads_the_probed_positions_from_any_weights_dtype():
    batch = step_probe_batch(VOCAB, 4, 1024, seed=0, weights_dtype=jnp.bfloat16)  # sums stop at 256 in bfloat16
    changed = future_changed(batch, VOCAB)
    past = np.asarray(batch["weights"], np.float32) > 0
    assert (changed["inputs"][past] == batch["inputs"][past]).all()
    assert (changed["inputs"][~past] != batch["inputs"][~past]).all()


def test_an_interrupted_completion_can_be_retried_and_a_forward_plan_never_replaces_a_whole_one(monkeypatch):
    from nasjax.train.loop import abstract_batch
    from nasjax.train.segmented import SegmentedSteps

    spec = _program_spec(primer_ez_program(2, 32, 64))
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = Trainer(spec, _train_cfg(), mesh, shd.DEFAULT_RULES, 0, LEN, op_by_op=True)
    state = trainer.init_state()
    batch = shd.shard_batch(step_probe_batch(VOCAB, BATCH, LEN, seed=0), mesh)
    trainer.compile(state, batch, forward_only=True)
    real, calls = SegmentedSteps._update_groups, []

    def fails_once(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an update program that did not compile")
        return real(self, *a, **k)

    monkeypatch.setattr(SegmentedSteps, "_update_groups", fails_once)
    with pytest.raises(RuntimeError, match="did not compile"):
        trainer.compile(state, batch)
    trainer.compile(state, batch)  # retried: the plan completes
    assert trainer.memory_bytes()["peak"] > 0 and len(calls) == 2
    state, metrics = trainer.step(state, step_probe_batch(VOCAB, BATCH, LEN, seed=1))
    assert np.isfinite(float(metrics["loss"]))
    other = abstract_batch(shd.shard_batch(step_probe_batch(VOCAB, BATCH // 2, LEN, seed=0), mesh))
    with pytest.raises(ValueError, match="compiled for another batch layout"):
        trainer._segments.compile(trainer.restore_target(), other, forward_only=True)


def test_the_check_compiles_no_backward_and_training_compiles_the_rest(search_config, tmp_path, monkeypatch):
    """A candidate that passes the check has compiled its forward programs only; its
    training then compiles the backwards, loss head, norm and updates, and trains."""
    from nasjax.train import segmented
    from tests.test_compile_ahead import _evaluator

    cfg = search_config()
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "eval")
    segmented.clear_programs()
    built = _built_kinds(monkeypatch)
    spec = program_model_spec(
        primer_ez_program(2, 32, 64), base_dim=16, d_model=32, n_layers=1, vocab_size=tokenizer.vocab_size, max_len=32
    )
    check = evaluator.check(spec)
    assert check.output_hash and built and not {"backward", "head", "norm", "update"} & set(built), built
    built.clear()
    outcome = evaluator.train(spec, [None] * evaluator.n_hurdles)
    assert {"backward", "head", "norm", "update"} <= set(built), built
    assert "instruction" not in built and "embed" not in built  # training runs the check's forward programs
    assert np.isfinite(outcome.fitness) and outcome.steps > 0 and outcome.memory_bytes > 0


def test_the_memory_bound_refuses_a_candidate_before_its_probe_runs(search_config, tmp_path, monkeypatch):
    """search.max_memory_bytes is checked on the forward pieces' lower bound right after they
    compile: a candidate above it fails at stage "memory" without running its probe; one
    between the lower bound and the whole step's estimate passes the check and fails before
    its first step, as before."""
    from nasjax.search.evaluate import CandidateFailed
    from nasjax.train import loop
    from tests.test_compile_ahead import _evaluator

    spec_of = lambda tokenizer: program_model_spec(  # noqa: E731
        primer_ez_program(2, 32, 64), base_dim=16, d_model=32, n_layers=1, vocab_size=tokenizer.vocab_size, max_len=32
    )
    # The estimates without a bound: the lower bound of the forward pieces, then the whole step's.
    cfg = search_config()
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "free")
    spec = spec_of(tokenizer)
    evaluator.check(spec)
    trainer, _ = evaluator._probed[spec]
    lower = trainer.memory_bytes()
    assert lower["complete"] is False and lower["peak"] > 0
    outcome = evaluator.train(spec, [None] * evaluator.n_hurdles)
    assert lower["peak"] <= outcome.memory_bytes  # the bound is a lower bound
    assert trainer.memory_bytes()["complete"] is True

    ran = []
    real = loop.Trainer.probe_forward
    monkeypatch.setattr(loop.Trainer, "probe_forward", lambda self, *a, **k: ran.append(1) or real(self, *a, **k))
    tokenizer, evaluator = _evaluator(search_config(**{"search.max_memory_bytes": lower["peak"] - 1}), tmp_path / "low")
    with pytest.raises(CandidateFailed) as failed:
        evaluator.check(spec_of(tokenizer))
    assert failed.value.stage == "memory" and "at least" in failed.value.reason and not ran

    if outcome.memory_bytes == lower["peak"]:  # no backward temporary above the forwards' (XLA's choice)
        pytest.skip("the whole step's estimate equals its lower bound: no bound lies between them")
    # a bound between the two: the check passes, the whole step's estimate refuses it
    between = search_config(**{"search.max_memory_bytes": outcome.memory_bytes - 1})
    tokenizer, evaluator = _evaluator(between, tmp_path / "between")
    spec = spec_of(tokenizer)
    evaluator.check(spec)
    assert ran
    with pytest.raises(CandidateFailed) as failed:
        evaluator.train(spec, [None] * evaluator.n_hurdles)
    assert failed.value.stage == "memory" and "at least" not in failed.value.reason
