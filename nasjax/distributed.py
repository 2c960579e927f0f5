"""Several processes (hosts) evaluating one candidate on a mesh that spans them all.

``nasjax search`` and ``nasjax train`` call :func:`maybe_initialize` first. It calls
``jax.distributed.initialize`` when the environment says there are several processes:

* explicit flags (``--coordinator=HOST:PORT --num_processes=N --process_id=I``) or the
  same in ``NASJAX_COORDINATOR`` / ``NASJAX_NUM_PROCESSES`` / ``NASJAX_PROCESS_ID``;
* a multi-host Cloud TPU VM (``TPU_WORKER_HOSTNAMES`` lists more than one worker) or a
  SLURM job with several tasks (``SLURM_NTASKS`` > 1): JAX finds the coordinator itself.

In a search, process 0 is the controller: it proposes, writes the journal and
broadcasts each job (the model spec and payload, as JSON) to the other processes, which
run it in lockstep (:class:`MultiProcessEngine` / :func:`follow`); every process joins
the collectives of the one candidate, and process 0 records the result. A
:class:`Watchdog` bounds every job: a collective that hangs (a lost host) ends the
process with exit code 4 after ``--collective_timeout`` seconds, so the scheduler
restarts the job and the search resumes from its journal with nothing finished lost.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np

from nasjax.search.engine import InlineEngine

__all__ = ["maybe_initialize", "broadcast_json", "Watchdog", "MultiProcessEngine", "follow", "EXIT_HUNG"]

EXIT_HUNG = 4


def _env_says_multi() -> bool:
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def maybe_initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, log=print) -> bool:
    """``jax.distributed.initialize`` if flags or the environment ask for several processes."""
    import jax

    coordinator = coordinator or os.environ.get("NASJAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("NASJAX_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("NASJAX_PROCESS_ID", "-1") or -1)
    if coordinator:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--coordinator={coordinator} needs --num_processes=N and --process_id in [0, N); "
                f"got {num_processes} and {process_id}"
            )
        _cpu_collectives()
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif _env_says_multi():
        jax.distributed.initialize()
    else:
        return False
    log(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices")
    return True


def _cpu_collectives() -> None:
    """Cross-process collectives on CPU (tests, CPU clusters) need gloo."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # an older or newer JAX without the option: its default applies
        pass


def broadcast_json(obj=None):
    """Process 0's ``obj`` (JSON-able) on every process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return obj
    data = json.dumps(obj).encode() if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
    buf = np.zeros(n, np.uint8)
    if jax.process_index() == 0:
        buf[:] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(out.tobytes().decode())


class Watchdog:
    """Ends the process (exit 4) when the guarded block runs longer than ``seconds`` (0 = off)."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = float(seconds), what
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        print(
            f"error: {self.what} did not finish in {self.seconds:g}s (a hung collective or a lost host); exiting "
            "with code 4 so the scheduler restarts the job; the same command resumes from the journal",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_HUNG)

    def __enter__(self):
        if self.seconds > 0:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        return False


def _job_to_json(job) -> dict:
    return {"key": job.key, "stage": job.stage, "spec": job.spec, "payload": job.payload, "route": job.route}


class MultiProcessEngine(InlineEngine):
    """Process 0's engine when several processes share the mesh: broadcast, then run in lockstep."""

    name = "multiprocess"

    def __init__(self, adapter, timeout_s: float):
        super().__init__(adapter, should_stop=None)  # a stop acts between candidates, never inside a collective
        self.timeout_s = timeout_s

    def submit(self, job) -> None:
        from nasjax.search.engine import run_job

        try:
            message = _job_to_json(job)
            json.dumps(message)
        except (TypeError, ValueError):
            raise RuntimeError(
                f"a {job.stage} job of this search carries non-JSON data; multi-process evaluation supports "
                "Primer and LTS searches and AutoBERT-Zero with autobert.biws=false"
            ) from None
        broadcast_json(message)
        with Watchdog(self.timeout_s, f"candidate {job.key} ({job.stage})"):
            self._done.append((job, run_job(self.adapter, job)))

    def close(self) -> None:
        broadcast_json(None)  # releases the followers


def follow(adapter, timeout_s: float) -> list[tuple[int, str, dict]]:
    """Processes 1..N-1: run process 0's jobs until it says stop; returns (id, stage, result) of each."""
    from nasjax.search.engine import Job, run_job

    done = []
    while True:
        message = broadcast_json(None)
        if message is None:
            return done
        job = Job(**message)
        with Watchdog(timeout_s, f"candidate {job.key} ({job.stage})"):
            result = run_job(adapter, job)
        done.append((job.key, job.stage, {k: v for k, v in result.items() if k != "weights"}))
