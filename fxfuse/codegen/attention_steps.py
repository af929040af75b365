"""The pieces every attention kernel shares: the score steps on a tile (and their gradients), and
the loops over key (query) tiles, split as FlashAttention-2 does into the tiles that need mask and
bounds arithmetic and those that provably do not.

A tile is *full* when every score in it is in bounds and visible to every causal rule of the
spec: there the kernels load without masks, skip the causal comparison and the bounds ``where``.
Which tiles are full follows from the program's tile position and the sizes alone (aligned
bottom-right, as the pass proved the causal rule), so the split is a few integer operations per
program, computed for any BLOCK_M / BLOCK_N. Kernels that read tile lists (index-expression
masks) already skip the expressions in tiles no mask touches; they keep one loop.
"""
from __future__ import annotations

import math

from fxfuse.codegen.attention_index import emit
from fxfuse.lowering.attention import AttentionPlan

_TL = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def lit(x: float) -> str:
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


def _load(i: int, other: str, masked: bool) -> str:
    return f"tl.load({_tile(i)}, mask=in_bounds, other={other})" if masked else f"tl.load({_tile(i)})"


def steps(plan: AttentionPlan, factor_inputs: bool = False, masked: bool = True) -> list[str]:
    """The score steps on a tile ``s``; step k's mask is ``flag{k}`` and factor tile ``fac{k}``
    (the backward kernels reuse them to take the gradient back through the steps). With
    ``factor_inputs`` a factor tensor's step also keeps its input scores as ``s_in{k}`` (the dq
    kernel's factor gradient is dS times them). On a full tile (``masked`` false) nothing is
    loaded under a mask and the causal rule, which hides nothing there, is not evaluated. With
    ``plan.log2_fold`` the scores leave in log2 units (times log2(e), folded into a scale)."""
    lines = _round("s", "s", plan.score_round) if plan.score_round else []
    for k, (op, value, index, invert, window, rounding, index_expr) in enumerate(plan.steps):
        if op == "fill" and index_expr is not None:
            # Out-of-bounds rows stay visible (no NaN in unused rows); tiles no index mask touches
            # (``partial`` false, see lowering.attention_tiles) skip evaluating the expression.
            hide = emit(index_expr, f"hide{k}") + [f"flag{k} = in_bounds & hide{k}"]
            lines += [f"flag{k} = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)", "if partial:",
                      *("    " + line for line in hide)]
            expr = f"tl.where(flag{k}, {lit(value)}, s)"
        elif op == "add" and index_expr is not None:
            # Zero outside the scores: past the end an expression may be huge (exp would overflow
            # in an unused row, and the backward multiplies that row's dS, inf * 0, into dK).
            lines += emit(index_expr, f"bias{k}")
            if index >= 0:  # a bias tensor plus the expression, summed in the expression's dtype first
                total = f"{_load(index, '0.0', masked)}.to(tl.float32) + bias{k}"
                dt = index_expr[1]
                lines.append(f"bias{k} = ({total}).to({_TL[dt]}).to(tl.float32)" if dt in ("bfloat16", "float16")
                             else f"bias{k} = {total}")
            expr = f"s + tl.where(in_bounds, bias{k}, 0.0)" if masked else f"s + bias{k}"
        elif op == "add" and index == -1:
            expr = f"s + {lit(value)}"  # a Python scalar
        elif op in ("mul", "div"):
            if index != -1:
                lines.append(f"fac{k} = {_load(index, '1.0', masked)}.to(tl.float32)")
                if factor_inputs:
                    lines.append(f"s_in{k} = s")
                expr = f"s {'*' if op == 'mul' else '/'} fac{k}"
            elif k == plan.log2_fold:  # exp2 below: the scale times log2(e), one multiply
                expr = f"s * {lit(value * LOG2E if op == 'mul' else LOG2E / value)}  # scale * log2(e)"
            else:
                expr = f"s {'*' if op == 'mul' else '/'} {lit(value)}"
        elif op == "fill":
            if index == -1 and not masked:
                continue  # a full tile: the causal rule hides nothing in it
            hidden = ("offs_n[None, :] > offs_m[:, None] + (LK - LQ)" if index == -1
                      else f"{_load(index, str(int(invert)), masked)} != 0")
            if index == -1 and window:
                hidden = f"({hidden}) | (offs_n[None, :] <= offs_m[:, None] + (LK - LQ) - {window})"
            lines.append(f"flag{k} = {hidden}")  # out-of-bounds rows stay visible: no NaN in unused rows
            expr = f"tl.where(flag{k}, s, {lit(value)})" if invert else f"tl.where(flag{k}, {lit(value)}, s)"
        elif op == "add":
            expr = f"s + {_load(index, '0.0', masked)}.to(tl.float32)"
        elif op == "tanh":
            # tanh from tl.exp (no libdevice): sign(s) (1 - e^-2|s|) / (1 + e^-2|s|), which cannot
            # overflow; its value is kept as tanh{k} for the backward's 1 - tanh^2.
            lines.append(f"e{k} = tl.exp(-2.0 * tl.abs(s))")
            lines.append(f"tanh{k} = tl.where(s < 0, -1.0, 1.0) * (1.0 - e{k}) / (1.0 + e{k})")
            expr = f"tanh{k}"
        else:
            expr = "s"
        lines += _round("s", expr, rounding)
    if plan.log2_fold == len(plan.steps):
        lines.append(f"s = s * {lit(LOG2E)}  # log2 units: exp2 below")
    if masked:  # Keys past the end take no part; -inf gives them probability 0 whatever the steps did.
        lines.append("s = tl.where(offs_n[None, :] < LK, s, float('-inf'))")
    return lines


