"""Norm kernels: Triton source generated from a NormSpec (launched by ``fxfuse.runtime.norm``).

One program normalizes one row in registers (the row is read once and written once, which is
what makes a norm memory-bound at full bandwidth). The backward kernel recomputes the row's
statistics instead of saving them: it must read the row anyway, so recomputation costs no memory
traffic and saves a tensor per norm in training. Parameter gradients are reduced per program and
summed across programs afterwards.
"""
from __future__ import annotations

from fxfuse.codegen.kernel import Kernel, kernel_name
from fxfuse.lowering.norm import NormPlan, lower_norm
from fxfuse.spec import NormSpec

# Rows longer than this do not fit one program's registers; such sites run the torch reference.
MAX_ROW = 65536

_TL = {"float64": "tl.float64", "float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}


def _round(expr: str, dtype: str | None) -> str:
    return f"({expr}).to({_TL[dtype]}).to(ACC)" if dtype else expr


def _statistics(plan: NormPlan) -> list[str]:
    inv = "1.0 / tl.sqrt" if plan.acc == "float64" else "tl.rsqrt"
    if plan.inverse == "max_l2":  # F.normalize: the norm (rounded as torch rounds it), clamped below by eps
        return [f"norm = {_round('tl.sqrt(tl.sum(x * x, axis=0))', plan.input_round)}",
                "clamped = tl.maximum(norm, eps)",
                "rstd = 1.0 / clamped",
                "through = (norm >= eps).to(ACC)  # clamp_min passes the gradient only there",
                "n = x / clamped"]
    if plan.kind == "rms_norm":
        return [f"rstd = {inv}(tl.sum(x * x, axis=0) / N + eps)", "n = x * rstd"]
    return [
        "mean = tl.sum(x, axis=0) / N",
        "xm = tl.where(mask, x - mean, 0.0)",
        f"rstd = {inv}(tl.sum(xm * xm, axis=0) / N + eps)",
        "n = xm * rstd",
    ]


def _load_params(plan: NormPlan) -> list[str]:
    lines = []
    for i, (rounding, offset) in enumerate(plan.params):
        lines.append(f"p{i} = {_round(f'tl.load(P{i} + cols, mask=mask, other=0.0).to(ACC)', rounding)}")
        if offset:
            lines.append(f"p{i} = {_round(f'p{i} + {offset!r}', rounding)}")
    return lines


def _steps_forward(plan: NormPlan) -> list[str]:
    """v0 is the normalized value; v{k+1} the value after step k (kept for the backward pass)."""
    lines = [f"v0 = {_round('n', plan.norm_round)}"]
    if plan.scale != 1.0:
        lines.append(f"v0 = {_round(f'v0 * {plan.scale!r}', plan.norm_round)}")
    for k, (op, param, rounding, value) in enumerate(plan.steps):
        expr = f"v{k}" if op == "cast" else f"v{k} * {value!r}" if op == "scale" else \
            f"v{k} {'*' if op == 'mul' else '+'} p{param}"
        lines.append(f"v{k + 1} = {_round(expr, rounding)}")
    return lines


def _sum_terms(plan: NormPlan) -> tuple[str, str, list[str]]:
    """(leading arguments, term strides, first lines) of ``fxfuse.sum_norm``'s forward: the terms
    are loaded, scaled and added left to right, each product and partial sum rounded as the user's
    code rounds it (to the sum's dtype); the sum is stored for the residual stream and backward."""
    tensor = {i: j for j, i in enumerate(plan.sum_tensor_scales)}
    args = "".join(f"T{i}, " for i in range(len(plan.sum_scales))) + "".join(f"C{j}, " for j in range(len(tensor))) + \
        "S, Y, "
    lines = []
    for i, scale in enumerate(plan.sum_scales):
        name = "x" if i == 0 else "t"
        lines.append(f"{name} = tl.load(T{i} + row * stride_t{i} + cols, mask=mask, other=0.0).to(ACC)")
        if i in tensor:  # a 0-d tensor of the term's dtype: exact in the accumulator, the product rounded as eager's
            lines.append(f"{name} = {_round(f'{name} * tl.load(C{tensor[i]}).to(ACC)', plan.sum_round)}")
        elif scale != 1.0:  # the constant in the accumulator's dtype, as ATen's opmath holds it
            lines.append(f"{name} = {_round(f'{name} * tl.full([], {scale!r}, ACC)', plan.sum_round)}")
        if i:
            lines.append(f"x = {_round('x + t', plan.sum_round)}")
    lines.append("tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)")
    strides = "".join(f"stride_t{i}, " for i in range(len(plan.sum_scales)))
    return args, strides, lines


def _source(name: str, spec: NormSpec, plan: NormPlan) -> str:
    n_params = len(plan.params)
    p_args = "".join(f"P{i}, " for i in range(n_params))
    dp_args = "".join(f"DP{i}, " for i in range(n_params))
    last = f"v{len(plan.steps)}"
    fwd_in = ["x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)"]
    fwd_args, fwd_strides = "X, R, S, Y, ", "stride_x, stride_r, "
    if plan.sum_scales:
        fwd_args, fwd_strides, fwd_in = _sum_terms(plan)
    elif plan.residual:
        fwd_in += [
            "x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(ACC)",
            "tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)",
        ]
        if plan.sum_round:
            fwd_in.append(f"x = {_round('x', plan.sum_round)}  # the user's code normalizes the rounded sum")
    if plan.input_round:
        fwd_in.append(f"x = {_round('x', plan.input_round)}  # the statistics are of the rounded input")
    bwd_in = [f"x = {_round('x', plan.input_round)}"] if plan.input_round else []
    bwd_steps = []
    for k in reversed(range(len(plan.steps))):
        op, param, _, value = plan.steps[k]
        if op == "mul":
            bwd_steps += [f"dp{param} += g * v{k}", f"g = g * p{param}"]
        elif op == "add":
            bwd_steps.append(f"dp{param} += g")
        elif op == "scale":
            bwd_steps.append(f"g = g * {value!r}")
    if plan.scale != 1.0:
        bwd_steps.append(f"g = g * {plan.scale!r}")
    if plan.inverse == "max_l2":
        dx = "rstd * (g - through * n * tl.sum(g * n, axis=0))"
    elif plan.kind == "rms_norm":
        dx = "rstd * (g - n * (tl.sum(g * n, axis=0) / N))"
    else:
        dx = "rstd * (g - tl.sum(g, axis=0) / N - n * (tl.sum(g * n, axis=0) / N))"
    ds = " + tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(ACC)" if plan.residual else ""

    def block(lines, indent):
        return "\n".join(" " * indent + line for line in lines)

    return f'''# Generated by fxfuse from the spec below; the same spec always gives these same bytes.
# {spec.describe()}
# spec: {spec.to_json()}
import triton
import triton.language as tl

ACC: tl.constexpr = {_TL[plan.acc]}


@triton.jit
def {name}_forward({fwd_args}{p_args}n_rows, N, {fwd_strides}stride_s, stride_y, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
{block(fwd_in, 4)}
{block(_statistics(plan), 4)}
{block(_load_params(plan), 4)}
{block(_steps_forward(plan), 4)}
    tl.store(Y + row * stride_y + cols, {last}.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def {name}_backward(DY, DS, X, DX, {p_args}{dp_args}n_rows, N, stride_dy, stride_ds, stride_x, stride_dx, eps,
                    rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
{block(_load_params(plan), 4)}
{block([f"dp{i} = tl.zeros([BLOCK_N], dtype=ACC)" for i in range(n_params)], 4)}
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
{block(bwd_in + _statistics(plan), 8)}
{block(_steps_forward(plan), 8)}
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
{block(bwd_steps, 8)}
        dx = {dx}{ds}
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
{block([f"tl.store(DP{i} + pid * N + cols, dp{i}, mask=mask)" for i in range(n_params)], 4)}
'''


def generate(spec: NormSpec) -> Kernel:
    """The kernel module for ``spec``: its name and source (pure text: needs no GPU)."""
    name = kernel_name(spec.kind, spec.to_json())
    return Kernel(name, _source(name, spec, lower_norm(spec)), spec=spec.describe())
