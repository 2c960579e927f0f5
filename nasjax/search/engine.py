"""Where candidate evaluations run: this process (inline, threads), worker processes (processes) or Ray actors.

The controller (proposals, journal, evolution state) always runs in the launching
process and is the only writer of the journal. An engine runs *jobs*: one stage of one
candidate's evaluation (``check``: parameter bound and probe; ``train``: the proxy
training), given as a model-spec dict and a payload of plain data. A job's result is a
plain dict, ``{"ok": True, ...}`` or ``{"ok": False, "stage": ..., "reason": ...}``.

* :class:`InlineEngine` runs each job at once with the controller's evaluator (the
  default; needs no Ray).
* :class:`ThreadEngine` (``engine=threads``) runs up to ``search.in_flight`` jobs at once
  on threads of this process, sharing the evaluator. For CPU hosts where compiling
  dominates a candidate (the tiny Primer preset: ~98% of a candidate's time): XLA
  compiles on one core and releases the GIL, so two candidates compile at once on two
  cores. Primer only (LTS's latency measurements would be disturbed, AutoBERT's
  supernet is shared state), and not with time budgets (``train.budget_seconds``:
  concurrent candidates would share the time).
* :class:`~nasjax.search.workers.ProcessEngine` (``engine=processes``) runs
  ``search.in_flight`` jobs at once in worker processes of this host, each replaced by a
  fresh one after ``process_recycle_every`` candidates (host memory bounded for any length
  of search) or when it dies (a crash of one candidate is not a crash of the search).
* :class:`RayEngine` keeps ``ray_actors`` long-lived :class:`Worker` actors (one per
  accelerator by default). Each builds its data pipeline and mesh once and keeps its
  compiled programs (and the persistent compile cache) warm across candidates. A job
  whose ``route`` key (the model spec's hash) an actor has already run goes to that
  actor when it is free. An actor that dies (a crash, an OOM kill, a lost node) is
  replaced and its job re-issued; results live only in the controller's journal, so
  nothing finished is lost.

How many evaluations are in flight is ``search.in_flight`` (N), a setting of the
*algorithm*, not of the engine: candidate j is proposed once the results of candidates
0 .. j-N have been told to the evolution, results are told in id order, and re-use of
earlier results (identical genome, functional equivalence) only looks at candidates
0 .. j-N. So the set of evaluated architectures depends on the seed and N, not on which
engine ran them or in which order they finished, and ``engine=inline`` with the same N
reproduces an ``engine=ray`` search (N=1 is the sequential search).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
import traceback
from typing import Any

ENGINES = ("inline", "threads", "processes", "ray")

__all__ = [
    "ENGINES",
    "Job",
    "InlineEngine",
    "ThreadEngine",
    "RayEngine",
    "Worker",
    "make_engine",
    "EngineError",
    "run_job",
]


class EngineError(RuntimeError):
    """An engine cannot start (Ray missing, cluster unreachable, bad settings)."""


@dataclasses.dataclass
class Job:
    """One stage of one candidate's evaluation."""

    key: int  # the candidate id
    stage: str  # check | train (evolution) | measure (LTS)
    spec: dict
    payload: dict = dataclasses.field(default_factory=dict)
    route: str = ""  # jobs with the same route prefer the actor that ran it before
    attempts: int = 0


def run_job(adapter, job: Job, should_stop=None) -> dict:
    """Runs ``job`` with a method's evaluation adapter; failures become result dicts.

    Every result carries ``xla_compile_seconds``: what XLA spent compiling for this job
    on its thread (:mod:`nasjax.compile_meter`; every program, per-op ones included),
    plus what a compile-ahead thread compiled for it (``compile_ahead_xla_seconds``).
    """
    from nasjax import compile_meter

    compile_meter.install()
    t0 = compile_meter.thread_seconds()
    out = _run_job(adapter, job, should_stop)
    ahead = float(out.pop("compile_ahead_xla_seconds", 0.0) or 0.0)
    out["xla_compile_seconds"] = compile_meter.thread_seconds() - t0 + ahead
    return out


def _run_job(adapter, job: Job, should_stop=None) -> dict:
    from nasjax.search.evaluate import CandidateFailed, Interrupted
    from nasjax.spec import ModelSpec

    try:
        spec = ModelSpec.from_dict(job.spec)
        if job.stage == "check":
            out = adapter.check_job(spec)
        elif job.stage == "train":
            out = adapter.train_job(spec, job.payload, should_stop)
        elif job.stage == "measure":
            out = adapter.measure_job(spec, job.payload)
        else:
            raise ValueError(f"unknown job stage {job.stage!r}")
        return {"ok": True, **out}
    except CandidateFailed as e:
        return {"ok": False, "stage": e.stage, "reason": e.reason, **e.info}
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug or an unexpected backend error: recorded, never crashes the search
        reason = f"{type(e).__name__}: {e}"[:400]
        return {"ok": False, "stage": "internal", "reason": reason, "trace": traceback.format_exc(limit=3)[-800:]}


