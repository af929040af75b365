"""Swin's shift mask computed in the attention kernels on a CUDA GPU (``pytest -m gpu``; skipped
without CUDA like tests/test_gpu.py): transformers' SwinModel and Swinv2Model at window 7 (N = 49
keys, not a power of two), outputs and gradients against float64."""
import copy

import pytest
import torch

import fxfuse
from tests.passes.test_attention_swin_masks import _fused_specs, _Hidden, _run
from tests.tolerances import assert_close_as_a_whole, assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_swin_shift_mask_in_the_kernels_on_cuda(kind):
    from transformers import Swinv2Config, Swinv2Model, SwinConfig, SwinModel

    config_cls, model_cls = (SwinConfig, SwinModel) if kind == "swin" else (Swinv2Config, Swinv2Model)
    config = config_cls(image_size=56, patch_size=4, num_channels=3, embed_dim=32, depths=[2], num_heads=[2],
                        window_size=7)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = _Hidden(model_cls(config, add_pooling_layer=False).eval()).cuda()
    x = torch.randn(2, 3, 56, 56, device="cuda")
    res = fxfuse.rewrite(model, (x,))
    assert not res.misses, res.report()
    assert any(step.expr is not None for spec, _ in _fused_specs(res) for step in spec.steps), res.report()
    expected, expected_grads = _run(copy.deepcopy(model).double(), x.double())
    eager, eager_grads = _run(copy.deepcopy(model), x)
    got, got_grads = _run(res.module, x)
    assert_close_to_reference(got, eager, expected, "output")
    for i, (g, e, r) in enumerate(zip(got_grads, eager_grads, expected_grads)):
        if g is not None:
            assert_close_to_reference(g, e, r, f"gradient {i}")


def test_swin_windows_read_in_place_on_cuda():
    """Issue 12 item 6 step 3: Swin-T's attention block sizes (window 7, a 56x56 image shifted by
    3, heads of 32) through transformers' SwinModel: the windows are addressed (no roll or
    partition ops left in the graph), fxfuse.window_attention runs the in-place kernels, and the
    outputs and gradients equal eager's against float64."""
    from transformers import SwinConfig, SwinModel

    from tests.passes.test_attention_windows import _copies_left, _window_calls

    config = SwinConfig(image_size=224, patch_size=4, num_channels=3, embed_dim=64, depths=[2], num_heads=[2],
                        window_size=7)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = _Hidden(SwinModel(config, add_pooling_layer=False).eval()).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    res = fxfuse.rewrite(model, (x,))
    assert not res.misses and len(_window_calls(res)) == 2 and not _copies_left(res), res.report()
    expected, expected_grads = _run(copy.deepcopy(model).double(), x.double())
    eager, eager_grads = _run(copy.deepcopy(model), x)
    got, got_grads = _run(res.module, x)
    assert_close_to_reference(got, eager, expected, "output")
    assert_close_to_reference(got_grads[0], eager_grads[0], expected_grads[0], "input gradient")
    # The moved linears' weight gradients sum the same rows in image order instead of window order
    # (and the patch embedding's below them): compared as a whole (tests/tolerances.py).
    for i, (g, e, r) in enumerate(zip(got_grads[1:], eager_grads[1:], expected_grads[1:])):
        if g is not None:
            assert_close_as_a_whole(g, e, r, g.dtype, f"gradient {i + 1}")
