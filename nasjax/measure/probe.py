"""Cheap checks of a candidate before any training: causality, finiteness, output hash.

Legend: B batch, L length, D model width, V vocabulary, T probed positions.

:func:`probe_model` builds the spec (through :func:`nasjax.models.build`, the one spec
interpreter), initialises it with a fixed key, and in one jitted call computes

* the logits on a fixed probe batch: their finiteness, and the *functional-equivalence*
  hashes (AutoML-Zero's FEC): the last position's logits of each probe sequence,
  projected on 32 fixed random directions and rounded to 3 significant digits (relative
  to the largest), on two grids offset by half a step. Two programs that compute the
  same function share at least one hash even when their compiled programs round
  differently (a value near a step boundary of one grid is far from the other's), so
  the search can reuse a recorded fitness instead of training again;
* for decoders, at a few positions t, the directional derivative (forward mode) of all
  logits along random noise added to the input embeddings of the positions s > t (the
  ``perturbations`` hook of the model): any change of an output at a position <= t is a
  causal leak. The leak is reported relative to the largest change at positions > t.

With ``train.segmented`` a search probes on the candidate's train-step programs instead
(``search.probe=steps``): :func:`probe_from_forward` (two forwards, the second with the
future of each row changed; what the search runs) and :func:`probe_from_steps` (one
forward and backward, causality from the loss gradient; kept for comparison,
``benchmarks/probe_agreement.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator

import jax
import jax.numpy as jnp
import numpy as np

from nasjax.models import build
from nasjax.spec import ModelSpec

__all__ = [
    "ProbeResult",
    "probe_tokens",
    "probe_model",
    "step_probe_batch",
    "probe_from_steps",
    "future_changed",
    "probe_from_forward",
    "logits_finite",
    "LEAK_TOLERANCE",
    "FAST_COMPILE",
    "compile_for_one_run",
]

# XLA options for programs that run once (probes, zero-cost proxies): skip backend (LLVM)
# optimisation, which on CPU is about half the compile time and buys nothing for one run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else a ValueError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def compile_for_one_run(lowered, fast: bool = True):
    """``lowered.compile()``, with :data:`FAST_COMPILE` if asked and the backend accepts it."""
    if fast:
        try:
            return lowered.compile(FAST_COMPILE)
        except Exception:  # a backend that rejects the option: compile normally
            pass
    return lowered.compile()


# Relative gradient above which an output is said to depend on a future input. Causal
# ops give exact zeros; float32 round-off never reaches this.
LEAK_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`probe_model`.

    Attributes:
      finite: all probe logits are finite.
      causal_leak: max |d out_s'| over s' <= t for a tangent on the inputs at s > t,
        relative to the max over s' > t (0.0 for a causal model; None for encoders,
        which are not checked).
      output_hash, output_hash_alt: the two functional-equivalence hashes (None if not
        finite).
      seconds: wall time of the probe (trace, compile and run).
    """

    finite: bool
    causal_leak: float | None
    output_hash: str | None
    seconds: float
    output_hash_alt: str | None = None
    # probe_from_steps: the reverse-mode gradients were not finite (0 * inf where a
    # derivative is infinite, e.g. sqrt at 0), so they cannot show causality either way;
    # probe_from_forward: the outputs of the changed batch were not finite
    causality_undecided: bool = False

    @property
    def causal(self) -> bool:
        return self.causal_leak is None or self.causal_leak <= LEAK_TOLERANCE


