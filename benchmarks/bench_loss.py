"""Benchmark of the LM head + cross-entropy: peak memory (the headline) and time of one training
step (forward + backward) and of a forward under no_grad, eager vs Inductor vs fxfuse's chunked
``linear_cross_entropy`` (Liger's fused linear cross-entropy when importable; it needs CUDA).

The module is the issue's form, bf16 weights and hidden states, float32 loss:
``F.cross_entropy(lm_head(h).float().view(-1, V), labels.view(-1), ignore_index=-100)``.

    python benchmarks/bench_loss.py --threads 1            # CPU: 512 tokens x hidden 128, vocab 32k-256k
    python benchmarks/bench_loss.py --vocab 32768 --repeat 1

Each (implementation, vocab, mode) runs in a fresh subprocess. Peak memory on CPU is the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up calls)
above the resident set just before the measured call: the memory the step itself adds on top of
its inputs and weights. glibc is told to return every freed block of 64 KiB or more to the system
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors do not hide in the heap. Time is the minimum
of ``--repeat`` calls after the measured one. Results: benchmarks/results/loss_cpu.json and .csv.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_norm import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSES = "canonicalize,fuse-linear-cross-entropy"
IMPLS = ("eager", "inductor", "fxfuse", "liger")
COLUMNS = ("mode", "tokens", "hidden", "vocab", "impl", "ms", "peak_mib", "logits_f32_mib", "memory_vs_eager",
           "speedup_vs_eager", "speedup_vs_inductor", "loss_diff_vs_eager", "grad_w_max_diff_vs_eager", "note")


class LMHeadLoss(nn.Module):
    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), ignore_index=-100)


def _rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(impl: str, module, h, labels):
    if impl == "eager":
        return module
    if impl == "inductor":
        return torch.compile(module)
    if impl == "fxfuse":
        import fxfuse

        res = fxfuse.rewrite(module, (h, labels), passes=PASSES)
        if not res.matches:
            raise RuntimeError("fxfuse did not fuse the site: " + res.report())
        return res.module
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # CUDA only

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda x, y: loss(module.lm_head.weight, x.view(-1, x.shape[-1]), y.view(-1))


def child(args) -> int:
    """One measurement; writes a JSON line to stdout and the step's results to args.save."""
    torch.manual_seed(0)
    tokens, hidden, vocab = args.tokens, args.hidden, int(args.vocab)
    module = LMHeadLoss(hidden, vocab).to(torch.bfloat16)
    h = torch.randn(tokens // 128 or 1, min(tokens, 128), hidden, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, h.shape[:2])
    labels[:, :8] = -100  # a prompt not trained on
    backward = args.mode == "fwd+bwd"
    h.requires_grad_(backward)
    fn = _build(args.impl, module, h, labels)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(h, labels), None
        loss = fn(h, labels)
        return loss, torch.autograd.grad(loss, [h, module.lm_head.weight])

    started = time.perf_counter()
    step()  # compile / capture
    setup_s = time.perf_counter() - started
    step()
    before = _rss_mib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident set
    loss, grads = step()
    peak = _rss_mib("VmHWM") - before
    times = []
    for _ in range(args.repeat):  # the minimum: load on a shared machine only ever adds time
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = min(times) * 1e3
    torch.save({"loss": loss.detach(), "grad_w": None if grads is None else grads[1]}, args.save)
    print(json.dumps({"ms": ms, "peak_mib": peak, "setup_s": setup_s}))
    return 0


def measure(impl, mode, tokens, hidden, vocab, repeat, threads, tmp) -> dict:
    save = os.path.join(tmp, f"{impl}_{mode}_{vocab}.pt")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--mode", mode, "--tokens", str(tokens),
           "--hidden", str(hidden), "--vocab", str(vocab), "--repeat", str(repeat), "--save", save,
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"note": f"failed: {last[:200]}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["saved"] = torch.load(save)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (peak memory read from /proc)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", default="32768,65536,131072,262144", help="comma-separated vocabulary sizes")
    p.add_argument("--modes", default="fwd+bwd,fwd")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeat", type=int, default=2, help="timed calls per measurement (the minimum is kept)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "loss_cpu.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    threads = args.threads or torch.get_num_threads()
    impls = [i for i in args.impls.split(",") if i]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in (int(v) for v in args.vocab.split(",")):
            for mode in args.modes.split(","):
                found = {}
                for impl in impls:
                    if impl == "liger":
                        try:
                            import liger_kernel  # noqa: F401
                        except ImportError:
                            found[impl] = {"note": "skipped: liger-kernel is not installed (it needs a CUDA build of Triton)"}
                            continue
                    found[impl] = measure(impl, mode, args.tokens, args.hidden, vocab, args.repeat, threads, tmp)
                    print(f"V={vocab} {mode} {impl}: {found[impl].get('ms', '')} ms, "
                          f"{found[impl].get('peak_mib', '')} MiB {found[impl].get('note', '')}", flush=True)
                rows.extend(_rows(found, mode, args.tokens, args.hidden, vocab))
    payload = {"machine": machine_info("cpu"), "passes": PASSES, "results": rows,
               "peak_memory": "CPU: peak resident set added by one call (VmHWM after a reset, minus VmRSS before)",
               "source": {"commit": _commit()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def _rows(found: dict, mode: str, tokens: int, hidden: int, vocab: int) -> list[dict]:
    eager, inductor = found.get("eager", {}), found.get("inductor", {})
    rows = []
    for impl, r in found.items():
        row = {"mode": mode, "tokens": tokens, "hidden": hidden, "vocab": vocab, "impl": impl,
               "logits_f32_mib": round(tokens * vocab * 4 / 2**20, 1), "note": r.get("note", "")}
        if "ms" in r:
            row.update(ms=round(r["ms"], 2), peak_mib=round(r["peak_mib"], 1))
            if "ms" in eager:
                row.update(speedup_vs_eager=round(eager["ms"] / r["ms"], 3),
                           memory_vs_eager=round(r["peak_mib"] / max(eager["peak_mib"], 1e-9), 3))
                got, ref = r["saved"], eager["saved"]
                row["loss_diff_vs_eager"] = float((got["loss"].double() - ref["loss"].double()).abs())
                if got["grad_w"] is not None:
                    row["grad_w_max_diff_vs_eager"] = float((got["grad_w"].double() - ref["grad_w"].double()).abs().max())
            if "ms" in inductor:
                row["speedup_vs_inductor"] = round(inductor["ms"] / r["ms"], 3)
            if not row["note"]:
                row["note"] = f"first call {r['setup_s']:.1f}s"
        rows.append(row)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
