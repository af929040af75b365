"""``torch.ops.fxfuse.attention``: ``softmax(steps(q @ k^T)) @ v`` as one operator.

q, k, v are ``(B, H, L, D)`` (any strides; k and v may have H / kv_groups heads); the extra tensors
(boolean masks, additive masks and biases, factor tensors) broadcast to the scores' ``(B, H, Lq,
Lk)`` the way they did in the user's code (aligned on the right); masks and biases given as index
expressions are evaluated (``fxfuse.index_expr``), with per-head inputs among the extras. On CUDA,
or on CPU when interpretation is asked for, the generated Triton kernels run. Otherwise the CPU
implementation is ``F.scaled_dot_product_attention`` where SDPA computes exactly the spec (scalar
scales and at most one additive or -inf boolean mask, no casts; rows it leaves at zero where the
user's softmax gives NaN are set to NaN, unless the spec's softmax is a safe one), or, for such a
spec with attention sinks, ATen's flash CPU attention rescaled by the sinks' share of each row
(from its log-sum-exp), else the plain torch reference of the spec, which computes the scores a bounded chunk of query rows at a time. With
``merge_heads`` the ``(B, H, Lq, Dv)`` output is laid out in ``(B, Lq, H, Dv)`` memory order on
every path (the pass asks for it when a head merge is all that reads it, which then is a view). The
backward is a backward operator of its own (autograd is off inside custom operators): the Triton
backward kernels (which also give the gradients of additive biases and factor tensors) where the
forward would run them, else an explicit torch formula; both recompute the probabilities.

Dropout on the probabilities (a spec with ``dropout``) takes a ``seed``: a 0-dim int64 tensor that
the graph draws afresh for each call (see fxfuse.passes.attention) and autograd saves for the
backward. The mask is a function of the seed alone: the Triton kernels draw it with Philox
(``dropout_keep`` in the generated source), the torch path with a ``torch.Generator`` seeded by it
(SDPA cannot take a mask); the backward redraws the forward's mask the same way.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxfuse import config, index_expr
from fxfuse.runtime.arguments import check_seed, contiguous_strides, output_buffer
from fxfuse.spec import to_dtype
from fxfuse.spec_attention import AttentionSpec
from fxfuse.ops import size_masks
from fxfuse.ops.optional_lists import listed
from fxfuse.ops.size_masks import causal_mask  # noqa: F401  (the reference's, and the passes')


@functools.lru_cache(maxsize=1024)
def _spec(text: str) -> AttentionSpec:
    return AttentionSpec.from_json(text)


# An index expression that reads no input is a function of the sizes alone (Swin's shift mask,
# a window rule): its values are kept per (expression, sizes, device, rows), so the CPU path
# evaluates its tree of ops once per shape, not once per call (1.5 ms of a 12 ms Swin forward).
# Small ones only, few of them, and never while tracing (a fake or traced value must not be kept).
_EXPR_VALUES: "collections.OrderedDict[tuple, Tensor]" = collections.OrderedDict()
_EXPR_VALUES_ENTRIES, _EXPR_VALUES_MAX_NUMEL = 32, 1 << 22


@functools.lru_cache(maxsize=256)
def _reads_no_input(expr) -> bool:
    return not index_expr.loads(expr)


def _expr_values(expr, extras: list[Tensor], shape4, device, rows: tuple[int, int] | None = None) -> Tensor:
    """An index expression's values, 4-d (1 along the axes it does not vary on); ``rows`` (first,
    end) gives only those query rows. Never written to by its callers (the values may be shared)."""
    key = None
    if _reads_no_input(expr) and torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling():
        key = (expr, tuple(int(n) for n in shape4), str(device), rows)
        if (hit := _EXPR_VALUES.get(key)) is not None:
            _EXPR_VALUES.move_to_end(key)
            return hit
    r = index_expr.evaluate(expr, index_expr.grids(shape4, device, rows), extras)
    r = r.reshape((1,) * (4 - r.dim()) + tuple(r.shape))
    if key is not None and type(r) is torch.Tensor and not r.requires_grad and r.numel() <= _EXPR_VALUES_MAX_NUMEL:
        _EXPR_VALUES[key] = r
        if len(_EXPR_VALUES) > _EXPR_VALUES_ENTRIES:
            _EXPR_VALUES.popitem(last=False)
    return r


def _mask_of(step, extras: list[Tensor], shape4, device, rows: tuple[int, int] | None = None) -> Tensor:
    if step.expr is not None:
        return _expr_values(step.expr, extras, shape4, device, rows)
    mask = causal_mask(*shape4[-2:], device, step.window, rows) if step.input == -1 else extras[step.input]
    return ~mask if step.invert else mask


def _addend(step, extras: list[Tensor], shape4, device, rows: tuple[int, int] | None = None) -> Tensor:
    """What an "add" step adds: its bias tensor, its index expression's values (in its dtype), or
    the sum of the two (the tensor's rows ``rows`` already, as the chunk's extras are)."""
    if step.expr is not None and step.input >= 0:
        return extras[step.input] + _expr_values(step.expr, extras, shape4, device, rows)
    if step.expr is not None:
        return _expr_values(step.expr, extras, shape4, device, rows)
    return extras[step.input]


def _heads(kv: Tensor, spec: AttentionSpec) -> Tensor:
    """Keys or values with one head per query head (grouped-query attention repeats each)."""
    return kv.repeat_interleave(spec.kv_groups, dim=1) if spec.kv_groups > 1 else kv


def _check_heads(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[1] != k.shape[1] * spec.kv_groups or k.shape[1] != v.shape[1]:
        raise ValueError(f"fxfuse.attention: {q.shape[1]} query heads, {k.shape[1]} key and {v.shape[1]} value "
                         f"heads do not fit the site's {spec.kv_groups} query heads per key/value head")


# The torch reference computes the (B, H, Lq, Lk) scores a chunk of query rows at a time, each
# chunk at most this many elements (one row per chunk at the least): a CPU site's memory stays
# bounded whatever its length. Rows are independent in the forward, so chunking changes no step
# or rounding there; the backward sums dk, dv and the biases' gradients over the chunks.
SCORE_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(q: Tensor, lk: int) -> list[tuple[int, int]]:
    b, h, lq = q.shape[:3]
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, b * h * lk))
    return [(i, min(i + rows, lq)) for i in range(0, lq, rows)] or [(0, lq)]


def _rows(t: Tensor, lq: int, rows: tuple[int, int]) -> Tensor:
    """The query rows ``rows`` of an extra tensor broadcast to (…, Lq, Lk) (all of it along a
    broadcast query dim)."""
    if t.dim() < 2 or t.shape[-2] == 1 or rows == (0, lq):
        return t
    return t[..., rows[0]:rows[1], :]


def _scores(spec: AttentionSpec, q: Tensor, k: Tensor, extras: list[Tensor], acc: torch.dtype | None = None,
            record: list | None = None, rows: tuple[int, int, int] | None = None, headed: bool = False):
    """The scores after every step; with ``acc``, computed in that dtype without intermediate rounding.
    ``record`` receives each step's input (the backward needs them for factor tensors' gradients).
    For a chunk, ``q`` and ``extras`` hold its rows and ``rows`` is (first, end, Lq) (the causal
    rule needs the rows' positions); ``headed``: k already has one head per query head."""
    k = k if headed else _heads(k, spec)
    # The product in the spec's score dtype: q's own, or float32 for a 16-bit baddbmm (whose
    # product is rounded only after its scale and bias, see the attention pass).
    acc_or_score = acc or to_dtype(spec.score_dtype)
    s = torch.matmul(q.to(acc_or_score), k.to(acc_or_score).transpose(-1, -2))
    lk = s.shape[-1]
    lq, span = (rows[2], rows[:2]) if rows else (s.shape[-2], None)
    shape4 = (*s.shape[:-2], lq, lk)  # the whole scores' shape (the chunk's rows are ``span``)
    for step in spec.steps:
        if record is not None:
            record.append(s)
        if step.op in ("mul", "div"):
            factor = step.value if step.input == -1 else extras[step.input].to(acc) if acc else extras[step.input]
            s = s * factor if step.op == "mul" else s / factor
        elif step.op == "fill":
            s = s.masked_fill(_mask_of(step, extras, shape4, s.device, span), step.value)
        elif step.op == "add" and step.input == -1 and step.expr is None:
            s = s + step.value  # a Python scalar (sigmoid attention's -log(L))
        elif step.op == "add":
            bias = _addend(step, extras, shape4, s.device, span)
            s = s + (bias.to(acc) if acc else bias)
        elif step.op == "tanh":
            s = torch.tanh(s)
        if acc is None:
            s = s.to(to_dtype(step.dtype))
    return s


def keep_mask(spec: AttentionSpec, seed: Tensor | None, shape4, device, triton: bool) -> Tensor | None:
    """The dropout keep mask (B, H, Lq, Lk) bool the operator draws for ``seed``: the kernels' own
    (``triton``), else the torch path's; None for a spec without dropout."""
    if not spec.dropout:
        return None
    check_seed(spec, seed)
    if triton:
        from fxfuse.runtime import attention as kernels

        return kernels.dropout_mask(spec, seed, shape4, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()) & (2**64 - 1))  # manual_seed takes an unsigned 64-bit value
    return torch.rand(tuple(shape4), generator=generator, device=device) >= spec.dropout


