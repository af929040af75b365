"""Attention kernels generated from an AttentionSpec: flash-attention forward and backward, and
nothing else: the runtime (``fxfuse.runtime.attention``) launches them.

One forward program owns BLOCK_M queries of one (batch, head) and streams the keys and values past
them in BLOCK_N tiles, keeping a running max and sum (the online softmax), so the (Lq, Lk) scores
never exist in memory. The site's score steps are inlined between the product and the softmax, in
the user's order, with the user's roundings. Every query row's max and sum are written too; the
backward kernels (dK/dV per key block, dQ per query block) recompute the probabilities from them.

With dropout, every kernel decides whether probability (b, h, i, j) survives with one function,
``dropout_keep``: a counter-based draw (Philox, ``tl.rand``) from the call's seed and the element's
own 64-bit index, so the backward kernels redraw exactly the forward's mask without storing it.
"""
from __future__ import annotations

from fxfuse.codegen.attention_backward import backward_source, dropped
from fxfuse.codegen.attention_index import prologue
from fxfuse.codegen.attention_rope import helpers as rope_helpers, rope_args, rope_strides, rotate_kt, rotate_q
from fxfuse.codegen.attention_steps import (exp, key_range, lit, longest_first, sigmoid, sink_load, steps, tile_args,
                                            tile_loops)
from fxfuse.codegen.kernel import Kernel, kernel_name
from fxfuse.lowering.attention import AttentionPlan, lower_attention
from fxfuse.spec_attention import AttentionSpec

LN2 = 0.6931471805599453  # the row max leaves log2 units: m * ln(2)


def _dropout_helpers(spec: AttentionSpec) -> str:
    """The keep decision shared by all kernels, and a kernel writing the whole mask (for tests, and
    for the torch backward formula where it stands in for the backward kernels)."""
    if not spec.dropout:
        return ""
    return f'''

# Dropout: whether probability (b, h, i, j) survives, drawn from the call's seed and the element's
# own Philox counter ((b * H + h) * LQ + i) * LK + j, 64-bit, so unique at any size; every kernel
# below calls this one function, so the backward redraws exactly the forward's mask.
@triton.jit
def dropout_keep(seed, pid_bh, offs_m, offs_n, LQ, LK):
    counter = (pid_bh.to(tl.int64) * LQ + offs_m[:, None]) * LK + offs_n[None, :]
    return tl.rand(seed, counter) >= {lit(spec.dropout)}


@triton.jit
def dropout_mask(SEED, KEEP, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), pid_bh, offs_m, offs_n, LQ, LK)
    tl.store(KEEP + (pid_bh.to(tl.int64) * LQ + offs_m[:, None]) * LK + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < LQ) & (offs_n[None, :] < LK))'''


def _head_loads(plan: AttentionPlan) -> str:
    return "".join("\n    " + line for line in prologue(plan.loads))


def _forward_tile(spec: AttentionSpec, plan: AttentionPlan, masked: bool) -> str:
    """One key tile of the forward's loop (at 8 spaces); a full tile (``masked`` false) loads and
    computes without the mask and bounds arithmetic."""
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    k_mask, v_mask = "offs_d[:, None] < D", "offs_dv[None, :] < DV"
    if masked:
        k_mask, v_mask = f"(offs_n[None, :] < LK) & ({k_mask})", f"(offs_n[:, None] < LK) & ({v_mask})"
    to_v = "p_v = p.to(V.dtype.element_ty)  # the probabilities meet v in v's dtype, as in the user's code"
    if spec.dropout:  # after the row max and sum, which are the undropped softmax's
        to_v = ("keep = dropout_keep(seed, pid_bh, offs_m, offs_n, LQ, LK)\n"
                f"p_v = {dropped(spec, 'p')}.to(V.dtype.element_ty)  # dropped, then in v's dtype")
    softmax = [
        "m_new = tl.maximum(m_i, tl.max(s, 1))",
        "m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)",
        f"alpha = {exp(plan)}(m_i - m_safe)", f"p = {exp(plan)}(s - m_safe[:, None])",
        "l_i = l_i * alpha + tl.sum(p, 1)"]
    update = ["acc = acc * alpha[:, None] + tl.dot(p_v, v{precision})", "m_i = m_new"]
    if plan.sigmoid:
        softmax, update = [sigmoid("p")], ["acc += tl.dot(p_v, v{precision})"]
    lines = [
        *(["in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"] if masked else []),
        "k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,",
        f"            mask={k_mask}, other=0.0)", *rotate_kt(spec, "k"),
        "if DOT_F32:", "    k = k.to(tl.float32)",
        f"s = tl.dot(q, k{precision})", *steps(plan, masked=masked), *softmax,
        "v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
        f"            mask={v_mask}, other=0.0)",
        *to_v.split("\n"),
        "if DOT_F32:", "    p_v = p_v.to(tl.float32)", "    v = v.to(tl.float32)",
        *(line.format(precision=precision) for line in update)]
    return "\n".join(" " * 8 + line for line in lines)


