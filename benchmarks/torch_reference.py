"""A plain PyTorch reference of nasjax's zoo decoders, for the throughput comparison (issue 8).

    python benchmarks/torch_reference.py --model=vanilla --size=tiny

Built from the same nasjax ``ModelSpec`` (so the shapes are the same by construction,
and the parameter count is checked against ``nasjax.measure.params``): pre-LayerNorm
decoder blocks of causal softmax attention (optional bias; Primer's causal depthwise
convolution of width 3 on each head's Q, K and V), T5 relative-position bias shared by
the layers or learned absolute positions, ReLU / squared ReLU / tanh-GELU FFN with bias,
final LayerNorm, output logits tied to the token embedding; dropout where the spec has it
(GPT-2: 0.1 on the embeddings, on each sublayer's output and on the attention
probabilities, as nasjax applies it). The training step is the
eager PyTorch idiom: forward, mean token cross-entropy, backward, global-norm clipping
at 1.0, AdamW (b1 0.9, b2 0.98, eps 1e-9, no weight decay: nasjax's defaults).
Nothing here is tuned for speed beyond what a plain script does; that is the point
of the reference.

``--device=cuda`` runs it on a GPU (steps timed to ``torch.cuda.synchronize``);
``--dtype=bfloat16`` computes under ``torch.autocast`` in bfloat16 with float32
parameters and optimizer state, as nasjax's ``dtype=bfloat16`` (bfloat16 activations,
float32 parameters).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nasjax.layers.embed import relative_position_bucket  # noqa: E402  (numpy; the same buckets)


class DConv(nn.Module):
    """Causal depthwise conv over positions, one tap vector per (head, dim), no bias."""

    def __init__(self, heads: int, dim: int, k: int):
        super().__init__()
        taps = torch.full((k, heads, dim), 0.5 / k)
        taps[0] = 0.5
        self.taps = nn.Parameter(taps)
        self.k = k

    def forward(self, x):  # B, L, H, K
        y = x * self.taps[0]
        for i in range(1, self.k):
            y = y + F.pad(x, (0, 0, 0, 0, i, 0))[:, : x.shape[1]] * self.taps[i]
        return y


class Block(nn.Module):
    def __init__(self, d, layer, init_std, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout
        m, f = layer.mixer, layer.ffn
        self.h = m.n_heads
        self.k = m.head_dim or d // m.n_heads
        hk = self.h * self.k
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.q, self.kp, self.v = (nn.Linear(d, hk, bias=m.use_bias) for _ in range(3))
        self.o = nn.Linear(hk, d, bias=m.use_bias)
        self.dconv = nn.ModuleList(DConv(self.h, self.k, m.dconv_kernel) for _ in range(3)) if m.dconv_kernel else None
        self.fi, self.fo = nn.Linear(d, f.d_ff, bias=f.use_bias), nn.Linear(f.d_ff, d, bias=f.use_bias)
        self.act = {
            "relu": F.relu,
            "squared_relu": lambda x: F.relu(x) ** 2,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        }[f.activation]
        for lin in (self.q, self.kp, self.v, self.o, self.fi, self.fo):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x, bias):
        b, n, _ = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).view(b, n, self.h, self.k) for p in (self.q, self.kp, self.v))
        if self.dconv is not None:
            q, k, v = (c(t) for c, t in zip(self.dconv, (q, k, v)))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B, H, L, K
        p = self.attention_dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, : self.h], dropout_p=p)
        x = x + self.drop(self.o(att.transpose(1, 2).reshape(b, n, self.h * self.k)))
        return x + self.drop(self.fo(self.act(self.fi(self.ln2(x)))))


class TorchDecoder(nn.Module):
    """The spec's decoder (see the module docstring)."""

    def __init__(self, spec, seq_len: int):
        super().__init__()
        d = spec.d_model
        self.embed = nn.Embedding(spec.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=spec.init_std)
        self.positions = spec.positions
        heads = max(layer.mixer.n_heads for layer in spec.layers)
        if spec.positions == "learned":
            self.pos = nn.Embedding(spec.max_len, d)
            nn.init.normal_(self.pos.weight, std=spec.init_std)
        elif spec.positions == "relative":
            self.rel = nn.Parameter(torch.randn(spec.relative_buckets, heads) * spec.init_std)
            rel = np.arange(seq_len)[None, :] - np.arange(seq_len)[:, None]
            buckets = relative_position_bucket(rel, False, spec.relative_buckets, spec.relative_max_distance)
            self.register_buffer("buckets", torch.as_tensor(buckets, dtype=torch.long), persistent=False)
        else:
            raise ValueError(f"positions={spec.positions!r} is not in the reference")
        mask = torch.full((seq_len, seq_len), -1e9).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.blocks = nn.ModuleList(
            Block(d, layer, spec.init_std, spec.dropout_rate, spec.attention_dropout_rate) for layer in spec.layers
        )
        self.drop = nn.Dropout(spec.dropout_rate)
        self.ln_f = nn.LayerNorm(d, eps=1e-6)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.embed(tokens)
        if self.positions == "learned":
            x = x + self.pos.weight[:n]
            bias = self.mask[None, None].expand(1, max(b.h for b in self.blocks), n, n)
        else:
            bias = self.rel[self.buckets[:n, :n]].permute(2, 0, 1)[None] + self.mask[:n, :n]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, bias)
        return self.ln_f(x) @ self.embed.weight.T