def _drop(spec: AttentionSpec, p: Tensor, keep: Tensor | None) -> Tensor:
    """Dropout as ``F.dropout`` computes it: ``p * (keep / (1 - rate))`` in p's dtype."""
    return p if keep is None else p * (keep.to(p.dtype) / (1.0 - spec.dropout))


def softmax(spec: AttentionSpec, s: Tensor, sink: Tensor | None = None) -> Tensor:
    """The site's probabilities: its softmax over the keys (a safe one, ``aten._safe_softmax``,
    gives 0, not NaN, in a row whose every score is -inf), or its sigmoid (no normalisation).
    With a ``sink`` column (.., Lq, 1) the softmax runs over the scores and the sink logit, as
    gpt-oss concatenates them, and the sink's probability is dropped (see ``sink_probability``)."""
    if spec.normalizer == "sigmoid":
        return torch.sigmoid(s)
    if sink is not None:
        s = torch.cat([s, sink.to(s.dtype).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if spec.safe_softmax:
        p = p.masked_fill((s == float("-inf")).all(-1, keepdim=True), 0.0)
    return p if sink is None else p[..., :-1]


def sink_probability(s: Tensor, sink: Tensor) -> Tensor:
    """The probability the softmax gives the sink logit, (.., Lq, 1): ``exp(c) / (exp(c) + sum_j
    exp(s_j))``, from the scores ``s`` after their steps."""
    c = sink.to(s.dtype).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, c], dim=-1), dim=-1)[..., -1:]


