"""The split-key forward for decoding (flash-decoding): when to split, the launch, and the combine.

A decode step has Lq of 1 to a few queries per (batch, head): the forward's grid is then B * H
programs, fewer than a GPU's multiprocessors, each streaming all Lk cached keys alone. Splitting
the keys into ranges gives every multiprocessor work; the ranges' partial results are combined
exactly as the online softmax combines tiles (rescaled by exp(m_s - max m), summed, divided by
the rescaled sum), in float32.
"""
from __future__ import annotations

import functools

import torch
import triton

from fxfuse.codegen.attention_decode import generate_split, splittable
from fxfuse.runtime.arguments import extra_4d, output_buffer, seed_args
from fxfuse.runtime.attention import _grid_meta, _pick
from fxfuse.runtime.cache import load, memoized, store
from fxfuse.runtime.configs import LaunchConfig
from fxfuse.spec_attention import AttentionSpec

DECODE_ROWS = 16  # queries per (batch, head) up to which a launch counts as decoding: one 16-row tile
MIN_KEYS_PER_SPLIT = 256  # a range shorter than this costs more in its combine than it saves
MAX_SPLITS = 64
PROGRAMS_PER_MULTIPROCESSOR = 2  # enough programs to hide a range's load latency behind another's


def splits_for(programs: int, lk: int, multiprocessors: int) -> int:
    """How many key ranges a launch of ``programs`` (query tiles times batch-heads) over ``lk``
    keys should run as, on a GPU with ``multiprocessors``: 1 when the grid already fills it."""
    if programs >= multiprocessors:
        return 1
    wanted = -(-PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // max(1, programs))
    return max(1, min(wanted, lk // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(spec: AttentionSpec, q, k) -> int:
    """The splits the forward runs a launch with: > 1 only on a GPU, for a decode-shaped launch
    (Lq <= DECODE_ROWS) of a spec the split kernel renders (see ``splittable``)."""
    lq, lk = q.shape[2], k.shape[2]
    if not q.is_cuda or lq > DECODE_ROWS or lk < 2 * MIN_KEYS_PER_SPLIT or splittable(spec) is not None:
        return 1
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return splits_for(q.shape[0] * q.shape[1], lk, _multiprocessors(index))


def _kernel(spec: AttentionSpec):
    def make():
        k = store(generate_split(spec))
        return getattr(load(k), k.name + "_forward_split")

    return memoized(("forward_split", spec), make)


def split_forward(spec: AttentionSpec, q, k, v, extras, out_dtype, seed, merge_heads: bool,
                  config: LaunchConfig | None, splits: int):
    """The forward's result (see ``runtime.attention.forward``) from ``splits`` key ranges."""
    kernel = _kernel(spec)
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    out = output_buffer((b, h, lq, dv), out_dtype or v.dtype, q.device, merge_heads)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    ran: dict = {}

    def run(c: LaunchConfig) -> None:
        per_split = triton.cdiv(triton.cdiv(lk, splits), c.BLOCK_N) * c.BLOCK_N  # whole key tiles
        n = triton.cdiv(lk, per_split)
        partial = torch.empty((n, b, h, lq, dv), dtype=torch.float32, device=q.device)
        stats = torch.empty((n, 2, b * h, lq), dtype=torch.float32, device=q.device)
        kernel[(triton.cdiv(lq, c.BLOCK_M), b * h, n)](
            q, k, v, partial, stats, *es, *seed_args(spec, seed), *q.stride(), *k.stride(), *v.stride(),
            *partial.stride()[1:], *(s for e in es for s in e.stride()), h, spec.kv_groups, lq, lk, d, dv,
            partial.stride(0), per_split, ROUND=out_dtype is None, **_grid_meta(c, d, dv, q.is_cuda))
        ran.update(partial=partial, stats=stats)

    if not out.numel():
        return out, torch.empty((2, b * h, lq), dtype=torch.float32, device=q.device)
    _pick(spec, "forward_split", q, k, v, run, config)
    total, combined_stats = combine(ran["partial"], ran["stats"], spec.safe_softmax)
    out.copy_(total.view(b, h, lq, dv))
    return out, combined_stats


def combine(partial, stats, safe_softmax: bool = False):
    """The attention output (B, H, Lq, Dv) float32 and the stats (2, B*H, Lq) of the whole key
    range from its ranges' unnormalised ``partial`` (S, B, H, Lq, Dv) and ``stats`` (S, 2, B*H,
    Lq): each range's row max m_s and sum l_s (natural units)."""
    m, l = stats[:, 0], stats[:, 1]
    top = m.amax(0)
    # A range whose scores are all -inf has m_s = -inf and weight 0; a row with no finite score
    # anywhere gets sum 0 and, as the one-program forward, 0/0 (or 0 with a safe softmax).
    weight = torch.exp(m - torch.where(top == float("-inf"), 0.0, top))
    total = (weight * l).sum(0)
    acc = (weight.reshape(partial.shape[:-1]).unsqueeze(-1) * partial).sum(0)
    denominator = torch.where(total == 0, 1.0, total) if safe_softmax else total
    out = acc / denominator.reshape(acc.shape[:-1]).unsqueeze(-1)
    return out, torch.stack((top, total))
