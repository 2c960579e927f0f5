"""The configuration every job shares, as an ``ml_collections.ConfigDict``.

Config files under ``configs/`` call :func:`base_config` and change sizes and
budgets. The command line locks the config, so a misspelt key is an error that
names it (``--config.trian.steps=...``). Keys:

seed                      everything random derives from it (init, data order, dropout)
model.name / model.size   a zoo name (vanilla, transformer_pp, primer_ez, primer, gpt2, bert,
                          autobert_zero) and tiny / small / base
model.spec                path to a model-spec JSON (a search's output); overrides name/size
model.dropout_rate        -1 keeps the spec's rate (0 for every zoo model)
model.dtype               activation dtype: float32 or bfloat16 (params stay float32)
data.path                 a text file, folder or glob ('' = the fetched corpus named by data.corpus)
data.corpus               corpus fetched when data.path is '' (shakespeare)
data.val_files            comma-separated file names / globs held out for validation
data.val_fraction         else this fraction of whole files is held out
data.seq_len              tokens per training sequence
data.tokenizer            byte | sentencepiece (trained locally on the training files)
data.vocab_size           sentencepiece vocabulary size
data.cache_dir            token cache ('' = NASJAX_CACHE or ~/.cache/nasjax)
train.steps               optimizer steps (the schedule's length)
train.budget_seconds      stop after this much training time (compile excluded); 0 = no limit
train.batch_size          global batch (sequences), split over the data-parallel devices
train.learning_rate, optimizer (adamw | adafactor), schedule (cosine | rsqrt | linear | constant),
train.warmup_steps, min_learning_rate_ratio, weight_decay, b1, b2, eps, grad_clip,
train.grad_accum_steps    micro-batches per optimizer step
train.flat_optimizer      (adamw, replicated parameters) clip and AdamW on one vector of all parameters:
                          each element's update up to rounding; ~15-19% less train-step compile (tiny)
train.segmented           compile the train / eval steps as pieces (embedding, each distinct layer, head,
                          per-leaf optimizer updates) shared by all models of a process, instead of one
                          program per model; equal up to float rounding; LM head, no dropout, per-leaf
                          optimizer, replicated parameters (nasjax/train/segmented.py)
train.segmented_pieces    what a segmented layer piece is: 'layer' (one program per distinct layer),
                          'subprogram' (a Primer program layer cut at its subprogram invocations: pieces
                          keyed by what they compute, shared across layers and candidates, so a child
                          compiles only what its mutation touched) or 'instruction' (one piece per
                          instruction: even fewer compiles, more dispatches per step)
train.segmented_update_chunk  most parameter leaves of one shape that one segmented update program takes
                          (1, 2, 4, 8 or 16; powers of two up to it): larger = fewer dispatches per step,
                          1 = one update program per parameter shape (fewest compiles)
train.segmented_layout    how a segmented model holds its parameters and Adam moments while it trains:
                          'shaped' (each in its own shape) or 'flat' (adamw only: each as a 1-D buffer of
                          its size class, at most 25% larger, so update programs are keyed by size class,
                          not shape, and a search stops compiling them once it has seen its classes; the
                          same values per element; converted on the host at a fit's start and end)
train.segmented_max_mb    MiB of compiled pieces a process keeps, as their serialized executables measure
                          them (machine code and metadata; a search's pieces hold ~12-15x that in host
                          memory on XLA:CPU), least recently used dropped first; 0 = bounded by count only
train.segmented_xla_options  XLA options for the segmented pieces: 'auto' (on CPU xla_cpu_use_fusion_emitters=
                          false, XLA's earlier kernel emitters: ~25-30% less compile for these small programs,
                          values equal up to float rounding; the update programs also compile their
                          code in two parts, same bits, ~25% faster; elsewhere none), '' (XLA's
                          defaults) or name=value,... for every program (nasjax/xla_options.py); the
                          init's normal sampler takes auto's CPU options whatever this says (same bits)
train.log_every, eval_every, eval_batches (0 = whole validation split), checkpoint_every,
train.keep_checkpoints, async_checkpoint
mesh.shape                (data, fsdp, tensor) sizes; one -1 takes the remaining devices
mesh.rules                logical -> mesh axis rules; empty = nasjax.sharding.DEFAULT_RULES
compile_cache_dir         persistent XLA compilation cache ('' = default, 'none' = off)
compile_cache_min_seconds programs that compiled faster are not written to it (0 = every program: a new
                          process starts warm; JAX's default of 1 s kept none of a tiny search's programs)
compile_cache_max_mb      bound on that directory, enforced when a process sets the cache up: least recently
                          used programs are deleted first (0 = no bound)
init_from                 (finetune) a training workdir whose weights and spec to start from
init_weights              (finetune) false: take init_from's spec and tokenizer but random weights
compare_with              (finetune) comma list of baselines fine-tuned with the same settings after the
                          main run and reported next to it (comparison.csv): teacher (the teacher of a
                          distil-search student), scratch (init_from's architecture from random weights),
                          or NAME=WORKDIR (any training workdir)

Search configs (configs/search/*.py, :func:`search_config`) add ``search.*``; ``train.*``
then describes the training of *each candidate* (``train.steps`` or, if positive,
``train.budget_seconds`` is the per-candidate budget that the hurdles cut into bands):

search.method             primer (regularized evolution over programs) | lts (training-free Pareto search)
                          | autobert (OP-NAS over BERT backbones)
search.iterations         (lts) evolution iterations after the random initial population
search.max_evaluations    stop after this many finished or failed evaluations (resume may raise it)
search.in_flight          evaluations at once (N): candidate j is asked once j - N is told; results are
                          told in id order, so the same seed and N evaluate the same architectures on
                          any engine (1 = sequential; part of the algorithm, fixed for a search)
engine                    inline (this process; default) | threads (search.in_flight jobs at once in this
                          process: CPU hosts where compiling dominates; primer with step budgets)
                          | processes (search.in_flight worker processes on this host, replaced every
                          process_recycle_every candidates: host memory bounded for any length of search,
                          a crashing candidate costs one worker, not the search) | ray (long-lived actors)
process_recycle_every     (engine=processes) a worker is replaced by a fresh process once it has worked on
                          this many candidates (0 = never); each replacement costs one warm-up
process_max_mb            (engine=processes) ... or once its resident memory after a job exceeds this many
                          MiB (0 = no bound): a host-memory ceiling for long searches
process_max_restarts      (engine=processes) times one job is re-issued after its worker died before it
                          counts as failed (stage internal)
process_start_timeout_s   (engine=processes) how long a new worker may take to build its data and mesh
ray_address               '' = start a local Ray for this search; 'auto' or 'ray://HOST:10001' = a cluster
ray_actors                actors to start (0 = search.in_flight)
ray_cpus_per_actor, ray_gpus_per_actor   resources each actor reserves (1 GPU each on a GPU cluster)
ray_max_restarts          times one job is re-issued after its actor died before it counts as failed
ray_object_store_mb       object store of a local Ray (weights of BIWS supernets travel through it)
collective_timeout_s      several JAX processes (nasjax.distributed): a job running longer ends the
                          process (exit 4) so the scheduler restarts it and the search resumes
search.max_seconds        also stop after this much wall time of this process (0 = no limit)
search.population_size    aging-evolution population (Primer: 100)
search.tournament_size    tournament size (Primer: 10)
search.hurdles            number of halving hurdles (Primer: 4); 0 = none
search.hurdle_quantile    threshold = this quantile of earlier fitness at the hurdle (0.5 = median)
search.hurdle_min_samples earlier values needed before a hurdle threshold applies
search.seeds              comma-separated seed programs: vanilla, primer_ez
search.mutations          comma-separated mutation kinds ('' = all six)
search.branch_probability chance that a random instruction gets k > 1 branches
search.d_model, n_layers, n_heads, d_ff   widths of the seed block / stack (0 = model.size's)
search.base_dim           unit of the relative dimension sizes (0 = chosen from the widths)
search.positions          learned | sinusoidal | none (program blocks have no relative bias)
search.max_params         reject candidates with more parameters (0 = no bound)
search.max_memory_bytes   reject candidates whose compiled train step needs more per device (0 = none;
                          tiny preset: 512 MiB, calibrated on the train.segmented pieces' estimate); with
                          search.probe=steps a lower bound from the forward pieces is checked before the probe
search.probe_batch        sequences in the causality / finiteness / equivalence probe (search.probe=model)
search.probe              (primer) auto | steps | model: where the probe runs. steps: on the forward
                          programs of the candidate's own train step (train.segmented), two forwards on a
                          fixed batch of the training layout (causality: the batch again with each row's
                          future tokens changed), so it compiles nothing that training does not compile
                          anyway and the layers' backwards compile only for candidates that train;
                          model: the whole model op by op (search.op_by_op) or as one program;
                          auto = steps with train.segmented in a one-process search, else model
search.val_batches        validation batches that define the fitness (0 = whole split)
search.fec                reuse results of functionally equivalent candidates
search.clear_caches       drop compiled programs after each candidate and return freed heap to the OS (long searches)
search.clear_caches_every with search.clear_caches: only after every N-th trained candidate (1 = each one)
search.compile_ahead      (primer) auto | true | false: compile a candidate's train and eval steps on a
                          background thread while its probe runs (search.probe=model; the steps probe
                          compiles them itself); identical results either way; auto = on with >= 4 CPU
                          cores (no gain measured on 2); never with several processes
search.op_by_op           (primer) auto | true | false: run each candidate's init, probe and optimizer-state
                          init op by op (per-op programs compiled once per process, shared by all candidates)
                          instead of compiling them per candidate; values equal up to float rounding;
                          auto = on unless search.clear_caches (which drops the per-op programs)
search.op_by_op_clear_every (primer) with op_by_op on: drop jax's compiled programs (the per-op ones
                          with them) and return freed heap after every N checked candidates, which bounds
                          their memory (new shapes keep adding ~1.4 MiB programs: ~11 MiB per tiny
                          candidate); each drop costs a re-warm of the per-op programs; 0 = never

AutoBERT-Zero (configs/search/autobert.py) adds ``autobert.*`` (see nasjax/search/autobert.py):
n_layers, d_model / n_heads / d_ff (0 = model.size's), dropout, kernel_sizes (odd), max_nodes
(graph size bound), mutations (op, flip, kernel; '' = all), delete_probability, ucb_alpha,
ucb_reward (rank | improvement), ucb_selection (softmax | argmax), ucb_temperature, biws (bi-branch
weight sharing on/off), biws_update_rate (1 = overwrite), tasks (comma-separated JSONL files,
TRAIN.jsonl|VAL.jsonl pairs, or glue/NAME), tfds_data_dir (for glue/*; '' = tfds's default),
task_seq_len, task_val_fraction, finetune_steps, finetune_batch_size, finetune_lr, finetune_warmup,
mlm_weight (fitness = 1 - mean accuracy + mlm_weight * MLM validation loss). ``search.seeds``
names seed genomes (bert, autobert_zero, all_conv); ``train.*`` is each candidate's MLM
pre-training. ``data.corpus`` may name several fetched corpora (``shakespeare,austen``).

AutoDistil (configs/search/autodistil.py, ``nasjax distil`` / ``distil-search``) adds ``teacher``
(a trained encoder's workdir) and ``distil.*``: subspaces (tiny, small, base: the paper's grids
scaled to the teacher), merge (one SuperLM over their union: the K=1 comparison), sandwich_size
(M = 4), relation_heads, kd_kind (kl: the paper's text | mse: the released code), log_every,
checkpoint_every, budget_kind (paper_flops | paper_params | flops | params | xla_flops), budget (0 = none),
val_batches (held-out batches that rank subnets by relation-KD loss), rank_by (kd_loss: task-agnostic |
proxy_finetune: validation accuracy after fine-tuning the inherited student on distil.proxy_task, a
JSONL file or glue/NAME, for proxy_steps at proxy_lr, proxy_batch_size, proxy_seq_len).

LTS (configs/search/lts.py) adds ``lts.*``: parent_size / mutation_size / crossover_size
(20 / 40 / 40), mutation_prob (0.3), crossover_prob (0.5), seq_len and batch of the
latency measurement (192, 1), latency_repeats (10), selection (pareto | convex_hull),
memory (activations: allocated on top of the weights, as the paper's profiler | total),
programs (what a measurement compiles and times: sublayers, the default: the forward as a
chain of attention / FFN sub-layer programs compiled once per process and shared by every
architecture | layers: the same with whole layers | model: one program per architecture,
compiled for each; ``nasjax.measure.hardware``), max_pieces (compiled pieces kept, 256),
compile_threads (auto | N: the pieces an iteration's population lacks are compiled on N
threads before any of it is timed; auto = min(8, usable cores), 1 on a GPU; 1 = off), proxies
(comma-separated zero-cost proxies to record, '' = none), max_latency_s and max_memory_bytes
(constraints, 0 = none), vocab_size (0 = the tokenizer's),
validate_architectures (``nasjax lts-validate``), and ``lts.space.*`` (n_layer, d_model,
d_inner, n_head choices, d_inner_ratio, min_params / max_params on decoder params).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def base_config(finetune: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "vanilla"
    c.model.size = "tiny"
    c.model.spec = ""
    c.model.dropout_rate = -1.0
    c.model.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.corpus = "shakespeare"
    c.data.val_files = ""
    c.data.val_fraction = 0.05
    c.data.seq_len = 128
    c.data.tokenizer = "byte"
    c.data.vocab_size = 2048
    c.data.cache_dir = ""

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.budget_seconds = 0.0
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.optimizer = "adamw"
    c.train.schedule = "cosine"
    c.train.warmup_steps = 100
    c.train.min_learning_rate_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.eps = 1e-9
    c.train.grad_clip = 1.0
    c.train.flat_optimizer = False
    c.train.segmented = False
    c.train.segmented_pieces = "layer"
    c.train.segmented_update_chunk = 16
    c.train.segmented_layout = "shaped"
    c.train.segmented_max_mb = 48
    c.train.segmented_xla_options = "auto"
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.eval_batches = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)
    c.mesh.rules = ()

    c.compile_cache_dir = ""
    c.compile_cache_min_seconds = 0.0
    c.compile_cache_max_mb = 4096
    if finetune:
        c.init_from = ""
        c.init_weights = True
        c.compare_with = ""
        c.data.val_fraction = 0.1
        c.data.corpus = ""
    return c


def from_preset(presets: dict, preset: str, source: str, model_name: str, finetune: bool = False, **train):
    """A base config sized by one preset row of a config file.

    Args:
      presets: name -> dict(size, seq_len, batch_size, steps, lr, warmup, eval_every).
      preset: the chosen name.
      source: the config file (for the error message).
      model_name: zoo model to train by default.
      finetune: add the fine-tuning keys.
      **train: further ``train.*`` settings shared by all presets of the file.
    """
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {source}; choose from {', '.join(presets)}")
    p = presets[preset]
    config = base_config(finetune=finetune)
    config.model.name = model_name
    config.model.size = p["size"]
    config.data.seq_len = p["seq_len"]
    config.train.batch_size = p["batch_size"]
    config.train.steps = p["steps"]
    config.train.learning_rate = p["lr"]
    config.train.warmup_steps = p["warmup"]
    config.train.eval_every = p["eval_every"]
    config.train.checkpoint_every = p["eval_every"]
    for key, value in train.items():
        config.train[key] = value
    return config


def search_config(method: str = "primer") -> ml_collections.ConfigDict:
    """:func:`base_config` plus the ``search`` section (defaults: Primer's published settings)."""
    c = base_config()
    c.model.name = ""
    c.engine = "inline"
    c.ray_address = ""
    c.ray_actors = 0
    c.ray_cpus_per_actor = 1.0
    c.ray_gpus_per_actor = 0.0
    c.ray_max_restarts = 3
    c.ray_object_store_mb = 256
    c.process_recycle_every = 50  # memory ceiling vs one warm-up per replacement (nasjax.search.workers)
    c.process_max_mb = 0
    c.process_max_restarts = 3
    c.process_start_timeout_s = 600.0
    c.collective_timeout_s = 3600.0
    c.search = ml_collections.ConfigDict()
    s = c.search
    s.method = method
    s.max_seconds = 0.0
    s.population_size = 100
    if method == "lts":
        s.iterations = 30
        c.lts = lts_config()
        return c
    s.max_evaluations = 100
    s.in_flight = 1
    s.tournament_size = 10
    s.max_params = 0
    s.probe_batch = 2
    s.val_batches = 16
    s.fec = True
    s.clear_caches = False
    s.clear_caches_every = 1
    if method == "primer":
        s.compile_ahead = "auto"
        s.op_by_op = "auto"
        s.probe = "auto"
        s.op_by_op_clear_every = 50
    c.train.log_every = 10**9
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    if method == "autobert":
        s.seeds = "bert,autobert_zero"
        c.autobert = autobert_config()
        c.data.corpus = "shakespeare,austen"
        c.train.schedule = "linear"
        c.train.weight_decay = 0.01
        return c
    s.hurdles = 4
    s.hurdle_quantile = 0.5
    s.hurdle_min_samples = 5
    s.seeds = "vanilla"
    s.mutations = ""
    s.branch_probability = 0.25
    s.d_model = 0
    s.n_layers = 0
    s.n_heads = 0
    s.d_ff = 0
    s.base_dim = 0
    s.positions = "learned"
    s.max_memory_bytes = 0
    # Per-candidate training as in Primer's proxy: no dropout, rsqrt decay after warmup.
    c.train.schedule = "rsqrt"
    return c


def autobert_config() -> ml_collections.ConfigDict:
    """The ``autobert`` section (AutoBERT-Zero, methods.md §1; UNCONFIRMED values are documented choices)."""
    c = ml_collections.ConfigDict()
    c.n_layers = 12
    c.d_model = 0
    c.n_heads = 0
    c.d_ff = 0
    c.dropout = 0.1
    c.kernel_sizes = (3, 5, 7, 9, 15, 31, 65)
    c.max_nodes = 16
    c.mutations = ""
    c.delete_probability = 0.25
    c.ucb_alpha = 1.0
    c.ucb_reward = "rank"
    c.ucb_selection = "softmax"
    c.ucb_temperature = 0.25
    c.biws = True
    c.biws_update_rate = 1.0
    c.tasks = ",".join(
        f"../shared/data/classification/{name}.jsonl" for name in ("polarity_sentences", "uncertainty_conll2010")
    )
    c.tfds_data_dir = ""
    c.task_seq_len = 64
    c.task_val_fraction = 0.1
    c.finetune_steps = 300
    c.finetune_batch_size = 32
    c.finetune_lr = 1e-4
    c.finetune_warmup = 30
    c.mlm_weight = 0.0
    return c


def lts_config() -> ml_collections.ConfigDict:
    """The ``lts`` section: LiteTransformerSearch's published settings (methods.md §3(b))."""
    from nasjax.genome.stack import SIZE_PRESETS

    c = ml_collections.ConfigDict()
    c.parent_size = 20
    c.mutation_size = 40
    c.crossover_size = 40
    c.mutation_prob = 0.3
    c.crossover_prob = 0.5
    c.seq_len = 192
    c.batch = 1
    c.latency_repeats = 10
    c.selection = "pareto"
    c.memory = "activations"
    # UNCONFIRMED in the paper (it timed PyTorch eager, one kernel per op): how the JAX
    # forward is compiled for timing. sublayers = a chain of sub-layer programs shared
    # across architectures, so a search compiles each attention / FFN shape once instead
    # of one program per architecture (docs/benchmarks.md: ranks agree with model).
    c.programs = "sublayers"
    c.max_pieces = 256
    # Population-level compiling: the pieces an iteration's population lacks are compiled on
    # this many threads before any of it is timed ("auto": min(8, usable cores), 1 on a GPU,
    # whose compiles time kernels; 1: off, each piece compiles when first measured). Inline
    # engine only (the processes and ray engines' workers compile their own pieces).
    c.compile_threads = "auto"
    c.proxies = ""
    c.max_latency_s = 0.0
    c.max_memory_bytes = 0
    c.vocab_size = 0
    c.validate_architectures = 30
    c.space = ml_collections.ConfigDict({k: v for k, v in SIZE_PRESETS["gpt2"].items()})
    return c


def distil_config() -> ml_collections.ConfigDict:
    """AutoDistil (``nasjax distil`` / ``distil-search``): :func:`base_config` + ``teacher`` + ``distil.*``.

    ``train.*`` is the SuperLM training (the released configs: AdamW 4e-5, weight decay
    0.01, no warmup, linear decay; global-norm clipping 1.0 is fixed).
    """
    c = base_config()
    c.model.name = ""
    c.teacher = ""
    c.data.corpus = "shakespeare,austen"
    c.train.learning_rate = 4e-5
    c.train.weight_decay = 0.01
    c.train.warmup_steps = 0
    c.train.schedule = "linear"
    d = c.distil = ml_collections.ConfigDict()
    d.subspaces = "tiny,small,base"
    d.merge = False
    d.sandwich_size = 4
    d.relation_heads = 12
    d.kd_kind = "kl"
    d.log_every = 10
    d.checkpoint_every = 100
    d.budget_kind = "paper_flops"
    d.budget = 0.0
    d.val_batches = 8
    d.rank_by = "kd_loss"
    d.proxy_task = ""
    d.proxy_steps = 200
    d.proxy_lr = 1e-3
    d.proxy_batch_size = 32
    d.proxy_seq_len = 64
    return c


class ConfigFileError(ValueError):
    """A config file or preset could not be loaded."""


def load_config_file(arg: str) -> ml_collections.ConfigDict:
    """Loads ``FILE[:preset]`` the way ``--config=`` does (for tests and notebooks)."""
    path, _, preset = arg.partition(":")
    if not os.path.exists(path):
        raise ConfigFileError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("nasjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"{path} has no get_config()")
    config = module.get_config(preset) if preset else module.get_config()
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys (``{'train.steps': 5}``); an unknown key raises naming it."""
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if part not in node:
                raise KeyError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = value
    return config
