"""Benchmark of fused normalization: RMSNorm (Llama style), LayerNorm and residual add + RMSNorm;
and the norm variants (``--forms deepnorm,b2t,polynorm``): DeepNorm's LN(alpha * x + f), B2T's
three-input LN(f + h + x), PolyNorm.

Each form is written naively (as model code writes it) and run four ways: eager, torch.compile
(Inductor) of the same module, the fxfuse-rewritten module, and Liger-Kernel when it is importable
(CUDA only). Forward alone (under no_grad) and forward + backward (gradients of the input(s) and
the parameters). Reports the time per call, speedups over eager and Inductor, effective GB/s (the
bytes a fused kernel must move / time), how that compares with a plain copy on this machine, and
the peak memory one call adds (CUDA: max_memory_allocated; CPU: the resident set's high-water
mark, with glibc's mmap threshold pinned so freed tensors leave the resident set).

    python benchmarks/bench_norm.py --quick                # CPU: fp32, small sizes, a few minutes
    python benchmarks/bench_norm.py --device cuda          # GPU: bf16, rows 4096-16384 x hidden 1024-8192

Results go to benchmarks/results/norm_<machine>.json and .csv. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import csv
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxfuse  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 1e-6


# ---- the naive modules ---------------------------------------------------------------------------

class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: float32 statistics, cast back, then the weight."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * h.to(x.dtype)


class NaiveLayerNorm(nn.Module):
    """LayerNorm by hand: float32 statistics, biased variance, weight and bias."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return ((h - mean) * torch.rsqrt(var + EPS)).to(x.dtype) * self.weight + self.bias


class ResidualRMSNorm(nn.Module):
    """A pre-norm block's ``h = x + delta; y = norm(h)``, returning both (h is used again)."""

    def __init__(self, d):
        super().__init__()
        self.norm = LlamaRMSNorm(d)

    def forward(self, x, delta):
        h = x + delta
        return self.norm(h), h


class DeepNormLN(nn.Module):
    """DeepNorm's post-LN ``LN(alpha * x + f)``, alpha = (2N)^(1/4) for N = 12 layers (torchscale's form)."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=EPS)
        self.alpha = (2 * 12) ** 0.25

    def forward(self, x, f):
        return self.norm(x * self.alpha + f)


class B2TLN(nn.Module):
    """B2T's last post-LN of a layer: ``LN(f + h + x)``, the layer input x as a third term."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=EPS)

    def forward(self, f, h, x):
        return self.norm(f + h + x)


class PolyNorm(nn.Module):
    """PolyCom / Motif's ``w0 * norm(x^3) + w1 * norm(x^2) + w2 * norm(x) + b``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.3, 0.4, 0.3]))
        self.bias = nn.Parameter(torch.tensor([0.1]))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    def forward(self, x):
        return self.weight[0] * self._norm(x ** 3) + self.weight[1] * self._norm(x ** 2) + self.weight[2] * self._norm(
            x) + self.bias


FORMS = {"rms": LlamaRMSNorm, "layer": NaiveLayerNorm, "residual_rms": ResidualRMSNorm,
         "deepnorm": DeepNormLN, "b2t": B2TLN, "polynorm": PolyNorm}
DEFAULT_FORMS = "rms,layer,residual_rms"
INPUTS = {"residual_rms": 2, "deepnorm": 2, "b2t": 3}  # activations each form takes (1 otherwise)


def liger_module(form: str, d: int, dtype, device):
    """The Liger-Kernel module for a form, or None (with the reason) when it has none / is absent."""
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except ImportError as e:
        return None, f"liger_kernel not importable ({e})"
    if device != "cuda":
        return None, "Liger-Kernel runs on CUDA only"
    if form in ("deepnorm", "b2t"):
        return None, "Liger-Kernel has no scaled or three-input residual norm"
    if form == "polynorm":
        try:
            from liger_kernel.transformers import LigerPolyNorm
        except ImportError:
            return None, "this Liger-Kernel has no PolyNorm"
        return LigerPolyNorm(eps=EPS).to(device=device, dtype=dtype), ""
    if form == "rms":
        m = LigerRMSNorm(d, eps=EPS, offset=0.0, casting_mode="llama")
    elif form == "layer":
        m = LigerLayerNorm(d, eps=EPS)
    else:
        try:
            from liger_kernel.transformers import LigerFusedAddRMSNorm
        except ImportError:
            return None, "this Liger-Kernel has no fused add + RMSNorm"
        m = LigerFusedAddRMSNorm(d, eps=EPS, offset=0.0, casting_mode="llama")
    return m.to(device=device, dtype=dtype), ""


# ---- measuring -----------------------------------------------------------------------------------

def time_ms(fns: dict, device: str, budget_s: float) -> dict:
    """Milliseconds per call of each function in ``fns``.

    CUDA: the median of triton's ``do_bench`` (L2 flushed between calls), one function at a time.
    CPU: the functions are timed in interleaved rounds (so background load hits all of them alike),
    each round in a rotated order, and each one's minimum is kept: load only ever adds time, so the
    minimum is the best estimate of a call's own cost on a shared machine."""
    if device == "cuda":
        from triton.testing import do_bench

        rep = max(50, int(budget_s * 1000))
        return {k: float(do_bench(fn, warmup=25, rep=rep, return_mode="median")) for k, fn in fns.items()}
    best = {k: math.inf for k in fns}
    rounds, start = 0, time.perf_counter()
    keys = list(fns)
    while rounds < 5 or (time.perf_counter() - start < budget_s * len(fns) and rounds < 200):
        # Each round starts with another implementation: a call pays for the memory the call before
        # it freed (glibc trims it, the next call faults it back in), so a fixed order favours one.
        for k in keys[rounds % len(keys):] + keys[:rounds % len(keys)]:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
        rounds += 1
    return {k: v * 1e3 for k, v in best.items()}


