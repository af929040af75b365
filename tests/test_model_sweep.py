"""benchmarks/model_sweep.py runs end to end on one family as a user runs it (a subprocess) and writes
its JSON and Markdown; its comparison flags an output that is off (a wrong number must not read ok)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_model_sweep_one_family(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "model_sweep.py"), "--only", "llama", "--modes",
                           "rewrite", "--attn", "eager", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    (row,) = payload["rows"]
    assert (row["family"], row["mode"], row["status"]) == ("llama", "rewrite", "ok"), row
    assert row["matches"]["attention"] == 2 and row["matches"]["rms_norm"] == 5 and row["ratio"] <= 1
    assert "| rewrite | 1 | 0 | 0 | 0 |" in out.with_suffix(".md").read_text()


def test_sweep_comparison_flags_a_wrong_output():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from model_sweep import worst_ratio
    finally:
        sys.path.remove(str(BENCHMARKS))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 16, generator=g, dtype=torch.float64)
    eager = ref.float()
    assert worst_ratio([eager.clone()], [eager], [ref])[0] <= 1
    off = eager.clone()
    off[1, 3] += 1e-3  # one element wrong by 1e-3: far outside float32's bound
    assert worst_ratio([off], [eager], [ref])[0] > 1
    assert worst_ratio([off.bfloat16()], [eager.bfloat16()], [ref])[0] <= 1  # within bf16's (whole tensor)
    assert worst_ratio([off.bfloat16() + 0.5], [eager.bfloat16()], [ref])[0] > 1
    assert worst_ratio([off[:2]], [eager], [ref])[0] == float("inf")  # another shape
