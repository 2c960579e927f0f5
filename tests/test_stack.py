"""LTS heterogeneous GPT-2 search space (nasjax.genome.stack)."""

import hashlib
import json
import types

import ml_collections
import numpy as np
import pytest

from nasjax.genome.stack import SIZE_PRESETS, StackGenome, StackSpace, baseline_genomes
from nasjax.measure.params import count_params
from nasjax.spec import SpecError

# count_params traces each model with jax.eval_shape (~0.1-0.25 s per 2-6 layer model on
# a loaded 2-core machine), so the exact-count check uses 100 architectures (4 extremes
# + 96 random) to keep this file well under the time budget.
N_PARAM_CHECKS = 100


@pytest.fixture(scope="module")
def cpu_space():
    return StackSpace.from_preset("cpu")


@pytest.fixture(scope="module")
def gpt2_space():
    return StackSpace.from_preset("gpt2")


def _genome(space, n_layer, d_model, d_inner, n_head):
    L = space.max_layers
    d_inner = list(d_inner) + [d_inner[-1]] * (L - len(d_inner))
    n_head = list(n_head) + [n_head[-1]] * (L - len(n_head))
    return StackGenome(n_layer=n_layer, d_model=d_model, d_inner=tuple(d_inner), n_head=tuple(n_head))


def _all_entries_usable(space, g):
    """Every entry, inactive ones included, is a choice usable with g.d_model."""
    return (
        all(f in space.d_inner and f > space.d_inner_ratio * g.d_model for f in g.d_inner)
        and all(h in space.n_head and g.d_model % h == 0 for h in g.n_head)
        and g.n_layer in space.n_layer
        and g.d_model in space.d_model
    )


# --------------------------------------------------------------------------- parameters


def test_decoder_params_equal_counted_non_embedding(cpu_space):
    s = cpu_space
    rng = np.random.default_rng(1111)
    extremes = [
        _genome(s, 2, 64, [128], [2]),
        _genome(s, 6, 256, [1024], [8]),
        _genome(s, 6, 96, [192, 1024, 256, 640, 896, 1024], [2, 4, 8, 8, 4, 2]),
        _genome(s, 3, 160, [320, 1024, 704], [8, 2, 4]),
    ]
    genomes = extremes + [s.sample(rng) for _ in range(N_PARAM_CHECKS - len(extremes))]
    assert len({g.key() for g in genomes}) == len(genomes)
    for g in genomes:
        assert s.check(g) is None, g
        spec = s.decode(g, vocab_size=262, max_len=64)
        counted = count_params(spec)["non_embedding"]
        assert s.decoder_params(g) == counted, g.describe()


def test_decode(cpu_space):
    g = _genome(cpu_space, 3, 128, [256, 512, 1024, 384], [2, 4, 8, 2])
    spec = cpu_space.decode(g, vocab_size=262, max_len=64)
    assert spec.n_layers == 3
    assert spec.d_model == 128 and spec.vocab_size == 262 and spec.max_len == 64
    assert [b.ffn.d_ff for b in spec.layers] == [256, 512, 1024]
    assert [b.mixer.n_heads for b in spec.layers] == [2, 4, 8]
    assert [b.ffn.activation for b in spec.layers] == ["gelu_tanh"] * 3
    assert spec.dropout_rate == 0.0 and spec.attention_dropout_rate == 0.0
    assert spec.name == f"lts-{g.key()[:8]}"
    assert spec.positions == "learned" and spec.tie_embeddings
    # inactive entries do not change the decoded architecture
    other = _genome(cpu_space, 3, 128, [256, 512, 1024, 1024], [2, 4, 8, 8])
    assert cpu_space.decode(other, 262, 64) == spec
    tuned = cpu_space.decode(g, 262, 64, dropout_rate=0.1, name="final")
    assert tuned.dropout_rate == 0.1 and tuned.name == "final"
    with pytest.raises(SpecError, match="n_heads"):
        cpu_space.decode(_genome(cpu_space, 2, 100, [512], [8]), 262, 64)


# --------------------------------------------------------------------------- validity


def test_sample_always_valid(cpu_space, gpt2_space):
    rng = np.random.default_rng(0)
    for space, n in ((cpu_space, 2000), (gpt2_space, 500)):
        seen = set()
        for _ in range(n):
            g = space.sample(rng)
            assert space.check(g) is None
            assert g.max_layers == space.max_layers
            assert _all_entries_usable(space, g)
            seen.add(g.key())
        assert len(seen) > 0.95 * n
    p = [gpt2_space.decoder_params(gpt2_space.sample(rng)) for _ in range(200)]
    assert min(p) >= 6_000_000 and max(p) <= 100_000_000
    # every choice of the global genes gets drawn
    gs = [cpu_space.sample(rng) for _ in range(500)]
    assert {g.n_layer for g in gs} == set(cpu_space.n_layer)
    assert {g.d_model for g in gs} == set(cpu_space.d_model)