def moved_bytes(form: str, rows: int, d: int, dtype, backward: bool) -> int:
    """Bytes a fused implementation must read and write (activations once each, parameters once)."""
    size = torch.tensor([], dtype=dtype).element_size()  # the modules are cast to dtype, parameters too
    act, par = rows * d * size, d * size
    params = 2 if form in ("layer", "deepnorm", "b2t") else 1
    if form in ("deepnorm", "b2t"):
        n = INPUTS[form]
        fwd = (n + 1) * act + params * par  # read the terms, write y (the sum, kept for backward, not counted)
        bwd = 3 * act + (1 if form == "deepnorm" else 0) * act + 2 * params * par  # dy, saved sum, d_sum (+ alpha d_sum)
    elif form == "polynorm":
        fwd, bwd = 2 * act, 3 * act  # read x, write y; read dy and x, write dx (four scalars aside)
    elif form == "residual_rms":
        fwd = 4 * act + params * par  # read x, delta; write y, h
        bwd = 3 * act + 2 * params * par  # read dy, dh, h; write dx (= d delta); read w, write dw
    else:
        fwd = 2 * act + params * par
        bwd = 3 * act + 2 * params * par  # read dy, x; write dx
    return fwd + (bwd if backward else 0)


def make_inputs(form: str, rows: int, d: int, dtype, device, grad: bool):
    n = INPUTS.get(form, 1)
    return tuple(torch.randn(rows, d, dtype=dtype, device=device, requires_grad=grad) for _ in range(n))


def step_fn(module, inputs, backward: bool):
    """A closure running one forward (under no_grad) or one forward + backward."""
    if not backward:
        def run():
            with torch.no_grad():
                return module(*inputs)
        return run
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    seeded = torch.Generator(device=outs[0].device).manual_seed(1)  # the same upstream gradient for every impl
    grads = tuple(torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=seeded) for o in outs)

    def run():
        o = module(*inputs)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), [*inputs, *params], grads)
    return run


def first_tensor(result):
    while isinstance(result, (tuple, list)):
        result = result[0]
    return result


def private_inductor_cache(prefix: str) -> str:
    """Point Inductor at a fresh cache directory, removed when the process exits.

    Cold-compile timings need an empty cache; a leftover directory per run (hundreds of MiB of
    generated C++ and Triton) once filled this machine's disk and broke CI's install."""
    cache = tempfile.mkdtemp(prefix=prefix)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    return cache


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def machine_slug(device: str) -> str:
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    known = re.search(r"(h100|h200|h20|a100|a10g|l40s|l4|b200|4090|3090)", name)
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def copy_gbps(rows: int, d: int, dtype, device: str, budget_s: float) -> float:
    """Bandwidth of a plain copy of one activation: the practical roofline on this machine."""
    x = torch.randn(rows, d, dtype=dtype, device=device)
    y = torch.empty_like(x)
    ms = time_ms({"copy": lambda: y.copy_(x)}, device, budget_s)["copy"]
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


# ---- one configuration ---------------------------------------------------------------------------

