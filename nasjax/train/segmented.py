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
* ``head``: final norm, output projection and summed cross entropy, with its gradients;
  a forward-only twin for evaluation;
* ``norm``: the loss, global gradient norm, clip factor and learning rate of the step;
* ``update``: the optimizer for a chunk of same-shape parameter leaves (1, 2, 4, 8 or
  16 of them), one per (shape, chunk size, optimizer settings):
  the chain of :func:`nasjax.train.optim.make_optimizer` after its clipping, run on each
  leaf with its slice of the optimizer state. Global-norm clipping scales each leaf's
  gradient exactly as ``optax.clip_by_global_norm`` does.

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

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from nasjax import sharding as shd
from nasjax.models.transformer import Segments
from nasjax.train import losses
from nasjax.train.optim import segment_optimizer
from nasjax.train.state import TrainState

__all__ = ["SegmentedSteps", "unsupported", "clear_programs", "MAX_PROGRAMS"]

# Compiled pieces kept per process, least recently used dropped first, per kind: layer
# pieces are rarely shared beyond one model (a Primer child's layers are all new), and
# each holds ~1-3 MiB of host memory; the shared kinds (embedding, head, norm, one update
# per parameter shape) are few and used by every model.
MAX_PROGRAMS = {"layer": 16, "shared": 256}
_PROGRAMS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_LOCK = threading.Lock()
# Shared pieces on a mesh of several devices hold collectives (the gradient all-reduce).
# Two threads running such steps at once (engine=threads) could interleave executions of
# the same program, and on XLA:CPU the participants of one collective then starve for
# threads and abort; steps on multi-device meshes therefore run one at a time, each to
# completion (a one-device mesh has no collectives and runs freely).
_EXECUTION = threading.Lock()
LM_BATCH_KEYS = ("inputs", "targets", "weights")
UPDATE_CHUNKS = (16, 8, 4, 2, 1)  # leaves of one shape updated by one program (largest first)


def clear_programs() -> None:
    """Drops every compiled piece (``search.clear_caches`` does, with jax's own caches)."""
    with _LOCK:
        _PROGRAMS.clear()


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
    with _LOCK:
        hit = _PROGRAMS.get(key)
        if hit is not None:
            _PROGRAMS.move_to_end(key)
            return hit, 0.0
    t0 = time.perf_counter()
    built = build()
    seconds = time.perf_counter() - t0
    with _LOCK:
        built = _PROGRAMS.setdefault(key, built)  # another thread may have built it meanwhile
        _PROGRAMS.move_to_end(key)
        group = _group(key)
        keys = [k for k in _PROGRAMS if _group(k) == group]
        for k in keys[: max(0, len(keys) - MAX_PROGRAMS[group])]:  # oldest first
            del _PROGRAMS[k]
    return built, seconds