def _sink(spec: AttentionSpec, extras: list[Tensor]) -> Tensor | None:
    return extras[spec.sinks] if spec.sinks >= 0 else None


def reference(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor],
              keep: Tensor | None = None, chunked: bool = True) -> Tensor:
    """The site in plain torch ops, in the dtypes (and so with the roundings) of the user's code,
    a chunk of query rows at a time (SCORE_CHUNK_ELEMENTS; ``chunked=False``: all rows at once, as
    the user's code computed them, which needs no concrete sizes); with dropout, ``keep`` is the
    mask (see ``keep_mask``; a boolean (B, H, Lq, Lk) tensor, sliced per chunk)."""
    if spec.dropout and keep is None:
        raise ValueError("the reference of attention with dropout needs the keep mask")
    lq, lk = q.shape[-2], k.shape[-2]
    k, v = _heads(k, spec).to(to_dtype(spec.score_dtype)), _heads(v, spec)  # once, not per chunk
    outs = []
    for r in _row_chunks(q, lk) if chunked else [(0, lq)]:
        chunk = [_rows(e, lq, r) for e in extras]
        # All rows: q itself (a slice of every row would still be a view autograd differentiates,
        # its backward a zero-filled copy of dq).
        qr = q if r == (0, lq) else q[..., r[0]:r[1], :]
        p = softmax(spec, _scores(spec, qr, k, chunk, rows=(*r, lq), headed=True), _sink(spec, chunk))
        p = _drop(spec, p.to(to_dtype(spec.prob_dtype)), None if keep is None else keep[..., r[0]:r[1], :])
        outs.append(torch.matmul(p, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _sdpa_form(spec: AttentionSpec):
    """(scale, mask step) when SDPA computes the spec exactly, else None.

    SDPA computes softmax(q @ k^T * scale + mask) @ v in one dtype: the spec may hold scalar
    factors first, then at most one additive mask or one -inf boolean fill, and no cast.
    """
    dtypes = {spec.score_dtype, spec.prob_dtype, *(s.dtype for s in spec.steps)}
    if len(dtypes) != 1 or spec.dropout:  # SDPA draws its dropout mask from its own generator
        return None
    if spec.sinks >= 0 or spec.normalizer != "softmax":  # SDPA's softmax has no sink and normalises
        return None
    scale, mask_step = 1.0, None
    for step in spec.steps:
        if step.op in ("mul", "div") and step.input == -1 and mask_step is None:
            scale = scale * step.value if step.op == "mul" else scale / step.value
        elif step.op == "add" and mask_step is None and (step.input >= 0 or step.expr is not None):
            mask_step = step
        elif step.op == "fill" and mask_step is None and step.value == float("-inf"):
            mask_step = step
        else:
            return None
    return scale, mask_step


def _sdpa_exact_on(form, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor]) -> bool:
    """Whether SDPA computes the spec on these values: only on finite q, k, v and a bias with no
    NaN or +inf. SDPA adds a boolean mask as -inf (so a NaN score it hides still makes its row
    NaN, where the spec's fill replaces it) and its CPU kernel returns 0 for a query row with a
    NaN score (the spec's softmax gives NaN); the reference follows the spec's steps exactly.

    One reduction per tensor, no temporaries: a finite float32 sum proves every element finite (a
    sum that overflows only sends a finite site to the reference); a bias's max is NaN or +inf
    exactly when it holds one."""
    if not all(math.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))
               for t in (q, k, v)):
        return False
    step = form[1]
    if step is not None and step.op == "add" and step.input >= 0 and extras[step.input].numel():
        return bool(extras[step.input].max() < math.inf)  # False for NaN too
    return True