def query_tile(after_load: str = "") -> str:
    """A forward program's start after its pid_m and pid_bh (at 4 spaces, ending in a newline): the
    (batch, head) offsets and the query tile, loaded once (then ``after_load``: RoPE's rotation)."""
    return f'''    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUPS  # grouped-query attention: kv heads are read in place, never repeated
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0){after_load}
    if DOT_F32:  # Triton's interpreter multiplies 16-bit tiles wrongly; float32 holds their values exactly
        q = q.to(tl.float32)
'''


def _source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + tile_args(plan, False) + \
        ("SEED, " if spec.dropout else "") + rope_args(spec)
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs))) + \
        rope_strides(spec)
    rope = "".join("\n    " + line for line in rotate_q(spec))
    loops = tile_loops(plan, "n", *key_range(plan), lambda masked: _forward_tile(spec, plan, masked))
    seed = "\n    seed = tl.load(SEED)" if spec.dropout else ""
    pid_m = ("tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: they visit the most key tiles"
             if longest_first(plan) else "tl.program_id(0)")
    # A safe softmax's row with no finite score (l_i == 0, acc == 0) gives 0, not 0/0.
    safe_note = "  # safe softmax: a row with every score -inf gives 0" if spec.safe_softmax else ""
    units = ("\n    # The scores are in log2 units (log2(e) folded into the scale, or multiplied after the last\n"
             "    # rounding): exp2 of them is exp of the user's scores.") if plan.log2_fold is not None else ""
    row_max = f"m_i * {lit(LN2)}" if plan.log2_fold is not None else "m_i"
    start = ""
    if plan.sinks >= 0:  # the sink logit c is a key with no value row: max c, sum exp(c - c) = 1
        start = (f"\n    {sink_load(plan)}\n"
                 "    m_i = sink  # the row's sink logit joins its max and sum, and has no value row\n"
                 "    l_i = tl.where(sink == float('-inf'), 0.0, 1.0)")
    online = f"""    # The online softmax. A row with every score -inf so far keeps p = 0 (m_safe: not
    # exp(-inf + inf) = NaN) until a finite score arrives; if none does, l_i stays 0 and the row
    # is 0/0 = NaN, as softmax gives.{units}"""
    out = f'acc / {"tl.where(l_i == 0.0, 1.0, l_i)" if spec.safe_softmax else "l_i"}[:, None]{safe_note}'
    stats = f"""
    # The row max and sum, kept apart: m + log(l) would lose log(l) next to a huge finite fill
    # (finfo.min), and the backward would then recompute probabilities l times too large.
    tl.store(STATS + pid_bh * LQ + offs_m, {row_max}, mask=offs_m < LQ)
    tl.store(STATS + (tl.num_programs(1) + pid_bh) * LQ + offs_m, l_i, mask=offs_m < LQ)"""
    row_stats = ("    m_i = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)\n"
                 "    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)\n")
    if plan.sigmoid:  # each probability is its own score's sigmoid: no row statistics
        online = "    # Sigmoid attention: p = sigmoid(s) per score, summed into acc with no row max or sum."
        out, stats, row_stats = "acc", "", ""
    return f'''# Generated by fxfuse from the spec below; the same spec always gives these same bytes.
# {spec.describe()}
# spec: {spec.to_json()}
import triton
import triton.language as tl{_dropout_helpers(spec)}{rope_helpers(spec)}


@triton.jit
def {name}_forward({("Q, K, V, O, STATS, " + extras).rstrip()}
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   {extra_strides}H, GROUPS, LQ, LK, D, DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   ROUND: tl.constexpr,
                   DOT_F32: tl.constexpr):
    pid_m = {pid_m}
    pid_bh = tl.program_id(1)
{query_tile(rope)}{row_stats}    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32){seed}{_head_loads(plan)}{start}
{online}
{loops}
    out = {out}
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV)){stats}
'''


def generate(spec: AttentionSpec) -> Kernel:
    """The kernel module for ``spec``: its name and source (pure text: needs no GPU)."""
    if spec.differential:  # two softmaxes sharing v: a template of its own
        from fxfuse.codegen import attention_differential

        return attention_differential.generate(spec)
    name = kernel_name("attention", spec.to_json())
    plan = lower_attention(spec)
    source = _source(name, spec, plan) + backward_source(name, spec, plan)
    if spec.windows:  # Swin's windows read from image positions (fxfuse.codegen.attention_windows)
        from fxfuse.codegen.attention_windows import address_windows

        source = address_windows(source, spec)
    return Kernel(name, source, spec=spec.describe())
