"""Benchmark of fused attention: causal, sliding-window, padding-mask, ALiBi, softcap, relative-bias,
GQA, decoding, attention sinks (gpt-oss), sigmoid attention, SSMax's per-row temperature, RoPE and
differential attention (two softmaxes sharing v, o1 - lambda * o2).

Each variant is written naively (``q @ k.transpose(-2, -1) * scale``, masks, softmax, ``@ v``) as a
small module and run by: eager (the module as written), torch.compile (Inductor) of the same module,
SDPA (where one ``scaled_dot_product_attention`` call expresses the variant), compiled FlexAttention
(``score_mod``/``mask_mod``, CUDA only) and fxfuse (``fxfuse.rewrite(module, inputs).module``).
Forward alone (under no_grad) and forward + backward (gradients of q, k, v and any parameter).
Reports time per call, TFLOP/s, peak memory (CUDA), ratios against every other implementation,
and whether fxfuse fused the site ("fused: <spec>" or "not fused: <reason>").

    python benchmarks/bench_attention.py --quick --threads 1   # CPU: fp32, tiny sizes (results/attention_cpu.*)
    python benchmarks/bench_attention.py --device cuda         # GPU: bf16, L 512..16384, D 64 and 128

Results go to benchmarks/results/attention_<machine>.json and .csv. See benchmarks/README.md.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_norm's measuring helpers
from bench_norm import device_parser, first_call, machine_info, machine_slug, private_inductor_cache, time_ms  # noqa: E402

import fxfuse  # noqa: E402  (bench_norm put the checkout on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("eager", "inductor", "sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "fxfuse")
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}  # SDPA pinned to one kernel
GQA_GROUPS = 4  # query heads per kv head in the gqa variant (Llama 3 8B: 32 / 8)
WINDOW = 256  # sliding window: each query sees itself and the 255 keys before it
SOFTCAP = 50.0  # Gemma 2's attention logit cap


def _positions(q):
    i = torch.arange(q.size(-2), device=q.device)
    return i[:, None], i[None, :]  # query index (column), key index (row)


# ---- the naive modules: forward as model code writes it; sdpa() and flex() the same site rewritten --

class Causal(nn.Module):  # nanoGPT / GPT-2: a lower-triangular mask, masked_fill(-inf)
    def allowed(self, i, j, keep=None):
        return j <= i

    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flex(self, q):
        return None, lambda b, h, qi, kv: kv <= qi


class SlidingWindow(Causal):  # Mistral / Longformer-local: causal, at most WINDOW keys back
    def allowed(self, i, j, keep=None):
        return (j <= i) & (i - j < WINDOW)

    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return s.masked_fill(~self.allowed(i, j), float("-inf")).softmax(-1) @ v

    def sdpa(self, q, k, v):
        i, j = _positions(q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(i, j))

    def flex(self, q):
        return None, lambda b, h, qi, kv: (kv <= qi) & (qi - kv < WINDOW)


class PaddingMask(Causal):  # BERT-style encoder: a (B, L) keep mask over the keys, no causality
    def allowed(self, i, j, keep=None):
        return keep[:, None, None, :].expand(-1, -1, i.numel(), -1)

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return s.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1) @ v

    def sdpa(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])

    def flex(self, q, keep):
        return None, lambda b, h, qi, kv: keep[b, kv]


class Alibi(Causal):  # BLOOM / MPT: causal, plus slope_h * (j - i) per head
    @staticmethod
    def slopes(q):  # the geometric sequence 2^(-8 h / H), in float32 whatever the inputs' dtype
        heads = q.size(1)
        return 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=q.device) / heads)

    def bias(self, q):
        i, j = _positions(q)
        return (self.slopes(q)[:, None, None] * (j - i)).to(q.dtype)

    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + self.bias(q)
        return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v

    def sdpa(self, q, k, v):  # the bias and the causal mask as one additive attn_mask
        i, j = _positions(q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(q).masked_fill(j > i, float("-inf")))

    def flex(self, q):
        slopes = self.slopes(q).to(q.dtype)
        return (lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi)), (lambda b, h, qi, kv: kv <= qi)


class Softcap(Causal):  # Gemma 2: causal, scores squashed by cap * tanh(s / cap)
    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        s = torch.tanh(s / SOFTCAP) * SOFTCAP
        return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v

    sdpa = None  # tanh between the product and the softmax: not one SDPA call

    def flex(self, q):
        return (lambda s, b, h, qi, kv: torch.tanh(s / SOFTCAP) * SOFTCAP), (lambda b, h, qi, kv: kv <= qi)


class RelativeBias(Causal):  # T5-style learned bias per head and distance (clipped), no causality
    MAX_DISTANCE = 128

    def __init__(self, heads):
        super().__init__()
        self.table = nn.Parameter(0.1 * torch.randn(heads, 2 * self.MAX_DISTANCE + 1))

    def allowed(self, i, j, keep=None):
        return torch.ones_like(i * j, dtype=torch.bool)

    def bias(self, q):
        i, j = _positions(q)
        return self.table[:, (j - i).clamp(-self.MAX_DISTANCE, self.MAX_DISTANCE) + self.MAX_DISTANCE]

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return (s + self.bias(q)).softmax(-1) @ v

    def sdpa(self, q, k, v):  # the bias materialised as a (H, L, L) float attn_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(q))

    def flex(self, q):
        table, m = self.table, self.MAX_DISTANCE
        return (lambda s, b, h, qi, kv: s + table[h, (kv - qi).clamp(-m, m) + m]), None


class GroupedQuery(Causal):  # Llama: causal, kv heads repeated to the query heads (repeat_kv), then attention
    gqa = True

    def forward(self, q, k, v):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        return super().forward(q, k, v)

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Decode(Causal):  # one new token attending to the whole KV cache (Lq = 1): no mask
    def allowed(self, i, j, keep=None):
        return torch.ones_like(i * j, dtype=torch.bool)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return s.softmax(-1) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def flex(self, q):
        return None, None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(Causal):  # Llama: RoPE on q and k (rotate_half, cos/sin tables), then causal attention
    @staticmethod
    def tables(q):  # Llama's rotary embedding: base 10000, the frequencies repeated for both halves
        d, length = q.size(-1), q.size(-2)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=q.device, dtype=torch.float32) / d)
        emb = torch.outer(torch.arange(length, device=q.device, dtype=torch.float32), inv_freq).repeat(1, 2)
        return emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def rotate(self, q, k):
        cos, sin = self.tables(q)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def forward(self, q, k, v):
        return super().forward(*self.rotate(q, k), v)

    def sdpa(self, q, k, v):  # the rotation as written, then one SDPA call
        return F.scaled_dot_product_attention(*self.rotate(q, k), v, is_causal=True)

    flex = None  # a score_mod cannot rotate q and k: FlexAttention would take rotated copies, like SDPA


class QkNorm(Rope):  # Qwen3: RMSNorm over each head's q and k (float32 statistics, a weight), then RoPE, causal
    def __init__(self, head_dim):
        super().__init__()
        self.q_weight = nn.Parameter(1 + 0.1 * torch.randn(head_dim))
        self.k_weight = nn.Parameter(1 + 0.1 * torch.randn(head_dim))

    @staticmethod
    def norm(x, w):  # transformers' Qwen3RMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w.to(x.dtype) * h.to(x.dtype)

    def rotate(self, q, k):
        return super().rotate(self.norm(q, self.q_weight), self.norm(k, self.k_weight))

    flex = None  # a score_mod cannot normalise q and k either


class Sinks(Causal):  # gpt-oss: causal, a learned logit per head joined to the scores, dropped after the softmax
    def __init__(self, heads):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, q, k, v):
        i, j = _positions(q)
        s = (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).masked_fill(j > i, float("-inf"))
        joined = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(q.size(0), -1, q.size(-2), -1)], dim=-1)
        joined = joined - joined.max(dim=-1, keepdim=True).values
        return F.softmax(joined, dim=-1, dtype=joined.dtype)[..., :-1] @ v

    sdpa = None  # SDPA returns no log-sum-exp to rescale by; no one call computes the sink
    flex = None  # FlexAttention normalises over the keys alone


class Sigmoid(Causal):  # Apple's sigmoid attention: causal, sigmoid(s - log(L)), no row normalisation
    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 - math.log(k.size(-2))
        return torch.sigmoid(s.masked_fill(j > i, float("-inf"))) @ v

    sdpa = None  # SDPA and FlexAttention always normalise with a softmax
    flex = None


class SSMax(Causal):  # SSMax: causal, each query's scores times log(n), n = i + 1 keys visible
    @staticmethod
    def factor(q):
        return torch.log(torch.arange(1, q.size(-2) + 1, device=q.device, dtype=q.dtype))[:, None] + 1.0

    def forward(self, q, k, v):
        i, j = _positions(q)
        s = q @ k.transpose(-2, -1) * self.factor(q) * q.size(-1) ** -0.5
        return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v

    def sdpa(self, q, k, v):  # the row factor moved onto q
        return F.scaled_dot_product_attention(q * self.factor(q), k, v, is_causal=True)

    def flex(self, q):
        factor = self.factor(q)[:, 0]
        return (lambda s, b, h, qi, kv: s * factor[qi]), (lambda b, h, qi, kv: kv <= qi)


class Differential(Causal):  # Differential Transformer: two causal softmaxes sharing v, o1 - lambda * o2
    halves = 2  # two attentions' worth of score products

    def __init__(self, heads):
        super().__init__()
        self.lq1, self.lk1, self.lq2, self.lk2 = (nn.Parameter(0.1 * torch.randn(heads, 1, 8)) for _ in range(4))

    def lam(self):  # one lambda per head, (H, 1, 1), from learned vectors, as the paper computes it
        return torch.exp((self.lq1 * self.lk1).sum(-1, keepdim=True)) - \
            torch.exp((self.lq2 * self.lk2).sum(-1, keepdim=True)) + 0.8

    def forward(self, q1, k1, q2, k2, v):
        return super().forward(q1, k1, v) - self.lam() * super().forward(q2, k2, v)

    def sdpa(self, q1, k1, q2, k2, v):  # two SDPA calls, combined as written
        attend = super().sdpa
        return attend(q1, k1, v) - self.lam() * attend(q2, k2, v)

    flex = None  # two flex_attention calls would be its form; not expressed here (CPU rows skip Flex anyway)


VARIANTS = {"causal": Causal, "sliding_window": SlidingWindow, "padding_mask": PaddingMask, "alibi": Alibi,
            "softcap": Softcap, "relative_bias": RelativeBias, "gqa": GroupedQuery, "decode": Decode,
            "sinks": Sinks, "sigmoid": Sigmoid, "ssmax": SSMax,
            "rope": Rope, "qk_norm": QkNorm, "differential": Differential}


def make_variant(name, heads, head_dim=64):
    cls = VARIANTS[name]
    return cls(heads) if cls in (RelativeBias, Sinks, Differential) else cls(head_dim) if cls is QkNorm else cls()


def make_inputs(name, b, h, length, d, dtype, device, grad):
    if name in ("gqa", "decode"):  # kv heads h / GQA_GROUPS; decoding: one query over `length` keys
        kv_heads = max(1, h // GQA_GROUPS) if name == "gqa" else h
        shapes = ((b, h, 1 if name == "decode" else length, d), *[(b, kv_heads, length, d)] * 2)
        return tuple(torch.randn(s, dtype=dtype, device=device, requires_grad=grad) for s in shapes)
    qkv = [torch.randn(b, h, length, d, dtype=dtype, device=device, requires_grad=grad)
           for _ in range(5 if name == "differential" else 3)]  # differential: q1, k1, q2, k2, v
    if name != "padding_mask":
        return tuple(qkv)
    keep = torch.ones(b, length, dtype=torch.bool, device=device)
    keep[-1, length * 3 // 4:] = False  # the last sequence is a quarter padding; every row keeps key 0
    return (*qkv, keep)


def useful_pairs(module, inputs) -> int:
    """(b, h, i, j) score positions that take part (masked ones are work a fused kernel can skip)."""
    q = inputs[0]
    if isinstance(module, Decode):
        return q.shape[0] * q.shape[1] * q.shape[2] * inputs[1].shape[2]
    i, j = _positions(q)
    if isinstance(module, Differential):
        return Differential.halves * q.shape[0] * q.shape[1] * int(module.allowed(i, j).sum().item())
    allowed = module.allowed(i, j, inputs[3] if len(inputs) > 3 else None)
    # a mask without batch/head dims holds for every (b, h); a (B, 1, L, L) one for every head
    return int(allowed.sum().item() * q.shape[0] * q.shape[1] / math.prod(allowed.shape[:-2] or (1,)))


class _Call(nn.Module):
    """A module running ``fn`` with ``owner``'s parameters registered, so gradients reach them."""

    def __init__(self, owner, fn):
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def flex_module(base, inputs, device):
    if device != "cuda":
        return None, "skipped: FlexAttention is benchmarked on CUDA only (its CPU path is not the comparison)"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if base.flex is None:
        return None, "skipped: FlexAttention cannot express this variant"
    compiled = torch.compile(flex_attention, dynamic=False)
    q, extra = inputs[0], inputs[3:]
    gqa = {"enable_gqa": True} if getattr(base, "gqa", False) else {}
    score_mod, mask_mod = base.flex(q, *extra)
    length = q.size(-2)
    block_mask = None
    if mask_mod is not None:  # built once per shape, outside the timed call, as FlexAttention intends
        b = q.size(0) if extra else None
        block_mask = create_block_mask(mask_mod, b, None, length, length, device=device)
    return _Call(base, lambda q, k, v, *_: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, **gqa)), \
        "block mask built outside the timed call" if block_mask is not None else ""


