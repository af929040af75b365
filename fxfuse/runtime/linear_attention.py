"""Launching the linear attention kernels (``fxfuse.codegen.linear_attention`` renders them): a
program per (batch, block of E columns), each walking the whole sequence with its (D, E) state.

The tile sizes come from the head dims: all of D in one tile (BLOCK_D, up to ``MAX_D``), E in
blocks of at most 64 columns (the state then takes 64-128 float32 registers a thread at 4-8
warps), chunks of 64 rows on a GPU; the interpreter runs 16-row chunks (any chunk computes the
same sums, and small ones run fastest there)."""
from __future__ import annotations

import torch
import triton

from fxfuse.runtime import functions
from fxfuse.spec_linear_attention import LinearAttentionSpec

MAX_D = 256  # the features of a row are one tile: wider ones run the torch path
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(a: torch.Tensor, bt: torch.Tensor, v) -> str | None:
    """None when the kernels compute this call, else why not (the torch path runs it)."""
    if a.dtype not in DTYPES or bt.dtype != a.dtype or (v is not None and v.dtype != a.dtype):
        return f"dtype {a.dtype} (the kernels take float32, bfloat16 and float16 inputs of one dtype)"
    if a.shape[-1] > MAX_D:
        return f"feature dim {a.shape[-1]} > {MAX_D}"
    return None


def _tiles(d: int, e: int, device, causal: bool) -> dict:
    if device.type != "cuda":  # the interpreter: the smallest tiles tl.dot takes (E split past 16 columns)
        return {"BLOCK_C": 16, "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_E": 16, "DOT_F32": True,
                "PREC": "ieee", "num_warps": 1}
    return gpu_tiles(d, e, causal)


def gpu_tiles(d: int, e: int, causal: bool) -> dict:
    """The tiles and warps of a GPU launch (also what ``fxfuse.runtime.static_check`` compiles).
    Measured with ptxas for sm_90 in bf16 (``tests/codegen/test_linear_attention_kernels.py``):
    non-causal 64-row chunks, 64 columns of E, compile without spills at D = E = 64 and 128 except
    the d_b/d_v kernel at 128 (8 warps from a 64 x 64 state: at 4 warps Triton 3.8's d_b/d_v kernel,
    torch 2.14.1's, spills 236 registers at D = E = 64, Triton 3.9's none; at 8 neither spills); the causal chunk also holds a (C, C) block and its gradient, so it
    takes 32-row chunks at 8 warps (forward and d_a without spills at D = 64; 32 columns of E at
    D = 128, where the forward still spills some)."""
    block_d = max(16, triton.next_power_of_2(d))
    if causal:
        block_e = max(16, min(64 if block_d <= 64 else 32, triton.next_power_of_2(e)))
        return {"BLOCK_C": 32, "BLOCK_D": block_d, "BLOCK_E": block_e, "DOT_F32": False, "PREC": "tf32x3",
                "num_warps": 8, "num_stages": 2}
    block_e = max(16, min(64, triton.next_power_of_2(e)))
    warps = 8 if block_d * block_e >= 64 * 64 else 4
    return {"BLOCK_C": 64 if block_d <= 128 else 32, "BLOCK_D": block_d, "BLOCK_E": block_e, "DOT_F32": False,
            "PREC": "tf32x3", "num_warps": warps, "num_stages": 2}


def _batched(a, bt, v, g=None):
    """The 3-d operands: a single matrix product (mm) is a batch of one."""
    if a.dim() == 3:
        return a, bt, v, g
    return a[None], bt[None], v[None] if v is not None else None, g[None] if g is not None else None


def _strides(t, fallback) -> tuple:
    return tuple((t if t is not None else fallback).stride())


def forward(spec: LinearAttentionSpec, a: torch.Tensor, bt: torch.Tensor, v) -> torch.Tensor:
    kernel = functions(spec)["forward"]
    a3, bt3, v3, _ = _batched(a, bt, v)
    n, length, d = a3.shape
    s = bt3.shape[-1]
    e = v3.shape[-1] if v3 is not None else 1
    out = torch.empty((n, length, e), dtype=a.dtype, device=a.device)
    tiles = _tiles(d, e, a.device, spec.causal)
    if n and length and e:
        grid = (n, triton.cdiv(e, tiles["BLOCK_E"]))
        kernel[grid](a3, bt3, v3 if v3 is not None else bt3, out, length, s, d, e, *a3.stride(), *bt3.stride(),
                     *_strides(v3, bt3), *out.stride(), **tiles)
    return out[0] if a.dim() == 2 else out


def backward(spec: LinearAttentionSpec, grad: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, v) -> list:
    """[d_a, d_bt] (+ [d_v] with values): d_a and d_bt in float32, the gradients of the features
    (``fxfuse::linear_attention_backward`` chains them through the spec's feature maps and rounds)."""
    fns = functions(spec)
    a3, bt3, v3, g3 = _batched(a, bt, v, grad)
    n, length, d = a3.shape
    s = bt3.shape[-1]
    e = g3.shape[-1]
    tiles = _tiles(d, e, a.device, spec.causal)
    blocks = triton.cdiv(e, tiles["BLOCK_E"])
    # d_a and d_b sum over E: each block of E columns writes its float32 partial, added below.
    da = torch.zeros((blocks, n, length, d), dtype=torch.float32, device=a.device)
    db = torch.zeros((blocks, n, s, d), dtype=torch.float32, device=a.device)
    launch = bool(n and length and s and e)  # else every gradient is zero (no query sees a key)
    dv = (torch.empty if launch else torch.zeros)((n, s, e), dtype=v.dtype, device=a.device) if v is not None else None
    v_ptr = v3 if v3 is not None else bt3
    common = (length, s, d, e, *a3.stride(), *bt3.stride(), *_strides(v3, bt3), *g3.stride())
    if launch:
        fns["backward_da"][(n, blocks)](g3, bt3, v_ptr, da, *common, *da.stride()[:3], **tiles)
        dv_args = (dv, *dv.stride()) if dv is not None else ()
        fns["backward_dbdv"][(n, blocks)](g3, a3, bt3, v_ptr, db, *dv_args, *common, *db.stride()[:3], **tiles)
    # d_a, d_bt stay float32: the operator takes them back through its feature maps, then rounds once
    grads = [da.sum(0), db.sum(0).transpose(1, 2)] + ([dv] if dv is not None else [])
    return [t[0] for t in grads] if a.dim() == 2 else grads
