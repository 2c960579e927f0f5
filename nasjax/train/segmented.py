"""Train and eval steps compiled piece by piece and shared across models (``train.segmented``).

A search compiles one train step and one eval step per candidate, and on a tiny
candidate those compiles cost more than its training (docs/benchmarks.md). Yet
candidates share most of their computation: every Primer candidate has the same
embedding, head and loss, and its layers differ from its parent's only where the
mutation struck. Here a step is a chain of programs, each compiled once per process
for what it depends on (:class:`nasjax.models.transformer.Segments`) and kept in a
bounded registry:

* ``embed``: the embedding forward, returning its vjp (the residuals as outputs);
* ``layer``: one per distinct block (equal layers of a model share it), forward with
  residuals, and its backward;
* ``instruction`` (``train.segmented_pieces=instruction``, Primer program layers only):
  instead of one ``layer`` pair per program, one pair per instruction of it
  (:func:`nasjax.layers.program.program_tape`), keyed by the op, its widths and branch
  structure, not by the program. Candidates of a search share nearly all of them, so a
  new program compiles little or nothing, at the cost of one dispatch per instruction
  and no fusion between instructions (:class:`InstructionLayer`);
* ``head``: final norm, output projection and summed cross entropy, with its gradients;
  a forward-only twin for evaluation;
* ``norm``: the loss, global gradient norm, clip factor and learning rate of the step;
* ``update``: the optimizer for a chunk of same-shape parameter leaves (1, 2, 4, 8 or
  16 of them), one per (shape, chunk size, optimizer settings):
  the chain of :func:`nasjax.train.optim.make_optimizer` after its clipping, run on each
  leaf with its slice of the optimizer state. Global-norm clipping scales each leaf's
  gradient exactly as ``optax.clip_by_global_norm`` does.

``train.segmented_layout=flat`` (AdamW only; the tiny Primer preset's): while a model
trains, each parameter leaf and its Adam moments are held as a 1-D buffer of the leaf's
size class (:func:`flat_size`: at most 25% more elements than the leaf, zeros after it).
Every piece slices and reshapes its parameters inside its own program, so its gradients
come out in the same buffers, and an update program is keyed by size class, not shape:
a search stops compiling updates once it has seen its classes, where the shaped layout
compiles new ones for every new parameter shape. AdamW is elementwise and the padding
stays zero (zero gradient, zero moments, zero decay), so every real element gets the
shaped update's value; weight decay follows the leaf's real rank
(:func:`nasjax.train.optim.decay_chains`). The layout is internal to a fit:
:meth:`SegmentedSteps.pack_state` converts on the host (nothing compiled) and
``Trainer.fit`` hands shaped states and parameters to its hooks, its eval function and
its caller.

The state is the monolithic trainer's: the same parameter tree and the same optimizer
state, so checkpoints, inheritance and the probe's parameters are unchanged, and
the results equal the one-program step up to float rounding (fusion and summation
order differ; ``tests/test_segmented.py``).

What it costs: the pieces dispatch one by one (~20 programs per step for a 2-layer
model with 28 parameter leaves), and XLA cannot fuse across piece boundaries. What it
buys: a new candidate compiles only its new layer pieces. Scope: the language-model
objective without dropout, one micro-batch, replicated parameters (data parallelism);
:func:`unsupported` names what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from nasjax import sharding as shd
from nasjax import xla_options
from nasjax.layers.init import size_class
from nasjax.models.transformer import Segments
from nasjax.program_cache import ProgramCache
from nasjax.train import losses
from nasjax.train.optim import decay_chains, segment_optimizer
from nasjax.train.state import TrainState

__all__ = [
    "SegmentedSteps",
    "ProgramLayer",
    "unsupported",
    "clear_programs",
    "flat_size",
    "MAX_PROGRAMS",
    "DEFAULT_MAX_MB",
    "check_max_mb",
    "PIECES",
    "LAYOUTS",
]

# Compiled pieces kept per process, least recently used dropped first, per kind: layer
# pieces are rarely shared beyond one model (a Primer child's layers are all new), and
# each holds ~1-3 MiB of host memory; the shared kinds (embedding, head, norm, one update
# per parameter shape) are few and used by every model.
# Instruction pieces are small (one op's forward and backward) and shared across
# programs; a search's whole vocabulary of (op, widths, branch structure) fits.
MAX_PROGRAMS = {"layer": 16, "shared": 256, "instruction": 1024}
# ... and at most this many MiB of them, all kinds together, as their serialized
# executables measure them (train.segmented_max_mb; nasjax.program_cache.executable_bytes):
# a program's host memory grows with its code (on XLA:CPU ~12-15x the serialized size for
# a search's pieces, ~0.6-0.7 GiB for 48 MiB), so a search evolving toward larger
# candidates holds more per piece (docs/benchmarks.md, stop 25).
DEFAULT_MAX_MB = 48
# train.segmented_pieces: what one piece of a layer is (see the module docstring)
PIECES = ("layer", "subprogram", "instruction")
# train.segmented_layout: how a parameter leaf (and its optimizer moments) is held while a
# model trains: in its own shape, or as a 1-D buffer of its size class (module docstring)
LAYOUTS = ("shaped", "flat")
# Shared pieces on a mesh of several devices hold collectives (the gradient all-reduce).
# Two threads running such steps at once (engine=threads) could interleave executions of
# the same program, and on XLA:CPU the participants of one collective then starve for
# threads and abort; steps on multi-device meshes therefore run one at a time, each to
# completion (a one-device mesh has no collectives and runs freely).
_EXECUTION = threading.Lock()
LM_BATCH_KEYS = ("inputs", "targets", "weights")


# leaves of one shape updated by one program: powers of two up to train.segmented_update_chunk
# (largest first). Each (shape, chunk size) is its own program: larger chunks dispatch fewer
# programs per step, a chunk of 1 compiles one update per parameter shape and no more.
UPDATE_CHUNKS = (16, 8, 4, 2, 1)


def _group(key: tuple) -> str:
    return key[0] if key[0] in ("layer", "instruction") else "shared"


_PROGRAMS = ProgramCache(MAX_PROGRAMS, _group)


def clear_programs() -> None:
    """Drops every compiled piece (``search.clear_caches`` does, with jax's own caches)."""
    _PROGRAMS.clear()


def check_pieces(train_cfg) -> str:
    """``train.segmented_pieces``, checked (ValueError naming the choices)."""
    value = train_cfg.get("segmented_pieces", "layer")
    if value not in PIECES:
        raise ValueError(f"train.segmented_pieces={value!r}: expected one of {', '.join(map(repr, PIECES))}")
    return value


def check_layout(train_cfg) -> str:
    """``train.segmented_layout``, checked (ValueError naming the choices and the optimizer it needs)."""
    value = train_cfg.get("segmented_layout", "shaped")
    if value not in LAYOUTS:
        raise ValueError(f"train.segmented_layout={value!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    if value == "flat" and train_cfg.get("optimizer", "adamw") != "adamw":
        raise ValueError(
            f"train.segmented_layout='flat' needs train.optimizer=adamw, an elementwise update; "
            f"{train_cfg.get('optimizer')!r} is not (Adafactor factors a matrix's second moments by its "
            f"rows and columns); set train.segmented_layout='shaped'"
        )
    return value


def flat_size(shape) -> int:
    """Elements of a parameter's 1-D buffer in the flat layout: its size class (at most 25% more)."""
    return size_class(int(np.prod(shape, dtype=np.int64)))


def _flat_abstract(a):
    sharding = getattr(a, "sharding", None)
    if isinstance(sharding, NamedSharding):  # replicated (train.segmented's scope), whatever its spec's rank
        sharding = NamedSharding(sharding.mesh, PartitionSpec(), memory_kind=sharding.memory_kind)
    return jax.ShapeDtypeStruct((flat_size(a.shape),), a.dtype, sharding=sharding)


def _unflat(buffers, shaped):
    """Traced: each 1-D buffer's leading elements in its parameter's shape (``shaped``: the
    parameters' ShapeDtypeStructs, same structure)."""
    return jax.tree.map(lambda b, a: b[: int(np.prod(a.shape, dtype=np.int64))].reshape(a.shape), buffers, shaped)


def _host_flat(x, sharding):
    """A parameter-shaped array as its flat buffer (no-op if it is one), through the host: no compile."""
    n = flat_size(x.shape)
    if tuple(x.shape) == (n,):
        return x
    host = np.asarray(jax.device_get(x)).reshape(-1)
    out = np.zeros((n,), host.dtype)
    out[: host.size] = host
    return jax.device_put(out, sharding)


def _host_shaped(x, a, sharding):
    """A flat buffer back in its parameter's shape ``a.shape`` (no-op if it is in it), through the host."""
    if tuple(x.shape) == tuple(a.shape):
        return x
    host = np.asarray(jax.device_get(x))[: int(np.prod(a.shape, dtype=np.int64))]
    return jax.device_put(host.reshape(a.shape), sharding)


def check_max_mb(train_cfg) -> int | None:
    """``train.segmented_max_mb``, checked: the registry's bound in bytes, or None (0: no bound)."""
    value = train_cfg.get("segmented_max_mb", DEFAULT_MAX_MB)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"train.segmented_max_mb={value!r}: expected an int >= 0 (MiB of serialized compiled pieces kept "
            "per process; 0 = bounded by count only)"
        )
    return value * 2**20 if value else None


def check_update_chunk(train_cfg) -> tuple[int, ...]:
    """``train.segmented_update_chunk``, checked: the chunk sizes it allows, largest first."""
    value = train_cfg.get("segmented_update_chunk", UPDATE_CHUNKS[0])
    if isinstance(value, bool) or not isinstance(value, int) or value not in UPDATE_CHUNKS:
        raise ValueError(
            f"train.segmented_update_chunk={value!r}: expected one of {', '.join(map(str, sorted(UPDATE_CHUNKS)))}"
            " (the most parameter leaves of one shape that one update program takes)"
        )
    return tuple(c for c in UPDATE_CHUNKS if c <= value)


def unsupported(spec, train_cfg, accum_steps: int, params_replicated: bool) -> str:
    """Why ``train.segmented`` cannot run this model and setting, or '' if it can."""
    problem = Segments.unsupported(spec)
    if problem:
        return problem
    if accum_steps != 1:
        return f"train.grad_accum_steps={accum_steps} (one micro-batch per step only)"
    if train_cfg.get("flat_optimizer", False):
        return "train.flat_optimizer=true (the segmented update runs per parameter leaf already)"
    if not params_replicated:
        return "a mesh that shards parameters (FSDP / tensor axes); data parallelism only"
    return ""


def _canonical(sharding):
    """One object per meaning for named shardings (``P()`` and ``P(None, None)`` are equal
    layouts but unequal keys): trailing unsharded dimensions dropped."""
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    return sharding


def _layout(tree) -> tuple:
    """A hashable description of a tree of arrays / ShapeDtypeStructs: structure, shapes, dtypes, shardings."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype), _canonical(getattr(x, "sharding", None))) for x in leaves))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _compiled_outputs(compiled):
    """A compiled program's outputs as ShapeDtypeStructs with the shardings XLA gave them."""
    return jax.tree.map(
        lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=_canonical(sh)),
        compiled.out_info,
        compiled.output_shardings,
    )


