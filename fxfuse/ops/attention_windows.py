"""``torch.ops.fxfuse.window_attention``: Swin's (shifted) window attention on image tensors.

q, k, v are ``(B, Hp, Wp, H, D)`` image-layout tensors (the qkv projection's output viewed with its
channels split into heads, any strides) and the spec's ``windows`` is ``(ws, shift, Hp, Wp)``: the
site is ``fxfuse.attention`` over the ``(B * nW, H, ws * ws, D)`` windows of the image rolled by
``-shift`` (the user's ``roll`` then window partition), its output written back to the un-shifted
image positions, ``(B, Hp, Wp, H, Dv)`` contiguous (the user's window reverse then ``roll``). The
extra tensors, index expressions and every other spec field read the windowed scores as they did
in the user's code: window ``b * nW + wy * (Wp / ws) + wx`` in the batch dim.

This is the operator the pass ``address-windows`` (fxfuse.passes.attention_windows) calls once it
has proved the user's partition chain is exactly that renaming. Where the Triton kernels run (on
CUDA, or interpreted) they read each window's rows from their image pixels and store the output,
dq, dk and dv there (fxfuse.codegen.attention_windows): no partition or reverse copies, for one
key/value head per query head and pixels uniformly strided. Otherwise (the CPU torch path, and
those other cases) the operator builds the partition itself (one copy of q, k and v each, and of
the output) and runs ``fxfuse.attention`` on it: exactly the user's values. The backward
partitions the output's gradient the same way, runs ``fxfuse.attention_backward`` and writes dq,
dk, dv back to image positions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from fxfuse import config
from fxfuse.ops.attention import _kernel_grad, save_for_backward
from fxfuse.ops.optional_lists import listed
from fxfuse.runtime.attention_windows import partition, reverse
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec


@functools.lru_cache(maxsize=256)
def _specs(text: str) -> tuple[AttentionSpec, str]:
    """(the spec, the JSON of the same spec without windows: what each window computes)."""
    spec = AttentionSpec.from_json(text)
    if len(spec.windows) != 4:
        raise ValueError("fxfuse.window_attention needs a spec with windows (ws, shift, Hp, Wp); "
                         "use fxfuse.attention for attention without windows")
    return spec, dataclasses.replace(spec, windows=()).to_json()


def check_image(t: Tensor, windows: tuple, role: str) -> None:
    ws, shift, hp, wp = windows
    if t.dim() != 5 or tuple(t.shape[1:3]) != (hp, wp) or hp % ws or wp % ws or not 0 <= shift < ws:
        raise ValueError(f"fxfuse.window_attention: {role} has shape {list(t.shape)}; the spec's windows "
                         f"{list(windows)} (ws, shift, Hp, Wp) need a (B, {hp}, {wp}, H, D) image tensor with "
                         f"ws dividing Hp and Wp and 0 <= shift < ws")


@torch.library.custom_op("fxfuse::window_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor[]? extras, str spec, Tensor? seed=None) -> Tensor"))
def window_attention(q: Tensor, k: Tensor, v: Tensor, extras: Optional[list[Tensor]], spec: str,
                     seed: Tensor | None = None) -> Tensor:
    s, inner = _specs(spec)
    for t, role in ((q, "q"), (k, "k"), (v, "v")):
        check_image(t, s.windows, role)
    w, extras = s.windows, listed(extras)
    if _in_place(s, q, k, v, extras):  # the kernels read the windows from image positions: no copies
        from fxfuse.runtime import attention as kernels

        return kernels.forward(s, q, k, v, extras, seed=seed)[0]
    out = torch.ops.fxfuse.attention(partition(q, w), partition(k, w), partition(v, w), extras, inner, seed)
    return reverse(out, w)


def _in_place(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor], *more: Tensor) -> bool:
    """Whether the Triton kernels run (as for fxfuse.attention: on CUDA, or interpretation asked
    for) and read these image tensors in place (fxfuse.runtime.attention_windows.usable); a spec
    whose mask only sizes decide is resolved by fxfuse.attention first (the partition path)."""
    from fxfuse.ops.attention import _use_triton
    from fxfuse.runtime.attention_windows import usable

    return spec.size_mask < 0 and _use_triton(q, spec) and usable(spec, q, k, v, *more)


@window_attention.register_fake
def _(q, k, v, extras, spec, seed=None):
    s, _ = _specs(spec)
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=to_dtype(s.out_dtype))


def _backward(ctx, grad_out):
    q, k, v, seed, *extras = ctx.saved_tensors
    s, inner = _specs(ctx.spec)
    w = s.windows
    with config.patch(interpret=ctx.interpret):
        wanted = [need and e.dtype.is_floating_point for e, need in zip(extras, ctx.needs_grad)]
        if _in_place(s, q, k, v, extras, grad_out) and all(_kernel_grad(s, i) for i, want in enumerate(wanted) if want):
            from fxfuse.runtime import attention as kernels

            dq, dk, dv, *d_extras = kernels.backward(s, grad_out, q, k, v, extras, wanted, seed=seed)
        else:
            dq, dk, dv, *d_extras = torch.ops.fxfuse.attention_backward(
                partition(grad_out, w), partition(q, w), partition(k, w), partition(v, w), extras, ctx.needs_grad,
                inner, seed)
            dq, dk, dv = reverse(dq, w), reverse(dk, w), reverse(dv, w)
    d_extras = [d if want else None for d, want in zip(d_extras, wanted)]
    grads = (dq, dk, dv, d_extras, None, None)
    return grads[:len(ctx.needs_input_grad)]


window_attention.register_autograd(_backward, setup_context=save_for_backward)
