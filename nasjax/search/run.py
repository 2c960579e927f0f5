"""``nasjax search``: the controller of an evolutionary search, driven by its journal.

A search workdir::

    WORKDIR/journal.jsonl    every event (the search's only state; resume = replay)
    WORKDIR/config.json      the config the search was started with
    WORKDIR/tokenizer.json   the tokenizer every candidate uses
    WORKDIR/status.json      running | finished | time_limit | interrupted, with counts and the best
    WORKDIR/results.csv, best_spec.json, best_program.txt, fitness.png   (exports)

Journal events (one JSON line each; fields beyond ``event``/``seq``/``time``):

``search``    method, config (first record; a resume must use the same settings, only
              ``search.max_evaluations`` and machine-local keys may change)
``proposed``  id, parent, origin (``seed:NAME`` or the mutation kind), detail, hash, genome,
              thresholds (Primer: the hurdle thresholds when it was asked), op (AutoBERT-Zero)
``started``   id, thresholds (the hurdle thresholds handed to this evaluation)
``hurdle``    id, hurdle, fitness, threshold, passed, step, train_seconds
``finished``  id, fitness, stopped_at_hurdle, hurdle_fitness, steps, params, compile_seconds,
              train_seconds, probe_seconds, xla_compile_seconds (every XLA compile of the
              candidate's jobs, per-op programs of its probe included: nasjax.compile_meter),
              memory_bytes, hash, fec_hash, fec_hash_alt, cached_from, reason
``failed``    id, stage, reason, hash, fec_hash, params, cached_from

Resume: the records are replayed into the evolution (proposals, results) and the hurdle
book, a candidate that was proposed but never finished is evaluated again first (same
genome), and the search continues. Hurdle observations enter the book when their
candidate's result is told, so a half-evaluated candidate from a killed run never
influences thresholds: with a step budget the resumed search follows exactly the
trajectory of an uninterrupted one.

Evaluations in flight (``search.in_flight`` = N, :mod:`nasjax.search.engine`): results are
journaled when they arrive (in any order) and told to the evolution in id order;
candidate j is asked right after j - N is told. Replay applies the same rule, so inline
and Ray searches with the same seed and N evaluate the same candidates.

Duplicates: a genome identical to an evaluated one (canonical hash), or one whose probe
outputs hash like an evaluated one's (functional equivalence), reuses that result
(``cached_from``) instead of training again; candidate j only re-uses candidates 0 .. j - N.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections

from nasjax.data import make_text_data, resolve_files, split_files
from nasjax.search.evaluate import Interrupted, TrainingEvaluator
from nasjax.search.evolution import HurdleBook, Proposal, RegularizedEvolution
from nasjax.search.journal import Journal
from nasjax.spec import SpecError
from nasjax.train.run import StopFlag, make_mesh, resolve_data_path, setup_compile_cache, tokenizer_for_run

__all__ = ["SearchError", "SearchSummary", "SearchContext", "run_search", "make_space", "RESUMABLE_KEYS"]

JOURNAL = "journal.jsonl"
# Keys that may differ between the run that wrote a journal and the one resuming it.
RESUMABLE_KEYS = (
    "search.max_evaluations",
    "search.iterations",
    "search.max_seconds",
    "search.clear_caches",
    "search.clear_caches_every",
    "search.compile_ahead",
    # the same optimizer math per element, summed in another order: results differ only by
    # float rounding, so a search started before the setting existed (or with it off) resumes
    "train.flat_optimizer",
    # the same step computed as shared pieces: results differ only by float rounding, except
    # under search.max_memory_bytes, whose estimate comes from one program's analysis or from
    # the pieces' (cut differently by train.segmented_pieces): a candidate near the bound can
    # be refused on one side and trained on the other
    "train.segmented",
    "train.segmented_pieces",
    "train.segmented_update_chunk",
    # the same pieces compiled with other XLA kernel emitters: results differ only by float
    # rounding (a search started before the setting existed resumes), and XLA's memory
    # analysis of the pieces, which search.max_memory_bytes reads, may differ slightly
    "train.segmented_xla_options",
    # the same init and probe computed op by op instead of as one compiled program: values
    # differ only by float rounding (a search started before the setting existed resumes)
    "search.op_by_op",
    "search.op_by_op_clear_every",
    # the same verdicts (finite, causal) from the train-step pieces; equivalence hashes of the
    # two probes differ, so a resumed search only finds fewer equivalent candidates across it.
    # (With steps, search.max_memory_bytes is checked before the probe: a candidate above it
    # fails at "memory" where the model probe would have failed it at "probe" or reused an
    # equivalent's fitness.)
    "search.probe",
    "compile_cache_dir",
    "compile_cache_min_seconds",
    "compile_cache_max_mb",
    "data.cache_dir",
    "engine",
    "ray_address",
    "ray_actors",
    "ray_cpus_per_actor",
    "ray_gpus_per_actor",
    "ray_max_restarts",
    "ray_object_store_mb",
    "process_recycle_every",
    "process_max_mb",
    "process_max_restarts",
    "process_start_timeout_s",
    "collective_timeout_s",
    # how many compiled LTS pieces a process keeps: memory only, the measurements are alike
    "lts.max_pieces",
    # how many threads compile an LTS population's pieces ahead: the same programs, timed alike
    "lts.compile_threads",
    # how many bytes of compiled step pieces a process keeps: memory and recompiles only
    "train.segmented_max_mb",
)

# Settings added after journals were written with their old behaviour: a journal whose
# header lacks the key ran with this value (so resuming it asks for that value).
LEGACY_DEFAULTS = {"lts.programs": "model"}


# Failures that may not repeat (a backend hiccup, a compile-time OOM): never reused for duplicates.
TRANSIENT_STAGES = ("internal", "compile")


class SearchError(RuntimeError):
    """A search cannot start or resume (clear message; the journal is untouched)."""


def replay_proposal(evo, space, rec: dict, journal_path) -> None:
    """Registers a journal ``proposed`` record with the evolution (SearchError if it does not parse)."""
    try:
        genome = space.genome_from_json(rec["genome"], f"journal record seq {rec.get('seq')}")
        evo.register(Proposal(rec["id"], genome, rec.get("parent"), rec.get("origin", ""), rec.get("detail", "")))
    except (KeyError, ValueError, SpecError) as e:
        raise SearchError(f"{journal_path}: cannot replay record seq {rec.get('seq')}: {e}") from None


class ResultIndex:
    """Evaluated results by genome hash and probe (FEC) hash, for re-use, and the costs so far."""

    def __init__(self):
        self.by_hash: dict[str, dict] = {}
        self.by_fec: dict[str, dict] = {}
        self.cache_hits = 0
        self.compile_seconds = self.train_seconds = self.probe_seconds = 0.0
        self.xla_compile_seconds = 0.0  # every XLA compile of every job (nasjax.compile_meter)

    def add(self, rec: dict) -> None:
        transient = rec["event"] == "failed" and rec.get("stage") in TRANSIENT_STAGES
        if rec.get("cached_from") is None and not transient:
            if rec.get("hash"):
                self.by_hash.setdefault(rec["hash"], rec)
            for key in ("fec_hash", "fec_hash_alt"):
                if rec.get(key):
                    self.by_fec.setdefault(f"{key}:{rec[key]}", rec)
        elif rec.get("cached_from") is not None:
            self.cache_hits += 1
        self.compile_seconds += float(rec.get("compile_seconds") or 0.0)
        self.train_seconds += float(rec.get("train_seconds") or 0.0)
        self.probe_seconds += float(rec.get("probe_seconds") or 0.0)
        self.xla_compile_seconds += float(rec.get("xla_compile_seconds") or 0.0)

    def match(self, check: dict) -> dict | None:
        """An earlier result whose probe outputs hash like ``check``'s (either rounding grid)."""
        keys = (f"fec_hash:{check.get('fec_hash')}", f"fec_hash_alt:{check.get('fec_hash_alt')}")
        return next((self.by_fec[k] for k in keys if k in self.by_fec), None)


