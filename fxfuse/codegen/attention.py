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

import math
import textwrap

from fxfuse.codegen.attention_index import emit, prologue
from fxfuse.codegen.kernel import Kernel, kernel_name
from fxfuse.lowering.attention import AttentionPlan, lower_attention
from fxfuse.spec_attention import AttentionSpec

_TL = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}


def _lit(x: float) -> str:
    return f"float('{x}')" if math.isinf(x) or math.isnan(x) else repr(float(x))


def _round(target: str, expr: str, dtype: str | None) -> list[str]:
    """``target = expr``, then the user's rounding to ``dtype`` when ROUND is on. The forward rounds
    as the user's code does; the backward recomputes without (as the torch formula does): the
    gradients of the unrounded scores are closer to the exact ones than those of rounded ones."""
    lines = [f"{target} = {expr}"] if expr != target else []
    if dtype:
        lines += ["if ROUND:", f"    {target} = {target}.to({_TL[dtype]}).to(tl.float32)"]
    return lines


def _tile(i: int) -> str:
    return (f"E{i} + off_b * se{i}_b + off_h * se{i}_h + offs_m[:, None] * se{i}_m + offs_n[None, :] * se{i}_n")


def _steps(plan: AttentionPlan, factor_inputs: bool = False) -> list[str]:
    """The score steps on a tile ``s``; step k's mask is ``flag{k}`` and factor tile ``fac{k}``
    (the backward kernels reuse them to take the gradient back through the steps). With
    ``factor_inputs`` a factor tensor's step also keeps its input scores as ``s_in{k}`` (the dq
    kernel's factor gradient is dS times them)."""
    lines = _round("s", "s", plan.score_round) if plan.score_round else []
    for k, (op, value, index, invert, window, rounding, index_expr) in enumerate(plan.steps):
        if op == "fill" and index_expr is not None:
            # Out-of-bounds rows stay visible (no NaN in unused rows); tiles no index mask touches
            # (``partial`` false, see lowering.attention_tiles) skip evaluating the expression.
            hide = emit(index_expr, f"hide{k}") + [f"flag{k} = in_bounds & hide{k}"]
            lines += [f"flag{k} = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)", "if partial:",
                      *("    " + line for line in hide)]
            expr = f"tl.where(flag{k}, {_lit(value)}, s)"
        elif op == "add" and index_expr is not None:
            # Zero outside the scores: past the end an expression may be huge (exp would overflow
            # in an unused row, and the backward multiplies that row's dS, inf * 0, into dK).
            lines += emit(index_expr, f"bias{k}")
            expr = f"s + tl.where(in_bounds, bias{k}, 0.0)"
        elif op in ("mul", "div"):
            if index != -1:
                lines.append(f"fac{k} = tl.load({_tile(index)}, mask=in_bounds, other=1.0).to(tl.float32)")
                if factor_inputs:
                    lines.append(f"s_in{k} = s")
            expr = f"s {'*' if op == 'mul' else '/'} {_lit(value) if index == -1 else f'fac{k}'}"
        elif op == "fill":
            hidden = ("offs_n[None, :] > offs_m[:, None] + (LK - LQ)" if index == -1
                      else f"tl.load({_tile(index)}, mask=in_bounds, other={int(invert)}) != 0")
            if index == -1 and window:
                hidden = f"({hidden}) | (offs_n[None, :] <= offs_m[:, None] + (LK - LQ) - {window})"
            lines.append(f"flag{k} = {hidden}")  # out-of-bounds rows stay visible: no NaN in unused rows
            expr = f"tl.where(flag{k}, s, {_lit(value)})" if invert else f"tl.where(flag{k}, {_lit(value)}, s)"
        elif op == "add":
            expr = f"s + tl.load({_tile(index)}, mask=in_bounds, other=0.0).to(tl.float32)"
        elif op == "tanh":
            # tanh from tl.exp (no libdevice): sign(s) (1 - e^-2|s|) / (1 + e^-2|s|), which cannot
            # overflow; its value is kept as tanh{k} for the backward's 1 - tanh^2.
            lines.append(f"e{k} = tl.exp(-2.0 * tl.abs(s))")
            lines.append(f"tanh{k} = tl.where(s < 0, -1.0, 1.0) * (1.0 - e{k}) / (1.0 + e{k})")
            expr = f"tanh{k}"
        else:
            expr = "s"
        lines += _round("s", expr, rounding)
    return lines


