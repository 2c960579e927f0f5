"""Training: exact resume, divergence, accumulation, sharding equivalence, real-text learning."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from nasjax import sharding as shd
from nasjax.metrics import read_metrics
from nasjax.models import get_spec
from nasjax.train import run
from nasjax.train.loop import Trainer
from nasjax.train.step import forward_loss


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"}


@pytest.mark.parametrize("flat_optimizer", [False, True])
def test_train_writes_workdir_and_resumes_exactly(tiny_config, tmp_path, flat_optimizer):
    cfg = tiny_config(**{"train.steps": 6, "train.keep_checkpoints": 5, "train.flat_optimizer": flat_optimizer})
    wd = str(tmp_path / "a")
    result = run.train(cfg, wd, log=lambda *_: None, progress=False)
    assert result.status == "finished" and result.step == 6
    for name in ("config.json", "spec.json", "tokenizer.json", "metrics.jsonl", "loss_curve.png", "status.json"):
        assert os.path.exists(os.path.join(wd, name)), name
    assert os.listdir(os.path.join(wd, "tensorboard"))
    assert json.load(open(os.path.join(wd, "status.json")))["status"] == "finished"
    full = _train_losses(wd)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    ckdir = os.path.join(wd, "checkpoints")
    saved = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert {2, 4, 6} <= set(saved), saved

    # As if killed by `kill -9` during step 3: nothing after checkpoint 2 made it to disk.
    for step in saved:
        if step > 2:
            shutil.rmtree(os.path.join(ckdir, str(step)))
    result2 = run.train(cfg, wd, log=lambda *_: None, progress=False)
    assert result2.step == 6
    resumed = _train_losses(wd)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):
        np.testing.assert_allclose(resumed[step], full[step], rtol=1e-6, err_msg=f"step {step}")


def test_budget_stop_then_resume_continues(tiny_config, tmp_path):
    wd = str(tmp_path / "b")
    straight = run.train(tiny_config(**{"train.steps": 4}), str(tmp_path / "ref"), log=lambda *_: None, progress=False)
    r1 = run.train(
        tiny_config(**{"train.steps": 4, "train.budget_seconds": 1e-9}), wd, log=lambda *_: None, progress=False
    )
    assert r1.status == "budget" and r1.step == 1
    r2 = run.train(tiny_config(**{"train.steps": 4}), wd, log=lambda *_: None, progress=False)
    assert r2.status == "finished" and r2.step == 4
    np.testing.assert_allclose(r2.train_loss, straight.train_loss, rtol=1e-6)
    np.testing.assert_allclose(r2.val["val_loss"], straight.val["val_loss"], rtol=1e-6)


def test_divergence_is_a_status_not_a_traceback(tiny_config, tmp_path):
    cfg = tiny_config(
        **{"train.learning_rate": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0, "train.steps": 8}
    )
    result = run.train(cfg, str(tmp_path / "d"), log=lambda *_: None, progress=False)
    assert result.status == "diverged"
    assert "non-finite" in result.reason
    status = json.load(open(tmp_path / "d" / "status.json"))
    assert status["status"] == "diverged"


def test_eval_reports_loss_ppl_bpb(tiny_config, tmp_path):
    wd = str(tmp_path / "e")
    run.train(tiny_config(), wd, log=lambda *_: None, progress=False)
    val = run.evaluate(wd, log=lambda *_: None)
    assert val["step"] == 6
    np.testing.assert_allclose(val["val_ppl"], np.exp(val["val_loss"]), rtol=1e-5)
    # byte tokenizer: one token is one byte, so bits/byte = nats/token / ln 2
    np.testing.assert_allclose(val["val_bpb"], val["val_loss"] / np.log(2), rtol=1e-3)
    assert "perplexity" in run.format_eval(val)


def _batch(rng, b=8, seq=16, vocab=262):
    x = rng.integers(6, vocab, size=(b, seq + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": np.ones((b, seq), np.float32)}


def _trainer(tiny_config, mesh, **kw):
    cfg = tiny_config(**kw)
    spec = get_spec("primer_ez", "tiny", vocab_size=262, max_len=32)
    return Trainer(spec, cfg.train, mesh, shd.DEFAULT_RULES, seed=0, seq_len=16)


def test_sharded_matches_single_device(tiny_config):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    batch = _batch(np.random.default_rng(0))
    results = []
    for mesh in (shd.make_mesh((1, 1, 1), jax.devices()[:1]), shd.make_mesh((4, 1, 2)), shd.make_mesh((2, 2, 2))):
        tr = _trainer(tiny_config, mesh)
        state = tr.init_state()
        with tr._context():
            sharded = shd.shard_batch(batch, mesh)
            model = tr.model
            grad_fn = jax.jit(jax.grad(lambda p, b, m=model: forward_loss(m, "lm", p, b, jax.random.key(0), True)[0]))
            grads = jax.device_get(grad_fn(state.params, sharded))
        state, metrics = tr.step(state, batch)
        results.append((float(metrics["loss"]), grads, jax.device_get(state.params)))
    ref_loss, ref_grads, ref_params = results[0]
    for loss, grads, params in results[1:]:
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref_grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params)


def test_gradient_accumulation_matches_big_batch(tiny_config):
    batch = _batch(np.random.default_rng(1))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    out = []
    for accum in (1, 4):
        tr = _trainer(tiny_config, mesh, **{"train.grad_accum_steps": accum})
        state, metrics = tr.step(tr.init_state(), batch)
        out.append((float(metrics["loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    # atol 1e-5: on a Zen 3 CPU (AVX2 only) one element of 4,096 differed by 2.6e-6 (float rounding of the
    # accumulated against the big-batch sums; docs/benchmarks.md, stop 37)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out[0][1], out[1][1])


def test_batch_must_divide_over_devices(tiny_config):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    with pytest.raises(ValueError, match="data-parallel"):
        _trainer(tiny_config, shd.make_mesh((8, 1, 1)), **{"train.batch_size": 12})


def test_mlm_then_finetune_classifier(tiny_config, tmp_path):
    pre = str(tmp_path / "mlm")
    cfg = tiny_config(**{"model.name": "bert", "train.steps": 4})
    result = run.train(cfg, pre, log=lambda *_: None, progress=False)
    assert result.status == "finished" and np.isfinite(result.val["val_loss"])

    from nasjax.config import apply_overrides, base_config

    rows = [
        {"label": i % 2, "text": ("good fair sweet love " if i % 2 else "death night no not ") * 3} for i in range(64)
    ]
    jsonl = tmp_path / "cls.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    ft = base_config(finetune=True)
    ft.lock()
    apply_overrides(
        ft,
        {
            "init_from": pre,
            "data.path": str(jsonl),
            "data.seq_len": 32,
            "train.batch_size": 8,
            "train.steps": 30,
            "train.learning_rate": 3e-3,
            "train.warmup_steps": 2,
            "train.eval_every": 0,
            "train.checkpoint_every": 10,
            "train.async_checkpoint": False,
            "compile_cache_dir": "none",
            "train.log_every": 5,
        },
    )
    logs = []
    res = run.train(ft, str(tmp_path / "ft"), log=logs.append, progress=False)
    assert res.status == "finished"
    assert any("inherited" in line for line in logs)
    assert res.val["val_accuracy"] >= 0.9  # the two classes differ in every word
    val = run.evaluate(str(tmp_path / "ft"), log=lambda *_: None)
    np.testing.assert_allclose(val["val_accuracy"], res.val["val_accuracy"])
    assert "accuracy" in run.format_eval(val)


@pytest.mark.slow
@pytest.mark.network
def test_real_text_training_decreases_validation_loss(tmp_path_factory):
    """A tiny vanilla decoder on the fetched Shakespeare corpus learns."""
    from nasjax.config import apply_overrides, load_config_file
    from nasjax.data import fetch

    cache = tmp_path_factory.mktemp("nasjax_cache")
    corpus = fetch("shakespeare", cache_dir=str(cache), log=lambda *_: None)
    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs/train/lm.py:tiny"))
    apply_overrides(
        cfg,
        {
            "data.path": str(corpus),
            "data.cache_dir": str(cache),
            "data.val_files": "hamlet_gut.txt",
            "data.seq_len": 64,
            "train.steps": 120,
            "train.eval_batches": 8,
            "train.eval_every": 0,
            "train.async_checkpoint": False,
            "compile_cache_dir": "none",
        },
    )
    mesh, rules = run.make_mesh(cfg)
    from nasjax.data import make_text_data, make_tokenizer, resolve_files

    files = resolve_files(str(corpus))
    tok = make_tokenizer("byte")
    data = make_text_data(
        path=files,
        val_files=["hamlet_gut.txt"],
        val_fraction=0.05,
        tokenizer=tok,
        seq_len=64,
        global_batch_size=16,
        seed=0,
        kind="lm",
        cache_dir=str(cache),
    )
    spec = get_spec("vanilla", "tiny", vocab_size=tok.vocab_size, max_len=64)
    tr = Trainer(spec, cfg.train, mesh, rules, seed=0, seq_len=64)
    state = tr.init_state()
    before = tr.evaluate(state.params, data.val_batches(8))
    state, result = tr.fit(state, data.train_iterator(), total_steps=120)
    after = tr.evaluate(state.params, data.val_batches(8), num_bytes=data.val_num_bytes(8))
    assert result.status == "finished"
    assert after["val_loss"] < before["val_loss"] - 1.0, (before, after)
    assert after["val_bpb"] < 4.0


def test_adafactor_rsqrt_trains_sharded(tiny_config):
    """Adafactor's factored second moments have other ranks than the params: sharding must cope."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    batch = _batch(np.random.default_rng(2))
    tr = _trainer(
        tiny_config,
        shd.make_mesh((4, 1, 2)),
        **{"train.optimizer": "adafactor", "train.schedule": "rsqrt", "train.learning_rate": 0.01},
    )
    state = tr.init_state()
    losses = []
    for _ in range(4):
        state, metrics = tr.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_sentencepiece_run_is_self_contained(tiny_config, tmp_path):
    """A SentencePiece run trains its tokenizer, and eval works after the workdir moves."""
    wd = tmp_path / "sp"
    cfg = tiny_config(**{"data.tokenizer": "sentencepiece", "data.vocab_size": 320, "train.steps": 2})
    result = run.train(cfg, str(wd), log=lambda *_: None, progress=False)
    assert result.status == "finished"
    tok = json.load(open(wd / "tokenizer.json"))
    assert tok["kind"] == "sentencepiece" and 263 < tok["vocab_size"] <= 320
    moved = tmp_path / "moved"
    shutil.move(str(wd), str(moved))
    shutil.rmtree(moved / "tokenizer", ignore_errors=True)
    val = run.evaluate(str(moved), log=lambda *_: None)
    # a SentencePiece token stands for more than one byte on average
    assert 0 < val["val_bpb"] < val["val_loss"] / np.log(2)