def fxfuse_verdict(res) -> tuple[bool, str]:
    # a QK-norm, RoPE or differential match describes the whole site (the attention spec with its norms and
    # rotations; the two attentions a differential site combines)
    matches = [m for m in res.matches if m.kind == "qk-norm"] or \
        [m for m in res.matches if m.kind in ("rope", "differential")] or \
        [m for m in res.matches if m.kind == "attention"]
    if matches:
        return True, "fused: " + "; ".join(m.describe() for m in matches)
    misses = [m for m in res.misses if m.kind == "attention"]
    if misses:
        return False, "not fused: " + "; ".join(m.reason for m in misses)
    return False, ("not fused: fuse-attention recorded neither a match nor a miss here (it did not recognise "
                   "the site as attention)")


def build(impl, base, inputs, device, cpu_compile, row):
    if impl == "eager":
        return base
    if impl == "inductor":
        if device == "cpu" and not cpu_compile:
            row["note"] = ("skipped on CPU by default: Inductor compiles every variant, size and mode afresh "
                           "(seconds each), which dominates a CPU run; --cpu-compile includes it")
            return None
        torch._dynamo.reset()
        return torch.compile(base, backend="inductor", dynamic=False)
    if impl == "sdpa":
        if base.sdpa is None:
            row["note"] = "SDPA cannot express this variant (a tanh softcap, a sink logit or a sigmoid normaliser)"
            return None
        return _Call(base, base.sdpa)
    if impl in SDPA_BACKENDS:
        if device != "cuda" or base.sdpa is None:
            row["note"] = "skipped: SDPA's flash and cuDNN kernels are CUDA only" if device != "cuda" else \
                "SDPA cannot express this variant"
            return None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl])

        def pinned(*args):
            with sdpa_kernel(backend):  # fails (no fallback) where that kernel cannot run the call
                return base.sdpa(*args)
        return _Call(base, pinned)
    if impl == "flex":
        module, row["note"] = flex_module(base, inputs, device)
        return module
    res = fxfuse.rewrite(base, tuple(inputs))
    row["fused"], row["note"] = fxfuse_verdict(res)
    if device == "cpu" and row["fused"]:
        row["note"] += " (CPU path: SDPA or the op's torch reference)"
    return res.module


