"""One Llama-style training step (forward, loss, backward, optimizer step) under torch.compile with
Inductor and with fxfuse, and eagerly: time per step, first-call (compile) time, peak memory on
CUDA. The model is transformers' LlamaForCausalLM from a config (random weights, no download).

    python benchmarks/bench_train_step.py --device cuda          # bf16, hidden 2048, 4 layers, B 4, L 2048
    python benchmarks/bench_train_step.py --device cpu --tiny    # a smoke run (what the CPU test runs)

Results go to benchmarks/results/train_step_<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_norm import machine_info, machine_slug  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("eager", "inductor", "fxfuse")


def make_model(tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if tiny else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
    config = LlamaConfig(**size, max_position_embeddings=4096, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def step_time(impl: str, args) -> dict:
    model = make_model(args.tiny, args.device, args.dtype)
    runner = model if impl == "eager" else torch.compile(model, backend="inductor" if impl == "inductor" else "fxfuse")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=args.device)

    def step():
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch._dynamo.reset()
    start = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - start
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"impl": impl, "ms": round(sorted(times)[len(times) // 2], 3), "first_call_s": round(first, 2),
            "loss": round(float(loss), 4),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch: a smoke run")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.batch, args.seq_len = (2, 16) if args.tiny else (4, 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    rows = []
    for impl in [i for i in args.impls.split(",") if i]:
        try:
            rows.append(step_time(impl, args))
        except Exception as e:  # one failing implementation must not hide the others
            rows.append({"impl": impl, "ms": None, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)
    times = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        if r.get("ms"):
            r.update({f"speedup_vs_{o}": round(times[o] / r["ms"], 3) for o in times})
    out = Path(args.out) if args.out else RESULTS / f"train_step_{machine_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_train_step.py", "machine": machine_info(args.device),
                               "model": "LlamaForCausalLM " + ("tiny" if args.tiny else "hidden 2048, 4 layers, GQA 16/4"),
                               "batch": args.batch, "seq_len": args.seq_len, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r.get("ms") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
