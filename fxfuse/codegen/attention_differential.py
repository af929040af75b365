"""The differential-attention forward (Differential Transformer): one kernel for
``attn(q1, k1, v) - lambda * attn(q2, k2, v)``, rendered from the spec of one half.

A program owns BLOCK_M queries of one (batch, head), as the plain forward's does, and holds both
halves' query tiles. Each key tile is visited once: it loads that tile of k1 and of k2, runs the
site's score steps on each product (the same steps text, rendered twice), keeps two online
softmaxes (m1/l1/acc1 and m2/l2/acc2), then loads the v tile once and adds both probability tiles'
products to their accumulators. At the end each half is normalised and rounded to the output's
dtype, as the user's two attentions were, then ``o1 - lambda * o2`` is formed with the user's two
roundings (lambda read once per program, a (1|B, 1|H, 1, 1) tensor, never rounded: ATen reads a
0-dim factor in float32). With ``SAVE`` it also writes each half's row max (natural units) and
sum and its output before rounding, in float32: what the backward kernels
(``attention_differential_backward``, in the same module) read instead of recomputing them.

Only specs whose every field this template knows are rendered (``renders``): no dropout, sinks,
RoPE or sigmoid (the pass never builds those; a spec that has them runs the two halves' own kernels).
"""
from __future__ import annotations

import dataclasses

from fxfuse.codegen.attention import LN2, _head_loads
from fxfuse.codegen.attention_differential_backward import backward_source
from fxfuse.codegen.attention_steps import exp, key_range, lit, longest_first, steps, tile_args, tile_loops
from fxfuse.codegen.kernel import Kernel, kernel_name
from fxfuse.lowering.attention import AttentionPlan, lower_attention
from fxfuse.spec_attention import AttentionSpec

_KNOWN_FIELDS = {"score_dtype", "steps", "prob_dtype", "inputs", "kv_groups", "safe_softmax", "differential"}


def renders(spec: AttentionSpec) -> str | None:
    """None when this template computes ``spec`` exactly, else why not."""
    if not spec.differential:
        return "the spec is not differential"
    for f in dataclasses.fields(spec):
        if f.name not in _KNOWN_FIELDS and getattr(spec, f.name) != f.default:
            return f"the differential kernel does not render the spec field {f.name!r}"
    return None


def _half(n: int, plan: AttentionPlan, masked: bool, precision: str, k_mask: str) -> list[str]:
    """One half's product, steps and online-softmax update on this key tile (its v product waits)."""
    return [
        f"k = tl.load(K{n} + off_b * stride_k{n}b + off_hkv * stride_k{n}h + offs_n[None, :] * stride_k{n}n"
        f" + offs_d[:, None] * stride_k{n}d,",
        f"            mask={k_mask}, other=0.0)",
        "if DOT_F32:", "    k = k.to(tl.float32)",
        f"s = tl.dot(q{n}, k{precision})", *steps(plan, masked=masked),
        f"m{n}_new = tl.maximum(m{n}, tl.max(s, 1))",
        f"m{n}_safe = tl.where(m{n}_new == float('-inf'), 0.0, m{n}_new)",
        f"alpha{n} = {exp(plan)}(m{n} - m{n}_safe)", f"p{n} = {exp(plan)}(s - m{n}_safe[:, None])",
        f"l{n} = l{n} * alpha{n} + tl.sum(p{n}, 1)"]


def _tile(plan: AttentionPlan, masked: bool) -> str:
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    k_mask, v_mask = "offs_d[:, None] < D", "offs_dv[None, :] < DV"
    if masked:
        k_mask, v_mask = f"(offs_n[None, :] < LK) & ({k_mask})", f"(offs_n[:, None] < LK) & ({v_mask})"
    lines = [
        *(["in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"] if masked else []),
        *_half(1, plan, masked, precision, k_mask), *_half(2, plan, masked, precision, k_mask),
        "# One load of the v tile for both halves.",
        "v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn"
        " + offs_dv[None, :] * stride_vd,",
        f"            mask={v_mask}, other=0.0)",
        "p1_v = p1.to(V.dtype.element_ty)  # the probabilities meet v in v's dtype, as in the user's code",
        "p2_v = p2.to(V.dtype.element_ty)",
        "if DOT_F32:", "    p1_v = p1_v.to(tl.float32)", "    p2_v = p2_v.to(tl.float32)", "    v = v.to(tl.float32)",
        f"acc1 = acc1 * alpha1[:, None] + tl.dot(p1_v, v{precision})",
        f"acc2 = acc2 * alpha2[:, None] + tl.dot(p2_v, v{precision})",
        "m1 = m1_new", "m2 = m2_new"]
    return "\n".join(" " * 8 + line for line in lines)