def _sdpa(spec: AttentionSpec, form, q, k, v, extras) -> Tensor:
    scale, step = form
    mask, hidden = None, None
    if step is not None and step.op == "add":
        shape4 = (*q.shape[:2], q.shape[-2], k.shape[-2])
        mask = _addend(step, extras, shape4, q.device).to(q.dtype)  # exact: a wider bias would have widened the scores
        if not _holds_no_neg_inf(mask):
            hidden = mask == float("-inf")
    elif step is not None and step.causal and not step.window and not step.invert and q.shape[-2] == k.shape[-2]:
        # Bottom-right and SDPA's top-left causal alignment agree when Lq == Lk, and every row sees
        # its own key (no NaN row): is_causal, whose kernel skips the hidden tiles.
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=spec.kv_groups > 1)
    elif step is not None:
        hidden = _mask_of(step, extras, (*q.shape[:2], q.shape[-2], k.shape[-2]), q.device)
        mask = ~hidden  # SDPA's boolean mask says which positions take part
    if mask is not None and mask.dim() < 2:  # SDPA's CPU kernel wants a mask of at least 2 dims
        mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=spec.kv_groups > 1)
    if hidden is not None and not spec.safe_softmax:  # a safe softmax gives 0 there, as SDPA does
        # A row whose every score is -inf is NaN in the user's softmax; SDPA returns zeros there.
        rows = hidden.all(-1, keepdim=True)
        if _traced(rows) or rows.any():  # run, the fill (a copy of the output) only where a row needs it
            out = out.masked_fill(rows, float("nan"))
    return out


def _traced(t: Tensor) -> bool:
    """Whether ``t`` is being traced (Inductor's decomposition of a site, make_fx, a fake
    tensor), where a check of its values cannot decide what the graph computes."""
    return type(t) is not torch.Tensor or torch._C._len_torch_dispatch_stack() > 0 or torch.compiler.is_compiling()


