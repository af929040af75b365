"""Sweep fxfuse over Hugging Face ``transformers`` families built from tiny configs with random
weights (no downloads; benchmarks/model_sweep_families.py), on the CPU, looking for crashes and
wrong numbers. Per family and attention implementation (eager, and sdpa where the family has it):

  rewrite   fxfuse.rewrite(model, inputs) in float32: outputs vs eager and a float64 eager copy
  train     a training step through the rewritten module: parameter gradients vs eager's
  compile_eager  torch.compile(model, backend="fxfuse", options={"inner": "eager"}) at lengths 8,
            12, 16 with the length dims marked dynamic from the first call, outputs vs eager (grad
            enabled: AOTAutograd's joint graph); one backward at the last, gradients vs eager's
  compile   the default composed backend (inner Inductor) at the same lengths, unmarked: Dynamo
            compiles static at 8 and goes dynamic at 12 (on COMPILE_FAMILIES unless --compile-all/--only)
  bf16      fxfuse.rewrite in bfloat16: outputs vs eager bfloat16 and the float64 copy

Each comparison is the tolerance test of tests/tolerances.py: |out - ref64| <= atol + rtol |ref64|
+ 2 |eager - ref64|; the row's ``ratio`` is the worst |out - ref64| / that bound (<= 1 passes).
A crash records the exception and the innermost fxfuse frame; with --triage a crash or a mismatch
reruns the same model under torch.compile(backend="aot_eager") and backend="inductor": when the one
the mode stands on (Inductor for compile) fails too, it is torch's, not ours (the row's ``owner``).

    python benchmarks/model_sweep.py                         # everything (see benchmarks/README.md)
    python benchmarks/model_sweep.py --only llama,bert --modes rewrite,train --attn eager

Writes benchmarks/results/model_sweep_cpu.json and .md (the default --out).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import fxfuse  # noqa: E402
from model_sweep_families import FAMILIES, build_model, float_outputs, make_inputs  # noqa: E402
from model_sweep_report import write_markdown  # noqa: E402
from tests.tolerances import tolerance  # noqa: E402

MODES = ("rewrite", "train", "compile_eager", "compile", "bf16")
# Inductor's C++ compiles take 30-170 s per tiny model on 2 cores, so by default the composed
# backend with inner Inductor runs on these families (one per kind of attention site); every
# family runs compile_eager (the same Dynamo graphs, capture, passes and AOTAutograd, with the
# rest run eagerly). --compile-all runs Inductor on all.
COMPILE_FAMILIES = ("llama", "gemma2", "qwen3_moe", "gpt2", "bloom", "mpt", "deepseek_v3", "bert", "t5", "vit")
LENGTHS = (8, 12, 16)
FXFUSE_DIR = str(ROOT / "fxfuse")


def worst_ratio(actual, eager, reference, whole: bool = False) -> tuple[float, float]:
    """(worst error / bound, worst absolute error) over matching tensor lists; inf on a mismatch of
    structure or a non-finite value where eager is finite.

    float32: elementwise, |out - ref64| <= atol + rtol |ref64| + 2 |eager - ref64|. 16-bit: over each
    whole tensor, ||out - ref64|| <= 2 ||eager - ref64|| + rtol ||ref64|| + atol sqrt(numel)
    (tests/tolerances.py's assert_close_as_a_whole, with the table's atol per element): one bf16 rounding that lands the other way in a layer moves later
    elements by an ulp each, so an elementwise bound there is luck at these sizes, for eager too.
    ``whole``: the whole-tensor test in float32 too, for gradients (an embedding's or a norm weight's
    sums many rows in another order than eager)."""
    if len(actual) != len(eager) or len(eager) != len(reference):
        return float("inf"), float("inf")
    ratio, worst = 0.0, 0.0
    for a, e, r in zip(actual, eager, reference):
        if a is None or e is None:
            if (a is None) != (e is None):
                return float("inf"), float("inf")
            continue
        if a.shape != e.shape:
            return float("inf"), float("inf")
        low = a.dtype in (torch.bfloat16, torch.float16)
        rtol, atol = tolerance(a.dtype if a.dtype != torch.float64 else torch.float32)
        r, e, a = r.double(), e.double(), a.double()
        finite = torch.isfinite(r) & torch.isfinite(e)
        if not finite.any():
            continue
        err = (a - r).abs()
        if not torch.isfinite(err[finite]).all():
            return float("inf"), float("inf")
        worst = max(worst, err[finite].max().item())
        if not (low or whole):
            bound = atol + rtol * r.abs() + 2 * (e - r).abs()
            ratio = max(ratio, (err[finite] / bound[finite]).max().item())
        else:
            # atol per element, summed as the norm sums (a bias whose gradient is ~0 has only that)
            bound = 2 * (e - r)[finite].norm() + rtol * r[finite].norm() + atol * finite.sum().sqrt()
            ratio = max(ratio, (err[finite].norm() / bound.clamp_min(1e-30)).item())
    return ratio, worst


def crash_info(e: BaseException) -> dict:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(FXFUSE_DIR)]
    where = lambda f: f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" if f else ""  # noqa: E731
    return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            "fxfuse_frame": where(ours[-1]) if ours else "", "innermost_frame": where(frames[-1]) if frames else ""}


def summarize_report(res) -> dict:
    kinds: dict[str, int] = {}
    for m in res.matches:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    declined = sorted({f"{m.kind}: {m.reason}"[:240] for m in res.misses})
    return {"matches": kinds, "declined": declined[:4], "declined_total": len(res.misses)}


def _weights(outs, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def _loss(outs, weights):
    return sum((o.double() * w).sum() for o, w in zip(outs, weights))


def _grads(model, outs, weights):
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(_loss(outs, weights), params, allow_unused=True))


def _inputs(fam, model, length, dtype=torch.float32):
    """The family's inputs, floating ones (pixels, audio features) in ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_inputs(fam, model, length).items()}


