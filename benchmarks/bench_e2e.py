"""End-to-end benchmark: whole models through eager, Inductor and the fxfuse backend.

Six models whose attention and norms are written by hand (the demo's naive transformer,
transformers' GPT-2, Llama, BERT and T5 with ``attn_implementation="eager"``, random weights from
small configs: no downloads, and PolyCom's MLP blocks with PolyNorm as the activation), each run
five ways:

| impl | what runs |
| --- | --- |
| ``eager`` | the model as written |
| ``inductor`` | ``torch.compile(model)`` (Inductor) |
| ``fxfuse`` | ``torch.compile(model, backend="fxfuse")``: fxfuse's passes, then Inductor |
| ``fxfuse_eager`` | ``torch.compile(model, backend="fxfuse", options={"inner": "eager"})`` |
| ``rewrite`` | ``fxfuse.rewrite(model, (x,)).module``: no torch.compile; the fused sites' CPU paths, the rest op by op |

in inference (``no_grad``) and one training step (forward, a loss, backward). Per row: the median
time of the timed calls (interleaved rounds, so that load hits every implementation alike, each
round in a rotated order, see ``round_order``), the median process CPU time of those calls
(``cpu_ms``: what other processes' load adds to the wall time is not in it), the
first call's time (the compile), the activation memory a training forward saves for the backward
(CPU; bytes of the tensors autograd keeps), the peak memory on CUDA, and the largest difference
from eager's output.

    python benchmarks/bench_e2e.py                       # CPU, 1 thread, a few minutes on 2 cores
    python benchmarks/bench_e2e.py --models llama --modes train --rounds 5
    python benchmarks/bench_e2e.py --device cuda

Results: benchmarks/results/e2e_<machine>.json and .csv (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_norm import PolyNorm, machine_info, machine_slug, private_inductor_cache  # noqa: E402

import fxfuse  # noqa: E402  (bench_norm put the checkout on sys.path)
from fxfuse.demo import NaiveTransformer, saved_activation_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("eager", "inductor", "fxfuse", "fxfuse_eager", "rewrite")
VOCAB = 512


# ---- the models ----------------------------------------------------------------------------------

class _Hidden(nn.Module):
    """A model's last hidden state as one tensor (transformers return an output object)."""

    def __init__(self, model: nn.Module, decoder: bool = False):
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, ids):
        if self.decoder == "pixels":  # Swin reads an image
            return self.model(pixel_values=ids).last_hidden_state
        if self.decoder:  # T5: the decoder reads the same ids (teacher forcing)
            return self.model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
        return self.model(input_ids=ids).last_hidden_state


def _demo(d, layers, length):
    return NaiveTransformer(dim=d, heads=4, layers=layers), "embeddings"


def _gpt2(d, layers, length):
    from transformers import GPT2Config, GPT2Model

    return _Hidden(GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=d, n_layer=layers, n_head=4, n_positions=length,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                        attn_implementation="eager"))), "ids"


def _llama(d, layers, length):
    from transformers import LlamaConfig, LlamaModel

    return _Hidden(LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=4 * d,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=length, use_cache=False,
                                          attn_implementation="eager"))), "ids"


def _bert(d, layers, length):
    from transformers import BertConfig, BertModel

    return _Hidden(BertModel(BertConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers,
                                        num_attention_heads=4, intermediate_size=4 * d, max_position_embeddings=length,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        attn_implementation="eager"), add_pooling_layer=False)), "ids"