def grad_steps(plan: AttentionPlan, store_bias: bool = False, masked: bool = True) -> list[str]:
    """dS back through the steps, last first: factors scale it, fills zero it where they hid.
    With ``store_bias``, an add step writes the dS it sees (the gradient of the scores it produced,
    so through every later step) to its (B, H, Lq, Lk) float32 buffer ``DB{k}`` when BIAS_GRAD is
    on, and a factor tensor's step its gradient per score (``dS * s_in`` for a product, ``-dS * s_in
    / t^2`` for a quotient, with dS its output's gradient and s_in its input, ``s_in{k}`` from
    ``steps``) to ``DF{k}`` when FACTOR_GRAD is on; the launcher reduces each to the tensor's shape.
    dS is the gradient of the natural-unit scores: a folded log2(e) is not part of it."""
    lines = []
    scores = "(pid_bh * LQ + offs_m[:, None]).to(tl.int64) * LK + offs_n[None, :]"
    where = ", mask=in_bounds" if masked else ""
    for k in reversed(range(len(plan.steps))):
        op, value, index, invert, _, _, _ = plan.steps[k]
        if op == "add" and index >= 0 and store_bias:
            lines += ["if BIAS_GRAD:", f"    tl.store(DB{k} + {scores}, ds{where})"]
        elif op in ("mul", "div"):
            if index >= 0 and store_bias:
                grad = f"ds * s_in{k}" if op == "mul" else f"-ds * s_in{k} / (fac{k} * fac{k})"
                lines += ["if FACTOR_GRAD:", f"    tl.store(DF{k} + {scores}, {grad}{where})"]
            lines.append(f"ds = ds {'*' if op == 'mul' else '/'} {lit(value) if index == -1 else f'fac{k}'}")
        elif op == "fill" and (masked or index != -1):
            lines.append(f"ds = tl.where(flag{k}, ds, 0.0)" if invert else f"ds = tl.where(flag{k}, 0.0, ds)")
        elif op == "tanh":
            lines.append(f"ds = ds * (1.0 - tanh{k} * tanh{k})")
    return lines


def sigmoid(target: str, s: str = "s") -> str:
    """``target = sigmoid(s)`` from tl.exp (no libdevice): 1 / (1 + e^-s) is 0 at s = -inf (a
    hidden or out-of-bounds key: e^inf is inf) and 1 at +inf, never NaN but for a NaN score."""
    return f"{target} = 1.0 / (1.0 + tl.exp(-{s}))  # sigmoid attention: no running max or sum"


def sink_load(plan: AttentionPlan) -> str:
    """Each query row's sink logit (the input ``plan.sinks``, read at key 0 of its (.., Lq, 1) column)."""
    i = plan.sinks
    return (f"sink = tl.load(E{i} + off_b * se{i}_b + off_h * se{i}_h + offs_m * se{i}_m, mask=offs_m < LQ, "
            "other=0.0).to(tl.float32)")


def exp(plan: AttentionPlan) -> str:
    """The exponential of the softmax: exp2 on scores in log2 units, else tl.exp."""
    return "tl.exp2" if plan.log2_fold is not None else "tl.exp"


def key_range(plan: AttentionPlan) -> tuple[str, str]:
    """The key tiles a query tile (pid_m) must visit: all, or those a causal (windowed) mask does
    not hide entirely (see lowering: only when the hidden keys' probability is exactly zero)."""
    if not plan.skip_above_diagonal:
        return "0", "LK"
    hi = "tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)"
    if not plan.window:
        return "0", hi
    return f"tl.maximum(0, (pid_m * BLOCK_M + LK - LQ - {plan.window} + 1) // BLOCK_N * BLOCK_N)", hi


def query_range(plan: AttentionPlan) -> tuple[str, str]:
    """The query tiles a key tile (pid_n) must visit, likewise."""
    lo = "tl.maximum(0, (pid_n * BLOCK_N - (LK - LQ)) // BLOCK_M * BLOCK_M)" if plan.skip_above_diagonal else "0"
    if plan.skip_above_diagonal and plan.window:  # later queries' windows have moved past this key tile
        return lo, f"tl.minimum(LQ, (pid_n + 1) * BLOCK_N - (LK - LQ) + {plan.window})"
    return lo, "LQ"


