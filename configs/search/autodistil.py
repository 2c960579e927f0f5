"""AutoDistil: K SuperLMs distilled task-agnostically from a teacher, then a budgeted pick.

    nasjax train   --config=configs/train/mlm.py:tiny --workdir=runs/teacher
    nasjax distil  --config=configs/search/autodistil.py:tiny --workdir=runs/ad --config.teacher=runs/teacher
    nasjax distil-search --config=configs/search/autodistil.py:tiny --workdir=runs/ad --config.teacher=runs/teacher

Presets change sizes and budgets only:

* ``tiny``: 2 CPU cores. The paper's three sub-spaces scaled to the teacher, sequence 64,
  batch 16, 300 SuperLM steps each, lr 1e-3 (the paper's 4e-5 is for 15 passes over
  Wikipedia + BookCorpus), 4 relation heads; budget 0 (rank everything).
* ``paper``: the released settings: lr 4e-5, batch 2048 x 128 tokens, 12 relation heads,
  KL relations; set ``train.steps`` to your corpus and ``distil.budget``.
"""

from nasjax.config import distil_config

PRESETS = {
    "tiny": dict(seq_len=64, batch_size=16, steps=300, lr=1e-3, relation_heads=4, val_batches=4),
    "paper": dict(seq_len=128, batch_size=2048, steps=100_000, lr=4e-5, relation_heads=12, val_batches=64),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/search/autodistil.py; choose from {', '.join(PRESETS)}"
        )
    p = PRESETS[preset]
    c = distil_config()
    c.data.seq_len = p["seq_len"]
    c.train.batch_size = p["batch_size"]
    c.train.steps = p["steps"]
    c.train.learning_rate = p["lr"]
    c.distil.relation_heads = p["relation_heads"]
    c.distil.val_batches = p["val_batches"]
    return c