def test_sampling_is_reproducible(cpu_space):
    a = [cpu_space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [cpu_space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b


def test_mutate_valid_and_changes(cpu_space, gpt2_space):
    rng = np.random.default_rng(1)
    for space, n in ((cpu_space, 2000), (gpt2_space, 300)):
        parent = space.sample(rng)
        changed = 0
        for _ in range(n):
            child = space.mutate(parent, rng)
            assert space.check(child) is None
            assert _all_entries_usable(space, child)
            changed += child.key() != parent.key()
            parent = child if rng.random() < 0.5 else space.sample(rng)
        assert changed > 0.7 * n, changed
    g = cpu_space.sample(rng)
    assert cpu_space.mutate(g, rng, prob=0.0) == g
    for _ in range(200):
        assert cpu_space.mutate(g, rng, require_change=True).key() != g.key()


def test_mutate_resamples_d_inner_made_invalid_by_new_d_model(cpu_space):
    s = cpu_space
    parent = _genome(s, 2, 64, [128], [2])  # 128 > 1.7 x 64 but not > 1.7 x 96
    rng = np.random.default_rng(2)
    wider = 0
    for _ in range(500):
        child = s.mutate(parent, rng)
        assert s.check(child) is None
        if child.d_model != 64:
            wider += 1
            assert all(f > 1.7 * child.d_model for f in child.d_inner)  # inactive entries too
    assert wider > 50


def test_crossover_valid_and_genes_from_parents(cpu_space, gpt2_space):
    rng = np.random.default_rng(3)
    for space, n in ((cpu_space, 2000), (gpt2_space, 300)):
        for _ in range(n):
            a, b = space.sample(rng), space.sample(rng)
            c = space.crossover(a, b, rng)
            assert space.check(c) is None
            assert c.n_layer in (a.n_layer, b.n_layer)
            assert c.d_model in (a.d_model, b.d_model)
            assert all(x in (y, z) for x, y, z in zip(c.d_inner, a.d_inner, b.d_inner))
            assert all(x in (y, z) for x, y, z in zip(c.n_head, a.n_head, b.n_head))
    a, b = cpu_space.sample(rng), cpu_space.sample(rng)
    assert cpu_space.crossover(a, b, rng, prob=1.0) == a
    assert cpu_space.crossover(a, b, rng, prob=0.0) == b


def test_check_reasons(cpu_space):
    s = cpu_space
    assert s.check(_genome(s, 3, 192, [512, 256, 512], [4])) == "layer 1: d_inner 256 <= 1.7 x d_model 192"
    assert s.check(_genome(s, 2, 100, [512], [4])).startswith("d_model 100 not in choices")
    assert s.check(_genome(s, 1, 128, [512], [4])) == "n_layer 1 not in choices (2, 3, 4, 5, 6)"
    assert "per-layer entries" in s.check(StackGenome(n_layer=2, d_model=128, d_inner=(512,) * 5, n_head=(4,) * 5))
    assert s.check(_genome(s, 2, 128, [512, 500], [4])) == "layer 1: d_inner 500 not in choices"
    assert "layer 0: n_head 16 not in choices" in s.check(_genome(s, 2, 128, [512], [16]))
    # inactive entries are not checked
    assert s.check(_genome(s, 2, 192, [512, 512, 128], [4, 4, 16])) is None

    odd = StackSpace(n_layer=(2,), d_model=(96, 100), d_inner=(512,), n_head=(2, 8))
    assert odd.check(StackGenome(2, 100, (512, 512), (2, 8))) == "layer 1: n_head 8 does not divide d_model 100"

    g = _genome(s, 2, 64, [128], [2])
    p = s.decoder_params(g)
    bounded = StackSpace(**{**SIZE_PRESETS["cpu"], "min_params": p + 1})
    assert bounded.check(g) == f"decoder params {p:,} < min_params {p + 1:,}"
    g = _genome(s, 3, 128, [512], [4])
    p = s.decoder_params(g)
    capped = StackSpace(**{**SIZE_PRESETS["cpu"], "max_params": p - 1})
    assert capped.check(g) == f"decoder params {p:,} > max_params {p - 1:,}"


def test_sample_gives_up_naming_the_constraint(cpu_space):
    big = _genome(cpu_space, 6, 256, [1024], [8])
    hard = StackSpace(**{**SIZE_PRESETS["cpu"], "min_params": cpu_space.decoder_params(big)})
    with pytest.raises(RuntimeError, match="min_params"):
        hard.sample(np.random.default_rng(0), max_attempts=200)
    assert hard.check(big) is None  # feasible, just (very) rare


def test_genome_shape_errors(cpu_space):
    short = StackGenome(n_layer=2, d_model=128, d_inner=(512, 512), n_head=(4, 4))
    with pytest.raises(SpecError, match="mutate: genome has 2 per-layer entries; the space needs 6"):
        cpu_space.mutate(short, np.random.default_rng(0))
    with pytest.raises(SpecError, match="crossover"):
        cpu_space.crossover(short, cpu_space.sample(np.random.default_rng(0)), np.random.default_rng(0))


# --------------------------------------------------------------------------- genome identity and JSON


def test_json_round_trip(cpu_space):
    rng = np.random.default_rng(4)
    for _ in range(20):
        g = cpu_space.sample(rng)
        assert StackGenome.from_dict(g.to_dict()) == g
        assert StackGenome.from_json(g.to_json()) == g
        assert StackGenome.from_dict(json.loads(json.dumps(g.to_dict()))).key() == g.key()
    # numpy integers and lists are normalised to python ints and tuples
    g = StackGenome(np.int64(2), np.int64(64), [np.int64(128)] * 3, np.array([2, 4, 8]))
    assert g == StackGenome(2, 64, (128, 128, 128), (2, 4, 8))
    assert json.loads(g.to_json()) == {"n_layer": 2, "d_model": 64, "d_inner": [128] * 3, "n_head": [2, 4, 8]}


GOOD = {"n_layer": 2, "d_model": 128, "d_inner": [512, 384, 256], "n_head": [4, 4, 2]}


@pytest.mark.parametrize(
    "data, path, message",
    [
        ([1, 2], "genome", "expected an object"),
        ({k: v for k, v in GOOD.items() if k != "d_model"}, "genome.d_model", "missing"),
        ({**GOOD, "div_val": 4}, "genome.div_val", "unknown field"),
        ({**GOOD, "n_layer": 0}, "genome.n_layer", "positive integer"),
        ({**GOOD, "n_layer": True}, "genome.n_layer", "positive integer"),
        ({**GOOD, "d_model": "128"}, "genome.d_model", "positive integer"),
        ({**GOOD, "d_inner": [512, "x", 256]}, "genome.d_inner[1]", "positive integer"),
        ({**GOOD, "d_inner": [512, 384, 2.5]}, "genome.d_inner[2]", "positive integer"),
        ({**GOOD, "n_head": []}, "genome.n_head", "non-empty list"),
        ({**GOOD, "n_head": 4}, "genome.n_head", "non-empty list"),
        ({**GOOD, "n_head": [4, 4]}, "genome.n_head", "has 2 entries but d_inner has 3"),
        ({**GOOD, "n_layer": 4}, "genome.n_layer", "only 3 per-layer entries"),
    ],
)
def test_malformed_genome_names_the_path(data, path, message):
    with pytest.raises(SpecError) as e:
        StackGenome.from_dict(data)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_malformed_genome_custom_path_and_json():
    with pytest.raises(SpecError, match=r"^population\[3\]\.d_inner\[0\]: "):
        StackGenome.from_dict({**GOOD, "d_inner": [-1, 2, 3]}, path="population[3]")
    with pytest.raises(SpecError, match="g.json: not valid JSON"):
        StackGenome.from_json("{", source="g.json")
    with pytest.raises(SpecError, match=r"^genome\.n_head\[2\]"):
        StackGenome(2, 64, (128, 128, 128), (2, 4, 0))


def test_key_ignores_inactive_entries():
    a = StackGenome(2, 128, (512, 384, 256, 1024), (4, 4, 2, 8))
    b = StackGenome(2, 128, (512, 384, 640, 128), (4, 4, 8, 2))
    assert a != b
    assert a.active() == b.active() == (2, 128, (512, 384), (4, 4))
    assert a.key() == b.key()
    assert len(a.key()) == 16 and int(a.key(), 16) >= 0
    blob = json.dumps([2, 128, [512, 384], [4, 4]], separators=(",", ":"))
    assert a.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]  # stable across runs
    assert StackGenome(3, 128, a.d_inner, a.n_head).key() != a.key()
    assert StackGenome(2, 128, (512, 448, 256, 1024), a.n_head).key() != a.key()
    assert StackGenome(2, 128, a.d_inner, (4, 2, 2, 8)).key() != a.key()


# --------------------------------------------------------------------------- config


def test_presets():
    gpt2 = SIZE_PRESETS["gpt2"]
    assert gpt2["n_layer"] == tuple(range(2, 16))
    assert gpt2["d_model"][0] == 128 and gpt2["d_model"][-1] == 960
    assert gpt2["d_inner"][0] == 128 and gpt2["d_inner"][-1] == 4032
    assert gpt2["n_head"] == (2, 4, 8)
    assert (gpt2["min_params"], gpt2["max_params"]) == (6_000_000, 100_000_000)
    assert StackSpace.from_preset("gpt2").max_layers == 15
    cpu = StackSpace.from_preset("cpu")
    assert cpu.max_layers == 6 and all(d % 8 == 0 for d in cpu.d_model)
    with pytest.raises(SpecError, match="unknown LTS space preset 'huge'"):
        StackSpace.from_preset("huge")


def test_from_config():
    cfg = ml_collections.ConfigDict(dict(SIZE_PRESETS["cpu"]))
    assert StackSpace.from_config(cfg) == StackSpace(**SIZE_PRESETS["cpu"])
    assert StackSpace.from_config(dict(SIZE_PRESETS["gpt2"])) == StackSpace.from_preset("gpt2")
    ns = types.SimpleNamespace(n_layer=[2, 3], d_model=[64], d_inner=[128, 256], n_head=[4, 2])
    space = StackSpace.from_config(ns)
    assert space.n_head == (2, 4) and space.d_inner_ratio == 1.7 and space.max_params == 0
    assert StackSpace.from_config(space.to_dict()) == space


@pytest.mark.parametrize(
    "change, key, message",
    [
        ({"n_head": "abc"}, "n_head", "expected a non-empty list of positive integers"),
        ({"n_head": []}, "n_head", "expected a non-empty list of positive integers"),
        ({"d_model": [64, 0]}, "d_model", "expected a non-empty list of positive integers"),
        ({"n_layer": [2, 2.5]}, "n_layer", "expected a non-empty list of positive integers"),
        ({"d_inner": 512}, "d_inner", "expected a non-empty list of positive integers"),
        ({"d_inner_ratio": -1.0}, "d_inner_ratio", "non-negative number"),
        ({"d_inner_ratio": "1.7"}, "d_inner_ratio", "non-negative number"),
        ({"min_params": -5}, "min_params", "non-negative integer"),
        ({"max_params": 1.5}, "max_params", "non-negative integer"),
        ({"min_params": 10, "max_params": 5}, "min_params", "10 > max_params 5"),
        ({"min_params": 10**10}, "min_params", "exceeds the largest decoder"),
        ({"max_params": 10}, "max_params", "below the smallest decoder"),
        ({"d_inner": [64, 96]}, "d_inner", "no choice exceeds d_inner_ratio 1.7"),
        ({"n_head": [7]}, "n_head", "head count that divides"),
        ({"div_val": [4]}, "div_val", "unknown key"),
    ],
)
def test_from_config_errors_name_the_key(change, key, message):
    cfg = ml_collections.ConfigDict({**SIZE_PRESETS["cpu"], **change})
    with pytest.raises(SpecError) as e:
        StackSpace.from_config(cfg)
    assert str(e.value).startswith(f"lts.space.{key}: ")
    assert message in str(e.value)


def test_from_config_missing_key_and_custom_path():
    cfg = {k: v for k, v in SIZE_PRESETS["cpu"].items() if k != "d_inner"}
    with pytest.raises(SpecError, match=r"^search\.space\.d_inner: missing"):
        StackSpace.from_config(cfg, path="search.space")
    with pytest.raises(SpecError, match=r"^lts\.space: missing"):
        StackSpace.from_config(None)
    with pytest.raises(SpecError, match=r"^space\.n_head: expected a non-empty list"):
        StackSpace(**{**SIZE_PRESETS["cpu"], "n_head": (0,)})


# --------------------------------------------------------------------------- baselines


def test_baseline_genomes(cpu_space):
    base = baseline_genomes(cpu_space, d_model=128, d_inner=512, n_head=4, layers=range(2, 7))
    assert [g.n_layer for g in base] == [2, 3, 4, 5, 6]
    for g in base:
        assert g.d_inner == (512,) * 6 and g.n_head == (4,) * 6 and g.d_model == 128
        assert cpu_space.check(g) is None
    # a baseline outside the space's choices still decodes (not in the space, though)
    wide = baseline_genomes(cpu_space, d_model=512, d_inner=2048, n_head=8, layers=[1])[0]
    assert cpu_space.check(wide) is not None
    assert cpu_space.decode(wide, 262, 64).n_layers == 1
    with pytest.raises(SpecError, match=r"^baselines\.layers\[1\]: expected a depth in 1\.\.6"):
        baseline_genomes(cpu_space, 128, 512, 4, [2, 7])
    with pytest.raises(SpecError, match=r"^baselines\.n_head: "):
        baseline_genomes(cpu_space, 128, 512, 0, [2])