def add_job_compile(base: dict, result: dict) -> None:
    """Adds a job's XLA compile seconds (``engine.run_job``) to its candidate's record fields:
    a candidate's ``xla_compile_seconds`` sums its jobs (check, then train)."""
    base["xla_compile_seconds"] = float(base.get("xla_compile_seconds", 0.0)) + float(
        result.get("xla_compile_seconds") or 0.0
    )


def make_space(cfg, vocab_size: int):
    """The genome space of an evolutionary (program) search."""
    if cfg.search.method == "autobert":
        from nasjax.search.autobert import AutoBertSpace

        return AutoBertSpace(cfg, vocab_size)
    from nasjax.search.primer import PrimerSpace

    if cfg.search.method != "primer":
        raise SearchError(f"search.method={cfg.search.method!r} has no evolution space")
    return PrimerSpace(cfg, vocab_size)


@dataclasses.dataclass
class SearchSummary:
    status: str
    evaluations: int
    failures: int
    cache_hits: int
    best_id: int | None
    best_fitness: float | None
    compile_seconds: float
    train_seconds: float
    probe_seconds: float
    wall_seconds: float
    extra: dict = dataclasses.field(default_factory=dict)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _check_same_search(header: dict, cfg, path: str) -> None:
    old = _flatten(header.get("config", {}))
    new = _flatten(json.loads(cfg.to_json()))
    for key, value in LEGACY_DEFAULTS.items():
        if key in new and key not in old:
            old[key] = value
    if header.get("method") != cfg.search.method:
        raise SearchError(f"{path} holds a {header.get('method')!r} search, not {cfg.search.method!r}")
    diffs = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k)]
    if diffs:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs[:4])
        raise SearchError(
            f"{path} holds a search with different settings ({shown}); resume with the same config "
            f"(only {', '.join(RESUMABLE_KEYS)} may change) or use a new --workdir"
        )


