"""The ``fxfuse`` command: its output and exit status (0 success, 1 the model or fxfuse failed, 2 the
command line was wrong). Each command and each exit status is run as users run it, in a subprocess;
the many variants of each are run in-process through ``main(argv)``, the same code minus the
seconds a fresh ``import torch`` costs."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxfuse.cli import main

REPO = Path(__file__).resolve().parents[1]

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16))

        def forward(self, x):
            fused = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
            declined = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
            return fused + declined

    def make():
        return Model(), (torch.randn(2, 4, 16),)

    def make_with_kwargs():
        return (lambda x, scale: Model()(x) * scale), (torch.randn(2, 4, 16),), {"scale": 2.0}

    def broken():
        return helper_that_fails()

    def helper_that_fails():
        raise ValueError("weights not found")

    def on_cuda():
        return Model(), (torch.randn(2, 4, 16, device="cuda"),)

    def on_meta():
        return Model(), (torch.randn(2, 4, 16, device="meta"),)

    def not_a_model():
        return 42, (torch.randn(2),)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(3)

        def forward(self, x):
            x = self.ln(x)
            return x * 2 if x.sum() > 0 else -x

    def data_dependent():
        return Branchy(), (torch.randn(3),)

    def wrong_shape():
        return Model(), (torch.randn(2, 4, 15),)  # the weight has 16 elements

    def fails_when_run():
        return (lambda x: x.reshape(5)), (torch.randn(3),)

    NOT_CALLABLE = 3
''')


def fxfuse_cli(*args, cwd=REPO, env=None):
    full_env = {**os.environ, **(env or {})}
    # conftest turns the Triton interpreter on for this process; the command runs as users run it.
    full_env.pop("TRITON_INTERPRET", None)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "fxfuse.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return path


def in_process(capsys, *args):
    """``(exit status, stdout, stderr)`` of ``fxfuse ARGS`` run through ``main`` in this process."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_reports_checks_and_measures():
    run = fxfuse_cli("demo", "--no-inductor")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "fxfuse.rewrite(NaiveTransformer):" in out and "rms_norm" in out and "layer_norm" in out
    assert "# spec: {" in out and "@triton.jit" in out  # one generated kernel is printed
    assert "output check: rewritten == eager" in out
    assert "speed (inference" in out and "x eager's speed" in out
    assert "memory (activations saved for backward)" in out
    assert "torch.compile (Inductor) comparison skipped" in out


def test_explain_html_dump_and_log_then_kernels(models, tmp_path):
    html, dump = tmp_path / "report.html", tmp_path / "dump"
    run = fxfuse_cli("explain", f"{models}:make", "--html", html, "--dump", dump, env={"FXFUSE_LOG": "debug"})
    assert run.returncode == 0, run.stderr
    assert "2 candidate site(s), 1 fused (1 rms_norm), 1 declined" in run.stdout
    assert "models.py:11" in run.stdout and "reduces over dims [1]" in run.stdout
    page = html.read_text()
    assert page.count("<svg") == 2 and 'id="matches"' in page and 'id="misses"' in page
    assert sorted(p.name for p in (dump / "graphs").iterdir()) == ["000_captured.txt", "000_rewritten.txt"]
    assert "fxfuse.norm" in (dump / "graphs" / "000_rewritten.txt").read_text()
    assert (dump / "report.txt").read_text().startswith("fxfuse.rewrite(Model)")
    # FXFUSE_LOG=debug: the fxfuse logger's records reach stderr.
    assert "[fxfuse.report] INFO: fxfuse.rewrite(Model): 2 candidate site(s)" in run.stderr
    assert "[fxfuse.report] DEBUG: declined" in run.stderr

    listing = fxfuse_cli("kernels", dump)
    assert listing.returncode == 0, listing.stderr
    [kernel_file] = (dump / "kernels").glob("*.py")
    assert f"{kernel_file.stem}  rms_norm, eps=1e-06" in listing.stdout
    assert "[fxfuse" not in listing.stderr  # quiet without FXFUSE_LOG


