"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def n_devices():
    return jax.device_count()


WORDS = (
    "the king queen lord lady good noble sweet fair love death night day heart hand eye "
    "speak come go stay hear see know think say make give take thou thee thy my your his her "
    "and but for with not no yes now then here there what why how when where"
).split()


def write_synthetic_corpus(folder, n_files=6, words_per_file=3000, seed=0):
    """Deterministic pseudo-text with learnable structure (a word bigram chain)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(WORDS)
    nxt = rng.integers(0, n, size=(n, 3))  # each word is followed by one of 3 words
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        w = int(rng.integers(n))
        out = []
        for i in range(words_per_file):
            out.append(WORDS[w])
            w = int(nxt[w, rng.integers(3)])
            if i % 12 == 11:
                out.append(".\n")
        p = folder / f"doc_{f}.txt"
        p.write_text(" ".join(out))
        paths.append(p)
    return paths


@pytest.fixture
def text_dir(tmp_path):
    write_synthetic_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture
def tiny_config(text_dir, tmp_path):
    """A small LM training config over the synthetic corpus (fast on CPU)."""

    def make(**overrides):
        from nasjax.config import apply_overrides, base_config

        c = base_config()
        c.model.name = "vanilla"
        c.model.size = "tiny"
        c.data.path = str(text_dir)
        c.data.val_files = "doc_5.txt"
        c.data.seq_len = 32
        c.data.cache_dir = str(tmp_path / "cache")
        c.train.batch_size = 8
        c.train.steps = 6
        c.train.warmup_steps = 2
        c.train.log_every = 1
        c.train.eval_every = 0
        c.train.eval_batches = 2
        c.train.checkpoint_every = 2
        c.train.async_checkpoint = False
        c.compile_cache_dir = "none"
        c.lock()
        return apply_overrides(c, overrides)

    return make


@pytest.fixture
def autobert_config(text_dir, tmp_path):
    def make(**overrides):
        import json

        import numpy as np

        from nasjax.config import apply_overrides, load_config_file

        rng = np.random.default_rng(0)
        words = (text_dir / "doc_0.txt").read_text().split()
        task = tmp_path / "task.jsonl"
        with open(task, "w") as f:
            for _ in range(160):
                sent = list(rng.choice(words, size=8))
                label = int(rng.integers(2))
                sent[int(rng.integers(8))] = "queen" if label else "king"
                f.write(json.dumps({"label": label, "text": " ".join(sent)}) + "\n")
        cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs/search/autobert.py:tiny"))
        base = {
            "data.path": str(text_dir),
            "data.val_files": "doc_5.txt",
            "data.seq_len": 32,
            "data.cache_dir": str(tmp_path / "cache"),
            "train.batch_size": 8,
            "train.steps": 4,
            "train.warmup_steps": 1,
            "search.population_size": 3,
            "search.tournament_size": 2,
            "search.max_evaluations": 4,
            "search.val_batches": 2,
            "autobert.n_layers": 2,
            "autobert.d_model": 32,
            "autobert.n_heads": 2,
            "autobert.d_ff": 64,
            "autobert.tasks": str(task),
            "autobert.task_seq_len": 16,
            "autobert.finetune_steps": 3,
            "autobert.finetune_batch_size": 8,
            "autobert.finetune_warmup": 1,
            "compile_cache_dir": str(tmp_path / "xla_cache"),
        }
        base.update(overrides)
        return apply_overrides(cfg, base)

    return make


@pytest.fixture
def search_config(text_dir, tmp_path):
    def make(**overrides):
        from nasjax.config import apply_overrides, load_config_file

        cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs/search/primer.py:tiny"))
        base = {
            "data.path": str(text_dir),
            "data.val_files": "doc_5.txt",
            "data.seq_len": 32,
            "data.cache_dir": str(tmp_path / "cache"),
            "train.batch_size": 8,
            "train.steps": 6,
            "train.warmup_steps": 2,
            "search.hurdles": 1,
            "search.hurdle_min_samples": 2,
            "search.population_size": 3,
            "search.tournament_size": 2,
            "search.max_evaluations": 7,
            "search.d_model": 32,
            "search.n_layers": 1,
            "search.n_heads": 2,
            "search.d_ff": 64,
            "search.val_batches": 2,
            "compile_cache_dir": str(tmp_path / "xla_cache"),
        }
        base.update(overrides)
        return apply_overrides(cfg, base)

    return make


@pytest.fixture
def noop_variant():
    """(the vanilla seed program, the same program with a live no-op in its FFN): the FFN's
    output s6 -> s7 = C_MUL(s6, 0.0); s8 = ADD(s6, s7), a different program that computes
    the same function (functional-equivalence tests)."""
    import dataclasses

    from nasjax.genome.primer import vanilla_program
    from nasjax.genome.program import Instruction

    base = vanilla_program(2, 32, 64)
    ffn = base.subprograms[4]
    noop = ffn.instructions + (Instruction("C_MUL", in1=1, const=1), Instruction("ADD", in1=2, in2=1))
    assert base.constants[1] == 0.0
    subs = list(base.subprograms)
    subs[4] = dataclasses.replace(ffn, instructions=noop)
    return base, dataclasses.replace(base, subprograms=tuple(subs))