def _program(key: tuple, build) -> tuple[Any, float]:
    """The compiled program under ``key``, built (and timed) on a miss; returns (program, seconds)."""
    return _PROGRAMS.get(key, build)


def _sumsq(tree):
    return sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


class _StateSlots:
    """Maps the optimizer state to per-leaf views and back.

    A subtree of the (post-clip) optimizer state that mirrors the parameter tree (Adam's
    mu and nu) is a *slot* whose view for leaf i is that tree's i-th leaf; any other leaf
    (step counts) is shared by every view. Views keep the state's own structure, so the
    optimizer chain runs on a view exactly as on the whole tree.
    """

    def __init__(self, inner_state, params_def):
        self.params_def = params_def
        self.n = params_def.num_leaves
        mirrors = lambda x: not _is_leaf(x) and jax.tree.structure(x) == params_def  # noqa: E731
        slots, self.slots_def = jax.tree.flatten(inner_state, is_leaf=mirrors)
        self.mirror = [mirrors(s) for s in slots]

    def views(self, inner_state) -> list:
        slots = jax.tree.flatten(inner_state, is_leaf=lambda x: False)[0]
        # Flattened fully, a mirror slot contributes n leaves, any other one leaf.
        out, pos, columns = [], 0, []
        for m in self.mirror:
            if m:
                columns.append(slots[pos : pos + self.n])
                pos += self.n
            else:
                columns.append(slots[pos])
                pos += 1
        for i in range(self.n):
            out.append(self.slots_def.unflatten([c[i] if m else c for c, m in zip(columns, self.mirror)]))
        return out

    def merge(self, views: list):
        flat = [jax.tree.leaves(v) for v in views]
        slots = []
        for j, m in enumerate(self.mirror):
            slots.append(self.params_def.unflatten([f[j] for f in flat]) if m else flat[0][j])
        return self.slots_def.unflatten(slots)