def _group(key: tuple) -> str:
    return "layer" if key[0] == "layer" else "shared"


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
      dtype: activation dtype; state_shardings: the trainer's (replicated) state shardings.
    """

    def __init__(self, spec, train_cfg, mesh, rules, context, dtype, state_shardings):
        self.seg = Segments(spec, dtype=dtype)
        self.mesh, self.rules, self.context = mesh, rules, context
        self.dtype = jnp.dtype(dtype)
        self.clip, self.inner, self.n_clip_states, self.opt_key, self._schedule = segment_optimizer(train_cfg)
        self.state_shardings = state_shardings
        self.compile_seconds = 0.0
        self.memory: dict = {}
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
        return (*parts, self.mesh, tuple(self.rules), str(self.dtype))

    def _compile(self, fn, *abstract_args, **jit_kwargs):
        with self.context():
            return jax.jit(fn, **jit_kwargs).lower(*abstract_args).compile()

    def _get(self, key, fn, *abstract_args, **jit_kwargs):
        program, seconds = _program(self._key(*key), lambda: self._compile(fn, *abstract_args, **jit_kwargs))
        self.compile_seconds += seconds
        return program

    def _pair(self, key, forward, abstract_params, abstract_x, wrt_x: bool = True, extra_grads: bool = False):
        """Forward (returning its vjp) and backward programs of one piece, compiled together.

        ``wrt_x``: differentiate w.r.t. the input too (layers; not the token ids of the
        embedding). ``extra_grads``: the backward adds gradients computed elsewhere for the
        same parameters (the tied output projection's, for the embedding).
        """

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
                forward_program = jax.jit(fwd).lower(abstract_params, abstract_x).compile()
                # The outputs as compiled (XLA chose the residuals' shardings): the backward
                # must be compiled for exactly these.
                y_info, vjp_info = _compiled_outputs(forward_program)
                extra = _abstract(abstract_params) if extra_grads else None
                out_sh = (p_sh, abstract_x.sharding if wrt_x else None, rep)
                backward = jax.jit(bwd, out_shardings=out_sh).lower(vjp_info, y_info, extra).compile()
                return forward_program, backward, y_info

        program, seconds = _program(self._key(*key), build)
        self.compile_seconds += seconds
        return program

    # ------------------------------------------------------------------ plans
    def _plan(self, abstract_params, batch: dict, train: bool) -> dict:
        """Compiles (or finds) every piece for this batch layout; returns them in step order."""
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
        layers = []
        for i in range(seg.n_layers):
            p_layer = seg.layer_params(abstract_params, i)
            forward = lambda p, h, i=i: seg.layer(i, p, h)  # noqa: E731
            pair = self._pair(("layer", seg.layer_key(i), _layout(p_layer), _layout(x)), forward, p_layer, x)
            layers.append(pair)
            x = pair[2]
        head_key = (seg.template_key(), _layout(head_p), _layout(x), _layout((targets, weights)))
        if not train:
            head = self._get(("eval_head", *head_key), self._loss, head_p, x, targets, weights)
            return {"embed": embed, "layers": layers, "head": head}

        def head_grads(p, h, t, w):
            (loss_sum, weight_sum), (g_p, g_h) = jax.value_and_grad(self._loss, argnums=(0, 1), has_aux=True)(
                p, h, t, w
            )
            own = {k: v for k, v in g_p.items() if k != "embed"}
            return loss_sum, weight_sum, g_p, g_h, _sumsq(own)

        rep = shd.replicated(self.mesh)
        head_sh = (rep, rep, jax.tree.map(lambda a: a.sharding, head_p), x.sharding, rep)
        head = self._get(("head", *head_key), head_grads, head_p, x, targets, weights, out_shardings=head_sh)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(self.mesh))
        n_sums = seg.n_layers + 2
        norm = self._get(("norm", self.opt_key, n_sums), self._norm, (scalar,) * n_sums, scalar, scalar, step)
        return {"embed": embed, "layers": layers, "head": head, "norm": norm}

    def _loss(self, head_params, x, targets, weights):
        loss_sum, weight_sum = losses.token_cross_entropy(self.seg.logits(head_params, x), targets, weights)
        return loss_sum, weight_sum

    def _norm(self, sums, weight_sum, loss_sum, step):
        denom = jnp.maximum(weight_sum, 1.0)
        grad_norm = jnp.sqrt(sum(sums)) / denom  # the norm of the mean gradient, as optax.tree.norm(grads / denom)
        lr = self._schedule(step)
        return {"denom": denom, "grad_norm": grad_norm, "loss": loss_sum / denom, "learning_rate": lr, "step": step + 1}

    def _update_groups(self, params, views) -> list[tuple[Any, list[int]]]:
        """The update programs of a model: leaves of equal layout in chunks of 16, 8, 4, 2, 1.

        One program updates a chunk of same-shape leaves (fewer dispatches than one per
        leaf, ~1 ms less per tiny step); chunk sizes are powers of two so a few programs
        per shape serve every model, whatever its count of leaves of that shape.
        """
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
        by_layout: dict[tuple, list[int]] = {}
        for i, (p, view) in enumerate(zip(params, views)):
            by_layout.setdefault((_layout(p), _layout(view)), []).append(i)
        groups = []
        for (p_layout, v_layout), members in by_layout.items():
            p, view = _abstract(params[members[0]]), _abstract(views[members[0]])
            out_sh = (p.sharding, jax.tree.map(lambda a: a.sharding, view))
            start = 0
            for size in UPDATE_CHUNKS:
                while len(members) - start >= size:
                    chunk = members[start : start + size]
                    start += size
                    key = ("update", self.opt_key, p_layout, v_layout, size)
                    args = ((p,) * size, (p,) * size, (view,) * size, scalar, scalar)
                    program = self._get(
                        key, self._leaf_updates, *args, out_shardings=((out_sh[0],) * size, (out_sh[1],) * size)
                    )
                    groups.append((program, chunk))
        return groups

    def _leaf_updates(self, ps, gs, views, denom, grad_norm):
        out = [self._leaf_update(p, g, view, denom, grad_norm) for p, g, view in zip(ps, gs, views)]
        return tuple(o[0] for o in out), tuple(o[1] for o in out)

    def _leaf_update(self, p, g, view, denom, grad_norm):
        g = g / denom
        if self.clip:  # optax.clip_by_global_norm, per leaf, with the global norm given
            g = jax.lax.select(grad_norm < self.clip, g, (g / grad_norm.astype(g.dtype)) * self.clip)
        updates, view = self.inner.update(g, view, p)
        return optax.apply_updates(p, updates), view

    # ------------------------------------------------------------------ public
    def compile(self, abstract_state: TrainState, batch: dict) -> float:
        """Builds (or finds) the train pieces for this batch layout, updates included; returns seconds."""
        t0 = self.compile_seconds
        layout = _layout(_abstract(batch))
        if self._train is None or self._train[0] != layout:
            plan = self._plan(abstract_state.params, batch, train=True)
            params = _abstract(abstract_state.params)
            inner = _abstract(self._inner_state(abstract_state.opt_state))
            slots = _StateSlots(inner, jax.tree.structure(params))
            views = slots.views(inner)
            plan["updates"] = self._update_groups(jax.tree.leaves(params), views)
            plan["slots"] = slots
            self._train = (layout, plan)
            self.memory = self._memory(plan, abstract_state)
        return self.compile_seconds - t0

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
        if self._train is None:
            self.compile(state, batch)
        with self._serial:
            out = self._step(state, batch)
            if self._serial is _EXECUTION:
                jax.block_until_ready(out)
        return out

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        plan, seg, run = self._train[1], self.seg, self._run
        params = state.params
        head_p = seg.head_params(params)
        fwd, embed_bwd, _ = plan["embed"]
        x, embed_vjp = run(fwd, params["embed"], batch["inputs"])
        vjps = []
        for i, (layer_fwd, _, _) in enumerate(plan["layers"]):
            x, vjp = run(layer_fwd, seg.layer_params(params, i), x)
            vjps.append(vjp)
        loss_sum, weight_sum, g_head, g_x, sum_head = run(plan["head"], head_p, x, batch["targets"], batch["weights"])
        sums, g_layers = [sum_head], [None] * len(vjps)
        for i in reversed(range(len(vjps))):
            g_layers[i], g_x, s = run(plan["layers"][i][1], vjps[i], g_x, None)
            sums.append(s)
        g_embed, _, s = run(embed_bwd, embed_vjp, g_x, g_head.get("embed"))
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
        grads[seg.spec.kind] = {f"layer_{i}": g for i, g in enumerate(g_layers)}
        missing = set(params) - set(grads)
        if missing:  # a parameter no piece reads would silently never train
            raise ValueError(f"train.segmented: no piece computes gradients of {sorted(missing)}")
        return {k: grads[k] for k in params}

    def evaluate(self, params, batch: dict) -> dict:
        """The eval step's sums for one batch (its pieces compiled by :meth:`compile_eval`)."""
        with self._serial:
            out = self._evaluate(self._eval[_layout(_abstract(batch))], params, batch)
            if self._serial is _EXECUTION:
                jax.block_until_ready(out)
        return out

    def _evaluate(self, plan, params, batch: dict) -> dict:
        seg, run = self.seg, self._run
        x, _ = run(plan["embed"][0], params["embed"], batch["inputs"])
        for i, (layer_fwd, _, _) in enumerate(plan["layers"]):
            x, _ = run(layer_fwd, seg.layer_params(params, i), x)
        loss_sum, weight_sum = run(plan["head"], seg.head_params(params), x, batch["targets"], batch["weights"])
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": jnp.zeros((), jnp.float32)}

    # ------------------------------------------------------------------ memory
    def _memory(self, plan, abstract_state) -> dict:
        """An estimate of a train step's peak bytes per device: the state, the gradients,
        every forward piece's outputs (activations and residuals live until the backward)
        and the largest temporary of any piece. XLA analyses each piece, not the chain."""
        from nasjax.measure.hardware import compiled_memory_bytes

        nbytes = lambda tree: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))  # noqa: E731
        forwards = [plan["embed"][0]] + [layer[0] for layer in plan["layers"]]
        pieces = forwards + [plan["embed"][1], plan["head"], plan["norm"]] + [layer[1] for layer in plan["layers"]]
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
        }
