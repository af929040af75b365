"""Smoke test of benchmarks/pattern_coverage.py: run as a user would (a subprocess) on a few cases
that cover each outcome, it calibrates Inductor's counter, measures both optimizers and writes a
well-formed JSON and markdown table. The full run's results are committed under benchmarks/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pattern_coverage.py"


def test_pattern_coverage_on_a_subset(tmp_path):
    out = tmp_path / "coverage.json"
    # Inductor's pattern 1 and its pattern 24 (MBart's flat heads; both fuse them), a boolean padding
    # mask (fxfuse fuses it, Inductor has no pattern for it), a near-miss (neither).
    only = "DivByScalar,MBartFlatHeadsMask,PaddingMaskFill,SoftmaxOverQueries"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", only, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["inductor_calibration"] == {"sfdp_pattern_1": 1, "no_attention": 0}
    rows = {(r["style"], r["dtype"]): r for r in payload["results"]}
    # MBart's pattern is about casts: it runs in bf16 as well.
    assert set(rows) == {(s, "float32") for s in only.split(",")} | {("MBartFlatHeadsMask", "bfloat16")}
    outcome = {k: (r["fxfuse_fused"], r["inductor_fused"]) for k, r in rows.items()}
    assert outcome[("DivByScalar", "float32")] == (1, 1)
    assert outcome[("MBartFlatHeadsMask", "float32")] == outcome[("MBartFlatHeadsMask", "bfloat16")] == (1, 1)
    assert outcome[("PaddingMaskFill", "float32")] == (1, 0)
    assert outcome[("SoftmaxOverQueries", "float32")] == (0, 0)
    assert "query axis" in rows[("SoftmaxOverQueries", "float32")]["fxfuse_note"]  # fxfuse's reason is recorded
    assert payload["totals"]["Inductor sfdp patterns"] == {"cases": 3, "sites": 3, "fxfuse": 3, "inductor": 3,
                                                           "fxfuse_all": 3, "inductor_all": 3}
    md = out.with_suffix(".md").read_text()
    assert "| **all attention sites** | | **4** | **4** | **3** |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 10]
    assert len(table) == 2 + len(rows)  # the header and its rule, then one row per case