class EvolutionController(ResultIndex):
    """Journal-driven state of an evolutionary search with ``in_flight`` evaluations at once.

    The rules of :mod:`nasjax.search.engine` live here: results are journaled as they
    arrive and *told* (to the evolution, hurdle book, UCB, supernet) in candidate order;
    candidate j is asked right after candidate j - N is told; re-use only looks at
    candidates 0 .. j - N. Subclasses add ``_told(rec)``, ``proposal_fields(proposal)``,
    ``replay_other(rec)``, ``start(proposal)`` and ``advance(job, result)``.
    """

    def __init__(self, journal: Journal, space, evo: RegularizedEvolution, in_flight: int):
        ResultIndex.__init__(self)
        self.journal, self.space, self.evo = journal, space, evo
        self.in_flight = max(1, int(in_flight))
        # ids of the journaled results, and how many failed. A result record stays alive only
        # where a later candidate may reuse it (ResultIndex) or until it is told; holding every
        # record here kept reused ones too, for the whole search.
        self.terminal: set[int] = set()
        self.n_failed = 0
        self._untold: dict[int, dict] = {}  # journaled, waiting for earlier candidates
        self.told_upto = 0  # candidates 0 .. told_upto - 1 are told
        self.live = False
        self.queue: list[int] = []  # asked, not started yet (id order)

    # ------------------------------------------------------------------ hooks
    def _told(self, rec: dict) -> None:
        raise NotImplementedError

    def proposal_fields(self, proposal: Proposal) -> dict:
        return {}

    def replay_proposed(self, rec: dict) -> None:
        pass

    def replay_other(self, rec: dict) -> None:
        pass

    # ------------------------------------------------------------------ replay and order
    def replay(self) -> None:
        for rec in self.journal.records:
            event = rec["event"]
            if event == "proposed":
                replay_proposal(self.evo, self.space, rec, self.journal.path)
                self.replay_proposed(rec)
            elif event in ("finished", "failed"):
                if rec["id"] not in self.evo.pending or rec["id"] in self.terminal:
                    raise SearchError(
                        f"{self.journal.path}: result for candidate {rec['id']} that is not pending (seq {rec['seq']})"
                    )
                self._result(rec)
            else:
                self.replay_other(rec)

    def go_live(self) -> None:
        """After replay: re-queue proposed-but-unfinished candidates and ask ahead."""
        self.live = True
        self.queue = sorted(cid for cid in self.evo.pending if cid not in self.terminal)
        self.ask_ahead()

    def ask_ahead(self) -> None:
        """Asks every candidate the rule allows now (ids up to told_upto + N - 1)."""
        while self.evo.next_id <= self.told_upto + self.in_flight - 1:
            proposal = self.evo.ask()
            self.journal.append(
                "proposed",
                id=proposal.id,
                parent=proposal.parent,
                origin=proposal.origin,
                detail=proposal.detail,
                **self.proposal_fields(proposal),
                hash=self.space.genome_hash(proposal.genome),
                genome=self.space.genome_to_json(proposal.genome),
            )
            self.queue.append(proposal.id)

    def _result(self, rec: dict) -> None:
        self.terminal.add(rec["id"])
        self.n_failed += rec["event"] == "failed"
        self._untold[rec["id"]] = rec
        while self.told_upto in self._untold:
            self._told(self._untold.pop(self.told_upto))
            self.told_upto += 1
            if self.live:
                self.ask_ahead()

    def append_result(self, event: str, **fields) -> dict:
        rec = self.journal.append(event, **fields)
        self._result(rec)
        return rec

    def visible(self, source: dict | None, cid: int) -> dict | None:
        """``source`` if candidate ``cid`` may re-use it (told, and at most cid - N)."""
        return source if source is not None and source["id"] <= cid - self.in_flight else None

    def failures(self) -> int:
        return self.n_failed


