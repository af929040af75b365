"""The split-key forward (flash-decoding) through Triton's interpreter: cut into key ranges and
combined, it gives the one-program forward's output and log-sum-exp, and is as close to a float64
reference, for every kind of score step the forward renders, ranges the causal window hides
entirely, grouped-query heads, a safe softmax's empty rows and dropout; and when a launch splits."""
import dataclasses
import math

import pytest
import torch

from fxfuse.codegen.attention_decode import generate_split, splittable
from fxfuse.ops.attention import reference
from fxfuse.runtime import attention_decode
from fxfuse.runtime.attention import forward as kernel_forward
from fxfuse.spec_attention import AttentionSpec, ScoreStep
from tests.passes.test_attention_kernel import B, D, H, _extras, _spec
from tests.tolerances import assert_close_to_reference, tolerance

LK = 70  # with the interpreter's 16-key tiles and 3 splits: ranges of 32, 32 and 6 keys


def _f64(spec: AttentionSpec) -> AttentionSpec:
    return dataclasses.replace(spec, score_dtype="float64", prob_dtype="float64", steps=tuple(
        dataclasses.replace(s, dtype="float64") for s in spec.steps))


def _check(spec, q, k, v, extras, splits=3, seed=None):
    whole, whole_stats = kernel_forward(spec, q, k, v, extras, seed=seed, splits=1)
    split, split_stats = kernel_forward(spec, q, k, v, extras, seed=seed, splits=splits)
    assert split.shape == whole.shape and split.dtype == whole.dtype and split.stride() == whole.stride()
    # float32 sites: only the order of float32 additions differs, a few ulps. 16-bit sites also
    # round each tile's probabilities to v's dtype relative to the range's own running max (as the
    # forward does relative to its running max): the table's tolerance for the dtype.
    rtol, atol = tolerance(split.dtype)
    torch.testing.assert_close(split.float(), whole.float(), rtol=rtol, atol=atol, equal_nan=True)
    lse = lambda stats: stats[0] + stats[1].log()  # noqa: E731
    torch.testing.assert_close(lse(split_stats), lse(whole_stats), rtol=1e-5, atol=1e-5, equal_nan=True)
    return split


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["plain", "causal", "causal_finite", "mask_bias", "factor", "fill_zero", "window", "softcap"])
@pytest.mark.parametrize("lq", [1, 3])
def test_split_matches_whole_and_reference(lq, kind, dtype):
    torch.manual_seed(0)
    spec, t = _spec(kind, dtype), getattr(torch, dtype)
    q, k, v = torch.randn(B, H, lq, D, dtype=t), torch.randn(B, H, LK, D, dtype=t), torch.randn(B, H, LK, D + 4, dtype=t)
    extras = _extras(kind, lq, LK)
    out = _check(spec, q, k, v, extras)
    wide = [e.double() if e.is_floating_point() else e for e in extras]
    expected = reference(_f64(spec), q.double(), k.double(), v.double(), wide)
    assert_close_to_reference(out, reference(spec, q, k, v, extras), expected, f"split {kind}")


def test_ranges_the_window_hides_entirely_take_no_part():
    # One query seeing only the last 5 keys: the first two ranges are wholly outside its window.
    spec = _spec("window", "float32")
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, H, LK, D), torch.randn(B, H, LK, D)
    out = _check(spec, q, k, v, [])
    torch.testing.assert_close(out, reference(spec, q, k, v, []), rtol=1e-5, atol=1e-5)


def test_grouped_query_heads_are_read_in_place():
    spec = dataclasses.replace(_spec("causal", "float32"), kv_groups=2)
    q, k, v = torch.randn(B, H, 2, D), torch.randn(B, H // 2, LK, D), torch.randn(B, H // 2, LK, D)
    out = _check(spec, q, k, v, [])
    torch.testing.assert_close(out, reference(spec, q, k, v, []), rtol=1e-5, atol=1e-5)


def test_safe_softmax_rows_with_no_visible_key_give_zero():
    spec = AttentionSpec("float32", (ScoreStep("fill", "float32", value=-math.inf, input=0),), "float32",
                         inputs=("mask",), safe_softmax=True)
    q, k, v = torch.randn(B, H, 2, D), torch.randn(B, H, LK, D), torch.randn(B, H, LK, D)
    hidden = torch.zeros(B, H, 2, LK, dtype=torch.bool)
    hidden[:, :, 0] = True  # query 0 sees no key at all
    hidden[:, :, 1, :40] = True  # query 1 sees only the last two ranges
    out = _check(spec, q, k, v, [hidden])
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out, reference(spec, q, k, v, [hidden]), rtol=1e-5, atol=1e-5)


def test_dropout_draws_the_same_mask_in_every_range():
    spec = dataclasses.replace(_spec("plain", "float32"), dropout=0.25)
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, H, LK, D), torch.randn(B, H, LK, D)
    seed = torch.tensor([1234], dtype=torch.int64)
    _check(spec, q, k, v, [], seed=seed)


def test_merged_head_layout_and_float32_output_of_the_backward():
    spec = _spec("causal", "bfloat16")
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.bfloat16) for n in (1, LK, LK))
    out, _ = kernel_forward(spec, q, k, v, [], merge_heads=True, splits=3)
    whole, _ = kernel_forward(spec, q, k, v, [], merge_heads=True, splits=1)
    assert out.stride() == whole.stride() and out.transpose(1, 2).is_contiguous()
    wide, _ = kernel_forward(spec, q, k, v, [], out_dtype=torch.float32, splits=3)
    assert wide.dtype == torch.float32
    rtol, atol = tolerance(torch.bfloat16)  # the probabilities still meet v in bf16 (see _check)
    torch.testing.assert_close(wide, kernel_forward(spec, q, k, v, [], out_dtype=torch.float32, splits=1)[0],
                               rtol=rtol, atol=atol)


def test_when_a_launch_splits():
    # 8 batch-heads on a 132-multiprocessor GPU (H100/H200) over 8k keys: 2 programs per
    # multiprocessor wanted, 33 ranges, capped by 256 keys per range.
    assert attention_decode.splits_for(8, 8192, 132) == 32
    assert attention_decode.splits_for(8, 32768, 132) == 33
    assert attention_decode.splits_for(132, 8192, 132) == 1  # the grid already fills the GPU
    assert attention_decode.splits_for(8, 300, 132) == 1  # too few keys to be worth a combine
    assert attention_decode.splits_for(1, 1 << 20, 132) == attention_decode.MAX_SPLITS
    spec = _spec("causal", "float32")
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, 4096, D)
    assert attention_decode.decode_splits(spec, q, k) == 1  # off a GPU the forward never splits


def test_split_kernel_renders_only_what_it_knows():
    spec = _spec("mask_bias", "bfloat16")
    assert splittable(spec) is None
    assert generate_split(spec).source == generate_split(spec).source  # same spec, same bytes
    # An index-expression mask (key j hidden after query i): its kernels visit tiles from lists.
    later = ("gt", "bool", ("var", "int64", "j"), ("var", "int64", "i"))
    listed = AttentionSpec("float32", (ScoreStep("fill", "float32", value=-math.inf, expr=later),))
    assert "lists" in splittable(listed)
    with pytest.raises(ValueError, match="no split-key kernel"):
        generate_split(listed)
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, LK, D)
    out, _ = kernel_forward(listed, q, k, k, [], splits=3)  # asked to split, it runs whole
    torch.testing.assert_close(out, reference(listed, q, k, k, []), rtol=1e-5, atol=1e-5)