def _causal_windows(plan: AttentionPlan) -> list[int]:
    """The window of each causal step (0: none)."""
    return [window for op, _, index, _, window, _, expr in plan.steps if op == "fill" and index == -1 and expr is None]


def full_range(plan: AttentionPlan, over: str) -> list[str]:
    """Statements giving ``full_lo``/``full_hi``: the full tiles among ``lo``..``hi`` (aligned to
    the tile, lo <= full_lo <= full_hi <= hi). ``over`` "n": key tiles of query tile pid_m;
    "m": query tiles of key tile pid_n. Numerators of ``//`` are never negative."""
    causal = _causal_windows(plan)
    if over == "n":
        lines = ["full_lo = lo", "full_hi = LK // BLOCK_N * BLOCK_N  # keys in bounds"]
        if causal:  # every row of the tile sees the tile's last key
            lines.append("full_hi = tl.minimum(full_hi, tl.maximum(0, pid_m * BLOCK_M + LK - LQ + 1) // BLOCK_N * BLOCK_N)")
        for w in sorted({w for w in causal if w}):  # and no row's window has passed its first key
            lines.append(f"full_lo = tl.maximum(full_lo, (tl.maximum(0, pid_m * BLOCK_M + BLOCK_M + LK - LQ - {w}) "
                         "+ BLOCK_N - 1) // BLOCK_N * BLOCK_N)")
        lines.append("full_hi = tl.where((pid_m + 1) * BLOCK_M <= LQ, full_hi, lo)  # rows in bounds")
    else:
        lines = ["full_lo = lo", "full_hi = LQ // BLOCK_M * BLOCK_M  # queries in bounds"]
        if causal:  # the tile's first row sees every key of this key tile
            lines.append("full_lo = tl.maximum(full_lo, (tl.maximum(0, pid_n * BLOCK_N + BLOCK_N - 1 - (LK - LQ)) "
                         "+ BLOCK_M - 1) // BLOCK_M * BLOCK_M)")
        for w in sorted({w for w in causal if w}):  # the tile's last row still sees this key tile's first key
            lines.append(f"full_hi = tl.minimum(full_hi, tl.maximum(0, pid_n * BLOCK_N + {w} - (LK - LQ)) "
                         "// BLOCK_M * BLOCK_M)")
        lines.append("full_hi = tl.where((pid_n + 1) * BLOCK_N <= LK, full_hi, lo)  # keys in bounds")
    return lines + ["full_lo = tl.minimum(full_lo, hi)", "full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)"]


def tile_loops(plan: AttentionPlan, over: str, lo: str, hi: str, body) -> str:
    """The loops over key tiles ("n": forward, dq) or query tiles ("m": dK/dV), at 4 spaces, each
    running ``body(masked)`` (its lines at 8 spaces): with tile lists one loop over the listed
    tiles; else the masked tiles before the full ones, the full ones, the masked ones after."""
    block, length, pid = ("BLOCK_N", "LK", "pid_m") if over == "n" else ("BLOCK_M", "LQ", "pid_n")
    start, offs = f"start_{over}", f"offs_{over}"

    def loop(a: str, b: str, masked: bool) -> str:
        return (f"    for {start} in range({a}, {b}, {block}):\n"
                f"        {offs} = {start} + tl.arange(0, {block})\n" + body(masked))

    if not plan.tile_lists:
        windows = any(_causal_windows(plan))
        parts = [f"    lo = {lo}", f"    hi = {hi}",
                 "    # Full tiles (in bounds, nothing causal hidden) need no mask or bounds arithmetic.",
                 *("    " + line for line in full_range(plan, over))]
        loops = [loop("lo", "full_lo", True)] if windows or over == "m" and _causal_windows(plan) else []
        loops += [loop("full_lo", "full_hi", False), loop("full_hi", "hi", True)]
        return "\n".join(parts) + "\n" + "\n".join(loops)
    lists = "KV" if over == "n" else "Q"
    row = f"{pid} * tl.cdiv({length}, {block}) + t"
    return (f"    for t in range(0, tl.load({lists}_NUM + {pid})):\n"
            f"        {start} = tl.load({lists}_IDX + {row}) * {block}\n"
            f"        partial = tl.load({lists}_PARTIAL + {row}) != 0  # an index mask hides part of this tile\n"
            f"        {offs} = {start} + tl.arange(0, {block})\n" + body(True))


def tile_args(plan: AttentionPlan, backward: bool) -> str:
    if not plan.tile_lists:
        return ""
    return "KV_NUM, KV_IDX, KV_PARTIAL, " + ("Q_NUM, Q_IDX, Q_PARTIAL, " if backward else "")


def longest_first(plan: AttentionPlan) -> bool:
    """Whether query tiles run in reverse: under a causal rule without a window the last query
    tiles visit the most key tiles; started first, they do not finish last, alone."""
    return plan.skip_above_diagonal and not plan.window
