"""Sentence classification fine-tuning (``nasjax finetune``) from JSONL files.

    nasjax finetune --config=configs/train/finetune.py:tiny --workdir=runs/ft \
        --config.data.path=../shared/data/classification/polarity_sentences.jsonl \
        --config.init_from=runs/teacher

``init_from`` (a training workdir) loads that run's encoder weights and model spec;
without it the model named by ``model.name``/``model.spec`` is trained from scratch.
"""

from nasjax.config import base_config

PRESETS = {
    "tiny": dict(size="tiny", seq_len=64, batch_size=32, steps=400, lr=1e-3, warmup=40, eval_every=100),
    "small": dict(size="small", seq_len=128, batch_size=32, steps=3000, lr=5e-5, warmup=300, eval_every=500),
    "base": dict(size="base", seq_len=128, batch_size=32, steps=6000, lr=2e-5, warmup=600, eval_every=1000),
}


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/train/finetune.py; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    config = base_config(finetune=True)
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
