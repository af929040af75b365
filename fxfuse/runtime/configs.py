"""Launch configurations: tile sizes, warps and pipeline stages per GPU architecture, pruned for a
launch, and the tuner that picks one per key once per process.

The candidate list is a comprehension plus a filter (BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps,
2-4 stages), pruned by what makes a config impossible or wasteful for the launch: the shared
memory a software-pipelined key loop needs (``stages`` K and V tiles), the registers the
accumulator and a score tile take per thread (more spill), float32 operands (no tensor-core
path), and query tiles far longer than the queries (decoding, Lq = 1, gets 16-row tiles). The
interpreter gets one tiny config: tiles are correct at any size, and tiny ones run fastest there.

The tuner is fxfuse's own rather than ``triton.autotune``: a config changes more than the meta
parameters (the grid, and the tile lists of index-expression masks are computed per tile size),
so each candidate is a whole launch. It keys on what changes the best choice -- the kernel, the
function, head dims, dtype, power-of-two length buckets, causal or not -- times each candidate
once with a benchmark hook (``triton.testing.do_bench`` on a GPU; replaceable, so the choice is
tested without one) and remembers the winner for the process. Triton caches each config's binary.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable

import triton


@dataclasses.dataclass(frozen=True, order=True)
class LaunchConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages}"


# tl.dot needs at least 16 along every dimension on GPUs; the interpreter runs these tiny tiles.
INTERPRETER = LaunchConfig(16, 16, 1, 1)

# Usable shared memory per block, by compute capability (bytes).
SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Per-thread registers the fp32 accumulator and one fp32 score tile may take: above this the
# compiled kernels spill (measured with `fxfuse explain --target sm_90`: 128x64, 8 warps at D=128
# takes 96 here and fits in 234 registers; 128x128 takes 128 and spills; 112 leaves some room).
_REGISTER_BUDGET = 112
MAX_CANDIDATES = 8
# A config per function that compiles without spills at head dim 128 in bf16 on sm_90, with a
# score-tile input too (measured with `fxfuse kernels DIR --target sm_90`: forward 64x16 4 warps
# 254 registers, dq 64x16 186, dK/dV 32x64 8 warps 244); always among the candidates, last.
FALLBACK = {"forward": LaunchConfig(64, 16, 4, 2), "backward_dq": LaunchConfig(64, 16, 4, 2),
            "backward_dkdv": LaunchConfig(32, 64, 8, 2)}


def arch_of(target: str | int) -> int:
    """``"sm_90"`` / ``"sm_90a"`` / ``90`` → 90."""
    if isinstance(target, int):
        return target
    digits = "".join(c for c in str(target) if c.isdigit())
    if not digits:
        raise ValueError(f"unknown GPU target {target!r}; use sm_80, sm_90 (or the compute capability)")
    return int(digits)


def length_bucket(n: int) -> int:
    """Lengths that share a best config: powers of two from 16 to 16384 (and above)."""
    return min(max(16, triton.next_power_of_2(max(1, n))), 16384)


def attention_configs(arch: int | None, function: str, d: int, dv: int, dtype: str, lq: int, lk: int,
                      tile_inputs: int = 0, halves: int = 1) -> list[LaunchConfig]:
    """The configs fxfuse tries for one launch of an attention kernel ``function`` (``forward``,
    ``backward_dkdv``, ``backward_dq``) on compute capability ``arch`` (None: the interpreter),
    most promising first. ``tile_inputs``: the tensors (masks, biases) read as a score tile.
    ``halves``: 2 for differential attention, whose programs hold both halves' q (k) tiles, score
    tiles and accumulators (one v and dO tile)."""
    if arch is None:
        return [INTERPRETER]
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    size = _BYTES.get(dtype, 2)
    smem = SHARED_BYTES.get(arch, 99 * 1024)
    stages = (2, 3, 4) if arch >= 90 else (2, 3)
    rows = (16, 32, 64) if lq <= 16 else (32, 64, 128) if function == "backward_dkdv" else (64, 128)
    cols = (64, 128) if function == "backward_dkdv" else (16, 32, 64, 128)  # dK/dV holds BLOCK_N keys

    def fits(m: int, n: int, warps: int, st: int) -> bool:
        if dtype == "float32" and (m > 64 or n > 64):
            return False  # full-precision float32 dots run on the FMA units: small tiles
        if m > max(16, triton.next_power_of_2(lq)) or n > max(16, triton.next_power_of_2(lk)):
            return False
        held = n if function == "backward_dkdv" else m  # the rows of the accumulators
        # Hopper's wgmma gives each 4-warp group 64 rows: 8 warps on fewer rows spill (measured),
        # 4 warps on 128 hold too much each; dK/dV (BLOCK_N held rows) fits 8 warps from 64
        if function == "backward_dkdv" and warps == 8 and held < 64 or function != "backward_dkdv" and (
                (warps == 8) != (m >= 128)):
            return False
        # the streamed tiles (K and V forward; q, dO for dK/dV; K and V for dq) times the stages,
        # plus the tile held for the whole loop
        streamed = (n if function != "backward_dkdv" else m) * (halves * bd + bdv) * size * st
        held = (m if function != "backward_dkdv" else n) * (halves * bd + bdv) * size
        if streamed + held > smem:
            return False
        # float32 accumulators held in registers (q, k, v, dO tiles feed wgmma from shared memory):
        # the output (forward), dq (dq), dK and dV (dK/dV); and per score the tiles live at once
        # (p; p and dS in dq, where the dot reads them from registers; dK/dV holds more).
        # Measured with `fxfuse explain --target sm_90` (bf16, pipelined): dq at D=128 128x64 8
        # warps 206-226 registers, 128x128 spills; at D=64 128x128 244, no spills.
        held_regs = {"forward": m * bdv, "backward_dq": m * bd, "backward_dkdv": n * bd}[function] * halves + \
            (n * bdv if function == "backward_dkdv" else 0)
        # each tensor read as a score tile costs a 64-bit pointer per score (measured: a bf16 bias
        # at D=64 spills at 128x64, 8 warps, and fits at 128x32)
        per_score = {"forward": 1, "backward_dq": 1.25, "backward_dkdv": 2}[function] * halves + 4 * tile_inputs
        # Differential (two halves): dK/dV keeps both halves' p and dS live until dv's product; the
        # budget grows by half (measured at D=128, bf16, sm_90: forward 128x32 and 64x16, dK/dV
        # 32x64, dq 128x32 and 64x16 fit; forward 128x64, dK/dV 64x64, dq 128x64 and 64x64 spill).
        per_score += (halves - 1) * (function == "backward_dkdv")
        return (held_regs + m * n * per_score) / (32 * warps) <= _REGISTER_BUDGET * (1 + (halves - 1) / 2)

    configs = [LaunchConfig(m, n, w, s) for m in rows for n in cols for w in (4, 8) for s in stages
               if fits(m, n, w, s)]
    # Larger tiles first (fewer programs, more reuse), then the usual pipeline depth, more warps;
    # at most MAX_CANDIDATES: each candidate is a compile (seconds) when a key is first tuned.
    preferred = 3 if arch >= 90 else 2
    configs.sort(key=lambda c: (-c.BLOCK_M * c.BLOCK_N, abs(c.num_stages - preferred), c.num_stages,
                                -c.num_warps, -c.BLOCK_M))
    configs = configs[:MAX_CANDIDATES - 1]
    fallback = FALLBACK[function]
    if lq > 16 and fallback not in configs and dtype != "float32":
        configs.append(fallback)
    return configs or [LaunchConfig(min(rows), 32, 4, 2)]


def norm_configs(arch: int | None, n: int) -> list[LaunchConfig]:
    """A norm's configs: one row per program, all of it in one block (BLOCK_N); the warps from
    the row length, and twice that for long rows. BLOCK_M is 1 (a row per program)."""
    block = triton.next_power_of_2(n)
    warps = 16 if block >= 16384 else 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    if arch is None:
        return [LaunchConfig(1, block, warps, 1)]
    return [LaunchConfig(1, block, w, 1) for w in dict.fromkeys((warps, min(32, warps * 2))) if block >= 1024 or w == warps]


# ---- tuning ---------------------------------------------------------------------------------------

def _do_bench(run: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=5, rep=20)


_bench: list[Callable[[Callable[[], None]], float]] = [_do_bench]
_chosen: dict[tuple, LaunchConfig] = {}


@contextlib.contextmanager
def bench_hook(measure: Callable[[Callable[[], None]], float]):
    """Time candidates with ``measure(run) -> milliseconds`` instead of ``do_bench`` (tests, and
    machines without a GPU): choices start afresh inside and are forgotten after."""
    saved, before = _bench[0], dict(_chosen)
    _bench[0] = measure
    _chosen.clear()  # every key is tuned afresh with this hook
    try:
        yield
    finally:
        _bench[0] = saved
        _chosen.clear()
        _chosen.update(before)


def choose(key: tuple, configs: Iterable[LaunchConfig], run: Callable[[LaunchConfig], None]) -> LaunchConfig:
    """The fastest of ``configs`` for ``key`` (timed once per process; a single candidate is not
    timed). A config that fails to compile or launch (out of resources) is skipped."""
    if key in _chosen:
        return _chosen[key]
    configs = list(configs)
    best = configs[0]
    if len(configs) > 1:
        times = {}
        for c in configs:
            try:
                times[c] = _bench[0](lambda c=c: run(c))
            except Exception as e:  # noqa: BLE001 -- e.g. triton OutOfResources: not a candidate
                if type(e).__name__ not in ("OutOfResources", "CompilationError", "PTXASError"):
                    raise
        if times:
            best = min(times, key=times.get)
    _chosen[key] = best
    return best


def chosen() -> dict[tuple, LaunchConfig]:
    """What this process chose, by key (for reports and benchmarks)."""
    return dict(_chosen)