def _holds_no_neg_inf(mask: Tensor) -> bool:
    """Whether a float mask, run (not traced), holds no -inf, so that no row can be all -inf: one
    reduction (its min; NaN, which it propagates, answers False). The exact check it spares is
    an (B, H, Lq, Lk) comparison, a reduction of it and a masked copy of the output: most of a
    small site's time (Swin's 16-token windows: 0.2 of 0.5 ms)."""
    return not _traced(mask) and (mask.numel() == 0 or bool(mask.min() > float("-inf")))


def _every_row_sees_a_key(form, q: Tensor, k: Tensor) -> bool:
    """Whether SDPA runs the site with no mask, or causal with Lq == Lk (``is_causal``): the sites
    whose gradient SDPA's backward computes as the user's code does. With a mask, a row that sees
    no key gets zeros where the user's gradient is NaN, and a row hidden by a large finite bias
    (Hugging Face's ``finfo.min``) gets a different gradient from SDPA's backward than from the
    user's softmax (whose rounded scores still pass the gradient on)."""
    step = form[1]
    return step is None or (step.op == "fill" and step.causal and not step.window and not step.invert
                            and q.shape[-2] == k.shape[-2])


def _use_triton(q: Tensor, spec: AttentionSpec) -> bool:
    if "float64" in {spec.score_dtype, spec.prob_dtype}:
        return False  # tl.dot has no float64 on GPUs; the reference is exact
    return q.is_cuda or (q.device.type == "cpu" and config.interpret_on_cpu())


