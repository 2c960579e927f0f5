"""AutoBERT-Zero search: OP-NAS over BERT backbones with BIWS (``nasjax search``).

    nasjax search --config=configs/search/autobert.py:tiny --workdir=runs/ab
    nasjax results runs/ab

Each candidate: a per-layer choice of a searched attention graph or a GLU light-conv,
MLM pre-trained on Shakespeare + Austen (both fetched on first use; Austen needs
apt-get, else point ``data.path`` at text files) starting from the BIWS supernet, then
fine-tuned on the labelled sentence tasks of ``autobert.tasks`` (polarity as the SST-2
stand-in, hedge detection as a second task; ``glue/sst2`` etc. through tfds with the
``[tfds]`` extra). Fitness = 1 - mean validation accuracy (lower is better).

Presets change sizes and budgets only:

* ``tiny``: 2 CPU cores, about 15 s per candidate. 4 layers x d_model 64, byte
  vocabulary, MLM sequence 64, 250 MLM steps + 2 x 150 fine-tuning steps; kernels
  scaled to the sequence (the paper's 65 at length 128 is 33 here); population 16,
  tournament 4, 120 evaluations.
* ``small``: one accelerator host: 12 layers x 256 (the paper's layout depth), sequence
  128, 2000 MLM steps, kernels up to 65, population 50, tournament 10, 1000 evaluations.
"""

from nasjax.config import search_config

PRESETS = {
    "tiny": dict(
        size="tiny",
        n_layers=4,
        d_model=64,
        seq_len=64,
        batch_size=32,
        steps=250,
        lr=2e-3,
        warmup=25,
        kernels=(3, 5, 7, 9, 17, 33),
        population=16,
        tournament=4,
        evaluations=120,
        finetune_steps=150,
        finetune_lr=1e-3,
        finetune_batch=32,
        task_seq_len=64,
        dropout=0.0,
        max_params=2_000_000,
        val_batches=8,
    ),
    "small": dict(
        size="small",
        n_layers=12,
        d_model=256,
        seq_len=128,
        batch_size=64,
        steps=2000,
        lr=5e-4,
        warmup=200,
        kernels=(3, 5, 7, 9, 15, 31, 65),
        population=50,
        tournament=10,
        evaluations=1000,
        finetune_steps=600,
        finetune_lr=1e-4,
        finetune_batch=32,
        task_seq_len=128,
        dropout=0.1,
        max_params=60_000_000,
        val_batches=32,
    ),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/search/autobert.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    c = search_config("autobert")
    c.model.size = p["size"]
    c.data.seq_len = p["seq_len"]
    c.train.batch_size = p["batch_size"]
    c.train.steps = p["steps"]
    c.train.learning_rate = p["lr"]
    c.train.warmup_steps = p["warmup"]
    s = c.search
    s.population_size = p["population"]
    s.tournament_size = p["tournament"]
    s.max_evaluations = p["evaluations"]
    s.max_params = p["max_params"]
    s.val_batches = p["val_batches"]
    a = c.autobert
    a.n_layers = p["n_layers"]
    a.d_model = p["d_model"]
    a.kernel_sizes = p["kernels"]
    a.finetune_steps = p["finetune_steps"]
    a.finetune_lr = p["finetune_lr"]
    a.finetune_batch_size = p["finetune_batch"]
    a.finetune_warmup = max(p["finetune_steps"] // 10, 1)
    a.task_seq_len = p["task_seq_len"]
    a.dropout = p["dropout"]
    return c
