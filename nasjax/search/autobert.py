"""AutoBERT-Zero search: OP-NAS evolution with UCB op priority and BIWS (methods.md §1).

    nasjax search --config=configs/search/autobert.py:tiny --workdir=runs/ab
    nasjax results runs/ab

Candidates are :class:`~nasjax.genome.autobert.BertGenome` s (per layer an attention
graph or a GLU light-conv), decoded to BERT encoder specs. The loop is aging evolution
with tournament selection (:class:`~nasjax.search.evolution.RegularizedEvolution`;
lower fitness is better), mutations from :func:`~nasjax.genome.autobert.mutate_genome`
whose ops are chosen by :class:`~nasjax.search.opnas.OpPriority`.

Evaluation of one candidate (stages recorded on failure, never fatal):

1. ``decode``/``params``/``probe``: the spec builds, stays under ``search.max_params``,
   and gives finite outputs at a fixed init on a probe batch (a graph whose ops overflow
   is rejected here). Identical genomes (and, with ``search.fec``, functionally
   equivalent ones: same probe outputs) reuse the recorded result.
2. ``pretrain``: MLM pre-training for ``train.steps`` on the corpus (Shakespeare +
   Austen by default), starting from the BIWS supernet (``autobert.biws``) or from a
   fresh init; the MLM validation loss on ``search.val_batches`` fixed batches is
   recorded. With BIWS the trained weights are written back to the supernet.
3. ``finetune``: for every task of ``autobert.tasks`` (JSONL files, or ``glue/NAME``
   through tfds), fine-tune the pre-trained encoder for ``autobert.finetune_steps`` and
   measure validation accuracy.

Fitness (lower is better) = ``1 - mean task accuracy + autobert.mlm_weight * MLM val
loss`` (the paper scores on GLUE dev; the weight, 0 by default, lets MLM break ties).

Journal: the Primer events (``search``, ``proposed`` (+ ``op``), ``started``,
``finished`` (+ ``accuracy``, ``mlm_loss``, ``supernet_version``, ``ucb``), ``failed``).
UCB statistics are rebuilt by replay and a snapshot (``ucb``) is stored with every
result. The supernet lives in ``WORKDIR/supernet/supernet_VVVVVV.npz``; the journal
names the version each result produced, so a resumed search reloads the right one.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import time
from typing import Any

import jax
import numpy as np

from nasjax.data.classification import ClassificationData, load_task_list
from nasjax.genome.attn_graph import OPS, seed_graph
from nasjax.genome.autobert import (
    GENOME_SEEDS,
    MUTATION_KINDS,
    BertGenome,
    LayerGene,
    decode_genome,
    mutate_genome,
    render_genome,
    seed_genome,
)
from nasjax.search.biws import SuperNet, SuperNetError, flat_params, nested_params
from nasjax.search.evaluate import (
    CandidateFailed,
    _short,
    check_params_and_probe,
    finetune_tasks,
    fit_candidate,
)
from nasjax.search.evolution import Proposal, RegularizedEvolution
from nasjax.search.opnas import REWARDS, OpPriority, rank_reward
from nasjax.search.primer import split_names
from nasjax.search.run import EvolutionController, add_job_compile
from nasjax.spec import ModelSpec, SpecError
from nasjax.train.loop import Trainer

__all__ = [
    "AutoBertSpace",
    "AutoBertEvaluator",
    "run_autobert",
    "load_tasks",
    "autobert_fitness",
    "initial_supernet",
]


def autobert_fitness(accuracies: dict[str, float], mlm_loss: float, mlm_weight: float) -> float:
    """``1 - mean accuracy + mlm_weight * mlm_loss`` (lower is better)."""
    mean_acc = sum(accuracies.values()) / len(accuracies) if accuracies else 0.0
    return 1.0 - mean_acc + mlm_weight * mlm_loss


class AutoBertSpace:
    """BERT backbones (attention graphs / convs per layer) as the search driver sees them."""

    name = "autobert"

    def __init__(self, cfg, vocab_size: int):
        a = cfg.autobert
        self.cfg = cfg
        self.size = str(cfg.model.size)
        self.n_layers = int(a.n_layers)
        self.d_model, self.n_heads, self.d_ff = int(a.d_model), int(a.n_heads), int(a.d_ff)
        self.vocab_size = int(vocab_size)
        self.seq_len = int(cfg.data.seq_len)
        self.max_len = max(self.seq_len, int(a.task_seq_len))
        self.dropout = float(a.dropout)
        ks = tuple(int(k) for k in a.kernel_sizes)
        bad = [k for k in ks if k < 1 or k % 2 == 0]
        if not ks or bad:
            raise SpecError(f"autobert.kernel_sizes must be positive odd ints, got {ks}")
        self.kernel_sizes = tuple(sorted(set(ks)))
        self.max_nodes = int(a.max_nodes)
        self.seed_names = split_names(cfg.search.seeds, "search.seeds", GENOME_SEEDS) or ("bert",)
        self.mutation_kinds = split_names(a.mutations, "autobert.mutations", MUTATION_KINDS) or MUTATION_KINDS
        self.delete_probability = float(a.delete_probability)
        self.priority: OpPriority | None = None
        self.last_mutation = None
        # fail early on widths that do not fit
        self.decode(self.seeds()[0][1])

    def seeds(self) -> list[tuple[str, BertGenome]]:
        return [(n, seed_genome(n, self.n_layers, self.seq_len, self.kernel_sizes)) for n in self.seed_names]

    def mutate(self, genome: BertGenome, rng: np.random.Generator) -> tuple[BertGenome, str, str]:
        choose = self.priority.choose if self.priority is not None else (lambda ops, r: ops[int(r.integers(len(ops)))])
        m = mutate_genome(
            genome,
            rng,
            kernel_sizes=self.kernel_sizes,
            max_nodes=self.max_nodes,
            choose_op=choose,
            kinds=self.mutation_kinds,
            delete_probability=self.delete_probability,
        )
        self.last_mutation = m
        return m.genome, m.kind, m.detail

    def decode(self, genome: BertGenome) -> ModelSpec:
        return decode_genome(
            genome,
            size=self.size,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            dropout_rate=self.dropout,
        )

    @staticmethod
    def genome_to_json(genome: BertGenome) -> Any:
        return genome.to_json()

    @staticmethod
    def genome_from_json(data: Any, where: str = "genome") -> BertGenome:
        return BertGenome.from_json(data, where)

    @staticmethod
    def genome_hash(genome: BertGenome) -> str:
        return genome.canonical_hash()

    def render(self, genome: BertGenome) -> str:
        return render_genome(genome)

    def describe(self) -> str:
        spec = self.decode(self.seeds()[0][1])
        return (
            f"autobert backbones: {self.n_layers} layers x d_model {spec.d_model}, kernels {self.kernel_sizes}, "
            f"<= {self.max_nodes} graph nodes, seeds {', '.join(self.seed_names)}, vocab {self.vocab_size}, "
            f"seq_len {self.seq_len}"
        )


# ---------------------------------------------------------------------- tasks


def load_tasks(cfg, tokenizer, log=print) -> list[tuple[str, ClassificationData]]:
    """``autobert.tasks`` (see :func:`nasjax.data.classification.load_task_list`)."""
    a = cfg.autobert
    return load_task_list(
        str(a.tasks),
        tokenizer,
        seq_len=int(a.task_seq_len),
        batch_size=int(a.finetune_batch_size),
        seed=int(cfg.seed),
        val_fraction=float(a.task_val_fraction),
        tfds_data_dir=str(a.tfds_data_dir),
        cache_dir=cfg.data.cache_dir or None,
        what="autobert.tasks",
        log=log,
    )


# ---------------------------------------------------------------------- evaluation


class AutoBertEvaluator:
    """Checks, pre-trains (MLM) and fine-tunes candidates (see the module docstring)."""

    def __init__(self, cfg, data, tasks, mesh, rules, log=print):
        self.cfg, self.data, self.tasks, self.mesh, self.rules, self.log = cfg, data, tasks, mesh, rules, log
        self.seq_len = int(cfg.data.seq_len)
        self.val_batches = int(cfg.search.val_batches) or None
        self._val_cache = None
        a = cfg.autobert
        ft = copy.deepcopy(cfg.train)
        ft.steps = int(a.finetune_steps)
        ft.learning_rate = float(a.finetune_lr)
        ft.batch_size = int(a.finetune_batch_size)
        ft.warmup_steps = int(a.finetune_warmup)
        ft.budget_seconds = 0.0
        self.finetune_cfg = ft

    def check(self, spec: ModelSpec) -> dict:
        """Parameter bound and the finiteness probe; raises :class:`CandidateFailed`."""
        params, probe = check_params_and_probe(spec, self.cfg, self.seq_len)
        return {
            "params": params,
            "fec_hash": probe.output_hash,
            "fec_hash_alt": probe.output_hash_alt,
            "probe_seconds": probe.seconds,
        }

    def _fixed_val(self):
        if self._val_cache is None:
            self._val_cache = list(self.data.val_batches(self.val_batches))
        return self._val_cache

    def _trainer(self, spec: ModelSpec, train_cfg, seq_len: int) -> Trainer:
        return Trainer(spec, train_cfg, self.mesh, self.rules, self.cfg.seed, seq_len, dtype=self.cfg.model.dtype)

    def initial_params(self, spec: ModelSpec) -> dict:
        """Fresh init of ``spec`` (the supernet template), as numpy."""
        trainer = self._trainer(spec, self.cfg.train, self.seq_len)
        return jax.device_get(trainer.init_state().params)

    def pretrain(self, spec: ModelSpec, init=None, should_stop=None) -> dict:
        """MLM pre-training from ``init`` (a BIWS callable params -> params) or fresh."""
        try:
            trainer = self._trainer(spec, self.cfg.train, self.seq_len)
            state = trainer.init_state()
            inherited = 0
            if init is not None:
                params, inherited = init(jax.device_get(state.params))
                state, _ = trainer.with_params(state, params)
        except Exception as e:
            raise CandidateFailed("compile", _short(e)) from None
        state, result = fit_candidate(
            trainer, state, self.data.train_iterator(), int(self.cfg.train.steps), "pretrain", self.mesh, should_stop
        )
        val = trainer.evaluate(state.params, self._fixed_val())
        loss = float(val.get("val_loss", math.nan))
        if not math.isfinite(loss):
            raise CandidateFailed("pretrain", f"non-finite MLM validation loss after step {result.step}")
        return {
            "params": jax.device_get(state.params),
            "mlm_loss": loss,
            "steps": result.step,
            "inherited": inherited,
            "compile_seconds": trainer.compile_seconds,
            "train_seconds": result.train_seconds,
        }

    # ------------------------------------------------------------------ engine jobs (plain dicts)
    def check_job(self, spec: ModelSpec) -> dict:
        return self.check(spec)

    def train_job(self, spec: ModelSpec, payload: dict, should_stop=None) -> dict:
        """MLM pre-training (inheriting from ``payload["supernet"]``, a :class:`SuperNet` snapshot or
        None, for the layer kinds ``payload["kinds"]``) then fine-tuning. The pre-trained params come
        back in ``weights`` (also when fine-tuning fails) for the controller's supernet update."""
        supernet, kinds = payload.get("supernet"), tuple(payload.get("kinds", ()))
        init = (lambda p: supernet.inherit(p, kinds)[:2]) if supernet is not None else None
        pre = self.pretrain(spec, init, should_stop)
        try:
            ft = self.finetune(spec, pre["params"], should_stop)
        except CandidateFailed as e:
            e.info["weights"] = pre["params"]
            raise
        return {
            "fitness": autobert_fitness(ft["accuracy"], pre["mlm_loss"], float(self.cfg.autobert.mlm_weight)),
            "accuracy": ft["accuracy"],
            "mlm_loss": pre["mlm_loss"],
            "steps": pre["steps"],
            "inherited": pre["inherited"],
            "compile_seconds": pre["compile_seconds"] + ft["compile_seconds"],
            "train_seconds": pre["train_seconds"] + ft["train_seconds"],
            "weights": pre["params"],
        }

    def finetune(self, spec: ModelSpec, params, should_stop=None) -> dict:
        """Fine-tunes the pre-trained encoder on every task; returns accuracies and costs."""
        c = self.cfg
        return finetune_tasks(
            spec,
            params,
            self.tasks,
            self.finetune_cfg,
            self.mesh,
            self.rules,
            seed=int(c.seed),
            seq_len=int(c.autobert.task_seq_len),
            dtype=c.model.dtype,
            should_stop=should_stop,
        )


