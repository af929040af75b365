"""QK-norm folded into attention by the default pipeline (fuse-norm, then fuse-qk-norm): every
style's per-head norms go into the operator (no fxfuse.norm left for them) and the rewritten module
equals eager, outputs and gradients (the norm weights' included), against a float64 reference, on
the torch path and on the interpreted kernels; near-misses keep the norms they name as written, or
keep the order they were written in."""
import copy

import pytest
import torch

import fxfuse
from tests.qk_norm_styles import NEAR_MISSES, STYLES
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model, inputs):
    out = _first(model(*inputs))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    return out, [t.grad for t in inputs if t.requires_grad]


def _leaves(inputs, dtype=None, constant=()):
    return [(t.to(dtype) if dtype else t.clone()).requires_grad_(i not in constant) for i, t in enumerate(inputs)]


def _check(style, dtype):
    model = style()
    inputs = model.inputs(dtype)
    res = fxfuse.rewrite(model, tuple(inputs))
    constant = getattr(style, "CONSTANT_INPUTS", ())
    expected, expected_grads = _run(copy.deepcopy(model), _leaves(inputs, torch.float64, constant))
    eager, eager_grads = _run(model, _leaves(inputs, constant=constant))
    got, got_grads = _run(res.module, _leaves(inputs, constant=constant))
    assert got.dtype == eager.dtype
    assert_close_to_reference(got, eager, expected, "output")
    assert len(got_grads) == len(eager_grads) == len(expected_grads)
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        through_norm = i >= 3 or "qk"[i:i + 1] in style.FOLDED if i != 2 else False  # weights, or q/k normalised
        if dtype == torch.float32 or not through_norm:
            assert_close_to_reference(g, e, r, f"gradient {i}")
        else:  # a 16-bit site's gradients through a norm (see assert_close_as_a_whole)
            assert_close_as_a_whole(g, e, r, dtype, f"gradient {i}")
    return res


def _folded(res) -> str:
    specs = [m.spec for m in res.matches if m.kind == "qk-norm"]
    assert len(specs) <= 1, res.report()
    return "".join(n for n in "qk" if specs and getattr(specs[0], f"norm_{n}"))


def _rotated(res) -> str:
    specs = [m.spec for m in res.matches if m.kind in ("qk-norm", "rope")]
    return "".join(n for n in "qk" if specs and getattr(specs[-1], f"rope_{n}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.__name__)
def test_qk_norm_is_folded_and_exact(style, dtype, cpu_path):
    res = _check(style, dtype)
    assert _folded(res) == style.FOLDED and _rotated(res) == style.ROTATED, res.report()
    assert not [m for m in res.misses if m.kind == "qk-norm"], res.report()
    assert "fxfuse.norm.default" not in res.graph.code, res.graph.code


@pytest.mark.parametrize("style", NEAR_MISSES, ids=lambda s: s.__name__)
def test_near_misses_keep_their_norm(style, cpu_path):
    res = _check(style, torch.float32)
    assert _folded(res) == style.FOLDED and _rotated(res) == style.ROTATED, res.report()
    reasons = [m.reason for m in res.misses if m.kind == "qk-norm"]
    if style.WHY:
        assert reasons and all(style.WHY in r for r in reasons), res.report()
    else:
        assert not reasons, res.report()


def test_norm_after_rope_keeps_the_rotation_before_the_norm():
    """The rotation of NormAfterRope stays as written, before the operator, which normalises only."""
    from tests.qk_norm_styles import NormAfterRope

    model = NormAfterRope()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)))
    spec = next(m.spec for m in res.matches if m.kind == "qk-norm")
    assert spec.norm_q and not spec.rope_q and "RoPE" not in spec.describe(), spec.describe()
    assert res.graph.code.count("aten.neg") == 2, res.graph.code  # rotate_half of q and of k, as written