def step_fn(module, inputs, backward):
    if not backward:
        def run():
            with torch.no_grad():
                return module(*inputs)
        return run
    wrt = [t for t in inputs if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
    seeded = torch.Generator(device=inputs[0].device).manual_seed(1)  # one upstream gradient for all impls
    grad = torch.randn(inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device, generator=seeded)
    return lambda: torch.autograd.grad(module(*inputs), wrt, grad)


def peak_extra_mib(fn, device):
    """CUDA: memory allocated during one call beyond what was allocated before it (inputs, params)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def bench_one(name, b, h, length, d, dtype, device, backward, impls, budget, cpu_compile):
    torch.manual_seed(0)
    base = make_variant(name, h, d).to(device=device, dtype=dtype)
    inputs = make_inputs(name, b, h, length, d, dtype, device, grad=backward)
    mode = "fwd+bwd" if backward else "fwd"
    flops = 4 * d * useful_pairs(base, inputs) * (3.5 if backward else 1.0)  # bwd = 2.5 x fwd (5 vs 2 matmuls)
    table, fns, reference = {}, {}, None
    for impl in impls:
        row = table[impl] = {"variant": name, "mode": mode, "batch": b, "heads": h, "seq_len": length, "head_dim": d,
                             "dtype": str(dtype).replace("torch.", ""), "device": device, "impl": impl,
                             "ms": None, "note": ""}
        try:
            setup = time.perf_counter()
            module = build(impl, base, inputs, device, cpu_compile, row)
            if module is None:
                continue
            fn = step_fn(module, inputs, backward)
            reference = first_call(fn, device, row, setup, reference)  # compiles Inductor, Flex; captures fxfuse
            row["peak_mib"] = peak_extra_mib(fn, device)
            fns[impl] = fn
        except Exception as e:  # one failing implementation must not hide the others' numbers
            oom = isinstance(e, torch.OutOfMemoryError)
            row["note"] = (row["note"] + "; " if row["note"] else "") + \
                f"{'out of memory' if oom else 'failed'}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            if not oom:
                traceback.print_exc(limit=3)
            if device == "cuda":
                torch.cuda.empty_cache()
    times = time_ms(fns, device, budget) if fns else {}
    for impl, ms in times.items():
        row = table[impl]
        row["ms"] = round(ms, 4)
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 4)
        for other in IMPLS:
            row[f"speedup_vs_{other}"] = round(times[other] / ms, 3) if other in times else None
    return list(table.values())


def print_row(row):
    if row["ms"] is None:
        print(f"  {row['impl']:<9} -- {row['note']}")
        return
    parts = [f"  {row['impl']:<9} {row['ms']:10.4f} ms {row['tflops']:9.4f} TFLOP/s"]
    if row.get("peak_mib") is not None:
        parts.append(f"{row['peak_mib']:9.1f} MiB")
    parts += [f"x{row[f'speedup_vs_{o}']:.2f} vs {o}" for o in ("eager", "sdpa", "flex")
              if row.get(f"speedup_vs_{o}") and o != row["impl"]]
    parts.append(f"diff {row['max_abs_diff_vs_eager']:.2g}")
    if row["impl"] == "fxfuse":
        parts.append(row["note"][:120])
    print("  ".join(parts))


def parse_args(argv=None):
    p = device_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default=None, help="comma-separated sequence lengths")
    p.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on cuda, 1 on cpu")
    p.add_argument("--heads", type=int, default=None, help="default: 16 on cuda, 2 on cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--quick", action="store_true", help="small sizes, short timing: a smoke run")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--cpu-compile", action="store_true", help="on CPU, include Inductor (skipped by default: slow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON path (a .csv is written beside it)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    default_lens = ("1024,4096" if args.quick else "512,1024,2048,4096,8192,16384") if gpu else \
        ("512" if args.quick else "512,1024,2048")
    args.seq_lens = [int(v) for v in (args.seq_lens or default_lens).split(",")]
    args.head_dims = [int(v) for v in args.head_dims.split(",")]
    args.batch = args.batch or (2 if gpu else 1)
    args.heads = args.heads or (16 if gpu else 2)
    args.variants = [v for v in args.variants.split(",") if v]
    args.modes = [m for m in args.modes.split(",") if m]
    args.impls = [i for i in args.impls.split(",") if i]
    args.budget = args.budget if args.budget is not None else (0.2 if args.quick else 1.0)
    unknown = set(args.variants) - set(VARIANTS) | set(args.modes) - {"fwd", "fwd+bwd"} | set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown variant/mode/impl: {sorted(unknown)}")
    return args


def source_state() -> dict:
    """The checkout the numbers came from: HEAD and the fxfuse files changed since (shared checkouts)."""
    def git(*cmd):
        try:
            done = subprocess.run(["git", *cmd], cwd=RESULTS.parents[1], capture_output=True, text=True)
        except OSError:  # no git here
            return ""
        return done.stdout if done.returncode == 0 else ""  # not a git checkout: nothing to record
    changed = git("status", "--porcelain", "--", "fxfuse")  # lines "XY path": the status is 2 chars wide
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "fxfuse_files_changed": [line[3:] for line in changed.splitlines() if line.strip()]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; this machine has none (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    private_inductor_cache("bench_attention_inductor_")
    torch._inductor.config.fx_graph_cache = False  # setup_s shows what a first compile costs
    started = time.perf_counter()
    results, sites = [], {}
    for name in args.variants:
        for mode in args.modes:
            for length in args.seq_lens:
                for d in args.head_dims:
                    print(f"{name} {mode} B={args.batch} H={args.heads} L={length} D={d}")
                    for row in bench_one(name, args.batch, args.heads, length, d, args.dtype, args.device,
                                         mode == "fwd+bwd", args.impls, args.budget, args.cpu_compile):
                        print_row(row)
                        results.append(row)
                        if row["impl"] == "fxfuse" and "fused" in row:
                            sites.setdefault(name, {})[f"{mode} L={length} D={d}"] = row["note"]
    out = Path(args.out) if args.out else RESULTS / f"attention_{machine_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_attention.py", "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_info(args.device), "source": source_state(), "seconds": round(time.perf_counter() - started, 1),
        "peak_memory": "torch.cuda.max_memory_allocated during one call minus memory allocated before it"
        if args.device == "cuda" else "not measured on CPU (tracemalloc does not see torch's CPU allocator)",
        "fxfuse_sites": sites, "results": results,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    columns = ["variant", "mode", "batch", "heads", "seq_len", "head_dim", "dtype", "device", "impl", "ms", "tflops",
               "peak_mib", *(f"speedup_vs_{o}" for o in IMPLS), "fused", "max_abs_diff_vs_eager", "setup_s", "note"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {out} and {out.with_suffix('.csv')} in {payload['seconds']}s")
    failed = [r for r in results if r["ms"] is None and "failed:" in r["note"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
