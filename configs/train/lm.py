"""Language-model training (``nasjax train``): presets tiny / small / base.

    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/a
    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/b --config.model.name=primer_ez
    nasjax train --config=configs/train/lm.py:tiny --workdir=runs/c --config.model.spec=best_spec.json

Every key is documented in nasjax/config.py (``base_config``); the presets below only
change sizes and budgets, so the same file scales from a laptop CPU to a TPU slice.
"""

from nasjax.config import from_preset

PRESETS = {
    # CPU, minutes: a 2-layer d64 byte-level decoder on Shakespeare.
    "tiny": dict(size="tiny", seq_len=128, batch_size=16, steps=600, lr=3e-3, warmup=50, eval_every=200),
    # One GPU, Primer's LM1B search size (d512, 6 layers), ~30M params.
    "small": dict(size="small", seq_len=256, batch_size=64, steps=20000, lr=1e-3, warmup=1000, eval_every=1000),
    # A TPU slice or a big GPU: T5-base widths.
    "base": dict(size="base", seq_len=512, batch_size=128, steps=100000, lr=6e-4, warmup=2000, eval_every=2000),
}


def get_config(preset: str = "tiny"):
    return from_preset(PRESETS, preset, "configs/train/lm.py", "vanilla")