def make_step(model, lr: float = 1e-3, dtype: str = "float32"):
    """The eager train step; ``dtype="bfloat16"``: the forward and loss under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
    device_type = next(model.parameters()).device.type
    low = dtype == "bfloat16"

    def step(inputs, targets):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=low):
            logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def device_of(name: str) -> torch.device:
    """``name`` (cpu, cuda, cuda:N, auto: cuda where torch sees a GPU) as a torch device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={name}: this torch ({torch.__version__}) sees no CUDA GPU")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(n: int, repeats: int = 10, device: str | torch.device = "cpu", dtype: str = "float32") -> float:
    """Best FLOP/s of an m x m product, m in (n/2, n, 2n), on ``device`` in ``dtype``."""
    device = torch.device(device)
    best = 0.0
    for m in (n // 2, n, 2 * n):
        a = torch.ones(m, m, device=device, dtype=getattr(torch, dtype))
        a @ a
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            _sync(device)
            best = max(best, 2 * m**3 / (time.perf_counter() - t0))
    return best


def make_stepper(spec, batch: int, seq_len: int, threads: int, device: str = "cpu", dtype: str = "float32"):
    """The reference's step on random tokens: (run(n) -> n step times in s, info).

    ``device``: a torch device name (``device_of``); ``dtype``: float32 or bfloat16
    (autocast, float32 parameters)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = device_of(str(device))
    model = TorchDecoder(spec, seq_len).to(device)
    step = make_step(model, dtype=dtype)
    x = torch.as_tensor(np.random.default_rng(0).integers(0, spec.vocab_size, size=(batch, seq_len + 1)))
    inputs, targets = x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)

    def run(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(inputs, targets)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return times

    run(2)  # warm-up
    return run, {"params": sum(p.numel() for p in model.parameters())}


def bench(
    spec, batch: int, seq_len: int, steps: int, threads: int, device: str = "cpu", dtype: str = "float32"
) -> dict:
    """Median step time of the reference on random tokens (2 warm-up steps)."""
    run, info = make_stepper(spec, batch, seq_len, threads, device, dtype)
    step_s = statistics.median(run(steps))
    return {"params": info["params"], "step_ms": step_s * 1e3, "tok_s": batch * seq_len / step_s}


def main():
    from nasjax.measure.params import count_params
    from nasjax.models import get_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vanilla")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    spec = get_spec(args.model, args.size, vocab_size=262 if args.size == "tiny" else 32768, max_len=args.seq_len)
    out = bench(spec, args.batch, args.seq_len, args.steps, args.threads, args.device, args.dtype)
    want = count_params(spec)["total"]
    print(
        f"{args.model} {args.size}: params {out['params']:,} (nasjax {want:,}), step {out['step_ms']:.1f} ms, "
        f"{out['tok_s']:,.0f} tokens/s, torch {torch.__version__}, {device_of(args.device)}, {args.dtype}, "
        f"{args.threads} threads"
    )
    if out["params"] != want:
        raise SystemExit(f"parameter count differs from nasjax's ({out['params']} vs {want}): not the same model")


if __name__ == "__main__":
    main()
