"""The attention backward kernels, generated from the same plan as the forward: one program per
key tile accumulates dK and dV over the query tiles, one per query tile accumulates dQ over the
key tiles (no atomics). Both recompute the probabilities from the row max and sum the forward
saved, and split their loops into masked and full tiles as the forward does."""
from __future__ import annotations

from fxfuse.codegen.attention_index import prologue
from fxfuse.codegen.attention_rope import rope_args, rope_strides, rotate_kt, rotate_q, unrotate
from fxfuse.codegen.attention_steps import (LOG2E, exp, grad_steps, key_range, lit, longest_first, query_range,
                                            sigmoid, sink_load, steps, tile_args, tile_loops)
from fxfuse.lowering.attention import AttentionPlan
from fxfuse.spec_attention import AttentionSpec


def dropped(spec: AttentionSpec, p: str) -> str:
    """The probabilities ``p`` as they meet v: with dropout, zeroed where dropped and rescaled."""
    return f"tl.where(keep, {p} * {lit(1.0 / (1.0 - spec.dropout))}, 0.0)" if spec.dropout else p


def load_q(masked: bool, n: str = "") -> list[str]:
    """Query tile offs_m of operand ``Q{n}`` as ``q{n}`` (rows past the end masked, if any): the
    plain kernels' ``q`` (n empty), or one half's of a differential site (n "1", "2")."""
    both = "(offs_m[:, None] < LQ) & (offs_d[None, :] < D)" if masked else "offs_d[None, :] < D"
    return [f"q{n} = tl.load(Q{n} + off_b * stride_q{n}b + off_h * stride_q{n}h + offs_m[:, None] * stride_q{n}m"
            f" + offs_d[None, :] * stride_q{n}d,", f"            mask={both}, other=0.0)"]


def load_do(masked: bool) -> list[str]:
    both = "(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV)" if masked else "offs_dv[None, :] < DV"
    return ["do = tl.load(DO + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,",
            f"             mask={both}, other=0.0)"]


def row_stats(spec: AttentionSpec, plan: AttentionPlan, masked: bool, n: str = "") -> list[str]:
    """The rows' max, sum (from ``STATS{n}``, the forward's) and delta (``DELTA{n}``) as
    ``row_max{n}``, ``row_sum{n}``, ``delta{n}``."""
    row = ", mask=offs_m < LQ" if masked else ""
    lines = [
        f"row_max{n} = tl.load(STATS{n} + pid_bh * LQ + offs_m{row}{', other=0.0' if masked else ''})",
        f"row_sum{n} = tl.load(STATS{n} + (tl.num_programs(1) + pid_bh) * LQ + offs_m{row}{', other=1.0' if masked else ''})",
        f"delta{n} = tl.load(DELTA{n} + pid_bh * LQ + offs_m{row}{', other=0.0' if masked else ''})"]
    if spec.safe_softmax:
        # A safe softmax's row with every score -inf (max -inf, sum 0) recomputes p = exp(-inf) / 1
        # = 0, so dS and every gradient of that row are 0 (not exp(-inf + inf) / 0 = NaN).
        lines += [f"row_max{n} = tl.where(row_sum{n} == 0.0, 0.0, row_max{n})  # safe softmax: p = 0 in a row with no finite score",
                  f"row_sum{n} = tl.where(row_sum{n} == 0.0, 1.0, row_sum{n})"]
    if plan.log2_fold is not None:
        lines.append(f"row_max{n} = row_max{n} * {lit(LOG2E)}  # log2 units, as the scores")
    return lines


def _load_q(spec: AttentionSpec, plan: AttentionPlan, masked: bool) -> list[str]:
    """q, dO and the rows' statistics of query tile offs_m (rows past the end masked, if any)."""
    lines = [*load_q(masked), *rotate_q(spec), *load_do(masked)]
    if not plan.sigmoid:  # p = sigmoid(s) needs no row statistics
        lines += row_stats(spec, plan, masked)
    return lines + ["if DOT_F32:", "    q = q.to(tl.float32)", "    do = do.to(tl.float32)"]