def run_rewrite(fam, model, ref64, dtype=torch.float32):
    m = copy.deepcopy(model).to(dtype)
    kwargs = _inputs(fam, m, LENGTHS[0], dtype)
    with torch.no_grad():
        eager = float_outputs(m(**kwargs))
        expected = float_outputs(ref64(**_inputs(fam, m, LENGTHS[0], torch.float64)))
        res = fxfuse.rewrite(m, (), example_kwargs=kwargs)
        got = float_outputs(res.module(**kwargs))
    ratio, err = worst_ratio(got, eager, expected)
    return {**summarize_report(res), "ratio": ratio, "max_err": err}


def run_train(fam, model, ref64):
    m = copy.deepcopy(model).train()
    ref = copy.deepcopy(ref64).train()
    kwargs = _inputs(fam, m, LENGTHS[0])
    eager_out = float_outputs(m(**kwargs))
    w = _weights(eager_out)
    eager = _grads(m, eager_out, w)
    expected = _grads(ref, float_outputs(ref(**_inputs(fam, m, LENGTHS[0], torch.float64))), w)
    res = fxfuse.rewrite(m, (), example_kwargs=kwargs)
    got = _grads(m, float_outputs(res.module(**kwargs)), w)
    ratio, err = worst_ratio(got, eager, expected, whole=True)
    return {**summarize_report(res), "ratio": ratio, "max_err": err,
            "elementwise_ratio": worst_ratio(got, eager, expected)[0]}