def build(impl, base, form, d, dtype, device, inputs, row):
    """The module for one implementation (None when it is not available, with the reason in row)."""
    if impl == "eager":
        return base
    if impl == "inductor":
        torch._dynamo.reset()  # a fresh cache: each configuration compiles its own static graph
        return torch.compile(base, backend="inductor", dynamic=False)
    if impl == "fxfuse":
        rewritten = fxfuse.rewrite(base, tuple(inputs))
        if not rewritten.matches:
            raise RuntimeError(f"fxfuse matched nothing: {rewritten.report()}")
        row["note"] = "; ".join(m.describe() for m in rewritten.matches)
        if device == "cpu":
            row["note"] += " (CPU path: the fused op's torch reference)"
        return rewritten.module
    module, row["note"] = liger_module(form, d, dtype, device)
    if module is not None and form == "polynorm":
        with torch.no_grad():
            module.weight.copy_(base.weight)
            module.bias.copy_(base.bias.reshape(module.bias.shape))
    elif module is not None:
        with torch.no_grad():
            module.weight.copy_(base.norm.weight if form == "residual_rms" else base.weight)
            if form == "layer":
                module.bias.copy_(base.bias)
    return module


def first_call(fn, device, row: dict, setup_started: float, reference):
    """Run ``fn`` once (the first call compiles, or captures for fxfuse), record the setup time and
    the max |difference| of its output from ``reference`` (the first implementation's: eager's) in
    ``row``; returns the reference for the next implementation."""
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    row["setup_s"] = round(time.perf_counter() - setup_started, 2)
    out = first_tensor(result).float()
    reference = out if reference is None else reference
    row["max_abs_diff_vs_eager"] = float((out - reference).abs().max())
    return reference


