"""The one-shot GPU run script, checked where there is no GPU: its dry mode runs the same parts at
toy sizes on the CPU (the GPU tests are then skipped, SDPA's flash/cuDNN and Flex columns say why),
writes each part's results and the markdown table, and names any part that did not finish. The
sm_90 static check has its own test (tests/codegen/test_static_check.py); the training step runs
here with its eager column only (a compiled step costs tens of seconds on a CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_run_dry_mode_runs_every_benchmark_part(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_run.py"), "--dry", "--out-dir", str(tmp_path),
                           "--parts", "tests,attn_main,attn_vars,decode,norm"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NOT FINISHED" not in done.stdout
    for part in ("attn_main", "attn_vars", "decode", "norm"):
        rows = json.loads((tmp_path / f"{part}_dry.json").read_text())["results"]
        assert any(r["impl"] == "fxfuse" and r["ms"] for r in rows), part
    variants = {r["variant"] for r in json.loads((tmp_path / "attn_vars_dry.json").read_text())["results"]}
    assert variants == {"sliding_window", "alibi", "softcap", "gqa", "padding_mask"}
    flash = [r for r in json.loads((tmp_path / "attn_main_dry.json").read_text())["results"] if r["impl"] == "sdpa_flash"]
    assert flash and all(r["ms"] is None and "CUDA only" in r["note"] for r in flash)
    table = (tmp_path / "gpu_run_dry.md").read_text()
    assert "| attn_main | causal | fwd+bwd |" in table and "## Norms" in table and "| tests | ok |" in table


def test_gpu_run_names_the_parts_that_did_not_finish(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_run

    monkeypatch.setattr(gpu_run, "parts", lambda dry: [("slow", 1, [sys.executable, "-c", "import time; time.sleep(30)"]),
                                                       ("broken", 30, [sys.executable, "-c", "raise SystemExit(3)"])])
    status = gpu_run.run_parts(True, tmp_path, "dry")
    assert status["slow"].startswith("timed out after 1s") and status["broken"].startswith("failed (rc 3")
    assert "| slow | timed out" in gpu_run.markdown(tmp_path, "dry", status)


def test_train_step_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "train.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--device", "cpu", "--tiny",
                           "--impls", "eager", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["impl"] == "eager" and row["ms"] > 0 and row["loss"] > 0
