"""Measured inference latency and peak memory of a spec (LTS's hardware objectives).

LiteTransformerSearch (methods.md §3(b), §5.4) ranks candidates by non-embedding
parameters against *measured* cost on the device the search runs on: the latency of
one forward pass at batch 1 (seq_len 192 in the paper; configurable here) and the peak
memory of that forward. :func:`measure_hardware` does this for a JAX model:

* the parameters are filled host-side with seeded noise of standard deviation 0.02
  (uniform; latency and memory do not depend on the values, so no init program is
  compiled) and the input is an
  int32 zeros batch ``[batch, seq_len]``, as in LTS;
* the forward ``jit(lambda p, x: model.apply({"params": p}, x))`` is lowered and
  compiled ahead of time; the compile time is recorded apart
  (``compile_seconds``) and never enters the latency;
* ``warmup`` untimed calls, then ``repeats`` timed calls, each ended by
  ``block_until_ready`` (JAX dispatch is asynchronous) and timed with
  ``time.perf_counter``; the latency objective is the **median** (robust to the odd
  scheduler hiccup), with the mean and the population standard deviation alongside;
* ``peak_memory_bytes`` is XLA's memory analysis of the compiled forward:
  arguments + outputs + temporaries - aliased buffers, i.e. what one device must hold
  while the forward runs. It is static, deterministic and available on CPU, so it is
  the portable peak-memory objective (it plays the role of LTS's profiler sum of
  positive allocations);
* ``device_peak_bytes`` adds the allocator's own view where the backend reports one
  (GPU/TPU ``Device.memory_stats()``; CPU reports nothing, so it is None there): the
  high-water mark reached during this measurement above the bytes in use before the
  parameters were created. The allocator's ``peak_bytes_in_use`` is a process-wide
  high-water mark that cannot be reset, so when an earlier, larger program already
  set it (the peak did not rise during this measurement) the footprint of this model
  is not observable and the field is None as well;
* ``flops`` is XLA's cost analysis of the same compiled forward, when reported.

What runs (``programs``):

* ``model``: the forward above, one program per architecture. Every architecture
  compiles its own, and on a CPU at batch 1 that compile (~0.4 s for the CPU space)
  costs several times the timed runs (~0.06 s).
* ``sublayers``: the same forward as a chain of programs, one per piece of
  :class:`nasjax.models.transformer.Segments`: the embedding, each layer's attention
  sub-layer and FFN sub-layer (norm and residual included) and the head. A piece is
  compiled once per process for what it computes (its spec, the model-wide settings,
  the shapes) and kept in a bounded registry (:func:`set_max_pieces`), so
  architectures share them: a heterogeneous space of m attention and f FFN choices has
  m * f distinct layers but only m + f sub-layers, and after the first few dozen
  architectures a search compiles almost nothing. Latency is the time of the whole
  chain, dispatched back to back and ended by one ``block_until_ready``; XLA does not
  fuse across piece boundaries, which costs little at sub-layer granularity (the
  boundaries are residual adds). This is also closer to what LTS measured: PyTorch
  eager runs one kernel per op, with no fusion at all. Peak memory is what the chain
  holds: the weights and the input, and at the worst piece its input activation, its
  outputs and its temporaries (each piece's XLA memory analysis).
* ``layers``: the same, with whole layers as pieces.

Both ``sublayers`` and ``layers`` time real executions of the architecture's own
operations on the target device; ``benchmarks/lts_programs.py`` measures how their
latencies and memories rank architectures against ``model`` (docs/benchmarks.md).

Latencies depend on everything else the machine does: compare only measurements taken
on the same device under the same load (LTS uses one inference thread).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nasjax.measure.probe import check_int as _check_int
from nasjax.program_cache import ProgramCache
from nasjax.spec import ModelSpec

__all__ = [
    "HardwareMeasurement",
    "measure_hardware",
    "compiled_memory_bytes",
    "device_peak_delta",
    "PROGRAMS",
    "clear_pieces",
    "set_max_pieces",
]

# What one measurement compiles and runs (module docstring).
PROGRAMS = ("model", "sublayers", "layers")
# Compiled pieces kept per process (least recently used dropped first). A small CPU
# program holds ~1-3 MiB of host memory; the CPU space has ~130 distinct sub-layer
# pieces, the paper's GPT-2 space ~600.
DEFAULT_MAX_PIECES = 256
_PIECES = ProgramCache({"all": DEFAULT_MAX_PIECES})


@dataclasses.dataclass(frozen=True)
class HardwareMeasurement:
    """Outcome of :func:`measure_hardware`.

    Attributes:
      latency_s: median latency of one forward at batch ``batch`` (seconds).
      latency_mean_s, latency_std_s: mean and population standard deviation of the
        timed runs (seconds).
      repeats: number of timed runs.
      compile_seconds: lower + compile of the forward (measured apart from the runs).
      peak_memory_bytes: XLA memory analysis of the compiled forward: arguments +
        outputs + temporaries - aliased (what one device holds); 0 if the backend has
        no memory analysis.
      device_peak_bytes: allocator high-water mark of this measurement above the bytes
        in use before it (GPU/TPU), None where the device reports no statistics or an
        earlier, larger program masks this one (see the module docstring).
      flops: XLA's FLOP count of the compiled forward, None if not reported.
      backend: device platform and kind, e.g. ``"cpu (cpu)"`` or ``"gpu (NVIDIA H100)"``.
      activation_memory_bytes: the same analysis without the arguments (the weights and
        the input): outputs + temporaries - aliased, the memory the forward allocates
        on top of the resident weights (what LTS's PyTorch profiler counts).
      programs: what ran (:data:`PROGRAMS`): ``model``, ``sublayers`` or ``layers``.
      pieces: programs in the chain (1 for ``model``).
      compiled_pieces: how many of them this measurement compiled (the others were
        compiled by an earlier measurement of this process).
    """

    latency_s: float
    latency_mean_s: float
    latency_std_s: float
    repeats: int
    compile_seconds: float
    peak_memory_bytes: int
    device_peak_bytes: int | None
    flops: float | None
    backend: str
    activation_memory_bytes: int = 0
    programs: str = "model"
    pieces: int = 1
    compiled_pieces: int = 1

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


def compiled_memory_bytes(compiled) -> dict:
    """XLA's memory analysis of a compiled program (bytes per device), {} if unknown.

    Returns ``{"arguments", "outputs", "temporaries", "aliased", "peak"}`` with
    ``peak = arguments + outputs + temporaries - aliased`` (the convention of
    ``Trainer.memory_bytes``).
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # backends without a memory analysis
        return {}
    if m is None:
        return {}
    if isinstance(m, (list, tuple)):  # one entry per device program in some versions
        if not m:
            return {}
        m = m[0]
    get = lambda name: int(getattr(m, name, 0) or 0)
    out = {
        "arguments": get("argument_size_in_bytes"),
        "outputs": get("output_size_in_bytes"),
        "temporaries": get("temp_size_in_bytes"),
        "aliased": get("alias_size_in_bytes"),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def _compiled_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # backends without a cost analysis
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops >= 0 else None


def _memory_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented on this backend
        return None
    return stats or None


def device_peak_delta(before: dict | None, after: dict | None) -> int | None:
    """Allocator high-water mark reached between two ``Device.memory_stats()`` snapshots.

    ``after["peak_bytes_in_use"] - before["bytes_in_use"]`` when the process-wide peak
    rose in between (so the new peak was reached in the window); None when either
    snapshot is missing (CPU) or lacks the keys, or the peak did not rise (an earlier,
    larger program set it, and this window's footprint is not observable).
    """
    if not before or not after:
        return None
    in_use = before.get("bytes_in_use")
    peak0, peak1 = before.get("peak_bytes_in_use"), after.get("peak_bytes_in_use")
    if in_use is None or peak0 is None or peak1 is None or peak1 <= peak0:
        return None
    return int(peak1 - in_use)


def _host_params(spec: ModelSpec, seed: int, device):
    """Parameters of the model's shapes, filled host-side with noise of standard deviation 0.02.

    Latency and memory do not depend on the values, so no init program is compiled
    (it was ~0.3-0.6 s of every LTS measurement on CPU, more than the timed runs). The
    shapes are :func:`nasjax.measure.params.param_tree_shapes`', cached per spec, so
    an LTS measurement traces the model's init once for its parameter counts and this.
    """
    from nasjax.measure.params import param_tree_shapes

    rng = np.random.default_rng(seed)
    half_width = np.float32(0.02 * 3**0.5)  # uniform on [-w, w] has standard deviation w / sqrt(3)

    def fill(shape):  # parameters are float32 (nasjax.models.transformer)
        # uniform noise of standard deviation 0.02: 3x faster to draw than normal noise
        value = rng.random(shape, dtype=np.float32)
        value -= np.float32(0.5)
        value *= np.float32(2.0) * half_width
        return jax.device_put(value, device)

    return jax.tree.map(fill, param_tree_shapes(spec), is_leaf=lambda x: isinstance(x, tuple))


def clear_pieces() -> None:
    """Drops every compiled piece of :func:`measure_hardware` (``programs`` other than ``model``)."""
    _PIECES.clear()


def set_max_pieces(n: int) -> None:
    """Bounds the compiled pieces kept per process (``lts.max_pieces``); oldest dropped first."""
    _PIECES.set_limit("all", _check_int(n, "max_pieces", 1))


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _layout(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


@dataclasses.dataclass
class _Forward:
    """A compiled forward, as one program or a chain of pieces, ready to time."""

    run: Any  # () -> the logits (dispatched, not waited for)
    compile_seconds: float
    peak_bytes: int  # what one device holds while it runs (weights and input included)
    activation_bytes: int  # the same without the weights and the input
    flops: float | None
    pieces: int
    compiled: int


def _whole_model(model, params, tokens) -> _Forward:
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    t0 = time.perf_counter()
    compiled = forward.lower(params, tokens).compile()
    seconds = time.perf_counter() - t0
    memory = compiled_memory_bytes(compiled)
    peak = int(memory.get("peak", 0))
    return _Forward(
        run=lambda: compiled(params, tokens),
        compile_seconds=seconds,
        peak_bytes=peak,
        activation_bytes=max(peak - memory.get("arguments", 0), 0),
        flops=_compiled_flops(compiled),
        pieces=1,
        compiled=1,
    )


def _full_key(key: tuple, p, x, where: tuple) -> tuple:
    """A piece's registry key: what it computes (``key``), its parameters' and input's
    layouts, and the device; measurements and :func:`precompile_pieces` both use it."""
    return (*key, _layout(p), _layout(x), where)


def _piece(key: tuple, fn, *args) -> tuple[Any, float]:
    """The compiled piece under ``key`` (compiled from ``fn`` and ``args`` on a miss), and
    the seconds this call spent compiling it (0 on a hit)."""
    return _PIECES.get(key, lambda: jax.jit(fn).lower(*args).compile())


def _chain_plan(spec: ModelSpec, params, unit: str) -> list[tuple[tuple, Any, Any]]:
    """The forward's pieces in execution order: (key, function, parameter subtree).

    ``params``: arrays or ShapeDtypeStructs; ``unit``: ``sublayers`` or ``layers``."""
    from nasjax.models.transformer import Segments

    spec = spec.replace(dropout_rate=0.0, attention_dropout_rate=0.0)  # inference: dropout is off anyway
    problem = Segments.unsupported(spec)
    if problem:
        raise ValueError(f"programs={unit!r} cuts the forward into pieces, which this model does not allow: {problem}")
    seg = Segments(spec)
    template = seg.template_key()
    plan = [(("embed", template), seg.embed, params["embed"])]
    for i in range(seg.n_layers):
        layer_params = seg.layer_params(params, i)
        if unit == "layers":
            plan.append((("layer", seg.layer_key(i)), lambda p, x, i=i: seg.layer(i, p, x), layer_params))
            continue
        for part in seg.sublayer_parts(i):
            fn = lambda p, x, i=i, part=part: seg.sublayer(i, part, p, x)  # noqa: E731
            plan.append((("sublayer", seg.sublayer_key(i, part)), fn, seg.sublayer_params(layer_params, part)))
    plan.append((("logits", template), seg.logits, seg.head_params(params)))
    return plan


# A piece's output (shape, dtype) by its full key, for precompile_pieces (traced once per
# key; cleared beyond _MAX_OUT_SHAPES entries).
_OUT_SHAPES: dict = {}
_OUT_SHAPES_LOCK = threading.Lock()
_MAX_OUT_SHAPES = 4096


def _piece_output(full_key: tuple, fn, p, x, sharding):
    """The abstract output of the piece under ``full_key`` (as the compiled piece gives it)."""
    with _OUT_SHAPES_LOCK:
        out = _OUT_SHAPES.get(full_key)
    if out is None:
        out = jax.eval_shape(fn, p, x)
        with _OUT_SHAPES_LOCK:
            if len(_OUT_SHAPES) >= _MAX_OUT_SHAPES:
                _OUT_SHAPES.clear()
            _OUT_SHAPES[full_key] = out
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)


def precompile_pieces(
    specs: list[ModelSpec],
    seq_len: int,
    batch: int = 1,
    device=None,
    programs: str = "sublayers",
    threads: int = 2,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Compiles, ``threads`` at a time, the pieces that measuring ``specs`` would compile.

    Population-level compiling (issue 8): an LTS iteration knows its whole population
    before it measures any of it. The pieces its architectures lack (the same keys
    :func:`measure_hardware` would compile, from the parameters' shapes alone) are
    compiled here on a thread pool, while nothing is being timed; the measurements that
    follow find them in the registry. On a 2-core CPU two threads cut the compiles' wall
    time by about a third for LTS's small pieces (docs/benchmarks.md, stop 27); where
    cores are many, more. The pieces the population needs that the registry already holds
    become its most recently used, and new pieces are compiled, in the population's order,
    only while they and those fit the registry's bound (``lts.max_pieces``): compiling
    ahead evicts nothing the population uses. A population that needs more pieces than
    the bound compiles the rest when measured, as before.

    ``programs="model"`` (no shared pieces) or ``threads`` < 2: nothing is done.
    A spec that cannot be cut into pieces is skipped (its measurement reports it).
    ``should_stop``: once it returns True, the pieces not yet started are skipped.

    Returns {"pieces": how many were compiled, "seconds": the compiles' wall time,
    "xla_seconds": JAX's compile events summed over the threads (:mod:`nasjax.compile_meter`; above the wall
    time when threads share cores), "plan_seconds": finding the missing pieces (the
    parameters' shapes, which the measurements then find cached, and each new piece's
    output shape)}.
    """
    from concurrent.futures import ThreadPoolExecutor

    from nasjax import compile_meter
    from nasjax.measure.params import param_tree_shapes

    if programs not in PROGRAMS:
        raise ValueError(f"programs must be one of {', '.join(map(repr, PROGRAMS))}, got {programs!r}")
    threads = _check_int(threads, "threads", 1)
    out = {"pieces": 0, "seconds": 0.0, "xla_seconds": 0.0, "plan_seconds": 0.0}
    if programs == "model" or threads < 2 or not specs:
        return out
    t0 = time.perf_counter()
    device = jax.devices()[0] if device is None else device
    sharding = jax.sharding.SingleDeviceSharding(device)
    where = (device.platform, device.id)
    needed: dict[tuple, tuple] = {}  # the population's pieces, in the order it uses them
    for spec in specs:
        try:
            shapes = param_tree_shapes(spec)
            params = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding),
                shapes,
                is_leaf=lambda v: isinstance(v, tuple),
            )
            x = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding)
            for key, fn, p in _chain_plan(spec, params, programs):
                full_key = _full_key(key, p, x, where)
                needed.setdefault(full_key, (fn, p, x))
                x = _piece_output(full_key, fn, p, x, sharding)
        except Exception:  # noqa: BLE001 - not measurable as pieces: its measurement says why
            continue
    # those held become the most recently used; new ones only while both fit the bound
    present = {k for k in needed if _PIECES.touch(k)}
    room = max(0, _PIECES.limits["all"] - len(present))
    todo = dict([(k, v) for k, v in needed.items() if k not in present][:room])
    out["plan_seconds"] = time.perf_counter() - t0
    if not todo:
        return out
    compile_meter.install()
    t0 = time.perf_counter()

    def build(item) -> float | None:  # JAX's compile seconds; None when skipped after a stop
        full_key, (fn, p, x) = item
        if should_stop is not None and should_stop():
            return None
        before = compile_meter.thread_seconds()
        try:
            _piece(full_key, fn, p, x)
        except Exception:  # noqa: BLE001 - the measurement compiles it again and reports the error
            pass
        return compile_meter.thread_seconds() - before

    with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="nasjax-lts-compile") as pool:
        xla = [s for s in pool.map(build, todo.items()) if s is not None]
    out.update(pieces=len(xla), seconds=time.perf_counter() - t0, xla_seconds=float(sum(xla)))
    return out


def _piece_chain(spec: ModelSpec, params, tokens, device, unit: str) -> _Forward:
    """The forward as a chain of pieces shared across architectures (module docstring).

    ``unit``: ``sublayers`` (attention and FFN sub-layers) or ``layers``.
    """
    sharding = jax.sharding.SingleDeviceSharding(device)
    where = (device.platform, device.id)
    steps, seconds, compiled, analyses = [], 0.0, 0, []
    x = tokens
    for k, (key, fn, p) in enumerate(_chain_plan(spec, params, unit)):
        full_key = _full_key(key, p, x, where)
        program, dt = _piece(full_key, fn, p, x)
        seconds += dt
        compiled += dt > 0
        steps.append((program, p))
        analyses.append((compiled_memory_bytes(program), _nbytes(p), 0 if k == 0 else _nbytes(x)))
        info = program.out_info
        x = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)

    def run():
        h = tokens
        for program, p in steps:
            h = program(p, h)
        return h

    # While piece k runs, the device holds every weight and the token ids, and on top of
    # them piece k's input activation (the tokens for the embedding), outputs and temporaries.
    activation = 0
    if all(a for a, _, _ in analyses):
        activation = max(x_bytes + a["outputs"] + a["temporaries"] - a["aliased"] for a, _, x_bytes in analyses)
    peak = _nbytes(params) + _nbytes(tokens) + activation if activation else 0
    flops = [_compiled_flops(program) for program, _ in steps]
    return _Forward(
        run=run,
        compile_seconds=seconds,
        peak_bytes=int(peak),
        activation_bytes=int(activation),
        flops=None if any(f is None for f in flops) else float(sum(flops)),
        pieces=len(steps),
        compiled=int(compiled),
    )


def measure_hardware(
    spec: ModelSpec,
    seq_len: int,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    device=None,
    programs: str = "model",
) -> HardwareMeasurement:
    """Measures the inference latency and peak memory of ``spec`` (module docstring).

    Args:
      spec: the architecture.
      seq_len: input length (LTS: 192); at most ``spec.max_len`` with learned positions.
      batch: input batch (LTS: 1).
      repeats: timed runs (>= 1; LTS: 10).
      warmup: untimed runs before the timed ones (>= 0).
      seed: parameter initialisation seed (latency does not depend on the values).
      device: a ``jax.Device``; None = the default device.
      programs: ``model`` (one compiled forward), ``sublayers`` or ``layers`` (a chain
        of compiled pieces shared across architectures; module docstring).

    Returns:
      A :class:`HardwareMeasurement`.

    Raises:
      ValueError: invalid arguments (or a model that ``programs`` cannot cut into pieces).
    """
    from nasjax.models.transformer import build  # local, like measure.flops

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"measure_hardware() needs a ModelSpec, got {type(spec).__name__}")
    seq_len = _check_int(seq_len, "seq_len", 1)
    batch = _check_int(batch, "batch", 1)
    repeats = _check_int(repeats, "repeats", 1)
    warmup = _check_int(warmup, "warmup", 0)
    seed = _check_int(seed, "seed", 0)
    if programs not in PROGRAMS:
        raise ValueError(f"programs must be one of {', '.join(map(repr, PROGRAMS))}, got {programs!r}")
    if spec.positions == "learned" and seq_len > spec.max_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_len={spec.max_len} of the learned position table")
    device = jax.devices()[0] if device is None else device
    if not isinstance(device, jax.Device):
        raise ValueError(f"device must be a jax.Device or None, got {device!r}")

    model = build(spec)
    stats_before = _memory_stats(device)
    with jax.default_device(device):
        tokens = jax.device_put(jnp.zeros((batch, seq_len), jnp.int32), device)
        params = jax.block_until_ready(_host_params(spec, seed, device))
        if programs == "model":
            forward = _whole_model(model, params, tokens)
        else:
            forward = _piece_chain(spec, params, tokens, device, programs)

        for _ in range(warmup):
            jax.block_until_ready(forward.run())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(forward.run())
            times.append(time.perf_counter() - t0)
    stats_after = _memory_stats(device)

    return HardwareMeasurement(
        latency_s=float(statistics.median(times)),
        latency_mean_s=float(statistics.fmean(times)),
        latency_std_s=float(statistics.pstdev(times)),
        repeats=repeats,
        compile_seconds=float(forward.compile_seconds),
        peak_memory_bytes=forward.peak_bytes,
        activation_memory_bytes=forward.activation_bytes,
        device_peak_bytes=device_peak_delta(stats_before, stats_after),
        flops=forward.flops,
        backend=f"{device.platform} ({device.device_kind})",
        programs=programs,
        pieces=forward.pieces,
        compiled_pieces=forward.compiled,
    )
