"""AutoDistil: the paper's counts, relation distillation, SuperLM slicing."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax.genome.autodistil import (
    PAPER_SUBSPACES,
    Subnet,
    layer_map,
    paper_flops,
    paper_params,
    scaled_subspaces,
    subnet_spec,
)
from nasjax.measure.params import count_params
from nasjax.models import build, get_spec
from nasjax.spec import SpecError
from nasjax.train.distill import _layer_index, last_layer_qkv, relation_kd, relations, slice_params


def _teacher(**kw):
    base = dict(n_layers=4, d_model=64, n_heads=4, d_ff=256, max_len=32, vocab_size=300, dropout_rate=0.0)
    base.update(kw)
    return get_spec("bert", "tiny", attention_dropout_rate=0.0, **base)


def test_paper_formulas_reproduce_the_reported_student():
    s = Subnet(7, 160, 10, 3.5)  # AutoDisProxyT
    assert paper_params(s) == 6_887_600
    assert paper_flops(s) / 1e9 == pytest.approx(0.2747, abs=5e-5)
    assert layer_map(7, 12) == [0, 1, 3, 5, 6, 8, 10]
    assert [len(sp.subnets()) for sp in PAPER_SUBSPACES] == [256, 256, 256]
    # the config files' comments give approximate ranges (4.35-10.57M, 12.3-27.8M, 38.5-79.3M);
    # the formula lands within 3% of them
    for sp, (lo, hi) in zip(PAPER_SUBSPACES, ((4.35, 10.57), (12.3, 27.8), (38.5, 79.3))):
        counts = [paper_params(x) / 1e6 for x in sp.subnets()]
        assert min(counts) == pytest.approx(lo, rel=0.03) and max(counts) == pytest.approx(hi, rel=0.03)


def test_subnet_specs_count_exactly_and_reject_oversize():
    teacher = _teacher()
    s = Subnet(3, 48, 2, 2.5)
    spec = subnet_spec(teacher, s)
    assert spec.n_layers == 3 and spec.d_model == 48 and spec.layers[0].ffn.d_ff == 120
    assert spec.layers[0].mixer.n_heads == 2 and spec.layers[0].mixer.head_dim == 16  # head size kept
    d, f, hk = 48, 120, 32
    per_layer = 3 * (d * hk + hk) + hk * d + d + 2 * d * f + f + d + 4 * d
    assert count_params(spec)["total"] - count_params(subnet_spec(teacher, Subnet(2, 48, 2, 2.5)))["total"] == per_layer
    with pytest.raises(SpecError, match="hidden 96 > teacher's 64"):
        subnet_spec(teacher, Subnet(2, 96, 2, 2.0))
    for sub in scaled_subspaces(teacher):
        for sn in sub.subnets():
            subnet_spec(teacher, sn)


def _qkv(seed, b=2, n=6, d=32):
    return tuple(jax.random.normal(jax.random.key(seed + i), (b, n, d)) for i in range(3))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relation_kd_zero_for_identical_and_positive_otherwise(kind):
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4]])
    a = _qkv(0)
    assert float(relation_kd(a, a, mask, n_rel=4, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_kd(_qkv(5), a, mask, n_rel=4, kind=kind)) > 0.01
    # the student may be narrower than the teacher: relations are L x L
    narrow = tuple(x[..., :16] for x in _qkv(7))
    assert np.isfinite(float(relation_kd(narrow, a, mask, n_rel=4, kind=kind)))
    # padded positions do not count
    noisy = tuple(x.at[1, 4:].add(5.0) for x in a)
    assert float(relation_kd(noisy, a, mask, n_rel=4, kind=kind)) == pytest.approx(0.0, abs=1e-5)


def test_relations_match_the_reference():
    x = np.random.default_rng(0).normal(size=(1, 5, 12)).astype(np.float32)
    r = np.asarray(relations(jnp.asarray(x), 3))
    xr = x.reshape(1, 5, 3, 4)
    want = np.einsum("bird,bjrd->brij", xr, xr) / 2.0
    np.testing.assert_allclose(r, want, rtol=1e-5)


def test_relation_kd_does_not_depend_on_the_students_head_split():
    """Same projection weights split into 2x16 or 4x8 heads: same merged Q/K/V, same loss."""
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 6, 200)
    teacher = _teacher(n_layers=1)
    t_params = build(teacher).init(jax.random.key(1), tokens)["params"]
    _, t_state = build(teacher).apply({"params": t_params}, tokens, mutable=["intermediates"])
    t_qkv = last_layer_qkv(t_state["intermediates"], 1)
    losses = []
    base = None
    for heads, head_dim in ((2, 16), (4, 8)):
        spec = subnet_spec(teacher, Subnet(1, 32, 2, 2.0))
        spec = spec.replace(
            layers=tuple(
                dataclasses.replace(b, mixer=dataclasses.replace(b.mixer, n_heads=heads, head_dim=head_dim))
                for b in spec.layers
            )
        )
        params = jax.device_get(build(spec).init(jax.random.key(2), tokens)["params"])
        params = jax.tree.map(np.asarray, nn.meta.unbox(params))
        if base is None:
            base = params
        else:  # the same weights, split differently into heads
            for name in ("q_proj", "k_proj", "v_proj"):
                m = params["encoder"]["layer_0"]["mixer"][name]
                b = base["encoder"]["layer_0"]["mixer"][name]
                m["kernel"] = b["kernel"].reshape(m["kernel"].shape)
                m["bias"] = b["bias"].reshape(m["bias"].shape)
            for key in ("embed",):
                params[key] = base[key]
        _, state = build(spec).apply({"params": params}, tokens, mutable=["intermediates"])
        losses.append(float(relation_kd(last_layer_qkv(state["intermediates"], 1), t_qkv, n_rel=4)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def scatter_grads(super_params, sub_grads, subnet: Subnet, max_layers: int) -> dict:
    """A subnet's gradients added into zeros shaped like the SuperLM (the reference for slicing's gradient)."""
    from flax import traverse_util

    keep = layer_map(subnet.layers, max_layers)
    flat = {p: np.zeros(np.shape(v), np.float32) for p, v in traverse_util.flatten_dict(dict(super_params)).items()}
    for path, g in traverse_util.flatten_dict(dict(sub_grads)).items():
        i = _layer_index(path)
        src = path if i is None else (path[0], f"layer_{keep[i]}") + path[2:]
        g = np.asarray(g)
        flat[src][tuple(slice(0, s) for s in g.shape)] += g
    return traverse_util.unflatten_dict(flat)


def test_full_size_subnet_is_the_teacher_and_gradients_land_in_the_prefix():
    teacher = _teacher()
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 6, 300)
    mask = jnp.arange(16)[None, :] < jnp.array([[16], [11]])
    model = build(teacher)
    super_params = jax.device_get(nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"]))
    full = Subnet(4, 64, 4, 4.0)
    spec = subnet_spec(teacher, full)
    shapes = jax.eval_shape(lambda: build(spec).init(jax.random.key(0), tokens)["params"])
    sliced = slice_params(super_params, nn.meta.unbox(shapes), full, 4)
    np.testing.assert_array_equal(
        np.asarray(build(spec).apply({"params": sliced}, tokens, padding_mask=mask)),
        np.asarray(model.apply({"params": super_params}, tokens, padding_mask=mask)),
    )
    small = Subnet(2, 32, 2, 2.0)
    s_spec = subnet_spec(teacher, small)
    s_model = build(s_spec)
    s_shapes = nn.meta.unbox(jax.eval_shape(lambda: s_model.init(jax.random.key(0), tokens)["params"]))

    def loss_super(p):
        return jnp.mean(s_model.apply({"params": slice_params(p, s_shapes, small, 4)}, tokens) ** 2)

    def loss_sub(p):
        return jnp.mean(s_model.apply({"params": p}, tokens) ** 2)

    g_super = jax.grad(loss_super)(super_params)
    g_sub = jax.grad(loss_sub)(slice_params(super_params, s_shapes, small, 4))
    want = scatter_grads(super_params, g_sub, small, 4)
    for a, b in zip(jax.tree.leaves(g_super), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-7)
    # layer_map(2, 4) = [0, 2]: layers 1 and 3 get no gradient
    assert not np.any(np.asarray(g_super["encoder"]["layer_1"]["mixer"]["q_proj"]["kernel"]))
    assert np.any(np.asarray(g_super["encoder"]["layer_2"]["mixer"]["q_proj"]["kernel"]))


def _superlm(tmp_teacher=None, **kw):
    from nasjax.search.superlm import SuperLMTrainer

    teacher = _teacher()
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(build(teacher).init(jax.random.key(3), tokens)["params"])
    subnets = [Subnet(n, h, a, r) for n in (2, 4) for h in (32, 64) for a in (2, 4) for r in (2.0, 4.0)]
    args = dict(lr=1e-3, steps=10, sandwich_size=4, relation_heads=4, seed=0)
    args.update(kw)
    return SuperLMTrainer(teacher, params, subnets, **args), teacher


def _batch(step):
    rng = np.random.default_rng(step)
    tokens = rng.integers(6, 300, size=(4, 16)).astype(np.int32)
    mask = np.arange(16)[None, :] < np.array([[16], [16], [12], [9]])
    return {"inputs": np.where(mask, tokens, 0), "padding_mask": mask}


def test_sandwich_draws_largest_smallest_and_distinct_randoms():
    from nasjax.search.superlm import sandwich

    subs = [Subnet(n, h, 2, 2.0) for n in (1, 2, 3) for h in (16, 32, 48)]
    draw = sandwich(subs, 4, seed=0, step=5)
    assert draw[0] == Subnet(3, 48, 2, 2.0) and draw[1] == Subnet(1, 16, 2, 2.0)
    assert len(set(draw)) == 4 and draw == sandwich(subs, 4, seed=0, step=5)
    assert sandwich(subs, 4, seed=0, step=6) != draw or sandwich(subs, 4, seed=0, step=7) != draw


def test_superlm_starts_at_the_teacher_trains_and_resumes(tmp_path):
    trainer, teacher = _superlm()
    state = trainer.init()
    full = Subnet(4, 64, 4, 4.0)
    assert trainer.held_out_loss(state.params, full, trainer.with_teacher([_batch(0)])) == pytest.approx(0.0, abs=1e-6)
    small = Subnet(2, 32, 2, 2.0)
    before = trainer.held_out_loss(state.params, small, trainer.with_teacher([_batch(99)]))
    for step in range(3):
        out = trainer.step(state, _batch(step))
        assert np.isfinite(out["loss"]) and out["subnets"][:2] == [full.name, small.name]
    path = str(tmp_path / "superlm.msgpack")
    trainer.save(state, path)
    for step in range(3, 6):
        trainer.step(state, _batch(step))
    resumed = trainer.restore(path)
    assert resumed.step == 3
    for step in range(3, 6):
        trainer.step(resumed, _batch(step))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    after = trainer.held_out_loss(state.params, small, trainer.with_teacher([_batch(99)]))
    assert after < before  # the smallest subnet is in every sandwich
    # the extracted student computes what the SuperLM's subnet computes
    spec, params = trainer.extract(state.params, small)
    _, model, shapes = trainer.subnet_model(small)
    tokens, mask = jnp.asarray(_batch(1)["inputs"]), jnp.asarray(_batch(1)["padding_mask"])
    direct = model.apply({"params": slice_params(state.params, shapes, small, 4)}, tokens, padding_mask=mask)
    standalone = build(spec).apply({"params": params}, tokens, padding_mask=mask)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(standalone))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        trainer.restore(path)


def test_distil_resume_search_and_student_end_to_end(tiny_config, text_dir, tmp_path):
    """teacher -> distil (interrupted by a step limit, then resumed) -> distil-search -> a student
    that nasjax's training tools load, with the SuperLM subnet's outputs."""
    import os

    from nasjax.config import apply_overrides, load_config_file
    from nasjax.search.autodistil import DistilError, run_distil, run_distil_search
    from nasjax.train.run import load_run, train

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    teacher_dir = str(tmp_path / "teacher")
    tcfg = tiny_config(**{"model.name": "bert", "model.size": "tiny", "train.steps": 4, "train.checkpoint_every": 4})
    train(tcfg, teacher_dir, log=lambda *_: None, progress=False)

    def cfg(**kw):
        base = {
            "teacher": teacher_dir,
            "data.path": str(text_dir),
            "data.val_files": "doc_5.txt",
            "data.seq_len": 32,
            "data.cache_dir": str(tmp_path / "cache"),
            "train.batch_size": 8,
            "train.steps": 4,
            "distil.subspaces": "tiny",
            "distil.relation_heads": 2,
            "distil.checkpoint_every": 2,
            "distil.log_every": 1,
            "distil.val_batches": 1,
        }
        base.update(kw)
        return apply_overrides(load_config_file(os.path.join(root, "configs/search/autodistil.py:tiny")), base)

    workdir = str(tmp_path / "ad")
    assert run_distil(cfg(**{"train.steps": 2}), workdir, log=lambda *_: None) == {"tiny": 2}
    assert run_distil(cfg(), workdir, log=lambda *_: None) == {"tiny": 4}  # resumed from step 2
    lines = open(os.path.join(workdir, "superlm_tiny", "metrics.jsonl")).read().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    teacher_spec = load_run(teacher_dir)[0]
    subnets = scaled_subspaces(teacher_spec, ["tiny"])[0].subnets()
    counts = sorted(count_params(subnet_spec(teacher_spec, s))["total"] for s in subnets)
    budget = float(counts[len(counts) // 2])
    search_cfg = cfg(**{"distil.budget_kind": "params", "distil.budget": budget})
    out = run_distil_search(search_cfg, workdir, log=lambda *_: None)
    assert out["best"]["params"] <= budget and out["best"]["feasible"]
    assert any(not r["feasible"] for r in out["rows"])
    spec, _, _, _, state, step = load_run(os.path.join(workdir, "student"))
    assert step == 0 and spec.d_model == out["best"]["hidden"] and spec.n_layers == out["best"]["layers"]
    xla = run_distil_search(cfg(**{"distil.budget_kind": "xla_flops", "distil.budget": 1e12}), workdir, log=print)
    assert all(r["xla_flops"] >= r["flops"] > 0 for r in xla["rows"])  # XLA also counts element-wise work
    task = tmp_path / "task.jsonl"
    rng = np.random.default_rng(0)
    with open(task, "w") as f:
        for i in range(64):
            f.write(
                json.dumps({"label": i % 2, "text": " ".join(rng.choice(["king", "queen", "lord", "lady"], 6))}) + "\n"
            )
    proxy_cfg = {
        "distil.budget_kind": "params",
        "distil.budget": float(counts[2]),
        "distil.rank_by": "proxy_finetune",
        "distil.proxy_task": str(task),
        "distil.proxy_steps": 2,
        "distil.proxy_batch_size": 8,
        "distil.proxy_seq_len": 16,
    }
    proxy = run_distil_search(cfg(**proxy_cfg), workdir, log=lambda *_: None)
    scored = [r for r in proxy["rows"] if r["feasible"]]
    assert scored and all(0.0 <= r["proxy_accuracy"] <= 1.0 and r["params"] <= counts[2] for r in scored)
    assert proxy["best"]["proxy_accuracy"] == max(r["proxy_accuracy"] for r in scored)
    _finetune_with_baselines(os.path.join(workdir, "student"), teacher_dir, str(task), tmp_path)
    with pytest.raises(DistilError, match="no subnet fits"):
        run_distil_search(cfg(**{"distil.budget_kind": "params", "distil.budget": 10.0}), workdir, log=lambda *_: None)
    with pytest.raises(DistilError, match="needs --config.teacher"):
        run_distil(cfg(teacher=""), workdir, log=lambda *_: None)


def _finetune_with_baselines(student: str, teacher: str, task: str, tmp_path) -> None:
    """nasjax finetune of a student reports it next to its teacher and a same-size scratch model."""
    import csv
    import os

    from nasjax.config import apply_overrides, base_config
    from nasjax.train.compare import finetune
    from nasjax.train.run import RunError, load_run

    def ft(**kw):
        c = base_config(finetune=True)
        c.lock()
        base = {
            "init_from": student,
            "compare_with": "teacher,scratch",
            "data.path": task,
            "data.seq_len": 16,
            "train.batch_size": 8,
            "train.steps": 2,
            "train.warmup_steps": 1,
            "train.eval_every": 0,
            "train.async_checkpoint": False,
            "compile_cache_dir": "none",
        }
        base.update(kw)
        return apply_overrides(c, base)

    assert json.load(open(os.path.join(student, "student.json")))["teacher"] == os.path.abspath(teacher)
    workdir = str(tmp_path / "ft")
    logs = []
    res = finetune(ft(), workdir, log=logs.append, progress=False)
    assert res.status == "finished"
    rows = list(csv.DictReader(open(os.path.join(workdir, "comparison.csv"))))
    assert [r["model"] for r in rows] == ["main", "teacher", "scratch"]
    student_params = sum(x.size for x in jax.tree.leaves(load_run(workdir)[4].params))
    assert int(rows[0]["params"]) == int(rows[2]["params"]) == student_params < int(rows[1]["params"])
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)
    assert rows[2]["init"].startswith("random weights")
    assert sum("inherited" in line for line in logs) == 2  # main and teacher inherit; scratch does not
    # the scratch baseline really starts elsewhere: its weights differ from the student's at step 0 + 2 steps
    s_main = jax.tree.leaves(load_run(workdir)[4].params)[0]
    s_scratch = jax.tree.leaves(load_run(os.path.join(workdir, "compare", "scratch"))[4].params)[0]
    assert not np.allclose(np.asarray(s_main), np.asarray(s_scratch))
    with pytest.raises(RunError, match="distil-search student"):
        finetune(ft(init_from=teacher, compare_with="teacher"), str(tmp_path / "ft2"), log=lambda *_: None)
    with pytest.raises(RunError, match="teacher, scratch or NAME=WORKDIR"):
        finetune(ft(compare_with="bogus"), str(tmp_path / "ft3"), log=lambda *_: None)
    with pytest.raises(RunError, match="not a training workdir"):
        finetune(ft(compare_with=f"big={tmp_path}"), str(tmp_path / "ft4"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "ft3")  # bad entries fail before anything trains