def _is_leaf(x) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


class SegmentedSteps:
    """The train and eval steps of one model, as a chain of shared compiled pieces.

    Args:
      spec: the model spec; train_cfg: the ``train`` block; mesh, rules: the trainer's;
      context: a callable returning the trainer's mesh + logical-rules context;
      dtype: activation dtype; state_shardings: the trainer's (replicated) state shardings;
      abstract_state: the trainer's abstract state with its shardings (the parameters'
      shapes, which ``train.segmented_layout=flat`` needs).
    """

    def __init__(self, spec, train_cfg, mesh, rules, context, dtype, state_shardings, abstract_state=None):
        self.seg = Segments(spec, dtype=dtype)
        self.mesh, self.rules, self.context = mesh, rules, context
        self.dtype = jnp.dtype(dtype)
        self.clip, self.inner, self.n_clip_states, self.opt_key, self._schedule = segment_optimizer(train_cfg)
        self.pieces = check_pieces(train_cfg)
        self.update_chunks = check_update_chunk(train_cfg)
        self.layout = check_layout(train_cfg)
        _PROGRAMS.set_max_bytes(check_max_mb(train_cfg))  # one registry per process: the latest setting holds
        # XLA options for every piece (train.segmented_xla_options; nasjax.xla_options), part of its key
        self.xla_options = xla_options.resolve(train_cfg, mesh.devices.flat[0].platform)
        self._xla_key = tuple(sorted(self.xla_options.items()))
        # the update programs' (auto adds a codegen split on CPU), part of their keys
        self.update_xla_options = xla_options.resolve(train_cfg, mesh.devices.flat[0].platform, updates=True)
        self.flat = self.layout == "flat"
        if self.flat and abstract_state is None:
            raise ValueError("train.segmented_layout='flat': SegmentedSteps needs the trainer's abstract state")
        self._decay_chains = decay_chains(train_cfg) if self.flat else None
        self._decays = bool(float(train_cfg.get("weight_decay", 0.0) or 0.0))  # else one chain serves every leaf
        self.state_shardings = state_shardings
        self.shaped_state = abstract_state
        # the buffers' shapes, for the per-step layout check (computed once: it is on the step's path)
        self._flat_shapes = None
        if self.flat:
            self._flat_shapes = [(flat_size(a.shape),) for a in jax.tree.leaves(abstract_state.params)]
        self.compile_seconds = 0.0
        self._train = None  # (batch layout, plan)
        self._eval: dict = {}  # batch layout -> plan
        self._serial = _EXECUTION if mesh.devices.size > 1 else contextlib.nullcontext()
        # XLA:CPU runs each device of a multi-device program on its thread pool, and a
        # collective's participants wait there for each other: with several such programs
        # in flight (asynchronous dispatch of one piece after another) they can starve the
        # pool. Simulated multi-device CPU meshes (tests) therefore run piece by piece.
        self._sync = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    def _run(self, program, *args):
        out = program(*args)
        if self._sync:
            jax.block_until_ready(out)
        return out

    # ------------------------------------------------------------------ programs
    def _key(self, *parts) -> tuple:
        return (*parts, self.mesh, tuple(self.rules), str(self.dtype), self.layout, self._xla_key)

    def _finish(self, lowered, options: dict | None = None):
        """``lowered`` compiled with this trainer's XLA options (``options``: others)."""
        options = self.xla_options if options is None else options
        return lowered.compile(dict(options)) if options else lowered.compile()

    # ------------------------------------------------------------------ flat layout
    def _buffers(self, shaped):
        """The abstract parameters a program takes: the flat layout's 1-D buffers of a shaped
        (sub)tree, or the tree itself in the shaped layout."""
        return jax.tree.map(_flat_abstract, shaped) if self.flat else shaped

    def _on_buffers(self, fn, shaped):
        """``fn(params, *rest)`` taking the layout's buffers for ``shaped``'s parameters."""
        if not self.flat:
            return fn
        return lambda p, *rest: fn(_unflat(p, shaped), *rest)

    def _map_state(self, state, fn):
        """``state`` with ``fn`` applied to its parameters and to every optimizer subtree that
        mirrors them (Adam's moments); other optimizer leaves (the count) unchanged."""
        params_def = jax.tree.structure(self.shaped_state.params)
        mirrors = lambda x: not _is_leaf(x) and jax.tree.structure(x) == params_def  # noqa: E731
        opt = jax.tree.map(lambda x: fn(x) if mirrors(x) else x, state.opt_state, is_leaf=mirrors)
        return state.replace(params=fn(state.params), opt_state=opt)

    def pack_params(self, params):
        """Parameters in this trainer's layout (the flat buffers, from either layout; no compile)."""
        if not self.flat:
            return params
        rep = shd.replicated(self.mesh)
        return jax.tree.map(lambda x: _host_flat(x, rep), params)

    def unpack_params(self, params):
        """Parameters in their own shapes and shardings (from either layout; no compile)."""
        if not self.flat:
            return params
        return jax.tree.map(_host_shaped, params, self.shaped_state.params, self.state_shardings.params)

    def pack_state(self, state: TrainState) -> TrainState:
        """A train state in this trainer's layout (parameters and Adam's moments; the step as is)."""
        return self._map_state(state, self.pack_params) if self.flat else state

    def unpack_state(self, state: TrainState) -> TrainState:
        """A train state in the parameters' own shapes, as every caller outside a fit sees it."""
        return self._map_state(state, self.unpack_params) if self.flat else state

    def is_packed(self, state: TrainState) -> bool:
        """Whether ``state``'s parameters are in the flat layout (True in the shaped layout)."""
        return not self.flat or [tuple(x.shape) for x in jax.tree.leaves(state.params)] == self._flat_shapes

    def _compile(self, fn, *abstract_args, options=None, **jit_kwargs):
        with self.context():
            return self._finish(jax.jit(fn, **jit_kwargs).lower(*abstract_args), options)

    def _get(self, key, fn, *abstract_args, options=None, **jit_kwargs):
        """The program under ``key`` (compiled on a miss; ``options``: XLA options other than
        the pieces', added to the key)."""
        if options is not None:
            key = (*key, tuple(sorted(options.items())))
        program, seconds = _program(
            self._key(*key), lambda: self._compile(fn, *abstract_args, options=options, **jit_kwargs)
        )
        self.compile_seconds += seconds
        return program

    def _pair(self, key, forward, abstract_params, abstract_x, wrt_x: bool = True, extra_grads: bool = False):
        """Forward (returning its vjp) and backward programs of one piece, compiled together.

        ``wrt_x``: differentiate w.r.t. the input too (layers; not the token ids of the
        embedding). ``extra_grads``: the backward adds gradients computed elsewhere for the
        same parameters (the tied output projection's, for the embedding).
        ``abstract_params``: shaped; the programs take the layout's buffers.
        """
        forward = self._on_buffers(forward, abstract_params)
        abstract_params = self._buffers(abstract_params)

        def build():
            def fwd(p, x):
                if wrt_x:
                    return jax.vjp(forward, p, x)
                return jax.vjp(lambda q: forward(q, x), p)

            def bwd(vjp, g, extra):
                grads = vjp(g)
                g_params, g_x = grads if wrt_x else (grads[0], None)
                if extra is not None:
                    g_params = jax.tree.map(jnp.add, g_params, extra)
                return g_params, g_x, _sumsq(g_params)

            p_sh = jax.tree.map(lambda a: a.sharding, abstract_params)
            rep = shd.replicated(self.mesh)
            with self.context():
                forward_program = self._finish(jax.jit(fwd).lower(abstract_params, abstract_x))
                # The outputs as compiled (XLA chose the residuals' shardings): the backward
                # must be compiled for exactly these.
                y_info, vjp_info = _compiled_outputs(forward_program)
                extra = _abstract(abstract_params) if extra_grads else None
                out_sh = (p_sh, jax.tree.map(lambda a: a.sharding, abstract_x) if wrt_x else None, rep)
                backward = self._finish(jax.jit(bwd, out_shardings=out_sh).lower(vjp_info, y_info, extra))
                return forward_program, backward, y_info

        program, seconds = _program(self._key(*key), build)
        self.compile_seconds += seconds
        return program

    # ------------------------------------------------------------------ plans
    def _plan(self, abstract_params, batch: dict, train: bool) -> dict:
        """Compiles (or finds) the pieces for this batch layout; returns them in step order.

        A train plan holds the forward programs the probe runs (the embedding's pair, the
        layers' forwards, the probe head), not yet the program layers' backwards, the loss
        head and the norm: :meth:`_complete` adds them. Pairs (the embedding, whole layers
        with ``train.segmented_pieces=layer``) compile forward and backward together."""
        extra = sorted(set(batch) - set(LM_BATCH_KEYS))
        if extra or not set(LM_BATCH_KEYS) <= set(batch):
            raise ValueError(
                f"train.segmented runs language-model batches ({', '.join(LM_BATCH_KEYS)}); "
                f"this batch has {sorted(batch)}"
            )
        seg = self.seg
        tokens, targets, weights = (_abstract(batch[k]) for k in LM_BATCH_KEYS)
        p_embed = abstract_params["embed"]
        head_p = seg.head_params(abstract_params)
        tied = "embed" in head_p
        embed_key = ("embed", seg.template_key(), _layout(p_embed), _layout(tokens), tied)
        embed = self._pair(embed_key, seg.embed, p_embed, tokens, wrt_x=False, extra_grads=tied)
        x = embed[2]
        layers = []  # per layer: (forward, backward, output info, its ProgramLayer or (forward, backward) programs)
        for i in range(seg.n_layers):
            p_layer = seg.layer_params(abstract_params, i)
            program = seg.program_block(i) if self.pieces != "layer" else None
            if program is not None:
                layer = ProgramLayer(self, program, seg.program_params(p_layer), x)
                layers.append((layer.forward, layer.backward, layer.y_info, layer))
            else:
                forward = lambda p, h, i=i: seg.layer(i, p, h)  # noqa: E731
                pair = self._pair(("layer", seg.layer_key(i), _layout(p_layer), _layout(x)), forward, p_layer, x)
                layers.append((*pair, pair[:2]))
            x = layers[-1][2]
        head_key = (seg.template_key(), _layout(head_p), _layout(x), _layout((targets, weights)))
        loss, head_b = self._on_buffers(self._loss, head_p), self._buffers(head_p)
        if not train:
            head = self._get(("eval_head", *head_key), loss, head_b, x, targets, weights)
            return {"embed": embed, "layers": layers, "head": head}

        probe_key = ("probe_head", seg.template_key(), _layout(head_p), _layout(x))
        probe_head = (probe_key, head_p, x)  # compiled on the first probe (search.probe=steps)
        pending = (head_key, head_p, x, targets, weights)  # for _complete
        return {"embed": embed, "layers": layers, "probe_head": probe_head, "pending": pending}

    def _complete(self, plan: dict) -> None:
        """Adds what a train plan from :meth:`_plan` lacks: the program layers' backward programs,
        the loss head (value and gradients) and the norm."""
        head_key, head_p, x, targets, weights = plan["pending"]  # removed once all is built: a failure can retry
        for layer in plan["layers"]:
            if isinstance(layer[3], ProgramLayer):
                layer[3].build_backward()
        loss, head_b = self._on_buffers(self._loss, head_p), self._buffers(head_p)

        def head_grads(p, h, t, w):
            (loss_sum, weight_sum), (g_p, g_h) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, h, t, w)
            own = {k: v for k, v in g_p.items() if k != "embed"}
            return loss_sum, weight_sum, g_p, g_h, _sumsq(own)

        rep = shd.replicated(self.mesh)
        head_sh = (rep, rep, jax.tree.map(lambda a: a.sharding, head_b), x.sharding, rep)
        plan["head"] = self._get(("head", *head_key), head_grads, head_b, x, targets, weights, out_shardings=head_sh)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        n_sums = self.seg.n_layers + 2
        plan["norm"] = self._get(("norm", self.opt_key, n_sums), self._norm, (scalar,) * n_sums, scalar, scalar, step)
        del plan["pending"]

    def _loss(self, head_params, x, targets, weights):
        loss_sum, weight_sum = losses.token_cross_entropy(self.seg.logits(head_params, x), targets, weights)
        return loss_sum, weight_sum

    def _norm(self, sums, weight_sum, loss_sum, step):
        denom = jnp.maximum(weight_sum, 1.0)
        grad_norm = jnp.sqrt(sum(sums)) / denom  # the norm of the mean gradient, as optax.tree.norm(grads / denom)
        lr = self._schedule(step)
        return {"denom": denom, "grad_norm": grad_norm, "loss": loss_sum / denom, "learning_rate": lr, "step": step + 1}

    def _update_groups(self, params, views, decay=None, shared=None) -> list[tuple[Any, list[int]]]:
        """The update programs of a model: leaves of equal layout in chunks of 16, 8, 4, 2, 1
        (up to ``train.segmented_update_chunk``). ``decay``: per leaf, whether weight decay
        applies (the flat layout, whose buffers do not show a parameter's rank); None: the
        optimizer's own mask decides. ``shared``: per leaf of a view, whether it is one the
        views share (:class:`_StateSlots`: the step counts), see :meth:`_leaf_updates`.

        One program updates a chunk of same-shape leaves (fewer dispatches than one per
        leaf, ~1 ms less per tiny step); chunk sizes are powers of two so a few programs
        per shape serve every model, whatever its count of leaves of that shape.

        In the flat layout the leaves are grouped by size class, not shape. (A fixed chunk
        per class, its last chunk filled up with repeats of a leaf, compiled fewer programs,
        16 instead of 41 in a replay of a default search, but the repeats cost ~20 us each
        per step, and one large leaf per program lost the two-leaf programs' parallelism
        across cores: the tiny steps' updates took 2.4 instead of 1.0 ms.)
        """
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
        by_layout: dict[tuple, list[int]] = {}
        for i, (p, view) in enumerate(zip(params, views)):
            flag = None if decay is None else bool(decay[i])
            by_layout.setdefault((_layout(p), _layout(view), flag), []).append(i)
        groups = []
        for (p_layout, v_layout, flag), members in by_layout.items():
            update = functools.partial(self._leaf_updates, decay=flag, shared=shared)
            p, view = _abstract(params[members[0]]), _abstract(views[members[0]])
            out_sh = (p.sharding, jax.tree.map(lambda a: a.sharding, view))
            chunks, start = [], 0  # greedy, largest chunk first
            for size in self.update_chunks:
                while len(members) - start >= size:
                    chunks.append(members[start : start + size])
                    start += size
            for chunk in chunks:
                size = len(chunk)
                key = ("update", self.opt_key, p_layout, v_layout, size, flag, shared)
                args = ((p,) * size, (p,) * size, (view,) * size, scalar, scalar)
                program = self._get(
                    key,
                    update,
                    *args,
                    options=self.update_xla_options,
                    out_shardings=((out_sh[0],) * size, (out_sh[1],) * size),
                )
                groups.append((program, chunk))
        return groups

    def _leaf_updates(self, ps, gs, views, denom, grad_norm, decay=None, shared=None):
        """The optimizer on each leaf of a chunk. ``shared`` (a bool per leaf of a view): the
        leaves every view holds the same array for (the step counts; the caller passes the
        same buffers). Each view reads the first view's, so the program computes the step's
        scalars (count, bias corrections, learning rate) once, not once per leaf: 4-5 kernels
        per leaf instead of 9, the same values."""
        if shared and any(shared) and len(views) > 1:
            first = jax.tree.leaves(views[0])
            views = [views[0]] + [
                jax.tree.unflatten(
                    jax.tree.structure(v),
                    [f if s else x for f, x, s in zip(first, jax.tree.leaves(v), shared, strict=True)],
                )
                for v in views[1:]
            ]
        out = [self._leaf_update(p, g, view, denom, grad_norm, decay) for p, g, view in zip(ps, gs, views)]
        return tuple(o[0] for o in out), tuple(o[1] for o in out)

    def _leaf_update(self, p, g, view, denom, grad_norm, decay=None):
        g = g / denom
        if self.clip:  # optax.clip_by_global_norm, per leaf, with the global norm given
            g = jax.lax.select(grad_norm < self.clip, g, (g / grad_norm.astype(g.dtype)) * self.clip)
        inner = self.inner if decay is None else self._decay_chains[decay]
        updates, view = inner.update(g, view, p)
        return optax.apply_updates(p, updates), view

    # ------------------------------------------------------------------ public
    def compile(self, abstract_state: TrainState, batch: dict, forward_only: bool = False) -> float:
        """Builds (or finds) the train pieces for this batch layout, updates included; returns seconds.

        ``forward_only``: only what :meth:`probe_forward` runs (a candidate that fails its
        probe, or that a search reuses, then never compiles its program layers' backwards
        and its updates); a later call without it completes the plan."""
        t0 = self.compile_seconds
        layout = _layout(_abstract(batch))
        shaped = self.shaped_state if self.flat else abstract_state  # flat: ``abstract_state`` may hold buffers
        if self._train is None or self._train[0] != layout:
            if forward_only and self._train is not None and "slots" in self._train[1]:
                raise ValueError(
                    "SegmentedSteps.compile(forward_only=True): the train step is compiled for another batch layout"
                )
            self._train = (layout, self._plan(shaped.params, batch, train=True))
        plan = self._train[1]
        if not forward_only and "slots" not in plan:
            if "pending" in plan:
                self._complete(plan)
            buffers = self._state_buffers(shaped)
            params = _abstract(buffers.params)
            inner = _abstract(self._inner_state(buffers.opt_state))
            slots = _StateSlots(inner, jax.tree.structure(params))
            views = slots.views(inner)
            decay = [self._decays and len(a.shape) >= 2 for a in jax.tree.leaves(shaped.params)] if self.flat else None
            shared = tuple(not m for m in slots.mirror)
            plan["updates"] = self._update_groups(jax.tree.leaves(params), views, decay, shared)
            plan["slots"] = slots
        return self.compile_seconds - t0

    def _state_buffers(self, shaped):
        return self._map_state(_abstract(shaped), self._buffers) if self.flat else shaped

    def memory_estimate(self) -> dict:
        """:meth:`_memory` of the train plan compiled so far ({} before any): after
        ``compile(..., forward_only=True)`` a lower bound, marked ``"complete": False``."""
        if self._train is None or self.shaped_state is None:
            return {}
        return self._memory(self._train[1], self._state_buffers(self.shaped_state))

    def compiled(self, batch: dict) -> bool:
        """Whether the whole train step (not only the probe's forward) is compiled for this batch layout."""
        return self._train is not None and self._train[0] == _layout(_abstract(batch)) and "slots" in self._train[1]

    def compile_eval(self, abstract_params: Callable[[], Any], batch: dict) -> float:
        """Finds (or compiles) the eval pieces for this batch layout; returns seconds.

        ``abstract_params``: returns the parameters' ShapeDtypeStructs with shardings
        (called on a miss only)."""
        t0 = self.compile_seconds
        layout = _layout(_abstract(batch))
        if layout not in self._eval:
            self._eval[layout] = self._plan(abstract_params(), batch, train=False)
        return self.compile_seconds - t0

    def _inner_state(self, opt_state):
        return opt_state[self.n_clip_states :] if self.n_clip_states else opt_state

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One train step; returns the state in this trainer's layout (:meth:`pack_state`)."""
        if self._train is None or "slots" not in self._train[1]:
            self.compile(state, batch)
        if not self.is_packed(state):  # a fit's state already is (Trainer.fit packs it once)
            state = self.pack_state(state)
        with self._serial:
            out = self._step(state, batch)
            if self._serial is _EXECUTION:
                jax.block_until_ready(out)
        return out

    def _forward_backward(self, plan, params, batch: dict) -> dict:
        """The step's forward and backward through the layers (everything but the
        embedding's backward and the update): the last layer's output ``x``, the loss and
        weight sums, the head's and layers' gradients, their squared norms, the
        gradient w.r.t. the first layer's input ``g_x`` and the embedding's vjp."""
        seg, run = self.seg, self._run
        fwd, _, _ = plan["embed"]
        x, embed_vjp = run(fwd, params["embed"], batch["inputs"])
        vjps = []
        for i, layer in enumerate(plan["layers"]):
            x, vjp = run(layer[0], seg.layer_params(params, i), x)
            vjps.append(vjp)
        head_p = seg.head_params(params)
        loss_sum, weight_sum, g_head, g_x, sum_head = run(plan["head"], head_p, x, batch["targets"], batch["weights"])
        sums, g_layers = [sum_head], [None] * len(vjps)
        for i in reversed(range(len(vjps))):
            g_layers[i], g_x, s = run(plan["layers"][i][1], vjps[i], g_x, None)
            sums.append(s)
        return {
            "x": x,
            "loss_sum": loss_sum,
            "weight_sum": weight_sum,
            "g_head": g_head,
            "g_layers": g_layers,
            "sums": sums,
            "g_x": g_x,
            "embed_vjp": embed_vjp,
        }

    def probe(self, params, batch: dict) -> dict:
        """A candidate's pre-training checks on its own train-step pieces (``search.probe=steps``).

        Runs the forward and the backward of a train step on ``batch`` (a batch of the
        train layout, whose pieces :meth:`compile` built) without updating anything, and
        a shared forward-only head piece. Returns host arrays: ``last_logits`` [B, V] (the
        last position's logits of every row), ``finite`` (all logits finite) and
        ``input_grads`` [B, L, D] (the loss gradient w.r.t. the first layer's input, i.e.
        the summed input embeddings; :func:`nasjax.measure.probe.probe_from_steps` reads
        causality from it). A candidate probed this way compiles nothing beyond its
        training pieces: its checks run on programs it trains with anyway.
        """
        if not self.compiled(batch):
            raise ValueError("SegmentedSteps.probe: compile the train pieces for this batch layout first")
        plan, params = self._train[1], self.pack_params(params)
        with self._serial:
            out = self._forward_backward(plan, params, batch)
            return self._probe_outputs(plan, params, out["x"], input_grads=out["g_x"])

    def probe_forward(self, params, batch: dict) -> dict:
        """The probe's first stage: the forward alone through the train step's forward
        programs (:meth:`compile` with ``forward_only`` builds just those). Returns host
        arrays ``last_logits`` and ``finite`` (the values :meth:`probe` returns for them)
        and ``x``, the last layer's outputs [B, L, D]
        (:func:`nasjax.measure.probe.probe_from_forward` reads causality from two of them)."""
        if self._train is None or self._train[0] != _layout(_abstract(batch)):
            raise ValueError("SegmentedSteps.probe_forward: compile the forward pieces for this batch layout first")
        plan, params = self._train[1], self.pack_params(params)
        with self._serial:
            x = self._forward(plan, params, batch["inputs"])
            return self._probe_outputs(plan, params, x, x=x)

    def _probe_outputs(self, plan: dict, params, x, /, **extra) -> dict:
        """Host arrays: the probe head's ``last_logits`` and ``finite`` on the last layer's
        outputs ``x``, with ``extra`` arrays."""
        last, finite = self._run(self._probe_head(plan), self.seg.head_params(params), x)
        host = jax.device_get({"last_logits": last, "finite": finite, **extra})
        return {k: np.asarray(v) for k, v in host.items()}

    def _probe_head(self, plan: dict):
        """The shared forward-only head of the probe: the last position's logits and whether all are finite."""
        key, abstract_head_params, abstract_x = plan["probe_head"]
        logits_of = self._on_buffers(self.seg.logits, abstract_head_params)

        def probe_head(p, x):
            logits = logits_of(p, x)
            return logits[:, -1, :], jnp.all(jnp.isfinite(logits))

        return self._get(key, probe_head, self._buffers(abstract_head_params), abstract_x)

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        plan, run = self._train[1], self._run
        params = state.params
        fb = self._forward_backward(plan, params, batch)
        loss_sum, weight_sum, g_head, g_layers, sums = (
            fb["loss_sum"],
            fb["weight_sum"],
            fb["g_head"],
            fb["g_layers"],
            fb["sums"],
        )
        g_embed, _, s = run(plan["embed"][1], fb["embed_vjp"], fb["g_x"], g_head.get("embed"))
        sums.append(s)
        stats = run(plan["norm"], tuple(sums), weight_sum, loss_sum, state.step)
        grads = self._grad_tree(params, g_embed, g_layers, g_head)
        slots = plan["slots"]
        views = slots.views(self._inner_state(state.opt_state))
        p_leaves, g_leaves = jax.tree.leaves(params), jax.tree.leaves(grads)
        new_p, new_views = [None] * len(p_leaves), [None] * len(p_leaves)
        for program, chunk in plan["updates"]:
            ps, vs = run(
                program,
                tuple(p_leaves[i] for i in chunk),
                tuple(g_leaves[i] for i in chunk),
                tuple(views[i] for i in chunk),
                stats["denom"],
                stats["grad_norm"],
            )
            for i, p, v in zip(chunk, ps, vs):
                new_p[i], new_views[i] = p, v
        inner = slots.merge(new_views)
        opt_state = (state.opt_state[: self.n_clip_states] + inner) if self.n_clip_states else inner
        new_state = TrainState(
            step=stats["step"], params=jax.tree.structure(params).unflatten(new_p), opt_state=opt_state
        )
        metrics = {
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
            "learning_rate": stats["learning_rate"],
            "tokens": weight_sum,
        }
        return new_state, metrics

    def _grad_tree(self, params, g_embed, g_layers, g_head):
        seg = self.seg
        grads = {k: v for k, v in g_head.items() if k != "embed"}
        grads["embed"] = g_embed
        stack = params.get(seg.spec.kind, {})  # layers without parameters have no subtree
        grads[seg.spec.kind] = {f"layer_{i}": g for i, g in enumerate(g_layers) if f"layer_{i}" in stack}
        missing = set(params) - set(grads)
        if missing:  # a parameter no piece reads would silently never train
            raise ValueError(f"train.segmented: no piece computes gradients of {sorted(missing)}")
        return {k: grads[k] for k in params}

    def evaluate(self, params, batch: dict) -> dict:
        """The eval step's sums for one batch (its pieces compiled by :meth:`compile_eval`)."""
        params = self.pack_params(params)
        with self._serial:
            out = self._evaluate(self._eval[_layout(_abstract(batch))], params, batch)
            if self._serial is _EXECUTION:
                jax.block_until_ready(out)
        return out

    def _forward(self, plan, params, inputs):
        """The last layer's outputs through ``plan``'s forward programs (residuals dropped)."""
        seg, run = self.seg, self._run
        x, _ = run(plan["embed"][0], params["embed"], inputs)
        for i, layer in enumerate(plan["layers"]):
            x, _ = run(layer[0], seg.layer_params(params, i), x)
        return x

    def _evaluate(self, plan, params, batch: dict) -> dict:
        x = self._forward(plan, params, batch["inputs"])
        head_params = self.seg.head_params(params)
        loss_sum, weight_sum = self._run(plan["head"], head_params, x, batch["targets"], batch["weights"])
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": jnp.zeros((), jnp.float32)}

    # ------------------------------------------------------------------ memory
    def _memory(self, plan, abstract_state) -> dict:
        """An estimate of a train step's peak bytes per device: the state, the gradients,
        every forward piece's outputs (activations and residuals live until the backward)
        and the largest temporary of any piece. XLA analyses each piece, not the chain.

        Of a plan compiled ``forward_only`` (no program-layer backwards, loss head or norm
        yet) it is a lower bound of the whole step's, with ``"complete": False``: the same
        state, gradients and forward outputs, the largest temporary over fewer pieces (the
        forwards and the embedding's backward, which compiles with its forward). A
        search refuses a candidate on it before its probe runs those forwards
        (:meth:`nasjax.search.evaluate.TrainingEvaluator.check`)."""
        from nasjax.measure.hardware import compiled_memory_bytes

        nbytes = lambda tree: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))  # noqa: E731
        programs = [layer[3].pairs if isinstance(layer[3], ProgramLayer) else [layer[3]] for layer in plan["layers"]]
        forwards = [plan["embed"][0]] + [fwd for pairs in programs for fwd, _ in pairs]
        backwards = [bwd for pairs in programs for _, bwd in pairs if bwd is not None]
        complete = "pending" not in plan
        pieces = forwards + [plan["embed"][1]] + [plan[k] for k in ("head", "norm") if k in plan] + backwards
        analyses = [compiled_memory_bytes(p) for p in pieces]
        if not all(analyses):
            return {}
        state = nbytes(abstract_state)
        grads = nbytes(abstract_state.params)
        live = sum(a["outputs"] for a in analyses[: len(forwards)])
        temps = max(a["temporaries"] for a in analyses)
        return {
            "arguments": state,
            "outputs": state,
            "temporaries": grads + live + temps,
            "aliased": 0,
            "peak": 2 * state + grads + live + temps,
            "complete": complete,
        }


