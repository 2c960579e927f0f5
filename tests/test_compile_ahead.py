"""search.compile_ahead: a candidate's steps compile while its probe runs, with identical results."""

import os

import numpy as np
import pytest


def _evaluator(cfg, workdir):
    from nasjax import sharding as shd
    from nasjax.search.evaluate import TrainingEvaluator
    from nasjax.search.run import _build_data

    os.makedirs(workdir, exist_ok=True)
    tokenizer, data = _build_data(cfg, str(workdir), log=lambda *a: None)
    mesh = shd.make_mesh(tuple(cfg.mesh.shape))
    return tokenizer, TrainingEvaluator(cfg, data, mesh, shd.rules_from_config(cfg.mesh.rules), log=lambda *a: None)


def _specs(cfg, vocab_size: int, n: int):
    from nasjax.search.run import make_space

    space = make_space(cfg, vocab_size)
    rng = np.random.default_rng(3)
    genome = space.seeds()[0][1]
    out = []
    while len(out) < n:
        spec = space.decode(genome)
        if spec not in out:
            out.append(spec)
        genome = space.mutate(genome, rng)[0]
    return out


def _outcome(evaluator, spec):
    """What checking and training ``spec`` gives: (params, fitness, hurdle fitness, steps,
    memory), or the failure's (stage, reason)."""
    from nasjax.search.evaluate import CandidateFailed

    try:
        check = evaluator.check(spec)
        out = evaluator.train(spec, [None] * evaluator.n_hurdles)
    except CandidateFailed as e:
        return ("failed", e.stage, e.reason)
    return (check.params, out.fitness, out.hurdle_fitness, out.steps, out.memory_bytes)


def _check_only(evaluator, specs, stash: dict) -> list:
    """Checks every spec without training it; returns those that passed. A failed check
    leaves nothing in ``stash`` (the evaluator's compiled-ahead or probed trainers)."""
    from nasjax.search.evaluate import CandidateFailed

    passed = []
    for spec in specs:
        try:
            evaluator.check(spec)
            passed.append(spec)
        except CandidateFailed:
            assert spec not in stash
    return passed


@pytest.mark.parametrize("segmented", [False, True], ids=["one_program", "segmented"])
def test_precompiled_trainer_trains_exactly_like_a_lazily_compiled_one(search_config, tmp_path, segmented):
    import jax

    from nasjax import sharding as shd
    from nasjax.train import segmented as pieces
    from nasjax.train.loop import Trainer, abstract_batch

    cfg = search_config(**{"train.segmented": segmented})
    pieces.clear_programs()
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "w")
    spec = _specs(cfg, tokenizer.vocab_size, 1)[0]
    batch = shd.shard_batch(next(evaluator.data.train_iterator()), evaluator.mesh)
    val = dict(evaluator._fixed_val()[0])
    val.pop("num_bytes", None)
    runs = []
    for ahead in (False, True):
        trainer = Trainer(spec, cfg.train, evaluator.mesh, evaluator.rules, cfg.seed, cfg.data.seq_len)
        if ahead:  # compiled from shapes alone, before any state exists
            if segmented:  # the lazy run compiled the pieces: found in the registry, nothing to compile
                pieces.clear_programs()
            assert trainer.precompile(abstract_batch(batch), abstract_batch(shd.shard_batch(val, evaluator.mesh))) > 0
            assert trainer._compiled_train is not None and trainer._compiled_eval is not None
        state = trainer.init_state()
        losses = []
        for _ in range(3):
            state, metrics = trainer.step(state, dict(next(evaluator.data.train_iterator())))
            losses.append(float(metrics["loss"]))
        runs.append((losses, trainer.evaluate(state.params, evaluator._fixed_val()), jax.device_get(state.params)))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    jax.tree.map(np.testing.assert_array_equal, runs[0][2], runs[1][2])


