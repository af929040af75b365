"""One short GPU run: every measurement fxfuse needs from a GPU window, in priority order, each
part under its own time budget, so that what finishes is committed and what does not is named.

    python benchmarks/gpu_run.py              # on the GPU machine (benchmarks/gpu_run.sh installs first)
    python benchmarks/gpu_run.py --dry        # any machine: every part at toy sizes on the CPU

Parts (seconds of budget on a GPU; the whole run stays under 8 minutes with the install):
  static     fxfuse's sm_90 static check of the golden kernels, for comparison with what runs
  tests      pytest -m gpu: the kernels compiled for CUDA against float64 references
  attn_main  plain causal D 128 at L 4k, forward and forward+backward: fxfuse vs SDPA flash, cuDNN, Flex
  attn_vars  sliding window, ALiBi, softcap, GQA, padding mask at L 4k, D 128, fwd and fwd+bwd vs Flex
  attn_lens  causal forward at L 1k and 16k, D 64 and 128
  decode     Lq = 1 over Lk 1k, 8k, 32k, D 128
  norm       RMSNorm, LayerNorm, residual + RMSNorm vs Liger and Inductor
  train      one Llama-style training step vs Inductor
Each writes benchmarks/results/<part>_<gpu>.json (``--out-dir`` elsewhere); then a markdown table
of fxfuse's ratios goes to results/gpu_run_<gpu>.md and the parts that did not finish are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATTN = [sys.executable, str(HERE / "bench_attention.py")]
GPU_IMPLS = "sdpa,sdpa_flash,sdpa_cudnn,flex,fxfuse"


def parts(dry: bool) -> list[tuple[str, int, list[str]]]:
    """(name, budget seconds, command) in priority order; ``dry``: toy sizes on the CPU."""
    if dry:
        tiny = ["--device", "cpu", "--threads", "1", "--budget", "0.01", "--seq-lens", "64", "--head-dims", "16",
                "--heads", "4", "--impls", "eager,sdpa,sdpa_flash,flex,fxfuse"]
        return [
            ("static", 600, [sys.executable, "-m", "fxfuse.cli", "kernels", str(ROOT / "tests/codegen/golden"),
                             "--target", "sm_90", "--json"]),
            ("tests", 120, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            str(ROOT / "tests/test_gpu.py")]),
            ("attn_main", 120, [*ATTN, *tiny, "--variants", "causal"]),
            ("attn_vars", 120, [*ATTN, *tiny, "--variants", "sliding_window,alibi,softcap,gqa,padding_mask"]),
            ("decode", 60, [*ATTN, *tiny, "--variants", "decode", "--modes", "fwd"]),
            ("norm", 120, [sys.executable, str(HERE / "bench_norm.py"), "--device", "cpu", "--threads", "1",
                           "--budget", "0.01", "--rows", "64", "--hidden", "32", "--impls", "eager,fxfuse,liger"]),
            ("train", 300, [sys.executable, str(HERE / "bench_train_step.py"), "--device", "cpu", "--tiny",
                            "--impls", "eager,fxfuse"]),
        ]
    gpu = ["--device", "cuda", "--budget", "0.3", "--impls", GPU_IMPLS, "--batch", "2", "--heads", "16"]
    return [
        ("tests", 75, [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider",
                       str(ROOT / "tests/test_gpu.py")]),
        ("attn_main", 90, [*ATTN, *gpu, "--variants", "causal", "--seq-lens", "4096", "--head-dims", "128"]),
        ("attn_vars", 110, [*ATTN, *gpu, "--variants", "sliding_window,alibi,softcap,gqa,padding_mask",
                            "--seq-lens", "4096", "--head-dims", "128"]),
        ("attn_lens", 60, [*ATTN, *gpu, "--variants", "causal", "--modes", "fwd", "--seq-lens", "1024,16384",
                           "--head-dims", "64,128", "--impls", "sdpa_flash,fxfuse"]),
        ("decode", 30, [*ATTN, *gpu, "--variants", "decode", "--modes", "fwd", "--seq-lens", "1024,8192,32768",
                        "--head-dims", "128", "--impls", "sdpa,sdpa_flash,fxfuse"]),
        ("norm", 45, [sys.executable, str(HERE / "bench_norm.py"), "--device", "cuda", "--quick",
                      "--impls", "inductor,fxfuse,liger"]),
        ("train", 60, [sys.executable, str(HERE / "bench_train_step.py"), "--device", "cuda",
                       "--impls", "inductor,fxfuse", "--steps", "5"]),
    ]


def _out_flag(name: str, command: list[str], out_dir: Path, slug: str) -> list[str]:
    if name in ("tests", "static"):
        return command
    return [*command, "--out", str(out_dir / f"{name}_{slug}.json")]


def run_parts(dry: bool, out_dir: Path, slug: str, only: set[str] | None = None) -> dict[str, str]:
    """Run each part under its budget; returns part -> "ok", "failed (rc N)" or "timed out"."""
    status = {}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if dry:
        env["TRITON_INTERPRET"] = "0"  # the CPU paths, as the benchmarks measure them
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, budget, command in parts(dry):
        if only and name not in only:
            continue
        command = _out_flag(name, command, out_dir, slug)
        print(f"== {name} (budget {budget}s): {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        log = out_dir / f"{name}_{slug}.log"
        with open(log, "w") as f:
            try:
                done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=budget, cwd=ROOT)
                status[name] = "ok" if done.returncode == 0 else f"failed (rc {done.returncode}, see {log.name})"
            except subprocess.TimeoutExpired:
                status[name] = f"timed out after {budget}s (partial log {log.name})"
        if name == "static" and log.exists():  # its JSON lines are the result
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            (out_dir / f"static_{slug}.json").write_text(json.dumps({"target": "sm_90", "results": rows}, indent=1))
        print(f"   {status[name]} in {time.perf_counter() - start:.0f}s", flush=True)
    return status


def _ratio(row: dict, other: str) -> str:
    value = row.get(f"speedup_vs_{other}")
    return f"{value:.2f}x" if value else "-"


def markdown(out_dir: Path, slug: str, status: dict[str, str]) -> str:
    """fxfuse's rows of every result file, with its ratios to each baseline measured in the same run."""
    lines = [f"# GPU run on {slug}", "", "| part | status |", "| --- | --- |"]
    lines += [f"| {name} | {state} |" for name, state in status.items()]
    header = ("| part | variant | mode | L | D | fxfuse ms | TFLOP/s | vs sdpa | vs sdpa flash | vs cuDNN | vs flex |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines += ["", "## Attention", "", *header]
    for name in ("attn_main", "attn_vars", "attn_lens", "decode"):
        path = out_dir / f"{name}_{slug}.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["results"]:
            if row["impl"] == "fxfuse" and row.get("ms"):
                lines.append(f"| {name} | {row['variant']} | {row['mode']} | {row['seq_len']} | {row['head_dim']} | "
                             f"{row['ms']} | {row.get('tflops', '-')} | {_ratio(row, 'sdpa')} | "
                             f"{_ratio(row, 'sdpa_flash')} | {_ratio(row, 'sdpa_cudnn')} | {_ratio(row, 'flex')} |")
    for name, title, others in (("norm", "Norms", ("liger", "inductor")), ("train", "Training step", ("inductor",))):
        path = out_dir / f"{name}_{slug}.json"
        if not path.exists():
            continue
        lines += ["", f"## {title}", "", "| row | fxfuse ms | " + " | ".join(f"vs {o}" for o in others) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in others) + " |"]
        for row in json.loads(path.read_text())["results"]:
            if row.get("impl") == "fxfuse" and row.get("ms"):
                what = " ".join(str(row[k]) for k in ("form", "mode", "rows", "hidden") if k in row) or "step"
                lines.append(f"| {what} | {row['ms']} | " + " | ".join(_ratio(row, o) for o in others) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="every part at toy sizes on the CPU (checks the script)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts")
    args = p.parse_args(argv)
    if args.dry:
        slug = "dry"
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_run.py needs a CUDA GPU (use --dry to check the script on a CPU)")
        sys.path.insert(0, str(HERE))
        from bench_norm import machine_slug

        slug = machine_slug("cuda")
    out_dir = Path(args.out_dir)
    started = time.perf_counter()
    status = run_parts(args.dry, out_dir, slug, set(args.parts.split(",")) if args.parts else None)
    table = out_dir / f"gpu_run_{slug}.md"
    table.write_text(markdown(out_dir, slug, status))
    print(f"wrote {table} ({time.perf_counter() - started:.0f}s)")
    unfinished = {k: v for k, v in status.items() if v != "ok"}
    for name, state in unfinished.items():
        print(f"NOT FINISHED: {name}: {state}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    raise SystemExit(main())
