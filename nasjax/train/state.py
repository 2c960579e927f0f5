"""Train state and its sharded initialisation (no allocation before shardings are known)."""

from __future__ import annotations

import collections
import threading
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal
from jax.sharding import Mesh

from nasjax import sharding as shd
from nasjax.measure.probe import compile_for_one_run


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters and optimizer state: everything a checkpoint holds."""

    step: jax.Array
    params: Any
    opt_state: Any


def dummy_inputs(batch_size: int, seq_len: int):
    return jnp.zeros((batch_size, seq_len), jnp.int32)


def _boxed_state(model: nn.Module, tx: optax.GradientTransformation, rng, seq_len: int) -> TrainState:
    variables = model.init({"params": rng, "dropout": rng}, dummy_inputs(1, seq_len))
    return _state_of(variables["params"], tx)


def _state_of(params, tx: optax.GradientTransformation) -> TrainState:
    # The optimizer sees plain arrays: factored states (Adafactor) have other ranks than
    # the params, so they must not inherit the params' logical-axis boxes.
    opt_state = tx.init(nn.meta.unbox(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer leaves that mirror a parameter (Adam's mu, nu) take its sharding.

    A leaf mirrors a parameter when its tree path ends with the parameter's path and
    the shapes agree; everything else (step counts, Adafactor's row/column factors) is
    replicated.
    """
    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    by_path = {jax.tree_util.keystr(path): (leaf.shape, sh) for (path, leaf), sh in zip(flat_p, flat_s)}

    def pick(path, leaf):
        # Longest suffix first: O(depth) dictionary lookups per leaf, not a scan of all params.
        for i in range(len(path)):
            hit = by_path.get(jax.tree_util.keystr(path[i:]))
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return shd.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def params_replicated(param_shardings: Any) -> bool:
    """True when every parameter's sharding keeps the whole array on each device."""
    leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return all(sh.is_fully_replicated for sh in leaves)


def state_shardings(model, tx, seq_len: int, mesh: Mesh, rules, spec=None) -> tuple[TrainState, TrainState]:
    """Abstract (unboxed) state and its NamedShardings, from eval_shape only.

    With the model's ``spec``, the parameters' abstract tree is assembled from cached
    per-piece shapes (:func:`nasjax.measure.params.abstract_boxed_params`) where the model
    can be cut into pieces, and only the optimizer's init is traced: the same tree
    (tested), without a ~50 ms trace of the whole model per search candidate.
    """
    from nasjax.measure.params import abstract_boxed_params  # local: measure imports models lazily

    boxed_params = abstract_boxed_params(spec, seq_len) if spec is not None else None
    if boxed_params is None:
        boxed = jax.eval_shape(lambda r: _boxed_state(model, tx, r, seq_len), jax.random.key(0))
    else:
        boxed = jax.eval_shape(lambda p: _state_of(p, tx), boxed_params)
    abstract = nn.meta.unbox(boxed)
    param_sh = shd.logical_to_shardings(nn.get_partition_spec(boxed.params), abstract.params, mesh, rules)
    shardings = TrainState(
        step=shd.replicated(mesh),
        params=param_sh,
        opt_state=_opt_state_shardings(abstract.opt_state, abstract.params, param_sh, mesh),
    )
    return abstract, shardings


def _params_fn(model: nn.Module, seq_len: int):
    def init(rng):
        variables = model.init({"params": rng, "dropout": rng}, dummy_inputs(1, seq_len))
        return nn.meta.unbox(variables["params"])

    return init


def _lazy_params(model: nn.Module, seq_len: int, rng) -> Any:
    """The parameters of ``model.init`` computed op by op without its forward pass.

    ``Module.lazy_init`` executes only what the parameters depend on (the key
    derivations and the initializers) and traces the rest abstractly: the same values
    as the eager ``init`` (same ops on the same keys, tested bit for bit), without the
    forward's ops, each of which would otherwise compile a per-op program for every new
    shape. A model whose parameters depend on its input values cannot be initialised
    lazily (flax raises); it runs the eager init instead.

    The trace runs with jit disabled (the initializers re-enable it for their own draws,
    :mod:`nasjax.layers.init`): under jit, each jnp function of the forward is a nested
    jit whose (empty or constant) known part jax compiled and ran for every new shape,
    notably inside the ``nn.vmap`` of branched program CALLs. Disabled, the forward's ops
    are only staged. Same values bit for bit; a replay of the default search's 47
    candidates compiled 56 init programs after the first candidate instead of 93.
    """
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    try:
        with jax.disable_jit():
            variables = model.lazy_init({"params": rng, "dropout": rng}, tokens)
    except Exception:  # LazyInitError or an older flax: the eager init gives the same values
        return _params_fn(model, seq_len)(rng)
    return nn.meta.unbox(variables["params"])