# ---------------------------------------------------------------------- controller

_SUPERNET_KEEP = 3


class _AutoBertController(EvolutionController):
    def __init__(self, ctx, space: AutoBertSpace, evaluator: AutoBertEvaluator):
        cfg = ctx.cfg
        a, s = cfg.autobert, cfg.search
        self.ctx, self.cfg, self.evaluator, self.log = ctx, cfg, evaluator, ctx.log
        if str(a.ucb_reward) not in REWARDS:
            raise SpecError(f"autobert.ucb_reward must be one of {', '.join(REWARDS)}, got {a.ucb_reward!r}")
        self.priority = OpPriority(OPS, float(a.ucb_alpha), str(a.ucb_selection), float(a.ucb_temperature))
        space.priority = self.priority
        evo = RegularizedEvolution(
            space.seeds(), space.mutate, int(s.population_size), int(s.tournament_size), int(cfg.seed)
        )
        EvolutionController.__init__(self, ctx.journal, space, evo, int(s.get("in_flight", 1)))
        self.ops: dict[int, str | None] = {}
        self.history: list[float] = []
        self.supernet_version = 0
        self.biws = bool(a.biws)
        self.supernet_dir = os.path.join(ctx.workdir, "supernet")
        self.supernet: SuperNet | None = None
        self.snapshots: dict[int, SuperNet] = {}  # the supernet each asked candidate inherits from
        self.trained: dict[int, dict] = {}  # pre-trained params of results not told yet
        self.awaiting_update: list[int] = []  # replayed results whose write-back is not journaled
        self.base: dict[int, dict] = {}

    # ------------------------------------------------------------------ replay
    def proposal_fields(self, proposal: Proposal) -> dict:
        op = None
        if proposal.parent is not None and self.space.last_mutation is not None:
            op = self.space.last_mutation.op
        self.ops[proposal.id] = op
        if self.supernet is not None and self.in_flight > 1:  # N = 1: the supernet cannot change before start
            self.snapshots[proposal.id] = self.supernet.copy()
        return {"op": op}

    def replay_proposed(self, rec: dict) -> None:
        self.ops[rec["id"]] = rec.get("op")

    def replay_other(self, rec: dict) -> None:
        if rec["event"] == "supernet":
            self.supernet_version = max(self.supernet_version, int(rec["version"]))
            if rec.get("id") in self.awaiting_update:
                self.awaiting_update.remove(rec["id"])

    def _reward(self, cid: int, fitness: float) -> float:
        if self.cfg.autobert.ucb_reward == "improvement":
            parent = self.evo.proposals[cid].parent
            parent_fitness = self.evo.results.get(parent, math.inf) if parent is not None else math.inf
            return 1.0 if math.isfinite(fitness) and fitness < parent_fitness else 0.0
        return rank_reward(fitness, self.history)

    def _told(self, rec: dict) -> None:
        cid = rec["id"]
        fitness = float(rec["fitness"]) if rec["event"] == "finished" and rec.get("fitness") is not None else math.inf
        self.priority.observe(self.ops.get(cid), self._reward(cid, fitness))
        self.history.append(fitness)
        self.evo.tell(cid, fitness if math.isfinite(fitness) else None)
        if rec.get("supernet_version") is not None:  # journals written before ordered tells
            self.supernet_version = max(self.supernet_version, int(rec["supernet_version"]))
        self.add(rec)
        if not self.live:  # replay: the write-back is checked after the supernet is loaded
            self.awaiting_update.append(cid)
            return
        self._write_back(cid)
        # the UCB snapshot after this result, for `nasjax results`
        self.journal.append("ucb", id=cid, table=self.priority.table(), total=self.priority.total)

    def _child_path(self, cid: int) -> str:
        return os.path.join(self.supernet_dir, f"child_{cid:06d}.npz")

    def _write_back(self, cid: int) -> None:
        """BIWS update with a told child's pre-trained weights (from memory, or the file written
        before its result was journaled), then the supernet file and a ``supernet`` record."""
        path = self._child_path(cid)
        params = self.trained.pop(cid, None)
        if params is None and self.supernet is not None and os.path.exists(path):
            with np.load(path, allow_pickle=False) as data:
                params = nested_params({k: data[k] for k in data.files})
            self.log(f"applying candidate {cid}'s weights to the supernet (journaled, not yet applied)")
        if params is not None and self.supernet is not None:
            kinds = tuple(g.kind for g in self.evo.proposals[cid].genome.layers)
            self.supernet.update(params, kinds, float(self.cfg.autobert.biws_update_rate))
            self.supernet_version = self._save_supernet()
            self.journal.append("supernet", id=cid, version=self.supernet_version)
        if os.path.exists(path):
            os.remove(path)

    def finish_replay(self) -> None:
        """Write-backs of told children that a crash left unapplied (their weights are on disk)."""
        for cid in self.awaiting_update:
            self._write_back(cid)
        self.awaiting_update = []

    # ------------------------------------------------------------------ supernet
    def _supernet_path(self, version: int) -> str:
        return os.path.join(self.supernet_dir, f"supernet_{version:06d}.npz")

    def load_supernet(self) -> None:
        if not self.biws:
            return
        os.makedirs(self.supernet_dir, exist_ok=True)
        version = self.supernet_version
        if version == 0 and not os.path.exists(self._supernet_path(0)):
            self.supernet = self._initial_supernet()
            self.supernet.save(self._supernet_path(0))
            return
        for v in range(version, -1, -1):
            try:
                self.supernet = SuperNet.load(self._supernet_path(v))
            except SuperNetError as e:
                self.log(f"warning: {e}")
                continue
            if v != version:
                self.log(
                    f"warning: continuing from supernet version {v} (the journal's results went up to {version}); "
                    "the evaluations already recorded are kept, later children inherit older shared weights"
                )
                self.journal.append("supernet_fallback", wanted=version, loaded=v)
            self.supernet.version = version
            return
        self.log("warning: no readable supernet file; starting BIWS from a fresh supernet")
        self.supernet = self._initial_supernet()
        self.supernet.version = version

    def _initial_supernet(self) -> SuperNet:
        return initial_supernet(self.space, self.evaluator)

    def _save_supernet(self) -> int:
        version = self.supernet.version
        self.supernet.save(self._supernet_path(version))
        for path in sorted(glob.glob(os.path.join(self.supernet_dir, "supernet_*.npz")))[:-_SUPERNET_KEEP]:
            os.remove(path)
        return version

    # ------------------------------------------------------------------ evaluation
    def _reuse(self, cid: int, source: dict, why: str, base: dict) -> dict:
        from nasjax.search.run import reused_record

        self.base.pop(cid, None)
        self.snapshots.pop(cid, None)
        event, record = reused_record(cid, source, why, base)
        return self.append_result(event, **_with_extras(record, source))

    def start(self, proposal: Proposal):
        from nasjax.search.engine import Job

        cid, genome = proposal.id, proposal.genome
        genome_hash = self.space.genome_hash(genome)
        self.journal.append("started", id=cid)
        base: dict = {"hash": genome_hash}
        source = self.visible(self.by_hash.get(genome_hash), cid)
        if source is not None:
            return self._reuse(cid, source, "identical genome to", base)
        try:
            spec = self.space.decode(genome)
        except SpecError as e:
            self.snapshots.pop(cid, None)
            return self.append_result("failed", id=cid, stage="decode", reason=str(e), **base)
        self.base[cid] = base
        return Job(cid, "check", spec.to_dict(), route=genome_hash)

    def advance(self, job, result: dict):
        from nasjax.search.engine import Job

        cid = job.key
        base = self.base[cid]
        add_job_compile(base, result)
        if result.get("weights") is not None:  # pre-trained weights: told to the supernet in order
            self.trained[cid] = result.pop("weights")
            if self.supernet is not None:  # written before the result is journaled, so a crash loses nothing
                _save_flat(flat_params(self.trained[cid]), self._child_path(cid))
        if not result["ok"]:
            self.base.pop(cid)
            self.snapshots.pop(cid, None)
            return self.append_result("failed", id=cid, stage=result["stage"], reason=result["reason"], **base)
        if job.stage == "check":
            base.update({k: result[k] for k in ("params", "fec_hash", "fec_hash_alt", "probe_seconds")})
            match = self.visible(self.match(base), cid) if self.cfg.search.fec else None
            if match is not None:
                return self._reuse(cid, match, "functionally equivalent to", base)
            supernet = self.snapshots.pop(cid, None) or self.supernet
            kinds = [g.kind for g in self.evo.proposals[cid].genome.layers]
            return Job(cid, "train", job.spec, {"supernet": supernet, "kinds": kinds}, route=job.route)
        self.base.pop(cid)
        fields = ("fitness", "accuracy", "mlm_loss", "steps", "inherited", "compile_seconds", "train_seconds")
        return self.append_result("finished", id=cid, **{k: result[k] for k in fields}, **base)

    def progress_line(self, rec: dict, total: int, wall: float) -> str:
        best = self.evo.best()
        p = self.evo.proposals[rec["id"]]
        origin = p.origin if p.parent is None else f"{p.origin} of #{p.parent}"
        if rec["event"] == "failed":
            what = f"FAILED ({rec.get('stage')}: {rec.get('reason', '')[:70]})"
        else:
            accs = rec.get("accuracy") or {}
            acc_text = " ".join(f"{k[:10]} {v:.3f}" for k, v in accs.items())
            what = f"fitness {rec['fitness']:.4f} (mlm {rec.get('mlm_loss', float('nan')):.3f}; {acc_text})"
            if rec.get("cached_from") is not None:
                what += f" [reused #{rec['cached_from']}]"
        best_text = f"best {best[1]:.4f} (#{best[0]})" if best else "best -"
        failed = self.failures()
        return (
            f"[{len(self.terminal)}/{total}] #{rec['id']} {origin} [{p.genome.layout}]: {what} | {best_text} | "
            f"failed {failed} | compile+probe {self.compile_seconds + self.probe_seconds:.0f}s train "
            f"{self.train_seconds:.0f}s | {wall:.0f}s"
        )