def test_evaluator_compiles_ahead_drops_unused_entries_and_matches_without(search_config, tmp_path):
    from nasjax.search.evaluate import CandidateFailed

    # compile-ahead overlaps the model probe (search.probe=steps compiles in the check itself)
    cfg_on = search_config(**{"search.compile_ahead": "true", "search.probe": "model"})
    cfg_off = search_config(**{"search.compile_ahead": "false", "search.probe": "model"})
    tokenizer, on = _evaluator(cfg_on, tmp_path / "on")
    _, off = _evaluator(cfg_off, tmp_path / "off")
    assert on.compile_ahead and not off.compile_ahead
    specs = _specs(cfg_on, tokenizer.vocab_size, 4)

    for spec in specs[:2]:
        assert _outcome(on, spec) == _outcome(off, spec)
        assert spec not in on._ahead  # taken by train(), or dropped by a failed check
    assert not off._ahead

    # checked but never trained (e.g. reused as functionally equivalent): only the newest few stay
    passed = _check_only(on, specs, on._ahead)
    assert len(on._ahead) <= on._ahead_keep == 2
    assert list(on._ahead) == passed[-2:]

    # a candidate that fails its checks leaves nothing behind
    small = search_config(**{"search.max_params": 10, "search.compile_ahead": "true", "search.probe": "model"})
    _, bounded = _evaluator(small, tmp_path / "bounded")
    with pytest.raises(CandidateFailed, match="max_params"):
        bounded.check(specs[0])
    assert not bounded._ahead
    on.close()
    on.close()  # idempotent
    assert not on._ahead


def test_probe_on_steps_hands_its_trainer_to_training_and_matches_the_model_probe(search_config, tmp_path):
    """search.probe=steps: the same verdicts and training outcomes as the model probe (the
    same initial parameters, the same programs); the probed trainer is taken by train()
    and only the newest few stay when candidates are checked but never trained."""
    tokenizer, steps = _evaluator(search_config(**{"search.probe": "steps"}), tmp_path / "steps")
    _, model = _evaluator(search_config(**{"search.probe": "model"}), tmp_path / "model")
    assert steps.probe_steps and not model.probe_steps
    specs = _specs(search_config(), tokenizer.vocab_size, 4)

    for spec in specs[:2]:
        assert _outcome(steps, spec) == _outcome(model, spec)
        assert spec not in steps._probed  # taken by train()
    passed = _check_only(steps, specs, steps._probed)
    assert list(steps._probed) == passed[-steps._ahead_keep :]


def test_steps_probe_asks_the_forward_mode_test_when_its_changed_outputs_are_not_finite(
    search_config, tmp_path, monkeypatch
):
    """When the outputs of the batch with a changed future are not finite (a causal model
    can give 0 * inf where a mask multiplies an overflowing future value), the probe decides
    causality with the model probe's forward-mode test instead of calling it a leak."""
    from nasjax.measure import probe as probe_mod
    from nasjax.search import evaluate
    from nasjax.train.loop import Trainer

    tokenizer, steps = _evaluator(search_config(**{"search.probe": "steps"}), tmp_path / "s")
    spec = _specs(search_config(), tokenizer.vocab_size, 1)[0]
    real_forward, asked, calls = Trainer.probe_forward, [], []

    def nan_when_changed(self, params, batch):
        out = real_forward(self, params, batch)
        calls.append(1)
        if len(calls) == 2:  # the second forward: the changed batch
            out["x"] = out["x"] * np.nan
        return out

    def counted_model_probe(*a, **k):
        asked.append(1)
        return probe_mod.probe_model(*a, **k)

    monkeypatch.setattr(Trainer, "probe_forward", nan_when_changed)
    monkeypatch.setattr(evaluate, "probe_model", counted_model_probe)
    check = steps.check(spec)  # the vanilla seed: causal, so it passes
    assert calls == [1, 1] and asked == [1] and check.output_hash

    weights = np.ones((2, 8))
    weights[:, 5:] = 0
    first = {"last_logits": np.ones((2, 5)), "finite": True, "x": np.ones((2, 8, 4))}
    undecided = probe_mod.probe_from_forward(first, {"x": np.full((2, 8, 4), np.nan)}, weights)
    assert undecided.causality_undecided and undecided.causal_leak is None and undecided.output_hash
    # a non-finite change after the probed positions decides nothing: only positions <= t_r are compared
    future_only = np.ones((2, 8, 4))
    future_only[:, 5:] = np.inf
    assert probe_mod.probe_from_forward(first, {"x": future_only}, weights).causal_leak == 0.0
    undecided = probe_mod.probe_from_steps(
        {"last_logits": np.ones((2, 5)), "finite": True, "input_grads": np.full((2, 8, 4), np.nan)}, 8
    )
    assert undecided.causality_undecided and undecided.causal_leak is None and undecided.output_hash


def test_compile_ahead_setting_is_read_or_refused():
    from nasjax.search import evaluate

    assert evaluate.compile_ahead_enabled("true") and evaluate.compile_ahead_enabled(True)
    assert not evaluate.compile_ahead_enabled("false") and not evaluate.compile_ahead_enabled("off")
    assert evaluate.compile_ahead_enabled("auto") == (evaluate._usable_cores() >= evaluate.COMPILE_AHEAD_MIN_CORES)
    with pytest.raises(ValueError, match="search.compile_ahead must be auto, true or false, got 'sometimes'"):
        evaluate.compile_ahead_enabled("sometimes")


