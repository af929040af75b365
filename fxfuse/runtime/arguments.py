"""What the attention launches take besides q, k, v: output buffers laid out as the operator
promises, the dropout seed, and the extra tensors as the kernels read them. Plain torch (no
Triton), so the operators' fake implementations can use it too."""
from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.spec_attention import AttentionSpec


def output_buffer(shape4, dtype: torch.dtype, device, merge_heads: bool) -> Tensor:
    """An empty (B, H, Lq, Dv) output: contiguous, or with ``merge_heads`` laid out in
    (B, Lq, H, Dv) memory order (a permuted view), so that ``out.transpose(1, 2).reshape(B, Lq,
    H * Dv)`` -- the usual head merge -- is a view, not a copy."""
    b, h, lq, dv = shape4
    if merge_heads:
        return torch.empty((b, lq, h, dv), dtype=dtype, device=device).permute(0, 2, 1, 3)
    return torch.empty((b, h, lq, dv), dtype=dtype, device=device)


def contiguous_strides(shape) -> tuple:
    """The strides ``torch.empty(shape)`` has (``make_contiguous_strides_for``'s: a size-0 dim
    counts as 1). Plain Python for integer sizes: torch's helper (SymInt-aware, ``sym_max`` per
    dim) cost about 45 us a call, paid by every CPU attention call to check its output's layout."""
    if not all(type(n) is int for n in shape):
        from torch._prims_common import make_contiguous_strides_for

        return tuple(make_contiguous_strides_for(shape))
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n if n > 1 else 1
    return tuple(reversed(strides))


def check_seed(spec: AttentionSpec, seed: Tensor | None) -> None:
    """A spec with dropout draws its mask from a one-element int64 seed tensor (both paths)."""
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"fxfuse.attention with dropout {spec.dropout:g} needs a one-element int64 seed tensor, "
                         f"got {seed!r}")


def extra_4d(e: Tensor, shape4) -> Tensor:
    """An extra tensor as the kernel reads it: (B, H, Lq, Lk) with broadcast dims at stride 0."""
    if e.dtype == torch.bool:
        e = e.view(torch.uint8)  # same bytes; pointers to bool are awkward in Triton
    return e.reshape((1,) * (4 - e.dim()) + tuple(e.shape)).expand(shape4)


def seed_args(spec: AttentionSpec, seed) -> list:
    """The seed argument of a kernel with dropout (a 0-dim int64 tensor on the inputs' device)."""
    if not spec.dropout:
        return []
    check_seed(spec, seed)
    return [seed]