def _q_load(n: int) -> str:
    return (f"    q{n} = tl.load(Q{n} + off_b * stride_q{n}b + off_h * stride_q{n}h + offs_m[:, None] * stride_q{n}m"
            f" + offs_d[None, :] * stride_q{n}d,\n"
            f"                 mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)\n"
            f"    if DOT_F32:  # Triton's interpreter multiplies 16-bit tiles wrongly; float32 holds them exactly\n"
            f"        q{n} = q{n}.to(tl.float32)\n")


def _source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + tile_args(plan, False)
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs)))
    loops = tile_loops(plan, "n", *key_range(plan), lambda masked: _tile(plan, masked))
    pid_m = ("tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: they visit the most key tiles"
             if longest_first(plan) else "tl.program_id(0)")
    operands = "".join(f"stride_{x}b, stride_{x}h, stride_{x}{'m' if x[0] == 'q' else 'n'}, stride_{x}d, "
                       for x in ("q1", "k1", "q2", "k2"))
    row_max = {n: f"m{n} * {lit(LN2)}" if plan.log2_fold is not None else f"m{n}" for n in (1, 2)}
    safe = spec.safe_softmax
    norm = {n: f"tl.where(l{n} == 0.0, 1.0, l{n})" if safe else f"l{n}" for n in (1, 2)}
    state = "".join(f"    m{n} = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)\n"
                    f"    l{n} = tl.zeros([BLOCK_M], dtype=tl.float32)\n"
                    f"    acc{n} = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)\n" for n in (1, 2))
    return f'''# Generated by fxfuse from the spec below; the same spec always gives these same bytes.
# {spec.describe()}
# spec: {spec.to_json()}
import triton
import triton.language as tl


@triton.jit
def {name}_forward(Q1, K1, Q2, K2, V, LAM, O, STATS1, STATS2, O1F, O2F, {extras}
                   {operands}
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   stride_lb, stride_lh, {extra_strides}H, GROUPS, LQ, LK, D, DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   ROUND: tl.constexpr, SAVE: tl.constexpr,
                   DOT_F32: tl.constexpr):
    pid_m = {pid_m}
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUPS  # grouped-query attention: kv heads are read in place, never repeated
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
{_q_load(1)}{_q_load(2)}{state}{_head_loads(plan)}
    # Two online softmaxes over the same key tiles (see fxfuse.codegen.attention for one: a row
    # with every score -inf so far keeps p = 0 until a finite score arrives).
{loops}
    # Each half as the user's attention returned it (rounded to the output's dtype), then
    # o1 - lambda * o2 with the user's two roundings; lambda is read once, in float32.
    o1 = (acc1 / {norm[1]}[:, None]).to(O.dtype.element_ty).to(tl.float32)
    o2 = (acc2 / {norm[2]}[:, None]).to(O.dtype.element_ty).to(tl.float32)
    lam = tl.load(LAM + off_b * stride_lb + off_h * stride_lh).to(tl.float32)
    scaled = (lam * o2).to(O.dtype.element_ty).to(tl.float32)
    out = o1 - scaled
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV))
    if SAVE:  # for the backward kernels: each half's row max (natural units) and sum, and its output in float32
        rows = offs_m < LQ
        tl.store(STATS1 + pid_bh * LQ + offs_m, {row_max[1]}, mask=rows)
        tl.store(STATS1 + (tl.num_programs(1) + pid_bh) * LQ + offs_m, l1, mask=rows)
        tl.store(STATS2 + pid_bh * LQ + offs_m, {row_max[2]}, mask=rows)
        tl.store(STATS2 + (tl.num_programs(1) + pid_bh) * LQ + offs_m, l2, mask=rows)
        halves = (pid_bh * LQ + offs_m[:, None]) * DV + offs_dv[None, :]
        tl.store(O1F + halves, acc1 / {norm[1]}[:, None], mask=rows[:, None] & (offs_dv[None, :] < DV))
        tl.store(O2F + halves, acc2 / {norm[2]}[:, None], mask=rows[:, None] & (offs_dv[None, :] < DV))
'''


def generate(spec: AttentionSpec) -> Kernel:
    """The differential forward's kernel module for ``spec`` (pure text)."""
    reason = renders(spec)
    if reason is not None:
        raise ValueError(f"no differential attention kernel for this spec: {reason}")
    name = kernel_name("attention", spec.to_json())
    plan = lower_attention(dataclasses.replace(spec, differential=False))
    return Kernel(name, _source(name, spec, plan) + backward_source(name, spec, plan), spec=spec.describe())