def test_op_by_op_setting_is_read_or_refused(search_config, tmp_path):
    from nasjax.search import evaluate
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    read = lambda **kw: evaluate.op_by_op_enabled(search_config(**kw).search)  # noqa: E731
    assert read() and read(**{"search.op_by_op": "true"})
    assert not read(**{"search.clear_caches": True})  # auto: clearing drops the per-op programs
    assert read(**{"search.clear_caches": True, "search.op_by_op": "true"})
    assert not read(**{"search.op_by_op": "off"})
    with pytest.raises(EngineError, match="search.op_by_op must be auto, true or false, got 'often'"):
        run_search(search_config(**{"search.op_by_op": "often"}), str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s" / "journal.jsonl")


def test_bad_compile_ahead_stops_a_search_before_it_starts(search_config, tmp_path):
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    with pytest.raises(EngineError, match="search.compile_ahead must be auto, true or false"):
        run_search(search_config(**{"search.compile_ahead": "sometimes"}), str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s" / "journal.jsonl")


def test_search_results_identical_with_and_without_compile_ahead(search_config, tmp_path):
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    def results(workdir):
        recs = read_journal(os.path.join(workdir, "journal.jsonl"))
        return [
            (r["id"], r["event"], r.get("fitness"), r.get("stage"), r.get("cached_from"))
            for r in recs
            if r["event"] in ("finished", "failed")
        ]

    quiet = lambda *a: None  # noqa: E731
    a = run_search(search_config(**{"search.compile_ahead": "true"}), str(tmp_path / "ahead"), log=quiet)
    b = run_search(search_config(**{"search.compile_ahead": "false"}), str(tmp_path / "lazy"), log=quiet)
    assert a.status == b.status == "finished"
    assert results(tmp_path / "ahead") == results(tmp_path / "lazy")


def test_clear_caches_every_n_trained_candidates(search_config, tmp_path, monkeypatch):
    import jax

    from nasjax.search import evaluate
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1))
    cfg = search_config(**{"search.clear_caches": True, "search.clear_caches_every": 3})
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "w")
    trained = 0
    for spec in _specs(cfg, tokenizer.vocab_size, 7):
        try:
            evaluator.check(spec)
            evaluator.train(spec, [None] * evaluator.n_hurdles)
            trained += 1
        except evaluate.CandidateFailed:
            pass
    assert trained >= 3 and len(cleared) == trained // 3
    with pytest.raises(EngineError, match="search.clear_caches_every must be at least 1, got 0"):
        run_search(search_config(**{"search.clear_caches_every": 0}), str(tmp_path / "s"))


def test_op_by_op_programs_are_dropped_every_n_checked_candidates(search_config, tmp_path, monkeypatch):
    """``search.op_by_op_clear_every=N`` drops jax's compiled programs after every N-th
    checked candidate (passed or failed), so the per-op programs a long search keeps
    adding stay bounded; never with op_by_op off or N = 0, and a bad N stops a search."""
    import jax

    from nasjax.search import evaluate
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    drops = []
    monkeypatch.setattr(jax, "clear_caches", lambda: drops.append(1))
    monkeypatch.setattr(evaluate, "release_free_memory", lambda: drops.append(0))
    cfg = search_config(**{"search.op_by_op": "true", "search.op_by_op_clear_every": 2})
    tokenizer, evaluator = _evaluator(cfg, tmp_path / "w")
    specs = _specs(cfg, tokenizer.vocab_size, 5)
    for i, spec in enumerate(specs):
        try:
            evaluator.check(spec)
        except evaluate.CandidateFailed:
            pass
        assert drops.count(1) == (i + 1) // 2 and drops.count(0) == (i + 1) // 2
    for name, overrides in (("off", {"search.op_by_op": "false"}), ("never", {"search.op_by_op_clear_every": 0})):
        drops.clear()
        _, other = _evaluator(search_config(**overrides), tmp_path / name)
        for spec in specs[:2]:
            try:
                other.check(spec)
            except evaluate.CandidateFailed:
                pass
        assert not drops
    with pytest.raises(EngineError, match=r"search.op_by_op_clear_every must be >= 0 \(0 = never\), got -1"):
        run_search(search_config(**{"search.op_by_op_clear_every": -1}), str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s" / "journal.jsonl")
