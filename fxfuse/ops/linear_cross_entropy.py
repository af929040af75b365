"""``torch.ops.fxfuse.linear_cross_entropy``: the LM head and its cross-entropy, chunked over the
vocabulary so the (tokens, vocab) logits never exist at once, forward or backward.

Forward: for each vocabulary chunk, ``h @ W[v0:v1]^T`` (+ bias) in the matmul's dtype, the casts /
softcap steps as written, then an online logsumexp in float32 (float64 for float64 sites), the
label's logit and, when label smoothing reads it, the row sum. Outputs are per-token vectors.

Backward *recomputes* each chunk's logits instead of saving gradients computed in the forward
(Liger's way). Why: the operator's outputs are per-token vectors whose reduction stays in the
graph, so the upstream gradient of each token is known only in the backward; computing gradients
in the forward would also cost two GEMMs in evaluation and no-grad calls (under AOTAutograd the
forward cannot know whether a backward will follow) and keep an fp32 dW alive between the passes.
The price is one more GEMM (4 instead of eager's 3). Only ``lse`` (one float per token) is saved.

All of it is torch ops, so it runs on any device; the chunk's GEMMs are ATen's.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from fxfuse.spec import to_dtype
from fxfuse.spec_loss import LinearCrossEntropySpec

# Elements of one chunk's logits: at least this many, or as many as the hidden states have, so the
# chunk's memory is of the order of the inputs' while its GEMM stays large. Tests lower it.
CHUNK_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> LinearCrossEntropySpec:
    return LinearCrossEntropySpec.from_json(text)


def vocab_chunk(tokens: int, hidden: int, vocab: int) -> int:
    """Vocabulary columns per chunk."""
    budget = max(CHUNK_ELEMENTS, tokens * hidden)
    cols = max(1, budget // max(tokens, 1))
    if cols >= 256:
        cols -= cols % 128  # whole GEMM tiles
    return min(vocab, cols)


def _logits(spec: LinearCrossEntropySpec, h: Tensor, w: Tensor, b: Optional[Tensor], v0: int, v1: int):
    """One chunk's logits as the user's code computes them, and the value after each step."""
    wt = w[v0:v1].t()
    x = torch.addmm(b[v0:v1], h, wt) if b is not None else torch.mm(h, wt)
    values = [x]
    for step in spec.steps:
        if step.op == "cast":
            x = x.to(to_dtype(step.dtype))
        elif step.op == "div":
            x = x / step.value
        elif step.op == "mul":
            x = x * step.value
        elif step.op == "tanh":
            x = torch.tanh(x)
        else:
            raise ValueError(f"unknown logit step {step.op!r}")
        values.append(x)
    return x, values


def _check_labels(labels: Tensor, valid: Tensor, vocab: int, ignore_index: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise IndexError(f"Target {int(labels[bad][0])} is out of bounds: the vocabulary has {vocab} entries "
                         f"and the label is not ignore_index={ignore_index} (fxfuse linear_cross_entropy)")


def _columns(labels: Tensor, valid: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(column inside the chunk, whether the row's label falls in this chunk)."""
    local = labels - v0
    hit = valid & (local >= 0) & (local < v1 - v0)
    return local.clamp(0, v1 - v0 - 1).unsqueeze(1), hit


