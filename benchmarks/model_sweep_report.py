"""The Markdown table of benchmarks/model_sweep.py's rows, with totals."""
from __future__ import annotations

NORM_KINDS = ("rms_norm", "layer_norm")


def _cell(row: dict) -> str:
    status = row.get("status", "")
    if status == "ok":
        return f"ok {row['ratio']:.2f}"
    if status == "MISMATCH":
        return f"**MISMATCH {row['ratio']:.3g}**" + (f" ({row['owner']})" if row.get("owner") else "")
    if status == "refused":
        return "refused"
    if status == "CRASH":
        owner = row.get("owner", "fxfuse?")
        return f"**CRASH** ({owner})"
    return status


def write_markdown(meta: dict, rows: list[dict]) -> str:
    modes = [m for m in ("rewrite", "train", "compile_eager", "compile", "bf16") if any(r.get("mode") == m for r in rows)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["family"], r["attn"]), {})[r.get("mode")] = r
    totals = {m: {"ok": 0, "MISMATCH": 0, "CRASH": 0, "refused": 0} for m in modes}
    for r in rows:
        if r.get("mode") in totals and r.get("status") in totals[r["mode"]]:
            totals[r["mode"]][r["status"]] += 1
    families = sorted({r["family"] for r in rows})
    built = sorted({r["family"] for r in rows if r.get("mode") not in ("build", "-")})  # ("-": no sdpa)
    lines = [
        "# fxfuse over transformers families (CPU)", "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, fxfuse commit {meta['commit']}, "
        f"{meta['machine']}, {meta['seconds']} s, {meta.get('families_done', '?')} of {meta.get('families_asked', '?')} "
        f"families asked (`{' '.join(meta.get('argv', []))}`). Produced by `benchmarks/model_sweep.py` (see benchmarks/README.md).",
        *([meta["note"]] if meta.get("note") else []),
        *(f"Re-measured at commit {u['commit']} ({u['seconds']} s{', ' + ', '.join(u['modes']) if u.get('modes') else ''}): "
          f"{', '.join(u['families'])}.{' ' + u['note'] if u.get('note') else ''}" for u in meta.get("updates", [])),
        "",
        "A cell is `ok <ratio>` when every output (gradient) is within the tolerance bound of tests/tolerances.py "
        "(ratio = worst error / bound, <= 1 passes), `MISMATCH` above it, `CRASH` when fxfuse raised, "
        "`refused` when it raised its CaptureError saying what to do instead; "
        "(torch) marks a crash that torch.compile(backend=\"aot_eager\") or Inductor gives too.",
        "",
        "## Totals", "",
        f"{len(families)} families, {len(built)} built and compared (a family without a float64 reference is not); rows per mode (family x attention implementation):", "",
        "| mode | ok | mismatch | crash | refused |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m in modes:
        t = totals[m]
        lines.append(f"| {m} | {t['ok']} | {t['MISMATCH']} | {t['CRASH']} | {t['refused']} |")
    lines += ["", "## Every family", "",
              "| family | attn | attention | norms | " + " | ".join(modes) + " | declined (first) |",
              "| --- | --- | ---: | ---: | " + " | ".join("---" for _ in modes) + " | --- |"]
    for (fam, attn), by_mode in groups.items():
        if "build" in by_mode or "-" in by_mode:
            r = by_mode.get("build") or by_mode["-"]
            lines.append(f"| {fam} | {attn} | | | " + " | ".join("" for _ in modes) + f" | {r['status']}: "
                         f"{r.get('error', '')[:120]} |")
            continue
        # what fxfuse fused: the rewrite's report, else a compile row's (its last graph)
        first = by_mode.get("rewrite") or next((r for r in by_mode.values() if "matches" in r), None) \
            or next(iter(by_mode.values()))
        matches = first.get("matches", {})
        norms = sum(v for k, v in matches.items() if k in NORM_KINDS)
        declined = (first.get("declined") or [""])[0].replace("|", "/")[:160]
        lines.append(f"| {fam} | {attn} | {matches.get('attention', '')} | {norms or ''} | "
                     + " | ".join(_cell(by_mode[m]) if m in by_mode else "" for m in modes) + f" | {declined} |")
    problems = [r for r in rows if r.get("status") in ("CRASH", "MISMATCH", "refused")]
    if problems:
        lines += ["", "## Crashes and mismatches", "", "| family | attn | mode | what | fxfuse frame | triage |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in problems:
            what = r.get("error") or f"ratio {r['ratio']:.3g}, max error {r['max_err']:.3g}"
            lines.append(f"| {r['family']} | {r['attn']} | {r['mode']} | {what[:200].replace('|', '/')} | "
                         f"{r.get('fxfuse_frame', '')} | {str(r.get('triage', r.get('owner', '')))[:200].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
