"""Benchmark of linear attention written quadratically (causal, elu + 1 features, normalised):
time and peak memory of one call (forward under no_grad, and forward + backward), eager vs
Inductor vs the fxfuse rewrite (``fuse-linear-attention``: the linear-time chunked form) run eagerly
and under ``torch.compile(backend=fxfuse)`` (the rest of the graph by Inductor).

    python benchmarks/bench_linear_attention.py --threads 1            # CPU: B 1, H 4, D 64, L 1024-4096
    python benchmarks/bench_linear_attention.py --lengths 512 --repeat 1
    python benchmarks/bench_linear_attention.py --device cuda --dtype bfloat16 --lengths 4096,16384
    python benchmarks/bench_linear_attention.py --style efficient --modes fwd+bwd --lengths 4096

``--style efficient``: Shen et al.'s efficient attention instead (non-causal; q's softmax over the
features, k's over the sequence, both applied inside the operator), results in
results/linear_attention_efficient_<device>.json/.csv.

Each (implementation, length, mode) runs in a fresh subprocess; peak memory is measured as in
bench_loss.py (peak resident set added by the call) on the CPU, and as the peak of
``torch.cuda.max_memory_allocated`` above what was allocated before the call on CUDA; ``saved_mib``
(fwd+bwd) is what autograd keeps from the forward for the backward, q, k, v left out: the memory
each such layer holds in a model's training step, which one call's peak does not show. On CUDA the
fxfuse rows launch the generated Triton kernels. Results: results/linear_attention_<device>.json/.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import _commit, _rss_mib  # noqa: E402
from bench_norm import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSES = "canonicalize,fuse-linear-attention"
IMPLS = ("eager", "inductor", "fxfuse", "fxfuse_compile")
COLUMNS = ("mode", "length", "heads", "head_dim", "impl", "ms", "peak_mib", "saved_mib", "scores_f32_mib", "memory_vs_eager",
           "speedup_vs_eager", "speedup_vs_inductor", "max_abs_diff_vs_eager", "note")


def causal_linear_attention(q, k, v):
    """Katharopoulos et al.'s attention written quadratically, as model code often writes it."""
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    scores = q @ k.transpose(-2, -1)
    length = q.shape[-2]
    scores = scores.masked_fill(torch.triu(torch.ones(length, length, dtype=torch.bool, device=q.device), 1), 0.0)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)


def efficient_attention(q, k, v):
    """Shen et al.'s efficient attention written quadratically: softmax of q over the features, of k
    over the sequence."""
    return (q.softmax(dim=-1) @ k.softmax(dim=-2).transpose(-2, -1)) @ v


STYLES = {"causal-elu": causal_linear_attention, "efficient": efficient_attention}


def _build(impl, q, k, v, style="causal-elu"):
    import fxfuse

    fn = STYLES[style]
    if impl == "eager":
        return fn
    if impl == "inductor":
        return torch.compile(fn)
    if impl == "fxfuse":
        res = fxfuse.rewrite(fn, (q, k, v), passes=PASSES)
        if not res.matches:
            raise RuntimeError("fxfuse did not fuse the site: " + res.report())
        return res.module
    return torch.compile(fn, backend=fxfuse.Backend(passes=PASSES))


def _saved_for_backward_mib(fn, q, k, v) -> float:
    """What autograd keeps from the forward until the backward (the activation memory a model pays
    per layer), q, k and v themselves left out: the distinct storages of the tensors it saves."""
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v)
    del out
    return sum(storages.values()) / 2**20


def child(args) -> int:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=args.device).to(getattr(torch, args.dtype))
               for _ in range(3))
    cuda = args.device == "cuda"
    backward = args.mode == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(backward)
    fn = _build(args.impl, q, k, v, args.style)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        out = fn(q, k, v)
        torch.autograd.grad(out.float().sum(), (q, k, v))
        return out.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()
    sync()
    setup_s = time.perf_counter() - started
    step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        out = step()
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        before = _rss_mib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        out = step()
        peak = _rss_mib("VmHWM") - before
    saved = _saved_for_backward_mib(fn, q, k, v) if backward else None
    times = []
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    torch.save(out.float().cpu(), args.save)
    print(json.dumps({"ms": min(times) * 1e3, "peak_mib": peak, "saved_mib": saved, "setup_s": setup_s}))
    return 0


def measure(impl, mode, length, args, tmp) -> dict:
    save = os.path.join(tmp, f"{impl}_{mode}_{length}.pt")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--mode", mode, "--length", str(length),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--repeat", str(args.repeat),
           "--save", save, "--threads", str(args.threads or torch.get_num_threads()), "--device", args.device,
           "--dtype", args.dtype, "--style", args.style]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"note": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["saved"] = torch.load(save)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--style", default="causal-elu", choices=sorted(STYLES))
    p.add_argument("--out", default=None, help="default: results/linear_attention[_efficient]_<device>.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_linear_attention: --device cuda needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    infix = "" if args.style == "causal-elu" else "_" + args.style
    args.out = args.out or str(RESULTS / f"linear_attention{infix}_{args.device}.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(n) for n in args.lengths.split(",")):
            for mode in args.modes.split(","):
                found = {}
                for impl in [i for i in args.impls.split(",") if i]:
                    found[impl] = measure(impl, mode, length, args, tmp)
                    print(f"L={length} {mode} {impl}: {found[impl].get('ms', '')} ms, "
                          f"{found[impl].get('peak_mib', '')} MiB {found[impl].get('note', '')}", flush=True)
                rows.extend(_rows(found, mode, length, args))
    payload = {"machine": machine_info(args.device), "passes": PASSES, "dtype": args.dtype, "style": args.style, "results": rows,
               "source": {"commit": _commit()},
               "peak_memory": "CPU: peak resident set added by one call (VmHWM after a reset, minus VmRSS before); "
                              "CUDA: peak allocated during one call minus allocated before"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def _rows(found, mode, length, args) -> list[dict]:
    eager, inductor = found.get("eager", {}), found.get("inductor", {})
    rows = []
    for impl, r in found.items():
        row = {"mode": mode, "length": length, "heads": args.heads, "head_dim": args.head_dim, "impl": impl,
               "scores_f32_mib": round(args.heads * length * length * 4 / 2**20, 1), "note": r.get("note", "")}
        if "ms" in r:
            row.update(ms=round(r["ms"], 2), peak_mib=round(r["peak_mib"], 1))
            if r.get("saved_mib") is not None:
                row["saved_mib"] = round(r["saved_mib"], 1)
            if "ms" in eager:
                row.update(speedup_vs_eager=round(eager["ms"] / r["ms"], 3),
                           memory_vs_eager=round(r["peak_mib"] / max(eager["peak_mib"], 1e-9), 3),
                           max_abs_diff_vs_eager=float((r["saved"] - eager["saved"]).abs().max()))
            if "ms" in inductor:
                row["speedup_vs_inductor"] = round(inductor["ms"] / r["ms"], 3)
            if not row["note"]:
                row["note"] = f"first call {r['setup_s']:.1f}s"
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