def probe_tokens(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """A fixed int32 [B, L] probe batch (the same for every candidate of a search)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int32)


def _positions(seq_len: int) -> tuple[int, ...]:
    return tuple(sorted({0, seq_len // 3, seq_len // 2, max(seq_len - 2, 0)}))


def probe_model(
    spec: ModelSpec,
    seq_len: int,
    batch: int = 2,
    seed: int = 0,
    digits: int = 3,
    remember: bool = False,
    op_by_op: bool = False,
) -> ProbeResult:
    """Runs the checks of the module docstring on ``spec`` (CPU or default device).

    The model is initialised as the trainer initialises it (seed ``seed``, sequence
    ``seq_len``); ``remember=True`` keeps those parameters for a Trainer of the same
    spec, seed, sequence length and ``op_by_op`` setting in this process (a search's
    next step).

    ``op_by_op``: run the init and the checks without jit, op by op, so that no program
    is compiled for this model; the per-op programs are compiled once per process and
    shared by every later candidate (``search.op_by_op``). Otherwise the init and the
    checks are each one program compiled without backend optimisation. The verdicts are
    the same; logits (and so the output hashes) may differ in the last bits.

    Raises whatever tracing raises (shape errors of a malformed program): callers record
    it as a failed candidate.
    """
    import time

    t0 = time.perf_counter()
    model = build(spec)
    tokens = jnp.asarray(probe_tokens(spec.vocab_size, batch, seq_len, seed))
    positions = jnp.asarray(_positions(seq_len))
    check_causality = spec.causal

    # The training init (same program, same seed): the trainer of this candidate in this
    # process takes these parameters instead of compiling and running its own init.
    from nasjax.train.state import initial_params, remember_initial_params

    init_params = initial_params(model, seed, seq_len, op_by_op=op_by_op)
    if remember:
        remember_initial_params((spec, seed, seq_len, bool(op_by_op)), init_params)

    def run(params):
        pert = jnp.zeros((batch, seq_len, spec.d_model), jnp.float32)
        logits = model.apply({"params": params, "perturbations": {"embeddings": pert}}, tokens)
        if not check_causality:
            return logits, jnp.zeros((0,))
        # Forward mode: one directional derivative per probed position t, along random
        # noise on the input embeddings of the positions after t. A causal model's output
        # tangents at positions <= t are exact zeros (masked or untouched paths multiply
        # by 0). Forward mode costs a third of the compile of the reverse-mode check it
        # replaced (``benchmarks/candidate_overhead.py``).
        noise_BxLxD = jax.random.normal(jax.random.key(seed + 1), pert.shape, jnp.float32)
        future_TxL = jnp.arange(seq_len)[None, :] > positions[:, None]
        tangents_TxBxLxD = noise_BxLxD[None] * future_TxL[:, None, :, None]

        def forward(p):
            return model.apply({"params": params, "perturbations": {"embeddings": p}}, tokens)

        def tangent_out(tangent):
            return jax.jvp(forward, (pert,), (tangent,))[1]

        mag_TxL = jnp.max(jnp.abs(jax.vmap(tangent_out)(tangents_TxBxLxD)), axis=(1, 3))
        leak = jnp.max(jnp.where(future_TxL, 0.0, mag_TxL))
        scale = jnp.max(jnp.where(future_TxL, mag_TxL, 0.0))
        return logits, jnp.stack([leak, scale])

    # The probe runs once per candidate: compiling it without backend optimisation costs
    # about half the compile time (the probe was the largest per-candidate cost on CPU).
    if op_by_op:
        logits, grad_stats = run(init_params)
    else:
        logits, grad_stats = compile_for_one_run(jax.jit(run).lower(init_params))(init_params)
    logits = np.asarray(jax.device_get(logits), np.float64)
    finite = bool(np.isfinite(logits).all())
    leak = None
    if check_causality:
        leak_abs, scale = (float(v) for v in jax.device_get(grad_stats))
        if not np.isfinite(leak_abs) or not np.isfinite(scale):
            leak = float("inf") if not np.isfinite(leak_abs) else 0.0
        else:
            leak = leak_abs / max(scale, 1e-30) if leak_abs > 0 else 0.0
    hashes = _output_hashes(logits, digits, seed) if finite else (None, None)
    return ProbeResult(finite, leak, hashes[0], time.perf_counter() - t0, hashes[1])


def step_probe_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0, weights_dtype=np.float32) -> dict:
    """A fixed language-model batch for :func:`probe_from_steps` (same for every candidate).

    Row r's loss weights cover the positions <= t_r, with t_r cycling over the probed
    positions (``row_positions``): a causal model's loss then does not depend on the
    inputs after t_r, so the loss gradient w.r.t. row r's input embeddings is exactly
    zero there. Returns ``{"inputs", "targets", "weights"}`` and ``row_positions`` apart.
    """
    rows = _row_positions(batch, seq_len)
    weights = (np.arange(seq_len)[None, :] <= rows[:, None]).astype(weights_dtype)
    return {
        "inputs": probe_tokens(vocab_size, batch, seq_len, seed),
        "targets": probe_tokens(vocab_size, batch, seq_len, seed + 1),
        "weights": weights,
    }


def future_changed(batch: dict, vocab_size: int, seed: int = 0) -> dict:
    """``batch`` (a :func:`step_probe_batch`) with every input token after row r's probed
    position t_r replaced by a different one, the positions <= t_r unchanged: a causal
    model's outputs at positions <= t_r are then the same, bit for bit
    (:func:`probe_from_forward`)."""
    inputs = np.asarray(batch["inputs"])
    future = ~(np.asarray(batch["weights"]) > 0)  # row r's weights cover the positions <= t_r
    shift = np.random.default_rng(seed + 11).integers(1, max(vocab_size, 2), size=inputs.shape)
    changed = np.where(future, (inputs + shift) % max(vocab_size, 2), inputs).astype(inputs.dtype)
    return {**batch, "inputs": changed}


def probe_from_forward(
    first: dict, changed: dict, weights, digits: int = 3, seed: int = 0, seconds: float = 0.0
) -> ProbeResult:
    """The verdicts of :func:`probe_model` from two forwards through the train-step pieces.

    ``first``: :meth:`nasjax.train.segmented.SegmentedSteps.probe_forward`'s host arrays
    for a :func:`step_probe_batch` batch (``last_logits``, ``finite``, ``x``: the last
    layer's outputs [B, L, D]); ``changed``: the same for :func:`future_changed` of it;
    ``weights``: the batch's weights (row r covers the positions <= t_r). Finiteness: all
    logits of the first batch. Causality by a change of the future: row r's outputs at the
    positions <= t_r must not move when every input after t_r changes. The leak is the
    largest change there relative to the largest (finite) change at the positions after
    t_r, as :func:`probe_model` relates its derivatives, or to the largest output at
    positions <= t_r when nothing after t_r moved (0.0 for a causal model: its outputs at
    those positions are computed from the same values by the same program). A change
    that is not finite at positions <= t_r decides nothing (``causality_undecided``; the
    caller asks :func:`probe_model`). The FEC hashes: the last position's logits, as in
    :func:`probe_from_steps`.
    """
    finite, hashes = _finite_and_hashes(first, digits, seed)
    past = (np.asarray(weights) > 0)[:, :, None]  # [B, L, 1]: the positions <= t_r
    x, y = np.asarray(first["x"], np.float64), np.asarray(changed["x"], np.float64)
    a, b = np.where(past, x, 0.0), np.where(past, y, 0.0)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return ProbeResult(finite, None, hashes[0], seconds, hashes[1], causality_undecided=True)
    leak_abs = float(np.max(np.abs(a - b)))
    if leak_abs == 0:
        return ProbeResult(finite, 0.0, hashes[0], seconds, hashes[1])
    with np.errstate(invalid="ignore"):
        moved = np.where(past, 0.0, np.abs(x - y))
    moved = float(np.max(np.where(np.isfinite(moved), moved, 0.0)))
    scale = moved if moved > 0 else float(np.max(np.abs(a)))
    return ProbeResult(finite, leak_abs / max(scale, 1e-30), hashes[0], seconds, hashes[1])


def logits_finite(out: dict) -> bool:
    """Whether a probe's logits are all finite (its ``finite`` flag and its last-position logits)."""
    return bool(out["finite"]) and bool(np.isfinite(np.asarray(out["last_logits"])).all())


def _finite_and_hashes(out: dict, digits: int, seed: int) -> tuple[bool, tuple]:
    """(all logits finite, the two FEC hashes of the last position's logits or Nones)."""
    finite = logits_finite(out)
    last = np.asarray(out["last_logits"], np.float64)
    return finite, (_output_hashes(last[:, None, :], digits, seed) if finite else (None, None))


def _row_positions(batch: int, seq_len: int) -> np.ndarray:
    """The probed position of each row of a step probe batch (middle first, so that a batch
    of one checks the middle position)."""
    order = sorted(_positions(seq_len), key=lambda t: (t != seq_len // 2, t))
    return np.asarray([order[r % len(order)] for r in range(batch)], np.int64)


def probe_from_steps(out: dict, seq_len: int, digits: int = 3, seed: int = 0, seconds: float = 0.0) -> ProbeResult:
    """The verdicts of :func:`probe_model` from a probe run on the train-step pieces.

    ``out``: :meth:`nasjax.train.segmented.SegmentedSteps.probe`'s host arrays for a
    :func:`step_probe_batch` batch. Finiteness: all logits of the batch. Causality in
    reverse mode: for row r, the gradient w.r.t. the input embeddings at the positions
    after t_r (a causal model's is exactly zero: the loss reads positions <= t_r only),
    relative to the largest at positions <= t_r; the same Jacobian block that the
    forward-mode check of :func:`probe_model` probes, contracted with the loss's
    cotangent instead of random tangents. Gradients that are not finite decide nothing
    (``causality_undecided``; the caller runs :func:`probe_model` for the verdict). The
    FEC hashes: the last position's logits of every row, as in :func:`probe_model`.
    """
    finite, hashes = _finite_and_hashes(out, digits, seed)
    grads = np.abs(np.asarray(out["input_grads"], np.float64))
    if not np.isfinite(grads).all():
        # An infinite derivative (sqrt or log at 0, ...) times a zero cotangent is NaN, in
        # causal models too: these gradients decide nothing, and the caller asks the
        # forward-mode test (probe_model), whose tangents do not pass there.
        return ProbeResult(finite, None, hashes[0], seconds, hashes[1], causality_undecided=True)
    rows = _row_positions(grads.shape[0], seq_len)
    future = np.arange(seq_len)[None, :] > rows[:, None]  # [B, L]
    per_position = grads.max(axis=2)  # [B, L]
    leak_abs = float(np.max(np.where(future, per_position, 0.0)))
    scale = float(np.max(np.where(future, 0.0, per_position)))
    leak = leak_abs / max(scale, 1e-30) if leak_abs > 0 else 0.0
    return ProbeResult(finite, leak, hashes[0], seconds, hashes[1])


def _output_hashes(logits_BxLxV: np.ndarray, digits: int, seed: int) -> tuple[str, str]:
    """The two FEC hashes of the module docstring."""
    directions = np.random.default_rng(seed + 7).normal(size=(logits_BxLxV.shape[-1], 32))
    summary = logits_BxLxV[:, -1, :] @ directions
    scale = float(np.max(np.abs(summary))) or 1.0
    steps = summary / 10.0 ** (np.floor(np.log10(scale)) - digits + 1)
    out = []
    for offset in (0.0, 0.5):
        grid = np.floor(steps + offset).astype(np.int64)
        out.append(hashlib.sha256(grid.tobytes()).hexdigest()[:16])
    return out[0], out[1]