class ProgramLayer:
    """A Primer program layer run as a chain of pieces cut from its instruction tape
    (``train.segmented_pieces=subprogram`` or ``instruction``).

    The program is flattened by :func:`nasjax.layers.program.program_tape` (CALLs
    inlined, dead code dropped) and cut by :func:`~nasjax.layers.program.tape_groups`:
    one piece per instruction, or per run of one subprogram invocation's instructions.
    Each piece is a forward program (its outputs that later pieces read, and its
    residuals) and a backward program, keyed by what the piece computes (ops, widths,
    branch structure, wiring, input layouts), never by the program it came from: every
    layer of a model and the unchanged subprograms of a mutated child share them. A
    constant is an input of its piece, so constant-bank mutations compile nothing.

    A backward program also adds the cotangents its inputs already received from later
    pieces, and the squared norm of its parameters' gradients to a running sum, so the
    chain needs no eager arithmetic between pieces. Gradients of parameters that only
    dead code reads are zeros, as in the one-program step.

    Args:
      owner: the model's :class:`SegmentedSteps` (registry, mesh context, dispatch);
      program: the layer's ProgramSpec; abstract_params: the program block's parameter
      subtree (ShapeDtypeStructs with shardings); abstract_x: the layer input's.
    """

    def __init__(self, owner: SegmentedSteps, program, abstract_params, abstract_x):
        from flax import traverse_util

        from nasjax.layers.program import program_tape, tape_groups

        self.owner = owner
        self.tape = program_tape(program.program, program.base_dim)
        self.groups = tape_groups(self.tape, owner.pieces)
        self._rep = shd.replicated(owner.mesh)
        self._scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self._rep)
        consumers: dict[int, set[int]] = {}  # state -> groups that read it
        for g, members in enumerate(self.groups):
            for i in members:
                for s in self.tape[i].inputs:
                    consumers.setdefault(s, set()).add(g)
        final = self.tape[-1].output
        wiring = []  # per piece: its steps, the states it reads from before it, the states it passes on
        for g, members in enumerate(self.groups):
            steps = [self.tape[i] for i in members]
            produced = [st.output for st in steps]
            external = tuple(dict.fromkeys(s for st in steps for s in st.inputs if s not in produced))
            exports = tuple(o for o in produced if o == final or consumers.get(o, set()) - {g})
            wiring.append((steps, external, exports))
        # Which of a piece's inputs already hold cotangents when its backward runs (later
        # pieces read them too) is fixed by the tape: each piece needs one backward program.
        patterns, seen = [], set()
        for _, external, _ in reversed(wiring):
            patterns.append(tuple(s in seen for s in external))
            seen.update(external)
        patterns.reverse()
        self._pieces, self._patterns = [], patterns
        states, self.flags = {0: abstract_x}, {0: ()}  # state -> abstract value, branch axes
        for steps, external, exports in wiring:
            piece = _Piece(self, steps, external, exports, abstract_params, tuple(states[s] for s in external))
            states.update(zip(exports, piece.out_info))
            self._pieces.append(piece)
        self.y_info = states[final]
        self._final = final
        learned = {st.path for st in self.tape if st.path}
        flat = traverse_util.flatten_dict(abstract_params) if abstract_params else {}
        # parameters of instructions the output does not depend on: zero gradients
        dead = {k: v for k, v in flat.items() if not any(k[: len(p)] == p for p in learned)}
        # their zero gradients, made once on the host (no per-shape program), in the layout's shape
        self._dead = {
            k: jax.device_put(np.zeros(b.shape, b.dtype), b.sharding) for k, b in owner._buffers(dead).items()
        }
        self._zero = jax.device_put(np.float32(0.0), self._rep)

    def build_backward(self) -> None:
        """Compiles (or finds) every piece's backward program for the train step."""
        for piece, pattern in zip(self._pieces, self._patterns):
            piece.backward_program(pattern)

    @property
    def pairs(self) -> list[tuple[Any, Any]]:
        """(forward, backward) programs of every piece (backwards: those built so far)."""
        return [(p.forward, b) for p in self._pieces for b in (list(p.backwards.values()) or [None])]

    def forward(self, layer_params, x_BxLxD):
        """(layer output, residuals of every piece)."""
        params = self.owner.seg.program_params(layer_params)
        run, states, residuals = self.owner._run, {0: x_BxLxD}, []
        for piece in self._pieces:
            outs, vjp = run(
                piece.forward, piece.params(params), piece.constants, tuple(states[s] for s in piece.external)
            )
            states.update(zip(piece.exports, outs))
            residuals.append(vjp)
        return states[self._final], residuals

    def backward(self, residuals, g_BxLxD, extra):
        """(the layer's parameter gradients, the input's gradient, their summed squares)."""
        from flax import traverse_util

        run, cotangents = self.owner._run, {self._final: g_BxLxD}
        flat, total = {}, self._zero
        for piece, vjp in zip(reversed(self._pieces), reversed(residuals)):
            priors = tuple(cotangents.pop(s, None) for s in piece.external)
            program = piece.backward_program(tuple(p is not None for p in priors))
            g_out = tuple(cotangents.pop(s) for s in piece.exports)
            g_params, outs, new_total = run(program, vjp, g_out, total if piece.paths else None, priors)
            cotangents.update(zip(piece.external, outs))
            if piece.paths:
                total = new_total
                for path, g_sub in zip(piece.paths, g_params):
                    for suffix, g in traverse_util.flatten_dict(g_sub).items():
                        flat[path + suffix] = g
        flat.update(self._dead)
        grads = traverse_util.unflatten_dict(flat) if flat else {}
        return self.owner.seg.program_layer_grads(grads), cotangents.pop(0), total