def load_k(masked: bool, n: str = "") -> list[str]:
    """Key tile offs_n of ``K{n}``, transposed, as ``kT{n}``."""
    mask = "(offs_n[None, :] < LK) & (offs_d[:, None] < D)" if masked else "offs_d[:, None] < D"
    return [f"kT{n} = tl.load(K{n} + off_b * stride_k{n}b + off_hkv * stride_k{n}h + offs_n[None, :] * stride_k{n}n"
            f" + offs_d[:, None] * stride_k{n}d,", f"             mask={mask}, other=0.0)"]


def load_v(masked: bool) -> list[str]:
    mask = "(offs_n[:, None] < LK) & (offs_dv[None, :] < DV)" if masked else "offs_dv[None, :] < DV"
    return ["vt = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,",
            f"             mask={mask}, other=0.0)"]


def _load_kv(spec: AttentionSpec, masked: bool) -> list[str]:
    return [*load_k(masked), *rotate_kt(spec, "kT"), *load_v(masked),
            "if DOT_F32:", "    kT = kT.to(tl.float32)", "    vt = vt.to(tl.float32)"]


def at(lines: list[str], n: int) -> str:
    return "\n".join(" " * n + line for line in lines)


def at_lines(lines: list[str]) -> str:
    return "".join("\n    " + line for line in lines)


def program_head(spec: AttentionSpec, plan: AttentionPlan) -> str:
    """A backward program's (batch, head) offsets, its seed and per-head loads (at 4 spaces)."""
    return '''    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)''' + ("\n    seed = tl.load(SEED)" if spec.dropout else "") + \
        "".join("\n    " + line for line in prologue(plan.loads))