def bench_one(form, rows, d, dtype, device, backward, impls, budget_s, peak: bool = True) -> list[dict]:
    torch.manual_seed(0)
    base = FORMS[form](d).to(device=device, dtype=dtype)
    inputs = make_inputs(form, rows, d, dtype, device, grad=backward)
    mode = "fwd+bwd" if backward else "fwd"
    table, fns, reference = {}, {}, None
    for impl in impls:
        row = table[impl] = {"form": form, "mode": mode, "rows": rows, "hidden": d,
                             "dtype": str(dtype).replace("torch.", ""), "device": device, "impl": impl,
                             "ms": None, "note": ""}
        try:
            setup = time.perf_counter()
            module = build(impl, base, form, d, dtype, device, inputs, row)
            if module is None:
                continue
            fn = step_fn(module, inputs, backward)
            reference = first_call(fn, device, row, setup, reference)
            fns[impl] = fn
        except Exception as e:  # one failing implementation must not hide the others' numbers
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc(limit=3)
    times = time_ms(fns, device, budget_s) if fns else {}
    nbytes = moved_bytes(form, rows, d, dtype, backward)
    for impl, ms in times.items():
        row = table[impl]
        row["ms"] = round(ms, 4)
        row["gbps"] = round(nbytes / (ms * 1e-3) / 1e9, 2)
        row["speedup_vs_eager"] = round(times["eager"] / ms, 3) if "eager" in times else None
        row["speedup_vs_inductor"] = round(times["inductor"] / ms, 3) if "inductor" in times else None
    if peak:
        for impl in times:
            table[impl]["peak_mib"] = peak_mib(impl, form, rows, d, dtype, device, backward, fns[impl])
        if table.get("eager", {}).get("peak_mib"):
            for impl in times:
                if table[impl].get("peak_mib") is not None:
                    table[impl]["memory_vs_eager"] = round(table[impl]["peak_mib"] / table["eager"]["peak_mib"], 3)
    return list(table.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_child(spec: dict) -> None:
    """In a fresh process (``--peak-child``): build one implementation, run it twice (the first call
    compiles), then print the resident set's growth during a third call, in MiB."""
    import gc

    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    base = FORMS[spec["form"]](spec["hidden"]).to(device="cpu", dtype=dtype)
    inputs = make_inputs(spec["form"], spec["rows"], spec["hidden"], dtype, "cpu", grad=spec["backward"])
    module = build(spec["impl"], base, spec["form"], spec["hidden"], dtype, "cpu", inputs, {})
    fn = step_fn(module, inputs, spec["backward"])
    fn(), fn()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident set
    result = fn()
    peak = _status_kib("VmHWM") - before
    del result
    print(json.dumps({"peak_mib": peak / 1024}))


def peak_mib(impl, form, rows, d, dtype, device, backward, fn) -> float | None:
    """Peak memory one call adds. CUDA: max_memory_allocated over the call minus what was allocated
    before. CPU: the resident set's growth in a fresh process whose glibc maps every tensor of 64 KiB
    or more on its own (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set and the
    high-water mark is the call's own peak, not what earlier calls left cached."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    import subprocess

    spec = {"impl": impl, "form": form, "rows": rows, "hidden": d, "dtype": str(dtype).replace("torch.", ""),
            "backward": backward}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = [sys.executable, __file__, "--peak-child", json.dumps(spec)]
    if torch.get_num_threads() == 1:
        args += ["--threads", "1"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return round(json.loads(lines[-1])["peak_mib"], 2) if done.returncode == 0 and lines else None


def print_row(row: dict, peak: float | None) -> None:
    if row["ms"] is None:
        print(f"  {row['impl']:<9} -- {row['note']}")
        return
    parts = [f"  {row['impl']:<9} {row['ms']:9.4f} ms  {row['gbps']:8.1f} GB/s"]
    if peak:
        parts.append(f"{100 * row['gbps'] / peak:5.1f}% of copy")
    for key, label in (("speedup_vs_eager", "eager"), ("speedup_vs_inductor", "inductor")):
        if row.get(key):
            parts.append(f"x{row[key]:.2f} vs {label}")
    parts.append(f"diff {row['max_abs_diff_vs_eager']:.2g}")
    if row.get("peak_mib") is not None:
        parts.append(f"peak {row['peak_mib']:.1f} MiB")
    print("  ".join(parts))


def device_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark shares: which device and dtype to measure on."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    return p


def parse_args(argv=None):
    p = device_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=None, help="comma-separated row counts (flattened batch x sequence)")
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes")
    p.add_argument("--forms", default=DEFAULT_FORMS, help=f"subset of {','.join(FORMS)} (default {DEFAULT_FORMS})")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory column (a process per row on CPU)")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--impls", default="eager,inductor,fxfuse,liger", help="subset of eager,inductor,fxfuse,liger")
    p.add_argument("--quick", action="store_true", help="one small size, short timing: a smoke run")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--reuse-compile-cache", action="store_true",
                   help="let Inductor reuse its on-disk caches (setup_s then understates compile time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON path (a .csv is written beside it)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    default_rows = ("4096" if args.quick else "4096,16384") if gpu else ("2048" if args.quick else "1024,4096")
    default_hidden = ("4096" if args.quick else "1024,4096,8192") if gpu else ("1024" if args.quick else "1024,4096")
    args.rows = [int(v) for v in (args.rows or default_rows).split(",")]
    args.hidden = [int(v) for v in (args.hidden or default_hidden).split(",")]
    args.forms = [f for f in args.forms.split(",") if f]
    args.modes = [m for m in args.modes.split(",") if m]
    args.impls = [i for i in args.impls.split(",") if i]
    args.budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    unknown = set(args.forms) - set(FORMS) | set(args.modes) - {"fwd", "fwd+bwd"} \
        | set(args.impls) - {"eager", "inductor", "fxfuse", "liger"}
    if unknown:
        p.error(f"unknown form/mode/impl: {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peak_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        peak_child(json.loads(args.peak_child))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; this machine has none (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.reuse_compile_cache:  # setup_s should show what a first compile costs
        private_inductor_cache("bench_norm_inductor_")
        torch._inductor.config.fx_graph_cache = False
    started = time.perf_counter()
    peak = copy_gbps(max(args.rows), max(args.hidden), args.dtype, args.device, args.budget)
    print(f"{args.device} {args.dtype}: copy bandwidth {peak:.1f} GB/s (the roofline column)")
    results = []
    for form in args.forms:
        for mode in args.modes:
            for rows in args.rows:
                for d in args.hidden:
                    print(f"{form} {mode} {rows}x{d}")
                    for row in bench_one(form, rows, d, args.dtype, args.device, mode == "fwd+bwd", args.impls,
                                         args.budget, peak=not args.no_peak):
                        row["pct_of_copy"] = round(100 * row["gbps"] / peak, 1) if row.get("gbps") else None
                        print_row(row, peak)
                        results.append(row)
    out = Path(args.out) if args.out else RESULTS / f"norm_{machine_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_norm.py", "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_info(args.device), "copy_gbps": round(peak, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_memory": "CUDA: max_memory_allocated during one call minus memory allocated before it; CPU: the "
                       "resident set's growth during one call, in a fresh process with MALLOC_MMAP_THRESHOLD_=65536",
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    columns = ["form", "mode", "rows", "hidden", "dtype", "device", "impl", "ms", "gbps", "pct_of_copy",
               "speedup_vs_eager", "speedup_vs_inductor", "peak_mib", "memory_vs_eager", "max_abs_diff_vs_eager",
               "setup_s", "note"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {out} and {out.with_suffix('.csv')} in {payload['seconds']}s")
    failed = [r for r in results if r["ms"] is None and r["note"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
