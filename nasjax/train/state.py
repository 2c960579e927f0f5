"""Train state and its sharded initialisation (no allocation before shardings are known)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from nasjax import sharding as shd


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
    params = variables["params"]
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


def state_shardings(model, tx, seq_len: int, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """Abstract (unboxed) state and its NamedShardings, from eval_shape only."""
    boxed = jax.eval_shape(lambda r: _boxed_state(model, tx, r, seq_len), jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    param_sh = shd.logical_to_shardings(nn.get_partition_spec(boxed.params), abstract.params, mesh, rules)
    shardings = TrainState(
        step=shd.replicated(mesh),
        params=param_sh,
        opt_state=_opt_state_shardings(abstract.opt_state, abstract.params, param_sh, mesh),
    )
    return abstract, shardings


def init_state(
    model, tx, seed: int, seq_len: int, mesh: Mesh, rules, shardings: TrainState | None = None
) -> TrainState:
    """Initialises the train state directly into its shardings.

    Args:
      shardings: from :func:`state_shardings`; derived here when not given (pass them
        to avoid tracing the model a second time).

    Returns:
      The sharded TrainState.
    """
    if shardings is None:
        _, shardings = state_shardings(model, tx, seq_len, mesh, rules)
    init = jax.jit(lambda r: nn.meta.unbox(_boxed_state(model, tx, r, seq_len)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(jax.random.key(seed))


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
