"""A one-chunk split of the whole tensor (fxfuse.passes.whole_split, run by canonicalize): read as
the tensor, with torch.split's size check kept as a runtime assert; near-misses stay as written."""
import pytest
import torch

import fxfuse

PASSES = "canonicalize"


def split_by_lengths(x, lengths):  # a vision tower's per-image split, sizes read from data
    return torch.cat([c * 2 for c in torch.split(x, lengths.tolist(), dim=1)], dim=1)


def split_by_constant_size(x, lengths):  # one chunk: the chunk size is at least the length
    return torch.split(x, 64, dim=1)[0] * 2


def split_into_halves(x, lengths):  # rotate_half's split of the last dim: two chunks
    a, b = torch.split(x, [x.shape[-1] // 2, x.shape[-1] // 2], dim=-1)
    return torch.cat([-b, a], -1)


def split_another_dim(x, lengths):  # sizes from data on dim 1, the chunks cut along dim 2
    return torch.cat([c * 2 for c in torch.split(x, lengths.tolist(), dim=2)], dim=2)


def _x():
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))


def _run(fn, lengths):
    res = fxfuse.rewrite(fn, (_x(), lengths), passes=PASSES)
    return res, res.module(_x(), lengths)


@pytest.mark.parametrize("fn", [split_by_lengths, split_by_constant_size])
def test_a_whole_chunk_is_read_as_the_tensor(fn):
    lengths = torch.tensor([6])
    res, out = _run(fn, lengths)
    assert "aten.split" not in res.graph.code, res.graph.code
    assert ("aten._assert_scalar" in res.graph.code) == (fn is split_by_lengths), res.graph.code  # sizes from data are checked
    torch.testing.assert_close(out, fn(_x(), lengths), rtol=0, atol=0)


def test_lengths_that_do_not_sum_to_the_length_raise_as_in_eager():
    res, _ = _run(split_by_lengths, torch.tensor([6]))
    with pytest.raises(RuntimeError, match="split"):
        split_by_lengths(_x(), torch.tensor([5]))
    with pytest.raises(RuntimeError, match="split sizes"):
        res.module(_x(), torch.tensor([5]))


@pytest.mark.parametrize("fn, lengths", [
    (split_by_lengths, [2, 4]),  # two images: chunks that are not the whole
    (split_into_halves, [6]),  # two halves of the last dim
], ids=["two_chunks", "halves"])
def test_chunks_that_are_not_the_whole_stay(fn, lengths):
    lengths = torch.tensor(lengths)
    res, out = _run(fn, lengths)
    assert "aten.split" in res.graph.code, res.graph.code
    torch.testing.assert_close(out, fn(_x(), lengths), rtol=0, atol=0)


def test_a_split_on_another_dim_is_checked_against_that_dim():
    """Sizes read from data, the split along dim 2 (length 8): the chunk is the whole only when the
    size is 8 (the assert compares with dim 2's length, not dim 1's); with 6 eager raises, and so
    does the rewritten graph."""
    res, out = _run(split_another_dim, torch.tensor([8]))
    assert "aten.split" not in res.graph.code and "aten._assert_scalar" in res.graph.code, res.graph.code
    torch.testing.assert_close(out, split_another_dim(_x(), torch.tensor([8])), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="split"):
        split_another_dim(_x(), torch.tensor([6]))
    with pytest.raises(RuntimeError, match="split sizes"):
        res.module(_x(), torch.tensor([6]))


def attention_per_chunk(q, k, v, lengths):  # a vision tower's eager attention per image
    chunks = [torch.split(t, lengths.tolist(), dim=2) for t in (q, k, v)]
    outs = [torch.softmax(a @ b.transpose(-1, -2) * 0.25, -1) @ c for a, b, c in zip(*chunks)]
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("lengths", [[6], [2, 4]], ids=["one_chunk", "two_chunks"])
def test_attention_per_chunk_is_fused_only_when_the_chunk_is_the_whole(lengths):
    """One chunk: the attention reads q, k, v themselves and is fused. Two: each chunk's length is
    read from data (it may be 0): declined with that reason, not a crash, the output eager's."""
    qkv = [torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    lengths = torch.tensor(lengths)
    res = fxfuse.rewrite(attention_per_chunk, (*qkv, lengths))
    fused = [m for m in res.matches if m.kind == "attention"]
    misses = [m.reason for m in res.misses if m.kind == "attention"]
    if len(lengths) == 1:
        assert len(fused) == 1 and not misses, res.report()
    else:
        assert not fused and len(misses) == 2 and all("read from a tensor's values" in r for r in misses), res.report()
    torch.testing.assert_close(res.module(*qkv, lengths), attention_per_chunk(*qkv, lengths))
