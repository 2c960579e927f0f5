"""The jobs behind ``nasjax train``, ``nasjax eval`` and ``nasjax finetune``.

A workdir is self-describing::

    WORKDIR/config.json      the full config of the run
    WORKDIR/spec.json        the model spec (trainable elsewhere with --config.model.spec)
    WORKDIR/tokenizer.json   the tokenizer (plus its SentencePiece model, if any)
    WORKDIR/checkpoints/     orbax checkpoints (state + spec + config + data position)
    WORKDIR/metrics.jsonl    one JSON row per log/eval event
    WORKDIR/tensorboard/     TensorBoard events
    WORKDIR/loss_curve.png   train / validation loss
    WORKDIR/status.json      finished | budget | diverged | interrupted, with the reason

Starting the same command again resumes from the newest readable checkpoint,
including the data iterator position, so the losses continue exactly as an
uninterrupted run's would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import jax
import ml_collections

from nasjax import sharding as shd
from nasjax import xla_cache
from nasjax.checkpointing import Checkpointer
from nasjax.data import (
    ClassificationData,
    fetch,
    is_fetched,
    make_text_data,
    make_tokenizer,
    resolve_files,
    split_files,
    tokenizer_from_config,
)
from nasjax.metrics import MetricsWriter, ProgressBar, plot_loss_curve
from nasjax.models import get_spec
from nasjax.spec import ModelSpec, load_spec, save_spec
from nasjax.train.loop import Hooks, Trainer, TrainResult, objective_for


class RunError(RuntimeError):
    """A run cannot start or resume (clear message, nothing computed is touched)."""


# ---------------------------------------------------------------------- environment


def setup_compile_cache(cfg) -> None:
    """Turns on JAX's persistent compilation cache (``compile_cache_dir``).

    ``compile_cache_min_seconds`` (default 0: every program): programs that compiled
    faster are not written. JAX's own default (1 s) kept none of a tiny search's programs
    on a CPU: the per-op programs of ``search.op_by_op`` and the shared pieces of
    ``train.segmented`` each compile in well under a second, yet a new process (a search
    resumed, an ``engine=processes`` worker replaced) compiles ~200 of them before its
    first candidate. With them on disk, that warm-up fell from ~10 s to ~4 s per process
    on the 2-core CPU (docs/benchmarks.md), at ~6-12 KiB of disk per program.

    ``compile_cache_max_mb`` (default 4096; 0 = unbounded) bounds the directory: when a
    process sets the cache up and finds it larger, the least recently used entries are
    deleted down to 3/4 of the bound (:func:`prune_compile_cache`). JAX's own bound
    (``jax_compilation_cache_max_size``) is not used: it rescans the whole directory on
    every write, and fails on entries written without it.

    JAX writes an entry in place and never rewrites one, so a reader could see a write
    in progress and a write cut short stayed truncated for good; :mod:`nasjax.xla_cache`
    makes writes atomic and drops damaged entries (they compile once more).
    """
    path = cfg.get("compile_cache_dir", "")
    if path == "none":
        return
    if not path:
        path = os.path.join(os.environ.get("NASJAX_CACHE", os.path.expanduser("~/.cache/nasjax")), "jax_cache")
    min_seconds = float(cfg.get("compile_cache_min_seconds", 0.0))
    max_mb = float(cfg.get("compile_cache_max_mb", 4096))
    if min_seconds < 0 or max_mb < 0:
        raise RunError(
            f"compile_cache_min_seconds and compile_cache_max_mb must be >= 0, got {min_seconds:g} and {max_mb:g}"
        )
    os.makedirs(path, exist_ok=True)
    xla_cache.install()  # whole entries only: atomic writes, damaged entries dropped and rewritten
    xla_cache.remove_stale_temporaries(path)
    if max_mb > 0:
        prune_compile_cache(path, int(max_mb * 2**20))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def prune_compile_cache(path: str, max_bytes: int) -> int:
    """Deletes the least recently used files of a compilation cache directory larger than
    ``max_bytes`` until it holds at most 3/4 of it; returns the bytes freed.

    Recency is a file's last access or modification time, whichever is later. Another
    process may delete or read the same files meanwhile: a file gone is skipped, and a
    program whose entry vanished under a reader is compiled again.
    """
    entries, total = [], 0
    with os.scandir(path) as it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False) and not e.name.endswith(xla_cache.TEMP_SUFFIX):
                    st = e.stat(follow_symlinks=False)
                    entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
                    total += st.st_size
            except OSError:
                continue
    if total <= max_bytes:
        return 0
    freed, target = 0, total - max_bytes * 3 // 4
    for _, size, file in sorted(entries):
        if freed >= target:
            break
        try:
            os.unlink(file)
            freed += size
        except OSError:
            continue
    return freed


def make_mesh(cfg):
    mesh = shd.make_mesh(tuple(cfg.mesh.shape))
    return mesh, shd.rules_from_config(cfg.mesh.rules)


# ---------------------------------------------------------------------- data and spec


def resolve_data_path(cfg, log=print) -> str | list[str]:
    """``data.path``, or the fetched corpus (or corpora: ``shakespeare,austen``), fetched now if missing."""
    if cfg.data.path:
        return os.path.expanduser(cfg.data.path)
    names = [n.strip() for n in str(cfg.data.corpus).split(",") if n.strip()]
    if not names:
        raise RunError("data.path is empty and no data.corpus is named; set --config.data.path")
    cache = cfg.data.cache_dir or None
    folders = []
    for name in names:
        if not is_fetched(name, cache_dir=cache):
            log(f"corpus {name!r} not fetched yet; fetching it now (nasjax data fetch {name})")
        folders.append(str(fetch(name, cache_dir=cache, log=log)))
    return folders[0] if len(folders) == 1 else folders


def tokenizer_for_run(cfg, workdir: str, train_files) -> Any:
    saved = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(saved):
        with open(saved) as f:
            return tokenizer_from_config(json.load(f))
    tok = make_tokenizer(
        cfg.data.tokenizer,
        files=train_files,
        vocab_size=cfg.data.vocab_size,
        model_dir=os.path.join(workdir, "tokenizer"),
    )
    with open(saved, "w") as f:
        json.dump(tok.to_config(embed=True), f, indent=2)
    return tok


def resolve_spec(cfg, vocab_size: int, seq_len: int, head: str | None = None, n_classes: int = 0) -> ModelSpec:
    """The model spec of a config: ``model.spec`` (a JSON file) or ``model.name``/``model.size``.

    Zoo specs are sized to the tokenizer's vocabulary and the sequence length; a spec
    file must already fit them (a clear error says which field does not).
    """
    if cfg.model.spec:
        spec = load_spec(os.path.expanduser(cfg.model.spec))
        if spec.vocab_size < vocab_size:
            raise RunError(
                f"{cfg.model.spec}: vocab_size={spec.vocab_size} is smaller than the tokenizer's {vocab_size}"
            )
        if spec.positions == "learned" and spec.max_len < seq_len:
            raise RunError(f"{cfg.model.spec}: max_len={spec.max_len} is shorter than data.seq_len={seq_len}")
    else:
        spec = get_spec(cfg.model.name, cfg.model.size, vocab_size=vocab_size, max_len=max(seq_len, 8))
    if cfg.model.dropout_rate >= 0:
        spec = spec.replace(dropout_rate=float(cfg.model.dropout_rate))
    if head == "cls":
        if spec.kind != "encoder":
            raise RunError(f"fine-tuning a classifier needs an encoder spec; {spec.name or 'this spec'} is a decoder")
        spec = spec.replace(head="cls", n_classes=n_classes, pooler=True)
    return spec


def _check_same_run(workdir: str, spec: ModelSpec) -> None:
    path = os.path.join(workdir, "spec.json")
    if os.path.exists(path):
        old = load_spec(path)
        if old.architecture_hash() != spec.architecture_hash():
            raise RunError(
                f"{workdir} holds a run of a different model (spec.json {old.architecture_hash()} vs "
                f"{spec.architecture_hash()}); use a new --workdir or delete the old one"
            )


# ---------------------------------------------------------------------- signals


class StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to checkpoint and stop; a second one aborts."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (notebooks, helpers): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (checkpointing); press Ctrl-C again to abort", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------------- the job


def train(cfg: ml_collections.ConfigDict, workdir: str, log=print, progress: bool = True) -> TrainResult:
    """Trains (or resumes) a model in ``workdir``; see the module docstring for outputs."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    setup_compile_cache(cfg)
    mesh, rules = make_mesh(cfg)
    finetune = "init_from" in cfg
    objective_head = "cls" if finetune else None

    if finetune:
        data, tokenizer, spec, init_params = _finetune_setup(cfg, workdir, log)
    else:
        files = resolve_files(resolve_data_path(cfg, log))
        val_names = _val_names(cfg)
        split = split_files(files, val_names, cfg.data.val_fraction, cfg.seed)
        tokenizer = tokenizer_for_run(cfg, workdir, split.train)
        spec = resolve_spec(cfg, tokenizer.vocab_size, cfg.data.seq_len, head=objective_head)
        init_params = None
        data = make_text_data(
            path=files,
            val_files=val_names,
            val_fraction=cfg.data.val_fraction,
            tokenizer=tokenizer,
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            kind=objective_for(spec),
            cache_dir=cfg.data.cache_dir or None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            log=log,
        )
    _check_same_run(workdir, spec)
    save_spec(spec, os.path.join(workdir, "spec.json"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))

    trainer = Trainer(spec, cfg.train, mesh, rules, cfg.seed, cfg.data.seq_len, dtype=cfg.model.dtype)
    iterator = data.train_iterator()
    metrics = MetricsWriter(workdir)
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=cfg.train.checkpoint_every,
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
    )
    run_info = {"train_seconds": 0.0}
    with ckpt:
        if ckpt.latest_step() is not None:
            step, state, extras = ckpt.restore(trainer.restore_target(), log=log)
            iterator.set_state(extras["data"])
            run_info.update(extras.get("run", {}))
            metrics.truncate_after(step)
            log(f"resumed from checkpoint step {step} in {ckpt.directory}")
        else:
            state = trainer.init_state()
            if init_params is not None:
                state, copied = trainer.with_params(state, init_params)
                log(f"inherited {copied} of {len(jax.tree.leaves(state.params))} weight arrays from {cfg.init_from}")
        start = int(jax.device_get(state.step))
        log(
            f"model {spec.name or cfg.model.spec}: {trainer.param_count():,} params | devices {jax.device_count()} "
            f"mesh {dict(mesh.shape)} | objective {trainer.objective} | steps {start}->{cfg.train.steps}"
        )
        bar = ProgressBar(cfg.train.steps, cfg.train.budget_seconds) if progress else None

        def on_log(step, m):
            metrics.write(step, "train", **m)
            if bar:
                bar.update(
                    step,
                    m["loss"],
                    m["tokens_per_sec"],
                    m["train_seconds"] - run_info["train_seconds"],
                    start_step=start,
                    force=step == cfg.train.steps,
                )

        preempted = [False]

        def saves_at(step):
            # On a preemption notice (TPU maintenance, SIGTERM from a scheduler) every
            # host saves now and the loop stops at the next step boundary.
            preempted[0] = ckpt.reached_preemption(step)
            return preempted[0] or ckpt.should_save(step)

        def on_step_end(step, st):  # only at the steps saves_at chose (Hooks.state_needed)
            extras = _ckpt_extras(spec, cfg, iterator, tokenizer, trainer.train_seconds)
            ckpt.save(step, st, force=preempted[0], **extras)

        def on_eval(step, val):
            metrics.write(step, "eval", **val)
            log("\n" + _format_val(step, val) if bar and bar.tty else _format_val(step, val))

        n_eval = cfg.train.eval_batches or None
        eval_fn = lambda params: _evaluate(trainer, params, data, n_eval)  # noqa: E731
        with StopFlag() as stop:
            hooks = Hooks(
                on_log=on_log,
                on_step_end=on_step_end,
                state_needed=saves_at,
                should_stop=lambda: stop.stop or preempted[0],
                on_eval=on_eval,
            )
            state, result = trainer.fit(
                state,
                iterator,
                total_steps=cfg.train.steps,
                budget_seconds=cfg.train.budget_seconds,
                train_seconds=run_info["train_seconds"],
                hooks=hooks,
                eval_fn=eval_fn,
                eval_every=cfg.train.eval_every,
                log_every=cfg.train.log_every,
            )
        if bar:
            bar.close()
        if result.status != "diverged":
            extras = _ckpt_extras(spec, cfg, iterator, tokenizer, result.train_seconds)
            ckpt.save(result.step, state, force=True, **extras)
            if result.status != "interrupted":
                result.val = eval_fn(state.params)
                metrics.write(result.step, "eval", **result.val)
                log(_format_val(result.step, result.val))
        else:
            log(f"run diverged: {result.reason}; the last good checkpoint is step {ckpt.latest_step()}")
    metrics.close()
    plot_loss_curve(metrics.path, os.path.join(workdir, "loss_curve.png"), title=f"{spec.name or 'model'} ({workdir})")
    with open(os.path.join(workdir, "status.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=2, default=float)
    log(
        f"{result.status}: step {result.step}, train loss {result.train_loss:.4f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, compile {result.compile_seconds:.1f}s, "
        f"train {result.train_seconds:.1f}s -> {workdir}"
    )
    return result


def _val_names(cfg) -> list[str]:
    return [v.strip() for v in cfg.data.val_files.split(",") if v.strip()]


def _evaluate(trainer: Trainer, params, data, max_batches: int | None) -> dict:
    num_bytes = data.val_num_bytes(max_batches) if hasattr(data, "val_num_bytes") else None
    return trainer.evaluate(params, data.val_batches(max_batches), num_bytes=num_bytes)


def _ckpt_extras(spec, cfg, iterator, tokenizer, train_seconds) -> dict:
    return {
        "spec": spec.to_dict(),
        "config": json.loads(cfg.to_json()),
        "data": iterator.get_state(),
        "tokenizer": tokenizer.to_config(embed=True),
        "run": {"train_seconds": float(train_seconds)},
    }


def _format_val(step: int, val: dict) -> str:
    parts = [f"{k[4:]} {v:.4f}" for k, v in val.items() if k.startswith("val_") and k != "val_tokens"]
    return f"eval @ step {step}: " + ", ".join(parts)


# ---------------------------------------------------------------------- eval


def load_run(workdir: str, step: int | None = None):
    """Spec, config, tokenizer and trained params of a workdir's checkpoint."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        raise RunError(f"{workdir} has no checkpoints/ folder; is it a nasjax training workdir?")
    with Checkpointer(ckdir, async_save=False) as ck:
        meta = ck.restore_json(step)
        if "spec" not in meta or "config" not in meta:
            raise RunError(f"checkpoint in {ckdir} lacks its spec/config items")
        spec = ModelSpec.from_dict(meta["spec"])
        cfg = ml_collections.ConfigDict(meta["config"])
        tokenizer = tokenizer_from_config(meta["tokenizer"])
        mesh, rules = make_mesh(cfg)
        trainer = Trainer(spec, cfg.train, mesh, rules, cfg.seed, cfg.data.seq_len, dtype=cfg.model.dtype)
        got_step, state, _ = ck.restore(trainer.restore_target(), step=step)
    return spec, cfg, tokenizer, trainer, state, got_step


def evaluate(workdir: str, step: int | None = None, max_batches: int = 0, log=print) -> dict:
    """Validation loss, perplexity and bits per byte of a checkpoint."""
    spec, cfg, tokenizer, trainer, state, got_step = load_run(workdir, step)
    if "init_from" in cfg:
        data = _classification_data(cfg, tokenizer)
    else:
        data = make_text_data(
            path=resolve_files(resolve_data_path(cfg, log)),
            val_files=_val_names(cfg),
            val_fraction=cfg.data.val_fraction,
            tokenizer=tokenizer,
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            kind=trainer.objective,
            cache_dir=cfg.data.cache_dir or None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            log=log,
        )
    val = _evaluate(trainer, state.params, data, max_batches or None)
    val["step"] = got_step
    return val


# ---------------------------------------------------------------------- finetune


def _classification_data(cfg, tokenizer) -> ClassificationData:
    """``data.path`` is one JSONL file (split by ``data.val_fraction``) or ``TRAIN.jsonl,VAL.jsonl``."""
    paths = [p.strip() for p in cfg.data.path.split(",") if p.strip()]
    return ClassificationData(
        paths[0] if len(paths) == 1 else tuple(paths),
        tokenizer,
        cfg.data.seq_len,
        cfg.train.batch_size,
        cfg.seed,
        cfg.data.val_fraction,
    )


def _finetune_setup(cfg, workdir: str, log):
    """Classification data, tokenizer, cls spec and (optionally) pretrained params."""
    if not cfg.data.path:
        raise RunError("finetune needs --config.data.path=FILE.jsonl (or TRAIN.jsonl,VAL.jsonl)")
    init_params = None
    if cfg.init_from:
        pre_spec, _, tokenizer, _, pre_state, pre_step = load_run(cfg.init_from)
        keep = cfg.get("init_weights", True)
        what = "initialising from" if keep else "architecture and tokenizer (random weights) of"
        log(f"{what} {cfg.init_from} (step {pre_step})")
        with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
            json.dump(tokenizer.to_config(embed=True), f, indent=2)
    else:
        tokenizer = tokenizer_for_run(cfg, workdir, [])
    data = _classification_data(cfg, tokenizer)
    if cfg.init_from:
        spec = pre_spec.replace(head="cls", n_classes=data.n_classes, pooler=True)
        if cfg.model.dropout_rate >= 0:
            spec = spec.replace(dropout_rate=float(cfg.model.dropout_rate))
        if cfg.get("init_weights", True):
            init_params = dict(jax.device_get(pre_state.params))
    else:
        spec = resolve_spec(cfg, tokenizer.vocab_size, cfg.data.seq_len, head="cls", n_classes=data.n_classes)
    return data, tokenizer, spec, init_params


def format_eval(val: dict) -> str:
    """A human summary of ``evaluate``'s result."""
    lines = [f"checkpoint step {val.get('step')}"]
    names = {
        "val_loss": "validation loss (nats/token)",
        "val_ppl": "perplexity",
        "val_bpb": "bits per byte",
        "val_accuracy": "accuracy",
        "val_tokens": "tokens evaluated",
    }
    for key, label in names.items():
        if key in val:
            v = val[key]
            lines.append(f"  {label:<30} {v:,.0f}" if key == "val_tokens" else f"  {label:<30} {v:.4f}")
    return "\n".join(lines)
