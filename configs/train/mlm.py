"""Encoder MLM pre-training (``nasjax train``), e.g. a BERT teacher on Shakespeare + Austen.

    nasjax train --config=configs/train/mlm.py:tiny --workdir=runs/teacher \
        --config.data.path=/path/to/texts

The objective follows the model kind: encoders get 15% masking (80/10/10).
"""

from nasjax.config import base_config

PRESETS = {
    "tiny": dict(size="tiny", seq_len=128, batch_size=16, steps=600, lr=1e-3, warmup=50, eval_every=200),
    "small": dict(size="small", seq_len=128, batch_size=128, steps=50000, lr=5e-4, warmup=2000, eval_every=2000),
    "base": dict(size="base", seq_len=128, batch_size=256, steps=200000, lr=1e-4, warmup=10000, eval_every=5000),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/train/mlm.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    config = base_config()
    config.model.name = "bert"
    config.model.size = p["size"]
    config.data.seq_len = p["seq_len"]
    config.train.batch_size = p["batch_size"]
    config.train.steps = p["steps"]
    config.train.learning_rate = p["lr"]
    config.train.warmup_steps = p["warmup"]
    config.train.schedule = "linear"
    config.train.weight_decay = 0.01
    config.train.eval_every = p["eval_every"]
    config.train.checkpoint_every = p["eval_every"]
    return config