def _key_range(plan: AttentionPlan) -> tuple[str, str]:
    """The key tiles a query tile (pid_m) must visit: all, or those a causal (windowed) mask does
    not hide entirely (see lowering: only when the hidden keys' probability is exactly zero)."""
    if not plan.skip_above_diagonal:
        return "0", "LK"
    hi = "tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)"
    if not plan.window:
        return "0", hi
    return f"tl.maximum(0, (pid_m * BLOCK_M + LK - LQ - {plan.window} + 1) // BLOCK_N * BLOCK_N)", hi


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
    return tl.rand(seed, counter) >= {_lit(spec.dropout)}


@triton.jit
def dropout_mask(SEED, KEEP, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), pid_bh, offs_m, offs_n, LQ, LK)
    tl.store(KEEP + (pid_bh.to(tl.int64) * LQ + offs_m[:, None]) * LK + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < LQ) & (offs_n[None, :] < LK))'''


def _dropped(spec: AttentionSpec, p: str) -> str:
    """The probabilities ``p`` as they meet v: with dropout, zeroed where dropped and rescaled."""
    return f"tl.where(keep, {p} * {_lit(1.0 / (1.0 - spec.dropout))}, 0.0)" if spec.dropout else p


def _tile_loop(plan: AttentionPlan, over: str, lo: str, hi: str) -> str:
    """The loop header over key tiles ("n": forward, dq) or query tiles ("m": dK/dV), at 4 spaces:
    a range, or with tile lists the listed tiles of this program's query (key) tile."""
    block, length, pid = ("BLOCK_N", "LK", "pid_m") if over == "n" else ("BLOCK_M", "LQ", "pid_n")
    start, offs = f"start_{over}", f"offs_{over}"
    if not plan.tile_lists:
        return (f"    for {start} in range({lo}, {hi}, {block}):\n"
                f"        {offs} = {start} + tl.arange(0, {block})")
    lists = "KV" if over == "n" else "Q"
    row = f"{pid} * tl.cdiv({length}, {block}) + t"
    return (f"    for t in range(0, tl.load({lists}_NUM + {pid})):\n"
            f"        {start} = tl.load({lists}_IDX + {row}) * {block}\n"
            f"        partial = tl.load({lists}_PARTIAL + {row}) != 0  # an index mask hides part of this tile\n"
            f"        {offs} = {start} + tl.arange(0, {block})")


def _tile_args(plan: AttentionPlan, backward: bool) -> str:
    if not plan.tile_lists:
        return ""
    return "KV_NUM, KV_IDX, KV_PARTIAL, " + ("Q_NUM, Q_IDX, Q_PARTIAL, " if backward else "")


def _head_loads(plan: AttentionPlan) -> str:
    return "".join("\n    " + line for line in prologue(plan.loads))


def _source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + _tile_args(plan, False) + \
        ("SEED, " if spec.dropout else "")
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs)))
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    lo, hi = _key_range(plan)
    loop = (f"    lo = {lo}\n    hi = {hi}\n" if not plan.tile_lists else "") + _tile_loop(plan, "n", "lo", "hi")
    steps = "\n".join(" " * 8 + line for line in _steps(plan))
    seed = "\n    seed = tl.load(SEED)" if spec.dropout else ""
    # A safe softmax's row with no finite score (l_i == 0, acc == 0) gives 0, not 0/0.
    safe_note = "  # safe softmax: a row with every score -inf gives 0" if spec.safe_softmax else ""
    to_v = "p_v = p.to(V.dtype.element_ty)  # the probabilities meet v in v's dtype, as in the user's code"
    if spec.dropout:  # after the row max and sum, which are the undropped softmax's
        to_v = ("keep = dropout_keep(seed, pid_bh, offs_m, offs_n, LQ, LK)\n"
                f"        p_v = {_dropped(spec, 'p')}.to(V.dtype.element_ty)  # dropped, then in v's dtype")
    return f'''# Generated by fxfuse from the spec below; the same spec always gives these same bytes.
# {spec.describe()}
# spec: {spec.to_json()}
import triton
import triton.language as tl{_dropout_helpers(spec)}


