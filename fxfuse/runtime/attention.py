"""Launching the attention kernels (``fxfuse.codegen.attention`` renders them): the forward, the
two backward kernels and the dropout-mask kernel, with their grids, tile lists and tile sizes."""
from __future__ import annotations

import torch
import triton

from fxfuse.lowering.attention_tiles import tile_lists
from fxfuse.runtime import functions
from fxfuse.runtime.arguments import extra_4d, output_buffer, seed_args
from fxfuse.spec_attention import AttentionSpec

BLOCK_M = 16
BLOCK_N = 16  # tl.dot needs at least 16 along every dimension on GPUs


def dropout_mask(spec: AttentionSpec, seed: torch.Tensor, shape4, device) -> torch.Tensor:
    """The keep mask (B, H, Lq, Lk) bool that the kernels draw for ``seed``, from the same
    ``dropout_keep`` function."""
    kernel = functions(spec)["dropout_mask"]
    b, h, lq, lk = shape4
    keep = torch.empty((b, h, lq, lk), dtype=torch.uint8, device=device)
    if keep.numel():
        kernel[(triton.cdiv(lq, BLOCK_M), triton.cdiv(lk, BLOCK_N), b * h)](
            *seed_args(spec, seed), keep, lq, lk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return keep.bool()


def _tiles(spec: AttentionSpec, shape4, device) -> tuple:
    """The tile lists the kernels read when the spec has index-expression masks, else ()."""
    if not any(s.op == "fill" and s.expr is not None for s in spec.steps):
        return ()
    return tile_lists(spec, shape4, BLOCK_M, BLOCK_N, device)


def forward(spec: AttentionSpec, q, k, v, extras, out_dtype: torch.dtype | None = None, seed=None,
            merge_heads: bool = False):
    """Launch the forward kernel; returns (out (B, H, Lq, Dv), stats (2, B*H, Lq) float32): each
    query row's running max m and sum l (its log-sum-exp is m + log(l)), of the undropped scores.

    ``out_dtype`` (the backward's float32) also turns the user's roundings of the scores off, so
    that the log-sum-exp matches the backward's unrounded recomputation. ``seed`` draws the
    dropout mask of a spec with dropout (see ``dropout_mask``). With ``merge_heads`` the output is
    written in (B, Lq, H, Dv) memory order (the kernel stores through its strides)."""
    kernel = functions(spec)["forward"]
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    out = output_buffer((b, h, lq, dv), out_dtype or v.dtype, q.device, merge_heads)
    stats = torch.empty((2, b * h, lq), dtype=torch.float32, device=q.device)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    tiles = _tiles(spec, (b, h, lq, lk), q.device)[:3]
    if out.numel():
        kernel[(triton.cdiv(lq, BLOCK_M), b * h)](
            q, k, v, out, stats, *es, *tiles, *seed_args(spec, seed), *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *(s for e in es for s in e.stride()), h, spec.kv_groups, lq, lk, d, dv,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
            BLOCK_DV=max(16, triton.next_power_of_2(dv)), DOT_F32=not q.is_cuda, ROUND=out_dtype is None,
        )
    return out, stats


def backward(spec: AttentionSpec, grad_out, q, k, v, extras, extra_grads: list[bool] | None = None, seed=None):
    """Launch the backward kernels; returns [dq, dk, dv] in q's, k's and v's shapes and dtypes,
    then one entry per extra: with ``extra_grads`` (one flag per extra), the gradient of each
    flagged bias ("add" steps) or factor tensor ("mul"/"div" steps) in its shape and dtype, else
    None. ``seed`` is the forward's: the kernels redraw its dropout mask.

    The forward kernel runs again for the log-sum-exp and the output (delta = rowsum(dO * O)):
    the operator does not return them yet, so the backward pays one forward pass.
    """
    # delta = rowsum(dO * O) stands for rowsum(dP * P): with O rounded to bf16 its error is the
    # same for every key of a row and adds up coherently in dq and dk, so O is kept in float32.
    out, stats = forward(spec, q, k, v, extras, out_dtype=torch.float32, seed=seed)
    b, h, lq, d = q.shape
    hkv, lk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    delta = (grad_out.float() * out.float()).sum(-1).reshape(b * h, lq).contiguous()
    dq = torch.empty((b, h, lq, d), dtype=torch.float32, device=q.device)
    dk = torch.empty((b, h, lk, d), dtype=torch.float32, device=q.device)
    dv = torch.empty((b, h, lk, dv_dim), dtype=torch.float32, device=q.device)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    common = (q, k, v, grad_out, stats, delta, *es, *_tiles(spec, (b, h, lq, lk), q.device), *seed_args(spec, seed),
              *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *(s for e in es for s in e.stride()), h,
              spec.kv_groups, lq, lk, d, dv_dim)
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv_dim)), DOT_F32=not q.is_cuda, ROUND=False)
    kernels = functions(spec)
    extra_grads = list(extra_grads or [False] * len(extras))
    # (step, extra) of the biases' and the factor tensors' steps
    adds = [(n, step.input) for n, step in enumerate(spec.steps) if step.op == "add" and step.input >= 0]
    factors = [(n, step.input) for n, step in enumerate(spec.steps) if step.op in ("mul", "div") and step.input >= 0]
    want_bias, want_factor = (any(extra_grads[i] for _, i in steps) for steps in (adds, factors))
    # Per score, each add step's dS and each factor step's gradient, zeros where the kernel skips a
    # tile (exactly zero probability there; no factor tensor follows the fill that hides it, see
    # lowering.skippable_fill, so dS is 0 there too); only allocated when a tensor of that kind
    # needs its gradient (dq stands in otherwise: the flag is off, nothing is stored). One flag
    # per kind, a buffer per step.
    per_score = {n: torch.zeros((b, h, lq, lk), dtype=torch.float32, device=q.device)
                 for steps, want in ((adds, want_bias), (factors, want_factor)) if want for n, _ in steps}
    dq_meta = dict(meta, **({"BIAS_GRAD": want_bias} if adds else {}),
                   **({"FACTOR_GRAD": want_factor} if factors else {}))
    if q.numel() and k.numel():
        kernels["backward_dkdv"][(triton.cdiv(lk, BLOCK_N), b * h)](*common, dk, dv, **meta)
        kernels["backward_dq"][(triton.cdiv(lq, BLOCK_M), b * h)](
            *common, dq, *(per_score.get(n, dq) for n, _ in adds + factors), **dq_meta)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if spec.kv_groups > 1:  # a kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (hkv, spec.kv_groups)).sum(2) for g in (dk, dv))
    d_extras: list[torch.Tensor | None] = [None] * len(extras)
    for n, i in adds + factors:
        if extra_grads[i]:  # summed over the dims the tensor broadcasts along, as autograd would
            shape4 = (1,) * (4 - extras[i].dim()) + tuple(extras[i].shape)
            d = per_score[n].sum_to_size(shape4).reshape(extras[i].shape)
            d_extras[i] = d if d_extras[i] is None else d_extras[i] + d
    return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            *(d if d is None else d.to(e.dtype) for d, e in zip(d_extras, extras))]