def initial_params(model: nn.Module, seed: int, seq_len: int, shardings: Any = None, op_by_op: bool = False) -> Any:
    """The model's initial parameters for ``seed`` (unboxed).

    The init runs once per model, so by default it is one jitted program compiled without
    backend optimisation (:data:`~nasjax.measure.probe.FAST_COMPILE`): on CPU that cut the
    init compile of a tiny Primer candidate from ~2.0 s to ~0.6 s
    (``benchmarks/candidate_overhead.py``).

    ``op_by_op=True`` runs the init without jit: every jax op executes as its own small
    program, which jax compiles once per (op, shapes) and keeps for the process. Within a
    search, candidates share most of those programs, so after the first candidate
    (~8 s of cold per-op compiles on CPU) an init costs ~0.3-0.5 s instead of ~1.2 s
    (``search.op_by_op``). Only the parameters' own computation runs, not the forward
    pass that ``init`` goes through (:func:`_lazy_params`). The values equal the
    compiled init's up to float rounding (the normal sampler's transcendental functions
    are fused differently): callers that must agree (a probe and its candidate's
    trainer) use the same setting.

    ``shardings``: where the leaves go (None: the default device).
    """
    key = jax.random.key(seed)
    if op_by_op:
        params = _lazy_params(model, seq_len, key)
        return params if shardings is None else jax.device_put(params, shardings)
    fn = jax.jit(_params_fn(model, seq_len), out_shardings=shardings)
    return compile_for_one_run(fn.lower(key))(key)


# Initial parameters computed by a candidate's probe, kept for its training in the same
# process (the probe and the trainer would otherwise each compile and run the init).
# Keyed by (spec, seed, seq_len, op_by_op); taken (removed) by the trainer; at most two entries.
_REMEMBERED: collections.OrderedDict = collections.OrderedDict()
_REMEMBERED_LOCK = threading.Lock()
_REMEMBER_MAX = 2


def remember_initial_params(key: Any, params: Any) -> None:
    """Keeps ``params`` (from :func:`initial_params` on the default device) for the trainer."""
    with _REMEMBERED_LOCK:
        _REMEMBERED[key] = params
        _REMEMBERED.move_to_end(key)
        while len(_REMEMBERED) > _REMEMBER_MAX:
            _REMEMBERED.popitem(last=False)


def _take_initial_params(key: Any, abstract_params: Any) -> Any | None:
    with _REMEMBERED_LOCK:
        params = _REMEMBERED.pop(key, None)
    if params is None:
        return None
    same = jax.tree.structure(params) == jax.tree.structure(abstract_params) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params), strict=True)
    )
    return params if same else None