def _sum_to(t: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient back to the shape of the tensor that was broadcast."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def reference_backward(spec: AttentionSpec, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       extras: list[Tensor], keep: Tensor | None = None) -> list[Tensor]:
    """[dq, dk, dv, *d_extras] (masks get an empty gradient), recomputing the probabilities.

    ``dS = P * (dP - rowsum(dP * P))`` with ``dP = dO @ v^T`` (with dropout, masked and rescaled by
    the forward's ``keep``, and dV from the dropped probabilities), then back through the steps in
    reverse: factors scale it (a factor tensor gets ``dS * s_in``, reduced to its shape), fills zero
    it where they hid the score, adds pass it to their bias. A chunk of query rows at a time
    (SCORE_CHUNK_ELEMENTS): dq and the rows of a bias with a query dim are each chunk's own; dk,
    dv and the gradients summed over the query dim add up over the chunks.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lq, lk = q.shape[-2], k.shape[-2]
    kh, vh = _heads(k, spec).to(acc), _heads(v, spec).to(acc)
    b, h = q.shape[:2]
    dk = torch.zeros((b, h, lk, k.shape[-1]), dtype=acc, device=q.device)
    dv = torch.zeros((b, h, lk, v.shape[-1]), dtype=acc, device=q.device)
    dqs: list[Tensor] = []
    d_extras: list[Tensor | None] = [None] * len(extras)
    for r in _row_chunks(q, lk):
        qc = q[..., r[0]:r[1], :].to(acc)
        chunk = [_rows(e, lq, r) for e in extras]

        def accumulate(index: int, grad: Tensor) -> None:
            d = _sum_to(grad, chunk[index].shape).reshape(chunk[index].shape)
            if d_extras[index] is None:
                d_extras[index] = torch.zeros(extras[index].shape, dtype=acc, device=q.device)
            target = _rows(d_extras[index], lq, r)  # a view: the chunk's rows, or all of a broadcast dim
            target += d

        step_inputs: list[Tensor] = []
        # A safe softmax's fully masked rows have p = 0, so dS and every gradient there is 0.
        s = _scores(spec, qc, kh, chunk, acc, step_inputs, rows=(*r, lq), headed=True)
        p = softmax(spec, s, _sink(spec, chunk))
        do = grad_out[..., r[0]:r[1], :].to(acc)
        kc = None if keep is None else keep[..., r[0]:r[1], :]
        dv += torch.matmul(_drop(spec, p.to(to_dtype(spec.prob_dtype)).to(acc), kc).transpose(-1, -2), do)
        dp = _drop(spec, torch.matmul(do, vh.transpose(-1, -2)), kc)
        if spec.normalizer == "sigmoid":  # each probability is its own score's: dS = dP * p (1 - p)
            ds = dp * p * (1 - p)
        else:
            delta = (dp * p).sum(-1, keepdim=True)  # rowsum(dP * P) = dO . O: the sink has no value row
            ds = p * (dp - delta)
            if spec.sinks >= 0:  # d c = sum_j dP_j dp_j/dc = -p_c sum_j dP_j p_j = -p_c delta
                accumulate(spec.sinks, -sink_probability(s, chunk[spec.sinks].to(acc)) * delta)
        for step, s_in in zip(reversed(spec.steps), reversed(step_inputs)):
            if step.op in ("mul", "div") and step.input >= 0:
                t = chunk[step.input].to(acc)
                accumulate(step.input, ds * s_in if step.op == "mul" else -ds * s_in / (t * t))
                ds = ds * t if step.op == "mul" else ds / t
            elif step.op == "mul":
                ds = ds * step.value
            elif step.op == "div":
                ds = ds / step.value
            elif step.op == "fill":
                ds = ds.masked_fill(_mask_of(step, chunk, (*ds.shape[:-2], lq, lk), ds.device, r), 0.0)
            elif step.op == "add" and step.input >= 0:
                accumulate(step.input, ds)
            elif step.op == "tanh":
                ds = ds * (1 - torch.tanh(s_in) ** 2)
        dqs.append(torch.matmul(ds, kh))
        dk += torch.matmul(ds.transpose(-1, -2), qc)
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=-2)
    if spec.kv_groups > 1:  # each kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (k.shape[1], spec.kv_groups)).sum(2) for g in (dk, dv))
    out = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    for e, d in zip(extras, d_extras):
        if d is None:  # a boolean mask, or a per-head input of an expression (a constant: no gradient)
            out.append(torch.zeros_like(e) if e.dtype.is_floating_point else e.new_empty(0))
        else:
            out.append(d.to(e.dtype))
    return out


# ---- operators -----------------------------------------------------------------------------------

def _shape4(q: Tensor, k: Tensor) -> tuple:
    return (*q.shape[:-1], k.shape[-2])


def _laid_out(out: Tensor, merge_heads: bool) -> Tensor:
    """``out`` with exactly the strides the fake implementation promises (AOTAutograd plans its
    views on them): as it is when it has them (SDPA's CPU kernel returns (B, L, H, D) strides),
    else copied into such a buffer."""
    b, h, lq, dv = out.shape
    if merge_heads:  # the strides output_buffer gives, computed without allocating (every call)
        sb, sl, sh, sd = contiguous_strides((b, lq, h, dv))
        want = (sb, sh, sl, sd)
    else:
        want = contiguous_strides((b, h, lq, dv))
    if out.stride() == want:
        return out
    return output_buffer(out.shape, out.dtype, out.device, merge_heads).copy_(out)


# ``Tensor[]? extras``: a site without extra tensors reaches AOTInductor's runner as None (optional_lists).
@torch.library.custom_op("fxfuse::attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor[]? extras, str spec, Tensor? seed=None, bool merge_heads=False) -> Tensor"))
def attention(q: Tensor, k: Tensor, v: Tensor, extras: Optional[list[Tensor]], spec: str, seed: Tensor | None = None,
              merge_heads: bool = False) -> Tensor:
    s, extras = _spec(spec), listed(extras)
    if s.windows:
        raise ValueError("fxfuse.attention: the spec has windows (image-layout operands); call "
                         "fxfuse.window_attention with it")
    _check_heads(s, q, k, v)
    s, extras, _ = size_masks.resolve(s, extras, q.shape[-2], k.shape[-2])
    if _use_triton(q, s):
        from fxfuse.runtime import attention as kernels

        return kernels.forward(s, q, k, v, extras, seed=seed, merge_heads=merge_heads)[0]
    return cpu_forward(s, q, k, v, extras, seed, merge_heads)


def cpu_forward(s: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor], seed: Tensor | None = None,
                merge_heads: bool = False, autograd: bool = False) -> Tensor:
    """The CPU implementation: SDPA where it computes the spec on these values, else the reference.

    ``autograd``: called outside the operator (fxfuse.cpu_calls), to be differentiated through
    the ATen ops it runs, and SDPA only where its backward gives the user's gradient
    (``_every_row_sees_a_key``; then no extra tensor is read); a masked site takes the reference,
    which autograd differentiates as it did the user's code."""
    s, extras, _ = size_masks.resolve(s, extras, q.shape[-2], k.shape[-2])
    form = _sdpa_form(s)
    if form is not None and autograd and torch.is_grad_enabled() and not _every_row_sees_a_key(form, q, k):
        form = None  # decided by the form alone: before the check of the values, which it spares
    if form is not None:
        with torch.no_grad():  # a check, not part of what autograd differentiates
            form = form if _sdpa_exact_on(form, q, k, v, extras) else None
    keep = keep_mask(s, seed, _shape4(q, k), q.device, triton=False)
    if form is not None and autograd and torch.is_grad_enabled():
        # Contiguous operands for the fused CPU backward autograd will run: on strided keys it
        # gives wrong gradients (see _sdpa_backward); contiguous() is differentiable.
        out = _sdpa(s, form, q.contiguous(), k.contiguous(), v.contiguous(), extras)
    elif form is not None:
        out = _sdpa(s, form, q, k, v, extras)
    elif autograd and torch.is_grad_enabled():  # attention_cpu's paths are forward-only: the reference
        out = reference(s, q, k, v, extras, keep)
    else:  # sinks or per-row factors around SDPA's form (attention_cpu), else the reference
        from fxfuse.ops import attention_cpu

        out = attention_cpu.forward(s, q, k, v, extras)
        if out is None:
            out = reference(s, q, k, v, extras, keep)
    return _laid_out(out, merge_heads)


@attention.register_fake
def _(q, k, v, extras, spec, seed=None, merge_heads=False):
    shape4 = (*q.shape[:-1], v.shape[-1])
    return output_buffer(shape4, to_dtype(_spec(spec).out_dtype), q.device, merge_heads)


def _kernel_grad(spec: AttentionSpec, index: int) -> bool:
    """Whether the backward kernels give extra ``index``'s gradient: it is a bias or a factor
    tensor, used by "add", "mul" and "div" steps and nothing else."""
    if index == spec.sinks:  # the dq kernel writes each row's sink gradient
        return True
    uses = [step.op for step in spec.steps if step.input == index]
    return bool(uses) and all(op in ("add", "mul", "div") for op in uses)


def _sdpa_backward(spec: AttentionSpec, grad_out, q, k, v, extras, wanted) -> list[Tensor] | None:
    """[dq, dk, dv, *empty] by ATen's fused CPU attention backward (about 3x the explicit formula's
    speed on CPU), recomputing its forward, for the sites whose every row sees a key: scalar scales
    and no mask, or causal with Lq == Lk (``_sdpa`` runs those as is_causal). None otherwise: the
    formula then. (Autograd is off inside an operator, so the ATen backward is called directly.)"""
    form = _sdpa_form(spec)
    if form is None and not any(wanted) and q.device.type == "cpu":  # per-row factors moved onto q (attention_cpu)
        from fxfuse.ops import attention_cpu

        return attention_cpu.backward(spec, grad_out, q, k, v, extras)
    if form is None or any(wanted) or q.device.type != "cpu" or not _sdpa_exact_on(form, q, k, v, extras):
        return None
    if q.shape[-1] != v.shape[-1]:  # the fused CPU kernel needs one head size (DeepSeek's differ)
        return None
    if not _every_row_sees_a_key(form, q, k):
        return None
    scale, step = form
    causal = step is not None
    # Contiguous operands: on a k whose last dim is not its densest (a reshape then transpose of
    # keys laid out (D, L)) the fused CPU backward gives wrong gradients (its forward is right).
    q, kh, vh = (t.contiguous() for t in (q, _heads(k, spec), _heads(v, spec)))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kh, vh, 0.0, causal, scale=scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.to(out.dtype), q, kh, vh, out, lse, 0.0, causal, scale=scale)
    if spec.kv_groups > 1:  # each kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (k.shape[1], spec.kv_groups)).sum(2) for g in (dk, dv))
    return [dq, dk, dv, *(e.new_empty(0) for e in extras)]


@torch.library.custom_op("fxfuse::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, extras: list[Tensor],
                       needs_grad: list[bool], spec: str, seed: Tensor | None = None) -> list[Tensor]:
    """[dq, dk, dv, *d_extras]; an extra's gradient is computed only where ``needs_grad`` says so
    (a floating-point bias or factor that requires grad), else it is an empty tensor. ``seed`` is
    the forward's: the dropout mask is redrawn from it, by the path the forward took."""
    s, given = _spec(spec), extras
    s, extras, dropped = size_masks.resolve(s, extras, q.shape[-2], k.shape[-2])
    needs_grad = size_masks.without(needs_grad, dropped)
    wanted = [need and e.dtype.is_floating_point for e, need in zip(extras, needs_grad)]
    if _use_triton(q, s) and all(_kernel_grad(s, i) for i, w in enumerate(wanted) if w):
        # The kernels compute dq, dk, dv and the biases' and factor tensors' gradients (from what
        # the dq kernel writes per score); a float tensor that only an index expression reads
        # (a constant to it) keeps the torch formula, which gives it zeros.
        from fxfuse.runtime import attention as kernels

        dq, dk, dv, *d_extras = kernels.backward(s, grad_out, q, k, v, extras, wanted, seed=seed)
        grads = [dq, dk, dv, *(d if w else e.new_empty(0) for d, e, w in zip(d_extras, extras, wanted))]
    elif (grads := _sdpa_backward(s, grad_out, q, k, v, extras, wanted)) is None:
        keep = keep_mask(s, seed, _shape4(q, k), q.device, triton=_use_triton(q, s))
        grads = reference_backward(s, grad_out, q, k, v, extras, keep)
        grads[3:] = [d if w else e.new_empty(0) for d, e, w in zip(grads[3:], extras, wanted)]
    # Contiguous whatever the inputs' strides, as the fake implementation promises: the compiled
    # backward graph plans its views on the fake strides.
    return size_masks.with_empty_grad([_contiguous_strides(g) for g in grads], given, dropped)


def _contiguous_strides(t: Tensor) -> Tensor:
    """``t`` with exactly the strides ``new_empty`` gives (the fake's), size-1 dims included:
    ``contiguous()`` keeps a tensor whose only odd strides are on size-1 dims (ATen's fused CPU
    backward returns such gradients), and then real and fake strides differ."""
    if t.stride() == contiguous_strides(t.shape):
        return t
    return t.new_empty(t.shape).copy_(t)


@attention_backward.register_fake
def _(grad_out, q, k, v, extras, needs_grad, spec, seed=None):
    d_extras = [e.new_empty(e.shape if need and e.dtype.is_floating_point else 0) for e, need in zip(extras, needs_grad)]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *d_extras]


