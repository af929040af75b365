"""torch.compile(model, backend="fxfuse"): found by name without importing fxfuse, options reach
the passes and kernels, one report per graph, training and dynamic shapes give eager's values,
and the report points at the user's source line."""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import fxfuse
import fxfuse.runtime.norm
from tests.norm_styles import NORM_SOURCE, SourceMarkedRMSNorm


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.lin = SourceMarkedRMSNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.lin(self.norm(x))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo caches compiled frames per code object; each test compiles the same forward anew.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model, x, fn):
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


ENTRY_POINT_SCRIPT = r"""
import json, os, sys, torch
torch.manual_seed(0)
class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))
    def forward(self, x):
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
m, x = Norm(), torch.randn(2, 8)
before = "fxfuse" in sys.modules
out = torch.compile(m, backend="fxfuse")(x)
root = os.environ["FXFUSE_DEBUG_DIR"]
print(json.dumps({"imported_before": before, "equal": torch.allclose(out, m(x), atol=1e-6),
                  "files": sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)}))
"""


def test_backend_found_by_name_in_a_fresh_process_and_debug_dir_from_environment(tmp_path):
    env = {**os.environ, "FXFUSE_DEBUG_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported_before"] is False and result["equal"] is True
    stages = sorted(f.split("_", 1)[1] for f in result["files"] if f.startswith("graphs/"))
    assert stages == ["aot_forward.txt", "captured.txt", "rewritten.txt"]  # no backward: inference
    assert any(f.startswith("kernels/fxfuse_rms_norm_") for f in result["files"])
    rewritten = next((tmp_path / f).read_text() for f in result["files"] if f.endswith("rewritten.txt"))
    assert "fxfuse.norm" in rewritten


def test_backend_object_reports_one_per_graph_with_user_source():
    class TwoGraphs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Block(), Block()

        def forward(self, x):
            x = self.a(x)
            if x.sum() > 0:  # data-dependent: Dynamo splits the model here
                x = x + 1
            return self.b(x)

    model, x = TwoGraphs(), torch.randn(2, 3, 8)
    be = fxfuse.Backend()
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    assert len(be.reports) >= 2
    assert all([m.kind for m in r.matches] == ["rms_norm"] for r in be.reports[:2])
    assert {m.source for m in be.matches} == {NORM_SOURCE}
    assert be.report().count("1 fused (1 rms_norm)") >= 2


def test_options_dict_reaches_the_passes(tmp_path):
    model, x = Block(), torch.randn(2, 3, 8)
    for passes, fused in [("canonicalize", False), ("canonicalize,fuse-norm", True)]:
        torch._dynamo.reset()
        debug = tmp_path / passes
        out = torch.compile(model, backend="fxfuse", options={"passes": passes, "debug_dir": str(debug)})(x)
        torch.testing.assert_close(out, model(x))
        (rewritten,) = (debug / "graphs").glob("*_rewritten.txt")
        assert ("fxfuse.norm" in rewritten.read_text()) is fused
    be = fxfuse.Backend(passes="canonicalize")
    torch.compile(model, backend=be)(x)
    assert be.matches == [] and "0 fused (none)" in be.report()


