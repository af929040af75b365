"""``fxfuse demo``: a small transformer written the naive way, rewritten, checked and measured.

The model is what research code looks like: attention by hand (scores, causal ``masked_fill``,
softmax, ``@ v``), LLaMA-style RMSNorm with an upcast, a pre-norm residual stream and a final
LayerNorm. Every site fxfuse recognises is fused; the rest runs as written.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxfuse


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class NaiveTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


def make_demo(device: str = "cpu"):
    """``(model, example_inputs)``: also a valid ``fxfuse explain fxfuse.demo:make_demo`` target."""
    torch.manual_seed(0)
    return NaiveTransformer().to(device), (torch.randn(4, 32, 64, device=device),)


def best_seconds(fns: list[Callable[[], object]], device: str, repeats: int = 30,
                 budget_s: float = 5.0) -> tuple[list[float], int]:
    """Best wall time of each function, and over how many rounds (``repeats``, fewer when the
    rounds take longer than ``budget_s``). The best, not the mean: on a busy machine other processes
    only ever add time (an OpenMP barrier waiting for a descheduled thread can add hundreds of ms),
    and the calls are interleaved (a, b, a, b, ...) so that both contenders see the same conditions."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns:
        for _ in range(3):  # warm-up: kernel compilation, allocator, caches
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            record.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times[0]) >= 3:
            break
    return [min(record) for record in times], len(times[0])


@contextlib.contextmanager
def timing_threads(device: str):
    """CPU timings use one thread: the model is tiny, and on a busy machine threads waiting for
    each other at every op would time the machine's load rather than the code."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def saved_activation_bytes(module: Callable, model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass after one training forward: the activation memory
    that limits batch size. Parameters and the input are not counted (they exist anyway)."""
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(seen.values())


def run(show_kernel: bool = True, inductor: bool = True, html: str | None = None) -> int:
    """The demo; returns the process exit code (1 when the rewritten output differs from eager).

    ``inductor``: also compare ``torch.compile``'s default backend with ``backend="fxfuse"`` (fxfuse
    composed with Inductor; together about a minute of compilation
    on a 2-core CPU with a cold cache, a few seconds with a warm one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, (x,) = make_demo(device)
    print(f"A {len(model.blocks)}-layer transformer written naively, input {tuple(x.shape)} on {device}.\n")

    res = fxfuse.rewrite(model, (x,))
    print(res.report())
    if show_kernel and res.kernels:
        kernel = res.kernels[0]
        print(f"\none generated kernel, {kernel.name} ({kernel.path}):\n")
        print(kernel.source)
    if html:
        with open(html, "w", encoding="utf-8") as f:
            f.write(res.report_data.html())
        print(f"HTML report written to {html}")

    with torch.no_grad():
        expected, out = model(x), res.module(x)
    # The tolerances of tests/tolerances.py: a few fp32 ulps on CPU; tl.rsqrt is approximate on GPU.
    tol = 1e-4 if device == "cuda" else 1e-5
    diff = (out - expected).abs().max().item()
    if not torch.allclose(out, expected, rtol=tol, atol=tol):
        print(f"\nFAILED: the rewritten output differs from eager by up to {diff:.3g}", file=sys.stderr)
        return 1
    print(f"\noutput check: rewritten == eager within {tol:g} (max abs difference {diff:.2e})")

    with timing_threads(device), torch.no_grad():
        (eager_s, fused_s), rounds = best_seconds([lambda: model(x), lambda: res.module(x)], device)
    on = ", 1 CPU thread" if device == "cpu" else ""
    print(f"speed (inference, best of {rounds}{on}): eager {eager_s * 1e3:.2f} ms, fxfuse {fused_s * 1e3:.2f} ms, "
          f"fxfuse at {eager_s / fused_s:.2f}x eager's speed")
    if device == "cpu":
        print("  (on CPU the fused sites run ATen's fused attention and layer norm where they compute the site, "
              "else the site's torch reference, called directly; the rewritten module adds a check of its inputs "
              "per call; the Triton kernels are what runs on a GPU)")
    eager_b = saved_activation_bytes(model, model, x)
    fused_b = saved_activation_bytes(res.module, model, x)
    print(f"memory (activations saved for backward): eager {eager_b / 1024:.0f} KiB, fxfuse {fused_b / 1024:.0f} KiB, "
          f"{fused_b / eager_b:.2f}x eager's")

    if not inductor:
        print("torch.compile (Inductor) comparison skipped: --no-inductor was given")
        return 0
    try:
        start = time.perf_counter()
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
        compile_s = time.perf_counter() - start
        # The backend: fxfuse's passes, then Inductor for everything they did not fuse.
        start = time.perf_counter()
        composed = torch.compile(model, backend="fxfuse")
        with torch.no_grad():
            composed(x)
        composed_s = time.perf_counter() - start
        with timing_threads(device), torch.no_grad():
            (inductor_s, fused_s), _ = best_seconds([lambda: compiled(x), lambda: composed(x)], device)
        start = time.perf_counter()
        inductor_b = saved_activation_bytes(compiled, model, x)  # compiles again, for training
        compile_s += time.perf_counter() - start
        start = time.perf_counter()
        composed_b = saved_activation_bytes(composed, model, x)
        composed_s += time.perf_counter() - start
    except Exception as err:  # no C++ compiler on this CPU, an unsupported GPU...: the rest stands
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"torch.compile (Inductor) comparison skipped: it failed on this machine ({reason})")
        return 0
    print(f"torch.compile: Inductor after {compile_s:.1f} s of compilation, backend='fxfuse' (fxfuse's passes, "
          f"then Inductor) after {composed_s:.1f} s (inference and training graphs):")
    print(f"  speed: Inductor {inductor_s * 1e3:.2f} ms, fxfuse {fused_s * 1e3:.2f} ms, "
          f"fxfuse at {inductor_s / fused_s:.2f}x Inductor's speed")
    print(f"  memory (activations saved for backward): Inductor {inductor_b / 1024:.0f} KiB, fxfuse "
          f"{composed_b / 1024:.0f} KiB, {composed_b / inductor_b:.2f}x Inductor's")
    return 0
