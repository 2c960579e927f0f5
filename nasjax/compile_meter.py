"""Seconds spent compiling XLA programs, as JAX itself reports them.

Issue 8's compile-share target counts *every* compile a search does: the train and eval
steps, the shared pieces of ``train.segmented``, and also the small per-op programs that
an op-by-op probe or init compiles the first time it meets an (op, shape) pair, which
no ``compile_seconds`` field of a trainer sees. JAX reports each compile through
``jax.monitoring``; :func:`install` registers one listener that adds up two events:

* ``/jax/core/compile/jaxpr_to_mlir_module_duration``: lowering a traced program;
* ``/jax/core/compile/backend_compile_duration``: XLA's compile (a persistent-cache
  lookup included, hit or miss).

Tracing (``jaxpr_trace_duration``) is not counted: ``jax.eval_shape`` traces too, and
tracing is Python work, not compiling. Totals are kept per thread (a search's
candidates run on threads of their own with ``engine=threads``; a compile runs on the
thread that asked for it) and per process.
"""

from __future__ import annotations

import threading

import jax

__all__ = ["install", "thread_seconds", "process_seconds", "EVENTS"]

EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

_local = threading.local()
_lock = threading.Lock()
_process = [0.0]
_installed = [False]


def _listener(event: str, duration: float, **_kwargs) -> None:
    if event not in EVENTS:
        return
    _local.seconds = getattr(_local, "seconds", 0.0) + float(duration)
    with _lock:
        _process[0] += float(duration)


def install() -> None:
    """Registers the listener (once per process; later calls do nothing)."""
    with _lock:
        if _installed[0]:
            return
        _installed[0] = True
    jax.monitoring.register_event_duration_secs_listener(_listener)


def thread_seconds() -> float:
    """Compile seconds of this thread since :func:`install` (a difference of two readings
    is what happened in between)."""
    return getattr(_local, "seconds", 0.0)


def process_seconds() -> float:
    """Compile seconds of every thread of this process since :func:`install`."""
    with _lock:
        return _process[0]