def test_corrupt_checkpoint_falls_back_and_other_model_is_refused(tiny_config, tmp_path):
    wd = tmp_path / "c"
    cfg = tiny_config(**{"train.steps": 4, "train.keep_checkpoints": 5})
    run.train(cfg, str(wd), log=lambda *_: None, progress=False)
    # Tear the newest checkpoint (as a crash mid-write on a filesystem without atomic renames would).
    newest = wd / "checkpoints" / "4"
    for path in newest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    logs = []
    result = run.train(cfg, str(wd), log=logs.append, progress=False)
    assert result.status == "finished" and result.step == 4
    assert any("unreadable" in line and "step 4" in line for line in logs), logs
    assert any("resumed from checkpoint step 2" in line for line in logs), logs
    assert (wd / "corrupt_checkpoints" / "4").is_dir()  # kept aside for inspection
    assert run.evaluate(str(wd), log=lambda *_: None)["step"] == 4  # step 4 was written again

    with pytest.raises(run.RunError, match="different model"):
        run.train(tiny_config(**{"model.name": "gpt2"}), str(wd), log=lambda *_: None, progress=False)


def test_flat_optimizer_gives_each_element_the_per_leaf_update(tiny_config):
    """train.flat_optimizer: optax's AdamW math on one vector of all parameters. Every element
    gets the per-leaf chain's update up to float rounding (XLA fuses the two differently),
    weight-decay mask included: matrices decayed, biases / norm scales / dconv taps not. A
    wrong mask would move parameters by ~lr * weight_decay * |p| ~ 1e-3 relative, far above
    the tolerance; so would a wrong clipping factor."""
    batch = _batch(np.random.default_rng(3))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    for clip in (0.0, 1.0):
        out = {}
        for flat in (False, True):
            kw = {"train.weight_decay": 1.0, "train.grad_clip": clip, "train.flat_optimizer": flat}
            tr = _trainer(tiny_config, mesh, **kw)
            state = tr.init_state()
            for _ in range(3):
                state, metrics = tr.step(state, batch)
            out[flat] = (float(metrics["loss"]), jax.device_get(state.params))
            if flat:
                assert {x.ndim for x in jax.tree.leaves(state.opt_state) if x.ndim} == {1}  # mu, nu: flat vectors
        np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), out[True][1], out[False][1])


