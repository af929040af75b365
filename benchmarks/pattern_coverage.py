"""Which attention sites does each optimizer fuse: fxfuse.rewrite vs Inductor's fuse_attention.

Every attention style fxfuse's tests exercise (tests/attention_styles.py), the near-misses there
(which must not be fused), Inductor's own patterns re-written as modules (tests/inductor_patterns.py;
in fp32, the cast patterns in bf16 too, three of them on grouped-query keys and values, the dropout
patterns in training too) and the eager attention
of four Hugging Face transformers models (GPT-2, Llama, BERT, T5 from tiny configs) go through
  (a) fxfuse.rewrite: a site is fused when the report lists an attention match for it;
  (b) torch.compile with Inductor on CPU: a site is fused when Inductor's pattern pass replaced it
      by scaled_dot_product_attention, counted by torch._dynamo.utils.counters["inductor"]
      ["fuse_attention"] (incremented once per replacement).
Inductor's FX-graph and AOT-autograd caches are turned off, because a graph served from them skips
the pattern pass and would count 0; before measuring, the script checks that the counter reads 1
on Inductor's own first pattern and 0 on a function without attention, and stops if not.

    python benchmarks/pattern_coverage.py            # everything: ~2 minutes on a 2-core CPU
    python benchmarks/pattern_coverage.py --only DivByScalar,gpt2 --out /tmp/cov.json

Writes benchmarks/results/pattern_coverage_cpu.json and .md (the table, with totals).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; the catalogues live in tests/

import torch  # noqa: E402
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fxfuse  # noqa: E402
from tests import attention_styles, inductor_patterns  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Attention layers in each tiny model (T5: 2 encoder self, 2 decoder self, 2 decoder cross).
MODEL_SITES = {"gpt2": 2, "llama": 2, "bert": 2, "t5": 6}


# ---- the cases -------------------------------------------------------------------------------------

def _module_case(group, cls, dtype, mode, expect):
    def make():
        model = cls().to(dtype)
        model.train(mode == "train")
        inputs = model.inputs(dtype)
        if mode == "train":  # q, k and v need gradients; masks and biases (inputs 4 on) are data
            inputs = [t.requires_grad_() if i < 3 else t for i, t in enumerate(inputs)]
        return model, tuple(inputs), {}
    sfdp = ",".join(map(str, getattr(cls, "SFDP", ())))
    return {"group": group, "style": cls.__name__, "sfdp": sfdp, "dtype": str(dtype).replace("torch.", ""),
            "mode": mode, "sites": expect, "make": make}


def _model_case(name):
    def make():
        from tests.models.test_transformers_norms import BUILDERS, VOCAB
        torch.manual_seed(0)
        model = BUILDERS[name]()[0].eval()
        ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # GPT-2 gets left padding; see tests/passes/test_attention_models.py for the others
        kwargs = {"t5": {"decoder_input_ids": ids}, "gpt2": {"attention_mask": mask},
                  "llama": {"attention_mask": torch.ones_like(ids)}, "bert": {}}[name]
        return model, (ids,), kwargs
    return {"group": "transformers", "style": name, "sfdp": "", "dtype": "float32", "mode": "eval",
            "sites": MODEL_SITES[name], "make": make}


def cases() -> list[dict]:
    out = [_module_case("fxfuse styles", c, torch.float32, "eval", 1) for c in attention_styles.STYLES]
    out += [_module_case("near misses (must not fuse)", c, torch.float32, "eval", 0)
            for c in attention_styles.NEAR_MISSES]
    for c in inductor_patterns.PATTERNS:
        out.append(_module_case("Inductor sfdp patterns", c, torch.float32, "eval", 1))
        if c.CASTS:
            out.append(_module_case("Inductor sfdp patterns", c, torch.bfloat16, "eval", 1))
    for c in inductor_patterns.GQA_VARIANTS:
        out.append(_module_case("sfdp on repeated k/v (GQA)", c, torch.float32, "eval", 1))
        if c.CASTS:
            out.append(_module_case("sfdp on repeated k/v (GQA)", c, torch.bfloat16, "eval", 1))
    out += [_module_case("sfdp dropout in training", c, torch.float32, "train", 1)
            for c in inductor_patterns.PATTERNS if c.DROPOUT]
    out += [_model_case(name) for name in MODEL_SITES]
    return out


# ---- the two measurements ----------------------------------------------------------------------------

def run_fxfuse(case) -> dict:
    model, args, kwargs = case["make"]()
    res = fxfuse.rewrite(model, args, example_kwargs=kwargs)
    matches = [m for m in res.matches if m.kind == "attention"]
    misses = [m for m in res.misses if m.kind == "attention"]
    note = "; ".join(sorted({m.reason for m in misses})) if misses else ""
    return {"fused": len(matches), "note": note}


def run_inductor(case) -> dict:
    model, args, kwargs = case["make"]()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    with torch.set_grad_enabled(case["mode"] == "train"):
        compiled(*args, **kwargs)
    return {"fused": int(counters["inductor"]["fuse_attention"]), "note": ""}


def calibrate() -> dict:
    """The counter reads 1 on Inductor's first pattern and 0 without attention, or nothing is measured."""
    def no_attention(x):
        return (x.sin() @ x.transpose(-2, -1)).relu()

    first = run_inductor(_module_case("", inductor_patterns.DivByScalar, torch.float32, "eval", 1))["fused"]
    torch._dynamo.reset()
    counters.clear()
    torch.compile(no_attention, backend="inductor")(torch.randn(2, 4, 4))
    none = int(counters["inductor"]["fuse_attention"])
    if (first, none) != (1, 0):
        raise SystemExit(f"Inductor's fuse_attention counter is not measuring (pattern 1: {first}, none: {none}); "
                         "the table would be meaningless")
    return {"sfdp_pattern_1": first, "no_attention": none}


