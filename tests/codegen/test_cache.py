"""The kernel cache: files named by a hash of the spec, written atomically, checked and rewritten
when damaged, never executed from disk; several processes compiling one kernel at once; a cache
directory that cannot be written (fxfuse warns and runs the kernel from memory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fxfuse import config
from fxfuse import runtime
from fxfuse.runtime import cache
from fxfuse.runtime import norm as kernels
from fxfuse.ops.norm import reference
from fxfuse.spec import NormSpec, ParamPrep, Step

LAYER_NORM = NormSpec(
    kind="layer_norm", eps=1e-5, compute_dtype="float32", norm_dtype="float32",
    steps=(Step("mul", "float32", 0), Step("add", "float32", 1)), params=(ParamPrep("float32"), ParamPrep("float32")),
)
RMS_NORM = NormSpec(kind="rms_norm", eps=1e-6, compute_dtype="float32", norm_dtype="float32")


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory, and a process that has checked and loaded nothing yet."""
    cache.forget()
    with config.patch(cache_dir=str(tmp_path / "kernels")):
        yield tmp_path / "kernels"
    cache.forget()


def assert_kernel_runs_correctly(spec: NormSpec) -> None:
    """Run the forward kernel through Triton's interpreter; it must compute the spec."""
    x = torch.randn(3, 8)
    params = [torch.randn(8) for _ in spec.params]
    y, _ = kernels.forward(spec, x, None, params)
    torch.testing.assert_close(y, reference(spec, x, params), rtol=1e-5, atol=1e-5)


def test_file_is_named_by_the_kernel_and_holds_its_source(cache_dir):
    kernel = runtime.kernel(LAYER_NORM)
    assert Path(kernel.path) == cache_dir / f"{kernel.name}.py"
    assert Path(kernel.path).read_bytes() == kernel.source.encode()
    assert kernel.name == cache.kernel_name("layer_norm", LAYER_NORM.to_json())
    assert [p.name for p in cache_dir.iterdir()] == [f"{kernel.name}.py"]  # no temporary files left


def test_intact_file_is_left_alone(cache_dir):
    """A new process finding an intact file does not write it (a read-only, pre-filled cache works)."""
    path = Path(runtime.kernel(LAYER_NORM).path)
    before = path.stat()
    cache.forget()
    time.sleep(0.01)
    runtime.kernel(LAYER_NORM)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _truncate(text: bytes) -> bytes:
    return text[: len(text) // 2]


def _garbage(text: bytes) -> bytes:
    return b"\xff\xfe\x00 not python at all"


def _empty(text: bytes) -> bytes:
    return b""


def _edit_eps(text: bytes) -> bytes:
    """Still valid Python, still the same size class, but computes something else."""
    edited = text.replace(b"/ N + eps)", b"/ N + 1000.0)")
    assert edited != text
    return edited


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty, _edit_eps])
def test_damaged_file_is_detected_rewritten_and_the_kernel_still_runs(cache_dir, damage):
    kernel = runtime.kernel(LAYER_NORM)
    path = Path(kernel.path)
    path.write_bytes(damage(path.read_bytes()))
    cache.forget()  # as a new process would: nothing checked or loaded yet
    assert_kernel_runs_correctly(LAYER_NORM)
    assert path.read_bytes() == kernel.source.encode()


def test_kernel_runs_the_generated_text_even_if_the_file_changes_under_it(cache_dir):
    """``load`` executes the text it generated, not whatever the file holds when Triton reads it."""
    kernel = runtime.kernel(LAYER_NORM)
    path = Path(kernel.path)
    module = cache.load(kernel)
    path.write_bytes(_edit_eps(path.read_bytes()))  # replaced after load, before the first launch
    assert_kernel_runs_correctly(LAYER_NORM)
    assert module.__file__ == str(path)


def test_module_is_executed_once_per_process(cache_dir):
    kernel = runtime.kernel(RMS_NORM)
    first = cache.load(kernel)
    assert cache.load(runtime.kernel(RMS_NORM)) is first
    assert sys.modules[f"fxfuse_kernels.{kernel.name}"] is first
    cache.forget()
    assert cache.load(kernel) is not first


def test_failed_write_leaves_no_partial_file_and_the_kernel_still_runs(cache_dir, monkeypatch):
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", disk_full)
    with pytest.warns(RuntimeWarning, match="cannot write generated kernels"):
        kernel = runtime.kernel(RMS_NORM)
    assert kernel.path == ""
    assert list(cache_dir.iterdir()) == []  # the temporary file is gone, the target never written
    assert_kernel_runs_correctly(RMS_NORM)


def test_unwritable_cache_dir_warns_once_with_the_fix_and_kernels_still_run(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache directory should be")  # unwritable even for root
    cache.forget()
    try:
        with config.patch(cache_dir=str(blocker / "kernels")):
            with pytest.warns(RuntimeWarning) as record:
                first = runtime.kernel(LAYER_NORM)
                runtime.kernel(RMS_NORM)
            assert len(record) == 1, [str(w.message) for w in record]
            message = str(record[0].message)
            assert str(blocker / "kernels") in message and "FXFUSE_CACHE_DIR" in message
            assert first.path == "" and first.source
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                assert_kernel_runs_correctly(LAYER_NORM)
                assert_kernel_runs_correctly(RMS_NORM)
    finally:
        cache.forget()


def test_unwritable_debug_dir_is_an_error_that_names_it(cache_dir, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with config.patch(debug_dir=str(blocker)):
        with pytest.raises(cache.CacheError, match="debug directory.*FXFUSE_DEBUG_DIR"):
            runtime.kernel(LAYER_NORM)


def test_processes_compiling_one_kernel_at_once_all_succeed_and_leave_the_file_intact(tmp_path):
    """Three processes start together on an empty cache, then keep damaging the file with
    non-atomic writes while the others compile and run the kernel; every run must be correct."""
    worker = Path(__file__).with_name("cache_worker.py")
    go, cache_root = tmp_path / "go", tmp_path / "kernels"
    env = dict(os.environ, FXFUSE_CACHE_DIR=str(cache_root), TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(go), "80", LAYER_NORM.to_json()], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("go.ready.*"))) < len(procs):
            assert all(p.poll() is None for p in procs), "a worker died while starting"
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.02)
        go.touch()
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["runs"] == 81 and report["max_error"] < 1e-5, report
    name = cache.kernel_name("layer_norm", LAYER_NORM.to_json())
    expected = runtime.generate_kernel(LAYER_NORM).source
    assert (cache_root / f"{name}.py").read_bytes() == expected.encode()
    assert sorted(p.name for p in cache_root.iterdir()) == [f"{name}.py"]
