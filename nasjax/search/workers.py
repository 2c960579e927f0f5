"""``engine=processes``: candidates evaluated in worker processes of this host, replaced periodically.

Each worker is a fresh Python interpreter (``python -m nasjax.search.workers``, not a
fork: JAX's runtime is multi-threaded) that builds a :class:`~nasjax.search.engine.Worker`
(data pipeline, mesh, evaluator) once and then runs jobs sent by the controller over a
socket pair. The controller (proposals, evolution state, the journal) stays in the
launching process, exactly as with the other engines, so the same seed and
``search.in_flight`` evaluate the same architectures.

What it gives over ``engine=inline`` / ``threads``:

* **Memory bounded for any length of search.** XLA keeps every compiled program, and
  JAX, LLVM and the C heap keep state per program, in ways a process cannot fully hand
  back (docs/benchmarks.md: +95 MiB per 100 evaluations on the compiled path, a 1.8-3.9
  GiB sawtooth with per-op programs, ~90-300 MiB kept per trained candidate while the search
  is on its largest programs). A worker is replaced by a fresh process, which returns all of it to the OS,
  once it has worked on ``process_recycle_every`` candidates, or when its resident memory
  after a job exceeds ``process_max_mb`` (0 = no bound). The cost is one warm-up per
  replacement: a fresh process's first tiny Primer candidate took ~3.7 s against ~2.4 s
  on a 2-core CPU, with the persistent compilation cache keeping every program
  (``compile_cache_min_seconds=0``; ~10 s without it).
* **A crash of one candidate is not a crash of the search.** A worker killed by a
  segfault in a backend, the kernel's OOM killer or a signal is replaced and its job
  re-issued; a job that kills ``process_max_restarts`` + 1 workers is recorded as a
  failed candidate (stage ``internal``), and the search goes on.

Not a cluster engine (``engine=ray`` is); POSIX hosts (the socket pair is inherited by
file descriptor). On a GPU host, run with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so the
processes share the accelerator's memory (checked before any worker starts).
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection, wait

__all__ = ["ProcessEngine", "worker_main"]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"{name}{hint}"
    return f"exit code {code}"


def check_accelerator_memory() -> None:
    """On a GPU or TPU host every process (the controller too) would preallocate 75% of the
    accelerator's memory (JAX's default): raises EngineError unless preallocation is off."""
    import jax

    from nasjax.search.engine import EngineError

    backend = jax.default_backend()
    if backend != "cpu" and os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() not in ("false", "0"):
        raise EngineError(
            f"engine=processes on a {backend} host: the controller and every worker would each preallocate 75% "
            "of accelerator memory; run with XLA_PYTHON_CLIENT_PREALLOCATE=false (and "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/search.in_flight), as launch/gpu_local.sh does for Ray actors"
        )


class _Slot:
    """One worker process and what the controller knows about it."""

    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc, self.conn = proc, conn
        self.ready = False  # its "ready" message has arrived
        self.job = None  # the job it is running
        self.candidates: set[int] = set()  # candidate ids it has worked on (recycling)
        self.routes: set[str] = set()
        self.rss_mib = 0.0  # its resident memory after its last job


class ProcessEngine:
    """``n`` worker processes evaluating jobs concurrently (see the module docstring).

    Args:
      cfg: the search config (``process_recycle_every``, ``process_max_mb``,
        ``process_max_restarts``, ``process_start_timeout_s``).
      tokenizer: the search's tokenizer (sent to the workers).
      n: worker processes (``search.in_flight``).
      log: message sink.
    """

    name = "processes"

    def __init__(self, cfg, tokenizer, n: int, log=print):
        check_accelerator_memory()
        self.log = log
        self.init = (cfg.to_json(), tokenizer.to_config(embed=True), str(cfg.search.method))
        self.recycle_every = int(cfg.get("process_recycle_every", 50) or 0)
        self.max_mb = float(cfg.get("process_max_mb", 0) or 0)
        self.max_restarts = int(cfg.get("process_max_restarts", 3))
        self.start_timeout = float(cfg.get("process_start_timeout_s", 600.0))
        self.restarts = 0  # workers replaced after dying
        self.recycled = 0  # workers replaced after process_recycle_every candidates
        self.over_memory = 0  # workers replaced because they held more than process_max_mb
        self.slots: list[_Slot | None] = [None] * max(1, int(n))
        try:
            for i in range(len(self.slots)):
                self.slots[i] = self._start()
            for slot in self.slots:
                self._await_ready(slot)
        except BaseException:
            self.close()
            raise
        pids = ", ".join(str(s.proc.pid) for s in self.slots)
        every = f"replaced every {self.recycle_every} candidates" if self.recycle_every else "not replaced by count"
        bound = f" or above {self.max_mb:g} MiB resident" if self.max_mb else ""
        log(f"process engine: {len(self.slots)} workers ({pids}), {every}{bound}")

    # ------------------------------------------------------------------ workers
    def _start(self) -> _Slot:
        parent, child = socket.socketpair()
        env = dict(os.environ)  # the worker imports this nasjax, installed or not (a notebook's sys.path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nasjax.search.workers", "--fd", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the controller only; it stops the workers
            )
        except OSError as e:
            parent.close()
            from nasjax.search.engine import EngineError

            raise EngineError(f"cannot start a worker process ({sys.executable}): {e}") from None
        finally:
            child.close()
        conn = Connection(parent.detach())
        try:
            conn.send_bytes(pickle.dumps(self.init, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # it died at once: its closed socket tells the engine, with its exit code
        return _Slot(proc, conn)

    def _await_ready(self, slot: _Slot) -> None:
        """Waits for a new worker's ``ready`` (or its startup error) before any job is given."""
        from nasjax.search.engine import EngineError

        if not slot.conn.poll(self.start_timeout):
            raise EngineError(f"a worker process did not start within process_start_timeout_s={self.start_timeout:g}")
        msg = self._recv(slot)
        if msg[0] == "died":
            how = _describe_exit(slot.proc.wait())
            raise EngineError(f"a worker process exited while starting ({how}); its error output is above")
        self._on_message(slot, msg)
        if not slot.ready:
            raise EngineError(f"a worker process sent {msg[0]!r} before it was ready")

    def _recv(self, slot: _Slot):
        """The next message of ``slot``; ``("died", None)`` when its process is gone."""
        try:
            return pickle.loads(slot.conn.recv_bytes())
        except (EOFError, OSError):
            return ("died", None)

    def _on_message(self, slot: _Slot, msg) -> dict | None:
        """Handles a message other than ``died``; returns a job's result dict, or None."""
        from nasjax.search.engine import EngineError

        kind, body = msg
        if kind == "ready":
            slot.ready = True
            return None
        if kind == "error":  # the worker could not build its data, mesh or evaluator
            raise EngineError(f"a worker process failed to start: {body}")
        if kind == "result":
            result, slot.rss_mib = body
            return result
        raise EngineError(f"unexpected message from a worker process: {kind!r}")

    def _stop(self, slot: _Slot, grace: float = 5.0) -> None:
        try:
            slot.conn.send_bytes(pickle.dumps(None))  # an idle worker exits at once
        except OSError:
            pass
        try:
            slot.proc.wait(timeout=grace if slot.job is None else 0.0)
        except subprocess.TimeoutExpired:
            slot.proc.kill()
            slot.proc.wait()
        slot.conn.close()

    # ------------------------------------------------------------------ engine interface
    @property
    def capacity(self) -> int:
        return len(self.slots)

    def busy(self) -> int:
        return sum(1 for s in self.slots if s is not None and s.job is not None)

    def submit(self, job) -> None:
        from nasjax.search.engine import EngineError

        free = [i for i, s in enumerate(self.slots) if s is not None and s.job is None]
        if not free:
            raise EngineError("no free worker process (the controller submitted more jobs than workers)")
        i = next((i for i in free if job.route and job.route in self.slots[i].routes), free[0])
        slot = self.slots[i]
        slot.job = job
        try:
            slot.conn.send_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # it died: wait() sees the closed socket and re-issues the job

    def wait(self, timeout: float | None = None) -> list:
        running = {s.conn: i for i, s in enumerate(self.slots) if s is not None and s.job is not None}
        if not running:
            return []
        out = []
        for conn in sorted(wait(list(running), timeout), key=lambda c: self.slots[running[c]].job.key):
            i = running[conn]
            slot = self.slots[i]
            msg = self._recv(slot)
            if msg[0] == "ready":  # a replacement announced itself; its job is queued behind
                self._on_message(slot, msg)
                continue
            job, slot.job = slot.job, None
            if msg[0] == "died":
                out.extend(self._died(i, job))
                continue
            result = self._on_message(slot, msg)
            slot.candidates.add(job.key)
            if job.route:
                slot.routes.add(job.route)
            out.append((job, result))
            if self.max_mb and slot.rss_mib > self.max_mb:
                self._replace(i)
                self.over_memory += 1
            elif self.recycle_every and len(slot.candidates) >= self.recycle_every and job.stage != "check":
                self._replace(i)
                self.recycled += 1
        return out

    def _replace(self, i: int) -> None:
        old = self.slots[i]
        self._stop(old)
        self.slots[i] = self._start()  # announces itself later; a job sent meanwhile waits in the socket

    def _died(self, i: int, job) -> list:
        code = self.slots[i].proc.wait()
        how = _describe_exit(code)
        self.restarts += 1
        self._replace(i)
        job.attempts += 1
        if job.attempts > self.max_restarts:
            self.log(f"candidate {job.key} ({job.stage}) killed {job.attempts} worker processes ({how}); failed")
            reason = f"worker process died {job.attempts}x ({how})"
            return [(job, {"ok": False, "stage": "internal", "reason": reason})]
        self.log(f"worker process {i} died ({how}) during candidate {job.key} ({job.stage}); re-issuing it")
        self.submit(job)
        return []

    def close(self) -> None:
        for slot in self.slots:
            if slot is not None:
                self._stop(slot)
        self.slots = [None] * len(self.slots)
        if self.recycled or self.over_memory or self.restarts:
            self.log(
                f"process engine: workers replaced {self.recycled}x after process_recycle_every candidates, "
                f"{self.over_memory}x above process_max_mb, {self.restarts}x after dying"
            )


# ---------------------------------------------------------------------- the worker side


def worker_main(fd: int) -> int:
    """A worker process: build the evaluator, then run jobs until told to stop (``None``) or orphaned."""
    conn = Connection(fd)

    def send(kind, body) -> bool:
        try:
            conn.send_bytes(pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL))
            return True
        except OSError:  # the controller is gone
            return False

    try:
        cfg_json, tokenizer_config, method = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return 0
    try:
        from nasjax.hostmem import resident_mib
        from nasjax.search.engine import Worker

        worker = Worker(cfg_json, tokenizer_config, method)
    except BaseException as e:  # noqa: BLE001 - reported to the controller, which stops the search
        send("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)[-1200:]}")
        return 1
    if not send("ready", os.getpid()):
        return 0
    while True:
        try:
            job = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the controller is gone
            return 0
        if job is None:
            return 0
        if not send("result", (worker.run(job), resident_mib())):
            return 0


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a nasjax worker process (started by engine=processes)")
    p.add_argument("--fd", type=int, required=True, help="the socket inherited from the controller")
    args = p.parse_args(argv)
    return worker_main(args.fd)


if __name__ == "__main__":
    sys.exit(_main())