def run_compile(fam, model, ref64, backend="fxfuse", options=None, mark_dynamic=False):
    """Outputs at each of LENGTHS, one backward at the last. ``mark_dynamic``: the length dims are
    dynamic from the first call (one compile; what Dynamo's automatic dynamic arrives at on the second
    length, without the static compile first)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = copy.deepcopy(model)
    # fxfuse as a Backend object (what backend="fxfuse" builds per graph) keeps each graph's report:
    # a row within tolerance says what fxfuse fused in it, not only that the numbers held
    fx_backend = fxfuse.Backend(**(options or {})) if backend == "fxfuse" else None
    compiled = torch.compile(m, backend=fx_backend or backend, options=None if fx_backend else options)
    ratio, err, per_length = 0.0, 0.0, {}
    for length in LENGTHS:
        kwargs = _inputs(fam, m, length)
        if mark_dynamic:
            for k, v in kwargs.items():
                if k.endswith("input_ids") or k == "attention_mask":
                    torch._dynamo.maybe_mark_dynamic(v, 1)
        got_out = float_outputs(compiled(**kwargs))
        eager_out = float_outputs(m(**kwargs))
        with torch.no_grad():
            expected = float_outputs(ref64(**_inputs(fam, m, length, torch.float64)))
        r, e = worst_ratio([o.detach() for o in got_out], [o.detach() for o in eager_out], expected)
        per_length[length] = r
        ratio, err = max(ratio, r), max(err, e)
    w = _weights(eager_out)
    got_g, eager_g = _grads(m, got_out, w), _grads(m, eager_out, w)
    ref = copy.deepcopy(ref64)
    expected_g = _grads(ref, float_outputs(ref(**_inputs(fam, m, LENGTHS[-1], torch.float64))), w)
    rg, eg = worst_ratio(got_g, eager_g, expected_g, whole=True)
    fused = {}
    if fx_backend is not None:
        per_graph = [{k: sum(1 for m in r.matches if m.kind == k) for k in sorted({m.kind for m in r.matches})}
                     for r in fx_backend.reports]
        declined = sorted({f"{m.kind}: {m.reason}"[:240] for m in fx_backend.misses})
        # the last graph is the one the later lengths ran (dynamic after the static first)
        fused = {"matches": per_graph[-1] if per_graph else {}, "matches_per_graph": per_graph,
                 "declined": declined[:4], "declined_total": len(fx_backend.misses)}
    return {"ratio": max(ratio, rg), "max_err": max(err, eg), "per_length": per_length, "grad_ratio": rg,
            "grad_elementwise_ratio": worst_ratio(got_g, eager_g, expected_g)[0],
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"], **fused}


def triage(fam, model, ref64, mode) -> dict:
    """The same model through torch alone: aot_eager and Inductor (for compile) or eager make_fx
    capture (for the others); a crash there is torch's."""
    out = {}
    for backend in ("aot_eager", "inductor") if mode == "compile" else ("aot_eager",):
        try:
            r = run_compile(fam, model, ref64, backend=backend, mark_dynamic=mode == "compile_eager")
            out[backend] = f"{'ok' if r['ratio'] <= 1 else 'MISMATCH'} (ratio {r['ratio']:.3g})"
        except Exception as e:  # noqa: BLE001 (a crash is the result)
            out[backend] = crash_info(e)["error"]
    return out


def owner(triaged: dict, mode: str) -> str:
    """Whose a crash or mismatch is: torch's when torch alone fails the same model too, on the
    backend the mode stands on (Inductor for the composed backend, aot_eager for the others)."""
    ground = triaged.get("inductor" if mode == "compile" else "aot_eager", "")
    return "fxfuse" if ground.startswith("ok") else "torch"


def sweep_family(fam: str, attn: str, modes, do_triage: bool) -> list[dict]:
    rows = []
    base = {"family": fam, "attn": attn}
    try:
        torch.manual_seed(0)
        model = build_model(fam, attn)
        ref64 = copy.deepcopy(model).double()
        if getattr(ref64.config, "_experts_implementation", None) not in (None, "eager"):
            ref64.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
        with torch.no_grad():
            model(**make_inputs(fam, model, LENGTHS[0]))
    except Exception as e:  # noqa: BLE001
        return [{**base, "mode": "build", "status": "build failed", **crash_info(e)}]
    try:
        with torch.no_grad():
            ref64(**_inputs(fam, model, LENGTHS[0], torch.float64))
    except Exception as e:  # noqa: BLE001 (transformers' own code has no float64 path here)
        return [{**base, "mode": "build", "status": "no float64 reference", **crash_info(e)}]
    runners = {"rewrite": lambda: run_rewrite(fam, model, ref64), "train": lambda: run_train(fam, model, ref64),
               "compile": lambda: run_compile(fam, model, ref64),
               "compile_eager": lambda: run_compile(fam, model, ref64, options={"inner": "eager"}, mark_dynamic=True),
               "bf16": lambda: run_rewrite(fam, model, ref64, torch.bfloat16)}
    for mode in modes:
        row = {**base, "mode": mode}
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row.update(runners[mode]())
            fx = sorted({str(w.message).splitlines()[0][:200] for w in caught if "fxfuse" in str(w.message)})
            if fx:
                row["warnings"] = fx[:3]
            row["status"] = "ok" if row["ratio"] <= 1 else "MISMATCH"
            if row["status"] == "MISMATCH" and do_triage:
                row["triage"] = triage(fam, model, ref64, mode)
                row["owner"] = owner(row["triage"], mode)
        except fxfuse.CaptureError as e:  # a refusal that says what to do (not a crash), e.g. training
            row.update(status="refused", **crash_info(e))  # through a custom autograd.Function
        except Exception as e:  # noqa: BLE001
            row.update(status="CRASH", **crash_info(e))
            traceback.print_exc()
            if do_triage:
                row["triage"] = triage(fam, model, ref64, mode)
                row["owner"] = owner(row["triage"], mode)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in row.items() if k not in ("declined",)}, default=str), flush=True)
        rows.append(row)
    return rows


