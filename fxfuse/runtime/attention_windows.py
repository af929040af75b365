"""What the attention launches need to know of a spec with ``windows`` (Swin, see
fxfuse.ops.attention_windows and fxfuse.codegen.attention_windows): the operands are (B, Hp, Wp,
H, D) image tensors, the scores' batch is the windows' (B * nW) and each window has ws * ws rows.
Without windows every function here gives the (B, H, L, D) operands' own sizes and strides.
``partition`` and ``reverse`` are the renaming itself in torch (the operator's CPU path, the
pass's proof, the backward's per-row delta): plain torch, so every layer above can use them."""
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
    return partition(t, spec.windows) if spec.windows else t


def partition(x: Tensor, windows: tuple) -> Tensor:
    """(B, Hp, Wp, H, D) -> (B * nW, H, ws * ws, D): the image rolled by -shift, then cut into
    windows (row ``t`` of window ``w`` as the spec's ``windows`` says)."""
    ws, shift, hp, wp = windows
    b, _, _, h, d = x.shape
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, h, d).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b * (hp // ws) * (wp // ws), h, ws * ws, d)


def reverse(o: Tensor, windows: tuple) -> Tensor:
    """partition's inverse: (B * nW, H, ws * ws, Dv) -> (B, Hp, Wp, H, Dv), contiguous."""
    ws, shift, hp, wp = windows
    n, h, _, dv = o.shape
    b = n // ((hp // ws) * (wp // ws))
    x = o.reshape(b, hp // ws, wp // ws, h, ws, ws, dv).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, h, dv)
    if shift:
        x = torch.roll(x, (shift, shift), (1, 2))
    return x.contiguous()