def test_flat_optimizer_refuses_sharded_params_and_adafactor(tiny_config):
    from nasjax.train.optim import OptimConfigError

    with pytest.raises(OptimConfigError, match="flat_optimizer"):
        _trainer(
            tiny_config,
            shd.make_mesh((1, 1, 1), jax.devices()[:1]),
            **{"train.flat_optimizer": True, "train.optimizer": "adafactor"},
        )
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    with pytest.raises(ValueError, match="flat_optimizer.*replicated"):
        _trainer(tiny_config, shd.make_mesh((4, 1, 2)), **{"train.flat_optimizer": True})


@pytest.mark.parametrize("name", ["primer_ez", "gpt2"])
def test_op_by_op_init_skips_the_forward_and_keeps_the_values(name):
    """The op-by-op init (Module.lazy_init: only what the parameters depend on runs)
    gives exactly the eager init's values, which run the whole forward pass."""
    from nasjax.models import build
    from nasjax.train.state import _params_fn, initial_params

    model = build(get_spec(name, "tiny", vocab_size=64, max_len=32))
    eager = _params_fn(model, 16)(jax.random.key(3))
    lazy = initial_params(model, 3, 16, op_by_op=True)
    assert jax.tree.structure(eager) == jax.tree.structure(lazy)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(lazy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_op_by_op_optimizer_init_fills_on_the_host_and_equals_optax():
    """optimizer_init(op_by_op=True) computes an init that only fills constants with
    numpy (host_init): optax's exact tree, dtypes and values, and no program compiled for
    a parameter shape not seen before; inits that compute (the flat optimizer's
    concatenation, arithmetic on the parameters) are left to jax."""
    import jax.numpy as jnp
    import optax

    from nasjax import compile_meter
    from nasjax.config import base_config
    from nasjax.train.optim import make_optimizer
    from nasjax.train.state import host_init, optimizer_init

    compile_meter.install()
    params = {"a": jnp.ones((3, 7)), "b": {"c": jnp.arange(5.0)}, "d": jnp.ones((2,), jnp.bfloat16)}
    checked = 0
    for opt in ("adamw", "adafactor"):
        cfg = base_config().train
        cfg.optimizer = opt
        tx, _ = make_optimizer(cfg)
        ref = tx.init(params)
        mine = host_init(tx.init, params)
        assert mine is not None, opt
        assert jax.tree.structure(ref) == jax.tree.structure(mine)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(mine)):
            assert a.shape == b.shape and a.dtype == b.dtype and a.weak_type == jnp.asarray(b).weak_type
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            checked += 1
        # a parameter shape never seen in this process compiles nothing
        fresh = {"w": jnp.asarray(np.ones((13, 29), np.float32))}
        abstract = jax.eval_shape(tx.init, fresh)
        before = compile_meter.thread_seconds()
        state = optimizer_init(tx, fresh, jax.tree.map(lambda _: None, abstract), op_by_op=True)
        assert compile_meter.thread_seconds() == before, opt
        assert jax.tree.structure(state) == jax.tree.structure(abstract)
    assert checked > 6
    # an init that computes is not one of constant fills
    assert host_init(lambda p: jax.tree.map(lambda x: x * 2.0, p), params) is None
    assert host_init(optax.ema(0.9).init, params) is not None  # zeros and a count
    cfg = base_config().train
    cfg.flat_optimizer = True
    assert host_init(make_optimizer(cfg)[0].init, params) is None
