"""Launching the norm kernels (``fxfuse.codegen.norm`` renders them): one program per row forward;
backward programs each reduce their rows' parameter gradients, summed across programs here."""
from __future__ import annotations

import functools

import torch
import triton

from fxfuse.codegen.norm import MAX_ROW  # noqa: F401 (the operators ask the runtime what fits)
from fxfuse.lowering.norm import lower_norm
from fxfuse.runtime import functions
from fxfuse.runtime.attention import device_arch
from fxfuse.runtime.configs import choose, norm_configs
from fxfuse.spec import NormSpec


def _kernels(spec: NormSpec):
    """(forward, backward) Triton kernels for a spec, rendered, stored and loaded once per process."""
    fns = functions(spec)
    return fns["forward"], fns["backward"]


@functools.lru_cache(maxsize=None)
def _programs_per_device(index: int) -> int:
    # Enough programs to fill every SM a few times over; each then reduces its rows' weight gradient.
    return torch.cuda.get_device_properties(index).multi_processor_count * 4


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(spec: NormSpec, function: str, t: torch.Tensor, n: int, run) -> None:
    """Run ``run(config)`` with the tuned config of this row length (warps; the whole row is one
    block), see ``runtime.configs.norm_configs``."""
    configs = norm_configs(device_arch(t.device), n)
    run(choose((spec.to_json(), function, triton.next_power_of_2(n), t.dtype), configs, run))


def forward(spec: NormSpec, x: torch.Tensor, residual, params):
    """Launch the forward kernel; returns (y, sum or None)."""
    kernel = _kernels(spec)[0]
    n = x.shape[-1]
    x2 = _rows(x, n)
    y = torch.empty(x.shape, dtype=getattr(torch, spec.out_dtype), device=x.device)
    y2 = y.view(-1, n)
    r2 = _rows(residual, n) if residual is not None else x2
    s = torch.empty(x.shape, dtype=getattr(torch, spec.sum_dtype), device=x.device) if spec.residual else None
    s2 = s.view(-1, n) if s is not None else y2
    flat_params = [p.reshape(-1).contiguous() for p in params]  # the kernels index parameters densely
    rows = x2.shape[0]

    def run(c) -> None:
        kernel[(rows,)](x2, r2, s2, y2, *flat_params, rows, n, x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0),
                        spec.eps, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps)

    if rows:
        _launch(spec, "forward", x, n, run)
    return y, s


def forward_sum(spec: NormSpec, terms: list, params):
    """Launch ``fxfuse.sum_norm``'s forward kernel; returns (y, sum)."""
    kernel = _kernels(spec)[0]
    n = terms[0].shape[-1]
    terms, scales = terms[:len(spec.sum_scales)], terms[len(spec.sum_scales):]  # the 0-d scales follow the terms
    t2 = [_rows(t, n) for t in terms]
    y = torch.empty(terms[0].shape, dtype=getattr(torch, spec.out_dtype), device=terms[0].device)
    s = torch.empty(terms[0].shape, dtype=getattr(torch, spec.sum_dtype), device=terms[0].device)
    y2, s2 = y.view(-1, n), s.view(-1, n)
    flat_params = [p.reshape(-1).contiguous() for p in params]
    rows = y2.shape[0]

    def run(c) -> None:
        kernel[(rows,)](*t2, *scales, s2, y2, *flat_params, rows, n, *(t.stride(0) for t in t2), s2.stride(0), y2.stride(0),
                        spec.eps, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps)

    if rows:
        _launch(spec, "forward", terms[0], n, run)
    return y, s


def backward(spec: NormSpec, grad_y, grad_sum, src, params):
    """Launch the backward kernel; returns (d_src, [d_param, ...]) with d_src including grad_sum."""
    kernel = _kernels(spec)[1]
    n = src.shape[-1]
    x2, dy2 = _rows(src, n), _rows(grad_y, n)
    ds2 = _rows(grad_sum, n) if grad_sum is not None else dy2
    dx = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    dx2 = dx.view(-1, n)
    rows = x2.shape[0]
    if src.is_cuda:
        programs = min(rows, _programs_per_device(src.device.index if src.device.index is not None else torch.cuda.current_device()))
    else:
        programs = min(rows, 4)
    programs = max(programs, 1)
    per_program = triton.cdiv(rows, programs)
    acc = torch.float64 if lower_norm(spec).acc == "float64" else torch.float32
    partials = [torch.zeros((programs, n), dtype=acc, device=src.device) for _ in params]
    flat_params = [p.reshape(-1).contiguous() for p in params]  # the kernels index parameters densely

    def run(c) -> None:
        kernel[(programs,)](dy2, ds2, x2, dx2, *flat_params, *partials, rows, n, dy2.stride(0), ds2.stride(0),
                            x2.stride(0), dx2.stride(0), spec.eps, per_program, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps)

    if rows:
        _launch(spec, "backward", src, n, run)
    grads = [part.sum(0).reshape(p.shape).to(p.dtype) for part, p in zip(partials, params)]
    return dx, grads