def supports_sdpa(fam: str) -> bool:
    try:
        build_model(fam, "sdpa")
        return True
    except Exception:  # noqa: BLE001 (the family has no sdpa path: ValueError from transformers)
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types (default: every family in the table)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--attn", default="eager,sdpa", help="attention implementations to run")
    ap.add_argument("--sdpa-modes", default="rewrite,train,bf16",
                    help="modes run with sdpa (compile runs with eager only by default, for time)")
    ap.add_argument("--compile-all", action="store_true", help="inner Inductor on every family, not only "
                    + ",".join(COMPILE_FAMILIES))
    ap.add_argument("--triage", action="store_true", help="rerun each crash through torch alone")
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of the families run in an existing --out JSON (meta records both runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_sweep_cpu"))
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="torch CPU threads (1 on a machine shared with other work)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    families = args.only.split(",") if args.only else list(FAMILIES)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [f for f in families if f not in FAMILIES] + [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown family or mode: {unknown}; families: {', '.join(FAMILIES)}; modes: {MODES}")
    started, rows = time.perf_counter(), []
    for i, fam in enumerate(families):
        for attn in args.attn.split(","):
            if attn == "sdpa" and not supports_sdpa(fam):
                rows.append({"family": fam, "attn": "sdpa", "mode": "-", "status": "no sdpa"})
                continue
            fam_modes = modes if attn == "eager" else [m for m in modes if m in args.sdpa_modes.split(",")]
            if not args.compile_all and fam not in COMPILE_FAMILIES and not args.only:
                fam_modes = [m for m in fam_modes if m != "compile"]
            rows.extend(sweep_family(fam, attn, fam_modes, args.triage))
        # Written after each family: a sweep stopped early leaves what it measured (meta says how far).
        write_results(Path(args.out), args, families[:i + 1], families, rows, started)
    print(Path(args.out).with_suffix(".md").read_text().split("## Every")[0])


_BEFORE_UPDATE: dict[str, dict] = {}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with the rows ``new`` re-measured replaced: the same (family, attn, mode), and a
    family's build or no-sdpa row once it has built (or every old row of a (family, attn) that now
    fails to build). The rows of modes not run again stay (--modes compile keeps compile_eager's)."""
    measured = {(r["family"], r["attn"], r["mode"]) for r in new}
    pairs = {(r["family"], r["attn"]) for r in new}
    failed = {(r["family"], r["attn"]) for r in new if r["mode"] in ("build", "-")}

    def stale(r):
        pair = (r["family"], r["attn"])
        return (*pair, r["mode"]) in measured or pair in failed or (pair in pairs and r["mode"] in ("build", "-"))
    order = {f: i for i, f in enumerate(FAMILIES)}
    attns, modes = {"eager": 0, "sdpa": 1}, {m: i for i, m in enumerate(("build", "-") + MODES)}
    return sorted([r for r in old if not stale(r)] + new, key=lambda r: (
        order.get(r["family"], 1e9), attns.get(r["attn"], 9), modes.get(r["mode"], 99)))


def write_results(out: Path, args, done: list[str], families: list[str], rows: list[dict], started: float) -> None:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seconds": round(time.perf_counter() - started, 1),
            "lengths": LENGTHS, "argv": sys.argv[1:], "families_done": len(done), "families_asked": len(families)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and (str(out) in _BEFORE_UPDATE or out.with_suffix(".json").exists()):
        # the file as it was before this run (written again after each family)
        old = _BEFORE_UPDATE.setdefault(str(out), json.loads(out.with_suffix(".json").read_text()))
        ran_modes = sorted({r["mode"] for r in rows} - {"build", "-"})
        rows = merge_rows(old["rows"], rows)
        meta = {**old["meta"], "updates": old["meta"].get("updates", []) + [
            {"families": sorted(set(done)), "modes": ran_modes,
             "commit": commit, "seconds": meta["seconds"], "argv": meta["argv"]}]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(write_markdown(meta, rows))

if __name__ == "__main__":
    main()