def measure(case) -> dict:
    row = {k: v for k, v in case.items() if k != "make"}
    for impl, fn in (("fxfuse", run_fxfuse), ("inductor", run_inductor)):
        started = time.perf_counter()
        try:
            got = fn(case)
        except Exception as e:  # a failure is a result too: it says which tool could not take the case
            got = {"fused": 0, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            traceback.print_exc()
        row[f"{impl}_fused"] = got["fused"]
        row[f"{impl}_note"] = got["note"]
        row[f"{impl}_s"] = round(time.perf_counter() - started, 2)
    return row


# ---- the tables ---------------------------------------------------------------------------------------

def totals(rows: list[dict]) -> dict:
    by_group = {}
    for r in rows:
        t = by_group.setdefault(r["group"], {"cases": 0, "sites": 0, "fxfuse": 0, "inductor": 0,
                                             "fxfuse_all": 0, "inductor_all": 0})
        t["cases"] += 1
        t["sites"] += r["sites"]
        t["fxfuse"] += min(r["fxfuse_fused"], r["sites"])
        t["inductor"] += min(r["inductor_fused"], r["sites"])
        t["fxfuse_all"] += r["fxfuse_fused"]  # near misses: anything here is a wrong fusion
        t["inductor_all"] += r["inductor_fused"]
    return by_group


def markdown(payload: dict) -> str:
    rows, tot = payload["results"], payload["totals"]
    lines = ["# Attention pattern coverage: fxfuse vs Inductor's fuse_attention (CPU)", "",
             f"torch {payload['machine']['torch']}, fxfuse commit {payload['source']['commit']}, "
             f"{payload['seconds']} s. Produced by `benchmarks/pattern_coverage.py`; see docs/comparison.md.", "",
             "A site counts as fused by fxfuse when `fxfuse.rewrite` reports an attention match for it, and by "
             "Inductor when `counters['inductor']['fuse_attention']` counts its replacement by "
             "`scaled_dot_product_attention` under `torch.compile` (caches off; calibrated: "
             f"{payload['inductor_calibration']}).", "",
             "## Totals", "", "| group | cases | attention sites | fxfuse fused | Inductor fused |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for group, t in tot.items():
        if t["sites"]:
            lines.append(f"| {group} | {t['cases']} | {t['sites']} | {t['fxfuse']} | {t['inductor']} |")
        else:
            lines.append(f"| {group} | {t['cases']} | 0 (not attention) | {t['fxfuse_all']} fused wrongly | "
                         f"{t['inductor_all']} fused wrongly |")
    sites = sum(t["sites"] for t in tot.values())
    lines.append(f"| **all attention sites** | | **{sites}** | **{sum(t['fxfuse'] for t in tot.values())}** | "
                 f"**{sum(t['inductor'] for t in tot.values())}** |")
    lines += ["", "## Every case", "",
              "| group | style | sfdp | dtype | mode | sites | fxfuse | Inductor | fxfuse's reason when not fused |",
              "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        def cell(impl):
            n = r[f"{impl}_fused"]
            mark = "yes" if r["sites"] and n >= r["sites"] else ("no" if n == 0 else f"{n}/{r['sites']}")
            if not r["sites"]:
                mark = "no (right)" if n == 0 else f"**{n} (wrong)**"
            return mark if not r[f"{impl}_note"].startswith("failed") else "failed"
        reason = r["fxfuse_note"].replace("|", "\\|") if r["fxfuse_fused"] < r["sites"] or not r["sites"] else ""
        lines.append(f"| {r['group']} | {r['style']} | {r['sfdp']} | {r['dtype']} | {r['mode']} | {r['sites']} | "
                     f"{cell('fxfuse')} | {cell('inductor')} | {reason} |")
    return "\n".join(lines) + "\n"


def source_state() -> dict:
    def git(*cmd):
        try:
            done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout if done.returncode == 0 else ""
    changed = git("status", "--porcelain", "--", "fxfuse")
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "fxfuse_files_changed": [line[3:] for line in changed.splitlines() if line.strip()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated style/model names (default: every case)")
    p.add_argument("--out", default=str(RESULTS / "pattern_coverage_cpu.json"), help="JSON path (.md beside it)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # A graph served from a cache skips the pattern pass (and the counter); the C++ kernel cache
    # stays, in a private directory, so repeated kernels compile once per run.
    cache = tempfile.mkdtemp(prefix="pattern_coverage_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.compile_threads = 1

    started = time.perf_counter()
    todo = cases()
    if args.only:
        wanted = set(args.only.split(","))
        todo = [c for c in todo if c["style"] in wanted]
        unknown = wanted - {c["style"] for c in todo}
        if unknown:
            p.error(f"unknown style or model: {sorted(unknown)}")
    try:
        calibration = calibrate()
        rows = []
        for case in todo:
            rows.append(measure(case))
            r = rows[-1]
            print(f"{r['group'][:24]:24} {r['style']:30} {r['dtype']:8} {r['mode']:5} sites={r['sites']} "
                  f"fxfuse={r['fxfuse_fused']} inductor={r['inductor_fused']} ({r['fxfuse_s']}s, {r['inductor_s']}s)",
                  flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    payload = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count()},
               "source": source_state(), "command": sys.argv, "inductor_calibration": calibration,
               "seconds": round(time.perf_counter() - started, 1), "totals": totals(rows), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload).split("## Every case")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
