"""What the attention launches need to know of a spec with ``windows`` (Swin, see
fxfuse.ops.attention_windows and fxfuse.codegen.attention_windows): the operands are (B, Hp, Wp,
H, D) image tensors, the scores' batch is the windows' (B * nW) and each window has ws * ws rows.
Without windows every function here gives the (B, H, L, D) operands' own sizes and strides."""
from __future__ import annotations

import torch
from torch import Tensor

from fxfuse.spec_attention import AttentionSpec


def _windowed(spec: AttentionSpec) -> tuple[int, int] | None:
    if not spec.windows:
        return None
    ws, _, hp, wp = spec.windows
    return (hp // ws) * (wp // ws), ws * ws


def sizes(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """(B, H, Lq, D, Hkv, Lk, Dv) of the scores' (B, H, Lq, Lk) view."""
    w = _windowed(spec)
    if w is None:
        return (*q.shape, k.shape[1], k.shape[2], v.shape[3])
    nw, n = w
    return q.shape[0] * nw, q.shape[3], n, q.shape[4], k.shape[3], n, v.shape[4]


def dims(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """(D, Dv, Lq, Lk): what the launch configs and the tuning key depend on."""
    _, _, lq, d, _, lk, dv = sizes(spec, q, k, v)
    return d, dv, lq, lk


def strides4(spec: AttentionSpec, t: Tensor) -> tuple:
    """The (batch, head, row, channel) strides a kernel takes: an image tensor's batch, head,
    pixel and channel strides (its rows uniformly strided, see ``usable``)."""
    if not spec.windows:
        return tuple(t.stride())
    return t.stride(0), t.stride(3), t.stride(2), t.stride(4)


def usable(spec: AttentionSpec, *tensors: Tensor) -> bool:
    """Whether the window kernels read these image tensors in place: one key/value head per query
    head and every tensor's pixels uniformly strided (stride(1) == Wp * stride(2))."""
    return spec.kv_groups == 1 and all(t.stride(1) == t.shape[2] * t.stride(2) or t.shape[1] == 1 for t in tensors)


def image_buffer(spec: AttentionSpec, like: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """An empty contiguous (B, Hp, Wp, H, channels) image tensor."""
    return torch.empty((*like.shape[:4], channels), dtype=dtype, device=like.device)


def rows_of(t: Tensor, spec: AttentionSpec) -> Tensor:
    """A per-row (B, Hp, Wp, H, 1) image tensor in the scores' (B * nW, H, N, 1) order (the
    backward's delta); as it is without windows."""
    if not spec.windows:
        return t
    from fxfuse.ops.attention_windows import partition

    return partition(t, spec.windows)