def save_for_backward(ctx, inputs, output):
    """The autograd context of an operator called ``(q, k, v, extras, spec, seed, ...)``: its
    tensors saved, its spec, the interpretation in force and which extras need a gradient."""
    q, k, v, extras, spec, seed = inputs[:6]
    extras = listed(extras)
    ctx.save_for_backward(q, k, v, seed, *extras)
    ctx.spec, ctx.interpret = spec, config.current.interpret
    ctx.needs_grad = [e.requires_grad for e in extras]


def _backward(ctx, grad_out):
    q, k, v, seed, *extras = ctx.saved_tensors
    with config.patch(interpret=ctx.interpret):
        dq, dk, dv, *d_extras = torch.ops.fxfuse.attention_backward(grad_out, q, k, v, extras, ctx.needs_grad,
                                                                    ctx.spec, seed)
    d_extras = [d if need and e.dtype.is_floating_point else None
                for d, e, need in zip(d_extras, extras, ctx.needs_grad)]
    # One gradient per argument the call passed: the dispatcher drops trailing arguments equal to
    # their default (seed None, merge_heads False) before autograd counts them.
    return (dq, dk, dv, d_extras, None, None, None)[:len(ctx.needs_input_grad)]


attention.register_autograd(_backward, setup_context=save_for_backward)
