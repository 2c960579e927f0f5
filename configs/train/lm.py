"""Language-model training (``nasjax train``): presets tiny / small / base.

    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/a
    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/b --config.model.name=primer_ez
    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/c --config.model.spec=best_spec.json

Every key is documented in nasjax/config.py (``base_config``); the presets below only
change sizes and budgets, so the same file scales from a laptop CPU to a TPU slice.
"""

from nasjax.config import base_config

PRESETS = {
    # CPU, minutes: a 2-layer d64 byte-level decoder on Shakespeare.
    "tiny": dict(size="tiny", seq_len=128, batch_size=16, steps=600, lr=3e-3, warmup=50, eval_every=200),
    # One GPU, Primer's LM1B search size (d512, 6 layers), ~30M params.
    "small": dict(size="small", seq_len=256, batch_size=64, steps=20000, lr=1e-3, warmup=1000, eval_every=1000),
    # A TPU slice or a big GPU: T5-base widths.
    "base": dict(size="base", seq_len=512, batch_size=128, steps=100000, lr=6e-4, warmup=2000, eval_every=2000),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/train/lm.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    config = base_config()
    config.model.name = "vanilla"
    config.model.size = p["size"]
    config.data.seq_len = p["seq_len"]
    config.train.batch_size = p["batch_size"]
    config.train.steps = p["steps"]
    config.train.learning_rate = p["lr"]
    config.train.warmup_steps = p["warmup"]
    config.train.eval_every = p["eval_every"]
    config.train.checkpoint_every = p["eval_every"]
    return config
