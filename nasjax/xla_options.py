"""XLA compile options for the programs a trainer compiles piece by piece (``train.segmented_xla_options``).

A ``train.segmented`` search compiles hundreds of small programs (a candidate's layer
pieces, update programs), and on CPU their compile is a large share of the search. XLA:CPU
emits each fusion's kernel through its MLIR fusion emitters by default; its earlier
LLVM-IR emitters (``xla_cpu_use_fusion_emitters=false``) compile the same pieces ~25-30%
faster, and the pieces ran as fast: the default tiny Primer search, cold, compiled for 14
instead of 20 XLA seconds at the same training seconds (docs/benchmarks.md, stop 30). The
kernels' transcendental functions (exp, tanh, log) are approximated differently, so the
values differ by float rounding: the 60-evaluation search took the same hurdle decisions,
the 1,000-evaluation one 874 of 882 (a few candidates' short training is chaotic in the
rounding) and found the same best candidate.

The setting, a string:

* ``auto`` (the default): :data:`AUTO` for the backend's platform, where this XLA takes
  the options (a newer XLA that dropped one compiles with its defaults instead, and a
  warning says so once); on a GPU or TPU nothing. The update programs (the optimizer's
  step on chunks of same-size leaves, ~20 small kernels each) also get
  :data:`AUTO_UPDATES`: on CPU their code generated as two modules, compiled in parallel
  (``xla_cpu_parallel_codegen_split_count=2``), which compiles them ~24% faster than XLA's
  default split, with the same bits and run time (docs/benchmarks.md, stop 31; the layer
  pieces ran 6-12% slower under it, so they keep XLA's split);
* ``''``: XLA's defaults;
* ``name=value[,name=value...]``: these XLA debug options, applied on every backend
  (``true`` / ``false`` as booleans, any other value as its text, which XLA reads by the
  option's type); an option this XLA does not know is an error that names it.
"""

from __future__ import annotations

import threading
import warnings

__all__ = ["AUTO", "AUTO_UPDATES", "KEY", "parse", "check", "auto", "resolve", "accepted"]

KEY = "train.segmented_xla_options"
# What ``auto`` sets, per platform (jax's Device.platform).
AUTO = {"cpu": {"xla_cpu_use_fusion_emitters": False}}
# What ``auto`` adds for the update programs, per platform.
AUTO_UPDATES = {"cpu": {"xla_cpu_parallel_codegen_split_count": 2}}

# (platform, options as sorted items) -> '' if XLA compiles with them, else its error; only
# XLA's refusals (INVALID_ARGUMENT) are kept, another failure is asked again next time
_accepted: dict[tuple, str] = {}
_warned: set = set()
_lock = threading.Lock()


def _value(text: str):
    """An option's value: a boolean for true / false (XLA refuses the text for a bool
    option), else the text, which XLA parses by the option's type (int, float, string or
    enum): a number given to a string option stays what was written."""
    low = text.lower()
    return low == "true" if low in ("true", "false") else text


def parse(text: str, name: str = KEY) -> dict:
    """``name=value,...`` as a dict (ValueError naming ``name`` and the bad part)."""
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        option, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not option or not value or not option.replace("_", "").isalnum():
            raise ValueError(
                f"{name}={text!r}: expected 'auto', '' or comma-separated name=value XLA options, "
                f"e.g. 'xla_cpu_use_fusion_emitters=false'; cannot read {part!r}"
            )
        out[option] = _value(value)
    return out


def check(train_cfg, platform: str | None = None) -> str:
    """The setting, its syntax checked: ValueError naming it. With ``platform`` (where the
    trainer runs) and ``train.segmented`` on, also that this XLA takes the options there
    (:func:`resolve`; the options apply to segmented trainers only)."""
    value = train_cfg.get("segmented_xla_options", "auto")
    if not isinstance(value, str):
        raise ValueError(f"{KEY}={value!r}: expected a string ('auto', '' or name=value,...)")
    if value.strip() != "auto":
        parse(value)
    if platform is not None and train_cfg.get("segmented", False):
        resolve(train_cfg, platform)
    return value.strip()


def accepted(options: dict, platform: str | None = None) -> str:
    """'' if this XLA compiles a program for ``platform`` (None: the default backend) with
    ``options``, else its error (a refusal is remembered for the process)."""
    key = (platform, tuple(sorted(options.items())))
    with _lock:
        if key in _accepted:
            return _accepted[key]
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    device = jax.devices(platform)[0] if platform else jax.devices()[0]
    x = jax.ShapeDtypeStruct((), jnp.float32, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda v: v + 1).lower(x).compile(dict(options))
        error = ""
    except Exception as e:  # XlaRuntimeError: INVALID_ARGUMENT: No such compile option ...
        error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "INVALID_ARGUMENT" not in str(e):
            return error
    with _lock:
        _accepted[key] = error
    return error


def _warn_once(platform: str, options: dict, error: str, fallback: str) -> None:
    with _lock:
        if (platform, error, fallback) in _warned:
            return
        _warned.add((platform, error, fallback))
    warnings.warn(f"nasjax: {KEY}=auto: this XLA does not compile with {options} ({error}); {fallback}", stacklevel=3)


def auto(platform: str, updates: bool = False) -> dict:
    """What ``auto`` gives programs on ``platform``: :data:`AUTO` (``updates``: and
    :data:`AUTO_UPDATES`), less what this XLA refuses (one warning per fallback)."""
    base = AUTO.get(platform, {})
    error = accepted(base, platform) if base else ""
    if error:
        _warn_once(
            platform,
            base,
            error,
            "the segmented pieces compile with XLA's defaults (slower compiles, same results up to float rounding)",
        )
        base = {}
    extra = AUTO_UPDATES.get(platform, {}) if updates else {}
    if extra:
        options = {**base, **extra}
        error = accepted(options, platform)
        if not error:
            return options
        _warn_once(platform, options, error, "the update programs compile with the pieces' options (same results)")
    return dict(base)


def resolve(train_cfg, platform: str, updates: bool = False) -> dict:
    """The XLA options for a segmented trainer's programs on ``platform`` (ValueError naming
    the setting). ``updates``: for its update programs (``auto`` adds :data:`AUTO_UPDATES`;
    an explicit setting applies to every program alike)."""
    value = check(train_cfg)
    if value == "auto":
        return auto(platform, updates)
    options = parse(value)
    error = accepted(options, platform) if options else ""
    if error:
        raise ValueError(f"{KEY}={value!r}: this XLA does not compile with these options: {error}")
    return options
