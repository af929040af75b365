"""Norm variants of issue 13 that the existing fusion already covers, pinned so that they stay so:
the norm output's cast feeding a linear layer is the fused norm's output dtype (no cast left); and
LayerNorm Scaling (Curse of Depth: the norm output times the constant 1/sqrt(layer)), folded into
the fused norm as a constant step after the weight, on the torch reference and the interpreted kernels."""
import math

import pytest
import torch
from torch import nn

import fxfuse
from tests.tolerances import assert_close_to_reference, tolerance

D = 16
PASSES = "canonicalize,fuse-norm"


class RMSNorm(nn.Module):
    """Llama style: float32 statistics, cast back to the input dtype, then the weight."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class NormCastLinear(nn.Module):
    """A float32 norm whose output is cast to the bfloat16 of the next linear layer (mixed precision by hand)."""

    def __init__(self, d):
        super().__init__()
        self.norm = RMSNorm(d)
        self.proj = nn.Linear(d, d).to(torch.bfloat16)

    def forward(self, x):
        return self.proj(self.norm(x).to(self.proj.weight.dtype))


class ScaledLayerNorm(nn.Module):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth"): the pre-norm output of layer l is
    scaled by 1/sqrt(l), a constant of the layer."""

    def __init__(self, d, layer_index):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.scale = 1.0 / math.sqrt(layer_index)

    def forward(self, x):
        return self.norm(x) * self.scale


def test_norm_output_cast_is_the_fused_norms_output_dtype():
    model = NormCastLinear(D)
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert [m.kind for m in res.matches] == ["rms_norm"] and not res.misses, res.report()
    assert res.matches[0].spec.out_dtype == "bfloat16"
    assert "_to_copy" not in res.graph.code.split("fxfuse.norm")[1].split("\n")[0]  # the cast is inside
    assert sum("_to_copy" in line for line in res.graph.code.splitlines()) == 0, res.graph.code
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)


class ScaledRMSNorm(nn.Module):
    """The same scaling on a Llama RMSNorm, in the input's (16-bit) dtype."""

    def __init__(self, d, layer_index):
        super().__init__()
        self.norm = RMSNorm(d)
        self.layernorm_scaling = 1 / math.sqrt(layer_index)

    def forward(self, x):
        return self.norm(x) * self.layernorm_scaling


class DividedLayerNorm(ScaledLayerNorm):
    def forward(self, x):
        return self.norm(x) / math.sqrt(1 / self.scale)


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1, 0.5)
    return model


# (A float64 Llama RMSNorm still takes float32 statistics, so float64 is LayerNorm's alone.)
@pytest.mark.parametrize("style,dtype", [(ScaledLayerNorm, torch.float64), (ScaledLayerNorm, torch.float32),
                                         (ScaledLayerNorm, torch.bfloat16), (ScaledRMSNorm, torch.float32),
                                         (ScaledRMSNorm, torch.bfloat16)], ids=lambda p: getattr(p, "__name__", str(p)))
@pytest.mark.parametrize("layer_index", [3, 12])
def test_layernorm_scaling_is_folded_into_the_fused_norm(style, layer_index, dtype, cpu_path):
    model = _randomized(style(D, layer_index)).to(dtype if style is ScaledRMSNorm else torch.float32)
    x = torch.randn(2, 5, D, dtype=torch.float64).to(dtype)
    if style is ScaledLayerNorm:
        model = model.to(dtype)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert len(res.matches) == 1 and not res.misses, res.report()
    assert "aten.mul" not in res.graph.code and f"* {1 / math.sqrt(layer_index):g}" in res.matches[0].describe()
    xg = x.clone().requires_grad_()
    out = res.module(xg)
    (g,) = torch.autograd.grad(out.float().pow(2).sum(), xg)
    xe = x.clone().requires_grad_()
    eager = model(xe)
    (g_eager,) = torch.autograd.grad(eager.float().pow(2).sum(), xe)
    ref_model = style(D, layer_index).double()
    ref_model.load_state_dict(model.state_dict())
    xd = x.double().requires_grad_()
    ref = ref_model(xd)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), xd)
    assert out.dtype == eager.dtype
    if cpu_path == "reference" and style is ScaledRMSNorm:  # the reference runs the user's ops: eager exactly
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert_close_to_reference(out, eager, ref, "LayerNorm Scaling")
    assert_close_to_reference(g, g_eager, g_ref, "LayerNorm Scaling gradient")


def test_a_division_by_the_constant_stays_as_written():
    """x / c and x * (1 / c) round differently: the division is left after the fused norm."""
    model = _randomized(DividedLayerNorm(D, 4))
    x = torch.randn(2, 5, D)
    res = fxfuse.rewrite(model, (x,), passes=PASSES)
    assert len(res.matches) == 1 and "aten.div" in res.graph.code
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(res.module(x), model(x), rtol=rtol, atol=atol)
