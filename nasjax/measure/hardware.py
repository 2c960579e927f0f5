"""Measured inference latency and peak memory of a spec (LTS's hardware objectives).

LiteTransformerSearch (methods.md §3(b), §5.4) ranks candidates by non-embedding
parameters against *measured* cost on the device the search runs on: the latency of
one forward pass at batch 1 (seq_len 192 in the paper; configurable here) and the peak
memory of that forward. :func:`measure_hardware` does this for a JAX model:

* the parameters are filled host-side with seeded N(0, 0.02) noise (latency and memory
  do not depend on the values, so no init program is compiled) and the input is an
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

Latencies depend on everything else the machine does: compare only measurements taken
on the same device under the same load (LTS uses one inference thread).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nasjax.measure.probe import check_int as _check_int
from nasjax.spec import ModelSpec

__all__ = ["HardwareMeasurement", "measure_hardware", "compiled_memory_bytes", "device_peak_delta"]


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


def _host_params(model, tokens, seed: int, device):
    """Parameters of the model's shapes, filled host-side with N(0, 0.02) noise.

    Latency and memory do not depend on the values, so no init program is compiled
    (it was ~0.3-0.6 s of every LTS measurement on CPU, more than the timed runs).
    """
    shapes = jax.eval_shape(lambda k, t: nn.unbox(model.init({"params": k}, t)["params"]), jax.random.key(0), tokens)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            value = rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(0.02)
        else:
            value = np.zeros(leaf.shape)
        return jax.device_put(value.astype(leaf.dtype), device)

    return jax.tree.map(fill, shapes)


def measure_hardware(
    spec: ModelSpec,
    seq_len: int,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    device=None,
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

    Returns:
      A :class:`HardwareMeasurement`.

    Raises:
      ValueError: invalid arguments.
    """
    from nasjax.models.transformer import build  # local, like measure.flops

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"measure_hardware() needs a ModelSpec, got {type(spec).__name__}")
    seq_len = _check_int(seq_len, "seq_len", 1)
    batch = _check_int(batch, "batch", 1)
    repeats = _check_int(repeats, "repeats", 1)
    warmup = _check_int(warmup, "warmup", 0)
    seed = _check_int(seed, "seed", 0)
    if spec.positions == "learned" and seq_len > spec.max_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_len={spec.max_len} of the learned position table")
    device = jax.devices()[0] if device is None else device
    if not isinstance(device, jax.Device):
        raise ValueError(f"device must be a jax.Device or None, got {device!r}")

    model = build(spec)
    stats_before = _memory_stats(device)
    with jax.default_device(device):
        tokens = jax.device_put(jnp.zeros((batch, seq_len), jnp.int32), device)
        params = jax.block_until_ready(_host_params(model, tokens, seed, device))

        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        t0 = time.perf_counter()
        compiled = forward.lower(params, tokens).compile()
        compile_seconds = time.perf_counter() - t0

        for _ in range(warmup):
            jax.block_until_ready(compiled(params, tokens))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens))
            times.append(time.perf_counter() - t0)
    stats_after = _memory_stats(device)
    memory = compiled_memory_bytes(compiled)

    return HardwareMeasurement(
        latency_s=float(statistics.median(times)),
        latency_mean_s=float(statistics.fmean(times)),
        latency_std_s=float(statistics.pstdev(times)),
        repeats=repeats,
        compile_seconds=float(compile_seconds),
        peak_memory_bytes=int(memory.get("peak", 0)),
        activation_memory_bytes=int(max(memory.get("peak", 0) - memory.get("arguments", 0), 0)),
        device_peak_bytes=device_peak_delta(stats_before, stats_after),
        flops=_compiled_flops(compiled),
        backend=f"{device.platform} ({device.device_kind})",
    )