def backward_source(name: str, spec: AttentionSpec, plan: AttentionPlan) -> str:
    """Two kernels recomputing the probabilities from the saved row statistics: dK/dV per key
    tile, dQ per query tile. dk and dv are per query head; the launcher sums a kv head's group."""
    extras = "".join(f"E{i}, " for i in range(len(plan.inputs))) + tile_args(plan, True) + \
        ("SEED, " if spec.dropout else "") + rope_args(spec)
    extra_strides = "".join(f"se{i}_b, se{i}_h, se{i}_m, se{i}_n, " for i in range(len(plan.inputs))) + \
        rope_strides(spec)
    precision = ', input_precision="ieee"' if plan.fp32_dot else ""
    # With dropout, dO @ v^T is the gradient of the dropped probabilities: masked and rescaled, it
    # is that of the softmax's (delta = rowsum(dO * O) with the dropped O is then rowsum(dP * P)).
    dropout = ["keep = dropout_keep(seed, pid_bh, offs_m, offs_n, LQ, LK)",
               f"dp = {dropped(spec, 'dp')}"] if spec.dropout else []

    # The probabilities and dS: a softmax's from the saved row statistics (the sink's share of the
    # sum included), a sigmoid's per score (dS = dP * p * (1 - p)).
    probs = [sigmoid("p")] if plan.sigmoid else [f"p = {exp(plan)}(s - row_max[:, None]) / row_sum[:, None]"]
    ds = "ds = dp * p * (1.0 - p)" if plan.sigmoid else "ds = p * (dp - delta[:, None])"

    def scores_grad(store_bias: bool, masked: bool) -> list[str]:
        return [*(["in_bounds = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"] if masked else []),
                f"s = tl.dot(q, kT{precision})", *steps(plan, factor_inputs=store_bias, masked=masked), *probs,
                f"dp = tl.dot(do, tl.trans(vt){precision})", *dropout, ds, *grad_steps(plan, store_bias, masked)]

    def dkdv_tile(masked: bool) -> str:
        return at([*_load_q(spec, plan, masked), *scores_grad(False, masked),
                    f"p_v = {dropped(spec, 'p')}.to(V.dtype.element_ty)  # as in the forward: p meets v in v's dtype",
                    "ds_q = ds.to(Q.dtype.element_ty)",
                    "if DOT_F32:", "    p_v = p_v.to(tl.float32)", "    ds_q = ds_q.to(tl.float32)",
                    f"dv += tl.dot(tl.trans(p_v), do{precision})", f"dk += tl.dot(tl.trans(ds_q), q{precision})"], 8)

    def dq_tile(masked: bool) -> str:
        return at([*_load_kv(spec, masked), *scores_grad(True, masked), "ds_k = ds.to(K.dtype.element_ty)",
                    "if DOT_F32:", "    ds_k = ds_k.to(tl.float32)",
                    f"dq += tl.dot(ds_k, tl.trans(kT){precision})"], 8)

    # The dq kernel visits every (query, key) tile of its rows once: it writes the biases' dS and
    # the factor tensors' gradients per score.
    adds = [k for k, step in enumerate(plan.steps) if step[0] == "add" and step[2] >= 0]
    factors = [k for k, step in enumerate(plan.steps) if step[0] in ("mul", "div") and step[2] >= 0]
    # Every per-score buffer comes before the flags: the launcher passes the buffers in this order
    # as positional arguments, the flags by name.
    bias_args = "".join(f"DB{k}, " for k in adds) + "".join(f"DF{k}, " for k in factors) + \
        ("DSINK, " if plan.sinks >= 0 else "") + \
        ("BIAS_GRAD: tl.constexpr, " if adds else "") + ("FACTOR_GRAD: tl.constexpr, " if factors else "") + \
        ("SINK_GRAD: tl.constexpr, " if plan.sinks >= 0 else "")
    # The sink logit c's gradient per row: sum_j dO.v_j dp_j/dc = -p_c * sum_j p_j dO.v_j = -p_c * delta.
    sink_grad = "" if plan.sinks < 0 else f'''
    if SINK_GRAD:  # d c = -p_c * rowsum(dO * O), p_c = exp(c - m) / l: the sink's probability
        {sink_load(plan)}
        tl.store(DSINK + pid_bh * LQ + offs_m, -tl.exp(sink - row_max) / row_sum * delta, mask=offs_m < LQ)'''
    args = f'''{("Q, K, V, DO, STATS, DELTA, " + extras).rstrip()}
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        {extra_strides}H, GROUPS, LQ, LK, D, DV'''
    consts = ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, "
              "DOT_F32: tl.constexpr, ROUND: tl.constexpr")
    head = program_head(spec, plan)
    pid_m = ("tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first"
             if longest_first(plan) else "tl.program_id(0)")
    return f'''

@triton.jit
def {name}_backward_dkdv({args}, DK, DV_OUT, {consts}):
{head}
    pid_n = tl.program_id(0)  # under a causal rule the first key tiles see the most queries: they start first
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
{at(_load_kv(spec, True), 4)}
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
{tile_loops(plan, "m", *query_range(plan), dkdv_tile)}{at_lines(unrotate(spec, "k", "dk"))}
    rows = (pid_bh * LK + offs_n)[:, None]
    tl.store(DK + rows * D + offs_d[None, :], dk, mask=(offs_n[:, None] < LK) & (offs_d[None, :] < D))
    tl.store(DV_OUT + rows * DV + offs_dv[None, :], dv, mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV))


@triton.jit
def {name}_backward_dq({args}, DQ, {bias_args}{consts}):
{head}
    pid_m = {pid_m}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
{at(_load_q(spec, plan, True), 4)}{sink_grad}
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
{tile_loops(plan, "n", *key_range(plan), dq_tile)}{at_lines(unrotate(spec, "q", "dq"))}
    rows = (pid_bh * LQ + offs_m)[:, None]
    tl.store(DQ + rows * D + offs_d[None, :], dq, mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
'''
