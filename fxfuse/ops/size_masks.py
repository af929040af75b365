"""Masks whose values only the call's sizes decide: compared with the causal rule once per shape.

At symbolic sizes a boolean mask that transformers builds from ``arange`` and the lengths (an
arange indexed by itself, a packed-sequence ``cumsum`` over position differences) cannot be proved
causal at capture for every length, and the index deriver does not know those ops. The pass proves
something weaker that holds for every length: nothing but sizes enters the mask's values, and each
size it reads is a dim of the mask (spec field ``size_mask``). The mask's shape then decides its
values, so one comparison per shape decides, for every later call at that shape, whether the mask
is the causal (or sliding-window) rule. Where it is, the site runs the rule: the kernel reads no
mask and skips the hidden tiles, and ATen's CPU attention runs ``is_causal``. The rule fills the
same scores with the same value as the mask did, so the result is the same.

The comparison costs one read of the mask and one host sync, the first time a shape is seen.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fxfuse.spec_attention import AttentionSpec

_MISSING = object()
# (size key, mask shape, device type, invert, Lq, Lk) -> window or None
_verdicts: dict[tuple, int | None] = {}


def causal_mask(lq: int, lk: int, device, window: int = 0, rows: tuple[int, int] | None = None) -> Tensor:
    """True where key j comes after query i, aligned bottom-right as the pass proved it, and with
    a ``window`` also where j is ``window`` or more keys before i. ``rows`` (first, end) gives
    only those query rows."""
    first, end = rows or (0, lq)
    i = torch.arange(first, end, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    return (j > i) | (j <= i - window) if window else j > i


def causal_window(hidden: Tensor, lq: int, lk: int) -> int | None:
    """For a boolean mask of hidden scores (broadcast to (…, Lq, Lk)) that hides exactly the keys
    after each query, 0; that also hides those ``w`` or more keys before it (a sliding window),
    ``w``; else None."""
    if hidden.dtype != torch.bool or hidden.dim() < 2:
        return None
    # One (Lq, Lk) pattern for every batch and head: Hugging Face's mask builders expand theirs
    # over the batch (B, 1, L, L) even when no padding makes the rows differ.
    slices = hidden.reshape(-1, *hidden.shape[-2:])
    if not bool((slices == slices[:1]).all()):
        return None
    first = slices[0].expand(lq, lk)
    if torch.equal(first, causal_mask(lq, lk, hidden.device)):
        return 0
    window = int((~first).sum(-1).max())  # the widest row sees exactly the window
    if 0 < window < lk and torch.equal(first, causal_mask(lq, lk, hidden.device, window)):
        return window
    return None


def resolve(spec: AttentionSpec, extras: list[Tensor], lq: int, lk: int) -> tuple[AttentionSpec, list[Tensor], int]:
    """(spec, extras, dropped): the site with its size-determined mask replaced by the causal rule
    where this shape's mask is that rule (``dropped`` the input's index), else as given (-1)."""
    index = spec.size_mask
    if index < 0:
        return spec, extras, -1
    readers = [(k, s) for k, s in enumerate(spec.steps) if s.input == index]
    if len(readers) != 1 or readers[0][1].op != "fill":  # the pass marks one fill step's mask only
        return dataclasses.replace(spec, size_mask=-1, size_key=""), extras, -1
    (k, step), = readers
    mask = extras[index]
    key = (spec.size_key, tuple(mask.shape), mask.device.type, step.invert, lq, lk)
    window = _verdicts.get(key, _MISSING)
    if window is _MISSING:
        # Bottom-right alignment with more queries than keys hides whole rows, which the mask's
        # fill value (not the rule's bookkeeping) decides: those stay with the mask.
        window = causal_window(~mask if step.invert else mask, lq, lk) if lq <= lk else None
        _verdicts[key] = window
    if window is None:  # a plain mask input at this shape
        return dataclasses.replace(spec, size_mask=-1, size_key=""), extras, -1
    rule = dataclasses.replace(step, input=-1, invert=False, window=window)
    steps = spec.steps[:k] + (rule,) + spec.steps[k + 1:]
    resolved = dataclasses.replace(spec, steps=steps, size_mask=-1, size_key="").without_input(index)
    if resolved is None:
        return spec, extras, -1
    return resolved, extras[:index] + extras[index + 1:], index


def without(items: list, dropped: int) -> list:
    """``items`` (one per extra input) without the dropped input's entry."""
    return items if dropped < 0 else items[:dropped] + items[dropped + 1:]


def with_empty_grad(grads: list[Tensor], given: list[Tensor], dropped: int, first_extra: int = 3) -> list[Tensor]:
    """A backward's gradients with the dropped mask's (an empty tensor: a mask has none) put back
    at its place among the extras' (which start at ``first_extra``)."""
    if dropped < 0:
        return grads
    at = first_extra + dropped
    return grads[:at] + [given[dropped].new_empty(0)] + grads[at:]