class _Piece:
    """One piece of a :class:`ProgramLayer`: some tape steps as a forward and a backward program.

    ``external``: the states it reads from earlier pieces (or the layer input);
    ``exports``: the states it writes that later pieces read (or the layer output).
    """

    def __init__(self, layer: ProgramLayer, steps, external, exports, abstract_params, abstract_inputs):
        from nasjax.layers.program import tape_step_function

        owner = self.owner = layer.owner
        self.layer, self.external, self.exports = layer, external, exports
        self.paths = tuple(st.path for st in steps if st.path)
        rep = layer._rep
        self.constants = tuple(jax.device_put(np.float32(st.constant), rep) for st in steps if st.constant is not None)
        local = {s: ("in", k) for k, s in enumerate(external)}
        wiring = []
        for j, st in enumerate(steps):
            wiring.append(tuple(local[s] for s in st.inputs))
            local[st.output] = ("step", j)
        out_refs = tuple(local[s] for s in exports)
        fns, flags = [], layer.flags
        for st in steps:
            fn, flags[st.output] = tape_step_function(st, tuple(flags[s] for s in st.inputs), dtype=owner.dtype)
            if st.kind == "output":
                fn = lambda p, xs, c, fn=fn: owner.seg.constrain(fn(p, xs, c))  # noqa: E731
            fns.append(fn)
        has_c = [st.constant is not None for st in steps]

        def apply(params, constants, inputs):
            if owner.flat:
                params = _unflat(params, shaped)
            values, p_it, c_it = {}, iter(params), iter(constants)
            for j, (st, fn, refs) in enumerate(zip(steps, fns, wiring)):
                xs = tuple(inputs[r[1]] if r[0] == "in" else values[r[1]] for r in refs)
                p = next(p_it) if st.path else None
                c = jax.lax.stop_gradient(next(c_it)) if has_c[j] else None  # a value, not a parameter
                values[j] = fn(p, xs, c)
            return tuple(inputs[r[1]] if r[0] == "in" else values[r[1]] for r in out_refs)

        def forward(params, constants, inputs):
            return jax.vjp(lambda p, xs: apply(p, constants, xs), params, inputs)

        def backward(vjp, g_out, total, priors):
            g_params, g_inputs = vjp(g_out)
            g_inputs = tuple(g if p is None else p + g for g, p in zip(g_inputs, priors))
            return g_params, g_inputs, None if total is None else total + _sumsq(g_params)

        self._backward_fn = backward
        structure = tuple(
            (st.kind, st.op, st.features, st.branches, st.depth, st.constant is not None, refs, flags[st.output])
            for st, refs in zip(steps, wiring)
        ) + tuple(flags[s] for s in external)
        shaped = tuple(_subtree(abstract_params, p) for p in self.paths)
        self._abstract_params = owner._buffers(shaped)  # what the programs take
        self._abstract_inputs = abstract_inputs
        self.key = ("instruction", structure, out_refs, _layout(shaped), _layout(abstract_inputs))
        abstract_c = tuple(layer._scalar for _ in self.constants)

        def build():
            with owner.context():
                program = owner._finish(jax.jit(forward).lower(self._abstract_params, abstract_c, abstract_inputs))
            (out_info, vjp_info) = _compiled_outputs(program)
            return program, out_info, vjp_info

        (self.forward, self.out_info, self._vjp_info), seconds = _program(owner._key(*self.key, "forward"), build)
        owner.compile_seconds += seconds
        self.backwards: dict[tuple, Any] = {}

    def params(self, program_params) -> tuple:
        return tuple(_subtree(program_params, p) for p in self.paths)

    def backward_program(self, pattern: tuple[bool, ...]):
        """The backward program for this pattern of inputs already holding cotangents."""
        hit = self.backwards.get(pattern)
        if hit is not None:
            return hit
        owner, rep = self.owner, self.layer._rep
        priors = tuple(x if has else None for x, has in zip(self._abstract_inputs, pattern))
        total = self.layer._scalar if self.paths else None
        out_sh = (
            jax.tree.map(lambda a: a.sharding, self._abstract_params),
            tuple(x.sharding for x in self._abstract_inputs),
            rep if self.paths else None,
        )

        def build():
            with owner.context():
                jitted = jax.jit(self._backward_fn, out_shardings=out_sh)
                return owner._finish(jitted.lower(self._vjp_info, self.out_info, total, priors))

        program, seconds = _program(owner._key(*self.key, "backward", pattern), build)
        owner.compile_seconds += seconds
        self.backwards[pattern] = program
        return program


def _subtree(tree, path: tuple[str, ...]):
    """The subtree at ``path`` (None for the empty path: a parameter-free step)."""
    if not path:
        return None
    for name in path:
        tree = tree[name]
    return tree
