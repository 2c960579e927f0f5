"""What a tiny Primer candidate's train-step compile is made of, and what would shrink it (issue 8).

    python benchmarks/compile_composition.py
    python benchmarks/compile_composition.py --seeds=vanilla,primer_ez --layers=1,2,4 --repeats=3

For the seed programs of the default search (``configs/search/primer.py:tiny``: 2 layers x
d_model 64, batch 16 x sequence 64, byte vocabulary), compiles variants of the train step
from nothing (in-process caches cleared, persistent cache off) and prints the best of
``--repeats`` trace+lower and XLA compile times, the number of fusions (kernels) in the
optimised program and the median step time:

* ``trainer``: what a search compiles, ``nasjax.train.loop.Trainer.compile``;
* ``forward``: the loss alone; ``grad``: value_and_grad of the loss;
* ``grad+sgd``: a parameter update with no optimizer state;
* ``grad+adamw``: nasjax's optimizer (``nasjax.train.optim.make_optimizer``: global-norm
  clipping, AdamW with the decay mask), per parameter leaf, as the trainer runs it;
* ``grad+flat-adamw``: the same update on one flattened vector of all parameters
  (``optax.flatten``): one kernel per update phase instead of one per leaf. The decay
  mask then sees one 1-D vector, so this variant has weight decay off: a compile
  measurement, not a usable optimizer;
* ``grad+adamw scan``: the identical layers run under ``flax.linen.scan`` (one compiled
  layer body, parameters stacked on a leading axis) instead of unrolled. nasjax does not
  build models this way; the variant swaps the stack module in for the measurement only.

``--layers`` repeats the table at other depths, which separates the per-layer part of
the compile from the fixed part (embedding, loss, optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from nasjax import sharding as shd  # noqa: E402
from nasjax.config import apply_overrides, load_config_file  # noqa: E402
from nasjax.models import transformer  # noqa: E402
from nasjax.search.run import make_space  # noqa: E402
from nasjax.train.loop import Trainer  # noqa: E402
from nasjax.train.optim import make_optimizer  # noqa: E402
from nasjax.train.step import forward_loss  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VOCAB = 262  # the byte tokenizer's vocabulary, as the tiny search builds it


class ScannedStack(nn.Module):
    """``transformer.Stack`` with its identical layers under ``nn.scan`` (measurement only)."""

    model: object
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, *, padding_mask, key_bias, position_bias, deterministic):
        layers = self.model.layers
        if any(b != layers[0] for b in layers):
            raise ValueError("the scanned variant needs identical layers")

        def body(module, carry, _):
            block = transformer.Block(layers[0], self.model, dtype=self.dtype, name="layer")
            out = block(
                carry,
                padding_mask=padding_mask,
                key_bias=key_bias,
                position_bias=position_bias,
                deterministic=deterministic,
            )
            return out, None

        scanned = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=len(layers),
            metadata_params={nn.PARTITION_NAME: None},
        )
        x, _ = scanned(self, x, None)
        return x


@contextlib.contextmanager
def scanned_stacks(on: bool):
    original = transformer.Stack
    transformer.Stack = ScannedStack if on else original
    try:
        yield
    finally:
        transformer.Stack = original


def unbox(tree):
    return jax.tree.map(lambda p: getattr(p, "value", p), tree, is_leaf=lambda p: hasattr(p, "value"))


def timed_compile(fn, args, repeats: int):
    """Best (trace+lower, compile) seconds from nothing, the compiled program, and its fusions."""
    best_lower = best_compile = float("inf")
    compiled = None
    for _ in range(repeats):
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        best_lower, best_compile = min(best_lower, t1 - t0), min(best_compile, t2 - t1)
    fusions = compiled.as_text().count(" fusion(")
    return best_lower, best_compile, compiled, fusions


def step_ms(run, steps: int = 10) -> float:
    jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def variants(spec, cfg, batch, repeats: int, scan: bool):
    model = transformer.build(spec)
    b = jax.tree.map(jnp.asarray, batch)
    params = unbox(jax.jit(model.init)(jax.random.key(0), b["inputs"])["params"])
    rng = jax.random.key(1)

    def loss(p, batch):
        loss_sum, (weight_sum, _) = forward_loss(model, "lm", p, batch, rng, True)
        return loss_sum / weight_sum

    grad = jax.value_and_grad(loss)
    tx, _ = make_optimizer(cfg.train)

    def with_tx(transform):
        state = transform.init(params)

        def step(p, s, batch):
            value, g = grad(p, batch)
            updates, s = transform.update(g, s, p)
            return optax.apply_updates(p, updates), s, value

        return step, (params, state, b)

    rows = {}
    if not scan:
        rows["forward"] = (loss, (params, b))
        rows["grad"] = (grad, (params, b))
        rows["grad+sgd"] = with_tx(optax.sgd(1e-3))
        rows["grad+adamw"] = with_tx(tx)
        rows["grad+flat-adamw"] = with_tx(optax.flatten(tx))
    else:
        rows["grad+adamw scan"] = with_tx(tx)
    for name, (fn, args) in rows.items():
        lower_s, compile_s, compiled, fusions = timed_compile(fn, args, repeats)
        if name in ("forward", "grad"):
            ms = step_ms(lambda compiled=compiled, args=args: compiled(*args))
        else:
            state = list(args)

            def run(compiled=compiled, state=state):
                p, s, value = compiled(*state)
                state[0], state[1] = p, s
                return value

            ms = step_ms(run)
        yield name, lower_s, compile_s, fusions, ms


def trainer_step_ms(trainer, state, host) -> float:
    holder = [state]

    def run():
        holder[0], metrics = trainer.step(holder[0], host)
        return metrics

    return step_ms(run)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="vanilla,primer_ez")
    p.add_argument("--layers", default="2", help="comma-separated depths (the tiny preset has 2)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = load_config_file(os.path.join(ROOT, "configs/search/primer.py:tiny"))
    mesh = shd.make_mesh((-1, 1, 1))
    rules = shd.rules_from_config(cfg.mesh.rules)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; best of {args.repeats}")
    print("| seed | layers | variant | trace+lower s | XLA compile s | total s | fusions | step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds.split(","):
        for n_layers in (int(x) for x in args.layers.split(",")):
            c = apply_overrides(cfg, {"search.n_layers": n_layers, "search.seeds": seed})
            space = make_space(c, VOCAB)
            spec = space.decode(space.seeds()[0][1])
            batch_size, seq_len = int(c.train.batch_size), int(c.data.seq_len)
            x = np.random.default_rng(0).integers(0, VOCAB, size=(batch_size, seq_len + 1)).astype(np.int32)
            host = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32)}
            compiles = []
            for _ in range(args.repeats):
                jax.clear_caches()
                trainer = Trainer(spec, c.train, mesh, rules, seed=0, seq_len=seq_len)
                state = trainer.init_state()
                compiles.append(trainer.compile(state, shd.shard_batch(host, mesh)))

            ms = trainer_step_ms(trainer, state, host)
            total = min(compiles)
            print(f"| {seed} | {n_layers} | trainer (what a search compiles) | - | - | {total:.2f} | - | {ms:.1f} |")
            for scan in (False, True):
                with scanned_stacks(scan):
                    for name, lower_s, compile_s, fusions, ms in variants(spec, c, host, args.repeats, scan):
                        total = lower_s + compile_s
                        cells = f"{lower_s:.2f} | {compile_s:.2f} | {total:.2f} | {fusions} | {ms:.1f}"
                        print(f"| {seed} | {n_layers} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
