"""Zero-cost (training-free) proxies of a spec at initialisation.

Legend: B batch, L length, D model width, V vocabulary (or classes of a ``cls`` head),
N independent initialisations.

LTS (methods.md §3(c)) compares its own proxy, the decoder parameter count
(:func:`nasjax.measure.count_params`), with the gradient-based zero-cost proxies of
Abdelfattah et al. (2021) as adapted to language models in ``archai``'s
``nlp/nas/zero_cost_utils``. This module computes those at initialisation:

``grad_norm``
    L2 norm of the gradient of the training loss w.r.t. *all* parameters, on a fixed
    batch of random tokens (:func:`nasjax.measure.probe.probe_tokens`). The loss is
    the model's own objective: next-token cross-entropy for causal models, same-position
    token cross-entropy for (MLM) encoders, cross-entropy against fixed random labels
    for ``cls`` heads. Larger = predicted better.
``snip`` (Lee et al. 2019)
    ``sum |theta * dL/dtheta|`` over all parameters, same loss and batch (the gradient
    w.r.t. a multiplicative mask of ones). Larger = predicted better.
``synflow`` (Tanaka et al. 2020)
    Data-free: every parameter is replaced by its absolute value, the input is a
    constant token batch (``[1, L]`` of token id 1, as archai feeds ``torch.ones``
    token ids), and ``R`` = sum of all model outputs (logits); the score is
    ``sum |theta| * |dR/dtheta|`` over all parameters. archai's NLP adaptation
    additionally replaces the input embeddings by ones; here the embeddings of the
    constant token are kept, because an all-constant vector is zeroed by the first
    pre-norm (LayerNorm of a constant has zero variance) and would cut the signal to
    the first layer. Larger = predicted better; for models of the same family it grows
    with width and depth at initialisation.
    Computed in float32 (the models' logits are float32 by contract, so enabling JAX's
    x64 would not carry past the head): for very deep or wide models without
    normalisation the product of absolute weights can overflow to ``inf``, which then
    still sorts as "largest".
``jacob_cov`` (Mellor et al. 2021)
    Jacobian of a fixed random projection of the outputs (archai's ``fc_to_1class``
    on the logits, summed over positions) w.r.t. the summed input embeddings of each
    example (the model's ``perturbations`` hook), flattened to ``[B, L*D]``; ``C`` =
    correlation matrix over the batch, eigenvalues ``v`` (clipped at 0 against
    round-off) and score ``-sum(log(v + 1e-5) + 1/(v + 1e-5))``. Larger (less
    negative; at most ``-B`` for uncorrelated examples) = predicted better, the
    paper's sign convention. Needs ``batch >= 2``; NaN when an example's Jacobian is
    constant (an output that ignores the input).

All requested proxies for ``n_inits`` independent initialisations of the same
architecture (initialisation included) are computed by **one** jitted function
(``jax.vmap`` over the init keys), so each architecture costs one compile, which
dominates on CPU (the run itself is a fraction of a second for small models); the
compile skips XLA's backend optimisations by default (``fast_compile``).
"""

from __future__ import annotations

from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nasjax.measure.probe import FAST_COMPILE, compile_for_one_run, probe_tokens
from nasjax.measure.probe import check_int as _check_int
from nasjax.spec import ModelSpec

__all__ = ["PROXIES", "HIGHER_IS_BETTER", "FAST_COMPILE", "compile_for_one_run", "zero_cost_proxies"]

PROXIES = ("grad_norm", "synflow", "jacob_cov", "snip")

# All four follow "larger score = architecture predicted to train to a lower loss".
HIGHER_IS_BETTER = {name: True for name in PROXIES}

_JACOB_EPS = 1e-5


def _check_names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Iterable):
        raise ValueError(f"names must be a proxy name or a sequence of them, got {names!r}")
    out: list[str] = []
    for name in names:
        if name not in PROXIES:
            raise ValueError(f"unknown zero-cost proxy {name!r}; known: {', '.join(PROXIES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no zero-cost proxy requested; known: {', '.join(PROXIES)}")
    return tuple(out)


def _tree_sum(tree) -> jnp.ndarray:
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def _cross_entropy(logits, labels) -> jnp.ndarray:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _jacob_cov_score(jacobian_BxM) -> jnp.ndarray:
    corr_BxB = jnp.corrcoef(jacobian_BxM)
    eig_B = jnp.clip(jnp.linalg.eigvalsh(corr_BxB), 0.0, None)
    return -jnp.sum(jnp.log(eig_B + _JACOB_EPS) + 1.0 / (eig_B + _JACOB_EPS))


