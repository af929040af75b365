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
                           "rewrite", "--attn", "eager", "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
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


def _sweep_module(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_family_table_builds_swin_and_siglip_text_without_randomness():
    fams = _sweep_module("model_sweep_families")
    swin = fams.build_model("swin", "eager")
    assert swin.config.num_heads == [2, 2]  # not TINY's num_attention_heads, its alias
    assert swin.config.drop_path_rate == 0.0  # a training step is compared with eager's: no random drop
    siglip = fams.build_model("siglip_text_model", "eager")
    assert type(siglip).__name__ == "SiglipTextModel"
    with torch.no_grad():
        assert fams.float_outputs(siglip(**fams.make_inputs("siglip_text_model", siglip, 8)))[0].shape == (2, 8, 32)


def test_update_replaces_only_the_rows_re_measured():
    merge_rows = _sweep_module("model_sweep").merge_rows
    old = [{"family": "llama", "attn": "eager", "mode": "compile_eager", "status": "ok"},
           {"family": "llama", "attn": "eager", "mode": "compile", "status": "CRASH"},
           {"family": "swin", "attn": "eager", "mode": "build", "status": "build failed"},
           {"family": "swin", "attn": "sdpa", "mode": "-", "status": "no sdpa"},
           {"family": "bert", "attn": "eager", "mode": "compile_eager", "status": "ok"}]
    new = [{"family": "swin", "attn": "eager", "mode": "compile", "status": "ok"},
           {"family": "llama", "attn": "eager", "mode": "compile", "status": "ok"}]
    got = [(r["family"], r["attn"], r["mode"], r["status"]) for r in merge_rows(old, new)]
    assert got == [("llama", "eager", "compile_eager", "ok"), ("llama", "eager", "compile", "ok"),
                   ("bert", "eager", "compile_eager", "ok"), ("swin", "eager", "compile", "ok"),
                   ("swin", "sdpa", "-", "no sdpa")]


def test_triage_owner_is_torch_when_the_backend_the_mode_stands_on_fails_too():
    owner = _sweep_module("model_sweep").owner
    falcon = {"aot_eager": "ok (ratio 0.0185)", "inductor": "MISMATCH (ratio 239)"}
    assert owner(falcon, "compile") == "torch"  # the composed backend stands on Inductor
    assert owner(falcon, "compile_eager") == "fxfuse"
    assert owner({"aot_eager": "RuntimeError: x", "inductor": "ok (ratio 0.1)"}, "train") == "torch"