@triton.jit
def {name}_forward({("Q, K, V, O, STATS, " + extras).rstrip()}
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   {extra_strides}H, GROUPS, LQ, LK, D, DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   ROUND: tl.constexpr,
                   DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUPS  # grouped-query attention: kv heads are read in place, never repeated
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:  # Triton's interpreter multiplies 16-bit tiles wrongly; float32 holds their values exactly
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32){seed}{_head_loads(plan)}
{loop}
        in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)
        k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=(offs_n[None, :] < LK) & (offs_d[:, None] < D), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, k{precision})
{steps}
        # Keys past the end take no part; -inf gives them probability 0 whatever the steps did.
        s = tl.where(offs_n[None, :] < LK, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every score -inf so far keeps p = 0 (not exp(-inf + inf) = NaN) until a finite
        # score arrives; if none does, l_i stays 0 and the row is 0/0 = NaN, as softmax gives.
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
        {to_v}
        if DOT_F32:
            p_v = p_v.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v{precision})
        m_i = m_new
    out = acc / {"tl.where(l_i == 0.0, 1.0, l_i)" if spec.safe_softmax else "l_i"}[:, None]{safe_note}
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV))
    # The row max and sum, kept apart: m + log(l) would lose log(l) next to a huge finite fill
    # (finfo.min), and the backward would then recompute probabilities l times too large.
    tl.store(STATS + pid_bh * LQ + offs_m, m_i, mask=offs_m < LQ)
    tl.store(STATS + (tl.num_programs(1) + pid_bh) * LQ + offs_m, l_i, mask=offs_m < LQ)
'''


def generate(spec: AttentionSpec) -> Kernel:
    """The kernel module for ``spec``: its name and source (pure text: needs no GPU)."""
    name = kernel_name("attention", spec.to_json())
    plan = lower_attention(spec)
    return Kernel(name, _source(name, spec, plan) + backward_source(name, spec, plan), spec=spec.describe())


# ---- backward ------------------------------------------------------------------------------------

def _grad_steps(plan: AttentionPlan, store_bias: bool = False) -> list[str]:
    """dS back through the steps, last first: factors scale it, fills zero it where they hid.
    With ``store_bias``, an add step writes the dS it sees (the gradient of the scores it produced,
    so through every later step) to its (B, H, Lq, Lk) float32 buffer ``DB{k}`` when BIAS_GRAD is
    on, and a factor tensor's step its gradient per score (``dS * s_in`` for a product, ``-dS * s_in
    / t^2`` for a quotient, with dS its output's gradient and s_in its input, ``s_in{k}`` from
    ``_steps``) to ``DF{k}`` when FACTOR_GRAD is on; the launcher reduces each to the tensor's shape."""
    lines = []
    scores = "(pid_bh * LQ + offs_m[:, None]).to(tl.int64) * LK + offs_n[None, :]"
    for k in reversed(range(len(plan.steps))):
        op, value, index, invert, _, _, _ = plan.steps[k]
        if op == "add" and index >= 0 and store_bias:
            lines += ["if BIAS_GRAD:",
                      f"    tl.store(DB{k} + {scores}, ds, mask=in_bounds)"]
        elif op in ("mul", "div"):
            if index >= 0 and store_bias:
                grad = f"ds * s_in{k}" if op == "mul" else f"-ds * s_in{k} / (fac{k} * fac{k})"
                lines += ["if FACTOR_GRAD:", f"    tl.store(DF{k} + {scores}, {grad}, mask=in_bounds)"]
            lines.append(f"ds = ds {'*' if op == 'mul' else '/'} {_lit(value) if index == -1 else f'fac{k}'}")
        elif op == "fill":
            lines.append(f"ds = tl.where(flag{k}, ds, 0.0)" if invert else f"ds = tl.where(flag{k}, 0.0, ds)")
        elif op == "tanh":
            lines.append(f"ds = ds * (1.0 - tanh{k} * tanh{k})")
    return lines


def backward_source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    """Two kernels recomputing the probabilities from the saved log-sum-exp: one program per key
    block accumulates dk and dv over the queries, one per query block accumulates dq over the keys
    (no atomics). dk and dv are per query head; the launcher sums a kv head's group."""
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + _tile_args(plan, True) + \
        ("SEED, " if spec.dropout else "")
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs)))
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    # With dropout, dO @ v^T is the gradient of the dropped probabilities: masked and rescaled, it
    # is that of the softmax's (delta = rowsum(dO * O) with the dropped O is then rowsum(dP * P)).
    dropout = ["keep = dropout_keep(seed, pid_bh, offs_m, offs_n, LQ, LK)",
               f"dp = {_dropped(spec, 'dp')}"] if spec.dropout else []

    def body(store_bias: bool) -> str:
        return "\n".join(" " * 8 + line for line in [
            f"s = tl.dot(q, kT{precision})", *_steps(plan, factor_inputs=store_bias),
            "s = tl.where(offs_n[None, :] < LK, s, float('-inf'))",
            "p = tl.exp(s - row_max[:, None]) / row_sum[:, None]",
            f"dp = tl.dot(do, tl.trans(vt){precision})", *dropout,
            "ds = p * (dp - delta[:, None])", *_grad_steps(plan, store_bias)])

    # The dq kernel visits every (query, key) tile of its rows once: it writes the biases' dS and
    # the factor tensors' gradients per score.
    adds = [k for k, step in enumerate(plan.steps) if step[0] == "add" and step[2] >= 0]
    factors = [k for k, step in enumerate(plan.steps) if step[0] in ("mul", "div") and step[2] >= 0]
    # Every per-score buffer comes before the flags: the launcher passes the buffers in this order
    # as positional arguments, the flags by name.
    bias_args = "".join(f"DB{k}, " for k in adds) + "".join(f"DF{k}, " for k in factors) + \
        ("BIAS_GRAD: tl.constexpr, " if adds else "") + ("FACTOR_GRAD: tl.constexpr, " if factors else "")
    lo_m = "tl.maximum(0, (pid_n * BLOCK_N - (LK - LQ)) // BLOCK_M * BLOCK_M)" if plan.skip_above_diagonal else "0"
    hi_m = "LQ"
    if plan.skip_above_diagonal and plan.window:  # later queries' windows have moved past this key tile
        hi_m = f"tl.minimum(LQ, (pid_n + 1) * BLOCK_N - (LK - LQ) + {plan.window})"
    lo, hi = _key_range(plan)
    args = f'''{("Q, K, V, DO, STATS, DELTA, " + extras).rstrip()}
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        {extra_strides}H, GROUPS, LQ, LK, D, DV'''
    consts = ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, "
              "DOT_F32: tl.constexpr, ROUND: tl.constexpr")
    prologue = '''    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)''' + ("\n    seed = tl.load(SEED)" if spec.dropout else "") + _head_loads(plan)
    # A safe softmax's row with every score -inf (max -inf, sum 0) recomputes p = exp(-inf) / 1 = 0,
    # so dS and every gradient of that row are 0 (not exp(-inf + inf) / 0 = NaN).
    safe_stats = "\nrow_max = tl.where(row_sum == 0.0, 0.0, row_max)  # safe softmax: p = 0 in a row with no " \
        "finite score\nrow_sum = tl.where(row_sum == 0.0, 1.0, row_sum)" if spec.safe_softmax else ""
    load_q = f"""q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
do = tl.load(DO + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV), other=0.0)
row_max = tl.load(STATS + pid_bh * LQ + offs_m, mask=offs_m < LQ, other=0.0)
row_sum = tl.load(STATS + (tl.num_programs(1) + pid_bh) * LQ + offs_m, mask=offs_m < LQ, other=1.0)
delta = tl.load(DELTA + pid_bh * LQ + offs_m, mask=offs_m < LQ, other=0.0){safe_stats}
if DOT_F32:
    q = q.to(tl.float32)
    do = do.to(tl.float32)"""
    load_kv = """kT = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
             mask=(offs_n[None, :] < LK) & (offs_d[:, None] < D), other=0.0)
vt = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
             mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
if DOT_F32:
    kT = kT.to(tl.float32)
    vt = vt.to(tl.float32)"""

    def indent(text: str, n: int) -> str:
        return textwrap.indent(text, " " * n)

    return f'''

