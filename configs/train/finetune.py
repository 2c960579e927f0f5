"""Sentence classification fine-tuning (``nasjax finetune``) from JSONL files.

    nasjax finetune --config=configs/train/finetune.py:tiny --workdir=runs/ft \
        --config.data.path=../shared/data/classification/polarity_sentences.jsonl \
        --config.init_from=runs/teacher

``init_from`` (a training workdir) loads that run's encoder weights and model spec;
without it the model named by ``model.name``/``model.spec`` is trained from scratch.
"""

from nasjax.config import from_preset

PRESETS = {
    "tiny": dict(size="tiny", seq_len=64, batch_size=32, steps=400, lr=1e-3, warmup=40, eval_every=100),
    "small": dict(size="small", seq_len=128, batch_size=32, steps=3000, lr=5e-5, warmup=300, eval_every=500),
    "base": dict(size="base", seq_len=128, batch_size=32, steps=6000, lr=2e-5, warmup=600, eval_every=1000),
}


def get_config(preset: str = "tiny"):
    return from_preset(
        PRESETS, preset, "configs/train/finetune.py", "bert", finetune=True, schedule="linear", weight_decay=0.01
    )
