"""Launching the PolyNorm kernels (``fxfuse.codegen.polynorm`` renders them): one program per row
forward; backward programs each reduce their rows' weight and bias gradients, summed here."""
from __future__ import annotations

import torch
import triton

from fxfuse.runtime import functions
from fxfuse.runtime.norm import _launch, _programs_per_device, _rows
from fxfuse.spec_polynorm import PolyNormSpec


def forward(spec: PolyNormSpec, x: torch.Tensor, weights, bias) -> torch.Tensor:
    kernel = functions(spec)["forward"]
    n = x.shape[-1]
    x2 = _rows(x, n)
    y = torch.empty(x.shape, dtype=getattr(torch, spec.dtype), device=x.device)
    y2 = y.view(-1, n)
    rows = x2.shape[0]

    def run(c) -> None:
        kernel[(rows,)](x2, y2, *weights, bias, rows, n, x2.stride(0), y2.stride(0), spec.eps,
                        BLOCK_N=c.BLOCK_N, num_warps=c.num_warps)

    if rows:
        _launch(spec, "forward", x, n, run)
    return y


def backward(spec: PolyNormSpec, grad: torch.Tensor, x: torch.Tensor, weights, bias) -> list[torch.Tensor]:
    """[d_x, d_w for each term, d_bias]."""
    kernel = functions(spec)["backward"]
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(grad, n)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n)
    rows = x2.shape[0]
    if x.is_cuda:
        programs = min(rows, _programs_per_device(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    else:
        programs = min(rows, 4)
    programs = max(programs, 1)
    per_program = triton.cdiv(rows, programs)
    acc = torch.float64 if spec.dtype == "float64" else torch.float32
    k = len(spec.powers)
    partials = torch.zeros((programs, k + 1), dtype=acc, device=x.device)

    def run(c) -> None:
        kernel[(programs,)](dy2, x2, dx2, *weights, partials, rows, n, dy2.stride(0), x2.stride(0), dx2.stride(0),
                            spec.eps, per_program, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps)

    if rows:
        _launch(spec, "backward", x, n, run)
    sums = partials.sum(0)
    grads = [sums[i].reshape(w.shape).to(w.dtype, copy=True) for i, w in enumerate(weights)]
    return [dx, *grads, sums[k].reshape(bias.shape).to(bias.dtype, copy=True)]