def test_usage_error_exits_2_with_one_line():
    run = fxfuse_cli("explain", "missing.py:make")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["fxfuse: error: no such file: missing.py"]


def test_runtime_failure_exits_1_with_the_users_traceback(models):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the missing-device case is the same on a GPU machine.
    run = fxfuse_cli("explain", f"{models}:on_cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fxfuse: error: factory {models}:on_cuda asked for a CUDA device, and this machine has none")
    assert "Traceback" in run.stderr and "in on_cuda" in run.stderr and "fxfuse/cli.py" not in run.stderr


def test_kernels_json_and_folders_without_kernels(models, tmp_path, capsys):
    dump = tmp_path / "dump"
    assert in_process(capsys, "explain", f"{models}:make", "--dump", dump)[0] == 0
    code, out, _ = in_process(capsys, "kernels", "--json", dump / "kernels")
    [entry] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and entry["kind"] == "rms_norm" and entry["spec"]["eps"] == 1e-06
    assert entry["words"].startswith("rms_norm, eps=1e-06") and Path(entry["path"]).stem == entry["name"]
    # Attention specs carry no "kind" field: the kernel's family is still named.
    assert in_process(capsys, "explain", "fxfuse.demo:make_demo", "--dump", tmp_path / "demo")[0] == 0
    code, out, _ = in_process(capsys, "kernels", "--json", tmp_path / "demo")
    assert code == 0 and sorted({json.loads(line)["kind"] for line in out.splitlines()}) == \
        ["attention", "layer_norm", "rms_norm"]
    (tmp_path / "other.py").write_text("# spec is not here\nprint('hi')\n")
    code, out, _ = in_process(capsys, "kernels", tmp_path)
    assert code == 1 and "no fxfuse kernels" in out


def test_explain_module_target_passes_and_kwargs(models, capsys):
    code, out, err = in_process(capsys, "explain", "fxfuse.demo:make_demo")
    assert code == 0, err
    summary = out.splitlines()[0]  # other families (attention) may be fused too: count the norms
    assert summary.startswith("fxfuse.rewrite(NaiveTransformer)") and "1 layer_norm" in summary and "4 rms_norm" in summary
    code, out, _ = in_process(capsys, "explain", f"{models}:make", "--passes", "canonicalize")
    assert code == 0 and "0 fused" in out  # without fuse-norm nothing is fused: --passes is used
    code, out, _ = in_process(capsys, "explain", f"{models}:make_with_kwargs")
    assert code == 0 and "1 fused (1 rms_norm)" in out


def test_explain_compile_reports_each_graph(models, capsys, tmp_path):
    """A model one capture cannot take (a branch on a tensor's value) goes through torch.compile:
    Dynamo breaks the graph at the branch, and each graph gets its report and its block on the page."""
    html = tmp_path / "report.html"
    code, out, err = in_process(capsys, "explain", f"{models}:data_dependent", "--compile", "--html", html)
    assert code == 0, err
    assert "fxfuse graph 0: 1 candidate site(s), 1 fused (1 layer_norm)" in out and "models.py:" in out
    assert "fxfuse graph 1:" in out  # the code after the branch
    page = html.read_text()
    assert 'id="graph0-matches"' in page and 'id="graph1-summary"' in page and page.count("<svg") == 4
    code, out, err = in_process(capsys, "explain", f"{models}:fails_when_run", "--compile")
    assert code == 1 and "Traceback" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fxfuse: error: running the model under torch.compile raised ")
    assert "shape '[5]' is invalid for input of size 3" in last  # the model's own error, not just Dynamo's