def _swin(d, layers, length):
    """transformers' Swin: shifted-window attention on a sqrt(length)-sided image (patch 1, windows
    of 4x4 = 16 tokens; fxfuse addresses the windows, issue 12 item 6)."""
    from transformers import SwinConfig, SwinModel

    side = math.isqrt(length)
    config = SwinConfig(image_size=side, patch_size=1, num_channels=3, embed_dim=d, depths=[layers], num_heads=[4],
                        window_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    config._attn_implementation = "eager"
    return _Hidden(SwinModel(config, add_pooling_layer=False), decoder="pixels"), "pixels"


def _t5(d, layers, length):
    from transformers import T5Config, T5Model

    return _Hidden(T5Model(T5Config(vocab_size=VOCAB, d_model=d, d_kv=d // 4, d_ff=4 * d, num_layers=layers,
                                    num_heads=4, dropout_rate=0.0, use_cache=False, attn_implementation="eager")),
                   decoder=True), "ids"


class PolyComMLP(nn.Module):
    """PolyCom's MLP blocks (Zhuo et al. 2024): ``x + down(PolyNorm(up(RMSNorm(x))))``, PolyNorm as
    the activation, a hand-written RMSNorm before each block (fxfuse: one polynorm and one rms_norm
    site a layer)."""

    def __init__(self, d, layers):
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.acts = nn.ModuleList(PolyNorm(4 * d) for _ in range(layers))
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(d)) for _ in range(layers))

    def forward(self, x):
        for up, act, down, scale in zip(self.ups, self.acts, self.downs, self.scales):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
            x = x + down(act(up(h)))
        return x


def _polynorm(d, layers, length):
    return PolyComMLP(d, layers), "embeddings"


MODELS = {"demo": _demo, "gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5, "polynorm": _polynorm,
          "swin": _swin}


def make_model(name, d, layers, batch, length, device):
    torch.manual_seed(0)
    model, kind = MODELS[name](d, layers, length)
    model = model.to(device)
    if kind == "ids":
        x = torch.randint(0, VOCAB, (batch, length), device=device)
    elif kind == "pixels":
        x = torch.randn(batch, 3, math.isqrt(length), math.isqrt(length), device=device)
    else:
        x = torch.randn(batch, length, d, device=device)
    return model, x


# ---- implementations -------------------------------------------------------------------------------

def compiled(impl: str, model: nn.Module, x):
    torch._dynamo.reset()
    if impl == "eager":
        return model, None
    if impl == "rewrite":
        res = fxfuse.rewrite(model, (x,))
        return res.module, res
    if impl == "inductor":
        return torch.compile(model), None
    backend = fxfuse.Backend(inner="eager" if impl == "fxfuse_eager" else "inductor")
    return torch.compile(model, backend=backend), backend


def step(fn, model, x, train: bool):
    """One call: inference under no_grad, or forward + loss + backward (gradients zeroed first)."""
    if not train:
        with torch.no_grad():
            return fn(x)
    for p in model.parameters():
        p.grad = None
    out = fn(x)
    out.float().pow(2).mean().backward()
    return out.detach()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def round_order(impls: list[str], i: int) -> list[str]:
    """The order of round ``i``, so that over the rounds each implementation follows several others
    (every other one within 8 rounds for the default five): the implementations
    stepped through by ``m``, the round's multiplier coprime with their number (successor of the
    ``a``-th is the ``a + m``-th), from a rotating start. In one fixed order the implementation
    after the most memory-hungry one (``fxfuse_eager`` in training) paid its page faults: glibc
    hands the large blocks freed by that step back to the kernel, and the next step touches fresh
    pages (``rewrite`` measured 0.78x eager that way, 1.0x alone)."""
    n = len(impls)
    steps = [m for m in range(1, n) if math.gcd(m, n) == 1] or [1]
    m = steps[i % len(steps)]
    return [impls[(i + j * m) % n] for j in range(n)]