def zero_cost_proxies(
    spec: ModelSpec,
    seq_len: int,
    batch: int = 8,
    names=PROXIES,
    seed: int = 0,
    n_inits: int = 1,
    *,
    fast_compile: bool = True,
) -> dict[str, float]:
    """Zero-cost proxies of ``spec`` at initialisation (see the module docstring).

    Args:
      spec: the architecture.
      seq_len: input length (>= 2 for causal models, whose loss predicts the next
        token; at most ``spec.max_len`` with learned positions).
      batch: examples in the fixed random batch (``jacob_cov`` needs >= 2).
      names: proxies to compute, a subset of :data:`PROXIES` (a single name is fine).
      seed: seeds the init keys, the random batch and the ``jacob_cov`` projection.
      n_inits: independent initialisations, all computed in one vmapped, jitted call.
      fast_compile: compile with XLA's backend optimisation level 0 (:data:`FAST_COMPILE`):
        the program runs once, so optimising it costs far more than it saves (about
        half the compile time on CPU); results agree with a fully optimised compile
        to float32 round-off.

    Returns:
      ``{name: mean over inits}`` for every requested proxy, plus ``{name}_std`` (sample
      standard deviation over inits) when ``n_inits > 1``. Larger = predicted better
      for every proxy (:data:`HIGHER_IS_BETTER`).

    Raises:
      ValueError: unknown proxy name or invalid sizes.
    """
    from nasjax.models.transformer import build  # local, like measure.flops

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"zero_cost_proxies() needs a ModelSpec, got {type(spec).__name__}")
    names = _check_names(names)
    seq_len = _check_int(seq_len, "seq_len", 2 if spec.causal else 1)
    batch = _check_int(batch, "batch", 2 if "jacob_cov" in names else 1)
    seed = _check_int(seed, "seed", 0)
    n_inits = _check_int(n_inits, "n_inits", 1)
    if spec.positions == "learned" and seq_len > spec.max_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_len={spec.max_len} of the learned position table")

    model = build(spec)
    tokens_BxL = jnp.asarray(probe_tokens(spec.vocab_size, batch, seq_len, seed))
    const_1xL = jnp.full((1, seq_len), min(1, spec.vocab_size - 1), jnp.int32)
    keys = jax.random.split(jax.random.key(seed), n_inits)
    aux_key = jax.random.fold_in(jax.random.key(seed), 0x5EED)
    n_out = spec.n_classes if spec.head == "cls" else spec.vocab_size
    labels_B = jax.random.randint(aux_key, (batch,), 0, max(n_out, 1))
    proj_V = jax.random.normal(jax.random.fold_in(aux_key, 1), (n_out,), jnp.float32)
    want = set(names)

    def loss_fn(params):
        logits = model.apply({"params": params}, tokens_BxL)
        if spec.head == "cls":
            return _cross_entropy(logits, labels_B)
        if spec.causal:
            return _cross_entropy(logits[:, :-1], tokens_BxL[:, 1:])
        return _cross_entropy(logits, tokens_BxL)

    def synflow(params):
        abs_params = jax.tree_util.tree_map(jnp.abs, params)
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, const_1xL)))(abs_params)
        return _tree_sum(jax.tree_util.tree_map(lambda p, g: p * jnp.abs(g), abs_params, grads))

    def jacob_cov(params):
        pert_BxLxD = jnp.zeros((batch, seq_len, spec.d_model), jnp.float32)

        def projected(pert):
            out = model.apply({"params": params, "perturbations": {"embeddings": pert}}, tokens_BxL)
            return jnp.sum(out @ proj_V)

        jac_BxLxD = jax.grad(projected)(pert_BxLxD)
        return _jacob_cov_score(jac_BxLxD.reshape(batch, -1))

    def one_init(key):
        params = nn.unbox(model.init({"params": key}, tokens_BxL)["params"])
        scores = {}
        if want & {"grad_norm", "snip"}:
            grads = jax.grad(loss_fn)(params)
            if "grad_norm" in want:
                scores["grad_norm"] = jnp.sqrt(_tree_sum(jax.tree_util.tree_map(jnp.square, grads)))
            if "snip" in want:
                scores["snip"] = _tree_sum(jax.tree_util.tree_map(lambda p, g: jnp.abs(p * g), params, grads))
        if "synflow" in want:
            scores["synflow"] = synflow(params)
        if "jacob_cov" in want:
            scores["jacob_cov"] = jacob_cov(params)
        return scores

    lowered = jax.jit(jax.vmap(one_init)).lower(keys)
    compiled = compile_for_one_run(lowered, fast_compile)
    per_init = jax.device_get(compiled(keys))
    result: dict[str, float] = {}
    for name in names:
        values = np.asarray(per_init[name], np.float64)
        result[name] = float(np.mean(values))
        if n_inits > 1:
            result[f"{name}_std"] = float(np.std(values, ddof=1))
    return result