class _Controller(EvolutionController):
    """Primer: hurdles, thresholds fixed when a candidate is asked, probe (FEC) re-use."""

    def __init__(self, cfg, workdir: str, journal: Journal, space, log):
        s = cfg.search
        self.cfg, self.workdir, self.log = cfg, workdir, log
        evo = RegularizedEvolution(
            space.seeds(),
            space.mutate,
            int(s.population_size),
            int(s.tournament_size),
            int(cfg.seed),
            keep_genomes=False,  # bounded memory over a long search; the journal keeps them all
        )
        EvolutionController.__init__(self, journal, space, evo, int(s.get("in_flight", 1)))
        self.book = HurdleBook(int(s.hurdles), float(s.hurdle_quantile), int(s.hurdle_min_samples))
        self.open_hurdles: dict[int, list[tuple[int, float]]] = {}
        self.thresholds: dict[int, list] = {}
        self.base: dict[int, dict] = {}

    # ------------------------------------------------------------------ replay
    def proposal_fields(self, proposal: Proposal) -> dict:
        self.thresholds[proposal.id] = self.book.thresholds()
        return {"thresholds": self.thresholds[proposal.id]}

    def replay_proposed(self, rec: dict) -> None:
        if rec.get("thresholds") is not None:
            self.thresholds[rec["id"]] = rec["thresholds"]

    def replay_other(self, rec: dict) -> None:
        event = rec["event"]
        if event == "started":
            self.open_hurdles[rec["id"]] = []
            self.thresholds.setdefault(rec["id"], rec.get("thresholds") or [])  # journals before in_flight
        elif event == "hurdle":
            self.open_hurdles.setdefault(rec["id"], []).append((rec["hurdle"], rec["fitness"]))

    def _told(self, rec: dict) -> None:
        cid = rec["id"]
        fitness = rec.get("fitness") if rec["event"] == "finished" else None
        self.evo.tell(cid, fitness)
        self.thresholds.pop(cid, None)  # fixed at its ask, used by its training only
        for hurdle, value in self.open_hurdles.pop(cid, []):
            self.book.record(hurdle, value)
        self.add(rec)

    # ------------------------------------------------------------------ evaluation
    def _reuse(self, cid: int, source: dict, why: str, **fields) -> dict:
        self.base.pop(cid, None)
        event, record = reused_record(cid, source, why, fields)
        return self.append_result(event, **record)

    def start(self, proposal: Proposal):
        """A :class:`Job` (the probe) or, when nothing needs computing, the journaled result."""
        from nasjax.search.engine import Job

        cid = proposal.id
        genome_hash = self.space.genome_hash(proposal.genome)
        thresholds = self.thresholds.setdefault(cid, self.book.thresholds())
        self.journal.append("started", id=cid, thresholds=thresholds)
        self.open_hurdles[cid] = []
        source = self.visible(self.by_hash.get(genome_hash), cid)
        if source is not None:
            return self._reuse(cid, source, "identical genome to", hash=genome_hash)
        try:
            spec = self.space.decode(proposal.genome)
        except SpecError as e:
            return self.append_result("failed", id=cid, stage="decode", reason=str(e), hash=genome_hash)
        self.base[cid] = {"hash": genome_hash}
        return Job(cid, "check", spec.to_dict(), route=genome_hash)

    def advance(self, job, result: dict):
        """The next job of a candidate after ``result``, or its journaled result."""
        from nasjax.search.engine import Job

        cid = job.key
        base = self.base[cid]
        add_job_compile(base, result)
        if not result["ok"]:
            self._journal_hurdles(cid, result.get("hurdles", []))
            self.base.pop(cid)
            return self.append_result("failed", id=cid, stage=result["stage"], reason=result["reason"], **base)
        if job.stage == "check":
            base.update({k: result[k] for k in ("params", "fec_hash", "fec_hash_alt", "probe_seconds")})
            match = self.visible(self.match(base), cid) if self.cfg.search.fec else None
            if match is not None:
                return self._reuse(cid, match, "functionally equivalent to", **base)
            return Job(cid, "train", job.spec, {"thresholds": self.thresholds[cid]}, route=job.route)
        self._journal_hurdles(cid, result["hurdles"])
        self.base.pop(cid)
        fields = ("fitness", "stopped_at_hurdle", "hurdle_fitness", "steps", "compile_seconds", "train_seconds")
        return self.append_result(
            "finished",
            id=cid,
            **{k: result[k] for k in fields},
            memory_bytes=result["memory_bytes"],
            val_bpb=result.get("val_bpb"),
            **base,
        )

    def _journal_hurdles(self, cid: int, hurdles: list[dict]) -> None:
        for h in hurdles:
            self.journal.append("hurdle", id=cid, **h)
            self.open_hurdles.setdefault(cid, []).append((h["hurdle"], h["fitness"]))

    def progress_line(self, rec: dict, total: int, wall: float) -> str:
        best = self.evo.best()
        n = len(self.terminal)
        p = self.evo.proposals[rec["id"]]
        origin = p.origin if p.parent is None else f"{p.origin} of #{p.parent}"
        if rec["event"] == "failed":
            what = f"FAILED ({rec.get('stage')}: {rec.get('reason', '')[:70]})"
        else:
            stop = rec.get("stopped_at_hurdle")
            what = f"fitness {rec['fitness']:.4f}" + (f" (stopped at hurdle {stop})" if stop is not None else "")
            if rec.get("cached_from") is not None:
                what += f" [reused #{rec['cached_from']}]"
        best_text = f"best {best[1]:.4f} (#{best[0]})" if best else "best -"
        compile_total = self.compile_seconds + self.probe_seconds
        share = compile_total / max(compile_total + self.train_seconds, 1e-9)
        return (
            f"[{n}/{total}] #{rec['id']} {origin}: {what} | {best_text} | failed {self.failures()} "
            f"| compile+probe {compile_total:.0f}s ({share:.0%}) train {self.train_seconds:.0f}s "
            f"| XLA compiling {self.xla_compile_seconds:.0f}s | {wall:.0f}s"
        )