def bench_model(name, args, device) -> list[dict]:
    rows = []
    for mode in args.modes:
        model, x = make_model(name, args.hidden, args.layers, args.batch, args.seq_len, device)
        model.train(False)  # no dropout: every implementation computes the same function
        train = mode == "train"
        fns, reference = {}, None
        for impl in args.impls:
            row = {"model": name, "mode": mode, "impl": impl, "batch": args.batch, "seq_len": args.seq_len,
                   "hidden": args.hidden, "layers": args.layers, "ms": None, "cpu_ms": None, "compile_s": None,
                   "saved_mib": None, "peak_mib": None, "max_abs_diff_vs_eager": None, "note": ""}
            rows.append(row)
            try:
                start = time.perf_counter()  # rewrite captures here, torch.compile at the first call
                fn, backend = compiled(impl, model, x)
                out = step(fn, model, x, train)
                _sync(device)
                row["compile_s"] = round(time.perf_counter() - start, 2)
                reference = out.float() if reference is None else reference
                row["max_abs_diff_vs_eager"] = float((out.float() - reference).abs().max())
                if backend is not None:
                    reports = [backend.report_data] if impl == "rewrite" else backend.reports
                    row["note"] = "; ".join(r.text().splitlines()[0].split(": ", 1)[1].split(", 0 declined")[0]
                                            for r in reports)
                if train and device == "cpu":
                    row["saved_mib"] = round(saved_activation_bytes(fn, model, x) / 2**20, 2)
                fns[impl] = (fn, row)
            except Exception as err:  # one failure must not lose the other rows
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                traceback.print_exc()
        times = {impl: [] for impl in fns}
        cpu_times = {impl: [] for impl in fns}
        for _ in range(args.warmup):
            for fn, _row in fns.values():
                step(fn, model, x, train)
        for i in range(args.rounds):
            for impl in round_order(list(fns), i):
                fn = fns[impl][0]
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                step(fn, model, x, train)
                _sync(device)
                times[impl].append(time.perf_counter() - t0)
                cpu_times[impl].append(time.process_time() - c0)
        for impl, (fn, row) in fns.items():
            row["ms"] = round(statistics.median(times[impl]) * 1e3, 3)
            row["cpu_ms"] = round(statistics.median(cpu_times[impl]) * 1e3, 3)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step(fn, model, x, train)
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        by_impl = {r["impl"]: r for r in rows if r["model"] == name and r["mode"] == mode}
        for r in by_impl.values():
            for base in ("eager", "inductor"):
                ok = r["ms"] and base in by_impl and by_impl[base]["ms"]
                r[f"speedup_vs_{base}"] = round(by_impl[base]["ms"] / r["ms"], 3) if ok else None
            inductor_compile = by_impl.get("inductor", {}).get("compile_s")
            r["compile_vs_inductor"] = round(r["compile_s"] / inductor_compile, 2) \
                if r["compile_s"] and inductor_compile and r["impl"] != "eager" else None
        print(f"{name} {mode}: " + ", ".join(f"{r['impl']} {r['ms']} ms (compile {r['compile_s']} s)"
                                           for r in by_impl.values()), flush=True)
    return rows


def source_info() -> dict:
    def git(*a):
        done = subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--modes", default="inference,train")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timed calls per implementation (the median is kept)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse-compile-cache", action="store_true",
                   help="let Inductor use its on-disk caches (by default a fresh one: compile_s is a cold compile)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.models, args.impls, args.modes = (s.split(",") for s in (args.models, args.impls, args.modes))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if not args.reuse_compile_cache:
        torch._inductor.config.fx_graph_cache = False
        torch._inductor.config.autotune_local_cache = False
        private_inductor_cache("fxfuse-e2e-inductor-")
    # One throwaway compile first: Inductor's one-time start-up (imports, C++ toolchain probes)
    # would otherwise be charged to whichever implementation compiles first.
    if {"inductor", "fxfuse"} & set(args.impls):
        torch.compile(lambda t: (t * 2).sum())(torch.randn(4))
    source, machine = source_info(), machine_info(args.device)  # now: files and load change while it runs
    rows = []
    for name in args.models:
        rows += bench_model(name, args, args.device)
    out = Path(args.out) if args.out else RESULTS / f"e2e_{machine_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "source": source, "command": sys.argv,
               "timing": f"median of {args.rounds} interleaved calls (each round in a rotated order) after "
                         f"{args.warmup} warm-up calls; cpu_ms: their process CPU time",
               "memory": "saved_mib: activations a training forward saves for backward (CPU); peak_mib: CUDA only",
               "results": rows}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    columns = list(rows[0])
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
