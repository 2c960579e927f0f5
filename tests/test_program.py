"""Primer programs: validation, JSON, names, the interpreter's op rules, seeds == zoo."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasjax.genome.primer import primer_ez_program, program_model_spec, vanilla_program
from nasjax.genome.program import (
    OPS,
    Instruction,
    Program,
    Subprogram,
    instruction_names,
    render_program,
)
from nasjax.layers.program import apply_pure_op, match_width
from nasjax.measure.probe import probe_model
from nasjax.models import build, get_spec
from nasjax.spec import ModelSpec, SpecError

D, H, F, LEN = 64, 4, 256, 16


def _spec(program, n_layers=2, base_dim=16):
    return program_model_spec(program, base_dim=base_dim, d_model=D, n_layers=n_layers, vocab_size=262, max_len=64)


# --------------------------------------------------------------------------- identity


def test_json_round_trip_and_hash():
    p = primer_ez_program(H, D, F)
    assert Program.from_json(p.to_json()) == p
    spec = _spec(p)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert again.architecture_hash() == spec.architecture_hash()
    assert p.canonical_hash() != vanilla_program(H, D, F).canonical_hash()
    # subprogram labels are not part of the identity
    renamed = dataclasses.replace(p, subprograms=tuple(dataclasses.replace(s, name="x") for s in p.subprograms))
    assert renamed.canonical_hash() == p.canonical_hash()


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["subprograms"][2]["instructions"][0].update(op="FOO"), "subprograms[2].instructions[0].op"),
        (lambda d: d["subprograms"][0]["instructions"][0].update(call=0), "subprograms[0].instructions[0].call"),
        (lambda d: d["subprograms"][1]["instructions"][0].update(branches=3), "instructions[0].branches"),
        (lambda d: d["subprograms"][1]["instructions"][1].update(dim=99), "instructions[1].dim"),
        (lambda d: d["subprograms"][1]["instructions"][1].update(in1=0), "instructions[1].in1"),
        (lambda d: d["subprograms"][1]["instructions"][1].update(bogus=1), "instructions[1].bogus"),
        (lambda d: d.update(dims=[3]), "dims[0]"),
        (lambda d: d.update(constants=["a"]), "constants[0]"),
        (lambda d: d["subprograms"][0].update(n_args=2), "subprograms[0].n_args"),
    ],
)
def test_malformed_programs_name_the_path(mutate, where):
    d = json.loads(vanilla_program(H, D, F).to_json())
    mutate(d)
    with pytest.raises(SpecError, match=where.replace("[", r"\[").replace("]", r"\]")):
        Program.from_dict(d)


def test_model_spec_rejects_program_with_relative_positions():
    p = vanilla_program(H, D, F)
    with pytest.raises(SpecError, match="positions"):
        _spec(p).replace(positions="relative")
    with pytest.raises(SpecError, match="whole layer"):
        dataclasses.replace(_spec(p).layers[0], mixer_norm="pre").validate("layers[0]", D)


def test_spec_json_without_genome_import_parses():
    """A spec file with a program parses in a fresh interpreter (lazy registration)."""
    import subprocess
    import sys

    text = _spec(vanilla_program(H, D, F)).to_json()
    code = "import sys; from nasjax.spec import ModelSpec; print(ModelSpec.from_json(sys.stdin.read()).n_layers)"
    out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_names_ignore_dead_code_and_position():
    p = vanilla_program(H, D, F)
    head = p.subprograms[2]
    names = instruction_names(p, 2)
    # insert an unused SIN of the input at the front; re-point later references past it
    dead = Instruction("SIN", in1=1)
    shifted = tuple(
        dataclasses.replace(ins, in1=ins.in1 + (ins.in1 > i), in2=ins.in2 + (ins.in2 > i))
        for i, ins in enumerate(head.instructions)
    )
    p2 = _replace_sub(p, 2, (dead,) + shifted)
    names2 = instruction_names(p2, 2)
    assert names2[1:] == names
    assert render_program(p2).count("SIN") == 1


def _replace_sub(p, index, instructions):
    subs = list(p.subprograms)
    subs[index] = dataclasses.replace(subs[index], instructions=tuple(instructions))
    return dataclasses.replace(p, subprograms=tuple(subs))


# --------------------------------------------------------------------------- op semantics


def test_pure_op_rules():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    # width mismatch: second input truncated / tiled to the first's width
    np.testing.assert_allclose(apply_pure_op("ADD", a, b, 0.0), a + b[..., :3])
    np.testing.assert_allclose(apply_pure_op("ADD", b, a, 0.0), b + jnp.tile(a, (1, 1, 3))[..., :7])
    assert match_width(a, 3) is a
    # reductions keep a width of 1, which broadcasts
    assert apply_pure_op("RED_MEAN", b, b, 0.0).shape == (2, 5, 1)
    # T_MAT_MUL is zero above the diagonal; MAT_MUL only reads s <= t
    s = apply_pure_op("T_MAT_MUL", a, a, 0.0)
    assert s.shape == (2, 5, 5) and float(jnp.abs(jnp.triu(s[0], 1)).max()) == 0.0
    np.testing.assert_allclose(s[0, 3, 1], a[0, 3] @ a[0, 1], rtol=1e-6)
    out = apply_pure_op("MAT_MUL", jnp.ones((1, 5, 5)), b[:1], 0.0)
    np.testing.assert_allclose(out[0], np.cumsum(np.asarray(b[0]), axis=0), rtol=1e-5)
    m = apply_pure_op("MASK", s, s, 0.0)
    assert float(m[0, 1, 2]) == -1e9 and float(m[0, 2, 1]) == float(s[0, 2, 1])
    np.testing.assert_allclose(apply_pure_op("CUM_SUM", a, a, 0.0), np.cumsum(np.asarray(a), axis=1), rtol=1e-6)
    np.testing.assert_allclose(apply_pure_op("C_MUL", a, a, 2.5), 2.5 * a)


def test_every_op_is_causal_and_runs():
    """Every op on x and on a position-by-position state: d out_t / d x_s == 0 for s > t.

    Checked on the interpreter directly (one small Jacobian per op, no model around it);
    the whole-model gradient probe is exercised by the seed and random-program tests.
    """
    from nasjax.layers.program import SubprogramModule

    length, width = 8, 4
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, length, width)), jnp.float32)
    future = np.arange(length)[None, :] > np.arange(length)[:, None]  # [t, s]
    for op in OPS:
        if op == "CALL":
            continue
        main = Subprogram(
            (
                Instruction("T_MAT_MUL", 1, 1),  # s1: [L, L] state
                Instruction(op, in1=1, in2=2, dim=0),  # on (s1, x)
                Instruction(op, in1=3, in2=2, dim=0),  # on (x, s1)
                Instruction("ADD", in1=1, in2=2),
            )
        )
        module = SubprogramModule(Program((main,), (0.5,), (1,)), 0, base_dim=4)
        params = module.init(jax.random.key(0), x)
        out = module.apply(params, x)
        assert out.shape[:2] == (1, length), op
        jac = jax.jacrev(lambda v, m=module, p=params: m.apply(p, v)[0])(x)  # [L, W', 1, L, W]
        # non-finite entries (e.g. x / 0 above the diagonal) make the output non-finite, which
        # the search rejects before training; a causal leak is a finite non-zero dependence
        dep_TxS = np.asarray(jnp.where(jnp.isfinite(jac), jnp.abs(jac), 0.0).sum(axis=(1, 2, 4)))
        assert not np.any(dep_TxS[future] > 0), f"{op} reads the future"


# --------------------------------------------------------------------------- seeds == zoo


def _program_params_from_zoo(program, zoo_params, prog_params, mdha: bool):
    """Copies the zoo model's weights into the program model's parameter tree."""
    out = jax.tree.map(lambda x: x, nn.unbox(prog_params))
    zoo = nn.unbox(zoo_params)
    out["embed"] = zoo["embed"]
    out["final_norm"] = zoo["final_norm"]
    names = {i: instruction_names(program, i) for i in range(len(program.subprograms))}
    ops = {i: [ins.op for ins in program.subprograms[i].instructions] for i in names}

    def pick(i, op):
        return [n for n, o in zip(names[i], ops[i]) if o == op]

    ln1, attn, _, ln2, ffn, _ = names[0]
    for layer in range(len(program_layers := [k for k in zoo["decoder"]])):
        z = zoo["decoder"][f"layer_{layer}"]
        main = out["decoder"][f"layer_{layer}"]["mixer"]["main"]
        for call, norm in ((ln1, "mixer_norm"), (ln2, "ffn_norm")):
            (scale,), (shift,) = pick(6, "SCALE"), pick(6, "SHIFT")
            main[call][scale]["scale"] = z[norm]["scale"]
            main[call][shift]["shift"] = z[norm]["bias"]
        head_call, o_name = names[1]
        head = main[attn][head_call]
        for proj, conv in zip(("q", "k", "v"), pick(2, "CONV_1X1")):
            head[conv]["dense"]["kernel"] = jnp.transpose(z["mixer"][f"{proj}_proj"]["kernel"], (1, 0, 2))
        if mdha:
            for proj, dconv in zip(("q", "k", "v"), pick(2, "DCONV_3X1")):
                head[dconv]["dconv"] = dict(z["mixer"][f"{proj}_dconv"])
        o = z["mixer"]["o_proj"]["kernel"]
        main[attn][o_name]["dense"]["kernel"] = o.reshape(-1, o.shape[-1])
        up, down = pick(4, "CONV_1X1")
        b1, b2 = pick(4, "SHIFT")
        main[ffn][up]["dense"]["kernel"] = z["ffn"]["up"]["kernel"]
        main[ffn][b1]["shift"] = z["ffn"]["up"]["bias"]
        main[ffn][down]["dense"]["kernel"] = z["ffn"]["down"]["kernel"]
        main[ffn][b2]["shift"] = z["ffn"]["down"]["bias"]
    del program_layers
    return out


@pytest.mark.parametrize("name", ["vanilla", "primer_ez"])
def test_seed_programs_compute_the_zoo_function(name):
    program = {"vanilla": vanilla_program, "primer_ez": primer_ez_program}[name](H, D, F)
    zoo_spec = get_spec(name, "tiny", vocab_size=262, max_len=64, positions="learned")
    prog_spec = _spec(program)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 262, (2, LEN)), jnp.int32)
    zoo_model, prog_model = build(zoo_spec), build(prog_spec)
    zoo_params = zoo_model.init({"params": jax.random.key(1)}, tokens)["params"]
    # perturb norms / biases / dconv taps away from their init so every weight matters
    zoo_params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), nn.unbox(zoo_params)
    )
    prog_params = prog_model.init({"params": jax.random.key(2)}, tokens)["params"]
    params = _program_params_from_zoo(program, zoo_params, prog_params, mdha=name == "primer_ez")
    n_zoo = sum(x.size for x in jax.tree.leaves(zoo_params))
    n_prog = sum(x.size for x in jax.tree.leaves(params))
    assert n_zoo == n_prog
    want = zoo_model.apply({"params": zoo_params}, tokens)
    got = prog_model.apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)


def test_seed_programs_pass_the_probe():
    for program in (vanilla_program(H, D, F), primer_ez_program(H, D, F)):
        result = probe_model(_spec(program), seq_len=LEN)
        assert result.finite and result.causal_leak == 0.0 and result.output_hash


@pytest.mark.parametrize("op_by_op", [False, True], ids=["compiled", "op_by_op"])
def test_probe_detects_a_leak(monkeypatch, op_by_op):
    """An anti-causal op (a reverse cumulative sum patched into the interpreter) is caught,
    whether the probe is one compiled program or runs op by op (``search.op_by_op``)."""
    import nasjax.layers.program as interp

    main = Subprogram((Instruction("CUM_SUM", 1), Instruction("ADD", 1, 2)))
    spec = _spec(Program((main,), (1.0,), (1,)), n_layers=1)
    assert probe_model(spec, seq_len=LEN, op_by_op=op_by_op).causal_leak == 0.0
    real = interp.apply_pure_op

    def leaky(op, a, b, c):
        return jnp.flip(jnp.cumsum(jnp.flip(a, 1), axis=1), 1) if op == "CUM_SUM" else real(op, a, b, c)

    monkeypatch.setattr(interp, "apply_pure_op", leaky)
    result = probe_model(spec, seq_len=LEN, op_by_op=op_by_op)
    assert not result.causal and result.causal_leak > 0.1
    encoder = get_spec("bert", "tiny", vocab_size=262, max_len=64)
    assert probe_model(encoder, seq_len=LEN, op_by_op=op_by_op).causal_leak is None  # encoders are not checked


def test_op_by_op_probe_agrees_with_the_compiled_probe():
    """``search.op_by_op`` changes how the init and the probe execute, not what they compute:
    the same initial parameters and logits up to float rounding, and the same verdicts."""
    from nasjax.train.state import initial_params

    for program in (vanilla_program(H, D, F), primer_ez_program(H, D, F)):
        spec = _spec(program)
        model = build(spec)
        compiled = initial_params(model, 5, LEN)
        eager = initial_params(model, 5, LEN, op_by_op=True)
        assert jax.tree.structure(compiled) == jax.tree.structure(eager)
        for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
        assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)))
        one, other = probe_model(spec, seq_len=LEN, seed=5), probe_model(spec, seq_len=LEN, seed=5, op_by_op=True)
        assert one.finite and other.finite and one.causal_leak == other.causal_leak == 0.0


def test_nested_branches_train_under_a_mesh(tiny_config, tmp_path):
    """A CALL with branches inside a branched CALL: parameters get two leading copy axes."""
    from nasjax import sharding as shd
    from nasjax.train.loop import Trainer

    head = Subprogram((Instruction("CONV_1X1", 1, dim=0, branches=2),), 1, "head")
    mid = Subprogram((Instruction("CALL", 1, call=2, branches=2), Instruction("DCONV_3X1", 1)), 1, "mid")
    main = Subprogram((Instruction("CALL", 1, call=1, branches=2), Instruction("ADD", 1, 2)), 1, "main")
    spec = _spec(Program((main, mid, head), (1.0,), (1,)), n_layers=1)
    cfg = tiny_config()
    mesh = shd.make_mesh((-1, 1, 1))
    trainer = Trainer(spec, cfg.train, mesh, shd.DEFAULT_RULES, seed=0, seq_len=LEN)
    state = trainer.init_state()
    batch = {"inputs": np.zeros((8, LEN), np.int32), "targets": np.ones((8, LEN), np.int32),
             "weights": np.ones((8, LEN), np.float32)}  # fmt: skip
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("op_by_op", [False, True], ids=["compiled", "op_by_op"])
def test_probe_parameters_are_the_trainers_init(tiny_config, op_by_op):
    """The probe's init is the trainer's: a search's trainer takes it instead of initialising
    again, and gets exactly what a trainer without a probe computes (8-device mesh), with
    the one-off programs compiled or run op by op (``search.op_by_op``)."""
    from nasjax import sharding as shd
    from nasjax.train import state as state_lib
    from nasjax.train.loop import Trainer

    spec = _spec(primer_ez_program(H, D, F))
    cfg = tiny_config()
    mesh = shd.make_mesh((-1, 1, 1))
    key = (spec, 3, LEN, op_by_op)

    def trainer_state():
        trainer = Trainer(spec, cfg.train, mesh, shd.DEFAULT_RULES, seed=3, seq_len=LEN, op_by_op=op_by_op)
        return trainer.init_state()

    def trainer_params():
        return jax.device_get(trainer_state().params)

    fresh = trainer_params()
    probe_model(spec, seq_len=LEN, seed=3, remember=True, op_by_op=not op_by_op)
    other = (spec, 3, LEN, not op_by_op)
    np.testing.assert_array_equal(jax.tree.leaves(trainer_params())[0], jax.tree.leaves(fresh)[0])
    assert other in state_lib._REMEMBERED  # the other setting's entry is not this trainer's
    state_lib._REMEMBERED.clear()
    probe_model(spec, seq_len=LEN, seed=3, remember=True, op_by_op=op_by_op)
    assert key in state_lib._REMEMBERED
    state = trainer_state()
    taken = jax.device_get(state.params)
    assert key not in state_lib._REMEMBERED  # taken, not kept
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(taken), strict=True):
        np.testing.assert_array_equal(a, b)
    # the state lies in the trainer's shardings either way, the optimizer state zeroed
    for leaf in jax.tree.leaves(state.opt_state):
        if np.ndim(leaf):
            assert len(leaf.sharding.device_set) == 8 and not np.any(np.asarray(leaf))
    # A mismatching entry (another spec under the key) is ignored, not used.
    state_lib.remember_initial_params(key, {"wrong": np.zeros(3)})
    again = trainer_params()
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lazy_init_of_branched_programs_runs_no_forward_op(caplog):
    """The op-by-op init of a program with pure ops inside branched CALLs equals the eager
    init bit for bit, and compiles no program for the forward's ops: the lazy init traces
    the forward with jit disabled, so its ops are staged, not run (under jit, jax ran the
    known part of each jnp function inside nn.vmap, one small compile per new shape)."""
    import logging

    from nasjax.train.state import _params_fn, initial_params

    inner = Subprogram(
        (Instruction("EXP", 1), Instruction("RED_MAX", 1), Instruction("CONV_1X1", 1, dim=0, branches=2)), 1, "inner"
    )
    main = Subprogram((Instruction("CALL", 1, call=1, branches=2), Instruction("ADD", 1, 2)), 1, "main")
    model = build(_spec(Program((main, inner), (1.0,), (1,)), n_layers=1, base_dim=12))
    eager = _params_fn(model, LEN)(jax.random.key(5))
    with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
        lazy = initial_params(model, 5, LEN, op_by_op=True)
        jax.jit(lambda x: x * 3.0)(np.zeros((7, 3, 5), np.float32))  # control: this compile is seen
    compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert any("lambda" in m for m in compiled), "the compile log was not captured"
    assert not [m for m in compiled if "jit(exp)" in m or "reduce_max" in m], compiled
    assert jax.tree.structure(eager) == jax.tree.structure(lazy)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(lazy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_branched_dconv_is_one_conv_with_the_vmapped_parameters(monkeypatch):
    """A DCONV with ``branches`` > 1 runs as one conv with copies (its backward sums the
    shared input's gradient once). It has exactly the parameters ``nn.vmap`` gave it: paths,
    shapes, logical axes and values, and the other parameters' values are unchanged, in the
    compiled and the op-by-op init. Its output and gradients are nn.vmap's to rounding."""
    import nasjax.layers.program as program_layers
    from nasjax.train.state import initial_params

    inner = Subprogram((Instruction("CONV_1X1", 1, dim=0), Instruction("DCONV_15X1", 1, branches=2)), 1, "inner")
    main = Subprogram(
        (
            Instruction("CONV_1X1", 1, dim=0, branches=2),
            Instruction("DCONV_3X1", 1, branches=4),
            Instruction("CALL", 1, call=1, branches=2),
            Instruction("CONV_1X1", 1, dim=1),
            Instruction("ADD", 1, 3),
        ),
        1,
        "main",
    )
    model = build(_spec(Program((main, inner), (1.0,), (1, 4)), n_layers=1, base_dim=8))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 262, size=(2, LEN)), jnp.int32)

    def run():
        boxed = model.init({"params": jax.random.key(3)}, tokens)["params"]
        params = nn.meta.unbox(boxed)
        names = jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
        lazy = initial_params(model, 3, LEN, op_by_op=True)
        params = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(a.size).standard_normal(a.shape), params)

        def loss(p):
            return jnp.sum(jnp.sin(model.apply({"params": p}, tokens)))

        return boxed, names, params, lazy, model.apply({"params": params}, tokens), jax.grad(loss)(params)

    ours = run()
    monkeypatch.setattr(program_layers, "_conv_copies", lambda op, branches: False)
    vmapped = run()
    for a, b in ((ours[0], vmapped[0]), (ours[3], vmapped[3])):  # compiled and op-by-op inits
        assert jax.tree.structure(nn.meta.unbox(a)) == jax.tree.structure(nn.meta.unbox(b))
        for x, y in zip(jax.tree.leaves(nn.meta.unbox(a)), jax.tree.leaves(nn.meta.unbox(b))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ours[1] == vmapped[1]
    layer = ours[2]["decoder"]["layer_0"]["mixer"]["main"]
    dconv = [k for k in layer if k.startswith("dconv_3x1")]
    assert dconv and layer[dconv[0]]["dconv"]["tap_0"].shape == (4, 16)  # copies x width
    np.testing.assert_allclose(np.asarray(ours[4]), np.asarray(vmapped[4]), rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(ours[5]), jax.tree.leaves(vmapped[5])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
