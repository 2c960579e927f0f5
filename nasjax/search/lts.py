"""LiteTransformerSearch (methods.md §3): training-free, hardware-aware Pareto search.

Nothing is trained. Each architecture of the heterogeneous GPT-2 space
(:class:`~nasjax.genome.stack.StackSpace`) is decoded to a model spec and scored by

* P: decoder (non-embedding) parameters, archai's analytic formula (higher is better:
  the perplexity proxy);
* latency: the jit-compiled forward at batch ``lts.batch`` (1) and ``lts.seq_len`` on the
  device the search runs on, median of ``lts.latency_repeats`` runs after warm-up. With
  ``lts.programs = sublayers`` (default) the forward runs as a chain of attention and FFN
  sub-layer programs that every architecture shares, so the search compiles each
  sub-layer shape once rather than one program per architecture
  (:mod:`nasjax.measure.hardware`); ``model`` compiles each architecture whole;
* memory: XLA's memory analysis of that compiled forward. ``lts.memory = activations``
  (default) is what the forward allocates on top of the resident weights, the quantity
  the paper's PyTorch profiler sums (weights exist before profiling starts); ``total``
  adds the weights, which makes memory nearly a function of the parameter count and the
  front nearly everything measured. Both are recorded, and device statistics too where
  the backend reports them;
* optionally zero-cost proxies (``lts.proxies``) for comparison.

Algorithm 1 of the paper as implemented in archai (``Evolution.search``): an initial
population of ``search.population_size`` random valid genes; then, for
``search.iterations`` iterations, the Pareto front over *everything measured so far*
(objectives max_P - P, latency, memory, all minimised; strict dominance), ``lts.parent_size``
parents drawn from the front with weights favouring rarely used members,
``lts.mutation_size`` unseen valid mutants (per-gene resample probability
``lts.mutation_prob``) and ``lts.crossover_size`` unseen valid crossovers
(``lts.crossover_prob``). ``lts.selection = convex_hull`` keeps only front members on the
lower convex hull of (latency, -P), the variant the seed text describes.

Journal events: ``measured`` (id, key, iteration, origin, genome, decoder_params,
total_params, latency_s, latency_std_s, peak_memory_bytes, device_peak_bytes, flops,
compile_seconds, compiled_pieces, proxies), ``failed`` (same plus stage, reason: a latency or memory cap
from the config, or a measurement error), ``precompiled`` (iteration, pieces, seconds,
xla_seconds, plan_seconds: the pieces compiled ahead for an iteration's population on
``lts.compile_threads`` threads, written before its measurements, whose own
``compile_seconds`` do not include them; inline engine), ``iteration`` (iteration,
population keys, front ids, seconds). Random draws come from ``default_rng([seed, iteration])``; on resume every
population is regenerated from the replayed measurements, and an architecture whose
key is in the journal is never measured again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from nasjax.genome.stack import StackGenome, StackSpace
from nasjax.search.pareto import lower_convex_hull_indices, parent_weights, pareto_indices

__all__ = ["run_lts", "LTSState", "front_records", "objectives", "memory_of", "MEMORY_KEYS"]

SELECTIONS = ("pareto", "convex_hull")


MEMORY_KEYS = {"activations": "activation_memory_bytes", "total": "peak_memory_bytes"}


def memory_of(record: dict, memory: str = "activations") -> float:
    """The memory objective of a record: ``activations`` (default) or ``total`` (with weights)."""
    value = record.get(MEMORY_KEYS[memory])
    return float(record["peak_memory_bytes"] if value is None else value)


def objectives(records: list[dict], max_params: float, memory: str = "activations") -> np.ndarray:
    """[N, 3] minimised objectives (max_P - P, latency, memory) of measured records."""
    return np.asarray(
        [[max_params - r["decoder_params"], r["latency_s"], memory_of(r, memory)] for r in records], np.float64
    )


def front_records(measured: list[dict], selection: str = "pareto", memory: str = "activations") -> list[dict]:
    """The non-dominated measured records (optionally only those on the lower convex hull)."""
    if not measured:
        return []
    max_params = max(r["decoder_params"] for r in measured)
    idx = pareto_indices(objectives(measured, max_params, memory))
    front = [measured[i] for i in idx]
    if selection == "convex_hull" and len(front) > 2:
        pts = np.asarray([[r["latency_s"], -r["decoder_params"]] for r in front], np.float64)
        front = [front[i] for i in lower_convex_hull_indices(pts)]
    return front


@dataclasses.dataclass
class LTSState:
    """Everything rebuilt from the journal."""

    by_key: dict[str, dict] = dataclasses.field(default_factory=dict)  # measured or failed, by genome key
    measured: list[dict] = dataclasses.field(default_factory=list)
    iterations: list[dict] = dataclasses.field(default_factory=list)
    precompiled: list[dict] = dataclasses.field(default_factory=list)  # pieces compiled ahead, per iteration
    next_id: int = 0

    def replay(self, records: list[dict]) -> None:
        for rec in records:
            if rec["event"] in ("measured", "failed"):
                self.by_key[rec["key"]] = rec
                self.next_id = max(self.next_id, int(rec["id"]) + 1)
                if rec["event"] == "measured":
                    self.measured.append(rec)
            elif rec["event"] == "iteration":
                self.iterations.append(rec)
            elif rec["event"] == "precompiled":
                self.precompiled.append(rec)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in self.iterations:
            for key in it["population"]:
                out[key] = out.get(key, 0) + 1
        return out


def measurement_settings(lts) -> tuple[str, int, int]:
    """``lts.programs``, ``lts.max_pieces`` and ``lts.compile_threads`` (as a thread count,
    :func:`compile_threads`), checked (ValueError naming the setting)."""
    from nasjax.measure import hardware

    programs = str(lts.get("programs", "model"))
    if programs not in hardware.PROGRAMS:
        raise ValueError(f"lts.programs: expected one of {', '.join(hardware.PROGRAMS)}, got {programs!r}")
    max_pieces = lts.get("max_pieces", hardware.DEFAULT_MAX_PIECES)
    if isinstance(max_pieces, bool) or not isinstance(max_pieces, int) or max_pieces < 1:
        raise ValueError(f"lts.max_pieces: expected an int >= 1, got {max_pieces!r}")
    return programs, max_pieces, compile_threads(lts)


MAX_COMPILE_THREADS = 8


def compile_threads(lts) -> int:
    """``lts.compile_threads`` (auto | an int >= 1) as a thread count; ValueError naming it.

    ``auto``: min(8, usable cores), except on a GPU, where XLA times candidate kernels
    while it compiles (autotuning) and compiles sharing the GPU would disturb those
    timings: 1 there."""
    value = lts.get("compile_threads", "auto")
    if isinstance(value, str) and value.strip().lower() == "auto":
        import jax

        if jax.default_backend() == "gpu":
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(MAX_COMPILE_THREADS, cores))
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lts.compile_threads: expected auto or an int >= 1, got {value!r}")
    return value


class LTSMeasurer:
    """What a ``measure`` job computes on the device that runs it: parameter counts, latency,
    peak memory, FLOPs (and the zero-cost proxies named in ``lts.proxies``)."""

    def __init__(self, cfg):
        from nasjax.measure import hardware

        self.lts = cfg.lts
        self.proxies = tuple(p.strip() for p in str(self.lts.proxies).split(",") if p.strip())
        self.programs, max_pieces, self.compile_threads = measurement_settings(self.lts)
        hardware.set_max_pieces(max_pieces)

    def precompile(self, specs: list, should_stop=None) -> dict:
        """Compiles the pieces that measuring ``specs`` in this process would compile, on
        ``lts.compile_threads`` threads (:func:`nasjax.measure.hardware.precompile_pieces`)."""
        from nasjax.measure import hardware

        return hardware.precompile_pieces(
            specs,
            int(self.lts.seq_len),
            int(self.lts.batch),
            programs=self.programs,
            threads=self.compile_threads,
            should_stop=should_stop,
        )

    def measure_job(self, spec, payload: dict) -> dict:
        from nasjax.measure import hardware
        from nasjax.measure.params import count_params

        t0 = time.perf_counter()
        counts = count_params(spec)
        hw = hardware.measure_hardware(
            spec,
            int(self.lts.seq_len),
            batch=int(self.lts.batch),
            repeats=int(self.lts.latency_repeats),
            programs=self.programs,
        )
        fields = dict(
            counted_decoder_params=int(counts["non_embedding"]),
            total_params=int(counts["total"]),
            latency_s=hw.latency_s,
            latency_std_s=hw.latency_std_s,
            peak_memory_bytes=int(hw.peak_memory_bytes),
            activation_memory_bytes=int(hw.activation_memory_bytes),
            device_peak_bytes=hw.device_peak_bytes,
            flops=hw.flops,
            compile_seconds=hw.compile_seconds,
            compiled_pieces=hw.compiled_pieces,
            backend=hw.backend,
        )
        if self.proxies:
            from nasjax.measure.zero_cost import zero_cost_proxies

            fields["proxies"] = zero_cost_proxies(spec, int(self.lts.seq_len), names=self.proxies)
        fields["seconds"] = time.perf_counter() - t0
        return fields


class _Search:
    def __init__(self, ctx):
        self.ctx, self.cfg, self.log = ctx, ctx.cfg, ctx.log
        self.lts = self.cfg.lts
        self.space = StackSpace.from_config(self.lts.space)
        self.vocab = int(self.lts.vocab_size) or int(ctx.tokenizer.vocab_size)
        if self.lts.memory not in MEMORY_KEYS:
            raise ValueError(f"lts.memory: expected one of {', '.join(MEMORY_KEYS)}, got {self.lts.memory!r}")
        if self.lts.selection not in SELECTIONS:
            raise ValueError(f"lts.selection: expected one of {', '.join(SELECTIONS)}, got {self.lts.selection!r}")
        self.state = LTSState()
        self.state.replay(ctx.journal.records)
        ctx.journal.release_records()  # replayed into self.state; the file keeps them (journal docstring)
        self.n_measured_now = 0
        self.measure_seconds = 0.0
        self.pending: dict[int, tuple] = {}
        self.measurer = LTSMeasurer(self.cfg)

    # ------------------------------------------------------------------ measurement
    def spec(self, genome: StackGenome):
        return self.space.decode(genome, vocab_size=self.vocab, max_len=int(self.lts.seq_len))

    def prepare(self, genome: StackGenome, iteration: int, origin: str):
        """A ``measure`` :class:`~nasjax.search.engine.Job`, or the (already journaled) record."""
        from nasjax.search.engine import Job

        key = genome.key()
        if key in self.state.by_key:
            return self.state.by_key[key]
        base = {"id": self.state.next_id, "key": key, "iteration": iteration, "origin": origin}
        base["genome"] = genome.to_dict()
        self.state.next_id += 1
        reason = self.space.check(genome)
        if reason is not None:
            return self._append("failed", stage="constraint", reason=reason, **base)
        try:
            spec = self.spec(genome)
        except Exception as e:
            return self._append("failed", stage="measure", reason=f"{type(e).__name__}: {e}"[:400], **base)
        self.pending[base["id"]] = (genome, base)
        return Job(base["id"], "measure", spec.to_dict(), route=key)

    def finish(self, job, result: dict) -> dict:
        """Journals a measurement (or its failure), applying the latency and memory caps."""
        genome, base = self.pending.pop(job.key)
        self.measure_seconds += float(result.get("seconds", 0.0))
        if not result["ok"]:
            return self._append("failed", stage="measure", reason=result["reason"], **base)
        fields = {k: v for k, v in result.items() if k not in ("ok", "seconds")}
        fields["decoder_params"] = int(self.space.decoder_params(genome))
        cap_lat, cap_mem = float(self.lts.max_latency_s), int(self.lts.max_memory_bytes)
        if cap_lat and fields["latency_s"] > cap_lat:
            reason = f"latency {fields['latency_s'] * 1e3:.2f} ms > lts.max_latency_s={cap_lat:g}"
            return self._append("failed", stage="constraint", reason=reason, **base, **fields)
        if cap_mem and memory_of(fields, self.lts.memory) > cap_mem:
            mib = memory_of(fields, self.lts.memory) / 2**20
            reason = f"{self.lts.memory} memory {mib:.1f} MiB > lts.max_memory_bytes"
            return self._append("failed", stage="constraint", reason=reason, **base, **fields)
        self.n_measured_now += 1
        return self._append("measured", **base, **fields)

    def _append(self, event: str, **fields) -> dict:
        rec = self.ctx.journal.append(event, **fields)
        self.state.by_key[rec["key"]] = rec
        if event == "measured":
            self.state.measured.append(rec)
        return rec

    def precompile(self, pop: list[tuple[StackGenome, str]], iteration: int, should_stop=None) -> None:
        """Compiles ahead the pieces of ``pop``'s architectures not yet measured
        (LTSMeasurer.precompile) and journals what it did (a ``precompiled`` record)."""
        specs = []
        for genome, _ in pop:
            if genome.key() in self.state.by_key or self.space.check(genome) is not None:
                continue
            try:
                specs.append(self.spec(genome))
            except Exception:  # noqa: BLE001 - prepare() journals it as a failure
                continue
        ahead = self.measurer.precompile(specs, should_stop)
        self.measure_seconds += ahead["seconds"] + ahead["plan_seconds"]  # for the progress line's rate
        if not ahead["pieces"]:
            return
        self.log(
            f"compiled {ahead['pieces']} pieces ahead for {len(specs)} architectures in {ahead['seconds']:.1f}s "
            f"({self.measurer.compile_threads} threads; finding them {ahead['plan_seconds']:.1f}s)"
        )
        rec = self.ctx.journal.append("precompiled", iteration=iteration, **ahead)
        self.state.precompiled.append(rec)

    # ------------------------------------------------------------------ populations
    def _unseen(self, make, n: int, seen: set[str]) -> list[tuple[StackGenome, str]]:
        out, attempts = [], 0
        while len(out) < n and attempts < 200 * max(n, 1):
            attempts += 1
            made = make()
            if made is None:
                break
            genome, origin = made
            key = genome.key()
            if key in seen:
                continue
            seen.add(key)
            out.append((genome, origin))
        return out

    def population(self, iteration: int) -> list[tuple[StackGenome, str]]:
        """The population of ``iteration``, from what earlier iterations measured only (so a
        half-measured iteration regenerates identically on resume)."""
        rng = np.random.default_rng([int(self.cfg.seed), iteration])
        earlier = [r for r in self.state.by_key.values() if int(r["iteration"]) < iteration]
        seen = {r["key"] for r in earlier}
        if iteration == 0:
            return self._unseen(lambda: (self.space.sample(rng), "random"), int(self.cfg.search.population_size), seen)
        measured = [r for r in self.state.measured if int(r["iteration"]) < iteration]
        front = front_records(measured, self.lts.selection, self.lts.memory)
        if not front:  # nothing measurable yet: start again from random genes
            return self._unseen(lambda: (self.space.sample(rng), "random"), int(self.cfg.search.population_size), seen)
        counts = self.state.counts()
        weights = parent_weights([counts.get(r["key"], 0) for r in front])
        picks = rng.choice(len(front), size=int(self.lts.parent_size), replace=True, p=weights)
        parents = [StackGenome.from_dict(front[int(i)]["genome"]) for i in picks]
        pop = [(g, "parent") for g in parents]
        prob_m, prob_c = float(self.lts.mutation_prob), float(self.lts.crossover_prob)
        mutants = self._unseen(
            lambda: (self.space.mutate(parents[rng.integers(len(parents))], rng, prob_m), "mutation"),
            int(self.lts.mutation_size),
            seen,
        )
        distinct = {g.key(): g for g in parents}
        pool = list(distinct.values())

        def cross():
            if len(pool) < 2:
                return None
            a, b = rng.choice(len(pool), size=2, replace=False)
            return self.space.crossover(pool[int(a)], pool[int(b)], rng, prob_c), "crossover"

        crosses = self._unseen(cross, int(self.lts.crossover_size), seen)
        return pop + mutants + crosses


def run_lts(ctx) -> Any:
    """The LTS driver for :func:`nasjax.search.run.run_search`."""
    import jax

    from nasjax.search.engine import Job, make_engine
    from nasjax.search.lts_results import export_lts
    from nasjax.search.run import SearchSummary
    from nasjax.train.run import StopFlag

    search = _Search(ctx)
    cfg, log, journal = ctx.cfg, ctx.log, ctx.journal
    n_iter = int(cfg.search.iterations)
    done = len(search.state.iterations)
    log(
        f"LTS on {jax_backend()}: {_describe(search.space)}; population {cfg.search.population_size}, "
        f"{n_iter} iterations, seq_len {cfg.lts.seq_len}, batch {cfg.lts.batch}, {cfg.lts.latency_repeats} repeats"
        + (f"\nresuming: {len(search.state.by_key)} architectures, {done} iterations from the journal" if done else "")
    )
    status = "finished"
    with StopFlag() as stop:
        engine = make_engine(cfg, ctx.tokenizer, search.measurer, should_stop=lambda: stop.stop, log=log)
        # the measurer runs in this process: an iteration's pieces can be compiled ahead here
        in_process = str(cfg.get("engine", "inline") or "inline") == "inline" and jax.process_count() == 1

        def stopping() -> bool:
            return stop.stop or ctx.time_is_up()

        try:
            for iteration in range(done, n_iter + 1):
                pop = search.population(iteration)
                t0 = time.perf_counter()
                if in_process and not stopping():
                    search.precompile(pop, iteration, stopping)
                todo, done_now, running = list(pop), 0, 0
                while (todo or running) and not stopping():
                    while todo and engine.busy() < engine.capacity:
                        genome, origin = todo.pop(0)
                        out = search.prepare(genome, iteration, origin)
                        if isinstance(out, Job):
                            engine.submit(out)
                            running += 1
                        else:
                            done_now += 1
                    for job, result in engine.wait(timeout=1.0):
                        search.finish(job, result)
                        running -= 1
                        done_now += 1
                        if done_now % 10 == 0 or done_now == len(pop):
                            log(_progress(search, iteration, n_iter, done_now, len(pop), ctx))
                if stop.stop:
                    status = "interrupted"
                    break
                if ctx.time_is_up():
                    status = "time_limit"
                    break
                front = front_records(search.state.measured, cfg.lts.selection, cfg.lts.memory)
                rec = journal.append(
                    "iteration",
                    iteration=iteration,
                    population=[g.key() for g, _ in pop],
                    front=[r["id"] for r in front],
                    seconds=time.perf_counter() - t0,
                )
                search.state.iterations.append(rec)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            engine.close()
    if status != "finished":
        log(f"search {status}; the same command resumes from {journal.path}")
    exports = export_lts(ctx.workdir, log=log)
    failures = sum(1 for r in search.state.by_key.values() if r["event"] == "failed")
    return SearchSummary(
        status=status,
        evaluations=len(search.state.by_key),
        failures=failures,
        cache_hits=0,
        best_id=None,
        best_fitness=None,
        compile_seconds=sum(float(r.get("compile_seconds") or 0) for r in search.state.measured)
        + sum(float(r.get("seconds") or 0) for r in search.state.precompiled),
        train_seconds=0.0,
        probe_seconds=0.0,
        wall_seconds=time.perf_counter() - ctx.t_start,
        extra={"front_size": exports.front_size, "measured_now": search.n_measured_now},
    )


def _describe(space: StackSpace) -> str:
    span = lambda v: f"{v[0]}-{v[-1]}"
    return (
        f"GPT-2 decoders, {span(space.n_layer)} layers, d_model {span(space.d_model)}, d_inner "
        f"{span(space.d_inner)} (> {space.d_inner_ratio:g} d_model), heads {list(space.n_head)}"
    )


def jax_backend() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.default_backend()} ({d.device_kind})"


def _progress(search: _Search, iteration: int, n_iter: int, k: int, n: int, ctx) -> str:
    front = front_records(search.state.measured, search.lts.selection, search.lts.memory)
    rate = search.n_measured_now / max(search.measure_seconds, 1e-9)
    failed = sum(1 for r in search.state.by_key.values() if r["event"] == "failed")
    return (
        f"iteration {iteration}/{n_iter} [{k}/{n}] | measured {len(search.state.measured)} failed {failed} "
        f"| front {len(front)} | {rate:.2f} arch/s | {time.perf_counter() - ctx.t_start:.0f}s"
    )
