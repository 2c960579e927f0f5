"""What ``nasjax describe`` describes: a zoo name, a spec JSON, a config, or a run's workdir."""

from __future__ import annotations

import os

from nasjax.models import ZOO_NAMES, get_spec
from nasjax.spec import ModelSpec, SpecError, load_spec


def resolve_describe_spec(target: str = "", config=None, workdir: str | None = None, size: str = "tiny") -> ModelSpec:
    """The spec named by the describe arguments (first match wins: workdir, target, config).

    Args:
      target: a zoo name (``bert``) or a path to a spec JSON.
      config: a loaded ConfigDict (``--config=FILE[:preset]``), sized to its tokenizer.
      workdir: a training workdir (its ``spec.json``).
      size: zoo size for a bare zoo name.
    """
    if workdir:
        path = os.path.join(workdir, "spec.json")
        if not os.path.exists(path):
            raise SpecError(f"{workdir} has no spec.json; is it a nasjax training workdir?")
        return load_spec(path)
    if target:
        if target.endswith(".json") or os.path.exists(target):
            return load_spec(target)
        if target not in ZOO_NAMES:
            raise SpecError(f"{target!r} is neither a spec JSON file nor a zoo model ({', '.join(ZOO_NAMES)})")
        return get_spec(target, size)
    if config is not None:
        from nasjax.train.run import resolve_spec

        vocab = 262 if config.data.tokenizer == "byte" else int(config.data.vocab_size)
        return resolve_spec(config, vocab, config.data.seq_len)
    raise SpecError("nothing to describe: give a zoo name, a spec JSON, --config=... or --workdir=...")


def describe_target(target: str, config, workdir: str | None, size: str, seq_len: int = 0, xla: bool = False) -> str:
    """The full ``nasjax describe`` text."""
    from nasjax.measure.flops import xla_flops
    from nasjax.measure.report import describe

    spec = resolve_describe_spec(target, config, workdir, size)
    if not seq_len:
        seq_len = config.data.seq_len if config is not None and not target and not workdir else min(spec.max_len, 512)
    text = describe(spec, seq_len)
    if xla:
        per_token = xla_flops(spec, 1, seq_len) / seq_len
        text += f"\nXLA cost analysis, forward FLOPs per token (seq {seq_len}): {per_token:,.0f}"
    return text
