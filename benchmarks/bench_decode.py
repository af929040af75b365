"""Benchmark of generation with a KV cache and of training at varying lengths, on a small random Llama.

Decode: ``model.forward = torch.compile(model.forward, backend=...)`` then greedy ``generate()``
with the dynamic cache, for 1 and 8 sequences: tokens/s of the timed run (after one warm-up run
that compiles), the number of graphs compiled and whether the tokens equal eager's.
Varying lengths: training steps (forward + backward + SGD) on lengths drawn from a range, eager
against torch.compile with fxfuse and with Inductor (``dynamic=None``: automatic dynamic), steps/s
after a warm-up over the same lengths, and the number of graphs each compiled.

    python benchmarks/bench_decode.py --quick          # CPU: a few minutes
    python benchmarks/bench_decode.py                  # the issue's sizes: prompts 128, 512, 2048;
                                                       # 64 new tokens; lengths 64..1024

Results go to benchmarks/results/decode_<machine>.json. On a 2-core CPU the numbers measure the
CPU path (ATen's fused attention and eager glue), not kernels; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from fxfuse.backend import Backend


def _llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def _compiler(backend: str):
    """fxfuse (the composed backend), fxfuse_eager (``inner="eager"``: no Inductor) or inductor."""
    if backend.startswith("fxfuse"):
        return Backend(inner="eager" if backend == "fxfuse_eager" else "inductor")
    return "inductor"


def _decode(args, batch: int, prompt: int, backend: str) -> dict:
    model = _llama(args.hidden, args.layers).eval()
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 0}
    want = model.generate(ids, **kwargs)
    be = None
    if backend != "eager":
        be = _compiler(backend)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend=be)
    model.generate(ids, **kwargs)  # warm-up: compiles
    start, cpu_start = time.perf_counter(), time.process_time()
    got = model.generate(ids, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    row = {"bench": "decode", "backend": backend, "batch": batch, "prompt": prompt,
           "new_tokens": args.new_tokens, "tokens_per_s": batch * args.new_tokens / seconds,
           "tokens_per_cpu_s": batch * args.new_tokens / cpu_seconds,
           "tokens_equal_eager": bool(torch.equal(got, want))}
    if isinstance(be, Backend):
        row["graphs"] = len(be.reports)
        row["attention_fused_every_graph"] = all(
            r.matches and not [m for m in r.misses if m.kind == "attention"] for r in be.reports)
    return row


def _train(args, backend: str) -> dict:
    model = _llama(args.hidden, args.layers).train()
    be = _compiler(backend)
    step_fn = model if backend == "eager" else torch.compile(model, backend=be)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    lo, hi = args.lengths
    rng = random.Random(0)
    lengths = [rng.randint(lo, hi) for _ in range(args.steps)]

    def step(n):
        ids = torch.randint(0, 256, (2, n))
        loss = step_fn(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    torch._dynamo.reset()
    for n in lengths:  # warm-up: the compiles (a static graph, then a symbolic one)
        step(n)
    start, cpu_start = time.perf_counter(), time.process_time()
    for n in lengths:
        step(n)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    row = {"bench": "train_varying_length", "backend": backend, "lengths": f"{lo}..{hi}", "steps": args.steps,
           "steps_per_s": args.steps / seconds, "steps_per_cpu_s": args.steps / cpu_seconds}
    if isinstance(be, Backend):
        row["graphs"] = len(be.reports)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short prompt and lengths (CPU, minutes)")
    p.add_argument("--prompts", default="128,512,2048", help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lengths", default="64,1024", help="lo,hi of the training lengths")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--backends", default="eager,fxfuse,inductor", help="of eager, fxfuse, fxfuse_eager, inductor")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default, as bench_e2e: OpenMP threads on a shared or "
                        "oversubscribed CPU spin at barriers and distort wall time many-fold)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens, args.lengths, args.steps = "128", 16, "64,256", 4
    args.lengths = tuple(int(x) for x in args.lengths.split(","))
    rows = []
    for backend in args.backends.split(","):
        for prompt in (int(x) for x in args.prompts.split(",")):
            for batch in (1, 8):
                rows.append(_decode(args, batch, prompt, backend))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(_train(args, backend))
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()}-{torch.get_num_threads()}threads"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "decode_cpu.json"
    out.write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                               "load_average_at_end": os.getloadavg(), "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
