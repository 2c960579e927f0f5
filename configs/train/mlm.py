"""Encoder MLM pre-training (``nasjax train``), e.g. a BERT teacher on Shakespeare + Austen.

    nasjax train --config=configs/train/mlm.py:tiny --workdir=runs/teacher \
        --config.data.path=/path/to/texts

The objective follows the model kind: encoders get 15% masking (80/10/10).
"""

from nasjax.config import from_preset

PRESETS = {
    "tiny": dict(size="tiny", seq_len=128, batch_size=16, steps=600, lr=1e-3, warmup=50, eval_every=200),
    "small": dict(size="small", seq_len=128, batch_size=128, steps=50000, lr=5e-4, warmup=2000, eval_every=2000),
    "base": dict(size="base", seq_len=128, batch_size=256, steps=200000, lr=1e-4, warmup=10000, eval_every=5000),
}


def get_config(preset: str = "tiny"):
    return from_preset(PRESETS, preset, "configs/train/mlm.py", "bert", schedule="linear", weight_decay=0.01)