@triton.jit
def {name}_backward_dkdv({args}, DK, DV_OUT, {consts}):
{prologue}
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
{indent(load_kv, 4)}
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
{_tile_loop(plan, "m", lo_m, hi_m)}
        in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)
{indent(load_q, 8)}
{body(False)}
        p_v = {_dropped(spec, "p")}.to(V.dtype.element_ty)  # as in the forward: the probabilities meet v in v's dtype
        ds_q = ds.to(Q.dtype.element_ty)
        if DOT_F32:
            p_v = p_v.to(tl.float32)
            ds_q = ds_q.to(tl.float32)
        dv += tl.dot(tl.trans(p_v), do{precision})
        dk += tl.dot(tl.trans(ds_q), q{precision})
    rows = (pid_bh * LK + offs_n)[:, None]
    tl.store(DK + rows * D + offs_d[None, :], dk, mask=(offs_n[:, None] < LK) & (offs_d[None, :] < D))
    tl.store(DV_OUT + rows * DV + offs_dv[None, :], dv, mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV))


@triton.jit
def {name}_backward_dq({args}, DQ, {bias_args}{consts}):
{prologue}
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
{indent(load_q, 4)}
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
{_tile_loop(plan, "n", lo, hi)}
        in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)
{indent(load_kv, 8)}
{body(True)}
        ds_k = ds.to(K.dtype.element_ty)
        if DOT_F32:
            ds_k = ds_k.to(tl.float32)
        dq += tl.dot(ds_k, tl.trans(kT){precision})
    rows = (pid_bh * LQ + offs_m)[:, None]
    tl.store(DQ + rows * D + offs_d[None, :], dq, mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
'''