class InlineEngine:
    """Runs every job at once in this process (``engine=inline``)."""

    name = "inline"

    def __init__(self, adapter, should_stop=None):
        self.adapter, self.should_stop = adapter, should_stop
        self._done: collections.deque = collections.deque()

    @property
    def capacity(self) -> int:
        return 1

    def busy(self) -> int:
        return 0

    def submit(self, job: Job) -> None:
        self._done.append((job, run_job(self.adapter, job, self.should_stop)))

    def wait(self, timeout: float | None = None) -> list[tuple[Job, dict]]:
        out = list(self._done)
        self._done.clear()
        return out

    def close(self) -> None:
        _close_adapter(self.adapter)


class ThreadEngine:
    """Runs up to ``n`` jobs at once on threads of this process (``engine=threads``).

    The jobs share the controller's evaluator (its data, mesh and caches); results are
    handed back in completion order and told in id order by the controller, so a search
    evaluates the same candidates as ``engine=inline`` with the same ``search.in_flight``.
    """

    name = "threads"

    def __init__(self, adapter, n: int, should_stop=None):
        from concurrent.futures import ThreadPoolExecutor

        self.adapter, self.should_stop, self.n = adapter, should_stop, max(1, int(n))
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="nasjax-job")
        self.running: dict = {}  # future -> job

    @property
    def capacity(self) -> int:
        return self.n

    def busy(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> None:
        self.running[self.pool.submit(run_job, self.adapter, job, self.should_stop)] = job

    def wait(self, timeout: float | None = None) -> list[tuple[Job, dict]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        if not self.running:
            return []
        done, _ = wait_futures(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for future in sorted(done, key=lambda f: self.running[f].key):
            job = self.running.pop(future)
            out.append((job, future.result()))  # re-raises Interrupted / KeyboardInterrupt
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.running.clear()
        _close_adapter(self.adapter)


def _close_adapter(adapter) -> None:
    close = getattr(adapter, "close", None)
    if close is not None:
        close()


# ---------------------------------------------------------------------- Ray


class Worker:
    """A long-lived evaluator process (a Ray actor): data, mesh and compiled programs stay warm.

    Built from the search config (JSON), the search's tokenizer (config dict) and the
    method; ``run(job)`` evaluates one job with the same adapter the inline engine uses.
    """

    def __init__(self, cfg_json: str, tokenizer_config: dict, method: str):
        import ml_collections

        from nasjax.data import tokenizer_from_config
        from nasjax.train.run import make_mesh, setup_compile_cache

        cfg = ml_collections.ConfigDict(json.loads(cfg_json))
        setup_compile_cache(cfg)
        mesh, rules = make_mesh(cfg)
        if "train" in cfg:
            # an option this worker's XLA lacks stops the search here (a worker that fails to
            # start does), instead of failing every candidate
            from nasjax import xla_options

            xla_options.check(cfg.train, mesh.devices.flat[0].platform)
        tokenizer = tokenizer_from_config(tokenizer_config)
        self.adapter = make_adapter(method, cfg, tokenizer, mesh, rules, log=lambda *a: None)
        self.jobs = 0

    def run(self, job: Job) -> dict:
        self.jobs += 1
        return run_job(self.adapter, job)

    def info(self) -> dict:
        import jax

        return {"pid": os.getpid(), "devices": [str(d) for d in jax.devices()], "jobs": self.jobs}


def make_adapter(method: str, cfg, tokenizer, mesh, rules, log=print):
    """The evaluation adapter of a search method (what a job's stages call)."""
    from nasjax.search.run import build_text_data

    if method == "lts":  # training-free: no data
        from nasjax.search.lts import LTSMeasurer

        return LTSMeasurer(cfg)
    kind = "mlm" if method == "autobert" else "lm"
    data = build_text_data(cfg, tokenizer, kind, log)
    if method == "autobert":
        from nasjax.search.autobert import AutoBertEvaluator, load_tasks

        return AutoBertEvaluator(cfg, data, load_tasks(cfg, tokenizer, log), mesh, rules, log)
    if method == "primer":
        from nasjax.search.evaluate import TrainingEvaluator

        return TrainingEvaluator(cfg, data, mesh, rules, log)
    raise EngineError(f"search.method={method!r} has no job adapter")


class RayEngine:
    """``ray_actors`` :class:`Worker` actors evaluating jobs concurrently (see the module docstring).

    Args:
      cfg: the search config (``ray_address``, ``ray_actors``, ``ray_cpus_per_actor``,
        ``ray_gpus_per_actor``, ``ray_max_restarts``).
      tokenizer: the search's tokenizer (sent to the actors).
      n_actors: actors to start.
      log: message sink.
    """

    name = "ray"

    def __init__(self, cfg, tokenizer, n_actors: int, log=print):
        try:
            import ray
        except ImportError:
            raise EngineError("engine=ray needs Ray: pip install 'nasjax[ray]' (or ray>=2.40)") from None
        self.ray, self.log = ray, log
        address = str(cfg.get("ray_address", "") or "")
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(
                        num_cpus=max(int(cfg.get("ray_num_cpus", 0) or 0), n_actors) or None,
                        include_dashboard=False,
                        log_to_driver=False,
                        object_store_memory=int(cfg.get("ray_object_store_mb", 256)) * 2**20,
                    )
            except Exception as e:
                raise EngineError(f"cannot start or reach Ray (ray_address={address!r}): {e}") from None
        self.cfg_json = cfg.to_json()
        self.tokenizer_config = tokenizer.to_config(embed=True)
        self.method = str(cfg.search.method)
        self.options = {
            "num_cpus": float(cfg.get("ray_cpus_per_actor", 1.0)),
            "num_gpus": float(cfg.get("ray_gpus_per_actor", 0.0)),
        }
        self.max_restarts = int(cfg.get("ray_max_restarts", 3))
        self.prefix = f"nasjax_worker_{os.getpid()}_{int(time.time())}"
        self._remote = ray.remote(Worker)
        self.actors: list[Any] = [self._start(i) for i in range(n_actors)]
        self.routes: list[set[str]] = [set() for _ in range(n_actors)]
        self.running: dict[Any, tuple[int, Job]] = {}  # object ref -> (actor slot, job)
        self.free = list(range(n_actors))
        self.restarts = 0
        try:
            info = ray.get([a.info.remote() for a in self.actors])
        except Exception as e:  # a worker could not build its data, mesh or evaluator
            self.close()
            raise EngineError(f"Ray workers failed to start: {str(e)[-600:]}") from None
        log(f"Ray engine: {n_actors} actors ({', '.join(str(i['pid']) for i in info)}), {self.options}")

    def _start(self, slot: int):
        return self._remote.options(name=f"{self.prefix}_{slot}", **self.options).remote(
            self.cfg_json, self.tokenizer_config, self.method
        )

    @property
    def capacity(self) -> int:
        return len(self.actors)

    def busy(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> None:
        if not self.free:
            raise EngineError("no free actor (the controller submitted more jobs than actors)")
        slot = next((s for s in self.free if job.route and job.route in self.routes[s]), self.free[0])
        self.free.remove(slot)
        ref = self.actors[slot].run.remote(job)
        self.running[ref] = (slot, job)

    def wait(self, timeout: float | None = None) -> list[tuple[Job, dict]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            slot, job = self.running.pop(ref)
            try:
                result = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as e:
                self._replace(slot, e)
                job.attempts += 1
                if job.attempts > self.max_restarts:
                    out.append((job, {"ok": False, "stage": "internal", "reason": f"worker died {job.attempts}x"}))
                else:
                    self.log(f"worker {slot} died during candidate {job.key} ({job.stage}); re-issuing it")
                    self.submit(job)
                continue
            except self.ray.exceptions.RayTaskError as e:
                result = {"ok": False, "stage": "internal", "reason": str(e)[:400]}
            self.free.append(slot)
            if job.route:
                self.routes[slot].add(job.route)
            out.append((job, result))
        return out

    def _replace(self, slot: int, error) -> None:
        self.restarts += 1
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self.actors[slot] = self._start(slot)
        self.routes[slot] = set()
        self.free.append(slot)

    def close(self) -> None:
        for ref in list(self.running):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.running.clear()


def _default_platform() -> str:
    import jax

    return jax.devices()[0].platform


def check_engine_settings(cfg) -> None:
    """Raises :class:`EngineError` for a bad ``engine`` / ``search.in_flight`` before anything starts."""
    name = str(cfg.get("engine", "inline") or "inline")
    if name not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if "search" in cfg and int(cfg.search.get("in_flight", 1)) < 1:
        raise EngineError(f"search.in_flight must be at least 1, got {cfg.search.in_flight}")
    if int(cfg.get("ray_actors", 0) or 0) < 0:
        raise EngineError(f"ray_actors must be >= 0 (0 = search.in_flight), got {cfg.ray_actors}")
    for key in ("process_recycle_every", "process_max_mb", "process_max_restarts"):
        if int(cfg.get(key, 0) or 0) < 0:
            raise EngineError(f"{key} must be >= 0, got {cfg.get(key)}")
    if float(cfg.get("process_start_timeout_s", 600.0)) <= 0:
        raise EngineError(f"process_start_timeout_s must be positive, got {cfg.get('process_start_timeout_s')}")
    if "search" in cfg and int(cfg.search.get("clear_caches_every", 1)) < 1:
        raise EngineError(f"search.clear_caches_every must be at least 1, got {cfg.search.clear_caches_every}")
    if "search" in cfg and int(cfg.search.get("op_by_op_clear_every", 0)) < 0:
        raise EngineError(
            f"search.op_by_op_clear_every must be >= 0 (0 = never), got {cfg.search.op_by_op_clear_every}"
        )
    if "search" in cfg and "compile_ahead" in cfg.search:
        from nasjax.search.evaluate import compile_ahead_enabled

        try:
            compile_ahead_enabled(cfg.search.compile_ahead)
        except ValueError as e:
            raise EngineError(str(e)) from None
    if "search" in cfg and "op_by_op" in cfg.search:
        from nasjax.search.evaluate import op_by_op_enabled

        try:
            op_by_op_enabled(cfg.search)
        except ValueError as e:
            raise EngineError(str(e)) from None
    if "search" in cfg and "probe" in cfg.search:
        from nasjax.search.evaluate import probe_on_steps

        try:
            probe_on_steps(cfg)
        except ValueError as e:
            raise EngineError(str(e)) from None
    if "train" in cfg:  # the Trainer checks these whether or not train.segmented is on
        from nasjax import xla_options
        from nasjax.train import segmented

        try:
            segmented.check_pieces(cfg.train)
            segmented.check_update_chunk(cfg.train)
            segmented.check_layout(cfg.train)
            segmented.check_max_mb(cfg.train)
            # options this XLA lacks, refused before any candidate on the backend the inline and
            # threads engines train on (worker processes and actors refuse them when they start)
            local = name in ("inline", "threads") and cfg.train.get("segmented", False)
            xla_options.check(cfg.train, _default_platform() if local else None)
        except ValueError as e:
            raise EngineError(str(e)) from None
    if "lts" in cfg:  # before a journal exists: a bad value must not become the search's header
        from nasjax.search.lts import measurement_settings

        try:
            measurement_settings(cfg.lts)
        except ValueError as e:
            raise EngineError(str(e)) from None
    # LTS has no search.in_flight: one worker, so its latency and memory measurements are undisturbed
    if name == "processes" and "search" in cfg and int(cfg.search.get("in_flight", 1)) > 1:
        if float(cfg.train.get("budget_seconds", 0.0) or 0.0) > 0:
            raise EngineError(
                "engine=processes with search.in_flight > 1 and train.budget_seconds > 0: concurrent candidates "
                "would share the hardware their time budgets measure; use step budgets (train.steps) or in_flight=1"
            )
    if name == "threads" and "search" in cfg:
        method = str(cfg.search.get("method", ""))
        if method != "primer":
            raise EngineError(
                f"engine=threads runs candidates concurrently in one process, which search.method={method} "
                "does not support (LTS measures latency and memory on this machine, which concurrent jobs would "
                "disturb; AutoBERT's BIWS supernet is shared state); use engine=inline or engine=ray"
            )
        if float(cfg.train.get("budget_seconds", 0.0) or 0.0) > 0:
            raise EngineError(
                "engine=threads with train.budget_seconds > 0: concurrent candidates would share the hardware "
                "their time budgets measure; use step budgets (train.steps), engine=inline or engine=ray"
            )


def make_engine(cfg, tokenizer, adapter, should_stop=None, log=print):
    """The engine named by ``cfg.engine`` (inline, threads, processes or ray)."""
    name = str(cfg.get("engine", "inline") or "inline")
    if name not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    import jax

    if jax.process_count() > 1:  # one candidate at a time on a mesh over every process
        if name != "inline":
            raise EngineError(f"engine={name} with {jax.process_count()} JAX processes: use engine=inline")
        from nasjax.distributed import MultiProcessEngine

        return MultiProcessEngine(adapter, float(cfg.get("collective_timeout_s", 3600.0)))
    if name == "inline":
        return InlineEngine(adapter, should_stop)
    if name == "threads":
        return ThreadEngine(adapter, int(cfg.search.get("in_flight", 1)), should_stop)
    if name == "processes":
        from nasjax.search.workers import ProcessEngine

        return ProcessEngine(cfg, tokenizer, int(cfg.search.get("in_flight", 1)), log)
    n = int(cfg.get("ray_actors", 0) or 0) or int(cfg.search.get("in_flight", 1))  # LTS: ray_actors
    return RayEngine(cfg, tokenizer, n, log)