def init_state(
    model,
    tx,
    seed: int,
    seq_len: int,
    mesh: Mesh,
    rules,
    shardings: TrainState | None = None,
    cache_key: Any = None,
    abstract_params: Any = None,
    op_by_op: bool = False,
) -> TrainState:
    """Initialises the train state into its shardings.

    Args:
      shardings: from :func:`state_shardings`; derived here when not given (pass them
        to avoid tracing the model a second time).
      cache_key: where a probe may have left this model's initial parameters
        (:func:`remember_initial_params`); used when the parameters are replicated in
        one process. Both paths run the same compiled init on the default device, so the
        values do not depend on whether a probe ran first (a resumed search follows the
        uninterrupted one).
      abstract_params: the unboxed parameter shapes (checked against a cached entry).
      op_by_op: run the parameter and optimizer-state inits op by op instead of as
        programs compiled for this model (:func:`initial_params`); replicated
        parameters in one process only (otherwise the compiled init is used).

    Returns:
      The sharded TrainState. Sharded parameters (FSDP, tensor parallel) or several
      processes: initialised directly into their shardings, never whole on one device.
    """
    if shardings is None:
        _, shardings = state_shardings(model, tx, seq_len, mesh, rules)
    local_replicated = jax.process_count() == 1 and params_replicated(shardings.params)
    params = None
    if local_replicated:
        # On the default device, outside the mesh: the program a probe runs, so that both
        # give the same values (the mesh's activation constraints do not apply to it).
        if cache_key is not None:
            if abstract_params is None:
                abstract_params = jax.eval_shape(_params_fn(model, seq_len), jax.random.key(seed))
            params = _take_initial_params(cache_key, abstract_params)
        if params is None:
            params = initial_params(model, seed, seq_len, op_by_op=op_by_op)
        params = jax.device_put(params, shardings.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if not local_replicated:
            params = initial_params(model, seed, seq_len, shardings.params)
        opt_state = optimizer_init(tx, params, shardings.opt_state, op_by_op and local_replicated)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def optimizer_init(tx, params: Any, shardings: Any, op_by_op: bool = False) -> Any:
    """``tx.init(params)`` placed in ``shardings``: op by op, or one program compiled
    without backend optimisation.

    Op by op, an init that only fills constants (AdamW's and Adafactor's zeros and step
    counters) is computed on the host (:func:`host_init`): eagerly, each ``zeros_like`` of
    a parameter shape not seen before would compile a program of its own (~25 ms on CPU;
    a mutation's new shapes made ~2 of them per Primer candidate). Other inits (the flat
    optimizer's concatenation) run op by op."""
    if op_by_op:
        state = host_init(tx.init, params)
        return jax.device_put(tx.init(params) if state is None else state, shardings)
    opt_init = jax.jit(tx.init, out_shardings=shardings)
    return compile_for_one_run(opt_init.lower(params))(params)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def inherit_params(target: Any, source: Any) -> tuple[Any, int]:
    """Copies every ``source`` leaf whose path and shape match into ``target``.

    Stable parameter paths make this the weight inheritance of fine-tuning (encoder
    weights into a classifier) and of searches (parent into child).

    Returns:
      (merged tree, number of leaves copied).
    """
    src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    copied = 0

    def pick(path, leaf):
        nonlocal copied
        v = src.get(jax.tree_util.keystr(path))
        if v is not None and tuple(v.shape) == tuple(leaf.shape) and v.dtype == leaf.dtype:
            copied += 1
            return v
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, target)
    return merged, copied


# Primitives host_init evaluates with numpy: what an optimizer's init emits to fill
# constants (a nested jit is "jit", "pjit" in older JAX). Anything else (arithmetic on
# the parameters, random keys) is left to jax.
_HOST_PRIMITIVES = ("broadcast_in_dim", "convert_element_type", "copy", "pjit", "jit")


def host_init(fn, *args) -> Any | None:
    """``fn(*args)`` computed with numpy, or None when it is more than filling constants.

    ``fn`` is traced (``jax.make_jaxpr``: nothing compiles) and its program evaluated on
    the host when it only broadcasts and converts constants, or passes inputs through:
    exactly the values (and dtypes) jax would compute. None when it holds any other
    operation, a weakly typed or extended-dtype output (a host array could not carry
    those types), so the caller runs ``fn`` with jax.
    """
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    except Exception:  # not traceable as is: let jax run it and raise its own error
        return None
    for leaf in jax.tree.leaves(out_shape):
        if getattr(leaf, "weak_type", False) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
            return None
    values = _host_eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    if values is None:
        return None
    return jax.tree.unflatten(jax.tree.structure(out_shape), values)


def _host_eval(jaxpr, consts, args) -> list | None:
    """A jaxpr of constant fills evaluated with numpy (see :func:`host_init`); None if not."""
    env: dict = {}

    def read(v):
        if isinstance(v, Literal):
            return np.asarray(v.val, v.aval.dtype)
        if v not in env:  # an input: fetched only when the program passes it through
            env[v] = np.asarray(jax.device_get(env_inputs[v]))
        return env[v]

    env_inputs = dict(zip(jaxpr.invars, args))
    env.update((v, np.asarray(c)) for v, c in zip(jaxpr.constvars, consts))
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in _HOST_PRIMITIVES:
            return None
        avals = [v.aval for v in eqn.outvars]
        if any(jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended) for a in avals):
            return None
        if name in ("pjit", "jit"):
            inner = eqn.params["jaxpr"]
            outs = _host_eval(inner.jaxpr, inner.consts, [read(v) for v in eqn.invars])
            if outs is None:
                return None
        else:
            x = read(eqn.invars[0])
            aval = avals[0]
            if name == "broadcast_in_dim":
                expanded = [1] * len(aval.shape)
                for axis, size in zip(eqn.params["broadcast_dimensions"], x.shape):
                    expanded[axis] = size
                x = np.broadcast_to(x.reshape(expanded), aval.shape)
            outs = [np.array(x, dtype=aval.dtype)]  # a fresh, writable array of the output's dtype
        for v, value in zip(eqn.outvars, outs):
            env[v] = value
    return [read(v) for v in jaxpr.outvars]