def reused_record(candidate_id: int, source: dict, why: str, fields: dict) -> tuple[str, dict]:
    """(event, fields) of a result copied from ``source`` (identical or equivalent candidate).

    The source's outcome (fitness, hurdle stop, steps, or its failure stage and reason)
    is copied; ``fields`` (this candidate's own hash, probe hashes, params) win on overlap.
    """
    if source["event"] == "failed":
        record = {"stage": source.get("stage"), "reason": f"{why} #{source['id']}: {source.get('reason')}"}
    else:
        record = {k: source.get(k) for k in ("fitness", "stopped_at_hurdle", "hurdle_fitness", "steps", "params")}
        record["reason"] = f"{why} #{source['id']}"
    record.update(fields)
    record.update(id=candidate_id, cached_from=source["id"])
    return source["event"], record


def build_text_data(cfg, tokenizer, kind: str, log=print):
    """The LM or MLM data of ``cfg.data`` / ``cfg.train.batch_size`` with ``tokenizer`` (this process's shard)."""
    return make_text_data(
        path=resolve_files(resolve_data_path(cfg, log)),
        val_files=[v.strip() for v in cfg.data.val_files.split(",") if v.strip()],
        val_fraction=cfg.data.val_fraction,
        tokenizer=tokenizer,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        kind=kind,
        cache_dir=cfg.data.cache_dir or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        log=log,
    )


def _build_data(cfg, workdir: str, log):
    """The search's tokenizer (trained on the training split, or the workdir's) and data."""
    files = resolve_files(resolve_data_path(cfg, log))
    val_names = [v.strip() for v in cfg.data.val_files.split(",") if v.strip()]
    split = split_files(files, val_names, cfg.data.val_fraction, cfg.seed)
    tokenizer = tokenizer_for_run(cfg, workdir, split.train)
    kind = "mlm" if cfg.search.method == "autobert" else "lm"
    return tokenizer, build_text_data(cfg, tokenizer, kind, log)