def _chunk_softmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax of the chunk's rows, their logsumexp). ATen's fused softmax kernel is several times
    faster on CPU than exp of a difference (torch.logsumexp's way); the logsumexp is read back from
    it at each row's largest logit, where the probability is at least 1/columns, so log() of it
    loses nothing: lse = max(x) - log(max(p))."""
    p = torch.softmax(x, 1)
    x_max = x.amax(1)  # amax, not max: ATen's max with indices is several times slower on CPU
    lse = x_max - torch.log(p.amax(1))  # the largest probability is the largest logit's
    empty = torch.isneginf(x_max)  # a row masked to -inf throughout this chunk
    if bool(empty.any()):
        p = torch.where(empty.unsqueeze(1), 0.0, p)
        lse = torch.where(empty, -math.inf, lse)
    return p, lse


def forward(spec: LinearCrossEntropySpec, h: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor):
    n, vocab = h.shape[0], w.shape[0]
    acc, cd = to_dtype(spec.acc_dtype), to_dtype(spec.compute_dtype)
    valid = labels != spec.ignore_index
    _check_labels(labels, valid, vocab, spec.ignore_index)
    lse = h.new_full((n,), -math.inf, dtype=acc)
    target = h.new_zeros((n,), dtype=acc)
    want_sum = "sum_logp" in spec.outputs
    row_sum = h.new_zeros((n,), dtype=acc)
    step = vocab_chunk(n, h.shape[1], vocab)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        x = _logits(spec, h, w, b, v0, v1)[0].to(acc)
        lse = torch.logaddexp(lse, _chunk_softmax(x)[1])
        col, hit = _columns(labels, valid, v0, v1)
        target = target + torch.where(hit, x.gather(1, col).squeeze(1), 0.0)
        if want_sum:
            row_sum = row_sum + x.sum(1)
    # log_softmax rounds each log-probability to the compute dtype; nll is its negation.
    nll = torch.where(valid, -((target - lse).to(cd)), torch.zeros((), dtype=cd, device=h.device))
    sum_logp = (row_sum - vocab * lse).to(cd) if want_sum else h.new_zeros((n,), dtype=cd)
    return nll, lse, sum_logp


def backward(spec: LinearCrossEntropySpec, g_nll, g_lse, g_sum, h: Tensor, w: Tensor, b: Optional[Tensor],
             labels: Tensor, lse: Tensor):
    n, vocab = h.shape[0], w.shape[0]
    acc, cd = to_dtype(spec.acc_dtype), to_dtype(spec.compute_dtype)
    valid = labels != spec.ignore_index
    # d/dx_j of nll = p_j - [j = label] (valid rows); of lse = p_j; of sum_logp = 1 - V p_j.
    coef = h.new_zeros((n,), dtype=acc)
    g_label = None
    if g_nll is not None:
        g_label = torch.where(valid, g_nll.to(acc), 0.0)
        coef = coef + g_label
    if g_lse is not None:
        coef = coef + g_lse.to(acc)
    if g_sum is not None:
        coef = coef - vocab * g_sum.to(acc)
    d_h = torch.zeros(h.shape, dtype=torch.promote_types(h.dtype, acc), device=h.device)
    d_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    d_b = torch.empty(b.shape, dtype=b.dtype, device=b.device) if b is not None else None
    step = vocab_chunk(n, h.shape[1], vocab)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        x, values = _logits(spec, h, w, b, v0, v1)
        p, chunk_lse = _chunk_softmax(x.to(acc))
        # The chunk's softmax rescaled to the whole row's: p_j = softmax_chunk(x)_j * exp(lse_chunk - lse).
        g = p.mul_((coef * torch.exp(chunk_lse - lse)).unsqueeze(1))
        if g_sum is not None:
            g = g.add_(g_sum.to(acc).unsqueeze(1))
        if g_label is not None:
            col, hit = _columns(labels, valid, v0, v1)
            g.scatter_add_(1, col, torch.where(hit, -g_label, 0.0).unsqueeze(1))
        g = g.to(cd)  # the gradient reaching the log-softmax's input, in its dtype, as eager has it
        for k in reversed(range(len(spec.steps))):
            op = spec.steps[k].op
            if op == "cast":
                g = g.to(values[k].dtype)
            elif op == "div":
                g = g / spec.steps[k].value
            elif op == "mul":
                g = g * spec.steps[k].value
            else:
                g = torch.ops.aten.tanh_backward(g, values[k + 1])
        d_w[v0:v1] = g.t() @ h
        d_h += (g @ w[v0:v1]).to(d_h.dtype)
        if d_b is not None:
            d_b[v0:v1] = g.sum(0)
    return d_h.to(h.dtype), d_w, d_b


# ---- operators -------------------------------------------------------------------------------------

@torch.library.custom_op("fxfuse::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                         spec: str) -> tuple[Tensor, Tensor, Tensor]:
    """(nll, lse, sum_logp) per token of ``h`` (tokens, hidden) against ``weight`` (vocab, hidden)."""
    return forward(_spec(spec), h, weight, bias, labels)


@linear_cross_entropy.register_fake
def _(h, weight, bias, labels, spec):
    s = _spec(spec)
    n = h.shape[0]
    cd, acc = to_dtype(s.compute_dtype), to_dtype(s.acc_dtype)
    return h.new_empty((n,), dtype=cd), h.new_empty((n,), dtype=acc), h.new_empty((n,), dtype=cd)


@torch.library.custom_op("fxfuse::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(g_nll: Optional[Tensor], g_lse: Optional[Tensor], g_sum: Optional[Tensor],
                                  h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                                  spec: str) -> list[Tensor]:
    """[d_h, d_weight] (+ [d_bias]) from the per-token gradients, recomputing the logits chunk by chunk."""
    d_h, d_w, d_b = backward(_spec(spec), g_nll, g_lse, g_sum, h, weight, bias, labels, lse)
    return [d_h, d_w] + ([d_b] if d_b is not None else [])


@linear_cross_entropy_backward.register_fake
def _(g_nll, g_lse, g_sum, h, weight, bias, labels, lse, spec):
    out = [h.new_empty(h.shape), weight.new_empty(weight.shape)]
    return out + ([bias.new_empty(bias.shape)] if bias is not None else [])


def _setup(ctx, inputs, output):
    h, weight, bias, labels, spec = inputs
    ctx.save_for_backward(h, weight, bias, labels, output[1])
    ctx.spec = spec


def _backward(ctx, g_nll, g_lse, g_sum):
    h, weight, bias, labels, lse = ctx.saved_tensors
    grads = torch.ops.fxfuse.linear_cross_entropy_backward(g_nll, g_lse, g_sum, h, weight, bias, labels, lse, ctx.spec)
    return grads[0], grads[1], grads[2] if bias is not None else None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)
