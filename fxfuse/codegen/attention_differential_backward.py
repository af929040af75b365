"""The differential-attention backward: two kernels for both halves of
``out = attn(q1, k1, v) - lambda * attn(q2, k2, v)``, rendered from the spec of one half with the
plain backward's pieces (``fxfuse.codegen.attention_backward``: the loads, the row statistics, the
score steps and their gradients, the tile loops).

Half 2's output gradient is ``-lambda * dO``, so everything that reads it folds lambda in: its
``dP2 = -lambda * dO v^T`` is the shared ``dP = dO v^T`` scaled (one product for both halves),
``delta2 = rowsum(dO2 * o2) = -lambda * rowsum(dO * o2)``, so ``dS2 = -lambda * p2 * (dP -
rowsum(dO * o2))``; and ``dv = p1^T dO + p2^T dO2 = (p1 - lambda p2)^T dO``, one product. The
launcher passes ``DELTA2 = rowsum(dO * o2)`` (also -dlambda per row).

- dK/dV: one program per key tile of a (batch, head) loads that tile of k1, k2 and v once and
  walks the query tiles, accumulating dk1, dk2 and dv.
- dQ: one program per query tile loads q1, q2 and dO once and walks the key tiles (each tile of
  k1, k2 and v read once for both halves), accumulating dq1 and dq2.

Both recompute each half's probabilities from the row max and sum the forward wrote (``SAVE``,
``fxfuse.codegen.attention_differential``). The halves run one after the other on a tile: the
score steps' masks (``flag{k}``) and softcaps (``tanh{k}``) are per half, recomputed for each.
Extra tensors' gradients (a bias needing one) are not written here: the operator takes the halves'
own backward for them.
"""
from __future__ import annotations

from fxfuse.codegen.attention_backward import at, load_do, load_k, load_q, load_v, program_head, row_stats
from fxfuse.codegen.attention_steps import exp, grad_steps, key_range, longest_first, query_range, steps, tile_args, \
    tile_loops
from fxfuse.lowering.attention import AttentionPlan
from fxfuse.spec_attention import AttentionSpec


def _halves_grad(plan: AttentionPlan, masked: bool, precision: str) -> list[str]:
    """dS of both halves on a (query, key) tile whose operands are loaded: ``ds1``, ``ds2`` (and
    ``p1``, ``p2``, the probabilities)."""
    lines = [*(["in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"] if masked else []),
             f"dp = tl.dot(do, tl.trans(vt){precision})  # dO v^T, shared: half 2's is -lambda times it"]
    for n, ds in (("1", "p1 * (dp - delta1[:, None])"), ("2", "-lam * p2 * (dp - delta2[:, None])")):
        lines += [f"s = tl.dot(q{n}, kT{n}{precision})", *steps(plan, masked=masked),
                  f"p{n} = {exp(plan)}(s - row_max{n}[:, None]) / row_sum{n}[:, None]",
                  f"ds = {ds}", *grad_steps(plan, False, masked), f"ds{n} = ds"]
    return lines


def _f32(*names: str) -> list[str]:
    return ["if DOT_F32:", *(f"    {x} = {x}.to(tl.float32)" for x in names)]


def backward_source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    """The two kernels' source (appended to the forward's module)."""
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + tile_args(plan, True)
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs)))
    operands = "".join(f"stride_{x}b, stride_{x}h, stride_{x}{'m' if x[0] == 'q' else 'n'}, stride_{x}d, "
                       for x in ("q1", "k1", "q2", "k2"))
    args = f'''Q1, K1, Q2, K2, V, DO, LAM, STATS1, STATS2, DELTA1, DELTA2, {extras}
        {operands}
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        stride_lb, stride_lh, {extra_strides}H, GROUPS, LQ, LK, D, DV'''
    consts = ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, "
              "DOT_F32: tl.constexpr, ROUND: tl.constexpr")
    head = program_head(spec, plan) + \
        "\n    lam = tl.load(LAM + off_b * stride_lb + off_h * stride_lh).to(tl.float32)  # lambda, in float32"

    def query_rows(masked: bool) -> list[str]:
        return [*load_q(masked, "1"), *load_q(masked, "2"), *load_do(masked), *row_stats(spec, plan, masked, "1"),
                *row_stats(spec, plan, masked, "2"), *_f32("q1", "q2", "do")]

    def key_cols(masked: bool) -> list[str]:
        return [*load_k(masked, "1"), *load_k(masked, "2"), *load_v(masked), *_f32("kT1", "kT2", "vt")]

    def dkdv_tile(masked: bool) -> str:
        return at([*query_rows(masked), *_halves_grad(plan, masked, precision),
                   "# dv = p1^T dO - lambda p2^T dO: the halves' probabilities combined, then one product",
                   "p_v = (p1 - lam * p2).to(V.dtype.element_ty)",
                   "ds1_q = ds1.to(Q1.dtype.element_ty)", "ds2_q = ds2.to(Q2.dtype.element_ty)",
                   *_f32("p_v", "ds1_q", "ds2_q"),
                   f"dv += tl.dot(tl.trans(p_v), do{precision})",
                   f"dk1 += tl.dot(tl.trans(ds1_q), q1{precision})", f"dk2 += tl.dot(tl.trans(ds2_q), q2{precision})"], 8)

    def dq_tile(masked: bool) -> str:
        return at([*key_cols(masked), *_halves_grad(plan, masked, precision),
                   "ds1_k = ds1.to(K1.dtype.element_ty)", "ds2_k = ds2.to(K2.dtype.element_ty)",
                   *_f32("ds1_k", "ds2_k"),
                   f"dq1 += tl.dot(ds1_k, tl.trans(kT1){precision})", f"dq2 += tl.dot(ds2_k, tl.trans(kT2){precision})"],
                  8)

    pid_m = ("tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first"
             if longest_first(plan) else "tl.program_id(0)")
    keys = "(offs_n[:, None] < LK) & (offs_d[None, :] < D)"
    return f'''

@triton.jit
def {name}_backward_dkdv({args}, DK1, DK2, DV_OUT, {consts}):
{head}
    pid_n = tl.program_id(0)  # under a causal rule the first key tiles see the most queries: they start first
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
{at(key_cols(True), 4)}
    dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
{tile_loops(plan, "m", *query_range(plan), dkdv_tile)}
    rows = (pid_bh * LK + offs_n)[:, None]
    tl.store(DK1 + rows * D + offs_d[None, :], dk1, mask={keys})
    tl.store(DK2 + rows * D + offs_d[None, :], dk2, mask={keys})
    tl.store(DV_OUT + rows * DV + offs_dv[None, :], dv, mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV))


@triton.jit
def {name}_backward_dq({args}, DQ1, DQ2, {consts}):
{head}
    pid_m = {pid_m}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
{at(query_rows(True), 4)}
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
{tile_loops(plan, "n", *key_range(plan), dq_tile)}
    rows = (pid_bh * LQ + offs_m)[:, None]
    tl.store(DQ1 + rows * D + offs_d[None, :], dq1, mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
    tl.store(DQ2 + rows * D + offs_d[None, :], dq2, mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
'''
