"""Primer-style evolutionary search over decoder-block programs (``nasjax search``).

    nasjax search --config=configs/search/primer.py:tiny --workdir=runs/s1
    nasjax results runs/s1

Presets change sizes and budgets only:

* ``tiny``: 2 CPU cores, about 2 minutes for 60 evaluations. 2 layers x d_model 64, byte
  vocabulary, sequence 64, 160 steps per candidate with 2 hurdles, population 12,
  tournament 4, AdamW, train and eval steps compiled as pieces shared by all candidates
  (``train.segmented``), candidates whose train step needs more than 512 MiB refused.
  Step budgets make the search exactly reproducible (a resumed search follows the
  uninterrupted trajectory).
* ``small``: one GPU or TPU host: Primer's LM1B search model (6 layers x 512, 8 heads,
  d_ff 2048, sequence 64, 4096 tokens per batch, Adafactor lr 0.01 rsqrt), a 30-minute
  *time* budget per candidate (Primer: 7 TPUv2-hours) cut by 4 hurdles, population 100,
  tournament 10. Point ``data.path`` at your corpus (e.g. LM1B text).
"""

from nasjax.config import search_config

PRESETS = {
    "tiny": dict(
        size="tiny",
        seq_len=64,
        batch_size=16,
        steps=160,
        budget_seconds=0.0,
        lr=3e-3,
        warmup=20,
        optimizer="adamw",
        population=12,
        tournament=4,
        hurdles=2,
        min_samples=3,
        evaluations=60,
        max_params=1_000_000,
        max_memory=512 * 2**20,
        val_batches=8,
    ),
    "small": dict(
        size="small",
        seq_len=64,
        batch_size=64,
        steps=10**7,
        budget_seconds=1800.0,
        lr=0.01,
        warmup=1000,
        optimizer="adafactor",
        population=100,
        tournament=10,
        hurdles=4,
        min_samples=10,
        evaluations=5000,
        max_params=100_000_000,
        max_memory=60 * 2**30,
        val_batches=64,
    ),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/search/primer.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    c = search_config("primer")
    c.model.size = p["size"]
    c.data.seq_len = p["seq_len"]
    c.train.batch_size = p["batch_size"]
    c.train.steps = p["steps"]
    c.train.budget_seconds = p["budget_seconds"]
    c.train.learning_rate = p["lr"]
    c.train.warmup_steps = p["warmup"]
    c.train.optimizer = p["optimizer"]
    # Tiny: the train and eval steps as pieces shared by all candidates (train.segmented):
    # a candidate compiles only its own layer's forward and backward, ~0.7 s instead of
    # ~1.9 s, and the default search runs ~45% more candidates per hour (docs/benchmarks.md).
    # The segmented update runs per parameter leaf, so the flat optimizer (which it
    # replaced here) is off. The small preset trains for hours per candidate, where one
    # program per model and fusion across layers matter more than its compile.
    c.train.segmented = preset == "tiny"
    # Its Primer program layers are cut at their subprogram invocations into pieces keyed
    # by what they compute, so a child compiles only the pieces its mutation touched:
    # the default search's compile share fell from 35% to 16% and it ran ~23% more
    # candidates per hour, its steps ~10% slower (docs/benchmarks.md).
    c.train.segmented_pieces = "subprogram" if preset == "tiny" else "layer"
    # Its parameters and AdamW moments as 1-D buffers of size classes while a candidate
    # trains, so the update programs serve every shape of a class (docs/benchmarks.md).
    c.train.segmented_layout = "flat" if preset == "tiny" else "shaped"
    c.train.flat_optimizer = False
    # train.segmented_xla_options stays 'auto': on CPU the pieces compile with XLA's earlier
    # kernel emitters, ~30% less compile at the same step time (docs/benchmarks.md, stop 30),
    # and the update programs with their code generated in two parts (stop 31).
    s = c.search
    s.population_size = p["population"]
    s.tournament_size = p["tournament"]
    s.hurdles = p["hurdles"]
    s.hurdle_min_samples = p["min_samples"]
    s.max_evaluations = p["evaluations"]
    s.max_params = p["max_params"]
    # Tiny: a candidate whose compiled train step needs more than 512 MiB (~16x the median
    # candidate's 31 MiB) fails at stage "memory" before it trains. Concatenated branches
    # can widen a tiny program's activations a thousandfold at few parameters; over 1,000
    # evaluations of this preset with the former 4 GiB bound, the 15 candidates above 512 MiB
    # trained for 519 s (26% of the search's wall time; one ran 5.8 s per step and set the
    # 4.1 GiB peak), none passed the second hurdle and the best reached 3.05 against the
    # search's 2.40 (docs/benchmarks.md, stop 29). A time budget would make such candidates
    # cheap as in Primer, but steps keep the tiny search reproducible. A tiny search journaled
    # with the former bound resumes with --config.search.max_memory_bytes=4294967296.
    s.max_memory_bytes = p["max_memory"]
    s.val_batches = p["val_batches"]
    return c
