"""Which (query tile, key tile) pairs an attention with index-expression masks must compute.

Shapes are static, so each tile's class is computed once per (spec, shape, block sizes, device),
when a kernel is first launched (on the launch device), by evaluating the site's index masks (expressions and the causal rule)
on the whole index grid, a chunk of query rows at a time, and then cached:

* empty: every in-bounds score of the tile is hidden by a fill whose hidden scores have exactly
  zero probability (``skippable_fill``); the kernels skip it;
* full: no index mask hides any score of the tile; the kernels skip evaluating the expressions;
* partial: the rest, computed as written.

A tile must be empty (or full) for every batch and head, so one plan serves all programs. The
kernels read FlexAttention-style lists: per query tile, how many key tiles to visit, their
indices and whether each is partial; and the transposed lists for the dK/dV kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from fxfuse import index_expr
from fxfuse.lowering.attention import skippable_fill
from fxfuse.spec_attention import AttentionSpec

_CHUNK = 1 << 22  # scores evaluated at once while classifying


@dataclasses.dataclass(frozen=True)
class TilePlan:
    empty: torch.Tensor  # (query tiles, key tiles) bool
    full: torch.Tensor

    @property
    def counts(self) -> dict[str, int]:
        empty, full = int(self.empty.sum()), int((self.full & ~self.empty).sum())
        return {"empty": empty, "full": full, "partial": self.empty.numel() - empty - full}

    def lists(self, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(number of tiles to visit, their indices (visited first), partial flags), int32, per
        query tile, or per key tile when ``transposed``."""
        empty, full = (self.empty.T, self.full.T) if transposed else (self.empty, self.full)
        order = torch.sort(empty.to(torch.int8), dim=1, stable=True).indices
        num = (~empty).sum(1)
        partial = (~full).gather(1, order)
        return num.to(torch.int32).contiguous(), order.to(torch.int32).contiguous(), partial.to(torch.int32).contiguous()


def _hidden(spec: AttentionSpec, steps: list[int], shape4, rows: range, device) -> torch.Tensor | None:
    """Whether any of ``steps`` hides each score of query rows ``rows`` (broadcast over b, h)."""
    b, h, lq, lk = shape4
    out = None
    for k in steps:
        step = spec.steps[k]
        if step.expr is None:  # the causal rule (aligned bottom-right), for these rows only
            i = torch.arange(rows.start, rows.stop, device=device)[:, None] + (lk - lq)
            j = torch.arange(lk, device=device)[None, :]
            hidden = ((j > i) | (j <= i - step.window) if step.window else j > i)[None, None]
        else:
            grids = index_expr.grids((b, h, len(rows), lk), device)
            grids["i"] = grids["i"] + rows.start
            hidden = index_expr.evaluate(step.expr, grids, [])
        out = hidden if out is None else out | hidden
    return out


@functools.lru_cache(maxsize=64)
def _plan(spec_json: str, shape4: tuple, block_m: int, block_n: int, device: str) -> TilePlan:
    spec = AttentionSpec.from_json(spec_json)
    b, h, lq, lk = shape4
    index_fills = [k for k, s in enumerate(spec.steps) if s.op == "fill" and s.input == -1]
    skippable = [k for k in index_fills if skippable_fill(spec, k)]
    n_m, n_n = -(-lq // block_m), -(-lk // block_n)
    empty = torch.zeros(n_m, n_n, dtype=torch.bool, device=device)
    full = torch.zeros(n_m, n_n, dtype=torch.bool, device=device)
    if not empty.numel():  # no queries or no keys: nothing to visit
        return TilePlan(empty, full)
    # The batch and head axes widen the evaluated grid only where an expression reads them.
    read = set().union(*(index_expr.variables(s.expr) for s in spec.steps if s.expr is not None))
    spread = (b if "b" in read else 1) * (h if "h" in read else 1)
    tiles_per_chunk = max(1, _CHUNK // (block_m * lk * spread))
    for m0 in range(0, n_m, tiles_per_chunk):
        rows = range(m0 * block_m, min(lq, (m0 + tiles_per_chunk) * block_m))
        pad_rows, pad_cols = -len(rows) % block_m, n_n * block_n - lk
        for target, steps, hidden_means_true in ((empty, skippable, True), (full, index_fills, False)):
            hidden = _hidden(spec, steps, shape4, rows, device)
            if hidden is None:  # no skippable fill: no tile is empty
                continue
            # Empty: hidden for every batch and head; full: visible for every batch and head.
            per_score = (hidden if hidden_means_true else ~hidden).expand(-1, -1, len(rows), lk).all(0).all(0)
            # Rows and keys past the end neither make a tile non-empty nor non-full.
            per_score = torch.nn.functional.pad(per_score, (0, pad_cols, 0, pad_rows), value=True)
            tiles = per_score.view(-1, block_m, n_n, block_n).all(3).all(1)
            target[m0:m0 + tiles.shape[0]] = tiles
    return TilePlan(empty, full)


def tile_plan(spec: AttentionSpec, shape4, block_m: int, block_n: int, device="cpu") -> TilePlan:
    """The tile classes of ``spec`` at scores of shape ``shape4`` = (B, H, Lq, Lk), evaluated on
    ``device`` (the GPU's, at launch: a 16k x 16k grid takes seconds on a CPU)."""
    return _plan(spec.to_json(), tuple(int(n) for n in shape4), block_m, block_n, str(device))


@functools.lru_cache(maxsize=64)
def _device_lists(spec_json: str, shape4: tuple, block_m: int, block_n: int, device: str):
    plan = _plan(spec_json, shape4, block_m, block_n, device)
    return (*plan.lists(), *plan.lists(transposed=True))


def tile_lists(spec: AttentionSpec, shape4, block_m: int, block_n: int, device) -> tuple[torch.Tensor, ...]:
    """(kv_num, kv_idx, kv_partial, q_num, q_idx, q_partial) on ``device``, as the kernels read them."""
    return _device_lists(spec.to_json(), tuple(int(n) for n in shape4), block_m, block_n, str(device))