@dataclasses.dataclass
class SearchContext:
    """What every search method gets from :func:`run_search` (journal opened, data built)."""

    cfg: Any
    workdir: str
    journal: Journal
    header: dict | None
    tokenizer: Any
    data: Any
    mesh: Any
    rules: Any
    log: Any
    t_start: float

    def time_is_up(self) -> bool:
        limit = self.cfg.search.max_seconds
        return bool(limit) and time.perf_counter() - self.t_start >= limit


def _drivers() -> dict[str, Any]:
    from nasjax.search.autobert import run_autobert
    from nasjax.search.lts import run_lts

    return {"primer": _run_evolution, "lts": run_lts, "autobert": run_autobert}


def run_search(cfg: ml_collections.ConfigDict, workdir: str, log=print) -> SearchSummary:
    """Runs (or resumes) the search of ``cfg`` in ``workdir``; see the module docstring."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if "search" not in cfg:
        raise SearchError("this config has no 'search' section; use a search config (configs/search/*.py)")
    drivers = _drivers()
    if cfg.search.method not in drivers:
        raise SearchError(f"search.method={cfg.search.method!r} is not available; available: {', '.join(drivers)}")
    from nasjax.search.engine import check_engine_settings

    check_engine_settings(cfg)
    if jax.process_count() > 1 and jax.process_index() != 0:
        return _follow(cfg, t_start, log)
    os.makedirs(workdir, exist_ok=True)
    with Journal(os.path.join(workdir, JOURNAL), log=log) as journal:
        header = next((r for r in journal.records if r["event"] == "search"), None)
        if header is None and journal.records:
            raise SearchError(f"{journal.path}: the first record is not the search header")
        if header is not None:
            _check_same_search(header, cfg, str(journal.path))
        setup_compile_cache(cfg)
        mesh, rules = make_mesh(cfg)
        tokenizer, data = _build_data(cfg, workdir, log)
        if jax.process_count() > 1:
            from nasjax.distributed import broadcast_json

            broadcast_json(tokenizer.to_config(embed=True))  # the followers' tokenizer
        if header is None:
            header = journal.append("search", method=cfg.search.method, config=json.loads(cfg.to_json()))
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(cfg.to_json(indent=2))
        ctx = SearchContext(cfg, workdir, journal, header, tokenizer, data, mesh, rules, log, t_start)
        return drivers[cfg.search.method](ctx)


def _follow(cfg, t_start: float, log) -> SearchSummary:
    """Processes 1..N-1 of a multi-process search: run process 0's jobs (no journal here)."""
    from nasjax.data import tokenizer_from_config
    from nasjax.distributed import Watchdog, broadcast_json, follow
    from nasjax.search.engine import make_adapter

    setup_compile_cache(cfg)
    mesh, rules = make_mesh(cfg)
    timeout = float(cfg.get("collective_timeout_s", 3600.0))
    with Watchdog(timeout, "waiting for process 0 to start the search"):
        tokenizer = tokenizer_from_config(broadcast_json(None))
    adapter = make_adapter(str(cfg.search.method), cfg, tokenizer, mesh, rules, log=lambda *a: None)
    done = follow(adapter, timeout)
    log(f"process {jax.process_index()}: ran {len(done)} jobs for process 0")
    return SearchSummary(
        status="follower",
        evaluations=len({k for k, _, _ in done}),
        failures=0,
        cache_hits=0,
        best_id=None,
        best_fitness=None,
        compile_seconds=0.0,
        train_seconds=0.0,
        probe_seconds=0.0,
        wall_seconds=time.perf_counter() - t_start,
        extra={"jobs": done},
    )


