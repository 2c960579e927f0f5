"""LiteTransformerSearch: training-free Pareto search over heterogeneous GPT-2 decoders.

    nasjax search --config=configs/search/lts.py:cpu --workdir=runs/lts
    nasjax results runs/lts
    nasjax lts-validate --config=configs/search/lts.py:cpu --workdir=runs/lts_validate

Latency and memory are measured on the device the command runs on. Presets:

* ``gpt2``: the paper's space and algorithm (n_layer 2-15, d_model 128-960, d_inner
  128-4032 > 1.7 d_model, heads 2/4/8, decoder params 6M-100M, population 100 = 20
  parents + 40 mutants + 40 crossovers, 30 iterations, batch 1, sequence 192, 10
  repeats). Hours on a laptop CPU (the paper: < 3 h), minutes on a GPU.
* ``cpu``: the same algorithm on a CPU-sized space (n_layer 2-6, d_model 64-256,
  d_inner 128-1024) with a smaller population (40 = 8 + 16 + 16), 6 iterations and
  sequence 128: about 232 architectures, under a minute on 2 cores (26-37 s of
  evaluation with a cold compile cache, docs/benchmarks.md, stop 27; 17 s warm).
"""

from nasjax.config import search_config
from nasjax.genome.stack import SIZE_PRESETS

PRESETS = {
    "gpt2": dict(space="gpt2", population=100, parents=20, mutants=40, crosses=40, iterations=30, seq_len=192),
    "cpu": dict(space="cpu", population=40, parents=8, mutants=16, crosses=16, iterations=6, seq_len=128),
}


def get_config(preset: str = "cpu"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/search/lts.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    c = search_config("lts")
    c.search.population_size = p["population"]
    c.search.iterations = p["iterations"]
    c.lts.parent_size = p["parents"]
    c.lts.mutation_size = p["mutants"]
    c.lts.crossover_size = p["crosses"]
    c.lts.seq_len = p["seq_len"]
    for key, value in SIZE_PRESETS[p["space"]].items():
        c.lts.space[key] = value
    # the LTS validation trainings (nasjax lts-validate): a short identical recipe
    c.data.seq_len = 128
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 30
    c.train.schedule = "cosine"
    return c