@pytest.mark.parametrize("args, message", [
    (["explain", "{models}"], "bad target"),
    (["explain", "{models}:nope"], "factory 'nope' not found in"),
    (["explain", "{models}:NOT_CALLABLE"], "not a callable factory"),
    (["explain", "no_such_package.mod:make"], "cannot import module 'no_such_package.mod'"),
    (["explain", "{models}:make", "--passes", "canonicalize,fuse-everything"], "unknown fxfuse pass 'fuse-everything'"),
    (["explain", "{models}:make", "--passes", ""], "names no pass, so nothing would run"),
    (["kernels", "/no/such/dir"], "no such directory"),
    (["explain", "{models}:make", "--html", "/no/such/dir/r.html"], "does not exist"),
    (["explain", "{models}:make", "--dump", "{models}/sub"], "cannot create the folder"),
], ids=["bad-syntax", "factory-not-found", "not-callable", "no-module", "bad-pass", "no-pass", "no-dir", "html-folder",
        "dump-folder"])
def test_usage_errors(models, capsys, args, message):
    code, out, err = in_process(capsys, *[a.format(models=models) for a in args])
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxfuse: error: ") and message in err


def test_factory_not_found_lists_functions_not_classes(models, capsys):
    code, _, err = in_process(capsys, "explain", f"{models}:nope")
    assert code == 2 and "its functions: broken, data_dependent, fails_when_run" in err
    assert "Model" not in err and "Branchy" not in err  # classes build a model, not (model, inputs)


def test_help_says_what_a_factory_returns(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "returns (model, example_inputs) or" in out and "examples/quickstart.py:make" in out


def test_capture_failure_shows_its_cause_once_without_the_tracers_log(models):
    run = fxfuse_cli("explain", f"{models}:wrong_shape")
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fxfuse: error: fxfuse could not trace the model") and "shown above" in last
    assert "failed while attempting to run meta" not in run.stderr and "fake_tensor.py" not in run.stderr
    assert "your frames only" in run.stderr and "models.py" in run.stderr and "in forward" in run.stderr


@pytest.mark.parametrize("factory, message, traceback_line", [
    ("broken", "factory {models}:broken raised ValueError: weights not found", "in helper_that_fails"),
    ("on_meta", "have tensors on the meta device", None),
    ("not_a_model", "returned 'int' object as the model", None),
    ("data_dependent", "captur", "in forward"),  # CaptureError: its wording belongs to capture.py
], ids=["factory-raises", "meta-device", "not-a-model", "capture-fails"])
def test_runtime_failures(models, capsys, factory, message, traceback_line):
    code, out, err = in_process(capsys, "explain", f"{models}:{factory}")
    assert code == 1, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fxfuse: error: ") and message.format(models=models) in last
    if traceback_line:  # the user's traceback is shown, starting in their code, not in fxfuse's
        assert "Traceback" in err and traceback_line in err and "fxfuse/cli.py" not in err
    else:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("compile_works", [True, False], ids=["compiles", "compile-fails"])
def test_demo_compares_with_torch_compile(capsys, monkeypatch, compile_works):
    """The torch.compile comparison's flow and wording, with torch.compile stubbed out: Inductor
    itself takes tens of seconds to compile on a CPU (the subprocess test above skips it)."""
    import torch

    def fake_compile(model, *args, **kwargs):
        if not compile_works:
            raise RuntimeError("no C++ compiler found\nmore detail")
        return model  # "compiled" = eager: the ratios are then eager's

    monkeypatch.setattr(torch, "compile", fake_compile)
    code, out, err = in_process(capsys, "demo", "--no-kernel")
    assert code == 0, err
    assert "output check: rewritten == eager" in out
    if compile_works:
        assert "x Inductor's speed" in out
        # The stub is eager, so the memory compared with "Inductor" is eager's, ratio and all.
        eager = re.search(r"eager (\d+) KiB, fxfuse (\d+) KiB, ([\d.]+)x eager's", out).groups()
        assert f"Inductor {eager[0]} KiB, fxfuse {eager[1]} KiB, {eager[2]}x Inductor's" in out
    else:
        assert "torch.compile (Inductor) comparison skipped: it failed on this machine " \
               "(RuntimeError: no C++ compiler found)" in out