def _run_evolution(ctx: SearchContext) -> SearchSummary:
    """Regularized evolution with hurdles (Primer): the loop of the module docstring."""
    cfg, journal, log, t_start = ctx.cfg, ctx.journal, ctx.log, ctx.t_start
    space = make_space(cfg, ctx.tokenizer.vocab_size)
    evaluator = TrainingEvaluator(cfg, ctx.data, ctx.mesh, ctx.rules, log=log)
    ctl = _Controller(cfg, ctx.workdir, journal, space, log)
    ctl.replay()
    total = int(cfg.search.max_evaluations)
    resumed = len(ctl.terminal)
    log(
        f"{space.describe()}\npopulation {cfg.search.population_size}, tournament {cfg.search.tournament_size}, "
        f"{cfg.search.hurdles} hurdles; budget per candidate {evaluator.budget_text()}; devices "
        f"{jax.device_count()} mesh {dict(ctx.mesh.shape)}"
        + (f"\nresuming: {resumed} evaluations replayed from {journal.path}" if journal.records[1:] else "")
    )
    status = evolution_loop(ctx, ctl, evaluator, total)
    best = ctl.evo.best()
    return SearchSummary(
        status=status,
        evaluations=len(ctl.terminal),
        failures=ctl.failures(),
        cache_hits=ctl.cache_hits,
        best_id=best[0] if best else None,
        best_fitness=best[1] if best else None,
        compile_seconds=ctl.compile_seconds,
        train_seconds=ctl.train_seconds,
        probe_seconds=ctl.probe_seconds,
        wall_seconds=time.perf_counter() - t_start,
        extra={
            "engine": str(cfg.get("engine", "inline")),
            "in_flight": ctl.in_flight,
            "xla_compile_seconds": ctl.xla_compile_seconds,
        },
    )


def evolution_loop(ctx: SearchContext, ctl: EvolutionController, adapter, total: int) -> str:
    """The ask -> journal -> evaluate loop shared by the evolutionary searches.

    ``ctl`` is an :class:`EvolutionController` with ``start``/``advance``/``progress_line``;
    ``adapter`` evaluates jobs in this process (the inline engine) or describes what the
    Ray actors build (``engine=ray``). Candidates proposed but unfinished (a resumed
    search's in-flight ones) are evaluated first. Returns the final status (finished |
    interrupted | time_limit) after writing it to ``status.json``.
    """
    from nasjax.search.engine import Job, make_engine

    cfg, journal, log = ctx.cfg, ctx.journal, ctx.log
    # the controller has replayed the journal into its own state; the file keeps the records,
    # and holding them all too would add ~18 MiB per 1,000 Primer evaluations
    journal.release_records()
    status = "finished"
    write_status(ctx.workdir, ctl, "running", total)
    active: set[int] = set()
    with StopFlag() as stop:
        engine = make_engine(cfg, ctx.tokenizer, adapter, should_stop=lambda: stop.stop, log=log)
        if engine.capacity > ctl.in_flight:
            log(f"note: {engine.capacity} workers but search.in_flight={ctl.in_flight}; some stay idle")

        def handle(out) -> None:
            if isinstance(out, Job):
                engine.submit(out)
                active.add(out.key)
            else:
                active.discard(out["id"])
                log(ctl.progress_line(out, total, time.perf_counter() - ctx.t_start))

        try:
            ctl.go_live()
            while True:
                if stop.stop:
                    status = "interrupted"
                    break
                if ctx.time_is_up():
                    status = "time_limit"
                    log(f"search.max_seconds={cfg.search.max_seconds:g} reached; the same command continues")
                    break
                while ctl.queue and engine.busy() < engine.capacity and len(ctl.terminal) + len(active) < total:
                    proposal = ctl.evo.proposals[ctl.queue.pop(0)]
                    handle(ctl.start(proposal))
                if not active:
                    if len(ctl.terminal) >= total or not ctl.queue:
                        break
                    continue
                for job, result in engine.wait(timeout=1.0):
                    active.discard(job.key)
                    handle(ctl.advance(job, result))
        except (Interrupted, KeyboardInterrupt):
            status = "interrupted"
        finally:
            engine.close()
    if status == "interrupted":
        log(f"search interrupted; the same command resumes from {journal.path}")
    write_status(ctx.workdir, ctl, status, total)
    return status


def write_status(workdir: str, ctl, status: str, total: int) -> None:
    """Writes ``WORKDIR/status.json`` (atomically) from an evolution controller's counters."""
    best = ctl.evo.best()
    info = {
        "status": status,
        "evaluations": len(ctl.terminal),
        "max_evaluations": total,
        "failures": ctl.failures(),
        "cache_hits": ctl.cache_hits,
        "best_id": best[0] if best else None,
        "best_fitness": best[1] if best and math.isfinite(best[1]) else None,
        "compile_seconds": ctl.compile_seconds,
        "train_seconds": ctl.train_seconds,
        "probe_seconds": ctl.probe_seconds,
        "xla_compile_seconds": ctl.xla_compile_seconds,
    }
    tmp = os.path.join(workdir, "status.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "status.json"))