def test_interpret_option_runs_the_triton_kernels(monkeypatch):
    calls = []
    forward = fxfuse.runtime.norm.forward
    monkeypatch.setattr(fxfuse.runtime.norm, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    model, x = Block(), torch.randn(2, 3, 8)
    out = torch.compile(model, backend="fxfuse", options={"interpret": True})(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert calls, "interpret=True did not reach the fused operator at run time"
    calls.clear()
    torch._dynamo.reset()
    torch.compile(model, backend="fxfuse")(x)
    assert not calls  # default on CPU: the exact torch reference


def test_unknown_pass_fails_when_the_backend_is_made():
    with pytest.raises(ValueError, match=r"'fuse-rms'.*canonicalize.*fuse-norm"):
        fxfuse.Backend(passes="fuse-rms")
    with pytest.raises(ValueError, match="the options are"):
        fxfuse.Backend(interpet=True)


def test_training_through_the_backend_gives_eager_gradients():
    model, x = Block(), torch.randn(2, 3, 8)
    be = fxfuse.Backend()
    compiled = torch.compile(model, backend=be)
    got = _grads(model, x, compiled)
    want = _grads(model, x, model)
    torch.testing.assert_close(got, want)
    assert len(be.matches) == 1


def test_dynamic_shapes_compile_once_and_match_eager():
    model = Block()
    be = fxfuse.Backend()
    compiled = torch.compile(model, backend=be, dynamic=True)
    for seq in (3, 5, 11):
        x = torch.randn(2, seq, 8)
        torch.testing.assert_close(compiled(x), model(x))
    assert len(be.reports) == 1, be.report()
    # Dynamo passes the float eps as a tensor under dynamic=True; it is still fused as a constant,
    # and a new value compiles again rather than reusing the old kernel.
    assert [m.spec.eps for m in be.matches] == [1e-6]
    model.norm.eps = 0.5
    torch.testing.assert_close(compiled(x), model(x))
    assert [m.spec.eps for m in be.matches] == [1e-6, 0.5]


def test_buffer_updates_and_no_grad_regions_through_the_backend():
    class Stateful(nn.Module):
        def __init__(self, d=4):
            super().__init__()
            self.lin, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.steps.add_(1)
            h = self.bn(self.lin(x))
            with torch.no_grad():
                scale = h.abs().amax()
            return h * self.steps / scale

    model = Stateful()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxfuse")
    x = torch.randn(3, 4)
    for _ in range(2):
        torch.testing.assert_close(_grads(model, x, compiled), _grads(ref, x, ref))
        for (name, got), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(got, want, msg=name)
            assert got.grad_fn is None
    assert int(model.steps) == 2


def test_debug_dir_option_has_forward_and_backward_graphs(tmp_path):
    model, x = Block(), torch.randn(2, 3, 8, requires_grad=True)
    torch.compile(model, backend="fxfuse", options={"debug_dir": str(tmp_path)})(x).sum().backward()
    stages = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "graphs").iterdir())
    assert stages == ["aot_backward.txt", "aot_forward.txt", "captured.txt", "rewritten.txt"]
    backward = next((tmp_path / "graphs").glob("*_aot_backward.txt")).read_text()
    assert "fxfuse.norm_backward" in backward
    assert list((tmp_path / "kernels").glob("fxfuse_rms_norm_*.py"))


def test_graph_that_cannot_be_captured_runs_unfused_with_a_warning(monkeypatch):
    def refuse(gm, example_inputs):
        raise fxfuse.CaptureError("cannot capture this graph (test)")

    monkeypatch.setattr(fxfuse.backend, "capture_graph", refuse)
    model, x = Block(), torch.randn(2, 3, 8)
    be = fxfuse.Backend()
    with pytest.warns(UserWarning, match="runs unfused: cannot capture this graph"):
        out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert be.matches == [] and [m.reason for m in be.misses] == ["cannot capture this graph (test)"]


def test_compiling_inside_saved_tensors_hooks_fuses_and_runs_the_hooks_on_real_tensors():
    # The demo measured activation memory with a pack hook that reads each saved tensor's storage
    # address; the training graph was compiled inside that context, and fxfuse's trace on fake
    # tensors ran the user's hook (which fails on a fake storage): the graph ran unfused.
    model, x = Block(), torch.randn(2, 3, 8)
    packed = []

    def pack(t):
        packed.append(t.untyped_storage().data_ptr())  # fails on a fake tensor
        return t

    be = fxfuse.Backend()
    compiled = torch.compile(model, backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "fxfuse graph 0 runs unfused: ..." would fail here
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got = _grads(model, x, compiled)
    assert [m.kind for m in be.matches] == ["rms_norm"]
    assert packed, "the hooks did not run at run time"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = fxfuse.rewrite(model, (x,))
    assert [m.kind for m in res.matches] == ["rms_norm"]
    torch.testing.assert_close(got, _grads(model, x, model))


def test_inner_eager_backward_empties_its_argument_list_so_saved_activations_die_early(monkeypatch):
    """inner="eager": AOTAutograd hands the backward the forward's saved activations in one list.
    The compiled backward empties that list, so each activation is freed after its last use in the
    graph; unboxed, the caller's list kept every one alive until the whole backward returned (GPT-2
    training: a 23 MiB heap peak a step where eager has 19)."""
    import weakref

    from fxfuse import backend as backend_module

    calls = []
    boxed = backend_module._boxed

    def watching(gm, options):
        run = boxed(gm, options)

        def call(args):
            refs = [weakref.ref(a) for a in args if isinstance(a, torch.Tensor)]
            outputs = run(args)
            # ``args`` is still held here, as AOTAutograd holds it while the backward runs
            calls.append((len(args), [r() for r in refs], outputs))
            return outputs

        call._boxed_call = True
        return call

    monkeypatch.setattr(backend_module, "_boxed", watching)
    model, x = Block(), torch.randn(2, 3, 8)
    compiled = torch.compile(model, backend=fxfuse.Backend(inner="eager"))
    got = _grads(model, x, compiled)
    torch.testing.assert_close(got, _grads(model, x, model))
    forward, backward = calls  # one graph: its forward, then its backward
    assert forward[0] == backward[0] == 0  # both emptied their lists
    # the saved activations (the user's leaves, which require grad, live on in the model and test)
    activations = [t for t in backward[1] if t is None or not t.requires_grad]
    assert len(activations) >= 2 and activations == [None] * len(activations), activations