def initial_supernet(space: AutoBertSpace, evaluator: AutoBertEvaluator) -> SuperNet:
    """A fresh supernet: shared + attention branches from an all-attention model, conv
    branches from an all-conv model at the largest kernel (both at the search's seed)."""
    n, ks = space.n_layers, space.kernel_sizes
    attn = evaluator.initial_params(
        space.decode(BertGenome(tuple(LayerGene("attn", seed_graph("bert")) for _ in range(n))))
    )
    conv = evaluator.initial_params(
        space.decode(BertGenome(tuple(LayerGene("conv", kernel=max(ks)) for _ in range(n))))
    )
    return SuperNet.initial(attn, conv)


def _save_flat(flat: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def _with_extras(record: dict, source: dict) -> dict:
    """A reused record also carries the source's accuracies and MLM loss (not its supernet version)."""
    out = dict(record)
    for k in ("accuracy", "mlm_loss"):
        if source.get(k) is not None:
            out[k] = source[k]
    return out


def run_autobert(ctx):
    """The ``autobert`` search driver (called by :func:`nasjax.search.run.run_search`)."""
    from nasjax.search.run import SearchSummary, evolution_loop

    cfg, journal, log, t_start = ctx.cfg, ctx.journal, ctx.log, ctx.t_start
    space = AutoBertSpace(cfg, ctx.tokenizer.vocab_size)
    tasks = load_tasks(cfg, ctx.tokenizer, log)
    evaluator = AutoBertEvaluator(cfg, ctx.data, tasks, ctx.mesh, ctx.rules, log)
    ctl = _AutoBertController(ctx, space, evaluator)
    ctl.replay()
    ctl.load_supernet()
    ctl.finish_replay()
    total = int(cfg.search.max_evaluations)
    a = cfg.autobert
    log(
        f"{space.describe()}\npopulation {cfg.search.population_size}, tournament {cfg.search.tournament_size}; "
        f"per candidate: MLM {cfg.train.steps} steps + {a.finetune_steps} fine-tuning steps on "
        f"{', '.join(n for n, _ in tasks)}; BIWS {'on' if ctl.biws else 'off'}; UCB alpha {a.ucb_alpha} "
        f"({a.ucb_selection}, reward {a.ucb_reward}); devices {jax.device_count()}"
        + (f"\nresuming: {len(ctl.terminal)} evaluations replayed from {journal.path}" if journal.records[1:] else "")
    )

    status = evolution_loop(ctx, ctl, evaluator, total)
    failures = ctl.failures()
    best = ctl.evo.best()
    return SearchSummary(
        status=status,
        evaluations=len(ctl.terminal),
        failures=failures,
        cache_hits=ctl.cache_hits,
        best_id=best[0] if best else None,
        best_fitness=best[1] if best else None,
        compile_seconds=ctl.compile_seconds,
        train_seconds=ctl.train_seconds,
        probe_seconds=ctl.probe_seconds,
        wall_seconds=time.perf_counter() - t_start,
        extra={
            "supernet_version": ctl.supernet_version if ctl.biws else None,
            "ucb": ctl.priority.table(),
            "engine": str(cfg.get("engine", "inline")),
            "in_flight": ctl.in_flight,
        },
    )
